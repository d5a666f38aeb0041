"""Carrying a job through its life on a worker: claim, run isolated, store artifact and report.

This is the parent side (database, storage, lifecycle); the torch work happens in
`worker.runner`, inside a sandboxed child process, through `worker.isolation`. The child sees
copies of its inputs only; its artifact is checked before it enters the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from sqlalchemy import select

from app import metrics, queue
from app.db import read_only_session, unit_of_work
from app.errors import CompactorError
from app.inspection import check_torchscript_archive
from app.models import CompressionJob, Dataset, UploadedModel
from app.models.job import JobStatus, job_progress
from app.reports.html import headline
from app.services import blobs, checkpoints, lifecycle, webhooks
from app.settings import Settings, get_settings
from app.storage import BlobCorrupted, StoredBlob, get_blob_store
from worker import devices
from worker.cpu_share import cpu_share
from worker.errors import internal_error_message
from worker.isolation import IsolatedFailure, current_sandbox, job_limits, run_isolated
from worker.sandbox import JobDir, OutputRejected, remove_abandoned

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5
# jobs this worker runs at once (its Celery concurrency, recorded when it starts): each job's CPU
# threads are the worker's usable cores divided by this
job_slots = 1
# The service's own code failing may be a passing accident (a database hiccup): one more attempt.
INTERNAL_ERROR_ATTEMPTS = 2


def validate_model(model_id: str) -> str:
    """Load an uploaded model in the sandbox and mark it ready (with its summary) or invalid (why)."""
    settings = get_settings()
    store = get_blob_store()
    with unit_of_work() as session:
        model = session.get(UploadedModel, model_id)
        if model is None or model.status != "validating":
            return model.status if model else "missing"
        sha256, size = model.sha256, model.size_bytes
    job = JobDir.create(settings.work_dir, f"validate-{model_id}-", current_sandbox())
    summary, error = None, None
    try:
        path = job.add_input("model.pt", store.verified_path(sha256, size))
        summary = run_isolated(
            "worker.validation:validate_model", {"path": path}, job_limits(settings.validate_time_limit_s), job=job
        )
    except IsolatedFailure as failure:
        code = "model_invalid" if failure.code == "model_error" else failure.code
        error = {"code": code, "message": failure.message}
    except BlobCorrupted as exc:
        error = {"code": exc.code, "message": exc.detail}
    finally:
        job.remove()
    with unit_of_work() as session:
        lifecycle.set_model_validation(session, model_id, summary, error)
    return "ready" if error is None else "invalid"


def run_job(job_id: str, worker: str) -> str:
    """Claim and run a job for the worker named `worker` (its Celery node name); returns its status
    when this attempt ends. A duplicate delivery finds it claimed and stops."""
    with unit_of_work() as session:
        if not lifecycle.claim(session, job_id, worker):
            return lifecycle.status_of(session, job_id) or "missing"
        attempt = lifecycle.attempt_of(session, job_id)
    log.info("job %s started (attempt %d on %s)", job_id, attempt, worker)
    started = time.monotonic()
    status = JobStatus.FAILED
    with _heartbeat(job_id, attempt):
        try:
            status = _run_claimed(job_id)
        except IsolatedFailure as failure:
            status = _failed(job_id, failure)
        except Exception as exc:
            log.exception("job %s: the worker's own code failed outside the model's process", job_id)
            status = _failed(job_id, IsolatedFailure("internal_error", internal_error_message(exc)))
        finally:
            _observe(job_id, status, time.monotonic() - started)
    log.info("job %s finished: %s", job_id, status)
    return status


def _observe(job_id: str, status: str, seconds: float) -> None:
    try:
        with read_only_session() as session:
            spec = session.get(CompressionJob, job_id).spec
        metrics.observe_job(spec, str(status), seconds)
    except Exception:
        log.warning("could not record the metrics of job %s", job_id, exc_info=True)


@contextmanager
def _heartbeat(job_id: str, attempt: int) -> Iterator[None]:
    """Beat for this attempt every sixth of the heartbeat timeout while it runs, whatever it is doing
    (copying inputs, a long step that reports no progress): only a dead worker stops beating."""
    every_s = get_settings().heartbeat_timeout_s / 6
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                with unit_of_work() as session:
                    if not lifecycle.beat(session, job_id, attempt):
                        return
            except Exception:
                log.warning("job %s: heartbeat failed; trying again", job_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _failed(job_id: str, failure: IsolatedFailure) -> str:
    """Record how an attempt failed: retried when the failure was not the job's doing (a signal from
    outside; the service's own code, once), failed with the code otherwise. Returns the status."""
    settings = get_settings()
    if failure.code == "internal_error":
        log.error("job %s: internal error: %s\n%s", job_id, failure.message, failure.traceback or "(traceback above)")
    retry_limits = {
        "killed": settings.max_attempts,
        "internal_error": min(INTERNAL_ERROR_ATTEMPTS, settings.max_attempts),
    }
    with unit_of_work() as session:
        if failure.code == "canceled" or lifecycle.status_of(session, job_id) == JobStatus.CANCELED:
            return JobStatus.CANCELED
        limit = retry_limits.get(failure.code)
        requeued = limit is not None and lifecycle.requeue(session, job_id, failure.message, limit)
        if not requeued:
            message = failure.message
            if limit is not None:
                message += f" (attempt {lifecycle.attempt_of(session, job_id)}: it is not retried again)"
            lifecycle.fail(session, job_id, failure.code, message)
            return JobStatus.FAILED
    log.warning("job %s: %s: %s; re-queued", job_id, failure.code, failure.message)
    _send([(job_id, True)])
    return JobStatus.QUEUED


