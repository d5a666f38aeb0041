"""`static_int8`: int8 weights and activations, activation ranges calibrated on the job's dataset.

Built on PyTorch's TorchScript graph-mode quantization (`prepare_jit` / `convert_jit`): conv-BN
folding, observers, int8 kernels with fused ReLU, and freezing. This module adds the choice of
backend and observers for the worker's CPU, per-layer selection, and per-layer degradation when
graph mode cannot handle a layer (e.g. a value chosen by a data-dependent `if`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch.ao.quantization import QConfig, QuantType, convert_jit, fuse_conv_bn_jit
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
)
from torch.ao.quantization.quantize_jit import script_qconfig
from torch.jit._recursive import wrap_cpp_module

from worker.engines.errors import EngineError, model_text
from worker.engines.quantize.backend import quantized_engine
from worker.engines.quantize.graph import ForwardGraph
from worker.engines.quantize.int8 import Int8Scheme, quiet_quantized_tensors
from worker.engines.quantize.scheme import Conversion, Layer, register_scheme

KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d")
# calibration passes over at most this many samples: enough for stable histograms, bounded time
CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 32


@register_scheme("static_int8")
class StaticInt8(Int8Scheme):
    """Post-training static int8 for Linear and Conv layers, calibrated on `ctx.calibration`."""

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self._layers: tuple[list[Layer], list[dict]] | None = None

    def check(self, model: torch.jit.ScriptModule) -> None:
        if self.ctx.calibration is None:
            raise EngineError(
                "calibration_required",
                "static_int8 needs a calibration dataset (calibration_dataset_id): activation "
                "ranges from synthetic inputs would silently cost accuracy",
            )

    def qconfig(self) -> QConfig:
        """Histogram-calibrated activations; symmetric int8 weights per channel (or per tensor)."""
        if self.config.per_channel:
            weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        else:
            weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        return QConfig(activation=HistogramObserver.with_args(reduce_range=self.reduce_range), weight=weight)

    def layers(self, model: torch.jit.ScriptModule) -> tuple[list[Layer], list[dict]]:
        """The layers graph mode can quantize, each named by the module whose code runs the op.

        Graph mode attaches a layer's observers (and its qconfig) to the module whose forward
        calls the op: `attn` for an attention block calling `F.linear(x, self.out_proj.weight)`.
        """
        if self._layers is None:
            graph = ForwardGraph(self.fresh_copy(model))
            sites, skipped = graph.sites(KINDS)
            try:
                with quantized_engine(self.backend), quiet_quantized_tensors():
                    prepared = _prepare(self.fresh_copy(model), {"": self.qconfig()})
                observed = {name.rpartition(".")[0] for name, _ in prepared.named_modules() if "_observer_" in name}
            except RuntimeError:
                # graph mode rejects the model as a whole; name layers by their weights' modules
                # and let `convert` find out which of them work
                observed = {site.module for site in sites}
            layers: dict[str, Layer] = {}
            for site in sites:
                owner = _deepest_prefix(site.module, observed)
                if owner is None:
                    skipped.append({"module": site.module, "reason": "graph mode does not quantize this op"})
                else:
                    layers.setdefault(owner, Layer(owner, site.kind))
            self._layers = (list(layers.values()), skipped)
        return self._layers

    def convert(self, model: torch.jit.ScriptModule, modules: Collection[str] | None) -> Conversion:
        candidates, skipped = self.layers(model)
        wanted = [layer for layer in candidates if modules is None or layer.module in modules]
        # first int8 all through the graph (pooling, flatten, adds between layers stay int8); if
        # graph mode cannot observe some value there, int8 islands around each chosen layer
        for whole_graph in (True, False):
            try:
                return Conversion(self._quantize(model, wanted, candidates, whole_graph), wanted, list(skipped))
            except RuntimeError as exc:
                error = exc
        if len(wanted) <= 1:
            return Conversion(
                self.fresh_copy(model),
                [],
                skipped + [{"module": layer.module, "reason": _reason(error)} for layer in wanted],
            )
        return self._degrade(model, wanted, candidates, skipped)

    def _degrade(
        self, model: torch.jit.ScriptModule, wanted: list[Layer], candidates: list[Layer], skipped: list[dict]
    ) -> Conversion:
        """Graph mode failed on the whole set: add the layers one at a time, keeping those that work."""
        skipped = list(skipped)
        kept: list[Layer] = []
        result = self.fresh_copy(model)
        for layer in wanted:
            try:
                result = self._quantize(model, kept + [layer], candidates, whole_graph=False)
                kept.append(layer)
            except RuntimeError as exc:
                skipped.append({"module": layer.module, "reason": _reason(exc)})
        return Conversion(result, kept, skipped)

    def _quantize(
        self, model: torch.jit.ScriptModule, wanted: list[Layer], candidates: list[Layer], whole_graph: bool
    ) -> torch.jit.ScriptModule:
        qconfig = self.qconfig()
        chosen = {layer.module for layer in wanted}
        # every candidate is named (the deepest name wins), so a layer left out stays float even
        # inside a quantized parent
        qconfig_dict: dict[str, QConfig | None] = {"": qconfig if whole_graph else None}
        qconfig_dict.update({layer.module: qconfig if layer.module in chosen else None for layer in candidates})
        calibration = self.ctx.calibration.take(CALIBRATION_SAMPLES)
        with quantized_engine(self.backend), quiet_quantized_tensors():
            prepared = _prepare(self.fresh_copy(model), qconfig_dict)
            with torch.no_grad():
                for batch in calibration.batches(CALIBRATION_BATCH, "cpu"):
                    prepared(*batch.inputs)
            converted = convert_jit(prepared)
            # convert_jit can build a graph that does not run: int8 convolutions return channels-last
            # tensors, and a `view` after one fails. A RuntimeError here makes the caller try int8
            # islands, then layer by layer, as for a graph that graph mode rejects.
            with torch.no_grad():
                converted(*next(calibration.batches(CALIBRATION_BATCH, "cpu")).inputs)
            return converted

    def notes(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "activations": "int8, ranges calibrated with histogram observers"
            + (" (7-bit range: this CPU lacks VNNI)" if self.reduce_range else ""),
            "weights": "per-channel" if self.config.per_channel else "per-tensor",
            "calibration_samples": min(CALIBRATION_SAMPLES, self.ctx.calibration.num_samples)
            if self.ctx.calibration is not None
            else 0,
            "fusion": "conv-BN folded, ReLU fused into the int8 kernels",
            "frozen": True,
            "compute": "cpu",
        }


def _prepare(model: torch.jit.ScriptModule, qconfig_dict: dict[str, QConfig | None]) -> torch.jit.ScriptModule:
    """`prepare_jit`, with one scripted qconfig shared by every entry.

    `prepare_jit` scripts each entry's qconfig separately; instances of one TorchScript type then
    look differently configured, get cloned types, and a parent shared by them fails to type-check.
    """
    scripted: dict[int, Any] = {}
    shared = {
        name: None if qconfig is None else scripted.setdefault(id(qconfig), script_qconfig(qconfig))
        for name, qconfig in qconfig_dict.items()
    }
    model = fuse_conv_bn_jit(model)
    return wrap_cpp_module(torch._C._jit_pass_insert_observers(model._c, "forward", shared, False, QuantType.STATIC))


def _deepest_prefix(name: str, candidates: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in candidates:
            return prefix
    return None


def _reason(exc: Exception) -> str:
    return f"graph-mode quantization failed: {model_text(exc, limit=200)}"
