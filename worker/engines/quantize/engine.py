"""The `quantize` step around any scheme: exclusions, per-layer sensitivity, `min_fidelity`, report."""

from __future__ import annotations

from collections.abc import Collection

import torch

from worker.engines.errors import EngineError
from worker.engines.modules import is_excluded
from worker.engines.pipeline import PipelineContext, StageOutput
from worker.engines.quantize.config import QuantizeConfig
from worker.engines.quantize.fidelity import Fidelity, FidelityProbe
from worker.engines.quantize.scheme import Conversion, Layer, Scheme, make_scheme

# samples scored per layer when measuring sensitivity (one conversion and one pass per layer)
SENSITIVITY_SAMPLES = 32


def quantize_model(model: torch.jit.ScriptModule, config: QuantizeConfig, ctx: PipelineContext) -> StageOutput:
    """Quantize a TorchScript model with `config`, holding `config.min_fidelity` when set.

    Fidelity is measured against `model` (this step's input) on `ctx.evaluation`.

    Args:
        model: the step's input model (not modified).
        config: the parsed step.
        ctx: the pipeline context (evaluation / calibration data, device, progress).

    Returns:
        StageOutput whose `details` hold `layers` (every candidate layer with `precision`,
        `sensitivity` and, when kept in float, a `reason`), `skipped`, `fidelity` and the scheme's notes.

    Raises:
        EngineError: `calibration_required`, `nothing_quantized`, `fidelity_unreachable`.

    Example:
        out = quantize_model(model, QuantizeConfig("dynamic_int8"), ctx)
        torch.jit.save(out.model, "model_int8.pt")
    """
    scheme = make_scheme(config, ctx)
    scheme.check(model)
    ctx.progress(0.0, f"{config.scheme}: finding layers")
    everything = scheme.convert(model, None)
    candidates = everything.converted
    excluded = {layer.module for layer in candidates if is_excluded(layer.module, config.exclude)}
    eligible = [layer for layer in candidates if layer.module not in excluded]
    if not eligible:
        why = "every convertible layer is excluded" if candidates else "the model has no layer this scheme converts"
        raise EngineError("nothing_quantized", f"{config.scheme}: {why}"
                          + "".join(f"; {s['module']}: {s['reason']}" for s in everything.skipped[:5]))

    probe = FidelityProbe.for_model(model, ctx.evaluation, ctx.device)
    ctx.progress(0.1, f"{config.scheme}: converting {len(eligible)} layers")
    conversion = everything if not excluded else scheme.convert(model, _names(eligible))
    fidelity = probe.measure(conversion.model, scheme.device)
    sensitivity: dict[str, tuple[float, float]] = {}
    kept_for_fidelity: set[str] = set()
    if config.min_fidelity is not None:
        sensitivity = _sensitivities(scheme, model, eligible, probe, ctx)
        if probe.score(fidelity) < config.min_fidelity:
            conversion, fidelity, kept_for_fidelity = _hold_fidelity(
                scheme, model, eligible, sensitivity, probe, config.min_fidelity, ctx)

    ctx.progress(1.0, f"{config.scheme}: done")
    converted = {layer.module for layer in conversion.converted}
    skipped = _unique(everything.skipped + conversion.skipped)
    failed = {row["module"]: row["reason"] for row in skipped}
    layers = []
    for layer in candidates:
        row = {"module": layer.module, "kind": layer.kind,
               "precision": scheme.precision if layer.module in converted else "float32",
               "sensitivity": sensitivity[layer.module][0] if layer.module in sensitivity else None}
        if layer.module in excluded:
            row["reason"] = "excluded by the step's exclude patterns"
        elif layer.module in kept_for_fidelity:
            row["reason"] = f"kept in float to hold min_fidelity {config.min_fidelity}"
        elif layer.module not in converted:
            row["reason"] = failed.get(layer.module, "not converted")
        layers.append(row)
    details = {
        "scheme": config.scheme,
        "layers": layers,
        "skipped": skipped,
        "quantized_layers": len(converted),
        "fidelity": {**fidelity.as_dict(), "metric": probe.metric, "score": probe.score(fidelity),
                     "reference": "this step's input model", "samples": probe.data.num_samples},
        **scheme.notes(),
        **conversion.details,
    }
    return StageOutput(conversion.model, details)


def _names(layers: Collection[Layer]) -> set[str]:
    return {layer.module for layer in layers}


def _unique(rows: list[dict]) -> list[dict]:
    """Report rows without repeats (a layer used at several places is skipped once)."""
    seen = {}
    for row in rows:
        seen.setdefault((row["module"], row["reason"]), row)
    return list(seen.values())


def _sensitivities(scheme: Scheme, model: torch.jit.ScriptModule, layers: list[Layer], probe: FidelityProbe,
                   ctx: PipelineContext) -> dict[str, tuple[float, float]]:
    """Each layer's sensitivity: how much the fidelity score (then the mean cosine, to break
    ties of top-1 agreement) drops when it alone is converted, on a smaller slice of the data."""
    small = probe.subset(SENSITIVITY_SAMPLES)
    result = {}
    for i, layer in enumerate(layers):
        ctx.progress(0.1 + 0.6 * i / len(layers), f"sensitivity of {layer.module or 'the model'}")
        fidelity = small.measure(scheme.convert(model, {layer.module}).model, scheme.device)
        result[layer.module] = (1.0 - small.score(fidelity), 1.0 - fidelity.cosine_mean)
    return result


def _hold_fidelity(scheme: Scheme, model: torch.jit.ScriptModule, layers: list[Layer],
                   sensitivity: dict[str, tuple[float, float]],
                   probe: FidelityProbe, target: float, ctx: PipelineContext) -> tuple[Conversion, Fidelity, set[str]]:
    """Keep the k most sensitive layers in float, for the smallest k (binary search) that holds `target`."""
    order = sorted(layers, key=lambda layer: sensitivity[layer.module], reverse=True)
    best: tuple[Conversion, Fidelity, set[str]] | None = None
    low, high = 1, len(order) - 1
    while low <= high:
        k = (low + high) // 2
        ctx.progress(0.7 + 0.3 * (1 - (high - low) / max(len(order), 1)), f"keeping {k} layers in float")
        kept = _names(order[:k])
        conversion = scheme.convert(model, _names(order[k:]))
        fidelity = probe.measure(conversion.model, scheme.device)
        if probe.score(fidelity) >= target:
            best, high = (conversion, fidelity, kept), k - 1
        else:
            low = k + 1
    if best is None:
        raise EngineError("fidelity_unreachable",
                          f"{probe.metric} {target} is not reached even with only the least sensitive layer "
                          f"quantized ({order[-1].module or 'the model'}); lower min_fidelity or use another scheme")
    return best
