"""The one exception type the engines raise for anything a user can act on."""


class EngineError(Exception):
    """A failure with a stable machine-readable `code` and a message a user can act on.

    Example:
        raise EngineError("calibration_required", "static_int8 needs a calibration dataset")
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
