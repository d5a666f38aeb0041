"""The one exception type the engines raise for anything a user can act on, and how text a model
produced may appear inside a message."""

MODEL_TEXT_LIMIT = 300


class EngineError(Exception):
    """A failure with a stable machine-readable `code` and a message a user can act on.

    Example:
        raise EngineError("calibration_required", "static_int8 needs a calibration dataset")
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def model_text(exc: BaseException, limit: int = MODEL_TEXT_LIMIT) -> str:
    """An exception raised while loading or running a model, as text safe to show a user.

    The message is the model's (its own `raise`, or torch's words about its code), so it is cut to
    `limit` characters and marked as the model's, never passed on whole. TorchScript puts the
    useful sentence last, after a traceback of the scripted code, so that line is the one kept.

    Example:
        f"the model does not run on the job's inputs: {model_text(exc)}"
        # -> 'the model does not run ...: RuntimeError, the model's own message (cut to 300 characters): "..."'
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = (lines[-1] if len(lines) > 1 and "Traceback" in text else lines[0]) if lines else ""
    cut = useful[:limit] + ("…" if len(useful) > limit else "")
    return f'{type(exc).__name__}, the model\'s own message (cut to {limit} characters): "{cut}"'


class MeterError(Exception):
    """The service's own measuring code failed on a model that ran: never the model's fault.

    Distinct from `EngineError` (something the user can act on) and from the model's own
    exceptions (`model_error`); `code` is "internal_error", which the worker records as a fault of
    the service (issue 19 owns what is done with it).
    """

    code = "internal_error"

    def __init__(self, what: str, exc: BaseException):
        detail = f"{type(exc).__name__}: {exc}"[:MODEL_TEXT_LIMIT]
        self.message = (
            f"the service's meter failed while {what} ({detail}); this is a fault of the service, not of the model"
        )
        super().__init__(self.message)
