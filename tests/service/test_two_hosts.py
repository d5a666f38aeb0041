"""Two hosts, simulated: the API and two workers, each with a data directory of its own (no shared
volume), on Postgres, Redis and the S3 endpoint. The worker running a job is killed mid-job and the
other one finishes it."""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from tests.service.conftest import digits_arrays, traced_cnn, upload_dataset, upload_model, wait_for, wait_job
from tests.service.servers import Service, api_client, service_env

# Long enough to be killed mid-job: the benchmark alone takes some seconds here.
SLOW_BENCH = {"batch_sizes": [1, 8], "warmup": 10, "iterations": 300}


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_is_finished_by_the_other_host(tmp_path, own_pg_url, redis_broker, s3_env):
    hosts = {name: tmp_path / name for name in ("api", "worker-a", "worker-b")}
    for directory in hosts.values():
        directory.mkdir()
    env = service_env(hosts["api"], own_pg_url, redis_broker, COMPACTOR_REQUEUE_INTERVAL_S="2", **s3_env)
    env["COMPACTOR_STORAGE_URL"] += f"/two-hosts-{os.getpid()}"
    api_host = Service(env, hosts["api"])
    workers = {
        name: Service({**env, "COMPACTOR_DATA_DIR": str(hosts[name])}, hosts[name]) for name in hosts if name != "api"
    }
    api_host.start_api()
    try:
        workers["worker-a"].start_worker()
        with api_client(api_host.url) as api:
            model = upload_model(api, traced_cnn())
            dataset = upload_dataset(api, **digits_arrays(64))
            response = api.post(
                "/v1/jobs",
                json={
                    "model_id": model["id"],
                    "eval_dataset_id": dataset["id"],
                    "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
                    "benchmark": SLOW_BENCH,
                },
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            wait_for(api, f"/v1/jobs/{job_id}", lambda j: j["status"] == "running" and j["progress"]["percent"] > 0)

            workers["worker-b"].start_worker()
            os.kill(workers["worker-a"].processes.pop("worker").pid, signal.SIGKILL)  # the host goes away

            # The other host's sweeper finds the stale heartbeat, re-queues the job, and runs it.
            done = wait_job(api, job_id, timeout=420)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 2
            artifact = api.get(f"/v1/jobs/{job_id}/artifact")
            assert hashlib.sha256(artifact.content).hexdigest() == done["artifact"]["sha256"]
    finally:
        for service in (*workers.values(), api_host):
            service.stop()
    # Each host held only its own cache; the blobs went through the object store alone.
    assert all(not (directory / "blobs").exists() for directory in hosts.values())
    cached_b = {p.name for p in (hosts["worker-b"] / "cache").rglob("*") if p.is_file()}
    assert {model["sha256"], dataset["sha256"]} <= cached_b
