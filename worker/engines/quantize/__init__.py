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


@register_step("quantize")
def quantize_step(model: torch.jit.ScriptModule, step: dict, ctx: PipelineContext) -> StageOutput:
    """The `quantize` step of a job: parse the step dict and run `quantize_model`.

    Args:
        model: the pipeline's current model (not modified).
        step: `{"op": "quantize", "scheme": ..., "per_channel": True, "exclude": [], "min_fidelity": None,
            "group_size": 128}`; `scheme` is required, the rest default as shown.
        ctx: calibration data (required by `static_int8`), evaluation data for fidelity, device.

    Returns:
        StageOutput with the quantized TorchScript model (same inputs and output structure) and
        details: `layers`, `skipped`, `fidelity`, `quantized_layers` and the scheme's notes.

    Example:
        out = quantize_step(model, {"op": "quantize", "scheme": "dynamic_int8"}, ctx)
    """
    return quantize_model(model, QuantizeConfig.from_step(step), ctx)
