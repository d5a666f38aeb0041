"""The search's pure parts, without servers: the space proposed from an inspection, the order
(prefix first), the early stop, the sampler's proposals rebuilt from finished trials, the
constraint arithmetic (absolute vs relative drop) and the front."""

from __future__ import annotations

import pytest

from app.schemas.search import SearchSpec
from app.services.search_space import Candidate, hopeless, resolve_space
from app.services.search_strategy import Finished, propose
from app.services.searches import pareto_front, violations

CONV = {"layers": {"Conv2d": 2, "BatchNorm2d": 2, "Linear": 2}}
TRANSFORMER = {"layers": {"Linear": 36, "LayerNorm": 13, "Embedding": 3}}


def _spec(**overrides) -> SearchSpec:
    raw = {
        "model_id": "m",
        "calibration_dataset_id": "c",
        "eval_dataset_id": "e",
        "constraints": {"max_accuracy_drop": 0.01},
    }
    raw.update(overrides)
    return SearchSpec.model_validate(raw)


def test_a_convolutional_model_with_calibration_data_gets_pruning_distillation_and_both_int8_schemes():
    space = resolve_space(_spec(), CONV)
    assert space.prune_amounts == (0.25, 0.5) and space.distill
    assert space.quantize_schemes == ("dynamic_int8", "static_int8")
    candidates = space.candidates()
    assert candidates[0] == Candidate() and space.steps(candidates[0]) == [{"op": "compile"}]
    # Every candidate comes after its prefix, and ends with the lossless compile step.
    for index, candidate in enumerate(candidates):
        if candidate.parent is not None:
            assert candidates.index(candidate.parent) < index
        steps = space.steps(candidate)
        assert steps[-1] == {"op": "compile"}
        if candidate.parent is not None:
            assert steps[: len(space.steps(candidate.parent)) - 1] == space.steps(candidate.parent)[:-1]


def test_a_transformer_without_calibration_gets_dynamic_int8_held_to_the_fidelity_limit():
    spec = _spec(calibration_dataset_id=None, constraints={"min_fidelity": 0.99})
    space = resolve_space(spec, TRANSFORMER)
    assert space.prune_amounts == () and not space.distill
    assert [space.steps(c) for c in space.candidates()] == [
        [{"op": "compile"}],
        [{"op": "quantize", "scheme": "dynamic_int8", "min_fidelity": 0.99}, {"op": "compile"}],
    ]


def test_the_spec_overrides_the_proposal():
    spec = _spec(space={"prune_amounts": [0.3], "distill": False, "quantize_schemes": [], "compile": False})
    space = resolve_space(spec, CONV)
    assert [c.key for c in space.candidates()] == ["prune=0.3 distill=0 quantize=none"]


def test_a_child_of_a_prefix_that_misses_accuracy_is_stopped_unless_a_distillation_follows():
    pruned = Candidate(0.5, False, "none")
    missed = {pruned: 0.8}
    assert hopeless(Candidate(0.5, False, "dynamic_int8"), missed) == pruned
    assert hopeless(Candidate(0.5, True, "none"), missed) is None
    assert hopeless(Candidate(0.5, True, "dynamic_int8"), missed) is None
    assert hopeless(Candidate(0.5, False, "dynamic_int8"), {pruned: -0.2}) is None


def test_proposals_run_the_floor_first_and_a_prefix_before_its_children_then_cover_the_space():
    space = resolve_space(_spec(), CONV)
    tried: set[Candidate] = set()
    finished: list[Finished] = []
    rounds = []
    while True:
        chosen = propose(space, finished, tried, set(), 3, seed=0)
        if not chosen:
            break
        rounds.append(chosen)
        for candidate in chosen:
            assert candidate.parent is None or candidate.parent in {f.candidate for f in finished}
        tried |= set(chosen)
        finished += [Finished(c, 0.9, 1.0 / (1 + c.prune), {"quality": -1.0}) for c in chosen]
    assert rounds[0][0] == Candidate()
    assert tried == set(space.candidates())


def test_proposals_are_rebuilt_from_the_trials_alone():
    space = resolve_space(_spec(), CONV)
    history = [Finished(c, 0.9, 0.5, {"quality": -1.0}) for c in space.candidates()[:5]]
    tried = {f.candidate for f in history}
    # Two advancers in different processes, same rows: the same proposals.
    assert propose(space, history, tried, set(), 2, seed=7) == propose(
        space, list(history), set(tried), set(), 2, seed=7
    )


@pytest.mark.parametrize(
    "relative, accuracy, holds",
    [(False, 0.89, True), (False, 0.889, False), (True, 0.891, True), (True, 0.890, False)],
)
def test_max_accuracy_drop_is_absolute_points_unless_relative(relative, accuracy, holds):
    spec = _spec(constraints={"max_accuracy_drop": 0.01, "relative": relative})
    figures = {"accuracy_drop": round(0.90 - accuracy, 6), "baseline_accuracy": 0.90, "fidelity": None}
    assert (violations(spec, figures)["quality"] <= 0) == holds


def test_the_front_keeps_the_trials_nothing_beats_on_both_quality_and_objective():
    trials = [
        {"number": 0, "quality": 0.95, "objective": 1.0},
        {"number": 1, "quality": 0.94, "objective": 0.5},
        {"number": 2, "quality": 0.93, "objective": 0.6},  # beaten by 1
        {"number": 3, "quality": 0.80, "objective": 0.2},
        {"number": 4, "quality": None, "objective": None},  # failed
    ]
    assert pareto_front(trials) == [0, 1, 3]
