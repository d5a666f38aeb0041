"""The API's HTTP parser: h11 (what `compactor serve` runs, for its header limit) against httptools
(uvicorn's default where installed, which has no header limit), on the two hot paths: polling
GET /v1/jobs/{id} (req/s, with `wrk`) and a 256 MiB upload (MB/s). Paired and interleaved: both
servers run at once on one Postgres database, each round measures both in alternating order, and
the spread over rounds is printed with the medians.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from _servers import Service, postgres_database, service_env, tiny_model_bytes

ROUNDS = 4
SECONDS = 5
UPLOAD = 256 << 20


def _archive(path: Path) -> None:
    chunk = bytes(range(256)) * 4096
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("m/constants.pkl", b"\x80\x02).")
        archive.writestr("m/code/__torch__/m.py", "class M: pass\n")
        with archive.open("m/data/0", "w", force_zip64=True) as member:
            for _ in range(UPLOAD // len(chunk)):
                member.write(chunk)


def _httptools_api(service: Service) -> None:
    """The same app under uvicorn's CLI with httptools (the harness's own start uses h11)."""
    service._spawn(
        "api",
        [sys.executable, "-m", "uvicorn", "app.main:app", "--http", "httptools", "--port", str(service.port)]
        + ["--host", "127.0.0.1", "--log-level", "warning"],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the httptools API did not come up")


def _rps(url: str) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{SECONDS}s", url], capture_output=True, text=True, check=True
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def _upload_mbps(url: str, archive: Path) -> float:
    with httpx.Client(base_url=url, timeout=600) as client, open(archive, "rb") as fh:
        started = time.perf_counter()
        response = client.post("/v1/models", files={"file": ("big.pt", fh, "application/octet-stream")})
        elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.text
    return archive.stat().st_size / 2**20 / elapsed


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive = tmp_path / "big.pt"
        _archive(archive)
        env = service_env(
            tmp_path / "data",
            pg,
            f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
            COMPACTOR_MAX_UPLOAD_BYTES=str(1 << 30),
        )
        servers = {"h11": Service(env, tmp_path), "httptools": Service(env, tmp_path)}
        servers["h11"].start_api()
        _httptools_api(servers["httptools"])
        try:
            with httpx.Client(base_url=servers["h11"].url) as client:
                model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
                job = client.post("/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 4]}]}).json()
            figures = {name: {"rps": [], "mbps": []} for name in servers}
            for service in servers.values():  # warm-up, not counted
                _rps(f"{service.url}/v1/jobs/{job['id']}")
            for round_ in range(ROUNDS):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in order:
                    figures[name]["rps"].append(_rps(f"{servers[name].url}/v1/jobs/{job['id']}"))
                    figures[name]["mbps"].append(_upload_mbps(servers[name].url, archive))
            for name, values in figures.items():
                print(
                    f"{name:9}: GET /v1/jobs/{{id}} {statistics.median(values['rps']):.0f} req/s "
                    f"(rounds {min(values['rps']):.0f}–{max(values['rps']):.0f}); "
                    f"upload {UPLOAD >> 20} MiB {statistics.median(values['mbps']):.0f} MB/s "
                    f"(rounds {min(values['mbps']):.0f}–{max(values['mbps']):.0f})"
                )
            ratio = [a / b for a, b in zip(figures["h11"]["rps"], figures["httptools"]["rps"])]
            upload_ratio = [a / b for a, b in zip(figures["h11"]["mbps"], figures["httptools"]["mbps"])]
            print(
                f"h11 / httptools per round: req/s {statistics.median(ratio):.2f} "
                f"({min(ratio):.2f}–{max(ratio):.2f}), upload {statistics.median(upload_ratio):.2f} "
                f"({min(upload_ratio):.2f}–{max(upload_ratio):.2f})"
            )
        finally:
            for service in servers.values():
                service.stop()


if __name__ == "__main__":
    main()
