"""What a torch.export upload costs (issue 15, point 4): the TorchScript traced from a `.pt2` against
the TorchScript traced from the same eager model, and the time the conversion takes.

For the digits CNN, the ResNet-style CNN, the transformer MLP and the two-input encoder (zoo
models, random weights), one thread, both modules reloaded from their bytes (what a job runs) and
timed interleaved in one loop at batch 1 and 32: speed-up is the direct trace's latency over the
converted one's (1.0 = no cost), median over REPEATS interleaved runs with their min–max beside it;
max |Δ| is between the two modules' outputs. Conversion: seconds of `load_model` on the `.pt2`
(load, trace, the two agreement checks), median and min–max over REPEATS loads.

Run: .venv/bin/python benchmarks/export_conversion.py   (one thread; about three minutes)
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from quantize_timing import interleaved_latency_ms, print_table, reload

from tests import exported, zoo
from worker.engines.modules import load_model

REPEATS = 3


def _image(batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.rand(batch, 1, 32, 32),)


def _ids_and_mask(batch: int) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, 500, (batch, 16))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    return ids, mask


MODELS = {
    "digits CNN": (zoo.SequentialCNN, _image),
    "ResNet-style": (zoo.TinyResNet, _image),
    "transformer MLP": (zoo.TransformerMLP, lambda batch: (torch.rand(batch, 64),)),
    "two-input encoder": (zoo.TwoInputEncoder, _ids_and_mask),
}


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch's tracer warnings about the exported graph's Python checks
    folder = Path(tempfile.mkdtemp(prefix="export-conversion-"))
    rows = []
    for name, (make, inputs) in MODELS.items():
        torch.manual_seed(0)
        eager = make().eval()
        path = folder / "model.pt2"
        path.write_bytes(exported.export_bytes(eager, *inputs(2)))
        seconds = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            converted = load_model(path)
            seconds.append(time.perf_counter() - start)
        models = {"direct": reload(zoo.trace(eager, *inputs(2))), "converted": reload(converted)}
        for batch in (1, 32):
            example = inputs(batch)
            with torch.inference_mode():
                max_diff = float((models["converted"](*example) - models["direct"](*example)).abs().max())
            runs = [interleaved_latency_ms(models, example, iterations=200, warmup=20) for _ in range(REPEATS)]
            speedups = [run["direct"] / run["converted"] for run in runs]
            rows.append(
                (
                    name,
                    batch,
                    statistics.median(run["direct"] for run in runs),
                    statistics.median(run["converted"] for run in runs),
                    statistics.median(speedups),
                    f"{min(speedups):.2f}–{max(speedups):.2f}",
                    f"{max_diff:.1e}",
                    f"{statistics.median(seconds):.2f} ({min(seconds):.2f}–{max(seconds):.2f})",
                )
            )
    print_table(
        f"TorchScript traced from .pt2 vs traced directly, one thread, {REPEATS} interleaved runs",
        ("model", "batch", "direct ms", "converted ms", "speed-up", "range", "max |Δ|", "conversion s"),
        rows,
    )


if __name__ == "__main__":
    main()
