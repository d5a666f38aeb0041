"""Output quality: top-1 accuracy against labels and fidelity of a model's outputs to a reference's.

Every engine walks model outputs through `output_leaves` (one order: tuples and lists in order,
dicts by key) and scores fidelity here, so the quantize step's `min_fidelity`, distillation's
validation, the pipeline's interface check and the report never disagree. Quantized and
half-precision outputs are compared in float64 so that rounding in the comparison itself never
shows up as infidelity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError

# Per output dtype, (rtol, atol) within which two runs of the same model agree: refolded or
# re-fused float arithmetic (the compile step, a serving mode) differs in the last bits, no more.
FLOAT_TOLERANCE = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (3e-2, 1e-2),
    # activations rounded to int8 while the model runs: a last-bit change before the rounding (a
    # folded BatchNorm) can move a value across one int8 step, 8 significant bits as in bfloat16
    torch.qint8: (3e-2, 1e-2),
}


def output_leaves(outputs: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a model output with its path, in the one order all engines use.

    Args:
        outputs: a tensor, or any nesting of tuples, lists and dicts (what a TorchScript model returns).
        path: the path of `outputs` itself inside a larger output ("" at the top).

    Returns:
        `[(path, leaf)]`: tuples and lists item by item, dicts by key sorted as strings (so two
        dicts built in another order flatten alike); a leaf is a tensor, or any other value (None,
        a number, an empty container). A path names each container on the way, e.g.
        `tuple[1]dict['features']`, so a tuple that became a list reads differently.

    Example:
        output_leaves((logits, {"features": f}))  # [("tuple[0]", logits), ("tuple[1]dict['features']", f)]
    """
    if isinstance(outputs, dict) and outputs:
        return [
            leaf for key in sorted(outputs, key=str) for leaf in output_leaves(outputs[key], f"{path}dict[{key!r}]")
        ]
    if isinstance(outputs, (tuple, list)) and outputs:
        kind = type(outputs).__name__
        return [leaf for index, item in enumerate(outputs) for leaf in output_leaves(item, f"{path}{kind}[{index}]")]
    return [(path, outputs)]


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in `output_leaves`' order (other leaves dropped)."""
    return [leaf for _, leaf in output_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        t = t.dequantize()
    return t.detach().to(device="cpu", dtype=torch.float64)


def _is_class_scores(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1 and (t.is_floating_point() or t.is_quantized)


class FidelityAccumulator:
    """Fidelity of outputs to reference outputs, accumulated batch by batch.

    Per sample and per output tensor, the cosine similarity of the flattened rows; over all
    elements, the largest absolute difference; and, when the outputs hold class scores, how often
    the arg-max of the first `[batch, classes]` tensor (the one accuracy is scored on) agrees.
    Two all-zero rows count as identical (cosine 1).

    Args:
        class_scores: whether a `[batch, classes]` output is class scores: true when the data has
            labels, or when the caller knows (distillation's KL outputs). Without it a `[batch, n]`
            output is as likely an embedding, whose arg-max means nothing, so `top1_agreement` is None.

    Example:
        acc = FidelityAccumulator(class_scores=data.labels is not None)
        for batch in data.batches(64):
            acc.update(reference(*batch.inputs), model(*batch.inputs))
        acc.result()  # {"top1_agreement": 0.99, "cosine_min": 0.97, "cosine_mean": 0.999, "max_abs_error": 0.1}
    """

    def __init__(self, class_scores: bool = False) -> None:
        self.class_scores = class_scores
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
                "output_mismatch",
                f"the model returns {len(compared)} tensors where the original returns {len(references)}",
            )
        for ref, out in zip(references, compared):
            if ref.shape != out.shape:
                raise EngineError(
                    "output_mismatch", f"output shape {list(out.shape)} differs from the original's {list(ref.shape)}"
                )
        scores = next((i for i, ref in enumerate(references) if _is_class_scores(ref)), None)
        for index, (ref, out) in enumerate(zip(references, compared)):
            a, b = _as_float64(ref), _as_float64(out)
            if self.class_scores and index == scores:
                self._agree += int((a.argmax(dim=1) == b.argmax(dim=1)).sum())
                self._rows += a.shape[0]
            self._update_tensor(a, b)

    def _update_tensor(self, a: torch.Tensor, b: torch.Tensor) -> None:
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
        (no class scores, no data) is None."""
        return {
            "top1_agreement": self._agree / self._rows if self._rows else None,
            "cosine_min": self._cosine_min if self._cosine_count else None,
            "cosine_mean": self._cosine_sum / self._cosine_count if self._cosine_count else None,
            "max_abs_error": self._max_abs if self._cosine_count else None,
        }


def fidelity(reference_outputs: Any, outputs: Any, class_scores: bool = False) -> dict[str, float | None]:
    """How faithfully `outputs` reproduce `reference_outputs` (both from the same inputs).

    Args:
        reference_outputs: the original model's output (tensor, or tuple/list/dict of tensors).
        outputs: the compressed model's output, with the same structure and shapes.
        class_scores: whether a `[batch, classes]` output is class scores (the data has labels);
            see `FidelityAccumulator`.

    Returns:
        `{"top1_agreement", "cosine_min", "cosine_mean", "max_abs_error"}`: arg-max agreement of
        the first `[batch, classes]` output (None without class scores), the per-sample, per-tensor
        cosine similarity's minimum and mean, and the largest absolute element difference.

    Raises:
        EngineError("output_mismatch"): the structures or shapes differ.

    Example:
        fidelity(teacher(x), student(x))["cosine_min"] >= 0.99
    """
    accumulator = FidelityAccumulator(class_scores)
    accumulator.update(reference_outputs, outputs)
    return accumulator.result()


def fidelity_score(result: Mapping[str, float | None]) -> tuple[str, float]:
    """The one figure a fidelity result is held to (`min_fidelity`) and headlined by the report.

    Top-1 agreement where it was measured (the data has labels and the output has class scores),
    else the minimum per-sample cosine: the worst sample, because a mean hides the inputs a
    compressed model gets wrong.

    Args:
        result: what `fidelity` or `FidelityAccumulator.result` returned.

    Returns:
        `(metric, value)`, the metric being "top1_agreement" or "cosine_min".

    Raises:
        EngineError("empty_dataset"): nothing was compared.

    Example:
        fidelity_score(fidelity(logits, quantized_logits, class_scores=True))  # ("top1_agreement", 0.995)
    """
    for metric in ("top1_agreement", "cosine_min"):
        if result.get(metric) is not None:
            return metric, float(result[metric])
    raise EngineError("empty_dataset", "there are no outputs to compare fidelity on")


class FidelityProbe:
    """A reference model's outputs on fixed data, to score candidate models against.

    Reference outputs are computed once, for every sample, and kept on the CPU (as flattened
    tensors per batch: memory like the outputs of the whole data set), so scoring a candidate costs
    one pass of the candidate alone; `class_scores` follows the data's labels.

    Example:
        probe = FidelityProbe(model, ctx.evaluation, ctx.device)
        fidelity_score(probe.measure(quantized_model))  # ("cosine_min", 0.995)
    """

    BATCH_SIZE = 64

    def __init__(self, reference: torch.jit.ScriptModule, data: ModelData, device: torch.device) -> None:
        self.reference = reference
        self.data = data
        self.device = device
        self.class_scores = data.labels is not None
        with torch.inference_mode():
            self._outputs = [
                [t.cpu() for t in flatten_outputs(reference(*batch.inputs))]
                for batch in data.batches(self.BATCH_SIZE, device)
            ]

    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    def subset(self, max_samples: int) -> FidelityProbe:
        """A probe on the first `max_samples` samples of this one's data."""
        return FidelityProbe(self.reference, self.data.take(max_samples), self.device)

    def measure(self, model: torch.jit.ScriptModule, device: torch.device | None = None) -> dict[str, float | None]:
        """`fidelity` of `model`'s outputs (computed on `device`, default the probe's) to the reference's."""
        accumulator = FidelityAccumulator(self.class_scores)
        with torch.inference_mode():
            for reference, batch in zip(self._outputs, self.data.batches(self.BATCH_SIZE, device or self.device)):
                accumulator.update(reference, model(*batch.inputs))
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
