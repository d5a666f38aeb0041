"""The Celery application: broker from settings, late acks, one job at a time per worker slot.

Importing this module is cheap (no torch): the API imports it to send tasks by name.
"""

from __future__ import annotations

from celery import Celery

from app.settings import get_settings


def make_celery() -> Celery:
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
    app = Celery("compactor", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery()
