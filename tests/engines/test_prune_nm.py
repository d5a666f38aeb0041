"""N:M pruning: every run of M consecutive input weights keeps its N most salient, layers that do not
fit are skipped with the reason, and the report states the coverage and the need for sparse kernels."""

from __future__ import annotations

import pytest
import torch

from tests.zoo import SequentialCNN, script, trace
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.prune.nm import n_m_mask

IMAGE = torch.rand(8, 1, 32, 32)


def prune(model, **step):
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData((IMAGE,)))
    return run_step(model, {"op": "prune", "structure": "n:m", **step}, ctx)


def runs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight as rows of m consecutive input weights (conv: at each kernel position)."""
    return weight.movedim(1, -1).reshape(-1, m)


@pytest.mark.parametrize("convert", ["trace", "script"])
def test_two_of_every_four_input_weights_survive_and_the_largest_are_kept(convert):
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2]) if convert == "trace" else script(SequentialCNN())
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = prune(model)

    pruned = dict(out.model.named_parameters())
    for name in ("features.4.weight", "fc1.weight", "fc2.weight"):
        kept, before = runs(pruned[name].detach(), 4), runs(original[name], 4)
        assert ((kept != 0).sum(1) == 2).all()
        weakest_kept = before.abs().masked_fill(kept == 0, float("inf")).min(1).values
        strongest_dropped = before.abs().masked_fill(kept != 0, float("-inf")).max(1).values
        assert (weakest_kept >= strongest_dropped).all()
    assert torch.equal(pruned["features.0.weight"], original["features.0.weight"])
    assert out.details["skipped"] == [
        {"module": "features.0", "reason": "its 1 input weights per output do not split into runs of 4"}
    ]
    all_weights = sum(original[f"{n}.weight"].numel() for n in ("features.0", "features.4", "fc1", "fc2"))
    assert out.details["pattern_coverage"] == pytest.approx((all_weights - 144) / all_weights)
    assert "sparse kernels" in out.details["notes"][0]


def test_other_patterns_and_exclusions():
    torch.manual_seed(0)
    model = trace(SequentialCNN(), IMAGE[:2])

    out = prune(model, n=1, m=8, exclude=["fc2"], criterion="l2")

    weight = dict(out.model.named_parameters())["fc1.weight"].detach()
    assert ((runs(weight, 8) != 0).sum(1) == 1).all()
    assert [layer["module"] for layer in out.details["layers"]] == ["features.4", "fc1"]
    assert out.details["pattern"] == "1:8"


def test_mask_keeps_the_top_n_of_each_run_along_the_input_axis():
    score = torch.tensor([[[[4.0]], [[1.0]], [[3.0]], [[2.0]]]])  # conv weight [1 out, 4 in, 1, 1]

    assert n_m_mask(score, 2, 4).flatten().tolist() == [True, False, True, False]


@pytest.mark.parametrize("n,m", [(4, 4), (0, 4), (5, 4)])
def test_impossible_patterns_are_refused(n, m):
    with pytest.raises(EngineError) as error:
        prune(trace(SequentialCNN(), IMAGE[:2]), n=n, m=m)

    assert error.value.code == "invalid_step"
