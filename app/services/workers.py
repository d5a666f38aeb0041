"""The live workers, asked over Celery's remote control: no table of workers to keep in step."""

from __future__ import annotations

from app import queue
from app.errors import ServiceUnavailable
from app.schemas.common import WorkerInfo, WorkerList

REPLY_WAIT_S = 1.0  # how long the answers are collected: a worker busy with a job still answers at once


def list_workers() -> WorkerList:
    """Every worker that answers within REPLY_WAIT_S, by node name; says so when none could be asked."""
    if not queue.broadcasts_reach_workers():
        return WorkerList(
            workers=[],
            complete=False,
            detail="the embedded SQLite broker carries no broadcasts, so workers cannot be listed; "
            "use Redis (COMPACTOR_BROKER_URL) to see them",
        )
    try:
        replies = queue.ask_workers(queue.WORKER_STATUS, REPLY_WAIT_S)
    except Exception as exc:  # whatever kombu raises for a broker it cannot reach
        raise ServiceUnavailable(
            f"the broker cannot be reached to ask the workers: {type(exc).__name__}: {exc}"[:300],
            code="broker_unavailable",
        ) from exc
    # A node without the command (a webhook notifier) answers {"error": …}: it runs no jobs.
    workers = [
        WorkerInfo(name=name, **reply)
        for name, reply in sorted(replies.items())
        if isinstance(reply, dict) and "error" not in reply
    ]
    return WorkerList(
        workers=workers, complete=True, detail=f"{len(workers)} worker(s) answered within {REPLY_WAIT_S:g} s"
    )
