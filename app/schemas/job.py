"""The JobSpec a user submits and the Job they read back.

This is the job spec's one definition on the service side: its fields, defaults, choices and the
rules between fields. The engines' step configs (`worker/engines/*/config.py`) mirror it, and
tests/test_spec_parity.py fails when the two drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.models.job import JobStatus
from app.schemas.common import ErrorInfo
from app.schemas.webhook import WebhookDeliveryRead


class _Strict(BaseModel):
    # A misspelt field must be a 422 naming it, never silently ignored.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul_bytes(cls, data):
        # No database text holds a NUL (Postgres refuses it), and no name or id contains one.
        if isinstance(data, dict):
            _refuse(
                cls.__name__,
                [((key, *where), "NUL bytes are not allowed in text") for key, where in _nul_strings(data)],
            )
        return data


def _nul_strings(data: dict):
    """(field, [index]) of each string, or string in a list, holding a NUL; nested objects check themselves."""
    for key, value in data.items():
        if isinstance(value, str) and "\x00" in value:
            yield key, ()
        elif isinstance(value, list):
            yield from ((key, (index,)) for index, item in enumerate(value) if isinstance(item, str) and "\x00" in item)


def _refuse(title: str, broken: list[tuple[tuple, str]]) -> None:
    """Raise one validation error per broken rule, each at the field it names (pydantic prefixes
    the enclosing location, so a step's error reads `body.steps.0.prune.criterion`)."""
    if broken:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(type=PydanticCustomError("invalid_combination", message), loc=loc, input=None)
                for loc, message in broken
            ],
        )


# Criteria that rank whole channels, and schemes that convert the whole model at once.
CHANNEL_CRITERIA = ("entropy", "bn_scale")
WHOLE_MODEL_SCHEMES = ("fp16", "bf16")


class InputSpec(_Strict):
    """One positional model input for synthetic data: shape with the batch dimension first."""

    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"] = "float32"
    low: float = 0.0
    high: float = 1.0


class PruneStep(_Strict):
    """Remove weights or whole channels."""

    op: Literal["prune"]
    structure: Literal["unstructured", "channel", "n:m"]
    criterion: Literal["l1", "l2", "gradient", "entropy", "bn_scale"] = "l1"
    amount: float = Field(
        0.5, gt=0, lt=1, description="Fraction of weights (unstructured) or output channels (channel) removed."
    )
    scope: Literal["global", "layer"] = "global"
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of module names left untouched.")
    recalibrate_bn: bool = Field(
        True, description="Re-estimate stale BatchNorm statistics on the calibration dataset after pruning."
    )

    @model_validator(mode="after")
    def _rules(self) -> PruneStep:
        broken = []
        if self.criterion in CHANNEL_CRITERIA and self.structure != "channel":
            broken.append(
                (("criterion",), f"criterion '{self.criterion}' ranks whole channels: use it with structure 'channel'")
            )
        if self.structure == "n:m" and self.n >= self.m:
            broken.append((("n",), f"n:m needs n < m, got {self.n}:{self.m}"))
        _refuse("PruneStep", broken)
        return self


class QuantizeStep(_Strict):
    """Lower the precision of weights (and activations)."""

    op: Literal["quantize"]
    scheme: Literal["dynamic_int8", "static_int8", "fp16", "bf16", "weight_int8", "weight_int4", "binary"]
    per_channel: bool = True
    exclude: list[str] = Field(default_factory=list, description="Module-name globs kept in float.")
    min_fidelity: float | None = Field(
        None, gt=0, le=1, description="Keep the most sensitive layers in float until output fidelity holds."
    )
    group_size: int = Field(128, ge=8, description="Group size of weight_int4 scales.")

    @model_validator(mode="after")
    def _rules(self) -> QuantizeStep:
        if self.exclude and self.scheme in WHOLE_MODEL_SCHEMES:
            _refuse(
                "QuantizeStep",
                [
                    (
                        ("exclude",),
                        f"{self.scheme} converts the whole model: 'exclude' works only "
                        "with the int8, weight-only and binary schemes",
                    )
                ],
            )
        return self


