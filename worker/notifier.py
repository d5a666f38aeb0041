"""The notifier: a Celery worker that delivers webhooks and advances searches, beside the job workers.

Deliveries have a queue of their own (`<queue>.webhooks`) and their own worker, because a job
worker's slots are held by jobs for minutes or hours: a webhook queued behind them would reach its
receiver only when every job before it had run (measured: a median of 86 s behind ten small jobs
on one worker). Attempts are I/O, so one notifier runs many at once on threads. It imports no
torch and runs no model, so it needs no sandbox.
"""

from __future__ import annotations

from celery.signals import celeryd_after_setup

from app import queue
from app.services import searches, webhooks

celery_app = queue.make_celery()
celery_app.conf.update(task_acks_late=True, worker_prefetch_multiplier=4, worker_hijack_root_logger=False)


@celeryd_after_setup.connect
def _consume_webhooks(instance, **_) -> None:
    """The webhook queue only: the job queues are the job workers'."""
    instance.app.amqp.queues.select([queue.webhook_queue()])


@celery_app.task(name=queue.DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    """One attempt; the next, if one is due soon, is sent to run when its wait is over (later ones
    are sent by the sweeper once due)."""
    delay = webhooks.attempt(delivery_id)
    if delay is not None and delay <= webhooks.COUNTDOWN_LIMIT_S:
        queue.send(queue.DELIVER_WEBHOOK, delivery_id, countdown=delay)


@celery_app.task(name=queue.ADVANCE_SEARCH)
def advance_search(search_id: str) -> None:
    """Queue a search's next trials, or pick its result (the sweepers do it too, as a backstop)."""
    searches.advance(search_id)
