"""The `distill` step's settings: one frozen dataclass parsed from the job spec's step dict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from worker.engines.errors import EngineError

LOSS_CHOICES = ("auto", "kl", "cosine", "mse")


@dataclass(frozen=True)
class DistillConfig:
    """How to distill the teacher into the student.

    Attributes:
        student_model_id: an uploaded student; None trains the pipeline's current model.
        temperature: softmax temperature τ of the soft targets. 1 (the teacher's own
            probabilities) by default: a higher τ flattens them and, with the τ² factor, lets
            matching every logit outweigh the decision, which costs top-1 in a short recovery
            (measured in benchmarks/distill_recovery.py).
        alpha: weight α of the soft-target loss against cross-entropy on hard labels.
        epochs: passes over the training data (fewer when early stopping triggers).
        lr: peak learning rate of the cosine schedule (AdamW).
        batch_size: training batch size; smaller when the data or the device memory is smaller.
        patience: epochs without a better validation score before training stops.
        sparsity_regularization: β of the β·Σ|γ| penalty on BatchNorm scales.
        loss: "auto" picks per output (KL for [batch, classes] logits, cosine for other
            multi-value outputs, MSE for one value per sample); "kl", "cosine", "mse" force one.
        weight_decay: AdamW's decoupled weight decay.

    Example:
        config = DistillConfig.from_step({"op": "distill", "epochs": 5, "temperature": 2.0})
    """

    student_model_id: str | None = None
    temperature: float = 1.0
    alpha: float = 0.7
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 2
    sparsity_regularization: float = 0.0
    loss: str = "auto"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.temperature > 0 and math.isfinite(self.temperature), "temperature must be > 0"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.sparsity_regularization >= 0, "sparsity_regularization must be >= 0"),
            (self.loss in LOSS_CHOICES, f"loss must be one of {', '.join(LOSS_CHOICES)}"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineError("invalid_step", f"distill: {message}")

    @classmethod
    def from_step(cls, step: dict) -> DistillConfig:
        """Parse a JobSpec step; absent or null fields take the defaults above.

        Args:
            step: the step dict (`{"op": "distill", ...}`); unknown keys are ignored.

        Returns:
            The validated config. Raises EngineError("invalid_step") on out-of-range values.
        """
        values = {}
        for field in dataclasses.fields(cls):
            if step.get(field.name) is None:
                continue
            value = step[field.name]
            try:
                values[field.name] = _COERCE[field.name](value)
            except (TypeError, ValueError):
                raise EngineError("invalid_step", f"distill: {field.name}={value!r} is not valid") from None
        return cls(**values)


_COERCE = {
    "student_model_id": str, "temperature": float, "alpha": float, "epochs": int, "lr": float,
    "batch_size": int, "patience": int, "sparsity_regularization": float, "loss": str, "weight_decay": float,
}
