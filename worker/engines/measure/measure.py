"""The measurement entry point: every figure of the report's Metrics for a set of models at once.

All models live in one process and are timed interleaved against the same inputs, in every serving
mode asked for, so a speed-up compares like with like; quality is measured against the reference
model's outputs, and the lossless floor is the fastest way to serve a model with no compression.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError, MeterError
from worker.engines.measure.energy import NOT_MEASURED, energy_meter
from worker.engines.measure.latency import (
    MIN_WARMUP,
    BenchmarkConfig,
    LatencyResult,
    latency_summary,
    paired_speedup,
    time_interleaved,
)
from worker.engines.measure.macs import MacCount, count_macs
from worker.engines.measure.memory import CleanFork, cpu_peak_memory, cuda_peak_memory
from worker.engines.measure.quality import FidelityAccumulator, count_correct
from worker.engines.measure.serving import (
    SERVING_MODES,
    Runner,
    ServedModel,
    ServingUnavailable,
    max_abs_difference,
    run_checked,
    serve,
)
from worker.engines.measure.size import file_size, weight_stats

ProgressFn = Callable[[float, str], None]


@dataclass
class Measurement:
    """What `measure_models` found.

    Attributes:
        metrics: `{name: Metrics}` shaped like API.md's Metrics, JSON-safe.
        speedup: `{name: {"<batch>": {"median", "min", "max", "rounds"}}}` against the reference,
            for every timed model except the reference itself (both served `plain`).
        environment: `{"device", "device_name", "torch", "threads", "worker", "measured_at", …}`.
        notes: things a reader should know (a figure that could not be measured, and why).
        stopped_early: why nothing was timed (`stop_early`'s verdict on the quality figures), or None.
        floor: `{"<batch>": {"model", "mode", "p50_ms", "median", "min", "max", …}}`: the lossless
            floor, the fastest of the lossless models in their lossless modes, with its paired
            speed-up over the reference served plain.
        beyond_floor: `{name: {"<batch>": {"mode", "median", "min", "max", …}}}` for every timed
            model that is not lossless: its fastest mode's paired speed-up over the floor.
    """

    metrics: dict[str, dict[str, Any]]
    speedup: dict[str, dict[str, dict[str, float | int]]]
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    floor: dict[str, dict[str, Any]] = field(default_factory=dict)
    beyond_floor: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    stopped_early: str | None = None


def measure_models(
    models: Mapping[str, torch.jit.ScriptModule],
    files: Mapping[str, Path],
    reference: str,
    data: ModelData,
    config: BenchmarkConfig | None = None,
    latency_for: Iterable[str] | None = None,
    progress: ProgressFn = lambda fraction, message: None,
    onnx_files: Mapping[str, Path] | None = None,
    lossless: Iterable[str] | None = None,
    clean: CleanFork | None = None,
    stop_early: Callable[[dict[str, dict[str, Any]]], str | None] | None = None,
) -> Measurement:
    """Measure size, work, quality, latency and memory of several models side by side.

    Every timed model is run in each of `config.serving`'s modes, all in the same interleaved
    rounds; a mode that cannot run a model gets `{"unavailable": reason}` in place of its figures.

    Args:
        models: `{name: model}` in eval mode, already on `config.device`; quantized and
            half-precision models take and return the original dtypes.
        files: `{name: saved TorchScript file}` for the file and compressed sizes (and, on CPU,
            the isolated memory probe).
        reference: the name whose outputs the others' fidelity is measured against and whose
            latency the speed-ups divide; its own fidelity is against itself (1.0 by definition).
        data: evaluation inputs (labels optional); benchmark batches are filled from it.
        config: device, batch sizes, warm-up, iterations, rounds, threads (None: the defaults).
        latency_for: names to time and probe for memory; the others get size and quality only
            (latency `{}`, peak memory None). None: all.
        progress: `progress(fraction, message)`.
        onnx_files: `{name: ONNX file}` of the models the `onnxruntime` mode can run.
        lossless: the models made with no loss (None: the reference alone): their modes whose
            outputs agree with their `plain` outputs within float tolerance make the floor.
        clean: a copy of the caller's process from before it loaded any model, to fork the CPU
            memory probes from (None: each probe is a fresh interpreter).
        stop_early: called on the metrics once sizes, MACs, accuracy and fidelity are in; a reason
            it returns skips the memory probes and the timing (the models get the figures of the
            untimed ones), as for a result that already misses its accuracy target.

    Returns:
        A `Measurement` (metrics, speed-ups with spread, environment, notes, floor).

    Raises:
        EngineError: unknown reference, empty data, unavailable device, or outputs that do not match.

    Example:
        measurement = measure_models({"baseline": teacher, "result": student},
                                     {"baseline": Path("a.pt"), "result": Path("b.pt")},
                                     reference="baseline", data=eval_data,
                                     config=BenchmarkConfig(batch_sizes=[1, 32], serving=["plain", "optimized"]))
        measurement.speedup["result"]["32"]["median"]
        measurement.metrics["result"]["serving"]["optimized"]["speedup"]["32"]["median"]
        measurement.floor["32"]["mode"]  # "optimized", where that serves the baseline fastest
    """
    config = config or BenchmarkConfig()
    if reference not in models:
        raise EngineError("invalid_benchmark", f"the reference model {reference!r} is not among the measured models")
    if data.num_samples == 0:
        raise EngineError("empty_dataset", "the evaluation data has no samples to benchmark with")
    device = _device(config.device)
    timed = [name for name in models if latency_for is None or name in set(latency_for)]
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        notes: list[str] = []
        metrics = {name: _static_metrics(models[name], files.get(name), data, device, notes) for name in models}
        progress(0.1, "counted sizes and MACs")
        quality = _quality(models, reference, data, config, device, notes)
        for name in models:
            metrics[name].update(quality[name])
        progress(0.25, "measured accuracy and fidelity")
        stopped = stop_early(metrics) if stop_early is not None else None
        if stopped:
            timed = []
            notes.append(f"nothing was timed: {stopped}")
        peaks = _peak_memory(models, files, timed, data, config, device, notes, clean)
        for name in models:
            metrics[name]["peak_memory_bytes"] = peaks.get(name)
        progress(0.35, "measured peak memory")
        load_at_start = _load_average()
        served = _serve(models, files, onnx_files or {}, timed, data, config, device, metrics)
        progress(0.4, f"prepared the serving modes {', '.join(config.serving)}")
        speedup, timings = _latency(
            served, timed, reference, data, config, device, metrics, lambda f, m: progress(0.4 + 0.6 * f, m)
        )
        floor, beyond_floor = _floor(
            timings, metrics, timed, reference, set(lossless) if lossless is not None else {reference}, config, notes
        )
        environment = {
            **_environment(device, config),
            "serving": {mode: SERVING_MODES[mode].describe() for mode in config.serving},
            "usable_cores": usable_cores(),
            "load_average": {"start": load_at_start, "end": _load_average()},
            "energy_meter": getattr(energy_meter(device), "source", NOT_MEASURED),
            "rounds_timed": {
                str(b): max((s[str(b)]["rounds"] for s in speedup.values() if str(b) in s), default=config.rounds)
                for b in config.batch_sizes
            },
        }
        if any(figure.get("noisy") for per_batch in speedup.values() for figure in per_batch.values()):
            notes.append(
                "a speed-up's interval stayed wide after the rounds the time budget allowed: it is marked noisy"
            )
        return Measurement(
            _json_safe(metrics),
            _json_safe(speedup),
            environment,
            notes,
            _json_safe(floor),
            _json_safe(beyond_floor),
            stopped,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device_unavailable", f"benchmark device {name!r} is not available on this worker")
    if device.type not in ("cpu", "cuda"):
        raise EngineError("device_unavailable", f"benchmark device {name!r} is not supported (use cpu or cuda)")
    return device


def _inputs(data: ModelData, count: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in data.repeat_to(count).inputs)


def _static_metrics(
    model: torch.nn.Module, path: Path | None, data: ModelData, device: torch.device, notes: list[str]
) -> dict[str, Any]:
    sizes = _metering("reading the model file's size", file_size, path) if path is not None else None
    weights = _metering("counting the model's weights", weight_stats, model)
    macs = _macs(model, _inputs(data, 1, device), notes)
    return {
        "size_bytes": sizes.size_bytes if sizes else None,
        "compressed_size_bytes": sizes.compressed_size_bytes if sizes else None,
        "parameters": weights.parameters,
        "nonzero_parameters": weights.nonzero_parameters,
        "buffers_bytes": weights.buffers_bytes,
        "macs": macs.macs if macs else None,
        "macs_by_operator": macs.by_operator if macs else None,
        "macs_uncounted": macs.uncounted if macs else None,
    }


def _macs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], notes: list[str]) -> MacCount | None:
    """MACs of one forward pass; where counting fails but the model itself runs, the counter (the
    meter's own code) was at fault: no MACs, and a note, rather than a failed job."""
    try:
        return count_macs(model, inputs)
    except Exception as counting:
        with torch.inference_mode():
            model(*inputs)  # raises the model's own error, if the model is what failed
        notes.append(f"MACs could not be counted ({type(counting).__name__} in the service's counter)")
        return None


def _quality(
    models: Mapping[str, torch.nn.Module],
    reference: str,
    data: ModelData,
    config: BenchmarkConfig,
    device: torch.device,
    notes: list[str],
) -> dict[str, dict[str, Any]]:
    """Accuracy (when labelled) and fidelity to the reference, in one pass over the data."""
    if config.eval_samples is not None:
        data = data.take(config.eval_samples)
    # a [batch, n] output is taken as class scores only when labels say the model is a classifier
    fidelity = {name: FidelityAccumulator(class_scores=data.labels is not None) for name in models}
    correct: dict[str, int | None] = {name: 0 for name in models}
    with torch.inference_mode():
        for batch in data.batches(config.eval_batch_size, device):
            reference_outputs = models[reference](*batch.inputs)
            for name, model in models.items():
                outputs = reference_outputs if name == reference else model(*batch.inputs)
                fidelity[name].update(reference_outputs, outputs)
                if batch.labels is not None and correct[name] is not None:
                    hits = count_correct(outputs, batch.labels)
                    correct[name] = None if hits is None else correct[name] + hits
    labelled = data.labels is not None and data.num_samples > 0
    if labelled and any(hits is None for hits in correct.values()):
        notes.append("the dataset has labels but a model output has no [batch, classes] tensor: no accuracy for it")
    return {
        name: {
            "accuracy": {"top1": correct[name] / data.num_samples} if labelled and correct[name] is not None else None,
            "fidelity": fidelity[name].result(),
        }
        for name in models
    }


def _peak_memory(
    models: Mapping[str, torch.nn.Module],
    files: Mapping[str, Path],
    timed: list[str],
    data: ModelData,
    config: BenchmarkConfig,
    device: torch.device,
    notes: list[str],
    clean: CleanFork | None,
) -> dict[str, int | None]:
    """Peak memory at the largest batch size, for the timed models."""
    if not config.measure_memory or not timed:
        return {}
    inputs = _inputs(data, max(config.batch_sizes), device)
    if device.type == "cuda":
        return {name: cuda_peak_memory(models[name], inputs, device) for name in timed}
    probed = {name: files[name] for name in timed if name in files}
    peaks = cpu_peak_memory(probed, inputs, torch.get_num_threads(), clean)
    failed = sorted(name for name in timed if peaks.get(name) is None)
    if failed:
        notes.append(
            f"peak memory could not be measured for {', '.join(failed)} (no file, or the probe process failed)"
        )
    return peaks


def _key(name: str, mode: str) -> str:
    """The timed entry of a model in a mode: its plain entry keeps the model's own name."""
    return name if mode == "plain" else f"{name}@{mode}"


# Samples each serving mode's outputs are compared on with the model's plain outputs.
CHECK_SAMPLES = 64


def _serve(
    models: Mapping[str, torch.nn.Module],
    files: Mapping[str, Path],
    onnx_files: Mapping[str, Path],
    timed: list[str],
    data: ModelData,
    config: BenchmarkConfig,
    device: torch.device,
    metrics: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Runner]]:
    """`{name: {mode: runner}}` of the timed models in every mode that runs them; each other mode
    gets `metrics[name]["serving"][mode] = {"unavailable": reason}`, each mode that runs its check
    (`max_abs_difference` against plain, `lossless`)."""
    check = _inputs(data, min(CHECK_SAMPLES, data.num_samples), device)
    served: dict[str, dict[str, Runner]] = {}
    for name in models:
        metrics[name]["serving"] = {}
    for name in timed:
        model = ServedModel(models[name], files.get(name), onnx_files.get(name))
        served[name] = {"plain": serve("plain", model, device)}
        others = [mode for mode in config.serving if mode != "plain"]
        if others:
            with torch.inference_mode():
                expected = served[name]["plain"].outputs(check)
        for mode in others:
            try:
                runner = serve(mode, model, device)
                with torch.inference_mode():
                    actual = run_checked(f"it does not run in {mode} mode", lambda: runner.outputs(check))
                    for batch_size in config.batch_sizes:
                        call = runner.bind(_inputs(data, batch_size, device))
                        run_checked(f"it does not run in {mode} mode at batch {batch_size}", call)
                difference, within = max_abs_difference(expected, actual)
            except ServingUnavailable as unavailable:
                metrics[name]["serving"][mode] = {"unavailable": unavailable.reason}
                continue
            served[name][mode] = runner
            metrics[name]["serving"][mode] = {"max_abs_difference": difference, "lossless": within}
    return served


def _latency(
    served: dict[str, dict[str, Runner]],
    timed: list[str],
    reference: str,
    data: ModelData,
    config: BenchmarkConfig,
    device: torch.device,
    metrics: dict[str, dict[str, Any]],
    progress: ProgressFn,
) -> tuple[dict[str, dict[str, dict[str, float | int]]], LatencyResult]:
    """Fill latency and throughput into `metrics` (plain at the top, every other mode under
    `serving`); return the paired speed-ups of the plain models and the timings."""
    for name in metrics:
        metrics[name]["latency_ms"], metrics[name]["throughput_per_s"] = {}, {}
    if not timed:
        return {}, LatencyResult()
    calls = {}
    for batch_size in config.batch_sizes:
        inputs = _inputs(data, batch_size, device)
        calls[batch_size] = {
            _key(name, mode): runner.bind(inputs) for name in timed for mode, runner in served[name].items()
        }
    meter = energy_meter(device)
    with torch.inference_mode():
        result = time_interleaved(calls, config, device, progress, reference=reference, meter=meter)
    speedup: dict[str, dict[str, dict[str, float | int]]] = {}
    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    for name in timed:
        for mode in served[name]:
            key = _key(name, mode)
            figures = metrics[name] if mode == "plain" else metrics[name]["serving"][mode]
            figures.update({"latency_ms": {}, "throughput_per_s": {}, "energy": {}})
            if mode != "plain":
                figures["speedup"] = {}
            for batch_size in config.batch_sizes:
                usage = result.usage[key][batch_size]
                summary = latency_summary(result.samples_ms[key][batch_size], usage, threads)
                figures["latency_ms"][str(batch_size)] = summary
                figures["throughput_per_s"][str(batch_size)] = batch_size / (summary["mean"] / 1000)
                figures["energy"][str(batch_size)] = {
                    "cpu_ms_per_call": 1000 * usage.cpu_s / max(usage.calls, 1),
                    "joules_per_call": None if usage.joules is None else usage.joules / max(usage.calls, 1),
                    "noisy": summary["noisy"],
                }
                if reference not in timed or key == reference:
                    continue
                paired = paired_speedup(
                    result.round_medians_ms[reference][batch_size], result.round_medians_ms[key][batch_size]
                )
                if mode == "plain":
                    speedup.setdefault(name, {})[str(batch_size)] = paired
                else:
                    figures["speedup"][str(batch_size)] = paired
    return speedup, result


def _modes_run(metrics: dict[str, dict[str, Any]], name: str, modes: Iterable[str], lossless_only: bool) -> list[str]:
    """The modes a timed model was run in, plain first; with `lossless_only`, only those whose
    outputs agree with plain within float tolerance."""
    serving = metrics[name]["serving"]
    ran = [mode for mode in modes if "latency_ms" in serving.get(mode, {})]
    return ["plain"] + [mode for mode in ran if serving[mode]["lossless"] or not lossless_only]


def _floor(
    timings: LatencyResult,
    metrics: dict[str, dict[str, Any]],
    timed: list[str],
    reference: str,
    lossless: set[str],
    config: BenchmarkConfig,
    notes: list[str],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """The lossless floor per batch size, and each lossy model's fastest mode over it."""
    if reference not in timed:
        return {}, {}
    for name in sorted(lossless & set(timed)):
        for mode, figures in metrics[name]["serving"].items():
            if figures.get("lossless") is False:
                notes.append(
                    f"{name} served {mode} differs from its plain outputs by {figures['max_abs_difference']:.3g}, "
                    "beyond float tolerance: it is not counted in the lossless floor"
                )
    rounds = timings.round_medians_ms
    floor: dict[str, dict[str, Any]] = {}
    beyond: dict[str, dict[str, dict[str, Any]]] = {}
    for batch_size in config.batch_sizes:

        def over(base: tuple[str, str], served: tuple[str, str], _batch: int = batch_size) -> dict:
            """The paired speed-up of (model, mode) `served` over (model, mode) `base`."""
            return paired_speedup(rounds[_key(*base)][_batch], rounds[_key(*served)][_batch])

        plain = (reference, "plain")
        candidates = [(n, m) for n in timed if n in lossless for m in _modes_run(metrics, n, config.serving, True)]
        fastest = max(candidates, key=lambda candidate: over(plain, candidate)["median"])
        figures = metrics[fastest[0]] if fastest[1] == "plain" else metrics[fastest[0]]["serving"][fastest[1]]
        floor[str(batch_size)] = {
            "model": fastest[0],
            "mode": fastest[1],
            "p50_ms": figures["latency_ms"][str(batch_size)]["p50"],
            **over(plain, fastest),
        }
        for name in timed:
            if name in lossless:
                continue
            modes = _modes_run(metrics, name, config.serving, False)
            mode = max(modes, key=lambda m: over(plain, (name, m))["median"])
            beyond.setdefault(name, {})[str(batch_size)] = {"mode": mode, **over(fastest, (name, mode))}
    return floor, beyond


def _metering(what: str, function: Callable, *args: Any) -> Any:
    """`function(*args)` of the meter's own that runs no model code: a failure there is the service's."""
    try:
        return function(*args)
    except (EngineError, MemoryError):
        raise
    except Exception as exc:
        raise MeterError(what, exc) from exc


def _environment(device: torch.device, config: BenchmarkConfig) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_label, device_name = f"cuda:{index}", torch.cuda.get_device_name(index)
    else:
        device_label, device_name = "cpu", _cpu_name()
    return {
        "device": device_label,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "worker": socket.gethostname(),
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "batch_sizes": list(config.batch_sizes),
        "warmup": max(config.warmup, MIN_WARMUP),
        "iterations": config.iterations_per_round * config.rounds,
        "energy": "joules per call from the device's meter; cpu_ms_per_call: process CPU time over the timed calls",
        "rounds": config.rounds,
        "confidence_interval": "order statistics of the per-round ratios around their median (distribution-free)",
        "timing": "cuda events, synchronised per call" if device.type == "cuda" else "perf_counter per call",
    }


def _load_average() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages (every process of the host, not this job's)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask; the worker adds its cgroup quota)."""
    return len(os.sched_getaffinity(0))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None: strict JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
