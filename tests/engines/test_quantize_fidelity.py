"""min_fidelity: per-layer sensitivity, keeping the most sensitive layers in float, and its limits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import trace
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step


class ThreeLayers(nn.Module):
    """Three linear layers; `c` has one huge weight, so per-tensor int8 rounds the rest of it to 0.

    The huge weight reads a channel `b` always zeroes, so in float it changes nothing and no
    other layer sees large values.
    """

    def __init__(self, outlier: bool = True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 16)
        if outlier:
            with torch.no_grad():
                self.b.weight[0].zero_()
                self.b.bias[0] = -1.0
                self.c.weight[0, 0] = 50.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _run(model, step, labels=None, n=64):
    x = torch.randn(n, 32)
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((x,), labels))
    return run_step(model, {"op": "quantize", "scheme": "dynamic_int8", "per_channel": False, **step}, ctx)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return trace(ThreeLayers(), torch.randn(2, 32))


def test_without_min_fidelity_the_outlier_layer_hurts(model):
    out = _run(model, {})
    assert out.details["fidelity"]["cosine_min"] < 0.99
    assert all(layer["sensitivity"] is None for layer in out.details["layers"])


def test_min_fidelity_keeps_the_most_sensitive_layer_in_float(model):
    out = _run(model, {"min_fidelity": 0.99})

    rows = {layer["module"]: layer for layer in out.details["layers"]}
    assert rows["c"]["precision"] == "float32" and "min_fidelity" in rows["c"]["reason"]
    assert rows["a"]["precision"] == rows["b"]["precision"] == "int8"
    assert rows["c"]["sensitivity"] == max(layer["sensitivity"] for layer in rows.values()) > 0.1
    assert out.details["fidelity"]["score"] >= 0.99 and out.details["fidelity"]["metric"] == "cosine_min"
    x = torch.randn(16, 32)
    assert float(nn.functional.cosine_similarity(model(x), out.model(x)).min()) >= 0.98


def test_min_fidelity_uses_top1_agreement_for_labelled_data(model):
    labels = torch.randint(0, 16, (64,))
    out = _run(model, {"min_fidelity": 0.97}, labels=labels)
    assert out.details["fidelity"]["metric"] == "top1_agreement"
    assert out.details["fidelity"]["top1_agreement"] >= 0.97


def test_exclude_wins_over_min_fidelity(model):
    out = _run(model, {"min_fidelity": 0.5, "exclude": ["a"]})
    rows = {layer["module"]: layer for layer in out.details["layers"]}
    assert rows["a"]["precision"] == "float32" and "exclude" in rows["a"]["reason"]
    assert rows["a"]["sensitivity"] is None


def test_unreachable_min_fidelity_is_an_error():
    torch.manual_seed(0)
    single = trace(nn.Sequential(ThreeLayers().c), torch.randn(2, 64))
    x = torch.randn(32, 64)
    ctx = PipelineContext(teacher=single, calibration=None, evaluation=ModelData((x,)))
    with pytest.raises(EngineError) as info:
        run_step(single, {"op": "quantize", "scheme": "dynamic_int8", "per_channel": False, "min_fidelity": 0.99}, ctx)
    assert info.value.code == "fidelity_unreachable"


def test_min_fidelity_validation():
    single = trace(ThreeLayers(False), torch.randn(2, 32))
    with pytest.raises(EngineError) as info:
        _run(single, {"min_fidelity": 1.5})
    assert info.value.code == "invalid_step"
