"""Domain errors with stable codes, and the one place they become problem+json responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class CompactorError(Exception):
    """A failure a client can act on: an HTTP status, a stable `code` and a readable detail."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, *, code: str | None = None, errors: list[dict] | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.errors = errors


class NotFound(CompactorError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(CompactorError):
    status, code, title = 409, "conflict", "Conflict"


class PayloadTooLarge(CompactorError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class InvalidInput(CompactorError):
    status, code, title = 422, "invalid_input", "Unprocessable input"


class UnsupportedMedia(CompactorError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class Unauthorized(CompactorError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class BlobCorrupted(CompactorError):
    """A stored file no longer matches the sha256 it was stored under: never served or used."""

    status, code, title = 500, "blob_corrupted", "Stored file corrupted"


class ServiceUnavailable(CompactorError):
    status, code, title = 503, "unavailable", "Service unavailable"


def problem(
    status: int, title: str, detail: str, code: str, errors: list[dict] | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {
        "type": f"https://compactor.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_HTTP_CODES = {
    400: "malformed_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's own `Allow` names only the first
    route that matched the path (`POST /v1/models` would hide `GET /v1/models`)."""
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the API as problem+json with a stable `code`; never a traceback."""

    @app.exception_handler(CompactorError)
    async def _domain(_: Request, exc: CompactorError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem(exc.status, exc.title, exc.detail, exc.code, exc.errors, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        names = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
        return problem(422, "Validation failed", f"invalid request: {names}", "validation_failed", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        # The exception's headers are part of the answer (`WWW-Authenticate` on a 401, ...).
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return problem(exc.status_code, str(exc.detail), str(exc.detail), code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return problem(500, "Internal error", "an unexpected error occurred; it has been logged", "internal_error")
