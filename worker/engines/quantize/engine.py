"""The `quantize` step around any scheme: exclusions, `min_fidelity`'s search, per-layer sensitivity, report."""

from __future__ import annotations

import io
from collections.abc import Collection
from typing import NamedTuple

import torch

from worker.engines.errors import EngineError
from worker.engines.measure.quality import FidelityProbe, fidelity_score
from worker.engines.modules import is_excluded
from worker.engines.pipeline import PipelineContext, StageOutput
from worker.engines.quantize.config import QuantizeConfig
from worker.engines.quantize.scheme import Conversion, Layer, Scheme, make_scheme
from worker.engines.quantize.sensitivity import weight_error

# samples scored when measuring one layer's sensitivity (one conversion and one pass per layer)
SENSITIVITY_SAMPLES = 32
# layers kept in float for min_fidelity whose sensitivity alone is measured for the report
MEASURED_LIMIT = 8
# what `min_fidelity`'s search demands above the target, so that the artifact still holds it where
# its kernels differ from the worker's: the same int8 artifact loaded under each quantized engine of
# this torch (x86, fbgemm, onednn, qnnpack) scored up to 1.7e-4 lower in cosine min than where it was
# made (static int8 TinyResNet under fbgemm; 5 zoo models × dynamic / static int8 on digits and
# random tokens, AMD EPYC with VNNI, torch 2.13). 5e-4 is about three times that worst drop.
FIDELITY_MARGIN = 5e-4
# key of `Conversion.details` under which a scheme lists layers it chose to keep in float
# (`[{"module", "kind", "reason"}]`, e.g. measured slower in int8); the step reports them as layers
KEPT_FLOAT = "kept_float"


class _Candidate(NamedTuple):
    """A conversion, the model it becomes after a save / load round trip, and that model's fidelity."""

    conversion: Conversion
    artifact: torch.jit.ScriptModule
    fidelity: dict[str, float | None]


