"""A job's ONNX artifact: exported from the compressed model, quantized by ONNX Runtime where the
pipeline quantized to int8, and offered only once ONNX Runtime has loaded it and its outputs were
checked on the job's data.

torch's quantized ops (`quantized::linear_dynamic`, `quantized::conv2d`, …) have no ONNX export, so
an int8 pipeline is exported from its model *before* the quantize step (earlier steps applied) and
quantized with `onnxruntime.quantization`: dynamically for dynamic_int8 (Linear-heavy models,
transformers, RNNs), statically in QDQ form with the calibration set for static_int8 (CNNs). The
layers the quantize step kept in float stay in float here too, and `min_fidelity` is checked again
on the ONNX file as ONNX Runtime loads it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError, model_text
from worker.engines.export.runtime import ort_session, run_session
from worker.engines.export.smoothing import ALPHA, reader_counts, smooth_matmuls, smoothable
from worker.engines.measure.quality import FidelityAccumulator, fidelity_score, flatten_outputs
from worker.engines.quantize.engine import FIDELITY_MARGIN
from worker.engines.step_config import StepConfig

OPSET = 17
EXPORTER = "torch.onnx.export, TorchScript-based (dynamo=False)"
# A float export must reproduce the TorchScript artifact this closely (top-1 agreement, else cosine
# min): ONNX Runtime's float kernels differ from torch's by rounding only (about 1e-7 on the zoo).
FLOAT_AGREEMENT = 0.999
# the int8 schemes whose ONNX form ONNX Runtime's quantizer makes, and how
INT8_METHODS = {"dynamic_int8": "dynamic", "static_int8": "static"}
# steps that may follow an int8 quantize step without changing what the ONNX file must compute
LOSSLESS_OPS = ("compile",)
# ONNX ops the dynamic quantizer converts; Gemm is rewritten to MatMul + Add first (the exporter
# writes a Linear on 2-D inputs as Gemm, which quantize_dynamic leaves in float; the static one
# quantizes Gemm itself). No Conv: like
# torch's dynamic_int8, dynamic quantization is for Linear-heavy models (ConvInteger is slow).
DYNAMIC_OPS = ["MatMul", "Gather", "LSTM", "GRU", "Attention"]
CALIBRATION_SAMPLES = 256
# how a sensitive layer is kept for min_fidelity, cheapest first (the report's `tried` keys)
SMOOTHED, INT8_WEIGHTS, FLOAT = "smoothed", "in float, int8 weights", "in float"
BATCH = 64


class OnnxUnavailable(Exception):
    """Why the job offers no ONNX file (the job still succeeds with its TorchScript artifact)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Plan:
    """Which model is exported and how it is quantized."""

    source: torch.jit.ScriptModule
    exported_from: str
    method: str | None = None  # "dynamic", "static" or None (the export is offered as it is)
    scheme: str | None = None
    per_channel: bool = True
    min_fidelity: float | None = None
    keep_float: list[str] = field(default_factory=list)
    user_float: set[str] = field(default_factory=set)  # kept float by `exclude` or by the scheme: fully float
    ranked: list[str] = field(default_factory=list)  # the other quantized layers, most sensitive first


def build_onnx_artifact(
    models: Sequence[torch.jit.ScriptModule],
    steps: Sequence[StepConfig],
    stage_details: Sequence[dict],
    evaluation: ModelData,
    calibration: ModelData | None,
    path: str | Path,
    threads: int = 1,
) -> dict:
    """Export a job's result to ONNX at `path`, validated in ONNX Runtime; a report section.

    Args:
        models: the input of each step, then the result: `models[i]` went into `steps[i]`, and
            `models[-1]` is the TorchScript artifact (so `len(models) == len(steps) + 1`).
        steps: the parsed steps.
        stage_details: each step's `details` (a quantize step's `layers` say which stayed float).
        evaluation: the data the outputs are compared on (the report's evaluation data).
        calibration: static int8's calibration data (else the evaluation data is used).
        path: where the ONNX file is written (nothing is left there when it is missing).
        threads: ONNX Runtime's intra-op threads (the job's share).

    Returns:
        `{"missing": reason}` when no file is offered (the export failed, ONNX Runtime refused it,
        its outputs disagree); else the file's `precision`, `inputs`, `outputs` (with `batch` and
        `sequence` axes), `quantization`, `fidelity` (against the TorchScript artifact) and, when
        quantized, `fidelity_to_source` (against the quantize step's input, as `min_fidelity` is).

    Example:
        section = build_onnx_artifact([model, int8], [QuantizeConfig("dynamic_int8")], [details], data, None, "m.onnx")
    """
    path = Path(path)
    try:
        plan = _plan(models, steps, stage_details)
        return _build(plan, models[-1], evaluation, calibration or evaluation, path, threads)
    except OnnxUnavailable as exc:
        for leftover in (path, _float_path(path), _smoothed_path(path)):
            leftover.unlink(missing_ok=True)
        return {"missing": exc.reason}


