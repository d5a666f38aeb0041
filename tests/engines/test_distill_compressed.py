"""Distillation as the recovery step after the other engines: into a channel-pruned copy made by
the prune engine, and into weight-only quantized students (quantization-aware, straight-through)."""

from __future__ import annotations

import io

import pytest
import torch

from tests.zoo import SequentialCNN, accuracy, digits, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.quantize.weight_only import fake_quantize, weight_only_layers


@pytest.fixture(scope="module")
def ctx():
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    teacher = trace(train_classifier(SequentialCNN(width=8), x_train[:800], y_train[:800], epochs=3), x_train[:2])
    return PipelineContext(
        teacher=teacher, calibration=ModelData((x_train[:800],), y_train[:800]), evaluation=ModelData((x_test,), y_test)
    )


def top1(model, ctx) -> float:
    return accuracy(model, ctx.evaluation.inputs[0], ctx.evaluation.labels)


def test_channel_pruned_copy_recovers(ctx):
    pruned = run_step(ctx.teacher, {"op": "prune", "structure": "channel", "amount": 0.5, "scope": "layer"}, ctx).model
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in ctx.teacher.parameters())
    out = run_step(pruned, {"op": "distill", "epochs": 2, "lr": 3e-3}, ctx)
    assert top1(out.model, ctx) > max(top1(pruned, ctx) + 0.03, top1(ctx.teacher, ctx) - 0.03)
    shapes = {name: p.shape for name, p in pruned.named_parameters()}
    assert {name: p.shape for name, p in out.model.named_parameters()} == shapes


def reloaded(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("scheme", ["binary", "weight_int4"])
def test_quantized_student_trains_latents_and_stays_on_its_grid(ctx, scheme):
    quantized = run_step(ctx.teacher, {"op": "quantize", "scheme": scheme, "group_size": 32}, ctx).model
    before = top1(quantized, ctx)
    out = run_step(quantized, {"op": "distill", "epochs": 3, "lr": 3e-3}, ctx)
    details = out.details
    packed = weight_only_layers(out.model)
    assert {(t["module"], t["scheme"]) for t in details["quantization_aware"]["tensors"]} == {
        (p.module, scheme) for p in packed
    }
    assert details["quantization_aware"]["estimator"] == "straight-through"
    # the inlined BatchNorm ops of the converted graph follow train/eval too
    assert details["batchnorm"]["edited_ops"] >= details["batchnorm"]["layers"] == 2
    for p in packed:
        on_grid = fake_quantize(p.weight, p.scheme, per_channel=p.per_channel, group_size=p.group_size)
        torch.testing.assert_close(p.weight, on_grid, rtol=1e-5, atol=0), p.module
        assert not p.weight.requires_grad
    if scheme == "binary":
        for p in packed:
            rows = p.weight.reshape(p.weight.shape[0], -1).abs()
            assert torch.allclose(rows, rows[:, :1].expand_as(rows)), f"{p.module}: one magnitude per row"
        assert before < 0.5
        assert top1(out.model, ctx) > before + 0.3
    else:
        assert top1(out.model, ctx) >= before
    assert details["best_val_score"] == pytest.approx(top1(out.model, ctx), abs=1e-6)
    # what is saved is what was validated: the artifact restores the same packed weights
    assert top1(reloaded(out.model), ctx) == top1(out.model, ctx)
    original = {p.module: p.weight for p in weight_only_layers(quantized)}
    changed = any(not torch.equal(p.weight, original[p.module]) for p in packed)
    assert changed == (details["best_epoch"] > 0)


@pytest.mark.cuda
def test_quantized_student_distills_on_cuda(ctx):
    quantized = run_step(ctx.teacher, {"op": "quantize", "scheme": "weight_int4", "group_size": 32}, ctx).model
    cuda_ctx = PipelineContext(
        teacher=ctx.teacher, calibration=ctx.calibration, evaluation=ctx.evaluation, device=torch.device("cuda")
    )
    out = run_step(quantized, {"op": "distill", "epochs": 1}, cuda_ctx)
    packed = weight_only_layers(out.model)
    assert packed and {p.weight.device.type for p in packed} == {"cuda"}
    for p in packed:
        on_grid = fake_quantize(p.weight, p.scheme, per_channel=p.per_channel, group_size=p.group_size)
        torch.testing.assert_close(p.weight, on_grid, rtol=1e-5, atol=0)
    x = ctx.evaluation.inputs[0]
    torch.testing.assert_close(reloaded(out.model).cpu()(x), out.model(x.cuda()).cpu(), rtol=1e-4, atol=1e-4)
