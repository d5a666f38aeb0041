"""Channel pruning end to end on traced and scripted models: the artifact reloads, keeps its input and
output shapes, loses exactly the expected parameters, and removes dead channels without changing
the outputs; criteria, scopes, exclusions and the revert safety net."""

from __future__ import annotations

import json
from itertools import chain

import pytest
import torch
from torch import nn

from tests.zoo import (
    FixedViewNet,
    InceptionNet,
    LoopIfNet,
    MobileNetStyle,
    SequentialCNN,
    TinyResNet,
    TransformerMLP,
    script,
    trace,
)
from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.prune.dependency import find_channel_groups
from worker.engines.prune.selection import channels_to_remove
from worker.engines.prune.shrink import remove_channels_checked

_SEEDED = torch.Generator().manual_seed(0)  # the same inputs whatever ran before this module
IMAGE = torch.rand(16, 1, 32, 32, generator=_SEEDED)
VECTOR = torch.randn(16, 64, generator=_SEEDED)

# Parameters after removing half of every prunable group's channels (scope layer):
CASES = {
    # conv 16→8, conv 32→16 (8→16 in), fc1 hidden 64→32 on 16·64 inputs, fc2 10 outputs:
    # (8·9+8) + 2·8 + (16·8·9+16) + 2·16 + (32·1024+32) + (10·32+10)
    "SequentialCNN": (SequentialCNN, IMAGE, 34_426),
    # every group halves, which is exactly TinyResNet(width=8)
    "TinyResNet": (TinyResNet, IMAGE, sum(p.numel() for p in TinyResNet(width=8).parameters())),
    # stem 16→8, branches 8/12/4 → 4/6/2 (cat 12), mix 32→16:
    # (8·9+8) + 16 + (4·8+4) + (6·8·9+6) + (2·8·25+2) + (16·12·9+16) + 32 + (10·16+10)
    "InceptionNet": (InceptionNet, IMAGE, 2_918),
    # widths 16/32/64/64 → 8/16/32/32, depthwise convs follow their inputs:
    # 8·9 + 16 + [8·9 + 16 + 16·8 + 32] + [16·9 + 32 + 32·16 + 64] + [32·9 + 64 + 32·32 + 64] + (10·32+10)
    "MobileNetStyle": (MobileNetStyle, IMAGE, 2_858),
    # MLP hidden 256→128; the residual width 64 is the model input's and stays:
    # 2·64 + (128·64+128) + (64·128+64) + (10·64+10)
    "TransformerMLP": (TransformerMLP, VECTOR, 17_354),
    # conv/bn/body share one set 16→8: (8·9+8) + 2·8 + (8·8·9+8) + (10·8+10)
    "LoopIfNet": (LoopIfNet, IMAGE, 770),
    # only conv 16→8 (conv2 feeds view(-1, 4096)): (8·9+8) + (16·8·9+16) + (10·4096+10)
    "FixedViewNet": (FixedViewNet, IMAGE, 42_218),
}
CONVERTERS = pytest.mark.parametrize("convert", ["trace", "script"])


def build(name: str, convert: str) -> tuple[torch.jit.ScriptModule, torch.Tensor]:
    model_cls, inputs, _ = CASES[name]
    torch.manual_seed(0)
    return (trace(model_cls(), inputs[:2]) if convert == "trace" else script(model_cls())), inputs


def context(model, inputs, labels=None) -> PipelineContext:
    return PipelineContext(teacher=model, calibration=ModelData((inputs,), labels), evaluation=ModelData((inputs,)))


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(model, inputs, labels=None, **step):
    return run_step(model, {"op": "prune", "structure": "channel", **step}, context(model, inputs, labels))


@pytest.mark.parametrize("name", CASES)
@CONVERTERS
def test_half_the_channels_go_and_the_artifact_reloads_with_the_same_shapes(name, convert, tmp_path):
    model, inputs = build(name, convert)

    out = prune(model, inputs, amount=0.5, scope="layer")
    torch.jit.save(out.model, tmp_path / "pruned.pt")
    loaded = torch.jit.load(tmp_path / "pruned.pt")

    with torch.no_grad():
        assert loaded(inputs[:3]).shape == model(inputs[:3]).shape
    assert params(loaded) == out.details["parameters_after"] == CASES[name][2]
    assert out.details["parameters_before"] == params(model)
    json.dumps(out.details)
    reasons = {entry["module"]: entry["reason"] for entry in out.details["skipped"]}
    classifier = {"SequentialCNN": "fc2", "TransformerMLP": "head"}.get(name, "fc")
    assert reasons[classifier] == "its channels reach the model output"
    if name == "FixedViewNet":
        assert reasons["conv2"] == "reshaped to a fixed shape [-1, 4096] by aten::view"


