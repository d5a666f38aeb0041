"""The `prune` step's settings: a frozen config parsed once from the job spec's step dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from worker.engines.step_config import StepConfig, setting

STRUCTURES = ("unstructured", "channel", "n:m")
CRITERIA = ("l1", "l2", "gradient", "entropy", "bn_scale")
SCOPES = ("global", "layer")
# Criteria that score single weights; entropy and bn_scale only exist per channel.
WEIGHT_CRITERIA = ("l1", "l2", "gradient")


@dataclass(frozen=True)
class PruneConfig(StepConfig):
    """Settings of one `prune` step.

    Attributes:
        structure: `unstructured` (single weights), `channel` (whole channels, physically removed)
            or `n:m` (n of every m consecutive input weights kept).
        criterion: `l1`, `l2`, `gradient`, `entropy` or `bn_scale` (the last two only per channel).
        amount: fraction of weights (unstructured) or of each group's channels (channel) removed;
            n:m ignores it (its sparsity is 1 - n/m).
        scope: `global` ranks all layers together, `layer` prunes each alone.
        n, m: the n:m pattern (n < m).
        exclude: glob patterns of module names left untouched.
        recalibrate_bn: after pruning, re-estimate the running statistics of the BatchNorms
            whose input changed, on the calibration data (when the job has some).

    Example:
        config = PruneConfig(structure="channel", amount=0.5)
    """

    op: ClassVar[str] = "prune"

    structure: str = setting(choices=STRUCTURES)
    criterion: str = setting("l1", choices=CRITERIA)
    amount: float = setting(0.5, gt=0, lt=1)
    scope: str = setting("global", choices=SCOPES)
    n: int = setting(2, ge=1)
    m: int = setting(4, ge=2)
    exclude: tuple[str, ...] = setting(())
    recalibrate_bn: bool = True

    def check(self) -> None:
        if self.structure == "n:m" and not self.n < self.m:
            raise self.invalid(f"n:m needs n < m, got {self.n}:{self.m}")
        if self.structure != "channel" and self.criterion not in WEIGHT_CRITERIA:
            raise self.invalid(f"criterion {self.criterion!r} ranks whole channels; use it with structure 'channel'")
