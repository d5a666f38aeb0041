"""The `prune` step's settings, parsed once from the job spec's step dict."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engines.errors import EngineError

STRUCTURES = ("unstructured", "channel", "n:m")
CRITERIA = ("l1", "l2", "gradient", "entropy", "bn_scale")
SCOPES = ("global", "layer")
# Criteria that score single weights; entropy and bn_scale only exist per channel.
WEIGHT_CRITERIA = ("l1", "l2", "gradient")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one `prune` step.

    Attributes:
        structure: `unstructured` (single weights), `channel` (whole channels, physically removed)
            or `n:m` (n of every m consecutive input weights kept).
        criterion: `l1`, `l2`, `gradient`, `entropy` or `bn_scale`.
        amount: fraction of weights (unstructured) or of each group's channels (channel) removed;
            n:m ignores it (its sparsity is 1 - n/m).
        scope: `global` ranks all layers together, `layer` prunes each alone.
        n, m: the n:m pattern.
        exclude: glob patterns of module names left untouched.
        recalibrate_bn: after pruning, re-estimate the running statistics of the BatchNorms
            whose input changed, on the calibration data (when the job has some).

    Example:
        config = PruneConfig.from_step({"op": "prune", "structure": "channel", "amount": 0.5})
    """

    structure: str
    amount: float = 0.5
    criterion: str = "l1"
    scope: str = "global"
    n: int = 2
    m: int = 4
    exclude: tuple[str, ...] = field(default_factory=tuple)
    recalibrate_bn: bool = True

    @classmethod
    def from_step(cls, step: dict) -> "PruneConfig":
        """Parse and check a step dict; missing optional fields take the defaults above.

        Raises:
            EngineError("invalid_step"): a field is missing, unknown or out of range.
        """
        if "structure" not in step:
            raise EngineError("invalid_step", "prune needs 'structure': unstructured, channel or n:m")
        config = cls(
            structure=str(step["structure"]),
            amount=float(step.get("amount", cls.amount)),
            criterion=str(step.get("criterion", cls.criterion)),
            scope=str(step.get("scope", cls.scope)),
            n=int(step.get("n", cls.n)),
            m=int(step.get("m", cls.m)),
            exclude=tuple(step.get("exclude") or ()),
            recalibrate_bn=step.get("recalibrate_bn", cls.recalibrate_bn),
        )
        config._check("amount" in step)
        return config

    def _check(self, amount_given: bool) -> None:
        def invalid(message: str) -> EngineError:
            return EngineError("invalid_step", message)

        if self.structure not in STRUCTURES:
            raise invalid(f"structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")
        if self.criterion not in CRITERIA:
            raise invalid(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in SCOPES:
            raise invalid(f"scope must be global or layer, got {self.scope!r}")
        if self.structure != "n:m" and not amount_given:
            raise invalid(f"{self.structure} pruning needs 'amount', the fraction to remove in (0, 1)")
        if not isinstance(self.recalibrate_bn, bool):
            raise invalid(f"recalibrate_bn must be true or false, got {self.recalibrate_bn!r}")
        if not 0.0 < self.amount < 1.0:
            raise invalid(f"amount must lie strictly between 0 and 1, got {self.amount}")
        if self.structure == "n:m" and not 0 < self.n < self.m:
            raise invalid(f"n:m needs 0 < n < m, got {self.n}:{self.m}")
        if self.structure != "channel" and self.criterion not in WEIGHT_CRITERIA:
            raise invalid(f"criterion {self.criterion!r} ranks whole channels; use it with structure 'channel'")
