"""Weight-only schemes (`weight_int8`, `weight_int4`, `binary`): packed integers in the file, float compute.

Each quantized weight lives in a `PackedWeight` module attached to the model's root: the file holds
its packed integers and scales (its `__getstate__` packs the current float weight), and loading
(`__setstate__`) unpacks them into the float `weight` the forward graph reads. So the artifact is a
plain TorchScript file: `torch.jit.load` restores float weights, nothing else is needed. Every
tensor the rewritten graph reads is a registered parameter (frozen for the packed weights, as
torchao keeps its quantized weights), so `model.to(device)` / `.to(dtype)` move them all.

Helpers for other engines (distillation recovers accuracy with a straight-through estimator and
re-packs at the end):

- `fake_quantize(weight, scheme, ...)`: the quantize → dequantize round trip of one tensor.
- `weight_only_layers(model)`: the packed weights of a converted model, with scheme and group size.
- `repack(model, weights=None)`: install trained float weights and snap them to their grids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.jit._recursive import wrap_cpp_module

from worker.engines.quantize.graph import ForwardGraph, Site
from worker.engines.quantize.scheme import Conversion, Layer, Scheme, register_scheme

BITS = {"weight_int8": 8, "weight_int4": 4, "binary": 1}
KINDS = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Embedding",
    "LSTM",
    "GRU",
)


def pack_weight(weight: Tensor, bits: int, group_size: int, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Quantize a weight (output channels on dim 0) to packed integers and float32 scales.

    - 8 bits: symmetric int8, one scale per output channel (or per tensor).
    - 4 bits: symmetric int4 in [-7, 7], one scale per `group_size` weights along each row
      (`group_size` clamped to the row length), two values per byte.
    - 1 bit: the sign, eight per byte; the scale is the mean |w| per output channel (or tensor).

    TorchScript-compatible: `PackedWeight.__getstate__` runs it when a model is saved.

    Returns:
        (packed, scales): packed is int8 (8 bits) or uint8 (4 and 1 bits), flattened for 4 and 1 bits.

    Example:
        packed, scales = pack_weight(linear.weight, 4, 128, True)
        restored = unpack_weight(packed, scales, list(linear.weight.shape), 4, 128, True)
    """
    rows = weight.shape[0]
    w = weight.detach().float().reshape(rows, -1)
    cols = w.shape[1]
    if bits == 8:
        amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
        scales = (amax / 127.0).clamp_min(1e-12)
        q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return q, scales
    if bits == 4:
        group = min(group_size, cols)
        groups = (cols + group - 1) // group
        padded = torch.nn.functional.pad(w, [0, groups * group - cols]).reshape(rows, groups, group)
        scales = (padded.abs().amax(dim=2) / 7.0).clamp_min(1e-12)
        q = (torch.round(padded / scales.unsqueeze(2)).clamp(-7, 7) + 8).to(torch.uint8).reshape(-1)
        q = torch.cat([q, torch.zeros(q.numel() % 2, dtype=torch.uint8, device=q.device)]).reshape(-1, 2)
        return q[:, 0] | (q[:, 1] << 4), scales.reshape(-1)
    scales = w.abs().mean(dim=1) if per_channel else w.abs().mean().reshape(1)
    signs = (w >= 0).reshape(-1).to(torch.uint8)
    pad = (8 - signs.numel() % 8) % 8
    signs = torch.cat([signs, torch.zeros(pad, dtype=torch.uint8, device=signs.device)]).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=signs.device)
    return (signs << shifts).sum(dim=1).to(torch.uint8), scales