def kill_one_channel_per_group(model, inputs) -> int:
    """Zero every weight of the middle channel of each prunable group: it contributes nothing."""
    groups, _ = find_channel_groups(model, (inputs[:2],))
    tensors = dict(chain(model.named_parameters(), model.named_buffers()))
    killed = 0
    with torch.no_grad():
        for group in filter(lambda g: g.prunable, groups):
            for s in group.slices:
                if s.attr in ("weight", "bias"):
                    tensors[s.key].index_fill_(s.dim, torch.tensor(s.entries([group.channels // 2])), 0.0)
            killed += 1
    return killed


@pytest.mark.parametrize("name", CASES)
@CONVERTERS
def test_a_tiny_amount_removes_dead_channels_without_changing_the_outputs(name, convert):
    model, inputs = build(name, convert)
    killed = kill_one_channel_per_group(model, inputs)

    out = prune(model, inputs, amount=0.001, scope="layer")  # one channel per group, even of 256

    assert len(out.details["groups"]) == killed
    assert all(g["kept"] == g["channels"] - 1 for g in out.details["groups"])
    assert params(out.model) < params(model)
    with torch.no_grad():
        torch.testing.assert_close(out.model(inputs), model(inputs), atol=1e-5, rtol=1e-4)


def test_the_input_model_is_left_untouched():
    model, inputs = build("MobileNetStyle", "script")
    before = {name: p.clone() for name, p in model.named_parameters()}

    prune(model, inputs, amount=0.5)

    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    with torch.no_grad():
        model(inputs)


def sequential_cnn():
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])
    return model, dict(model.named_parameters())


def test_bn_scale_removes_the_channel_with_the_smallest_gamma():
    model, p = sequential_cnn()
    with torch.no_grad():
        p["features.1.weight"][3] = 1e-3
        p["features.0.weight"][3] *= 20  # l1 would keep it

    by_gamma = prune(model, IMAGE, amount=0.01, scope="layer", criterion="bn_scale").model
    by_l1 = prune(model, IMAGE, amount=0.01, scope="layer", criterion="l1").model

    assert by_gamma.features.state_dict()["1.weight"].min() > 0.5
    assert by_l1.features.state_dict()["1.weight"].min() < 0.01


def test_bn_scale_skips_groups_without_batchnorm_with_the_reason():
    model, _ = sequential_cnn()

    out = prune(model, IMAGE, amount=0.5, criterion="bn_scale")

    assert {
        "module": "fc1",
        "reason": "the bn_scale criterion needs a BatchNorm on the group's channels",
    } in out.details["skipped"]


def test_entropy_removes_a_dead_relu_channel_that_magnitude_would_keep():
    model, p = sequential_cnn()
    with torch.no_grad():
        p["features.1.bias"] += 2.0  # no other channel is dead by chance (a tie at zero entropy)
        p["features.1.bias"][5] = -100.0  # after BN the channel is always negative: ReLU kills it
        p["features.0.weight"][5] *= 20

    by_entropy = prune(model, IMAGE, amount=0.01, scope="layer", criterion="entropy").model
    by_l1 = prune(model, IMAGE, amount=0.01, scope="layer", criterion="l1").model

    assert -100.0 not in by_entropy.features.state_dict()["1.bias"].tolist()
    assert -100.0 in by_l1.features.state_dict()["1.bias"].tolist()


@pytest.mark.parametrize("labels", [torch.randint(0, 10, (16,)), None], ids=["labels", "teacher"])
def test_gradient_removes_a_hidden_unit_the_loss_does_not_see(labels):
    model, p = sequential_cnn()
    with torch.no_grad():
        p["fc1.bias"] += 10.0  # no hidden unit is a dead ReLU (which would also score zero)
        p["fc2.weight"][:, 7] = 0.0  # hidden unit 7 reaches no output: zero Taylor saliency
        p["fc1.weight"][7] *= 20

    by_gradient = prune(model, IMAGE, labels, amount=0.01, scope="layer", criterion="gradient").model
    by_l1 = prune(model, IMAGE, labels, amount=0.01, scope="layer", criterion="l1").model

    assert (by_gradient.fc2.weight.abs().sum(0) > 0).all()
    assert (by_l1.fc2.weight.abs().sum(0) == 0).any()


def test_global_scope_removes_the_amount_overall_but_never_a_whole_layer():
    scores = {0: torch.zeros(10), 1: torch.arange(1.0, 11.0)}

    removed = channels_to_remove(scores, 0.5, "global")

    assert removed == {0: list(range(9)), 1: [0]}  # the floor keeps one channel of the all-zero group


def test_layer_scope_removes_the_same_fraction_everywhere():
    removed = channels_to_remove({0: torch.arange(8.0), 1: torch.arange(16.0).flip(0)}, 0.5, "layer")

    assert removed == {0: [0, 1, 2, 3], 1: list(range(8, 16))}


def test_global_scope_prunes_the_resnet_by_about_the_amount():
    model, inputs = build("TinyResNet", "trace")

    out = prune(model, inputs, amount=0.5, scope="global")

    before = sum(g["channels"] for g in out.details["groups"])
    after = sum(g["kept"] for g in out.details["groups"])
    assert after == before // 2
    assert all(g["kept"] >= 2 for g in out.details["groups"])


def test_excluded_modules_keep_their_group_whole():
    model, inputs = build("TinyResNet", "trace")

    out = prune(model, inputs, amount=0.5, scope="layer", exclude=["layer1.*"])

    kept = dict(out.model.named_parameters())
    for name, tensor in model.named_parameters():
        if name.startswith("layer1."):
            assert kept[name].shape == tensor.shape
    assert any(e["module"] == "stem.0" and "excluded module 'layer1." in e["reason"] for e in out.details["skipped"])
    assert kept["layer3.0.conv1.weight"].shape[0] == 32


def test_a_group_that_breaks_the_model_is_reverted_with_the_reason():
    model, _ = sequential_cnn()
    groups, _ = find_channel_groups(model, (IMAGE[:2],))
    wrong = groups[0]
    wrong.slices = [s for s in wrong.slices if s.module != "features.4"]  # forget the consumer

    pruned, reverted = remove_channels_checked(model, groups, {0: [0, 1], 1: [0]}, (IMAGE[:2],))

    assert list(reverted) == [0] and "failed to run" in reverted[0]
    assert pruned.features.state_dict()["0.weight"].shape[0] == 16
    assert pruned.features.state_dict()["4.weight"].shape[0] == 31


class TwinDepthwise(nn.Module):
    """Two depthwise convs with identical settings: scripting compiles them into one shared type."""

    def __init__(self):
        super().__init__()
        self.stem, self.pw, self.fc = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Linear(16, 10)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        x = self.pw(torch.relu(self.dw1(torch.relu(self.stem(x)))))
        return self.fc(torch.relu(self.dw2(x)).mean((2, 3)))


def test_scripted_depthwise_convs_sharing_code_are_skipped_and_traced_ones_pruned():
    torch.manual_seed(0)
    scripted = prune(script(TwinDepthwise()), IMAGE, amount=0.5, scope="layer")
    traced = prune(trace(TwinDepthwise(), IMAGE[:2]), IMAGE, amount=0.5, scope="layer")

    assert any("shares its compiled code" in e["reason"] for e in scripted.details["skipped"])
    assert params(scripted.model) == params(TwinDepthwise())
    assert traced.model.dw1.weight.shape[0] == traced.model.dw2.weight.shape[0] == 8
    with torch.no_grad():
        assert traced.model(IMAGE).shape == (16, 10)


@pytest.mark.cuda
def test_channel_pruning_runs_on_the_gpu():
    device = torch.device("cuda")
    model, inputs = build("TinyResNet", "trace")
    model = model.to(device)
    ctx = PipelineContext(
        teacher=model, calibration=ModelData((inputs,)), evaluation=ModelData((inputs,)), device=device
    )

    out = run_step(model, {"op": "prune", "structure": "channel", "amount": 0.5, "criterion": "gradient"}, ctx)

    assert next(out.model.parameters()).is_cuda and next(out.model.buffers()).is_cuda
    with torch.no_grad():
        assert out.model(inputs[:4].to(device)).shape == (4, 10)
    assert params(out.model) < params(model)
    assert out.details["bn_recalibration"]["updated"] > 0