class DistillStep(_Strict):
    """Train a student on the original model's soft targets."""

    op: Literal["distill"]
    student_model_id: str | None = Field(
        None, description="An uploaded student; default: the pipeline's current model."
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of the soft targets (1.0 measured best on small-logit teachers; "
        "raise it for confident teachers).",
    )
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft-target loss against hard labels.")
    epochs: int = Field(3, ge=1, le=1000)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(2, ge=1, description="Epochs without validation gain before stopping early.")
    sparsity_regularization: float = Field(0.0, ge=0, description="β of the L1 penalty on BatchNorm scales.")
    loss: Literal["auto", "kl", "cosine", "mse"] = "auto"
    weight_decay: float = Field(0.0, ge=0)


class CompileStep(_Strict):
    """Freeze, fold and fuse: lossless, checked on the job's data; the pipeline's last step."""

    op: Literal["compile"]
    preserve: list[str] = Field(
        default_factory=list, description="Methods or attributes kept beside forward (the rest are dropped)."
    )


Step = Annotated[PruneStep | QuantizeStep | DistillStep | CompileStep, Field(discriminator="op")]


class BenchmarkSpec(_Strict):
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=8
    )
    warmup: int = Field(10, ge=0, le=10_000)
    iterations: int = Field(100, ge=5, le=100_000)
    threads: int | None = Field(None, ge=1, description="CPU threads for timing; default: the worker's setting.")
    serving: list[Literal["plain", "optimized", "onnxruntime"]] = Field(
        default_factory=lambda: ["plain"],
        min_length=1,
        max_length=3,
        description="How baseline and result are run, each mode timed in the same rounds: plain (torch.jit.load), "
        "optimized (torch.jit.optimize_for_inference after loading), onnxruntime (the ONNX file on ONNX Runtime's "
        "CPU provider). plain is always one: speed-ups divide by it.",
    )
    time_stages: bool = Field(
        True,
        description="Time every model of the pipeline: each stage, and the baseline put through the pipeline's "
        "compile step (for the lossless floor). false times the baseline and the result only, the other stages get "
        "sizes, MACs and quality (a search's trials: its floor trial measures the floor).",
    )

    @model_validator(mode="after")
    def _rules(self) -> BenchmarkSpec:
        if "plain" not in self.serving or len(set(self.serving)) != len(self.serving):
            _refuse(
                "BenchmarkSpec",
                [
                    (
                        ("serving",),
                        "serving lists each mode once and includes 'plain' "
                        "(the model as loaded, which speed-ups divide by)",
                    )
                ],
            )
        return self


