"""Keeping a pruned student sparse while it trains: masks of the weights that start with many
exact zeros, applied to gradients and re-applied after every optimizer step."""

from __future__ import annotations

from collections.abc import Collection

import torch

# A weight with at least this fraction of exact zeros is treated as pruned. Trained or freshly
# initialised float weights practically never hold exact zeros, so a small floor suffices and also
# catches layers that a global pruning pass thinned only a little.
MIN_ZERO_FRACTION = 0.01


class SparsityMasks:
    """Masks of the weights that start with many exact zeros (unstructured or N:M pruning).

    Only weights of two or more dimensions are masked: biases and BatchNorm shifts legitimately
    start at zero in an untrained student and must be free to move.

    Example:
        masks = SparsityMasks.from_model(student)
        loss.backward(); masks.mask_gradients(); optimizer.step(); masks.apply()
    """

    def __init__(self, masks: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]):
        self.masks = masks

    @classmethod
    def from_model(cls, model: torch.nn.Module, exclude: Collection[str] = ()) -> SparsityMasks:
        """Find the pruned weights of `model` (except the parameters named in `exclude`) and record
        where their zeros are."""
        masks = {}
        for name, param in model.named_parameters():
            if param.dim() < 2 or not param.dtype.is_floating_point or name in exclude:
                continue
            zeros = param.detach() == 0
            if float(zeros.float().mean()) >= MIN_ZERO_FRACTION:
                masks[name] = (param, ~zeros)
        return cls(masks)

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned positions (so momentum never builds up there)."""
        for param, keep in self.masks.values():
            if param.grad is not None:
                param.grad.mul_(keep)

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero pruned positions (weight decay or numerical drift may have moved them)."""
        for param, keep in self.masks.values():
            param.mul_(keep)

    def describe(self) -> list[dict]:
        """One entry per masked weight: its name and the fraction of it kept at zero."""
        return [
            {"parameter": name, "zero_fraction": round(1.0 - float(keep.float().mean()), 4)}
            for name, (_, keep) in self.masks.items()
        ]
