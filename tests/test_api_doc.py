"""docs/api.md, the human contract, kept in step with the OpenAPI document the service serves:
the same operations, and the same step fields, defaults and choices as the JobSpec schema."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from pydantic_core import PydanticUndefined

from app.main import app
from app.schemas.job import BenchmarkSpec, CompileStep, DistillStep, InputSpec, PruneStep, QuantizeStep, TargetSpec

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "api.md").read_text()
# Paths the document serves itself, outside the routers.
FRAMEWORK_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _documented_operations() -> set[tuple[str, str]]:
    return {
        (method.lower(), path) for method, path in re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/\S+)` \|", DOC, re.M)
    }


def test_every_operation_is_documented_and_every_documented_one_exists():
    served = {
        (method, path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if path not in FRAMEWORK_PATHS
    }

    assert _documented_operations() == served


def _table(heading: str) -> dict[str, tuple[str, str]]:
    """{field: (default, allowed)} of the table under `### heading`."""
    section = DOC.split(f"### {heading}", 1)[1].split("\n#", 1)[0]
    return {
        field: (default, allowed)
        for field, default, allowed in re.findall(r"^\| `(\w+)` \| ([^|]+?) \| ([^|]+?) \|", section, re.M)
    }


@pytest.mark.parametrize(
    "heading, schema",
    [
        ("prune", PruneStep),
        ("quantize", QuantizeStep),
        ("distill", DistillStep),
        ("compile", CompileStep),
        ("benchmark", BenchmarkSpec),
        ("target", TargetSpec),
        ("input_spec", InputSpec),
    ],
)
def test_step_tables_match_the_schema(heading, schema):
    rows = _table(heading)
    fields = {name: info for name, info in schema.model_fields.items() if name != "op"}

    assert list(rows) == list(fields)
    for name, info in fields.items():
        default, allowed = rows[name]
        value = info.default_factory() if info.default_factory else info.default
        expected = "required" if value is PydanticUndefined else f"`{json.dumps(value)}`"
        assert default == expected, f"{heading}.{name}: documented {default}, schema {expected}"
        if typing.get_origin(info.annotation) is typing.Literal:
            assert allowed == ", ".join(f"`{c}`" for c in typing.get_args(info.annotation)), f"{heading}.{name}"


def test_the_readme_points_at_this_document_not_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in readme and "../shared" not in readme


def test_every_documented_failure_code_is_one_the_service_can_store():
    section = DOC.split("### Why a job failed", 1)[1].split("\n#", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
    sources = "\n".join(p.read_text() for folder in ("app", "worker") for p in (ROOT / folder).rglob("*.py"))
    assert {"model_error", "internal_error", "out_of_memory", "killed", "timeout", "worker_lost"} <= set(documented)
    assert [code for code in documented if f'"{code}"' not in sources] == []
