"""Peak memory of one inference: CUDA peak allocation in process, CPU resident growth in isolation.

On CPU the allocator reuses whatever earlier models freed, so resident growth inside the worker
says little; a process that has never loaded a model loads the saved file and runs the batch, and
its peak anonymous resident memory above what it held before loading is the figure. That process
is a fork of a `CleanFork` (a copy of the job's process taken before it loaded any model, with
torch already imported) when the caller made one, else a fresh interpreter, which costs a torch
import (seconds) per model measured.
"""

from __future__ import annotations

import json
import os
import select
import signal
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


class CleanFork:
    """A copy of this process, forked before it loads any model, that forks one memory probe per
    model on request: each probe starts with torch imported and no model's memory behind it, as a
    fresh interpreter would, without paying for the import.

    Make it while the process is still single-threaded and has loaded no model (the job's start);
    close it when done. Linux only.

    Example:
        with CleanFork() as clean:
            ...  # load and compress models
            cpu_peak_memory({"baseline": Path("model.pt")}, (x,), threads=1, clean=clean)
    """

    def __init__(self):
        requests_read, self._requests = os.pipe()
        self._replies, replies_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the copy: serve until the job's process closes the pipe, never return
            # Nothing else of the job's process (its channel to the worker, files): only the two pipes.
            low, high = sorted((requests_read, replies_write))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, os.sysconf("SC_OPEN_MAX"))
            code = 0
            try:
                _serve_probes(requests_read, replies_write)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(requests_read)
        os.close(replies_write)

    def probe(self, files: dict[str, Path], inputs_path: Path, threads: int, timeout_s: float) -> dict[str, int | None]:
        """`{name: peak growth bytes or None}`, one forked probe per file, all at once."""
        request = {"files": {name: str(path) for name, path in files.items()}, "inputs": str(inputs_path)}
        os.write(self._requests, json.dumps({**request, "threads": threads}).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self._replies], [], [], timeout_s)
            chunk = os.read(self._replies, 1 << 16) if ready else b""
            if not chunk:
                self.close()
                return {name: None for name in files}
            line += chunk
        return json.loads(line)

    def close(self) -> None:
        if self.pid is None:
            return
        os.close(self._requests)
        os.close(self._replies)
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = None

    def __enter__(self) -> CleanFork:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _serve_probes(requests_fd: int, replies_fd: int) -> None:
    with os.fdopen(requests_fd, "rb") as requests:
        for line in requests:
            request = json.loads(line)
            probes = {}
            for name, path in request["files"].items():
                result = f"{request['inputs']}.{len(probes)}.json"
                pid = os.fork()
                if pid == 0:  # the probe: the same code a fresh interpreter runs, its print into `result`
                    code = 1
                    try:
                        with open(result, "w") as out:
                            os.dup2(out.fileno(), 1)
                            sys.argv = ["probe", path, request["inputs"], str(request["threads"])]
                            exec(_CPU_PROBE, {"__name__": "__probe__"})
                            sys.stdout.flush()
                        code = 0
                    finally:
                        os._exit(code)
                probes[name] = (pid, result)
            peaks = {}
            for name, (pid, result) in probes.items():
                _, status = os.waitpid(pid, 0)
                peaks[name] = _peak_from(Path(result).read_text()) if os.waitstatus_to_exitcode(status) == 0 else None
            os.write(replies_fd, json.dumps(peaks).encode() + b"\n")


def cpu_peak_memory(
    files: dict[str, Path], inputs: Sequence[torch.Tensor], threads: int, clean: CleanFork | None = None
) -> dict[str, int | None]:
    """Peak anonymous resident growth (bytes) of loading each file and running it twice on `inputs`.

    Each model runs in its own process that has loaded no other model (all started at once, then
    awaited), so no model's freed memory hides another's: a fork of `clean`, or without it a fresh
    interpreter. Linux only (`/proc/self/status`); a model whose probe fails maps to None.

    Args:
        files: `{name: saved TorchScript file}`.
        inputs: the positional inputs of one batch (CPU tensors).
        threads: intra-op threads for the probe processes.
        clean: a `CleanFork` of this process to fork the probes from (None: fresh interpreters).

    Returns:
        `{name: bytes or None}`.

    Example:
        cpu_peak_memory({"baseline": Path("model.pt")}, (torch.randn(32, 3, 224, 224),), threads=1)
    """
    with tempfile.TemporaryDirectory(prefix="compactor-memory-") as tmp:
        inputs_path = Path(tmp) / "inputs.pt"
        torch.save(tuple(t.cpu() for t in inputs), inputs_path)
        if clean is not None and clean.pid is not None:
            return clean.probe(files, inputs_path, threads, _PROBE_TIMEOUT_S)
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
    return _peak_from(stdout)


def _peak_from(stdout: str) -> int | None:
    try:
        return int(json.loads(stdout.strip().splitlines()[-1])["peak_growth_bytes"])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


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
