"""Editing a TorchScript module's forward graph: finding the layers a scheme rewrites, swapping ops.

Every scheme edits the *inlined* forward graph of a private copy of the model: each submodule call
becomes the ops it runs and each weight read is a `prim::GetAttr` chain from `self` that names its
module, so one rewrite serves traced and scripted models alike, whatever class holds the layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# op → (layer kind, index of the input holding the weight, or the list of weights for RNNs)
LAYER_OPS: dict[str, tuple[str, int]] = {
    "aten::linear": ("Linear", 1),
    "aten::embedding": ("Embedding", 0),
    "aten::lstm": ("LSTM", 2),
    "aten::gru": ("GRU", 2),
    "aten::conv1d": ("Conv1d", 1),
    "aten::conv2d": ("Conv2d", 1),
    "aten::conv3d": ("Conv3d", 1),
    "aten::_convolution": ("Conv", 1),  # what tracing records; the weight's rank tells 1d/2d/3d
}


@dataclass
class Site:
    """One node of the forward graph that computes with a layer's stored weights.

    Attributes:
        module: dotted name of the module owning the weights (`encoder.0.fc`).
        kind: layer kind (`Linear`, `Embedding`, `LSTM`, `GRU`, `Conv2d`, …).
        node: the graph node (`aten::linear`, …).
        weights: dotted attribute paths of the weight tensors it reads, in the op's order.
    """

    module: str
    kind: str
    node: torch._C.Node
    weights: list[str] = field(default_factory=list)


class ForwardGraph:
    """The inlined forward graph of a model this object may modify in place (pass a copy).

    Example:
        graph = ForwardGraph(clone_model(model))
        sites, skipped = graph.sites({"Linear"})
        ...rewrite sites with graph.read_attribute / graph.replace...
        graph.finish()
    """

    def __init__(self, model: torch.jit.ScriptModule):
        self.model = model
        self.graph = model.graph
        torch._C._jit_pass_inline(self.graph)
        self._self_name = next(iter(self.graph.inputs())).debugName()
        self._attribute_types: dict[str, torch._C.Type] = {}

    # -- reading ---------------------------------------------------------------------------
    def attribute_path(self, value: torch._C.Value) -> str | None:
        """The dotted attribute path `value` reads from `self`, or None if it is computed."""
        return _attribute_path(value, self._self_name)

    def resolve(self, path: str) -> Any:
        """The Python value at a dotted attribute path of the model (a tensor, module, list…)."""
        obj: Any = self.model
        for part in path.split(".") if path else ():
            obj = getattr(obj, part)
        return obj

    def nodes(self, kinds: Iterable[str]) -> Iterator[torch._C.Node]:
        """Nodes of the given op kinds, also inside loops and branches."""
        for kind in kinds:
            yield from self.graph.findAllNodes(kind, True)

    def sites(self, kinds: Iterable[str]) -> tuple[list[Site], list[dict]]:
        """The nodes computing with stored weights of the given layer kinds, and those that can't be rewritten.

        Returns:
            (sites, skipped): skipped entries are `{"module", "reason"}` report rows.
        """
        wanted = set(kinds)
        sites, skipped = [], []
        for op, (op_kind, index) in LAYER_OPS.items():
            if op_kind not in wanted and not (op_kind == "Conv" and any(k.startswith("Conv") for k in wanted)):
                continue
            for node in self.nodes([op]):
                kind = op_kind
                weights = self._weight_paths(node.inputsAt(index))
                if weights is None:
                    origin = self._origin(node.inputsAt(index))
                    skipped.append(
                        {
                            "module": _owner(origin) if origin else f"{op} in forward",
                            "reason": f"{kind} weight computed in the graph"
                            + (f" from {origin}" if origin else "")
                            + ", not read as stored",
                        }
                    )
                    continue
                if kind == "Conv":
                    transposed = node.inputsAt(6).toIValue()
                    kind = f"{'ConvTranspose' if transposed else 'Conv'}{self.tensor(weights[0]).dim() - 2}d"
                    if kind not in wanted:
                        continue
                sites.append(Site(_owner(weights[0]), kind, node, weights))
        return sites, skipped

    def _weight_paths(self, value: torch._C.Value) -> list[str] | None:
        path = self.attribute_path(value)
        if path is not None:
            resolved = self.resolve(path)
            if isinstance(resolved, torch.Tensor):
                return [path]
            # a List[Tensor] attribute (a scripted RNN's `_flat_weights`): one path per element
            return [f"{path}.{i}" for i in range(len(resolved))] if isinstance(resolved, list) else None
        if value.node().kind() == "prim::ListConstruct":
            paths = [self.attribute_path(v) for v in value.node().inputs()]
            return None if any(p is None for p in paths) else paths
        return None

    def _origin(self, value: torch._C.Value, depth: int = 8) -> str | None:
        """The first stored attribute a computed value derives from (to name a layer we must skip)."""
        path = self.attribute_path(value)
        if path is not None or depth == 0:
            return path
        node = value.node()
        # a value chosen by an `if` comes from its branches' outputs, not from the node's inputs
        sources = [v for block in node.blocks() for v in block.returnNode().inputs()] + list(node.inputs())
        for source in sources:
            found = self._origin(source, depth - 1)
            if found is not None:
                return found
        return None

    def tensor(self, path: str | None) -> torch.Tensor | None:
        """The tensor at a weight path (list elements are `attr.i`), detached; None for None."""
        if path is None:
            return None
        head, _, last = path.rpartition(".")
        if last.isdigit():
            return self.resolve(head)[int(last)].detach()
        return self.resolve(path).detach()

    def optional_tensor(self, value: torch._C.Value) -> torch.Tensor | None | bool:
        """A stored tensor input (bias), None for a `None` constant, False when it is computed."""
        if value.node().kind() == "prim::Constant" and isinstance(value.type(), torch._C.NoneType):
            return None
        path = self.attribute_path(value)
        return False if path is None else self.tensor(path)

    # -- writing ---------------------------------------------------------------------------
    def add_attribute(self, hint: str, value: Any) -> str:
        """Store `value` as a new attribute of the model's root; returns its (unique) name."""
        base = "_q_" + re.sub(r"\W", "_", hint)
        name, n = base, 1
        while name in self._attribute_types or self.model._c.hasattr(name):
            n += 1
            name = f"{base}_{n}"
        inferred = torch._C._jit_try_infer_type(value)
        if not inferred.success():
            raise TypeError(f"cannot store {type(value).__name__} in TorchScript: {inferred.reason()}")
        self.model._c._register_attribute(name, inferred.type(), value)
        self._attribute_types[name] = inferred.type()
        return name

    def read_attribute(self, name: str, before: torch._C.Node) -> torch._C.Value:
        """A read of attribute `name` (made by `add_attribute`) inserted just before `before`."""
        self_value = next(iter(self.graph.inputs()))
        node = self.graph.create("prim::GetAttr", [self_value])
        node.s_("name", name)
        node.output().setType(self._attribute_types[name])
        node.insertBefore(before)
        return node.output()

    def constant(self, value: Any, before: torch._C.Node) -> torch._C.Value:
        """A constant inserted just before `before`."""
        out = self.graph.insertConstant(value)
        out.node().moveBefore(before)
        return out

    def insert(
        self, kind: str, inputs: list[torch._C.Value], before: torch._C.Node, output_types: list[torch._C.Type]
    ) -> torch._C.Node:
        """A new `kind` node with `inputs`, inserted before `before`, with the given output types."""
        node = self.graph.create(kind, inputs, len(output_types))
        for out, out_type in zip(node.outputs(), output_types):
            out.setType(out_type)
        node.insertBefore(before)
        return node

    def replace(self, node: torch._C.Node, kind: str, inputs: list[torch._C.Value]) -> torch._C.Node:
        """Replace `node` by a `kind` node with `inputs` and the same output types; returns it."""
        new = self.insert(kind, inputs, node, [out.type() for out in node.outputs()])
        for old_out, new_out in zip(node.outputs(), new.outputs()):
            old_out.replaceAllUsesWith(new_out)
        node.destroy()
        return new

    def finish(self, modules: Iterable[str] = ()) -> list[str]:
        """Drop dead nodes and empty the float weights of `modules` the graph no longer reads.

        The file then holds only the new (packed) copies. A weight another method of the model
        still reads (an `encode` beside `forward`) stays; one no method reads goes (a scripted
        `nn.Sequential`'s `__len__` reads none).

        Returns:
            the modules whose float weights were released.
        """
        torch._C._jit_pass_dce(self.graph)
        in_use = self._paths_in_use()

        def unread(path: str) -> bool:
            return not any(p == "" or path == p or path.startswith(p + ".") for p in in_use)

        released = []
        for module in dict.fromkeys(modules):
            owner = self.resolve(module)
            names = [name for name, _ in owner.named_parameters(recurse=False)]
            free = [name for name in names if unread(f"{module}.{name}")]
            for name in free:
                param = getattr(owner, name)
                owner._c.setattr(name, torch.empty(0, dtype=param.dtype, device=param.device))
            # a scripted RNN also lists its weights in `_flat_weights`
            if owner._c.hasattr("_flat_weights") and unread(f"{module}._flat_weights"):
                owner._c.setattr("_flat_weights", [])
            if free:
                released.append(module)
        return released

    def _paths_in_use(self) -> set[str]:
        """Attribute paths any method reads for anything but a further attribute read: the edited
        forward graph, and every other method of the model as it stands."""
        graphs = [self.graph]
        for name in self.model._c._method_names():
            if name != "forward":
                graph = self.model._c._get_method(name).graph.copy()
                torch._C._jit_pass_inline(graph)
                graphs.append(graph)
        return set().union(*(_paths_read(graph) for graph in graphs))


def _attribute_path(value: torch._C.Value, self_name: str) -> str | None:
    names = []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().input()
    if names and value.debugName() == self_name:
        return ".".join(reversed(names))
    return None


def _paths_read(graph: torch._C.Graph) -> set[str]:
    """What `graph` reads of its `self`; "" when it uses `self` itself (then everything may be read)."""
    self_value = next(iter(graph.inputs()))
    used = set()
    for node in graph.findAllNodes("prim::GetAttr", True):
        if any(use.user.kind() != "prim::GetAttr" for use in node.output().uses()):
            path = _attribute_path(node.output(), self_value.debugName())
            if path is not None:
                used.add(path)
    if any(use.user.kind() != "prim::GetAttr" for use in self_value.uses()):
        used.add("")
    return used


def _owner(path: str) -> str:
    """The module owning a weight path: `fc.weight` → `fc`, `lstm._flat_weights.3` → `lstm`."""
    parts = path.split(".")
    if parts[-1].isdigit():
        parts = parts[:-1]
    return ".".join(parts[:-1])
