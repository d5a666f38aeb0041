"""A client generated from /openapi.json (openapi-python-client) drives upload → job → poll → report
→ download, and reads errors as typed problems. When the document stops generating a usable, typed
client, or stops being valid OpenAPI 3.1, this fails."""

from __future__ import annotations

import hashlib
import importlib
import io
import subprocess
import sys
import time

import httpx
from openapi_spec_validator import validate

from tests.service.conftest import torchscript_bytes, traced_cnn


def _generate(service, tmp_path):
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{service.url}/openapi.json").content)
    out = tmp_path / "compactor_client"
    generator = [
        sys.executable,
        "-m",
        "openapi_python_client",
        "generate",
        "--path",
        str(spec),
        "--output-path",
        str(out),
        "--meta",
        "none",
    ]
    result = subprocess.run(generator, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and (out / "api" / "jobs" / "create_job.py").exists(), result.stdout + result.stderr
    sys.path.insert(0, str(tmp_path))
    return importlib.import_module("compactor_client")


def test_generated_client_runs_a_job(service, tmp_path):
    client_pkg = _generate(service, tmp_path)
    from compactor_client import Client
    from compactor_client.api.jobs import create_job, download_artifact, get_job, get_report
    from compactor_client.api.models import download_model, get_model, upload_model
    from compactor_client.models import JobSpec, ModelRead, Problem, QuantizeStep, UploadModelUploadForm
    from compactor_client.types import File

    assert client_pkg.__name__ == "compactor_client"
    client = Client(base_url=service.url, raise_on_unexpected_status=True)
    content = torchscript_bytes(traced_cnn())
    form = UploadModelUploadForm(
        file=File(payload=io.BytesIO(content), file_name="cnn.pt"), name="from generated client"
    )
    model = upload_model.sync(client=client, body=form)
    assert isinstance(model, ModelRead) and model.name == "from generated client"
    # Errors are typed problems with their code; downloads are the stored bytes.
    missing = get_model.sync(client=client, model_id="00000000-0000-0000-0000-000000000000")
    assert isinstance(missing, Problem) and missing.code == "model_not_found" and missing.status == 404
    assert download_model.sync(client=client, model_id=model.id).payload.read() == content

    spec = JobSpec.from_dict(
        {
            "model_id": model.id,
            "input_spec": [{"shape": [1, 1, 32, 32]}],
            "steps": [QuantizeStep.from_dict({"op": "quantize", "scheme": "fp16"}).to_dict()],
            "benchmark": {"batch_sizes": [1], "warmup": 2, "iterations": 10},
        }
    )
    job = create_job.sync(client=client, body=spec)
    deadline = time.monotonic() + 180
    while job.status.value in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = get_job.sync(client=client, job_id=job.id)
    assert job.status.value == "succeeded", job
    report = get_report.sync(client=client, job_id=job.id)
    # Typed fields, not bare dicts: the generated models know the report's schema.
    assert report.result.parameters == report.baseline.parameters
    assert report.result.latency_ms["1"].p50 > 0
    assert report.summary.size_ratio > 1.5
    artifact = download_artifact.sync(client=client, job_id=job.id).payload.read()
    assert hashlib.sha256(artifact).hexdigest() == job.artifact.sha256 and len(artifact) == job.artifact.size_bytes


def test_the_document_is_valid_openapi_3_1_with_exact_media_types(service):
    document = httpx.get(f"{service.url}/openapi.json").json()
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                media = set(response.get("content", {}))
                # every error is a problem, but the two Starlette answers in plain text and /readyz's report
                if status.startswith(("4", "5")) and media not in (set(), {"text/plain"}) and path != "/readyz":
                    assert media == {"application/problem+json"}, (method, path, status)
                if "application/octet-stream" in media:
                    assert media == {"application/octet-stream"}, (method, path, status)
            if "requestBody" in operation:
                body = next(iter(operation["requestBody"]["content"].values()))
                assert "example" in body or "examples" in body, (method, path)
