"""The CPU peak-memory probe forked from a clean copy of the job's process (`CleanFork`) against
the fresh interpreter it replaces: what each costs per job, and whether the figures agree.

Run in a fresh process that has loaded no model, like a job's sandboxed child. Each pair measures
the same models both ways, alternating which goes first; one thread (torch.set_num_threads(1)).
Prints, per model, both peak-growth figures over the pairs, and the seconds each way took (median
and range).

Run: .venv/bin/python benchmarks/memory_probe_fork.py [--pairs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from worker.engines.measure.memory import CleanFork, cpu_peak_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clean = CleanFork()  # before any model exists in this process, as the job's child does it
    from tests import zoo

    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    models = {
        "tiny linear": (zoo.trace(torch.nn.Linear(4, 2).eval(), torch.rand(1, 4)), (torch.rand(1, 4),)),
        "TinyResNet, batch 32": (
            zoo.trace(zoo.TinyResNet().eval(), torch.rand(1, 1, 32, 32)),
            (torch.rand(32, 1, 32, 32),),
        ),
        "MLP 2048², batch 256": (
            zoo.trace(
                torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048)).eval(),
                torch.rand(1, 2048),
            ),
            (torch.rand(256, 2048),),
        ),
    }
    files = {}
    for name, (model, _) in models.items():
        files[name] = tmp / f"{len(files)}.pt"
        torch.jit.save(model, str(files[name]))
    figures = {name: {"fork": [], "fresh": []} for name in models}
    seconds = {"fork": [], "fresh": []}
    for pair in range(args.pairs):
        for way in ("fork", "fresh") if pair % 2 == 0 else ("fresh", "fork"):
            started = time.perf_counter()
            for name, (_, inputs) in models.items():
                peak = cpu_peak_memory({name: files[name]}, inputs, 1, clean if way == "fork" else None)[name]
                figures[name][way].append(peak)
            seconds[way].append(time.perf_counter() - started)
    clean.close()
    for name, ways in figures.items():
        line = ", ".join(
            f"{way} median {statistics.median(v) / 2**20:.2f} MiB (min {min(v) / 2**20:.2f}, max {max(v) / 2**20:.2f})"
            for way, v in ways.items()
        )
        print(f"{name}: peak growth {line}")
    for way, values in seconds.items():
        print(
            f"{way}: {statistics.median(values):.2f} s per {len(models)} probes "
            f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)"
        )


if __name__ == "__main__":
    main()
