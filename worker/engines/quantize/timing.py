"""Timing probes' common measure: alternating calls, the fastest call of each counts."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def fastest_ms(calls: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Milliseconds of the fastest of `repeats` calls of each candidate, the candidates alternating.

    Alternating makes machine noise hit every candidate alike; the minimum is kept because other
    processes on a shared CPU only ever add time.

    Args:
        calls: name → a call to time (run without autograd).
        warmup: untimed rounds first (allocation, kernel choice, TorchScript's profiling runs).
        repeats: timed rounds.

    Returns:
        name → milliseconds.

    Example:
        fastest_ms({"float": lambda: lstm(x), "int8": lambda: qlstm(x)}, warmup=1, repeats=5)
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(values) for name, values in times.items()}
