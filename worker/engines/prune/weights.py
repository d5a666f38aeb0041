"""What weight-level pruning (unstructured and n:m) shares: the conv/linear layers it may touch,
a saliency score per weight, and the saved and deflate-compressed size of an artifact."""

from __future__ import annotations

import io
import zlib

import torch

from worker.engines.modules import is_excluded, module_kind, named_modules_of_kind
from worker.engines.pipeline import PipelineContext
from worker.engines.prune.calibration import accumulate_gradients

WEIGHT_LAYER_KINDS = ("Conv1d", "Conv2d", "Conv3d", "Linear")


def weight_layers(
    model: torch.jit.ScriptModule, exclude: tuple[str, ...]
) -> tuple[list[tuple[str, torch.nn.Module]], list[dict]]:
    """Conv and linear layers that may be pruned, and the excluded ones as report entries.

    Example:
        layers, skipped = weight_layers(model, ("fc",))
    """
    layers, skipped = [], []
    for name, module in named_modules_of_kind(model, WEIGHT_LAYER_KINDS):
        if is_excluded(name, exclude):
            skipped.append({"module": name, "reason": "excluded by the step's exclude patterns"})
        else:
            layers.append((name, module))
    return layers, skipped


def weight_scores(
    model: torch.jit.ScriptModule, layers: list[tuple[str, torch.nn.Module]], criterion: str, ctx: PipelineContext
) -> dict[str, torch.Tensor]:
    """One saliency score per weight entry (higher = keep), shaped like each layer's weight.

    l1 scores |w| and l2 scores w², which rank single weights identically; gradient scores the
    first-order Taylor saliency |w · ∂L/∂w| over the calibration data.

    Example:
        scores = weight_scores(model, layers, "l1", ctx)
    """
    if criterion == "gradient":
        gradients = accumulate_gradients(model, ctx.training_data(), ctx.teacher, ctx.device)
        return {
            name: (m.weight.detach() * gradients.get(f"{name}.weight", torch.zeros_like(m.weight))).abs()
            for name, m in layers
        }
    power = 1 if criterion == "l1" else 2
    return {name: m.weight.detach().abs().pow(power) for name, m in layers}


def apply_masks(layers: list[tuple[str, torch.nn.Module]], masks: dict[str, torch.Tensor]) -> list[dict]:
    """Fold each layer's 0/1 mask into its weight (no hooks left behind); one report row per layer."""
    rows = []
    with torch.no_grad():
        for name, module in layers:
            module.weight.mul_(masks[name].to(module.weight.dtype))
            rows.append(
                {
                    "module": name,
                    "kind": module_kind(module),
                    "parameters": module.weight.numel(),
                    "sparsity": float((module.weight == 0).float().mean()),
                }
            )
    return rows


def artifact_sizes(model: torch.jit.ScriptModule) -> tuple[int, int]:
    """(saved TorchScript bytes, the same bytes deflate-compressed): zeros only shrink the latter."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    raw = buffer.getvalue()
    return len(raw), len(zlib.compress(raw, 6))


def size_details(before: torch.jit.ScriptModule, after: torch.jit.ScriptModule) -> dict:
    """Report fields comparing the saved and deflate-compressed sizes of two artifacts."""
    raw_before, deflated_before = artifact_sizes(before)
    raw_after, deflated_after = artifact_sizes(after)
    return {
        "size_bytes_before": raw_before,
        "size_bytes_after": raw_after,
        "deflate_bytes_before": deflated_before,
        "deflate_bytes_after": deflated_after,
    }
