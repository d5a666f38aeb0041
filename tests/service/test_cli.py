"""The `compactor` client CLI, run as a user runs it (subprocesses) against a real `compactor serve`
in its embedded mode; and the client's reading of problem+json, unit by unit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest
import torch

from app.client import CompactorClient, DownloadMismatch, ProblemError
from tests import exported, zoo
from tests.service.servers import ROOT, free_port, stop_process, wait_until_up


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`compactor serve` on SQLite and local files; yields the environment the CLI runs with."""
    tmp = tmp_path_factory.mktemp("cli-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    log = open(tmp / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**env, "COMPACTOR_DATA_DIR": str(tmp / "var"), "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", serve, tmp / "serve.log")
        yield {**env, "COMPACTOR_URL": f"http://127.0.0.1:{port}"}
    finally:
        stop_process(serve)
        log.close()


def compactor(env: dict, *args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_upload_submit_wait_report_download(server, tmp_path):
    original = zoo.trace(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32))
    torch.jit.save(original, str(tmp_path / "model.pt"))
    x, y, _, _ = zoo.digits()
    np.savez(tmp_path / "digits.npz", input=x[:32].numpy(), label=y[:32].numpy())

    model_id = _ok(compactor(server, "models", "upload", str(tmp_path / "model.pt"), "--name", "cnn", "--wait")).strip()
    dataset = json.loads(_ok(compactor(server, "datasets", "upload", str(tmp_path / "digits.npz"), "--json")))
    assert dataset["num_samples"] == 32
    spec = {
        "model_id": model_id,
        "eval_dataset_id": dataset["id"],
        "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
        "benchmark": {"batch_sizes": [1], "warmup": 2, "iterations": 10},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    submitted = compactor(server, "jobs", "submit", str(tmp_path / "spec.json"), "--wait")
    job_id = _ok(submitted).strip()
    assert f"job {job_id} succeeded" in submitted.stderr and "100%" in submitted.stderr, submitted.stderr
    job = json.loads(_ok(compactor(server, "jobs", "get", job_id, "--json")))
    assert job["status"] == "succeeded"
    waited = compactor(server, "jobs", "wait", job_id)
    assert waited.returncode == 0 and f"job {job_id} succeeded" in waited.stderr, waited.stderr

    figures = _ok(compactor(server, "jobs", "report", job_id))
    assert "× smaller" in figures and "at batch 1" in figures, figures
    assert "lossless floor 1.00× at batch 1 (baseline plain)" in figures and "beyond floor" in figures, figures
    report = json.loads(_ok(compactor(server, "jobs", "report", job_id, "--json")))
    assert report["job_id"] == job_id and figures.splitlines()[0] == report["summary"]["headline"]
    _ok(compactor(server, "jobs", "report", job_id, "--html", "-o", str(tmp_path / "report.html")))
    assert "<html" in (tmp_path / "report.html").read_text().lower()

    _ok(compactor(server, "jobs", "download", job_id, "-o", str(tmp_path / "compressed.pt")))
    assert hashlib.sha256((tmp_path / "compressed.pt").read_bytes()).hexdigest() == job["artifact"]["sha256"]
    compressed = torch.jit.load(str(tmp_path / "compressed.pt"))
    with torch.inference_mode():
        assert torch.nn.functional.cosine_similarity(compressed(x[:8]), original(x[:8])).min() > 0.99


def test_a_torch_export_archive_uploads_and_an_unconvertible_one_exits_with_its_code(server, tmp_path):
    (tmp_path / "cnn.pt2").write_bytes(exported.exported_cnn())
    (tmp_path / "branching.pt2").write_bytes(exported.exported_branching())

    model = json.loads(_ok(compactor(server, "models", "upload", str(tmp_path / "cnn.pt2"), "--wait", "--json")))
    assert model["status"] == "ready" and model["format"] == "torch.export" and model["name"] == "cnn.pt2"
    refused = compactor(server, "models", "upload", str(tmp_path / "branching.pt2"), "--wait")
    assert refused.returncode == 1 and refused.stderr.startswith("export_not_traceable: "), refused.stderr


def test_refusals_and_failures_exit_non_zero_with_their_code(server, tmp_path):
    bad_spec = {"model_id": "missing", "steps": [{"op": "quantize", "scheme": "int3"}]}
    refused = compactor(server, "jobs", "submit", "-", stdin=json.dumps(bad_spec))
    assert refused.returncode == 1 and refused.stderr.startswith("validation_failed: "), refused.stderr
    assert "steps.0" in refused.stderr, refused.stderr
    missing = compactor(server, "jobs", "get", "no-such-job")
    assert missing.returncode == 1 and missing.stderr.startswith("job_not_found: "), missing.stderr

    # A zip that passes the upload's checks but that torch.jit.load refuses.
    buffer = io.BytesIO()
    torch.jit.save(zoo.trace(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32)), buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(tmp_path / "broken.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, b"\x80garbage" if info.filename.endswith("data.pkl") else src.read(info))
    uploaded = compactor(server, "models", "upload", str(tmp_path / "broken.pt"), "--wait")
    assert uploaded.returncode == 1 and "model_invalid: " in uploaded.stderr, uploaded.stderr
    spec = {
        "model_id": uploaded.stdout.strip(),
        "input_spec": [{"shape": [1, 1, 32, 32]}],
        "steps": [{"op": "quantize", "scheme": "fp16"}],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    failed = compactor(server, "jobs", "submit", str(tmp_path / "spec.json"), "--wait")
    assert failed.returncode == 1 and "failed: model_invalid: " in failed.stderr, failed.stderr
    not_yet = compactor(server, "jobs", "report", failed.stdout.strip())
    assert not_yet.returncode == 1 and not_yet.stderr.startswith("job_not_succeeded: "), not_yet.stderr

    unreachable = compactor(server, "jobs", "get", "any", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2 and "cannot reach the Compactor server" in unreachable.stderr


def _mock(handler) -> CompactorClient:
    return CompactorClient("http://compactor.test", "secret", transport=httpx.MockTransport(handler))


def test_a_problem_document_becomes_a_problem_error_with_its_code():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer secret"
        return httpx.Response(
            404,
            headers={"content-type": "application/problem+json"},
            json={
                "type": "https://compactor.dev/problems/not_found",
                "title": "Not found",
                "status": 404,
                "detail": "job abc not found",
                "code": "not_found",
            },
        )

    with pytest.raises(ProblemError) as raised, _mock(handler) as client:
        client.get_job("abc")
    assert (raised.value.status, raised.value.code, raised.value.detail) == (404, "not_found", "job abc not found")


def test_a_download_that_does_not_match_its_sha256_is_not_kept(tmp_path):
    content = b"the artifact"
    sha256 = hashlib.sha256(content).hexdigest()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifact"):
            return httpx.Response(200, content=content + b" tampered", headers={"etag": f'"{sha256}"'})
        return httpx.Response(200, json={"id": "j", "artifact": {"size_bytes": len(content), "sha256": sha256}})

    with pytest.raises(DownloadMismatch), _mock(handler) as client:
        client.download_artifact("j", tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_waiting_resumes_a_broken_event_stream_from_the_last_event_id():
    seen_last_ids = []

    class Broken(httpx.SyncByteStream):
        def __iter__(self):
            yield b'id: 4\nevent: job\ndata: {"status": "running", "progress": {"percent": 40.0}}\n\n'
            raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            seen_last_ids.append(request.headers.get("last-event-id"))
            if len(seen_last_ids) == 1:
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken())
            final = b'id: 9\nevent: job\ndata: {"status": "succeeded", "progress": {"percent": 100.0}}\n\n'
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=final)
        return httpx.Response(200, json={"id": "j", "status": "succeeded"})

    updates = []
    with _mock(handler) as client:
        job = client.wait_for_job("j", on_update=updates.append)

    assert job["status"] == "succeeded"
    assert seen_last_ids == [None, "4"]
    assert [u["status"] for u in updates] == ["running", "succeeded"]
