"""Channel groups: the tensors that must lose the same channel indices together, as found by the
dependency analysis, and how one group's channel indices map onto each tensor's entries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

OUT, IN, NORM = "out", "in", "norm"


@dataclass(frozen=True, order=True)
class ParamSlice:
    """One parameter or buffer of a module that loses entries along `dim` with its group.

    Attributes:
        module: dotted module name (`layer1.0.conv1`).
        attr: `weight`, `bias`, `running_mean` or `running_var`.
        dim: the tensor dimension indexed by the group's channels (0 output side, 1 input side).
        role: `out` (a layer producing the channels, depthwise convs included), `in` (a layer
            consuming them) or `norm` (a per-channel normalisation such as BatchNorm).
        offset: index of the group's first channel along `dim`, in channels (non-zero after `cat`).
        block: entries per channel along `dim` (a linear after `flatten` sees H*W per channel).
    """

    module: str
    attr: str
    dim: int
    role: str
    offset: int = 0
    block: int = 1

    @property
    def key(self) -> str:
        """The parameter's name in `model.named_parameters()` / `named_buffers()`."""
        return f"{self.module}.{self.attr}" if self.module else self.attr

    def entries(self, channels: Iterable[int]) -> list[int]:
        """Indices along `dim` that belong to the given channels of the group."""
        return [(self.offset + c) * self.block + j for c in channels for j in range(self.block)]

    def per_channel(self, tensor: torch.Tensor, channels: int) -> torch.Tensor:
        """This slice of `tensor` as a [channels, entries-per-channel] matrix.

        Example:
            ParamSlice("fc1", "weight", 1, "in", block=64).per_channel(fc1.weight, 32)  # [32, 64*out]
        """
        start, stop = self.offset * self.block, (self.offset + channels) * self.block
        rows = tensor.movedim(self.dim, 0)[start:stop]
        return rows.reshape(channels, -1)


@dataclass
class ChannelGroup:
    """Channels that producers, consumers and normalisations share, pruned as one index set.

    Attributes:
        id: position in the analysis result.
        channels: how many channels the group has.
        slices: every tensor that loses entries when a channel goes.
        depthwise: conv modules whose `groups` equals the channel count and must follow it.
        reasons: why the group cannot be pruned; empty when it can.
        sites: (graph value, channel axis) pairs where the group's activations can be read.
    """

    id: int
    channels: int
    slices: list[ParamSlice] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    sites: list[tuple[torch._C.Value, int]] = field(default_factory=list)

    @property
    def producers(self) -> list[str]:
        """Modules whose output channels are this group's channels."""
        return sorted({s.module for s in self.slices if s.role == OUT})

    @property
    def modules(self) -> list[str]:
        """Every module that has a tensor in the group."""
        return sorted({s.module for s in self.slices})

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers) and self.channels > 1

    def describe(self, kept: int | None = None) -> dict:
        """A JSON-safe summary for the report."""
        summary = {
            "group": self.id,
            "channels": self.channels,
            "producers": self.producers,
            "consumers": sorted({s.module for s in self.slices if s.role == IN}),
        }
        if kept is not None:
            summary["kept"] = kept
        return summary
