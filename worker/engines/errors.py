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
