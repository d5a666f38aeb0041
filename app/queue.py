"""Sending work to Celery workers by task name (the API never imports the worker's torch code)."""

from __future__ import annotations

import logging

from worker.celery_app import celery_app

log = logging.getLogger(__name__)

RUN_JOB = "compactor.run_job"
VALIDATE_MODEL = "compactor.validate_model"


def send(task: str, *args: str) -> bool:
    """Send a task; False (logged) when the broker is unreachable — the sweeper re-sends later."""
    try:
        celery_app.send_task(task, args=list(args), queue=celery_app.conf.task_default_queue)
        return True
    except Exception:
        log.exception("could not enqueue %s%s; it will be re-sent", task, args)
        return False


def check_broker() -> None:
    """Raise when the broker cannot be reached (for /readyz)."""
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
