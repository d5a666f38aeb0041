"""An uploaded dataset (.npz or .safetensors) of model inputs and optional labels."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, SoftDeleteMixin


class Dataset(IdMixin, SoftDeleteMixin, Base):
    __tablename__ = "datasets"

    name: Mapped[str] = mapped_column(String(255))
    file_format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    num_samples: Mapped[int] = mapped_column(Integer)
    arrays: Mapped[dict] = mapped_column(JSON)
