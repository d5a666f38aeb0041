"""An accuracy-aware search: the limits a user stated, its trials' bookkeeping, and its result.

Its trials are ordinary jobs (`jobs.search_id`); `state` holds only what the jobs cannot say (each
trial's candidate, and candidates stopped early without a job), so whoever advances the search
rebuilds everything else from the rows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Enum, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, UTCDateTime
from app.models.job import JobStatus, job_progress


class Search(IdMixin, Base):
    __tablename__ = "searches"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key"),)

    name: Mapped[str | None] = mapped_column(String(255), default=None)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    # The job statuses: a search is queued, running, then succeeded, failed or canceled.
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda statuses: [s.value for s in statuses]),
        default=JobStatus.QUEUED,
        index=True,
    )
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    progress: Mapped[dict] = mapped_column(JSON, default=lambda: job_progress(JobStatus.QUEUED))
    # {"trials": [{"number", "params", "steps", "job_id", "parent", "pruned"}], "verify": {...}}
    state: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, default=None, deferred=True)
    error: Mapped[dict | None] = mapped_column(JSON, default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
