"""Reading and editing TorchScript graphs: the inlined forward graph, constant arguments, module
names behind `prim::GetAttr` chains, and the one constant we rewrite in place (a conv's `groups`)."""

from __future__ import annotations

from typing import Any

import torch

CONV_KINDS = ("aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d")


class NotConstant(Exception):
    """A graph value that pruning needs as a compile-time constant is computed at run time."""


def inlined_forward(model: torch.jit.ScriptModule) -> torch._C.Graph:
    """A copy of `model.forward`'s graph with every method and function call inlined.

    Example:
        graph = inlined_forward(torch.jit.script(net))
        kinds = {node.kind() for node in graph.nodes()}
    """
    graph = model.graph.copy()
    torch._C._jit_pass_inline(graph)
    return graph


def is_tensor(value: torch._C.Value) -> bool:
    """Whether a graph value is a (possibly optional) tensor."""
    kind = value.type().kind()
    if kind == "OptionalType":
        kind = value.type().getElementType().kind()
    return kind == "TensorType"


def constant(value: torch._C.Value) -> Any:
    """The Python value of a constant argument: a `prim::Constant` or a list built from constants.

    Raises:
        NotConstant: the value is computed at run time.
    """
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [constant(item) for item in node.inputs()]
    raise NotConstant(f"{node.kind()} is not a constant")


def argument(node: torch._C.Node, name: str) -> torch._C.Value | None:
    """The value passed for a named schema argument of an aten node, or None if it has none."""
    try:
        return node.namedInput(name)
    except RuntimeError:
        return None


def static_rank(value: torch._C.Value) -> int | None:
    """The rank recorded in a value's type (traced graphs carry it; scripted ones usually not)."""
    value_type = value.type()
    if value_type.kind() != "TensorType":
        return None
    return value_type.dim()


def where(node: torch._C.Node) -> str:
    """A short location for messages: the traced module scope, else nothing."""
    scope = node.scopeName().split("/")[-1].removeprefix("__module.")
    return f" in '{scope}'" if scope else ""


def set_conv_groups(module: torch.jit.ScriptModule, groups: int) -> None:
    """Rewrite the `groups` constant of the one convolution in a scripted or traced conv module.

    TorchScript bakes `groups` into the compiled code, so a depthwise conv that loses channels
    must have that constant replaced as well as its weight. The live module keeps running its
    old plan; a save/load round trip (`clone_model`) compiles the edited graph.

    Raises:
        ValueError: the module's code does not hold exactly one convolution with a constant groups.
    """
    sites = []
    for method in module._c._method_names():
        graph = module._c._get_method(method).graph
        for kind in CONV_KINDS:
            sites.extend((graph, node) for node in graph.findAllNodes(kind))
    if len(sites) != 1:
        raise ValueError(f"expected one convolution in the module's code, found {len(sites)}")
    graph, node = sites[0]
    groups_value = argument(node, "groups")
    constant(groups_value)
    position = [value.unique() for value in node.inputs()].index(groups_value.unique())
    with graph.insert_point_guard(node):
        replacement = graph.insertConstant(int(groups))
    node.replaceInput(position, replacement)


def attribute_path(value: torch._C.Value) -> str | None:
    """The dotted name of the parameter, buffer or submodule a value reads through `prim::GetAttr`
    from the graph's `self` (refinement casts are followed); None when it is computed otherwise.

    Example:
        attribute_path(batch_norm_node.inputsAt(3))  # "layer1.0.bn1.running_mean"
    """
    names = []
    while value.node().kind() in ("prim::GetAttr", "prim::unchecked_cast"):
        if value.node().kind() == "prim::GetAttr":
            names.append(value.node().s("name"))
        value = value.node().input()
    node = value.node()
    is_self = node.kind() == "prim::Param" and value.offset() == 0 and node.owningBlock().owningNode() is None
    return ".".join(reversed(names)) if is_self and names else None
