"""Shared measuring for the quantize benchmarks: interleaved latency, file size, output agreement.

Models are timed in turn within one loop (baseline, candidate, baseline, …), so machine noise
hits them alike; the median of the per-call times is reported.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


BLOCK = 10


def interleaved_latency_ms(
    models: dict[str, Callable], inputs: Sequence[torch.Tensor], iterations: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds per call of each model on `inputs`, the models taking turns in blocks.

    Blocks of consecutive calls, in an order that rotates every round: a call right after another
    model runs with that model's weights in the cache, and alternating call by call charged that
    to whichever model most often followed the float one (an 18 % bias seen on a small ResNet).
    """
    block = max(1, min(BLOCK, iterations))
    with torch.no_grad():
        for _ in range(warmup):
            for model in models.values():
                model(*inputs)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for round_index in range(max(1, iterations // block)):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(block):
                    start = time.perf_counter()
                    models[name](*inputs)
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def file_size(model: torch.jit.ScriptModule) -> int:
    """Bytes of `torch.jit.save(model)`."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    return buffer.tell()


def reload(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The model after a save/load round trip (what a user of the artifact runs)."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def cosine_min(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Minimum per-sample cosine similarity."""
    return float(torch.nn.functional.cosine_similarity(reference.flatten(1), candidate.flatten(1), dim=1).min())


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned text table."""
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def latency_rounds(
    models: dict[str, Callable], inputs: Sequence[torch.Tensor], rounds: int = 3, iterations: int = 15
) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) over `rounds` of each model's interleaved median ms per call."""
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, ms in interleaved_latency_ms(models, inputs, iterations=iterations).items():
            medians[name].append(ms)
    return {name: (statistics.median(v), min(v), max(v)) for name, v in medians.items()}


def spread(values: tuple[float, float, float]) -> str:
    """`12.3 [11.9–13.0]`: a median with its range."""
    return f"{values[0]:.3f} [{values[1]:.3f}–{values[2]:.3f}]"


def round_medians(
    models: dict[str, Callable], inputs: Sequence[torch.Tensor], rounds: int = 5, iterations: int = 15
) -> dict[str, list[float]]:
    """Per model, its interleaved median ms in each of `rounds` rounds."""
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, ms in interleaved_latency_ms(models, inputs, iterations=iterations).items():
            medians[name].append(ms)
    return medians


def paired(medians: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float, float]]:
    """Per model, (median, min, max) of its speed-up over `baseline` paired round by round."""
    ratios = {name: [b / m for b, m in zip(medians[baseline], values)] for name, values in medians.items()}
    return {name: (statistics.median(v), min(v), max(v)) for name, v in ratios.items()}


def paired_speedups(
    models: dict[str, Callable], inputs: Sequence[torch.Tensor], baseline: str, rounds: int = 5, iterations: int = 15
) -> tuple[dict[str, tuple[float, float, float]], dict[str, tuple[float, float, float]]]:
    """Per model, (median, min, max) over `rounds` of its interleaved median ms, and of the
    speed-up over `baseline` paired round by round (each round's baseline over that round's model)."""
    medians = round_medians(models, inputs, rounds, iterations)
    summary = {name: (statistics.median(v), min(v), max(v)) for name, v in medians.items()}
    return summary, paired(medians, baseline)
