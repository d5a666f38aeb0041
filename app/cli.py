"""`compactor` command: the service (serve, worker, migrate) and a client of its HTTP API
(models, datasets, jobs) for people who would otherwise use curl."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.settings import get_settings

if TYPE_CHECKING:
    from app.client import CompactorClient

# The client half imports httpx and rich only inside its commands: `compactor serve` and the API
# process stay light.
cli = typer.Typer(
    name="compactor", help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False
)
models = typer.Typer(help="Uploaded models (TorchScript or torch.export archives).", no_args_is_help=True)
datasets = typer.Typer(help="Calibration, training and evaluation datasets.", no_args_is_help=True)
jobs = typer.Typer(help="Compression jobs: submit, follow, report, download.", no_args_is_help=True)
cli.add_typer(models, name="models")
cli.add_typer(datasets, name="datasets")
cli.add_typer(jobs, name="jobs")


# ---- the service ----


NOTIFIER_THREADS = 8  # webhook attempts wait on the network, not the CPU


def worker_command(concurrency: int, loglevel: str, name: str | None = None, notifier: bool = False) -> list[str]:
    """The Celery worker command line (the test harness starts workers with it too): a job worker,
    or with `notifier` the webhook worker beside it (worker/notifier.py). Each picks its queues
    itself, from its own settings: a job worker those of the device kind it serves
    (`app.queue.queues_served`), a notifier the webhook queue."""
    # Threads, not prefork: each job's torch work already runs in its own spawned process, and a
    # prefork child (a daemon) may not start processes of its own.
    app, role = "worker.celery_app:celery_app", "compactor"
    if notifier:
        app, role, concurrency = "worker.notifier:celery_app", "notifier", NOTIFIER_THREADS
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "--loglevel",
        loglevel,
        "-n",
        name or f"{role}-{os.getpid()}@%h",
    ]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


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
    children = []
    if not no_worker:
        for notifier in (False, True):
            command = worker_command(concurrency, "WARNING", notifier=notifier)
            children.append(subprocess.Popen(command, preexec_fn=_die_with_parent))
    try:
        # h11, not httptools (uvicorn's choice where installed): httptools puts no limit on headers
        # (a 64 MiB one was read in full), h11 stops reading past its incomplete-event limit.
        # Event streams stay open until their job ends: shutdown closes them after 5 s, not never.
        uvicorn.run(
            "app.main:app",
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            http="h11",
            h11_max_incomplete_event_size=get_settings().max_request_header_bytes,
            timeout_graceful_shutdown=5,
        )
    finally:
        _stop(children)


@cli.command("worker")
def run_worker(
    concurrency: int = 1,
    loglevel: str = "INFO",
    notify: Annotated[
        bool, typer.Option(help="also run a webhook notifier beside it (--no-notify where notifiers run alone)")
    ] = True,
) -> None:
    """A Celery worker that runs compression jobs (point COMPACTOR_* at Postgres and Redis)."""
    if get_settings().auto_migrate:
        from app.migrate import upgrade

        upgrade()
    notifier = None
    if notify:
        notifier = subprocess.Popen(worker_command(1, loglevel, notifier=True), preexec_fn=_die_with_parent)
    try:
        code = subprocess.call(worker_command(concurrency, loglevel))
    finally:
        if notifier is not None:
            _stop([notifier])
    raise typer.Exit(code)


@cli.command()
def notifier(loglevel: str = "INFO") -> None:
    """A Celery worker that only delivers webhooks (no torch, no sandbox): run one or more beside
    job workers started with --no-notify."""
    raise typer.Exit(subprocess.call(worker_command(1, loglevel, notifier=True)))


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    from app.migrate import upgrade

    upgrade()
    print("database schema is up to date")


@cli.command("collect-blobs")
def collect_blobs() -> None:
    """Delete stored blobs that no model, dataset or job references and nobody has written for
    COMPACTOR_BLOB_GRACE_S (workers also do it every COMPACTOR_BLOB_COLLECT_INTERVAL_S)."""
    from app.db import read_only_session
    from app.services.blobs import collect_orphans
    from app.storage import get_blob_store

    with read_only_session() as session:
        removed = collect_orphans(session, get_blob_store(), get_settings().blob_grace_s)
    for sha256 in removed:
        print(sha256)
    print(f"deleted {len(removed)} unreferenced blob(s)", file=sys.stderr)


# ---- the client ----

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOption = Annotated[str, typer.Option("--url", envvar="COMPACTOR_URL", help="the Compactor server")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="COMPACTOR_API_KEY", show_default=False, help="sent as 'Authorization: Bearer <key>'"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print the server's whole JSON answer")]
NameOption = Annotated[str | None, typer.Option("--name", help="default: the file name", show_default=False)]
JobId = Annotated[str, typer.Argument(metavar="ID", help="the job's id")]
UploadFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2))


def _show(document: dict, as_json: bool, line: str) -> None:
    """The whole JSON answer with --json, else one line a script can capture."""
    if as_json:
        _print_json(document)
    else:
        typer.echo(line)


@contextmanager
def _server(url: str, api_key: str | None) -> Iterator[CompactorClient]:
    """A client of `url`; a refusal prints `code: detail` (exit 1), no answer at all exits 2."""
    from app.client import ClientError, CompactorClient, ProblemError, Unreachable

    try:
        with CompactorClient(url, api_key) as client:
            yield client
    except ProblemError as exc:
        _err(f"{exc.code}: {exc.detail}")
        for error in exc.errors:
            loc = [str(part) for part in error.get("loc", [])]
            _err(f"  {'.'.join(loc[1:] if loc[:1] == ['body'] else loc)}: {error.get('msg', '')}")
        raise typer.Exit(1) from None
    except Unreachable as exc:
        _err(f"cannot reach the Compactor server ({exc}); set --url or COMPACTOR_URL")
        raise typer.Exit(2) from None
    except ClientError as exc:
        _err(str(exc))
        raise typer.Exit(1) from None


@models.command("upload")
def upload_model(
    file: UploadFile,
    name: NameOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the validation; exit 1 if invalid")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a model (a torch.jit.save file, or a torch.export.save .pt2) and print its id."""
    with _server(url, api_key) as client:
        model = client.upload_model(file, name)
        if wait:
            model = client.wait_for_model(model["id"])
    _show(model, as_json, model["id"])
    if model["status"] == "invalid":
        error = model.get("error") or {}
        _err(f"{error.get('code', 'model_invalid')}: {error.get('message', 'the model could not be loaded')}")
        raise typer.Exit(1)


