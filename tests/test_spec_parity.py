"""The job spec is defined once on each side of the process boundary: the API's schema
(app/schemas/job.py) and the engines' step configs. These tests fail when the two drift: a field,
default, choice or bound on one side only, or a rule between fields only one side enforces."""

from __future__ import annotations

import dataclasses
import typing

import annotated_types
import pytest
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from app.schemas.job import BenchmarkSpec, JobSpec, Step
from worker.engines.errors import EngineError
from worker.engines.measure import BenchmarkConfig
from worker.engines.measure.serving import SERVING_MODES
from worker.engines.pipeline import parse_step, step_configs

SCHEMAS = {
    typing.get_args(model.model_fields["op"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(Step)[0])
}
_BOUND_NAMES = {annotated_types.Ge: "ge", annotated_types.Gt: "gt", annotated_types.Le: "le", annotated_types.Lt: "lt"}


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def _schema_default(info):
    if info.default_factory is not None:
        return info.default_factory()
    return dataclasses.MISSING if info.default is PydanticUndefined else info.default


def _engine_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return _json(field.default_factory())
    return _json(field.default)


def _choices(annotation) -> tuple | None:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


def test_every_op_has_a_schema_and_an_engine_config():
    assert set(SCHEMAS) == set(step_configs()) == {"prune", "quantize", "distill", "compile"}


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_fields_defaults_choices_and_bounds_agree(op):
    schema, config = SCHEMAS[op], step_configs()[op]
    schema_fields = {name: info for name, info in schema.model_fields.items() if name != "op"}
    engine_fields = {field.name: field for field in dataclasses.fields(config)}

    assert list(schema_fields) == list(engine_fields)
    for name, info in schema_fields.items():
        field = engine_fields[name]
        assert _schema_default(info) == _engine_default(field), f"{op}.{name} default"
        assert _choices(info.annotation) == field.metadata.get("choices"), f"{op}.{name} choices"
        bounds = {
            _BOUND_NAMES[type(m)]: getattr(m, _BOUND_NAMES[type(m)]) for m in info.metadata if type(m) in _BOUND_NAMES
        }
        assert bounds == {k: v for k, v in field.metadata.items() if k != "choices"}, f"{op}.{name} bounds"


def test_the_benchmark_spec_and_the_engines_benchmark_config_agree():
    engine = {field.name: field for field in dataclasses.fields(BenchmarkConfig)}
    for name, info in BenchmarkSpec.model_fields.items():
        assert name in engine, f"benchmark.{name} reaches no engine setting"
        assert _schema_default(info) == _engine_default(engine[name]), f"benchmark.{name} default"


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_a_stored_step_parses_back_into_the_engine_config_of_its_defaults(op):
    required = {
        "prune": {"structure": "channel"},
        "quantize": {"scheme": "dynamic_int8"},
        "distill": {},
        "compile": {},
    }[op]
    stored = SCHEMAS[op].model_validate({"op": op, **required}).model_dump(mode="json")

    config = parse_step(stored)

    assert config == step_configs()[op](**required) and config.as_step() == stored


# Each rule between fields, refused by the API (422 at the named field) and by the engines alike.
BROKEN_RULES = [
    ({"op": "prune", "structure": "unstructured", "criterion": "entropy"}, "criterion"),
    ({"op": "prune", "structure": "n:m", "criterion": "bn_scale"}, "criterion"),
    ({"op": "prune", "structure": "n:m", "n": 4, "m": 4}, "n"),
    ({"op": "prune", "structure": "n:m", "n": 5, "m": 4}, "n"),
    ({"op": "quantize", "scheme": "fp16", "exclude": ["fc*"]}, "exclude"),
    ({"op": "quantize", "scheme": "bf16", "exclude": ["fc*"]}, "exclude"),
    ({"op": "prune", "structure": "channel", "amount": 1.0}, "amount"),
    ({"op": "quantize", "scheme": "weight_int4", "group_size": 4}, "group_size"),
    ({"op": "distill", "loss": "hinge"}, "loss"),
    ({"op": "distill", "temperature": 0}, "temperature"),
]


@pytest.mark.parametrize(
    "step, field", BROKEN_RULES, ids=[f"{s['op']}-{f}-{i}" for i, (s, f) in enumerate(BROKEN_RULES)]
)
def test_each_rule_is_enforced_on_both_sides(step, field):
    with pytest.raises(ValidationError) as api:
        JobSpec.model_validate({"model_id": "m", "input_spec": [{"shape": [1, 4]}], "steps": [step]})
    assert [e["loc"][-1] for e in api.value.errors()] == [field]
    assert api.value.errors()[0]["loc"][:3] == ("steps", 0, step["op"])

    with pytest.raises(EngineError) as engine:
        parse_step(step)
    assert engine.value.code == "invalid_step" and field in engine.value.message


@pytest.mark.parametrize(
    "step",
    [
        {"op": "prune", "structure": "channel", "criterion": "entropy"},
        {"op": "prune", "structure": "n:m", "n": 1, "m": 4},
        {"op": "quantize", "scheme": "dynamic_int8", "exclude": ["fc*"]},
    ],
)
def test_the_allowed_neighbours_of_each_rule_pass_both_sides(step):
    JobSpec.model_validate({"model_id": "m", "input_spec": [{"shape": [1, 4]}], "steps": [step]})
    parse_step(step)


def test_the_serving_modes_agree_and_their_rule_holds_on_both_sides():
    schema_modes = typing.get_args(typing.get_args(BenchmarkSpec.model_fields["serving"].annotation)[0])
    assert set(schema_modes) == set(SERVING_MODES)

    for serving in (["optimized"], ["plain", "plain"]):
        with pytest.raises(ValidationError) as api:
            BenchmarkSpec.model_validate({"serving": serving})
        assert [e["loc"] for e in api.value.errors()] == [("serving",)]
        with pytest.raises(EngineError) as engine:
            BenchmarkConfig(serving=serving)
        assert engine.value.code == "invalid_benchmark" and "serving" in engine.value.message
    BenchmarkSpec.model_validate({"serving": ["plain", "onnxruntime", "optimized"]})
    BenchmarkConfig(serving=["plain", "onnxruntime", "optimized"])
