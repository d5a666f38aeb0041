"""The database layer on the real Postgres: migrations, and the job lifecycle's conditional updates,
each test inside a transaction that is rolled back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import Session

from app.migrate import upgrade
from app.models import CompressionJob, UploadedModel
from app.models.base import utcnow
from app.services import lifecycle


@pytest.fixture(scope="module")
def migrated(pg_url):
    upgrade(pg_url)
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(migrated):
    connection = migrated.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()


def test_migrations_create_the_schema_on_postgres_and_sqlite(migrated, tmp_path):
    sqlite_url = f"sqlite:///{tmp_path / 'm.sqlite'}"
    upgrade(sqlite_url)
    for engine in (migrated, create_engine(sqlite_url)):
        tables = set(inspect(engine).get_table_names())
        assert {"models", "datasets", "jobs", "alembic_version"} <= tables
    from alembic import command

    from app.migrate import alembic_config

    command.downgrade(alembic_config(sqlite_url), "base")
    assert set(inspect(create_engine(sqlite_url)).get_table_names()) == {"alembic_version"}


def _job(session: Session, **values) -> CompressionJob:
    model = UploadedModel(name="m", size_bytes=1, sha256="0" * 64)
    session.add(model)
    session.flush()
    job = CompressionJob(model_id=model.id, spec={}, spec_hash="x", **values)
    session.add(job)
    session.flush()
    return job


def test_claim_is_taken_once(session):
    job = _job(session)
    assert lifecycle.claim(session, job.id, "w1") is True
    assert lifecycle.claim(session, job.id, "w2") is False
    session.refresh(job)
    assert (job.status, job.attempts, job.worker) == ("running", 1, "w1")


def test_progress_and_finish_stop_after_cancel(session):
    job = _job(session)
    lifecycle.claim(session, job.id, "w")
    assert lifecycle.record_progress(session, job.id, {"stage": "x"}) is True
    job.status = "canceled"
    session.flush()
    assert lifecycle.record_progress(session, job.id, {"stage": "y"}) is False
    assert lifecycle.succeed(session, job.id, "a" * 64, 1, {}) is False
    session.refresh(job)
    assert job.status == "canceled"


def test_sweep_resends_unsent_and_orphaned_jobs(session):
    never_sent = _job(session)
    fresh = _job(session, enqueued_at=utcnow())
    orphan = _job(session, status="running", attempts=1, heartbeat_at=utcnow() - timedelta(hours=1))
    exhausted = _job(session, status="running", attempts=3, heartbeat_at=utcnow() - timedelta(hours=1))
    resent = lifecycle.jobs_to_resend(session, requeue_after_s=60, heartbeat_timeout_s=120, max_attempts=3)
    assert never_sent.id in resent and orphan.id in resent
    assert fresh.id not in resent and exhausted.id not in resent
    session.refresh(orphan)
    session.refresh(exhausted)
    assert orphan.status == "queued"
    assert exhausted.status == "failed" and exhausted.error["code"] == "worker_lost"
