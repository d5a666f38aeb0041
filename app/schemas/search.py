"""The SearchSpec a user submits (limits, objective, space, budget) and the Search they read back.

Fields a trial job has too (datasets, inputs, benchmark settings, quantize schemes, prune amounts)
are taken from their one definition in app.schemas.job, so a search never accepts what its trials
would refuse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SkipValidation, ValidationError, model_validator

from app.models.job import JobStatus
from app.schemas.common import ErrorInfo
from app.schemas.job import BenchmarkSpec, InputSpec, JobSpec, PruneStep, QuantizeStep, _refuse, _Strict

Scheme = QuantizeStep.model_fields["scheme"].annotation
PruneAmount = Annotated[float, Field(gt=0, lt=1)]


class SearchConstraints(_Strict):
    """What every candidate must hold. Give `max_accuracy_drop` (labelled eval data) or `min_fidelity`."""

    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest top-1 accuracy drop from the uploaded model, in absolute points as a "
        "fraction: 0.01 is one percentage point (90.0 % → 89.0 % holds). With `relative: true`, a "
        "fraction of the baseline's accuracy instead (0.01 of 90 % is 0.9 points).",
    )
    relative: bool = Field(False, description="Read max_accuracy_drop as a fraction of the baseline's accuracy.")
    min_fidelity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Least agreement with the uploaded model's outputs, where there are no labels: top-1 "
        "agreement where measurable, else the minimum per-sample cosine (as a quantize step's min_fidelity).",
    )
    max_latency_ms: float | None = Field(None, gt=0, description="Largest p50 latency at `latency_batch_size`.")
    latency_batch_size: int = Field(1, ge=1, le=4096, description="The batch size max_latency_ms is held at.")
    max_size_bytes: int | None = Field(None, ge=1, description="Largest artifact.")

    @model_validator(mode="after")
    def _rules(self) -> SearchConstraints:
        if self.max_accuracy_drop is None and self.min_fidelity is None:
            _refuse(
                "SearchConstraints",
                [(("max_accuracy_drop",), "give max_accuracy_drop (needs labels) or min_fidelity")],
            )
        return self


class SearchObjective(_Strict):
    """What the pick minimises among the candidates that meet every constraint."""

    metric: Literal["latency", "size", "macs"] = Field(
        "latency",
        description="latency: p50 at `batch_size`, ranked by the speed-up measured beside the baseline in "
        "the same job (paired); size: artifact bytes; macs: multiply-accumulates per sample.",
    )
    batch_size: int = Field(1, ge=1, le=4096, description="The batch size latency is measured at.")


class SearchSpace(_Strict):
    """The candidates: each is prune (or not) → distill (or not) → quantize (or not) → compile (or not).

    A field left out is proposed from the model's inspection (its layers, and whether a
    calibration set is there); an empty list leaves that step out.
    """

    prune_amounts: list[PruneAmount] | None = Field(
        None, max_length=8, description="Channel-prune amounts (fractions of output channels)."
    )
    prune_criterion: Literal["l1", "l2", "bn_scale"] = PruneStep.model_fields["criterion"].default
    distill: bool | None = Field(None, description="Also try each pruned candidate with a short distillation.")
    distill_epochs: int = Field(1, ge=1, le=20, description="Epochs of that distillation.")
    quantize_schemes: list[Scheme] | None = Field(None, max_length=7)
    compile: bool = Field(True, description="End every candidate with the lossless compile step.")


class SearchBudget(_Strict):
    max_trials: int = Field(12, ge=1, le=200, description="Trials run as jobs (candidates stopped early are free).")
    time_limit_s: float = Field(
        3600, gt=0, le=7 * 86400, description="Once passed, running trials are canceled and the best so far kept."
    )
    parallel: int = Field(4, ge=1, le=64, description="Trials queued at once (they run on as many workers as exist).")


class SearchBenchmark(_Strict):
    """How each trial is timed (the batch sizes come from the objective and constraints)."""

    warmup: int = BenchmarkSpec.model_fields["warmup"]
    iterations: int = BenchmarkSpec.model_fields["iterations"]
    threads: int | None = BenchmarkSpec.model_fields["threads"]


class SearchSpec(_Strict):
    """An accuracy-aware search: state the limits; the service finds the recipe and shows the front."""

    model_id: str
    name: str | None = JobSpec.model_fields["name"]
    calibration_dataset_id: str | None = Field(None, description="Calibration and distillation data.")
    eval_dataset_id: str | None = Field(None, description="What accuracy and fidelity are measured on.")
    input_spec: list[InputSpec] | None = JobSpec.model_fields["input_spec"]
    constraints: SearchConstraints
    objective: SearchObjective = Field(default_factory=SearchObjective)
    space: SearchSpace = Field(default_factory=SearchSpace)
    budget: SearchBudget = Field(default_factory=SearchBudget)
    benchmark: SearchBenchmark = Field(default_factory=SearchBenchmark)
    seed: int = 0

    @model_validator(mode="after")
    def _rules(self) -> SearchSpec:
        broken = []
        if not (self.calibration_dataset_id or self.eval_dataset_id or self.input_spec):
            broken.append((("input_spec",), "give input_spec or a dataset: the trials need inputs"))
        if self.constraints.max_accuracy_drop is not None and not self.eval_dataset_id:
            broken.append(
                (("eval_dataset_id",), "max_accuracy_drop is measured on a labelled eval_dataset_id: give one")
            )
        _refuse("SearchSpec", broken)
        return self


class SearchProgress(BaseModel):
    stage: str = Field(description="queued, exploring, verifying, done, canceled or failed.")
    trials_done: int = 0
    trials_planned: int = 0
    trials_running: int = Field(0, description="Trials queued or running now.")
    trials_pruned: int = Field(
        0, description="Candidates stopped without a job: their prefix trial already missed the constraint."
    )
    trials_not_timed: int = Field(
        0, description="Trials whose job stopped after its accuracy/fidelity pass missed the constraint (not timed)."
    )
    message: str = ""


class SearchRead(BaseModel):
    """A search and where it stands; `pick` once it has succeeded."""

    id: str
    name: str | None
    model_id: str
    status: JobStatus
    # As stored when the search was accepted (see JobRead.spec): never validated again on read.
    spec: SkipValidation[SearchSpec]
    progress: SearchProgress
    feasible: bool | None = Field(None, description="Whether a candidate met every constraint (once finished).")
    pick: dict[str, Any] | None = Field(
        None, description="The chosen trial (or the closest candidate when infeasible): its job and figures."
    )
    error: ErrorInfo | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    revision: int


def stored_search_spec(raw: dict[str, Any]) -> SearchSpec | dict[str, Any]:
    """A stored search's spec for reading: a SearchSpec, or the stored dict when today's rules refuse it."""
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError:
        return raw
