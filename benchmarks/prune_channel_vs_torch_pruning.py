"""Channel pruning on TorchScript vs Torch-Pruning on the eager twin of the same trained model.

A TinyResNet trained for a few epochs on scikit-learn's digits (32×32) is traced; our `prune`
step removes half of every group's channels from the TorchScript model, and Torch-Pruning's
MagnitudePruner does the same to the eager model (it cannot take TorchScript at all). Printed:
parameter ratio, MAC ratio, latency speed-up at batch 1 and 32 (interleaved in this process, both
pruned models run as TorchScript) and top-1 accuracy before any recovery training.

Run: .venv/bin/python benchmarks/prune_channel_vs_torch_pruning.py [--epochs 3] [--scope layer]
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
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                start = time.perf_counter()
                models[name](batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--scope", default="layer", choices=("layer", "global"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    x_train, y_train, x_test, y_test = zoo.digits()
    eager = zoo.train_classifier(zoo.TinyResNet(), x_train, y_train, epochs=args.epochs)
    example = x_test[:1]
    original = torch.jit.trace(eager, example)

    ctx = PipelineContext(teacher=original, calibration=ModelData((x_train[:256],), y_train[:256]),
                          evaluation=ModelData((x_test,), y_test))
    step = {"op": "prune", "structure": "channel", "criterion": "l1", "amount": args.amount, "scope": args.scope}
    start = time.perf_counter()
    ours = run_step(original, step, ctx).model
    ours_seconds = time.perf_counter() - start

    twin = copy.deepcopy(eager).eval()
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        twin, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=args.amount,
        global_pruning=args.scope == "global", ignored_layers=[twin.fc])
    pruner.step()
    tp_seconds = time.perf_counter() - start
    theirs = torch.jit.trace(twin.eval(), example)

    models = {"original": original, "ours": ours, "torch_pruning": theirs}
    base_params, base_macs = parameters(original), macs(original, example)
    print(f"TinyResNet on digits, {args.epochs} epochs, channel pruning amount={args.amount} scope={args.scope} "
          f"criterion=l1, {torch.get_num_threads()} thread(s)")
    print(f"prune time: ours {ours_seconds:.2f}s, torch_pruning {tp_seconds:.2f}s")
    latency = {b: interleaved_latency(models, x_test[:b].contiguous(), rounds=300 if b == 1 else 60) for b in (1, 32)}
    print(f"{'model':15s} {'params':>8s} {'ratio':>6s} {'MACs':>11s} {'ratio':>6s} "
          f"{'ms@1':>7s} {'x@1':>5s} {'ms@32':>7s} {'x@32':>5s} {'top1':>6s}")
    figures = {}
    for name, model in models.items():
        p, m = parameters(model), macs(model, example)
        speedups = {b: latency[b]["original"] / latency[b][name] for b in (1, 32)}
        top1 = zoo.accuracy(model, x_test, y_test)
        figures[name] = (p / base_params, m / base_macs, speedups)
        print(f"{name:15s} {p:8d} {p / base_params:6.3f} {m:11d} {m / base_macs:6.3f} "
              f"{latency[1][name]:7.3f} {speedups[1]:5.2f} {latency[32][name]:7.2f} {speedups[32]:5.2f} {top1:6.3f}")

    print("our other criteria at the same amount (accuracy before recovery):")
    for criterion in ("l2", "gradient", "entropy", "bn_scale"):
        model = run_step(original, {**step, "criterion": criterion}, ctx).model
        print(f"  {criterion:9s} params {parameters(model) / base_params:.3f}  MACs {macs(model, example) / base_macs:.3f}"
              f"  top1 {zoo.accuracy(model, x_test, y_test):.3f}")

    _, ours_macs, ours_speed = figures["ours"]
    _, tp_macs, tp_speed = figures["torch_pruning"]
    mac_target = (1 - ours_macs) / (1 - tp_macs)
    print(f"MAC reduction ours/torch_pruning: {mac_target:.3f} (target >= 0.9)")
    for b in (1, 32):
        print(f"speed-up ours/torch_pruning at batch {b}: {ours_speed[b] / tp_speed[b]:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
