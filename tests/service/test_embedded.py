"""The embedded default: `compactor serve` on SQLite, a SQLite broker and local files (no Postgres,
no Redis), driven by the README's own curl walkthrough."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from tests import zoo
from tests.service.servers import ROOT, free_port, stop_process, wait_until_up


def _walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash walkthrough\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README.md must hold exactly one walkthrough block"
    return blocks[0]


def test_readme_walkthrough_against_compactor_serve(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env.update({"COMPACTOR_DATA_DIR": str(tmp_path / "var"), "PYTHONUNBUFFERED": "1"})
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", serve, tmp_path / "serve.log")
        original = zoo.trace(zoo.SequentialCNN(), torch.rand(2, 1, 32, 32))
        torch.jit.save(original, str(tmp_path / "model.pt"))
        x, y, _, _ = zoo.digits()
        np.savez(tmp_path / "digits.npz", input=x[:32].numpy(), label=y[:32].numpy())
        try:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", _walkthrough()],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
                env={**env, "BASE": f"http://127.0.0.1:{port}"},
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(
                f"the walkthrough did not finish: {exc.stderr!r}\n"
                + (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            )
        assert result.returncode == 0, result.stderr + (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
        job_id = re.search(r"job ([0-9a-f-]+): succeeded", result.stdout).group(1)
        base = f"http://127.0.0.1:{port}"
        # the embedded worker's node name is the job's worker; the SQLite broker cannot list workers
        assert re.fullmatch(r"compactor-\d+@.+", httpx.get(f"{base}/v1/jobs/{job_id}").json()["worker"])
        assert httpx.get(f"{base}/v1/workers").json()["complete"] is False
        # curl -N followed the job's events to the end: the last one is its final state
        events = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("data:")]
        assert events and events[-1]["status"] == "succeeded", result.stdout
        # a speed-up whose interval includes 1.0 (a busy host) is worded as none
        headline = r"([\d.]+× (faster|slower)|no clear speed-up) at batch 8.*, [\d.]+× smaller"
        assert re.search(headline, result.stdout), result.stdout
        compressed = torch.jit.load(str(tmp_path / "compressed.pt"))
        with torch.inference_mode():
            assert torch.nn.functional.cosine_similarity(compressed(x[:8]), original(x[:8])).min() > 0.99
        assert "<html" in (tmp_path / "report.html").read_text().lower()
        assert (tmp_path / "var" / "compactor.sqlite").exists() and (tmp_path / "var" / "broker.sqlite").exists()
    finally:
        stop_process(serve)


def test_serve_takes_its_embedded_worker_down_with_it(tmp_path):
    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPACTOR_")}
    env["COMPACTOR_DATA_DIR"] = str(tmp_path / "var")
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_up(f"http://127.0.0.1:{port}", serve, tmp_path / "none.log")
    children = psutil.Process(serve.pid).children()
    assert any("celery" in " ".join(c.cmdline()) for c in children)
    serve.terminate()
    serve.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
