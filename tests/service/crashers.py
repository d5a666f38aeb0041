"""Targets for isolation and sandbox tests: child work that crashes, hangs, exhausts memory, succeeds,
or tries to reach past the sandbox."""

import ctypes
import time


def segfault(emit):
    emit({"stage": "about to crash"})
    ctypes.string_at(0)


def hang(emit):
    while True:
        emit({"stage": "spinning"})
        time.sleep(0.05)


def allocate(emit, gib: int):
    import torch

    return torch.empty(gib * 1024**3, dtype=torch.uint8).fill_(1).sum().item()


def add(emit, a, b):
    emit({"stage": "adding"})
    return a + b


def read_bytes(emit, path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read(64).decode(errors="replace")


def write_file(emit, path: str) -> str:
    with open(path, "w") as fh:
        fh.write("escaped")
    return "written"


def connect(emit, host: str, port: int) -> str:
    import socket

    with socket.create_connection((host, port), timeout=2):
        return "connected"


def limits(emit) -> str:
    with open("/proc/self/limits") as fh:
        return fh.read()


def start_threads(emit, cap: int) -> int:
    """Start sleeping threads until the system refuses one or `cap` run; returns how many started."""
    import threading

    stop = threading.Event()
    started = 0
    try:
        while started < cap:
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    stop.set()
    return started


def fork_children(emit, cap: int) -> int:
    """Fork sleeping children until the system refuses one or `cap` run; returns how many started."""
    import os
    import signal

    children = []
    try:
        while len(children) < cap:
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError:
        pass
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return len(children)


def fill_disk(emit, mib: int) -> str:
    """Write `mib` MiB in 1 MiB files to the job's temp directory."""
    import tempfile

    for index in range(mib):
        with open(f"{tempfile.gettempdir()}/fill-{index}", "wb") as fh:
            fh.write(b"\0" * (1 << 20))
        time.sleep(0.02)
    return "filled"


def service_bug(emit):
    """The service's own code failing (not a model's): a plain Python error outside TorchScript."""
    emit({"stage": "measuring"})
    return {"batches": 0}["latency"]


def scripted_raise(emit):
    """A model's own `raise`, inside its TorchScript."""
    import torch

    class Refuses(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > -1.0):
                raise RuntimeError("this model refuses")
            return x

    return torch.jit.script(Refuses())(torch.ones(2)).tolist()
