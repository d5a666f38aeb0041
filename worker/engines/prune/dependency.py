"""Channel-dependency analysis of a TorchScript model: one pass over the inlined forward graph finds
the groups of layers that must lose the same channel indices, and why some groups cannot lose any.

Every tensor gets a state (see `layouts`); layers create channel spaces, and ops that tie channels
together (add, control-flow joins, a layer called twice) merge spaces in a union-find. What the
op rules (see `rules`) do not understand blocks the spaces it touches, with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from worker.engines.prune import rules
from worker.engines.prune.groups import IN, OUT, ChannelGroup, ParamSlice
from worker.engines.prune.layouts import Items, Layout, Opaque, State, layouts_in
from worker.engines.prune.torchscript import inlined_forward, is_tensor, static_rank, where


class _Spaces:
    """Union-find over channel spaces; each root holds what its merged spaces collected."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.slices: list[set[ParamSlice]] = []
        self.depthwise: list[set[str]] = []
        self.reasons: list[list[str]] = []
        self.sites: list[list[tuple[torch._C.Value, int, bool]]] = []

    def new(self, size: int | None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.slices.append(set())
        self.depthwise.append(set())
        self.reasons.append([])
        self.sites.append([])
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        root = space
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[space] != root:
            self.parent[space], space = root, self.parent[space]
        return root

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        if self.size[a] is None:
            self.size[a] = self.size[b]
        elif self.size[b] is not None and self.size[b] != self.size[a]:
            self.reasons[a].append(f"tied channel counts disagree ({self.size[a]} vs {self.size[b]})")
        self.slices[a] |= self.slices[b]
        self.depthwise[a] |= self.depthwise[b]
        self.reasons[a] += self.reasons[b]
        self.sites[a] += self.sites[b]
        return a

    def block(self, space: int, reason: str) -> None:
        root = self.find(space)
        if reason not in self.reasons[root]:
            self.reasons[root].append(reason)


class ChannelAnalysis:
    """The state of one analysis run; op rules read and update it through these methods.

    Example:
        analysis = ChannelAnalysis(model, (torch.randn(1, 3, 32, 32),))
        groups = analysis.run()
        prunable = [g for g in groups if g.prunable]
    """

    def __init__(self, model: torch.jit.ScriptModule, example_inputs: Sequence[torch.Tensor] = ()):
        self.model = model
        self.graph = inlined_forward(model)
        self.example_inputs = tuple(example_inputs)
        self.tensors = dict(chain(model.named_parameters(), model.named_buffers()))
        self.spaces = _Spaces()
        self._states: dict[int, State] = {}
        self._module_paths: dict[int, str] = {}
        self._params: dict[int, tuple[str, str]] = {}
        self._produced: dict[str, int] = {}
        self._consumed: dict[tuple[str, str], Layout] = {}
        self._activations: set[int] = set()
        self._claims: set[int] = set()
        self._foreign_uses: dict[str, str] = {}

    # -- the walk ---------------------------------------------------------------------------

    def run(self) -> list[ChannelGroup]:
        """Analyse the whole forward graph and return every channel group found."""
        inputs = list(self.graph.inputs())
        self._module_paths[inputs[0].unique()] = ""
        for position, value in enumerate(inputs[1:]):
            rank = self.example_inputs[position].dim() if position < len(self.example_inputs) else static_rank(value)
            self.set(value, Opaque("the model input", rank))
        self.run_block(self.graph.block())
        for value in self.graph.outputs():
            self.block(self.state(value), "its channels reach the model output")
        return self._groups()

    def run_block(self, block: torch._C.Block) -> None:
        for node in block.nodes():
            outer, self._claims = self._claims, set()
            rules.RULES.get(node.kind(), rules.not_understood)(node, self)
            for value in node.inputs():
                param = self.parameter(value)
                if param is not None and value.unique() not in self._claims:
                    self._foreign_uses.setdefault(".".join(filter(None, param)), f"{node.kind()}{where(node)}")
            self._claims = outer

    def claim(self, *values: torch._C.Value | None) -> None:
        """The current rule knows how its node uses these parameter values (a layer's own weight).

        A parameter that reaches any node without being claimed (a fused kernel, arithmetic, a
        list) is used in ways the analysis cannot follow, so no group may resize it.
        """
        self._claims.update(value.unique() for value in values if value is not None)

    # -- values -----------------------------------------------------------------------------

    def state(self, value: torch._C.Value) -> State:
        """What is known about a value; tensors never seen before count as opaque."""
        known = self._states.get(value.unique())
        if known is None and is_tensor(value):
            return Opaque(value.node().kind(), static_rank(value))
        return known

    def set(self, value: torch._C.Value, state: State) -> None:
        self._states[value.unique()] = state

    def rank(self, value: torch._C.Value) -> int | None:
        state = self.state(value)
        rank = state.rank if isinstance(state, (Layout, Opaque)) else None
        return rank if rank is not None else static_rank(value)

    def module_path(self, value: torch._C.Value) -> str | None:
        """The dotted name of the submodule a module-typed value refers to."""
        return self._module_paths.get(value.unique())

    def set_module_path(self, value: torch._C.Value, path: str) -> None:
        self._module_paths[value.unique()] = path

    def parameter(self, value: torch._C.Value) -> tuple[str, str] | None:
        """(module, attribute) when a value is read straight from a module parameter or buffer."""
        return self._params.get(value.unique())

    def set_parameter(self, value: torch._C.Value, module: str, attr: str) -> None:
        self._params[value.unique()] = (module, attr)

    def tensor(self, module: str, attr: str) -> torch.Tensor | None:
        return self.tensors.get(f"{module}.{attr}" if module else attr)

    # -- channel spaces ---------------------------------------------------------------------

    def produce(self, module: str, channels: int) -> int:
        """The channel space of a layer's output channels (one per layer, however often it runs)."""
        if module in self._produced:
            return self.spaces.find(self._produced[module])
        space = self.spaces.new(channels)
        self._produced[module] = space
        for attr in ("weight", "bias"):
            if self.tensor(module, attr) is not None:
                self.spaces.slices[space].add(ParamSlice(module, attr, 0, OUT))
        return space

    def attach(self, layout: Layout, module: str, attr: str, dim: int, role: str, width: int) -> None:
        """Register that `module.attr` indexes the layout's channels along `dim` (`width` entries).

        A flattened layout reveals its block size here (width / channels); a width that does not
        match the channel count blocks the layout instead.
        """
        channels = layout.channels
        if channels is None:
            self.block(layout, f"'{module}' reads channels of unknown count")
            return
        block, remainder = divmod(width, channels)
        if remainder or (block != 1 and not layout.flat) or block == 0:
            self.block(layout, f"'{module}' expects {width} entries for {channels} channels")
            return
        if role == IN:
            previous = self._consumed.setdefault((module, attr), layout)
            if previous != layout:
                self.unify([previous, layout], f"'{module}' is called on differently laid out inputs")
        offset = 0
        for space, size in layout.segments:
            self.spaces.slices[self.spaces.find(space)].add(ParamSlice(module, attr, dim, role, offset, block))
            offset += size

    def depthwise(self, layout: Layout, module: str) -> None:
        self.spaces.depthwise[self.spaces.find(layout.segments[0][0])].add(module)

    def site(self, layout: Layout, value: torch._C.Value, activation: bool) -> None:
        """Remember where a single-space layout's activations can be captured (entropy criterion).

        Only values of the top-level block can be captured; values inside branches and loops are
        still noted as activations so that an `if` joining them can offer its own output.
        """
        if activation:
            self._activations.add(value.unique())
        if len(layout.segments) == 1 and not layout.flat and value.node().owningBlock().owningNode() is None:
            space = self.spaces.find(layout.segments[0][0])
            self.spaces.sites[space].append((value, layout.axis, activation))

    def is_activation(self, value: torch._C.Value) -> bool:
        return value.unique() in self._activations

    def block(self, state: State, reason: str) -> None:
        """Mark every channel space in a state as unprunable."""
        for layout in layouts_in(state):
            for space, _ in layout.segments:
                self.spaces.block(space, reason)

    def unify(self, states: Sequence[State], reason: str) -> State:
        """Tie several states to one channel index set (add, control-flow joins).

        Scalars broadcast and are ignored; opaque tensors or mismatched layouts block the rest.
        Returns the joined state.
        """
        tensors = [s for s in states if not (isinstance(s, Opaque) and s.is_scalar) and s is not None]
        layouts = [s for s in tensors if isinstance(s, Layout)]
        if not layouts:
            ranks = [s.rank for s in tensors if isinstance(s, Opaque)]
            return Opaque(reason, None if None in ranks or not ranks else max(ranks)) if tensors else states[0]
        first = layouts[0]
        others = [s for s in tensors if s is not first]
        compatible = all(
            isinstance(s, Layout)
            and s.axis == first.axis
            and s.flat == first.flat
            and [size for _, size in s.segments] == [size for _, size in first.segments]
            for s in others
        )
        if not compatible:
            origins = sorted({s.origin for s in others if isinstance(s, Opaque)}) or ["a differently laid out tensor"]
            self.block(Items(tuple(tensors)), f"{reason} with {', '.join(origins)}")
            return Opaque("a tensor whose channels could not be traced")
        for other in others:
            for (a, _), (b, _) in zip(first.segments, other.segments):
                self.spaces.union(a, b)
        ranks = [s.rank for s in layouts]
        return Layout(first.segments, first.axis, None if None in ranks else max(ranks), first.flat)

    # -- results ----------------------------------------------------------------------------

    def _groups(self) -> list[ChannelGroup]:
        roots = sorted({self.spaces.find(space) for space in range(len(self.spaces.parent))})
        groups = []
        for root in roots:
            slices = self.spaces.slices[root]
            if not any(s.role == OUT for s in slices):
                continue
            size = self.spaces.size[root]
            reasons = list(self.spaces.reasons[root]) + sorted(
                {
                    f"'{s.key}' is also used by {self._foreign_uses[s.key]}"
                    for s in slices
                    if s.key in self._foreign_uses
                }
            )
            activations = [(v, axis) for v, axis, act in self.spaces.sites[root] if act]
            outputs = [(v, axis) for v, axis, act in self.spaces.sites[root] if not act]
            groups.append(
                ChannelGroup(
                    id=len(groups),
                    channels=size or 0,
                    slices=sorted(slices),
                    depthwise=sorted(self.spaces.depthwise[root]),
                    reasons=reasons,
                    sites=activations or outputs,
                )
            )
        return groups


def find_channel_groups(
    model: torch.jit.ScriptModule, example_inputs: Sequence[torch.Tensor] = ()
) -> tuple[list[ChannelGroup], torch._C.Graph]:
    """The channel groups of a TorchScript model, and the inlined graph their `sites` belong to.

    Args:
        model: a traced or scripted module.
        example_inputs: one batch of positional inputs; only their ranks are used (scripted graphs
            do not record them).

    Returns:
        (groups, graph): every group with a producing layer, prunable or not (`group.reasons`).

    Example:
        groups, _ = find_channel_groups(torch.jit.trace(net, x), (x,))
        for group in groups:
            print(group.producers, group.channels, group.reasons or "prunable")
    """
    analysis = ChannelAnalysis(model, example_inputs)
    return analysis.run(), analysis.graph
