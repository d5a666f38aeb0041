"""A compression job: the spec a user submitted, its lifecycle, and references to its outputs.

The job states, the transitions allowed between them, and the shape of a job's progress live here.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, UTCDateTime


class JobStatus(StrEnum):
    """Where a job stands; the values are what the API shows and the database stores."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


# The states each state may move to; a final state is absent, since nothing leaves it. Every
# transition in `app.services.lifecycle` is an UPDATE guarded by this table.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    # Back to queued: its worker stopped responding, so the job is sent again.
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}),
}
ACTIVE_STATUSES = tuple(status for status in JobStatus if status in TRANSITIONS)
FINAL_STATUSES = tuple(status for status in JobStatus if status not in TRANSITIONS)


def job_progress(stage: str, message: str = "", percent: float = 0.0, step_index: int | None = None) -> dict:
    """A job's progress as stored and shown (`JobRead.progress`): its stage, how far along, in words."""
    return {"stage": stage, "step_index": step_index, "percent": percent, "message": message}


class CompressionJob(IdMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key"),)

    name: Mapped[str | None] = mapped_column(String(255), default=None)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    # A VARCHAR of the values, as before the enum: no native Postgres type, no migration.
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda statuses: [s.value for s in statuses]),
        default=JobStatus.QUEUED,
        index=True,
    )
    spec: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[dict] = mapped_column(JSON, default=lambda: job_progress(JobStatus.QUEUED))
    error: Mapped[dict | None] = mapped_column(JSON, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    spec_hash: Mapped[str] = mapped_column(String(64))
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    artifact_size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # The ONNX artifact, when the spec asked for it and it passed validation in the job's child.
    onnx_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    onnx_size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    report: Mapped[dict | None] = mapped_column(JSON, default=None, deferred=True)
    # Bumped by every change a watcher sees (status, progress): the id of the job's events
    # (`GET /v1/jobs/{id}/events`), so a client resuming with Last-Event-ID misses nothing newer.
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Set on a search's trials (and the job that re-checks its pick): otherwise an ordinary job.
    search_id: Mapped[str | None] = mapped_column(
        ForeignKey("searches.id", ondelete="RESTRICT"), default=None, index=True
    )
