"""Channel pruning on TorchScript vs Torch-Pruning on the eager twin of the same trained model.

A TinyResNet trained for a few epochs on scikit-learn's digits (32×32) is traced; at each amount
(0.5 and 0.3) our `prune` step removes that fraction of every group's channels from the
TorchScript model, and Torch-Pruning's MagnitudePruner does the same to the eager model (it
cannot take TorchScript at all). Printed: parameter ratio, MAC ratio, latency speed-up at batch 1
and 32 (interleaved in this process, all pruned models run as TorchScript) and top-1 accuracy
before any recovery training: ours with BatchNorm recalibration (the default) and without it
(`recalibrate_bn: false`), Torch-Pruning's (which has none) as it comes and, for reference, with
our recalibration applied to its traced result.

Run: .venv/bin/python benchmarks/prune_channel_vs_torch_pruning.py [--epochs 3] [--amounts 0.5 0.3] [--scope layer]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch_pruning as tp  # noqa: E402  (dev dependency, benchmark only)
import zoo  # noqa: E402

from worker.engines.data import ModelData  # noqa: E402
from worker.engines.pipeline import PipelineContext, run_step  # noqa: E402
from worker.engines.prune.batchnorm import recalibrate_batchnorm  # noqa: E402


def macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (conv / linear / matmul), counted by the dispatcher."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def interleaved_latency(models: dict[str, torch.nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median milliseconds per forward, the models taking turns so machine noise hits all alike."""
    times = {name: [] for name in models}
    names = list(models)
    with torch.no_grad():
        for _ in range(10):
            for model in models.values():
                model(batch)
        for i in range(rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                start = time.perf_counter()
                models[name](batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def torch_pruning_twin(
    eager: torch.nn.Module, example: torch.Tensor, amount: float, scope: str
) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (L1) on a copy of the eager model; returns it and the seconds taken."""
    twin = copy.deepcopy(eager).eval()
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        twin,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=amount,
        global_pruning=scope == "global",
        ignored_layers=[twin.fc],
    )
    pruner.step()
    return twin.eval(), time.perf_counter() - start


def compare(
    eager: torch.nn.Module,
    original: torch.jit.ScriptModule,
    ctx: PipelineContext,
    amount: float,
    scope: str,
    data: tuple[torch.Tensor, ...],
    other_criteria: bool,
) -> None:
    """Prune at one amount, ours and Torch-Pruning's, and print the table and the speed-up targets."""
    _, _, x_test, y_test = data
    example = x_test[:1]
    step = {"op": "prune", "structure": "channel", "criterion": "l1", "amount": amount, "scope": scope}
    start = time.perf_counter()
    out = run_step(original, step, ctx)
    ours_seconds = time.perf_counter() - start
    ours = out.model
    stale = run_step(original, {**step, "recalibrate_bn": False}, ctx).model
    twin, tp_seconds = torch_pruning_twin(eager, example, amount, scope)
    theirs = torch.jit.trace(twin, example)
    theirs_recalibrated = torch.jit.trace(copy.deepcopy(twin), example)  # a trace shares the twin's buffers
    recalibrate_batchnorm(theirs_recalibrated, original, ctx.calibration, ctx.device)

    recalibration = out.details["bn_recalibration"]
    print(f"\n== amount={amount} scope={scope} criterion=l1")
    print(
        f"prune time: ours {ours_seconds:.2f}s (BatchNorm recalibration of {recalibration['updated']} layers on "
        f"{recalibration['samples']} samples included), torch_pruning {tp_seconds:.2f}s"
    )
    models = {"original": original, "ours": ours, "torch_pruning": theirs}
    top1_without = {"original": None, "ours": stale, "torch_pruning": theirs}
    top1_with = {"original": original, "ours": ours, "torch_pruning": theirs_recalibrated}
    base_params, base_macs = parameters(original), macs(original, example)
    latency = {b: interleaved_latency(models, x_test[:b].contiguous(), rounds=300 if b == 1 else 60) for b in (1, 32)}
    print(
        f"{'model':15s} {'params':>8s} {'ratio':>6s} {'MACs':>11s} {'ratio':>6s} "
        f"{'ms@1':>7s} {'x@1':>5s} {'ms@32':>7s} {'x@32':>5s} {'top1 no-recal':>13s} {'top1 recal':>10s}"
    )
    figures = {}
    for name, model in models.items():
        p, m = parameters(model), macs(model, example)
        speedups = {b: latency[b]["original"] / latency[b][name] for b in (1, 32)}
        without = f"{zoo.accuracy(top1_without[name], x_test, y_test):13.3f}" if top1_without[name] else f"{'-':>13s}"
        figures[name] = (p / base_params, m / base_macs, speedups)
        print(
            f"{name:15s} {p:8d} {p / base_params:6.3f} {m:11d} {m / base_macs:6.3f} "
            f"{latency[1][name]:7.3f} {speedups[1]:5.2f} {latency[32][name]:7.2f} {speedups[32]:5.2f} "
            f"{without} {zoo.accuracy(top1_with[name], x_test, y_test):10.3f}"
        )
    print("(torch_pruning has no recalibration: its 'top1 recal' applies ours to its traced result, for reference)")

    if other_criteria:
        print("our other criteria at the same amount (accuracy before recovery, without -> with recalibration):")
        for criterion in ("l2", "gradient", "entropy", "bn_scale"):
            model = run_step(original, {**step, "criterion": criterion}, ctx).model
            without = run_step(original, {**step, "criterion": criterion, "recalibrate_bn": False}, ctx).model
            print(
                f"  {criterion:9s} params {parameters(model) / base_params:.3f}  MACs {macs(model, example) / base_macs:.3f}"
                f"  top1 {zoo.accuracy(without, x_test, y_test):.3f} -> {zoo.accuracy(model, x_test, y_test):.3f}"
            )

    _, ours_macs, ours_speed = figures["ours"]
    _, tp_macs, tp_speed = figures["torch_pruning"]
    print(f"MAC reduction ours/torch_pruning: {(1 - ours_macs) / (1 - tp_macs):.3f} (target >= 0.9)")
    for b in (1, 32):
        print(f"speed-up ours/torch_pruning at batch {b}: {ours_speed[b] / tp_speed[b]:.3f} (target >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--scope", default="layer", choices=("layer", "global"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = zoo.digits()
    x_train, y_train, x_test, y_test = data
    eager = zoo.train_classifier(zoo.TinyResNet(), x_train, y_train, epochs=args.epochs)
    original = torch.jit.trace(eager, x_test[:1])
    ctx = PipelineContext(
        teacher=original,
        calibration=ModelData((x_train[:256],), y_train[:256]),
        evaluation=ModelData((x_test,), y_test),
    )
    print(
        f"TinyResNet on digits, {args.epochs} epochs, top1 {zoo.accuracy(original, x_test, y_test):.3f}, "
        f"{torch.get_num_threads()} thread(s), calibration: 256 training samples"
    )
    for index, amount in enumerate(args.amounts):
        compare(eager, original, ctx, amount, args.scope, data, other_criteria=index == 0)


if __name__ == "__main__":
    main()
