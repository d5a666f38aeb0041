"""What an operator sees of the API: `/metrics`, and one middleware that gives each request its id
(X-Request-ID, accepted from the client or made), counts and times it by route, and writes its
access line when logs are JSON.

Mounted by `app.main` with `install(app)`; the metrics are defined in `app.metrics`, the log
context in `app.logs`.
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, metrics
from app.settings import get_settings

router = APIRouter(tags=["service"])
access_log = logging.getLogger("compactor.access")
_HEADER = logs.REQUEST_ID_HEADER.lower().encode()


@router.get("/metrics", operation_id="metrics", include_in_schema=False)
def metrics_endpoint() -> Response:
    """Prometheus metrics (text format): HTTP traffic, uploads, jobs by status, queue depths."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class RequestObserver:
    """Pure ASGI (no BaseHTTPMiddleware task per request). Requests are labelled by their route
    template, so `/v1/jobs/{job_id}` is one series however many jobs there are."""

    def __init__(self, app: ASGIApp, write_access_log: bool):
        self.app = app
        self.write_access_log = write_access_log
        self._children: dict[tuple[str, str, int], tuple] = {}

    def _series(self, method: str, route: str, status: int) -> tuple:
        # labels() takes a lock and builds a key on every call; the few series are kept here.
        key = (method, route, status)
        series = self._children.get(key)
        if series is None:
            series = (
                metrics.HTTP_REQUESTS.labels(method, route, str(status)),
                metrics.HTTP_LATENCY.labels(method, route),
            )
            self._children[key] = series
        return series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((value for name, value in scope["headers"] if name == _HEADER), b"")
        request_id = logs.accepted_request_id(given.decode("latin-1")) or uuid.uuid4().hex
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (_HEADER, request_id.encode())]
            await send(message)

        # Set directly, not through logs.bound: this runs on every request. The request's task
        # has a context of its own, so tenant and job id start unset.
        token = logs.request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            counted, timed = self._series(method, route, status["code"])
            counted.inc()
            timed.observe(elapsed)
            if self.write_access_log:
                access_log.info(
                    "%s %s %d",
                    method,
                    scope["path"],
                    status["code"],
                    extra={
                        "route": route,
                        "status": status["code"],
                        "duration_ms": round(elapsed * 1000, 2),
                        "job_id": (scope.get("path_params") or {}).get("job_id"),
                    },
                )
            logs.request_id.reset(token)


def install(app: FastAPI) -> None:
    """Mount `/metrics` and the request middleware; JSON logs when the settings ask for them."""
    settings = get_settings()
    logs.configure(settings.log_format)
    app.include_router(router)
    app.add_middleware(RequestObserver, write_access_log=settings.log_format == "json")
