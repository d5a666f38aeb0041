"""Output quality: top-1 accuracy against labels and fidelity of a model's outputs to a reference's.

Outputs may be a tensor or any nesting of tuples, lists and dicts of tensors; quantized and
half-precision outputs are compared in float64 so that rounding in the comparison itself never
shows up as infidelity.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from worker.engines.errors import EngineError


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model output in a stable order (tuples/lists in order, dicts by key)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs, key=str) for t in flatten_outputs(outputs[key])]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in flatten_outputs(item)]
    return []


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        t = t.dequantize()
    return t.detach().to(device="cpu", dtype=torch.float64)


def _is_class_scores(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1 and (t.is_floating_point() or t.is_quantized)


class FidelityAccumulator:
    """Fidelity of outputs to reference outputs, accumulated batch by batch.

    Per sample and per output tensor, the cosine similarity of the flattened rows; over all
    elements, the largest absolute difference; for 2-D `[batch, classes]` outputs, how often the
    arg-max agrees. Two all-zero rows count as identical (cosine 1).

    Example:
        acc = FidelityAccumulator()
        for batch in data.batches(64):
            acc.update(reference(*batch.inputs), model(*batch.inputs))
        acc.result()  # {"top1_agreement": 0.99, "cosine_min": 0.97, "cosine_mean": 0.999, "max_abs_error": 0.1}
    """

    def __init__(self) -> None:
        self._agree = 0
        self._rows = 0
        self._cosine_min = math.inf
        self._cosine_sum = 0.0
        self._cosine_count = 0
        self._max_abs = 0.0

    def update(self, reference_outputs: Any, outputs: Any) -> None:
        """Add one batch of reference outputs and the compared model's outputs on the same inputs."""
        references, compared = flatten_outputs(reference_outputs), flatten_outputs(outputs)
        if len(references) != len(compared):
            raise EngineError(
                "output_mismatch", f"the model returns {len(compared)} tensors where the original returns {len(references)}"
            )
        for ref, out in zip(references, compared):
            if ref.shape != out.shape:
                raise EngineError(
                    "output_mismatch", f"output shape {list(out.shape)} differs from the original's {list(ref.shape)}"
                )
            self._update_tensor(ref, out)

    def _update_tensor(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        if _is_class_scores(ref):
            self._agree += int((ref.argmax(dim=1) == out.argmax(dim=1)).sum())
            self._rows += ref.shape[0]
        a, b = _as_float64(ref), _as_float64(out)
        if a.numel() == 0:
            return
        self._max_abs = max(self._max_abs, float((a - b).abs().max()))
        a = a.reshape(a.shape[0], -1) if a.dim() > 0 else a.reshape(1, 1)
        b = b.reshape(a.shape)
        dot, norm_a, norm_b = (a * b).sum(dim=1), (a * a).sum(dim=1), (b * b).sum(dim=1)
        cosine = dot / (norm_a * norm_b).sqrt()
        cosine = torch.where((norm_a == 0) & (norm_b == 0), torch.ones_like(cosine), cosine)
        cosine = torch.where((norm_a == 0) ^ (norm_b == 0), torch.zeros_like(cosine), cosine).clamp(-1.0, 1.0)
        self._cosine_min = min(self._cosine_min, float(cosine.min()))
        self._cosine_sum += float(cosine.sum())
        self._cosine_count += cosine.numel()

    def result(self) -> dict[str, float | None]:
        """`{top1_agreement, cosine_min, cosine_mean, max_abs_error}`; a figure that does not apply
        (no `[batch, classes]` output, no data) is None."""
        return {
            "top1_agreement": self._agree / self._rows if self._rows else None,
            "cosine_min": self._cosine_min if self._cosine_count else None,
            "cosine_mean": self._cosine_sum / self._cosine_count if self._cosine_count else None,
            "max_abs_error": self._max_abs if self._cosine_count else None,
        }


def fidelity(reference_outputs: Any, outputs: Any) -> dict[str, float | None]:
    """How faithfully `outputs` reproduce `reference_outputs` (both from the same inputs).

    Args:
        reference_outputs: the original model's output (tensor, or tuple/list/dict of tensors).
        outputs: the compressed model's output, with the same structure and shapes.

    Returns:
        `{"top1_agreement", "cosine_min", "cosine_mean", "max_abs_error"}`: arg-max agreement
        over 2-D `[batch, classes]` outputs (None when there are none), the per-sample cosine
        similarity's minimum and mean, and the largest absolute element difference.

    Raises:
        EngineError("output_mismatch"): the structures or shapes differ.

    Example:
        fidelity(teacher(x), student(x))["cosine_min"] >= 0.99
    """
    accumulator = FidelityAccumulator()
    accumulator.update(reference_outputs, outputs)
    return accumulator.result()


def classification_scores(outputs: Any, num_samples: int) -> torch.Tensor | None:
    """The first `[num_samples, classes]` tensor of a model output, or None when there is none."""
    return next((t for t in flatten_outputs(outputs) if _is_class_scores(t) and t.shape[0] == num_samples), None)


def count_correct(outputs: Any, labels: torch.Tensor) -> int | None:
    """How many arg-max predictions equal `labels`; None when the output has no class scores."""
    scores = classification_scores(outputs, labels.shape[0])
    if scores is None:
        return None
    return int((scores.argmax(dim=1).cpu() == labels.cpu()).sum())


def top1_accuracy(outputs: Any, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of class scores against integer labels.

    Args:
        outputs: the model output; its first 2-D `[len(labels), classes]` tensor is used.
        labels: int64 class ids, one per sample.

    Returns:
        The fraction of samples whose arg-max class equals the label.

    Raises:
        EngineError("not_a_classifier"): the output holds no `[len(labels), classes]` tensor.
        EngineError("empty_dataset"): there are no labels.

    Example:
        top1_accuracy(model(x), y)  # 0.97
    """
    if labels.shape[0] == 0:
        raise EngineError("empty_dataset", "there are no labelled samples to score")
    correct = count_correct(outputs, labels)
    if correct is None:
        raise EngineError("not_a_classifier", f"the model output has no [{labels.shape[0]}, classes] tensor to score")
    return correct / labels.shape[0]
