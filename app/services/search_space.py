"""The candidates of a search: which recipes exist for a model, their job steps, and their order.

A candidate is prune (amount, or none) → distill (or not) → quantize (scheme, or none), ending with
`compile` unless the space turns it off. Its `parent` is the candidate whose steps are its own
first steps: trials are scheduled so that a parent has finished before its children run, so the
stage checkpoints of the parent's steps are there for them to reuse (the checkpoint cache of the
job runner, keyed by the steps' prefix), and the parent's measured accuracy can stop children that
cannot meet the constraint (`hopeless`). Pure Python: the API process imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.schemas.search import SearchSpec

NO_QUANTIZE = "none"


@dataclass(frozen=True, order=True)
class Candidate:
    prune: float = 0.0
    distill: bool = False
    quantize: str = NO_QUANTIZE

    @property
    def key(self) -> str:
        return f"prune={self.prune:g} distill={int(self.distill)} quantize={self.quantize}"

    @property
    def params(self) -> dict[str, Any]:
        return {"prune": self.prune, "distill": self.distill, "quantize": self.quantize}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Candidate:
        """The canonical candidate of sampled parameters: distillation applies only after pruning."""
        prune = float(params.get("prune", 0.0))
        return cls(prune, bool(params.get("distill", False)) and prune > 0, str(params.get("quantize", NO_QUANTIZE)))

    @property
    def parent(self) -> Candidate | None:
        """The candidate whose steps start this one's (None for a single lossy step or the floor)."""
        if self.quantize != NO_QUANTIZE and self.prune > 0:
            return Candidate(self.prune, self.distill, NO_QUANTIZE)
        if self.distill:
            return Candidate(self.prune, False, NO_QUANTIZE)
        return None

    @property
    def lossless(self) -> bool:
        return self.prune == 0 and self.quantize == NO_QUANTIZE


@dataclass(frozen=True)
class Space:
    """The resolved space: every choice, after the model's inspection filled what the spec left out."""

    prune_amounts: tuple[float, ...]
    distill: bool
    quantize_schemes: tuple[str, ...]
    compile: bool
    prune_criterion: str
    distill_epochs: int
    quantize_min_fidelity: float | None

    def choices(self) -> dict[str, list]:
        """The parameters a sampler draws (each a categorical choice)."""
        choices: dict[str, list] = {
            "prune": [0.0, *self.prune_amounts],
            "quantize": [NO_QUANTIZE, *self.quantize_schemes],
        }
        if self.distill and self.prune_amounts:
            choices["distill"] = [False, True]
        return choices

    def candidates(self) -> list[Candidate]:
        """Every candidate, the lossless floor first and each parent before its children."""
        distills = (False, True) if self.distill else (False,)
        every = {
            Candidate.from_params({"prune": p, "distill": d, "quantize": q})
            for p in (0.0, *self.prune_amounts)
            for d in distills
            for q in (NO_QUANTIZE, *self.quantize_schemes)
        }
        if not self.compile:
            # Without compile the floor's steps are none: the baseline itself, not worth a trial.
            every.discard(Candidate())
        return sorted(every, key=lambda c: (depth(c), c.quantize != NO_QUANTIZE, c))

    def steps(self, candidate: Candidate) -> list[dict]:
        """The job steps of a candidate, exactly as its trial job (and a replay of it) runs them."""
        steps: list[dict] = []
        if candidate.prune > 0:
            steps.append(
                {"op": "prune", "structure": "channel", "criterion": self.prune_criterion, "amount": candidate.prune}
            )
        if candidate.distill:
            steps.append({"op": "distill", "epochs": self.distill_epochs})
        if candidate.quantize != NO_QUANTIZE:
            step = {"op": "quantize", "scheme": candidate.quantize}
            if self.quantize_min_fidelity is not None:
                step["min_fidelity"] = self.quantize_min_fidelity
            steps.append(step)
        if self.compile:
            steps.append({"op": "compile"})
        return steps


def depth(candidate: Candidate) -> int:
    return 0 if candidate.parent is None else 1 + depth(candidate.parent)


def layer_kinds(model_summary: dict | None) -> dict[str, int] | None:
    """Module kinds the worker's validation counted (`layers`), or None for a model validated before it did."""
    layers = (model_summary or {}).get("layers")
    return layers if isinstance(layers, dict) else None


def resolve_space(spec: SearchSpec, model_summary: dict | None) -> Space:
    """The space of a search: the spec's choices, and for each it left out a proposal from the model.

    Channel pruning is proposed for convolutional models; distillation when there is calibration
    data to train on; dynamic int8 for Linear and recurrent layers; static int8 for convolutions
    when a calibration set is there. A model without an inspection gets the schemes that apply to
    any layer kind.
    """
    kinds = layer_kinds(model_summary)
    has = (lambda *names: any(any(n in kind for n in names) for kind in kinds)) if kinds is not None else None
    calibrated = spec.calibration_dataset_id is not None
    conv = has("Conv") if has else False
    dense = has("Linear", "LSTM", "GRU", "RNN") if has else True
    space = spec.space
    prune_amounts = space.prune_amounts if space.prune_amounts is not None else ([0.25, 0.5] if conv else [])
    schemes = space.quantize_schemes
    if schemes is None:
        schemes = (["dynamic_int8"] if dense else []) + (
            ["static_int8"] if calibrated and (conv or has is None) else []
        )
    distill = space.distill if space.distill is not None else calibrated
    return Space(
        prune_amounts=tuple(sorted(set(prune_amounts))),
        distill=bool(distill and prune_amounts and calibrated),
        quantize_schemes=tuple(dict.fromkeys(schemes)),
        compile=space.compile,
        prune_criterion=space.prune_criterion,
        distill_epochs=space.distill_epochs,
        quantize_min_fidelity=spec.constraints.min_fidelity,
    )


def hopeless(candidate: Candidate, measured_violation: dict[Candidate, float]) -> Candidate | None:
    """The ancestor whose measured accuracy already breaks the constraint, when nothing this
    candidate adds after it can win accuracy back (only a distillation can); else None.

    `measured_violation` maps finished candidates to how far their accuracy (or fidelity) misses
    the constraint (> 0: missed).
    """
    ancestor = candidate.parent
    added_distill = False
    current = candidate
    while ancestor is not None:
        added_distill = added_distill or (current.distill and not ancestor.distill)
        if not added_distill and measured_violation.get(ancestor, 0.0) > 0:
            return ancestor
        current, ancestor = ancestor, ancestor.parent
    return None
