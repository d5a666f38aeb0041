"""Multi-engine pipelines through the HTTP API with a real worker: pruning that shrinks the
artifact, static int8 with a calibration dataset, prune → distill → quantize with per-stage
metrics, comparing jobs, and the HTML report."""

from __future__ import annotations

import io

import pytest
import torch

from tests import zoo
from tests.service.conftest import digits_arrays, upload_dataset, upload_model, wait_job
from tests.service.servers import api_client

QUICK_BENCH = {"batch_sizes": [1, 8], "warmup": 2, "iterations": 10}


@pytest.fixture(scope="module")
def trained_cnn():
    x, y, _, _ = zoo.digits()
    torch.manual_seed(0)
    model = zoo.train_classifier(zoo.SequentialCNN(), x, y, epochs=2)
    return zoo.trace(model, x[:2])


@pytest.fixture(scope="module")
def digits_ids(service, trained_cnn):

    with api_client(service.url) as client:
        model = upload_model(client, trained_cnn)
        calibration = upload_dataset(client, **digits_arrays(256))
        x, y, xt, yt = zoo.digits()
        evaluation = upload_dataset(client, input=xt[:128].numpy(), label=yt[:128].numpy())
    return model["id"], calibration["id"], evaluation["id"]


def _run(api, spec: dict) -> tuple[dict, dict, torch.jit.ScriptModule]:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    done = wait_job(api, response.json()["id"], 300)
    assert done["status"] == "succeeded", done
    report = api.get(f"/v1/jobs/{done['id']}/report").json()
    artifact = torch.jit.load(io.BytesIO(api.get(f"/v1/jobs/{done['id']}/artifact").content))
    return done, report, artifact


def test_channel_prune_job_returns_a_smaller_faster_artifact(api, digits_ids, trained_cnn):
    model_id, calibration_id, eval_id = digits_ids
    done, report, artifact = _run(
        api,
        {
            "model_id": model_id,
            "calibration_dataset_id": calibration_id,
            "eval_dataset_id": eval_id,
            "steps": [{"op": "prune", "structure": "channel", "criterion": "l1", "amount": 0.5}],
            "benchmark": QUICK_BENCH,
        },
    )
    assert report["result"]["parameters"] < 0.6 * report["baseline"]["parameters"]
    assert report["result"]["macs"] < report["baseline"]["macs"]
    assert report["summary"]["size_ratio"] > 1.5
    x = zoo.digits()[2][:4]
    assert artifact(x).shape == trained_cnn(x).shape
    assert sum(p.numel() for p in artifact.parameters()) == report["result"]["parameters"]


def test_static_int8_with_calibration_dataset(api, digits_ids):
    model_id, calibration_id, eval_id = digits_ids
    done, report, artifact = _run(
        api,
        {
            "model_id": model_id,
            "calibration_dataset_id": calibration_id,
            "eval_dataset_id": eval_id,
            "steps": [{"op": "quantize", "scheme": "static_int8"}],
            "benchmark": QUICK_BENCH,
        },
    )
    assert report["summary"]["size_ratio"] > 2.5
    assert report["summary"]["accuracy_drop"] < 0.03
    assert report["result"]["fidelity"]["top1_agreement"] > 0.95


def test_prune_distill_quantize_pipeline_reports_every_stage(api, digits_ids):
    model_id, calibration_id, eval_id = digits_ids
    spec = {
        "model_id": model_id,
        "calibration_dataset_id": calibration_id,
        "eval_dataset_id": eval_id,
        "name": "prune-distill-quantize",
        "steps": [
            {"op": "prune", "structure": "channel", "amount": 0.5},
            {"op": "distill", "epochs": 2, "temperature": 4.0, "alpha": 0.7, "batch_size": 64},
            {"op": "quantize", "scheme": "dynamic_int8"},
        ],
        "benchmark": QUICK_BENCH,
        "target": {"max_accuracy_drop": 0.5},
    }
    done, report, artifact = _run(api, spec)
    assert [s["op"] for s in report["stages"]] == ["prune", "distill", "quantize"]
    for stage in report["stages"]:
        assert stage["metrics"]["parameters"] > 0 and stage["metrics"]["latency_ms"]["1"]["p50"] > 0
        assert stage["metrics"]["accuracy"] is not None
    pruned, distilled = report["stages"][0]["metrics"], report["stages"][1]["metrics"]
    assert distilled["accuracy"]["top1"] >= pruned["accuracy"]["top1"] - 0.02
    assert report["summary"]["targets"]["max_accuracy_drop"]["met"] is True
    assert report["result"]["parameters"] < report["baseline"]["parameters"]

    profile = api.post(
        "/v1/jobs", json={"model_id": model_id, "eval_dataset_id": eval_id, "steps": [], "benchmark": QUICK_BENCH}
    ).json()
    wait_job(api, profile["id"])
    compared = api.get("/v1/jobs/compare", params={"ids": f"{done['id']},{profile['id']}"})
    assert compared.status_code == 200
    rows = compared.json()
    assert [r["job_id"] for r in rows] == [done["id"], profile["id"]]
    assert rows[0]["summary"]["size_ratio"] == report["summary"]["size_ratio"]
    assert rows[1]["steps"] == []

    html = api.get(f"/v1/jobs/{done['id']}/report.html")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "prune" in html.text and "distill" in html.text and "<script src" not in html.text