def export_onnx(model: torch.jit.ScriptModule, example: ModelData) -> bytes:
    """The ONNX bytes of a TorchScript model, with a dynamic batch axis on every input and output
    and a dynamic `sequence` axis (axis 1) on integer inputs of two or more axes (token ids, masks).

    Inputs are named as in a dataset `.npz` (`input`, `input_1`, …), outputs `output`, `output_1`, ….

    Raises:
        OnnxUnavailable: the exporter cannot express the model (its message, bounded).
    """
    # the TorchScript-based exporter inlines the graph of the module it is given, in place: a
    # quantize step run on that module afterwards found no layers to fold or fuse and ran 2x slower
    model = _private_copy(model)
    inputs = tuple(t.to(_device_of(model)) for t in example.inputs)
    input_names = [_io_name("input", i) for i in range(len(inputs))]
    with torch.inference_mode():
        outputs = flatten_outputs(model(*inputs))
    output_names = [_io_name("output", i) for i in range(len(outputs))]
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in input_names + output_names}
    for name, tensor in zip(input_names, inputs):
        if not tensor.is_floating_point() and tensor.dtype != torch.bool and tensor.dim() >= 2:
            axes[name][1] = "sequence"
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                inputs,
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    except MemoryError:
        raise
    except Exception as exc:
        raise OnnxUnavailable(f"{EXPORTER} cannot export this model: {model_text(exc)}") from None
    return buffer.getvalue()


