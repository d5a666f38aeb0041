"""Latency that holds up: models timed interleaved in one process, per batch size, in rounds.

Every round times each model for a block of calls, rotating which model goes first, so slow
drifts of the machine (thermal, other tenants) hit all models alike; speed-ups are the median of
the per-round ratios, with their spread and a distribution-free confidence interval for that
median (order statistics of the rounds, `median_interval`). Rounds are added until every
speed-up's interval is narrow or the time budget ends; a figure left wide is marked `noisy`.
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
from worker.engines.measure.energy import EnergyMeter, cpu_seconds, runqueue_wait_s
from worker.engines.measure.serving import SERVING_MODES

# TorchScript's profiling executor records shapes on the first call and optimises the graph on
# the second, so fewer warm-up calls would time the profiling run.
MIN_WARMUP = 2
# confidence of a speed-up's interval, and the width (high / low - 1) below which it is narrow
CONFIDENCE = 0.95
NARROW = 0.10
# a latency figure is noisy when its threads waited for a CPU this share of the time they ran
NOISY_CPU_WAIT = 0.10


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
        max_rounds: rounds at most, adding rounds while a speed-up's interval is wide.
        extra_time_s: seconds the added rounds may take in all (the budget after `rounds`).
        serving: the serving modes every timed model is run in (`serving.SERVING_MODES`), side by
            side in the same rounds; `plain` is always among them (the speed-ups divide by it).
        time_stages: whether a job times every stage and its compiled baseline, or only the
            baseline and the result (the caller, worker/runner.py, chooses `latency_for` by it).

    Example:
        BenchmarkConfig.from_spec({"device": "cpu", "batch_sizes": [1, 32], "serving": ["plain", "optimized"]})
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
    max_rounds: int = 31
    extra_time_s: float = 30.0
    serving: Sequence[str] = ("plain",)
    time_stages: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        object.__setattr__(self, "serving", tuple(self.serving))
        unknown = [mode for mode in self.serving if mode not in SERVING_MODES]
        if unknown:
            raise EngineError(
                "invalid_benchmark", f"unknown serving mode {unknown[0]!r}: use {', '.join(SERVING_MODES)}"
            )
        if "plain" not in self.serving or len(set(self.serving)) != len(self.serving):
            raise EngineError(
                "invalid_benchmark",
                "serving lists each mode once and includes 'plain' (the model as loaded, which speed-ups divide by)",
            )
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
class Usage:
    """What one model's timed calls at one batch size cost: wall and CPU seconds, seconds its
    threads waited for a CPU (None: no scheduler statistics), joules (None: no meter)."""

    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    wait_s: float | None = 0.0
    joules: float | None = 0.0


@dataclass
class LatencyResult:
    """Per model and batch size: every timed call (ms), each round's median (ms), and usage."""

    samples_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    round_medians_ms: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    usage: dict[str, dict[int, Usage]] = field(default_factory=dict)


def time_interleaved(
    calls: dict[int, dict[str, Call]],
    config: BenchmarkConfig,
    device: torch.device,
    progress: Callable[[float, str], None] = lambda f, m: None,
    reference: str | None = None,
    meter: EnergyMeter | None = None,
) -> LatencyResult:
    """Time each model's call per batch size, interleaved over `config.rounds` rounds or more.

    Args:
        calls: `{batch_size: {model_name: zero-argument call running one inference}}`.
        config: warm-up, iterations, rounds, and the limits of added rounds.
        device: where the calls compute (CUDA is timed with events, synchronised per call).
        progress: `progress(fraction, message)`.
        reference: the model speed-ups divide by; while one of them has a wide interval (and
            `config.max_rounds`, `config.extra_time_s` allow) another round is timed.
        meter: an energy counter read around every timed block (None: no energy).

    Returns:
        A `LatencyResult` with every timed call, every round's median (ms) and the usage.

    Example:
        result = time_interleaved({1: {"a": lambda: a(x), "b": lambda: b(x)}}, BenchmarkConfig(), torch.device("cpu"))
    """
    timer = _cuda_call_ms if device.type == "cuda" else _cpu_call_ms
    result = LatencyResult()
    steps = sum(len(models) for models in calls.values()) * config.rounds
    done = 0
    budget_per_batch = config.extra_time_s / max(len(calls), 1)
    for batch_size, models in calls.items():
        names = list(models)
        for name in names:
            for _ in range(max(config.warmup, MIN_WARMUP)):
                models[name]()
            result.samples_ms.setdefault(name, {})[batch_size] = []
            result.round_medians_ms.setdefault(name, {})[batch_size] = []
            result.usage.setdefault(name, {})[batch_size] = Usage(joules=None if meter is None else 0.0)
        round_index, extra_started = 0, None
        while True:
            if round_index >= config.rounds:
                extra_started = extra_started or time.perf_counter()
                if (
                    round_index >= config.max_rounds
                    or time.perf_counter() - extra_started > budget_per_batch
                    or _narrow(result, batch_size, names, reference)
                ):
                    break
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                block = _time_block(
                    models[name], config.iterations_per_round, timer, device, result.usage[name][batch_size], meter
                )
                result.samples_ms[name][batch_size].extend(block)
                result.round_medians_ms[name][batch_size].append(statistics.median(block))
                done += 1
            round_index += 1
            progress(min(done / steps, 1.0), f"timing batch {batch_size}, round {round_index}")
    return result


