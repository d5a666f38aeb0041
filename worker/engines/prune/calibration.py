"""Data-driven statistics the gradient and entropy criteria need: weight gradients of a saliency
loss over the calibration data, and per-channel activation entropy read from inside the graph."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from worker.engines.data import ModelData
from worker.engines.prune.groups import ChannelGroup

CALIBRATION_SAMPLES = 256
BATCH_SIZE = 32
ENTROPY_BINS = 32
SAMPLES_PER_CHANNEL = 16384


def first_float_tensor(output: Any) -> torch.Tensor:
    """The first floating-point tensor in a model output (tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        try:
            return first_float_tensor(item)
        except ValueError:
            continue
    raise ValueError("the model output holds no floating-point tensor")


def saliency_loss(output: Any, labels: torch.Tensor | None, teacher_output: Callable[[], Any]) -> torch.Tensor:
    """The loss whose gradient ranks weights for the `gradient` criterion.

    Cross-entropy against the labels when the data has them and the output is [batch, classes];
    otherwise the distance to the original model's outputs: cross-entropy against the teacher's
    predicted class for [batch, classes] outputs, else the squared error. A first-order score of a
    loss at its minimum is zero, so when the model still equals the teacher exactly the squared
    error is replaced by half the mean squared output (how strongly each weight moves the output).

    Args:
        output: the pruned model's output for a batch.
        labels: the batch's class ids, or None.
        teacher_output: computes the original model's output for the batch (called only if needed).

    Example:
        loss = saliency_loss(model(x), y, lambda: teacher(x))
    """
    prediction = first_float_tensor(output)
    if labels is not None and prediction.dim() == 2 and prediction.shape[0] == labels.shape[0]:
        return F.cross_entropy(prediction, labels)
    with torch.no_grad():
        target = first_float_tensor(teacher_output()).detach()
    if prediction.dim() == 2:
        return F.cross_entropy(prediction, target.argmax(dim=1))
    distance = F.mse_loss(prediction, target)
    return distance if float(distance) > 0.0 else 0.5 * prediction.pow(2).mean()


def accumulate_gradients(
    model: torch.jit.ScriptModule,
    data: ModelData,
    teacher: torch.jit.ScriptModule,
    device: torch.device,
    samples: int = CALIBRATION_SAMPLES,
) -> dict[str, torch.Tensor]:
    """Gradients of `saliency_loss` summed over the first `samples` calibration samples.

    Args:
        model: the model being pruned (left in eval mode; its gradients are cleared afterwards).
        data: calibration data (labels optional).
        teacher: the original model, the target when there are no labels.
        device: where to compute.

    Returns:
        {parameter name: accumulated gradient} for every parameter that received one.

    Example:
        grads = accumulate_gradients(model, ctx.training_data(), ctx.teacher, ctx.device)
        saliency = (model.fc.weight * grads["fc.weight"]).abs()
    """
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        model.eval()
        for batch in data.take(samples).batches(BATCH_SIZE, device):
            loss = saliency_loss(model(*batch.inputs), batch.labels, lambda: teacher(*batch.inputs))
            loss.backward()
        return {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(flags[name])


def channel_entropy(
    model: torch.jit.ScriptModule,
    graph: torch._C.Graph,
    groups: Sequence[ChannelGroup],
    data: ModelData,
    device: torch.device,
    samples: int = CALIBRATION_SAMPLES,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Shannon entropy of each channel's activations over the calibration data, per group.

    The group's activation sites (values of `graph`, the inlined forward graph the groups were
    found in) become extra outputs of that graph, which is modified in place, so the activations
    are read from the TorchScript program itself without hooks. A group with several sites (a
    residual stream) sums their entropies.

    Returns:
        {group id: [channels] entropies in nats}; groups without a capturable site are absent.

    Example:
        groups, graph = find_channel_groups(model, (x,))
        entropy = channel_entropy(model, graph, groups, ctx.training_data(), ctx.device)
    """
    sites: dict[int, tuple[torch._C.Value, int]] = {}
    for group in groups:
        for value, axis in group.sites:
            sites.setdefault(value.unique(), (value, axis))
    if not sites:
        return {}
    order = list(sites)
    original_outputs = len(list(graph.outputs()))
    for unique in order:
        graph.registerOutput(sites[unique][0])
    graph.makeMultiOutputIntoTuple()
    capture = torch._C._create_function_from_graph("capture_channel_activations", graph)

    generator = torch.Generator().manual_seed(seed)
    collected: dict[int, list[torch.Tensor]] = {unique: [] for unique in order}
    with torch.no_grad():
        for batch in data.take(samples).batches(BATCH_SIZE, device):
            outputs = capture(model._c, *batch.inputs)[original_outputs:]
            for unique, activation in zip(order, outputs):
                per_channel = activation.detach().float().movedim(sites[unique][1], 0).flatten(1).cpu()
                take = min(per_channel.shape[1], SAMPLES_PER_CHANNEL // 8)
                columns = torch.randperm(per_channel.shape[1], generator=generator)[:take]
                collected[unique].append(per_channel[:, columns])

    entropies = {
        unique: _histogram_entropy(torch.cat(parts, 1)[:, :SAMPLES_PER_CHANNEL])
        for unique, parts in collected.items()
        if parts
    }
    result = {}
    for group in groups:
        scores = [entropies[value.unique()] for value, _ in group.sites if value.unique() in entropies]
        if scores:
            result[group.id] = torch.stack(scores).sum(0)
    return result


def _histogram_entropy(values: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """Entropy of each row's histogram over its own [min, max] range (constant rows score 0)."""
    channels, count = values.shape
    low, high = values.min(1, keepdim=True).values, values.max(1, keepdim=True).values
    width = (high - low).clamp_min(1e-12)
    index = ((values - low) / width * bins).long().clamp_(0, bins - 1)
    index += torch.arange(channels).unsqueeze(1) * bins
    counts = torch.bincount(index.flatten(), minlength=channels * bins).view(channels, bins).float()
    p = counts / max(count, 1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    entropy[(high - low).squeeze(1) == 0] = 0.0
    return entropy.clamp_max(math.log(bins))
