"""Real servers for the service tests: a fresh Postgres database, a Redis db, and the API and a
Celery worker as subprocesses, exactly as production runs them."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

PG_ADMIN_URL = os.environ.get("COMPACTOR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("COMPACTOR_TEST_REDIS", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parents[2]


def api_client(url: str, **kwargs) -> httpx.Client:
    """An HTTP client for a test server that never reuses a connection the server may be closing.

    uvicorn closes idle keep-alive connections after 5 s, which is also httpx's default expiry: a
    request sent on a connection at that moment is reset by the peer. Expiring ours first avoids it.
    """
    return httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(keepalive_expiry=1.0), **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty Postgres database for this test session; dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"compactor_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def check_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()


@contextmanager
def s3_endpoint(log_dir: Path) -> Iterator[dict]:
    """A real S3 endpoint on this machine, moto's standalone server in its own process (the way
    s3fs tests itself), with a fresh bucket; the `COMPACTOR_*` settings that point at it."""
    port = free_port()
    log = open(log_dir / "moto.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_tail = (log_dir / "moto.log").read_text()[-2000:]
                    raise RuntimeError(f"the S3 endpoint did not start: {log_tail}") from None
                time.sleep(0.2)
        bucket = f"compactor-{uuid.uuid4().hex[:8]}"
        httpx.put(f"{url}/{bucket}").raise_for_status()  # moto accepts an unsigned CreateBucket
        yield {
            "COMPACTOR_STORAGE_URL": f"s3://{bucket}/blobs-test",
            "COMPACTOR_S3_ENDPOINT_URL": url,
            "COMPACTOR_S3_REGION": "us-east-1",
            "COMPACTOR_S3_ACCESS_KEY_ID": "testing",
            "COMPACTOR_S3_SECRET_ACCESS_KEY": "testing",
        }
    finally:
        stop_process(process, 10)
        log.close()


def service_env(data_dir: Path, database_url: str, broker_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env.update(
        {
            "COMPACTOR_DATA_DIR": str(data_dir),
            "COMPACTOR_DATABASE_URL": database_url,
            "COMPACTOR_BROKER_URL": broker_url,
            "COMPACTOR_QUEUE_NAME": f"test-{uuid.uuid4().hex[:8]}",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


class Service:
    """The API (uvicorn) and, optionally, a Celery worker, as subprocesses sharing one environment."""

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def start_api(self, workers: int = 1) -> None:
        # `compactor serve --no-worker`, as production runs the API: its HTTP parser and limits.
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--no-worker",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
        )
        wait_until_up(self.url, self.processes["api"], self.log_dir / "api.log")

    def start_worker(self, concurrency: int = 1, key: str = "worker") -> subprocess.Popen:
        """Start a Celery worker, known as `key` here (its log is `<key>.log`)."""
        from app.cli import worker_command

        self._spawn(key, worker_command(concurrency, "INFO", f"test-{uuid.uuid4().hex[:6]}@%h"))
        return self.processes[key]

    def start_notifier(self) -> None:
        """The webhook worker (worker/notifier.py), as `compactor worker` starts beside each worker."""
        from app.cli import worker_command

        self._spawn("notifier", worker_command(1, "INFO", f"notifier-{uuid.uuid4().hex[:6]}@%h", notifier=True))

    def stop(self, name: str | None = None) -> None:
        for key in [name] if name else list(self.processes):
            process = self.processes.pop(key, None)
            if process is None:
                continue
            stop_process(process, 20)

    def log(self, name: str) -> str:
        return self.log_text(name)[-5000:]

    def log_text(self, name: str) -> str:
        """The whole log of process `name`."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a machine or container dying takes them."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def model_process(worker: subprocess.Popen, job_id: str | None = None) -> psutil.Process | None:
    """The process running the model's code under this worker (inside bubblewrap), if any; with
    `job_id`, only that job's (its bubblewrap command line binds the job's directory)."""
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "worker.sandbox_child" not in " ".join(child.cmdline()) or child.name() == "bwrap":
                continue
            if job_id is None or any(f"/job-{job_id}-" in " ".join(p.cmdline()) for p in child.parents()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def broker_messages(service: Service) -> tuple[int, int]:
    """(messages waiting in the service's queues, messages workers hold unacknowledged)."""
    from app.queue import REDIS_UNACKED, job_queues

    queues = job_queues(service.env["COMPACTOR_QUEUE_NAME"])
    url = service.env["COMPACTOR_BROKER_URL"]
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        waiting = sum(client.llen(name) for name in queues)
        held = sum(1 for raw in client.hvals(REDIS_UNACKED) if json.loads(raw)[2] in queues)
        return waiting, held
    with sqlite3.connect(url.split("///", 1)[1]) as db:
        (waiting,) = db.execute(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
            f"WHERE m.visible AND q.name IN ({','.join('?' * len(queues))})",
            queues,
        ).fetchone()
    return waiting, 0  # the virtual transport holds unacknowledged messages in the worker's memory
