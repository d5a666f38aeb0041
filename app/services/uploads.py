"""Rules shared by uploaded models and datasets: lookup by tenant, listing, soft delete."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import after_commit, read_only_session
from app.errors import InvalidInput, NotFound
from app.models.base import utcnow
from app.multipart import ReceivedUpload
from app.services.blobs import collect_orphans
from app.services.pagination import paginate
from app.settings import get_settings
from app.storage import BlobStore

log = logging.getLogger(__name__)


def display_name(upload: ReceivedUpload, default: str) -> str:
    """The upload's `name` field, else its file name, else `default`: at most 255 characters."""
    name = upload.fields.get("name") or Path(upload.filename or default).name
    if "\x00" in name:
        raise InvalidInput("the name (or file name) contains a NUL byte", code="invalid_name")
    return name[:255]


def get_live(session: Session, table, tenant: str, row_id: str, what: str):
    """The row of `table` with `row_id` for `tenant`, or NotFound (another tenant's looks missing)."""
    row = session.get(table, row_id)
    if row is None or row.tenant != tenant or row.deleted_at is not None:
        raise NotFound(f"{what} {row_id} does not exist", code=f"{what}_not_found")
    return row


def list_live(session: Session, table, tenant: str, limit: int, cursor: str | None):
    """A page of `tenant`'s live (not deleted) rows of `table`, newest first."""
    query = select(table).where(table.tenant == tenant, table.deleted_at.is_(None))
    return paginate(session, query, table, limit, cursor)


def soft_delete(session: Session, store: BlobStore, row) -> None:
    """Hide an upload from the API and, once that commits, delete its blob if nothing holds it."""
    row.deleted_at = utcnow()
    session.flush()
    sha256 = row.sha256
    after_commit(session, lambda: _collect_blob(store, sha256))


def _collect_blob(store: BlobStore, sha256: str) -> None:
    # A blob written within the grace period stays for the periodic collection; so does one this
    # attempt fails on, since the deletion itself has committed.
    try:
        with read_only_session() as session:
            collect_orphans(session, store, get_settings().blob_grace_s, only=[sha256])
    except Exception:
        log.exception("deleting the blob %s of a deleted upload failed; the periodic collection retries", sha256)
