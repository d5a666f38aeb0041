"""Blobs in an S3-compatible object store, against a real S3 endpoint (moto's server): the API and a
worker with no shared directory, uploads streamed with flat memory, the same sha256 and size checks,
the workers' bounded cache, and downloads redirected to presigned URLs when asked."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import psutil
import pytest
import torch

from app.client import CompactorClient
from app.errors import BlobCorrupted
from tests import zoo
from tests.service.conftest import (
    digits_arrays,
    s3_store,
    second_api,
    torchscript_bytes,
    traced_cnn,
    upload_dataset,
    upload_model,
    wait_job,
)
from tests.service.servers import Service, api_client, service_env

MIB = 1024 * 1024
CNN_INPUT = [{"shape": [1, 1, 32, 32], "dtype": "float32", "low": 0, "high": 1}]
QUICK_BENCH = {"batch_sizes": [1], "warmup": 1, "iterations": 5}


@pytest.fixture(scope="module")
def s3_service(tmp_path_factory, own_pg_url, redis_broker, s3_env):
    """API and worker on Postgres, Redis and the S3 endpoint, each with a data directory of its own."""
    api_dir, worker_dir = tmp_path_factory.mktemp("s3-api"), tmp_path_factory.mktemp("s3-worker")
    env = service_env(
        api_dir, own_pg_url, redis_broker, COMPACTOR_MAX_UPLOAD_BYTES=str(512 * MIB), COMPACTOR_REQUEUE_INTERVAL_S="2"
    )
    env.update(s3_env, COMPACTOR_STORAGE_URL=f"{s3_env['COMPACTOR_STORAGE_URL']}/service-{os.getpid()}")
    svc = Service(env, api_dir)
    svc.start_api()
    worker = Service({**env, "COMPACTOR_DATA_DIR": str(worker_dir)}, worker_dir)
    worker.start_worker()
    svc.worker_dir = worker_dir
    yield svc
    worker.stop()
    svc.stop()


@pytest.fixture
def api(s3_service):
    with api_client(s3_service.url) as client:
        yield client


def _service_store(service):
    """The service's object store, as this test process sees it."""
    return s3_store(service.env, service.log_dir / "probe-cache", own_prefix=False)


def _objects(service, area: str) -> list[str]:
    store = _service_store(service)
    return [key.rsplit("/", 1)[-1] for key in store.fs.find(f"{store.prefix}/{area}/")]


