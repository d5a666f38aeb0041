"""The production compose file is valid (checked by the docker client; there is no engine here)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose() is None, reason="no docker compose client on this machine")
def test_compose_file_is_accepted():
    result = subprocess.run([*_compose(), "config"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for service in ("postgres:", "redis:", "minio:", "api:", "worker:"):
        assert service in result.stdout
    # No volume shared by the API and workers: blobs live in the object store.
    assert "COMPACTOR_STORAGE_URL: s3://" in result.stdout and "COMPACTOR_STORAGE_DIR" not in result.stdout
    volumes = result.stdout.split("\nvolumes:", 1)[1]
    assert "blobs:" not in volumes
    assert "capabilities:" in result.stdout and "gpu" in result.stdout


def test_dockerfile_builds_an_api_image_without_torch():
    text = (ROOT / "Dockerfile").read_text()
    api_stage = text.split("FROM base AS api\n")[1].split("FROM ")[0]
    assert "worker-deps" not in api_stage and "AS worker" in text
