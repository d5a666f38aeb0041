"""Physically removing channels from a TorchScript model: smaller parameters and buffers set on the
submodules, depthwise `groups` constants rewritten, and a run on an example batch that must give
the original's output shapes, or the offending groups are put back."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from worker.engines.errors import model_text
from worker.engines.modules import clone_model
from worker.engines.prune.groups import ChannelGroup
from worker.engines.prune.torchscript import set_conv_groups

Plan = Mapping[int, Sequence[int]]


def output_signature(output: Any) -> Any:
    """The structure of a model output with tensors replaced by (shape, dtype)."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape), output.dtype
    if isinstance(output, (tuple, list)):
        return type(output).__name__, tuple(output_signature(item) for item in output)
    if isinstance(output, dict):
        return "dict", tuple((key, output_signature(value)) for key, value in output.items())
    return type(output).__name__


def planned_drops(groups: Sequence[ChannelGroup], plan: Plan) -> dict[str, dict[int, set[int]]]:
    """The entries a plan removes from each tensor: {parameter or buffer name: {dim: indices}}.

    Example:
        planned_drops(groups, {0: [1]})  # {"conv1.weight": {0: {1}}, "bn1.running_mean": {0: {1}}, …}
    """
    by_id = {group.id: group for group in groups}
    drops: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for group_id, channels in plan.items():
        for s in by_id[group_id].slices if channels else ():
            drops[s.key][s.dim].update(s.entries(channels))
    return drops


def remove_channels(
    model: torch.jit.ScriptModule, groups: Sequence[ChannelGroup], plan: Plan
) -> torch.jit.ScriptModule:
    """A copy of `model` without the planned channels; the original is left untouched.

    Args:
        model: the TorchScript model the groups were found in.
        groups: channel groups, indexed by `group.id`.
        plan: group id → channel indices (of that group) to remove.

    Returns:
        a freshly compiled copy (save/load round trip, so edited `groups` constants take effect).

    Example:
        smaller = remove_channels(model, groups, {0: [1, 5], 3: [0]})
    """
    pruned = clone_model(model)
    modules = dict(pruned.named_modules())
    by_id = {group.id: group for group in groups}
    new_groups = {
        module: by_id[group_id].channels - len(set(channels))
        for group_id, channels in plan.items()
        if channels
        for module in by_id[group_id].depthwise
    }

    for key, dims in planned_drops(groups, plan).items():
        module_name, _, attr = key.rpartition(".")
        module = modules[module_name]
        tensor = getattr(module, attr)
        smaller = tensor.detach()
        for dim, drop in dims.items():
            keep = torch.tensor(
                [i for i in range(smaller.shape[dim]) if i not in drop], dtype=torch.long, device=smaller.device
            )
            smaller = smaller.index_select(dim, keep)
        if isinstance(tensor, nn.Parameter):
            setattr(module, attr, nn.Parameter(smaller.clone(), requires_grad=tensor.requires_grad))
        else:
            setattr(module, attr, smaller.clone())
    for module_name, groups_count in new_groups.items():
        set_conv_groups(modules[module_name], groups_count)
    return clone_model(pruned)


def run_check(model: torch.jit.ScriptModule, example_inputs: Sequence[torch.Tensor], expected: Any) -> str | None:
    """None when the model runs on the example batch with the expected output signature,
    else a one-line reason."""
    try:
        with torch.no_grad():
            signature = output_signature(model(*example_inputs))
    except Exception as exc:  # any TorchScript runtime failure means the group must be reverted
        return f"the shrunk model failed to run ({model_text(exc, limit=200)})"
    if signature != expected:
        return f"the shrunk model's output changed from {expected} to {signature}"
    return None


def remove_channels_checked(
    model: torch.jit.ScriptModule, groups: Sequence[ChannelGroup], plan: Plan, example_inputs: Sequence[torch.Tensor]
) -> tuple[torch.jit.ScriptModule, dict[int, str]]:
    """`remove_channels`, verified on an example batch; groups that break the model are reverted.

    The whole plan is tried first; if the shrunk model fails, each group is tried alone and the
    failing ones are dropped, then the rest are re-added one by one while the model still runs.

    Returns:
        (the pruned model, {reverted group id: reason}).

    Example:
        pruned, reverted = remove_channels_checked(model, groups, plan, (x,))
    """
    with torch.no_grad():
        expected = output_signature(model(*example_inputs))

    def attempt(trial: Plan) -> tuple[torch.jit.ScriptModule | None, str | None]:
        try:
            candidate = remove_channels(model, groups, trial)
        except ValueError as exc:
            return None, f"its layers could not be rewritten ({exc})"
        reason = run_check(candidate, example_inputs, expected)
        return (candidate, None) if reason is None else (None, reason)

    pruned, reason = attempt(plan)
    if pruned is not None:
        return pruned, {}
    reverted: dict[int, str] = {}
    for group_id in plan:
        _, reason = attempt({group_id: plan[group_id]})
        if reason is not None:
            reverted[group_id] = reason
    accepted: dict[int, Sequence[int]] = {}
    pruned = clone_model(model)
    for group_id in (g for g in plan if g not in reverted):
        candidate, reason = attempt({**accepted, group_id: plan[group_id]})
        if candidate is None:
            reverted[group_id] = f"{reason} together with the other groups"
        else:
            accepted[group_id], pruned = plan[group_id], candidate
    return pruned, reverted
