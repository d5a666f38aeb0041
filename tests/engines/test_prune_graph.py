"""The channel-dependency analysis on TorchScript graphs: which layers end up in one group, at which
offsets and block sizes, and why the groups it cannot prune are skipped (traced and scripted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import (
    FixedViewNet,
    InceptionNet,
    LoopIfNet,
    MobileNetStyle,
    SequentialCNN,
    TinyEncoder,
    TinyResNet,
    TransformerMLP,
    script,
    trace,
)
from worker.engines.prune.dependency import find_channel_groups
from worker.engines.prune.groups import IN, NORM, OUT, ParamSlice

IMAGE = torch.rand(2, 1, 32, 32)
CONVERTERS = pytest.mark.parametrize("convert", ["trace", "script"])


def groups_of(model_cls, convert, example=IMAGE):
    model = trace(model_cls(), example) if convert == "trace" else script(model_cls())
    groups, _ = find_channel_groups(model, (example,))
    return {tuple(g.producers): g for g in groups}


@CONVERTERS
def test_conv_bn_pool_conv_and_flatten_linear_blocks(convert):
    groups = groups_of(SequentialCNN, convert)

    first = groups[("features.0",)]
    assert first.prunable and first.channels == 16
    assert set(first.slices) == {
        ParamSlice("features.0", "weight", 0, OUT),
        ParamSlice("features.0", "bias", 0, OUT),
        ParamSlice("features.1", "weight", 0, NORM),
        ParamSlice("features.1", "bias", 0, NORM),
        ParamSlice("features.1", "running_mean", 0, NORM),
        ParamSlice("features.1", "running_var", 0, NORM),
        ParamSlice("features.4", "weight", 1, IN),
    }
    # After two 2×2 pools the 32 channels are 8×8 maps, so each owns a block of 64 fc1 inputs.
    assert ParamSlice("fc1", "weight", 1, IN, offset=0, block=64) in groups[("features.4",)].slices
    assert groups[("fc1",)].prunable and ParamSlice("fc2", "weight", 1, IN) in groups[("fc1",)].slices
    assert groups[("fc2",)].reasons == ["its channels reach the model output"]


@CONVERTERS
def test_residual_adds_share_one_index_set_across_blocks_and_downsample(convert):
    groups = groups_of(TinyResNet, convert)

    stream = groups[("layer1.0.conv2", "layer1.1.conv2", "stem.0")]
    assert stream.prunable and stream.channels == 16
    consumers = {s.module for s in stream.slices if s.role == IN}
    assert consumers == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}
    last = groups[("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2")]
    assert ParamSlice("fc", "weight", 1, IN) in last.slices and last.prunable
    inner = groups[("layer2.0.conv1",)]
    assert {s.module for s in inner.slices} == {"layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2"}


@CONVERTERS
def test_cat_maps_each_branch_to_its_offset(convert):
    groups = groups_of(InceptionNet, convert)

    offsets = {
        producer: [s.offset for s in g.slices if s.module == "mix.0"]
        for (producer,), g in groups.items()
        if producer.startswith("b")
    }
    assert offsets == {"b1.0": [0], "b3.0": [8], "b5.0": [20]}
    assert {s.module for s in groups[("stem.0",)].slices if s.role == IN} == {"b1.0", "b3.0", "b5.0"}


@CONVERTERS
def test_depthwise_conv_couples_its_input_and_output_channels(convert):
    groups = groups_of(MobileNetStyle, convert)

    first = groups[("blocks.0.0", "stem.0")]
    assert first.depthwise == ["blocks.0.0"] and first.prunable
    assert ParamSlice("blocks.0.3", "weight", 1, IN) in first.slices
    assert groups[("blocks.2.3",)].prunable


@CONVERTERS
def test_mlp_hidden_width_is_a_group_and_the_residual_stream_is_not(convert):
    groups = groups_of(TransformerMLP, convert, torch.randn(2, 64))

    hidden = groups[("up",)]
    assert hidden.prunable and hidden.channels == 256
    assert ParamSlice("down", "weight", 1, IN) in hidden.slices
    assert groups[("down",)].reasons == ["combined by aten::add with the model input"]


@CONVERTERS
def test_loop_carried_residual_ties_the_body_conv_to_the_stem(convert):
    groups = groups_of(LoopIfNet, convert)

    group = groups[("body", "conv")]
    assert group.prunable
    assert ParamSlice("body", "weight", 0, OUT) in group.slices and ParamSlice("body", "weight", 1, IN) in group.slices


@CONVERTERS
def test_fixed_size_view_skips_its_group_with_the_reason(convert):
    groups = groups_of(FixedViewNet, convert)

    assert groups[("conv",)].prunable
    assert groups[("conv2",)].reasons == ["reshaped to a fixed shape [-1, 4096] by aten::view"]


def test_attention_head_reshapes_are_skipped_and_the_traced_ffn_is_not():
    tokens = torch.randint(0, 1000, (2, 7))
    groups = groups_of(TinyEncoder, "trace", tokens)

    assert groups[("encoder.layers.0.linear1",)].prunable
    out_proj = groups[("encoder.layers.0.self_attn.out_proj",)]
    assert any("aten::view" in reason for reason in out_proj.reasons)


def test_scripted_fused_fast_path_blocks_parameters_it_reads():
    """Scripted encoder layers may run a fused kernel on their raw weights: never resize those."""
    groups = groups_of(TinyEncoder, "script", torch.randint(0, 1000, (2, 7)))

    ffn = groups[("encoder.layers.0.linear1",)]
    assert not ffn.prunable
    assert any("is also used by" in reason for reason in ffn.reasons)


class RollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        x = torch.roll(F.relu(self.a(x)), 1, 1)
        return self.fc(self.b(x).mean((2, 3)))


@CONVERTERS
def test_ops_without_a_rule_block_their_channels(convert):
    groups = groups_of(RollNet, convert)

    assert any("aten::roll" in reason for reason in groups[("a",)].reasons)
    assert groups[("b",)].prunable  # the mean over H, W keeps b's channels traceable


def test_a_gate_computed_across_the_channels_blocks_the_group():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.sigmoid(y.mean(1, keepdim=True))  # a spatial gate computed over the channels
            return self.fc(y.mean((2, 3)))

    groups = groups_of(Gate, "script")
    assert not groups[("conv",)].prunable  # the gate has no channel axis to follow


def test_custom_registered_ops_are_named_in_the_reason():
    library = torch.library.Library("prune_test", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    library.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.ops.prune_test.twice(self.a(x)).mean((2, 3)))

    groups = groups_of(Custom, "script")
    assert any("the custom op prune_test::twice" in reason for reason in groups[("a",)].reasons)


class ViewFlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, stride=4), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


@CONVERTERS
def test_a_view_that_keeps_the_batch_and_flattens_the_rest_acts_as_flatten(convert):
    groups = groups_of(ViewFlattenNet, convert)

    conv = groups[("conv",)]
    assert conv.prunable
    assert ParamSlice("fc", "weight", 1, IN, block=64) in conv.slices
