"""measure_models end to end: report invariants, sizes against files, known accuracy, the harness."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.zoo import SequentialCNN, accuracy, digits, script, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.measure import BenchmarkConfig, measure_models, weight_stats
from worker.engines.measure.latency import paired_speedup, percentile, time_interleaved

CONFIG = BenchmarkConfig(batch_sizes=[1, 8], warmup=2, iterations=21, rounds=3, max_rounds=3)


def _save(models: dict[str, torch.jit.ScriptModule], directory: Path) -> dict[str, Path]:
    files = {}
    for name, model in models.items():
        files[name] = directory / f"{name}.pt"
        torch.jit.save(model, str(files[name]))
    return files


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A trained CNN, a copy with half of fc1 zeroed, a dynamic-int8 copy, and an untimed copy."""
    x_train, y_train, x_test, y_test = digits()
    eager = train_classifier(SequentialCNN(), x_train, y_train, epochs=1)
    baseline = trace(eager, x_test[:1])
    pruned_eager = copy.deepcopy(eager)
    with torch.no_grad():
        pruned_eager.fc1.weight[:, ::2] = 0.0
    models = {
        "baseline": baseline,
        "pruned": script(pruned_eager),
        "int8": torch.jit.script(torch.ao.quantization.quantize_dynamic(eager, {nn.Linear})),
        "untimed": script(eager),
    }
    files = _save(models, tmp_path_factory.mktemp("measure"))
    fractions = []
    measurement = measure_models(
        models,
        files,
        "baseline",
        ModelData((x_test,), y_test),
        CONFIG,
        latency_for={"baseline", "pruned", "int8"},
        progress=lambda fraction, message: fractions.append(fraction),
    )
    return measurement, models, files, (x_test, y_test), fractions


def test_latency_percentiles_are_ordered(measured):
    measurement = measured[0]
    for name in ("baseline", "pruned", "int8"):
        for batch in ("1", "8"):
            latency = measurement.metrics[name]["latency_ms"][batch]
            assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
            assert latency["iterations"] == 21  # 3 rounds of 7
            throughput = measurement.metrics[name]["throughput_per_s"][batch]
            assert throughput == pytest.approx(int(batch) / (latency["mean"] / 1000))


def test_sizes_match_the_files_and_parameters_are_consistent(measured):
    measurement, models, files, _, _ = measured
    for name, path in files.items():
        metrics = measurement.metrics[name]
        assert metrics["size_bytes"] == path.stat().st_size
        assert 0 < metrics["compressed_size_bytes"] < metrics["size_bytes"]
        assert 0 < metrics["nonzero_parameters"] <= metrics["parameters"]
    baseline, pruned = measurement.metrics["baseline"], measurement.metrics["pruned"]
    assert baseline["parameters"] == sum(p.numel() for p in models["baseline"].parameters())
    assert pruned["nonzero_parameters"] == baseline["nonzero_parameters"] - 64 * 2048 // 2
    assert pruned["compressed_size_bytes"] < baseline["compressed_size_bytes"]
    # The int8 model's linear weights live in packed params, not parameters(); they still count.
    assert measurement.metrics["int8"]["parameters"] == baseline["parameters"]
    assert baseline["buffers_bytes"] == sum(b.numel() * b.element_size() for b in models["baseline"].buffers())


def test_accuracy_and_fidelity(measured):
    measurement, models, _, (x_test, y_test), _ = measured
    for name in ("baseline", "pruned", "int8"):
        # Batch by batch as the harness does: dynamic int8 picks activation ranges per batch.
        step = CONFIG.eval_batch_size
        correct = sum(
            accuracy(models[name], x_test[i : i + step], y_test[i : i + step]) * len(y_test[i : i + step])
            for i in range(0, len(y_test), step)
        )
        assert measurement.metrics[name]["accuracy"]["top1"] == pytest.approx(correct / len(y_test), abs=1e-6)
    assert measurement.metrics["baseline"]["fidelity"] == {
        "top1_agreement": 1.0,
        "cosine_min": 1.0,
        "cosine_mean": 1.0,
        "max_abs_error": 0.0,
    }
    # A scripted copy of the same weights computes the same function.
    untimed = measurement.metrics["untimed"]["fidelity"]
    assert untimed["top1_agreement"] == 1.0 and untimed["cosine_min"] > 0.99999
    pruned = measurement.metrics["pruned"]["fidelity"]
    assert pruned["max_abs_error"] > 0 and pruned["cosine_mean"] < 1.0