def quantize_model(model: torch.jit.ScriptModule, config: QuantizeConfig, ctx: PipelineContext) -> StageOutput:
    """Quantize a TorchScript model with `config`, holding `config.min_fidelity` when set.

    Fidelity is measured against `model` (this step's input) on every sample of `ctx.evaluation`,
    always on the converted model after a `torch.jit.save` / `torch.jit.load` round trip: the
    artifact as the user downloads it, which is also what the step returns. The figure held is
    `fidelity_score`'s (top-1 agreement with labels and class scores, else cosine min), the one the
    report shows. When the fully converted model misses `min_fidelity` + `FIDELITY_MARGIN`, layers
    are ranked by a cheap proxy (int8 error of their weights, `sensitivity.py`) and a binary search
    finds the fewest top-ranked layers to keep in float, each candidate measured the same way
    (about log2(layers) conversions).

    Args:
        model: the step's input model (not modified).
        config: the parsed step.
        ctx: the pipeline context (evaluation / calibration data, device, progress).

    Returns:
        StageOutput with the reloaded artifact, whose `details` hold `layers` (every candidate layer
        with `precision`, `sensitivity` — measured for layers kept in float by `min_fidelity`, else
        None —, `sensitivity_proxy` when `min_fidelity` is set, and a `reason` when kept in float),
        `skipped`, `fidelity` (of the reloaded artifact, with `metric`, `score`, `samples`),
        `fidelity_search` (when `min_fidelity` is set) and the scheme's notes.

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
    kept_by_scheme = everything.details.get(KEPT_FLOAT, [])
    excluded = {layer.module for layer in candidates if is_excluded(layer.module, config.exclude)}
    eligible = [layer for layer in candidates if layer.module not in excluded]
    if not eligible:
        why = "every convertible layer is excluded" if candidates else "the model has no layer this scheme converts"
        raise EngineError(
            "nothing_quantized",
            f"{config.scheme}: {why}"
            + "".join(f"; {s['module']}: {s['reason']}" for s in (kept_by_scheme + everything.skipped)[:5]),
        )

    probe = FidelityProbe(model, ctx.evaluation, ctx.device)
    ctx.progress(0.1, f"{config.scheme}: converting {len(eligible)} layers")
    result = _measured(everything if not excluded else scheme.convert(model, _names(eligible)), probe, scheme)
    proxies: dict[str, float | None] = {}
    measured: dict[str, float] = {}
    kept_for_fidelity: list[Layer] = []
    search: dict = {}
    if config.min_fidelity is not None:
        target = min(config.min_fidelity + FIDELITY_MARGIN, 1.0)
        proxies = {
            layer.module: weight_error(model, layer.module, layer.kind, config.per_channel) for layer in eligible
        }
        search = {
            "proxy": "relative RMS error of the layer's weights rounded to int8",
            "target": target,
            "margin": FIDELITY_MARGIN,
            "conversions": 1,
            "tried": {"0": _score(result)},
        }
        if _score(result) < target:
            metric = fidelity_score(result.fidelity)[0]
            result, kept_for_fidelity, measured = _hold_fidelity(
                scheme, model, eligible, proxies, probe, metric, target, ctx, search
            )
            search["measured"] = (
                f"drop of {metric} on "
                f"{min(SENSITIVITY_SAMPLES, probe.num_samples)} samples with the layer alone converted"
            )

    ctx.progress(1.0, f"{config.scheme}: done")
    conversion = result.conversion
    converted = {layer.module for layer in conversion.converted}
    skipped = _unique(everything.skipped + conversion.skipped)
    failed = {row["module"]: row["reason"] for row in skipped}
    kept = _names(kept_for_fidelity)
    layers = []
    for layer in candidates:
        row = {
            "module": layer.module,
            "kind": layer.kind,
            "precision": scheme.precision if layer.module in converted else "float32",
            "sensitivity": measured.get(layer.module),
        }
        if proxies:
            row["sensitivity_proxy"] = proxies.get(layer.module)
        if layer.module in excluded:
            row["reason"] = "excluded by the step's exclude patterns"
        elif layer.module in kept:
            row["reason"] = f"kept in float to hold min_fidelity {config.min_fidelity}"
        elif layer.module not in converted:
            row["reason"] = failed.get(layer.module, "not converted")
        layers.append(row)
    for row in kept_by_scheme:
        reason = (
            "excluded by the step's exclude patterns" if is_excluded(row["module"], config.exclude) else row["reason"]
        )
        layers.append(
            {
                "module": row["module"],
                "kind": row["kind"],
                "precision": "float32",
                "sensitivity": None,
                "reason": reason,
            }
        )
    metric, score = fidelity_score(result.fidelity)
    details = {
        "scheme": config.scheme,
        "layers": layers,
        "skipped": skipped,
        "quantized_layers": len(converted),
        "fidelity": {
            **result.fidelity,
            "metric": metric,
            "score": score,
            "reference": "this step's input model",
            "measured_on": "the step's output after torch.jit.save and torch.jit.load, as downloaded",
            "samples": probe.num_samples,
        },
        **({"fidelity_search": search} if search else {}),
        **scheme.notes(),
        **{key: value for key, value in conversion.details.items() if key != KEPT_FLOAT},
    }
    return StageOutput(result.artifact, details)


def _measured(conversion: Conversion, probe: FidelityProbe, scheme: Scheme) -> _Candidate:
    """`conversion` saved and reloaded (in memory), and the fidelity of that reloaded model.

    Measured on the reloaded model, not the one conversion built: loading re-packs int8 weights for
    the loading process's kernels, and that is the model a user runs.
    """
    buffer = io.BytesIO()
    torch.jit.save(conversion.model, buffer)
    buffer.seek(0)
    artifact = torch.jit.load(buffer, map_location=scheme.device).eval()
    return _Candidate(conversion, artifact, probe.measure(artifact, scheme.device))


def _score(candidate: _Candidate) -> float:
    return fidelity_score(candidate.fidelity)[1]


def _names(layers: Collection[Layer]) -> set[str]:
    return {layer.module for layer in layers}


def _unique(rows: list[dict]) -> list[dict]:
    """Report rows without repeats (a layer used at several places is skipped once)."""
    seen = {}
    for row in rows:
        seen.setdefault((row["module"], row["reason"]), row)
    return list(seen.values())


def _measured_sensitivities(
    scheme: Scheme, model: torch.jit.ScriptModule, layers: list[Layer], probe: FidelityProbe, ctx: PipelineContext
) -> dict[str, float]:
    """Each layer's measured sensitivity: how much the fidelity score drops when it alone is
    converted, on a smaller slice of the data (one conversion per layer)."""
    small = probe.subset(SENSITIVITY_SAMPLES)
    result = {}
    for i, layer in enumerate(layers):
        ctx.progress(0.9 + 0.1 * i / len(layers), f"sensitivity of {layer.module or 'the model'}")
        result[layer.module] = 1.0 - _score(_measured(scheme.convert(model, {layer.module}), small, scheme))
    return result


def _hold_fidelity(
    scheme: Scheme,
    model: torch.jit.ScriptModule,
    layers: list[Layer],
    proxies: dict[str, float | None],
    probe: FidelityProbe,
    metric: str,
    target: float,
    ctx: PipelineContext,
    search: dict,
) -> tuple[_Candidate, list[Layer], dict[str, float]]:
    """Keep the k top-ranked layers in float, for the smallest k that holds `target`, then hand back
    to int8 those of them that turn out not to matter.

    Layers rank by `proxies` (highest first; those without a proxy last). Kept counts 1, 2, 4, …
    are tried until one holds, then a binary search below it (2·log2(k) conversions; a few layers
    usually suffice). The search assumes more layers in float never lowers fidelity; every result it
    returns was measured on the probe, reloaded as the user will load it. The proxy can rank a
    harmless layer high, so each kept layer's own sensitivity is measured and, least sensitive
    first, layers are converted back while the target still holds. `search` receives the
    conversions made (single-layer ones included) and the score of each kept set tried.

    Returns:
        the chosen candidate, the layers kept in float, and the measured sensitivities.
    """
    order = sorted(
        layers, key=lambda layer: -1.0 if proxies[layer.module] is None else proxies[layer.module], reverse=True
    )
    if len(order) < 2:
        _unreachable(metric, target, order[-1])

    def trial(quantized: list[Layer], label: str) -> _Candidate | None:
        ctx.progress(min(0.2 + 0.1 * search["conversions"], 0.8), f"trying {label} in float")
        candidate = _measured(scheme.convert(model, _names(quantized)), probe, scheme)
        search["conversions"] += 1
        search["tried"][label] = _score(candidate)
        return candidate if _score(candidate) >= target else None

    best: _Candidate | None = None
    low, k = 1, 1
    while best is None:
        k = min(k, len(order) - 1)
        best = trial(order[k:], f"top {k}")
        if best is None:
            if k == len(order) - 1:
                _unreachable(metric, target, order[-1])
            low, k = k + 1, 2 * k
    high, kept = k - 1, order[:k]
    while low <= high:
        k = (low + high) // 2
        result = trial(order[k:], f"top {k}")
        if result is None:
            low = k + 1
        else:
            best, high, kept = result, k - 1, order[:k]

    measured = _measured_sensitivities(scheme, model, kept[:MEASURED_LIMIT], probe, ctx)
    search["conversions"] += len(measured)
    for layer in sorted(kept[:MEASURED_LIMIT], key=lambda layer: measured[layer.module]):
        fewer = [other for other in kept if other != layer]
        if not fewer:
            break
        result = trial([other for other in order if other not in fewer], f"top {len(kept)} but {layer.module}")
        if result is None:
            break  # the others are at least as sensitive on their own
        best, kept = result, fewer
    return best, kept, measured


def _unreachable(metric: str, target: float, last: Layer) -> None:
    raise EngineError(
        "fidelity_unreachable",
        f"{metric} {target:g} (min_fidelity with its margin for other kernels) is "
        f"not reached even with only the lowest-ranked layer quantized ({last.module or 'the model'}); "
        "lower min_fidelity or use another scheme",
    )
