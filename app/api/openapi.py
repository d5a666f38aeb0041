"""The OpenAPI document as the contract: each route's real statuses, headers and media types.

Routes declare what they can answer with `problems(...)` and the `*_RESPONSES` below; FastAPI
generates the document, and `contract_openapi` fixes the two things it cannot express per route:
problem responses are `application/problem+json` only, and binary or HTML bodies carry no JSON
alternative (a generated client would otherwise try to parse a download as JSON).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas.common import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"
EVENT_STREAM = "text/event-stream"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_TEXT = {
    400: "Malformed request (a body that is not UTF-8 JSON)",
    401: "Missing or wrong API key",
    404: "Not found (a resource of another tenant is answered the same)",
    409: "Conflict with the resource's state",
    413: "Upload larger than the configured limit",
    415: "Unsupported media type (not multipart, or not a TorchScript archive / dataset file)",
    422: "Invalid input, naming the fields",
    500: "Internal error (e.g. a stored blob no longer matches its sha256)",
    503: "A service this answer needs cannot be reached (the broker, or the object store while storing "
    "an upload: `storage_unavailable`); retry",
}
# Every /v1 route may answer these: auth (when keys are configured) and request validation.
COMMON_PROBLEMS = (401, 422)


def problems(*statuses: int) -> dict[int, dict[str, Any]]:
    """The problem+json responses a route declares, e.g. `responses=problems(404, 409)`."""
    return {status: {"model": Problem, "description": _PROBLEM_TEXT[status]} for status in statuses}


def _header(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "schema": schema or {"type": "string"}}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ETAG = _header("The blob's sha256, quoted: send it back as If-None-Match or If-Range.")


def download_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """200 / 206 / 304 / 307 of a blob download (ETag = sha256, Range and If-Range supported)."""
    return {
        200: {
            "description": what,
            "content": {"application/octet-stream": _BINARY},
            "headers": {"ETag": _ETAG, "Accept-Ranges": _header("Always `bytes`.")},
        },
        206: {
            "description": f"{what}: the requested byte range",
            "content": {"application/octet-stream": _BINARY},
            "headers": {"ETag": _ETAG, "Content-Range": _header("`bytes start-end/size`.")},
        },
        304: {"description": "Not modified: If-None-Match named this blob's ETag", "headers": {"ETag": _ETAG}},
        307: {
            "description": "Fetch the bytes from the object store (COMPACTOR_S3_PRESIGN_DOWNLOADS): a presigned URL",
            "headers": {"ETag": _ETAG, "Location": _header("The presigned URL, valid for a while.")},
        },
        # Starlette's FileResponse answers these two itself, in plain text
        400: {"description": "Malformed Range header", "content": {"text/plain": {"schema": {"type": "string"}}}},
        416: {
            "description": "Range not satisfiable (empty body)",
            "headers": {"Content-Range": _header("`bytes */size`.")},
        },
        **problems(404, 409, 500),
    }


def created_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """The Location header of a 201/202 that made a resource (merged with the route's model)."""
    return {"headers": {"Location": _header(f"The URL of the new {what}.")}}


def upload_body(description: str) -> dict:
    """A multipart/form-data request body with a binary `file` and an optional `name`, with an example."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "title": "UploadForm",
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": description},
                            "name": {"type": "string", "description": "Display name (default: the file name)."},
                        },
                    },
                    "example": {"file": "(the file's bytes)", "name": "resnet18-imagenet"},
                }
            },
        }
    }


def contract_openapi(app: FastAPI) -> dict[str, Any]:
    """The document FastAPI generates, with problem and binary media types made exact; cached."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
        tags=app.openapi_tags,
        description=app.description,
    )
    for operations in document["paths"].values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content")
                if not content:
                    continue
                if any(media.get("schema") == _PROBLEM_REF for media in content.values()):
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}
                elif EVENT_STREAM in content:
                    # OpenAPI 3.1 has no type for a stream of events: the body is text, and each
                    # event's JSON `data` has the schema the route declares (named in an extension).
                    data_schema = content[EVENT_STREAM].get("schema")
                    response["content"] = {EVENT_STREAM: {"schema": {"type": "string"}, "x-event-data": data_schema}}
                elif len(content) > 1 and "application/json" in content:
                    del content["application/json"]  # binary or HTML: FastAPI's default JSON entry is wrong
    app.openapi_schema = document
    return document
