"""Model inputs for calibration, training and evaluation: uploaded datasets or synthetic inputs.

A dataset holds positional model inputs (`input`, or `input_0 … input_{k-1}`) with the sample
axis first, and optional int64 `label` class ids.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.engines.errors import EngineError

_INPUT_NAME = re.compile(r"^input(?:_(\d+))?$")


@dataclass
class Batch:
    """One mini-batch: positional model inputs and, when the dataset has them, labels."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None


@dataclass
class ModelData:
    """Positional model inputs with the sample axis first, and optional class labels.

    Example:
        data = ModelData(inputs=(torch.randn(64, 3, 32, 32),), labels=torch.randint(0, 10, (64,)))
        for batch in data.batches(16):
            model(*batch.inputs)
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[Batch]:
        """Yield consecutive batches (the last one may be smaller), moved to `device`."""
        for start in range(0, self.num_samples, batch_size):
            stop = start + batch_size
            inputs = tuple(t[start:stop].to(device) if device else t[start:stop] for t in self.inputs)
            labels = None
            if self.labels is not None:
                labels = self.labels[start:stop].to(device) if device else self.labels[start:stop]
            yield Batch(inputs, labels)

    def take(self, n: int) -> ModelData:
        """The first `n` samples (all of them when there are fewer)."""
        labels = self.labels[:n] if self.labels is not None else None
        return ModelData(tuple(t[:n] for t in self.inputs), labels)

    def repeat_to(self, n: int) -> ModelData:
        """At least `n` samples, cycling through the data (to fill a benchmark batch)."""
        if self.num_samples >= n:
            return self.take(n)
        reps = -(-n // self.num_samples)
        labels = self.labels.repeat(reps)[:n] if self.labels is not None else None
        return ModelData(tuple(_repeat_rows(t, reps)[:n] for t in self.inputs), labels)


def _repeat_rows(t: torch.Tensor, reps: int) -> torch.Tensor:
    return t.repeat(reps, *([1] * (t.dim() - 1)))


def arrays_to_model_data(arrays: dict[str, np.ndarray]) -> ModelData:
    """Map dataset arrays to positional inputs and labels, checking names and sample counts."""
    positional: dict[int, np.ndarray] = {}
    for name, array in arrays.items():
        match = _INPUT_NAME.match(name)
        if match:
            positional[int(match.group(1) or 0)] = array
        elif name != "label":
            raise EngineError("dataset_invalid", f"unexpected array {name!r}: use 'input' or 'input_0'…, and 'label'")
    if not positional:
        raise EngineError("dataset_invalid", "the dataset has no 'input' or 'input_0' array")
    if sorted(positional) != list(range(len(positional))):
        raise EngineError(
            "dataset_invalid", f"input arrays must be numbered 0…k-1 without gaps, got {sorted(positional)}"
        )
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(positional[i])) for i in range(len(positional)))
    labels = None
    if "label" in arrays:
        labels = torch.from_numpy(np.ascontiguousarray(arrays["label"])).long()
    counts = {int(t.shape[0]) if t.dim() else -1 for t in inputs + ((labels,) if labels is not None else ())}
    if len(counts) != 1 or -1 in counts:
        raise EngineError("dataset_invalid", "all arrays must share the same first (sample) dimension")
    return ModelData(inputs, labels)


def load_dataset(path: str | Path) -> ModelData:
    """Load an `.npz` (pickles refused) or `.safetensors` dataset file into `ModelData`."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PK\x03\x04" and zipfile.is_zipfile(path):
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    else:
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
    return arrays_to_model_data(arrays)


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def synthetic_data(input_spec: list[dict], num_samples: int, seed: int = 0) -> ModelData:
    """Uniform random inputs from an `input_spec` (shape with the batch dim first, dtype, low, high).

    Integer dtypes draw ids in [low, high); floats are uniform in [low, high).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in input_spec:
        shape = [num_samples, *list(spec["shape"])[1:]]
        dtype = _DTYPES[spec.get("dtype", "float32")]
        low, high = spec.get("low", 0.0), spec.get("high", 1.0)
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=generator) * (high - low) + low
            tensors.append(t.to(dtype))
        else:
            tensors.append(
                torch.randint(int(low), max(int(high), int(low) + 1), shape, generator=generator, dtype=dtype)
            )
    return ModelData(tuple(tensors), None)
