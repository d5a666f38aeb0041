"""Jobs through the HTTP API with a real worker: submission rules, idempotency, cancel, failures
that say why, and the end-to-end quantize path with its artifact and report."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from tests import zoo
from tests.service.conftest import (
    digits_arrays,
    scripted_loop_if,
    second_api,
    torchscript_bytes,
    traced_cnn,
    upload_dataset,
    upload_model,
    wait_for,
    wait_job,
)
from tests.service.servers import api_client

CNN_INPUT = [{"shape": [1, 1, 32, 32], "dtype": "float32", "low": 0, "high": 1}]
QUICK_BENCH = {"batch_sizes": [1, 8], "warmup": 2, "iterations": 10}


def _job(api, **spec) -> dict:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def test_spec_with_wrong_field_is_422_naming_it(api):
    model = upload_model(api, traced_cnn())
    response = api.post(
        "/v1/jobs",
        json={"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [{"op": "quantize", "schme": "fp16"}]},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_failed"
    assert any("schme" in [str(p) for p in e["loc"]] for e in body["errors"]), body


def test_spec_refusals_say_why(api):
    model = upload_model(api, traced_cnn())
    base = {"model_id": model["id"], "input_spec": CNN_INPUT}
    # (spec, where the error points, code): references are checked by the service, combinations
    # of fields by the schema; both are a 422 at submission, never a job that fails later.
    cases = [
        ({**base, "model_id": "missing"}, ["model_id"], "invalid_job_spec"),
        ({**base, "calibration_dataset_id": "nope", "steps": []}, ["calibration_dataset_id"], "invalid_job_spec"),
        ({"model_id": model["id"]}, ["input_spec"], "validation_failed"),
        (
            {**base, "steps": [{"op": "quantize", "scheme": "static_int8"}]},
            ["calibration_dataset_id"],
            "validation_failed",
        ),
        (
            {**base, "steps": [{"op": "prune", "structure": "unstructured", "criterion": "bn_scale"}]},
            ["steps", 0, "prune", "criterion"],
            "validation_failed",
        ),
        (
            {**base, "steps": [{"op": "prune", "structure": "n:m", "n": 4, "m": 2}]},
            ["steps", 0, "prune", "n"],
            "validation_failed",
        ),
        (
            {**base, "steps": [{"op": "quantize", "scheme": "bf16", "exclude": ["fc*"]}]},
            ["steps", 0, "quantize", "exclude"],
            "validation_failed",
        ),
        # 7.7 TB of synthetic input once allocated: past COMPACTOR_MAX_INPUT_ELEMENTS (2**24) per input,
        ({**base, "input_spec": [{"shape": [1, 3, 100000, 100000]}]}, ["input_spec", 0, "shape"], "invalid_job_spec"),
        # and three inputs of 12M elements, each allowed, past COMPACTOR_MAX_INPUT_ELEMENTS_TOTAL (2**25)
        ({**base, "input_spec": [{"shape": [1, 4000, 3000]}] * 3}, ["input_spec"], "invalid_job_spec"),
    ]
    for spec, loc, code in cases:
        response = api.post("/v1/jobs", json=spec)
        assert response.status_code == 422, (spec, response.text)
        body = response.json()
        assert body["code"] == code, body
        assert [e["loc"] for e in body["errors"]] == [["body", *loc]], body


def test_idempotency_key(api):
    model = upload_model(api, traced_cnn())
    spec = {"model_id": model["id"], "input_spec": CNN_INPUT, "steps": [], "benchmark": QUICK_BENCH}
    first = api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"k-{model['id']}"})
    again = api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"k-{model['id']}"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = api.post("/v1/jobs", json={**spec, "name": "different"}, headers={"Idempotency-Key": f"k-{model['id']}"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    wait_job(api, first.json()["id"])


def test_job_on_invalid_model_fails_with_the_models_reason(api):
    content = torchscript_bytes(traced_cnn())
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, b"\x80garbage" if info.filename.endswith("data.pkl") else src.read(info))
    model = upload_model(api, buffer.getvalue())
    job = _job(api, model_id=model["id"], input_spec=CNN_INPUT, steps=[{"op": "quantize", "scheme": "fp16"}])
    done = wait_job(api, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "model_invalid", done
    assert "torch.jit.load" in done["error"]["message"]
    assert api.get(f"/v1/jobs/{job['id']}/report").status_code == 409


def test_model_that_does_not_match_inputs_fails_with_reason(api):
    model = upload_model(api, traced_cnn())
    job = _job(api, model_id=model["id"], input_spec=[{"shape": [1, 3, 7, 7]}], steps=[], benchmark=QUICK_BENCH)
    done = wait_job(api, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "model_error", done
    assert done["error"]["message"]


def test_cancel_queued_and_finished(api):
    model = upload_model(api, traced_cnn())
    job = _job(
        api,
        model_id=model["id"],
        input_spec=CNN_INPUT,
        steps=[],
        benchmark={"batch_sizes": [1, 64], "warmup": 5, "iterations": 2000},
    )
    canceled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    final = wait_job(api, job["id"])
    assert final["status"] == "canceled"
    again = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert again["status"] == "canceled" and again["finished_at"] == final["finished_at"]


def test_cancel_running_job_stops_it(api):
    model = upload_model(api, traced_cnn())
    job = _job(
        api,
        model_id=model["id"],
        input_spec=CNN_INPUT,
        steps=[],
        benchmark={"batch_sizes": [64], "warmup": 5, "iterations": 100000},
    )
    wait_for(
        api, f"/v1/jobs/{job['id']}", lambda j: j["status"] == "running" and j["progress"]["stage"] == "benchmark", 120
    )
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    # The worker kills the job's process and is free for the next job at once.
    follow = _job(api, model_id=model["id"], input_spec=CNN_INPUT, steps=[], benchmark=QUICK_BENCH)
    final = wait_job(api, follow["id"], 120)
    assert final["status"] == "succeeded", final["error"]
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"


def test_list_jobs_filters(api):
    model = upload_model(api, traced_cnn())
    job = _job(api, model_id=model["id"], input_spec=CNN_INPUT, steps=[], benchmark=QUICK_BENCH)
    wait_job(api, job["id"])
    listed = api.get("/v1/jobs", params={"model_id": model["id"]}).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert api.get("/v1/jobs", params={"model_id": model["id"], "status": "failed"}).json()["items"] == []


def _check_metrics(metrics: dict, batch_sizes: list[int]) -> None:
    assert metrics["size_bytes"] > 0 and metrics["parameters"] > 0
    assert 0 <= metrics["nonzero_parameters"] <= metrics["parameters"]
    for b in map(str, batch_sizes):
        stats = metrics["latency_ms"][b]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
        assert metrics["throughput_per_s"][b] > 0


@pytest.mark.parametrize(
    "factory,scheme",
    [
        (traced_cnn, "dynamic_int8"),
        (traced_cnn, "fp16"),
        (scripted_loop_if, "dynamic_int8"),
        (scripted_loop_if, "fp16"),
    ],
)
def test_quantize_end_to_end(api, factory, scheme):
    original = factory()
    model = upload_model(api, original)
    x, y, _, _ = zoo.digits()
    dataset = upload_dataset(api, **digits_arrays(64))
    job = _job(
        api,
        model_id=model["id"],
        eval_dataset_id=dataset["id"],
        steps=[{"op": "quantize", "scheme": scheme}],
        benchmark=QUICK_BENCH,
    )
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["percent"] == 100.0 and done["attempts"] == 1

    artifact = api.get(f"/v1/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200 and len(artifact.content) == done["artifact"]["size_bytes"]
    assert artifact.headers["etag"] == f'"{done["artifact"]["sha256"]}"'
    compressed = torch.jit.load(io.BytesIO(artifact.content))
    with torch.inference_mode():
        expected, got = original(x[:16]), compressed(x[:16])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() > 0.99

    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["job_id"] == job["id"] and report["spec"]["steps"][0]["scheme"] == scheme
    _check_metrics(report["baseline"], [1, 8])
    _check_metrics(report["result"], [1, 8])
    assert report["result"]["size_bytes"] == len(artifact.content)
    assert report["baseline"]["fidelity"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert report["result"]["fidelity"]["cosine_min"] > 0.99
    assert report["result"]["fidelity"]["top1_agreement"] > 0.9
    assert 0 <= report["result"]["accuracy"]["top1"] <= 1
    assert set(report["summary"]["speedup"]) == {"1", "8"}
    assert report["summary"]["size_ratio"] == pytest.approx(
        report["baseline"]["size_bytes"] / len(artifact.content), rel=1e-3
    )
    assert [s["op"] for s in report["stages"]] == ["quantize"]
    assert report["environment"]["torch"].startswith("2.")
    html = api.get(f"/v1/jobs/{job['id']}/report.html")
    assert html.status_code == 200 and "<svg" in html.text


def test_profile_only_job(api):
    model = upload_model(api, traced_cnn())
    job = _job(api, model_id=model["id"], input_spec=CNN_INPUT, steps=[], benchmark=QUICK_BENCH)
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["stages"] == [] and report["baseline"]["parameters"] == report["result"]["parameters"]
    assert report["baseline"]["macs"] > 0
    assert report["result"]["fidelity"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)


def test_job_accepted_while_broker_is_down_is_sent_later(service, tmp_path):
    """The API commits the job even when it cannot reach the broker; the worker's sweeper sends it."""

    with second_api(service, tmp_path, COMPACTOR_BROKER_URL="redis://127.0.0.1:1/0") as url:
        with api_client(url) as client:
            model = upload_model(client, traced_cnn())
            job = _job(client, model_id=model["id"], input_spec=CNN_INPUT, steps=[], benchmark=QUICK_BENCH)
            assert client.get("/readyz").status_code == 503
            done = wait_job(client, job["id"], 120)
    assert done["status"] == "succeeded", done
