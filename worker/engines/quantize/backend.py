"""Which int8 kernel library the worker's CPU gets (x86/fbgemm or qnnpack) and how to use it."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def int8_backend() -> str:
    """The quantized engine for this CPU: `x86` (fbgemm + onednn) on x86-64, `qnnpack` on ARM.

    Example:
        with quantized_engine(int8_backend()):
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
    """
    supported = torch.backends.quantized.supported_engines
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        preferred = ("qnnpack",)
    else:
        preferred = ("x86", "fbgemm")
    for engine in preferred + ("qnnpack", "fbgemm", "x86"):
        if engine in supported:
            return engine
    raise RuntimeError(f"this torch build has no int8 CPU engine (supported: {supported})")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def activation_reduce_range(backend: str) -> bool:
    """Whether activations must use 7 bits to avoid int16 overflow in the int8 dot product.

    fbgemm on x86 without VNNI sums pairs of u8×s8 products in int16 (`vpmaddubsw`), which can
    saturate with full-range activations; VNNI/AMX accumulate in int32, and qnnpack never overflows.
    """
    if backend == "qnnpack":
        return False
    return not (cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), the only case bf16 can be faster on CPU."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Select torch's quantized engine for the block, restoring the previous one afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
