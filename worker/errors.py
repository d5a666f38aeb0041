"""Turning an exception in a model's process into the {code, message} a job or validation stores."""

from __future__ import annotations

import logging
import traceback

from worker.engines.errors import model_text

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> dict:
    """{code, message} for an exception raised by torch work; model-produced text bounded and marked."""
    code = getattr(exc, "code", None)
    if code and isinstance(code, str):
        return {"code": code, "message": getattr(exc, "message", None) or str(exc)}
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return {"code": "out_of_memory", "message": "the model ran out of memory: " + model_text(exc)}
    log.error("torch work failed:\n%s", "".join(traceback.format_exception(exc)))
    return {"code": "model_error", "message": "running the model failed: " + model_text(exc)}
