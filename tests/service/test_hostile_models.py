"""Hostile models through the real API and worker: each ends as an invalid model or a failed job with
a code, leaks nothing in any response, and leaves every stored blob's sha256 intact."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import torch

from tests.service import hostile
from tests.service.conftest import traced_cnn, upload_model, wait_for, wait_job

CNN_INPUT = [{"shape": [1, 1, 32, 32], "dtype": "float32", "low": 0, "high": 1}]
ONE_INPUT = [{"shape": [1], "dtype": "float32"}]
QUICK_BENCH = {"batch_sizes": [1], "warmup": 1, "iterations": 5}


def _blobs(service) -> dict[str, str]:
    """Every stored blob: {path: sha256 of its bytes now}."""
    root = service.log_dir / "blobs"
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and "tmp" not in p.relative_to(root).parts
    }


def _intact(blobs: dict[str, str]) -> None:
    for path, digest in blobs.items():
        assert Path(path).name == digest, f"{path} was changed"


def _victim(api, service) -> Path:
    victim = upload_model(api, traced_cnn(), name="victim.pt")
    wait_for(api, f"/v1/models/{victim['id']}", lambda m: m["status"] == "ready")
    sha = victim["sha256"]
    return service.log_dir / "blobs" / sha[:2] / sha[2:4] / sha


def _validated(api, module) -> dict:
    model = upload_model(api, hostile.script(module))
    return wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] in ("ready", "invalid"))


def _failed_job(api, model_id: str, input_spec=ONE_INPUT) -> dict:
    response = api.post(
        "/v1/jobs", json={"model_id": model_id, "input_spec": input_spec, "steps": [], "benchmark": QUICK_BENCH}
    )
    assert response.status_code == 202, response.text
    job = wait_job(api, response.json()["id"])
    assert job["status"] == "failed", job
    return job


def _everything_said(api, model_id: str, job: dict | None = None) -> str:
    """Every response a user can get about the model and the job, as one text."""
    texts = [api.get(f"/v1/models/{model_id}").text, api.get("/v1/models").text]
    if job:
        texts += [api.get(f"/v1/jobs/{job['id']}").text, api.get("/v1/jobs").text]
    return "\n".join(texts)


def test_a_model_reading_files_leaks_nothing(api, service):
    secret = service.log_dir / "secret.env"
    secret.write_text("COMPACTOR_API_KEYS=hunter2hunter2hunter2\n")
    for path, marker in ((secret, "hunter2"), (Path("/etc/passwd"), "root:x:0")):
        model = _validated(api, hostile.FileReader(str(path), 20))
        assert model["status"] == "ready"  # loading it reads nothing; forward does
        job = _failed_job(api, model["id"])
        assert job["error"]["code"] == "model_error"
        assert marker not in _everything_said(api, model["id"], job)


def test_a_model_overwriting_another_tenants_blob_at_load_time_changes_nothing(api, service):
    target = _victim(api, service)
    before = _blobs(service)
    model = _validated(api, hostile.LoadTimeWriter(str(target), 64))
    assert model["status"] == "invalid" and model["error"]["code"] == "model_invalid", model
    _intact(before)
    _intact(_blobs(service))


def test_a_model_overwriting_another_tenants_blob_at_job_time_changes_nothing(api, service):
    target = _victim(api, service)
    before = _blobs(service)
    model = _validated(api, hostile.ForwardWriter(str(target), 64))
    assert model["status"] == "ready"
    job = _failed_job(api, model["id"])
    assert job["error"]["code"] in ("model_error", "interface_changed"), job["error"]
    _intact(before)
    _intact(_blobs(service))


def test_a_model_writing_outside_its_job_leaves_nothing(api, service):
    outside = Path("/tmp") / f"compactor-escape-{uuid.uuid4().hex}"
    planted = service.log_dir / "blobs" / f"planted-{uuid.uuid4().hex}"
    for path in (outside, planted):
        model = _validated(api, hostile.ForwardWriter(str(path), 16))
        assert model["status"] == "ready"
        response = api.post(
            "/v1/jobs", json={"model_id": model["id"], "input_spec": ONE_INPUT, "steps": [], "benchmark": QUICK_BENCH}
        )
        # /tmp inside is the job's own, so writing there may even succeed: it never reaches the host's.
        assert wait_job(api, response.json()["id"])["status"] in ("succeeded", "failed")
        assert not path.exists()


def test_a_models_own_words_are_bounded_and_marked(api):
    model = _validated(api, hostile.Chatty(17))
    job = _failed_job(api, model["id"])
    message = job["error"]["message"]
    assert len(message) < 1000 and "the model's own message (cut to 300 characters)" in message, message
    assert len(api.get(f"/v1/jobs/{job['id']}").content) < 10_000


def test_a_corrupted_blob_is_never_served_or_used(api, service):
    model = upload_model(api, traced_cnn(), name=f"corrupt-{uuid.uuid4().hex}.pt")
    wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] == "ready")
    assert api.get(f"/v1/models/{model['id']}/content").status_code == 200  # verified once, remembered
    sha = model["sha256"]
    path = service.log_dir / "blobs" / sha[:2] / sha[2:4] / sha
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    download = api.get(f"/v1/models/{model['id']}/content")
    assert download.status_code == 500 and download.json()["code"] == "blob_corrupted", download.text
    job = _failed_job(api, model["id"], CNN_INPUT)
    assert job["error"]["code"] == "blob_corrupted", job["error"]


def test_honest_jobs_report_the_sandbox(api):
    model = upload_model(api, traced_cnn())
    response = api.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "input_spec": CNN_INPUT,
            "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "benchmark": QUICK_BENCH,
        },
    )
    job = wait_job(api, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["environment"]["sandbox"]["mode"] == "bubblewrap"
    assert api.get("/readyz").json()["sandbox"] == "on"
    artifact = api.get(f"/v1/jobs/{job['id']}/artifact")
    loaded = torch.jit.load(io.BytesIO(artifact.content))
    assert loaded(torch.rand(1, 1, 32, 32)).shape == (1, 10)


def test_models_that_hoard_memory_or_never_return_fail_and_the_service_stays_ready(api, service):
    """7.7 TB in one allocation, allocation without end (the service fixture caps a job's address space
    at 8 GiB): each a failed job with a code, and the service takes the next job. A model that never
    returns is test_isolation's hang (a job of it would sit out the fixture's 120 s limit)."""
    cases = (
        (hostile.Hoarder(1_920_000_000_000, loop=False), ("out_of_memory",)),
        (hostile.Hoarder(64 * 1024**2, loop=True), ("out_of_memory",)),
    )
    for module, codes in cases:
        model = _validated(api, module)
        assert model["status"] == "ready"
        job = _failed_job(api, model["id"])
        assert job["error"]["code"] in codes, job["error"]
        assert api.get("/readyz").status_code == 200
    honest = upload_model(api, traced_cnn())
    response = api.post(
        "/v1/jobs", json={"model_id": honest["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": QUICK_BENCH}
    )
    assert wait_job(api, response.json()["id"])["status"] == "succeeded"
