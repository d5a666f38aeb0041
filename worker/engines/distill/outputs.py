"""What distillation compares: a model's output leaves, the loss chosen for each, and how close
the student is to the teacher (or to the labels) on validation data."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engines.errors import EngineError
from worker.engines.measure.quality import FidelityAccumulator, output_leaves


def flatten_output(output: Any, batch: int) -> tuple[str, list[torch.Tensor]]:
    """A model output as a structure signature and its tensor leaves, in `output_leaves`' order.

    Args:
        output: a tensor, or tuples / lists / dicts of them (what a TorchScript model returns).
        batch: the batch size of the call, written as `B` in the signature.

    Returns:
        (signature, leaves), e.g. ("tuple[0]: Tensor[B, 10], tuple[1]: Tensor[B, 4]", [t0, t1]); two
        models return the same structure exactly when their signatures are equal.

    Raises:
        EngineError("unsupported_output"): a leaf is not a tensor.

    Example:
        signature, leaves = flatten_output(model(x), batch=x.shape[0])
    """
    parts, leaves = [], []
    for path, leaf in output_leaves(output):
        if not isinstance(leaf, torch.Tensor):
            where = f" at {path}" if path else ""
            raise EngineError(
                "unsupported_output", f"cannot distill a model output of type {type(leaf).__name__}{where}"
            )
        dims = ["B" if i == 0 and size == batch else str(size) for i, size in enumerate(leaf.shape)]
        parts.append(f"{path + ': ' if path else ''}Tensor[{', '.join(dims)}]")
        leaves.append(leaf)
    return ", ".join(parts), leaves


def check_student_output(teacher_output: Any, student_output: Any, batch: int) -> None:
    """Refuse a student whose output structure or per-sample shapes differ from the teacher's.

    Raises:
        EngineError("student_mismatch") naming both structures.
    """
    teacher_sig, teacher_leaves = flatten_output(teacher_output, batch)
    student_sig, student_leaves = flatten_output(student_output, batch)
    if teacher_sig != student_sig or any(
        t.dtype.is_floating_point != s.dtype.is_floating_point
        for t, s in zip(teacher_leaves, student_leaves, strict=True)
    ):
        raise EngineError(
            "student_mismatch",
            f"the student returns {student_sig} but the teacher returns {teacher_sig}: a distillation "
            "student must return the same output structure with the same per-sample shapes and dtypes",
        )


def choose_loss(leaf: torch.Tensor, requested: str) -> str | None:
    """The loss for one teacher output leaf: "kl", "cosine", "mse", or None (not differentiable).

    "auto" reads the output's nature: [batch, classes] → KL on softmax; other outputs with
    several values per sample (embeddings, feature maps) → cosine; one value per sample → MSE.
    """
    if not leaf.dtype.is_floating_point:
        return None
    per_sample = leaf[0].numel() if leaf.dim() else 1
    if requested == "auto":
        if leaf.dim() == 2 and leaf.shape[1] >= 2:
            return "kl"
        return "cosine" if leaf.dim() >= 2 and per_sample >= 2 else "mse"
    if requested == "kl" and (leaf.dim() < 2 or leaf.shape[-1] < 2):
        raise EngineError("invalid_step", f"loss 'kl' needs class logits, got an output of shape {list(leaf.shape)}")
    if requested == "cosine" and (leaf.dim() < 2 or per_sample < 2):
        raise EngineError("invalid_step", f"loss 'cosine' needs vectors per sample, got shape {list(leaf.shape)}")
    return requested


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    classes = student.shape[-1]
    log_p_student = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    # τ² keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature * temperature


def _cosine(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    similarity = F.cosine_similarity(student.flatten(1).float(), teacher.flatten(1).float(), dim=1)
    return (1.0 - similarity).mean()


def _mse(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    # relative to the teacher's mean square, so the loss (and a fixed lr) ignore the output scale
    teacher = teacher.float()
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kl": _kl,
    "cosine": _cosine,
    "mse": _mse,
}


@dataclass(frozen=True)
class DistillationLoss:
    """α·τ²·KL + (1−α)·CE on the first output when labels are used, plus one distance per other output.

    Attributes:
        kinds: the loss of each output leaf (None: leaf ignored).
        temperature: τ.
        alpha: α; only applies when `use_labels`.
        use_labels: whether the first output is class logits and the data has labels.
    """

    kinds: tuple[str | None, ...]
    temperature: float
    alpha: float
    use_labels: bool

    def __call__(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The batch loss (a scalar with the student's graph)."""
        total = student[0].new_zeros((), dtype=torch.float32)
        for index, (kind, s, t) in enumerate(zip(self.kinds, student, teacher, strict=True)):
            if kind is None:
                continue
            soft = _LOSSES[kind](s, t, self.temperature)
            if index == 0 and self.use_labels and labels is not None:
                hard = F.cross_entropy(s.float(), labels)
                total = total + self.alpha * soft + (1.0 - self.alpha) * hard
            else:
                total = total + soft
        return total


