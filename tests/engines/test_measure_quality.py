"""Fidelity and top-1 accuracy helpers on outputs whose figures are known by construction."""

from __future__ import annotations

import pytest
import torch

from worker.engines.errors import EngineError
from worker.engines.measure import FidelityAccumulator, fidelity, top1_accuracy


def test_identical_outputs_are_exactly_faithful():
    logits = torch.randn(50, 10)

    assert fidelity(logits, logits.clone()) == {
        "top1_agreement": 1.0, "cosine_min": 1.0, "cosine_mean": 1.0, "max_abs_error": 0.0,
    }


def test_known_disagreement():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    outputs = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # row 0: same direction; row 1: orthogonal

    result = fidelity(reference, outputs)

    assert result == {"top1_agreement": 0.5, "cosine_min": 0.0, "cosine_mean": 0.5, "max_abs_error": 1.0}


def test_tuple_outputs_are_flattened_and_agreement_uses_only_class_scores():
    logits, features = torch.randn(4, 3), torch.randn(4, 2, 5)
    flipped = features.clone()
    flipped[0] = -flipped[0]

    result = fidelity((logits, {"features": features}), (logits.clone(), {"features": flipped}))

    assert result["top1_agreement"] == 1.0
    assert result["cosine_min"] == pytest.approx(-1.0)
    assert result["cosine_mean"] == pytest.approx((4 + 3 - 1) / 8)  # 4 logit rows, 3 same + 1 flipped feature rows
    assert result["max_abs_error"] == pytest.approx(float(2 * features[0].abs().max()))


def test_zero_rows_and_reduced_precision():
    reference = torch.zeros(3, 4)
    reference[2] = 1.0

    result = fidelity(reference, reference.half())

    assert result["cosine_min"] == 1.0  # two all-zero rows are identical
    assert result["max_abs_error"] == 0.0


def test_accumulating_batches_equals_one_shot():
    reference, outputs = torch.randn(10, 6), torch.randn(10, 6)
    accumulator = FidelityAccumulator()
    for start in range(0, 10, 4):
        accumulator.update(reference[start:start + 4], outputs[start:start + 4])

    assert accumulator.result() == pytest.approx(fidelity(reference, outputs))


def test_mismatched_outputs_are_refused():
    with pytest.raises(EngineError) as caught:
        fidelity(torch.zeros(2, 3), torch.zeros(2, 4))
    assert caught.value.code == "output_mismatch"
    with pytest.raises(EngineError):
        fidelity((torch.zeros(2, 3), torch.zeros(2)), torch.zeros(2, 3))


def test_top1_accuracy_counts_argmax_hits():
    scores = torch.eye(4)[[0, 1, 2, 3, 3]]  # predicts 0, 1, 2, 3, 3
    labels = torch.tensor([0, 1, 0, 3, 2])

    assert top1_accuracy(scores, labels) == 3 / 5
    assert top1_accuracy((torch.zeros(5, 7, 2), scores), labels) == 3 / 5  # first [N, classes] tensor


def test_top1_accuracy_needs_class_scores():
    with pytest.raises(EngineError) as caught:
        top1_accuracy(torch.zeros(5, 3, 2), torch.zeros(5, dtype=torch.long))
    assert caught.value.code == "not_a_classifier"