def _build(
    plan: _Plan,
    artifact: torch.jit.ScriptModule,
    evaluation: ModelData,
    calibration: ModelData,
    path: Path,
    threads: int,
) -> dict:
    import onnx

    float_model = onnx.load_from_string(export_onnx(plan.source, evaluation.take(2)))
    section: dict = {
        "file": path.name,
        "exporter": EXPORTER,
        "opset": OPSET,
        "exported_from": plan.exported_from,
        "inputs": _signature(float_model.graph.input),
        "outputs": _signature(float_model.graph.output),
        "notes": [],
    }
    if plan.method is None:
        _save(float_model, path)
        session = _loaded(path, threads)
        agreement = _fidelity(session, artifact, evaluation)
        metric, score = fidelity_score(agreement)
        if score < FLOAT_AGREEMENT:
            raise OnnxUnavailable(
                f"ONNX Runtime's outputs disagree with the TorchScript artifact ({metric} {score:.6f} < "
                f"{FLOAT_AGREEMENT}), so the export is not offered"
            )
        return {
            **section,
            "precision": _precision(float_model),
            "quantization": None,
            "fidelity": {**agreement, "metric": metric, "score": score, "reference": "the TorchScript artifact"},
        }

    if plan.method == "dynamic":
        float_model = _gemm_as_matmul(float_model)
    float_path = _float_path(path)
    _save(float_model, float_path)
    nodes = _nodes_by_module(plan.source, float_model)
    target = None if plan.min_fidelity is None else min(plan.min_fidelity + FIDELITY_MARGIN, 1.0)
    keep = list(plan.keep_float)
    tried: dict[str, float] = {}
    added = 0
    while True:
        # The layers min_fidelity marks sensitive are tried cheapest first: int8 with their input
        # smoothed (dynamic int8; int8 speed), then int8 weights dequantized to float at run time
        # (float arithmetic, int8 size; MiniLM's layer.0.output.dense: 0.9898 cosine min so, 0.9912
        # with weights per input channel), then fully float.
        sensitive = [module for module in keep if module not in plan.user_float]
        sensitive_nodes = {node for module in sensitive for node in nodes.get(module, [])}
        modes = [FLOAT]
        if sensitive_nodes:
            modes = [INT8_WEIGHTS, FLOAT]
            if plan.method == "dynamic" and smoothable(float_model, sensitive_nodes):
                modes.insert(0, SMOOTHED)
        for mode in modes:
            in_float = keep if mode != SMOOTHED else [m for m in keep if m in plan.user_float]
            excluded = sorted({node for module in in_float for node in nodes.get(module, [])})
            smoothed, int8_weights = [], []
            source = float_path
            if mode == SMOOTHED:
                rewritten = _copy(float_model)
                smoothed = smooth_matmuls(rewritten, sensitive_nodes, calibration, threads)
                source = _smoothed_path(path)
                _save(rewritten, source)
            _quantize(plan, source, path, excluded, calibration)
            if mode == INT8_WEIGHTS:
                int8_weights = _weights_as_int8(path, sensitive_nodes)
            session = _loaded(path, threads)
            to_source = _fidelity(session, plan.source, evaluation)
            metric, score = fidelity_score(to_source)
            tried[f"{len(keep) - len(in_float) if mode == SMOOTHED else len(keep)} {mode}"] = score
            if target is None or score >= target:
                break
        else:
            remaining = [module for module in plan.ranked if module not in keep and module in nodes]
            if not remaining:
                _smoothed_path(path).unlink(missing_ok=True)
                return _float_instead(
                    section, float_path, path, plan, artifact, evaluation, threads, metric, score, target
                )
            added = max(1, 2 * added)
            keep += remaining[:added]
            continue
        break
    _smoothed_path(path).unlink(missing_ok=True)
    float_path.unlink(missing_ok=True)
    agreement = _fidelity(session, artifact, evaluation)
    unmatched = [module for module in keep if module not in nodes]
    quantization = {
        "method": f"onnxruntime.quantization.quantize_{plan.method}",
        "scheme": plan.scheme,
        "format": "QDQ" if plan.method == "static" else "QOperator (integer ops)",
        "per_channel": plan.per_channel,
        "modules_in_float": in_float,
        "nodes_in_float": excluded,
        "nodes_with_int8_weights_in_float": int8_weights,
        "modules_smoothed": [m for m in keep if m not in in_float],
        "nodes_smoothed": smoothed,
        "smoothing": {"method": "SmoothQuant", "alpha": ALPHA} if smoothed else None,
        "modules_without_onnx_node": unmatched,
    }
    if plan.min_fidelity is not None:
        quantization["min_fidelity"] = {"target": target, "margin": FIDELITY_MARGIN, "tried": tried}
    if len(keep) > len(plan.keep_float):
        how = "smoothed" if smoothed else "in float"
        section["notes"].append(
            f"ONNX int8 kept {len(keep) - len(plan.keep_float)} more layer(s) {how} than the TorchScript "
            f"artifact kept in float to hold min_fidelity {plan.min_fidelity}"
        )
    return {
        **section,
        "precision": "int8",
        "quantization": quantization,
        "fidelity": {**agreement, **_scored(agreement), "reference": "the TorchScript artifact"},
        "fidelity_to_source": {
            **to_source,
            "metric": metric,
            "score": score,
            "reference": "the quantize step's input model (what min_fidelity holds to)",
        },
    }