def _run_claimed(job_id: str) -> str:
    settings = get_settings()
    store = get_blob_store()
    with unit_of_work() as session:
        job = session.get(CompressionJob, job_id)
        spec, model_id, tenant = job.spec, job.model_id, job.tenant
        model = session.get(UploadedModel, model_id)
        model_status, model_error, model_sha256 = model.status, model.error, model.sha256
    if model_status == "validating":
        _progress(job_id, job_progress("validating", "validating the model", percent=0.5))
        model_status = validate_model(model_id)
        with unit_of_work() as session:
            model_error = session.get(UploadedModel, model_id).error
    if model_status != "ready":
        reason = (model_error or {}).get("message", "the model could not be loaded")
        with unit_of_work() as session:
            lifecycle.fail(session, job_id, "model_invalid", f"the model {model_id} is invalid: {reason}")
        return JobStatus.FAILED

    keys = checkpoints.step_keys(tenant, model_sha256, spec, _compute_kind(spec))
    job = JobDir.create(settings.work_dir, f"job-{job_id}-", current_sandbox())
    try:
        try:
            files = _job_files(spec, model_id, job)
        except BlobCorrupted as exc:
            with unit_of_work() as session:
                lifecycle.fail(session, job_id, exc.code, exc.detail)
            return JobStatus.FAILED
        reused = _stored_steps(job_id, tenant, spec, keys, job) if spec.get("reuse_checkpoints", True) else []
        files["stored_steps"] = [{"path": path, "stage": c.stage, "job_id": c.job_id} for c, path in reused]
        last = {"at": 0.0, "stage": None}
        stored_now: set[int] = set()

        def on_progress(message: dict) -> bool:
            if "checkpoint" in message:  # never throttled: a later attempt starts after it
                _store_checkpoint(job_id, tenant, model_id, keys, job, message["checkpoint"], stored_now)
                return True
            # Within a stage, one write per interval; a new stage is always written, else a stage
            # that starts right after another (and then runs long) would never be shown.
            now, stage = time.monotonic(), (message.get("stage"), message.get("step_index"))
            if now - last["at"] < PROGRESS_EVERY_S and stage == last["stage"]:
                return True
            last.update(at=now, stage=stage)
            return _progress(job_id, message)

        outcome = run_isolated(
            "worker.runner:execute_job",
            {
                "spec": spec,
                "files": files,
                "device": settings.worker_device,
                "cpu": cpu_share(job_slots, settings.worker_threads).describe(),
                "extra_time_s": settings.measure_extra_time_s,
                "fresh_process": True,
            },
            job_limits(settings.job_time_limit_s),
            on_progress,
            job=job,
            canceled=lambda: _canceled(job_id),
        )
        artifact = _checked_artifact(job, outcome)
        stored = store.put_file(artifact)
        report = {"job_id": job_id, **outcome["report"]}
        report["result"]["size_bytes"] = stored.size
        onnx = _stored_onnx(job, outcome, store, report)
        report["environment"]["sandbox"] = job.sandbox.describe()
        if reused:
            report["notes"] = [*report.get("notes", []), _reuse_note(job_id, [c for c, _ in reused], len(keys))]
        if not job.sandboxed:
            report["notes"] = [*report.get("notes", []), "the uploaded model ran unsandboxed (COMPACTOR_SANDBOX=off)"]
        report["summary"]["headline"] = headline(report)  # worded here: the child imports only the engines
        with unit_of_work() as session:
            if lifecycle.succeed(session, job_id, stored.sha256, stored.size, report, onnx):
                return JobStatus.SUCCEEDED
        # Canceled (or failed) meanwhile: the artifacts no one will download go at once.
        with read_only_session() as session:
            blobs.release(session, store, stored)
            if onnx is not None:
                blobs.release(session, store, onnx)
            return lifecycle.status_of(session, job_id) or "missing"
    finally:
        job.remove()


