"""The `quantize` step's settings: a frozen config parsed once from the job spec's step dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from worker.engines.step_config import StepConfig, setting

SCHEMES = ("dynamic_int8", "static_int8", "fp16", "bf16", "weight_int8", "weight_int4", "binary")
# Schemes that convert the whole model at once: no layer can be left out.
WHOLE_MODEL_SCHEMES = ("fp16", "bf16")


@dataclass(frozen=True)
class QuantizeConfig(StepConfig):
    """One `quantize` step.

    Attributes:
        scheme: one of `SCHEMES`.
        per_channel: one weight scale per output channel (else one per tensor); int8 schemes.
        exclude: module-name globs always kept in float (not with fp16/bf16, which cast the
            whole model).
        min_fidelity: when set, the most sensitive layers stay in float until the output fidelity
            (top-1 agreement for labelled data, else the minimum per-sample cosine) is at least this.
        group_size: weights per scale along a row for `weight_int4` (clamped to the row length).

    Example:
        QuantizeConfig(scheme="weight_int4", group_size=64)
    """

    op: ClassVar[str] = "quantize"

    scheme: str = setting(choices=SCHEMES)
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    min_fidelity: float | None = setting(None, gt=0, le=1)
    group_size: int = setting(128, ge=8)

    def check(self) -> None:
        if self.exclude and self.scheme in WHOLE_MODEL_SCHEMES:
            raise self.invalid(
                f"{self.scheme} converts the whole model behind float32 boundary casts; "
                "'exclude' is not supported for half precision"
            )
