"""Choosing which channels go, from per-group importance scores: the same fraction of every group
(`layer` scope) or the globally weakest channels with a floor per group (`global` scope)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# Global ranking never takes a group below this fraction of its channels (and never below one),
# so no layer vanishes however weak its scores are.
GLOBAL_MIN_KEEP = 0.1


def layer_removal_count(channels: int, amount: float) -> int:
    """Channels a group of `channels` loses at `amount`: it keeps floor(channels·(1-amount)), at least one."""
    kept = math.floor(round(channels * (1.0 - amount), 6))
    return min(channels - max(kept, 1), channels - 1)


def channels_to_remove(scores: Mapping[int, torch.Tensor], amount: float, scope: str) -> dict[int, list[int]]:
    """The channel indices to remove from each group.

    Args:
        scores: group id → one importance score per channel (higher = keep).
        amount: fraction of channels to remove, in (0, 1).
        scope: `layer` removes that fraction from every group; `global` removes that fraction of
            all channels, weakest first after scaling each group's scores by their mean (so wide
            and narrow groups compare), keeping at least `GLOBAL_MIN_KEEP` of every group.

    Returns:
        group id → sorted channel indices.

    Example:
        channels_to_remove({0: torch.tensor([0.1, 3.0, 0.2, 2.0])}, 0.5, "layer")  # {0: [0, 2]}
    """
    if scope == "layer":
        return {
            gid: sorted(torch.argsort(s, stable=True)[: layer_removal_count(len(s), amount)].tolist())
            for gid, s in scores.items()
        }
    total = sum(len(s) for s in scores.values())
    budget = round(amount * total)
    ranked = []
    for gid, s in scores.items():
        mean = float(s.mean())
        normalised = s / mean if mean > 0 else s
        ranked += [(float(value), gid, index) for index, value in enumerate(normalised)]
    ranked.sort()
    limit = {gid: len(s) - max(1, math.ceil(len(s) * GLOBAL_MIN_KEEP)) for gid, s in scores.items()}
    removed: dict[int, list[int]] = {gid: [] for gid in scores}
    for _, gid, index in ranked:
        if budget == 0:
            break
        if len(removed[gid]) < limit[gid]:
            removed[gid].append(index)
            budget -= 1
    return {gid: sorted(indices) for gid, indices in removed.items()}
