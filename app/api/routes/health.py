"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app import queue
from app.db import get_engine
from app.schemas.common import Readiness
from app.settings import get_settings
from app.storage import get_blob_store

router = APIRouter(tags=["service"])


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is unreachable (named in `checks`)."}},
)
def readyz():
    """Database, broker and storage are reachable (503 otherwise, naming what is not); whether the
    deployment sandboxes uploaded models (`sandbox: off` means they run as the worker's user)."""
    checks = {}
    for name, check in (
        ("database", _check_database),
        ("broker", queue.check_broker),
        ("storage", lambda: get_blob_store().check()),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks, "sandbox": get_settings().sandbox},
        status_code=200 if ready else 503,
    )


def _check_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))
