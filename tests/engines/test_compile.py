"""The compile step: frozen, folded, reloadable from its bytes, and checked lossless."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests import zoo
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step

torch.manual_seed(0)
X = torch.rand(32, 1, 32, 32)


def _ctx(model, x=X) -> PipelineContext:
    data = ModelData((x,))
    return PipelineContext(teacher=model, calibration=data, evaluation=data, batch_sizes=(8,))


def _trained_cnn() -> torch.jit.ScriptModule:
    model = zoo.SequentialCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them changes the weights
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return zoo.trace(model.eval(), X[:2])


def _bytes(model) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    return buffer.getvalue()


def test_compile_folds_batchnorm_and_the_file_reloads_in_a_fresh_process(tmp_path):
    model = _trained_cnn()
    assert "aten::batch_norm" in str(model.inlined_graph)

    out = run_step(model, {"op": "compile"}, _ctx(model))

    assert out.details["batch_norms_left"] == 0
    assert out.details["max_abs_difference"] <= 1e-5
    assert out.details["graph_nodes"]["after"] < out.details["graph_nodes"]["before"]
    path = tmp_path / "compiled.pt"
    path.write_bytes(_bytes(out.model))
    torch.save({"x": X[:4], "expected": model(X[:4])}, tmp_path / "check.pt")
    # A fresh interpreter: nothing of this process (no cached graph, no registered pass) helps it.
    code = (
        "import torch, sys; m = torch.jit.load(sys.argv[1]); c = torch.load(sys.argv[2]); "
        "assert 'aten::batch_norm' not in str(m.graph); "
        "print(float((m(c['x']) - c['expected']).abs().max()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "check.pt")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) <= 1e-5


@pytest.mark.parametrize(
    "steps",
    [
        [{"op": "quantize", "scheme": "dynamic_int8"}],
        [{"op": "prune", "structure": "channel", "amount": 0.5}],
        [{"op": "quantize", "scheme": "fp16"}],
    ],
    ids=["dynamic_int8", "channel_prune", "fp16"],
)
def test_compile_composes_after_other_steps(steps):
    model = _trained_cnn()
    ctx = _ctx(model)
    current = model
    for step in steps:
        current = run_step(current, step, ctx).model.eval()

    out = run_step(current, {"op": "compile"}, ctx)

    # Half precision refolds in half: its tolerance is half's.
    atol, rtol = (1e-3, 1e-2) if steps[0].get("scheme") == "fp16" else (1e-5, 1e-4)
    with torch.inference_mode():
        assert torch.allclose(out.model(X[:8]).float(), current(X[:8]).float(), atol=atol, rtol=rtol)
    assert torch.jit.load(io.BytesIO(_bytes(out.model)))(X[:2]).shape == (2, 10)


class WithEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.scale = 2.0

    def forward(self, x):
        return self.body(x) * self.scale

    @torch.jit.export
    def embed(self, x):
        return self.body(x)


def test_preserved_methods_stay_and_others_go():
    model = torch.jit.script(WithEmbed().eval())
    x = torch.rand(8, 4)
    ctx = _ctx(model, x)

    kept = run_step(model, {"op": "compile", "preserve": ["embed"]}, ctx).model
    dropped = run_step(model, {"op": "compile"}, ctx).model

    assert torch.allclose(kept.embed(x), model.embed(x))
    assert not dropped._c._has_method("embed")


def test_a_preserved_name_the_model_lacks_fails_with_a_clear_code():
    model = torch.jit.script(WithEmbed().eval())
    with pytest.raises(EngineError) as raised:
        run_step(model, {"op": "compile", "preserve": ["embedd"]}, _ctx(model, torch.rand(8, 4)))
    assert raised.value.code == "compile_preserve_missing"
    assert "'embedd'" in raised.value.message and "embed" in raised.value.message


class CenteredBatchNorm(nn.Module):
    """A channel whose BatchNorm mean nearly cancels the convolution's output: unfolded, the
    subtraction loses the digits that matter; folded into the weights, it does not. Both are
    float32 arithmetic, but they disagree far beyond float tolerance."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.uniform_(-1e-3, 1e-3)
            self.conv.bias.fill_(100.0)
            self.bn.running_mean.fill_(100.0)
            self.bn.running_var.fill_(1e-6)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_model_whose_results_freezing_changes_fails_as_not_lossless():
    x = torch.rand(16, 1, 8, 8)
    model = zoo.trace(CenteredBatchNorm().eval(), x[:2])

    with pytest.raises(EngineError) as raised:
        run_step(model, {"op": "compile"}, _ctx(model, x))
    assert raised.value.code == "compile_not_lossless", raised.value.message
    assert "differ by up to" in raised.value.message


def test_int8_activations_refold_within_int8_precision():
    """Folding a BatchNorm changes a convolution's output in the last bits; a dynamic int8 linear
    after it rounds its input to int8 per call, so a value can cross one rounding step. On digits,
    an untrained CNN saw 1.5e-4 (float32's 1e-5 refused it; found by tests/engines/matrix.py)."""
    from worker.engines.compile.engine import _compute_dtype

    x = zoo.digits()[0][:64]
    model = zoo.trace(zoo.SequentialCNN(), x[:1])
    ctx = PipelineContext(teacher=model, calibration=ModelData((x,)), evaluation=ModelData((x,)), batch_sizes=(1, 8))
    quantized = run_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx).model
    assert _compute_dtype(quantized) == torch.qint8
    assert _compute_dtype(model) == torch.float32

    out = run_step(quantized, {"op": "compile"}, ctx)

    assert out.details["batch_norms_left"] == 0
    assert out.details["max_abs_difference"] < 1e-2
