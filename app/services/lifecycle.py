"""A job's life: claim, progress, finish, cancel, and the sweep that loses nothing.

Every state change goes through `_move`, an UPDATE guarded by `TRANSITIONS`, so a duplicate
delivery, a cancel racing a finish or two sweepers at once cannot run a job twice, overwrite a
finished one or resurrect a canceled one. Each change bumps the job's `revision` (its event id),
and a move to a final state stores the job's webhook in the same transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.models import CompressionJob, UploadedModel
from app.models.base import utcnow
from app.models.job import FINAL_STATUSES, TRANSITIONS, JobStatus, job_progress
from app.services import webhooks

log = logging.getLogger(__name__)


def _move(session: Session, job_id: str, to: JobStatus, *where, **values) -> bool:
    """Move a job to `to` if its current state may move there (and `where` holds); False otherwise.

    The guard is in the UPDATE itself, so the database decides between racing writers. Objects
    already in the session are not touched: whoever holds one refreshes it to see the outcome.
    """
    allowed_from = [status for status, targets in TRANSITIONS.items() if to in targets]
    result = session.execute(
        update(CompressionJob)
        .where(CompressionJob.id == job_id, CompressionJob.status.in_(allowed_from), *where)
        .values(status=to, revision=CompressionJob.revision + 1, **values)
        .execution_options(synchronize_session=False)
    )
    moved = result.rowcount == 1
    if moved and to in FINAL_STATUSES:
        webhooks.record_job_event(session, job_id)
    return moved


def claim(session: Session, job_id: str, worker: str) -> bool:
    """Move a queued job to running for this worker; False when it is not queued (already taken,
    canceled, or finished)."""
    now = utcnow()
    return _move(
        session,
        job_id,
        JobStatus.RUNNING,
        attempts=CompressionJob.attempts + 1,
        started_at=now,
        heartbeat_at=now,
        worker=worker,
        progress=job_progress("starting", "loading"),
    )


def record_progress(session: Session, job_id: str, progress: dict) -> bool:
    """Store progress and a heartbeat; False when the job is no longer running (e.g. canceled)."""
    result = session.execute(
        update(CompressionJob)
        .where(CompressionJob.id == job_id, CompressionJob.status == JobStatus.RUNNING)
        .values(progress=progress, heartbeat_at=utcnow(), revision=CompressionJob.revision + 1)
    )
    return result.rowcount == 1


def succeed(session: Session, job_id: str, artifact_sha256: str, artifact_size: int, report: dict) -> bool:
    """Record a running job's artifact and report; False when it was canceled or failed meanwhile."""
    return _move(
        session,
        job_id,
        JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        artifact_sha256=artifact_sha256,
        artifact_size_bytes=artifact_size,
        report=report,
        error=None,
        progress=job_progress("done", "succeeded", percent=100.0),
    )


def fail(session: Session, job_id: str, code: str, message: str) -> bool:
    """Fail a queued or running job with an error a user can act on; False when it had finished."""
    return _move(session, job_id, JobStatus.FAILED, finished_at=utcnow(), error={"code": code, "message": message})


def cancel(session: Session, job_id: str) -> bool:
    """Cancel a queued or running job (its worker sees it and stops); False when it had finished."""
    return _move(
        session,
        job_id,
        JobStatus.CANCELED,
        finished_at=utcnow(),
        progress=job_progress("canceled", "canceled by request"),
    )


def status_of(session: Session, job_id: str) -> JobStatus | None:
    return session.scalar(select(CompressionJob.status).where(CompressionJob.id == job_id))


def set_model_validation(session: Session, model_id: str, summary: dict | None, error: dict | None) -> None:
    model = session.get(UploadedModel, model_id)
    if model is None:
        return
    model.status = "ready" if error is None else "invalid"
    model.summary, model.error = summary, error


def jobs_to_resend(
    session: Session, requeue_after_s: float, heartbeat_timeout_s: float, max_attempts: int
) -> list[str]:
    """Find jobs an accident left behind and make them runnable again; returns the ids to send.

    - queued and never enqueued (the broker was down at submission), or enqueued long ago and still
      not claimed (the message was lost): send again;
    - running with a stale heartbeat (the worker died): back to queued and send again, or failed
      `worker_lost` once it has used all its attempts.
    """
    now = utcnow()
    resend = list(
        session.scalars(
            select(CompressionJob.id).where(
                CompressionJob.status == JobStatus.QUEUED,
                or_(
                    CompressionJob.enqueued_at.is_(None),
                    CompressionJob.enqueued_at < now - timedelta(seconds=requeue_after_s),
                ),
            )
        )
    )
    # Still running with a stale heartbeat when the UPDATE runs: a job that finished or beat since is left alone.
    stale = (
        CompressionJob.status == JobStatus.RUNNING,
        CompressionJob.heartbeat_at < now - timedelta(seconds=heartbeat_timeout_s),
    )
    for job_id, attempts in session.execute(select(CompressionJob.id, CompressionJob.attempts).where(*stale)).all():
        if attempts >= max_attempts:
            _move(
                session,
                job_id,
                JobStatus.FAILED,
                *stale,
                finished_at=now,
                error={
                    "code": "worker_lost",
                    "message": f"the worker running this job stopped responding {attempts} times; submit it again",
                },
            )
        elif _move(
            session,
            job_id,
            JobStatus.QUEUED,
            *stale,
            progress=job_progress(JobStatus.QUEUED, "re-queued: its worker stopped responding"),
        ):
            resend.append(job_id)
    for job_id in resend:
        session.execute(update(CompressionJob).where(CompressionJob.id == job_id).values(enqueued_at=now))
    return resend


def models_to_revalidate(session: Session, older_than_s: float) -> list[str]:
    """Models still `validating` long after upload: their validation message was lost (or its worker
    died), so it is sent again. Validation is idempotent."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            select(UploadedModel.id).where(
                UploadedModel.status == "validating",
                UploadedModel.deleted_at.is_(None),
                UploadedModel.created_at < cutoff,
            )
        )
    )
