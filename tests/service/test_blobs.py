"""Blob collection on the real Postgres, in the local store and on the S3 endpoint: every referenced
blob kept, orphans deleted once old, a blob written again mid-collection spared, a deleted upload's
blob freed unless an artifact is the same bytes, and a job canceled after storing its artifact
leaving none."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import pytest
import torch

from app.db import _session_factory, get_engine, read_only_session, unit_of_work
from app.models import CompressionJob, Dataset, UploadedModel
from app.models.base import utcnow
from app.models.job import JobStatus
from app.services import blobs, lifecycle, models
from app.settings import get_settings
from app.storage import BlobStore, LocalBlobStore, get_blob_store
from tests.service.conftest import s3_store, torchscript_bytes, traced_cnn

DAY_NS = 86400 * 10**9


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Each collection test runs on both stores: the local directory and the S3 endpoint."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    return s3_store(request.getfixturevalue("s3_env"), tmp_path / "cache")


def _put(store: BlobStore, tmp_path, content: bytes, age_ns: int = 0):
    source = tmp_path / f"source-{time.time_ns()}"
    source.write_bytes(content)
    blob = store.put_file(source)
    if age_ns:
        then = time.time_ns() - age_ns
        if isinstance(store, LocalBlobStore):
            os.utime(store.local_path(blob.sha256), ns=(then, then))
        else:  # the object copied onto itself with an older stamp
            store._copy(store.key(blob.sha256), store.key(blob.sha256), then, blob.size)
    return blob


def _plant_stranger(store: BlobStore) -> Callable[[], bool]:
    """Something in the store's blob area that is not a blob; returns whether it is still there."""
    if isinstance(store, LocalBlobStore):
        planted = store.root / "not-a-blob"
        planted.write_bytes(b"x")
        return planted.exists
    key = f"{store.prefix}/blobs/not-a-blob"
    store.fs.pipe_file(key, b"x")
    return lambda: store.fs.exists(key)


def _staged(store: BlobStore) -> list:
    """Uploads' temp files (temp objects) left behind."""
    if isinstance(store, LocalBlobStore):
        return list(store.tmp_dir.iterdir())
    return store.fs.find(f"{store.prefix}/tmp/")


def test_collection_keeps_every_referenced_blob_and_deletes_old_orphans(session, store, tmp_path):
    model, dataset, artifact, onnx_artifact, deleted, old_orphan = (
        _put(store, tmp_path, name.encode(), age_ns=2 * DAY_NS)
        for name in ("model", "dataset", "artifact", "onnx artifact", "deleted", "orphan")
    )
    fresh_orphan = _put(store, tmp_path, b"written a moment ago, its row not yet committed")
    stranger_kept = _plant_stranger(store)
    live = UploadedModel(name="m", size_bytes=5, sha256=model.sha256)
    session.add_all(
        [
            live,
            Dataset(name="d", file_format="npz", size_bytes=7, sha256=dataset.sha256, num_samples=1, arrays={}),
            UploadedModel(name="gone", size_bytes=7, sha256=deleted.sha256, deleted_at=utcnow()),
        ]
    )
    session.flush()
    session.add(
        CompressionJob(
            model_id=live.id,
            spec={},
            spec_hash="x",
            status=JobStatus.SUCCEEDED,
            artifact_sha256=artifact.sha256,
            artifact_size_bytes=8,
            onnx_sha256=onnx_artifact.sha256,
            onnx_size_bytes=13,
        )
    )
    session.flush()

    removed = blobs.collect_orphans(session, store, grace_s=3600)

    assert sorted(removed) == sorted([deleted.sha256, old_orphan.sha256])
    assert {sha256 for sha256, _ in store.stored()} == {
        model.sha256,
        dataset.sha256,
        artifact.sha256,
        onnx_artifact.sha256,
        fresh_orphan.sha256,
    }
    assert stranger_kept() and _staged(store) == []
    assert blobs.collect_orphans(session, store, grace_s=3600) == []


def test_collection_keeps_a_stored_step_while_its_model_lives_and_frees_it_with_the_model(session, store, tmp_path):
    from app.models import StepCheckpoint
    from app.services import checkpoints

    model_blob, kept, dropped = (
        _put(store, tmp_path, name.encode(), age_ns=2 * DAY_NS) for name in ("model", "step of a live model", "step")
    )
    key = uuid.uuid4().hex * 2
    live = UploadedModel(name="m", size_bytes=5, sha256=model_blob.sha256)
    gone = UploadedModel(name="gone", size_bytes=5, sha256=model_blob.sha256)
    session.add_all([live, gone])
    session.flush()
    for owner, blob in ((live, kept), (gone, dropped)):
        job = CompressionJob(model_id=owner.id, spec={}, spec_hash="x", status=JobStatus.FAILED)
        session.add(job)
        session.flush()
        checkpoints.record(session, "default", key, job.id, owner.id, 0, blob, {"op": "prune"})
    session.flush()

    assert blobs.collect_orphans(session, store, grace_s=3600) == []
    gone.deleted_at = utcnow()
    session.flush()
    assert blobs.collect_orphans(session, store, grace_s=3600) == [dropped.sha256]
    assert store.exists(kept.sha256) and not store.exists(dropped.sha256)
    # A deleted model's stored steps are no longer offered for reuse either.
    assert [c.sha256 for c in checkpoints.stored_prefix(session, "default", [key])] == [kept.sha256]
    owners = StepCheckpoint.model_id.in_([live.id, gone.id])
    assert session.query(StepCheckpoint).filter(owners).count() == 2  # the rows stay, the job's record


