"""A compression job: the spec a user submitted, its lifecycle, and references to its outputs."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, UTCDateTime

ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("succeeded", "failed", "canceled")


class CompressionJob(IdMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key"),)

    name: Mapped[str | None] = mapped_column(String(255), default=None)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    progress: Mapped[dict] = mapped_column(JSON, default=lambda: {"stage": "queued", "step_index": None, "percent": 0.0, "message": ""})
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
    report: Mapped[dict | None] = mapped_column(JSON, default=None, deferred=True)
