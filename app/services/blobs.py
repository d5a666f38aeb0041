"""Blob lifetime: which blobs the database still references, and deleting those it does not.

A blob is referenced by a live uploaded model or dataset, by a job's artifacts (TorchScript, ONNX), or by
a stored step output (`app.services.checkpoints`) whose model is not deleted. A writer stores
its blob first and commits the row that references it after, so an unreferenced blob may be one
whose row is about to commit. Deletion therefore spares every blob written within the grace period
(`blob_grace_s`), looks at the references again just before it deletes, and deletes only a blob
that still carries the stamp it saw (`BlobStore.remove_unless_rewritten`): any write of the same
bytes since, finished or not, restamps it.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import CompressionJob, Dataset, StepCheckpoint, UploadedModel
from app.services import checkpoints
from app.storage import BlobStore, StoredBlob


def _references():
    """(column, condition) for every column that keeps a blob: the one definition of 'referenced'."""
    return (
        (UploadedModel.sha256, UploadedModel.deleted_at.is_(None)),
        (Dataset.sha256, Dataset.deleted_at.is_(None)),
        (CompressionJob.artifact_sha256, CompressionJob.artifact_sha256.is_not(None)),
        (CompressionJob.onnx_sha256, CompressionJob.onnx_sha256.is_not(None)),
        (StepCheckpoint.sha256, checkpoints.referencing_condition()),
    )


def referenced_blobs(session: Session) -> set[str]:
    """The sha256 of every blob a row references."""
    return {
        sha256
        for column, condition in _references()
        for sha256 in session.scalars(select(column).where(condition).distinct())
    }


def is_referenced(session: Session, sha256: str) -> bool:
    return any(
        session.scalar(select(column).where(condition, column == sha256).limit(1)) is not None
        for column, condition in _references()
    )


def collect_orphans(session: Session, store: BlobStore, grace_s: float, only: list[str] | None = None) -> list[str]:
    """Delete the blobs no row references and nobody has written for `grace_s` seconds.

    Args:
        session: reads the references; each query must see what has committed by then, as an
            autocommit session (`app.db.read_only_session`) or Postgres' READ COMMITTED does.
        store: the blob store.
        grace_s: how long a blob may wait for the row that will reference it.
        only: look at these sha256 only, instead of the whole store.

    Returns:
        The sha256 of the blobs deleted.

    Example:
        >>> with read_only_session() as session:
        ...     collect_orphans(session, get_blob_store(), get_settings().blob_grace_s)
    """
    cutoff = time.time_ns() - int(grace_s * 1e9)
    stamped = store.stored() if only is None else ((sha256, store.stamp(sha256)) for sha256 in only)
    old = [(sha256, stamp) for sha256, stamp in stamped if stamp is not None and stamp < cutoff]
    if not old:
        return []
    referenced = referenced_blobs(session)
    # Asked again one by one: a row committed since the first look keeps its blob.
    return [
        sha256
        for sha256, stamp in old
        if sha256 not in referenced
        and not is_referenced(session, sha256)
        and store.remove_unless_rewritten(sha256, stamp)
    ]


def release(session: Session, store: BlobStore, blob: StoredBlob) -> bool:
    """Delete a blob its writer has just stored and will not reference (e.g. the artifact of a job
    canceled meanwhile), unless a row references it or another writer has stored the same bytes.

    Returns:
        True when the blob was deleted.
    """
    if blob.created_stamp is None or is_referenced(session, blob.sha256):
        return False
    return store.remove_unless_rewritten(blob.sha256, blob.created_stamp)
