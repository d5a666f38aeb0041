"""The device kind a worker serves (cpu or cuda): declared by COMPACTOR_WORKER_DEVICE, or probed.

The probe runs torch in a child process, so the Celery parent never imports torch or starts CUDA.
"""

from __future__ import annotations

import glob
import subprocess
import sys

from app.queue import CPU, CUDA, DEVICE_KINDS


def device_kind(worker_device: str) -> str:
    """`worker_device` when it names a kind ('cpu', 'cuda': an operator's declaration, trusted);
    for 'auto', cuda when torch here sees a GPU."""
    if worker_device in DEVICE_KINDS:
        return worker_device
    if not glob.glob("/dev/nvidia[0-9]*"):
        return CPU  # no NVIDIA device node: no CUDA, and no torch import to find that out
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return CUDA if probe.stdout.strip() == "True" else CPU
