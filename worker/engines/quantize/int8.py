"""What the int8 schemes share: the CPU backend choice, and int8 weights from observers' scales."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from worker.engines.pipeline import PipelineContext
from worker.engines.quantize.backend import activation_reduce_range, int8_backend
from worker.engines.quantize.config import QuantizeConfig
from worker.engines.quantize.scheme import Scheme


class Int8Scheme(Scheme):
    """Base of the schemes running torch's int8 CPU kernels: picks the backend for this CPU."""

    precision = "int8"
    device = torch.device("cpu")  # the int8 kernels are CPU kernels

    def __init__(self, config: QuantizeConfig, ctx: PipelineContext):
        super().__init__(config, ctx)
        self.backend = int8_backend()
        self.reduce_range = activation_reduce_range(self.backend)


@contextlib.contextmanager
def quiet_quantized_tensors() -> Iterator[None]:
    """Silence torch's deprecation warnings for quantized tensors (the int8 kernels still need them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
        yield


def quantize_weight_int8(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """A symmetric qint8 copy of a float weight, one scale per output channel or per tensor.

    Example:
        q = quantize_weight_int8(linear.weight.detach(), per_channel=True)
        packed = torch.ops.quantized.linear_prepack(q, linear.bias)
    """
    weight = weight.detach().float().cpu().contiguous()
    if per_channel:
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    if per_channel:
        return torch.quantize_per_channel(weight, scale.double(), zero_point.long(), 0, torch.qint8)
    return torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)


def quantize_rows_uint8(weight: torch.Tensor) -> torch.Tensor:
    """A quint8 copy of an embedding table with a float scale and offset per row (for `embedding_byte`)."""
    weight = weight.detach().float().cpu().contiguous()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    return torch.quantize_per_channel(weight, scale, zero_point, 0, torch.quint8)
