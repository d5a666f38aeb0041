"""The compile step against plain freezing, `optimized` serving and lossy steps (issue 18).

On the digits CNN and the ResNet-style CNN (trained briefly), at batch 1 and 32, one thread, every
variant reloaded from its bytes (what a user runs) and timed interleaved in one loop:
- plain: the uploaded model;
- freeze: `torch.jit.freeze` alone, saved and reloaded;
- compile: the `compile` step's artifact;
- optimized: `torch.jit.optimize_for_inference` applied after loading the plain model (a serving
  mode: its result cannot be saved);
- static int8, channel prune 50 %, and channel prune 50 % + compile.
Speed-ups are plain latency over the variant's, median over REPEATS interleaved runs with the
min–max of the runs beside it; max |Δ| is against the plain model on the test set.

Run: .venv/bin/python benchmarks/compile_lossless.py   (one thread; a few minutes)
"""

from __future__ import annotations

import statistics

import torch
from quantize_timing import interleaved_latency_ms, print_table, reload

from tests.zoo import SequentialCNN, TinyResNet, digits, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step

REPEATS = 3


def variants(traced: torch.jit.ScriptModule, ctx: PipelineContext) -> dict[str, torch.jit.ScriptModule]:
    pruned = run_step(traced, {"op": "prune", "structure": "channel", "amount": 0.5}, ctx).model.eval()
    return {
        "plain": traced,
        "freeze": reload(torch.jit.freeze(traced.eval())),
        "compile": reload(run_step(traced, {"op": "compile"}, ctx).model),
        "optimized": torch.jit.optimize_for_inference(reload(traced)),
        "static_int8": reload(run_step(traced, {"op": "quantize", "scheme": "static_int8"}, ctx).model),
        "prune50": reload(pruned),
        "prune50+compile": reload(run_step(pruned, {"op": "compile"}, ctx).model),
    }


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    for name, net in (("digits CNN", SequentialCNN()), ("ResNet-style", TinyResNet())):
        torch.manual_seed(0)
        traced = trace(train_classifier(net, x_train, y_train, epochs=2), x_train[:2])
        ctx = PipelineContext(
            teacher=traced,
            calibration=ModelData((x_train[:256],), y_train[:256]),
            evaluation=ModelData((x_test,), y_test),
            batch_sizes=(1, 32),
        )
        models = variants(traced, ctx)
        with torch.inference_mode():
            reference = traced(x_test)
            max_diff = {k: float((m(x_test).float() - reference).abs().max()) for k, m in models.items()}
        rows = []
        for batch in (1, 32):
            inputs = (x_test[:batch],)
            runs = [interleaved_latency_ms(models, inputs, iterations=200, warmup=20) for _ in range(REPEATS)]
            for variant in models:
                speedups = [run["plain"] / run[variant] for run in runs]
                rows.append(
                    (
                        batch,
                        variant,
                        statistics.median(run[variant] for run in runs),
                        statistics.median(speedups),
                        f"{min(speedups):.2f}–{max(speedups):.2f}",
                        f"{max_diff[variant]:.1e}",
                    )
                )
        print_table(
            f"{name}, one thread, {REPEATS} interleaved runs",
            ("batch", "variant", "p50 ms", "speed-up", "range", "max |Δ| vs plain"),
            rows,
        )


if __name__ == "__main__":
    main()
