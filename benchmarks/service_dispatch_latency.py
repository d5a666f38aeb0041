"""Submission → `running` latency: Redis broker on Postgres (target < 0.5 s) and the embedded
SQLite broker. A profile job on a tiny model; the time from POST to the worker's claim is read
from the job's own timestamps (created_at → started_at), over several jobs."""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from _servers import REDIS_URL, Service, postgres_database, service_env, tiny_model_bytes

JOBS = 10


def measure(service: Service) -> list[float]:
    delays = []
    with httpx.Client(base_url=service.url, timeout=60) as client:
        model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
        while client.get(f"/v1/models/{model['id']}").json()["status"] == "validating":
            time.sleep(0.1)  # the worker validates the upload first; time it only once idle
        time.sleep(1)
        for _ in range(JOBS):
            job = client.post(
                "/v1/jobs",
                json={
                    "model_id": model["id"],
                    "input_spec": [{"shape": [1, 4]}],
                    "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 5},
                },
            ).json()
            while (body := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
                time.sleep(0.05)
            started = datetime.fromisoformat(body["started_at"])
            created = datetime.fromisoformat(body["created_at"])
            delays.append((started - created).total_seconds())
    return delays


def report(label: str, delays: list[float]) -> None:
    print(
        f"submission → running, {label}: median {statistics.median(delays) * 1000:.0f} ms, "
        f"all {[round(d * 1000) for d in delays]} ms, "
        f"max {max(delays) * 1000:.0f} ms over {len(delays)} jobs"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as pg:
        service = Service(service_env(Path(tmp) / "redis", pg, f"{REDIS_URL}/7"), Path(tmp))
        service.start_api()
        service.start_worker()
        try:
            report("Redis broker + Postgres", measure(service))
        finally:
            service.stop()
        embedded_dir = Path(tmp) / "embedded"
        env = service_env(
            embedded_dir,
            f"sqlite:///{embedded_dir / 'compactor.sqlite'}",
            f"sqla+sqlite:///{embedded_dir / 'broker.sqlite'}",
        )
        embedded_dir.mkdir()
        service = Service(env, embedded_dir)
        service.start_api()
        service.start_worker()
        try:
            report("embedded SQLite broker + SQLite", measure(service))
        finally:
            service.stop()


if __name__ == "__main__":
    main()
