"""Shared set-up for service benchmarks: real Postgres, Redis and server subprocesses."""

from __future__ import annotations

import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.servers import REDIS_URL, Service, postgres_database, s3_endpoint, service_env  # noqa: E402


def tiny_model_bytes() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.rand(1, 4)), buffer)
    return buffer.getvalue()


__all__ = ["REDIS_URL", "Service", "postgres_database", "s3_endpoint", "service_env", "tiny_model_bytes", "ROOT"]
