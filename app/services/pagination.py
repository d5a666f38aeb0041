"""Keyset pagination over (created_at, id), newest first, with opaque cursors."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.errors import InvalidInput

T = TypeVar("T")


def paginate(session: Session, query: Select, table, limit: int, cursor: str | None) -> tuple[Sequence, str | None]:
    """Run `query` newest first from `cursor`; returns (rows, next_cursor or None)."""
    if cursor:
        created_at, row_id = _decode(cursor)
        query = query.where(or_(table.created_at < created_at, and_(table.created_at == created_at, table.id < row_id)))
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], _encode(last.created_at, last.id)


def _encode(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, row_id = raw.split("|", 1)
        if "\x00" in row_id:
            raise ValueError("NUL in the id")
        return datetime.fromisoformat(created), row_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("the cursor is not one this API returned", code="invalid_cursor") from exc
