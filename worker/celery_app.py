"""The Celery application: broker from settings, late acks, one job at a time per worker slot.

Importing this module is cheap (no torch): the API imports it to send tasks by name.
"""

from __future__ import annotations

from celery import Celery

from app.settings import get_settings


def make_celery() -> Celery:
    settings = get_settings()
    if settings.broker_url.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("compactor", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # The SQLite transport polls; a short interval keeps submission → running quick.
        broker_transport_options={"polling_interval": 0.1, "visibility_timeout": 6 * 3600},
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery()
