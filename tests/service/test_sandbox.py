"""The sandbox's walls, probed from inside by Python code (more than a TorchScript model can do):
no service files, no environment, no network, no writes outside the job, bounded threads, rlimits,
Landlock as a second wall, and checked outputs."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.settings import get_settings
from worker.isolation import IsolatedFailure, Limits, check_sandbox, job_limits, run_isolated
from worker.sandbox import JobDir, OutputRejected, Sandbox, SandboxUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _run(target: str, **kwargs):
    limits = dataclasses.replace(job_limits(60), memory_bytes=2 * 1024**3)
    return run_isolated(f"tests.service.crashers:{target}", kwargs, limits)


# The stand-ins for a hostile model are plain Python in the child, so a wall's refusal reads as the
# service's own error; a real model's, raised inside its TorchScript, is model_error (test_hostile_models).
STAND_IN_ERROR = "internal_error"


def _refused(target: str, **kwargs) -> IsolatedFailure:
    with pytest.raises(IsolatedFailure) as info:
        _run(target, **kwargs)
    assert info.value.code == STAND_IN_ERROR, info.value.message
    return info.value


def test_the_child_sees_no_service_files(tmp_path):
    secret = tmp_path / "secret.env"
    secret.write_text("COMPACTOR_API_KEYS=hunter2\n")
    for path in (secret, "/etc/passwd", get_settings().data_dir / "compactor.sqlite", ROOT / "pyproject.toml"):
        failure = _refused("read_bytes", path=str(path))
        assert "hunter2" not in failure.message and "root:x:0" not in failure.message
    seen = check_sandbox()
    # The checkout and the interpreter may live anywhere (CI clones elsewhere): their top directory
    # is bound, read-only, for the code; nothing else of the host's tree may show.
    code_tops = {Path(p).resolve().parts[1] for p in (ROOT, sys.prefix, sys.base_prefix)}
    assert set(seen["root"]) <= {
        "bin",
        "dev",
        "etc",
        "job",
        "lib",
        "lib32",
        "lib64",
        "proc",
        "sbin",
        "sys",
        "tmp",
        "usr",
        *code_tops,
    }


def test_the_child_inherits_no_environment(monkeypatch):
    monkeypatch.setenv("COMPACTOR_DATABASE_URL", "postgresql://user:hunter2@db/compactor")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    names = check_sandbox()["environment"]
    assert not [n for n in names if n.startswith(("COMPACTOR_DATABASE", "AWS_"))], names
    # bubblewrap is PID 1 inside: its environment is refused to the child, and holds none of these anyway.
    try:
        assert "hunter2" not in _run("read_bytes", path="/proc/1/environ")
    except IsolatedFailure as failure:
        assert "Permission denied" in failure.message


def test_the_child_has_no_network():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        failure = _refused("connect", host="127.0.0.1", port=listener.getsockname()[1])
        assert "OSError" in failure.message or "Error" in failure.message
    finally:
        listener.close()


def test_writes_outside_the_job_go_nowhere(tmp_path):
    for target in (
        tmp_path / f"escape-{uuid.uuid4().hex}",
        Path("/tmp") / f"escape-{uuid.uuid4().hex}",
        get_settings().data_dir / "blobs" / "planted",
    ):
        try:
            _run("write_file", path=str(target))  # /tmp inside is the job's own temp dir
        except IsolatedFailure as failure:
            assert failure.code == STAND_IN_ERROR, failure.message
        assert not target.exists()


def test_limits_are_set_inside():
    text = _run("limits")
    rows = {line[:26].strip(): line[26:].split() for line in text.splitlines()[1:]}
    settings = get_settings()
    assert rows["Max processes"][:2] == [str(settings.sandbox_max_processes)] * 2
    assert rows["Max file size"][:2] == [str(settings.sandbox_max_output_bytes)] * 2
    assert rows["Max core file size"][:2] == ["0", "0"]
    assert rows["Max address space"][:2] == [str(2 * 1024**3)] * 2
    assert rows["Max open files"][:2] == ["4096", "4096"]


def test_a_thread_bomb_is_bounded_by_the_address_space_limit():
    # Each thread reserves its stack in the address space: 2 GiB holds a few hundred, never 5,000.
    assert _run("start_threads", cap=5000) < 1000


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="Linux does not apply RLIMIT_NPROC to uid 0; the images run workers as uid 10001, where this holds",
)
def test_a_fork_bomb_is_bounded_by_the_process_limit(monkeypatch):
    monkeypatch.setenv("COMPACTOR_SANDBOX_MAX_PROCESSES", "64")
    get_settings.cache_clear()
    try:
        assert run_isolated("tests.service.crashers:fork_children", {"cap": 1000}, job_limits(60)) < 64
    finally:
        get_settings.cache_clear()


def test_landlock_alone_refuses_writes_and_tcp(tmp_path):
    """The second wall, without the first: a plain process restricted by worker.landlock."""
    allowed, denied = tmp_path / "allowed", tmp_path / "denied"
    allowed.mkdir()
    denied.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    code = f"""
import socket, sys
from worker import landlock
abi = landlock.restrict_self([{str(allowed)!r}])
open({str(allowed / "ok")!r}, 'w').write('ok')
try:
    open({str(denied / "no")!r}, 'w').write('no'); print('wrote')
except PermissionError:
    print('write refused')
try:
    socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2); print('connected')
except PermissionError:
    print('connect refused')
print('abi', abi)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
    assert out.returncode == 0, out.stderr
    abi = int(out.stdout.split("abi")[-1])
    if abi == 0:
        pytest.skip("this kernel has no Landlock")
    assert "write refused" in out.stdout and (allowed / "ok").exists() and not (denied / "no").exists()
    if abi >= 4:
        assert "connect refused" in out.stdout


def test_outputs_are_checked_before_they_are_taken(tmp_path):
    job = JobDir.create(tmp_path, "job-", Sandbox(True))
    (job.root / "out" / "model.pt").write_bytes(b"x")
    assert job.output_file("/job/out/model.pt") == (job.root / "out" / "model.pt").resolve()
    (job.root / "out" / "link.pt").symlink_to("/etc/passwd")
    (job.root / "out" / "dir.pt").mkdir()
    for bad in (
        "/job/out/link.pt",
        "/job/out/dir.pt",
        "/job/out/../../etc/passwd",
        "/job/out//etc/passwd",
        "/etc/passwd",
        "/job/tmp/x",
        None,
    ):
        with pytest.raises(OutputRejected):
            job.output_file(bad)


def test_the_sandbox_refuses_to_expose_the_data_dir(tmp_path):
    from worker.sandbox import package_dir

    job = JobDir.create(tmp_path, "job-", Sandbox(True))
    inside_code = package_dir("worker") / "var"
    with pytest.raises(SandboxUnavailable, match="would expose"):
        Sandbox(True, forbidden=[inside_code]).command(job, ["true"])


def test_without_bubblewrap_a_run_fails_with_the_reason(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(IsolatedFailure) as info:
        check_sandbox()
    assert info.value.code == "sandbox_unavailable" and "COMPACTOR_SANDBOX=off" in info.value.message


def test_a_child_that_floods_its_output_is_stopped(tmp_path):
    with pytest.raises(IsolatedFailure) as info:
        run_isolated("tests.service.crashers:fill_disk", {"mib": 64}, Limits(60, output_bytes=16 * 1024**2))
    assert info.value.code == "output_too_large", info.value.message
