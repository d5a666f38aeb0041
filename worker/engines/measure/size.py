"""What a model weighs: file bytes, deflate-compressed bytes, parameters, non-zeros and buffers.

Quantized layers keep their weights where `parameters()` does not look: in packed-params objects
(int8 conv/linear) or in plain tensor attributes (weight-only schemes). Those weights count as
parameters too, so that a quantized model's parameter count is comparable with its original's.

Every tensor kind a model may hold is counted without touching a data pointer it may not have:
strided, quantized, sparse, oneDNN-packed (opaque, no storage), meta and tensor subclasses. A
oneDNN-packed attribute is a kernel's copy of a weight the model also holds as plain int8
(`OnednnDynamicLinear.packed`), so it is not counted again.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileSize:
    """The bytes of a saved model file, stored and deflate-compressed (zlib, level 6)."""

    size_bytes: int
    compressed_size_bytes: int


@dataclass(frozen=True)
class WeightStats:
    """Parameter counts (including quantized packed weights) and buffer bytes of a model."""

    parameters: int
    nonzero_parameters: int
    buffers_bytes: int


def file_size(path: str | Path) -> FileSize:
    """The size of a model file and of its deflate-compressed bytes (streamed, never held whole).

    Compression shows what sparsity and low precision would save on the wire: a TorchScript
    archive stores its tensors uncompressed.

    Example:
        file_size("model.pt").compressed_size_bytes
    """
    compressor = zlib.compressobj(6)
    size = compressed = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            compressed += len(compressor.compress(chunk))
    compressed += len(compressor.flush())
    return FileSize(size, compressed)


def weight_stats(model: torch.nn.Module) -> WeightStats:
    """Count parameters, non-zero parameters and buffer bytes; shared tensors count once.

    Args:
        model: a TorchScript (or eager) module, quantized ones included.

    Returns:
        `WeightStats`: parameters include weights held in quantized packed params and in plain
        tensor attributes; non-zeros are counted on dequantized values.

    Example:
        stats = weight_stats(torch.jit.load("model.pt"))
        stats.nonzero_parameters / stats.parameters  # density
    """
    parameters = nonzero = 0
    for weight in _unique(list(model.parameters()) + list(_hidden_weights(model))):
        parameters += weight.numel()
        nonzero += _nonzero(weight)
    buffers_bytes = sum(b.numel() * b.element_size() for b in _unique(list(model.buffers())))
    return WeightStats(parameters, nonzero, buffers_bytes)


def _nonzero(t: torch.Tensor) -> int:
    """Non-zero elements of any tensor kind; where the values cannot be read (meta tensors, a
    subclass that refuses the op) every element counts as non-zero, so density is never overstated."""
    try:
        t = t.detach()
        if t.is_meta:
            return t.numel()
        if t.is_quantized:
            t = t.dequantize()
        elif t.layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
            t = t.to_dense()
        elif t.layout == torch._mkldnn:  # oneDNN's opaque layout has no strided view to count on
            t = t.to_dense()
        return int(torch.count_nonzero(t))
    except (RuntimeError, NotImplementedError, TypeError):
        return t.numel()


def _hidden_weights(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Weights outside `parameters()`: unpacked quantized packed params (`LinearPackedParamsBase`,
    …) and tensor attributes that are neither parameters nor buffers (scalars, such as a quantized
    input's scale, are not weights and are left out)."""
    if not isinstance(model, torch.jit.ScriptModule):
        return
    registered = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for name, value in torch._C._jit_debug_module_iterators(model._c)["named_attributes_r"]:
        if isinstance(value, torch.Tensor):
            if name not in registered and value.dim() > 0 and value.layout != torch._mkldnn:
                yield value
        elif (
            isinstance(value, torch.ScriptObject)
            and not isinstance(value, torch._C.ScriptModule)
            and value._has_method("unpack")
        ):
            yield from (t for t in value.unpack() if isinstance(t, torch.Tensor))


def _unique(tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    seen: set[tuple] = set()
    for t in tensors:
        key = _identity(t)
        if key not in seen:
            seen.add(key)
            yield t


def _identity(t: torch.Tensor) -> tuple:
    """What makes two tensor objects the same weight: the same memory viewed the same way.

    Tensors without readable storage (sparse, oneDNN-packed, wrapper subclasses) and meta tensors
    (whose storages all sit at address 0) are told apart by object identity; quantized ones too, as
    packed params hand out a fresh tensor per `unpack()`.
    """
    if t.is_quantized or t.is_meta or t.layout != torch.strided:
        return ("object", id(t))
    try:
        address = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("object", id(t))
    return (t.device, address, t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))
