"""`dynamic_int8`: int8 weights with activations quantized on the fly, per batch.

Linear layers run `quantized::linear_dynamic`, LSTM/GRU layers the int8 recurrent kernels
(`quantized_lstm` / `quantized_gru`, which `quantize_dynamic_jit` leaves alone), and embedding
tables are stored as uint8 rows with a float scale and offset each (`quantized::embedding_byte`).
A linear layer runs oneDNN's int8 kernel instead of the backend's when a timing probe of its weight
shape finds it clearly faster on this CPU (`onednn.py`). A recurrent layer stays in float, with the
probe's timings as the reason, when int8 is not faster for its layout on this CPU (`recurrent_speed.py`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from worker.engines.quantize.backend import quantized_engine
from worker.engines.quantize.engine import KEPT_FLOAT
from worker.engines.quantize.graph import ForwardGraph, Site
from worker.engines.quantize.int8 import (
    Int8Scheme,
    quantize_rows_uint8,
    quantize_weight_int8,
    quiet_quantized_tensors,
)
from worker.engines.quantize.onednn import (
    MIN_PROBED_WEIGHTS,
    PROBE_MARGIN,
    OnednnDynamicLinear,
    has_int8_dot_product,
    prefer_onednn,
    probe_linear_kernels,
    worth_probing,
)
from worker.engines.quantize.recurrent_speed import (
    RecurrentLayout,
    int8_slower,
    pack_recurrent_cells,
    probe_recurrent_speed,
)
from worker.engines.quantize.scheme import Conversion, Layer, register_scheme

KINDS = ("Linear", "LSTM", "GRU", "Embedding")


@register_scheme("dynamic_int8")
class DynamicInt8(Int8Scheme):
    """Dynamic int8 for Linear, LSTM, GRU; weight-only int8 rows for Embedding."""

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        # probe timings per linear weight shape (in, out) and per recurrent layout, kept across the
        # conversions of one step (min_fidelity converts many times)
        self._kernel_probes: dict[tuple[int, int], dict[str, float]] = {}
        self._recurrent_probes: dict[RecurrentLayout, dict[str, dict[str, float]]] = {}

    def convert(self, model: torch.jit.ScriptModule, modules: Collection[str] | None) -> Conversion:
        graph = ForwardGraph(self.fresh_copy(model))
        sites, skipped = graph.sites(KINDS)
        converter = _SiteConverter(graph, self.config.per_channel, self.reduce_range, self._onednn_shapes(graph, sites))
        self._check_recurrent_speed(graph, sites, converter)
        converted: dict[str, Layer] = {}
        kept_float: dict[str, dict] = {}
        with quantized_engine(self.backend), quiet_quantized_tensors():
            for site in sites:
                if site.module in converter.keep_float:
                    kept_float[site.module] = {
                        "module": site.module,
                        "kind": site.kind,
                        "reason": converter.keep_float[site.module],
                    }
                    continue
                if modules is not None and site.module not in modules:
                    continue
                reason = converter.convert(site)
                if reason is None:
                    converted[site.module] = Layer(site.module, site.kind)
                else:
                    skipped.append({"module": site.module, "reason": reason})
        graph.finish(converted)
        onednn = sorted(converter.onednn_layers & set(converted))
        return Conversion(
            graph.model,
            list(converted.values()),
            skipped,
            {
                "linear_kernels": {
                    "onednn": onednn,
                    self.backend: sorted(
                        layer.module
                        for layer in converted.values()
                        if layer.kind == "Linear" and layer.module not in converter.onednn_layers
                    ),
                },
                KEPT_FLOAT: list(kept_float.values()),
            },
        )

    def _check_recurrent_speed(self, graph: ForwardGraph, sites: list[Site], converter: _SiteConverter) -> None:
        """Time each recurrent layout once (float against int8) and keep those int8 does not speed up in float."""
        for site in sites:
            if site.kind not in ("LSTM", "GRU"):
                continue
            weights = [graph.tensor(p) for p in site.weights]
            if any(not w.is_floating_point() for w in weights):
                continue
            layout, _ = recurrent_layout(graph, site, weights)
            if layout is None:
                continue
            if layout not in self._recurrent_probes:
                self.ctx.progress(0.0, f"timing {layout.label} in float and int8")
                self._recurrent_probes[layout] = probe_recurrent_speed(
                    weights, layout, self.config.per_channel, self.backend, self.reduce_range, self.ctx.batch_sizes
                )
            reason = int8_slower(self._recurrent_probes[layout])
            if reason is not None:
                converter.keep_float[site.module] = reason

    def _onednn_shapes(self, graph: ForwardGraph, sites: list[Site]) -> set[tuple[int, int]]:
        """The linear weight shapes for which oneDNN's int8 kernel beat the backend's in the probe
        (none on CPUs without int8 dot-product instructions, where it loses accuracy)."""
        if not has_int8_dot_product():
            return set()
        for site in sites:
            weight = graph.tensor(site.weights[0])
            if site.kind == "Linear" and weight.dim() == 2 and weight.is_floating_point():
                shape = (weight.shape[1], weight.shape[0])
                if not worth_probing(*shape):
                    continue
                if shape not in self._kernel_probes:
                    self._kernel_probes[shape] = probe_linear_kernels(weight, self.config.per_channel, self.backend)
        return {shape for shape, timings in self._kernel_probes.items() if prefer_onednn(timings, self.backend)}

    def notes(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "activations": "int8 per batch" + (" (7-bit range: this CPU lacks VNNI)" if self.reduce_range else ""),
            "weights": "per-channel" if self.config.per_channel else "per-tensor",
            "embeddings": "uint8 rows, float scale and offset per row",
            "compute": "cpu",
            "linear_kernel_choice": (
                f"timed: oneDNN's int8 kernel for a weight shape only where a probe on this CPU found it "
                f"{PROBE_MARGIN}× faster than {self.backend}'s (layers from {MIN_PROBED_WEIGHTS} weights, "
                "on CPUs with int8 dot-product instructions); else "
                f"{self.backend}"
            ),
            "linear_kernel_probe_ms": {
                f"{n_in}x{n_out}": {k: round(v, 3) for k, v in timings.items()}
                for (n_in, n_out), timings in sorted(self._kernel_probes.items())
            },
            "recurrent_probe_ms": {
                layout.label: {where: {k: round(v, 3) for k, v in t.items()} for where, t in timings.items()}
                for layout, timings in self._recurrent_probes.items()
            },
        }


class _SiteConverter:
    """Rewrites one graph site at a time, packing each module's weights once."""

    def __init__(self, graph: ForwardGraph, per_channel: bool, reduce_range: bool, onednn_shapes: set[tuple[int, int]]):
        self.graph = graph
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.onednn_shapes = onednn_shapes
        self.onednn_layers: set[str] = set()
        # recurrent modules the speed probe keeps in float, with its reason
        self.keep_float: dict[str, str] = {}
        self._packed: dict[str, str] = {}

    def convert(self, site: Site) -> str | None:
        """Rewrite `site`; returns why it could not be, or None."""
        weights = [self.graph.tensor(p) for p in site.weights]
        if any(not w.is_floating_point() for w in weights):
            return "its weights are not floating point"
        return getattr(self, "_" + site.kind.lower())(site, weights)

    def _attribute(self, site: Site, make) -> str:
        # a module called at several places (weight sharing, loops) is packed once
        if site.module not in self._packed:
            self._packed[site.module] = self.graph.add_attribute(site.module, make())
        return self._packed[site.module]

    def _linear(self, site: Site, weights: list[torch.Tensor]) -> str | None:
        node = site.node
        bias = self.graph.optional_tensor(node.inputsAt(2))
        if bias is False:
            return "its bias is computed in the graph"
        weight = weights[0]
        if weight.dim() == 2 and (weight.shape[1], weight.shape[0]) in self.onednn_shapes:
            name = self._attribute(
                site,
                lambda: (
                    torch.jit.script(OnednnDynamicLinear(weight, None if bias is None else bias, self.per_channel))._c
                ),
            )
            call = self.graph.insert(
                "prim::CallMethod",
                [self.graph.read_attribute(name, node), node.inputsAt(0)],
                node,
                [node.output().type()],
            )
            call.s_("name", "forward")
            node.output().replaceAllUsesWith(call.output())
            node.destroy()
            self.onednn_layers.add(site.module)
            return None
        name = self._attribute(
            site,
            lambda: torch.ops.quantized.linear_prepack(
                quantize_weight_int8(weight, self.per_channel), None if bias is None else bias.float().cpu()
            ),
        )
        self.graph.replace(
            node,
            "quantized::linear_dynamic",
            [node.inputsAt(0), self.graph.read_attribute(name, node), self.graph.constant(self.reduce_range, node)],
        )
        return None

    def _embedding(self, site: Site, weights: list[torch.Tensor]) -> str | None:
        node = site.node
        if weights[0].dim() != 2:
            return "embedding table is not 2-D"
        name = self._attribute(site, lambda: torch.ops.quantized.embedding_bag_prepack(quantize_rows_uint8(weights[0])))
        indices = node.inputsAt(1)
        # the kernel needs contiguous ids; sliced position-id buffers (BERT) are not
        contiguous = self.graph.insert(
            "aten::contiguous", [indices, self.graph.constant(0, node)], node, [indices.type()]
        )
        self.graph.replace(
            node,
            "quantized::embedding_byte",
            [self.graph.read_attribute(name, node), contiguous.output(), self.graph.constant(False, node)],
        )
        return None

    def _lstm(self, site: Site, weights: list[torch.Tensor]) -> str | None:
        return self._recurrent(site, weights, "aten::quantized_lstm")

    def _gru(self, site: Site, weights: list[torch.Tensor]) -> str | None:
        return self._recurrent(site, weights, "aten::quantized_gru")

    def _recurrent(self, site: Site, weights: list[torch.Tensor], kernel: str) -> str | None:
        layout, reason = recurrent_layout(self.graph, site, weights)
        if layout is None:
            return reason
        name = self._attribute(site, lambda: pack_recurrent_cells(weights, layout, self.per_channel, self.reduce_range))
        node = site.node
        inputs = list(node.inputs())
        inputs[2] = self.graph.read_attribute(name, node)
        inputs[3] = self.graph.constant(True, node)  # the packed cells hold (zero) biases; the kernels require them
        if kernel == "aten::quantized_lstm":
            inputs += [self.graph.constant(torch.qint8, node), self.graph.constant(True, node)]
        self.graph.replace(node, kernel, inputs)
        return None


def recurrent_layout(
    graph: ForwardGraph, site: Site, weights: list[torch.Tensor]
) -> tuple[RecurrentLayout | None, str | None]:
    """The layout of an `aten::lstm` / `aten::gru` site, or why the int8 kernels cannot run it."""
    # inputs: input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first
    has_biases, num_layers, bidirectional = (site.node.inputsAt(i).toIValue() for i in (3, 4, 7))
    if has_biases is None or num_layers is None or bidirectional is None:
        return None, "its configuration (layers, direction, bias) is not constant in the graph"
    cells = num_layers * (2 if bidirectional else 1)
    if len(weights) != cells * (4 if has_biases else 2):
        return None, "projections (proj_size > 0) have no int8 recurrent kernel"
    hidden = weights[1].shape[1]
    return RecurrentLayout(
        site.kind, int(weights[0].shape[1]), int(hidden), int(num_layers), bool(bidirectional), bool(has_biases)
    ), None
