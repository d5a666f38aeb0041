"""Multiply-accumulate counts of a TorchScript model, read off one real forward pass.

The model runs once on one example under a dispatch mode that sees every operator the TorchScript
interpreter executes, with the concrete shapes of that run: loops count once per iteration, only
the branch taken counts, and traced and scripted models are handled alike. Conv, linear/matmul,
attention and RNN operators are counted from their argument shapes; any other operator that looks
like heavy compute is listed as uncounted rather than guessed. Element-wise work, norms and
pooling are not multiply-accumulates and are left out by convention.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that do the bulk of a network's arithmetic; one without a counter below is reported
# as uncounted so that a MAC figure is never silently low.
_HEAVY_OP = re.compile(r"conv(?!ert)|linear|mm|matmul|einsum|attention|lstm|gru|rnn|bilinear|tensordot|transformer")

_Counter = Callable[[str, Sequence[Any], Any], "int | None"]
_COUNTERS: dict[str, _Counter] = {}


@dataclass
class MacCount:
    """MACs of one forward pass, per operator, and the heavy operators that could not be counted."""

    macs: int = 0
    by_operator: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)


def count_macs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> MacCount:
    """Count the multiply-accumulates of one forward pass of `model` on `inputs`.

    Args:
        model: a TorchScript (or eager) module in eval mode.
        inputs: positional inputs; pass a batch of one to get MACs per sample.

    Returns:
        A `MacCount` whose `by_operator` is keyed by operator name (`aten::conv2d`,
        `quantized::linear_dynamic`, …) and whose `uncounted` lists heavy operators seen in the
        run that have no counting rule.

    Example:
        count = count_macs(torch.jit.script(net.eval()), (torch.randn(1, 3, 32, 32),))
        count.macs, count.by_operator["aten::conv2d"]
    """
    recorder = _MacRecorder()
    with torch.inference_mode(), recorder:
        model(*inputs)
    return MacCount(
        macs=sum(recorder.by_operator.values()),
        by_operator=dict(sorted(recorder.by_operator.items(), key=lambda item: -item[1])),
        uncounted=sorted(recorder.uncounted),
    )


class _MacRecorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ to keep torch.compile out of it, importing all of
        # torch._dynamo (seconds) at the first operator. The recorder only ever watches a TorchScript
        # forward, which torch.compile never traces: without the wrapper, nothing to keep out.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.by_operator: dict[str, int] = defaultdict(int)
        self.uncounted: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = _call(func, args, kwargs)
        name = func._schema.name
        counter = _COUNTERS.get(name)
        macs = None
        if counter is not None:
            try:
                macs = counter(func._overloadname, args, output)
            except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
                macs = None
        if macs is not None:
            self.by_operator[name] += int(macs)
        elif _HEAVY_OP.search(name.split("::")[-1]):
            self.uncounted.add(name)
        return output


def _call(func, args, kwargs):
    """Run the operator; re-wrap numbers that TorchScript passed where the schema wants a Tensor.

    Traced graphs carry Python numbers as "wrapped number" tensors (`prim::NumToTensor`), which
    the trip through Python unwraps into plain ints; calling the op again needs them as tensors.
    """
    try:
        return func(*args, **kwargs)
    except RuntimeError:
        schema_args = func._schema.arguments
        rewrapped = [
            torch.tensor(value) if isinstance(value, (bool, int, float)) and str(spec.type) == "Tensor" else value
            for value, spec in zip(args, schema_args)
        ]
        if all(a is b for a, b in zip(rewrapped, args)):
            raise
        return func(*rewrapped, **kwargs)


def _counts(*names: str) -> Callable[[_Counter], _Counter]:
    def register(counter: _Counter) -> _Counter:
        for name in names:
            _COUNTERS[name] = counter
        return counter

    return register


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return next(v for v in value if isinstance(v, torch.Tensor))


def _conv_weight(args: Sequence[Any]) -> torch.Tensor:
    """The weight: quantized ops hold it in packed params (not always argument 1), aten ops pass it."""
    packed = next((a for a in args if isinstance(a, torch.ScriptObject) and a._has_method("unpack")), None)
    return packed.unpack()[0] if packed is not None else args[1]


@_counts(
    "aten::conv1d",
    "aten::conv2d",
    "aten::conv3d",
    "aten::mkldnn_convolution",
    "aten::cudnn_convolution",
    "quantized::conv1d",
    "quantized::conv2d",
    "quantized::conv3d",
    "quantized::conv1d_relu",
    "quantized::conv2d_relu",
    "quantized::conv3d_relu",
    "quantized::conv2d_add",
    "quantized::conv2d_add_relu",
)
def _conv(overload: str, args: Sequence[Any], output: Any) -> int:
    return _conv_macs(args[0], _conv_weight(args), output, transposed=False)


@_counts(
    "aten::conv_transpose1d",
    "aten::conv_transpose2d",
    "aten::conv_transpose3d",
    "aten::cudnn_convolution_transpose",
    "quantized::conv_transpose1d",
    "quantized::conv_transpose2d",
    "quantized::conv_transpose3d",
)
def _conv_transpose(overload: str, args: Sequence[Any], output: Any) -> int:
    return _conv_macs(args[0], _conv_weight(args), output, transposed=True)


@_counts("aten::convolution", "aten::_convolution")
def _convolution(overload: str, args: Sequence[Any], output: Any) -> int:
    return _conv_macs(args[0], args[1], output, transposed=bool(args[6]))


def _conv_macs(x: torch.Tensor, weight: torch.Tensor, output: Any, transposed: bool) -> int:
    # One weight row w[0] is the work of one output element ([Cin/groups, *kernel]); for a
    # transposed convolution it is the work of one input element ([Cout/groups, *kernel]).
    per_element = weight[0].numel()
    return (x.numel() if transposed else _first_tensor(output).numel()) * per_element


@_counts(
    "aten::linear",
    "aten::matmul",
    "aten::mm",
    "aten::bmm",
    "aten::mv",
    "aten::mkldnn_linear",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
    "quantized::linear",
    "quantized::linear_relu",
    "quantized::linear_dynamic",
    "quantized::linear_relu_dynamic",
    "quantized::linear_dynamic_fp16",
    "quantized::linear_relu_dynamic_fp16",
    "quantized::linear_with_input_q_dq_qweight_dq_output_fp32",
    "quantized::linear_with_input_q_dq_qweight_dq_relu_output_fp32",
)
def _matmul(overload: str, args: Sequence[Any], output: Any) -> int:
    # Every output element is one dot product over the left operand's last dimension; this holds
    # for broadcast batches and for 1-D operands alike.
    return _first_tensor(output).numel() * args[0].shape[-1]


@_counts("aten::addmm", "aten::baddbmm", "aten::addmv", "aten::_addmm_activation")
def _add_matmul(overload: str, args: Sequence[Any], output: Any) -> int:
    return _first_tensor(output).numel() * args[1].shape[-1]


@_counts("aten::addbmm")
def _addbmm(overload: str, args: Sequence[Any], output: Any) -> int:
    batch1 = args[1]
    return _first_tensor(output).numel() * batch1.shape[0] * batch1.shape[-1]


@_counts("aten::dot", "aten::vdot")
def _dot(overload: str, args: Sequence[Any], output: Any) -> int:
    return args[0].numel()


@_counts("aten::bilinear")
def _bilinear(overload: str, args: Sequence[Any], output: Any) -> int:
    return _first_tensor(output).numel() * args[0].shape[-1] * args[1].shape[-1]


@_counts("aten::einsum")
def _einsum(overload: str, args: Sequence[Any], output: Any) -> int | None:
    # A two-operand contraction without ellipsis costs the product of every index's size.
    equation, operands = args[0].replace(" ", ""), list(args[1])
    inputs = equation.split("->")[0].split(",")
    if len(operands) != 2 or "." in equation:
        return None
    sizes: dict[str, int] = {}
    for letters, operand in zip(inputs, operands):
        sizes.update(zip(letters, operand.shape))
    return math.prod(sizes.values())


@_counts(
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
def _attention(overload: str, args: Sequence[Any], output: Any) -> int:
    # Q·Kᵀ is L×S dot products of length E per head, and A·V is L×S multiply-adds per value column.
    query, key, value = args[0], args[1], args[2]
    rows = query.numel() // query.shape[-1]
    return rows * key.shape[-2] * (query.shape[-1] + value.shape[-1])


@_counts("aten::_transformer_encoder_layer_fwd")
def _encoder_layer(overload: str, args: Sequence[Any], output: Any) -> int:
    # The fused encoder layer: QKV projection, attention, output projection, two FFN linears.
    src, qkv_weight, proj_weight, ffn_1, ffn_2 = args[0], args[3], args[5], args[14], args[16]
    dim = src.shape[-1]
    tokens = src.numel() // dim
    projections = qkv_weight.numel() + proj_weight.numel() + ffn_1.numel() + ffn_2.numel()
    return tokens * projections + tokens * src.shape[-2] * 2 * dim


@_counts("aten::_native_multi_head_attention")
def _multi_head_attention(overload: str, args: Sequence[Any], output: Any) -> int:
    query, key, dim = args[0], args[1], args[3]
    queries, keys = query.numel() // dim, key.numel() // dim
    projections = queries * 2 * dim * dim + keys * 2 * dim * dim
    return projections + queries * key.shape[-2] * 2 * dim


@_counts("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu")
def _recurrent(overload: str, args: Sequence[Any], output: Any) -> int:
    # Every (time step, sample) pair multiplies each 2-D weight (input, hidden and projection
    # matrices of every layer and direction) by a vector once.
    if overload == "data":
        steps, params = args[0].shape[0], args[3]
    else:
        steps, params = args[0].shape[0] * args[0].shape[1], args[2]
    return steps * sum(p.numel() for p in params if p.dim() == 2)


@_counts("aten::lstm_cell", "aten::gru_cell", "aten::rnn_tanh_cell", "aten::rnn_relu_cell")
def _recurrent_cell(overload: str, args: Sequence[Any], output: Any) -> int:
    x, w_ih, w_hh = args[0], args[2], args[3]
    batch = x.shape[0] if x.dim() > 1 else 1
    return batch * (w_ih.numel() + w_hh.numel())
