"""Weight-only schemes: packed artifacts that load with torch.jit.load, sizes, and the helpers."""

from __future__ import annotations

import io

import pytest
import torch

from tests.zoo import (
    LSTMClassifier,
    SequentialCNN,
    TinyEncoder,
    TinyResNet,
    script,
    trace,
)
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.quantize.weight_only import (
    fake_quantize,
    pack_weight,
    repack,
    unpack_weight,
    weight_only_layers,
)

# (scheme, min stored-size ratio of the quantized tensors, min cosine on the random test models);
# the ratios fall short of 4× / 8× / 32× by the float32 scales: one per row, or per group for int4
SCHEMES = [("weight_int8", 3.7, 0.999), ("weight_int4", 6.0, 0.97), ("binary", 22.0, 0.5)]
BITS = {"weight_int8": 8, "weight_int4": 4, "binary": 1}


def _expected_bytes(shape: tuple[int, ...], bits: int, group_size: int = 128) -> int:
    rows = shape[0]
    cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    if bits == 4:
        group = min(group_size, cols)
        groups = -(-cols // group)
        return -(-rows * groups * group // 2) + 4 * rows * groups
    return -(-rows * cols * bits // 8) + 4 * rows


MODELS = {
    "traced_cnn": (lambda: trace(SequentialCNN(), torch.rand(2, 1, 32, 32)), lambda: (torch.rand(32, 1, 32, 32),)),
    "scripted_resnet": (lambda: script(TinyResNet()), lambda: (torch.rand(32, 1, 32, 32),)),
    "scripted_lstm": (lambda: script(LSTMClassifier()), lambda: (torch.randint(0, 1000, (32, 12)),)),
    "traced_lstm": (
        lambda: trace(LSTMClassifier(), torch.randint(0, 1000, (2, 12))),
        lambda: (torch.randint(0, 1000, (32, 12)),),
    ),
    "traced_encoder": (
        lambda: trace(TinyEncoder(), torch.randint(0, 1000, (2, 10))),
        lambda: (torch.randint(0, 1000, (32, 10)),),
    ),
}


def _save(model: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("scheme, ratio, cosine", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_weight_only_artifact_loads_and_restores_float_weights(name, scheme, ratio, cosine):
    make_model, make_inputs = MODELS[name]
    model, inputs = make_model(), make_inputs()
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData(inputs))
    out = run_step(model, {"op": "quantize", "scheme": scheme}, ctx)

    data = _save(out.model)
    loaded = torch.jit.load(io.BytesIO(data))
    expected, got = model(*inputs), loaded(*inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(expected.flatten(1), got.flatten(1)).min()) >= cosine
    # the float weights are rebuilt on load exactly as the step's in-memory model has them
    assert torch.allclose(got, out.model(*inputs), atol=1e-5)
    stored = out.details["quantized_tensors"]
    params = weight_only_layers(loaded)
    assert stored["count"] == len(params) > 0
    assert stored["stored_bytes"] == sum(_expected_bytes(p.shape, BITS[scheme]) for p in params)
    assert stored["ratio"] >= ratio
    # the file shrinks by what the quantized tensors save (plus a little code per packed tensor)
    saved = stored["float32_bytes"] - stored["stored_bytes"]
    assert len(data) <= len(_save(model)) - saved + 4096 * stored["count"] + 65536
    assert "float32" in out.details["compute"]


def test_weight_int4_group_size_is_clamped_and_reported():
    model = trace(SequentialCNN(), torch.rand(2, 1, 32, 32))
    x = torch.rand(16, 1, 32, 32)
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,)))
    out = run_step(model, {"op": "quantize", "scheme": "weight_int4", "group_size": 32}, ctx)

    params = {p.module: p for p in weight_only_layers(out.model)}
    assert params["fc1"].group_size == 32 and params["fc1"].scheme == "weight_int4"
    assert out.details["group_size"] == 32
    # features.0 rows hold 9 weights: one group of 9, i.e. 16 scales
    _, scales = pack_weight(params["features.0"].weight, 4, 32, True)
    assert scales.numel() == 16


@pytest.mark.parametrize("scheme, levels", [("weight_int8", 255), ("weight_int4", 15), ("binary", 2)])
def test_fake_quantize_round_trip(scheme, levels):
    weight = torch.randn(24, 200)
    restored = fake_quantize(weight, scheme, group_size=64)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    # values per row (int8, binary) or per group (int4) lie on the scheme's grid
    row = restored[0, :64] if scheme == "weight_int4" else restored[0]
    assert len(torch.unique(row)) <= levels
    # idempotent: what the file restores re-packs to itself
    assert torch.allclose(fake_quantize(restored, scheme, group_size=64), restored, atol=1e-6)
    if scheme == "binary":
        assert torch.allclose(restored.abs().mean(dim=1), weight.abs().mean(dim=1), rtol=1e-5)
        assert torch.equal(restored.sign(), torch.where(weight >= 0, 1.0, -1.0))
    else:
        step = weight.abs().amax() / (127 if scheme == "weight_int8" else 7)
        assert float((restored - weight).abs().max()) <= float(step) / 2 + 1e-6


def test_fake_quantize_straight_through_gradient():
    weight = torch.randn(8, 16, requires_grad=True)
    fake_quantize(weight, "weight_int4", straight_through=True).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_pack_unpack_odd_shapes():
    weight = torch.randn(5, 3, 3)  # 45 values: odd nibble count and a partial byte of signs
    for bits in (8, 4, 1):
        packed, scales = pack_weight(weight, bits, 4, True)
        restored = unpack_weight(packed, scales, [5, 3, 3], bits, 4, True)
        assert restored.shape == weight.shape
        assert float(torch.nn.functional.cosine_similarity(restored.flatten(), weight.flatten(), dim=0)) > 0.7


def test_repack_installs_trained_weights_and_saves_them():
    model = trace(SequentialCNN(), torch.rand(2, 1, 32, 32))
    x = torch.rand(8, 1, 32, 32)
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,)))
    out = run_step(model, {"op": "quantize", "scheme": "weight_int4"}, ctx)

    trained = torch.randn(64, 2048) * 0.01
    assert repack(out.model, {"fc1.weight": trained}) == 4
    fc1 = next(p for p in weight_only_layers(out.model) if p.module == "fc1")
    assert torch.equal(fc1.weight, fake_quantize(trained, "weight_int4"))
    loaded = torch.jit.load(io.BytesIO(_save(out.model)))
    assert torch.allclose(loaded(x), out.model(x), atol=1e-6)
    with pytest.raises(KeyError):
        repack(out.model, {"nope.weight": trained})