def _weights_as_int8(path: Path, node_names: set[str]) -> list[str]:
    """Rewrite the float MatMuls `node_names` of the ONNX file at `path` to read int8 weights through
    a DequantizeLinear (symmetric, one scale per input or per output channel, whichever rounds the
    weights with less error): int8's size, float's arithmetic. Returns the nodes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    readers = reader_counts(model)
    rewritten, nodes = [], []
    for node in model.graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        weight = initializers.get(weight_name) if weight_name else None
        if node.name not in node_names or weight is None or readers[weight_name] != 1 or len(weight.dims) != 2:
            nodes.append(node)
            continue
        array = numpy_helper.to_array(weight).astype(np.float32)
        best = None
        for axis in (0, 1):
            scale = np.abs(array).max(axis=1 - axis, keepdims=True) / 127.0
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            quantized = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
            error = float(np.square(quantized * scale - array).sum())
            if best is None or error < best[0]:
                best = (error, axis, quantized, scale.reshape(-1))
        _, axis, quantized, scale = best
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{weight_name}_int8"),
                numpy_helper.from_array(scale, f"{weight_name}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{weight_name}_zero"),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{weight_name}_int8", f"{weight_name}_scale", f"{weight_name}_zero"],
                [f"{weight_name}_dequantized"],
                name=f"{node.name}_weight_DequantizeLinear",
                axis=axis,
            )
        )
        node.input[1] = f"{weight_name}_dequantized"
        nodes.append(node)
        rewritten.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _save(model, path)
    return sorted(rewritten)


def _float_instead(section, float_path, path, plan, artifact, evaluation, threads, metric, score, target) -> dict:
    """The float export offered when no int8 form holds min_fidelity (the quantize step's promise)."""
    float_path.replace(path)
    agreement = _fidelity(_loaded(path, threads), artifact, evaluation)
    note = (
        f"ONNX Runtime's int8 form reached {metric} {score:.4f} < {target:g} even with every ranked layer "
        f"in float, so the ONNX file is the float model before the {plan.scheme} step"
    )
    return {
        **section,
        "precision": "float32",
        "quantization": None,
        "fidelity": {**agreement, **_scored(agreement), "reference": "the TorchScript artifact"},
        "notes": [*section["notes"], note],
    }


def _plan(models: Sequence[torch.jit.ScriptModule], steps: Sequence[StepConfig], details: Sequence[dict]) -> _Plan:
    quantize = [i for i, step in enumerate(steps) if step.op == "quantize"]
    last = quantize[-1] if quantize else None
    if last is None or steps[last].scheme not in INT8_METHODS:
        return _Plan(source=models[-1], exported_from="the TorchScript artifact")
    later = [step.op for step in steps[last + 1 :] if step.op not in LOSSLESS_OPS]
    if later:
        raise OnnxUnavailable(
            f"the {', '.join(later)} step(s) after {steps[last].scheme} change the int8 model itself, which "
            "ONNX Runtime's quantizer cannot reproduce from a float export"
        )
    step = steps[last]
    layers = details[last].get("layers", [])
    keep = [row["module"] for row in layers if row.get("precision") == "float32"]
    for_fidelity = {row["module"] for row in layers if str(row.get("reason", "")).startswith("kept in float to hold")}
    ranked = sorted(
        (row for row in layers if row.get("sensitivity_proxy") is not None and row["module"] not in keep),
        key=lambda row: -row["sensitivity_proxy"],
    )
    return _Plan(
        source=models[last],
        exported_from=f"the input of step {last + 1} ({step.scheme}), quantized by ONNX Runtime",
        method=INT8_METHODS[step.scheme],
        scheme=step.scheme,
        per_channel=step.per_channel,
        min_fidelity=step.min_fidelity,
        keep_float=keep,
        user_float=set(keep) - for_fidelity,
        ranked=[row["module"] for row in ranked],
    )


def _quantize(plan: _Plan, source: Path, target: Path, excluded: list[str], calibration: ModelData) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if plan.method == "dynamic":
                quantize_dynamic(
                    source,
                    target,
                    op_types_to_quantize=DYNAMIC_OPS,
                    per_channel=plan.per_channel,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    extra_options=options,
                )
            else:
                quantize_static(
                    source,
                    target,
                    _CalibrationReader(calibration.take(CALIBRATION_SAMPLES)),
                    quant_format=QuantFormat.QDQ,
                    per_channel=plan.per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    extra_options=options,
                )
    except MemoryError:
        raise
    except Exception as exc:
        raise OnnxUnavailable(
            f"ONNX Runtime's quantize_{plan.method} failed on the exported model: {model_text(exc)}"
        ) from None


class _CalibrationReader:
    """Calibration batches as ONNX Runtime's quantize_static reads them (a CalibrationDataReader)."""

    def __init__(self, data: ModelData):
        self._names = [_io_name("input", i) for i in range(len(data.inputs))]
        self._batches: Iterator = data.batches(BATCH)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {name: t.detach().cpu().numpy() for name, t in zip(self._names, batch.inputs)}


def _loaded(path: Path, threads: int):
    try:
        return ort_session(path, threads)
    except Exception as exc:
        raise OnnxUnavailable(f"ONNX Runtime does not load the exported file: {model_text(exc)}") from None


def _fidelity(session, reference: torch.jit.ScriptModule, data: ModelData) -> dict:
    """Fidelity of the session's outputs to `reference`'s on every sample of `data`."""
    accumulator = FidelityAccumulator(class_scores=data.labels is not None)
    device = _device_of(reference)
    with torch.inference_mode():
        for batch in data.batches(BATCH):
            expected = reference(*(t.to(device) for t in batch.inputs))
            try:
                outputs = run_session(session, batch.inputs)
                accumulator.update(flatten_outputs(expected), outputs)
            except EngineError as exc:
                raise OnnxUnavailable(f"the ONNX file's outputs do not match the model's: {exc.message}") from None
            except Exception as exc:
                raise OnnxUnavailable(f"ONNX Runtime cannot run the exported file: {model_text(exc)}") from None
    return {**accumulator.result(), "samples": data.num_samples}


def _scored(result: dict) -> dict:
    metric, score = fidelity_score(result)
    return {"metric": metric, "score": score}


def _nodes_by_module(model: torch.jit.ScriptModule, graph_model) -> dict[str, list[str]]:
    """ONNX node names per module name, matched by weights: a node reading an initializer that holds
    one of the module's weight matrices is that module's. Names would not do (a traced and reloaded
    model exports as `/MatMul_12`), nor exact bytes: the exporter transposes a Linear's weight and
    folds BatchNorm into the Conv before it, which scales each output channel. So weights compare
    by output channel, each scaled to unit norm with its sign fixed."""
    from onnx import numpy_helper

    readers: dict[str, list[str]] = {}
    for node in graph_model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    by_shape: dict[tuple, list[tuple[np.ndarray, str]]] = {}
    for init in graph_model.graph.initializer:
        if init.name not in readers or len(init.dims) < 2:
            continue
        array = numpy_helper.to_array(init)
        if array.dtype != np.float32:
            continue
        for rows in (array.reshape(array.shape[0], -1), array.T if array.ndim == 2 else None):
            if rows is not None:
                by_shape.setdefault(rows.shape, []).append((_channels(rows), init.name))
    result: dict[str, list[str]] = {}
    for module, owner in model.named_modules():
        found: set[str] = set()
        for weight in owner.parameters(recurse=False):
            if weight.dim() < 2 or not weight.is_floating_point():
                continue
            rows = weight.detach().float().cpu().numpy().reshape(weight.shape[0], -1)
            canonical = _channels(rows)
            for candidate, name in by_shape.get(rows.shape, []):
                if np.allclose(candidate, canonical, atol=1e-4):
                    found.update(readers[name])
        if found and module:
            result[module] = sorted(found)
    return result


def _channels(rows: np.ndarray) -> np.ndarray:
    """Each row (output channel) at unit norm, its largest element positive."""
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms == 0, 1.0, norms)
    signs = np.sign(rows[np.arange(rows.shape[0]), np.abs(rows).argmax(axis=1)])
    return rows * np.where(signs == 0, 1.0, signs)[:, None]


