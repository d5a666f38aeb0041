"""Where a tiny job's seconds go on a worker, phase by phase, with the memory probes forked from a
clean copy of the job's child (`fresh_process`, as the worker runs it) and with fresh interpreters
(as before), paired and alternating which goes first.

The job is the burst's: a 4→4 `tanh` model, no steps, batch 1, warm-up 1, 5 iterations, under the
configured sandbox, one thread. Phases are read from the child's progress messages as they arrive:
sandbox start (bubblewrap, interpreter, imports: up to the "loading" message), loading (model,
data, reference outputs: up to the measurement's start), sizes and quality, peak memory, latency
and latency (the interleaved rounds, then the result and the exit). Prints each phase's
median and range over the pairs.

Run: .venv/bin/python benchmarks/tiny_job_cost.py [--pairs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("COMPACTOR_DATA_DIR", tempfile.mkdtemp(prefix="compactor-bench-"))

import torch

from tests import zoo
from worker.isolation import current_sandbox, job_limits, run_isolated
from worker.sandbox import JobDir

SPEC = {
    "input_spec": [{"shape": [1, 4], "dtype": "float32"}],
    "steps": [],
    "benchmark": {"batch_sizes": [1], "warmup": 1, "iterations": 5, "threads": 1},
}
PHASES = ("sandbox start", "loading", "sizes and quality", "peak memory", "latency", "total")


def one_job(work: Path, model_path: Path, fresh_process: bool) -> dict[str, float]:
    marks = {}
    started = time.perf_counter()

    def on_progress(message: dict) -> bool:
        now = time.perf_counter() - started
        text = message.get("message", "")
        if message.get("stage") == "loading":
            marks.setdefault("loaded_start", now)
        elif text.startswith("measuring baseline"):
            marks.setdefault("measure_start", now)
        elif text.startswith("measured accuracy"):
            marks.setdefault("quality_end", now)
        elif text.startswith("measured peak memory"):
            marks.setdefault("memory_end", now)
        return True

    job = JobDir.create(work, "bench-", current_sandbox())
    try:
        model = job.add_input("model.pt", model_path)
        files = {
            "model": model,
            "calibration": None,
            "evaluation": None,
            "students": {},
            "output_dir": job.inside("out"),
        }
        run_isolated(
            "worker.runner:execute_job",
            {"spec": SPEC, "files": files, "device": "cpu", "extra_time_s": 30.0, "fresh_process": fresh_process},
            job_limits(600),
            on_progress,
            job=job,
        )
        total = time.perf_counter() - started
    finally:
        job.remove()
    return {
        "sandbox start": marks["loaded_start"],
        "loading": marks["measure_start"] - marks["loaded_start"],
        "sizes and quality": marks["quality_end"] - marks["measure_start"],
        "peak memory": marks["memory_end"] - marks["quality_end"],
        "latency": total - marks["memory_end"],  # the rounds, then the result and the exit
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="compactor-bench-work-"))
    model_path = work / "tiny.pt"
    torch.jit.save(zoo.script(zoo.Spinner(10)), str(model_path))
    runs = {True: [], False: []}
    for index in range(args.pairs):
        for fresh in (True, False) if index % 2 == 0 else (False, True):
            runs[fresh].append(one_job(work, model_path, fresh))
    print(f"a tiny job, {args.pairs} pairs, sandbox {current_sandbox().describe()['mode']}, load {os.getloadavg()}")
    for fresh, label in ((True, "probes forked from a clean copy"), (False, "probes in fresh interpreters")):
        cells = []
        for phase in PHASES:
            values = [run[phase] for run in runs[fresh] if phase in run]
            if values:
                cells.append(f"{phase} {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")
        print(f"{label}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