_FIDELITY_NAMES = {"kl": "top1_agreement", "cosine": "cosine_mean", "mse": "one_minus_relative_mse"}


def validation_metric_name(kinds: tuple[str | None, ...], use_labels: bool) -> str:
    """What the validation score measures: "top1" against labels, else fidelity to the teacher."""
    if use_labels:
        return "top1"
    used = [kind for kind in kinds if kind is not None]
    return _FIDELITY_NAMES[used[0]] if len(used) == 1 else "teacher_fidelity_mean"


class ValidationMeter:
    """Accumulates one validation pass: the score (higher is better) and the mean loss.

    The score is top-1 accuracy on the first output when labels are used; otherwise the mean over
    outputs of top-1 agreement (logits), mean cosine (vectors) or 1 − relative MSE (scalars).

    Example:
        meter = ValidationMeter(loss)
        for s, t, y in batches: meter.update(s, t, y)
        score, mean_loss = meter.result()
    """

    def __init__(self, loss: DistillationLoss):
        self.loss = loss
        self.samples = 0
        self.loss_sum = 0.0
        self.correct = 0.0
        # teacher agreement of logits and vectors is the report's fidelity, computed by the same code
        self.fidelity = [FidelityAccumulator(class_scores=kind == "kl") for kind in loss.kinds]
        self.squared_error = [0.0] * len(loss.kinds)
        self.squared_teacher = [0.0] * len(loss.kinds)

    def update(self, student: list[torch.Tensor], teacher: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        """Add one batch (outputs computed without gradients)."""
        batch = int(student[0].shape[0])
        self.samples += batch
        self.loss_sum += float(self.loss(student, teacher, labels)) * batch
        if self.loss.use_labels and labels is not None:
            self.correct += float((student[0].argmax(dim=-1) == labels).sum())
        for index, (kind, s, t) in enumerate(zip(self.loss.kinds, student, teacher, strict=True)):
            if kind == "kl":
                # KL compares the last axis as classes (per token, too): agreement is counted the same way
                self.fidelity[index].update(t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1]))
            elif kind == "cosine":
                self.fidelity[index].update(t, s)
            elif kind == "mse":
                s, t = s.float(), t.float()
                self.squared_error[index] += float((s - t).pow(2).sum())
                self.squared_teacher[index] += float(t.pow(2).sum())

    def result(self) -> tuple[float, float]:
        """(score, mean loss) over everything added."""
        samples = max(self.samples, 1)
        mean_loss = self.loss_sum / samples
        if self.loss.use_labels:
            return self.correct / samples, mean_loss
        scores = []
        for index, kind in enumerate(self.loss.kinds):
            if kind == "mse":
                scores.append(1.0 - self.squared_error[index] / max(self.squared_teacher[index], 1e-12))
            elif kind is not None:
                scores.append(self.fidelity[index].result()[_FIDELITY_NAMES[kind]])
        score = sum(scores) / len(scores)
        return (score if math.isfinite(score) else -math.inf), mean_loss
