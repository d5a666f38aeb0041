"""Pieces of the distillation engine on their own: traced BatchNorm made train/eval aware, the
out-of-memory batch back-off, and teacher targets recomputed per batch when too big to cache."""

from __future__ import annotations

import io

import pytest
import torch

from tests.zoo import SequentialCNN, TinyResNet, script, trace
from worker.engines.data import ModelData
from worker.engines.distill import DistillConfig, batching, distill
from worker.engines.distill.batching import BatchSize
from worker.engines.distill.batchnorm import make_batchnorm_mode_aware
from worker.engines.distill.outputs import DistillationLoss
from worker.engines.modules import clone_model, named_modules_of_kind


def running_means(model) -> list[torch.Tensor]:
    return [m.running_mean.clone() for _, m in named_modules_of_kind(model, ["BatchNorm2d"])]


def test_traced_batchnorm_becomes_mode_aware_and_eval_outputs_are_unchanged():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 32, 32) * 3 + 1
    traced = trace(TinyResNet(width=4), x[:2])
    expected = traced(x)
    traced.train()
    before = running_means(traced)
    traced(x)
    assert all(torch.equal(a, b) for a, b in zip(before, running_means(traced), strict=True)), "tracing froze BatchNorm"

    aware, report = make_batchnorm_mode_aware(traced.eval())
    assert report == {"layers": 15, "edited_ops": 15, "frozen_ops": 0}
    assert torch.equal(aware.eval()(x), expected)
    traced.train()
    traced(x)
    assert all(torch.equal(a, b) for a, b in zip(before, running_means(traced), strict=True)), "input edited"
    aware.train()
    aware(x)
    assert all(not torch.equal(a, b) for a, b in zip(before, running_means(aware), strict=True))
    # the edit survives saving: the artifact keeps train/eval semantics
    buffer = io.BytesIO()
    torch.jit.save(aware.eval(), buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    assert torch.equal(reloaded(x), aware(x))


def test_scripted_batchnorm_is_left_alone():
    scripted = script(SequentialCNN(width=4))
    same, report = make_batchnorm_mode_aware(scripted)
    assert same is scripted
    assert report == {"layers": 2, "edited_ops": 0, "frozen_ops": 0}


def test_batch_size_halves_on_out_of_memory_and_visits_every_sample_once():
    seen = []

    def step(indices):
        if len(indices) > 16:
            raise torch.OutOfMemoryError("simulated")
        seen.extend(indices.tolist())

    size = BatchSize(64, torch.device("cpu"))
    size.run(torch.arange(100), step)
    assert size.value == 16 and size.backoffs == 2
    assert seen == list(range(100))


def test_teacher_targets_recomputed_per_batch_when_too_big_to_cache(monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(200, 1, 32, 32)
    teacher = trace(SequentialCNN(width=4), x[:2])
    data = ModelData((x,), torch.randint(0, 10, (200,)))
    config = DistillConfig(epochs=1, batch_size=50)
    student = trace(SequentialCNN(width=4), x[:2])
    cached = distill(teacher, clone_model(student), data, data, config)
    monkeypatch.setattr(batching, "TEACHER_CACHE_BYTES", 0)
    recomputed = distill(teacher, clone_model(student), data, data, config)
    assert cached.details["teacher_targets"] == "cached"
    assert recomputed.details["teacher_targets"] == "recomputed per batch"
    losses = [run.details["history"][1]["train_loss"] for run in (cached, recomputed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_soft_target_loss_is_tau_squared_kl_of_the_teacher_to_the_student():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10) * 3, torch.randint(0, 10, (8,))
    tau = 2.0
    p_teacher = (teacher / tau).softmax(dim=1)
    by_hand = (p_teacher * (p_teacher.log() - (student / tau).log_softmax(dim=1))).sum(dim=1).mean() * tau**2
    soft_only = DistillationLoss(("kl",), tau, 1.0, use_labels=True)
    torch.testing.assert_close(soft_only([student], [teacher], labels), by_hand)
    mixed = DistillationLoss(("kl",), tau, 0.7, use_labels=True)([student], [teacher], labels)
    torch.testing.assert_close(mixed, 0.7 * by_hand + 0.3 * torch.nn.functional.cross_entropy(student, labels))
    # a student that equals the teacher gets no soft-target gradient, and one that differs does
    same = teacher.clone().requires_grad_(True)
    soft_only([same], [teacher], labels).backward()
    assert float(same.grad.abs().max()) < 1e-6
    other = student.clone().requires_grad_(True)
    soft_only([other], [teacher], labels).backward()
    assert float(other.grad.norm()) > 0.1
