"""The broker connection, and sending work to Celery workers by task name.

The worker builds its Celery application from `make_celery` and adds its own behaviour; nothing
here imports the worker, so `worker` depends on `app` and never the reverse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery

from app.settings import get_settings

log = logging.getLogger(__name__)

RUN_JOB = "compactor.run_job"
VALIDATE_MODEL = "compactor.validate_model"
# The remote-control command each worker answers with its identity (worker.status).
WORKER_STATUS = "compactor_status"


def make_celery(include: Sequence[str] = ()) -> Celery:
    """A Celery application on the configured broker and queue; `include` names task modules."""
    settings = get_settings()
    transport_options = {"visibility_timeout": 6 * 3600, "polling_interval": 0.1}
    if settings.broker_url.startswith("sqla+"):
        if settings.broker_url.startswith("sqla+sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        # kombu's SQLAlchemy transport hands its options to create_engine, so the poll interval
        # (1 s by default: too slow for submission → running) is set on the transport itself.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.1
        transport_options = {}
    app = Celery("compactor", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        broker_connection_timeout=3,
    )
    return app


_client: Celery | None = None


def _celery() -> Celery:
    global _client
    if _client is None:
        _client = make_celery()
    return _client


def send(task: str, *args: str) -> bool:
    """Send a task; False (logged) when the broker is unreachable — the sweeper re-sends later."""
    client = _celery()
    try:
        client.send_task(task, args=list(args), queue=client.conf.task_default_queue)
        return True
    except Exception:
        log.exception("could not enqueue %s%s; it will be re-sent", task, args)
        return False


def check_broker() -> None:
    """Raise when the broker cannot be reached (for /readyz)."""
    with _celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def broadcasts_reach_workers() -> bool:
    """Whether remote-control broadcasts reach the workers: kombu's SQLAlchemy transport (the
    embedded default) has no fanout, so a question asked over it reaches no other process."""
    return not get_settings().broker_url.startswith("sqla+")


def ask_workers(command: str, timeout: float) -> dict[str, dict]:
    """{node name: reply} of every worker that answers the remote-control `command` within `timeout` s;
    raises when the broker cannot be reached."""
    # kombu's mailbox publishes with retries and no limit: unchecked, a broker that is down would
    # hold the request forever.
    check_broker()
    replies = _celery().control.broadcast(command, reply=True, timeout=timeout)
    return {name: reply for answer in replies or [] for name, reply in answer.items()}
