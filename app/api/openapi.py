"""OpenAPI fragments shared by routes: the problem+json error responses and multipart bodies."""

from __future__ import annotations

from app.schemas.common import Problem

_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
ERRORS = {status: {**_PROBLEM, "description": text} for status, text in
          ((401, "Missing or wrong API key"), (404, "Not found"), (409, "Conflict"), (422, "Invalid input"))}


def upload_body(description: str) -> dict:
    """A multipart/form-data request body with a binary `file` and an optional `name`."""
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "title": "UploadForm",
        "properties": {"file": {"type": "string", "format": "binary", "description": description},
                       "name": {"type": "string", "description": "Display name (default: the file name)."}},
    }}}}}
