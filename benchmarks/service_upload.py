"""Upload of a 1 GiB file: API resident-memory growth (target < 64 MiB) and MB/s on loopback.

The file is a valid zip with a TorchScript-like structure and 1 GiB of stored data, streamed by a
generator (the client never holds it either).
"""

from __future__ import annotations

import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import psutil
from _servers import REDIS_URL, Service, postgres_database, service_env

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


def main() -> None:
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        archive = tmp_path / "big.pt"
        make_archive(archive)
        env = service_env(tmp_path / "data", pg, f"{REDIS_URL}/6", COMPACTOR_MAX_UPLOAD_BYTES=str(2 << 30))
        service = Service(env, tmp_path)
        service.start_api()
        try:
            api = psutil.Process(service.processes["api"].pid)
            with httpx.Client(base_url=service.url, timeout=600) as client:
                client.get("/v1/models")  # warm the process (imports, pools) before the baseline
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
                with open(archive, "rb") as fh:
                    response = client.post("/v1/models", files={"file": ("big.pt", fh, "application/octet-stream")})
                elapsed = time.perf_counter() - started
                done.set()
                sampler.join()
            assert response.status_code == 201, response.text
            size = archive.stat().st_size
            print(
                f"upload {size / 2**20:.0f} MiB: {size / 2**20 / elapsed:.0f} MB/s on loopback, "
                f"API RSS growth {(peak['rss'] - baseline) / 2**20:.1f} MiB (baseline {baseline / 2**20:.0f} MiB)"
            )
        finally:
            service.stop()


if __name__ == "__main__":
    main()
