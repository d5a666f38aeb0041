"""The pipeline: runs a job's steps in order, each on the output of the one before.

Each op (`prune`, `quantize`, `distill`) is a handler registered with `register_step`; the
pipeline knows nothing of their internals, so adding a method never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError

ProgressFn = Callable[[float, str], None]


@dataclass
class StageOutput:
    """What a step returns: the new model and JSON-safe details for the report.

    `details` holds at least `layers` (one dict per layer the step touched) and `skipped`
    (`[{"module", "reason"}]` for what it left alone and why); a step may add more keys.
    """

    model: torch.jit.ScriptModule
    details: dict[str, Any] = field(default_factory=lambda: {"layers": [], "skipped": []})


@dataclass
class PipelineContext:
    """Everything a step may use besides the model it transforms.

    Attributes:
        teacher: the original uploaded model (never modified; the baseline and distillation teacher).
        calibration: calibration / training data, or None when the job has no dataset.
        evaluation: evaluation data (the eval dataset, the calibration set, or synthetic inputs).
        device: where the step computes.
        progress: `progress(fraction_of_this_step, message)`; cheap to call often.
        load_model: loads another uploaded model by id (a distillation student).
        seed: the seed every random choice derives from (reproducible runs).
    """

    teacher: torch.jit.ScriptModule
    calibration: ModelData | None
    evaluation: ModelData
    device: torch.device = torch.device("cpu")
    progress: ProgressFn = lambda fraction, message: None
    load_model: Callable[[str], torch.jit.ScriptModule] | None = None
    seed: int = 0

    def training_data(self) -> ModelData:
        """The data a data-driven step learns from: calibration data, else evaluation data."""
        return self.calibration if self.calibration is not None else self.evaluation


StepHandler = Callable[[torch.jit.ScriptModule, dict, PipelineContext], StageOutput]
_HANDLERS: dict[str, StepHandler] = {}


def register_step(op: str) -> Callable[[StepHandler], StepHandler]:
    """Register the handler of one step op (`@register_step("quantize")`)."""

    def decorate(handler: StepHandler) -> StepHandler:
        _HANDLERS[op] = handler
        return handler

    return decorate


def step_handler(op: str) -> StepHandler:
    """The handler of `op`, importing the engine packages that register them on first use."""
    _load_engines()
    try:
        return _HANDLERS[op]
    except KeyError:
        raise EngineError("unsupported_step", f"step op {op!r} is not supported by this worker") from None


def _load_engines() -> None:
    import importlib

    for package in ("worker.engines.quantize", "worker.engines.prune", "worker.engines.distill"):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name != package:
                raise


def run_step(model: torch.jit.ScriptModule, step: dict, ctx: PipelineContext) -> StageOutput:
    """Run one step (a dict of the JobSpec `steps` list) on `model`."""
    return step_handler(step["op"])(model, step, ctx)
