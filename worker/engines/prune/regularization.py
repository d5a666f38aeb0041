"""The sparsity objective that makes `bn_scale` channel pruning pay off: an L1 penalty on the
BatchNorm scales (network slimming), for a training step to add to its loss before pruning."""

from __future__ import annotations

import torch

from worker.engines.modules import named_modules_of_kind

BATCH_NORM_KINDS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


def bn_scale_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Σ |γ| over every BatchNorm of an eager or TorchScript model (differentiable).

    A fine-tuning or distillation step adds `β · bn_scale_penalty(model)` to its loss
    (`sparsity_regularization: β`) so that unimportant channels' scales shrink towards zero and a
    later `bn_scale` channel pruning removes them at little cost.

    Example:
        loss = task_loss + 1e-4 * bn_scale_penalty(student)
    """
    gammas = [
        m.weight.abs().sum()
        for _, m in named_modules_of_kind(model, BATCH_NORM_KINDS)
        if getattr(m, "weight", None) is not None
    ]
    if not gammas:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(gammas).sum()
