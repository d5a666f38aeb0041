"""A target for the sandbox test of the serving modes: the meter run inside the job's sandbox on
files the test put in the job's `in/`, as a job's child runs it."""

from pathlib import Path


def measure_serving_modes(emit, model: str, onnx: str, data: str) -> dict:
    import torch

    from worker.engines.data import load_dataset
    from worker.engines.measure import BenchmarkConfig, measure_models

    config = BenchmarkConfig(
        batch_sizes=[1, 8],
        warmup=2,
        iterations=12,
        rounds=3,
        max_rounds=3,
        serving=["plain", "optimized", "onnxruntime"],
        measure_memory=False,
    )
    measurement = measure_models(
        {"baseline": torch.jit.load(model)},
        {"baseline": Path(model)},
        "baseline",
        load_dataset(data),
        config,
        onnx_files={"baseline": Path(onnx)},
    )
    return {"serving": measurement.metrics["baseline"]["serving"], "floor": measurement.floor}
