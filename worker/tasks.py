"""Celery tasks: thin wrappers that hand ids to `worker.execution`."""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import celeryd_after_setup, setup_logging, worker_init, worker_ready, worker_shutdown

from app import logs, queue
from app.services import searches
from app.settings import get_settings
from worker import cpu_share, devices, execution, status  # noqa: F401 (status registers its remote-control command)
from worker.celery_app import celery_app
from worker.isolation import IsolatedFailure, check_sandbox

log = logging.getLogger(__name__)
_stop = threading.Event()


def _request_id(task) -> str | None:
    # Set by app.queue.send from the request that caused the work; absent on a sweeper's re-send.
    return getattr(task.request, "compactor_request_id", None)


@celery_app.task(name=queue.RUN_JOB, bind=True)
def run_job(self, job_id: str) -> str:
    # The node name (`compactor-<pid>@<host>`) tells two workers on one host apart.
    with logs.bound(request_id=_request_id(self), job_id=job_id):
        return execution.run_job(job_id, worker=self.request.hostname)


@celery_app.task(name=queue.VALIDATE_MODEL, bind=True)
def validate_model(self, model_id: str) -> str:
    with logs.bound(request_id=_request_id(self)):
        return execution.validate_model(model_id)


if get_settings().log_format == "json":
    # Connected only then: any receiver of this signal stops Celery from setting up its own logs.
    @setup_logging.connect
    def _json_logs(loglevel=None, **_) -> None:
        logs.configure("json", loglevel or logging.INFO)


@celeryd_after_setup.connect
def _consume_device_queues(instance, **_) -> None:
    """Consume the queues of the device kind this worker serves (a GPU worker: cuda and cpu)."""
    kind = devices.device_kind(get_settings().worker_device)
    # select, not select_add: these queues only, in this order (recovery queues first).
    instance.app.amqp.queues.select(queue.queues_served(kind))
    log.info("serving %s work from queues %s", kind, ", ".join(queue.queues_served(kind)))


@worker_init.connect
def _record_job_slots(sender=None, **_) -> None:
    """Each job's CPU threads are this worker's usable cores divided by its concurrent jobs (`-c`)."""
    execution.job_slots = max(int(getattr(sender, "concurrency", None) or 1), 1)
    share = cpu_share.cpu_share(execution.job_slots, get_settings().worker_threads)
    log.info(
        "each of %d job slot(s) computes with %d thread(s) (%g usable cores; %s)",
        share.slots,
        share.threads,
        share.usable_cores,
        share.source,
    )


@worker_init.connect
def _require_sandbox(**_) -> None:
    """Refuse to start, saying why, when uploaded models could not be sandboxed here.

    SystemExit, not an Exception: Celery logs and swallows exceptions from signal handlers.
    """
    if get_settings().sandbox == "off":
        log.warning("COMPACTOR_SANDBOX=off: uploaded models run unsandboxed, as this worker's own user")
        return
    try:
        seen = check_sandbox()
    except IsolatedFailure as failure:
        log.critical(
            "the model sandbox cannot start, so this worker will not run uploaded models: %s. Fix it "
            "(README, 'The model sandbox'), or set COMPACTOR_SANDBOX=off to run them unsandboxed.",
            failure.message,
        )
        raise SystemExit(3) from None
    log.info("model sandbox ready (bubblewrap, Landlock ABI %s)", seen.get("landlock_abi"))


@worker_ready.connect
def _serve_metrics(**_) -> None:
    """This worker's own /metrics (its jobs by op and outcome, with durations), when a port is set."""
    port = get_settings().worker_metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
        log.info("metrics on port %d", port)


@worker_ready.connect
def _start_sweeper(**_) -> None:
    """Remove dead attempts' directories, then sweep (`execution.resend_lost_work`) now and every
    `requeue_interval_s`, so an accepted job is never lost; delete orphaned blobs every
    `blob_collect_interval_s`."""
    settings = get_settings()
    try:
        execution.remove_dead_attempts()
    except OSError:
        log.exception("removing dead attempts' directories failed; the sweeps retry it")

    def sweep_forever() -> None:
        next_collection = time.monotonic()
        while not _stop.is_set():
            try:
                resent = execution.resend_lost_work()
                if resent:
                    log.warning("re-sent %d lost job(s) or validation(s): %s", len(resent), resent)
            except Exception:
                log.exception("sweeping for lost jobs failed; retrying later")
            try:
                # The backstop of the notifier's advances (a lost message, a notifier down, a time limit).
                searches.advance_active()
            except Exception:
                log.exception("advancing searches failed; retrying later")
            if time.monotonic() >= next_collection:
                next_collection = time.monotonic() + settings.blob_collect_interval_s
                try:
                    removed = execution.collect_orphan_blobs()
                    if removed:
                        log.info("deleted %d blob(s) no row references", len(removed))
                except Exception:
                    log.exception("collecting orphaned blobs failed; retrying later")
            _stop.wait(settings.requeue_interval_s)

    threading.Thread(target=sweep_forever, name="compactor-sweeper", daemon=True).start()


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    _stop.set()
