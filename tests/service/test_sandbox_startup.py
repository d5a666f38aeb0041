"""A worker that cannot sandbox refuses to start and says why; with COMPACTOR_SANDBOX=off it runs
models unsandboxed and /readyz and the report say so."""

from __future__ import annotations

import subprocess
import uuid

from tests.service.conftest import traced_cnn, upload_model, wait_job
from tests.service.servers import Service, api_client, postgres_database, service_env

NO_BWRAP_PATH = "/nonexistent"  # bubblewrap cannot be found, as on a host without the package


def test_a_worker_that_cannot_sandbox_refuses_to_start(service, tmp_path):
    env = {**service.env, "PATH": NO_BWRAP_PATH, "COMPACTOR_QUEUE_NAME": f"test-{uuid.uuid4().hex[:8]}"}
    worker = Service(env, tmp_path)
    worker.start_worker()
    try:
        exit_code = worker.processes["worker"].wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker kept running without a sandbox: " + worker.log("worker")) from None
    finally:
        worker.stop()
    log = worker.log("worker")
    assert exit_code != 0, log
    assert "the model sandbox cannot start" in log and "bubblewrap (bwrap) is not installed" in log, log


def test_sandbox_off_is_shown_in_readyz_and_the_report(service, tmp_path):
    # A database of its own: the shared service's sweeper would otherwise pick the job up, sandboxed.
    with postgres_database() as database_url:
        env = {
            **service_env(tmp_path, database_url, service.env["COMPACTOR_BROKER_URL"]),
            "PATH": NO_BWRAP_PATH,
            "COMPACTOR_SANDBOX": "off",
        }
        unsandboxed = Service(env, tmp_path)
        unsandboxed.start_api()
        unsandboxed.start_worker()
        try:
            _unsandboxed_job_is_shown(unsandboxed)
        finally:
            unsandboxed.stop()


def _unsandboxed_job_is_shown(unsandboxed: Service) -> None:
    with api_client(unsandboxed.url) as api:
        assert api.get("/readyz").json()["sandbox"] == "off"
        model = upload_model(api, traced_cnn())
        response = api.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "input_spec": [{"shape": [1, 1, 32, 32], "dtype": "float32"}],
                "steps": [],
                "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 5},
            },
        )
        job = wait_job(api, response.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        report = api.get(f"/v1/jobs/{job['id']}/report").json()
        assert report["environment"]["sandbox"]["mode"] == "off"
        assert any("unsandboxed" in note for note in report["notes"])
        assert "unsandboxed" in api.get(f"/v1/jobs/{job['id']}/report.html").text
