"""Idempotency-Key for the resources created by POST (jobs, searches): the same key and spec
replay the stored row, another spec is a 409, and of two inserts racing on one key the loser
replays the winner's row."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict

Row = TypeVar("Row")


def stored(session: Session, model: type[Row], tenant: str, key: str | None, spec_hash: str, what: str) -> Row | None:
    """The tenant's row made with Idempotency-Key `key`, or None; a 409 when its spec differs.

    Example:
        stored(session, CompressionJob, tenant, key, spec_hash, "job")
    """
    if not key:
        return None
    row = session.scalar(select(model).where(model.tenant == tenant, model.idempotency_key == key))
    if row is not None and row.spec_hash != spec_hash:
        raise Conflict(f"this Idempotency-Key was used with a different {what} spec", code="idempotency_key_reused")
    return row


def insert(session: Session, row: Row, what: str) -> tuple[Row, bool]:
    """Add `row` under a savepoint; returns (row, True), or (the row another request stored first
    under the same key, False)."""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        winner = stored(session, type(row), row.tenant, row.idempotency_key, row.spec_hash, what)
        if winner is None:
            raise
        return winner, False
    return row, True
