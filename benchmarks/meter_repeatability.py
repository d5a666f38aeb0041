"""Identical jobs, identical outcomes: a burst of dynamic_int8 jobs through the engines and the meter.

Issue 17 saw 1 of 4 MiniLM `min_fidelity` jobs and 2 of 24 small-CNN jobs fail in the meter. This
runs the same jobs in-process, through the engines exactly as a job's child process does
(`run_step`, then `measure_models` of baseline and result), one after the other (the service burst
is too slow on a 2-core host): it prints how many succeeded, the distinct layer choices (precision
per layer and the oneDNN layers) and the failures. With `--p50` it prints a small CNN's report p50
at batch 1 alone and beside a CPU-bound process, with the process's default threads (before issue
17: every core) and with the worker's share (after: one thread per job on this 2-slot host).

Run: .venv/bin/python benchmarks/meter_repeatability.py [--cnn 50] [--minilm 10] [--p50]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch

from tests.zoo import SequentialCNN, digits, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.measure import BenchmarkConfig, measure_models
from worker.engines.pipeline import PipelineContext, run_step

CONFIG = BenchmarkConfig(batch_sizes=[1], warmup=2, iterations=20, rounds=4, max_rounds=4, measure_memory=False)


def burst(label: str, model, data, step: dict, repeats: int) -> None:
    choices: collections.Counter = collections.Counter()
    failures: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.manual_seed(0)
        try:
            out = run_step(model, step, PipelineContext(teacher=model, calibration=data, evaluation=data))
            measure_models({"baseline": model, "result": out.model}, {}, "baseline", data, CONFIG)
            layers = tuple((row["module"], row["precision"]) for row in out.details["layers"])
            choices[(layers, tuple(out.details.get("linear_kernels", {}).get("onednn", [])))] += 1
        except Exception as exc:  # the figure this prints is exactly how many fail, and why
            failures[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
    seconds = time.perf_counter() - started
    print(
        f"\n{label}: {repeats} jobs in {seconds:.0f} s: {sum(choices.values())} succeeded, {sum(failures.values())} failed"
    )
    for (layers, onednn), count in choices.items():
        floats = [module for module, precision in layers if precision != "int8"] or ["none"]
        print(f"  {count}× layers {len(layers)}, kept in float: {', '.join(floats)}; oneDNN: {list(onednn) or 'none'}")
    for reason, count in failures.items():
        print(f"  {count}× {reason}")


def cnn():
    x_train, y_train, x_test, _ = digits()
    model = trace(train_classifier(SequentialCNN(), x_train, y_train, epochs=1), x_test[:1])
    return model, ModelData((x_test[:64],))


def minilm():
    from quantize_minilm import load_traced

    model, ids, mask = load_traced(64)
    return model, ModelData((ids, mask))


def p50_alone_and_loaded() -> None:
    model, data = cnn()

    def p50(threads: int | None) -> float:
        config = BenchmarkConfig(batch_sizes=[1], warmup=5, iterations=200, rounds=5, max_rounds=5, threads=threads)
        measured = measure_models({"baseline": model}, {}, "baseline", data, config)
        return measured.metrics["baseline"]["latency_ms"]["1"]["p50"]

    print("\nsmall CNN report p50 at batch 1 (ms): alone, beside one CPU-bound process, ratio")
    default = torch.get_num_threads()
    for label, threads in ((f"before: process default ({default} threads)", default), ("after: share (1 thread)", 1)):
        alone = p50(threads)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            loaded = p50(threads)
        finally:
            hog.kill()
            hog.wait()
        print(f"  {label}: {alone:.3f}, {loaded:.3f}, {loaded / alone:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cnn", type=int, default=50)
    parser.add_argument("--minilm", type=int, default=0)
    parser.add_argument("--p50", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.cnn:
        model, data = cnn()
        burst("small CNN, dynamic_int8", model, data, {"op": "quantize", "scheme": "dynamic_int8"}, args.cnn)
    if args.minilm:
        model, data = minilm()
        step = {"op": "quantize", "scheme": "dynamic_int8", "min_fidelity": 0.99}
        burst("all-MiniLM-L6-v2, dynamic_int8, min_fidelity 0.99", model, data, step, args.minilm)
    if args.p50:
        torch.set_num_threads(os.cpu_count() or 1)
        p50_alone_and_loaded()


if __name__ == "__main__":
    main()
