"""Read schemas of uploaded models and datasets."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.schemas.common import ErrorInfo


class ModelInput(BaseModel):
    name: str
    type: str


class ModelSummary(BaseModel):
    parameters: int
    buffers_bytes: int
    submodules: int
    inputs: list[ModelInput] | None = None


class ModelRead(BaseModel):
    """An uploaded model: a TorchScript archive, or a torch.export archive that workers trace into
    TorchScript (jobs' baselines and artifacts are TorchScript either way)."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    format: Literal["torchscript", "torch.export"] = "torchscript"
    status: Literal["validating", "ready", "invalid"]
    error: ErrorInfo | None = None
    size_bytes: int
    sha256: str
    created_at: datetime
    summary: ModelSummary | None = None


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str


class DatasetRead(BaseModel):
    """An uploaded dataset of model inputs (and optional labels)."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    size_bytes: int
    sha256: str
    num_samples: int
    arrays: dict[str, ArrayInfo]
    created_at: datetime
