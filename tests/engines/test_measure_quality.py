"""The one fidelity, output flattener and top-1 accuracy, on outputs whose figures are known by construction."""

from __future__ import annotations

import pytest
import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.measure import FidelityAccumulator, fidelity, top1_accuracy
from worker.engines.measure.quality import (
    FidelityProbe,
    fidelity_score,
    flatten_outputs,
    output_leaves,
)
from worker.engines.quantize.int8 import quiet_quantized_tensors


def test_identical_outputs_are_exactly_faithful():
    logits = torch.randn(50, 10)

    assert fidelity(logits, logits.clone(), class_scores=True) == {
        "top1_agreement": 1.0,
        "cosine_min": 1.0,
        "cosine_mean": 1.0,
        "max_abs_error": 0.0,
    }


def test_known_disagreement():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    outputs = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # row 0: same direction; row 1: orthogonal

    result = fidelity(reference, outputs, class_scores=True)

    assert result == {"top1_agreement": 0.5, "cosine_min": 0.0, "cosine_mean": 0.5, "max_abs_error": 1.0}


def test_tuple_outputs_are_flattened_and_agreement_uses_only_class_scores():
    logits, features = torch.randn(4, 3), torch.randn(4, 2, 5)
    flipped = features.clone()
    flipped[0] = -flipped[0]

    result = fidelity((logits, {"features": features}), (logits.clone(), {"features": flipped}), class_scores=True)

    assert result["top1_agreement"] == 1.0
    assert result["cosine_min"] == pytest.approx(-1.0)
    assert result["cosine_mean"] == pytest.approx((4 + 3 - 1) / 8)  # 4 logit rows, 3 same + 1 flipped feature rows
    assert result["max_abs_error"] == pytest.approx(float(2 * features[0].abs().max()))


def test_one_fidelity_for_tuple_dict_and_quantized_outputs():
    logits, embedding = torch.randn(8, 5), torch.randn(8, 16)
    logits[torch.arange(8), torch.arange(8) % 5] += 3.0  # a clear winner per row: no int8 rounding ties
    noisy = embedding + 0.05 * torch.randn(8, 16)
    expected = fidelity((logits, embedding), (logits.clone(), noisy), class_scores=True)

    # a dict is compared key by key whatever order it was built in
    as_dict = fidelity(
        {"logits": logits, "embedding": embedding}, {"embedding": noisy, "logits": logits.clone()}, class_scores=True
    )
    assert as_dict == pytest.approx(expected)
    # quantized outputs are compared dequantized, not skipped, and their arg-max counts
    with quiet_quantized_tensors():
        quantized = tuple(torch.quantize_per_tensor(t, 0.05, 128, torch.quint8) for t in (logits, noisy))
    result = fidelity((logits, embedding), quantized, class_scores=True)
    assert result == pytest.approx(
        fidelity((logits, embedding), tuple(q.dequantize() for q in quantized), class_scores=True)
    )
    assert result["cosine_min"] == pytest.approx(expected["cosine_min"], abs=5e-3) and result["cosine_min"] < 0.999
    assert result["top1_agreement"] == 1.0


def test_the_first_class_scores_alone_give_top1_agreement():
    logits, second = torch.eye(4), torch.eye(4)
    result = fidelity((logits, second), (logits.clone(), second.flip(0)), class_scores=True)
    assert result["top1_agreement"] == 1.0  # the second [batch, n] tensor is not what labels score


def test_without_labels_a_2d_output_is_no_class_scores():
    # a sentence embedding is [batch, 384]: its arg-max means nothing, so no top-1 agreement is claimed
    embedding = torch.randn(6, 384)
    result = fidelity(embedding, embedding + 0.1 * torch.randn(6, 384))
    assert result["top1_agreement"] is None
    assert fidelity_score(result) == ("cosine_min", result["cosine_min"])


def test_the_figure_held_is_top1_agreement_when_measured_else_cosine_min():
    logits = torch.randn(10, 3)
    labelled = fidelity(logits, logits.clone(), class_scores=True)
    assert fidelity_score(labelled) == ("top1_agreement", 1.0)
    assert fidelity_score(fidelity(logits, 2 * logits)) == ("cosine_min", pytest.approx(1.0))
    with pytest.raises(EngineError) as caught:
        fidelity_score(FidelityAccumulator().result())
    assert caught.value.code == "empty_dataset"


def test_output_leaves_have_one_order_and_name_their_containers():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert output_leaves((a, {"z": b, "m": [c, None]})) == [
        ("tuple[0]", a),
        ("tuple[1]dict['m']list[0]", c),
        ("tuple[1]dict['m']list[1]", None),
        ("tuple[1]dict['z']", b),
    ]
    assert output_leaves({"z": b, "m": a}) == output_leaves({"m": a, "z": b})
    assert [path for path, _ in output_leaves((a, b))] != [path for path, _ in output_leaves([a, b])]
    assert flatten_outputs((a, {"z": b, "m": [c, None]})) == [a, c, b]
    assert output_leaves(a) == [("", a)]


def test_probe_scores_every_sample_against_the_kept_reference():
    reference = torch.nn.Linear(4, 3)
    candidate = torch.nn.Linear(4, 3)
    x, labels = torch.randn(150, 4), torch.randint(0, 3, (150,))  # three probe batches, the last one short
    probe = FidelityProbe(reference, ModelData((x,), labels), torch.device("cpu"))

    with torch.no_grad():
        expected = fidelity(reference(x), candidate(x), class_scores=True)
    assert probe.measure(candidate) == pytest.approx(expected)
    assert probe.subset(10).num_samples == 10


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
        accumulator.update(reference[start : start + 4], outputs[start : start + 4])

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
