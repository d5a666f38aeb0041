"""N:M semi-structured pruning: in every run of M consecutive input weights keep the N most salient
(2:4 by default), the pattern sparse tensor cores accelerate."""

from __future__ import annotations

import torch

from worker.engines.modules import clone_model, named_modules_of_kind
from worker.engines.pipeline import PipelineContext, StageOutput
from worker.engines.prune.batchnorm import recalibrate_after_pruning
from worker.engines.prune.config import PruneConfig
from worker.engines.prune.weights import WEIGHT_LAYER_KINDS, apply_masks, size_details, weight_layers, weight_scores

SPEED_NOTE = (
    "N:M sparsity only speeds a model up on sparse kernels (CUDA semi-structured 2:4 sparsity on "
    "Ampere or newer GPUs); TorchScript runs these weights as dense tensors, so expect no speed-up "
    "from this step alone, only the pattern ready for such kernels and a smaller compressed size."
)


def prune_n_m(model: torch.jit.ScriptModule, config: PruneConfig, ctx: PipelineContext) -> StageOutput:
    """Zero all but the `n` most salient of every `m` consecutive input weights of conv/linear layers.

    Runs go along the input-channel axis (for convolutions at each kernel position), the layout
    semi-structured sparse kernels expect. Layers whose input width is not a multiple of `m` are
    skipped with the reason.

    Args:
        model: the TorchScript model; it is not modified.
        config: structure `n:m` with n, m, criterion l1, l2 or gradient, exclude, recalibrate_bn.
        ctx: calibration data and teacher for the gradient criterion and BatchNorm statistics.

    Returns:
        a copy with the pattern folded into the weights; details give the pattern coverage and
        `bn_recalibration`.

    Example:
        out = prune_n_m(model, PruneConfig("n:m", n=2, m=4), ctx)
    """
    pruned = clone_model(model)
    layers, skipped = weight_layers(pruned, config.exclude)
    fitting = []
    for name, module in layers:
        width = module.weight.shape[1]
        if width % config.m:
            skipped.append(
                {"module": name, "reason": f"its {width} input weights per output do not split into runs of {config.m}"}
            )
        else:
            fitting.append((name, module))
    ctx.progress(0.1, f"applying {config.n}:{config.m} to {len(fitting)} layers")
    scores = weight_scores(pruned, fitting, config.criterion, ctx)

    masks = {name: n_m_mask(scores[name], config.n, config.m) for name, _ in fitting}
    details = [{**row, "pattern": f"{config.n}:{config.m}"} for row in apply_masks(fitting, masks)]
    all_weights = sum(m.weight.numel() for _, m in named_modules_of_kind(pruned, WEIGHT_LAYER_KINDS))
    covered = sum(d["parameters"] for d in details)
    recalibration = recalibrate_after_pruning(model, pruned, config, ctx)
    ctx.progress(1.0, "n:m pruning done")
    return StageOutput(
        pruned,
        {
            "layers": details,
            "skipped": skipped,
            "pattern": f"{config.n}:{config.m}",
            "pattern_coverage": covered / all_weights if all_weights else 0.0,
            "criterion": config.criterion,
            **size_details(model, pruned),
            "bn_recalibration": recalibration,
            "notes": [SPEED_NOTE],
        },
    )


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask shaped like a conv/linear weight: n of every m consecutive input-axis entries.

    Example:
        n_m_mask(torch.tensor([[4., 1., 3., 2.]]), 2, 4)  # [[True, False, True, False]]
    """
    runs = score.movedim(1, -1)  # conv [out, in, k...] -> [out, k..., in]: runs lie along the inputs
    shape = runs.shape
    flat = runs.reshape(-1, m)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, torch.topk(flat, n, dim=1).indices, True)
    return mask.view(shape).movedim(-1, 1)
