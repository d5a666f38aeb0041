"""The worker's Celery application: the service's broker and queue, late acks, one job at a time
per worker slot. Importing this module is cheap (no torch)."""

from __future__ import annotations

from app.queue import make_celery

celery_app = make_celery(include=["worker.tasks"])
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
