"""dynamic_int8 on a scripted 2-layer LSTM classifier: ours against `quantize_dynamic_jit` and float.

Ours times each LSTM layout in float and int8 before converting and keeps it in float where int8
is slower (the reason and the probe's timings are printed). Latency: interleaved rounds, median of
the rounds' medians with their range.

Run: .venv/bin/python benchmarks/quantize_lstm.py   (one thread; about a minute)
"""

from __future__ import annotations

import warnings

import torch
from quantize_timing import cosine_min, file_size, latency_rounds, print_table, reload, spread
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic_jit

from tests.zoo import LSTMClassifier, script
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step


def measure(vocab: int, dim: int, hidden: int) -> None:
    """Quantize one LSTM classifier size and print speed, fidelity and size."""
    torch.manual_seed(0)
    model = script(LSTMClassifier(vocab=vocab, dim=dim, hidden=hidden))
    tokens = torch.randint(0, vocab, (256, 32))
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((tokens,)))
    out = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)
    ours = reload(out.model)
    plain = quantize_dynamic_jit(model, {"": default_dynamic_qconfig})
    lstm = next(layer for layer in out.details["layers"] if layer["kind"] == "LSTM")
    print(
        f"\nhidden {hidden}: ours keeps the LSTM in {lstm['precision']}"
        + (f" ({lstm['reason']})" if "reason" in lstm else "")
        + f"; probe ms {out.details['recurrent_probe_ms']}"
    )
    rows = []
    for batch in (1, 32):
        x = (tokens[:batch],)
        latency = latency_rounds({"float": model, "ours": ours, "plain": plain}, x)
        rows.append(
            (
                batch,
                spread(latency["float"]),
                spread(latency["ours"]),
                spread(latency["plain"]),
                latency["float"][0] / latency["ours"][0],
                latency["float"][0] / latency["plain"][0],
            )
        )
    print_table(
        f"Scripted 2-layer LSTM classifier (vocab {vocab}, dim {dim}, hidden {hidden}, seq 32), "
        "1 thread, median ms [range over 3 rounds]",
        ["batch", "float_ms", "ours_ms", "plain_ms", "ours_speedup", "plain_speedup"],
        rows,
    )
    with torch.no_grad():
        reference = model(tokens)
        table = []
        for name, candidate in (("ours dynamic_int8", ours), ("plain quantize_dynamic_jit", plain)):
            out = candidate(tokens)
            table.append(
                (
                    name,
                    cosine_min(reference, out),
                    float((out.argmax(1) == reference.argmax(1)).float().mean()),
                    file_size(candidate),
                    file_size(model) / file_size(candidate),
                )
            )
    print_table("Fidelity and size", ["model", "cosine_min", "top1_agreement", "size_bytes", "size_ratio"], table)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    measure(vocab=1000, dim=64, hidden=128)  # the test zoo's size
    measure(vocab=5000, dim=128, hidden=256)
    measure(vocab=5000, dim=256, hidden=512)


if __name__ == "__main__":
    main()
