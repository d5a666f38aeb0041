"""The quantization engine: the `quantize` step (int8, half precision, weight-only, binary).

Importing this package registers the step handler and every scheme; `weight_only` also offers
helpers other engines reuse (fake quantization for training, re-packing after it).
"""

from __future__ import annotations

import torch

from worker.engines.pipeline import PipelineContext, StageOutput, register_step
from worker.engines.quantize import dynamic, half, static, weight_only  # noqa: F401  (register schemes)
from worker.engines.quantize.config import QuantizeConfig
from worker.engines.quantize.engine import quantize_model


@register_step(QuantizeConfig)
def quantize_step(model: torch.jit.ScriptModule, config: QuantizeConfig, ctx: PipelineContext) -> StageOutput:
    """The `quantize` step of a job: `quantize_model` with the step's config.

    Args:
        model: the pipeline's current model (not modified).
        config: the step's settings (see QuantizeConfig).
        ctx: calibration data (required by `static_int8`), evaluation data for fidelity, device.

    Returns:
        StageOutput with the quantized TorchScript model (same inputs and output structure) and
        details: `layers`, `skipped`, `fidelity`, `quantized_layers` and the scheme's notes.

    Example:
        out = quantize_step(model, QuantizeConfig(scheme="dynamic_int8"), ctx)
    """
    return quantize_model(model, config, ctx)
