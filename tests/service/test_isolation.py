"""The child-process boundary: a crash, a hang or a memory blow-up becomes a coded failure and the
calling (worker) process lives on; cancellation kills the child."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from worker import isolation
from worker.cgroup import oom_kills
from worker.isolation import IsolatedFailure, Limits, run_isolated


def test_result_and_progress_come_back():
    seen = []
    assert (
        run_isolated("tests.service.crashers:add", {"a": 2, "b": 3}, Limits(60), lambda m: seen.append(m) or True) == 5
    )
    assert seen == [{"stage": "adding"}]


def test_segfault_is_model_crashed():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:segfault", {}, Limits(60))
    assert info.value.code == "model_crashed" and "segmentation fault" in info.value.message


def test_hang_is_timeout():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:hang", {}, Limits(3))
    assert info.value.code == "timeout"


def test_memory_limit_is_out_of_memory():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:allocate", {"gib": 8}, Limits(60, memory_bytes=3 * 1024**3))
    assert info.value.code == "out_of_memory", info.value.message
    assert "limit of 3.0 GiB" in info.value.message and "COMPACTOR_JOB_MEMORY_LIMIT_BYTES" in info.value.message


def _signal_the_child(sig: int) -> IsolatedFailure:
    """Run a hanging child with no memory limit and send `sig` to the model's process, as an
    operator (or a supervisor) would; the failure it ends with."""
    caught = {}

    def run() -> None:
        try:
            run_isolated("tests.service.crashers:hang", {}, Limits(60))
        except IsolatedFailure as failure:
            caught["failure"] = failure

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    model = None
    while model is None and time.monotonic() < deadline:
        model = next(
            (
                p
                for p in psutil.Process().children(recursive=True)
                if "worker.sandbox_child" in " ".join(p.cmdline()) and "bwrap" not in p.name()
            ),
            None,
        )
        time.sleep(0.1)
    assert model is not None, "the model's process did not start"
    time.sleep(1.0)  # it is spinning in the model's code now
    model.send_signal(sig)
    thread.join(30)
    return caught["failure"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_signal_from_outside_is_killed_not_out_of_memory(sig):
    failure = _signal_the_child(sig)
    assert failure.code == "killed", failure.message
    assert signal.Signals(sig).name in failure.message


def test_sigkill_by_the_oom_killer_is_out_of_memory(monkeypatch):
    """The OOM killer is not set off here (it would take the shared machine's memory); the count it
    leaves in the memory cgroup is what tells it apart, so a count that rose is what this plays."""
    counts = iter([5, 6])
    monkeypatch.setattr(isolation, "oom_kills", lambda: next(counts))
    assert _signal_the_child(signal.SIGKILL).code == "out_of_memory"


def test_oom_kills_are_read_from_cgroup_v2_and_v1(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/jobs/worker\n")
    (root / "jobs" / "worker").mkdir(parents=True)
    (root / "jobs" / "worker" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert oom_kills(proc, root) == 2
    (proc / "cgroup").write_text("4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 7\n")
    assert oom_kills(proc, root) == 7
    assert oom_kills(tmp_path / "nowhere", root) is None
    assert isinstance(oom_kills(), int | None)


def test_the_services_own_error_is_internal_error_with_its_traceback():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:service_bug", {}, Limits(60))
    assert info.value.code == "internal_error", info.value.message
    assert "not your model" in info.value.message and "KeyError" in info.value.message
    assert "service_bug" in info.value.traceback and "Traceback" in info.value.traceback


def test_the_models_own_raise_is_model_error():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:scripted_raise", {}, Limits(60))
    assert info.value.code == "model_error", info.value.message
    assert "this model refuses" in info.value.message and info.value.traceback is None


def test_cancel_kills_the_child():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:hang", {}, Limits(60), on_progress=lambda m: False)
    assert info.value.code == "canceled"