def test_speedups_are_paired_and_untimed_models_get_no_latency(measured):
    measurement = measured[0]
    assert set(measurement.speedup) == {"pruned", "int8"}
    for per_batch in measurement.speedup.values():
        assert set(per_batch) == {"1", "8"}
        for stats in per_batch.values():
            assert stats["min"] <= stats["median"] <= stats["max"] and stats["rounds"] == 3
    untimed = measurement.metrics["untimed"]
    assert untimed["latency_ms"] == {} and untimed["throughput_per_s"] == {} and untimed["peak_memory_bytes"] is None
    assert untimed["macs"] == measurement.metrics["baseline"]["macs"] == 1_458_816


def test_peak_memory_is_measured_for_timed_models(measured):
    measurement, models, _, _, _ = measured
    weights = sum(p.numel() * 4 for p in models["baseline"].parameters())
    for name in ("baseline", "pruned", "int8"):
        assert measurement.metrics[name]["peak_memory_bytes"] > weights
    assert not [note for note in measurement.notes if "peak memory" in note]


_PROBED_BOTH_WAYS = """
import json, sys
import torch
from worker.engines.measure.memory import CleanFork, cpu_peak_memory
clean = CleanFork()  # before any model, as a job's child makes it
mlp = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)).eval()
torch.jit.save(torch.jit.trace(mlp, torch.rand(1, 1024)), sys.argv[1] + "/mlp.pt")
open(sys.argv[1] + "/broken.pt", "wb").write(b"not a model")
files = {"mlp": sys.argv[1] + "/mlp.pt", "broken": sys.argv[1] + "/broken.pt"}
inputs = (torch.rand(512, 1024),)
forked = cpu_peak_memory(files, inputs, 1, clean)
fresh = cpu_peak_memory(files, inputs, 1)
clean.close()
print(json.dumps({"forked": forked, "fresh": fresh}))
"""


def test_memory_probes_forked_from_a_clean_copy_agree_with_fresh_interpreters(tmp_path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _PROBED_BOTH_WAYS, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    forked, fresh = result["forked"], result["fresh"]
    activations = 512 * 1024 * 4  # one [512, 1024] float32 output, at least
    assert forked["broken"] is None and fresh["broken"] is None
    assert forked["mlp"] > activations and fresh["mlp"] > activations
    # the same activations either way; a probe that counted the parent's torch import would be
    # hundreds of MB off, while allocator and page-rounding differences are a few MB
    assert abs(forked["mlp"] - fresh["mlp"]) < 0.25 * fresh["mlp"] + 2 * 2**20, result


def test_everything_is_strict_json_and_the_environment_is_described(measured):
    measurement, _, _, _, fractions = measured
    json.dumps([measurement.metrics, measurement.speedup, measurement.environment], allow_nan=False)
    environment = measurement.environment
    assert environment["device"] == "cpu" and environment["device_name"]
    assert environment["threads"] == torch.get_num_threads()
    assert environment["torch"] == torch.__version__
    assert environment["measured_at"].endswith("Z")
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


class KnownPredictor(nn.Module):
    """Predicts the class written in the input's first feature (one-hot scores)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0].long(), 4).float() + 0.0 * x.sum()


class HalfWrapped(nn.Module):
    """A half-precision body behind a float32 interface, like a quantize step's output."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.half()).float()


def test_accuracy_on_known_predictions_and_a_half_model(tmp_path):
    classes = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    labels = torch.tensor([0, 1, 2, 3, 1, 1, 0, 3, 0, 2])  # 7 of 10 right
    x = torch.stack([classes.float(), torch.rand(10)], dim=1)
    models = {"known": script(KnownPredictor()), "half": script(HalfWrapped(KnownPredictor()))}
    config = BenchmarkConfig(batch_sizes=[3], warmup=2, iterations=3, rounds=3, eval_batch_size=4, measure_memory=False)

    measurement = measure_models(models, _save(models, tmp_path), "known", ModelData((x,), labels), config)

    assert measurement.metrics["known"]["accuracy"] == {"top1": 0.7}
    assert measurement.metrics["half"]["accuracy"] == {"top1": 0.7}
    assert measurement.metrics["half"]["fidelity"]["top1_agreement"] == 1.0
    assert measurement.metrics["known"]["peak_memory_bytes"] is None


def test_unlabelled_data_has_no_accuracy(tmp_path):
    model = script(SequentialCNN())
    config = BenchmarkConfig(batch_sizes=[2], warmup=2, iterations=2, rounds=2, measure_memory=False)

    measurement = measure_models(
        {"only": model}, _save({"only": model}, tmp_path), "only", ModelData((torch.rand(5, 1, 32, 32),)), config
    )

    assert measurement.metrics["only"]["accuracy"] is None
    assert measurement.speedup == {}
    assert measurement.metrics["only"]["latency_ms"]["2"]["iterations"] == 2


def test_interleaving_rotates_and_speedup_reflects_a_known_ratio():
    order = []

    def sleeper(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)

        return call

    config = BenchmarkConfig(batch_sizes=[1], warmup=0, iterations=6, rounds=3)
    result = time_interleaved(
        # sleeps long enough that a loaded host's wake-up delay (a millisecond or two) keeps the ratio
        {1: {"fast": sleeper("fast", 0.01), "slow": sleeper("slow", 0.03)}},
        config,
        torch.device("cpu"),
    )

    timed = order[4:]  # after two warm-up calls each
    assert timed == ["fast"] * 2 + ["slow"] * 2 + ["slow"] * 2 + ["fast"] * 2 + ["fast"] * 2 + ["slow"] * 2
    speedup = paired_speedup(result.round_medians_ms["fast"][1], result.round_medians_ms["slow"][1])
    assert 0.2 < speedup["median"] < 0.5 and speedup["rounds"] == 3


def test_percentiles_and_paired_ratios():
    assert [percentile([5, 1, 4, 2, 3], q) for q in (50, 90, 99)] == pytest.approx([3.0, 4.6, 4.96])
    assert paired_speedup([2.0, 4.0, 6.0], [1.0, 1.0, 3.0]) == {
        "median": 2.0,
        "min": 2.0,
        "max": 4.0,
        "rounds": 3,
        "interval": {"low": 2.0, "high": 4.0, "confidence": 0.75},
        "noisy": True,  # three rounds reach no 95 % interval
    }


def test_config_validation_and_spec_parsing():
    config = BenchmarkConfig.from_spec({"device": "cpu", "batch_sizes": [1, 32], "iterations": 200})
    assert config.batch_sizes == (1, 32) and config.iterations == 200 and config.warmup == 10
    for bad in ({"batch_sizes": []}, {"batch_sizes": [0]}, {"iterations": 0}, {"threads": 0}):
        with pytest.raises(EngineError):
            BenchmarkConfig.from_spec(bad)
    with pytest.raises(EngineError) as caught:
        measure_models({"a": script(SequentialCNN())}, {}, "b", ModelData((torch.rand(2, 1, 32, 32),)))
    assert caught.value.code == "invalid_benchmark"


def test_weight_stats_dedupe_shared_tensors():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)

    stats = weight_stats(model)

    assert stats.parameters == 20 and math.isclose(stats.nonzero_parameters, 20)


