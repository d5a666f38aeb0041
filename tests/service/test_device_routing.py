"""Device routing: a job that asks for cuda waits in the cuda queue, saying so, while only CPU workers
run; it is taken as soon as a worker that serves cuda appears. This machine has no GPU, so the GPU
worker is simulated by declaring its device (COMPACTOR_WORKER_DEVICE=cuda): it takes the job, and
the job then fails in the runner for want of a real device, which shows where it ran."""

from __future__ import annotations

import pytest

from tests.service.conftest import traced_cnn, upload_model, wait_for, wait_job
from tests.service.servers import Service, api_client, service_env

CNN_INPUT = [{"shape": [1, 1, 32, 32], "dtype": "float32", "low": 0, "high": 1}]


def _job(api, device: str) -> dict:
    model = upload_model(api, traced_cnn())
    bench = {"device": device, "batch_sizes": [1], "warmup": 1, "iterations": 5}
    response = api.post(
        "/v1/jobs", json={"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": bench}
    )
    assert response.status_code == 202, response.text
    return response.json()


@pytest.mark.slow
def test_a_cuda_job_waits_for_a_gpu_worker_and_runs_when_one_appears(tmp_path, own_pg_url, redis_broker):
    env = service_env(tmp_path, own_pg_url, redis_broker, COMPACTOR_REQUEUE_INTERVAL_S="2")
    service = Service({**env, "COMPACTOR_WORKER_DEVICE": "cpu"}, tmp_path)
    service.start_api()
    service.start_worker()
    gpu_dir = tmp_path / "gpu-host"
    gpu_dir.mkdir()
    gpu_worker = Service({**env, "COMPACTOR_WORKER_DEVICE": "cuda"}, gpu_dir)
    try:
        with api_client(service.url) as api:
            cuda_job = _job(api, "cuda")
            assert cuda_job["status"] == "queued"
            assert "waiting for a GPU worker" in cuda_job["progress"]["message"]
            # A CPU job sent after it runs to the end: the CPU worker is up and leaves the cuda job alone.
            cpu_job = _job(api, "cpu")
            assert wait_job(api, cpu_job["id"])["status"] == "succeeded"
            waiting = api.get(f"/v1/jobs/{cuda_job['id']}").json()
            assert waiting["status"] == "queued" and waiting["attempts"] == 0
            assert "waiting for a GPU worker" in waiting["progress"]["message"]

            gpu_worker.start_worker()
            wait_for(api, f"/v1/jobs/{cuda_job['id']}", lambda j: j["attempts"] == 1, timeout=120)
            done = wait_job(api, cuda_job["id"])
            assert done["status"] == "failed" and done["error"]["code"] == "device_unavailable", done
    finally:
        gpu_worker.stop()
        service.stop()
    assert "serving cpu work" in service.log("worker") and "serving cuda work" in gpu_worker.log("worker")
