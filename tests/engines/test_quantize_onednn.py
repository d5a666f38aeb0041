"""dynamic_int8's oneDNN linear path: the holder module, its save/load, and the kernel choice in the report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import TransformerMLP, round_trip, trace
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.quantize import dynamic
from worker.engines.quantize.onednn import (
    OnednnDynamicLinear,
    has_int8_dot_product,
    onednn_available,
    prefer_onednn,
    probe_linear_kernels,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 ops")


needs_vnni = pytest.mark.skipif(
    not has_int8_dot_product(),
    reason="oneDNN int8 is used only on CPUs with VNNI/AMX; without them it is less accurate and never chosen",
)


@needs_vnni
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_holder_matches_float_linear_and_survives_save_load(with_bias, per_channel):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=with_bias)
    holder = torch.jit.script(OnednnDynamicLinear(linear.weight, linear.bias, per_channel))
    x = torch.randn(4, 7, 256)

    got = holder(x)
    assert got.shape == (4, 7, 128) and got.dtype == torch.float32
    cos = nn.functional.cosine_similarity(linear(x).detach().flatten(1), got.flatten(1), dim=1)
    assert float(cos.min()) >= 0.999
    loaded, size = round_trip(holder)
    assert torch.equal(loaded(x), got)
    assert size < 0.35 * 256 * 128 * 4  # int8 weights in the file, not float32 nor a packed copy


def test_probe_times_both_libraries():
    timings = probe_linear_kernels(torch.randn(64, 32), per_channel=True, backend="x86")
    assert set(timings) == {"x86", "onednn"} and all(t > 0 for t in timings.values())
    assert prefer_onednn({"x86": 2.0, "onednn": 1.0}, "x86")
    assert not prefer_onednn({"x86": 1.0, "onednn": 0.95}, "x86")  # within the margin: keep fbgemm
    assert not prefer_onednn({"x86": 1.2, "onednn": 1.0}, "x86")  # a busy host's noise: keep fbgemm
    assert not prefer_onednn({"x86": 1.0}, "x86")


@needs_vnni
def test_dynamic_int8_uses_onednn_where_the_probe_prefers_it(monkeypatch):
    monkeypatch.setattr(dynamic, "prefer_onednn", lambda timings, backend: True)
    monkeypatch.setattr(dynamic, "worth_probing", lambda n_in, n_out: True)
    torch.manual_seed(0)
    model = trace(TransformerMLP(), torch.randn(2, 64))
    x = torch.randn(48, 64)
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,)))
    out = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)

    linears = [layer["module"] for layer in out.details["layers"] if layer["kind"] == "Linear"]
    assert sorted(out.details["linear_kernels"]["onednn"]) == sorted(linears)
    assert out.details["linear_kernel_probe_ms"]
    assert "linear_dynamic" not in out.model.code
    loaded, size = round_trip(out.model)
    with torch.inference_mode():
        expected, got = model(x), loaded(x)
    assert got.shape == expected.shape
    assert float(nn.functional.cosine_similarity(expected, got).min()) >= 0.99
    assert size < 0.4 * round_trip(model)[1]


def test_dynamic_int8_never_uses_onednn_without_int8_dot_product(monkeypatch):
    monkeypatch.setattr(dynamic, "prefer_onednn", lambda timings, backend: True)
    monkeypatch.setattr(dynamic, "has_int8_dot_product", lambda: False)
    model = trace(TransformerMLP(), torch.randn(2, 64))
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((torch.randn(16, 64),)))
    out = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)
    assert out.details["linear_kernels"]["onednn"] == []


def test_dynamic_int8_keeps_fbgemm_where_the_probe_prefers_it(monkeypatch):
    monkeypatch.setattr(dynamic, "prefer_onednn", lambda timings, backend: False)
    model = trace(TransformerMLP(), torch.randn(2, 64))
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((torch.randn(16, 64),)))
    out = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)
    assert out.details["linear_kernels"]["onednn"] == []
    assert "linear_dynamic" in out.model.code


def test_layers_below_the_probed_size_are_never_timed_so_noise_cannot_choose_their_kernel(monkeypatch):
    monkeypatch.setattr(dynamic, "has_int8_dot_product", lambda: True)
    monkeypatch.setattr(dynamic, "prefer_onednn", lambda timings, backend: True)
    model = trace(TransformerMLP(), torch.randn(2, 64))  # 64×256 and smaller
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((torch.randn(16, 64),)))
    out = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)
    assert out.details["linear_kernels"]["onednn"] == []
    assert out.details["linear_kernel_probe_ms"] == {}
    assert "timed" in out.details["linear_kernel_choice"]
