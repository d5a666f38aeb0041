"""Accuracy-aware searches end to end: the real API, two Celery workers and the notifier on
Postgres and Redis, a small CNN trained here on the digits, trials run as real jobs.

Small on purpose (few trials, five timed iterations): the suite runs on a 2-core host.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from tests import zoo
from tests.service.conftest import upload_dataset, upload_model, wait_for, wait_job
from tests.service.servers import Service, api_client, kill_tree, service_env
from tests.service.test_cli import compactor

pytestmark = pytest.mark.slow

BENCH = {"warmup": 1, "iterations": 5}
FINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def service(tmp_path_factory, own_pg_url, redis_broker):
    data_dir = tmp_path_factory.mktemp("search")
    env = service_env(
        data_dir,
        own_pg_url,
        redis_broker,
        COMPACTOR_JOB_TIME_LIMIT_S="300",
        COMPACTOR_REQUEUE_INTERVAL_S="1",
        COMPACTOR_HEARTBEAT_TIMEOUT_S="4",
        COMPACTOR_MEASURE_EXTRA_TIME_S="0",
    )
    svc = Service(env, data_dir)
    svc.start_api()
    svc.start_worker(key="w1")
    svc.start_worker(key="w2")
    svc.start_notifier()
    yield svc
    for process in list(svc.processes.values()):
        kill_tree(process.pid)
    svc.stop()


@pytest.fixture(scope="module")
def api(service):
    with api_client(service.url) as client:
        yield client


@pytest.fixture(scope="module")
def digits_setup(api):
    """A small CNN trained on the digits (about 95 % on the held-out split), and its data."""
    x, y, x_test, y_test = zoo.digits()
    model = zoo.train_classifier(zoo.SequentialCNN(width=8), x, y, epochs=3)
    traced = zoo.trace(model, x[:2])
    uploaded = upload_model(api, traced, name="digits.pt")
    ready = wait_for(api, f"/v1/models/{uploaded['id']}", lambda m: m["status"] == "ready", timeout=120)
    # What a search's default space is proposed from (app.services.search_space.resolve_space).
    assert ready["summary"]["layers"]["Conv2d"] == 2 and ready["summary"]["layers"]["Linear"] == 2
    calibration = upload_dataset(api, input=x[:256].numpy(), label=y[:256].numpy())
    evaluation = upload_dataset(api, input=x_test.numpy(), label=y_test.numpy())
    return {
        "model_id": uploaded["id"],
        "calibration_dataset_id": calibration["id"],
        "eval_dataset_id": evaluation["id"],
        "accuracy": zoo.accuracy(model, x_test, y_test),
        "x_test": x_test,
        "y_test": y_test,
    }


def _spec(setup: dict, **overrides) -> dict:
    spec = {
        "model_id": setup["model_id"],
        "calibration_dataset_id": setup["calibration_dataset_id"],
        "eval_dataset_id": setup["eval_dataset_id"],
        "constraints": {"max_accuracy_drop": 0.03},
        "objective": {"metric": "latency", "batch_size": 8},
        "space": {"prune_amounts": [0.5], "distill": False, "quantize_schemes": ["dynamic_int8"]},
        "budget": {"max_trials": 4, "parallel": 2, "time_limit_s": 600},
        "benchmark": BENCH,
    }
    spec.update(overrides)
    return spec


def _create(api, spec: dict, **headers) -> dict:
    response = api.post("/v1/searches", json=spec, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def _wait(api, search_id: str, timeout: float = 420) -> dict:
    return wait_for(api, f"/v1/searches/{search_id}", lambda s: s["status"] in FINAL, timeout=timeout)


def _load(content: bytes) -> torch.jit.ScriptModule:
    return torch.jit.load(io.BytesIO(content))


def test_a_search_finds_a_pick_on_its_front_that_holds_on_the_reloaded_artifact_and_every_trial_replays(
    api, digits_setup
):
    spec = _spec(digits_setup, name="digits search")
    created = _create(api, spec, **{"Idempotency-Key": "digits-search-1"})
    again = api.post("/v1/searches", json=spec, headers={"Idempotency-Key": "digits-search-1"})
    assert again.status_code == 202 and again.json()["id"] == created["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    search = _wait(api, created["id"])
    assert search["status"] == "succeeded", search
    assert search["feasible"] is True
    report = api.get(f"/v1/searches/{created['id']}/report").json()

    explored = [t for t in report["trials"] if t["role"] != "verify"]
    # The lossless floor (compile only) was measured first, and is a point of the report.
    assert explored[0]["role"] == "floor" and explored[0]["steps"] == [{"op": "compile"}]
    assert report["lossless_floor"] == explored[0]["number"]
    # A parent (prune 0.5 → compile) ran before the child extending it (prune 0.5 → int8 → compile).
    numbers = {(t["params"]["prune"], t["params"]["quantize"]): t["number"] for t in explored}
    assert numbers[(0.5, "none")] < numbers[(0.5, "dynamic_int8")]
    for trial in explored:
        if trial["status"] == "succeeded":
            assert set(trial["figures"]) >= {"accuracy", "latency_ms", "size_bytes", "macs", "speedup"}
            # The cheap proxy: a trial whose accuracy pass already misses the limit is not timed.
            missed = trial["violations"]["quality"] > 0
            assert bool(trial["stopped_early"]) == missed, trial
            assert (trial["figures"]["latency_ms"] is None) == missed, trial
    assert search["progress"]["trials_not_timed"] == sum(1 for t in explored if t["stopped_early"])
    # A trial times only the baseline it pairs with and its result: the floor trial has the floor.
    for trial in explored:
        if trial["status"] == "succeeded" and trial["role"] != "floor" and not trial["stopped_early"]:
            job_report = api.get(f"/v1/jobs/{trial['job_id']}/report").json()
            assert job_report.get("baseline_compiled") is None, trial["steps"]
            assert all(stage["metrics"]["latency_ms"] == {} for stage in job_report["stages"][:-1])
            assert job_report["result"]["latency_ms"]["8"]["p50"] > 0
    pick = report["pick"]
    assert pick["number"] in report["front"] and pick["on_front"]
    limit = spec["constraints"]["max_accuracy_drop"]
    assert pick["figures"]["accuracy_drop"] <= limit + 1e-9
    # Every feasible trial's objective is no better than the pick's: it is the best one.
    feasible = [t for t in explored if t["feasible"]]
    assert min(t["figures"]["speedup"] for t in feasible) >= 0 and pick["figures"]["speedup"] == max(
        t["figures"]["speedup"] for t in feasible
    )
    # Re-checked by a job of its own on the artifact loaded from its file (in the sandbox).
    check = pick["check"]
    assert check["holds"] is True and abs(check["accuracy"] - pick["figures"]["accuracy"]) < 1e-9
    # Checks may start early, on the best trial so far, while other trials run (one whose trial
    # was beaten meanwhile is canceled): the last one checked the pick.
    verify = [t for t in report["trials"] if t["role"] == "verify"]
    assert verify and verify[-1]["status"] == "succeeded" and verify[-1]["checks"] == pick["number"]
    assert all(t["status"] in ("succeeded", "canceled") for t in verify)

    download = api.get(f"/v1/searches/{created['id']}/artifact")
    assert download.status_code == 200
    artifact = _load(download.content)
    accuracy = zoo.accuracy(artifact, digits_setup["x_test"], digits_setup["y_test"])
    assert abs(accuracy - pick["figures"]["accuracy"]) < 1e-6
    assert digits_setup["accuracy"] - accuracy <= limit + 1e-9

    # Every trial's spec is a plain job spec: replayed, it measures the same figures.
    for trial in explored:
        if trial["status"] != "succeeded":
            continue
        replay = api.post("/v1/jobs", json=trial["job_spec"])
        assert replay.status_code == 202, replay.text
        job = wait_job(api, replay.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
        assert job["spec"]["steps"] == trial["job_spec"]["steps"]
        replayed = api.get(f"/v1/jobs/{job['id']}/report").json()
        result = replayed["result"]
        figures = trial["figures"]
        assert abs(result["accuracy"]["top1"] - figures["accuracy"]) < 1e-6, trial["steps"]
        assert abs(result["size_bytes"] - figures["size_bytes"]) <= 0.02 * figures["size_bytes"]
        assert result["macs"] == figures["macs"]
        assert bool(replayed["summary"]["stopped_early"]) == bool(trial["stopped_early"])
        if trial["stopped_early"]:
            continue
        # Speed within noise: the speed-up paired with the baseline in each job (what the search
        # ranks by). A figure its job marked noisy (threads waiting for a CPU more than 10 % of the
        # time: this host is shared) is no measurement to hold another to.
        original = api.get(f"/v1/jobs/{trial['job_id']}/report").json()
        noisy = any(
            report["result"]["latency_ms"]["8"]["noisy"] or report["baseline"]["latency_ms"]["8"]["noisy"]
            for report in (original, replayed)
        )
        if not noisy:
            ratio = replayed["summary"]["speedup"]["8"] / figures["speedup"]
            assert 0.33 < ratio < 3, (trial["steps"], figures, replayed["summary"]["speedup"], result["latency_ms"])

    page = api.get(f"/v1/searches/{created['id']}/report.html")
    assert page.status_code == 200 and "<svg" in page.text and "pick-ring" in page.text
    for trial in explored:
        if trial["job_id"]:
            assert f"/v1/jobs/{trial['job_id']}/report.html" in page.text
    listed = api.get("/v1/searches", params={"limit": 1}).json()
    assert listed["items"][0]["id"] == created["id"]


def test_an_infeasible_search_succeeds_with_feasible_false_and_the_closest_candidates_artifact(api, digits_setup):
    spec = _spec(
        digits_setup,
        constraints={"max_accuracy_drop": 0.0, "max_size_bytes": 1},
        space={"prune_amounts": [], "quantize_schemes": ["dynamic_int8"]},
        budget={"max_trials": 2, "parallel": 2, "time_limit_s": 600},
    )
    search = _wait(api, _create(api, spec)["id"])
    assert (search["status"], search["feasible"]) == ("succeeded", False), search
    report = api.get(f"/v1/searches/{search['id']}/report").json()
    assert report["pick"] is None and report["closest"] is not None
    assert report["closest"]["violations"]["size"] > 0
    download = api.get(f"/v1/searches/{search['id']}/artifact")
    assert download.status_code == 200
    _load(download.content)
    job = api.get(f"/v1/jobs/{report['closest']['job_id']}").json()
    assert job["artifact"]["sha256"] == download.headers["ETag"].strip('"')


def test_canceling_a_search_cancels_every_trial_and_queues_no_more(api, digits_setup):
    spec = _spec(
        digits_setup,
        space={
            "prune_amounts": [0.25, 0.5],
            "distill": True,
            "distill_epochs": 3,
            "quantize_schemes": ["dynamic_int8"],
        },
        budget={"max_trials": 12, "parallel": 3, "time_limit_s": 600},
    )
    created = _create(api, spec)
    running = wait_for(
        api, f"/v1/searches/{created['id']}", lambda s: s["progress"]["trials_running"] >= 2, timeout=120
    )
    # Progress: trials done of planned: the budget (12), or the candidates when fewer (10 here).
    assert running["progress"]["trials_planned"] == 10 and running["progress"]["stage"] == "exploring"
    canceled = api.post(f"/v1/searches/{created['id']}/cancel").json()
    assert canceled["status"] == "canceled"
    time.sleep(4)  # several sweeps and any advance in flight
    report = api.get(f"/v1/searches/{created['id']}/report").json()
    job_ids = [t["job_id"] for t in report["trials"] if t["job_id"]]
    jobs = [api.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
    assert jobs and all(job["status"] in FINAL for job in jobs), [j["status"] for j in jobs]
    assert any(job["status"] == "canceled" for job in jobs)
    # Nothing was queued after the cancel: the search's own jobs are all there is.
    queued = api.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    running = api.get("/v1/jobs", params={"status": "running"}).json()["items"]
    assert not {j["id"] for j in queued + running} & set(job_ids)
    assert api.get(f"/v1/searches/{created['id']}").json()["status"] == "canceled"


def test_a_worker_killed_mid_search_does_not_lose_the_search(service, api, digits_setup):
    # A limit no drop can miss (100 points), so that no candidate is stopped early and the child of
    # a prefix runs too.
    spec = _spec(
        digits_setup,
        constraints={"max_accuracy_drop": 1.0},
        budget={"max_trials": 4, "parallel": 2, "time_limit_s": 600},
    )
    created = _create(api, spec)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        running = api.get("/v1/jobs", params={"status": "running"}).json()["items"]
        nodes = {job["worker"].split("@")[0] for job in running if job["worker"]}
        # A job names its worker's node (`test-<id>@host`); each worker's log starts with its own.
        victim = next((key for key in ("w1", "w2") if any(n in service.log_text(key) for n in nodes)), None)
        time.sleep(0.2)
    assert victim is not None, "no trial started"
    kill_tree(service.processes.pop(victim).pid)
    search = _wait(api, created["id"])
    assert search["status"] == "succeeded", search
    report = api.get(f"/v1/searches/{created['id']}/report").json()
    explored = [t for t in report["trials"] if t["role"] != "verify"]
    assert all(t["status"] in ("succeeded", "pruned") for t in explored), [(t["status"], t["error"]) for t in explored]
    assert any(api.get(f"/v1/jobs/{t['job_id']}").json()["attempts"] == 2 for t in explored)
    # The prefix ran first, and its child reused the prefix's stored step instead of pruning again.
    # The child's prune step is not run again: it comes from an earlier job that ran the same step on
    # the same model and data (an earlier trial, a distilled sibling, or an earlier search's trial).
    children = [t for t in explored if t["params"]["prune"] > 0 and t["params"]["quantize"] != "none"]
    assert children, [t["params"] for t in explored]
    for child in children:
        assert child["status"] == "succeeded", [(t["params"], t["pruned"], t["figures"]) for t in explored]
        job = api.get(f"/v1/jobs/{child['job_id']}").json()
        stages = api.get(f"/v1/jobs/{child['job_id']}/report").json()["stages"]
        assert stages[0]["op"] == "prune" and stages[0].get("reused_from"), stages[0]
        source = api.get(f"/v1/jobs/{stages[0]['reused_from']}").json()
        assert source["spec"]["steps"][0] == job["spec"]["steps"][0], (source["spec"], job["spec"])
    service.start_worker(key=victim)


def test_a_search_is_refused_with_problem_json_naming_the_field(api, digits_setup):
    spec = _spec(digits_setup, constraints={"max_latency_ms": 5})
    response = api.post("/v1/searches", json=spec)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert any("max_accuracy_drop" in str(e["loc"]) for e in response.json()["errors"])
    missing = api.get("/v1/searches/does-not-exist")
    assert missing.status_code == 404 and missing.json()["code"] == "search_not_found"
    early = api.post("/v1/searches", json=_spec(digits_setup, budget={"max_trials": 1, "parallel": 1}))
    conflict = api.get(f"/v1/searches/{early.json()['id']}/artifact")
    assert conflict.status_code == 409 and conflict.json()["code"] == "search_not_succeeded"
    api.post(f"/v1/searches/{early.json()['id']}/cancel")


def test_the_cli_creates_waits_reports_and_downloads_a_search(service, api, digits_setup, tmp_path):
    spec_file = tmp_path / "search.json"
    spec_file.write_text(
        json.dumps(
            _spec(
                digits_setup,
                space={"prune_amounts": [], "quantize_schemes": ["dynamic_int8"]},
                budget={"max_trials": 2, "parallel": 2},
            )
        )
    )
    env = {**service.env, "COMPACTOR_URL": service.url}
    created = compactor(env, "searches", "create", str(spec_file), "--wait")
    assert created.returncode == 0, created.stderr
    search_id = created.stdout.strip()
    assert "trials" in created.stderr and "succeeded" in created.stderr
    shown = compactor(env, "searches", "get", search_id)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "pick: trial" in shown.stdout
    table = compactor(env, "searches", "report", search_id)
    assert table.returncode == 0 and "compile" in table.stdout and "*" in table.stdout
    saved = compactor(env, "searches", "artifact", search_id, "-o", str(tmp_path / "pick.pt"))
    assert saved.returncode == 0, saved.stderr
    torch.jit.load(str(tmp_path / "pick.pt"))
    page = compactor(env, "searches", "report", search_id, "--html", "-o", str(tmp_path / "search.html"))
    assert page.returncode == 0 and "<svg" in (tmp_path / "search.html").read_text()
    missing = compactor(env, "searches", "get", "nope")
    assert missing.returncode == 1 and "search_not_found" in missing.stderr