@cache
def _worker_kind() -> str:
    return devices.device_kind(get_settings().worker_device)


def _compute_kind(spec: dict) -> str:
    """Where the job's steps compute (as `worker.runner` picks it): what the spec asks, else this worker's kind."""
    benchmark = spec.get("benchmark")
    wanted = benchmark.get("device", "cpu") if isinstance(benchmark, dict) else "cpu"
    return wanted if wanted in queue.DEVICE_KINDS else _worker_kind()


def _stored_steps(
    job_id: str, tenant: str, spec: dict, keys: list[str], job: JobDir
) -> list[tuple[checkpoints.Checkpoint, str]]:
    """Copies, in the job's directory, of the stored outputs of its longest stored prefix of steps,
    with the paths the child sees; a blob gone or damaged ends the prefix there."""
    store = get_blob_store()
    with read_only_session() as session:
        prefix = checkpoints.stored_prefix(session, tenant, keys)
    reused = []
    for checkpoint in prefix:
        try:
            source = store.verified_path(checkpoint.sha256, checkpoint.size_bytes)
        except BlobCorrupted as exc:
            log.warning(
                "job %s: the stored output of step %d is not usable: %s", job_id, checkpoint.step_index + 1, exc
            )
            break
        reused.append((checkpoint, job.add_input(f"stored-step-{checkpoint.step_index + 1}.pt", source)))
    if reused:
        log.info(
            "job %s: starting after step %d of %d, reusing stored outputs (of job %s)",
            job_id,
            len(reused),
            len(keys),
            ", ".join(sorted({c.job_id for c, _ in reused})),
        )
    return reused


def _store_checkpoint(
    job_id: str, tenant: str, model_id: str, keys: list[str], job: JobDir, offer, stored_now: set[int]
) -> None:
    """Store the output of a step the child completed, once per step and attempt, taken only if it is
    a TorchScript archive in its output directory (like the artifact). A failure to store it costs a
    later attempt that step again, never this job: it is logged and the job goes on."""
    try:
        index = offer["step_index"]
        if not isinstance(index, int) or not 0 <= index < len(keys) or index in stored_now:
            raise ValueError(f"no step {index!r} to store")
        if not isinstance(offer["stage"], dict):
            raise ValueError("the step's report entry is not an object")
        stored_now.add(index)
        path = job.output_file(offer["path"])
        if not path.is_relative_to((job.root / "out").resolve()):
            raise OutputRejected("a step's output must be in the job's output directory")
        with open(path, "rb") as fh:
            check_torchscript_archive(fh, path.stat().st_size)
        blob = get_blob_store().put_file(path)
        with unit_of_work() as session:
            checkpoints.record(session, tenant, keys[index], job_id, model_id, index, blob, offer["stage"])
        log.info(
            "job %s: step %d of %d completed; its output is stored (%s)", job_id, index + 1, len(keys), blob.sha256
        )
    except Exception as exc:
        log.warning("job %s: the output of a completed step was not stored: %s", job_id, exc, exc_info=True)


