"""The pipeline: runs a job's steps in order, each on the output of the one before.

Each op (`prune`, `quantize`, `distill`, `compile`) is a config type (a `StepConfig`) and the handler
registered for it with `register_step`; steps are dispatched by config type, so handlers receive
typed configs, and adding a method never touches this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.step_config import StepConfig

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
        batch_sizes: the batch sizes the job is benchmarked (and will be served) at; a step that
            decides by speed decides for these.
    """

    teacher: torch.jit.ScriptModule
    calibration: ModelData | None
    evaluation: ModelData
    device: torch.device = torch.device("cpu")
    progress: ProgressFn = lambda fraction, message: None
    load_model: Callable[[str], torch.jit.ScriptModule] | None = None
    seed: int = 0
    batch_sizes: tuple[int, ...] = (1,)

    def training_data(self) -> ModelData:
        """The data a data-driven step learns from: calibration data, else evaluation data."""
        return self.calibration if self.calibration is not None else self.evaluation


StepHandler = Callable[[torch.jit.ScriptModule, Any, PipelineContext], StageOutput]
_HANDLERS: dict[type[StepConfig], StepHandler] = {}


def register_step(config_type: type[StepConfig]) -> Callable[[StepHandler], StepHandler]:
    """Register the handler that runs steps of `config_type` (`@register_step(QuantizeConfig)`)."""

    def decorate(handler: StepHandler) -> StepHandler:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def step_configs() -> dict[str, type[StepConfig]]:
    """Every registered op and its config type, e.g. {"prune": PruneConfig, ...}."""
    _load_engines()
    return {config_type.op: config_type for config_type in _HANDLERS}


def parse_step(step: dict) -> StepConfig:
    """The typed config of a JobSpec step dict (`{"op": "prune", ...}`), checked.

    Raises:
        EngineError("unsupported_step"): no engine runs this op.
        EngineError("invalid_step"): the step's fields are wrong (see `StepConfig.from_step`).
    """
    config_type = step_configs().get(step.get("op"))
    if config_type is None:
        raise EngineError("unsupported_step", f"step op {step.get('op')!r} is not supported by this worker")
    return config_type.from_step(step)


def step_handler(config_type: type[StepConfig]) -> StepHandler:
    """The handler of a config type, importing the engine packages that register them on first use."""
    _load_engines()
    try:
        return _HANDLERS[config_type]
    except KeyError:
        raise EngineError("unsupported_step", f"no engine runs {config_type.__name__} steps") from None


def _load_engines() -> None:
    import importlib

    for package in (
        "worker.engines.quantize",
        "worker.engines.prune",
        "worker.engines.distill",
        "worker.engines.compile",
    ):
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name != package:
                raise


def run_step(model: torch.jit.ScriptModule, step: StepConfig | dict, ctx: PipelineContext) -> StageOutput:
    """Run one step on `model`: a config, or a JobSpec step dict parsed with `parse_step` first.

    Example:
        out = run_step(model, PruneConfig(structure="channel", amount=0.3), ctx)
    """
    config = parse_step(step) if isinstance(step, dict) else step
    return step_handler(type(config))(model, config, ctx)
