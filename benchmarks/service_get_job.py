"""GET /v1/jobs/{id} on Postgres: requests/s and latency percentiles under concurrent load.

Target (issue 2): ≥ 500 req/s. The load comes from `wrk` (Debian package `wrk`): a Python client
saturates a core of its own long before the API does, and would measure itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _servers import REDIS_URL, Service, postgres_database, service_env, tiny_model_bytes

CONNECTIONS = 16
SECONDS = 10


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            service = Service(service_env(Path(tmp), pg, f"{REDIS_URL}/6"), Path(tmp))
            service.start_api(workers=processes)
            try:
                with httpx.Client(base_url=service.url) as client:
                    model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
                    job = client.post(
                        "/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 4]}]}
                    ).json()
                url = f"{service.url}/v1/jobs/{job['id']}"
                subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", "-d2s", url], capture_output=True)  # warm-up
                out = subprocess.run(
                    ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", url],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                p50 = re.search(r"50%\s+(\S+)", out).group(1)
                p99 = re.search(r"99%\s+(\S+)", out).group(1)
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                print(
                    f"GET /v1/jobs/{{id}} on Postgres, {processes} API process(es), {CONNECTIONS} connections: "
                    f"{rps:.0f} req/s, p50 {p50}, p99 {p99}, non-2xx {errors.group(1) if errors else 0}"
                )
            finally:
                service.stop()


if __name__ == "__main__":
    main()