@datasets.command("upload")
def upload_dataset(
    file: UploadFile,
    name: NameOption = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset (.npz without pickles, or .safetensors) and print its id."""
    with _server(url, api_key) as client:
        dataset = client.upload_dataset(file, name)
    _show(dataset, as_json, dataset["id"])


def _read_spec(spec_file: str) -> dict:
    try:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text()
        return json.loads(text)
    except (OSError, ValueError) as exc:
        _err(f"cannot read the job spec {spec_file}: {exc}")
        raise typer.Exit(1) from None


def _follow(client: CompactorClient, job_id: str) -> dict:
    """Follow a job's events to its end behind a progress bar on stderr (stdout stays for ids and JSON)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("queued", total=100, message="")

            def show(job: dict) -> None:
                progress = job.get("progress") or {}
                stage = progress.get("stage") or job["status"]
                percent = 100.0 if job["status"] == "succeeded" else progress.get("percent", 0.0)
                bar.update(task, description=stage, completed=percent, message=progress.get("message", ""))

            return client.wait_for_job(job_id, on_update=show)
    except KeyboardInterrupt:
        _err(
            f"stopped waiting; job {job_id} goes on: `compactor jobs wait {job_id}` follows it again, "
            f"`compactor jobs cancel {job_id}` stops it"
        )
        raise typer.Exit(130) from None


def _finish(job: dict, as_json: bool) -> None:
    """Say how a finished job ended; exit 0 only when it succeeded."""
    if as_json:
        _print_json(job)
    if job["status"] == "succeeded":
        _err(f"job {job['id']} succeeded")
        return
    error = job.get("error") or {}
    _err(f"job {job['id']} {job['status']}" + (f": {error.get('code')}: {error.get('message')}" if error else ""))
    raise typer.Exit(1)


@jobs.command("submit")
def submit_job(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC.json", help="a JobSpec file; - reads stdin")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the job; exit 0 only when it succeeds")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a compression job and print its id."""
    spec = _read_spec(spec_file)
    with _server(url, api_key) as client:
        job = client.create_job(spec)
        if not wait:
            _show(job, as_json, job["id"])
            return
        if not as_json:
            typer.echo(job["id"])
        job = _follow(client, job["id"])
    _finish(job, as_json)


@jobs.command("wait")
def wait_job(
    job_id: JobId, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None, as_json: JsonOption = False
) -> None:
    """Follow a job to its end; exit 0 only when it succeeded."""
    with _server(url, api_key) as client:
        job = _follow(client, job_id)
    _finish(job, as_json)


@jobs.command("get")
def get_job(
    job_id: JobId, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None, as_json: JsonOption = False
) -> None:
    """Show a job: status, progress, error and artifact."""
    with _server(url, api_key) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    progress = job.get("progress") or {}
    typer.echo(
        f"{job['id']}  {job['status']}  {progress.get('stage', '')} {progress.get('percent', 0):.0f}%  "
        f"{progress.get('message', '')}".rstrip()
    )
    if job.get("error"):
        typer.echo(f"{job['error']['code']}: {job['error']['message']}")
    if job.get("artifact"):
        typer.echo(f"artifact: {job['artifact']['size_bytes']} bytes, sha256 {job['artifact']['sha256']}")


@jobs.command("cancel")
def cancel_job(
    job_id: JobId, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None, as_json: JsonOption = False
) -> None:
    """Cancel a job (a finished job stays as it was) and print its status."""
    with _server(url, api_key) as client:
        job = client.cancel_job(job_id)
    _show(job, as_json, f"{job['id']}  {job['status']}")


def _key_figures(report: dict) -> list[str]:
    summary, baseline, result = report["summary"], report["baseline"], report["result"]
    lines = [summary.get("headline") or f"job {report['job_id']}"]
    speedups = ", ".join(f"{ratio:.2f}× at batch {batch}" for batch, ratio in summary["speedup"].items())
    lines.append(f"  speed-up       {speedups}")
    lines.append(
        f"  size           {baseline['size_bytes']:,} → {result['size_bytes']:,} bytes "
        f"({summary['size_ratio']:.2f}× smaller)"
    )
    floor, beyond = summary.get("lossless_floor") or {}, summary.get("beyond_floor") or {}
    if floor:
        served = (f"{e['median']:.2f}× at batch {b} ({e['model']} {e['mode']})" for b, e in floor.items())
        lines.append(f"  lossless floor {', '.join(served)}")
    if beyond:
        served = (f"{e['median']:.2f}× at batch {b} (served {e['mode']})" for b, e in beyond.items())
        lines.append(f"  beyond floor   {', '.join(served)}")
    if summary.get("accuracy_drop") is not None:
        lines.append(f"  accuracy drop  {summary['accuracy_drop']:.4f}")
    if summary.get("fidelity_cosine_min") is not None:
        lines.append(f"  cosine min     {summary['fidelity_cosine_min']:.4f}")
    for target, check in summary.get("targets", {}).items():
        actual = "n/a" if check["actual"] is None else f"{check['actual']:.4g}"
        lines.append(
            f"  target {target}: {'met' if check['met'] else 'MISSED'} (limit {check['limit']:g}, actual {actual})"
        )
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    return lines


@jobs.command("report")
def job_report(
    job_id: JobId,
    html: Annotated[bool, typer.Option("--html", help="save the HTML report instead")] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="where --html saves it")] = Path("report.html"),
    open_it: Annotated[bool, typer.Option("--open", help="open the saved HTML report in a browser")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a succeeded job's report: the headline and key figures, the whole JSON, or the HTML page."""
    with _server(url, api_key) as client:
        if html or open_it:
            output.write_text(client.get_report_html(job_id), encoding="utf-8")
        else:
            report = client.get_report(job_id)
    if html or open_it:
        typer.echo(str(output))
        if open_it:
            import webbrowser

            webbrowser.open(output.resolve().as_uri())
        return
    _show(report, as_json, "\n".join(_key_figures(report)))


@jobs.command("download")
def download_artifact(
    job_id: JobId,
    output: Annotated[Path, typer.Option("-o", "--output", help="the file to write")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Download a job's compressed TorchScript file, checked against its sha256."""
    with _server(url, api_key) as client:
        sha256 = client.download_artifact(job_id, output)
    typer.echo(f"{output}  sha256 {sha256}")


def main() -> None:
    cli(prog_name="compactor")


if __name__ == "__main__":
    main()
