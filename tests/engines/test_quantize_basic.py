"""The quantize step's dynamic_int8, fp16 and bf16 schemes on traced and scripted test models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import (
    LSTMClassifier,
    SequentialCNN,
    TinyEncoder,
    TransformerMLP,
    round_trip,
    script,
    trace,
)
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.quantize import dynamic


class GRUTagger(nn.Module):
    """Token ids → embedding → bidirectional GRU → per-step linear (scripted in the tests)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.gru = nn.GRU(32, 48, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(96, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


class TwoHeads(nn.Module):
    """A float input and an integer mask in, a (logits, features) tuple out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.body(x)) * mask.unsqueeze(1).to(x.dtype)
        return self.head(features), features


def _context(model: torch.jit.ScriptModule, *inputs: torch.Tensor) -> PipelineContext:
    return PipelineContext(teacher=model, calibration=None, evaluation=ModelData(inputs))


def _size(model: torch.jit.ScriptModule) -> int:
    return round_trip(model)[1]


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).min())


def _quantize(model, step, *inputs):
    return run_step(model, {"op": "quantize", **step}, _context(model, *inputs))


MODELS = {
    "traced_cnn": (lambda: trace(SequentialCNN(), torch.rand(2, 1, 32, 32)), lambda: (torch.rand(48, 1, 32, 32),)),
    "traced_mlp": (lambda: trace(TransformerMLP(), torch.randn(2, 64)), lambda: (torch.randn(48, 64),)),
    "scripted_lstm": (lambda: script(LSTMClassifier()), lambda: (torch.randint(0, 1000, (48, 12)),)),
    "traced_encoder": (
        lambda: trace(TinyEncoder(), torch.randint(0, 1000, (2, 10))),
        lambda: (torch.randint(0, 1000, (48, 10)),),
    ),
    "scripted_gru": (lambda: script(GRUTagger()), lambda: (torch.randint(0, 500, (48, 9)),)),
}


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_int8_keeps_interface_and_fidelity(name):
    make_model, make_inputs = MODELS[name]
    model, inputs = make_model(), make_inputs()
    out = _quantize(model, {"scheme": "dynamic_int8"}, *inputs)

    loaded, _ = round_trip(out.model)
    with torch.inference_mode():
        expected, got = model(*inputs), loaded(*inputs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert _cosine_min(expected, got) >= 0.99
    quantized = [layer for layer in out.details["layers"] if layer["precision"] == "int8"]
    assert quantized and out.details["quantized_layers"] == len(quantized)
    assert out.details["fidelity"]["cosine_min"] >= 0.99
    assert out.details["backend"] in ("x86", "fbgemm", "qnnpack")


@pytest.fixture
def int8_recurrent_faster(monkeypatch):
    """The speed probe finds int8 recurrent layers faster, whatever this CPU says: these tests are
    about the int8 kernels (the probe's own decisions: test_quantize_recurrent_speed.py)."""
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: {"batch 1": {"float": 2.0, "int8": 1.0}})


def test_dynamic_int8_quantizes_recurrent_layers_and_embeddings(int8_recurrent_faster):
    model = script(LSTMClassifier())
    out = _quantize(model, {"scheme": "dynamic_int8"}, torch.randint(0, 1000, (32, 12)))

    kinds = {layer["kind"]: layer["precision"] for layer in out.details["layers"]}
    assert kinds == {"LSTM": "int8", "Embedding": "int8", "Linear": "int8"}
    code = out.model.code
    assert "quantized_lstm" in code and "embedding_byte" in code and "linear_dynamic" in code
    # the float weights are gone from the file: int8 is about a quarter of float32
    assert _size(out.model) < 0.4 * _size(model)


def test_dynamic_int8_gru_runs_int8_kernel(int8_recurrent_faster):
    model = script(GRUTagger())
    out = _quantize(model, {"scheme": "dynamic_int8"}, torch.randint(0, 500, (16, 9)))
    assert "quantized_gru" in out.model.code
    assert {"module": "gru", "kind": "GRU", "precision": "int8", "sensitivity": None} in out.details["layers"]


def test_dynamic_int8_per_tensor_weights():
    model = trace(TransformerMLP(), torch.randn(2, 64))
    x = torch.randn(32, 64)
    out = _quantize(model, {"scheme": "dynamic_int8", "per_channel": False}, x)
    assert out.details["weights"] == "per-tensor"
    assert _cosine_min(model(x), out.model(x)) >= 0.98


def test_exclude_keeps_matching_layers_in_float():
    model = script(LSTMClassifier())
    out = _quantize(model, {"scheme": "dynamic_int8", "exclude": ["lst*", "head"]}, torch.randint(0, 1000, (16, 12)))

    rows = {layer["module"]: layer for layer in out.details["layers"]}
    assert rows["lstm"]["precision"] == "float32" and "exclude" in rows["lstm"]["reason"]
    assert rows["head"]["precision"] == "float32"
    assert rows["embed"]["precision"] == "int8"
    assert "quantized_lstm" not in out.model.code and "embedding_byte" in out.model.code


def test_nothing_quantized_is_an_error():
    conv_only = trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), torch.rand(1, 1, 8, 8))
    with pytest.raises(EngineError) as info:
        _quantize(conv_only, {"scheme": "dynamic_int8"}, torch.rand(4, 1, 8, 8))
    assert info.value.code == "nothing_quantized"


