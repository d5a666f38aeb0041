"""What the model sandbox costs: start-up per run and per validation, and whether a job's reported
latencies move when the same job runs inside it instead of outside.

Each figure pairs a sandboxed run with an unsandboxed one, alternating which goes first, so both
see the same machine; ratios are per pair, then the median and range over pairs.

Run: .venv/bin/python benchmarks/sandbox_overhead.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("COMPACTOR_DATA_DIR", tempfile.mkdtemp(prefix="compactor-bench-"))

import torch

from app.settings import get_settings
from tests.zoo import TinyResNet, trace
from worker.isolation import Limits, job_limits, run_isolated
from worker.sandbox import JobDir

PAIRS = 8
JOB_PAIRS = 4


def with_sandbox(mode: str, run):
    os.environ["COMPACTOR_SANDBOX"] = mode
    get_settings.cache_clear()
    try:
        return run()
    finally:
        get_settings.cache_clear()


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def paired(label: str, make_run, pairs: int) -> None:
    on, off = [], []
    for index in range(pairs):
        order = ("on", "off") if index % 2 == 0 else ("off", "on")
        for mode in order:
            (on if mode == "on" else off).append(with_sandbox(mode, lambda: timed(make_run(mode))))
    extra = [a - b for a, b in zip(on, off)]
    print(f"{label}: sandboxed median {statistics.median(on) * 1000:.0f} ms, unsandboxed "
          f"{statistics.median(off) * 1000:.0f} ms, added per run median {statistics.median(extra) * 1000:.0f} ms "
          f"(range {min(extra) * 1000:.0f} to {max(extra) * 1000:.0f} ms, {pairs} pairs)")


def job_run(model_path: Path, work: Path, batch_sizes: list[int]):
    def make(mode: str):
        def run():
            job = JobDir.create(work, "bench-", sandboxed=(mode == "on"))
            try:
                files = {"model": job.add_input("model.pt", model_path), "calibration": None, "evaluation": None,
                         "students": {}, "output_dir": job.inside("out")}
                spec = {"input_spec": [{"shape": [1, 1, 32, 32], "dtype": "float32"}], "steps": [],
                        "benchmark": {"batch_sizes": batch_sizes, "warmup": 10, "iterations": 200, "threads": 1}}
                return run_isolated("worker.runner:execute_job", {"spec": spec, "files": files, "device": "cpu"},
                                    job_limits(600), job=job)
            finally:
                job.remove()
        return run
    return make


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="compactor-bench-work-"))
    model_path = work / "resnet.pt"
    torch.jit.save(trace(TinyResNet(), torch.rand(2, 1, 32, 32)), str(model_path))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads 1 in every measured job")

    paired("start-up of an empty run (probe)", lambda mode: lambda: run_isolated(
        "worker.sandbox_child:probe", {}, Limits(60)), PAIRS)

    def validation(mode: str):
        def run():
            job = JobDir.create(work, "validate-", sandboxed=(mode == "on"))
            try:
                path = job.add_input("model.pt", model_path)
                run_isolated("worker.validation:validate_model", {"path": path}, job_limits(300), job=job)
            finally:
                job.remove()
        return run
    paired("validation of the ResNet-style model", validation, PAIRS)

    batch_sizes = [1, 32]
    make = job_run(model_path, work, batch_sizes)
    ratios = {b: [] for b in batch_sizes}
    p50 = {("on", b): [] for b in batch_sizes} | {("off", b): [] for b in batch_sizes}
    for index in range(JOB_PAIRS):
        order = ("on", "off") if index % 2 == 0 else ("off", "on")
        results = {mode: with_sandbox(mode, make(mode)) for mode in order}
        for b in batch_sizes:
            on = results["on"]["report"]["baseline"]["latency_ms"][str(b)]["p50"]
            off = results["off"]["report"]["baseline"]["latency_ms"][str(b)]["p50"]
            p50[("on", b)].append(on)
            p50[("off", b)].append(off)
            ratios[b].append(on / off)
    for b in batch_sizes:
        print(f"profile job, ResNet-style, batch {b}: report p50 sandboxed {statistics.median(p50[('on', b)]):.3f} ms, "
              f"unsandboxed {statistics.median(p50[('off', b)]):.3f} ms; ratio per pair median "
              f"{statistics.median(ratios[b]):.3f} (range {min(ratios[b]):.3f}-{max(ratios[b]):.3f}, {JOB_PAIRS} pairs)")


if __name__ == "__main__":
    main()
