"""MAC counts against hand counts: traced and scripted CNNs, loops, RNNs, attention, quantized ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import (
    LoopIfNet,
    LSTMClassifier,
    SequentialCNN,
    TinyEncoder,
    TransformerMLP,
    script,
    trace,
)
from worker.engines.measure import count_macs

IMAGE = torch.rand(1, 1, 32, 32)
TOKENS = torch.randint(0, 1000, (1, 7))

# SequentialCNN(width=16) on one 1×32×32 image; a conv costs (output elements) × (Cin/groups × kh × kw).
CNN_CONV1 = (16 * 32 * 32) * (1 * 3 * 3)  # 147_456
CNN_CONV2 = (32 * 16 * 16) * (16 * 3 * 3)  # 1_179_648 (after the first 2×2 max-pool)
CNN_FC1 = 64 * (32 * 8 * 8)  # 131_072
CNN_FC2 = 10 * 64  # 640
CNN_TOTAL = CNN_CONV1 + CNN_CONV2 + CNN_FC1 + CNN_FC2


@pytest.mark.parametrize("convert,conv_op", [(trace, "aten::_convolution"), (script, "aten::conv2d")])
def test_cnn_macs_equal_the_hand_count_traced_and_scripted(convert, conv_op):
    model = convert(SequentialCNN(), IMAGE) if convert is trace else convert(SequentialCNN())

    count = count_macs(model, (IMAGE,))

    assert count.macs == CNN_TOTAL == 1_458_816
    assert count.by_operator == {conv_op: CNN_CONV1 + CNN_CONV2, "aten::linear": CNN_FC1 + CNN_FC2}
    assert count.uncounted == []


def test_a_scripted_loop_counts_every_iteration_and_only_the_branch_taken():
    model = script(LoopIfNet(steps=2))

    count = count_macs(model, (IMAGE,))

    stem = (16 * 32 * 32) * (1 * 9)
    body = (16 * 32 * 32) * (16 * 9)
    assert count.macs == stem + 2 * body + 10 * 16


class Mixed(nn.Module):
    """Grouped conv, transposed conv, matmul and einsum: one of each counting rule."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.mix = nn.Parameter(torch.randn(1, 256, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.depthwise(x)).flatten(2)  # [1, 2, 256]
        gram = torch.matmul(y, y.transpose(1, 2))  # [1, 2, 2]
        return torch.einsum("bij,bjk->bik", y, self.mix) + gram.sum()


def test_grouped_transposed_matmul_and_einsum_rules():
    x = torch.rand(1, 4, 8, 8)
    depthwise = (4 * 8 * 8) * (1 * 3 * 3)  # groups=4: each output sees one input channel
    transposed = (4 * 8 * 8) * (2 * 2 * 2)  # each input element feeds Cout × kh × kw outputs
    matmul = (2 * 2) * 256
    einsum = 1 * 2 * 256 * 3

    for model in (script(Mixed()), trace(Mixed(), x)):
        count = count_macs(model, (x,))
        assert count.macs == depthwise + transposed + matmul + einsum
        assert count.uncounted == []


def test_lstm_counts_every_step_layer_and_gate():
    count = count_macs(script(LSTMClassifier()), (TOKENS,))

    steps = 7
    layer1 = 4 * 128 * 64 + 4 * 128 * 128  # input and hidden matrices, 4 gates
    layer2 = 4 * 128 * 128 + 4 * 128 * 128
    assert count.by_operator["aten::lstm"] == steps * (layer1 + layer2)
    assert count.macs == steps * (layer1 + layer2) + 5 * 128


def test_fused_encoder_layer_equals_its_decomposed_trace_and_the_hand_count():
    scripted, traced = script(TinyEncoder()), trace(TinyEncoder(), TOKENS)

    fused, decomposed = count_macs(scripted, (TOKENS,)), count_macs(traced, (TOKENS,))

    tokens, dim, ffn = 7, 64, 256
    per_layer = tokens * (3 * dim * dim + dim * dim + 2 * ffn * dim) + tokens * tokens * 2 * dim
    assert fused.macs == decomposed.macs == 2 * per_layer
    assert "aten::_transformer_encoder_layer_fwd" in fused.by_operator
    assert "aten::scaled_dot_product_attention" in decomposed.by_operator


def test_quantized_linear_is_counted_and_a_quantized_lstm_is_listed_not_guessed():
    mlp = torch.ao.quantization.quantize_dynamic(TransformerMLP().eval(), {nn.Linear})
    lstm = torch.ao.quantization.quantize_dynamic(LSTMClassifier().eval(), {nn.LSTM, nn.Linear})

    mlp_count = count_macs(torch.jit.script(mlp), (torch.rand(1, 64),))
    lstm_count = count_macs(torch.jit.script(lstm), (TOKENS,))

    assert mlp_count.by_operator == {"quantized::linear_dynamic": 256 * 64 + 64 * 256 + 10 * 64}
    assert lstm_count.uncounted == ["aten::quantized_lstm"]
    assert lstm_count.macs == 5 * 128


def test_half_precision_model_counts_like_float():
    model = script(TransformerMLP().half())

    assert count_macs(model, (torch.rand(1, 64).half(),)).macs == 256 * 64 + 64 * 256 + 10 * 64
