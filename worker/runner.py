"""The torch side of a job, run inside the isolated child process: load, compress, measure.

It receives plain paths and the spec, and returns plain data (the artifact's path and the report);
it never touches the database or the broker, so it can also be called directly from a notebook.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.cpu_share import cpu_share
from worker.engines.data import ModelData, load_dataset, synthetic_data
from worker.engines.errors import EngineError, model_text
from worker.engines.export import ExportConfig, OnnxUnavailable, build_onnx_artifact, export_onnx
from worker.engines.exported import is_exported_archive
from worker.engines.measure import BenchmarkConfig, measure_models
from worker.engines.measure.memory import CleanFork
from worker.engines.measure.quality import fidelity_score, output_leaves
from worker.engines.modules import load_model, save_model
from worker.engines.pipeline import PipelineContext, parse_step, run_step
from worker.errors import is_out_of_memory

Emit = Callable[[dict], None]
STEPS_SHARE = 80.0  # percent of the progress bar the steps take; measuring takes the rest
# The uploaded model put through the pipeline's compile step: a lossless floor candidate.
BASELINE_COMPILED = "baseline_compiled"
# the targets a result's quality pass can already miss (`target.stop_early` skips timing it then)
QUALITY_TARGETS = ("max_accuracy_drop", "min_fidelity")


@dataclass
class JobFiles:
    model: str
    calibration: str | None
    evaluation: str | None
    students: dict[str, str]
    output_dir: str
    # Stored outputs of the first steps, reused instead of run: [{"path", "stage", "job_id"}].
    stored_steps: list[dict] = field(default_factory=list)


def execute_job(
    emit: Emit,
    spec: dict,
    files: dict,
    device: str = "auto",
    cpu: dict | None = None,
    extra_time_s: float | None = None,
    fresh_process: bool = False,
) -> dict:
    """Run a job's steps in order, measure baseline, every stage and the result side by side.

    The spec (as the API stored it, defaults filled) is parsed into typed configs first, so a
    step no engine can run fails before any model is loaded. `cpu` is the worker's share of the
    host (`CpuShare.describe()`; None: this process's own share as one job): every step computes
    with its `threads` intra-op threads and one inter-op thread, and so does the measurement
    unless the spec's `benchmark.threads` says otherwise. `extra_time_s` bounds the rounds the
    measurement adds while a speed-up's interval is wide (None: the meter's default).

    With "onnx" in the spec's `output_formats`, the result is also exported to ONNX here, in the
    sandboxed child, and validated in ONNX Runtime (`build_onnx_artifact`); the report's `onnx`
    describes the file or says why there is none.

    The first `len(files["stored_steps"])` steps are not run: their stored outputs are loaded and
    their report entries kept (with `reused_from`). After each step that does run, its output is
    saved and `emit({"checkpoint": {"step_index", "path", "stage"}})` offers it for storing, so a
    later attempt can start after it. Each step is seeded with the spec's seed, so a step run after
    reused ones computes what it would have in one uninterrupted run.

    `fresh_process`: this process has loaded no model and runs no threads yet (the job's sandboxed
    child), so a copy of it taken now (`CleanFork`) can fork the peak-memory probes, instead of a
    fresh interpreter importing torch for each model measured.

    Returns {"artifact_path": str, "onnx_path": str | None, "report": dict} (the report without the
    job's storage ids and without the headline, which the service words).
    """
    clean = CleanFork() if fresh_process else None
    try:
        return _execute_job(emit, spec, files, device, cpu, extra_time_s, clean)
    finally:
        if clean is not None:
            clean.close()


def _execute_job(
    emit: Emit, spec: dict, files: dict, device: str, cpu: dict | None, extra_time_s: float | None, clean
) -> dict:
    job_files = JobFiles(**files)
    steps = [parse_step(step) for step in spec.get("steps", [])]
    export = ExportConfig.from_spec(spec)
    benchmark_spec = spec.get("benchmark", {})
    compute = _pick_device(benchmark_spec.get("device", "cpu"), device)
    cpu = cpu or cpu_share(1).describe()
    _pin_threads(cpu["threads"])
    benchmark = BenchmarkConfig.from_spec(
        {
            **benchmark_spec,
            "device": str(compute),
            "threads": benchmark_spec.get("threads") or cpu["threads"],
            "extra_time_s": extra_time_s,
        }
    )
    seed = spec.get("seed", 0)
    torch.manual_seed(seed)
    out = Path(job_files.output_dir)
    emit({"stage": "loading", "step_index": None, "percent": 1.0, "message": "loading model and data"})

    teacher = load_model(job_files.model, compute)
    calibration = load_dataset(job_files.calibration) if job_files.calibration else None
    evaluation = _evaluation_data(spec, benchmark, job_files, calibration)
    ctx = PipelineContext(
        teacher=teacher,
        calibration=calibration,
        evaluation=evaluation,
        device=compute,
        load_model=lambda model_id: load_model(job_files.students[model_id], compute),
        seed=seed,
        batch_sizes=tuple(benchmark.batch_sizes),
    )
    example = evaluation.take(2)
    reference_outputs = _run(teacher, example, compute)

    models = {"baseline": teacher}
    paths = {"baseline": _baseline_file(teacher, Path(job_files.model), out)}
    stages = []
    current = load_model(paths["baseline"], compute)
    for index, step in enumerate(steps):
        share = STEPS_SHARE / max(len(steps), 1)
        base = 2.0 + index * share

        def progress(fraction: float, message: str, _i=index, _base=base, _share=share, _op=step.op) -> None:
            emit(
                {
                    "stage": _op,
                    "step_index": _i,
                    "percent": round(_base + _share * min(max(fraction, 0.0), 1.0), 1),
                    "message": message,
                }
            )

        ctx.progress = progress
        name = f"stage{index + 1}"
        if index < len(job_files.stored_steps):
            stored = job_files.stored_steps[index]
            paths[name] = Path(stored["path"])
            current = models[name] = load_model(stored["path"], compute).eval()
            stages.append({**stored["stage"], "reused_from": stored["job_id"]})
            progress(1.0, f"step {index + 1}/{len(steps)}: {step.op}: its stored output reused")
            continue
        progress(0.0, f"step {index + 1}/{len(steps)}: {step.op}")
        torch.manual_seed(seed)
        started = time.perf_counter()
        output = run_step(current, step, ctx)
        current = output.model.eval()
        _check_interface(reference_outputs, _run(current, example, compute), step.op)
        paths[name] = out / f"{name}.pt"
        save_model(current, paths[name])
        models[name] = current
        params = {k: v for k, v in step.as_step().items() if k != "op"}
        stage_details = {**output.details, "seconds": round(time.perf_counter() - started, 3)}
        stages.append({"op": step.op, "params": params, "details": stage_details})
        emit({"checkpoint": {"step_index": index, "path": str(paths[name]), "stage": stages[-1]}})

    result_name = f"stage{len(steps)}" if steps else "baseline"
    lossless, floor_notes = _lossless_models(steps, teacher, ctx, models, paths, out, benchmark.time_stages)

    # Before measuring, so that the ONNX file exists while the models are timed. The onnxruntime
    # serving mode times the result's ONNX file (offered only when output_formats asks for it) and
    # the baseline's float export.
    onnx_section, onnx_path = None, None
    timed_on_ort = "onnxruntime" in benchmark.serving
    if export.onnx or timed_on_ort:
        emit(
            {
                "stage": "export",
                "step_index": None,
                "percent": STEPS_SHARE + 1,
                "message": "exporting and checking ONNX",
            }
        )
        onnx_file = out / "model.onnx"
        pipeline = [models["baseline"], *(models[f"stage{index + 1}"] for index in range(len(steps)))]
        onnx_section = build_onnx_artifact(
            pipeline, steps, [stage["details"] for stage in stages], evaluation, calibration, onnx_file, cpu["threads"]
        )
        onnx_path = None if "missing" in onnx_section else str(onnx_file)
    onnx_files = {result_name: Path(onnx_path)} if onnx_path else {}
    if timed_on_ort and steps:
        baseline_onnx = _baseline_onnx(teacher, evaluation, out)
        if isinstance(baseline_onnx, Path):
            onnx_files["baseline"] = baseline_onnx
        else:
            floor_notes.append(f"the baseline is not timed on ONNX Runtime: {baseline_onnx}")

    def measure_progress(fraction: float, message: str) -> None:
        emit(
            {
                "stage": "benchmark",
                "step_index": None,
                "percent": round(STEPS_SHARE + 2 + 17 * fraction, 1),
                "message": message,
            }
        )

    measure_progress(0.0, "measuring baseline and result side by side")
    measurement = measure_models(
        models=models,
        files=paths,
        reference="baseline",
        data=evaluation,
        config=benchmark,
        progress=measure_progress,
        onnx_files=onnx_files,
        lossless=lossless,
        clean=clean,
        stop_early=_missed_target(spec.get("target"), result_name),
        latency_for=None if benchmark.time_stages else {"baseline", result_name},
    )
    for index, stage in enumerate(stages):
        name = f"stage{index + 1}"
        stage["metrics"] = measurement.metrics[name]
        stage["speedup"] = {b: s["median"] for b, s in measurement.speedup.get(name, {}).items()}
    environment = {
        **measurement.environment,
        "worker": f"{socket.gethostname()} ({platform.machine()})",
        "cpu_share": cpu,
    }
    summary = summarize(
        measurement.metrics["baseline"],
        measurement.metrics[result_name],
        measurement.speedup.get(result_name, {}),
        spec.get("target"),
    )
    summary["stopped_early"] = measurement.stopped_early
    summary["lossless_floor"] = measurement.floor
    summary["beyond_floor"] = measurement.beyond_floor.get(result_name)
    report = {
        "spec": spec,
        "environment": environment,
        "baseline": measurement.metrics["baseline"],
        "result": measurement.metrics[result_name],
        "stages": stages,
        "summary": summary,
        "notes": _notes(stages) + floor_notes + measurement.notes,
    }
    if BASELINE_COMPILED in measurement.metrics:
        report["baseline_compiled"] = {
            "metrics": measurement.metrics[BASELINE_COMPILED],
            "speedup": measurement.speedup.get(BASELINE_COMPILED, {}),
        }
    if onnx_section is not None and onnx_path is None:
        report["notes"].append(f"no ONNX file: {onnx_section['missing']}")
    if export.onnx:
        report["onnx"] = onnx_section
    else:
        onnx_path = None  # made for the onnxruntime serving mode only: timed, not offered
    return {"artifact_path": str(paths[result_name]), "onnx_path": onnx_path, "report": report}


def _baseline_onnx(teacher: torch.jit.ScriptModule, evaluation: ModelData, out: Path) -> Path | str:
    """The baseline's float ONNX file for the onnxruntime serving mode, or why it does not export
    (the report's notes say it; the mode shows the baseline as not run)."""
    try:
        data = export_onnx(teacher, evaluation.take(2))
    except OnnxUnavailable as exc:
        return exc.reason
    path = out / "baseline.onnx"
    path.write_bytes(data)
    return path


def _baseline_file(teacher: torch.jit.ScriptModule, upload: Path, out: Path) -> Path:
    """The TorchScript file of the baseline: the upload itself, or for a torch.export archive the
    module traced from it, saved, so that the baseline's size, the memory probe (which loads files)
    and every step start from the one TorchScript module the report calls the baseline."""
    if not is_exported_archive(upload):
        return upload
    path = out / "baseline.pt"
    save_model(teacher, path)
    return path


def _lossless_models(
    steps: list,
    teacher: torch.jit.ScriptModule,
    ctx: PipelineContext,
    models: dict,
    paths: dict,
    out: Path,
    compiled_baseline: bool = True,
) -> tuple[list[str], list[str]]:
    """The models made with no loss, whose fastest lossless serving is the floor: the baseline, the
    stages of a pipeline of compile steps only, and, when a lossy pipeline compiles its result (and
    `compiled_baseline`), the baseline compiled the same way (so the lossy steps are not credited
    with what compile gave). Returns their names and a note where the baseline would not compile."""
    lossless = ["baseline"]
    for index, step in enumerate(steps):
        if step.op != "compile":
            break
        lossless.append(f"stage{index + 1}")
    compiles = [step for step in steps if step.op == "compile"]
    if not compiles or len(lossless) == len(steps) + 1 or not compiled_baseline:
        return lossless, []
    ctx.progress = lambda fraction, message: None
    try:
        compiled = run_step(teacher, compiles[-1], ctx).model.eval()
    except EngineError as exc:
        return lossless, [f"the lossless floor has no compiled baseline: {exc.code}: {exc.message}"]
    paths[BASELINE_COMPILED] = out / f"{BASELINE_COMPILED}.pt"
    save_model(compiled, paths[BASELINE_COMPILED])
    models[BASELINE_COMPILED] = compiled
    return [*lossless, BASELINE_COMPILED], []


def _pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        # one inter-op thread: a job's parallelism is its intra-op share; more would oversubscribe it
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set or already used in this process (a notebook, a test): it keeps its pool


def summarize(baseline: dict, result: dict, speedup: dict, target: dict | None) -> dict:
    """The figures a pipeline gates on: speed-up per batch, size ratio, accuracy drop, targets."""
    size_ratio = baseline["size_bytes"] / max(result["size_bytes"], 1)
    accuracy_drop = None
    if baseline.get("accuracy") and result.get("accuracy"):
        accuracy_drop = round(baseline["accuracy"]["top1"] - result["accuracy"]["top1"], 6)
    fidelity = (result.get("fidelity") or {}).get("cosine_min")
    # the target holds the same figure as a quantize step's min_fidelity (top-1 agreement where measured)
    held = _held_fidelity(result.get("fidelity"))
    medians = {b: s["median"] for b, s in speedup.items()}
    summary = {
        "speedup": medians,
        "speedup_spread": speedup,
        "size_ratio": round(size_ratio, 4),
        "accuracy_drop": accuracy_drop,
        "fidelity_cosine_min": fidelity,
        "targets": {},
    }
    target = target or {}
    checks = {
        "max_accuracy_drop": (accuracy_drop, lambda limit, actual: actual <= limit + 1e-9),
        "min_fidelity": (held, lambda limit, actual: actual >= limit),
        "min_speedup": (min(medians.values()) if medians else None, lambda limit, actual: actual >= limit),
    }
    for key, (actual, holds) in checks.items():
        if target.get(key) is not None:
            summary["targets"][key] = {
                "limit": target[key],
                "actual": actual,
                "met": actual is not None and holds(target[key], actual),
            }
    return summary


def _missed_target(target: dict | None, result_name: str) -> Callable[[dict], str | None] | None:
    """With `target.stop_early`, the check measure_models runs once accuracy and fidelity are in:
    which quality limit the result already misses (so timing it is wasted), in words, or None."""
    quality = {key: (target or {}).get(key) for key in QUALITY_TARGETS}
    if not (target or {}).get("stop_early") or all(limit is None for limit in quality.values()):
        return None

    def missed(metrics: dict) -> str | None:
        checked = summarize(metrics["baseline"], metrics[result_name], {}, quality)["targets"]
        reasons = [
            f"the result's {key.removeprefix('max_').removeprefix('min_').replace('_', ' ')} "
            f"{row['actual']:.4f} misses its target {key} {row['limit']:g}"
            for key, row in checked.items()
            if row["actual"] is not None and not row["met"]
        ]
        return "; ".join(reasons) or None

    return missed


def _held_fidelity(fidelity: dict | None) -> float | None:
    try:
        return fidelity_score(fidelity)[1] if fidelity else None
    except EngineError:  # nothing was compared
        return None


def _notes(stages: list[dict]) -> list[str]:
    notes = []
    for stage in stages:
        notes.extend(stage["details"].get("notes", []))
    return notes


def _pick_device(requested: str, worker_device: str) -> torch.device:
    wanted = requested if requested != "auto" else worker_device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            "device_unavailable",
            "the job asks for benchmark.device 'cuda' but this worker has no "
            "GPU; use 'cpu' or 'auto', or run a GPU worker",
        )
    return torch.device(wanted)


def _evaluation_data(
    spec: dict, benchmark: BenchmarkConfig, files: JobFiles, calibration: ModelData | None
) -> ModelData:
    if files.evaluation:
        return load_dataset(files.evaluation)
    if calibration is not None:
        return calibration
    return synthetic_data(spec["input_spec"], num_samples=max(64, *benchmark.batch_sizes), seed=spec.get("seed", 0))


def _run(model: torch.jit.ScriptModule, data: ModelData, device: torch.device):
    with torch.inference_mode():
        try:
            return model(*(t.to(device) for t in data.inputs))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise EngineError("model_error", f"the model does not run on the job's inputs: {model_text(exc)}") from exc


def _structure(output) -> list[str]:
    """Each leaf of the output in the engines' one order (`output_leaves`): its path, and a tensor's
    shape and dtype or another value's type."""
    return [
        f"{path or 'output'}: {list(leaf.shape)} {leaf.dtype}"
        if isinstance(leaf, torch.Tensor)
        else f"{path or 'output'}: {type(leaf).__name__}"
        for path, leaf in output_leaves(output)
    ]


def _check_interface(reference, output, op: str) -> None:
    """A step must keep the model's interface: same output structure, shapes and dtypes."""
    before, after = _structure(reference), _structure(output)
    if before != after:
        raise EngineError(
            "interface_changed",
            f"the {op} step changed the model's outputs from "
            f"{', '.join(before)} to {', '.join(after)}; it was stopped "
            "rather than return a model callers cannot use",
        )