def _gemm_as_matmul(model):
    """Every Gemm on a constant weight (alpha = beta = 1, no transposed input) as MatMul + Add, the
    form ONNX Runtime's dynamic quantizer converts; the outputs are the same."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or len(node.input) < 2
            or node.input[1] not in initializers
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
            or attributes.get("transA", 0)
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attributes.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        weight_name = f"{node.input[1]}_as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _signature(values) -> list[dict]:
    """Each graph input or output: its name and shape, a dynamic axis by its name (`batch`)."""
    return [
        {
            "name": value.name,
            "shape": [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim],
        }
        for value in values
    ]


def _precision(model) -> str:
    """The precision of the weights of an exported graph: float16 (an fp16 artifact), else float32."""
    from onnx import TensorProto

    if any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer):
        return "float16"
    return "float32"


def _save(model, path: Path) -> None:
    import onnx

    try:
        onnx.save_model(model, str(path))
    except ValueError as exc:  # over protobuf's 2 GiB
        raise OnnxUnavailable(f"the ONNX file cannot be written: {exc}"[:300]) from None


def _float_path(path: Path) -> Path:
    return path.with_name(path.stem + ".float.onnx")


def _smoothed_path(path: Path) -> Path:
    return path.with_name(path.stem + ".smoothed.onnx")


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _private_copy(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location=_device_of(model))


def _device_of(model: torch.jit.ScriptModule) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _io_name(prefix: str, index: int) -> str:
    return prefix if index == 0 else f"{prefix}_{index}"
