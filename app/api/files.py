"""Serving stored blobs over HTTP: ETag (the sha256), If-None-Match, and byte ranges.

Range and If-Range are Starlette's `FileResponse`; what is ours is the ETag and the check that
the bytes on disk are still the ones it names.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import FileResponse, Response

from app.storage import LocalBlobStore


def blob_response(request: Request, store: LocalBlobStore, sha256: str, size: int, filename: str) -> Response:
    """A download of a blob: 304 on a matching If-None-Match, 206 for a satisfiable Range, else 200.

    The blob is checked against its sha256 first (raises BlobCorrupted, a 500 with code
    `blob_corrupted`), so the bytes sent are always the ones the ETag names.
    """
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") in (etag, sha256):
        return Response(status_code=304, headers={"ETag": etag})
    path = store.verified_path(sha256, size)
    return FileResponse(path, headers={"ETag": etag}, media_type="application/octet-stream", filename=filename)
