"""GET /v1/jobs/{id} on Postgres: requests/s and latency percentiles under a concurrent client.

Target (issue 2): ≥ 500 req/s. Prints figures for 1 and 2 API processes.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _servers import REDIS_URL, Service, postgres_database, service_env, tiny_model_bytes

CONCURRENCY = 32
SECONDS = 8.0


async def hammer(url: str) -> tuple[int, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + SECONDS
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        async def loop() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                response = await client.get(url)
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200
        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    return len(latencies), latencies


def main() -> None:
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            env = service_env(Path(tmp), pg, f"{REDIS_URL}/6")
            service = Service(env, Path(tmp))
            if processes > 1:
                service._spawn("api", [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(service.port),
                                       "--workers", str(processes), "--log-level", "warning"])
                from tests.service.servers import wait_until_up

                wait_until_up(service.url, service.processes["api"], Path(tmp) / "api.log")
            else:
                service.start_api()
            try:
                with httpx.Client(base_url=service.url) as client:
                    model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
                    job = client.post("/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 4]}]}).json()
                asyncio.run(hammer(f"{service.url}/v1/jobs/{job['id']}"))  # warm-up
                count, latencies = asyncio.run(hammer(f"{service.url}/v1/jobs/{job['id']}"))
                q = statistics.quantiles(latencies, n=100)
                print(f"GET /v1/jobs/{{id}} on Postgres, {processes} API process(es), {CONCURRENCY} concurrent: "
                      f"{count / SECONDS:.0f} req/s, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms")
            finally:
                service.stop()


if __name__ == "__main__":
    main()
