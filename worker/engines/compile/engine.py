"""Lossless compilation: freeze, fold, fuse — and prove the file still computes the same.

`torch.jit.freeze` inlines parameters and submodules as constants, which lets its frozen-graph
passes remove dropout, fold BatchNorm and constant add/mul into the convolution before it,
pre-transpose linear weights and merge linear layers that share an input. On CUDA, conv+add+relu
are fused too. Only rewrites whose graph survives `torch.jit.save` and `torch.jit.load` are used
(`torch.jit.optimize_for_inference`'s MKL-DNN rewrites do not: that is a serving mode, not an
artifact). The compiled model is reloaded from its bytes here and compared with its input model
on the job's data, so a step called lossless cannot quietly be lossy.
"""

from __future__ import annotations

import io

import torch

from worker.engines.compile.config import CompileConfig
from worker.engines.errors import EngineError, model_text
from worker.engines.measure.quality import FLOAT_TOLERANCE, output_leaves
from worker.engines.pipeline import PipelineContext, StageOutput

# Samples the compiled model is checked on: enough to catch a wrong fold, cheap beside any step.
CHECK_SAMPLES = 64
# The ops that round float activations to int8 at run time (dynamic and static int8 schemes).
ACTIVATION_ROUNDING = frozenset(
    {
        "quantized::linear_dynamic",
        "aten::quantize_per_tensor",
        "aten::quantize_per_tensor_dynamic",
        "aten::quantized_lstm",
        "aten::quantized_gru",
    }
)


def compile_model(model: torch.jit.ScriptModule, config: CompileConfig, ctx: PipelineContext) -> StageOutput:
    """Freeze and optimize `model` (not modified); raise EngineError when that would change it.

    Raises:
        EngineError("compile_preserve_missing"): a `preserve` name is neither a method nor an attribute.
        EngineError("compile_failed"): freezing, saving or reloading the model failed.
        EngineError("compile_not_lossless"): the reloaded model's outputs differ beyond float tolerance.
    """
    missing = [name for name in config.preserve if not _has(model, name)]
    if missing:
        raise EngineError(
            "compile_preserve_missing",
            f"preserve names {', '.join(map(repr, missing))}, which the model has neither as a method nor as an "
            f"attribute; its methods are {', '.join(sorted(_methods(model))) or 'forward only'}",
        )
    ctx.progress(0.1, "freezing")
    nodes_before = _node_kinds(model)
    try:
        frozen = torch.jit.freeze(model.eval(), preserved_attrs=list(config.preserve))
        if ctx.device.type == "cuda":
            torch._C._jit_pass_fuse_frozen_conv_add_relu(frozen.graph)
        buffer = io.BytesIO()
        torch.jit.save(frozen, buffer)
        buffer.seek(0)
        compiled = torch.jit.load(buffer, map_location=ctx.device)
    except Exception as exc:  # noqa: BLE001 (torch raises many kinds; each is reported the same way)
        raise EngineError("compile_failed", f"the model could not be frozen and saved: {model_text(exc)}") from None
    ctx.progress(0.6, "checking the reloaded model against its input")
    worst = _check_same_outputs(model, compiled, ctx)
    nodes_after = _node_kinds(compiled)
    return StageOutput(
        compiled,
        {
            "layers": [],
            "skipped": [],
            "preserved": list(config.preserve),
            "max_abs_difference": worst,
            "batch_norms_left": nodes_after.get("aten::batch_norm", 0),
            "graph_nodes": {"before": sum(nodes_before.values()), "after": sum(nodes_after.values())},
        },
    )


def _compute_dtype(model: torch.jit.ScriptModule) -> torch.dtype:
    """The least precise type the model computes in: int8 where it rounds activations to int8, else
    the least precise float type its weights hold (a half-precision model with float32 inputs and
    outputs refolds in half)."""
    if ACTIVATION_ROUNDING & _node_kinds(model).keys():
        return torch.qint8
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t.dtype for t in tensors if t.is_floating_point() and t.dtype in FLOAT_TOLERANCE]
    return max(floats, key=lambda dtype: FLOAT_TOLERANCE[dtype][0], default=torch.float32)


def _check_same_outputs(model, compiled, ctx: PipelineContext) -> float:
    """The largest absolute difference between the two models' outputs on the job's data."""
    data = ctx.evaluation.take(min(CHECK_SAMPLES, ctx.evaluation.num_samples))
    precision = _compute_dtype(model)
    worst = 0.0
    with torch.inference_mode():
        for batch in data.batches(max(ctx.batch_sizes), ctx.device):
            try:
                expected, actual = model(*batch.inputs), compiled(*batch.inputs)
            except Exception as exc:  # noqa: BLE001
                raise EngineError(
                    "compile_failed", f"the compiled model does not run on the job's inputs: {model_text(exc)}"
                ) from None
            expected_leaves, actual_leaves = output_leaves(expected), output_leaves(actual)
            if [path for path, _ in expected_leaves] != [path for path, _ in actual_leaves]:
                raise EngineError("compile_not_lossless", "the compiled model's outputs have another structure")
            for (path, a), (_, b) in zip(expected_leaves, actual_leaves, strict=True):
                worst = max(worst, _compare(path or "output", a, b, precision))
    return worst


def _compare(path: str, expected, actual, precision: torch.dtype) -> float:
    if not isinstance(expected, torch.Tensor):
        if expected != actual:
            raise EngineError(
                "compile_not_lossless", f"{path}: the compiled model returns {actual!r}, not {expected!r}"
            )
        return 0.0
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        raise EngineError(
            "compile_not_lossless",
            f"{path}: the compiled model returns {actual.dtype} {tuple(actual.shape)}, "
            f"not {expected.dtype} {tuple(expected.shape)}",
        )
    if not expected.is_floating_point():
        if not torch.equal(expected, actual):
            raise EngineError("compile_not_lossless", f"{path}: the compiled model's {expected.dtype} output differs")
        return 0.0
    # The looser of the output's own precision and the one the model computes in.
    rtol, atol = max(FLOAT_TOLERANCE.get(expected.dtype, FLOAT_TOLERANCE[torch.float32]), FLOAT_TOLERANCE[precision])
    difference = (expected.double() - actual.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    if bool((difference > allowed).any()) or bool(torch.isnan(actual).ne(torch.isnan(expected)).any()):
        raise EngineError(
            "compile_not_lossless",
            f"{path}: the compiled model's outputs differ by up to {float(difference.nan_to_num().max()):.3g} "
            f"(allowed {atol:g} + {rtol:g}·|output|): folding changes this model's numerics beyond float "
            "tolerance, so compile is not lossless for it — drop the compile step",
        )
    return float(difference.nan_to_num().max())


def _has(model: torch.jit.ScriptModule, name: str) -> bool:
    return model._c._has_method(name) or hasattr(model, name)


def _methods(model: torch.jit.ScriptModule) -> list[str]:
    return [name for name in model._c._method_names() if not name.startswith("__")]


def _node_kinds(model: torch.jit.ScriptModule) -> dict[str, int]:
    """Node kinds of `forward` with submodule calls inlined (what actually runs)."""
    graph = model.forward.inlined_graph if hasattr(model.forward, "inlined_graph") else model.graph
    counts: dict[str, int] = {}
    for node in graph.nodes():
        counts[node.kind()] = counts.get(node.kind(), 0) + 1
    return counts