def test_prune_then_compile_job_returns_a_frozen_artifact_without_batchnorm(api, digits_ids, trained_cnn):
    model_id, calibration_id, eval_id = digits_ids
    spec = {
        "model_id": model_id,
        "calibration_dataset_id": calibration_id,
        "eval_dataset_id": eval_id,
        "steps": [{"op": "prune", "structure": "channel", "amount": 0.25}, {"op": "compile"}],
        "benchmark": QUICK_BENCH,
    }
    done, report, artifact = _run(api, spec)

    compile_stage = report["stages"][-1]
    assert compile_stage["op"] == "compile" and compile_stage["details"]["batch_norms_left"] == 0
    assert compile_stage["details"]["max_abs_difference"] <= 1e-5
    assert "aten::batch_norm" not in str(artifact.graph)
    # the loss is the pruning's; compiling added none
    pruned = report["stages"][0]["metrics"]["fidelity"]["cosine_min"]
    assert abs(report["result"]["fidelity"]["cosine_min"] - pruned) < 1e-5

    # compile only as the last step: a 422 naming it, before anything runs
    refused = api.post("/v1/jobs", json={**spec, "steps": [{"op": "compile"}, {"op": "quantize", "scheme": "fp16"}]})
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "steps", 0]


def test_serving_modes_and_the_lossless_floor_reach_the_report(api, digits_ids):
    model_id, calibration_id, eval_id = digits_ids
    spec = {
        "model_id": model_id,
        "calibration_dataset_id": calibration_id,
        "eval_dataset_id": eval_id,
        "steps": [{"op": "prune", "structure": "channel", "amount": 0.5}],
        "benchmark": {**QUICK_BENCH, "serving": ["plain", "optimized", "onnxruntime"]},
    }
    done, report, _ = _run(api, spec)

    for side in ("baseline", "result"):
        serving = report[side]["serving"]
        assert serving["onnxruntime"]["unavailable"] == "no ONNX file of this model was made in this job"
        assert serving["onnxruntime"]["latency_ms"] == {} and serving["onnxruntime"]["speedup"] == {}
        optimized = serving["optimized"]
        assert (
            optimized["unavailable"] is None
            and optimized["lossless"] is True
            and optimized["max_abs_difference"] < 1e-4
        )
        for batch in ("1", "8"):
            assert 0 < optimized["latency_ms"][batch]["p50"] <= optimized["latency_ms"][batch]["p99"]
            assert optimized["speedup"][batch]["rounds"] >= 7
            assert report[side]["latency_ms"][batch]["p50"] > 0  # plain, where it always was
    summary = report["summary"]
    for batch in ("1", "8"):
        floor = summary["lossless_floor"][batch]
        assert floor["model"] == "baseline" and floor["mode"] in ("plain", "optimized")
        expected = 1.0 if floor["mode"] == "plain" else report["baseline"]["serving"]["optimized"]["speedup"][batch]
        assert floor["median"] == (expected if floor["mode"] == "plain" else expected["median"])
        assert summary["beyond_floor"][batch]["mode"] in ("plain", "optimized")
    assert report["environment"]["serving"]["onnxruntime"]["onnxruntime"]

    html = api.get(f"/v1/jobs/{done['id']}/report.html").text
    assert "Serving modes and the lossless floor" in html and "not run: no ONNX file" in html

    refused = api.post("/v1/jobs", json={**spec, "benchmark": {"serving": ["optimized"]}})
    assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["body", "benchmark", "serving"]
