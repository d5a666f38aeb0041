"""Check the measurement harness against independent measurements.

1. For three test models and two batch sizes, the p50 latency `measure_models` reports against
   `torch.utils.benchmark.Timer` run in the same process on the same inputs; they must agree
   within 10%. The two are interleaved (REPEATS alternations, median of each), so both see the
   same machine. Timer's median over short blocks (`timeit(number=k)` repeated, k calls ≈ 0.2 ms)
   is the like-for-like figure and is the one checked; `blocked_autorange`'s median (of longer
   block means) is printed beside it: on a quiet machine it agrees too, on a shared one it also
   absorbs the time the process spends preempted.
2. The MACs `measure_models` reports for a CNN against a hand count; they must be equal.

Run: .venv/bin/python benchmarks/measure_vs_torch_benchmark.py   (exit status 1 if a check fails)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.zoo import SequentialCNN, TinyResNet, TransformerMLP, script, trace
from worker.engines.data import ModelData
from worker.engines.measure import BenchmarkConfig, measure_models

BATCH_SIZES = (1, 32)
CALLS = {1: 60, 32: 12}  # timed calls per repeat and side: short, so that both sides see the same load
REPEATS = 9
SHORT_BLOCK_MS = 0.2
TOLERANCE = 0.10
THREADS = 1


def _models() -> dict[str, tuple[torch.jit.ScriptModule, torch.Tensor]]:
    image = torch.rand(64, 1, 32, 32)
    tokens = torch.rand(64, 64)
    return {
        "SequentialCNN (traced)": (trace(SequentialCNN(), image[:1]), image),
        "TinyResNet (scripted)": (script(TinyResNet()), image),
        "TransformerMLP (scripted)": (script(TransformerMLP()), tokens),
    }


def _timer_medians_ms(
    model: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...], calls: int, estimate_ms: float
) -> tuple[float, float]:
    """Timer's median over short blocks, and blocked_autorange's median of block means (ms).

    A block is one call, or a few back-to-back calls for sub-0.2 ms models: a lone timed call
    after Timer's own bookkeeping runs with colder caches than a call in a steady stream.
    """
    timer = torch_benchmark.Timer(
        stmt="model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=THREADS
    )
    per_block = max(1, int(SHORT_BLOCK_MS / estimate_ms))
    with torch.inference_mode():
        short = statistics.median(timer.timeit(number=per_block).median for _ in range(max(calls // per_block, 30)))
        blocked = timer.blocked_autorange(min_run_time=0.5).median
    return short * 1000, blocked * 1000


def main() -> int:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    failures = 0
    macs = {}
    print(f"threads={THREADS}  torch={torch.__version__}  repeats={REPEATS}  cpu load: {os.getloadavg()[0]:.1f}")
    print(
        f"{'model':26s} {'batch':>5s} {'measure p50':>12s} {'Timer p50':>10s} {'ratio':>6s}   "
        f"{'blocked':>8s} {'ratio':>6s}   (ms)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, data) in _models().items():
            path = Path(tmp) / "model.pt"
            torch.jit.save(model, str(path))
            for batch in BATCH_SIZES:
                config = BenchmarkConfig(
                    batch_sizes=[batch],
                    warmup=10,
                    iterations=CALLS[batch],
                    rounds=3,
                    threads=THREADS,
                    measure_memory=False,
                    eval_samples=batch,
                )
                ours, single, blocked = [], [], []
                for repeat in range(REPEATS):

                    def run_ours():
                        result = measure_models({name: model}, {name: path}, name, ModelData((data,)), config)
                        ours.append(result.metrics[name]["latency_ms"][str(batch)]["p50"])
                        return result

                    def run_timer():
                        estimate = ours[-1] if ours else 1.0
                        timer_single, timer_blocked = _timer_medians_ms(model, (data[:batch],), CALLS[batch], estimate)
                        single.append(timer_single)
                        blocked.append(timer_blocked)

                    # Alternate which goes first, so a drift within a repeat does not favour one side.
                    if repeat % 2:
                        run_timer()
                        measurement = run_ours()
                    else:
                        measurement = run_ours()
                        run_timer()
                macs[name] = measurement.metrics[name]["macs"]
                ours_ms, single_ms, blocked_ms = (statistics.median(v) for v in (ours, single, blocked))
                # Paired: this VM's speed drifts by ±30 % over seconds, so each repeat's two figures
                # (taken back to back) are compared, and the median of those ratios is the verdict.
                ratio = statistics.median(o / t for o, t in zip(ours, single))
                ok = abs(ratio - 1) <= TOLERANCE
                failures += not ok
                print(
                    f"{name:26s} {batch:5d} {ours_ms:12.4f} {single_ms:10.4f} {ratio:6.3f}   "
                    f"{blocked_ms:8.4f} {ours_ms / blocked_ms:6.3f}{'' if ok else '   FAIL'}"
                )

    # SequentialCNN on one 1×32×32 image: conv = output elements × (Cin/groups × kh × kw).
    hand = (16 * 32 * 32) * (1 * 3 * 3) + (32 * 16 * 16) * (16 * 3 * 3) + 64 * 2048 + 10 * 64
    counted = macs["SequentialCNN (traced)"]
    failures += counted != hand
    print(
        f"\nMACs SequentialCNN: measure_models={counted:,}  hand count={hand:,}  "
        f"{'exact' if counted == hand else 'MISMATCH'}"
    )
    print(f"MACs TinyResNet={macs['TinyResNet (scripted)']:,}  TransformerMLP={macs['TransformerMLP (scripted)']:,}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
