"""Architecture rules that keep the service light and the engines reusable."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_importing_the_api_never_imports_torch():
    code = "import sys, app.main, app.cli, app.queue, worker.celery_app, worker.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_engines_import_no_web_database_or_queue_library():
    forbidden = re.compile(r"^\s*(import|from)\s+(fastapi|starlette|sqlalchemy|celery|kombu|app)\b", re.M)
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "worker" / "engines").rglob("*.py") if forbidden.search(p.read_text())
    ]
    assert offenders == []


def test_importing_an_engine_does_not_start_cuda():
    code = "import torch, worker.engines.pipeline as p; p._load_engines(); print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_app_never_imports_worker():
    """`worker` depends on `app`, never the reverse: the API sends tasks by name."""
    forbidden = re.compile(r"^\s*(import|from)\s+worker\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "app").rglob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []


def test_the_model_process_imports_only_worker_modules_and_the_engines():
    """What the sandboxed child runs imports nothing of the service (`app`): the sandbox does not
    even show it that code."""
    code = (
        "import sys, worker.sandbox_child, worker.runner, worker.validation, worker.engines.pipeline as p; "
        "p._load_engines(); print(sorted({m.split('.')[0] for m in sys.modules} & {'app', 'fastapi', "
        "'sqlalchemy', 'celery', 'pydantic'}))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
