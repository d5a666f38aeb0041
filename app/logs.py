"""Log lines: the context they carry (request id, tenant, job id) and, when asked, JSON lines.

The context lives in contextvars, set by the API's middleware for a request and by a worker's task
for a job (the request id travels to the worker in the task message's headers), and a filter puts
it on every record. `COMPACTOR_LOG_FORMAT=json` makes every line one JSON object (python-json-logger);
the default `console` leaves the readable output of uvicorn and Celery as it is.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept only when it is a plain token of sensible length: it lands in every line.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant: ContextVar[str | None] = ContextVar("tenant", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
_FIELDS = {"request_id": request_id, "tenant": tenant, "job_id": job_id}


def accepted_request_id(value: str | None) -> str | None:
    """A client's X-Request-ID when it is usable as one; None: make a new one."""
    return value if value and _VALID_REQUEST_ID.fullmatch(value) else None


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Log lines written inside carry these fields (request_id, tenant, job_id)."""
    tokens = [(_FIELDS[name], _FIELDS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current request id, tenant and job id on each record (a record's own extra wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _FIELDS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


def configure(log_format: str, level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger when `log_format` is 'json'; 'console' changes nothing."""
    if log_format != "json":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn's and Celery's loggers write through the root's handler; the API's middleware writes
    # the access lines (with the request id), so uvicorn's own are off.
    for name in ("uvicorn", "uvicorn.error", "celery"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
