"""Serving modes in the meter: plain, optimized and ONNX Runtime timed side by side, the lossless
floor, what a lossy model adds beyond it, and a reason wherever a mode cannot run a model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.zoo import SequentialCNN, digits, trace, train_classifier
from worker.cpu_share import cpu_share
from worker.engines.data import ModelData
from worker.engines.measure import BenchmarkConfig, measure_models
from worker.engines.pipeline import PipelineContext, run_step
from worker.runner import execute_job

MODES = ("plain", "optimized", "onnxruntime")
CONFIG = BenchmarkConfig(batch_sizes=[1, 8], warmup=2, iterations=21, rounds=3, max_rounds=3, serving=MODES)


def _export_onnx(model: torch.jit.ScriptModule, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}} if dynamic_batch else None,
        )
    return path


@pytest.fixture(scope="module")
def cnn():
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    traced = trace(train_classifier(SequentialCNN(), x_train, y_train, epochs=1), x_train[:2])
    return traced, ModelData((x_test,), y_test), ModelData((x_train[:256],), y_train[:256])


@pytest.fixture(scope="module")
def measured(cnn, tmp_path_factory):
    """The CNN with its ONNX file, a channel-pruned copy without one, and a model whose ONNX file
    is another network's (it runs, but not losslessly)."""
    traced, evaluation, calibration = cnn
    folder = tmp_path_factory.mktemp("serving")
    ctx = PipelineContext(teacher=traced, calibration=calibration, evaluation=evaluation, batch_sizes=(1, 8))
    pruned = run_step(traced, {"op": "prune", "structure": "channel", "amount": 0.5}, ctx).model.eval()
    torch.manual_seed(1)
    impostor = trace(SequentialCNN().eval(), evaluation.inputs[0][:2])
    models = {"baseline": traced, "pruned": pruned, "impostor": traced}
    files = {}
    for name, model in models.items():
        files[name] = folder / f"{name}.pt"
        torch.jit.save(model, str(files[name]))
    onnx = {
        "baseline": _export_onnx(traced, evaluation.inputs[0][:2], folder / "baseline.onnx"),
        "impostor": _export_onnx(impostor, evaluation.inputs[0][:2], folder / "impostor.onnx"),
    }
    measurement = measure_models(
        models, files, "baseline", evaluation, CONFIG, onnx_files=onnx, lossless={"baseline", "impostor"}
    )
    return measurement


def test_every_mode_of_the_baseline_is_timed_with_paired_speedups_and_a_check(measured):
    serving = measured.metrics["baseline"]["serving"]
    assert set(serving) == {"optimized", "onnxruntime"}
    for mode in ("optimized", "onnxruntime"):
        figures = serving[mode]
        assert figures["lossless"] is True and figures["max_abs_difference"] < 1e-4, mode
        for batch in ("1", "8"):
            latency = figures["latency_ms"][batch]
            assert 0 < latency["p50"] <= latency["p99"] and latency["iterations"] == 21
            assert figures["throughput_per_s"][batch] == pytest.approx(int(batch) / (latency["mean"] / 1000))
            assert figures["speedup"][batch]["rounds"] == 3
            assert figures["speedup"][batch]["min"] <= figures["speedup"][batch]["median"]
    # the plain figures stay where they were, and the plain speed-ups keep dividing by plain
    assert measured.metrics["baseline"]["latency_ms"]["8"]["iterations"] == 21
    assert set(measured.speedup) == {"pruned", "impostor"}


def test_a_mode_that_cannot_run_a_model_says_why_and_the_rest_is_measured(measured):
    pruned = measured.metrics["pruned"]
    assert pruned["serving"]["onnxruntime"] == {"unavailable": "no ONNX file of this model was made in this job"}
    assert pruned["serving"]["optimized"]["latency_ms"]["8"]["p50"] > 0
    assert pruned["latency_ms"]["8"]["p50"] > 0


def test_the_floor_is_the_fastest_lossless_way_to_serve_and_a_lossy_mode_is_left_out(measured):
    impostor = measured.metrics["impostor"]["serving"]["onnxruntime"]
    assert impostor["lossless"] is False and impostor["max_abs_difference"] > 1e-3
    assert any("impostor served onnxruntime" in note and "lossless floor" in note for note in measured.notes)
    for batch in ("1", "8"):
        floor = measured.floor[batch]
        assert (floor["model"], floor["mode"]) != ("impostor", "onnxruntime")
        candidates = {("baseline", "plain"): 1.0, ("impostor", "plain"): measured.speedup["impostor"][batch]["median"]}
        for name in ("baseline", "impostor"):
            for mode, figures in measured.metrics[name]["serving"].items():
                if figures["lossless"]:
                    candidates[(name, mode)] = figures["speedup"][batch]["median"]
        assert floor["median"] == pytest.approx(max(candidates.values()))
        assert candidates[(floor["model"], floor["mode"])] == pytest.approx(floor["median"])
        assert floor["p50_ms"] > 0 and floor["interval"]["low"] <= floor["median"] <= floor["interval"]["high"]


