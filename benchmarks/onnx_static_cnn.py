"""static int8 CNNs in both formats: Compactor's TorchScript and ONNX artifacts against plain
`quantize_jit` and ONNX Runtime's plain static QDQ.

The digits CNN and ResNet of quantize_static.py (trained here on scikit-learn's digits), float
TorchScript the baseline, all timed in one process in interleaved rounds at batch 1 and 32, one
thread: plain `quantize_jit` (PyTorch's default x86 qconfig, 256 calibration samples), ONNX Runtime's
plain `quantize_static` (QDQ, per channel, u8 activations / s8 weights, the same samples) of the
float export, Compactor's `static_int8` TorchScript artifact and its ONNX artifact (the same step,
then `build_onnx_artifact`, as a job runs it). Every candidate is reloaded from its file; top-1 on
the 297 held-out digits and file sizes.

Run: .venv/bin/python benchmarks/onnx_static_cnn.py   (1 thread; ~3 min)
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from quantize_timing import paired_speedups, print_table, reload, spread
from torch.ao.quantization import get_default_qconfig, quantize_jit

from tests.zoo import SequentialCNN, TinyResNet, digits, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.export import build_onnx_artifact
from worker.engines.export.onnx_artifact import export_onnx
from worker.engines.export.runtime import ort_session, run_session
from worker.engines.pipeline import PipelineContext, parse_step, run_step


class _Reader:
    def __init__(self, x: torch.Tensor):
        self._batches = iter([{"input": x[i : i + 64].numpy()} for i in range(0, x.shape[0], 64)])

    def get_next(self):
        return next(self._batches, None)


def ort_model(path: Path):
    session = ort_session(path, threads=1)
    return lambda *inputs: run_session(session, inputs)[0]


def measure(name: str, eager: torch.nn.Module, epochs: int, rounds: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    x_train, y_train, x_test, y_test = digits()
    traced = reload(trace(train_classifier(eager, x_train, y_train, epochs=epochs), x_train[:2]))
    calibration = ModelData((x_train[:256],), y_train[:256])
    evaluation = ModelData((x_test,), y_test)
    work = Path(tempfile.mkdtemp(prefix="onnx_static-"))
    files = {"float TorchScript": work / "float.pt"}
    torch.jit.save(traced, files["float TorchScript"])

    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"

    def calibrate(model, data):
        with torch.no_grad():
            for i in range(0, 256, 32):
                model(data[i : i + 32])

    # quantize_jit edits the graph of the module it is given (the copy it returns shares it): on
    # `traced` itself, Compactor's step below then saw conv-BN unfolded and ran 2x slower
    qconfig = {"": get_default_qconfig(torch.backends.quantized.engine)}
    plain = quantize_jit(reload(traced), qconfig, calibrate, [x_train])
    files["plain quantize_jit"] = work / "plain.pt"
    torch.jit.save(plain, files["plain quantize_jit"])

    (work / "float.onnx").write_bytes(export_onnx(traced, calibration.take(2)))
    files["ORT plain static QDQ"] = work / "ort_static.onnx"
    quantize_static(
        work / "float.onnx",
        files["ORT plain static QDQ"],
        _Reader(x_train[:256]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )

    step = parse_step({"op": "quantize", "scheme": "static_int8"})
    ctx = PipelineContext(teacher=traced, calibration=calibration, evaluation=evaluation)
    out = run_step(traced, step, ctx)
    files["Compactor TorchScript static_int8"] = work / "compactor.pt"
    torch.jit.save(out.model, files["Compactor TorchScript static_int8"])
    section = build_onnx_artifact([traced, out.model], [step], [out.details], evaluation, calibration, work / "c.onnx")
    if "missing" in section:
        raise SystemExit(f"{name}: Compactor's ONNX artifact is missing: {section['missing']}")
    files["Compactor ONNX static_int8"] = work / "c.onnx"

    models = {
        label: ort_model(path) if path.suffix == ".onnx" else torch.jit.load(str(path)) for label, path in files.items()
    }
    with torch.no_grad():
        reference = traced(x_test).argmax(1)
        rows = []
        for batch in (1, 32):
            latency, speedup = paired_speedups(
                models, (x_test[:batch],), "float TorchScript", rounds=rounds, iterations=40 if batch == 1 else 20
            )
            for label, model in models.items():
                predictions = model(x_test).argmax(1)
                rows.append(
                    (
                        label,
                        batch,
                        spread(latency[label]),
                        speedup[label][0],
                        spread(speedup[label]),
                        float((predictions == y_test).float().mean()),
                        float((predictions == reference).float().mean()),
                        files[label].stat().st_size,
                    )
                )
    print_table(
        f"{name} ({epochs} epochs on digits), static int8, 1 thread, median ms of {rounds} interleaved rounds "
        f"[range]; speed-up: median of the per-round paired ratios [range]; top-1 and agreement with float on "
        f"297 held-out digits",
        ["model", "batch", "latency_ms", "speedup", "speedup_range", "top1", "agreement", "bytes"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    measure("SequentialCNN", SequentialCNN(), epochs=3, rounds=args.rounds)
    measure("TinyResNet", TinyResNet(), epochs=4, rounds=args.rounds)


if __name__ == "__main__":
    main()
