"""What the API refuses before routing: oversized header sections and NUL bytes in the URL.

`compactor serve` runs uvicorn on h11, which stops reading a header section past
COMPACTOR_MAX_REQUEST_HEADER_BYTES only once it arrives in more than one read; a section that
came in one read (up to asyncio's 256 KiB) is measured here instead. A NUL byte can name no
resource and no database text can hold one (Postgres refuses it), so a path or query carrying
one is a 422 here rather than an error deep in a query.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import problem


class RequestGuard:
    """ASGI middleware: 431 `headers_too_large` past `header_limit` bytes of request line and
    headers; 422 `nul_byte` for a NUL in the path or query."""

    def __init__(self, app: ASGIApp, header_limit: int):
        self.app, self.header_limit = app, header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._refusal(scope) if scope["type"] == "http" else None
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _refusal(self, scope: Scope):
        query = scope.get("query_string") or b""
        # as on the wire: "METHOD target HTTP/1.1\r\n", then "name: value\r\n" per header
        size = len(scope.get("raw_path") or b"") + len(query) + 16
        size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > self.header_limit:
            return problem(
                431,
                "Request header fields too large",
                f"the request line and headers are {size} bytes; this service reads at most {self.header_limit}",
                "headers_too_large",
            )
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            return problem(422, "Unprocessable input", "the URL contains a NUL byte (%00)", "nul_byte")
        return None
