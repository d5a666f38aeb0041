"""`app.db.after_commit`: callbacks run once the outermost transaction commits, never when a
savepoint inside it is released (a search submits several jobs, each in a savepoint)."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import Base, WebhookSecret
from app.models.base import utcnow


def test_a_callback_waits_for_the_outer_commit_not_a_later_savepoint():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    ran: list[str] = []
    with Session(engine) as session:
        with session.begin_nested():
            session.add(WebhookSecret(tenant="a", secret="s", created_at=utcnow()))
        after_commit(session, lambda: ran.append("a"))
        with session.begin_nested():
            session.add(WebhookSecret(tenant="b", secret="s", created_at=utcnow()))
        assert ran == []
        session.commit()
    assert ran == ["a"]


def test_a_rollback_drops_the_callbacks():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    ran: list[str] = []
    with Session(engine) as session:
        session.add(WebhookSecret(tenant="a", secret="s", created_at=utcnow()))
        session.flush()
        after_commit(session, lambda: ran.append("a"))
        session.rollback()
        session.commit()
    assert ran == []
