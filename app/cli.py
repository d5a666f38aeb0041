"""`compactor` command: serve (API + embedded worker), worker, migrate, collect-blobs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from app.settings import get_settings


def _worker_command(concurrency: int, loglevel: str) -> list[str]:
    settings = get_settings()
    # Threads, not prefork: each job's torch work already runs in its own spawned process, and a
    # prefork child (a daemon) may not start processes of its own.
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:celery_app",
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-Q",
        settings.queue_name,
        "--loglevel",
        loglevel,
        "-n",
        f"compactor-{os.getpid()}@%h",
    ]


def _die_with_parent() -> None:
    # uvicorn re-raises SIGTERM after its graceful shutdown, so `finally` may never run: the kernel
    # stops the embedded worker when `compactor serve` goes, however it goes.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(args: argparse.Namespace) -> int:
    """Migrate, start an embedded worker (unless --no-worker), and serve the API until stopped."""
    import uvicorn

    from app.migrate import upgrade

    logging.basicConfig(level=logging.INFO)
    upgrade()
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen(_worker_command(args.concurrency, "WARNING"), preexec_fn=_die_with_parent)
    try:
        uvicorn.run("app.main:app", host=args.host, port=args.port, workers=args.workers, log_level="warning")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run a standalone worker (the production shape: point COMPACTOR_* at Postgres and Redis)."""
    if get_settings().auto_migrate:
        from app.migrate import upgrade

        upgrade()
    return subprocess.call(_worker_command(args.concurrency, args.loglevel))


def migrate(_: argparse.Namespace) -> int:
    """Upgrade the database schema to the newest revision."""
    from app.migrate import upgrade

    upgrade()
    print("database schema is up to date")
    return 0


def collect_blobs(_: argparse.Namespace) -> int:
    """Delete the blobs no row references that nobody has written for COMPACTOR_BLOB_GRACE_S."""
    from app.db import read_only_session
    from app.services.blobs import collect_orphans
    from app.storage import get_blob_store

    with read_only_session() as session:
        removed = collect_orphans(session, get_blob_store(), get_settings().blob_grace_s)
    for sha256 in removed:
        print(sha256)
    print(f"deleted {len(removed)} unreferenced blob(s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compactor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="API plus an embedded worker (SQLite and local files by default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="API processes")
    p.add_argument("--concurrency", type=int, default=1, help="jobs the embedded worker runs at once")
    p.add_argument("--no-worker", action="store_true", help="serve the API only")
    p.set_defaults(func=serve)
    p = sub.add_parser("worker", help="a Celery worker that runs compression jobs")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=run_worker)
    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.set_defaults(func=migrate)
    p = sub.add_parser(
        "collect-blobs",
        help="delete stored blobs that no model, dataset or job references "
        "(workers also do it every COMPACTOR_BLOB_COLLECT_INTERVAL_S)",
    )
    p.set_defaults(func=collect_blobs)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
