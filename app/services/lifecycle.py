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

from app import queue
from app.db import after_commit
from app.models import CompressionJob, UploadedModel
from app.models.base import utcnow
from app.models.job import FINAL_STATUSES, TRANSITIONS, JobStatus, job_progress
from app.services import webhooks
from app.storage import StoredBlob

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
        search_id = session.scalar(select(CompressionJob.search_id).where(CompressionJob.id == job_id))
        if search_id is not None:
            # A trial ended: its search proposes the next ones now (the sweepers would, later).
            after_commit(session, lambda: queue.send(queue.ADVANCE_SEARCH, search_id))
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


def succeed(
    session: Session,
    job_id: str,
    artifact_sha256: str,
    artifact_size: int,
    report: dict,
    onnx: StoredBlob | None = None,
) -> bool:
    """Record a running job's artifacts and report; False when it was canceled or failed meanwhile."""
    return _move(
        session,
        job_id,
        JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        artifact_sha256=artifact_sha256,
        artifact_size_bytes=artifact_size,
        onnx_sha256=onnx.sha256 if onnx else None,
        onnx_size_bytes=onnx.size if onnx else None,
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


def beat(session: Session, job_id: str, attempt: int) -> bool:
    """The heartbeat of a running attempt; False when the job has moved on (finished, canceled, or
    re-queued and claimed again: a later attempt's heartbeat is not this one's to keep)."""
    result = session.execute(
        update(CompressionJob)
        .where(
            CompressionJob.id == job_id,
            CompressionJob.status == JobStatus.RUNNING,
            CompressionJob.attempts == attempt,
        )
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def attempt_of(session: Session, job_id: str) -> int:
    return session.scalar(select(CompressionJob.attempts).where(CompressionJob.id == job_id)) or 0


def requeue(session: Session, job_id: str, reason: str, attempts_below: int) -> bool:
    """Move a running job back to queued, marked as being sent (the caller sends it next), when it
    has used fewer than `attempts_below` attempts; False otherwise (nothing changed)."""
    return _move(
        session,
        job_id,
        JobStatus.QUEUED,
        CompressionJob.status == JobStatus.RUNNING,
        CompressionJob.attempts < attempts_below,
        enqueued_at=utcnow(),
        progress=job_progress(JobStatus.QUEUED, f"re-queued: {reason}"),
    )


def recover_lost_jobs(session: Session, heartbeat_timeout_s: float, max_attempts: int) -> list[str]:
    """Running jobs whose worker stopped beating (it died): back to queued, to be sent again to the
    recovery queue, or failed `worker_lost` once they have used all their attempts. Returns the
    re-queued ids; they are left unsent (`enqueued_at` cleared) for `claim_unsent` to send."""
    now = utcnow()
    # Still running with a stale heartbeat when the UPDATE runs: a job that finished or beat since is left alone.
    stale = (
        CompressionJob.status == JobStatus.RUNNING,
        CompressionJob.heartbeat_at < now - timedelta(seconds=heartbeat_timeout_s),
    )
    requeued = []
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
            enqueued_at=None,
            progress=job_progress(JobStatus.QUEUED, "re-queued: its worker stopped responding"),
        ):
            requeued.append(job_id)
    return requeued


def claim_unsent(session: Session, requeue_after_s: float) -> list[tuple[str, bool]]:
    """Queued jobs the broker does not hold, marked as being sent; [(id, ran_before)] to send.

    Unsent: `enqueued_at` is empty, because the API's send failed (looked at once the send has had
    `requeue_after_s` to finish), or because the job was re-queued (it ran before: at once, and to the
    recovery queue). A job once sent is the broker's to keep (its message is acknowledged only when
    the job ends), so a job merely waiting in the queue is never sent twice. Marking and selecting is
    one UPDATE, so two sweepers never send the same job.
    """
    now = utcnow()
    rows = session.execute(
        update(CompressionJob)
        .where(
            CompressionJob.status == JobStatus.QUEUED,
            CompressionJob.enqueued_at.is_(None),
            or_(
                CompressionJob.attempts > 0,
                CompressionJob.created_at < now - timedelta(seconds=requeue_after_s),
            ),
        )
        .values(enqueued_at=now)
        .returning(CompressionJob.id, CompressionJob.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return [(job_id, attempts > 0) for job_id, attempts in rows]


def mark_unsent(session: Session, job_ids: list[str]) -> None:
    """Jobs whose send failed (or whose message a dead worker took): the next sweep sends them."""
    if job_ids:
        session.execute(
            update(CompressionJob)
            .where(CompressionJob.id.in_(job_ids), CompressionJob.status == JobStatus.QUEUED)
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )


def running_since(session: Session, job_ids: list[str]) -> dict[str, tuple[JobStatus, float | None]]:
    """{id: (status, seconds since the current attempt started)} of the jobs that exist."""
    now = utcnow()
    rows = session.execute(
        select(CompressionJob.id, CompressionJob.status, CompressionJob.started_at).where(
            CompressionJob.id.in_(job_ids)
        )
    ).all()
    return {
        job_id: (status, (now - started).total_seconds() if started is not None else None)
        for job_id, status, started in rows
    }


VALIDATION_UNSENT = {
    "code": "validation_unsent",
    "message": "the broker could not be reached to queue this model's validation; a worker sends it again shortly",
}


def mark_validation_unsent(session: Session, model_ids: list[str]) -> None:
    """Models whose validation message was never sent (or was taken by a worker that died)."""
    if model_ids:
        session.execute(
            update(UploadedModel)
            .where(UploadedModel.id.in_(model_ids), UploadedModel.status == "validating")
            .values(error=VALIDATION_UNSENT)
            .execution_options(synchronize_session=False)
        )


def claim_unsent_validations(session: Session) -> list[str]:
    """Models marked unsent, unmarked now (the caller sends them; `mark_validation_unsent` again if
    that fails). A model merely waiting for its validation is never sent again."""
    rows = session.execute(
        select(UploadedModel.id, UploadedModel.error).where(
            UploadedModel.status == "validating", UploadedModel.deleted_at.is_(None)
        )
    ).all()
    claimed = []
    for model_id, error in rows:
        if (error or {}).get("code") == VALIDATION_UNSENT["code"]:
            session.execute(
                update(UploadedModel)
                .where(UploadedModel.id == model_id, UploadedModel.status == "validating")
                .values(error=None)
                .execution_options(synchronize_session=False)
            )
            claimed.append(model_id)
    return claimed


def model_statuses(session: Session, model_ids: list[str]) -> dict[str, str]:
    """{id: status} of the models that exist and are not deleted."""
    return dict(
        session.execute(
            select(UploadedModel.id, UploadedModel.status).where(
                UploadedModel.id.in_(model_ids), UploadedModel.deleted_at.is_(None)
            )
        ).all()
    )
