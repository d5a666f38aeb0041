"""The walls around every process that loads or runs an uploaded model, and the job directory it sees.

A TorchScript file is a program: `torch.from_file` in `forward` or in a scripted `__setstate__`
reads and writes any path the process can reach. So the child runs under bubblewrap (the sandbox
Flatpak uses) in fresh user, mount, PID, network, IPC, UTS and cgroup namespaces, with every
capability dropped and `no_new_privs` set. It sees, read-only, only the Python environment, the
system libraries and the project's own packages; a private `/job` holding copies of this job's
inputs and one writable output directory; its own `/proc`, a minimal `/dev`, no network and no
environment variables of the service. Landlock (`worker.landlock`) is the second wall inside it.

bubblewrap rather than hand-written `unshare` calls: it is small, audited and packaged everywhere,
it handles the ordering traps (pivot_root, locked read-only mounts, a reaper as PID 1, dying with
its parent), and the same binary works from a plain user account as from root.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

INSIDE = "/job"
# Environment variables a sandboxed child may inherit: thread and CPU-kernel knobs that change how
# torch computes, never anything naming a server, a path or a secret of the service.
PASSED_ENVIRONMENT = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "PYTORCH_CUDA_ALLOC_CONF",
)
# Packages whose code the child imports (besides the call's own target package).
CHILD_PACKAGES = ("worker",)  # the child imports only worker modules and the engines
_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin")
# What libc and the dynamic loader read from /etc; nothing else of it (no passwd, no hosts, no ssl).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
MAX_ENTRIES = 10_000  # files and directories a job may write
LOCK_NAME = ".attempt.lock"
# A directory without its lock yet is being made (or its maker died in those microseconds).
UNLOCKED_GRACE_S = 300.0


class SandboxUnavailable(Exception):
    """The sandbox cannot start here; `reason` says why and what to do."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OutputRejected(Exception):
    """A file the child named as its output is not one the parent will take."""


@dataclass
class JobDir:
    """A job's private directory: `in/` (copies of its inputs), `out/` (what it writes), `tmp/`.

    Paths handed to the child are the paths it sees: under `/job` in the sandbox, the host paths
    when the sandbox is off. The attempt that made it holds a lock on it (`LOCK_NAME`) for as long as
    it lives: the kernel drops the lock when that process dies however it dies, so any worker can
    tell a dead attempt's directory from a live one (`remove_abandoned`) without knowing who made it.
    """

    root: Path
    sandbox: Sandbox
    _lock: int | None = field(default=None, repr=False)

    @classmethod
    def create(cls, parent: Path, prefix: str, sandbox: Sandbox) -> JobDir:
        Path(parent).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        # Locked under another name, then renamed: a sweeper never sees the lock file unlocked.
        fd = os.open(root / f"{LOCK_NAME}.new", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(root / f"{LOCK_NAME}.new", root / LOCK_NAME)
        for name in ("in", "out", "tmp"):
            (root / name).mkdir()
        return cls(root, sandbox, fd)

    @property
    def sandboxed(self) -> bool:
        return self.sandbox.enabled

    @property
    def log_path(self) -> Path:
        """The child's stdout and stderr (a model's `print` lands here, never in a response)."""
        return self.root / "child.log"

    def inside(self, name: str) -> str:
        """The path the child sees for `in/…`, `out/…` or `tmp/…` of this job."""
        return f"{INSIDE}/{name}" if self.sandboxed else str(self.root / name)

    def add_input(self, name: str, source: Path) -> str:
        """Copy `source` into `in/` (the child never sees the blob store) and return its inside path."""
        target = self.root / "in" / name
        shutil.copyfile(source, target)
        os.chmod(target, 0o444)
        return self.inside(f"in/{name}")

    def output_file(self, inside_path: str) -> Path:
        """The host path of a file the child names as its output, once checked: something it wrote
        to `out/`, or one of the inputs (a profile-only job's artifact is the uploaded model).

        Raises:
            OutputRejected: the path leaves `out/` and `in/`, is a link, or is not a regular file.
        """
        for area in ("out", "in"):
            prefix = self.inside(area) + "/"
            if isinstance(inside_path, str) and inside_path.startswith(prefix):
                relative = inside_path[len(prefix) :]
                base = (self.root / area).resolve()
                break
        else:
            raise OutputRejected("the output is not in the job's directory")
        host = base / relative
        # resolve() catches a '..' or a link on the way; is_relative_to an absolute `relative`.
        if host.resolve() != host or not host.is_relative_to(base):
            raise OutputRejected("the output path leaves the job's directory")
        if not stat.S_ISREG(os.lstat(host).st_mode):
            raise OutputRejected("the output is not a regular file")
        return host

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) written by the child: `out/`, `tmp/` and its log."""
        total, entries = 0, 0
        stack = [self.root / "out", self.root / "tmp"]
        try:
            total += os.lstat(self.log_path).st_size
        except FileNotFoundError:
            pass
        while stack and entries <= MAX_ENTRIES:
            try:
                with os.scandir(stack.pop()) as listing:
                    for entry in listing:
                        entries += 1
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
        return total, entries

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_abandoned(parent: Path) -> list[Path]:
    """Delete the job directories under `parent` whose attempt no longer lives; returns them.

    An attempt's process holds its directory's lock until it removes the directory, so a lock that
    can be taken belongs to an attempt that died (a worker killed mid-job). Called when a worker
    starts and by every sweep.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        root = Path(entry.path)
        try:
            fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                young = time.time() - entry.stat(follow_symlinks=False).st_mtime < UNLOCKED_GRACE_S
            except FileNotFoundError:
                continue
            if not young:
                shutil.rmtree(root, ignore_errors=True)
                removed.append(root)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live attempt's
            continue
        try:
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