def _reuse_note(job_id: str, reused: list[checkpoints.Checkpoint], steps: int) -> str:
    sources = sorted({c.job_id for c in reused} - {job_id})
    if not sources:
        return (
            f"resumed after step {len(reused)} of {steps}: the outputs an earlier attempt stored were reused, "
            "those steps did not run again"
        )
    return (
        f"steps 1-{len(reused)} of {steps} did not run: the stored outputs of job {', '.join(sources)} "
        "(same model, data, seed and steps) were reused; set reuse_checkpoints: false to run them afresh"
    )


def _checked_artifact(job: JobDir, outcome) -> Path:
    """The artifact the child names, taken only if it is a TorchScript archive in its output dir."""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("report"), dict):
        raise IsolatedFailure("model_crashed", "the model's process returned no report")
    try:
        path = job.output_file(outcome.get("artifact_path"))
        with open(path, "rb") as fh:
            check_torchscript_archive(fh, path.stat().st_size)
    except (OutputRejected, OSError) as exc:
        raise IsolatedFailure("artifact_invalid", f"the job's artifact was refused: {exc}") from None
    except CompactorError as exc:
        raise IsolatedFailure(
            "artifact_invalid", f"the job's artifact is not a TorchScript archive: {exc.detail}"
        ) from None
    return path


def _stored_onnx(job: JobDir, outcome: dict, store, report: dict) -> StoredBlob | None:
    """The ONNX file the child names, stored as bytes (hashed, never parsed or run here: it is
    made from the uploaded model); its sha256 and size go into the report's `onnx`."""
    if not outcome.get("onnx_path"):
        return None
    try:
        path = job.output_file(outcome["onnx_path"])
    except (OutputRejected, OSError) as exc:
        raise IsolatedFailure("artifact_invalid", f"the job's ONNX file was refused: {exc}") from None
    stored = store.put_file(path)
    section = report.get("onnx") if isinstance(report.get("onnx"), dict) else {}
    report["onnx"] = {**section, "sha256": stored.sha256, "size_bytes": stored.size}
    return stored


def _canceled(job_id: str) -> bool:
    with read_only_session() as session:
        return lifecycle.status_of(session, job_id) == JobStatus.CANCELED


def _progress(job_id: str, message: dict) -> bool:
    with unit_of_work() as session:
        return lifecycle.record_progress(session, job_id, message)


def _job_files(spec: dict, model_id: str, job: JobDir) -> dict:
    """Copies of the job's model, datasets and students in its directory, verified against their
    sha256 on the way; the paths as the sandboxed child sees them."""
    store = get_blob_store()
    with unit_of_work() as session:

        def blob(table, row_id, name):
            if not row_id:
                return None
            row = session.get(table, row_id)
            return job.add_input(name, store.verified_path(row.sha256, row.size_bytes))

        students = {
            s["student_model_id"]: blob(UploadedModel, s["student_model_id"], f"student-{i}.pt")
            for i, s in enumerate(spec.get("steps", []))
            if s.get("student_model_id")
        }
        return {
            "model": blob(UploadedModel, model_id, "model.pt"),
            "calibration": blob(Dataset, spec.get("calibration_dataset_id"), "calibration"),
            "evaluation": blob(Dataset, spec.get("eval_dataset_id"), "evaluation"),
            "students": students,
            "output_dir": job.inside("out"),
        }


def resend_lost_work() -> list[str]:
    """One sweep: re-queue running jobs whose worker died, acknowledge the messages dead workers
    held, send what the broker does not hold, re-send validations that never ran and webhook
    attempts that are overdue, and delete dead attempts' directories. Returns the ids sent.

    Celery's own mechanisms do part of this: late acknowledgement keeps a job's message in the
    broker until the job ends, so a job that waits in the queue is never lost and never re-sent.
    What they cannot do is notice a dead worker in time: its messages come back only after the
    visibility timeout, which must outlast the longest job; and `reject_on_worker_lost` applies to a
    prefork child dying under a live parent, while our worker is one process (a thread pool) that
    dies whole. So each worker watches the others' heartbeats in the database.
    """
    settings = get_settings()
    with unit_of_work() as session:
        recovered = lifecycle.recover_lost_jobs(session, settings.heartbeat_timeout_s, settings.max_attempts)
    if recovered:
        log.warning("re-queued %d job(s) whose worker stopped responding: %s", len(recovered), recovered)
    _acknowledge_dead_deliveries(settings)
    with unit_of_work() as session:
        to_send = lifecycle.claim_unsent(session, settings.requeue_after_s)
        model_ids = lifecycle.claim_unsent_validations(session)
        delivery_ids = webhooks.overdue_deliveries(session, settings.requeue_after_s)
    sent = _send(to_send)
    refused = [model_id for model_id in model_ids if not queue.send(queue.VALIDATE_MODEL, model_id)]
    if refused:
        with unit_of_work() as session:
            lifecycle.mark_validation_unsent(session, refused)
    for delivery_id in delivery_ids:
        queue.send(queue.DELIVER_WEBHOOK, delivery_id)
    remove_dead_attempts()
    return sent + model_ids + delivery_ids


