"""Rules shared by uploaded models and datasets: lookup by tenant, soft delete, blob lifetime."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Dataset, UploadedModel
from app.db import after_commit
from app.models.base import utcnow
from app.services.pagination import paginate
from app.storage import BlobStore


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
    """Hide an upload from the API and free its blob once no live upload holds it any more."""
    row.deleted_at = utcnow()
    session.flush()
    _release_blob_after_commit(session, store, row.sha256)


def _release_blob_after_commit(session: Session, store: BlobStore, sha256: str) -> None:
    """Delete a blob once the deletion commits, unless another live upload still holds it."""
    holders = 0
    for table in (UploadedModel, Dataset):
        holders += session.scalar(select(func.count()).select_from(table).where(
            table.sha256 == sha256, table.deleted_at.is_(None)))
    if holders == 0:
        after_commit(session, lambda: store.delete(sha256))
