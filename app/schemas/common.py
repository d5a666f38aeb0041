"""Shapes shared by every resource: errors, pages, readiness."""

from __future__ import annotations

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
