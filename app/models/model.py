"""An uploaded TorchScript model: its bytes live in the blob store, addressed by sha256."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, SoftDeleteMixin


class UploadedModel(IdMixin, SoftDeleteMixin, Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32), default="torchscript")
    status: Mapped[str] = mapped_column(String(16), default="validating", index=True)
    error: Mapped[dict | None] = mapped_column(JSON, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    summary: Mapped[dict | None] = mapped_column(JSON, default=None)
