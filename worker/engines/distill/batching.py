"""Feeding data through models in mini-batches: a batch size that backs off when the device runs
out of memory, and the teacher's outputs (the soft targets), cached when they fit in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from worker.engines.data import ModelData
from worker.engines.distill.outputs import flatten_output
from worker.engines.errors import EngineError

# Teacher outputs larger than this are recomputed per batch instead of being cached.
TEACHER_CACHE_BYTES = 256 * 2**20


class BatchSize:
    """The current batch size, halved whenever a batch does not fit in the device's memory.

    Example:
        size = BatchSize(64, device)
        for idx in size.batches(order, step): ...
    """

    def __init__(self, requested: int, device: torch.device):
        self.value = requested
        self.device = device
        self.backoffs = 0

    def run(self, order: torch.Tensor, step: Callable[[torch.Tensor], None]) -> None:
        """Call `step(indices)` on consecutive slices of `order`; on out-of-memory, halve and retry.

        Args:
            order: sample indices in the order to visit them.
            step: does the work for one batch of indices; it is re-run with fewer samples
                after an out-of-memory error.
        """
        position = 0
        while position < len(order):
            indices = order[position : position + self.value]
            try:
                step(indices)
            except torch.OutOfMemoryError:
                if self.value == 1:
                    raise EngineError("out_of_memory", "a single sample does not fit in the device's memory") from None
                self._release()
                self.value = max(1, self.value // 2)
                self.backoffs += 1
                continue
            position += len(indices)

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used on `device`, None when it computes in full precision."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def gather_inputs(data: ModelData, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The model inputs of the samples `indices`, on `device`."""
    return tuple(t[indices].to(device, non_blocking=True) for t in data.inputs)


def gather_labels(data: ModelData, indices: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The labels of the samples `indices` on `device`, or None for unlabelled data."""
    return None if data.labels is None else data.labels[indices].to(device, non_blocking=True).long()


class TeacherTargets:
    """The teacher's output leaves for any batch of sample indices of one dataset.

    The teacher runs in eval mode under `inference_mode`. Its outputs are computed once and cached
    on the CPU when they fit in TEACHER_CACHE_BYTES (the teacher then costs one pass, not one per
    epoch), else recomputed per batch. Returned tensors are normal tensors made outside inference
    mode, safe to use in a loss that is backpropagated.
    """

    def __init__(
        self,
        teacher: torch.jit.ScriptModule,
        data: ModelData,
        device: torch.device,
        batch_size: BatchSize,
        progress: Callable[[str], None],
    ):
        self.teacher = teacher
        self.data = data
        self.device = device
        self.cache: list[torch.Tensor] | None = None
        sample = self._run(torch.arange(min(2, data.num_samples)))
        per_sample = sum(leaf[0].numel() * leaf.element_size() for leaf in sample)
        if per_sample * data.num_samples <= TEACHER_CACHE_BYTES:
            self.cache = self._compute_all(batch_size, progress)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def get(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's output leaves for the samples `indices`, on the device."""
        if self.cache is not None:
            return [leaf[indices].to(self.device, non_blocking=True) for leaf in self.cache]
        return [leaf.clone() for leaf in self._run(indices)]

    def _run(self, indices: torch.Tensor) -> list[torch.Tensor]:
        inputs = gather_inputs(self.data, indices, self.device)
        with torch.inference_mode(), autocast(self.device):
            _, leaves = flatten_output(self.teacher(*inputs), len(indices))
        return leaves

    def _compute_all(self, batch_size: BatchSize, progress: Callable[[str], None]) -> list[torch.Tensor]:
        chunks: list[list[torch.Tensor]] = []
        total = self.data.num_samples

        def step(indices: torch.Tensor) -> None:
            chunks.append([leaf.cpu() for leaf in self._run(indices)])
            progress(f"teacher targets {int(indices[-1]) + 1}/{total}")

        batch_size.run(torch.arange(total), step)
        with torch.inference_mode():
            return [torch.cat(parts) for parts in zip(*chunks, strict=True)]
