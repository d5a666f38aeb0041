"""The child-process boundary: a crash, a hang or a memory blow-up becomes a coded failure and the
calling (worker) process lives on; cancellation kills the child."""

from __future__ import annotations

import pytest

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


def test_cancel_kills_the_child():
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:hang", {}, Limits(60), on_progress=lambda m: False)
    assert info.value.code == "canceled"
