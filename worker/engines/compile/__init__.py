"""The compile engine: the `compile` step (freeze, fold, fuse; checked lossless)."""

from __future__ import annotations

import torch

from worker.engines.compile.config import CompileConfig
from worker.engines.compile.engine import compile_model
from worker.engines.pipeline import PipelineContext, StageOutput, register_step


@register_step(CompileConfig)
def compile_step(model: torch.jit.ScriptModule, config: CompileConfig, ctx: PipelineContext) -> StageOutput:
    """The `compile` step of a job: `compile_model` with the step's config.

    Example:
        out = compile_step(model, CompileConfig(), ctx)
    """
    return compile_model(model, config, ctx)