class Sandbox:
    """Builds the command that runs a child inside the walls (or plainly, when turned off)."""

    def __init__(self, enabled: bool, device: str = "auto", forbidden: Iterable[Path] = ()):
        self.enabled = enabled
        self.device = device
        self.forbidden = [Path(p).resolve() for p in forbidden]

    def describe(self) -> dict:
        """What a report shows about how the model ran."""
        if not self.enabled:
            return {"mode": "off", "note": "COMPACTOR_SANDBOX=off: uploaded models ran as the worker's own user"}
        return {"mode": "bubblewrap", "namespaces": ["user", "mount", "pid", "network", "ipc", "uts", "cgroup"]}

    def environment(self, job: JobDir) -> dict[str, str]:
        """The whole environment of the child (and of bubblewrap itself, PID 1 inside): no setting,
        path or secret of the service's, even with the sandbox off."""
        env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
        tmp = "/tmp" if self.enabled else job.inside("tmp")
        env.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            HOME=tmp,
            TMPDIR=tmp,
            LANG="C.UTF-8",
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def command(self, job: JobDir, argv: list[str], packages: Iterable[str] = ()) -> list[str]:
        """`argv` wrapped in bubblewrap, seeing only what this job needs; `argv` itself when off."""
        if not self.enabled:
            return argv
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable(
                "bubblewrap (bwrap) is not installed: install the 'bubblewrap' package, "
                "or set COMPACTOR_SANDBOX=off to run uploaded models unsandboxed"
            )
        command = [
            bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--hostname",
            "sandbox",
        ]
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                command += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                command += ["--ro-bind", path, path]
        for path in _ETC_FILES:
            command += ["--ro-bind-try", path, path]
        for path in self._code_paths(packages):
            command += ["--ro-bind", str(path), str(path)]
        command += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            # CPU topology only: torch's cpuinfo reads it to size its thread pools.
            "--ro-bind-try",
            "/sys/devices/system/cpu",
            "/sys/devices/system/cpu",
        ]
        command += self._gpu_devices()
        command += [
            "--dir",
            INSIDE,
            "--ro-bind",
            str(job.root / "in"),
            f"{INSIDE}/in",
            "--bind",
            str(job.root / "out"),
            f"{INSIDE}/out",
            "--bind",
            str(job.root / "tmp"),
            "/tmp",
            "--chdir",
            f"{INSIDE}/out",
        ]
        for name, value in self.environment(job).items():
            command += ["--setenv", name, value]
        return command + ["--"] + argv

    def writable(self, job: JobDir) -> list[str]:
        """The only directories the child may write (Landlock's rules)."""
        return [job.inside("out"), "/tmp" if self.enabled else job.inside("tmp")]

    def _code_paths(self, packages: Iterable[str]) -> list[Path]:
        """Interpreter, environment and package directories, after checking none holds service data."""
        paths = {
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
            Path(sys.executable).resolve().parent.parent,
        }
        for name in (*CHILD_PACKAGES, *packages):
            paths.add(package_dir(name))
        paths = {
            p
            for p in paths
            if not any(p.is_relative_to(s) for s in _SYSTEM_DIRS if os.path.isdir(s) and not os.path.islink(s))
        }
        for path in paths:
            for secret in self.forbidden:
                if secret.is_relative_to(path):
                    raise SandboxUnavailable(
                        f"the sandbox would expose {secret} (it lies inside {path}, which the "
                        "child must read); move the data directory out of the code and "
                        "Python environment"
                    )
        return sorted(paths)

    def _gpu_devices(self) -> list[str]:
        """NVIDIA device nodes for a GPU worker: the devices, nothing else of /dev."""
        if self.device == "cpu":
            return []
        nodes = gpu_device_nodes()
        args = []
        for node in nodes:
            args += ["--dev-bind", node, node]
        if nodes:
            args += [
                "--ro-bind-try",
                "/proc/driver/nvidia",
                "/proc/driver/nvidia",
                "--ro-bind-try",
                "/sys/bus/pci",
                "/sys/bus/pci",
                "--ro-bind-try",
                "/sys/devices",
                "/sys/devices",
            ]
        return args


def gpu_device_nodes() -> list[str]:
    """The NVIDIA device nodes of this host (what a GPU job is given)."""
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


def package_dir(name: str) -> Path:
    """The directory of a top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SandboxUnavailable(f"cannot find the package {name!r} to give the sandbox")
    return Path(list(spec.submodule_search_locations)[0]).resolve()
