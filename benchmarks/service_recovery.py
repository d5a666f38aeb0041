"""Failure handling at the default settings (heartbeat timeout 30 s, a sweep every 5 s), on Postgres
and Redis with real worker processes:

1. SIGKILL of a whole worker mid-job (target: the job running again within 40 s), and SIGKILL of
   only the model's process (`killed`, retried at once), over several trials;
2. the broker's messages while 200 jobs wait behind a busy worker for 5 minutes (target: at most
   200 + one per worker; before this change every sweep re-sent every waiting job);
3. optionally (`--burst N`), N small jobs through two workers: completed/s and the longest wait,
   undisturbed and with one worker killed midway.

Run: .venv/bin/python benchmarks/service_recovery.py [--trials 3] [--watch-s 300] [--burst 0]
(`--trials 0` or `--watch-s 0` skips that part).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from _servers import REDIS_URL, Service, postgres_database, service_env

from tests.service.servers import broker_messages, kill_tree, model_process

SPEC = {
    "input_spec": [{"shape": [1, 4], "dtype": "float32"}],
    "steps": [],
    "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 5},
}
FINAL = ("succeeded", "failed", "canceled")


def spinner_bytes(rounds: int) -> bytes:
    import torch

    from tests import zoo

    buffer = io.BytesIO()
    torch.jit.save(zoo.script(zoo.Spinner(rounds)), buffer)
    return buffer.getvalue()


def upload(client: httpx.Client, rounds: int) -> str:
    model = client.post("/v1/models", files={"file": ("m.pt", spinner_bytes(rounds))}).json()
    while client.get(f"/v1/models/{model['id']}").json()["status"] == "validating":
        time.sleep(0.1)
    return model["id"]


def submit(client: httpx.Client, model_id: str) -> str:
    response = client.post("/v1/jobs", json={"model_id": model_id, **SPEC})
    response.raise_for_status()
    return response.json()["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def wait_running(client: httpx.Client, service: Service, job_id: str, keys: list[str]):
    """The key of the worker running the job's model, and that model's process."""
    while job(client, job_id)["status"] != "running":
        time.sleep(0.1)
    while True:
        for key in keys:
            process = model_process(service.processes[key], job_id)
            if process is not None:
                time.sleep(1.0)
                return key, process
        time.sleep(0.1)


def until(predicate, poll: float = 0.1):
    while not (value := predicate()):
        time.sleep(poll)
    return value


def spread(label: str, values: list[float], target: str = "") -> None:
    print(
        f"{label}: median {statistics.median(values):.1f} s, min {min(values):.1f}, max {max(values):.1f}, "
        f"all {[round(v, 1) for v in values]}{target}"
    )


def recovery(tmp: Path, trials: int) -> None:
    with postgres_database() as pg:
        service = Service(service_env(tmp / "recovery", pg, f"{REDIS_URL}/7"), tmp)
        (tmp / "recovery").mkdir()
        service.start_api()
        keys = ["w0", "w1"]
        for key in keys:
            service.start_worker(key=key)
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                model_id = upload(client, 3_000_000)  # seconds per run: still running when killed
                worker_kills, child_kills = [], []
                for trial in range(trials):
                    job_id = submit(client, model_id)
                    key, _ = wait_running(client, service, job_id, keys)
                    kill_tree(service.processes.pop(key).pid)
                    killed = time.monotonic()
                    until(lambda: job(client, job_id)["attempts"] == 2)
                    worker_kills.append(time.monotonic() - killed)
                    replacement = f"w{len(keys) + trial}"
                    keys = [k for k in keys if k != key] + [replacement]
                    service.start_worker(key=replacement)
                    _, process = wait_running(client, service, job_id, keys)
                    process.kill()
                    killed = time.monotonic()
                    until(lambda: job(client, job_id)["attempts"] == 3 and job(client, job_id)["status"] == "running")
                    child_kills.append(time.monotonic() - killed)
                    client.post(f"/v1/jobs/{job_id}/cancel")
                    until(lambda: not any(model_process(service.processes[k], job_id) for k in keys), 0.2)
            spread("SIGKILL of the worker running a job → the job running again", worker_kills, " (target ≤ 40 s)")
            spread("SIGKILL of the job's model process → the job running again", child_kills)
        finally:
            service.stop()


def flood(tmp: Path, watch_s: float) -> None:
    with postgres_database() as pg:
        service = Service(service_env(tmp / "flood", pg, f"{REDIS_URL}/7"), tmp)
        (tmp / "flood").mkdir()
        service.start_api()
        service.start_worker(key="busy")
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                busy_model, tiny_model = upload(client, 3_000_000), upload(client, 10)
                busy = submit(client, busy_model)
                _, process = wait_running(client, service, busy, ["busy"])
                process.suspend()  # busy, beating, and using no CPU
                for _ in range(200):
                    submit(client, tiny_model)
                received_before = service.log("busy").count("received")
                samples, started = [], time.monotonic()
                while time.monotonic() - started < watch_s:
                    samples.append(sum(broker_messages(service)))
                    time.sleep(5)
                received = service.log("busy").count("received") - received_before
            print(
                f"broker messages, 200 jobs waiting behind 1 busy worker for {watch_s:.0f} s "
                f"({len(samples)} samples): max {max(samples)}, min {min(samples)}, last {samples[-1]}; "
                f"tasks the worker received meanwhile: {received} (target ≤ 201)"
            )
        finally:
            kill_tree(service.processes.pop("busy").pid)
            service.stop()


def burst(tmp: Path, jobs: int, kill_midway: bool) -> None:
    label = "one worker killed midway" if kill_midway else "undisturbed"
    with postgres_database() as pg:
        data = tmp / f"burst-{kill_midway}"
        data.mkdir()
        service = Service(service_env(data, pg, f"{REDIS_URL}/7"), tmp)
        service.start_api()
        service.start_worker(key="b0")
        service.start_worker(key="b1")
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                model_id = upload(client, 10)
                started = time.monotonic()
                ids = [submit(client, model_id) for _ in range(jobs)]
                pending, killed = list(ids), False
                while pending:  # jobs finish roughly in order: check the oldest unfinished ones
                    while pending and job(client, pending[0])["status"] in FINAL:
                        pending.pop(0)
                    if kill_midway and not killed and len(pending) <= jobs // 2:
                        kill_tree(service.processes.pop("b1").pid)
                        killed = True
                    time.sleep(0.5)
                elapsed = time.monotonic() - started
                finals = [job(client, i) for i in ids]
            ok = sum(1 for j in finals if j["status"] == "succeeded")
            waits = [
                (datetime.fromisoformat(j["started_at"]) - datetime.fromisoformat(j["created_at"])).total_seconds()
                for j in finals
                if j["started_at"]
            ]
            runs = [
                (datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["started_at"])).total_seconds()
                for j in finals
                if j["started_at"] and j["finished_at"]
            ]
            print(
                f"burst of {jobs} jobs, 2 workers, {label}: {ok} succeeded, {ok / elapsed:.2f} completed/s "
                f"({elapsed:.0f} s), longest wait {max(waits):.1f} s, median wait {statistics.median(waits):.1f} s, "
                f"run per job (last attempt) median {statistics.median(runs):.2f} s, min {min(runs):.2f}, "
                f"max {max(runs):.2f}; attempts > 1: {sum(1 for j in finals if j['attempts'] > 1)}"
            )
        finally:
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--watch-s", type=float, default=300.0)
    parser.add_argument("--burst", type=int, default=0, help="jobs in the burst (0: skip it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.trials:
            recovery(Path(tmp), args.trials)
        if args.watch_s:
            flood(Path(tmp), args.watch_s)
        if args.burst:
            burst(Path(tmp), args.burst, kill_midway=False)
            burst(Path(tmp), args.burst, kill_midway=True)


if __name__ == "__main__":
    main()
