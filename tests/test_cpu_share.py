"""A worker's CPU share: affinity capped by the cgroup quota, divided by its job slots."""

from __future__ import annotations

import os

from worker import cpu_share


def _cgroup(tmp_path, lines: str):
    proc = tmp_path / "cgroup"
    proc.write_text(lines)
    return proc


def test_a_cgroup_v2_quota_on_any_level_caps_the_affinity(tmp_path):
    root = tmp_path / "fs"
    (root / "jobs" / "w1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "jobs" / "cpu.max").write_text("150000 100000\n")
    (root / "jobs" / "w1" / "cpu.max").write_text("max 100000\n")
    cores = cpu_share.usable_cores(root, _cgroup(tmp_path, "0::/jobs/w1\n"))
    assert cores == min(1.5, len(os.sched_getaffinity(0)))


def test_a_cgroup_v1_quota_and_no_quota(tmp_path):
    root = tmp_path / "fs"
    (root / "cpu" / "w").mkdir(parents=True)
    (root / "cpu" / "w" / "cpu.cfs_quota_us").write_text("50000\n")
    (root / "cpu" / "w" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_share.usable_cores(root, _cgroup(tmp_path, "3:cpu:/w\n")) == 0.5
    (root / "cpu" / "w" / "cpu.cfs_quota_us").write_text("-1\n")
    affinity = len(os.sched_getaffinity(0))
    assert cpu_share.usable_cores(root, _cgroup(tmp_path, "3:cpu:/w\n")) == affinity


def test_threads_are_the_share_of_the_slots_or_the_override(monkeypatch):
    monkeypatch.setattr(cpu_share, "usable_cores", lambda: 8.0)
    assert cpu_share.cpu_share(3).threads == 2
    assert cpu_share.cpu_share(16).threads == 1
    share = cpu_share.cpu_share(2, override=5)
    assert share.threads == 5 and share.source == "COMPACTOR_WORKER_THREADS"
    assert share.describe()["usable_cores"] == 8.0
