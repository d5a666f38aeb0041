"""The database layer on the real Postgres: migrations, and the job lifecycle's conditional updates,
each test inside a transaction that is rolled back (the races commit, from two sessions at once)."""

from __future__ import annotations

import threading
from datetime import timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, delete, inspect, select
from sqlalchemy.orm import Session

from app.migrate import upgrade
from app.models import Base, CompressionJob, UploadedModel
from app.models.base import utcnow
from app.models.job import JobStatus
from app.services import jobs, lifecycle, webhooks
from app.settings import Settings


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


def test_the_tables_match_the_migrations(migrated):
    with migrated.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


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
    assert (job.status, job.attempts, job.worker) == (JobStatus.RUNNING, 1, "w1")


def test_progress_and_finish_stop_after_cancel(session):
    job = _job(session)
    lifecycle.claim(session, job.id, "w")
    assert lifecycle.record_progress(session, job.id, {"stage": "x"}) is True
    assert lifecycle.cancel(session, job.id) is True
    assert lifecycle.record_progress(session, job.id, {"stage": "y"}) is False
    assert lifecycle.succeed(session, job.id, "a" * 64, 1, {}) is False
    session.refresh(job)
    assert job.status == JobStatus.CANCELED and job.artifact_sha256 is None


def test_sweep_recovers_lost_jobs_and_sends_only_what_the_broker_does_not_hold(session):
    hour_ago = utcnow() - timedelta(hours=1)
    never_sent = _job(session, created_at=hour_ago)  # the API's send failed
    just_created = _job(session)  # the API's send may still be on its way
    waiting = _job(session, created_at=hour_ago, enqueued_at=hour_ago)  # in the queue: never re-sent
    orphan = _job(session, status=JobStatus.RUNNING, attempts=1, heartbeat_at=hour_ago, enqueued_at=hour_ago)
    exhausted = _job(session, status=JobStatus.RUNNING, attempts=3, heartbeat_at=hour_ago)
    alive = _job(session, status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow() - timedelta(seconds=20))

    recovered = lifecycle.recover_lost_jobs(session, heartbeat_timeout_s=30, max_attempts=3)
    assert orphan.id in recovered and not {exhausted.id, alive.id} & set(recovered)
    sent = dict(lifecycle.claim_unsent(session, requeue_after_s=60))

    assert sent[never_sent.id] is False and sent[orphan.id] is True  # a job that ran: the recovery queue
    assert not {just_created.id, waiting.id, alive.id, exhausted.id} & set(sent)
    assert lifecycle.claim_unsent(session, requeue_after_s=60) == []  # marked: another sweeper sends nothing
    for job in (orphan, exhausted, alive):
        session.refresh(job)
    assert orphan.status == JobStatus.QUEUED and orphan.enqueued_at is not None
    assert exhausted.status == JobStatus.FAILED and exhausted.error["code"] == "worker_lost"
    assert alive.status == JobStatus.RUNNING


def test_a_heartbeat_keeps_only_its_own_attempt_alive(session):
    job = _job(session)
    lifecycle.claim(session, job.id, "w")
    assert lifecycle.beat(session, job.id, attempt=1) is True
    assert lifecycle.requeue(session, job.id, "killed", attempts_below=3) is True
    lifecycle.claim(session, job.id, "w2")
    assert lifecycle.beat(session, job.id, attempt=1) is False  # the first attempt's worker is a zombie
    assert lifecycle.beat(session, job.id, attempt=2) is True
    assert lifecycle.requeue(session, job.id, "killed", attempts_below=2) is False  # attempts used up


def _committed_running_job(engine) -> str:
    with Session(engine) as session, session.begin():
        return _job(session, status=JobStatus.RUNNING, heartbeat_at=utcnow()).id


def _drop_job(engine, job_id: str) -> None:
    with Session(engine) as session, session.begin():
        model_id = session.scalar(select(CompressionJob.model_id).where(CompressionJob.id == job_id))
        session.execute(delete(CompressionJob).where(CompressionJob.id == job_id))
        session.execute(delete(UploadedModel).where(UploadedModel.id == model_id))