def unpack_weight(
    packed: Tensor, scales: Tensor, shape: list[int], bits: int, group_size: int, per_channel: bool
) -> Tensor:
    """The float32 weight of `shape` that `pack_weight` packed (see there for the layouts)."""
    rows = shape[0]
    cols = 1
    for size in shape[1:]:
        cols *= size
    if bits == 8:
        w = packed.float() * scales.unsqueeze(1)
    elif bits == 4:
        group = min(group_size, cols)
        groups = (cols + group - 1) // group
        nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[: rows * groups * group]
        q = nibbles.float().reshape(rows, groups, group) - 8.0
        w = (q * scales.reshape(rows, groups, 1)).reshape(rows, groups * group)[:, :cols]
    else:
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        signs = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: rows * cols].float() * 2.0 - 1.0
        w = signs.reshape(rows, cols) * scales.unsqueeze(1)
    return w.reshape(shape).contiguous()


class PackedWeight(torch.nn.Module):
    """One weight-only quantized tensor: float `weight` in memory, packed integers in the file.

    Attributes:
        weight: the dequantized float32 weight the model computes with; a parameter with
            `requires_grad=False` (a plain tensor attribute would be left behind by `.to()`).
        module, parameter: where the weight came from (`fc`, `weight`).
        scheme, group_size, per_channel: how it is packed.
    """

    def __init__(self, weight: Tensor, scheme: str, group_size: int, per_channel: bool, module: str, parameter: str):
        super().__init__()
        self.scheme = scheme
        self.bits = BITS[scheme]
        self.group_size = group_size
        self.per_channel = per_channel
        self.module = module
        self.parameter = parameter
        self.shape = list(weight.shape)
        self.weight = torch.nn.Parameter(
            fake_quantize(weight, scheme, per_channel=per_channel, group_size=group_size), requires_grad=False
        )

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, Tensor, list[int], str, int, bool, str, str, bool]:
        packed, scales = pack_weight(self.weight, self.bits, self.group_size, self.per_channel)
        return (
            packed,
            scales,
            self.shape,
            self.scheme,
            self.group_size,
            self.per_channel,
            self.module,
            self.parameter,
            self.training,
        )

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, Tensor, list[int], str, int, bool, str, str, bool]) -> None:
        self.shape = state[2]
        self.scheme = state[3]
        self.bits = 8 if state[3] == "weight_int8" else (4 if state[3] == "weight_int4" else 1)
        self.group_size = state[4]
        self.per_channel = state[5]
        self.module = state[6]
        self.parameter = state[7]
        self.training = state[8]
        self.weight = unpack_weight(state[0], state[1], state[2], self.bits, state[4], state[5])

    def forward(self) -> Tensor:
        return self.weight


