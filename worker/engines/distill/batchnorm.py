"""BatchNorm during distillation: making traced BatchNorm layers honour train/eval mode (the
β·Σ|γ| penalty on their scales is pruning's `bn_scale_penalty`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from worker.engines.modules import clone_model, named_modules_of_kind
from worker.engines.prune.regularization import BATCH_NORM_KINDS

# aten::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
_RUNNING_MEAN_INPUT = 3
_TRAINING_INPUT = 5


def make_batchnorm_mode_aware(model: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, dict]:
    """Let traced BatchNorm use batch statistics in `.train()` and running ones in `.eval()`.

    Tracing records BatchNorm's `training` flag as a constant (False for a model traced in eval
    mode), so `.train()` alone would leave the running statistics frozen: wrong for a pruned
    student whose activations have shifted, and no normalisation at all for an untrained one.
    In every forward graph of the model (each module's own, and graphs other engines inlined into
    a parent), a constant flag of `aten::batch_norm` is replaced by a read of the `training`
    attribute of the module that owns the running statistics, as scripted BatchNorm does; eval
    outputs are unchanged. Scripted BatchNorm already reads the attribute and is left alone.

    Args:
        model: a TorchScript module (traced or scripted).

    Returns:
        (model, report): an edited copy (`model` itself is never changed) when some op was edited,
        else `model`. The report gives the number of BatchNorm `layers`, the `edited_ops` now
        following the mode, and the `frozen_ops` whose constant flag could not be tied to a
        module (they keep their traced mode).

    Example:
        student, report = make_batchnorm_mode_aware(student)
        student.train()  # BatchNorm now normalises with batch statistics and updates its running ones
    """
    layers = sum(1 for _ in named_modules_of_kind(model, BATCH_NORM_KINDS))
    ops = list(_constant_mode_batchnorms(model))
    frozen = sum(1 for _, _, owner in ops if owner is None)
    if frozen == len(ops):
        return model, {"layers": layers, "edited_ops": 0, "frozen_ops": frozen}
    edited = clone_model(model)
    for graph, node, owner in _constant_mode_batchnorms(edited):
        if owner is not None:
            _read_training_flag(graph, owner, node)
    # TorchScript compiles a method once and keeps the plan: only a reload runs the edited code
    report = {"layers": layers, "edited_ops": len(ops) - frozen, "frozen_ops": frozen}
    return clone_model(edited), report


def _constant_mode_batchnorms(
    model: torch.jit.ScriptModule,
) -> Iterator[tuple[torch._C.Graph, torch._C.Node, torch._C.Value | None]]:
    """Every batch_norm op with a constant `training` flag: its graph, node and statistics owner."""
    for module in model.modules():
        if not module._c._has_method("forward"):
            continue
        graph = module._c._get_method("forward").graph
        for node in graph.findAllNodes("aten::batch_norm"):
            if node.inputsAt(_TRAINING_INPUT).node().kind() == "prim::Constant":
                yield graph, node, _statistics_owner(node)


def _statistics_owner(node: torch._C.Node) -> torch._C.Value | None:
    """The module value whose `running_mean` attribute feeds this batch_norm, if it is one."""
    source = node.inputsAt(_RUNNING_MEAN_INPUT).node()
    if source.kind() == "prim::GetAttr" and source.s("name") == "running_mean":
        return source.input()
    return None


def _read_training_flag(graph: torch._C.Graph, owner: torch._C.Value, node: torch._C.Node) -> None:
    read = graph.create("prim::GetAttr", [owner])
    read.s_("name", "training")
    read.output().setType(torch._C.BoolType.get())
    read.insertBefore(node)
    node.replaceInput(_TRAINING_INPUT, read.output())
