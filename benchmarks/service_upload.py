"""Upload of a 1 GiB file: API resident-memory growth (target < 64 MiB) and MB/s on loopback, to the
local blob store and to an S3 endpoint (moto's server, in its own process), interleaved.

The file is a valid zip with a TorchScript-like structure and 1 GiB of stored data, streamed from
disk (the client never holds it either). Two API processes run side by side, one per store; uploads
alternate between them round by round, so both see the same machine load. Usage:
`python benchmarks/service_upload.py [rounds]` (default 2).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import psutil
from _servers import REDIS_URL, Service, postgres_database, s3_endpoint, service_env

SIZE = 1 << 30


def make_archive(path: Path) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB, incompressible enough for a stored member
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("m/constants.pkl", b"\x80\x02).")
        archive.writestr("m/code/__torch__/m.py", "class M: pass\n")
        archive.writestr("m/version", "3\n")
        with archive.open("m/data/0", "w", force_zip64=True) as member:
            for _ in range(SIZE // len(chunk)):
                member.write(chunk)


def upload(service: Service, archive: Path) -> tuple[float, float]:
    """One upload; (MB/s, API RSS growth in MiB over its resident size just before)."""
    api = psutil.Process(service.processes["api"].pid)
    with httpx.Client(base_url=service.url, timeout=900) as client:
        # Warm the process before the baseline: imports, pools, and the object store's client (a
        # refused 1-byte upload), whose one-time set-up is not growth per upload.
        # (On a connection of its own: the server may close one after refusing an upload.)
        httpx.post(f"{service.url}/v1/models", files={"file": ("warm.pt", b"x", "application/octet-stream")})
        client.get("/v1/models")
        baseline = api.memory_info().rss
        peak = {"rss": baseline}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak["rss"] = max(peak["rss"], api.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        try:
            with open(archive, "rb") as fh:
                response = client.post("/v1/models", files={"file": ("big.pt", fh, "application/octet-stream")})
        finally:
            elapsed = time.perf_counter() - started
            done.set()
            sampler.join()
    assert response.status_code == 201, response.text
    return archive.stat().st_size / 2**20 / elapsed, (peak["rss"] - baseline) / 2**20


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive = tmp_path / "big.pt"
        make_archive(archive)
        with s3_endpoint(tmp_path) as s3_env:
            services = {}
            for name, extra in (("local", {}), ("s3", s3_env)):
                (tmp_path / name).mkdir()
                env = service_env(tmp_path / name, pg, f"{REDIS_URL}/6", COMPACTOR_MAX_UPLOAD_BYTES=str(2 << 30))
                services[name] = Service({**env, **extra}, tmp_path / name)
                services[name].start_api()
            try:
                figures = {name: [] for name in services}
                for _ in range(rounds):
                    for name, service in services.items():
                        figures[name].append(upload(service, archive))
                for name, runs in figures.items():
                    rates, growths = [r for r, _ in runs], [g for _, g in runs]
                    print(
                        f"{name:5s} upload {archive.stat().st_size / 2**20:.0f} MiB x{rounds}: "
                        f"{statistics.median(rates):.0f} MB/s (min {min(rates):.0f}, max {max(rates):.0f}), "
                        f"API RSS growth max {max(growths):.1f} MiB (runs: {', '.join(f'{g:.1f}' for g in growths)})"
                    )
            finally:
                for service in services.values():
                    service.stop()


if __name__ == "__main__":
    main()
