"""The worker's Celery application: the service's broker and queues, late acks, one job at a time
per worker slot. Importing this module is cheap (no torch).

Late acks: a job's message is acknowledged only when its attempt ends, so the broker keeps it
while the job waits and while it runs; `worker.execution.resend_lost_work` says what the sweeper
adds for a worker that dies.
"""

from __future__ import annotations

from app.queue import make_celery

celery_app = make_celery(include=["worker.tasks"])
celery_app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
