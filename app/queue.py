"""The broker connection, and sending work to Celery workers by task name.

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
from kombu.utils.scheduling import FairCycle

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB = "compactor.run_job"
VALIDATE_MODEL = "compactor.validate_model"
DELIVER_WEBHOOK = "compactor.deliver_webhook"
# kombu's Redis transport keeps every delivered, not yet acknowledged message here (its defaults).
REDIS_UNACKED, REDIS_UNACKED_INDEX = "unacked", "unacked_index"


def recovery_queue(queue: str) -> str:
    """The queue a lost or killed job is sent to again: workers drain it before `queue`, so a job
    that was already running goes ahead of the jobs submitted after it.

    A queue rather than message priorities: kombu emulates priorities on Redis but not on its
    SQLAlchemy transport (the embedded broker), while a fixed queue order works on both.
    """
    return f"{queue}.recovery"


def worker_queues(queue: str) -> list[str]:
    """The queues a worker consumes, in the order it takes from them."""
    return [recovery_queue(queue), queue]


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


def send(task: str, *args: str, recovery: bool = False, countdown: float | None = None) -> bool:
    """Send a task (to the recovery queue: ahead of the others; to run `countdown` seconds from
    now); False (logged) when the broker is unreachable — the sweeper re-sends later."""
    client = _celery()
    name = client.conf.task_default_queue
    if task == DELIVER_WEBHOOK:
        name = webhook_queue(name)
    elif recovery:
        name = recovery_queue(name)
    try:
        client.send_task(task, args=list(args), queue=name, countdown=countdown)
        return True
    except Exception:
        log.exception("could not enqueue %s%s; it will be re-sent", task, args)
        return False


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
