"""What the channel analysis knows about each tensor in the graph: which channel spaces lie along
which axis (a `Layout`), that it carries none we could prune (`Opaque`), or a tuple/list of those."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Layout:
    """A tensor whose `axis` holds prunable channels.

    Attributes:
        segments: (space id, channel count) in order along the axis; one segment unless the tensor
            comes from a `cat` along that axis.
        axis: the channel axis counted from the end (-1 is the last dim), which is what broadcasting
            aligns and what `linear` reads; stays valid when the rank is unknown.
        rank: the tensor's rank when known.
        flat: the axis was flattened with the trailing (spatial) dims, so every channel is a
            contiguous block of entries whose size the consuming layer reveals.
    """

    segments: tuple[tuple[int, int | None], ...]
    axis: int
    rank: int | None
    flat: bool = False

    @property
    def position(self) -> int | None:
        """The channel axis counted from the front, when the rank is known."""
        return None if self.rank is None else self.rank + self.axis

    @property
    def channels(self) -> int | None:
        sizes = [size for _, size in self.segments]
        return None if None in sizes else sum(sizes)

    def moved(self, position: int, rank: int, flat: bool | None = None) -> Layout:
        """The same channels at another axis position of a tensor of another rank."""
        return replace(self, axis=position - rank, rank=rank, flat=self.flat if flat is None else flat)


@dataclass(frozen=True)
class Opaque:
    """A tensor with no prunable channels (model input, parameter, scalar, unknown op result).

    A rank-0 opaque tensor broadcasts against anything and never ties channels down.
    """

    origin: str
    rank: int | None = None

    @property
    def is_scalar(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Items:
    """A tuple or list value: the states of its elements (None for non-tensor elements)."""

    states: tuple


State = Layout | Opaque | Items | None


def layouts_in(state: State) -> list[Layout]:
    """Every Layout inside a state, looking through tuples and lists."""
    if isinstance(state, Layout):
        return [state]
    if isinstance(state, Items):
        return [layout for item in state.states for layout in layouts_in(item)]
    return []