def _narrow(result: LatencyResult, batch_size: int, names: list[str], reference: str | None) -> bool:
    if reference is None or reference not in names:
        return True
    return all(
        not paired_speedup(result.round_medians_ms[reference][batch_size], result.round_medians_ms[name][batch_size])[
            "noisy"
        ]
        for name in names
        if name != reference
    )


def _time_block(
    call: Call,
    count: int,
    timer: Callable[[Call, torch.device], float],
    device: torch.device,
    usage: Usage,
    meter: EnergyMeter | None,
) -> list[float]:
    # A garbage collection inside a timed call would be charged to whichever model was running.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        joules, wait, cpu, wall = meter.read() if meter else None, runqueue_wait_s(), cpu_seconds(), time.perf_counter()
        block = [timer(call, device) for _ in range(count)]
        usage.wall_s += time.perf_counter() - wall
        usage.cpu_s += cpu_seconds() - cpu
        waited = runqueue_wait_s()
        usage.wait_s = None if wait is None or waited is None or usage.wait_s is None else usage.wait_s + waited - wait
        if meter is not None and usage.joules is not None:
            usage.joules += meter.read() - joules
        usage.calls += count
        return block
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


def latency_summary(samples_ms: Sequence[float], usage: Usage | None = None, threads: int = 1) -> dict:
    """`{p50, p90, p99, mean, iterations, cpu_wait, noisy}` of per-call latencies in milliseconds.

    `cpu_wait` is the time the process's threads waited for a CPU while runnable, over `threads`
    × the wall time of the calls (None where the kernel keeps no scheduler statistics); above
    `NOISY_CPU_WAIT` the host was oversubscribed while timing and the figure is `noisy`.
    """
    wait = None
    if usage is not None and usage.wait_s is not None and usage.wall_s > 0:
        wait = usage.wait_s / (usage.wall_s * max(threads, 1))
    return {
        "p50": percentile(samples_ms, 50),
        "p90": percentile(samples_ms, 90),
        "p99": percentile(samples_ms, 99),
        "mean": statistics.fmean(samples_ms),
        "iterations": len(samples_ms),
        "cpu_wait": wait,
        "noisy": wait is not None and wait > NOISY_CPU_WAIT,
    }


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of `values`: order statistics
    `[x_(k), x_(n+1-k)]`, k the largest with P(Binomial(n, ½) < k) ≤ (1 - confidence) / 2.

    Exact for any continuous distribution and needs no resampling (so it is deterministic). With
    fewer than 6 values no interval reaches 95 %; `[min, max]` is returned with its lower coverage.

    Returns:
        `(low, high, coverage)`.

    Example:
        median_interval([0.98, 1.02, 1.05, 1.01, 0.99, 1.03, 1.00])  # (0.98, 1.05, 0.984)
    """
    ordered, n = sorted(values), len(values)
    tail, below, k = (1 - confidence) / 2, 0.0, 1
    for j in range(n):
        below += math.comb(n, j) / 2**n
        if below > tail:
            break
        k = j + 1
    k = max(min(k, (n + 1) // 2), 1)
    coverage = 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n
    return ordered[k - 1], ordered[n - k], coverage


def paired_speedup(reference_rounds_ms: Sequence[float], rounds_ms: Sequence[float]) -> dict:
    """`{median, min, max, rounds, interval, noisy}` of the per-round ratios reference / model latency.

    `interval` is `median_interval`'s `{low, high, confidence}`; `noisy` when it is wider than
    `NARROW` (high / low - 1) or reaches less than `CONFIDENCE`.
    """
    ratios = [ref / own for ref, own in zip(reference_rounds_ms, rounds_ms)]
    low, high, coverage = median_interval(ratios)
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "interval": {"low": low, "high": high, "confidence": round(coverage, 4)},
        "noisy": coverage < CONFIDENCE or high / low - 1 > NARROW,
    }
