"""Unstructured pruning: exactly `amount` of the conv/linear weights become zeros folded into the
weights, ranked by magnitude or Taylor saliency, globally or per layer, and the compressed size drops."""

from __future__ import annotations

import io
from itertools import chain

import pytest
import torch

from tests.zoo import SequentialCNN, TinyResNet, script, trace
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step

IMAGE = torch.rand(16, 1, 32, 32)
LAYERS = ("features.0", "features.4", "fc1", "fc2")


def context(model, labels=None) -> PipelineContext:
    return PipelineContext(teacher=model, calibration=ModelData((IMAGE,), labels), evaluation=ModelData((IMAGE,)))


def prune(model, labels=None, **step):
    return run_step(model, {"op": "prune", "structure": "unstructured", **step}, context(model, labels))


def reload(model) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: dict(model.named_parameters())[f"{name}.weight"].detach() for name in LAYERS}


@pytest.mark.parametrize("convert", ["trace", "script"])
def test_global_scope_zeroes_exactly_the_amount_and_folds_it_into_the_weights(convert):
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2]) if convert == "trace" else script(SequentialCNN())

    out = prune(model, amount=0.7)
    loaded = reload(out.model)

    pruned = weights(loaded)
    total = sum(w.numel() for w in pruned.values())
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    assert zeros == round(0.7 * total)
    assert out.details["sparsity"] == pytest.approx(zeros / total)
    assert [name for name, _ in loaded.named_parameters()] == [name for name, _ in model.named_parameters()]
    assert [name for name, _ in loaded.named_buffers()] == [name for name, _ in model.named_buffers()]
    kept = torch.cat([w[w != 0].abs() for w in pruned.values()])
    removed = torch.cat([weights(model)[n][pruned[n] == 0].abs() for n in LAYERS])
    assert removed.max() <= kept.min()
    assert out.details["deflate_bytes_after"] < 0.6 * out.details["deflate_bytes_before"]
    assert out.details["size_bytes_after"] == pytest.approx(out.details["size_bytes_before"], rel=0.01)


def test_layer_scope_prunes_every_layer_by_the_amount():
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])

    out = prune(model, amount=0.5, scope="layer", criterion="l2")

    for layer in out.details["layers"]:
        assert layer["sparsity"] == pytest.approx(round(0.5 * layer["parameters"]) / layer["parameters"])
    for name, w in weights(out.model).items():
        original = weights(model)[name]
        assert original[w == 0].abs().max() <= original[w != 0].abs().min()


@pytest.mark.parametrize("labels", [torch.randint(0, 10, (16,)), None], ids=["labels", "teacher"])
def test_gradient_saliency_zeroes_weights_the_loss_does_not_see(labels):
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])
    p = dict(model.named_parameters())
    with torch.no_grad():
        p["features.5.bias"] += 10.0  # keeps fc1's inputs live: few weights have no gradient at all
        p["fc1.bias"] += 10.0
        p["fc2.weight"][:, 7] = 0.0  # fc1's row 7 then has zero gradient however large it is
        p["fc1.weight"][7] *= 20

    # 8% of the weights: more than all zero-saliency ones (row 7 and a few dead units, ~5%).
    by_gradient = prune(model, labels, amount=0.08, scope="global", criterion="gradient").model
    by_l1 = prune(model, labels, amount=0.08, scope="global", criterion="l1").model

    assert (by_gradient.fc1.weight[7] == 0).all()
    assert (by_l1.fc1.weight[7] == 0).float().mean() < 0.1


def test_scripted_resnet_without_labels_uses_the_teacher():
    torch.manual_seed(0)
    model = script(TinyResNet())

    out = prune(model, amount=0.3, criterion="gradient")

    assert out.details["sparsity"] == pytest.approx(0.3, abs=1e-4)
    with torch.no_grad():
        assert out.model(IMAGE[:2]).shape == (2, 10)


def test_excluded_layers_stay_dense_and_are_reported():
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])

    out = prune(model, amount=0.9, exclude=["fc*"])

    assert torch.equal(weights(out.model)["fc1"], weights(model)["fc1"])
    assert {e["module"] for e in out.details["skipped"]} == {"fc1", "fc2"}
    assert [layer["module"] for layer in out.details["layers"]] == ["features.0", "features.4"]


def test_the_input_model_is_not_modified():
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])
    before = {n: t.clone() for n, t in chain(model.named_parameters(), model.named_buffers())}

    prune(model, amount=0.9)

    assert all(torch.equal(before[n], t) for n, t in chain(model.named_parameters(), model.named_buffers()))


@pytest.mark.parametrize("criterion", ["entropy", "bn_scale"])
def test_channel_only_criteria_are_refused(criterion):
    model = trace(SequentialCNN(), IMAGE[:2])

    with pytest.raises(EngineError) as error:
        prune(model, amount=0.5, criterion=criterion)

    assert error.value.code == "invalid_step"
