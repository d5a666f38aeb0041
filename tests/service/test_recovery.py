"""Failures a job system must survive, made to happen for real on Postgres, Redis (and the embedded
broker) with worker processes: a model's process killed from outside, the service's own code
failing, a worker killed mid-job, 200 jobs waiting behind a busy worker. Each ends with the words
and the retries the API documents, no duplicate messages, and nothing left on disk or in the broker.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from celery import Celery
from sqlalchemy import create_engine, select, update

from app.models import CompressionJob
from app.queue import CPU, queue_for
from tests import zoo
from tests.service.conftest import upload_model, wait_for, wait_job
from tests.service.servers import (
    ROOT,
    Service,
    api_client,
    broker_messages,
    kill_tree,
    model_process,
    postgres_database,
    service_env,
)

HEARTBEAT_TIMEOUT_S, SWEEP_S = 4.0, 1.0
QUICK_BENCH = {"batch_sizes": [1], "warmup": 1, "iterations": 5}
SPIN_INPUT = [{"shape": [1, 4], "dtype": "float32"}]


@contextmanager
def _service(tmp_path: Path, broker: str, **settings: str) -> Iterator[Service]:
    """An API on a database of its own (no other test's sweeper sees its jobs), with short
    recovery settings; workers are started by the test."""
    with postgres_database() as pg_url:
        env = service_env(
            tmp_path,
            pg_url,
            broker,
            COMPACTOR_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
            COMPACTOR_REQUEUE_INTERVAL_S=str(SWEEP_S),
            COMPACTOR_JOB_TIME_LIMIT_S="120",
            **settings,
        )
        service = Service(env, tmp_path)
        service.pg_url = pg_url
        try:
            service.start_api()
            yield service
        finally:
            for process in list(service.processes.values()):
                kill_tree(process.pid)  # a stopped or spinning job would hold a graceful stop up
            service.stop()


def _broker(kind: str, redis_broker: str, tmp_path: Path) -> str:
    return redis_broker if kind == "redis" else f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"


def _running_model(api, job_id: str, workers: list[subprocess.Popen]) -> tuple[subprocess.Popen, psutil.Process]:
    """Wait until the job's model runs; the worker running it and the model's process."""
    wait_for(api, f"/v1/jobs/{job_id}", lambda j: j["status"] == "running", timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for worker in workers:
            model = model_process(worker, job_id)
            if model is not None:
                time.sleep(0.5)  # into the model's code, past start-up
                return worker, model
        time.sleep(0.1)
    raise AssertionError("no worker started the job's model")


def _spinner_job(api, rounds: int = 200_000) -> str:
    model = upload_model(api, zoo.script(zoo.Spinner(rounds)), name="spinner.pt")
    wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] == "ready")
    return _submit(api, model["id"])


def _submit(api, model_id: str) -> str:
    response = api.post(
        "/v1/jobs", json={"model_id": model_id, "input_spec": SPIN_INPUT, "steps": [], "benchmark": QUICK_BENCH}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _leftovers(service: Service) -> list[str]:
    work = service.log_dir / "work"
    return sorted(p.name for p in work.iterdir()) if work.exists() else []


def _eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def _dead_attempt_dir(work_dir: Path) -> Path:
    """A job directory whose attempt was SIGKILLed (made by a process that then died)."""
    code = (
        "import sys, os, signal; from pathlib import Path; from worker.sandbox import JobDir, Sandbox; "
        "job = JobDir.create(Path(sys.argv[1]), 'job-dead-', Sandbox(False)); print(job.root, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    made = subprocess.run([sys.executable, "-c", code, str(work_dir)], cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == -signal.SIGKILL, made.stderr
    return Path(made.stdout.strip())


def test_a_model_process_killed_from_outside_is_retried_and_a_starting_worker_clears_dead_attempts(
    tmp_path, redis_broker
):
    with _service(tmp_path, redis_broker) as service, api_client(service.url) as api:
        dead = _dead_attempt_dir(tmp_path / "work")
        worker = service.start_worker()
        _eventually(lambda: not dead.exists())
        assert not dead.exists(), "a starting worker leaves a dead attempt's directory"
        job_id = _spinner_job(api)
        _, model = _running_model(api, job_id, [worker])
        model.kill()  # no memory limit is set: nothing says it ran out of memory
        job = wait_job(api, job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job
        assert "killed" in service.log("worker") and "SIGKILL" in service.log("worker")
        assert _eventually(lambda: _leftovers(service) == []), _leftovers(service)


def test_the_services_own_error_is_retried_once_then_fails_as_internal_error_logged_with_the_job_id(
    tmp_path, redis_broker
):
    with _service(tmp_path, redis_broker) as service, api_client(service.url) as api:
        model = upload_model(api, zoo.script(zoo.Spinner(10)))
        job_id = _submit(api, model["id"])
        engine = create_engine(service.pg_url)
        with engine.begin() as db:  # a stored spec the service's own code cannot read: its bug, not the model's
            spec = db.scalar(select(CompressionJob.spec).where(CompressionJob.id == job_id))
            db.execute(update(CompressionJob).where(CompressionJob.id == job_id).values(spec={**spec, "benchmark": 7}))
        service.start_worker()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.connect() as db:
                status, error, attempts = db.execute(
                    select(CompressionJob.status, CompressionJob.error, CompressionJob.attempts).where(
                        CompressionJob.id == job_id
                    )
                ).one()
            if status == "failed":
                break
            time.sleep(0.3)
        engine.dispose()
        assert (status, error["code"], attempts) == ("failed", "internal_error", 2), (status, error, attempts)
        assert "not your model" in error["message"] and "Traceback" not in error["message"]
        log = service.log("worker")
        assert f"job {job_id}: internal error" in log and "Traceback" in log and "AttributeError" in log


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_a_worker_killed_mid_job_is_replaced_within_the_heartbeat_timeout_leaving_nothing_behind(
    tmp_path, redis_broker, broker
):
    with _service(tmp_path, _broker(broker, redis_broker, tmp_path)) as service, api_client(service.url) as api:
        workers = [service.start_worker(key="w1"), service.start_worker(key="w2")]
        job_id = _spinner_job(api, rounds=400_000)
        holder, _ = _running_model(api, job_id, workers)
        kill_tree(holder.pid)
        killed_at = time.monotonic()
        wait_for(api, f"/v1/jobs/{job_id}", lambda j: j["attempts"] == 2, timeout=60)
        recovered_in = time.monotonic() - killed_at
        # Within the timeout and one sweep, plus the slack of a loaded test machine.
        assert recovered_in < HEARTBEAT_TIMEOUT_S + SWEEP_S + 10, recovered_in
        job = wait_job(api, job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job
        assert _eventually(lambda: _leftovers(service) == []), _leftovers(service)
        assert _eventually(lambda: broker_messages(service) == (0, 0)), broker_messages(service)


def test_a_job_whose_worker_dies_on_its_last_attempt_fails_as_worker_lost(tmp_path, redis_broker):
    with _service(tmp_path, redis_broker, COMPACTOR_MAX_ATTEMPTS="1") as service, api_client(service.url) as api:
        workers = [service.start_worker(key="w1"), service.start_worker(key="w2")]
        job_id = _spinner_job(api, rounds=400_000)
        holder, _ = _running_model(api, job_id, workers)
        kill_tree(holder.pid)
        job = wait_job(api, job_id, timeout=HEARTBEAT_TIMEOUT_S + SWEEP_S + 30)
        assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "worker_lost", 1), job
        assert _eventually(lambda: _leftovers(service) == []), _leftovers(service)
        assert _eventually(lambda: broker_messages(service) == (0, 0)), broker_messages(service)


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_a_recovered_job_goes_ahead_of_jobs_waiting_in_the_queue(tmp_path, redis_broker, broker):
    with _service(tmp_path, _broker(broker, redis_broker, tmp_path)) as service, api_client(service.url) as api:
        model = upload_model(api, zoo.script(zoo.Spinner(10)))
        waiting, recovered = _submit(api, model["id"]), _submit(api, model["id"])
        # As the sweeper sends a job that ran before: to the recovery queue (here after both are queued).
        sender = Celery(broker=service.env["COMPACTOR_BROKER_URL"])
        recovery = queue_for(CPU, recovery=True, base=service.env["COMPACTOR_QUEUE_NAME"])
        sender.send_task("compactor.run_job", args=[recovered], queue=recovery)
        service.start_worker()
        first, second = wait_job(api, recovered), wait_job(api, waiting)
        assert first["status"] == second["status"] == "succeeded", (first, second)
        assert first["started_at"] < second["started_at"], (first["started_at"], second["started_at"])


def test_jobs_waiting_behind_a_busy_worker_are_never_sent_twice(tmp_path, redis_broker):
    with _service(tmp_path, redis_broker, COMPACTOR_REQUEUE_AFTER_S="1") as service, api_client(service.url) as api:
        worker = service.start_worker()
        busy = _spinner_job(api, rounds=400_000)
        _, model = _running_model(api, busy, [worker])
        model.suspend()  # the worker stays busy (and beating) without taking a CPU
        tiny = upload_model(api, zoo.script(zoo.Spinner(10)))["id"]
        for _ in range(200):
            _submit(api, tiny)
        counts = []
        for _ in range(int(6 * HEARTBEAT_TIMEOUT_S / SWEEP_S)):  # many sweeps, past the heartbeat timeout
            counts.append(broker_messages(service))
            time.sleep(SWEEP_S)
        # Waiting: the 200 jobs and the tiny model's validation, once each; held: the busy job's.
        assert set(counts) == {(201, 1)}, counts
        assert api.get(f"/v1/jobs/{busy}").json()["status"] == "running"


def test_only_dead_attempts_directories_are_removed(tmp_path):
    from worker.sandbox import JobDir, Sandbox, remove_abandoned

    dead = _dead_attempt_dir(tmp_path)
    live = JobDir.create(tmp_path, "job-live-", Sandbox(False))
    try:
        assert remove_abandoned(tmp_path) == [dead]
        assert live.root.exists() and not dead.exists()
    finally:
        live.remove()
    assert remove_abandoned(tmp_path) == [] and list(tmp_path.iterdir()) == []


TWO_PRUNES = [
    {"op": "prune", "structure": "unstructured", "amount": 0.3},
    {"op": "prune", "structure": "unstructured", "amount": 0.6},
]


def _pipeline(api, model_id: str, steps: list[dict], **spec) -> str:
    response = api.post(
        "/v1/jobs",
        json={"model_id": model_id, "input_spec": SPIN_INPUT, "steps": steps, "benchmark": QUICK_BENCH, **spec},
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _steps_run(service: Service, job_id: str) -> list[int]:
    """The steps of a job that ran to completion, each time one did (the worker logs every step's
    output it stores: a step run twice is logged twice)."""
    log = service.log_text("worker")
    return [step for step in range(1, 10) for _ in range(log.count(f"job {job_id}: step {step} of "))]


def _load_artifact(api, job_id: str, tmp_path: Path):
    import torch

    path = tmp_path / f"{job_id}.pt"
    path.write_bytes(api.get(f"/v1/jobs/{job_id}/artifact").content)
    return torch.jit.load(str(path))


def test_a_job_killed_in_its_second_step_resumes_after_the_first_and_other_jobs_reuse_it_within_a_tenant(
    tmp_path, redis_broker
):
    import torch

    keys = '["acme:key-a", "globex:key-b"]'
    with _service(tmp_path, redis_broker, COMPACTOR_API_KEYS=keys) as service:
        acme = api_client(service.url, headers={"Authorization": "Bearer key-a"})
        globex = api_client(service.url, headers={"Authorization": "Bearer key-b"})
        with acme, globex:
            worker = service.start_worker()
            slow = zoo.script(zoo.SlowCheck(2_000_000))  # a few seconds per step's check
            model = upload_model(acme, slow)["id"]
            wait_for(acme, f"/v1/models/{model}", lambda m: m["status"] == "ready")
            job_id = _pipeline(acme, model, TWO_PRUNES)
            wait_for(acme, f"/v1/jobs/{job_id}", lambda j: j["progress"]["step_index"] == 1, timeout=120)
            process = model_process(worker, job_id)
            assert process is not None and _steps_run(service, job_id) == [1]
            process.kill()  # in step 2: the job is retried (`killed`) and must not run step 1 again

            job = wait_job(acme, job_id)
            assert (job["status"], job["attempts"]) == ("succeeded", 2), job
            assert _steps_run(service, job_id) == [1, 2], "step 1 ran again after the kill"
            report = acme.get(f"/v1/jobs/{job_id}/report").json()
            assert [s["reused_from"] for s in report["stages"]] == [job_id, None]
            assert report["stages"][0]["details"]["seconds"] > 0 and "metrics" in report["stages"][0]
            assert any("resumed after step 1 of 2" in note for note in report["notes"]), report["notes"]
            # Measured inside the sandbox by probes forked from the job's clean copy.
            assert all(report[m]["peak_memory_bytes"] for m in ("baseline", "result")), report["notes"]
            artifact = _load_artifact(acme, job_id, tmp_path)
            weight = dict(artifact.named_parameters())["linear.weight"]
            assert (weight == 0).float().mean().item() >= 0.6  # both prunes are in what was stored

            # The same first step, then another: the first is reused from the job above.
            quantized = [TWO_PRUNES[0], {"op": "quantize", "scheme": "dynamic_int8"}]
            shared = wait_job(acme, _pipeline(acme, model, quantized))
            assert shared["status"] == "succeeded", shared
            assert _steps_run(service, shared["id"]) == [2]
            shared_report = acme.get(f"/v1/jobs/{shared['id']}/report").json()
            assert [s["reused_from"] for s in shared_report["stages"]] == [job_id, None]
            assert any(f"stored outputs of job {job_id}" in n for n in shared_report["notes"])

            # The same job again (a replayed trial): no step runs, the stored last step is the artifact.
            replay = wait_job(acme, _pipeline(acme, model, TWO_PRUNES))
            assert replay["status"] == "succeeded" and _steps_run(service, replay["id"]) == [], replay
            replay_report = acme.get(f"/v1/jobs/{replay['id']}/report").json()
            assert [s["reused_from"] for s in replay_report["stages"]] == [job_id, job_id]
            assert replay["artifact"]["sha256"] == job["artifact"]["sha256"]

            # Asked not to: every step runs.
            fresh = wait_job(acme, _pipeline(acme, model, TWO_PRUNES, reuse_checkpoints=False))
            assert fresh["status"] == "succeeded" and _steps_run(service, fresh["id"]) == [1, 2]

            # The same bytes and steps for another tenant: nothing of acme's is seen.
            other = upload_model(globex, slow)["id"]
            wait_for(globex, f"/v1/models/{other}", lambda m: m["status"] == "ready")
            theirs = wait_job(globex, _pipeline(globex, other, TWO_PRUNES))
            assert theirs["status"] == "succeeded" and _steps_run(service, theirs["id"]) == [1, 2]
            their_report = globex.get(f"/v1/jobs/{theirs['id']}/report").json()
            assert [s["reused_from"] for s in their_report["stages"]] == [None, None]
            assert torch.equal(
                dict(_load_artifact(globex, theirs["id"], tmp_path).named_parameters())["linear.weight"], weight
            ), "a resumed run computes what an uninterrupted one does"
