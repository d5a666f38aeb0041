"""Energy where the hardware has a meter, CPU time everywhere, and never an estimate.

NVML (`nvidia-ml-py`) gives an NVIDIA GPU's energy counter; RAPL (`/sys/class/powercap`) gives a
CPU package's. Both count everything on that device, not this process alone, so they are read
around the timed calls only. Process CPU time over the timed calls is measured on every host.
"""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

NOT_MEASURED = "not measured here"


class EnergyMeter(ABC):
    """A cumulative energy counter in joules (`read()`), named by `source`: RAPL or NVML below."""

    source: str

    @abstractmethod
    def read(self) -> float:
        """Joules counted so far."""


class RaplMeter(EnergyMeter):
    """The sum of the CPU packages' RAPL counters (`intel-rapl:N/energy_uj`), wrap-around handled."""

    source = "RAPL (CPU package, whole package)"

    def __init__(self, zones: list[Path]):
        self._zones = zones
        self._ranges = [int((zone / "max_energy_range_uj").read_text()) for zone in zones]
        self._last = [self._raw(zone) for zone in zones]
        self._total = 0.0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> float:
        for i, zone in enumerate(self._zones):
            now = self._raw(zone)
            self._total += (now - self._last[i]) % self._ranges[i]
            self._last[i] = now
        return self._total / 1e6


class NvmlMeter(EnergyMeter):
    """An NVIDIA GPU's total energy counter (millijoules since the driver loaded)."""

    source = "NVML (whole GPU)"

    def __init__(self, pynvml, handle):
        self._pynvml, self._handle = pynvml, handle

    def read(self) -> float:
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


def energy_meter(device: torch.device, powercap: str = "/sys/class/powercap") -> EnergyMeter | None:
    """The meter for `device` this process can read, or None (then energy is `NOT_MEASURED`)."""
    if device.type == "cuda":
        return _nvml(device)
    zones = [Path(p) for p in sorted(glob.glob(os.path.join(powercap, "intel-rapl:[0-9]*"))) if p.count(":") == 1]
    try:
        meter = RaplMeter(zones) if zones else None
        if meter is not None:
            meter.read()
        return meter
    except (OSError, ValueError):  # present but unreadable (root-only since 2020 on most kernels)
        return None


def _nvml(device: torch.device) -> EnergyMeter | None:
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except pynvml.NVMLError:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        meter = NvmlMeter(pynvml, handle)
        meter.read()
        return meter
    except Exception:  # no driver, no permission, a GPU without the counter (pre-Volta)
        return None


def cpu_seconds() -> float:
    """This process's CPU time (user + system, every thread)."""
    times = os.times()
    return times.user + times.system


def runqueue_wait_s() -> float | None:
    """Seconds this process's threads have waited for a CPU while runnable (`/proc/self/task/*/schedstat`),
    or None where the kernel does not keep scheduler statistics."""
    total = 0
    try:
        for path in glob.glob("/proc/self/task/*/schedstat"):
            try:
                total += int(Path(path).read_text().split()[1])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9
