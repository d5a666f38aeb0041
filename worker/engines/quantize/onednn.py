"""Dynamic int8 linear layers on oneDNN's kernels, and the timing probe that decides when to use them.

`quantized::linear_dynamic` runs whichever library its packed weight was packed for, and a saved
model re-packs on `torch.jit.load` for the loading process's `torch.backends.quantized.engine`
(`x86`, i.e. fbgemm, by default). On CPUs with AMX / VNNI, oneDNN's int8 GEMM is measured 2-4×
faster than fbgemm's for transformer-sized layers, so an `OnednnDynamicLinear` holder stores plain
int8 weights and packs them for oneDNN itself when loaded (`__setstate__`): the artifact keeps the
fast kernel whoever loads it.
"""

# TorchScript must resolve `Optional`, `List` and `Union` in the scripted holder below
# ruff: noqa: UP006, UP007, UP045

import functools
from typing import List, Optional, Union  # noqa: UP035

import torch
from torch import Tensor

from worker.engines.quantize.backend import quantized_engine
from worker.engines.quantize.int8 import quantize_weight_int8, quiet_quantized_tensors
from worker.engines.quantize.timing import fastest_ms

# rows of the activation the probe times with: a batch of a few sequences or a large image batch
PROBE_ROWS = 512
PROBE_REPEATS = 9
# A timing decides, so it must not flip with the load of the host. oneDNN wins 2-4× where it wins
# (transformer-sized layers on VNNI / AMX); a margin of 1.1 let a probe on a busy host pick it for
# some of a burst of identical small-CNN jobs and not for others (issue 17), so it must win by 1.5×.
PROBE_MARGIN = 1.5
# Weights smaller than a 384×384 layer (MiniLM's smallest) are never probed and stay on fbgemm: a
# call is then mostly quantizing its activation, the libraries differ by less than a busy host's
# noise, and a choice made by noise would make identical jobs differ.
MIN_PROBED_WEIGHTS = 384 * 384


class OnednnDynamicLinear(torch.nn.Module):
    """`y = x @ W.T + b` with int8 `W` (symmetric, per output channel) and `x` quantized per call.

    Attributes:
        weight: the int8 weight `[out, in]` (what the file stores, with `scales` and `bias`).
        scales: float32 scale per output channel.
        packed: the oneDNN-packed copy the kernel reads (rebuilt on load, never saved).
    """

    # TorchScript reads this class annotation (and the methods' ones) at runtime: no postponed annotations here
    bias: Optional[Tensor]

    def __init__(self, weight: Tensor, bias: Optional[Tensor], per_channel: bool):
        super().__init__()
        q = quantize_weight_int8(weight, per_channel)
        if per_channel:
            scales = q.q_per_channel_scales().float()
        else:
            scales = torch.full((weight.shape[0],), q.q_scale(), dtype=torch.float32)
        self.weight = q.int_repr().contiguous()
        self.scales = scales
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().cpu().contiguous()
        self.out_features = int(weight.shape[0])
        self.in_features = int(weight.shape[1])
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, Tensor, Optional[Tensor], bool]:
        return self.weight, self.scales, self.bias, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, Tensor, Optional[Tensor], bool]) -> None:
        self.weight = state[0]
        self.scales = state[1]
        self.bias = state[2]
        self.training = state[3]
        self.zero_points = torch.zeros(self.weight.size(0), dtype=torch.long)
        self.out_features = self.weight.size(0)
        self.in_features = self.weight.size(1)
        self.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        # uint8 asymmetric, range from this call's min/max: what `quantized::linear_dynamic` does
        q = torch.quantize_per_tensor_dynamic(rows, torch.quint8, False)
        no_args: List[Optional[Union[int, float, complex]]] = []
        y = torch.ops.onednn.qlinear_pointwise(
            q.int_repr(),
            q.q_scale(),
            q.q_zero_point(),
            self.packed,
            self.scales,
            self.zero_points,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            no_args,
            "",
        )
        shape = x.shape[:-1] + [self.out_features]
        return y.reshape(shape)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops (x86 and ARM builds with mkldnn)."""
    return hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()


def probe_linear_kernels(weight: Tensor, per_channel: bool, backend: str) -> dict[str, float]:
    """Milliseconds (fastest of `PROBE_REPEATS`) of one dynamic int8 linear call with `weight`, per kernel library.

    Times `backend`'s `quantized::linear_dynamic` (fbgemm or qnnpack) and, where available,
    `OnednnDynamicLinear`, on `PROBE_ROWS` random rows, one after the other in each round.

    Returns:
        `{backend: ms, "onednn": ms}` (`onednn` absent where this build lacks it or it fails).

    Example:
        probe_linear_kernels(model.fc.weight, per_channel=True, backend="x86")  # {"x86": 0.41, "onednn": 0.17}
    """
    weight = weight.detach().float().cpu()
    x = torch.randn(PROBE_ROWS, weight.shape[1])
    with quantized_engine(backend), quiet_quantized_tensors():
        packed = torch.ops.quantized.linear_prepack(quantize_weight_int8(weight, per_channel), None)
        candidates = {backend: lambda: torch.ops.quantized.linear_dynamic(x, packed, False)}
        if onednn_available():
            try:
                onednn = torch.jit.script(OnednnDynamicLinear(weight, None, per_channel))
                candidates["onednn"] = lambda: onednn(x)
            except RuntimeError:
                pass
        # the scripted holder's first calls profile and optimise its graph
        return fastest_ms(candidates, warmup=3, repeats=PROBE_REPEATS)


@functools.cache
def has_int8_dot_product() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX).

    Without them oneDNN's dynamic int8 linear is measurably less accurate than fbgemm's (on an AVX2
    EPYC a 4-layer MLP fell to cosine 0.94 against fbgemm's 0.99), so it is never chosen there.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def worth_probing(in_features: int, out_features: int) -> bool:
    """Whether a linear layer is large enough for its kernel library to be chosen by timing."""
    return in_features * out_features >= MIN_PROBED_WEIGHTS


def prefer_onednn(timings: dict[str, float], backend: str) -> bool:
    """Whether the probe's timings make oneDNN the clear winner over `backend` (by `PROBE_MARGIN`)."""
    return "onednn" in timings and timings["onednn"] * PROBE_MARGIN < timings[backend]
