"""The serving modes run where uploaded models run: ONNX Runtime and optimize_for_inference load
and time the model inside the job's sandbox (bubblewrap and Landlock), never in the worker."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from tests.zoo import SequentialCNN, digits, trace
from worker.isolation import job_limits, run_isolated
from worker.sandbox import JobDir, Sandbox


def test_onnx_runtime_and_optimized_serving_run_inside_the_sandbox(tmp_path):
    _, _, x_test, y_test = digits()
    torch.manual_seed(0)
    model = trace(SequentialCNN().eval(), x_test[:2])
    torch.jit.save(model, str(tmp_path / "model.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x_test[:2],),
            str(tmp_path / "model.onnx"),
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    np.savez(tmp_path / "data.npz", input=x_test[:64].numpy(), label=y_test[:64].numpy())
    job = JobDir.create(tmp_path, "job-", Sandbox(True))
    kwargs = {
        "model": job.add_input("model.pt", tmp_path / "model.pt"),
        "onnx": job.add_input("model.onnx", tmp_path / "model.onnx"),
        "data": job.add_input("data.npz", tmp_path / "data.npz"),
    }
    limits = dataclasses.replace(job_limits(120), memory_bytes=2 * 1024**3)

    result = run_isolated("tests.service.serving_child:measure_serving_modes", kwargs, limits, job=job)

    for mode in ("optimized", "onnxruntime"):
        figures = result["serving"][mode]
        assert "unavailable" not in figures, figures
        assert figures["lossless"] is True and figures["latency_ms"]["8"]["p50"] > 0
    assert set(result["floor"]) == {"1", "8"}