def test_a_blob_written_again_while_collected_is_spared(session, store, tmp_path):
    old = _put(store, tmp_path, b"the same bytes, uploaded again", age_ns=2 * DAY_NS)
    seen = store.stamp(old.sha256)
    again = _put(store, tmp_path, b"the same bytes, uploaded again")  # its row is not committed yet
    assert again.created_stamp is None and store.stamp(old.sha256) > seen
    assert store.remove_unless_rewritten(old.sha256, seen) is False
    assert store.exists(old.sha256) and _staged(store) == []
    assert blobs.collect_orphans(session, store, grace_s=3600, only=[old.sha256]) == []


def test_release_deletes_only_what_this_write_created_and_nothing_references(session, store, tmp_path):
    mine = _put(store, tmp_path, b"an artifact nobody will download")
    assert blobs.release(session, store, mine) is True and not store.exists(mine.sha256)

    first = _put(store, tmp_path, b"an artifact another job also made")
    second = _put(store, tmp_path, b"an artifact another job also made")
    assert blobs.release(session, store, second) is False  # stored before it: the other writer's
    assert blobs.release(session, store, first) is False  # written again since: the other writer may need it
    assert store.exists(first.sha256)

    referenced = _put(store, tmp_path, b"an artifact a succeeded job holds")
    model = UploadedModel(name="m", size_bytes=1, sha256="0" * 64)
    session.add(model)
    session.flush()
    session.add(
        CompressionJob(
            model_id=model.id,
            spec={},
            spec_hash="x",
            status=JobStatus.SUCCEEDED,
            artifact_sha256=referenced.sha256,
            artifact_size_bytes=1,
        )
    )
    session.flush()
    assert blobs.release(session, store, referenced) is False and store.exists(referenced.sha256)


@pytest.fixture
def settings_on_test_db(monkeypatch, tmp_path, migrated, pg_url):
    """This process configured on the test database, with its own blob store, as an API or a worker."""
    for name, value in {
        "COMPACTOR_DATABASE_URL": pg_url,
        "COMPACTOR_DATA_DIR": str(tmp_path / "data"),
        "COMPACTOR_SANDBOX": "off",
    }.items():
        monkeypatch.setenv(name, value)
    caches = (get_settings, _session_factory, get_engine)
    for cache in caches:
        cache.cache_clear()
    yield get_settings()
    get_engine().dispose()
    for cache in caches:
        cache.cache_clear()


def test_a_cancel_after_the_artifact_is_stored_leaves_no_blob(settings_on_test_db, monkeypatch):
    from worker import execution

    store = execution.get_blob_store()
    content = torchscript_bytes(traced_cnn())
    upload = store.writer(max_bytes=1 << 30)
    upload.write(content)
    upload.finish()
    model_blob = upload.commit()
    with unit_of_work() as session:
        model = UploadedModel(name="m", size_bytes=model_blob.size, sha256=model_blob.sha256, status="ready")
        session.add(model)
        session.flush()
        # Marked sent, so a service's sweeper sharing this database leaves it to this test.
        job = CompressionJob(model_id=model.id, spec={"steps": []}, spec_hash="x", enqueued_at=utcnow())
        session.add(job)
        session.flush()
        job_id = job.id

    def compressed(target, kwargs, limits, on_progress, job, canceled):
        # An artifact with bytes of its own: the model with one more file in its archive.
        path = job.root / "out" / "model.pt"
        torch.jit.save(traced_cnn(), str(path), _extra_files={"note": b"compressed"})
        report = {
            "spec": {"steps": []},
            "environment": {},
            "baseline": {},
            "result": {},
            "stages": [],
            "summary": {},
            "notes": [],
        }  # the shape execute_job returns, without figures
        return {"report": report, "artifact_path": str(path)}

    stored = []
    real_succeed = lifecycle.succeed

    def cancel_then_succeed(session, job_id, artifact_sha256, *args):
        stored.append(artifact_sha256)
        assert store.exists(artifact_sha256)
        with unit_of_work() as other:
            lifecycle.cancel(other, job_id)
        return real_succeed(session, job_id, artifact_sha256, *args)

    monkeypatch.setattr(execution, "run_isolated", compressed)
    monkeypatch.setattr(lifecycle, "succeed", cancel_then_succeed)

    assert execution.run_job(job_id, worker="test@host") == JobStatus.CANCELED
    assert stored and not store.exists(stored[0]) and store.exists(model_blob.sha256)
    with read_only_session() as session:
        job = session.get(CompressionJob, job_id)
        assert (job.status, job.artifact_sha256) == (JobStatus.CANCELED, None)


def test_deleting_an_upload_frees_its_blob_unless_an_artifact_is_the_same_bytes(settings_on_test_db, tmp_path):
    store = get_blob_store()
    # A profile-only job's artifact is its model, byte for byte: one blob, two references.
    shared = _put(store, tmp_path, b"a model and its profile-only job's artifact", age_ns=2 * DAY_NS)
    alone = _put(store, tmp_path, b"a model nothing else holds", age_ns=2 * DAY_NS)
    with unit_of_work() as session:
        rows = [
            UploadedModel(name=name, size_bytes=blob.size, sha256=blob.sha256, status="ready")
            for name, blob in (("shared", shared), ("alone", alone))
        ]
        session.add_all(rows)
        session.flush()
        session.add(
            CompressionJob(
                model_id=rows[0].id,
                spec={},
                spec_hash="x",
                status=JobStatus.SUCCEEDED,
                artifact_sha256=shared.sha256,
                artifact_size_bytes=shared.size,
            )
        )
        model_ids = [row.id for row in rows]
    for model_id in model_ids:
        with unit_of_work() as session:
            models.delete_model(session, store, "default", model_id)
    assert store.exists(shared.sha256) and not store.exists(alone.sha256)
