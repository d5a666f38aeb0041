"""The benchmark report a succeeded job returns (typed, so generated clients get real fields)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    # Workers may add figures; clients keep the typed ones and still see the rest.
    model_config = ConfigDict(extra="allow")


class LatencyStats(_Open):
    p50: float
    p90: float
    p99: float
    mean: float
    iterations: int
    cpu_wait: float | None = Field(
        None, description="Time the threads waited for a CPU over their wall time (None: not measurable here)."
    )
    noisy: bool = Field(False, description="Timed on an oversubscribed host (cpu_wait above 10%).")


class EnergyStats(_Open):
    cpu_ms_per_call: float
    joules_per_call: float | None = Field(None, description="None: no energy meter here (not measured).")
    noisy: bool = False


class Accuracy(_Open):
    top1: float


class Fidelity(_Open):
    top1_agreement: float | None = None
    cosine_min: float
    cosine_mean: float
    max_abs_error: float


class Interval(_Open):
    low: float
    high: float
    confidence: float


class SpeedupSpread(_Open):
    median: float
    min: float
    max: float
    rounds: int
    interval: Interval | None = Field(None, description="Distribution-free interval for the median ratio.")
    noisy: bool = Field(False, description="The interval stayed wider than 10% or below 95% confidence.")


class ServingFigures(_Open):
    """One model served in one mode other than plain: its figures, or why the mode could not run it."""

    unavailable: str | None = Field(None, description="Why this mode could not run the model (then no figures).")
    max_abs_difference: float | None = Field(None, description="Largest |output - plain output| on the check data.")
    lossless: bool | None = Field(None, description="Every output within float tolerance of the plain outputs.")
    latency_ms: dict[str, LatencyStats] = {}
    throughput_per_s: dict[str, float] = {}
    energy: dict[str, EnergyStats] = {}
    speedup: dict[str, SpeedupSpread] = Field(
        {}, description="Paired speed-up over the baseline served plain, per batch size."
    )


class Metrics(_Open):
    size_bytes: int
    compressed_size_bytes: int | None = None
    parameters: int
    nonzero_parameters: int
    buffers_bytes: int | None = None
    macs: int | None = None
    macs_by_operator: dict[str, int] | None = None
    macs_uncounted: list[str] | None = None
    latency_ms: dict[str, LatencyStats] = {}
    throughput_per_s: dict[str, float] = {}
    peak_memory_bytes: int | None = None
    energy: dict[str, EnergyStats] = {}
    accuracy: Accuracy | None = None
    fidelity: Fidelity | None = None
    serving: dict[str, ServingFigures] = Field(
        {}, description="The other serving modes of benchmark.serving (the figures above are plain)."
    )


class SandboxInfo(_Open):
    mode: Literal["bubblewrap", "off"] = Field(
        description="How the uploaded model was run: inside the "
        "bubblewrap sandbox, or unsandboxed (COMPACTOR_SANDBOX=off)."
    )


class Environment(_Open):
    device: str
    device_name: str | None = None
    torch: str
    threads: int | None = None
    worker: str | None = None
    measured_at: str
    usable_cores: float | None = None
    load_average: dict[str, list[float] | None] | None = None
    energy_meter: str | None = Field(None, description='The energy meter read, or "not measured here".')
    sandbox: SandboxInfo | None = None


class SkippedModule(_Open):
    module: str
    reason: str


class StageDetails(_Open):
    layers: list[dict[str, Any]] = []
    skipped: list[SkippedModule] = []


class Stage(_Open):
    op: str
    params: dict[str, Any]
    metrics: Metrics
    details: StageDetails
    speedup: dict[str, float] = {}
    reused_from: str | None = Field(
        None,
        description="The job whose stored output of this step was reused (this job's own id: an earlier "
        "attempt's); the step did not run again, and `details` are from when it ran.",
    )


class TargetCheck(_Open):
    limit: float
    actual: float | None
    met: bool


class FloorFigure(SpeedupSpread):
    """The lossless floor at one batch size: the fastest way to serve the model with no compression."""

    model: str = Field(description="baseline, or baseline_compiled (the upload through the pipeline's compile step).")
    mode: str = Field(description="The serving mode it is reached in.")
    p50_ms: float


class BeyondFloor(SpeedupSpread):
    """A lossy result's paired speed-up over the lossless floor, served in its fastest mode."""

    mode: str


class Summary(_Open):
    speedup: dict[str, float]
    speedup_spread: dict[str, SpeedupSpread] = {}
    lossless_floor: dict[str, FloorFigure] = Field(
        {}, description="Per batch size, the best speed available with no compression (its speed-up over plain)."
    )
    beyond_floor: dict[str, BeyondFloor] | None = Field(
        None, description="Per batch size, what the lossy steps add beyond the floor (null for a lossless pipeline)."
    )
    size_ratio: float
    accuracy_drop: float | None = None
    fidelity_cosine_min: float | None = None
    targets: dict[str, TargetCheck] = {}
    stopped_early: str | None = Field(
        None, description="Why nothing was timed (target.stop_early: the result already missed a quality target)."
    )
    headline: str = ""


class CompiledBaseline(_Open):
    """The uploaded model put through the pipeline's compile step, measured beside the others."""

    metrics: Metrics
    speedup: dict[str, SpeedupSpread] = Field({}, description="Paired speed-up over the baseline served plain.")


class Report(_Open):
    """Baseline and result measured side by side in one worker process, per stage and overall."""

    job_id: str
    spec: dict[str, Any]
    environment: Environment
    baseline: Metrics
    baseline_compiled: CompiledBaseline | None = Field(
        None, description="The upload through the pipeline's compile step, a floor candidate (lossy pipelines only)."
    )
    result: Metrics
    stages: list[Stage]
    summary: Summary
    notes: list[str] = []
    onnx: dict[str, Any] | None = Field(
        None,
        description="The ONNX artifact when the spec asked for one: sha256, size_bytes, precision, inputs, "
        "outputs, quantization, fidelity (against the TorchScript artifact); or `missing`, the reason there is none.",
    )


class JobComparison(_Open):
    job_id: str
    name: str | None
    status: str
    steps: list[dict[str, Any]]
    summary: Summary | None = None
    result: Metrics | None = None
