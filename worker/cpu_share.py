"""A worker's share of the host's CPUs: the cores its process may use, divided by its job slots.

Torch's default (one intra-op thread per core of the host) oversubscribes as soon as two jobs, two
workers or any other load share a host, and every timing then measures the scheduler. The cores a
process may use are its CPU affinity, capped by its cgroup's CPU quota (`cpu.max` in cgroup v2,
`cpu.cfs_quota_us` in v1), never the host's count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuShare:
    """What one job may use: `threads` intra-op threads, out of `usable_cores` for `slots` jobs."""

    usable_cores: float
    slots: int
    threads: int
    source: str  # "share" (usable cores / slots) or "COMPACTOR_WORKER_THREADS"

    def describe(self) -> dict:
        return {
            "usable_cores": self.usable_cores,
            "job_slots": self.slots,
            "threads": self.threads,
            "threads_from": self.source,
        }


def usable_cores(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float:
    """The CPUs this process may run on: its affinity, capped by the strictest cgroup CPU quota on
    its cgroup's path (a quota of 1.5 CPUs gives 1.5).

    Example:
        usable_cores()  # 2.0 under `taskset -c 0,1`, 0.5 in a container with `--cpus 0.5`
    """
    cores = float(len(os.sched_getaffinity(0)))
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    return min(cores, quota) if quota is not None else cores


def cpu_share(slots: int, override: int | None = None) -> CpuShare:
    """Intra-op threads for one of `slots` concurrent jobs: usable cores / slots (at least 1),
    or `override` (COMPACTOR_WORKER_THREADS) when set.

    Example:
        cpu_share(slots=2).threads  # 4 on an 8-core affinity mask
    """
    cores = usable_cores()
    slots = max(int(slots), 1)
    if override is not None:
        return CpuShare(cores, slots, max(int(override), 1), "COMPACTOR_WORKER_THREADS")
    return CpuShare(cores, slots, max(math.floor(cores / slots), 1), "share")


def _cgroup_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2: cpu.max on every level up to the root
            quotas += _walk_up(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            for mount in (cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                if mount.is_dir():
                    quotas += _walk_up(mount, path, _v1_quota)
                    break
    return min(quotas) if quotas else None


def _walk_up(mount: Path, path: str, read) -> list[float]:
    found = []
    directory = mount / path.lstrip("/")
    while True:
        quota = read(directory)
        if quota is not None:
            found.append(quota)
        if directory == mount or mount not in directory.parents:
            return found
        directory = directory.parent


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period
