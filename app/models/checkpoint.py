"""A completed pipeline step's output, stored as a blob so a later attempt or job starts after it.

Its `key` names what the output depends on (`app.services.checkpoints.checkpoint_key`); the job
that produced it keeps it alive: a checkpoint goes with its job's row, or once its model is deleted.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin


class StepCheckpoint(IdMixin, Base):
    __tablename__ = "job_checkpoints"

    key: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    step_index: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The step's report entry as it ran ({op, params, details}): a job reusing it still lists the step.
    stage: Mapped[dict] = mapped_column(JSON)