def test_cancel_racing_success_never_overwrites_it(migrated):
    job_id = _committed_running_job(migrated)
    try:
        api = Session(migrated)
        assert jobs.get_live_job(api, "default", job_id).status == JobStatus.RUNNING  # the view it cancels from
        worker = Session(migrated)
        assert lifecycle.succeed(worker, job_id, "a" * 64, 7, {}) is True  # holds the row until it commits
        answer = {}

        def cancel() -> None:
            answer["job"] = jobs.cancel_job(api, "default", job_id)
            api.commit()

        canceling = threading.Thread(target=cancel)
        canceling.start()
        canceling.join(0.5)
        assert canceling.is_alive(), "the cancel should wait on the worker's row lock"
        worker.commit()
        canceling.join(10)
        assert (answer["job"].status, answer["job"].artifact_sha256) == (JobStatus.SUCCEEDED, "a" * 64)
        with Session(migrated) as fresh:
            job = fresh.get(CompressionJob, job_id)
            assert (job.status, job.artifact_sha256, job.artifact_size_bytes) == (JobStatus.SUCCEEDED, "a" * 64, 7)
        api.close()
        worker.close()
    finally:
        _drop_job(migrated, job_id)


def test_success_after_a_cancel_is_refused(migrated):
    job_id = _committed_running_job(migrated)
    try:
        worker = Session(migrated)
        assert lifecycle.record_progress(worker, job_id, {"stage": "benchmark"}) is True
        worker.commit()
        with Session(migrated) as api, api.begin():
            assert jobs.cancel_job(api, "default", job_id).status == JobStatus.CANCELED
        assert lifecycle.succeed(worker, job_id, "a" * 64, 7, {}) is False
        worker.commit()
        worker.close()
        with Session(migrated) as fresh:
            job = fresh.get(CompressionJob, job_id)
            assert (job.status, job.artifact_sha256, job.progress["message"]) == (
                JobStatus.CANCELED,
                None,
                "canceled by request",
            )
    finally:
        _drop_job(migrated, job_id)


def test_every_visible_change_bumps_the_revision_and_a_final_one_stores_the_webhook(session):
    job = _job(session)
    job.spec = {"callback_url": "https://hooks.example.com/x"}
    session.flush()
    revisions = [job.revision]
    for change in (
        lambda: lifecycle.claim(session, job.id, "w"),
        lambda: lifecycle.record_progress(session, job.id, {"stage": "x"}),
        lambda: lifecycle.fail(session, job.id, "model_error", "boom"),
    ):
        assert change()
        session.refresh(job)
        revisions.append(job.revision)
    assert revisions == [1, 2, 3, 4]

    (delivery,) = webhooks.deliveries_of(session, job.id)
    assert (delivery.event_type, delivery.status, delivery.url) == ("job.failed", "pending", job.spec["callback_url"])
    assert delivery.payload["data"]["error"] == {"code": "model_error", "message": "boom"}
    # A refused move (a failed job cannot be canceled) stores nothing more.
    assert lifecycle.cancel(session, job.id) is False
    assert len(webhooks.deliveries_of(session, job.id)) == 1


def test_a_job_without_callback_url_stores_no_delivery(session):
    job = _job(session)
    assert lifecycle.cancel(session, job.id)
    assert webhooks.deliveries_of(session, job.id) == []


def test_a_delivery_whose_message_was_lost_is_found_again(session):
    job = _job(session)
    job.spec = {"callback_url": "https://hooks.example.com/x"}
    lifecycle.cancel(session, job.id)
    (delivery,) = webhooks.deliveries_of(session, job.id)
    assert delivery.id not in webhooks.overdue_deliveries(session, overdue_s=60)
    delivery.next_attempt_at = utcnow() - timedelta(minutes=5)
    session.flush()
    assert delivery.id in webhooks.overdue_deliveries(session, overdue_s=60)


def test_retries_follow_the_schedule_and_stop_at_the_window():
    settings = Settings(webhook_retry_delays_s=[5, 300], webhook_retry_window_s=3600)
    now = utcnow()
    assert webhooks._next_delay(1, now, settings) == 5
    assert webhooks._next_delay(2, now, settings) == 300
    assert webhooks._next_delay(3, now, settings) is None  # the schedule is spent
    assert webhooks._next_delay(2, now - timedelta(seconds=3400), settings) is None  # past the window


def test_a_validation_is_sent_again_only_when_its_send_failed(session):
    waiting = UploadedModel(name="w", size_bytes=1, sha256="1" * 64)
    unsent = UploadedModel(name="u", size_bytes=1, sha256="2" * 64)
    session.add_all([waiting, unsent])
    session.flush()
    lifecycle.mark_validation_unsent(session, [unsent.id])
    session.refresh(unsent)
    assert unsent.status == "validating" and unsent.error["code"] == "validation_unsent"  # says why it waits
    claimed = lifecycle.claim_unsent_validations(session)
    assert unsent.id in claimed and waiting.id not in claimed
    assert unsent.id not in lifecycle.claim_unsent_validations(session)
