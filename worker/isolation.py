"""Running torch work in a sandboxed child process: a hostile model touches nothing but its own job,
and a crash, hang or memory blow-up fails the job with a code while the worker lives on.

The child (`worker.sandbox_child`) starts under `worker.sandbox`'s walls as a fresh interpreter
(CUDA does not survive a fork, and it holds no state of the worker's). It talks back in JSON lines
over a socket: progress messages, then one result or one error. Everything it sends is untrusted:
decoded as JSON only, its strings bounded, and the files it names checked before they are taken.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import get_settings
from worker.cgroup import oom_kills
from worker.sandbox import MAX_ENTRIES, JobDir, Sandbox, SandboxUnavailable, package_dir

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024 * 1024  # one message; a report of a large model is a few MB
MAX_STRING = 4000  # any one string the child sends
MAX_ERROR_MESSAGE = 1500
MAX_TRACEBACK = 8000
USAGE_EVERY_S = 1.0
CANCEL_CHECK_S = 1.0
_CRASH_SIGNALS = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error",
    signal.SIGILL: "illegal instruction",
    signal.SIGABRT: "abort",
    signal.SIGFPE: "floating-point exception",
    signal.SIGSYS: "bad system call",
}


# Signals that stop a process from outside (an operator, a supervisor, a shutdown), never a crash of
# the model's own making: the job is retried, as when its worker is lost.
_OUTSIDE_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


class IsolatedFailure(Exception):
    """The child did not return a result: `code` is one of model_error, internal_error,
    model_crashed, killed, timeout, out_of_memory, output_too_large, canceled, sandbox_unavailable,
    or an engine's own error code. `traceback` is the child's, for an internal_error (untrusted text,
    for the worker's log only)."""

    def __init__(self, code: str, message: str, traceback: str | None = None):
        super().__init__(message)
        self.code, self.message, self.traceback = code, message, traceback


@dataclass
class Limits:
    time_s: float
    memory_bytes: int | None = None
    output_bytes: int | None = None
    processes: int | None = None
    open_files: int = 4096

    def rlimits(self, sandboxed: bool) -> dict[str, int | None]:
        cpu_s = int(self.time_s * (os.cpu_count() or 1)) + 60  # a backstop: the wall clock stops it first
        limits = {
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.output_bytes,
            "RLIMIT_CORE": 0,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_CPU": cpu_s,
        }
        if sandboxed:
            # Outside a user namespace of its own the count would include the worker's own threads.
            limits["RLIMIT_NPROC"] = self.processes
        return limits


def job_limits(time_s: float) -> Limits:
    """The configured limits of one job or validation."""
    settings = get_settings()
    return Limits(
        time_s, settings.job_memory_limit_bytes, settings.sandbox_max_output_bytes, settings.sandbox_max_processes
    )


def current_sandbox() -> Sandbox:
    """The sandbox the settings ask for, refusing to expose any of the service's data paths."""
    settings = get_settings()
    forbidden = [settings.data_dir, settings.storage_dir, settings.cache_dir]
    if settings.is_sqlite:
        forbidden.append(Path(settings.database_url.split("///", 1)[-1]).parent)
    return Sandbox(settings.sandbox == "on", settings.worker_device, forbidden)


def run_isolated(
    target: str,
    kwargs: dict,
    limits: Limits,
    on_progress: Callable[[dict], bool] = lambda message: True,
    job: JobDir | None = None,
    canceled: Callable[[], bool] = lambda: False,
) -> Any:
    """Call `target` ("package.module:function") in a sandboxed child and return its result.

    The target is called as `function(emit=..., **kwargs)`; `emit(dict)` sends a progress message,
    handed to `on_progress` here. When `on_progress` returns False (the job was canceled) the child
    is killed and IsolatedFailure("canceled") raised; so it is when `canceled()`, asked every
    `CANCEL_CHECK_S` whatever the child says (a long timing round sends nothing for minutes).
    Paths in `kwargs` must be the child's view of `job` (`job.inside(...)`), which runs under its
    own sandbox; without a `job`, a throwaway one under the configured sandbox is used.

    Raises:
        IsolatedFailure: with a code a user can act on, when the child crashed, ran past a limit,
            raised an error, was canceled, or the sandbox could not start.
    """
    owned = job is None
    if job is None:
        job = JobDir.create(Path(tempfile.gettempdir()), "compactor-run-", current_sandbox())
    sandbox = job.sandbox
    parent_end, child_end = socket.socketpair()
    try:
        package = target.split(".", 1)[0]
        argv = [sys.executable, "-I", "-m", "worker.sandbox_child", str(child_end.fileno())]
        try:
            command = sandbox.command(job, argv, packages=[package])
            code_root = str(package_dir(package).parent)
        except SandboxUnavailable as exc:
            raise IsolatedFailure("sandbox_unavailable", exc.reason) from None
        request = {
            "target": target,
            "kwargs": kwargs,
            "limits": limits.rlimits(sandbox.enabled),
            "landlock": sandbox.enabled,
            "writable": sandbox.writable(job),
            "sys_path": [code_root],
        }
        oom_kills_before = oom_kills()
        with open(job.log_path, "wb") as child_log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=child_log,
                stderr=child_log,
                pass_fds=(child_end.fileno(),),
                env=sandbox.environment(job),
                start_new_session=True,
            )
        child_end.close()
        try:
            parent_end.sendall(json.dumps(request).encode() + b"\n")
            return _serve(process, parent_end, job, limits, on_progress, canceled, oom_kills_before)
        finally:
            if process.poll() is None:
                _kill(process)
    finally:
        parent_end.close()
        child_end.close()
        if owned:
            job.remove()


