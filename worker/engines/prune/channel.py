"""Channel (structured) pruning of a TorchScript model: find the channel groups, score them with the
chosen criterion, pick the channels to drop, shrink the layers and report what changed and why
some groups were left alone."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch

from worker.engines.modules import is_excluded, module_kind
from worker.engines.pipeline import PipelineContext, StageOutput
from worker.engines.prune.batchnorm import recalibrate_after_pruning
from worker.engines.prune.calibration import accumulate_gradients, channel_entropy
from worker.engines.prune.config import PruneConfig
from worker.engines.prune.dependency import find_channel_groups
from worker.engines.prune.groups import ChannelGroup
from worker.engines.prune.importance import (
    BNScaleImportance,
    EntropyImportance,
    Importance,
    MagnitudeImportance,
    TaylorImportance,
)
from worker.engines.prune.selection import channels_to_remove
from worker.engines.prune.shrink import planned_drops, remove_channels_checked

EXAMPLE_BATCH = 2
STALE_CONSTANTS_NOTE = (
    "TorchScript keeps compile-time constants such as out_channels or in_features at their "
    "pre-pruning values; the parameter shapes define the computation."
)

ImportanceFactory = Callable[[torch.jit.ScriptModule, torch._C.Graph, list[ChannelGroup], PipelineContext], Importance]


def _tensors(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return dict(chain(model.named_parameters(), model.named_buffers()))


IMPORTANCE: dict[str, ImportanceFactory] = {
    "l1": lambda model, graph, groups, ctx: MagnitudeImportance(_tensors(model), p=1),
    "l2": lambda model, graph, groups, ctx: MagnitudeImportance(_tensors(model), p=2),
    "bn_scale": lambda model, graph, groups, ctx: BNScaleImportance(_tensors(model)),
    "gradient": lambda model, graph, groups, ctx: TaylorImportance(
        _tensors(model), accumulate_gradients(model, ctx.training_data(), ctx.teacher, ctx.device)
    ),
    "entropy": lambda model, graph, groups, ctx: EntropyImportance(
        channel_entropy(model, graph, groups, ctx.training_data(), ctx.device, seed=ctx.seed)
    ),
}


def prune_channels(model: torch.jit.ScriptModule, config: PruneConfig, ctx: PipelineContext) -> StageOutput:
    """Remove whole channels (and everything coupled to them) from a traced or scripted model.

    Args:
        model: the TorchScript model; it is not modified.
        config: structure `channel`, with criterion, amount, scope, exclude and recalibrate_bn.
        ctx: supplies calibration data (an example batch, gradients, activations, BatchNorm
            statistics) and the device.

    Returns:
        the smaller model (same inputs and output structure) and details: `layers` (shapes
        before/after), `groups` (channels kept), `skipped` (module, reason), parameter counts,
        `bn_recalibration` (whether BatchNorm statistics were re-estimated, and which).

    Example:
        out = prune_channels(model, PruneConfig("channel", amount=0.5), ctx)
        torch.jit.save(out.model, "pruned.pt")
    """
    example = tuple(t.to(ctx.device) for t in ctx.training_data().take(EXAMPLE_BATCH).inputs)
    ctx.progress(0.05, "analysing channel dependencies")
    groups, graph = find_channel_groups(model, example)
    skipped = {g.id: reason for g in groups if (reason := _why_not_prunable(g, model, config))}
    candidates = [g for g in groups if g.id not in skipped]

    ctx.progress(0.2, f"scoring {len(candidates)} channel groups by {config.criterion}")
    importance = IMPORTANCE[config.criterion](model, graph, candidates, ctx)
    scores = {}
    for group in candidates:
        score = importance(group)
        if score is None:
            skipped[group.id] = importance.unscored_reason
        else:
            scores[group.id] = score
    plan = channels_to_remove(scores, config.amount, config.scope)

    ctx.progress(0.6, f"removing channels from {sum(1 for c in plan.values() if c)} groups")
    pruned, reverted = remove_channels_checked(model, groups, plan, example)
    skipped.update(reverted)
    plan = {gid: channels for gid, channels in plan.items() if gid not in reverted and channels}
    recalibration = recalibrate_after_pruning(model, pruned, config, ctx, _kept_rows(model, groups, plan))
    ctx.progress(1.0, "channel pruning done")
    return StageOutput(
        pruned, {**_details(model, pruned, groups, plan, skipped, config), "bn_recalibration": recalibration}
    )


def _kept_rows(
    model: torch.jit.ScriptModule, groups: list[ChannelGroup], plan: dict[int, list[int]]
) -> dict[str, torch.Tensor]:
    """For each tensor that lost entries along dim 0, the original indices it kept."""
    tensors = _tensors(model)
    return {
        name: torch.tensor([i for i in range(tensors[name].shape[0]) if i not in dims[0]])
        for name, dims in planned_drops(groups, plan).items()
        if 0 in dims
    }


def _why_not_prunable(group: ChannelGroup, model: torch.jit.ScriptModule, config: PruneConfig) -> str:
    if group.reasons:
        return "; ".join(group.reasons)
    if group.channels <= 1:
        return "it has a single channel"
    excluded = [m for m in group.modules if is_excluded(m, config.exclude)]
    if excluded:
        return f"it includes the excluded module '{excluded[0]}'"
    return _shared_code_reason(group, model)


def _shared_code_reason(group: ChannelGroup, model: torch.jit.ScriptModule) -> str:
    """Scripting compiles identical modules into one type, and a depthwise conv's `groups` lives in
    that shared code: it can only change if every module of the type changes with it."""
    if not group.depthwise:
        return ""
    types = {name: module._c._type().qualified_name() for name, module in model.named_modules()}
    for name in group.depthwise:
        sharing = [
            other for other, qualified in types.items() if qualified == types[name] and other not in group.depthwise
        ]
        if sharing:
            return f"the depthwise '{name}' shares its compiled code (and groups constant) with '{sharing[0]}'"
    return ""


def _details(
    model: torch.jit.ScriptModule,
    pruned: torch.jit.ScriptModule,
    groups: list[ChannelGroup],
    plan: dict[int, list[int]],
    skipped: dict[int, str],
    config: PruneConfig,
) -> dict:
    by_id = {g.id: g for g in groups}
    before, after = _tensors(model), _tensors(pruned)
    modules = dict(model.named_modules())
    touched = sorted({s.module for gid in plan for s in by_id[gid].slices})
    layers = [
        {
            "module": name,
            "kind": module_kind(modules[name]),
            "weight_shape_before": list(before[f"{name}.weight"].shape),
            "weight_shape_after": list(after[f"{name}.weight"].shape),
        }
        for name in touched
        if f"{name}.weight" in before
    ]
    return {
        "layers": layers,
        "skipped": [
            {"module": producer, "reason": reason}
            for gid, reason in sorted(skipped.items())
            for producer in by_id[gid].producers
        ],
        "groups": [
            by_id[gid].describe(kept=by_id[gid].channels - len(channels)) for gid, channels in sorted(plan.items())
        ],
        "criterion": config.criterion,
        "scope": config.scope,
        "amount": config.amount,
        "parameters_before": sum(p.numel() for p in model.parameters()),
        "parameters_after": sum(p.numel() for p in pruned.parameters()),
        "notes": [STALE_CONSTANTS_NOTE],
    }
