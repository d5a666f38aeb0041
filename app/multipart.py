"""Streaming multipart/form-data: file parts go straight to the blob store, never whole in memory.

Starlette's own form parser spools the whole file before the handler runs and cannot stop an
oversized upload early; this parser feeds each chunk to a `BlobWriter` as it arrives (a local temp
file, or a multipart upload to the object store), so the size limit is enforced on the bytes
actually received (413 mid-stream) and memory stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import CompactorError, InvalidInput, PayloadTooLarge, ServiceUnavailable, UnsupportedMedia
from app.storage import BlobStore, BlobWriter

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class ReceivedUpload:
    """A file part stored in a temp blob (not yet committed) plus the form's text fields."""

    writer: BlobWriter | None = None
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


async def receive_upload(
    request: Request, store: BlobStore, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Parse a multipart body, streaming `file_field` into a blob writer (hashing as it goes).

    Raises PayloadTooLarge as soon as more than `max_bytes` of file data arrive, and InvalidInput
    when the form is malformed or has no file. On any error the temp file is removed.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMedia("send the file as multipart/form-data with a 'file' part", code="multipart_required")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"the upload ({declared} bytes) exceeds the limit of {max_bytes} bytes")

    result = ReceivedUpload()
    state = _PartState()
    # The parser's callbacks are synchronous; file bytes wait here to be written from the event
    # loop (an object store's writes must not block it). At most one received chunk's worth.
    pending: list[bytes] = []

    def on_part_begin() -> None:
        state.reset()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        if state.header_name.lower() == b"content-disposition":
            _, disposition = parse_options_header(state.header_value)
            state.name = disposition.get(b"name", b"").decode("utf-8", "replace")
            filename = disposition.get(b"filename")
            state.filename = filename.decode("utf-8", "replace") if filename is not None else None
        state.header_name, state.header_value = b"", b""

    def on_headers_finished() -> None:
        if state.name == file_field:
            if result.writer is not None:
                raise InvalidInput(f"send exactly one '{file_field}' part", code="multiple_files")
            result.writer = store.writer(max_bytes)
            result.filename = state.filename

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.name == file_field and result.writer is not None:
            pending.append(data[start:end])
        else:
            state.value += data[start:end]
            if len(state.value) > MAX_FIELD_BYTES:
                raise InvalidInput(f"form field {state.name!r} is too long", code="field_too_long")

    def on_part_end() -> None:
        if state.name != file_field and state.name:
            result.fields[state.name] = state.value.decode("utf-8", "replace")

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if pending:
                await _store(result.writer, pending)
        parser.finalize()
        if result.writer is None:
            raise InvalidInput(
                f"the form has no '{file_field}' part",
                code="file_required",
                errors=[{"loc": ["body", file_field], "msg": "field required"}],
            )
        try:
            result.writer.finish()
        except OSError as exc:
            raise _unavailable(exc) from exc
        return result
    except CompactorError:
        _discard(result)
        raise
    except Exception as exc:
        _discard(result)
        raise InvalidInput(f"malformed multipart body: {exc}", code="malformed_multipart") from exc


async def _store(writer: BlobWriter, pending: list[bytes]) -> None:
    try:
        for piece in pending:
            await writer.awrite(piece)
    except OSError as exc:
        raise _unavailable(exc) from exc
    pending.clear()


def _unavailable(exc: OSError) -> ServiceUnavailable:
    # The store failed, not the client's body: a 503 to retry, never a 422 blaming the upload.
    return ServiceUnavailable(f"the blob store failed while storing the upload: {exc}", code="storage_unavailable")


def _discard(result: ReceivedUpload) -> None:
    if result.writer is not None:
        result.writer.discard()


@dataclass
class _PartState:
    name: str = ""
    filename: str | None = None
    header_name: bytes = b""
    header_value: bytes = b""
    value: bytes = b""

    def reset(self) -> None:
        self.name, self.filename, self.header_name, self.header_value, self.value = "", None, b"", b"", b""
