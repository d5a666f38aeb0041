"""Who runs a job: two workers on one host, on Redis, each listed by GET /v1/workers with its node
name, process, device and queues, and a job recording the node name of the one that ran it."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta

import httpx

from app.queue import CPU, queues_served
from tests.service.conftest import second_api, traced_cnn, upload_model, wait_job
from tests.service.servers import Service

QUICK = {"batch_sizes": [1], "warmup": 1, "iterations": 5}


def _workers(api, count: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        listed = api.get("/v1/workers").json()
        if len(listed["workers"]) == count or time.monotonic() > deadline:
            return listed["workers"]
        time.sleep(0.5)


def test_live_workers_are_listed_and_a_job_names_the_one_that_ran_it(api, service, tmp_path):
    other = Service(service.env, tmp_path)
    other.start_worker()
    try:
        workers = _workers(api, 2)
        assert len(workers) == 2, workers
        assert len({w["name"] for w in workers}) == 2
        assert {w["pid"] for w in workers} == {service.processes["worker"].pid, other.processes["worker"].pid}
        for worker in workers:
            assert worker["host"] == socket.gethostname() and worker["name"].endswith(f"@{socket.gethostname()}")
            assert sorted(worker["queues"]) == sorted(queues_served(CPU, base=service.env["COMPACTOR_QUEUE_NAME"]))
            assert worker["device"] == "auto" and worker["concurrency"] == 1
            heartbeat = datetime.fromisoformat(worker["last_heartbeat"])
            assert datetime.now(UTC) - heartbeat < timedelta(seconds=30)

        model = upload_model(api, traced_cnn())
        job = api.post(
            "/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 1, 32, 32]}], "benchmark": QUICK}
        ).json()
        assert job["worker"] is None
        done = wait_job(api, job["id"])
        assert done["status"] == "succeeded", done
        assert done["worker"] in {w["name"] for w in workers}
    finally:
        other.stop()

    # a stopped worker no longer answers, so it is no longer listed
    assert [w["pid"] for w in _workers(api, 1)] == [service.processes["worker"].pid]


def test_listing_workers_without_a_broker_is_a_503_naming_it(service, tmp_path):
    with second_api(service, tmp_path, COMPACTOR_BROKER_URL="redis://127.0.0.1:1/0") as url:
        started = time.monotonic()
        response = httpx.get(f"{url}/v1/workers", timeout=60)

    assert response.status_code == 503 and response.json()["code"] == "broker_unavailable", response.text
    assert time.monotonic() - started < 30
