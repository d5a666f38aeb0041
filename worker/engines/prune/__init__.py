"""The `prune` step: unstructured, channel (physically shrinking) and N:M pruning of TorchScript
models. Each structure is one function taking the parsed `PruneConfig`; this module only
registers the step and picks the function.

Example:
    from worker.engines.pipeline import run_step
    out = run_step(model, PruneConfig(structure="channel", amount=0.5), ctx)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engines.pipeline import PipelineContext, StageOutput, register_step
from worker.engines.prune.channel import prune_channels
from worker.engines.prune.config import PruneConfig
from worker.engines.prune.nm import prune_n_m
from worker.engines.prune.regularization import bn_scale_penalty
from worker.engines.prune.unstructured import prune_unstructured

__all__ = ["PruneConfig", "prune", "prune_channels", "prune_n_m", "prune_unstructured", "bn_scale_penalty"]

STRUCTURES: dict[str, Callable[[torch.jit.ScriptModule, PruneConfig, PipelineContext], StageOutput]] = {
    "unstructured": prune_unstructured,
    "channel": prune_channels,
    "n:m": prune_n_m,
}


@register_step(PruneConfig)
def prune(model: torch.jit.ScriptModule, config: PruneConfig, ctx: PipelineContext) -> StageOutput:
    """Run one `prune` step of a job spec on `model` (which is left unmodified).

    Args:
        model: a traced or scripted TorchScript model.
        config: the step's settings (see PruneConfig).
        ctx: the pipeline context (calibration data, teacher, device, progress).

    Returns:
        the pruned TorchScript model and JSON-safe details for the report.
    """
    return STRUCTURES[config.structure](model, config, ctx)
