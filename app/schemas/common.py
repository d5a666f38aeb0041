"""Shapes shared by every resource: errors, pages, readiness."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class ErrorInfo(BaseModel):
    """Why something failed, in a stable `code` and words a user can act on."""

    code: str
    message: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class FieldError(BaseModel):
    """Where a request is wrong (`["body", "steps", 0, "prune", "n"]`) and why."""

    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem document (`application/problem+json`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class Readiness(BaseModel):
    """What /readyz answers (200 when ready, 503 otherwise)."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(description="`ok`, or the error, per dependency (database, broker, storage).")
    sandbox: Literal["on", "off"] = Field(description="`off`: uploaded models run unsandboxed, as the worker's user.")


class WorkerInfo(BaseModel):
    """A live worker, as it answered just now."""

    name: str = Field(description="Celery node name, as a job's `worker` shows it.")
    host: str
    pid: int
    device: str = Field(description="`COMPACTOR_WORKER_DEVICE`: auto, cpu or cuda.")
    gpus: list[str] = Field(description="NVIDIA device nodes on its host (given to GPU jobs).")
    queues: list[str]
    concurrency: int = Field(description="Jobs it runs at once.")
    running_jobs: list[str] = Field(description="Ids of the jobs it is running now.")
    started_at: datetime
    last_heartbeat: datetime = Field(description="When it answered.")


class WorkerList(BaseModel):
    """What GET /v1/workers answers."""

    workers: list[WorkerInfo]
    complete: bool = Field(
        description="`false` when the broker cannot carry the question (the embedded SQLite broker): "
        "the list is then empty, not a sign that no worker runs."
    )
    detail: str