def _unregistered_tensors(model: torch.jit.ScriptModule) -> list[str]:
    """Tensor attributes that `.to()` would leave behind: neither parameters nor buffers."""
    registered = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    attributes = torch._C._jit_debug_module_iterators(model._c)["named_attributes_r"]
    return [
        name
        for name, value in attributes
        if isinstance(value, torch.Tensor) and value.dim() > 0 and name not in registered
    ]


@pytest.mark.parametrize("name", ["traced_cnn", "scripted_lstm"])
@pytest.mark.parametrize("scheme", ["weight_int4", "binary"])
def test_to_moves_packed_weights_and_repack_keeps_them_there(name, scheme):
    make_model, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model, (x,) = make_model(), make_inputs()
    out = run_step(
        model,
        {"op": "quantize", "scheme": scheme},
        PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,))),
    ).model
    assert _unregistered_tensors(out) == []
    expected = out(x)
    # a dtype move goes through the same `Module._apply` as a device move, so this CPU check
    # stands for `.to("cuda")`: every tensor the graph reads must follow
    out.to(torch.float64)
    assert {p.weight.dtype for p in weight_only_layers(out)} == {torch.float64}
    result = out(x.double() if x.is_floating_point() else x)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result.float(), expected, rtol=1e-4, atol=1e-5)
    first = weight_only_layers(out)[0]
    repack(out, {f"{first.module}.{first.parameter}": first.weight.float() * 2})
    assert {p.weight.dtype for p in weight_only_layers(out)} == {torch.float64}
    reloaded = torch.jit.load(io.BytesIO(_save(out)))
    assert _unregistered_tensors(reloaded) == []


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["traced_cnn", "scripted_lstm"])
def test_to_cuda_moves_packed_weights(name):
    make_model, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model, (x,) = make_model(), make_inputs()
    out = run_step(
        model,
        {"op": "quantize", "scheme": "binary"},
        PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,))),
    ).model
    expected = out(x)
    out.to("cuda")
    assert {p.weight.device.type for p in weight_only_layers(out)} == {"cuda"}
    torch.testing.assert_close(out(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
    first = weight_only_layers(out)[0]
    repack(out, {f"{first.module}.{first.parameter}": first.weight.cpu()})
    assert {p.weight.device.type for p in weight_only_layers(out)} == {"cuda"}
    reloaded = torch.jit.load(io.BytesIO(_save(out)), map_location="cuda")
    torch.testing.assert_close(reloaded(x.cuda()), out(x.cuda()))