def test_a_job_runs_with_its_blobs_only_in_the_object_store(api, s3_service):
    model = upload_model(api, traced_cnn())
    dataset = upload_dataset(api, **digits_arrays(64))
    job = api.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "eval_dataset_id": dataset["id"],
            "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "benchmark": QUICK_BENCH,
        },
    )
    assert job.status_code == 202, job.text
    job = job.json()
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    artifact = api.get(f"/v1/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200
    assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
    torch.jit.load(io.BytesIO(artifact.content))
    assert {model["sha256"], dataset["sha256"], done["artifact"]["sha256"]} <= set(_objects(s3_service, "blobs"))
    # Nothing went through a directory the two share: each has only its own cache.
    assert not (s3_service.log_dir / "blobs").exists() and not (s3_service.worker_dir / "blobs").exists()
    worker_cache = {p.name for p in (s3_service.worker_dir / "cache").rglob("*") if p.is_file()}
    assert {model["sha256"], dataset["sha256"]} <= worker_cache
    assert _objects(s3_service, "tmp") == []


def test_upload_streams_to_the_object_store_with_flat_memory(api, s3_service):
    size = 256 * MIB
    boundary = "compactorboundary"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        chunk = os.urandom(MIB)
        for _ in range(size // MIB):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    process = psutil.Process(s3_service.processes["api"].pid)
    api.get("/v1/models")
    baseline = process.memory_info().rss
    peak = {"rss": baseline}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = api.post(
            "/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    finally:
        done.set()
        sampler.join()
    # Not an archive: refused after all 256 MiB were received, hashed and staged in the store.
    assert response.status_code == 422 and response.json()["code"] == "not_torchscript", response.text
    assert (peak["rss"] - baseline) / MIB < 64, f"API memory grew {(peak['rss'] - baseline) / MIB:.0f} MiB"
    assert _objects(s3_service, "tmp") == []


def test_an_oversized_upload_is_413_and_leaves_no_temp_object(s3_service, tmp_path):
    with second_api(s3_service, tmp_path, COMPACTOR_MAX_UPLOAD_BYTES=str(12 * MIB)) as url, api_client(url) as client:
        content = torchscript_bytes(traced_cnn()) + os.urandom(16 * MIB)
        try:
            response = client.post("/v1/models", files={"file": ("big.pt", content, "application/octet-stream")})
            assert response.status_code == 413, response.text
        except Exception:  # the server may close the connection mid-stream after answering
            pass
    assert _objects(s3_service, "tmp") == []


def test_a_changed_object_is_refused_as_corrupted(api, s3_service):
    model = upload_model(api, traced_cnn())
    store = _service_store(s3_service)
    key = store.key(model["sha256"])
    original = store.fs.cat_file(key)
    store.fs.pipe_file(key, original[:-1] + bytes([original[-1] ^ 1]))
    response = api.get(f"/v1/models/{model['id']}/content")
    assert response.status_code == 500 and response.json()["code"] == "blob_corrupted", response.text
    store.fs.pipe_file(key, original)
    response = api.get(f"/v1/models/{model['id']}/content")
    assert response.status_code == 200 and response.content == original


def test_downloads_redirect_to_a_presigned_url_when_asked(api, s3_service, tmp_path):
    model = upload_model(api, traced_cnn())
    with second_api(s3_service, tmp_path, COMPACTOR_S3_PRESIGN_DOWNLOADS="true") as url, api_client(url) as client:
        response = client.get(f"/v1/models/{model['id']}/content")
        assert response.status_code == 307 and response.headers["etag"] == f'"{model["sha256"]}"'
        assert "X-Amz-Signature=" in response.headers["location"]
        fetched = client.get(response.headers["location"])  # straight from the object store
        assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == model["sha256"]
        assert (
            client.get(f"/v1/models/{model['id']}/content", headers={"If-None-Match": model["sha256"]}).status_code
            == 304
        )

        job = client.post(
            "/v1/jobs",
            json={"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": QUICK_BENCH},
        ).json()
        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        with CompactorClient(url) as compactor:  # follows the redirect, checks the service's ETag
            assert compactor.download_artifact(job["id"], tmp_path / "a.pt") == done["artifact"]["sha256"]


def _stored(store, content: bytes):
    writer = store.writer(max_bytes=1 << 30)
    writer.write(content)
    writer.finish()
    return writer.commit()


def test_the_cache_is_bounded_and_refetches_what_it_evicted(s3_env, tmp_path):
    store = s3_store(s3_env, tmp_path / "cache", cache_max_bytes=int(2.5 * MIB), in_use_s=0)
    blobs = [_stored(store, os.urandom(MIB)) for _ in range(3)]
    for blob in blobs:
        store.verified_path(blob.sha256, blob.size)
    cached = {sha256 for sha256, _ in store.cache.stored()}
    assert cached == {blobs[1].sha256, blobs[2].sha256}  # the least recently used went
    path = store.verified_path(blobs[0].sha256, blobs[0].size)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == blobs[0].sha256
    assert len(list(store.cache.stored())) == 2


def test_a_damaged_cached_copy_is_fetched_again_and_a_wrong_size_refused(s3_env, tmp_path):
    store = s3_store(s3_env, tmp_path / "cache")
    blob = _stored(store, os.urandom(MIB))
    path = store.verified_path(blob.sha256, blob.size)
    path.write_bytes(b"damaged on this host's disk")
    again = store.verified_path(blob.sha256, blob.size)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == blob.sha256
    with pytest.raises(BlobCorrupted):
        store.verified_path(blob.sha256, blob.size - 1)
    with pytest.raises(BlobCorrupted, match="missing"):
        store.verified_path("f" * 64, 10)


def test_an_upload_is_checked_by_range_reads_of_its_staged_object(s3_env, tmp_path):
    from app.inspection import check_torchscript_archive, inspect_dataset
    from tests.service.conftest import npz_bytes

    store = s3_store(s3_env, tmp_path / "cache")
    for content, check in (
        (torchscript_bytes(zoo.trace(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32))), check_torchscript_archive),
        (npz_bytes(input=torch.rand(4, 3).numpy()), inspect_dataset),
    ):
        writer = store.writer(max_bytes=1 << 30)
        writer.write(content)
        writer.finish()
        with writer.open_staged() as staged:
            check(staged, len(content))
        writer.discard()
    assert store.fs.find(f"{store.prefix}/tmp/") == []
