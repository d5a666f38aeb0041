"""The broker connection, the queues, and sending work to Celery workers by task name.

Work is routed by the device it needs: one queue per device kind (`<queue_name>.cpu`,
`<queue_name>.cuda`). A job whose benchmark asks for `cuda` goes to the cuda queue and waits there
for a GPU worker; everything else (validation included) goes to the cpu queue, which every worker
serves. Queue names are made here and nowhere else.

The worker builds its Celery application from `make_celery` and adds its own behaviour; nothing
here imports the worker, so `worker` depends on `app` and never the reverse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import ChannelError

from app import logs
from app.settings import get_settings

log = logging.getLogger(__name__)

RUN_JOB = "compactor.run_job"
VALIDATE_MODEL = "compactor.validate_model"

CPU, CUDA = "cpu", "cuda"
DEVICE_KINDS = (CPU, CUDA)


def queue_for(device_kind: str) -> str:
    """The queue of work that needs `device_kind`."""
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {device_kind!r}: one of {DEVICE_KINDS}")
    return f"{get_settings().queue_name}.{device_kind}"


def job_device_kind(spec: dict) -> str:
    """The device kind a job's spec needs: cuda only when its benchmark asks for cuda ('auto' runs
    on whatever worker takes it)."""
    return CUDA if (spec.get("benchmark") or {}).get("device") == CUDA else CPU


def queues_served(device_kind: str) -> list[str]:
    """The queues a worker on `device_kind` consumes: a GPU worker also takes CPU work."""
    return [queue_for(CUDA), queue_for(CPU)] if device_kind == CUDA else [queue_for(CPU)]


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
        task_default_queue=queue_for(CPU),
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


def send(task: str, *args: str, device_kind: str = CPU) -> bool:
    """Send a task to the queue of `device_kind`; False (logged) when the broker is unreachable —
    the sweeper re-sends later."""
    client = _celery()
    try:
        # The request that caused the work is named in the worker's log lines for it.
        headers = {"compactor_request_id": logs.request_id.get()}
        client.send_task(task, args=list(args), queue=queue_for(device_kind), headers=headers)
        return True
    except Exception:
        log.exception("could not enqueue %s%s; it will be re-sent", task, args)
        return False


def queue_depths() -> dict[str, int]:
    """Messages waiting in each device queue; empty when the broker cannot be asked (logged)."""
    depths = {}
    try:
        with _celery().connection_for_read() as connection, connection.channel() as channel:
            for kind in DEVICE_KINDS:
                name = queue_for(kind)
                try:
                    depths[name] = channel.queue_declare(queue=name, passive=True).message_count
                except ChannelError:
                    depths[name] = 0  # never declared: nothing was ever sent there
    except Exception:
        log.warning("could not read the queues' depth from the broker", exc_info=True)
    return depths


def live_workers(timeout: float = 0.5) -> int | None:
    """How many workers answer a ping on the broker within `timeout`; None where the broker cannot
    broadcast (the embedded SQLite broker) or cannot be reached."""
    if not get_settings().broker_url.startswith(("redis://", "rediss://", "amqp://")):
        return None
    try:
        return len(_celery().control.ping(timeout=timeout))
    except Exception:
        log.warning("could not ping the workers", exc_info=True)
        return None


def check_broker() -> None:
    """Raise when the broker cannot be reached (for /readyz)."""
    with _celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
