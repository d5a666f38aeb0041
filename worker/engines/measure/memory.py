"""Peak memory of one inference: CUDA peak allocation in process, CPU resident growth in isolation.

On CPU the allocator reuses whatever earlier models freed, so resident growth inside the worker
says little; a fresh Python process loads the saved file and runs the batch, and its peak
anonymous resident memory above what it held before loading is the figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# Runs in a fresh interpreter: argv = model file, inputs file, threads; prints JSON. The peak
# resident set (VmHWM) also counts library code paged in by the first inference (tens of MB that
# say nothing about the model), so the file-backed and shared pages held at the end are taken off;
# file pages only grow while the process runs, so this never overstates the anonymous peak.
_CPU_PROBE = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[3]))
inputs = torch.load(sys.argv[2])
def status():
    with open("/proc/self/status") as fh:
        rows = (line.split(":", 1) for line in fh)
        return {k: int(v.split()[0]) * 1024 for k, v in rows if k in ("VmHWM", "RssAnon", "RssFile", "RssShmem")}
before = status()
model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
with torch.inference_mode():
    model(*inputs)
    model(*inputs)
after = status()
growth = after["VmHWM"] - after["RssFile"] - after["RssShmem"] - before["RssAnon"]
print(json.dumps({"peak_growth_bytes": max(growth, 0)}))
"""

_PROBE_TIMEOUT_S = 300


def cpu_peak_memory(files: dict[str, Path], inputs: Sequence[torch.Tensor], threads: int) -> dict[str, int | None]:
    """Peak anonymous resident growth (bytes) of loading each file and running it twice on `inputs`.

    Each model runs in its own fresh process (all started at once, then awaited), so no model's
    freed memory hides another's. Linux only (`/proc/self/statm`); a model whose probe fails maps
    to None.

    Args:
        files: `{name: saved TorchScript file}`.
        inputs: the positional inputs of one batch (CPU tensors).
        threads: intra-op threads for the probe processes.

    Returns:
        `{name: bytes or None}`.

    Example:
        cpu_peak_memory({"baseline": Path("model.pt")}, (torch.randn(32, 3, 224, 224),), threads=1)
    """
    with tempfile.TemporaryDirectory(prefix="compactor-memory-") as tmp:
        inputs_path = Path(tmp) / "inputs.pt"
        torch.save(tuple(t.cpu() for t in inputs), inputs_path)
        probes = {
            name: subprocess.Popen(
                [sys.executable, "-c", _CPU_PROBE, str(path), str(inputs_path), str(threads)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for name, path in files.items()
        }
        return {name: _probe_result(probe) for name, probe in probes.items()}


def _probe_result(probe: subprocess.Popen) -> int | None:
    try:
        stdout, _ = probe.communicate(timeout=_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return None
    if probe.returncode != 0:
        return None
    return int(json.loads(stdout.strip().splitlines()[-1])["peak_growth_bytes"])


def cuda_peak_memory(model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device) -> int:
    """Peak CUDA bytes of one inference: the model's own tensors plus the call's peak allocation.

    Other models resident on the same device are excluded (the call's peak is taken above what
    was allocated before it).

    Example:
        cuda_peak_memory(model, (x.cuda(),), torch.device("cuda"))
    """
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(*inputs)
    torch.cuda.synchronize(device)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda)
    return torch.cuda.max_memory_allocated(device) - before + weights
