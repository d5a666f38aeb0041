"""Packing LSTM/GRU weights for torch's int8 recurrent kernels, and timing them against float.

Int8 does not always pay off for recurrent layers. On x86 the float `aten::lstm` runs oneDNN's
fused RNN primitive (one call per layer for the whole sequence, the input projection as one GEMM
over all time steps), while `quantized_lstm` / `quantized_gru` run ATen's generic cell loop: per
time step and layer two dynamic int8 GEMMs, each quantizing its activation first, plus about ten
separate element-wise ops (sigmoid, tanh, mul, add, split). Measured with the profiler on the test
zoo's LSTM (hidden 128, 2 layers, 32 steps, 1 thread): float 1.6 ms per call, int8 5.3 ms, about
80 µs per cell of which the GEMMs are a small part; from hidden 256 up the GEMMs dominate and int8
wins (1.4× at 256, 2-6× at 512). So each recurrent layer layout is timed here before converting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engines.quantize.backend import quantized_engine
from worker.engines.quantize.int8 import quantize_weight_int8, quiet_quantized_tensors
from worker.engines.quantize.timing import fastest_ms

# time steps per probe call: the cost per step is what differs, a short sequence measures it
PROBE_STEPS = 16
PROBE_REPEATS = 5


@dataclass(frozen=True)
class RecurrentLayout:
    """What a recurrent layer's speed depends on (its kind and shapes, not its weight values)."""

    kind: str  # "LSTM" or "GRU"
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    has_biases: bool

    @property
    def label(self) -> str:
        """`LSTM 64→128 ×2 layers` (`bi-` prefixed when bidirectional)."""
        return (
            f"{'bi-' if self.bidirectional else ''}{self.kind} {self.input_size}→{self.hidden_size} "
            f"×{self.num_layers} layers"
        )


def pack_recurrent_cells(
    weights: list[torch.Tensor], layout: RecurrentLayout, per_channel: bool, reduce_range: bool
) -> list:
    """The per-cell int8 parameters `quantized_lstm` / `quantized_gru` take, from the float weights.

    Args:
        weights: the layer's flat weights in `aten::lstm` order (`w_ih, w_hh[, b_ih, b_hh]` per cell).
        layout: the layer's layout (which says whether biases are among `weights`).
        per_channel: one weight scale per output row (else per tensor).
        reduce_range: 7-bit activations (CPUs without VNNI).

    Returns:
        one `CellParamsBase` script object per cell (layer × direction), with zero biases where the
        layer has none (the int8 kernels require biases: call them with `has_biases=True`).

    Example:
        params = pack_recurrent_cells(list(lstm._flat_weights), layout, True, False)
    """
    per_cell = 4 if layout.has_biases else 2
    params = []
    for c in range(len(weights) // per_cell):
        w_ih, w_hh = weights[c * per_cell], weights[c * per_cell + 1]
        if layout.has_biases:
            b_ih, b_hh = (
                weights[c * per_cell + 2].detach().float().cpu(),
                weights[c * per_cell + 3].detach().float().cpu(),
            )
        else:
            b_ih, b_hh = torch.zeros(w_ih.shape[0]), torch.zeros(w_hh.shape[0])
        packed_ih = torch.ops.quantized.linear_prepack(quantize_weight_int8(w_ih, per_channel), b_ih)
        packed_hh = torch.ops.quantized.linear_prepack(quantize_weight_int8(w_hh, per_channel), b_hh)
        params.append(
            torch.ops.quantized.make_quantized_cell_params_dynamic(packed_ih, packed_hh, b_ih, b_hh, reduce_range)
        )
    return params


def probe_recurrent_speed(
    weights: list[torch.Tensor],
    layout: RecurrentLayout,
    per_channel: bool,
    backend: str,
    reduce_range: bool,
    batch_sizes: tuple[int, ...] = (1,),
) -> dict[str, dict[str, float]]:
    """Milliseconds per call of the layer in float and in int8, at each of `batch_sizes` (the
    job's own: the decision is made for the batches the model will be served at).

    Both run the ops the converted graph runs (`aten::lstm` / `aten::gru` against
    `aten::quantized_lstm` / `aten::quantized_gru`) on the CPU, where the int8 kernels (and so the
    artifact) compute, with this process's thread setting, on `PROBE_STEPS` random steps; float and
    int8 calls alternate, and the fastest of `PROBE_REPEATS` calls counts (`timing.fastest_ms`).

    Returns:
        `{"batch 1": {"float": ms, "int8": ms}, "batch 32": {...}}`, one entry per batch size.

    Example:
        probe_recurrent_speed(list(lstm._flat_weights), RecurrentLayout("LSTM", 64, 128, 2, False, True),
                              True, "x86", False, (1, 32))  # {"batch 1": {"float": 0.7, "int8": 1.3}, ...}
    """
    weights = [w.detach().float().cpu() for w in weights]
    directions = 2 if layout.bidirectional else 1
    result = {}
    with quantized_engine(backend), quiet_quantized_tensors(), torch.no_grad():
        params = pack_recurrent_cells(weights, layout, per_channel, reduce_range)
        for batch in sorted(set(batch_sizes)):
            x = torch.randn(PROBE_STEPS, batch, layout.input_size)
            h = torch.zeros(layout.num_layers * directions, batch, layout.hidden_size)
            result[f"batch {batch}"] = fastest_ms(
                _calls(layout, x, h, weights, params), warmup=1, repeats=PROBE_REPEATS
            )
    return result


def _calls(
    layout: RecurrentLayout, x: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor], params: list
) -> dict[str, Callable[[], object]]:
    """The float and the int8 call of the layer on `x`, as the converted graph makes them."""
    # num_layers, dropout, train, bidirectional, batch_first; the int8 cells always hold biases
    args = (layout.num_layers, 0.0, False, layout.bidirectional, False)
    if layout.kind == "LSTM":
        return {
            "float": lambda: torch.lstm(x, (h, h), weights, layout.has_biases, *args),
            "int8": lambda: torch.quantized_lstm(x, (h, h), params, True, *args, dtype=torch.qint8, use_dynamic=True),
        }
    return {
        "float": lambda: torch.gru(x, h, weights, layout.has_biases, *args),
        "int8": lambda: torch.quantized_gru(x, h, params, True, *args),
    }


def int8_slower(timings: dict[str, dict[str, float]]) -> str | None:
    """Why the layer stays in float (int8 not faster at some probed batch size), or None.

    The reason names the batch sizes where int8 lost, and those where it won, as measured.

    Example:
        int8_slower({"batch 1": {"float": 1.38, "int8": 0.97}, "batch 32": {"float": 2.0, "int8": 3.1}})
        # "int8 slower at batch 32 (3.10 ms vs 2.00 ms float), though faster at batch 1 (0.97 ms vs 1.38 ms)"
    """
    slower = {where: t for where, t in timings.items() if t["int8"] >= t["float"]}
    if not slower:
        return None
    faster = {where: t for where, t in timings.items() if where not in slower}

    def listed(group: dict[str, dict[str, float]], unit: str) -> str:
        return "; ".join(f"{where} ({t['int8']:.2f} ms vs {t['float']:.2f} ms{unit})" for where, t in group.items())

    reason = f"int8 slower at {listed(slower, ' float')}"
    return reason + (f", though faster at {listed(faster, '')}" if faster else "")
