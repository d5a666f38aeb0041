"""Channel importance criteria, one class each behind a small interface: a criterion scores every
channel of a group (higher means keep), so the selection code never asks which criterion it has."""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch

from worker.engines.prune.groups import NORM, ChannelGroup


class Importance(abc.ABC):
    """Scores the channels of a channel group.

    Subclasses return a 1-D tensor with one non-negative score per channel, or None when the
    criterion cannot score that group; `unscored_reason` then says why, for the report.

    Example:
        scores = MagnitudeImportance(dict(model.named_parameters()), p=1)(group)
        weakest = scores.argsort()[:4]
    """

    unscored_reason = "the criterion cannot score this group"

    @abc.abstractmethod
    def __call__(self, group: ChannelGroup) -> torch.Tensor | None:
        """One score per channel of `group` (higher = keep), or None when it cannot score it."""


def _weight_slices(group: ChannelGroup):
    """Weights (conv, linear, BatchNorm γ) carry the signal; biases and running stats do not."""
    return [s for s in group.slices if s.attr == "weight"]


class MagnitudeImportance(Importance):
    """Group Lp magnitude: Σ |w|^p over every weight entry that belongs to the channel.

    Args:
        tensors: parameter name → tensor (`dict(model.named_parameters())`).
        p: 1 for the l1 criterion, 2 for l2.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], p: int):
        self.tensors, self.p = tensors, p

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        score = torch.zeros(group.channels)
        for s in _weight_slices(group):
            rows = s.per_channel(self.tensors[s.key].detach().float().cpu(), group.channels)
            score += rows.abs().pow(self.p).sum(1)
        return score


class BNScaleImportance(Importance):
    """Network slimming: |γ| of the BatchNorm layers on the group's channels."""

    unscored_reason = "the bn_scale criterion needs a BatchNorm on the group's channels"

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor | None:
        gammas = [s for s in _weight_slices(group) if s.role == NORM]
        if not gammas:
            return None
        return sum(
            s.per_channel(self.tensors[s.key].detach().float().cpu(), group.channels).abs().sum(1) for s in gammas
        )


class TaylorImportance(Importance):
    """First-order Taylor saliency of removing a channel: Σ |w · ∂L/∂w| over its weight entries.

    Args:
        tensors: parameter name → tensor.
        gradients: parameter name → gradient accumulated over the calibration data
            (`calibration.accumulate_gradients`).
    """

    unscored_reason = "no gradient reached the group's weights"

    def __init__(self, tensors: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor]):
        self.tensors, self.gradients = tensors, gradients

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor | None:
        slices = [s for s in _weight_slices(group) if s.key in self.gradients]
        if not slices:
            return None
        score = torch.zeros(group.channels)
        for s in slices:
            product = (self.tensors[s.key].detach() * self.gradients[s.key]).float().cpu()
            score += s.per_channel(product, group.channels).abs().sum(1)
        return score


class EntropyImportance(Importance):
    """Entropy of each channel's activations over the calibration data: a channel whose output
    hardly varies (a dead ReLU has entropy 0) carries little information.

    Args:
        entropies: group id → per-channel entropy (`calibration.channel_entropy`).
    """

    unscored_reason = "its activations only exist inside a loop or branch, where they cannot be captured"

    def __init__(self, entropies: Mapping[int, torch.Tensor]):
        self.entropies = entropies

    def __call__(self, group: ChannelGroup) -> torch.Tensor | None:
        return self.entropies.get(group.id)
