"""The `compile` step's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from worker.engines.step_config import StepConfig


@dataclass(frozen=True)
class CompileConfig(StepConfig):
    """One `compile` step: the lossless rewrites whose result a TorchScript file can carry.

    Attributes:
        preserve: names of methods or attributes kept beside `forward` (freezing drops the rest
            and inlines every submodule, so no later step could find a layer: compile comes last).

    Example:
        CompileConfig(preserve=("embed",))
    """

    op: ClassVar[str] = "compile"

    preserve: tuple[str, ...] = ()