class AttributeWeight(nn.Module):
    """A weight held as a plain tensor attribute (as weight-only quantization does), plus a scalar."""

    def __init__(self):
        super().__init__()
        self.weight = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 5.0]])
        self.scale = torch.tensor(0.5)
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() * self.scale + self.bias


def test_weights_outside_parameters_are_counted():
    stats = weight_stats(script(AttributeWeight()))

    assert stats.parameters == 6 + 2  # the 2×3 attribute weight and the bias, not the scalar scale
    assert stats.nonzero_parameters == 4


@pytest.mark.cuda
def test_cuda_measurement_uses_the_device(tmp_path):
    model = script(SequentialCNN()).cuda()
    config = BenchmarkConfig(device="cuda", batch_sizes=[1, 16], warmup=3, iterations=20, rounds=4)

    measurement = measure_models(
        {"baseline": model},
        _save({"baseline": model}, tmp_path),
        "baseline",
        ModelData((torch.rand(16, 1, 32, 32),)),
        config,
    )

    assert measurement.environment["device_name"] == torch.cuda.get_device_name(0)
    latency = measurement.metrics["baseline"]["latency_ms"]["16"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert measurement.metrics["baseline"]["peak_memory_bytes"] >= weights
    assert measurement.metrics["baseline"]["macs"] == 1_458_816


def test_rounds_are_added_until_the_interval_is_narrow_and_a_wide_one_is_noisy():
    steady = {1: {"ref": lambda: time.sleep(0.002), "fast": lambda: time.sleep(0.001)}}
    config = BenchmarkConfig(warmup=0, iterations=3, rounds=3, max_rounds=40, extra_time_s=10.0)
    result = time_interleaved(steady, config, torch.device("cpu"), reference="ref")
    rounds = len(result.round_medians_ms["fast"][1])
    assert 6 <= rounds < 40  # three are no 95 % interval; a steady 2× soon is narrow
    figure = paired_speedup(result.round_medians_ms["ref"][1], result.round_medians_ms["fast"][1])
    assert not figure["noisy"] and figure["interval"]["low"] <= figure["median"] <= figure["interval"]["high"]

    swings = iter([1.0, 3.0] * 100)
    erratic = {1: {"ref": lambda: time.sleep(0.001), "odd": lambda: time.sleep(0.001 * next(swings))}}
    config = BenchmarkConfig(warmup=0, iterations=1, rounds=3, max_rounds=12, extra_time_s=10.0)
    result = time_interleaved(erratic, config, torch.device("cpu"), reference="ref")
    assert len(result.round_medians_ms["odd"][1]) == 12  # never narrow: up to max_rounds
    assert paired_speedup(result.round_medians_ms["ref"][1], result.round_medians_ms["odd"][1])["noisy"]


def test_median_interval_is_the_order_statistic_interval():
    from worker.engines.measure.latency import median_interval

    assert median_interval(list(range(15))) == (3, 11, 1 - 2 * 576 / 2**15)
    low, high, coverage = median_interval([1.0, 2.0, 3.0])
    assert (low, high) == (1.0, 3.0) and coverage == 0.75


def test_beside_a_cpu_bound_process_on_every_core_p50_holds_or_is_marked_noisy():
    import os
    import subprocess
    import sys

    model = trace(SequentialCNN().eval(), torch.randn(1, 1, 32, 32))
    data = ModelData((torch.randn(8, 1, 32, 32),))
    config = BenchmarkConfig(warmup=3, iterations=60, rounds=6, max_rounds=6, measure_memory=False, threads=1)

    def p50():
        figure = measure_models({"baseline": model}, {}, "baseline", data, config).metrics["baseline"]["latency_ms"]
        return figure["1"]

    quiet = p50()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        time.sleep(0.5)
        loaded = p50()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert loaded["cpu_wait"] is None or loaded["cpu_wait"] >= 0
    assert loaded["p50"] <= 1.5 * quiet["p50"] or loaded["noisy"], (quiet, loaded)


def test_a_stop_early_verdict_on_the_quality_figures_skips_memory_and_timing(measured, tmp_path):
    _, models, files, (x_test, y_test), _ = measured
    subset = {name: models[name] for name in ("baseline", "pruned")}
    seen = []

    def verdict(metrics):
        seen.append({name: metrics[name].get("accuracy") for name in metrics})
        return "the result misses its accuracy target"

    measurement = measure_models(
        subset, {n: files[n] for n in subset}, "baseline", ModelData((x_test,), y_test), CONFIG, stop_early=verdict
    )

    assert measurement.stopped_early == "the result misses its accuracy target"
    assert seen and all(accuracy is not None for accuracy in seen[0].values()), "judged on measured accuracy"
    for name in subset:
        metrics = measurement.metrics[name]
        assert metrics["latency_ms"] == {} and metrics["peak_memory_bytes"] is None
        assert metrics["accuracy"]["top1"] > 0 and metrics["size_bytes"] > 0 and metrics["macs"] > 0
    assert measurement.speedup == {} and measurement.floor == {}
    assert any("nothing was timed" in note for note in measurement.notes)

    timed = measure_models(
        subset,
        {n: files[n] for n in subset},
        "baseline",
        ModelData((x_test,), y_test),
        CONFIG,
        stop_early=lambda m: None,
    )
    assert timed.stopped_early is None and timed.metrics["pruned"]["latency_ms"]["8"]["p50"] > 0


def test_the_runner_stops_early_only_on_a_measured_miss_of_a_quality_target():
    from worker.runner import _missed_target

    def metrics(accuracy, cosine=0.999):
        return {
            "size_bytes": 100,
            "accuracy": None if accuracy is None else {"top1": accuracy},
            "fidelity": {"cosine_min": cosine, "top1_agreement": None},
        }

    check = _missed_target({"max_accuracy_drop": 0.01, "stop_early": True}, "stage1")
    assert "accuracy drop 0.0500 misses its target max_accuracy_drop 0.01" in check(
        {"baseline": metrics(0.95), "stage1": metrics(0.90)}
    )
    assert check({"baseline": metrics(0.95), "stage1": metrics(0.94)}) is None  # exactly at the limit holds
    assert check({"baseline": metrics(None), "stage1": metrics(None)}) is None  # no labels: nothing missed
    fidelity = _missed_target({"min_fidelity": 0.99, "stop_early": True}, "stage1")
    assert "fidelity" in fidelity({"baseline": metrics(None, 1.0), "stage1": metrics(None, 0.98)})
    assert _missed_target({"max_accuracy_drop": 0.01}, "stage1") is None  # stop_early not asked for
    assert _missed_target({"min_speedup": 2.0, "stop_early": True}, "stage1") is None