class KeptFloat(torch.nn.Module):
    """A tensor kept in float next to packed weights (the biases of a quantized RNN), as a parameter
    so that `.to()` moves it and training can update it."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)

    def forward(self) -> Tensor:
        return self.value


def fake_quantize(
    weight: Tensor, scheme: str, *, per_channel: bool = True, group_size: int = 128, straight_through: bool = False
) -> Tensor:
    """The quantize → dequantize round trip of `weight` under a weight-only scheme.

    Args:
        weight: a float weight with output channels on dim 0 (Linear, Conv, Embedding, RNN matrices).
        scheme: `weight_int8`, `weight_int4` or `binary`.
        per_channel: one scale per output channel (int8, binary) instead of one per tensor.
        group_size: weights per scale along a row (int4).
        straight_through: return `weight + (q - weight).detach()`, whose gradient is the identity
            (the straight-through estimator used to train through the rounding).

    Returns:
        A float tensor of `weight`'s shape and dtype holding the values the packed file restores.

    Example:
        w_q = fake_quantize(layer.weight, "weight_int4", group_size=64, straight_through=True)
        loss = criterion(torch.nn.functional.linear(x, w_q, layer.bias), y)
    """
    restored = unpack_weight(
        *pack_weight(weight, BITS[scheme], group_size, per_channel),
        list(weight.shape),
        BITS[scheme],
        group_size,
        per_channel,
    ).to(weight.dtype)
    if straight_through:
        return weight + (restored - weight).detach()
    return restored


@dataclass(frozen=True)
class WeightOnlyParam:
    """One weight-only quantized tensor of a converted model (see `weight_only_layers`)."""

    holder: str
    module: str
    parameter: str
    scheme: str
    group_size: int
    per_channel: bool
    shape: tuple[int, ...]
    weight: Tensor


def weight_only_layers(model: torch.jit.ScriptModule) -> list[WeightOnlyParam]:
    """The weight-only quantized tensors of a model converted by `weight_int8/int4/binary`.

    Works on the step's output and on the artifact after `torch.jit.load`.

    Returns:
        One entry per packed tensor: `holder` (attribute of the root), original `module` and
        `parameter` names, `scheme`, `group_size`, `per_channel`, `shape`, and the live float
        `weight` tensor the forward graph reads (set `requires_grad_()` on it to train it).

    Example:
        for p in weight_only_layers(model):
            print(p.module, p.scheme, p.group_size, tuple(p.weight.shape))
    """
    found = []
    # the C++ module lists attributes added since the Python wrapper was made; `dir()` does not
    for name, value in torch._C._jit_debug_module_iterators(model._c)["named_attributes"]:
        if not (
            name.startswith("_q_")
            and isinstance(value, torch._C.ScriptModule)
            and value.hasattr("bits")
            and value.hasattr("scheme")
        ):
            continue
        get = value.getattr
        found.append(
            WeightOnlyParam(
                name,
                get("module"),
                get("parameter"),
                get("scheme"),
                get("group_size"),
                get("per_channel"),
                tuple(get("shape")),
                get("weight"),
            )
        )
    return found


def repack(model: torch.jit.ScriptModule, weights: dict[str, Tensor] | None = None) -> int:
    """Snap a converted model's float weights back onto their quantization grids, in place.

    Call it after training the float weights (e.g. distillation with `fake_quantize(...,
    straight_through=True)`): the in-memory model then computes exactly what the saved file will
    restore. Saving packs whatever `weight` holds, so skipping this only changes the in-memory model.

    Args:
        model: a model converted by a weight-only scheme.
        weights: optional new float weights keyed `"<module>.<parameter>"` (e.g. `"fc.weight"`),
            installed before snapping; shapes must match.

    Returns:
        How many tensors were re-packed.

    Example:
        repack(student, {"fc.weight": trained_fc_weight})
        torch.jit.save(student, "student_int4.pt")
    """
    params = weight_only_layers(model)
    weights = dict(weights or {})
    for p in params:
        key = f"{p.module}.{p.parameter}"
        new = weights.pop(key, p.weight)
        if tuple(new.shape) != p.shape:
            raise ValueError(f"{key}: expected shape {p.shape}, got {tuple(new.shape)}")
        snapped = fake_quantize(new.detach(), p.scheme, per_channel=p.per_channel, group_size=p.group_size)
        # where (and in which dtype) the model lives now, which `.to()` may have changed since conversion
        model._c.getattr(p.holder).setattr("weight", snapped.to(device=p.weight.device, dtype=p.weight.dtype))
    if weights:
        raise KeyError(f"not weight-only quantized tensors of this model: {sorted(weights)}")
    return len(params)


def _device_of(model: torch.jit.ScriptModule) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _storage(model: torch.jit.ScriptModule) -> dict[str, Any]:
    """Bytes of the quantized tensors as float32 and as stored (packed integers plus scales)."""
    float_bytes = packed_bytes = 0
    for p in weight_only_layers(model):
        packed, scales = pack_weight(p.weight, BITS[p.scheme], p.group_size, p.per_channel)
        float_bytes += p.weight.numel() * 4
        packed_bytes += packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
    return {
        "count": len(weight_only_layers(model)),
        "float32_bytes": float_bytes,
        "stored_bytes": packed_bytes,
        "ratio": float_bytes / packed_bytes if packed_bytes else None,
    }


def _read_tensor(graph: ForwardGraph, holder: str, name: str, before: torch._C.Node) -> torch._C.Value:
    """`self.<holder>.<name>` read just before `before`."""
    node = graph.graph.create("prim::GetAttr", [graph.read_attribute(holder, before)])
    node.s_("name", name)
    node.output().setType(torch._C.TensorType.get())
    node.insertBefore(before)
    return node.output()


@register_scheme("weight_int8", "weight_int4", "binary")
class WeightOnly(Scheme):
    """Weight-only quantization of Linear, Conv, Embedding and recurrent weights; compute stays float."""

    @property
    def precision(self) -> str:
        return {"weight_int8": "int8", "weight_int4": "int4", "binary": "binary"}[self.config.scheme]

    def convert(self, model: torch.jit.ScriptModule, modules: Collection[str] | None) -> Conversion:
        graph = ForwardGraph(self.fresh_copy(model, _device_of(model)))
        sites, skipped = graph.sites(KINDS)
        holders: dict[str, str] = {}
        converted: dict[str, Layer] = {}
        for site in sites:
            if modules is not None and site.module not in modules:
                continue
            reason = self._rewrite(graph, site, holders)
            if reason is None:
                converted[site.module] = Layer(site.module, site.kind)
            else:
                skipped.append({"module": site.module, "reason": reason})
        graph.finish(converted)
        # a fresh Python wrapper lists the holders added to the C++ module, so `.to()` reaches them
        model = wrap_cpp_module(graph.model._c)
        return Conversion(model, list(converted.values()), skipped, {"quantized_tensors": _storage(model)})

    def _holder(self, graph: ForwardGraph, path: str, holders: dict[str, str]) -> str:
        if path not in holders:
            module, _, parameter = path.rpartition(".")
            if parameter.isdigit():
                # an element of a scripted RNN's `_flat_weights`: name it by the RNN's parameter
                module = module.rpartition(".")[0]
                parameter = graph.resolve(module)._flat_weights_names[int(parameter)]
            holder = torch.jit.script(
                PackedWeight(
                    graph.tensor(path),
                    self.config.scheme,
                    self.config.group_size,
                    self.config.per_channel,
                    module,
                    parameter,
                )
            )
            holders[path] = graph.add_attribute(f"{module}_{parameter}", holder._c)
        return holders[path]

    def _weight_value(self, graph: ForwardGraph, path: str, before: torch._C.Node, holders: dict[str, str]):
        return _read_tensor(graph, self._holder(graph, path, holders), "weight", before)

    def _float_value(self, graph: ForwardGraph, path: str, tensor: Tensor, before: torch._C.Node):
        holder = torch.jit.script(KeptFloat(tensor))
        return _read_tensor(graph, graph.add_attribute(path, holder._c), "value", before)

    def _rewrite(self, graph: ForwardGraph, site: Site, holders: dict[str, str]) -> str | None:
        tensors = [graph.tensor(p) for p in site.weights]
        if any(t.dtype != torch.float32 for t in tensors):
            return "its weights are not float32"
        node = site.node
        if site.kind in ("LSTM", "GRU"):
            values = []
            for path, tensor in zip(site.weights, tensors):
                if tensor.dim() >= 2:
                    values.append(self._weight_value(graph, path, node, holders))
                else:  # biases stay float; a root copy lets the RNN's own parameters be released
                    values.append(self._float_value(graph, path, tensor, node))
            listed = graph.insert("prim::ListConstruct", values, node, [torch._C.ListType.ofTensors()])
            node.replaceInput(2, listed.output())
            return None
        index = 0 if site.kind == "Embedding" else 1
        node.replaceInput(index, self._weight_value(graph, site.weights[0], node, holders))
        return None

    def notes(self) -> dict[str, Any]:
        notes = {
            "compute": "float32: the file stores packed integers and scales, torch.jit.load restores float weights",
            "weights": "per-channel" if self.config.per_channel else "per-tensor",
        }
        if self.config.scheme == "weight_int4":
            notes["group_size"] = self.config.group_size
            notes["weights"] = "groups of group_size along each row (clamped to the row length)"
        if self.config.scheme == "binary":
            notes["weights"] = "sign × mean |w| per output channel" if self.config.per_channel else "sign × mean |w|"
        return notes
