"""What the metrics and logging middleware cost: GET /v1/jobs/{id} requests/s with and without it.

Target (issue 13): < 10 % fewer requests/s. Two API processes on one Postgres database serve the
same job, one built with `observability.install` (request id, Prometheus counters and histogram,
a JSON access line per request) and one without; `wrk` loads them in turn, round after round, so
both see the same machine, and each round's ratio is reported with the spread. Each API process is
pinned to the same CPU and wrk to another (`taskset`), so neither borrows the other's core.
Usage: `python benchmarks/service_observability.py [rounds]` (default 5); needs `wrk`.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _servers import REDIS_URL, ROOT, Service, postgres_database, service_env, tiny_model_bytes

sys.path.insert(0, str(ROOT))
from tests.service.servers import free_port, wait_until_up  # noqa: E402

CONNECTIONS = 8
SECONDS = 5


def start(env: dict, log_dir: Path, target: str, factory: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["taskset", "-c", "0", sys.executable, "-m", "uvicorn", target, "--port", str(port)]
    command += ["--log-level", "warning", "--app-dir", str(ROOT / "benchmarks")] + (["--factory"] if factory else [])
    log = open(log_dir / f"{port}.log", "ab")
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process, log_dir / f"{port}.log")
    return process, url


def load(url: str) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert errors is None, out
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = service_env(tmp_path, pg, f"{REDIS_URL}/6", COMPACTOR_LOG_FORMAT="json")
        setup = Service(env, tmp_path)
        setup.start_api()  # migrates, and makes the job both read
        with httpx.Client(base_url=setup.url) as client:
            model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
            job = client.post("/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 4]}]}).json()
        setup.stop()
        servers = {
            "observed": start(env, tmp_path, "app.main:app", factory=False),
            "bare": start(env, tmp_path, "_bare_app:bare_app", factory=True),
        }
        try:
            urls = {name: f"{url}/v1/jobs/{job['id']}" for name, (_, url) in servers.items()}
            for url in urls.values():
                load(url)  # warm-up
            figures = {name: [] for name in urls}
            for index in range(rounds):
                order = list(urls) if index % 2 == 0 else list(reversed(urls))
                for name in order:
                    figures[name].append(load(urls[name]))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(20)
        ratios = [observed / bare for observed, bare in zip(figures["observed"], figures["bare"])]
        for name, values in figures.items():
            print(f"{name:8s}: {statistics.median(values):.0f} req/s (min {min(values):.0f}, max {max(values):.0f})")
        print(
            f"GET /v1/jobs/{{id}}, {CONNECTIONS} connections, {rounds} paired rounds of {SECONDS} s: "
            f"observed/bare = {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
            f"overhead {100 * (1 - statistics.median(ratios)):.1f} % of requests/s"
        )


if __name__ == "__main__":
    main()
