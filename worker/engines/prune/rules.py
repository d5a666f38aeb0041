"""Op rules of the channel analysis: for each TorchScript op, how channels flow from its inputs to
its outputs, which layer tensors they index, and when they can no longer be pruned.

A rule is `rule(node, analysis)` registered for one or more node kinds; an op without a rule
blocks every channel space it touches (`not_understood`), so unknown code is never pruned.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from worker.engines.prune.groups import IN, NORM, OUT
from worker.engines.prune.layouts import Items, Layout, Opaque, layouts_in
from worker.engines.prune.torchscript import NotConstant, argument, constant, is_tensor, static_rank, where

if TYPE_CHECKING:
    from worker.engines.prune.dependency import ChannelAnalysis

Node = torch._C.Node
Rule = Callable[[Node, "ChannelAnalysis"], None]
RULES: dict[str, Rule] = {}


def rule(*kinds: str) -> Callable[[Rule], Rule]:
    """Register a rule for the given node kinds."""

    def register(fn: Rule) -> Rule:
        for kind in kinds:
            RULES[kind] = fn
        return fn

    return register


def _in_place(*names: str) -> tuple[str, ...]:
    return tuple(f"aten::{n}{suffix}" for n in names for suffix in ("", "_"))


def _position(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _constant_or_none(value: torch._C.Value | None):
    if value is None:
        return None
    try:
        return constant(value)
    except NotConstant:
        return None


def not_understood(node: Node, a: ChannelAnalysis) -> None:
    """The fallback: channels flowing into an op nobody wrote a rule for cannot be pruned."""
    namespace = node.kind().split("::")[0]
    what = node.kind() if namespace in ("aten", "prim") else f"the custom op {node.kind()}"
    a.block(
        Items(tuple(a.state(v) for v in node.inputs())),
        f"consumed by {what}{where(node)}, which channel pruning does not understand",
    )
    for out in node.outputs():
        if is_tensor(out):
            a.set(out, Opaque(node.kind(), static_rank(out)))


# -- values, attributes, containers --------------------------------------------------------------


@rule("prim::GetAttr")
def _get_attr(node: Node, a: ChannelAnalysis) -> None:
    owner, out, name = a.module_path(node.input()), node.output(), node.s("name")
    if owner is None:
        not_understood(node, a)
        return
    path = f"{owner}.{name}" if owner else name
    if out.type().kind() == "ClassType":
        a.set_module_path(out, path)
    elif is_tensor(out):
        a.set_parameter(out, owner, name)
        tensor = a.tensor(owner, name)
        a.set(out, Opaque(f"parameter '{path}'", tensor.dim() if tensor is not None else None))


@rule("prim::Constant")
def _constant(node: Node, a: ChannelAnalysis) -> None:
    out = node.output()
    if is_tensor(out) and out.type().kind() == "TensorType":
        value = out.toIValue()
        a.set(out, Opaque("a constant tensor", value.dim() if isinstance(value, torch.Tensor) else 0))


@rule("prim::ListConstruct", "prim::TupleConstruct")
def _construct(node: Node, a: ChannelAnalysis) -> None:
    a.set(node.output(), Items(tuple(a.state(v) for v in node.inputs())))


@rule("prim::ListUnpack", "prim::TupleUnpack")
def _unpack(node: Node, a: ChannelAnalysis) -> None:
    items = a.state(node.input())
    if not isinstance(items, Items) or len(items.states) != node.outputsSize():
        not_understood(node, a)
        return
    for out, state in zip(node.outputs(), items.states):
        a.set(out, state)


@rule("prim::TupleIndex", "aten::__getitem__")
def _index(node: Node, a: ChannelAnalysis) -> None:
    items, index = a.state(node.inputsAt(0)), _constant_or_none(node.inputsAt(1))
    if isinstance(items, Items) and isinstance(index, int) and -len(items.states) <= index < len(items.states):
        a.set(node.output(), items.states[index])
    elif layouts_in(items):
        not_understood(node, a)


@rule(
    "prim::unchecked_cast",
    "aten::contiguous",
    "aten::clone",
    "aten::detach",
    "aten::to",
    "aten::type_as",
    "aten::dropout",
    "aten::dropout_",
    "aten::feature_dropout",
    "aten::alpha_dropout",
    "aten::softmax",
    "aten::log_softmax",
    "aten::alias",
    "aten::float",
    "aten::half",
)
def _same_shape(node: Node, a: ChannelAnalysis) -> None:
    a.set(node.output(), a.state(node.inputsAt(0)))


@rule(
    *_in_place(
        "relu",
        "relu6",
        "hardtanh",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardswish",
        "hardsigmoid",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "threshold",
        "neg",
        "abs",
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "square",
        "reciprocal",
        "erf",
    )
)
def _activation(node: Node, a: ChannelAnalysis) -> None:
    state = a.state(node.inputsAt(0))
    a.set(node.output(), state)
    if isinstance(state, Layout):
        a.site(state, node.output(), activation=True)


@rule(
    *_in_place(
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "pow",
        "maximum",
        "minimum",
        "clamp",
        "clamp_min",
        "clamp_max",
        "masked_fill",
        "where",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "floor_divide",
        "remainder",
    )
)
def _elementwise(node: Node, a: ChannelAnalysis) -> None:
    tensors = [a.state(v) for v in node.inputs() if is_tensor(v)]
    if tensors and is_tensor(node.output()):
        a.set(node.output(), a.unify(tensors, f"combined by {node.kind()}{where(node)}"))


@rule(
    "aten::dim",
    "aten::len",
    "prim::dtype",
    "prim::device",
    "aten::is_floating_point",
    "aten::__is__",
    "aten::__isnot__",
    "prim::layout",
    "aten::format",
    "prim::RaiseException",
)
def _reads_metadata(node: Node, a: ChannelAnalysis) -> None:
    """Reads that do not depend on how many channels there are."""
    for value in node.inputs():
        a.claim(value)


@rule("aten::size")
def _size(node: Node, a: ChannelAnalysis) -> None:
    state = a.state(node.inputsAt(0))
    if not isinstance(state, Layout):
        return
    dim_value = argument(node, "dim")
    reason = f"its channel count is read by aten::size{where(node)}"
    if dim_value is None:
        if not all(_reads_other_axis(use.user, state) for use in node.output().uses()):
            a.block(state, reason)
        return
    dim = _constant_or_none(dim_value)
    if not isinstance(dim, int) or state.rank is None and dim >= 0:
        a.block(state, reason)
    elif _position(dim, state.rank or 0) == state.position or dim == state.axis:
        a.block(state, reason)


def _reads_other_axis(user: Node, state: Layout) -> bool:
    """Whether a use of `x.size()` ignores the channel axis (len, messages, another index)."""
    if user.kind() in ("aten::len", "aten::format", "prim::RaiseException"):
        return True
    if user.kind() != "aten::__getitem__" or state.rank is None:
        return False
    index = _constant_or_none(user.inputsAt(1))
    return isinstance(index, int) and _position(index, state.rank) != state.position


# -- layers ---------------------------------------------------------------------------------------


@rule("aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d")
def _convolution(node: Node, a: ChannelAnalysis) -> None:
    source, out = argument(node, "input"), node.output()
    state, param = a.state(source), a.parameter(argument(node, "weight"))
    groups = _constant_or_none(argument(node, "groups"))
    transposed = node.kind() == "aten::_convolution" and _constant_or_none(argument(node, "transposed")) is not False
    weight = a.tensor(*param) if param else None
    if weight is None or transposed or not isinstance(groups, int):
        why = "a transposed convolution" if transposed else "a convolution whose weight or groups are computed"
        a.block(state, f"consumed by {why}{where(node)}")
        a.set(out, Opaque(node.kind(), a.rank(source)))
        return
    a.claim(argument(node, "weight"), argument(node, "bias"))
    module, rank = param[0], a.rank(source) or weight.dim()
    out_channels, in_channels, axis = weight.shape[0], weight.shape[1] * groups, 1 - weight.dim()
    if isinstance(state, Layout) and (state.axis != axis or state.flat):
        a.block(state, f"'{module}' convolves an axis other than the channel axis")
        state = Opaque("a reshaped tensor", state.rank)
    if groups == 1:
        if isinstance(state, Layout):
            a.attach(state, module, "weight", 1, IN, in_channels)
        space = a.produce(module, out_channels)
        layout = Layout(((space, out_channels),), axis, rank)
    elif groups == in_channels == out_channels:
        if isinstance(state, Layout) and len(state.segments) == 1:
            layout = state
            for attr in ("weight", "bias"):
                if a.tensor(module, attr) is not None:
                    a.attach(layout, module, attr, 0, OUT, out_channels)
            a.depthwise(layout, module)
        else:
            space = a.produce(module, out_channels)
            a.spaces.block(space, f"the depthwise '{module}' reads channels the analysis cannot trace")
            layout = Layout(((space, out_channels),), axis, rank)
    else:
        a.block(state, f"consumed by the grouped convolution '{module}' (groups={groups})")
        space = a.produce(module, out_channels)
        a.spaces.block(space, f"'{module}' is a grouped convolution (groups={groups})")
        layout = Layout(((space, out_channels),), axis, rank)
    a.set(out, layout)
    a.site(layout, out, activation=False)


@rule("aten::linear")
def _linear(node: Node, a: ChannelAnalysis) -> None:
    source, out = argument(node, "input"), node.output()
    state, param = a.state(source), a.parameter(argument(node, "weight"))
    weight = a.tensor(*param) if param else None
    if weight is None:
        a.block(state, f"consumed by a linear layer with a computed weight{where(node)}")
        a.set(out, Opaque(node.kind(), a.rank(source)))
        return
    a.claim(argument(node, "weight"), argument(node, "bias"))
    if isinstance(state, Layout) and state.axis != -1:
        a.set(out, state)  # the layer mixes another axis; the channels pass through untouched
        return
    module = param[0]
    if isinstance(state, Layout):
        a.attach(state, module, "weight", 1, IN, weight.shape[1])
    space = a.produce(module, weight.shape[0])
    layout = Layout(((space, weight.shape[0]),), -1, a.rank(source))
    a.set(out, layout)
    a.site(layout, out, activation=False)


@rule("aten::batch_norm")
def _batch_norm(node: Node, a: ChannelAnalysis) -> None:
    state = a.state(argument(node, "input"))
    a.set(node.output(), state)
    if not isinstance(state, Layout):
        return
    if state.position != 1 or state.flat:
        a.block(state, f"batch_norm{where(node)} normalises an axis other than the channel axis")
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        a.claim(argument(node, name))
        param = a.parameter(argument(node, name))
        if param is not None and a.tensor(*param) is not None:
            a.attach(state, param[0], param[1], 0, NORM, a.tensor(*param).shape[0])


@rule("aten::layer_norm")
def _layer_norm(node: Node, a: ChannelAnalysis) -> None:
    state = a.state(argument(node, "input"))
    shape = _constant_or_none(argument(node, "normalized_shape"))
    a.set(node.output(), state)
    if isinstance(state, Layout) and (shape is None or state.axis >= -len(shape)):
        a.block(state, f"layer_norm{where(node)} normalises the channels with a fixed shape")


# -- shape changes ----------------------------------------------------------------------------------


@rule("aten::flatten")
def _flatten(node: Node, a: ChannelAnalysis) -> None:
    state, out = a.state(argument(node, "self")), node.output()
    start, end = _constant_or_none(argument(node, "start_dim")), _constant_or_none(argument(node, "end_dim"))
    rank = a.rank(argument(node, "self"))
    if rank is None or not isinstance(start, int) or not isinstance(end, int):
        a.block(state, f"flattened with unknown rank or bounds{where(node)}")
        a.set(out, Opaque(node.kind(), static_rank(out)))
        return
    start, end = _position(start, rank), _position(end, rank)
    new_rank = rank - (end - start)
    if not isinstance(state, Layout):
        a.set(out, Opaque(node.kind(), new_rank))
        return
    position = state.position
    if position < start:
        a.set(out, state.moved(position, new_rank))
    elif position > end:
        a.set(out, state.moved(position - (end - start), new_rank))
    elif position == start:
        a.set(out, state.moved(start, new_rank, flat=state.flat or end > start))
    else:
        a.block(state, f"flatten{where(node)} merges the channels into an outer axis")
        a.set(out, Opaque(node.kind(), new_rank))


@rule("aten::view", "aten::reshape")
def _reshape(node: Node, a: ChannelAnalysis) -> None:
    source, out = node.inputsAt(0), node.output()
    state, dims = a.state(source), _shape_items(node.inputsAt(1), source)
    if not isinstance(state, Layout):
        a.set(out, Opaque(node.kind(), len(dims) if dims is not None else None))
        return
    position = state.position
    flattens_from_channels = (
        dims is not None
        and position is not None
        and len(dims) == position + 1
        and dims[-1] == -1
        and all(d == f"size({i})" or isinstance(d, int) and d >= 0 for i, d in enumerate(dims[:-1]))
    )
    if flattens_from_channels:
        a.set(out, state.moved(position, position + 1, flat=state.flat or position < state.rank - 1))
        return
    shown = "[" + ", ".join(str(d) for d in dims) + "]" if dims is not None else "a computed shape"
    a.block(state, f"reshaped to a fixed shape {shown} by {node.kind()}{where(node)}")
    a.set(out, Opaque(node.kind(), len(dims) if dims is not None else None))


def _shape_items(shape: torch._C.Value, source: torch._C.Value) -> list | None:
    """A view's target shape as ints, 'size(i)' (the source's own dim i) or '?'."""
    node = shape.node()
    if node.kind() == "prim::Constant":
        return list(shape.toIValue())
    if node.kind() != "prim::ListConstruct":
        return None
    items = []
    for item in node.inputs():
        while item.node().kind() in ("aten::Int", "prim::NumToTensor", "aten::ScalarImplicit"):
            item = item.node().inputsAt(0)
        if item.node().kind() == "prim::Constant":
            items.append(item.toIValue())
        elif item.node().kind() == "aten::size" and item.node().inputsAt(0).unique() == source.unique():
            items.append(f"size({_constant_or_none(item.node().inputsAt(1))})")
        else:
            items.append("?")
    return items


@rule("aten::cat", "aten::concat")
def _cat(node: Node, a: ChannelAnalysis) -> None:
    items, dim = a.state(argument(node, "tensors")), _constant_or_none(argument(node, "dim"))
    states = list(items.states) if isinstance(items, Items) else []
    layouts = [s for s in states if isinstance(s, Layout)]
    if not layouts:
        ranks = [s.rank for s in states if isinstance(s, Opaque)]
        a.set(node.output(), Opaque(node.kind(), ranks[0] if ranks else None))
        return
    first = layouts[0]
    if not isinstance(dim, int) or first.rank is None:
        a.block(items, f"concatenated along an unknown axis{where(node)}")
        a.set(node.output(), Opaque(node.kind(), first.rank))
        return
    if _position(dim, first.rank) != first.position:
        a.set(node.output(), a.unify(states, f"concatenated by {node.kind()}{where(node)}"))
        return
    if len(layouts) != len(states) or any(s.axis != first.axis or s.flat for s in layouts):
        a.block(items, f"concatenated with a tensor the analysis cannot trace{where(node)}")
        a.set(node.output(), Opaque(node.kind(), first.rank))
        return
    segments = tuple(segment for layout in layouts for segment in layout.segments)
    a.set(node.output(), Layout(segments, first.axis, first.rank))


_SPATIAL = re.compile(r"(\d)d(_with_indices)?$")


@rule(
    *(
        f"aten::{op}{k}d{suffix}"
        for op in (
            "max_pool",
            "avg_pool",
            "adaptive_avg_pool",
            "adaptive_max_pool",
            "upsample_nearest",
            "upsample_bilinear",
            "reflection_pad",
            "replication_pad",
        )
        for k in (1, 2, 3)
        for suffix in ("", "_with_indices")
    ),
    "aten::constant_pad_nd",
    "aten::pad",
)
def _spatial(node: Node, a: ChannelAnalysis) -> None:
    """Pooling, resizing and padding act on the trailing spatial dims only."""
    state = a.state(node.inputsAt(0))
    match = _SPATIAL.search(node.kind())
    pad = _constant_or_none(argument(node, "pad"))
    spatial = int(match.group(1)) if match else len(pad) // 2 if isinstance(pad, list) else None
    if isinstance(state, Layout) and (spatial is None or state.axis >= -spatial or state.flat):
        a.block(state, f"{node.kind()}{where(node)} works across the channel axis")
        state = Opaque(node.kind(), state.rank)
    for out in node.outputs():
        a.set(out, state)


@rule(
    "aten::mean",
    "aten::sum",
    "aten::amax",
    "aten::amin",
    "aten::std",
    "aten::var",
    "aten::nansum",
    "aten::logsumexp",
    "aten::prod",
    "aten::max",
    "aten::min",
    "aten::norm",
)
def _reduction(node: Node, a: ChannelAnalysis) -> None:
    if argument(node, "other") is not None:
        _elementwise(node, a)
        return
    source = node.inputsAt(0)
    state, rank = a.state(source), a.rank(source)
    dims = _constant_or_none(argument(node, "dim"))
    keep = bool(_constant_or_none(argument(node, "keepdim")))
    dims = [dims] if isinstance(dims, int) else dims
    if not dims or rank is None:
        reduced = None if rank is None else (rank if keep else 0)
        result = Opaque("a reduction over all elements", reduced)
    else:
        positions = {_position(d, rank) for d in dims}
        new_rank = rank if keep else rank - len(positions)
        if not isinstance(state, Layout) or state.position in positions:
            result = Opaque("a reduction over the channels", new_rank)
        elif state.flat:
            a.block(state, f"{node.kind()}{where(node)} reduces a flattened channel axis")
            result = Opaque(node.kind(), new_rank)
        else:
            position = state.position - (0 if keep else sum(p < state.position for p in positions))
            result = state.moved(position, new_rank)
    for out in node.outputs():
        a.set(out, result if is_tensor(out) else None)


def _moved_axis(node: Node, a: ChannelAnalysis, move: Callable[[int, int], tuple[int, int] | None]) -> None:
    """Shared by ops that move or drop axes: `move(position, rank)` gives the channel axis's new
    (position, rank), or None when the op touches the channel axis itself."""
    state = a.state(node.inputsAt(0))
    rank = a.rank(node.inputsAt(0))
    if not isinstance(state, Layout):
        moved = move(0, rank) if rank is not None else None
        a.set(node.output(), Opaque(node.kind(), moved[1] if moved else None))
        return
    target = move(state.position, state.rank) if state.position is not None else None
    if target is None or (state.flat and target[0] != state.position):
        a.block(state, f"{node.kind()}{where(node)} acts on the channel axis")
        a.set(node.output(), Opaque(node.kind(), static_rank(node.output())))
    else:
        a.set(node.output(), state.moved(target[0], target[1]))


@rule("aten::transpose", "aten::permute", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice")
def _axes(node: Node, a: ChannelAnalysis) -> None:
    kind = node.kind()
    dim = _constant_or_none(argument(node, "dim"))

    def move(position: int, rank: int) -> tuple[int, int] | None:
        if kind == "aten::t":
            return (1 - position if rank == 2 else position), rank
        if kind == "aten::transpose":
            d0, d1 = (_constant_or_none(argument(node, n)) for n in ("dim0", "dim1"))
            if not isinstance(d0, int) or not isinstance(d1, int):
                return None
            d0, d1 = _position(d0, rank), _position(d1, rank)
            return {d0: d1, d1: d0}.get(position, position), rank
        if kind == "aten::permute":
            dims = _constant_or_none(argument(node, "dims"))
            return ([_position(d, rank) for d in dims].index(position), rank) if isinstance(dims, list) else None
        if not isinstance(dim, int):
            return None
        if kind == "aten::unsqueeze":
            d = _position(dim, rank + 1)
            return position + (d <= position), rank + 1
        d = _position(dim, rank)
        if d == position:
            return None
        if kind == "aten::slice":
            return position, rank
        return position - (d < position), rank - 1

    _moved_axis(node, a, move)


# -- control flow ------------------------------------------------------------------------------------


def _join(a: ChannelAnalysis, states: list, reason: str):
    if states and all(isinstance(s, Items) for s in states) and len({len(s.states) for s in states}) == 1:
        return Items(tuple(_join(a, list(parts), reason) for parts in zip(*(s.states for s in states))))
    if all(s is None for s in states):
        return None
    return a.unify(states, reason)


@rule("prim::If")
def _if(node: Node, a: ChannelAnalysis) -> None:
    blocks = list(node.blocks())
    condition = node.inputsAt(0).node()
    if condition.kind() == "prim::GetAttr" and condition.s("name") == "training":
        # Training-mode bookkeeping (BatchNorm's batch-size check, counters): the pruned artifact is
        # analysed and verified as the eval-mode program that tracing would have recorded.
        blocks = blocks[1:]
    for block in blocks:
        a.run_block(block)
    for i, out in enumerate(node.outputs()):
        branches = [list(b.outputs())[i] for b in blocks]
        joined = _join(a, [a.state(v) for v in branches], f"joined by an if{where(node)}")
        a.set(out, joined)
        if isinstance(joined, Layout) and all(a.is_activation(v) for v in branches):
            a.site(joined, out, activation=True)  # scripted F.relu is an if over relu_ / relu


@rule("prim::Loop")
def _loop(node: Node, a: ChannelAnalysis) -> None:
    block = next(iter(node.blocks()))
    carried_in = list(node.inputs())[2:]
    for param, value in zip(list(block.inputs())[1:], carried_in):
        a.set(param, a.state(value))
    a.run_block(block)
    returned = list(block.outputs())[1:]
    for out, start, end in zip(node.outputs(), carried_in, returned):
        a.set(out, _join(a, [a.state(start), a.state(end)], f"carried through a loop{where(node)}"))
