"""A slice of the engine matrix (tests/engines/matrix.py) in `make test`; `make matrix` runs it all.

The slice takes one case per kind of pipeline and spreads them over the model shapes most likely
to break an engine or the meter: a scripted loop, a constant reshape, a recurrent net, two inputs.
"""

from __future__ import annotations

import pytest

from tests.engines import matrix
from worker.engines.errors import EngineError, MeterError

SLICE = [
    ("SequentialCNN", "prune → distill → quantize:static_int8"),
    ("FixedViewNet", "prune → quantize:binary"),
    ("LoopIfNet", "quantize:fp16 → compile"),
    ("LSTMClassifier", "quantize:weight_int4"),
    ("TinyEncoder", "distill"),
    ("TwoInputEncoder", "quantize:dynamic_int8(min_fidelity)"),
]
MODELS = {model.name: model for model in matrix.MODELS}
CASES = {case.name: case for case in matrix.CASES}


@pytest.mark.parametrize(("model", "case"), SLICE, ids=[f"{m}-{c}" for m, c in SLICE])
def test_matrix_slice_has_no_internal_error(model, case, tmp_path):
    outcome = matrix.run_case(MODELS[model], CASES[case], tmp_path)
    assert outcome.status != "fail", outcome.detail


def test_every_model_and_scheme_is_in_the_matrix():
    from worker.engines.quantize.config import SCHEMES

    quantized = {step["scheme"] for case in matrix.CASES for step in case.steps if step["op"] == "quantize"}
    assert quantized == set(SCHEMES)
    assert {"prune", "distill", "quantize", "compile"} <= {s["op"] for c in matrix.CASES for s in c.steps}
    assert len(MODELS) == len(matrix.MODELS) and len(CASES) == len(matrix.CASES)  # names are unique


def test_outcomes_tell_a_method_that_does_not_apply_from_a_fault():
    not_applicable = EngineError("calibration_required", "needs data")
    assert matrix.classify(not_applicable) == ("engine_error", "calibration_required")
    assert matrix.classify(EngineError("internal_error", "ours")) == ("fail", "EngineError")
    assert matrix.classify(MeterError("counting", RuntimeError("no storage"))) == ("fail", "MeterError(internal_error)")
    assert matrix.classify(RuntimeError("boom")) == ("fail", "RuntimeError")


def test_a_broken_step_fails_the_matrix(tmp_path, monkeypatch):
    """A step that raises a plain exception is a FAIL, with its type in the table."""
    from worker.engines import pipeline

    def broken(model, config, ctx):
        raise IndexError("an engine bug")

    config_type = pipeline.step_configs()["compile"]
    monkeypatch.setitem(pipeline._HANDLERS, config_type, broken)
    outcome = matrix.run_case(MODELS["SequentialCNN"], CASES["compile"], tmp_path)
    assert (outcome.status, outcome.cell) == ("fail", "FAIL IndexError")
    assert "FAIL IndexError" in matrix.summary_table([outcome])
