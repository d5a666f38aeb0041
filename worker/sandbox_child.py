"""The first code a model's process runs: fence itself in, then call the job's function.

Started by `worker.isolation` as `python -I -m worker.sandbox_child FD`. It reads one JSON request
from the socket FD, applies rlimits and Landlock before anything of the job is imported or loaded,
calls the target and answers in JSON lines: progress messages, then one result or one error. JSON,
never pickle: the parent must not execute what a hostile child might write into the channel.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import socket
import sys
import threading

from worker import landlock
from worker.errors import describe_error

_landlock_abi = 0  # what main() applied, for probe() to report


class Channel:
    """JSON lines over the socket the parent passed (thread-safe: engines may emit from threads)."""

    def __init__(self, fd: int):
        self._socket = socket.socket(fileno=fd)
        self._reader = self._socket.makefile("rb")
        self._lock = threading.Lock()

    def receive(self) -> dict:
        return json.loads(self._reader.readline())

    def send(self, kind: str, payload) -> None:
        line = json.dumps({"kind": kind, "payload": payload}, default=_plain, allow_nan=True) + "\n"
        with self._lock:
            self._socket.sendall(line.encode())


def apply_limits(limits: dict) -> None:
    """rlimits for everything this process and its children do; hard limits, so nothing raises them."""
    for name, value in limits.items():
        if value is not None:
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))


def probe(emit) -> dict:
    """What the walls look like from inside (the worker's start-up check and the tests read it)."""
    return {
        "uid": os.getuid(),
        "landlock_abi": _landlock_abi,
        "environment": sorted(os.environ),
        "root": sorted(os.listdir("/")),
    }


def main(argv: list[str]) -> int:
    global _landlock_abi
    channel = Channel(int(argv[1]))
    request = channel.receive()
    try:
        apply_limits(request["limits"])
        if request.get("landlock"):
            _landlock_abi = landlock.restrict_self(request["writable"])
        sys.path[:0] = request.get("sys_path", [])
        module_name, function_name = request["target"].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        result = function(emit=lambda message: channel.send("progress", message), **request["kwargs"])
        channel.send("result", result)
    except BaseException as exc:
        channel.send("error", describe_error(exc))
    return 0


def _plain(value):
    """numpy and torch scalars and arrays as plain JSON values; anything else as its text."""
    for method in ("item", "tolist"):
        if hasattr(value, method):
            try:
                return getattr(value, method)()
            except (TypeError, ValueError, RuntimeError):
                continue
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


if __name__ == "__main__":
    # Run as the imported module, not as __main__, so `probe` (imported by name) sees main's state.
    from worker import sandbox_child

    code = sandbox_child.main(sys.argv)
    # All the parent takes is sent and every output file closed: skip the interpreter's teardown of
    # torch's modules, over a second of every job's (benchmarks/tiny_job_cost.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
