"""Carrying a job through its life on a worker: claim, run isolated, store artifact and report.

This is the parent side (database, storage, lifecycle); the torch work happens in
`worker.runner`, inside a sandboxed child process, through `worker.isolation`. The child sees
copies of its inputs only; its artifact is checked before it enters the store.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from app import metrics
from app.db import read_only_session, unit_of_work
from app.errors import CompactorError
from app.inspection import check_torchscript_archive
from app.models import CompressionJob, Dataset, UploadedModel
from app.models.job import JobStatus, job_progress
from app.reports.html import headline
from app.services import blobs, lifecycle
from app.settings import get_settings
from app.storage import BlobCorrupted, get_blob_store
from worker.isolation import IsolatedFailure, current_sandbox, job_limits, run_isolated
from worker.sandbox import JobDir, OutputRejected

log = logging.getLogger(__name__)
WORKER_NAME = socket.gethostname()
PROGRESS_EVERY_S = 0.5


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


def run_job(job_id: str) -> str:
    """Claim and run a job; returns its final status. A duplicate delivery finds it claimed and stops."""
    with unit_of_work() as session:
        if not lifecycle.claim(session, job_id, WORKER_NAME):
            return lifecycle.status_of(session, job_id) or "missing"
    log.info("job %s started (attempt on %s)", job_id, WORKER_NAME)
    started = time.monotonic()
    status = JobStatus.FAILED
    try:
        status = _run_claimed(job_id)
        log.info("job %s finished: %s", job_id, status)
        return status
    except Exception as exc:
        log.exception("job %s failed outside the model's process", job_id)
        with unit_of_work() as session:
            lifecycle.fail(session, job_id, "internal_error", f"the worker hit an unexpected error: {exc}")
        return JobStatus.FAILED
    finally:
        _observe(job_id, status, time.monotonic() - started)


def _observe(job_id: str, status: str, seconds: float) -> None:
    try:
        with read_only_session() as session:
            spec = session.get(CompressionJob, job_id).spec
        metrics.observe_job(spec, str(status), seconds)
    except Exception:
        log.warning("could not record the metrics of job %s", job_id, exc_info=True)


def _run_claimed(job_id: str) -> str:
    settings = get_settings()
    store = get_blob_store()
    with unit_of_work() as session:
        job = session.get(CompressionJob, job_id)
        spec, model_id = job.spec, job.model_id
        model = session.get(UploadedModel, model_id)
        model_status, model_error = model.status, model.error
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

    job = JobDir.create(settings.work_dir, f"job-{job_id}-", current_sandbox())
    try:
        try:
            files = _job_files(spec, model_id, job)
        except BlobCorrupted as exc:
            with unit_of_work() as session:
                lifecycle.fail(session, job_id, exc.code, exc.detail)
            return JobStatus.FAILED
        last = {"at": 0.0}

        def on_progress(message: dict) -> bool:
            now = time.monotonic()
            if now - last["at"] < PROGRESS_EVERY_S:
                return True
            last["at"] = now
            return _progress(job_id, message)

        try:
            outcome = run_isolated(
                "worker.runner:execute_job",
                {"spec": spec, "files": files, "device": settings.worker_device},
                job_limits(settings.job_time_limit_s),
                on_progress,
                job=job,
            )
            artifact = _checked_artifact(job, outcome)
        except IsolatedFailure as failure:
            with unit_of_work() as session:
                if failure.code == "canceled" or lifecycle.status_of(session, job_id) == JobStatus.CANCELED:
                    return JobStatus.CANCELED
                lifecycle.fail(session, job_id, failure.code, failure.message)
            return JobStatus.FAILED
        stored = store.put_file(artifact)
        report = {"job_id": job_id, **outcome["report"]}
        report["result"]["size_bytes"] = stored.size
        report["environment"]["sandbox"] = job.sandbox.describe()
        if not job.sandboxed:
            report["notes"] = [*report.get("notes", []), "the uploaded model ran unsandboxed (COMPACTOR_SANDBOX=off)"]
        report["summary"]["headline"] = headline(report)  # worded here: the child imports only the engines
        with unit_of_work() as session:
            if lifecycle.succeed(session, job_id, stored.sha256, stored.size, report):
                return JobStatus.SUCCEEDED
        # Canceled (or failed) meanwhile: the artifact no one will download goes at once.
        with read_only_session() as session:
            blobs.release(session, store, stored)
            return lifecycle.status_of(session, job_id) or "missing"
    finally:
        job.remove()


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
    """Find queued jobs whose message was lost, running jobs whose worker died, and validations that
    never ran; send them again. Returns the ids sent."""
    from app import queue

    settings = get_settings()
    with unit_of_work() as session:
        job_ids = lifecycle.jobs_to_resend(
            session,
            settings.requeue_after_s,
            heartbeat_timeout_s=max(120.0, 4 * settings.requeue_interval_s),
            max_attempts=settings.max_attempts,
        )
        model_ids = lifecycle.models_to_revalidate(session, settings.requeue_after_s)
        device_kinds = {job_id: queue.job_device_kind(session.get(CompressionJob, job_id).spec) for job_id in job_ids}
    for job_id in job_ids:
        queue.send(queue.RUN_JOB, job_id, device_kind=device_kinds[job_id])
    for model_id in model_ids:
        queue.send(queue.VALIDATE_MODEL, model_id)
    return job_ids + model_ids


def collect_orphan_blobs() -> list[str]:
    """Delete the blobs no row references any more (uploads deleted, jobs canceled after storing
    their artifact) once the grace period has passed; returns their sha256."""
    with read_only_session() as session:
        return blobs.collect_orphans(session, get_blob_store(), get_settings().blob_grace_s)
