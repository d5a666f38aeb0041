"""Knowledge distillation: the `distill` step, which trains a student (the pipeline's current
model or an uploaded one) to imitate the original model, recovering what compression cost."""

from __future__ import annotations

import torch

from worker.engines.distill.config import DistillConfig
from worker.engines.distill.trainer import DistillResult, distill
from worker.engines.errors import EngineError
from worker.engines.modules import clone_model
from worker.engines.pipeline import PipelineContext, StageOutput, register_step

__all__ = ["DistillConfig", "DistillResult", "distill", "distill_step"]


@register_step(DistillConfig)
def distill_step(model: torch.jit.ScriptModule, config: DistillConfig, ctx: PipelineContext) -> StageOutput:
    """The `distill` step: the teacher is `ctx.teacher`, the student `model` or `student_model_id`.

    Trains on `ctx.training_data()` and validates on `ctx.evaluation`; the pipeline's model is
    copied first, so the input of the step is left as it was.

    Args:
        model: the pipeline's current model (the default student).
        config: the step's settings (see DistillConfig).
        ctx: teacher, data, device, progress, model loader and seed.

    Returns:
        StageOutput with the trained TorchScript student and the training details.

    Example:
        out = distill_step(pruned, DistillConfig(epochs=3), ctx)
    """
    if config.student_model_id is None:
        student, source = clone_model(model), "pipeline model"
    else:
        if ctx.load_model is None:
            raise EngineError("student_unavailable", "this worker cannot load an uploaded student model")
        student, source = ctx.load_model(config.student_model_id), f"uploaded model {config.student_model_id}"
    result = distill(
        ctx.teacher,
        student,
        ctx.training_data(),
        ctx.evaluation,
        config,
        device=ctx.device,
        progress=ctx.progress,
        seed=ctx.seed,
    )
    result.details["student"] = source
    return StageOutput(result.model, result.details)
