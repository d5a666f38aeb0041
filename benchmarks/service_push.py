"""How soon a client hears that a job ended: the event stream and the webhook, against polling.

For each of JOBS small jobs on Postgres + Redis with one worker, three listeners wait at once:
an SSE client on GET /v1/jobs/{id}/events, a webhook receiver (its callback_url), and a client
polling GET /v1/jobs/{id} every POLL_S. Each lag is the time from the job's `finished_at` (written
by the worker) to when that listener learned of it (same host, so one clock). Also the requests
each listener sent. Run: .venv/bin/python benchmarks/service_push.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from _servers import REDIS_URL, Service, postgres_database, service_env, tiny_model_bytes
from httpx_sse import connect_sse

JOBS = 10
POLL_S = 1.0
FINAL = ("succeeded", "failed", "canceled")
LOCK = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    arrivals: dict[str, float] = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.arrivals[body["data"]["id"]] = time.time()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def follow_events(url: str, job_id: str, out: dict) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
            for event in source.iter_sse():
                if event.data and json.loads(event.data)["status"] in FINAL:
                    out[job_id] = time.time()
    with LOCK:
        out["requests"] = out.get("requests", 0) + 1


def poll(url: str, job_id: str, out: dict) -> None:
    requests = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        while True:
            requests += 1
            if client.get(f"/v1/jobs/{job_id}").json()["status"] in FINAL:
                out[job_id] = time.time()
                break
            time.sleep(POLL_S)
    with LOCK:
        out["requests"] = out.get("requests", 0) + requests


def main() -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with postgres_database() as pg, tempfile.TemporaryDirectory() as tmp:
        env = service_env(Path(tmp), pg, f"{REDIS_URL}/6", COMPACTOR_WEBHOOK_ALLOW_PRIVATE="true")
        service = Service(env, Path(tmp))
        service.start_api()
        service.start_worker()
        service.start_notifier()
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                model = client.post("/v1/models", files={"file": ("m.pt", tiny_model_bytes())}).json()
                spec = {
                    "model_id": model["id"],
                    "input_spec": [{"shape": [1, 4]}],
                    "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 5},
                    "callback_url": hook,
                }
                sse, polled, threads, finished = {}, {}, [], {}
                for _ in range(JOBS):
                    job_id = client.post("/v1/jobs", json=spec).json()["id"]
                    for target, out in ((follow_events, sse), (poll, polled)):
                        thread = threading.Thread(target=target, args=(service.url, job_id, out))
                        thread.start()
                        threads.append(thread)
                    finished[job_id] = None
                for thread in threads:
                    thread.join(300)
                deadline = time.time() + 60
                while len(Receiver.arrivals) < JOBS and time.time() < deadline:
                    time.sleep(0.1)
                for job_id in finished:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    finished[job_id] = datetime.fromisoformat(job["finished_at"]).timestamp()
        finally:
            service.stop()
    receiver.shutdown()

    def lags(arrivals: dict) -> str:
        values = [arrivals[j] - finished[j] for j in finished if j in arrivals]
        return (
            f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
            f"over {len(values)}/{len(finished)} jobs"
        )

    print(f"{JOBS} jobs, lag from finished_at to the listener hearing of it:")
    print(f"  event stream (poll interval 0.5 s server-side): {lags(sse)}, {sse['requests']} requests")
    print(f"  webhook:                                         {lags(Receiver.arrivals)}, 1 delivery each")
    print(f"  polling every {POLL_S:g} s:                         {lags(polled)}, {polled['requests']} requests")


if __name__ == "__main__":
    main()
