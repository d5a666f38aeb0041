"""Quantization-aware recovery: a weight-only quantized student (`weight_int8`, `weight_int4`,
`binary`) trains float latent weights through a straight-through estimator and is re-quantized at
the end, so the artifact keeps its packed format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engines.quantize.weight_only import (
    WeightOnlyParam,
    fake_quantize,
    repack,
    weight_only_layers,
)


@dataclass
class _Latent:
    packed: WeightOnlyParam  # what the quantize engine reports; `packed.weight` is what the graph reads
    latent: torch.nn.Parameter  # the float weight the optimizer updates

    @property
    def key(self) -> str:
        return f"{self.packed.module}.{self.packed.parameter}"


class LatentWeights:
    """Float latent weights behind a converted student's weight-only quantized tensors.

    Before each forward pass the quantized tensors the graph reads are overwritten with
    `fake_quantize(latent)`; after backward their gradient is handed to the latent unchanged
    (the straight-through estimator: rounding is treated as the identity when differentiating).
    `finish()` snaps the best latents onto their grids with the quantize engine's `repack`.

    Example:
        latents = LatentWeights.from_model(student)
        optimizer = torch.optim.AdamW([*plain_params, *latents.parameters()])
        latents.quantize_into_model(); loss.backward(); latents.pass_gradients(); optimizer.step()
        latents.finish()
    """

    def __init__(self, model: torch.jit.ScriptModule, entries: list[_Latent]):
        self.model = model
        self.entries = entries

    @classmethod
    def from_model(cls, model: torch.jit.ScriptModule) -> LatentWeights | None:
        """Latents for every weight-only quantized tensor of `model`; None when it has none."""
        entries = []
        for packed in weight_only_layers(model):
            packed.weight.requires_grad_(True)
            entries.append(_Latent(packed, torch.nn.Parameter(packed.weight.detach().clone())))
        return cls(model, entries) if entries else None

    def tensor_names(self) -> list[str]:
        """The quantized tensors' names in the model's `named_parameters()` (the latents replace them)."""
        return [f"{entry.packed.holder}.weight" for entry in self.entries]

    def parameters(self) -> list[torch.nn.Parameter]:
        """The latent weights, to be optimised in place of the quantized tensors."""
        return [entry.latent for entry in self.entries]

    @torch.no_grad()
    def quantize_into_model(self) -> None:
        """Write `fake_quantize(latent)` into the tensors the model's forward graph reads."""
        for entry in self.entries:
            packed = entry.packed
            entry.packed.weight.copy_(
                fake_quantize(entry.latent, packed.scheme, per_channel=packed.per_channel, group_size=packed.group_size)
            )
            entry.packed.weight.grad = None

    def pass_gradients(self) -> None:
        """Straight-through: each latent receives its quantized tensor's gradient."""
        for entry in self.entries:
            entry.latent.grad = entry.packed.weight.grad
            entry.packed.weight.grad = None

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the latents (for the best-checkpoint snapshot)."""
        return {entry.key: entry.latent.detach().clone() for entry in self.entries}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore latents saved by `state()`."""
        for entry in self.entries:
            entry.latent.copy_(state[entry.key])

    def finish(self) -> None:
        """Re-quantize: install the latents into the model, snapped to their grids (`repack`)."""
        repack(self.model, {entry.key: entry.latent.detach() for entry in self.entries})

    def describe(self) -> list[dict]:
        """One entry per quantized tensor trained through its latent: module, parameter, scheme."""
        return [
            {"module": entry.packed.module, "parameter": entry.packed.parameter, "scheme": entry.packed.scheme}
            for entry in self.entries
        ]
