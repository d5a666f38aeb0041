"""What a worker says about itself when the API asks over Celery's remote control (GET /v1/workers):
its node name's host and process, device, queues, the jobs it runs, and when it answered."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from app import queue
from app.settings import get_settings
from worker.sandbox import gpu_device_nodes

STARTED_AT = datetime.now(UTC)


@inspect_command(name=queue.WORKER_STATUS)
def compactor_status(state, **_) -> dict:
    """This worker's identity and load; the reply itself is its heartbeat (`last_heartbeat`)."""
    consumer = state.consumer
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": get_settings().worker_device,
        "gpus": gpu_device_nodes(),
        "queues": sorted(q.name for q in consumer.task_consumer.queues),
        "concurrency": consumer.controller.concurrency,
        "running_jobs": sorted(
            str(request.args[0]) for request in worker_state.active_requests if request.name == queue.RUN_JOB
        ),
        "started_at": STARTED_AT.isoformat(),
        "last_heartbeat": datetime.now(UTC).isoformat(),
    }
