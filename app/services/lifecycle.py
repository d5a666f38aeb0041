"""A job's life on the worker side: claim, progress, finish, and the sweep that loses nothing.

Every state change is a conditional UPDATE, so a duplicate delivery, a cancel racing a finish or
two sweepers at once cannot run a job twice or resurrect a canceled one.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.models import CompressionJob, UploadedModel
from app.models.base import utcnow

log = logging.getLogger(__name__)


def claim(session: Session, job_id: str, worker: str) -> bool:
    """Move a queued job to running for this worker; False when it is not queued (already taken,
    canceled, or finished)."""
    now = utcnow()
    result = session.execute(
        update(CompressionJob)
        .where(CompressionJob.id == job_id, CompressionJob.status == "queued")
        .values(status="running", attempts=CompressionJob.attempts + 1, started_at=now, heartbeat_at=now,
                worker=worker, progress={"stage": "starting", "step_index": None, "percent": 0.0, "message": "loading"})
    )
    return result.rowcount == 1


def record_progress(session: Session, job_id: str, progress: dict) -> bool:
    """Store progress and a heartbeat; False when the job is no longer running (e.g. canceled)."""
    result = session.execute(
        update(CompressionJob).where(CompressionJob.id == job_id, CompressionJob.status == "running")
        .values(progress=progress, heartbeat_at=utcnow()))
    return result.rowcount == 1


def succeed(session: Session, job_id: str, artifact_sha256: str, artifact_size: int, report: dict) -> bool:
    result = session.execute(
        update(CompressionJob).where(CompressionJob.id == job_id, CompressionJob.status == "running")
        .values(status="succeeded", finished_at=utcnow(), artifact_sha256=artifact_sha256,
                artifact_size_bytes=artifact_size, report=report, error=None,
                progress={"stage": "done", "step_index": None, "percent": 100.0, "message": "succeeded"}))
    return result.rowcount == 1


def fail(session: Session, job_id: str, code: str, message: str) -> bool:
    result = session.execute(
        update(CompressionJob).where(CompressionJob.id == job_id, CompressionJob.status.in_(("queued", "running")))
        .values(status="failed", finished_at=utcnow(), error={"code": code, "message": message}))
    return result.rowcount == 1


def status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(CompressionJob.status).where(CompressionJob.id == job_id))


def set_model_validation(session: Session, model_id: str, summary: dict | None, error: dict | None) -> None:
    model = session.get(UploadedModel, model_id)
    if model is None:
        return
    model.status = "ready" if error is None else "invalid"
    model.summary, model.error = summary, error


def jobs_to_resend(session: Session, requeue_after_s: float, heartbeat_timeout_s: float, max_attempts: int) -> list[str]:
    """Find jobs an accident left behind and make them runnable again; returns the ids to send.

    - queued and never enqueued (the broker was down at submission), or enqueued long ago and still
      not claimed (the message was lost): send again;
    - running with a stale heartbeat (the worker died): back to queued and send again, or failed
      `worker_lost` once it has used all its attempts.
    """
    now = utcnow()
    resend = list(session.scalars(select(CompressionJob.id).where(
        CompressionJob.status == "queued",
        or_(CompressionJob.enqueued_at.is_(None), CompressionJob.enqueued_at < now - timedelta(seconds=requeue_after_s)),
    )))
    stale = session.scalars(select(CompressionJob).where(
        CompressionJob.status == "running", CompressionJob.heartbeat_at < now - timedelta(seconds=heartbeat_timeout_s)))
    for job in stale:
        if job.attempts >= max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = {"code": "worker_lost", "message": f"the worker running this job stopped responding "
                                                           f"{job.attempts} times; submit it again"}
        else:
            job.status = "queued"
            job.progress = {"stage": "queued", "step_index": None, "percent": 0.0,
                            "message": "re-queued: its worker stopped responding"}
            resend.append(job.id)
    for job_id in resend:
        session.execute(update(CompressionJob).where(CompressionJob.id == job_id).values(enqueued_at=now))
    return resend


def models_to_revalidate(session: Session, older_than_s: float) -> list[str]:
    """Models still `validating` long after upload: their validation message was lost (or its worker
    died), so it is sent again. Validation is idempotent."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(session.scalars(select(UploadedModel.id).where(
        UploadedModel.status == "validating", UploadedModel.deleted_at.is_(None), UploadedModel.created_at < cutoff)))
