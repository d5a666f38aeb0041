"""Unstructured pruning: zero the least salient single weights of conv and linear layers, folded
into the weights themselves (no masks or hooks remain in the artifact)."""

from __future__ import annotations

import torch

from worker.engines.modules import clone_model
from worker.engines.pipeline import PipelineContext, StageOutput
from worker.engines.prune.batchnorm import recalibrate_after_pruning
from worker.engines.prune.config import PruneConfig
from worker.engines.prune.weights import apply_masks, size_details, weight_layers, weight_scores

DENSE_NOTE = (
    "Zeros are stored densely in TorchScript, so the saved file keeps its size and the model its "
    "speed; the deflate-compressed size shows what the sparsity saves in storage or transfer."
)


def prune_unstructured(model: torch.jit.ScriptModule, config: PruneConfig, ctx: PipelineContext) -> StageOutput:
    """Zero `amount` of the conv/linear weights, ranked per layer or globally.

    Args:
        model: the TorchScript model; it is not modified.
        config: structure `unstructured` with criterion l1, l2 or gradient, amount, scope, exclude,
            recalibrate_bn.
        ctx: calibration data and teacher for the gradient criterion and BatchNorm statistics.

    Returns:
        a copy with the zeros folded in; details give per-layer sparsity, saved/deflated sizes
        and `bn_recalibration`.

    Example:
        out = prune_unstructured(model, PruneConfig("unstructured", amount=0.8), ctx)
    """
    pruned = clone_model(model)
    layers, skipped = weight_layers(pruned, config.exclude)
    ctx.progress(0.1, f"scoring the weights of {len(layers)} layers by {config.criterion}")
    scores = weight_scores(pruned, layers, config.criterion, ctx)
    masks = (
        _global_masks(scores, config.amount)
        if config.scope == "global"
        else {name: _keep_mask(score, round(config.amount * score.numel())) for name, score in scores.items()}
    )

    details = apply_masks(layers, masks)
    total = sum(d["parameters"] for d in details)
    recalibration = recalibrate_after_pruning(model, pruned, config, ctx)
    ctx.progress(1.0, "unstructured pruning done")
    return StageOutput(
        pruned,
        {
            "layers": details,
            "skipped": skipped,
            "sparsity": sum(d["sparsity"] * d["parameters"] for d in details) / total if total else 0.0,
            "criterion": config.criterion,
            "scope": config.scope,
            **size_details(model, pruned),
            "bn_recalibration": recalibration,
            "notes": [DENSE_NOTE],
        },
    )


def _keep_mask(score: torch.Tensor, remove: int) -> torch.Tensor:
    """True for the weights that stay: all but the `remove` lowest-scoring ones."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if remove > 0:
        mask[torch.topk(score.flatten(), remove, largest=False).indices] = False
    return mask.view_as(score)


def _global_masks(scores: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = torch.cat([scores[name].flatten().float().cpu() for name in names])
    keep = _keep_mask(flat, round(amount * flat.numel()))
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[start : start + size].view_as(scores[name]).to(scores[name].device)
        start += size
    return masks
