"""The request-header limit, exact and as problem+json, for what the HTTP parser let through.

`compactor serve` runs uvicorn on h11, which stops reading a header section past
COMPACTOR_MAX_REQUEST_HEADER_BYTES only once it arrives in more than one read; a section that
came in one read (up to asyncio's 256 KiB) is measured here instead.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import problem


class RequestHeaderLimit:
    """ASGI middleware: a 431 `headers_too_large` when the request line and headers pass `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # as on the wire: "METHOD target HTTP/1.1\r\n", then "name: value\r\n" per header
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.limit:
                response = problem(
                    431,
                    "Request header fields too large",
                    f"the request line and headers are {size} bytes; this service reads at most {self.limit}",
                    "headers_too_large",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
