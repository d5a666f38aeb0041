"""Running torch work in a spawned child process, so a crash, hang or memory blow-up fails the
job with a code and the worker lives on.

Spawned, not forked: CUDA does not survive a fork, and a fresh interpreter holds no state of the
worker's. The child talks back over a pipe: progress messages, then one result or one error.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

_CRASH_SIGNALS = {signal.SIGSEGV: "segmentation fault", signal.SIGBUS: "bus error", signal.SIGILL: "illegal instruction",
                  signal.SIGABRT: "abort", signal.SIGFPE: "floating-point exception"}


class IsolatedFailure(Exception):
    """The child did not return a result: `code` is one of model_crashed, timeout, out_of_memory,
    canceled, or an engine's own error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Limits:
    time_s: float
    memory_bytes: int | None = None


def run_isolated(target: str, kwargs: dict, limits: Limits,
                 on_progress: Callable[[dict], bool] = lambda message: True) -> Any:
    """Call `target` ("package.module:function") in a spawned child and return its result.

    The target is called as `function(emit=..., **kwargs)`; `emit(dict)` sends a progress message,
    handed to `on_progress` here. When `on_progress` returns False (the job was canceled) the child
    is killed and IsolatedFailure("canceled") raised.

    Raises:
        IsolatedFailure: with a code a user can act on, when the child crashed, ran past its time
            limit, ran out of memory, raised an error, or was canceled.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(target, kwargs, sender, limits.memory_bytes), daemon=True)
    process.start()
    sender.close()
    deadline = time.monotonic() + limits.time_s
    try:
        while True:
            if receiver.poll(0.2):
                try:
                    kind, payload = receiver.recv()
                except EOFError:
                    break
                if kind == "progress":
                    if not on_progress(payload):
                        raise IsolatedFailure("canceled", "the job was canceled")
                elif kind == "result":
                    return payload
                elif kind == "error":
                    raise IsolatedFailure(payload["code"], payload["message"])
            elif not process.is_alive():
                if receiver.poll(0):
                    continue
                break
            if time.monotonic() > deadline:
                raise IsolatedFailure("timeout", f"the model's work ran past its time limit of {limits.time_s:.0f} s "
                                                 "and was stopped; try fewer iterations, a smaller dataset, or raise "
                                                 "COMPACTOR_JOB_TIME_LIMIT_S")
        process.join(5)
        raise _exit_failure(process.exitcode)
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)
        receiver.close()


def _exit_failure(exitcode: int | None) -> IsolatedFailure:
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGKILL:
            return IsolatedFailure("out_of_memory", "the process running the model was killed by the system, most "
                                                    "likely for running out of memory; try smaller batch sizes")
        name = _CRASH_SIGNALS.get(sig, signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig))
        return IsolatedFailure("model_crashed", f"the model crashed the process running it ({name}); the worker is unharmed")
    return IsolatedFailure("model_crashed", f"the process running the model exited unexpectedly (exit code {exitcode})")


def _child_main(target: str, kwargs: dict, sender, memory_bytes: int | None) -> None:
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        result = function(emit=lambda message: sender.send(("progress", message)), **kwargs)
        sender.send(("result", result))
    except BaseException as exc:
        sender.send(("error", describe_error(exc)))
    finally:
        sender.close()


def describe_error(exc: BaseException) -> dict:
    """{code, message} for an exception raised by torch work."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    if code:
        return {"code": code, "message": message}
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return {"code": "out_of_memory", "message": "the model ran out of memory: " + _first_line(text)}
    log.error("torch work failed:\n%s", "".join(traceback.format_exception(exc)))
    return {"code": "model_error", "message": "running the model failed: " + _first_line(text)}


def _first_line(text: str, limit: int = 600) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    # TorchScript errors put the useful sentence last, after the traceback of the scripted code.
    useful = lines[-1] if len(lines) > 1 and "Traceback" in text else (lines[0] if lines else text)
    return useful[:limit]
