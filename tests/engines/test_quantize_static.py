"""The quantize step's static_int8 scheme: calibration, fusion, per-layer choice, refusal without data."""

from __future__ import annotations

import pytest
import torch

from tests.zoo import (
    FixedViewNet,
    LoopIfNet,
    SequentialCNN,
    TinyResNet,
    accuracy,
    digits,
    round_trip,
    script,
    trace,
    train_classifier,
)
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step


def _static(model, calibration: ModelData | None, evaluation: ModelData, **step):
    ctx = PipelineContext(teacher=model, calibration=calibration, evaluation=evaluation)
    return run_step(model, {"op": "quantize", "scheme": "static_int8", **step}, ctx)


@pytest.fixture(scope="module")
def trained_cnn():
    x_train, y_train, x_test, y_test = digits()
    model = train_classifier(SequentialCNN(), x_train, y_train, epochs=2)
    return trace(model, x_train[:2]), (x_train, y_train, x_test, y_test)


def test_static_int8_on_trained_cnn_keeps_accuracy(trained_cnn):
    model, (x_train, y_train, x_test, y_test) = trained_cnn
    out = _static(model, ModelData((x_train[:256],), y_train[:256]), ModelData((x_test,), y_test))

    loaded = round_trip(out.model)[0]
    graph = loaded.graph.str()
    # conv-BN folded, ReLU fused into the int8 kernel, weights frozen into packed params
    assert "quantized::conv2d_relu" in graph and "batch_norm" not in graph
    assert out.details["backend"] in ("x86", "fbgemm", "qnnpack") and out.details["weights"] == "per-channel"
    assert {layer["module"] for layer in out.details["layers"] if layer["precision"] == "int8"} == {
        "features.0",
        "features.4",
        "fc1",
        "fc2",
    }
    assert accuracy(loaded, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.01
    assert out.details["fidelity"]["metric"] == "top1_agreement"
    assert out.details["fidelity"]["top1_agreement"] >= 0.98


def test_static_int8_without_calibration_is_refused(trained_cnn):
    model, (_, _, x_test, y_test) = trained_cnn
    with pytest.raises(EngineError) as info:
        _static(model, None, ModelData((x_test,), y_test))
    assert info.value.code == "calibration_required"


def test_static_int8_exclude_keeps_layers_float(trained_cnn):
    model, (x_train, _, x_test, _) = trained_cnn
    out = _static(model, ModelData((x_train[:128],)), ModelData((x_test[:64],)), exclude=["fc*"])

    rows = {layer["module"]: layer["precision"] for layer in out.details["layers"]}
    assert rows == {"features.0": "int8", "features.4": "int8", "fc1": "float32", "fc2": "float32"}
    graph = round_trip(out.model)[0].graph.str()
    assert "quantized::conv2d" in graph and "aten::linear" in graph and "quantized::linear" not in graph


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: script(TinyResNet()), "scripted_resnet"),
        (lambda: trace(TinyResNet(), torch.rand(2, 1, 32, 32)), "traced_resnet"),
        (lambda: script(LoopIfNet()), "scripted_loop_if"),
    ],
)
def test_static_int8_resnet_and_control_flow(make, name):
    model = make()
    x = torch.rand(96, 1, 32, 32)
    out = _static(model, ModelData((x[:64],)), ModelData((x[64:],)), per_channel=False)

    loaded = round_trip(out.model)[0]
    expected, got = model(x[64:]), loaded(x[64:])
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(expected, got).min()) >= 0.98
    assert out.details["quantized_layers"] >= 3 and out.details["weights"] == "per-tensor"


def test_a_converted_graph_that_does_not_run_keeps_those_layers_float():
    """int8 convolutions return channels-last tensors, and FixedViewNet's `view(-1, 4096)` fails on
    them: convert_jit's model is tried before it is kept, so the convolutions stay float, with the
    reason, and the step's model runs (found by the engine matrix, tests/engines/matrix.py)."""
    x = digits()[0][:64]
    model = trace(FixedViewNet(), x[:1])
    out = _static(model, ModelData((x,)), ModelData((x,)))

    precisions = {row["module"]: row["precision"] for row in out.details["layers"]}
    assert precisions == {"fc": "int8"}
    reasons = {row["module"]: row["reason"] for row in out.details["skipped"]}
    assert set(reasons) == {"conv", "conv2"} and all("view" in reason for reason in reasons.values())
    loaded = round_trip(out.model)[0]
    with torch.inference_mode():
        assert loaded(x[:4]).shape == model(x[:4]).shape
