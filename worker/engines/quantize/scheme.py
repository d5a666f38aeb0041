"""The interface every quantization scheme implements, and the registry the step picks one from.

A scheme knows which layers it can convert and how to convert a chosen subset of them; the step
(`engine.py`) owns everything around it: exclusions, sensitivity, `min_fidelity` and the report.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engines.pipeline import PipelineContext
from worker.engines.quantize.config import QuantizeConfig


@dataclass(frozen=True)
class Layer:
    """A module a scheme can convert: its dotted name and kind (`Linear`, `LSTM`, …)."""

    module: str
    kind: str


@dataclass
class Conversion:
    """A converted copy of a model: which layers were converted, what was left and why, and
    scheme-specific facts about this copy for the report."""

    model: torch.jit.ScriptModule
    converted: list[Layer]
    skipped: list[dict] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Scheme(abc.ABC):
    """One quantization method.

    Subclasses set `precision` (the label of converted layers in the report) and implement
    `convert`; `check` refuses what cannot work before any work is done.
    """

    precision: str

    def __init__(self, config: QuantizeConfig, ctx: PipelineContext):
        self.config = config
        self.ctx = ctx
        self._saved: tuple[int, bytes] | None = None

    def fresh_copy(self, model: torch.jit.ScriptModule, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
        """A private copy of `model` to edit, loaded from a serialisation made once per step.

        `convert` runs once per layer while measuring sensitivity; saving a large model each
        time would double the cost of every trial.
        """
        if self._saved is None or self._saved[0] != id(model):
            buffer = io.BytesIO()
            torch.jit.save(model, buffer)
            self._saved = (id(model), buffer.getvalue())
        return torch.jit.load(io.BytesIO(self._saved[1]), map_location=device).eval()

    @property
    def device(self) -> torch.device:
        """Where the converted model computes (the int8 kernels exist on CPU only)."""
        return self.ctx.device

    def check(self, model: torch.jit.ScriptModule) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Raise EngineError when the step cannot run at all (e.g. no calibration data)."""

    @abc.abstractmethod
    def convert(self, model: torch.jit.ScriptModule, modules: Collection[str] | None) -> Conversion:
        """A converted copy of `model` (never modified): `modules` (None: every layer it can) converted."""

    def notes(self) -> dict[str, Any]:
        """Scheme-wide facts for the report (backend, where compute happens, …)."""
        return {}


SchemeFactory = Callable[[QuantizeConfig, PipelineContext], Scheme]
_SCHEMES: dict[str, SchemeFactory] = {}


def register_scheme(*names: str) -> Callable[[SchemeFactory], SchemeFactory]:
    """Register a Scheme class under one or more `scheme` names of the step."""

    def decorate(factory: SchemeFactory) -> SchemeFactory:
        for name in names:
            _SCHEMES[name] = factory
        return factory

    return decorate


def make_scheme(config: QuantizeConfig, ctx: PipelineContext) -> Scheme:
    """The Scheme for `config.scheme`."""
    return _SCHEMES[config.scheme](config, ctx)
