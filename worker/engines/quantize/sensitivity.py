"""A cheap per-layer sensitivity proxy: how much of a layer's weights int8 rounding destroys.

`min_fidelity` must find the few layers to keep in float. Converting and scoring the model once per
layer costs L conversions (about 100 s for the 39 layers of MiniLM); the proxy needs no conversion
and ranks the layers so a binary search over "the k top-ranked layers in float" needs about
log2(L) conversions, each verified on the evaluation data. The proxy sees weight outliers (one huge
weight in a row makes int8's step coarse for the rest of it: MiniLM's `encoder.layer.0.output.dense`
has max|w| 175 standard deviations out and ranks first); it does not see activation outliers,
which only the verification measures.
"""

from __future__ import annotations

import torch

from worker.engines.quantize.int8 import (
    quantize_rows_uint8,
    quantize_weight_int8,
    quiet_quantized_tensors,
)


def weight_error(model: torch.nn.Module, module: str, kind: str, per_channel: bool) -> float | None:
    """Relative RMS error of int8 rounding over the weights (matrices and up) of `module`.

    `sqrt(Σ (w - dequant(quant(w)))²) / sqrt(Σ w²)` over every floating parameter with two or more
    dimensions inside the module (biases stay float in every scheme), with symmetric int8 scales
    per output channel or per tensor; embedding tables with a scale and offset per row, as the int8
    schemes store them.

    Args:
        model: the model (a TorchScript module); not modified.
        module: dotted name of the layer's module (`""` for the whole model).
        kind: the layer's kind (`Linear`, `Embedding`, …).
        per_channel: one scale per output channel (else one per tensor), as the step is configured.

    Returns:
        the relative error (0 = exact), or None when the module holds no such weights.

    Example:
        weight_error(model, "encoder.layer.0.output.dense", "Linear", per_channel=True)  # 0.021
    """
    owner = model
    for part in module.split(".") if module else ():
        owner = getattr(owner, part)
    error = norm = 0.0
    with torch.no_grad(), quiet_quantized_tensors():
        for weight in owner.parameters():
            if weight.dim() < 2 or not weight.is_floating_point() or weight.numel() == 0:
                continue
            flat = weight.detach().float().cpu().reshape(weight.shape[0], -1)
            if kind == "Embedding":
                rounded = quantize_rows_uint8(flat).dequantize()
            else:
                rounded = quantize_weight_int8(flat, per_channel).dequantize()
            error += float((flat - rounded).pow(2).sum())
            norm += float(flat.pow(2).sum())
    if norm == 0.0:
        return None
    return (error / norm) ** 0.5
