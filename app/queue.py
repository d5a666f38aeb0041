"""The broker connection, the queues, and sending work to Celery workers by task name.

Work is routed by the device it needs: one queue per device kind (`<queue_name>.cpu`,
`<queue_name>.cuda`). A job whose benchmark asks for `cuda` goes to the cuda queue and waits there
for a GPU worker; everything else (validation included) goes to the cpu queue, which every worker
serves. Queue names are made here and nowhere else.

The worker builds its Celery application from `make_celery` and adds its own behaviour; nothing
here imports the worker, so `worker` depends on `app` and never the reverse.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.utils.scheduling import FairCycle

from app import logs
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB = "compactor.run_job"
VALIDATE_MODEL = "compactor.validate_model"
DELIVER_WEBHOOK = "compactor.deliver_webhook"
ADVANCE_SEARCH = "compactor.advance_search"
# Tasks of the notifier (worker/notifier.py): I/O and bookkeeping, never a job worker's slot.
NOTIFIER_TASKS = (DELIVER_WEBHOOK, ADVANCE_SEARCH)
# kombu's Redis transport keeps every delivered, not yet acknowledged message here (its defaults).
REDIS_UNACKED, REDIS_UNACKED_INDEX = "unacked", "unacked_index"


class _InOrderCycle(FairCycle):
    """Each fetch tries the queues in their given order (kombu's virtual transports rotate them)."""

    def get(self, callback, **kwargs):
        self.pos = 0
        return super().get(callback, **kwargs)


def visibility_timeout_s(settings: Settings) -> float:
    """How long Redis keeps a delivered message unacknowledged before it hands it out again.

    Longer than any job runs (its messages are acknowledged only when it ends), so a live job's
    message is never handed out twice; the sweeper acknowledges a dead worker's messages long before.
    """
    return settings.job_time_limit_s + settings.validate_time_limit_s + 600


# The remote-control command each worker answers with its identity (worker.status).
WORKER_STATUS = "compactor_status"

CPU, CUDA = "cpu", "cuda"
DEVICE_KINDS = (CPU, CUDA)


def queue_for(device_kind: str, recovery: bool = False, base: str | None = None) -> str:
    """The queue of work that needs `device_kind` (`base` is the settings' queue_name by default).

    With `recovery`: the queue a lost or killed job is sent to again. Workers drain it before the
    others, so a job that was already running goes ahead of the jobs submitted after it. A queue
    rather than message priorities: kombu emulates priorities on Redis but not on its SQLAlchemy
    transport (the embedded broker), while a fixed queue order works on both.
    """
    if device_kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {device_kind!r}: one of {DEVICE_KINDS}")
    name = f"{base or get_settings().queue_name}.{device_kind}"
    return f"{name}.recovery" if recovery else name


def job_device_kind(spec: dict) -> str:
    """The device kind a job's spec needs: cuda only when its benchmark asks for cuda ('auto' runs
    on whatever worker takes it)."""
    benchmark = spec.get("benchmark") if isinstance(spec, dict) else None
    # A spec the service cannot read (it fails later, as the service's own error) routes as CPU work.
    return CUDA if isinstance(benchmark, dict) and benchmark.get("device") == CUDA else CPU


def queues_served(device_kind: str, base: str | None = None) -> list[str]:
    """The queues a worker on `device_kind` consumes, in the order it takes from them: the
    recovery queues first; a GPU worker also takes CPU work, after its own."""
    kinds = [CUDA, CPU] if device_kind == CUDA else [CPU]
    return [queue_for(k, True, base) for k in kinds] + [queue_for(k, False, base) for k in kinds]


def job_queues(base: str | None = None) -> list[str]:
    """Every queue jobs and validations are sent to."""
    return [queue_for(kind, recovery, base) for kind in DEVICE_KINDS for recovery in (True, False)]


def webhook_queue(base: str | None = None) -> str:
    """The queue of webhook deliveries (consumed by worker/notifier.py, never by job workers)."""
    return f"{base or get_settings().queue_name}.webhooks"


def make_celery(include: Sequence[str] = ()) -> Celery:
    """A Celery application on the configured broker and queue; `include` names task modules."""
    settings = get_settings()
    transport_options = {
        "visibility_timeout": visibility_timeout_s(settings),
        "polling_interval": 0.1,
        # BRPOP the worker's queues in the order given (the recovery queue first), never rotated.
        "queue_order_strategy": "priority",
        "unacked_key": REDIS_UNACKED,
        "unacked_index_key": REDIS_UNACKED_INDEX,
    }
    if settings.broker_url.startswith("sqla+"):
        if settings.broker_url.startswith("sqla+sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        # kombu's SQLAlchemy transport hands its options to create_engine, so the poll interval
        # (1 s by default: too slow for submission → running) and the queue order (round robin by
        # default) are set on the transport itself.
        from kombu.transport import sqlalchemy as sqla_transport

        class InOrderChannel(sqla_transport.Channel):
            def _reset_cycle(self):
                self._cycle = _InOrderCycle(self._get_and_deliver, self._active_queues, sqla_transport.Empty)

        sqla_transport.Transport.polling_interval = 0.1
        sqla_transport.Transport.Channel = InOrderChannel
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


def send(task: str, *args: str, device_kind: str = CPU, recovery: bool = False, countdown: float | None = None) -> bool:
    """Send a task to the queue of `device_kind` (its recovery queue: ahead of the others; a
    webhook or a search's advance to the notifiers' queue), to run `countdown` seconds from now if given; False (logged)
    when the broker is unreachable — the sweeper re-sends later."""
    client = _celery()
    name = webhook_queue() if task in NOTIFIER_TASKS else queue_for(device_kind, recovery)
    try:
        # The request that caused the work is named in the worker's log lines for it.
        headers = {"compactor_request_id": logs.request_id.get()}
        client.send_task(task, args=list(args), queue=name, headers=headers, countdown=countdown)
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


@dataclass(frozen=True)
class Delivery:
    """A message a worker took from the broker and has not acknowledged (yet)."""

    tag: str
    queue: str
    task: str
    args: list
    age_s: float


_redis_client = None


def _redis():
    """A client of the Redis broker (the database its URL names), or None on another broker."""
    global _redis_client
    url = get_settings().broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    if _redis_client is None:
        import redis

        _redis_client = redis.Redis.from_url(url, socket_timeout=5)
    return _redis_client


def unacknowledged() -> list[Delivery]:
    """The messages workers hold unacknowledged, from any queue of this Redis database (Redis only).

    A dead worker's stay there until the visibility timeout; `forget` acknowledges them for it. The
    embedded broker keeps unacknowledged messages in the consuming worker's memory, so they go
    with it: there is nothing to list.
    """
    client = _redis()
    if client is None:
        return []
    now = time.time()
    held = []
    for tag, raw in client.hgetall(REDIS_UNACKED).items():
        delivered_at = client.zscore(REDIS_UNACKED_INDEX, tag)
        try:
            message, _, routing_key = json.loads(raw)
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            task = message["headers"]["task"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue  # not a Celery task message of ours: leave it to the visibility timeout
        age = now - delivered_at if delivered_at is not None else 0.0
        held.append(Delivery(tag.decode() if isinstance(tag, bytes) else tag, routing_key, task, args, age))
    return held


def forget(tag: str) -> None:
    """Acknowledge an unacknowledged message on behalf of the dead worker that held it (Redis)."""
    client = _redis()
    if client is not None:
        client.pipeline().zrem(REDIS_UNACKED_INDEX, tag).hdel(REDIS_UNACKED, tag).execute()


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
