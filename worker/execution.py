"""Carrying a job through its life on a worker: claim, run isolated, store artifact and report.

This is the parent side (database, storage, lifecycle); the torch work happens in
`worker.runner`, inside a spawned child process, through `worker.isolation`.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path

from app.db import unit_of_work
from app.models import CompressionJob, Dataset, UploadedModel
from app.services import lifecycle
from app.settings import get_settings
from app.storage import get_blob_store
from worker.isolation import IsolatedFailure, Limits, run_isolated

log = logging.getLogger(__name__)
WORKER_NAME = socket.gethostname()
PROGRESS_EVERY_S = 0.5


def validate_model(model_id: str) -> str:
    """Load an uploaded model in isolation and mark it ready (with its summary) or invalid (why)."""
    settings = get_settings()
    with unit_of_work() as session:
        model = session.get(UploadedModel, model_id)
        if model is None or model.status != "validating":
            return model.status if model else "missing"
        path = str(get_blob_store().local_path(model.sha256))
    summary, error = None, None
    try:
        summary = run_isolated("worker.validation:validate_model", {"path": path},
                               Limits(settings.validate_time_limit_s, settings.job_memory_limit_bytes))
    except IsolatedFailure as failure:
        code = "model_invalid" if failure.code == "model_error" else failure.code
        error = {"code": code, "message": failure.message}
    with unit_of_work() as session:
        lifecycle.set_model_validation(session, model_id, summary, error)
    return "ready" if error is None else "invalid"


def run_job(job_id: str) -> str:
    """Claim and run a job; returns its final status. A duplicate delivery finds it claimed and stops."""
    with unit_of_work() as session:
        if not lifecycle.claim(session, job_id, WORKER_NAME):
            return lifecycle.status_of(session, job_id) or "missing"
    try:
        return _run_claimed(job_id)
    except Exception as exc:
        log.exception("job %s failed outside the model's process", job_id)
        with unit_of_work() as session:
            lifecycle.fail(session, job_id, "internal_error", f"the worker hit an unexpected error: {exc}")
        return "failed"


def _run_claimed(job_id: str) -> str:
    settings = get_settings()
    store = get_blob_store()
    with unit_of_work() as session:
        job = session.get(CompressionJob, job_id)
        spec, model_id = job.spec, job.model_id
        model = session.get(UploadedModel, model_id)
        model_status, model_error = model.status, model.error
    if model_status == "validating":
        _progress(job_id, {"stage": "validating", "step_index": None, "percent": 0.5, "message": "validating the model"})
        model_status = validate_model(model_id)
        with unit_of_work() as session:
            model_error = session.get(UploadedModel, model_id).error
    if model_status != "ready":
        reason = (model_error or {}).get("message", "the model could not be loaded")
        with unit_of_work() as session:
            lifecycle.fail(session, job_id, "model_invalid", f"the model {model_id} is invalid: {reason}")
        return "failed"

    work_dir = Path(tempfile.mkdtemp(prefix=f"job-{job_id}-", dir=store.tmp_dir))
    try:
        files = _job_files(spec, model_id, work_dir)
        last = {"at": 0.0}

        def on_progress(message: dict) -> bool:
            now = time.monotonic()
            if now - last["at"] < PROGRESS_EVERY_S:
                return True
            last["at"] = now
            return _progress(job_id, message)

        try:
            outcome = run_isolated("worker.runner:execute_job",
                                   {"spec": spec, "files": files, "device": settings.worker_device},
                                   Limits(settings.job_time_limit_s, settings.job_memory_limit_bytes), on_progress)
        except IsolatedFailure as failure:
            with unit_of_work() as session:
                if failure.code == "canceled" or lifecycle.status_of(session, job_id) == "canceled":
                    return "canceled"
                lifecycle.fail(session, job_id, failure.code, failure.message)
            return "failed"
        sha256, size = store.put_file(Path(outcome["artifact_path"]))
        report = {"job_id": job_id, **outcome["report"]}
        report["result"]["size_bytes"] = size
        with unit_of_work() as session:
            if lifecycle.succeed(session, job_id, sha256, size, report):
                return "succeeded"
            return lifecycle.status_of(session, job_id) or "missing"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _progress(job_id: str, message: dict) -> bool:
    with unit_of_work() as session:
        return lifecycle.record_progress(session, job_id, message)


def _job_files(spec: dict, model_id: str, work_dir: Path) -> dict:
    store = get_blob_store()
    with unit_of_work() as session:
        def blob(table, row_id):
            return str(store.local_path(session.get(table, row_id).sha256)) if row_id else None

        students = {s["student_model_id"]: blob(UploadedModel, s["student_model_id"])
                    for s in spec.get("steps", []) if s.get("student_model_id")}
        return {"model": blob(UploadedModel, model_id), "calibration": blob(Dataset, spec.get("calibration_dataset_id")),
                "evaluation": blob(Dataset, spec.get("eval_dataset_id")), "students": students,
                "output_dir": str(work_dir)}


def resend_lost_work() -> list[str]:
    """Find queued jobs whose message was lost, running jobs whose worker died, and validations that
    never ran; send them again. Returns the ids sent."""
    from app import queue

    settings = get_settings()
    with unit_of_work() as session:
        job_ids = lifecycle.jobs_to_resend(session, settings.requeue_after_s,
                                           heartbeat_timeout_s=max(120.0, 4 * settings.requeue_interval_s),
                                           max_attempts=settings.max_attempts)
        model_ids = lifecycle.models_to_revalidate(session, settings.requeue_after_s)
    for job_id in job_ids:
        queue.send(queue.RUN_JOB, job_id)
    for model_id in model_ids:
        queue.send(queue.VALIDATE_MODEL, model_id)
    return job_ids + model_ids