def test_everything_excluded_is_nothing_quantized():
    model = trace(TransformerMLP(), torch.randn(2, 64))
    with pytest.raises(EngineError) as info:
        _quantize(model, {"scheme": "dynamic_int8", "exclude": ["*"]}, torch.randn(8, 64))
    assert info.value.code == "nothing_quantized"


def test_unknown_scheme_is_refused():
    model = trace(TransformerMLP(), torch.randn(2, 64))
    with pytest.raises(EngineError) as info:
        _quantize(model, {"scheme": "int3"}, torch.randn(8, 64))
    assert info.value.code == "invalid_step"


@pytest.mark.parametrize("scheme, dtype, tolerance", [("fp16", torch.float16, 1e-2), ("bf16", torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("name", ["traced_cnn", "scripted_lstm", "traced_encoder"])
def test_half_precision_takes_and_returns_original_dtypes(name, scheme, dtype, tolerance):
    make_model, make_inputs = MODELS[name]
    model, inputs = make_model(), make_inputs()
    out = _quantize(model, {"scheme": scheme}, *inputs)

    loaded, size = round_trip(out.model)
    assert any(p.dtype == dtype for p in loaded.parameters())
    assert not any(p.dtype == torch.float32 for p in loaded.parameters())
    assert size < 0.6 * _size(model)
    with torch.inference_mode():
        expected, got = model(*inputs), loaded(*inputs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).abs().max()) <= tolerance * max(1.0, float(expected.abs().max()))
    assert out.details["layers"] == [{"module": "", "kind": "model", "precision": scheme, "sensitivity": None}]
    assert "faster_on" in out.details


@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
@pytest.mark.parametrize("make", [lambda m: trace(m, torch.randn(2, 16), torch.ones(2, dtype=torch.long)), script])
def test_half_precision_tuple_outputs_and_integer_inputs(scheme, make):
    model = make(TwoHeads())
    x, mask = torch.randn(8, 16), torch.tensor([1, 0] * 4)
    out = _quantize(model, {"scheme": scheme}, x, mask)

    loaded, _ = round_trip(out.model)
    logits, features = loaded(x, mask)
    assert logits.dtype == features.dtype == torch.float32
    assert logits.shape == (8, 4) and features.shape == (8, 32)
    assert torch.all(features[1::2] == 0)  # the integer mask arrived as integers
    assert "mask: Tensor" in loaded.code
    expected_logits, _ = model(x, mask)
    assert float((logits - expected_logits).abs().max()) < 0.05


class WithEncode(nn.Module):
    """forward plus an exported method that reads one of the layers' weights."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    @torch.jit.export
    def encode(self, x):
        return self.fc1(x)


def test_scripted_sequential_comes_back_smaller_without_its_float_weights():
    """A scripted nn.Sequential always has `__len__` besides `forward`: it reads no weight, so the
    float copies go and the artifact holds only the int8 ones."""
    model = script(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)))
    assert set(model._c._method_names()) - {"forward"}
    x = torch.randn(16, 256)

    out = _quantize(model, {"scheme": "dynamic_int8"}, x)

    assert _size(out.model) < 0.35 * _size(model)  # int8 weights: a quarter, plus the archive's own bytes
    assert sum(p.numel() for p in out.model.parameters()) < 0.1 * sum(p.numel() for p in model.parameters())
    assert out.model._c._get_method("__len__")() == 3 and _cosine_min(out.model(x), model(x)) > 0.99


def test_a_weight_another_method_reads_stays():
    model = script(WithEncode())
    x = torch.randn(16, 32)

    out = _quantize(model, {"scheme": "dynamic_int8"}, x)

    assert out.model.fc1.weight.numel() == 32 * 64 and out.model.fc2.weight.numel() == 0
    assert torch.equal(out.model.encode(x), model.encode(x)) and _cosine_min(out.model(x), model(x)) > 0.99


def test_half_precision_refuses_exclude():
    model = trace(TransformerMLP(), torch.randn(2, 64))
    with pytest.raises(EngineError) as info:
        _quantize(model, {"scheme": "fp16", "exclude": ["head"]}, torch.randn(8, 64))
    assert info.value.code == "invalid_step"


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["fp16", "bf16"])
def test_half_precision_on_cuda(scheme):
    device = torch.device("cuda")
    model = trace(SequentialCNN(), torch.rand(2, 1, 32, 32)).to(device)
    x = torch.rand(16, 1, 32, 32, device=device)
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,)), device=device)
    out = run_step(model, {"op": "quantize", "scheme": scheme}, ctx)

    loaded, _ = round_trip(out.model)
    got = loaded.to(device)(x)
    assert got.dtype == torch.float32 and got.is_cuda
    assert _cosine_min(model(x), got) >= 0.999
    assert out.details["faster_on"] == "CUDA tensor cores" and out.details["compute"].startswith("cuda")
