"""A stored job is always readable: its spec is not validated again under today's rules."""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime

from app.schemas.job import JobRead, JobSpec, stored_spec

BASE = {
    "id": "j",
    "name": None,
    "model_id": "m",
    "status": "queued",
    "progress": {"stage": "queued"},
    "attempts": 0,
    "created_at": datetime.now(UTC),
    "revision": 1,
}


def test_a_spec_todays_rules_refuse_is_shown_as_stored():
    # e.g. accepted before a rule existed (compile only last, bounded shapes) or written by hand
    refused = {"model_id": "m", "input_spec": [{"shape": [1, 3, 100000, 100000]}], "steps": [{"op": "x"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic notes a dict where a JobSpec is typed
        shown = json.loads(JobRead(spec=stored_spec(refused), **BASE).model_dump_json())
    assert shown["spec"] == refused


def test_a_valid_spec_is_read_back_as_a_job_spec_with_defaults():
    spec = stored_spec({"model_id": "m", "input_spec": [{"shape": [1, 4]}]})
    assert isinstance(spec, JobSpec) and spec.benchmark.batch_sizes == [1]
