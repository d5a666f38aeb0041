"""static_int8 on a CNN and a ResNet-style net trained on scikit-learn's digits.

Ours (the `quantize` step) against plain `quantize_jit` with PyTorch's default x86 qconfig and
against float: speed-up at batch 1 and 32 (interleaved, 1 thread) and top-1 accuracy.

Run: .venv/bin/python benchmarks/quantize_static.py   (one thread; about two minutes)
"""

from __future__ import annotations

import time
import warnings

import torch
from quantize_timing import file_size, interleaved_latency_ms, print_table, reload
from torch.ao.quantization import get_default_qconfig, quantize_jit

from tests.zoo import (
    SequentialCNN,
    TinyResNet,
    accuracy,
    digits,
    trace,
    train_classifier,
)
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step


def measure(name: str, model: torch.nn.Module, epochs: int) -> None:
    """Train, quantize two ways, and print speed and accuracy."""
    x_train, y_train, x_test, y_test = digits()
    start = time.perf_counter()
    traced = trace(train_classifier(model, x_train, y_train, epochs=epochs), x_train[:2])
    trained_s = time.perf_counter() - start
    calibration = ModelData((x_train[:256],), y_train[:256])
    ctx = PipelineContext(teacher=traced, calibration=calibration, evaluation=ModelData((x_test,), y_test))
    start = time.perf_counter()
    out = run_step(traced, {"op": "quantize", "scheme": "static_int8"}, ctx)
    ours_s = time.perf_counter() - start
    ours = reload(out.model)

    def calibrate(m, data):
        with torch.no_grad():
            for i in range(0, 256, 32):
                m(data[i : i + 32])

    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
    plain = reload(
        quantize_jit(traced, {"": get_default_qconfig(torch.backends.quantized.engine)}, calibrate, [x_train])
    )
    rows = []
    for batch in (1, 32):
        latency = interleaved_latency_ms(
            {"float": traced, "ours": ours, "plain": plain}, (x_test[:batch],), iterations=60 if batch == 1 else 30
        )
        rows.append(
            (
                batch,
                latency["float"],
                latency["ours"],
                latency["plain"],
                latency["float"] / latency["ours"],
                latency["float"] / latency["plain"],
            )
        )
    print_table(
        f"{name}: trained {epochs} epochs ({trained_s:.0f} s), static_int8 in {ours_s:.1f} s, "
        f"backend {out.details['backend']}, {out.details['quantized_layers']} int8 layers; median ms",
        ["batch", "float_ms", "ours_ms", "plain_ms", "ours_speedup", "plain_speedup"],
        rows,
    )
    base = accuracy(traced, x_test, y_test)
    print_table(
        f"{name}: top-1 on 297 held-out digits",
        ["model", "accuracy", "drop_pt", "size_bytes"],
        [
            ("float", base, 0.0, file_size(traced)),
            (
                "ours static_int8",
                accuracy(ours, x_test, y_test),
                100 * (base - accuracy(ours, x_test, y_test)),
                file_size(ours),
            ),
            (
                "plain quantize_jit",
                accuracy(plain, x_test, y_test),
                100 * (base - accuracy(plain, x_test, y_test)),
                file_size(plain),
            ),
        ],
    )


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    measure("SequentialCNN", SequentialCNN(), epochs=3)
    measure("TinyResNet", TinyResNet(), epochs=4)


if __name__ == "__main__":
    main()
