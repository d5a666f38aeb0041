"""The service's Prometheus metrics, defined once: the API's HTTP traffic and uploads, the workers'
jobs, and what is read from the database and the broker when `/metrics` is scraped.

With several API processes (uvicorn --workers N), set `PROMETHEUS_MULTIPROC_DIR` to an empty
directory for all of them: prometheus_client then keeps each process's figures in files there and
`/metrics` adds them up (its multiprocess mode). Workers serve their own `/metrics` on
`COMPACTOR_WORKER_METRICS_PORT` (one port per worker process on a host).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "compactor_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "compactor_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
UPLOAD_BYTES = Counter("compactor_upload_bytes_total", "Bytes of accepted uploads, by kind.", ["kind"])
JOBS_FINISHED = Counter(
    "compactor_jobs_finished_total",
    "Jobs a worker carried to an end, by step op (a job counts once per op it has; 'profile' "
    "when it has none) and outcome.",
    ["op", "outcome"],
)
JOB_DURATION = Histogram(
    "compactor_job_duration_seconds",
    "Wall time of a job on its worker, from claim to its end, by op and outcome.",
    ["op", "outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)


def job_ops(spec: dict) -> list[str]:
    """The op labels of a job: each distinct step op, or 'profile' for a job without steps."""
    return sorted({step.get("op", "unknown") for step in spec.get("steps") or []}) or ["profile"]


def observe_job(spec: dict, outcome: str, seconds: float) -> None:
    for op in job_ops(spec):
        JOBS_FINISHED.labels(op, outcome).inc()
        JOB_DURATION.labels(op, outcome).observe(seconds)


class ServiceStateCollector(Collector):
    """Read at scrape time: jobs by status (the database), messages waiting per queue and the
    workers alive (the broker)."""

    def collect(self):
        from sqlalchemy import func, select

        from app import queue
        from app.db import read_only_session
        from app.models import CompressionJob
        from app.models.job import JobStatus

        jobs = GaugeMetricFamily("compactor_jobs", "Jobs in the database, by status.", labels=["status"])
        try:
            with read_only_session() as session:
                rows = dict(
                    session.execute(select(CompressionJob.status, func.count()).group_by(CompressionJob.status)).all()
                )
            for status in JobStatus:
                jobs.add_metric([status.value], rows.get(status, 0))
        except Exception:
            log.warning("metrics: could not count jobs", exc_info=True)
        yield jobs
        depth = GaugeMetricFamily(
            "compactor_queue_depth", "Messages waiting in each device queue of the broker.", labels=["queue"]
        )
        for name, size in queue.queue_depths().items():
            depth.add_metric([name], size)
        yield depth
        alive = queue.live_workers()
        if alive is not None:
            yield GaugeMetricFamily(
                "compactor_workers_alive", "Workers that answered a ping on the broker just now.", value=alive
            )


def render() -> bytes:
    """The metrics in Prometheus' text format: this process's, or all API processes' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_ProcessMetrics())
    registry.register(ServiceStateCollector())
    return generate_latest(registry)


class _ProcessMetrics(Collector):
    """The default registry's metrics (ours, and the process' own), under a registry of the scrape's."""

    def collect(self):
        return REGISTRY.collect()
