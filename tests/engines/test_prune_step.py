"""The `prune` step as the pipeline sees it: registration, step parsing and its errors, the
importance strategies on a hand-made group, and the BN-scale sparsity penalty for training steps."""

from __future__ import annotations

import math

import pytest
import torch

from tests.zoo import SequentialCNN, TinyResNet, script, trace
from worker.engines.errors import EngineError
from worker.engines.pipeline import step_handler
from worker.engines.prune import PruneConfig, bn_scale_penalty, prune
from worker.engines.prune.calibration import _histogram_entropy
from worker.engines.prune.groups import IN, NORM, OUT, ChannelGroup, ParamSlice
from worker.engines.prune.importance import BNScaleImportance, MagnitudeImportance, TaylorImportance


def test_the_prune_op_is_registered():
    assert step_handler(PruneConfig) is prune


def test_defaults_fill_the_optional_fields():
    config = PruneConfig.from_step({"op": "prune", "structure": "channel", "amount": 0.3})

    assert config == PruneConfig(structure="channel", amount=0.3, criterion="l1", scope="global", n=2, m=4, exclude=())
    assert PruneConfig.from_step({"op": "prune", "structure": "n:m"}).n == 2
    assert PruneConfig.from_step(config.as_step()) == config


@pytest.mark.parametrize(
    "step,message",
    [
        ({"amount": 0.5}, "structure"),
        ({"structure": "channel", "amount": "half"}, "amount"),
        ({"structure": "channel", "amount": 1.0}, "amount must be < 1"),
        ({"structure": "channel", "amount": 0.5, "amonut": 0.4}, "unknown field(s) amonut"),
        ({"structure": "n:m", "n": 4, "m": 4}, "n < m"),
        ({"structure": "unstructured", "criterion": "entropy"}, "use it with structure 'channel'"),
        ({"structure": "channel", "amount": 0.5, "criterion": "random"}, "criterion"),
        ({"structure": "channel", "amount": 0.5, "scope": "model"}, "scope"),
        ({"structure": "blocks", "amount": 0.5}, "structure"),
    ],
)
def test_bad_steps_raise_an_actionable_error(step, message):
    with pytest.raises(EngineError) as error:
        PruneConfig.from_step({"op": "prune", **step})

    assert error.value.code == "invalid_step" and message in error.value.message


def group_with(weights: dict[str, torch.Tensor]) -> tuple[ChannelGroup, dict[str, torch.Tensor]]:
    """Two channels: conv a's output rows, BN b's gammas, conv c's input columns."""
    group = ChannelGroup(
        0, 2, [ParamSlice("a", "weight", 0, OUT), ParamSlice("b", "weight", 0, NORM), ParamSlice("c", "weight", 1, IN)]
    )
    return group, {f"{name}.weight": tensor for name, tensor in weights.items()}


def test_l1_and_l2_weigh_spread_and_peaked_channels_differently():
    # channel 0: one large weight; channel 1: many medium ones
    group, tensors = group_with(
        {"a": torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1]]), "b": torch.zeros(2), "c": torch.zeros(1, 2)}
    )

    l1, l2 = MagnitudeImportance(tensors, 1)(group), MagnitudeImportance(tensors, 2)(group)

    assert l1.tolist() == [3.0, 4.0] and l2.tolist() == [9.0, 4.0]


def test_bn_scale_and_taylor_read_their_own_signals():
    group, tensors = group_with({"a": torch.ones(2, 3), "b": torch.tensor([0.5, -2.0]), "c": torch.ones(4, 2)})
    gradients = {"a.weight": torch.tensor([[1.0, 1, 1], [0, 0, 0]])}

    assert BNScaleImportance(tensors)(group).tolist() == [0.5, 2.0]
    assert TaylorImportance(tensors, gradients)(group).tolist() == [3.0, 0.0]
    no_bn = ChannelGroup(1, 2, [ParamSlice("a", "weight", 0, OUT)])
    assert BNScaleImportance(tensors)(no_bn) is None


def test_in_slices_with_offsets_and_blocks_read_the_right_columns():
    weight = torch.arange(24.0).view(2, 12)  # a linear reading 3 channels × 4 spatial entries
    s = ParamSlice("fc", "weight", 1, IN, offset=1, block=4)

    assert s.entries([0, 1]) == [4, 5, 6, 7, 8, 9, 10, 11]
    rows = [sorted(row) for row in s.per_channel(weight, 2).tolist()]
    assert rows == [[4, 5, 6, 7, 16, 17, 18, 19], [8, 9, 10, 11, 20, 21, 22, 23]]


def test_histogram_entropy_is_zero_for_constant_channels_and_maximal_for_uniform_ones():
    values = torch.stack([torch.zeros(3200), torch.arange(3200.0)])

    entropy = _histogram_entropy(values, bins=32)

    assert entropy[0] == 0 and entropy[1] == pytest.approx(math.log(32), rel=1e-4)


@pytest.mark.parametrize("convert", ["trace", "script"])
def test_bn_scale_penalty_sums_gammas_and_is_differentiable(convert):
    torch.manual_seed(0)
    model = trace(TinyResNet(), torch.rand(1, 1, 32, 32)) if convert == "trace" else script(TinyResNet())
    expected = sum(
        p.abs().sum()
        for name, p in model.named_parameters()
        if "bn" in name and name.endswith(".weight") or ("downsample.1.weight" in name or name == "stem.1.weight")
    )

    penalty = bn_scale_penalty(model)
    penalty.backward()

    assert penalty.item() == pytest.approx(float(expected))
    assert dict(model.named_parameters())["stem.1.weight"].grad is not None


def test_bn_scale_penalty_is_zero_without_batchnorm():
    class NoBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    assert bn_scale_penalty(script(NoBN())).item() == 0.0
    assert bn_scale_penalty(SequentialCNN()).item() > 0
