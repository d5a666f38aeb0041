"""Re-estimating BatchNorm running statistics after pruning: each BatchNorm's input is read from
inside the TorchScript program, compared with the original model's, and where pruning changed it
the running mean and variance are replaced by the statistics of the calibration data.

Pruning changes what reaches every BatchNorm downstream, while their running statistics still
describe the unpruned model: on a trained TinyResNet, channel pruning at amount 0.3 drops top-1
to chance until they are re-estimated."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from worker.engines.data import ModelData
from worker.engines.pipeline import PipelineContext
from worker.engines.prune.config import PruneConfig
from worker.engines.prune.torchscript import argument, attribute_path, inlined_forward

BN_SAMPLES = 256
BATCH_SIZE = 32
# A BatchNorm whose input moved by less than this, in units of its normalised output, keeps the
# statistics it was trained with (estimated on the whole training set, better than ours).
TOLERANCE = 1e-3
VARIANCE_FLOOR = 1e-5  # BatchNorm's default eps: below it the variance no longer matters


@dataclass(frozen=True)
class RunningStats:
    """Where one BatchNorm keeps its running statistics: buffer names in `named_buffers()`."""

    mean: str
    var: str

    @property
    def module(self) -> str:
        return self.mean.rpartition(".")[0]


class Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)
    in float64, so the result is the exact statistic of everything added."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, activation: torch.Tensor) -> None:
        """Add one BatchNorm input, channels on axis 1 (`[N, C]` or `[N, C, ...]`)."""
        values = activation.detach().float()
        axes = [0, *range(2, values.dim())]
        count = values.numel() // values.shape[1]
        var, mean = torch.var_mean(values, dim=axes, correction=0)
        mean, m2 = mean.double(), var.double() * count
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        """The unbiased variance, as BatchNorm stores it."""
        return self.m2 / max(self.count - 1, 1)


def batchnorm_calls(graph: torch._C.Graph) -> dict[RunningStats, list[torch._C.Node]]:
    """Every `aten::batch_norm` with running statistics in an inlined forward graph, by the buffers
    it reads, in program order (loops and branches included; a module called twice has two nodes).

    Example:
        calls = batchnorm_calls(inlined_forward(model))
        [stats.module for stats in calls]  # ["stem.1", "layer1.0.bn1", …]
    """
    calls: dict[RunningStats, list[torch._C.Node]] = {}

    def visit(block: torch._C.Block) -> None:
        for node in block.nodes():
            for inner in node.blocks():
                visit(inner)
            if node.kind() != "aten::batch_norm":
                continue
            mean, var = (attribute_path(argument(node, name)) for name in ("running_mean", "running_var"))
            if mean is not None and var is not None:
                calls.setdefault(RunningStats(mean, var), []).append(node)

    visit(graph.block())
    return calls


def batchnorm_input_moments(
    model: torch.jit.ScriptModule, wanted: Collection[RunningStats], data: ModelData, device: torch.device
) -> dict[RunningStats, Moments]:
    """Per-channel moments of the inputs of the given BatchNorms over `data`, every call counted.

    Each call's input is cloned (later in-place ops cannot alter it) and appended to a list; the
    lists replace the outputs of a copy of the forward graph and dead-code elimination drops
    what they do not need, so the values come from the TorchScript program itself, computed only
    as far as the last wanted BatchNorm: traced graphs with `training=False` baked in and calls
    inside loops and branches included, without hooks or train mode.

    Returns:
        {stats: moments}; a BatchNorm the data never reached has `count == 0`.

    Example:
        graph = inlined_forward(model)
        moments = batchnorm_input_moments(model, batchnorm_calls(graph), data, torch.device("cpu"))
    """
    graph = inlined_forward(model)
    calls = batchnorm_calls(graph)
    wanted = set(wanted)
    order = [stats for stats in calls if stats in wanted]
    moments = {stats: Moments() for stats in order}
    if not order:
        return moments
    for position in reversed(range(len(list(graph.outputs())))):
        graph.eraseOutput(position)
    top = next(iter(graph.nodes()))
    for stats in order:
        captured = graph.create("prim::ListConstruct")
        captured.output().setType(torch._C.ListType.ofTensors())
        captured.insertBefore(top)
        for node in calls[stats]:
            with graph.insert_point_guard(node):
                graph.insert(
                    "aten::append", [captured.output(), graph.insert("aten::clone", [argument(node, "input")])]
                )
        graph.registerOutput(captured.output())
    torch._C._jit_pass_dce(graph)
    graph.makeMultiOutputIntoTuple()
    capture = torch._C._create_function_from_graph("capture_batchnorm_inputs", graph)
    with torch.no_grad():
        for batch in data.batches(BATCH_SIZE, device):
            for stats, inputs in zip(order, capture(model._c, *batch.inputs)):
                for activation in inputs:
                    moments[stats].add(activation)
    return moments


def recalibrate_after_pruning(
    original: torch.jit.ScriptModule,
    pruned: torch.jit.ScriptModule,
    config: PruneConfig,
    ctx: PipelineContext,
    kept: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """The `bn_recalibration` part of a prune step: `recalibrate_batchnorm` on the job's calibration
    data unless the step disables it (`recalibrate_bn: false`) or the job has none.

    Only a calibration dataset is used: without one the evaluation inputs may be synthetic, and
    statistics fitted to them (or to the data that later measures accuracy) would mislead.

    Returns:
        the details of `recalibrate_batchnorm`, or `{"ran": False, "reason": …}`.

    Example:
        details["bn_recalibration"] = recalibrate_after_pruning(model, pruned, config, ctx)
    """
    if not config.recalibrate_bn:
        return {"ran": False, "reason": "disabled by the step (recalibrate_bn: false)"}
    if ctx.calibration is None:
        return {"ran": False, "reason": "the job has no calibration dataset to estimate BatchNorm statistics on"}
    ctx.progress(0.8, "re-estimating BatchNorm statistics")
    return recalibrate_batchnorm(pruned, original, ctx.calibration, ctx.device, kept)


def recalibrate_batchnorm(
    pruned: torch.jit.ScriptModule,
    original: torch.jit.ScriptModule,
    data: ModelData,
    device: torch.device,
    kept: Mapping[str, torch.Tensor] | None = None,
    samples: int = BN_SAMPLES,
) -> dict:
    """Replace stale BatchNorm running statistics of a pruned model, in place, in program order.

    A BatchNorm channel is stale when its input on the calibration data differs from the
    original model's: downstream of a layer that lost input channels, of a changed weight, or of
    an already re-estimated BatchNorm. A channel directly after a layer that only lost output
    channels sees the same values and keeps the statistics it was trained with. Stale channels
    get the exact mean and unbiased variance of their input over the first `samples` calibration
    samples (BatchNorm with momentum=None over one pass). The BatchNorms are read one at a time in
    program order, each after the ones before it were updated, so every one sees the re-estimated
    earlier ones; each pass only runs the graph up to the BatchNorm it reads.

    Args:
        pruned: the pruned model; its running_mean/running_var buffers are overwritten.
        original: the model before pruning (left as it was).
        data: calibration data.
        device: where to compute.
        kept: for a running_mean buffer that lost channels, the original indices it kept
            (absent: all of them).
        samples: how many calibration samples to use.

    Returns:
        JSON-safe details: `ran`, `samples`, `updated` (how many BatchNorms changed),
        `updated_modules`, `unchanged_modules`, `unreached_modules` (never called on the data).

    Example:
        details = recalibrate_batchnorm(pruned, model, ctx.calibration, ctx.device)
    """
    data = data.take(samples)
    kept = kept or {}
    modes = {model: model.training for model in (pruned, original)}
    updated, unchanged, unreached = [], [], []
    try:
        for model in modes:
            model.eval()  # a scripted BatchNorm in train mode would update its statistics while read
        order = list(batchnorm_calls(inlined_forward(pruned)))
        reference = batchnorm_input_moments(original, order, data, device)
        for stats in order:
            current = batchnorm_input_moments(pruned, [stats], data, device)[stats]
            if current.count == 0:
                unreached.append(stats.module)
                continue
            stale = _stale_channels(current, reference.get(stats), kept.get(stats.mean))
            if stale.any():
                _set_running_stats(pruned, stats, current, stale)
                updated.append(stats.module)
            else:
                unchanged.append(stats.module)
    finally:
        for model, training in modes.items():
            model.train(training)
    return {
        "ran": True,
        "samples": data.num_samples,
        "updated": len(updated),
        "updated_modules": updated,
        "unchanged_modules": unchanged,
        "unreached_modules": unreached,
    }


def _stale_channels(current: Moments, reference: Moments | None, kept: torch.Tensor | None) -> torch.Tensor:
    """True for each channel whose input moved by more than TOLERANCE of its normalised output."""
    everything = torch.ones_like(current.mean, dtype=torch.bool)
    if reference is None or reference.count != current.count:
        return everything
    mean, var = reference.mean, reference.var
    if kept is not None:
        mean, var = mean[kept.to(mean.device)], var[kept.to(var.device)]
    if mean.shape != current.mean.shape:
        return everything
    shift = (current.mean - mean).abs() / (var + VARIANCE_FLOOR).sqrt()
    stretch = (current.var - var).abs() / (var + VARIANCE_FLOOR)
    return (shift > TOLERANCE) | (stretch > 2 * TOLERANCE)


def _set_running_stats(
    model: torch.jit.ScriptModule, stats: RunningStats, moments: Moments, channels: torch.Tensor
) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in ((stats.mean, moments.mean), (stats.var, moments.var)):
            buffer = buffers[name]
            buffer.copy_(torch.where(channels.to(buffer.device), value.to(buffer), buffer))