def test_a_lossy_model_is_credited_beyond_the_floor_in_its_fastest_mode(measured):
    assert set(measured.beyond_floor) == {"pruned"}
    for batch in ("1", "8"):
        beyond = measured.beyond_floor["pruned"][batch]
        speedups = {"plain": measured.speedup["pruned"][batch]["median"]}
        speedups["optimized"] = measured.metrics["pruned"]["serving"]["optimized"]["speedup"][batch]["median"]
        assert beyond["mode"] == max(speedups, key=speedups.get)
        assert beyond["rounds"] == 3 and beyond["min"] <= beyond["median"] <= beyond["max"]
        # paired per round, so it is close to (not exactly) the ratio of the two medians
        assert beyond["median"] == pytest.approx(speedups[beyond["mode"]] / measured.floor[batch]["median"], rel=0.5)
    json.dumps([measured.floor, measured.beyond_floor, measured.metrics], allow_nan=False)


def test_an_onnx_file_that_does_not_run_at_a_batch_size_and_a_missing_file_give_reasons(cnn, tmp_path):
    traced, evaluation, _ = cnn
    torch.jit.save(traced, str(tmp_path / "m.pt"))
    fixed = _export_onnx(traced, evaluation.inputs[0][:1], tmp_path / "fixed.onnx", dynamic_batch=False)
    config = BenchmarkConfig(
        batch_sizes=[1], warmup=2, iterations=6, rounds=3, max_rounds=3, serving=MODES, measure_memory=False
    )
    measurement = measure_models(
        {"baseline": traced, "unsaved": traced},
        {"baseline": tmp_path / "m.pt"},
        "baseline",
        evaluation,
        config,
        onnx_files={"baseline": fixed, "unsaved": tmp_path / "missing.onnx"},
    )
    baseline, unsaved = measurement.metrics["baseline"]["serving"], measurement.metrics["unsaved"]["serving"]
    # the check runs 64 samples at once: an export fixed at batch 1 cannot take them
    assert baseline["onnxruntime"]["unavailable"].startswith("it does not run in onnxruntime mode")
    assert "the model's own message" in baseline["onnxruntime"]["unavailable"]
    assert unsaved["optimized"] == {"unavailable": "no TorchScript file of this model to load"}
    assert unsaved["onnxruntime"]["unavailable"].startswith("ONNX Runtime could not load the ONNX file")
    assert measurement.floor["1"]["mode"] in ("plain", "optimized")


def _job(cnn, folder: Path, steps: list[dict]) -> dict:
    traced, evaluation, calibration = cnn
    torch.jit.save(traced, str(folder / "model.pt"))
    np.savez(folder / "calibration.npz", input=calibration.inputs[0].numpy(), label=calibration.labels.numpy())
    spec = {
        "steps": steps,
        "benchmark": {"batch_sizes": [1, 8], "warmup": 2, "iterations": 12, "serving": ["plain", "optimized"]},
        "seed": 0,
    }
    files = {
        "model": str(folder / "model.pt"),
        "calibration": str(folder / "calibration.npz"),
        "evaluation": None,
        "students": {},
        "output_dir": str(folder),
    }
    return execute_job(lambda event: None, spec, files, cpu=cpu_share(1, override=1).describe(), extra_time_s=0)[
        "report"
    ]


def test_a_lossy_pipeline_ending_in_compile_is_measured_against_the_compiled_baseline(cnn, tmp_path):
    report = _job(cnn, tmp_path, [{"op": "prune", "structure": "channel", "amount": 0.5}, {"op": "compile"}])

    compiled = report["baseline_compiled"]
    assert (tmp_path / "baseline_compiled.pt").exists()
    assert compiled["metrics"]["fidelity"]["max_abs_error"] <= 1e-5  # lossless against the upload
    assert compiled["metrics"]["serving"]["optimized"]["latency_ms"]["8"]["p50"] > 0
    assert set(compiled["speedup"]) == {"1", "8"}
    summary = report["summary"]
    for batch in ("1", "8"):
        assert summary["lossless_floor"][batch]["model"] in ("baseline", "baseline_compiled")
        assert summary["beyond_floor"][batch]["mode"] in ("plain", "optimized")
        assert report["result"]["serving"]["optimized"]["speedup"][batch]["median"] > 0
        assert "optimized" in report["stages"][0]["metrics"]["serving"]


def test_a_lossless_pipeline_is_its_own_floor_and_claims_nothing_beyond_it(cnn, tmp_path):
    report = _job(cnn, tmp_path, [{"op": "compile"}])

    assert "baseline_compiled" not in report and report["summary"]["beyond_floor"] is None
    assert {entry["model"] for entry in report["summary"]["lossless_floor"].values()} <= {"baseline", "stage1"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_optimized_serving_is_timed_and_onnx_runtime_says_it_measures_on_cpu(cnn, tmp_path):
    traced, evaluation, _ = cnn
    torch.jit.save(traced, str(tmp_path / "m.pt"))  # loaded onto the GPU by each mode, as a job loads it
    onnx = _export_onnx(traced, evaluation.inputs[0][:2], tmp_path / "m.onnx")
    config = BenchmarkConfig(
        device="cuda", batch_sizes=[8], warmup=2, iterations=6, rounds=3, max_rounds=3, serving=MODES
    )
    measurement = measure_models(
        {"baseline": torch.jit.load(str(tmp_path / "m.pt"), map_location="cuda")},
        {"baseline": tmp_path / "m.pt"},
        "baseline",
        evaluation,
        config,
        onnx_files={"baseline": onnx},
    )
    serving = measurement.metrics["baseline"]["serving"]
    assert serving["optimized"]["latency_ms"]["8"]["p50"] > 0 and serving["optimized"]["lossless"] is True
    assert serving["onnxruntime"]["unavailable"].startswith("ONNX Runtime is measured on its CPU execution provider")