def _send(jobs: list[tuple[str, bool]]) -> list[str]:
    """Send jobs already marked as sent (to the recovery queue when they ran before); those the
    broker refused are marked unsent again, for the next sweep."""
    sent, refused = [], []
    with read_only_session() as session:
        specs = dict(
            session.execute(
                select(CompressionJob.id, CompressionJob.spec).where(CompressionJob.id.in_([j for j, _ in jobs]))
            ).all()
        )
    for job_id, ran_before in jobs:
        kind = queue.job_device_kind(specs.get(job_id) or {})
        (sent if queue.send(queue.RUN_JOB, job_id, device_kind=kind, recovery=ran_before) else refused).append(job_id)
    if refused:
        with unit_of_work() as session:
            lifecycle.mark_unsent(session, refused)
    return sent


def _acknowledge_dead_deliveries(settings: Settings) -> None:
    """Acknowledge the messages a dead worker took and never acknowledged (Redis keeps them until
    the visibility timeout, then would hand them out again).

    A job's message held longer than the heartbeat timeout goes when its job has ended or it is not
    the running attempt's (it was delivered before that attempt started); a queued job's (a worker
    died before claiming it) goes and the job is marked unsent, to be sent again. A validation's
    goes when the model is no longer validating, or once it is held past the validation time limit
    (its worker died), and the validation is then marked unsent.
    """
    timeout = settings.heartbeat_timeout_s
    held = [d for d in queue.unacknowledged() if d.queue in queue.job_queues() and d.args and d.age_s > timeout]
    jobs_held = [d for d in held if d.task == queue.RUN_JOB]
    validations_held = [d for d in held if d.task == queue.VALIDATE_MODEL]
    if not held:
        return
    with unit_of_work() as session:
        jobs = lifecycle.running_since(session, [d.args[0] for d in jobs_held])
        models = lifecycle.model_statuses(session, [d.args[0] for d in validations_held])
        jobs_lost, validations_lost = [], []
        for delivery in jobs_held:
            status, running_for = jobs.get(delivery.args[0], (None, None))
            if status == JobStatus.RUNNING and running_for is not None and delivery.age_s < running_for + timeout:
                continue  # the running attempt's own message
            if status == JobStatus.QUEUED:
                jobs_lost.append(delivery.args[0])
            queue.forget(delivery.tag)
            log.info("acknowledged a dead worker's message for job %s (%s)", delivery.args[0], status or "gone")
        for delivery in validations_held:
            status = models.get(delivery.args[0])
            if status == "validating":
                if delivery.age_s < settings.validate_time_limit_s + timeout:
                    continue  # may still be validating
                validations_lost.append(delivery.args[0])
            queue.forget(delivery.tag)
            log.info("acknowledged a dead worker's validation of model %s (%s)", delivery.args[0], status or "gone")
        lifecycle.mark_unsent(session, jobs_lost)
        lifecycle.mark_validation_unsent(session, validations_lost)


def remove_dead_attempts() -> None:
    """Delete the directories of attempts no live process runs (a worker killed mid-job): at a
    worker's start-up and in every sweep."""
    removed = remove_abandoned(get_settings().work_dir)
    if removed:
        log.info("removed %d directory(ies) of dead attempts: %s", len(removed), [p.name for p in removed])


def collect_orphan_blobs() -> list[str]:
    """Delete the blobs no row references any more (uploads deleted, jobs canceled after storing
    their artifact) once the grace period has passed; returns their sha256."""
    with read_only_session() as session:
        return blobs.collect_orphans(session, get_blob_store(), get_settings().blob_grace_s)
