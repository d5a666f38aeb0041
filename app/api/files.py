"""Serving stored blobs over HTTP with ETag (sha256) and single byte ranges."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.storage import LocalBlobStore

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def blob_response(request: Request, store: LocalBlobStore, sha256: str, size: int, filename: str) -> Response:
    """A download of a blob: 304 on a matching If-None-Match, 206 for a satisfiable Range, else 200.

    The blob is checked against its sha256 first (raises BlobCorrupted, a 500 with code
    `blob_corrupted`), so the bytes sent are always the ones the ETag names.
    """
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    if request.headers.get("if-none-match") in (etag, sha256):
        return Response(status_code=304, headers=headers)
    store.verified_path(sha256, size)
    start, end, status = 0, size - 1, 200
    range_header = request.headers.get("range")
    if range_header and request.headers.get("if-range", etag) == etag:
        match = _RANGE.match(range_header.strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start > end or start >= size:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(store.iter_range(sha256, start, end), status_code=status, headers=headers,
                             media_type="application/octet-stream")
