"""Serving stored blobs over HTTP: ETag (the sha256), If-None-Match, and byte ranges.

Range and If-Range are Starlette's `FileResponse`; what is ours is the ETag, the check that the
bytes on disk are still the ones it names, and the optional redirect to the object store.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from app.storage import BlobStore


def blob_response(request: Request, store: BlobStore, sha256: str, size: int, filename: str) -> Response:
    """A download of a blob: 304 on a matching If-None-Match, 307 to a presigned object-store URL
    when the store gives one, 206 for a satisfiable Range, else 200.

    The blob is checked against its sha256 first (raises BlobCorrupted, a 500 with code
    `blob_corrupted`), so the bytes sent are always the ones the ETag names. A redirect hands that
    check to the client (the ETag is the sha256; `compactor jobs download` checks it).
    """
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") in (etag, sha256):
        return Response(status_code=304, headers={"ETag": etag})
    url = store.download_url(sha256, filename)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"ETag": etag})
    path = store.verified_path(sha256, size)
    return FileResponse(path, headers={"ETag": etag}, media_type="application/octet-stream", filename=filename)
