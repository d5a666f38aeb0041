"""Latency that holds up: models timed interleaved in one process, per batch size, in rounds.

Every round times each model for a block of calls, rotating which model goes first, so slow
drifts of the machine (thermal, other tenants) hit all models alike; speed-ups are the median of
the per-round ratios, and their spread is reported so that noise shows instead of hiding.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from worker.engines.errors import EngineError

# TorchScript's profiling executor records shapes on the first call and optimises the graph on
# the second, so fewer warm-up calls would time the profiling run.
MIN_WARMUP = 2


@dataclass(frozen=True)
class BenchmarkConfig:
    """How models are benchmarked: the JobSpec's `benchmark` object plus harness settings.

    Attributes:
        device: "cpu", "cuda" or "cuda:N"; inputs are moved there (models must already be there).
        batch_sizes: batch sizes to time; each is filled from the evaluation data.
        warmup: untimed calls per model and batch size before timing (at least 2 are made).
        iterations: timed calls per model and batch size, split evenly over `rounds`.
        threads: intra-op CPU threads while measuring; None keeps the process's setting.
        rounds: interleaved rounds; each gives one paired speed-up ratio.
        eval_batch_size: batch size of the accuracy/fidelity pass over the evaluation data.
        eval_samples: cap on evaluation samples for accuracy/fidelity (None: all).
        measure_memory: whether to measure peak memory (on CPU, one subprocess per model).

    Example:
        BenchmarkConfig.from_spec({"device": "cpu", "batch_sizes": [1, 32], "iterations": 200})
    """

    device: str = "cpu"
    batch_sizes: Sequence[int] = (1,)
    warmup: int = 10
    iterations: int = 100
    threads: int | None = None
    rounds: int = 7
    eval_batch_size: int = 64
    eval_samples: int | None = None
    measure_memory: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise EngineError("invalid_benchmark", "batch_sizes must be a non-empty list of positive integers")
        for name in ("iterations", "rounds", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise EngineError("invalid_benchmark", f"{name} must be at least 1")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise EngineError("invalid_benchmark", "warmup must be >= 0 and threads >= 1")

    @classmethod
    def from_spec(cls, spec: dict | None) -> BenchmarkConfig:
        """Build from the JobSpec's `benchmark` object; missing fields take the defaults above."""
        spec = spec or {}
        known = {k: v for k, v in spec.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)

    @property
    def iterations_per_round(self) -> int:
        return math.ceil(self.iterations / self.rounds)


Call = Callable[[], object]


@dataclass
class LatencyResult:
    """Per model and batch size: every timed call (ms) and each round's median (ms)."""

    samples_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    round_medians_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)


def time_interleaved(
    calls: dict[int, dict[str, Call]],
    config: BenchmarkConfig,
    device: torch.device,
    progress: Callable[[float, str], None] = lambda f, m: None,
) -> LatencyResult:
    """Time each model's call per batch size, interleaved over `config.rounds` rounds.

    Args:
        calls: `{batch_size: {model_name: zero-argument call running one inference}}`.
        config: warm-up, iterations and rounds.
        device: where the calls compute (CUDA is timed with events, synchronised per call).
        progress: `progress(fraction, message)`.

    Returns:
        A `LatencyResult` with every timed call and every round's median, in milliseconds.

    Example:
        result = time_interleaved({1: {"a": lambda: a(x), "b": lambda: b(x)}}, BenchmarkConfig(), torch.device("cpu"))
    """
    timer = _cuda_call_ms if device.type == "cuda" else _cpu_call_ms
    result = LatencyResult()
    steps = sum(len(models) for models in calls.values()) * config.rounds
    done = 0
    for batch_size, models in calls.items():
        names = list(models)
        for name in names:
            for _ in range(max(config.warmup, MIN_WARMUP)):
                models[name]()
            result.samples_ms.setdefault(name, {})[batch_size] = []
            result.round_medians_ms.setdefault(name, {})[batch_size] = []
        for round_index in range(config.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                block = _time_block(models[name], config.iterations_per_round, timer, device)
                result.samples_ms[name][batch_size].extend(block)
                result.round_medians_ms[name][batch_size].append(statistics.median(block))
                done += 1
            progress(done / steps, f"timing batch {batch_size}, round {round_index + 1}/{config.rounds}")
    return result


def _time_block(
    call: Call, count: int, timer: Callable[[Call, torch.device], float], device: torch.device
) -> list[float]:
    # A garbage collection inside a timed call would be charged to whichever model was running.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return [timer(call, device) for _ in range(count)]
    finally:
        if gc_was_enabled:
            gc.enable()


def _cpu_call_ms(call: Call, device: torch.device) -> float:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) / 1e6


def _cuda_call_ms(call: Call, device: torch.device) -> float:
    # Synchronising per call times what one request waits for, kernel queueing included.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """`{p50, p90, p99, mean, iterations}` of per-call latencies in milliseconds."""
    return {
        "p50": percentile(samples_ms, 50),
        "p90": percentile(samples_ms, 90),
        "p99": percentile(samples_ms, 99),
        "mean": statistics.fmean(samples_ms),
        "iterations": len(samples_ms),
    }


def paired_speedup(reference_rounds_ms: Sequence[float], rounds_ms: Sequence[float]) -> dict[str, float | int]:
    """`{median, min, max, rounds}` of the per-round ratios reference latency / model latency."""
    ratios = [ref / own for ref, own in zip(reference_rounds_ms, rounds_ms)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}
