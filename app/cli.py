"""`compactor` command: serve (API + embedded worker), worker, migrate."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

from app.settings import get_settings

cli = typer.Typer(name="compactor", help=__doc__, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)


def _worker_command(concurrency: int, loglevel: str) -> list[str]:
    settings = get_settings()
    # Threads, not prefork: each job's torch work already runs in its own spawned process, and a
    # prefork child (a daemon) may not start processes of its own.
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker", "-P", "threads",
            "-c", str(concurrency), "-Q", settings.queue_name, "--loglevel", loglevel, "-n", f"compactor-{os.getpid()}@%h"]


def _die_with_parent() -> None:
    # uvicorn re-raises SIGTERM after its graceful shutdown, so `finally` may never run: the kernel
    # stops the embedded worker when `compactor serve` goes, however it goes.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@cli.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(help="API processes")] = 1,
    concurrency: Annotated[int, typer.Option(help="jobs the embedded worker runs at once")] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="serve the API only")] = False,
) -> None:
    """API plus an embedded worker (SQLite and local files by default)."""
    import uvicorn

    from app.migrate import upgrade

    logging.basicConfig(level=logging.INFO)
    upgrade()
    worker = None
    if not no_worker:
        worker = subprocess.Popen(_worker_command(concurrency, "WARNING"), preexec_fn=_die_with_parent)
    try:
        uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="warning")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()


@cli.command("worker")
def run_worker(concurrency: int = 1, loglevel: str = "INFO") -> None:
    """A Celery worker that runs compression jobs (point COMPACTOR_* at Postgres and Redis)."""
    if get_settings().auto_migrate:
        from app.migrate import upgrade

        upgrade()
    raise typer.Exit(subprocess.call(_worker_command(concurrency, loglevel)))


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from app.migrate import upgrade

    upgrade()
    print("database schema is up to date")


def main() -> None:
    cli(prog_name="compactor")


if __name__ == "__main__":
    main()
