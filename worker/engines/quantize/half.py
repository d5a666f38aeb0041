"""`fp16` / `bf16`: float parameters and compute in half precision, float32 at the boundary.

The artifact wraps the converted model in a scripted module whose `forward` has the original
signature: float32 tensor inputs are cast to the half type on the way in and half outputs back
to float32 on the way out; integer inputs such as token ids pass untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from worker.engines.errors import EngineError, model_text
from worker.engines.quantize.backend import native_bf16
from worker.engines.quantize.graph import ForwardGraph
from worker.engines.quantize.scheme import Conversion, Layer, Scheme, register_scheme

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SCALAR_TYPE = {torch.float32: 6, torch.float16: 5, torch.bfloat16: 15}  # c10::ScalarType codes in graphs
WHOLE_MODEL = Layer("", "model")


@register_scheme("fp16", "bf16")
class HalfPrecision(Scheme):
    """Casts the whole model to fp16 or bf16 behind float32 boundary casts."""

    @property
    def precision(self) -> str:
        return self.config.scheme

    def convert(self, model: torch.jit.ScriptModule, modules: Collection[str] | None) -> Conversion:
        if modules is not None and WHOLE_MODEL.module not in modules:
            return Conversion(self.fresh_copy(model, self.ctx.device), [])
        dtype = _DTYPES[self.config.scheme]
        graph = ForwardGraph(self.fresh_copy(model, self.ctx.device))
        retarget_float32(graph, dtype)
        inner = graph.model.to(dtype)
        return Conversion(cast_boundary(inner, dtype), [WHOLE_MODEL])

    def notes(self) -> dict[str, Any]:
        device = self.ctx.device
        if device.type == "cuda":
            faster = "CUDA tensor cores"
        elif self.config.scheme == "bf16" and native_bf16():
            faster = "this CPU has native bf16 (AVX512-BF16/AMX): may be faster, see the measured latency"
        else:
            faster = "not on this CPU (no native half arithmetic): smaller file, no speed-up expected"
        return {
            "dtype": self.config.scheme,
            "compute": str(device),
            "faster_on": faster,
            "boundary": "float32 inputs cast in, half outputs cast back to float32",
        }


def retarget_float32(graph: ForwardGraph, dtype: torch.dtype) -> int:
    """Make the graph's float32 constants `dtype`: dtype arguments and float32 tensor constants.

    A traced `x.to(other.dtype)` or `torch.zeros(..., dtype=torch.float32)` records float32 as a
    constant; left alone it would mix float32 into the half-precision compute.

    Returns:
        how many constants were changed.
    """
    target = _SCALAR_TYPE[dtype]
    changed = 0
    for node in list(graph.graph.findAllNodes("prim::Constant", True)):
        out = node.output()
        if isinstance(out.type(), torch._C.TensorType):
            value = out.toIValue()
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                out.replaceAllUsesWith(graph.constant(value.to(dtype), node))
                changed += 1
                continue
        if out.toIValue() != _SCALAR_TYPE[torch.float32] or not isinstance(out.type(), torch._C.IntType):
            continue
        for use in list(out.uses()):
            if _argument_name(use.user, use.offset) == "dtype":
                use.user.replaceInput(use.offset, graph.constant(target, use.user))
                changed += 1
    return changed


def _argument_name(node: torch._C.Node, offset: int) -> str | None:
    try:
        schema = torch._C.parse_schema(node.schema())
    except RuntimeError:  # prim:: nodes have no schema
        return None
    arguments = schema.arguments
    return arguments[offset].name if offset < len(arguments) else None


class _Boundary(torch.nn.Module):
    """Holds the converted model; `forward` and the casts are defined per signature after scripting."""

    def __init__(self, inner: torch.jit.ScriptModule):
        super().__init__()
        self.inner = inner


def cast_boundary(inner: torch.jit.ScriptModule, dtype: torch.dtype) -> torch.jit.ScriptModule:
    """Wrap a model computing in `dtype` so it takes and returns the float32 tensors it did before.

    The wrapper's `forward` repeats `inner.forward`'s signature (argument names, types, defaults);
    tensors inside tuples, lists, dicts and optionals are cast too.

    Args:
        inner: the converted model (parameters already in `dtype`).
        dtype: its compute dtype (`torch.float16` or `torch.bfloat16`).

    Returns:
        A scripted module; `torch.jit.save` it like any other.

    Example:
        wrapped = cast_boundary(clone_model(model).to(torch.bfloat16), torch.bfloat16)
        wrapped(torch.randn(2, 3)).dtype  # torch.float32
    """
    schema = inner.forward.schema
    wrapper = torch.jit.script(_Boundary(inner))
    name = {torch.float16: "torch.float16", torch.bfloat16: "torch.bfloat16"}[dtype]
    wrapper.define(
        f"def _cast_in(self, x: Tensor) -> Tensor:\n"
        f"    if x.dtype == torch.float32:\n        return x.to({name})\n    return x\n"
    )
    wrapper.define(
        f"def _cast_out(self, x: Tensor) -> Tensor:\n"
        f"    if x.dtype == {name}:\n        return x.to(torch.float32)\n    return x\n"
    )
    params, call_args = [], []
    for arg in schema.arguments[1:]:
        annotation = arg.type.annotation_str
        default = "" if arg.default_value is None and not arg.has_default_value() else f" = {arg.default_value!r}"
        params.append(f"{arg.name}: {annotation}{default}")
        call_args.append(_cast(arg.name, arg.type, "_cast_in"))
    returns = schema.returns[0].type
    source = (
        f"def forward(self, {', '.join(params)}) -> {returns.annotation_str}:\n"
        f"    out = self.inner({', '.join(call_args)})\n"
        f"    return {_cast('out', returns, '_cast_out')}\n"
    )
    try:
        wrapper.define(source)
    except RuntimeError as exc:
        raise EngineError(
            "unsupported_signature",
            f"cannot re-create the model's forward signature for the half-precision boundary: {model_text(exc)}",
        ) from exc
    return wrapper


def _cast(expr: str, type_: torch._C.Type, method: str) -> str:
    """A TorchScript expression casting the tensors in `expr` (of TorchScript type `type_`)."""
    if isinstance(type_, torch._C.TensorType):
        return f"self.{method}({expr})"
    if isinstance(type_, torch._C.TupleType):
        items = [_cast(f"{expr}[{i}]", t, method) for i, t in enumerate(type_.elements())]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(type_, torch._C.ListType) and isinstance(type_.getElementType(), torch._C.TensorType):
        return f"[self.{method}(t) for t in {expr}]"
    if isinstance(type_, torch._C.DictType) and isinstance(type_.getValueType(), torch._C.TensorType):
        return f"{{k: self.{method}(v) for k, v in {expr}.items()}}"
    if isinstance(type_, torch._C.OptionalType) and isinstance(type_.getElementType(), torch._C.TensorType):
        return f"(None if {expr} is None else self.{method}({expr}))"
    return expr
