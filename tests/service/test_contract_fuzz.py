"""Schemathesis against a real API process: requests generated from the OpenAPI document (its
examples, boundary values, random and invalid data, and sequences following the links between
operations) must never get a 5xx nor a status the document does not declare for the operation.

Bounded for CI (COMPACTOR_CONTRACT_FUZZ_S, default 90 s of generation) and deterministic: the same
requests in the same order on every run, however far the time allows it to get.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.service.conftest import traced_cnn, upload_dataset, upload_model
from tests.service.servers import Service, api_client, postgres_database, service_env

FUZZ_SECONDS = os.environ.get("COMPACTOR_CONTRACT_FUZZ_S", "90")


@pytest.fixture(scope="module")
def lone_api(tmp_path_factory):
    """An API process of its own (no worker: submitted jobs stay queued), on Postgres, so what the
    fuzzer creates and deletes touches no other test."""
    data_dir = tmp_path_factory.mktemp("contract")
    with postgres_database() as database_url:
        service = Service(service_env(data_dir, database_url, f"sqla+sqlite:///{data_dir / 'broker.sqlite'}"), data_dir)
        service.start_api()
        try:
            yield service
        finally:
            service.stop()


def _config(api) -> str:
    """Real ids for the fuzzer to use half the time, so the operations on a model, a dataset or a
    job reach their logic instead of stopping at a 404."""
    model = upload_model(api, traced_cnn())
    dataset = upload_dataset(api, input=np.zeros((4, 1, 32, 32), np.float32), label=np.zeros(4, np.int64))
    job = api.post("/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 1, 32, 32]}]}).json()
    known = {"models": model["id"], "datasets": dataset["id"], "jobs": job["id"]}
    lines = [f'[dictionaries.{name}]\nvalues = ["{value}"]\n' for name, value in known.items()]
    lines.append("[parameters]")
    for key, name in (
        ("path.model_id", "models"),
        ("body.model_id", "models"),
        ("path.dataset_id", "datasets"),
        ("body.calibration_dataset_id", "datasets"),
        ("path.job_id", "jobs"),
    ):
        lines.append(f'"{key}" = {{ dictionary = "{name}", probability = 0.5 }}')
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_no_server_error_and_no_undocumented_status(lone_api, tmp_path):
    with api_client(lone_api.url) as api:
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(api))
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{lone_api.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--generation-deterministic",
        "--max-examples",
        "25",
        "--max-time",
        FUZZ_SECONDS,
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=float(FUZZ_SECONDS) + 240)

    print(run.stdout[-1500:])  # the summary: operations, phases, test cases (shown with -s)
    assert run.returncode == 0, f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}\n--- API log:\n{lone_api.log('api')}"