class TargetSpec(_Strict):
    """Goals the report checks the result against (the job still succeeds when one is missed)."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_fidelity: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Top-1 agreement with labels, else the minimum per-sample cosine "
        "(as a quantize step's min_fidelity).",
    )
    min_speedup: float | None = Field(None, gt=0)
    stop_early: bool = Field(
        False,
        description="When the result already misses max_accuracy_drop or min_fidelity on the evaluation "
        "data, skip the memory probes and the timing: the job succeeds with sizes, MACs, accuracy and "
        "fidelity, and summary.stopped_early says which limit it missed (a search's trials set this).",
    )


class JobSpec(_Strict):
    """A compression pipeline: steps run in order, each on the output of the one before."""

    model_id: str
    name: str | None = Field(None, max_length=255)
    calibration_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    input_spec: list[InputSpec] | None = Field(None, min_length=1)
    steps: list[Step] = Field(default_factory=list, max_length=32)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    target: TargetSpec | None = None
    seed: int = 0
    output_formats: list[Literal["torchscript", "onnx"]] = Field(
        default_factory=lambda: ["torchscript"],
        min_length=1,
        max_length=2,
        description="Artifacts to make: the TorchScript file always, and an ONNX file exported from the "
        "compressed model (int8 pipelines quantized by ONNX Runtime), checked in ONNX Runtime before it is "
        "offered; the report's `onnx` says why when there is none.",
    )
    reuse_checkpoints: bool = Field(
        True,
        description="Start after the longest prefix of these steps whose outputs are stored (a retried "
        "attempt's completed steps, or an earlier job's with the same model, data, seed and steps); "
        "false: run every step afresh.",
    )
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="An http(s) URL POSTed the job's summary once it ends (succeeded, failed or canceled), "
        "signed in the Standard Webhooks format with the tenant's secret (GET /v1/webhooks/secret) and "
        "retried for a day. Loopback, link-local and private addresses are refused.",
        examples=["https://ci.example.com/hooks/compactor"],
    )

    @model_validator(mode="after")
    def _rules(self) -> JobSpec:
        broken = []
        if not (self.calibration_dataset_id or self.eval_dataset_id or self.input_spec):
            broken.append(
                (("input_spec",), "give input_spec (synthetic inputs) or a dataset: the benchmark needs inputs")
            )
        if "torchscript" not in self.output_formats or len(set(self.output_formats)) != len(self.output_formats):
            broken.append(
                (
                    ("output_formats",),
                    "list each format once, with 'torchscript': the TorchScript artifact is always made "
                    "(the report measures it)",
                )
            )
        for index, step in enumerate(self.steps):
            if isinstance(step, CompileStep) and index != len(self.steps) - 1:
                broken.append(
                    (
                        ("steps", index),
                        "compile inlines every layer into one frozen graph, so no step can follow it: "
                        "make it the last step",
                    )
                )
            if isinstance(step, QuantizeStep) and step.scheme == "static_int8" and not self.calibration_dataset_id:
                broken.append(
                    (
                        ("calibration_dataset_id",),
                        f"steps.{index}: static_int8 needs a calibration dataset "
                        "(synthetic calibration would silently ruin accuracy)",
                    )
                )
        _refuse("JobSpec", broken)
        return self


_MODEL_ID = "3f6c2a0e-8d1b-4f57-9a7e-0c1d2b3a4f5e"
_DATASET_ID = "9b1e4c7d-2a3f-4e6b-8c5d-7f0a1b2c3d4e"
JOB_SPEC_EXAMPLES = {
    "int8": {
        "summary": "dynamic int8 on synthetic inputs",
        "value": {
            "model_id": _MODEL_ID,
            "input_spec": [{"shape": [1, 3, 224, 224]}],
            "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "benchmark": {"batch_sizes": [1, 32]},
        },
    },
    "prune-distill-quantize": {
        "summary": "prune, recover by distillation, then static int8",
        "value": {
            "model_id": _MODEL_ID,
            "name": "resnet18 slim",
            "calibration_dataset_id": _DATASET_ID,
            "steps": [
                {"op": "prune", "structure": "channel", "criterion": "l1", "amount": 0.5},
                {"op": "distill", "epochs": 3, "temperature": 1.0, "alpha": 0.7},
                {"op": "quantize", "scheme": "static_int8"},
            ],
            "benchmark": {"device": "cpu", "batch_sizes": [1, 32]},
            "target": {"max_accuracy_drop": 0.01},
        },
    },
}


class JobProgress(BaseModel):
    stage: str
    step_index: int | None = None
    percent: float = 0.0
    message: str = ""


class ArtifactInfo(BaseModel):
    size_bytes: int
    sha256: str


class JobRead(BaseModel):
    """A compression job and where it stands."""

    id: str
    name: str | None
    model_id: str
    status: JobStatus
    # The spec as stored when the job was accepted, returned as it is: validating it again with
    # today's rules would turn a job accepted under older ones into a 500 on every list.
    # `stored_spec` gives a spec that no longer validates back as the dict it is.
    spec: SkipValidation[JobSpec]
    progress: JobProgress
    error: ErrorInfo | None = None
    attempts: int
    worker: str | None = Field(
        None, description="Celery node name (`<name>@<host>`) of the worker that last claimed the job."
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifact: ArtifactInfo | None = None
    onnx_artifact: ArtifactInfo | None = Field(
        None, description="The ONNX file, when the spec asked for it and it passed validation (`?format=onnx`)."
    )
    revision: int = Field(description="Bumped by every change of status or progress: the id of the job's events.")
    webhooks: list[WebhookDeliveryRead] | None = Field(
        None,
        description="The job's webhook deliveries with every attempt, when it has a callback_url "
        "(on a single job; null in lists).",
    )


class JobEvent(BaseModel):
    """One Server-Sent Event of GET /v1/jobs/{id}/events: the job's state at `revision` (the event id)."""

    id: str
    revision: int
    status: JobStatus
    progress: JobProgress
    error: ErrorInfo | None = None


def stored_spec(raw: dict[str, Any]) -> JobSpec | dict[str, Any]:
    """A stored job's spec for reading: a JobSpec, or the stored dict itself when today's rules
    refuse it (a job accepted under older ones is shown, never a 500)."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError:
        return raw
