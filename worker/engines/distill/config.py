"""The `distill` step's settings: a frozen config parsed once from the job spec's step dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from worker.engines.step_config import StepConfig, setting

LOSS_CHOICES = ("auto", "kl", "cosine", "mse")


@dataclass(frozen=True)
class DistillConfig(StepConfig):
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
        config = DistillConfig(epochs=5, temperature=2.0)
    """

    op: ClassVar[str] = "distill"

    student_model_id: str | None = None
    temperature: float = setting(1.0, gt=0)
    alpha: float = setting(0.7, ge=0, le=1)
    epochs: int = setting(3, ge=1, le=1000)
    lr: float = setting(1e-3, gt=0)
    batch_size: int = setting(64, ge=1)
    patience: int = setting(2, ge=1)
    sparsity_regularization: float = setting(0.0, ge=0)
    loss: str = setting("auto", choices=LOSS_CHOICES)
    weight_decay: float = setting(0.0, ge=0)
