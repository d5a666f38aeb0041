"""Fixtures for service tests: real Postgres, real Redis, the API and a Celery worker running."""

from __future__ import annotations

import io
import os
import time
import uuid
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.migrate import upgrade
from app.settings import Settings
from app.storage_s3 import S3BlobStore
from tests import zoo
from tests.service.servers import (
    REDIS_URL,
    Service,
    api_client,
    check_redis,
    postgres_database,
    s3_endpoint,
    service_env,
)


@pytest.fixture(scope="session")
def pg_url():
    """A fresh Postgres database, migrated by the tests that need it. Missing Postgres fails the run."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def own_pg_url():
    """A Postgres database for one module's services alone. Services on a shared database re-send
    each other's waiting jobs and validations (their sweepers read every row), so a service whose
    workers see other blobs (another store, other directories) must not share one."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def migrated(pg_url):
    """An engine on the Postgres database, migrated to the newest revision."""
    upgrade(pg_url)
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(migrated):
    """A session inside a transaction that is rolled back after the test."""
    connection = migrated.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()


@pytest.fixture(scope="session")
def redis_broker():
    check_redis()  # fails (never skips) when Redis is down
    # Its own Redis database, so two checkouts testing at once never take each other's jobs.
    return f"{REDIS_URL}/{os.environ.get('COMPACTOR_TEST_REDIS_DB', '5')}"


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """A real S3 endpoint (moto's server) with a bucket: the settings that point a service at it."""
    with s3_endpoint(tmp_path_factory.mktemp("s3")) as env:
        yield env


def s3_store(s3_env: dict, cache_dir, own_prefix: bool = True, **options) -> S3BlobStore:
    """An S3 blob store on the endpoint of `s3_env` (a service's environment will do), caching into
    `cache_dir`; under a prefix of its own unless `own_prefix` is False."""
    settings = Settings(
        **{
            name.removeprefix("COMPACTOR_").lower(): value
            for name, value in s3_env.items()
            if name.startswith(("COMPACTOR_S3_", "COMPACTOR_STORAGE_URL"))
        },
        data_dir=cache_dir.parent,
        cache_dir=cache_dir,
    )
    if own_prefix:
        settings.storage_url = f"{settings.storage_url}/{uuid.uuid4().hex[:8]}"
    store = S3BlobStore.from_settings(settings)
    for name, value in options.items():
        setattr(store, name, value)
    return store


@pytest.fixture(scope="session")
def service(tmp_path_factory, pg_url, redis_broker):
    """API + worker on Postgres and Redis, the production shape."""
    data_dir = tmp_path_factory.mktemp("service")
    env = service_env(
        data_dir,
        pg_url,
        redis_broker,
        COMPACTOR_MAX_UPLOAD_BYTES=str(64 * 1024 * 1024),
        COMPACTOR_JOB_TIME_LIMIT_S="120",
        COMPACTOR_REQUEUE_INTERVAL_S="2",
        COMPACTOR_JOB_MEMORY_LIMIT_BYTES=str(8 * 1024**3),
        COMPACTOR_REQUEUE_AFTER_S="5",
        # The webhook tests' receiver listens on loopback, and cannot wait minutes between attempts.
        COMPACTOR_WEBHOOK_ALLOW_PRIVATE="true",
        COMPACTOR_WEBHOOK_RETRY_DELAYS_S="[0.5, 1, 1]",
        COMPACTOR_EVENTS_POLL_INTERVAL_S="0.2",
        # Intervals on this busy 2-core host rarely narrow: 2 s of extra rounds, not 30, per job.
        COMPACTOR_MEASURE_EXTRA_TIME_S="2",
    )
    svc = Service(env, data_dir)
    svc.start_api()
    svc.start_worker()
    svc.start_notifier()
    yield svc
    svc.stop()


@contextmanager
def second_api(service, log_dir, **settings: str):
    """Another API process on the same database and queue, with some settings changed; its URL."""
    other = Service({**service.env, **settings}, log_dir)
    other.start_api()
    try:
        yield other.url
    finally:
        other.stop()


@pytest.fixture
def api(service):
    with api_client(service.url) as client:
        yield client


def torchscript_bytes(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def traced_cnn() -> torch.jit.ScriptModule:
    return zoo.trace(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32))


def scripted_loop_if() -> torch.jit.ScriptModule:
    return zoo.script(zoo.LoopIfNet())


def upload_model(api: httpx.Client, module: torch.jit.ScriptModule | bytes, name: str = "model.pt") -> dict:
    content = module if isinstance(module, bytes) else torchscript_bytes(module)
    try:
        response = api.post("/v1/models", files={"file": (name, content, "application/octet-stream")})
    except (httpx.ReadError, httpx.RemoteProtocolError):
        # Seen only in full-suite runs (never alone): the API resets this connection before any
        # response, so nothing was stored. The cause is still open; one retry.
        response = api.post("/v1/models", files={"file": (name, content, "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload_dataset(api: httpx.Client, name: str = "data.npz", **arrays: np.ndarray) -> dict:
    response = api.post("/v1/datasets", files={"file": (name, npz_bytes(**arrays), "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(api: httpx.Client, path: str, done, timeout: float = 120.0) -> dict:
    """Poll `path` until `done(body)` holds; fail with the last body after `timeout`."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = api.get(path).json()
        if done(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting on {path}: {body}")


def wait_job(api: httpx.Client, job_id: str, timeout: float = 180.0) -> dict:
    return wait_for(api, f"/v1/jobs/{job_id}", lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout)


def digits_arrays(n: int = 128) -> dict[str, np.ndarray]:
    x, y, _, _ = zoo.digits()
    return {"input": x[:n].numpy(), "label": y[:n].numpy()}
