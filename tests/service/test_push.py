"""Push instead of poll: a job's Server-Sent Events read by a real client, and signed webhooks
received by a real HTTP server started here (retries and the SSRF refusal included)."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from httpx_sse import connect_sse
from standardwebhooks.webhooks import Webhook

from tests.service.conftest import second_api, traced_cnn, upload_model, wait_for, wait_job
from tests.service.servers import api_client

CNN_INPUT = [{"shape": [1, 1, 32, 32]}]
QUICK_BENCH = {"batch_sizes": [1], "warmup": 2, "iterations": 10}


def _submit(api, model_id: str, **spec) -> dict:
    body = {"model_id": model_id, "input_spec": CNN_INPUT, "benchmark": QUICK_BENCH, **spec}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _events(api, job_id: str, last_event_id: str | None = None) -> list:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(api, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=180) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        # Returns once the server ends the stream. httpx-sse yields the keep-alive pings as
        # events without data, which the SSE spec (and every browser) does not dispatch.
        return [event for event in source.iter_sse() if event.data]


@pytest.fixture(scope="module")
def cnn(service):
    with api_client(service.url) as api:
        return upload_model(api, traced_cnn())


def test_events_follow_a_whole_job_and_resume_from_last_event_id(api, cnn):
    job = _submit(api, cnn["id"], steps=[{"op": "quantize", "scheme": "fp16"}])

    events = _events(api, job["id"])

    states = [json.loads(event.data) for event in events]
    assert [event.event for event in events] == ["job"] * len(events)
    revisions = [int(event.id) for event in events]
    assert revisions == sorted(set(revisions)) and revisions == [s["revision"] for s in states]
    assert states[-1]["status"] == "succeeded" and states[-1]["progress"]["percent"] == 100.0
    assert all(s["status"] in ("queued", "running") for s in states[:-1])
    assert any(s["status"] == "running" and s["progress"]["stage"] not in ("queued", "starting") for s in states), (
        states
    )
    assert api.get(f"/v1/jobs/{job['id']}").json()["revision"] == revisions[-1]

    # Resumed after the first event: only the newest state, which is final, then the end.
    resumed = _events(api, job["id"], last_event_id=events[0].id)
    assert [int(e.id) for e in resumed] == [revisions[-1]]
    # Resumed at the final event: nothing more to say.
    assert _events(api, job["id"], last_event_id=events[-1].id) == []


def test_events_of_an_unknown_job_are_a_404_problem(api):
    response = api.get("/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "job_not_found"


class _Receiver(BaseHTTPRequestHandler):
    """Records every POST; answers each path's scripted failures first, then 200."""

    received: list[dict] = []
    failures: dict[str, list[int]] = defaultdict(list)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        self.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
        script = self.failures[self.path]
        self.send_response(script.pop(0) if script else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _received(path: str) -> list[dict]:
    return [r for r in _Receiver.received if r["path"] == path]


def _delivered(api, job_id: str) -> dict:
    job = wait_for(api, f"/v1/jobs/{job_id}", lambda j: j["webhooks"] and j["webhooks"][0]["status"] != "pending", 60)
    return job


def test_one_verified_delivery_per_final_state(api, cnn, receiver):
    secret = api.get("/v1/webhooks/secret").json()["secret"]
    succeeded = _submit(api, cnn["id"], steps=[{"op": "quantize", "scheme": "fp16"}], callback_url=f"{receiver}/ok")
    failed = _submit(  # the model cannot take this input: model_error
        api, cnn["id"], input_spec=[{"shape": [1, 3, 7, 7]}], callback_url=f"{receiver}/failed"
    )
    canceled = _submit(api, cnn["id"], callback_url=f"{receiver}/canceled")
    api.post(f"/v1/jobs/{canceled['id']}/cancel")

    for job, path, status in (
        (succeeded, "/ok", "succeeded"),
        (failed, "/failed", "failed"),
        (canceled, "/canceled", "canceled"),
    ):
        assert wait_job(api, job["id"])["status"] == status
        shown = _delivered(api, job["id"])["webhooks"]
        assert len(shown) == 1 and shown[0]["status"] == "delivered", shown
        assert [a["status_code"] for a in shown[0]["attempts"]] == [200]
        time.sleep(1.5)  # a duplicate would arrive by now
        (delivery,) = _received(path)
        payload = Webhook(secret).verify(delivery["body"], delivery["headers"])
        assert payload["type"] == f"job.{status}" and payload["data"]["id"] == job["id"]
        assert payload["data"]["status"] == status
        assert delivery["headers"]["webhook-id"] == f"msg_{shown[0]['id']}"
    assert payload_of(_received("/ok")[0], secret)["data"]["artifact"]["sha256"]
    assert payload_of(_received("/failed")[0], secret)["data"]["error"]["code"] == "model_error"


def payload_of(delivery: dict, secret: str) -> dict:
    return Webhook(secret).verify(delivery["body"], delivery["headers"])


def test_a_receiver_that_fails_twice_still_gets_it_and_every_attempt_shows(api, cnn, receiver):
    _Receiver.failures["/flaky"] = [503, 500]
    secret = api.get("/v1/webhooks/secret").json()["secret"]
    job = _submit(api, cnn["id"], steps=[], callback_url=f"{receiver}/flaky")

    wait_job(api, job["id"])
    (delivery,) = _delivered(api, job["id"])["webhooks"]

    assert delivery["status"] == "delivered"
    assert [a["status_code"] for a in delivery["attempts"]] == [503, 500, 200]
    attempts = _received("/flaky")
    assert len(attempts) == 3
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1  # one message, retried
    for attempt in attempts:  # each attempt is signed on its own
        assert payload_of(attempt, secret)["data"]["id"] == job["id"]


def test_a_rotated_secret_signs_what_follows(api, cnn, receiver):
    old = api.get("/v1/webhooks/secret").json()["secret"]
    new = api.post("/v1/webhooks/secret/rotate").json()["secret"]
    assert new != old and api.get("/v1/webhooks/secret").json()["secret"] == new
    job = _submit(api, cnn["id"], steps=[], callback_url=f"{receiver}/rotated")
    wait_job(api, job["id"])
    _delivered(api, job["id"])
    (delivery,) = _received("/rotated")
    assert payload_of(delivery, new)["data"]["id"] == job["id"]
    with pytest.raises(Exception, match="No matching signature"):
        payload_of(delivery, old)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "file:///etc/passwd",
    ],
)
def test_a_private_callback_url_is_refused_with_422(service, cnn, tmp_path, url):
    with second_api(service, tmp_path, COMPACTOR_WEBHOOK_ALLOW_PRIVATE="false") as strict_url:
        with api_client(strict_url) as strict:
            before = len(strict.get("/v1/jobs", params={"limit": 500}).json()["items"])
            response = strict.post(
                "/v1/jobs", json={"model_id": cnn["id"], "input_spec": CNN_INPUT, "steps": [], "callback_url": url}
            )
            after = len(strict.get("/v1/jobs", params={"limit": 500}).json()["items"])

    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "callback_url_refused" and problem["errors"][0]["loc"] == ["body", "callback_url"]
    assert after == before  # nothing was stored
