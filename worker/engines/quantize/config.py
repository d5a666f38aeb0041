"""The `quantize` step's settings, parsed once from the JobSpec step dict into a frozen config."""

from __future__ import annotations

from dataclasses import dataclass

from worker.engines.errors import EngineError

SCHEMES = ("dynamic_int8", "static_int8", "fp16", "bf16", "weight_int8", "weight_int4", "binary")


@dataclass(frozen=True)
class QuantizeConfig:
    """One `quantize` step.

    Attributes:
        scheme: one of `SCHEMES`.
        per_channel: one weight scale per output channel (else one per tensor); int8 schemes.
        exclude: module-name globs always kept in float.
        min_fidelity: when set, the most sensitive layers stay in float until the output fidelity
            (top-1 agreement for labelled data, else the minimum per-sample cosine) is at least this.
        group_size: weights per scale along a row for `weight_int4` (clamped to the row length).
    """

    scheme: str
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    min_fidelity: float | None = None
    group_size: int = 128

    @classmethod
    def from_step(cls, step: dict) -> QuantizeConfig:
        """Parse a `{"op": "quantize", ...}` step, filling defaults and checking values.

        Example:
            QuantizeConfig.from_step({"op": "quantize", "scheme": "weight_int4", "group_size": 64})
        """
        scheme = step.get("scheme")
        if scheme not in SCHEMES:
            raise EngineError("invalid_step", f"quantize scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        exclude = step.get("exclude") or []
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise EngineError("invalid_step", "quantize exclude must be a list of module-name globs")
        min_fidelity = step.get("min_fidelity")
        if min_fidelity is not None and not 0.0 < float(min_fidelity) <= 1.0:
            raise EngineError("invalid_step", f"min_fidelity must be in (0, 1], got {min_fidelity}")
        group_size = int(step.get("group_size", 128))
        if group_size < 1:
            raise EngineError("invalid_step", f"group_size must be a positive integer, got {group_size}")
        return cls(
            scheme=scheme,
            per_channel=bool(step.get("per_channel", True)),
            exclude=tuple(exclude),
            min_fidelity=None if min_fidelity is None else float(min_fidelity),
            group_size=group_size,
        )
