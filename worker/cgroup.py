"""The kernel's count of OOM kills in this process's memory cgroup (v2 or v1), so that a job's
process killed by SIGKILL can be told apart: the OOM killer, or a signal from outside."""

from __future__ import annotations

from pathlib import Path


def oom_kills(proc_self: Path = Path("/proc/self"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """OOM kills the kernel has counted in this process's memory cgroup; None where it cannot be read.

    A child process stays in its parent's cgroup (bubblewrap's cgroup namespace changes only what
    it sees), so a kill of it counts here. v2 counts its descendants too (`memory.events`); v1
    counts the cgroup itself (`memory.oom_control`).
    """
    try:
        lines = (proc_self / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = cgroup_root / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):
            candidate = cgroup_root / "memory" / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        count = _field(candidate, "oom_kill")
        if count is not None:
            return count
    return None


def _field(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return None
    return None
