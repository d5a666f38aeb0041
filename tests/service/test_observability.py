"""What an operator sees: /metrics parsed by prometheus_client's own parser, with a job's counters
moving (on the API and on the worker that ran it), and the multiprocess mode adding up several API
processes; JSON log lines that carry one request's id from the API into the worker's lines for its job."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.migrate import upgrade
from tests.service.conftest import traced_cnn, upload_model, wait_job
from tests.service.servers import Service, api_client, free_port, service_env

CNN_INPUT = [{"shape": [1, 1, 32, 32], "dtype": "float32", "low": 0, "high": 1}]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def observed(tmp_path_factory, own_pg_url, redis_broker):
    """API and worker on Postgres and Redis, logging JSON lines, the worker serving its own /metrics."""
    data_dir = tmp_path_factory.mktemp("observed")
    worker_port = free_port()
    env = service_env(
        data_dir,
        own_pg_url,
        redis_broker,
        COMPACTOR_WORKER_METRICS_PORT=str(worker_port),
        COMPACTOR_LOG_FORMAT="json",
    )
    svc = Service(env, data_dir)
    svc.start_api()
    svc.start_worker()
    svc.worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
    yield svc
    svc.stop()


def test_metrics_show_a_jobs_counters_move(observed):
    api_before = scrape(f"{observed.url}/metrics")
    with api_client(observed.url) as api:
        model = upload_model(api, traced_cnn())
        bench = {"batch_sizes": [1], "warmup": 1, "iterations": 5}
        job = api.post(
            "/v1/jobs", json={"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": bench}
        ).json()
        done = wait_job(api, job["id"])
        assert done["status"] == "succeeded", done
    api_after = scrape(f"{observed.url}/metrics")
    worker_after = scrape(observed.worker_metrics)

    def moved(name: str, **labels: str) -> float:
        return value(api_after, name, **labels) - value(api_before, name, **labels)

    assert moved("compactor_upload_bytes_total", kind="model") == model["size_bytes"]
    assert moved("compactor_http_requests_total", method="POST", route="/v1/jobs", status="202") == 1
    assert moved("compactor_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") >= 1
    assert moved("compactor_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}") >= 1
    assert moved("compactor_jobs", status="succeeded") == 1
    prefix = observed.env["COMPACTOR_QUEUE_NAME"]
    for kind in ("cpu", "cuda"):
        assert ("compactor_queue_depth", (("queue", f"{prefix}.{kind}"),)) in api_after
    assert value(api_after, "compactor_workers_alive") >= 1  # this module's worker at least
    # The worker that ran it counted it, with its duration.
    assert value(worker_after, "compactor_jobs_finished_total", op="profile", outcome="succeeded") == 1
    assert value(worker_after, "compactor_job_duration_seconds_count", op="profile", outcome="succeeded") == 1
    assert value(worker_after, "compactor_job_duration_seconds_sum", op="profile", outcome="succeeded") > 0


def test_several_api_processes_add_up_in_multiprocess_mode(tmp_path, own_pg_url, redis_broker):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = service_env(tmp_path, own_pg_url, redis_broker, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    upgrade(own_pg_url)  # before: two processes migrating one new database at once would race
    svc = Service(env, tmp_path)
    svc.start_api(workers=2)
    try:
        for _ in range(30):  # a new connection each time, so both processes answer some
            assert httpx.get(f"{svc.url}/v1/models", timeout=10).status_code == 200
        samples = scrape(f"{svc.url}/metrics")
    finally:
        svc.stop()
    assert value(samples, "compactor_http_requests_total", method="GET", route="/v1/models", status="200") == 30
    writers = {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
    assert len(writers) == 2, writers


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # e.g. Celery's start-up banner, printed, not logged
        if isinstance(record, dict):
            lines.append(record)
    return lines


def test_one_requests_id_is_in_the_apis_and_the_workers_log_lines(observed):
    request_id = f"test-{uuid.uuid4().hex}"
    with api_client(observed.url) as api:
        model = upload_model(api, traced_cnn())
        bench = {"batch_sizes": [1], "warmup": 1, "iterations": 5}
        response = api.post(
            "/v1/jobs",
            json={"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": bench},
            headers={"X-Request-ID": request_id},
        )
        assert response.status_code == 202 and response.headers["x-request-id"] == request_id
        job_id = response.json()["id"]
        assert wait_job(api, job_id)["status"] == "succeeded"
        made = api.get("/healthz").headers["x-request-id"]  # none sent: one is made
        assert made and made != request_id
        refused = api.get("/healthz", headers={"X-Request-ID": "no spaces or\tcontrol characters"})
        assert refused.headers["x-request-id"] != "no spaces or\tcontrol characters"

    api_lines = [line for line in json_lines(observed.log_text("api")) if line.get("request_id") == request_id]
    assert {line["logger"] for line in api_lines} >= {"compactor.access", "app.services.jobs"}
    assert all(line["tenant"] == "default" for line in api_lines)
    assert any(line.get("job_id") == job_id for line in api_lines)
    access = next(line for line in api_lines if line["logger"] == "compactor.access")
    assert access["route"] == "/v1/jobs" and access["status"] == 202 and access["duration_ms"] > 0

    worker_lines = [line for line in json_lines(observed.log_text("worker")) if line.get("request_id") == request_id]
    assert worker_lines and all(line["job_id"] == job_id for line in worker_lines)
    assert any("finished: succeeded" in line["message"] for line in worker_lines)
