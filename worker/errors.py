"""Turning an exception in a model's process into the {code, message} a job or validation stores:
the model's own failure (`model_error`), memory (`out_of_memory`), or the service's (`internal_error`)."""

from __future__ import annotations

import logging
import resource
import sys
import traceback

from worker.engines.errors import model_text

log = logging.getLogger(__name__)
INTERPRETER_MARK = "failed in the TorchScript interpreter"
SERVICE_TEXT_LIMIT = 300


def describe_error(exc: BaseException) -> dict:
    """{code, message} for an exception raised by torch work; model-produced text bounded and marked.

    An engine's EngineError keeps its code; an allocation refused is `out_of_memory`; an exception
    raised inside the model's TorchScript is `model_error`; anything else was raised by the service's
    own code: `internal_error`, with its traceback (for the worker's log, never shown to the user).
    """
    code = getattr(exc, "code", None)
    if code and isinstance(code, str):
        return {"code": code, "message": getattr(exc, "message", None) or str(exc)}
    if is_out_of_memory(exc):
        return {"code": "out_of_memory", "message": _memory_message(exc)}
    if raised_by_model(exc):
        return {"code": "model_error", "message": "running the model failed: " + model_text(exc)}
    trace = "".join(traceback.format_exception(exc))
    log.error("the service's own code failed:\n%s", trace)
    return {"code": "internal_error", "message": internal_error_message(exc), "traceback": trace}


def internal_error_message(exc: BaseException) -> str:
    """What a user is told when the service's own code raised (in the model's process or the worker)."""
    text = str(exc)
    text = text[:SERVICE_TEXT_LIMIT] + ("…" if len(text) > SERVICE_TEXT_LIMIT else "")
    return (
        f"Compactor's own code failed, not your model ({type(exc).__name__}: {text}); "
        "if it happens again, report it with the job id"
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation was refused: by the job's address-space limit or by the machine."""
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def raised_by_model(exc: BaseException | None, depth: int = 0) -> bool:
    """True when the exception came out of the model's TorchScript (its own `raise`, or an operator
    failing inside it), directly or as the cause of the exception raised."""
    if exc is None or depth > 8:
        return False
    torch = sys.modules.get("torch")  # never imported here: without torch loaded, no model ran
    if torch is not None and isinstance(exc, torch.jit.Error):
        return True
    if INTERPRETER_MARK in str(exc):
        return True
    frame_tb = exc.__traceback__
    while frame_tb is not None and frame_tb.tb_next is not None:
        frame_tb = frame_tb.tb_next
    # The innermost Python frame calling a scripted module: the exception came from inside it.
    if torch is not None and frame_tb is not None:
        if isinstance(frame_tb.tb_frame.f_locals.get("self"), torch.jit.ScriptModule):
            return True
    return raised_by_model(exc.__cause__, depth + 1)


def _memory_message(exc: BaseException) -> str:
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        return (
            f"the model needed more memory than the job's limit of {limit / 1024**3:.1f} GiB "
            "(COMPACTOR_JOB_MEMORY_LIMIT_BYTES); try smaller batch sizes or inputs, or raise the limit: "
            + model_text(exc)
        )
    return (
        "the model asked for more memory than this machine could give it; try smaller batch sizes or inputs: "
        + model_text(exc)
    )