def _serve(
    process: subprocess.Popen,
    channel: socket.socket,
    job: JobDir,
    limits: Limits,
    on_progress: Callable[[dict], bool],
    canceled: Callable[[], bool],
    oom_kills_before: int | None,
) -> Any:
    deadline = time.monotonic() + limits.time_s
    next_usage = time.monotonic() + USAGE_EVERY_S
    next_cancel_check = time.monotonic() + CANCEL_CHECK_S
    buffer, heard = b"", False
    while True:
        readable, _, _ = select.select([channel], [], [], 0.2)
        if readable:
            chunk = channel.recv(1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                heard = True
                kind, payload = _decode(line)
                if kind == "progress":
                    if isinstance(payload, dict) and not on_progress(payload):
                        raise IsolatedFailure("canceled", "the job was canceled")
                elif kind == "result":
                    _finish(process)
                    return payload
                elif kind == "error":
                    raise _reported_failure(payload)
            if len(buffer) > MAX_LINE_BYTES:
                raise IsolatedFailure(
                    "model_crashed",
                    f"the model's process sent a message past the size limit of {MAX_LINE_BYTES} bytes and was stopped",
                )
        elif process.poll() is not None:
            break
        now = time.monotonic()
        if now > deadline:
            raise IsolatedFailure(
                "timeout",
                f"the model's work ran past its time limit of {limits.time_s:.0f} s "
                "and was stopped; try fewer iterations, a smaller dataset, or raise "
                "COMPACTOR_JOB_TIME_LIMIT_S",
            )
        if now > next_cancel_check:
            next_cancel_check = now + CANCEL_CHECK_S
            if canceled():
                raise IsolatedFailure("canceled", "the job was canceled")
        if limits.output_bytes and now > next_usage:
            next_usage = now + USAGE_EVERY_S
            written, entries = job.usage()
            if written > limits.output_bytes or entries > MAX_ENTRIES:
                raise IsolatedFailure(
                    "output_too_large",
                    f"the job wrote more than {limits.output_bytes} bytes or "
                    f"{MAX_ENTRIES} files and was stopped; raise "
                    "COMPACTOR_SANDBOX_MAX_OUTPUT_BYTES if the model needs it",
                )
    process.wait(10)
    raise _exit_failure(process.returncode, heard, job, oom_kills_before)


def _finish(process: subprocess.Popen) -> None:
    """Wait for the child to exit (it may still be tearing torch down) before its files are read, so
    nothing in the sandbox can change them after they are checked."""
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        _kill(process)


def _kill(process: subprocess.Popen) -> None:
    # bubblewrap's own process: with it gone, --die-with-parent and the PID namespace end the rest.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def _decode(line: bytes) -> tuple[str, Any]:
    try:
        message = json.loads(line)
        return str(message["kind"]), bounded(message.get("payload"))
    except (ValueError, KeyError, TypeError) as exc:
        raise IsolatedFailure(
            "model_crashed", "the model's process sent a message that is not valid JSON and was stopped"
        ) from exc


def bounded(value: Any, depth: int = 0) -> Any:
    """A JSON value from the child with every string cut to MAX_STRING characters and nesting capped."""
    if depth > 64:
        return None
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "…"
    if isinstance(value, list):
        return [bounded(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {bounded(str(k), depth + 1): bounded(v, depth + 1) for k, v in value.items()}
    return value


def _reported_failure(payload: Any) -> IsolatedFailure:
    payload = payload if isinstance(payload, dict) else {}
    code = payload.get("code")
    if not isinstance(code, str) or not code.replace("_", "").isalnum() or len(code) > 40:
        code = "model_error"
    message = str(payload.get("message") or "the model's process reported an error without a message")
    trace = payload.get("traceback") if code == "internal_error" else None
    return IsolatedFailure(code, message[:MAX_ERROR_MESSAGE], str(trace)[:MAX_TRACEBACK] if trace else None)


def _exit_failure(exitcode: int | None, heard: bool, job: JobDir, oom_kills_before: int | None) -> IsolatedFailure:
    _log_child_output(job)
    if exitcode is not None and exitcode > 128:  # bubblewrap exits 128 + N for a child killed by signal N
        exitcode = -(exitcode - 128)
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGKILL and _oom_killed_since(oom_kills_before):
            return IsolatedFailure(
                "out_of_memory",
                "the kernel's out-of-memory killer stopped the process running the model (the "
                "machine ran out of memory); try smaller batch sizes or a worker with more memory",
            )
        if sig in _OUTSIDE_SIGNALS:
            return IsolatedFailure(
                "killed",
                f"the process running the model was stopped by a signal from outside "
                f"({signal.Signals(sig).name}), not by anything the model did",
            )
        if sig == signal.SIGXFSZ:
            return IsolatedFailure(
                "output_too_large",
                "the model's process wrote a file past the size limit; raise "
                "COMPACTOR_SANDBOX_MAX_OUTPUT_BYTES if the model needs it",
            )
        if sig == signal.SIGXCPU:
            return IsolatedFailure("timeout", "the model's process used up its CPU time limit and was stopped")
        name = _CRASH_SIGNALS.get(
            sig, signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        )
        return IsolatedFailure(
            "model_crashed", f"the model crashed the process running it ({name}); the worker is unharmed"
        )
    reason = _sandbox_error(job) if not heard and exitcode == 1 else None
    if reason:
        return IsolatedFailure("sandbox_unavailable", f"the sandbox could not start: {reason}")
    return IsolatedFailure("model_crashed", f"the process running the model exited unexpectedly (exit code {exitcode})")


def _oom_killed_since(before: int | None) -> bool:
    """True when the memory cgroup counted an OOM kill since `before` (None: not countable here)."""
    after = oom_kills()
    return before is not None and after is not None and after > before


def _sandbox_error(job: JobDir) -> str | None:
    try:
        text = job.log_path.read_bytes()[:2000].decode(errors="replace")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("bwrap:")]
    return lines[0][:300] if lines else None


def _log_child_output(job: JobDir) -> None:
    try:
        with open(job.log_path, "rb") as fh:
            fh.seek(max(os.fstat(fh.fileno()).st_size - 2000, 0))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return
    if tail.strip():
        log.warning("the model's process ended early; the end of its output (untrusted): %r", tail)


def check_sandbox() -> dict:
    """Start one sandboxed child and return what it sees; raises IsolatedFailure when it cannot start.

    The worker calls this at start-up so a host without user namespaces or bubblewrap is refused
    with the reason, rather than failing (or, worse, running unsandboxed) at its first job.
    """
    return run_isolated("worker.sandbox_child:probe", {}, Limits(60))
