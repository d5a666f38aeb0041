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
from worker.isolation import Limits, current_sandbox, job_limits, run_isolated
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


def run_in_job(work: Path, model_path: Path, target: str, kwargs, time_s: float):
    """`target` in a fresh job directory holding a copy of the model, under the configured sandbox;
    `kwargs(job, model)` builds its arguments from the job and the model's inside path."""
    job = JobDir.create(work, "bench-", current_sandbox())
    try:
        model = job.add_input("model.pt", model_path)
        return run_isolated(target, kwargs(job, model), job_limits(time_s), job=job)
    finally:
        job.remove()


def paired(label: str, run, pairs: int) -> None:
    """Time `run` sandboxed and not, `pairs` times each, alternating which goes first."""
    times = {"on": [], "off": []}
    for index in range(pairs):
        for mode in ("on", "off") if index % 2 == 0 else ("off", "on"):
            times[mode].append(with_sandbox(mode, lambda: timed(run)))
    extra = [a - b for a, b in zip(times["on"], times["off"])]
    print(
        f"{label}: sandboxed median {statistics.median(times['on']) * 1000:.0f} ms, unsandboxed "
        f"{statistics.median(times['off']) * 1000:.0f} ms, added per run median {statistics.median(extra) * 1000:.0f} ms "
        f"(range {min(extra) * 1000:.0f} to {max(extra) * 1000:.0f} ms, {pairs} pairs)"
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="compactor-bench-work-"))
    model_path = work / "resnet.pt"
    torch.jit.save(trace(TinyResNet(), torch.rand(2, 1, 32, 32)), str(model_path))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads 1 in every measured job")

    paired(
        "start-up of an empty run (probe)", lambda: run_isolated("worker.sandbox_child:probe", {}, Limits(60)), PAIRS
    )
    paired(
        "validation of the ResNet-style model",
        lambda: run_in_job(
            work, model_path, "worker.validation:validate_model", lambda job, model: {"path": model}, 300
        ),
        PAIRS,
    )

    batch_sizes = [1, 32]
    spec = {
        "input_spec": [{"shape": [1, 1, 32, 32], "dtype": "float32"}],
        "steps": [],
        "benchmark": {"batch_sizes": batch_sizes, "warmup": 10, "iterations": 200, "threads": 1},
    }

    def profile_job():
        return run_in_job(
            work,
            model_path,
            "worker.runner:execute_job",
            lambda job, model: {
                "spec": spec,
                "device": "cpu",
                "files": {
                    "model": model,
                    "calibration": None,
                    "evaluation": None,
                    "students": {},
                    "output_dir": job.inside("out"),
                },
            },
            600,
        )

    p50 = {(mode, b): [] for mode in ("on", "off") for b in batch_sizes}
    for index in range(JOB_PAIRS):
        for mode in ("on", "off") if index % 2 == 0 else ("off", "on"):
            latency = with_sandbox(mode, profile_job)["report"]["baseline"]["latency_ms"]
            for b in batch_sizes:
                p50[(mode, b)].append(latency[str(b)]["p50"])
    for b in batch_sizes:
        ratios = [on / off for on, off in zip(p50[("on", b)], p50[("off", b)])]
        print(
            f"profile job, ResNet-style, batch {b}: report p50 sandboxed {statistics.median(p50[('on', b)]):.3f} ms, "
            f"unsandboxed {statistics.median(p50[('off', b)]):.3f} ms; ratio per pair median "
            f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, {JOB_PAIRS} pairs)"
        )


if __name__ == "__main__":
    main()
