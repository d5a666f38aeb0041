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
DELIVER_WEBHOOK = "compactor.deliver_webhook"


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


def webhook_queue(queue_name: str) -> str:
    """The queue of webhook deliveries beside the job queue `queue_name` (see worker/notifier.py)."""
    return f"{queue_name}.webhooks"


def send(task: str, *args: str, countdown: float | None = None) -> bool:
    """Send a task (to run `countdown` seconds from now, if given); False (logged) when the broker
    is unreachable — the sweeper re-sends later."""
    client = _celery()
    target = client.conf.task_default_queue
    if task == DELIVER_WEBHOOK:
        target = webhook_queue(target)
    try:
        client.send_task(task, args=list(args), queue=target, countdown=countdown)
        return True
    except Exception:
        log.exception("could not enqueue %s%s; it will be re-sent", task, args)
        return False


def check_broker() -> None:
    """Raise when the broker cannot be reached (for /readyz)."""
    with _celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
