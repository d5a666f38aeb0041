"""How far a quantized model's outputs are from the model it was made from, on the eval data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from worker.engines.data import ModelData


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a candidate's outputs with the reference outputs, over the probe's samples.

    `top1_agreement` is None when the first output is not `[samples, classes]` logits.
    """

    top1_agreement: float | None
    cosine_min: float
    cosine_mean: float
    max_abs_error: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples / lists / dicts of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in output for t in flatten_outputs(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flatten_outputs(item)]
    return []


def compare_outputs(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Fidelity:
    """Fidelity of `candidate` to `reference` (both from `flatten_outputs`, samples on dim 0).

    Cosine is taken per sample over all floating outputs whose first dimension is the sample axis.

    Example:
        f = compare_outputs(flatten_outputs(model(x)), flatten_outputs(quantized(x)))
        f.cosine_min  # 0.998
    """
    samples = reference[0].shape[0] if reference and reference[0].dim() else 1
    ref_rows, cand_rows, max_abs = [], [], 0.0
    for ref, cand in zip(reference, candidate):
        if not (ref.is_floating_point() and cand.is_floating_point()):
            continue
        ref, cand = ref.detach().double().cpu(), cand.detach().double().cpu()
        max_abs = max(max_abs, float((ref - cand).abs().max())) if ref.numel() else max_abs
        if ref.dim() and ref.shape[0] == samples:
            ref_rows.append(ref.reshape(samples, -1))
            cand_rows.append(cand.reshape(samples, -1))
    if ref_rows:
        cos = torch.nn.functional.cosine_similarity(torch.cat(ref_rows, 1), torch.cat(cand_rows, 1), dim=1, eps=1e-12)
        cosine_min, cosine_mean = float(cos.min()), float(cos.mean())
    else:
        cosine_min = cosine_mean = 1.0
    top1 = None
    first_ref, first_cand = reference[0], candidate[0]
    if first_ref.dim() == 2 and first_ref.shape[1] > 1 and first_ref.is_floating_point():
        top1 = float((first_ref.argmax(1) == first_cand.argmax(1)).double().mean())
    return Fidelity(top1, cosine_min, cosine_mean, max_abs)


class FidelityProbe:
    """Reference outputs of a model on a fixed slice of the eval data, to score candidates against.

    The metric `min_fidelity` is held to is top-1 agreement when the data has labels and the model
    outputs logits, else the minimum per-sample cosine of the outputs.

    Example:
        probe = FidelityProbe.for_model(model, ctx.evaluation, ctx.device)
        probe.score(probe.measure(quantized_model))  # 0.995
    """

    def __init__(self, data: ModelData, reference: list[torch.Tensor], metric: str, device: torch.device,
                 batch_size: int = 64):
        self.data = data
        self.reference = reference
        self.metric = metric
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def for_model(cls, model: torch.jit.ScriptModule, data: ModelData, device: torch.device,
                  max_samples: int = 256) -> FidelityProbe:
        """A probe whose reference is `model`'s outputs on the first `max_samples` samples of `data`."""
        data = data.take(max_samples)
        reference = _run(model, data, device, 64)
        classifier = data.labels is not None and reference[0].dim() == 2 and reference[0].shape[1] > 1
        return cls(data, reference, "top1_agreement" if classifier else "cosine_min", device)

    def subset(self, max_samples: int) -> FidelityProbe:
        """A probe on the first `max_samples` samples, reusing this one's reference outputs."""
        data = self.data.take(max_samples)
        n, total = data.num_samples, self.data.num_samples
        reference = [t[:n] if t.dim() and t.shape[0] == total else t for t in self.reference]
        return FidelityProbe(data, reference, self.metric, self.device, self.batch_size)

    def measure(self, model: torch.jit.ScriptModule, device: torch.device | None = None) -> Fidelity:
        """Fidelity of `model`'s outputs (computed on `device`, default the probe's) to the reference."""
        return compare_outputs(self.reference, _run(model, self.data, device or self.device, self.batch_size))

    def score(self, fidelity: Fidelity) -> float:
        """The figure `min_fidelity` is compared with."""
        value = fidelity.top1_agreement if self.metric == "top1_agreement" else fidelity.cosine_min
        return float(value)


def _run(model: torch.jit.ScriptModule, data: ModelData, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for batch in data.batches(batch_size, device):
            parts.append([t.cpu() for t in flatten_outputs(model(*batch.inputs))])
    return [torch.cat(group) if group[0].dim() else group[0] for group in zip(*parts)]
