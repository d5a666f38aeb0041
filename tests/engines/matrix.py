"""The engine matrix: every zoo model × every quantize scheme × representative pipelines, each run
as a job runs it (the engines, then the meter) and its outcome recorded.

A case either succeeds, or ends as an `EngineError` with a stable code (a method that does not
apply to a model: fine, recorded as such). Anything else fails the matrix: another exception type,
a meter fault (`MeterError`, code `internal_error`), or an artifact that does not load and run.
Cases go through `worker.runner.execute_job`, the same function a job's sandboxed child calls, so
the interface check, the saving of every stage and the side-by-side measurement are the job's own;
measurement is cut to a few calls (no memory probe, no added rounds) since only errors count here.

`tests/engines/test_matrix.py` runs a slice in `make test`; `make matrix` runs all of it:
    .venv/bin/python -m tests.engines.matrix [--models SequentialCNN,TinyEncoder] [--cases distill]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from tests.zoo import (
    FixedViewNet,
    InceptionNet,
    LoopIfNet,
    LSTMClassifier,
    MobileNetStyle,
    SequentialCNN,
    TinyEncoder,
    TinyResNet,
    TransformerMLP,
    TwoInputEncoder,
    digits,
    script,
    trace,
)
from worker.cpu_share import cpu_share
from worker.engines.data import ModelData
from worker.engines.errors import EngineError, MeterError
from worker.engines.quantize.config import SCHEMES
from worker.runner import execute_job

SAMPLES = 32  # calibration = evaluation samples per model: enough for every engine, cheap to measure
# The meter's whole path (sizes, MACs, quality, interleaved timing) at the least cost.
BENCHMARK = {
    "device": "cpu",
    "batch_sizes": [1, 4],
    "warmup": 0,
    "iterations": 6,
    "rounds": 3,
    "max_rounds": 3,
    "eval_samples": SAMPLES,
    "measure_memory": False,
}
CHANNEL_PRUNE = {"op": "prune", "structure": "channel", "amount": 0.3}
DISTILL = {"op": "distill", "epochs": 1, "batch_size": 16}
COMPILE = {"op": "compile"}


@dataclass(frozen=True)
class ZooModel:
    """A zoo model as a user uploads it (traced or scripted) and the dataset its job brings."""

    name: str
    build: Callable[[], tuple[torch.jit.ScriptModule, ModelData]]


@dataclass(frozen=True)
class Case:
    """A pipeline: the job spec's steps, in order."""

    name: str
    steps: tuple[dict, ...]


@dataclass(frozen=True)
class Outcome:
    """One model × case: `status` is "ok", "engine_error" (with its `code`) or "fail"."""

    model: str
    case: str
    status: str
    code: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def cell(self) -> str:
        """The summary table's cell: ok, the EngineError code, or FAIL and the exception type."""
        if self.status == "ok":
            return "ok"
        if self.status == "engine_error":
            return str(self.code)
        return f"FAIL {self.code}"


def _images(labelled: bool = True) -> ModelData:
    x, y, _, _ = digits()
    return ModelData((x[:SAMPLES],), y[:SAMPLES] if labelled else None)


def _tokens(vocab: int, classes: int | None, length: int = 16) -> ModelData:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (SAMPLES, length), generator=generator)
    labels = None if classes is None else torch.randint(0, classes, (SAMPLES,), generator=generator)
    return ModelData((ids,), labels)


def _image_model(cls: type[torch.nn.Module], scripted: bool = False) -> Callable:
    def build():
        torch.manual_seed(0)
        data = _images()
        model = script(cls()) if scripted else trace(cls(), data.inputs[0][:1])
        return model, data

    return build


def _transformer_mlp():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = ModelData(
        (torch.randn(SAMPLES, 64, generator=generator),), torch.randint(0, 10, (SAMPLES,), generator=generator)
    )
    return trace(TransformerMLP(), data.inputs[0][:1]), data


def _lstm():
    torch.manual_seed(0)
    return script(LSTMClassifier()), _tokens(1000, classes=5)


def _tiny_encoder():
    torch.manual_seed(0)
    data = _tokens(1000, classes=None)
    return trace(TinyEncoder(), data.inputs[0][:1]), data


def _two_input_encoder():
    torch.manual_seed(0)
    ids = _tokens(500, classes=None).inputs[0]
    mask = torch.ones_like(ids)
    mask[::2, 12:] = 0  # padded samples, as a tokenizer gives them
    return trace(TwoInputEncoder(), ids[:1], mask[:1]), ModelData((ids, mask))


MODELS = (
    ZooModel("SequentialCNN", _image_model(SequentialCNN)),
    ZooModel("TinyResNet", _image_model(TinyResNet)),
    ZooModel("InceptionNet", _image_model(InceptionNet)),
    ZooModel("MobileNetStyle", _image_model(MobileNetStyle)),
    ZooModel("LoopIfNet", _image_model(LoopIfNet, scripted=True)),
    ZooModel("FixedViewNet", _image_model(FixedViewNet)),
    ZooModel("TransformerMLP", _transformer_mlp),
    ZooModel("LSTMClassifier", _lstm),
    ZooModel("TinyEncoder", _tiny_encoder),
    ZooModel("TwoInputEncoder", _two_input_encoder),
)


def _quantize(scheme: str, **settings) -> dict:
    return {"op": "quantize", "scheme": scheme, **settings}


def _cases() -> tuple[Case, ...]:
    cases = [Case(f"quantize:{s}", (_quantize(s),)) for s in SCHEMES]
    cases.append(Case("quantize:dynamic_int8(min_fidelity)", (_quantize("dynamic_int8", min_fidelity=0.99),)))
    cases += [Case(f"prune → quantize:{s}", (CHANNEL_PRUNE, _quantize(s))) for s in SCHEMES]
    cases += [Case(f"prune → distill → quantize:{s}", (CHANNEL_PRUNE, DISTILL, _quantize(s))) for s in SCHEMES]
    cases += [
        Case("prune:unstructured → distill", ({"op": "prune", "structure": "unstructured", "amount": 0.5}, DISTILL)),
        Case(
            "prune:n:m → distill → quantize:weight_int8",
            ({"op": "prune", "structure": "n:m"}, DISTILL, _quantize("weight_int8")),
        ),
        Case("distill", (DISTILL,)),
        Case("compile", (COMPILE,)),
    ]
    cases += [Case(f"quantize:{s} → compile", (_quantize(s), COMPILE)) for s in SCHEMES]
    return tuple(cases)


CASES = _cases()


@cache
def _saved(model: ZooModel, root: Path) -> tuple[Path, Path, ModelData]:
    """The model's file and its dataset's .npz, written once per matrix run."""
    module, data = model.build()
    folder = root / model.name
    folder.mkdir(parents=True, exist_ok=True)
    model_path, data_path = folder / "model.pt", folder / "data.npz"
    torch.jit.save(module, str(model_path))
    arrays = {f"input_{i}": t.numpy() for i, t in enumerate(data.inputs)}
    if data.labels is not None:
        arrays["label"] = data.labels.numpy()
    np.savez(data_path, **arrays)
    return model_path, data_path, data


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, code) of a case that raised: a user-actionable EngineError, or a failure of the matrix."""
    if isinstance(exc, EngineError) and exc.code != "internal_error":
        return "engine_error", exc.code
    if isinstance(exc, MeterError):
        return "fail", f"MeterError({exc.code})"
    return "fail", type(exc).__name__


def run_case(model: ZooModel, case: Case, root: Path) -> Outcome:
    """Run one model × case as a job, in a folder of its own under `root`."""
    model_path, data_path, data = _saved(model, root)
    output_dir = Path(tempfile.mkdtemp(prefix="case-", dir=root / model.name))
    spec = {"steps": [dict(step) for step in case.steps], "benchmark": dict(BENCHMARK), "seed": 0}
    files = {
        "model": str(model_path),
        "calibration": str(data_path),
        "evaluation": None,
        "students": {},
        "output_dir": str(output_dir),
    }
    started = time.perf_counter()
    try:
        result = execute_job(lambda event: None, spec, files, cpu=cpu_share(1, override=1).describe(), extra_time_s=0)
        _check_artifact(Path(result["artifact_path"]), data)
    except Exception as exc:  # noqa: BLE001 (every exception is an outcome; classify says which kind)
        status, code = classify(exc)
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return Outcome(model.name, case.name, status, code, detail, time.perf_counter() - started)
    finally:
        for path in sorted(output_dir.glob("*"), reverse=True):
            path.unlink()
        output_dir.rmdir()
    return Outcome(model.name, case.name, "ok", seconds=time.perf_counter() - started)


class ArtifactError(Exception):
    """The artifact a job returns does not load or does not run: what the user downloads is broken."""


def _check_artifact(path: Path, data: ModelData) -> None:
    try:
        reloaded = torch.jit.load(str(path))
        with torch.inference_mode():
            reloaded(*data.take(2).inputs)
    except Exception as exc:
        raise ArtifactError(f"the artifact {path.name} does not load and run: {type(exc).__name__}: {exc}") from exc


def run_matrix(
    models: Iterable[ZooModel] = MODELS,
    cases: Iterable[Case] = CASES,
    root: Path | None = None,
    progress: Callable[[Outcome], None] = lambda outcome: None,
) -> list[Outcome]:
    """Every model × case, in order; `progress` sees each outcome as it is recorded."""
    cases = tuple(cases)
    with tempfile.TemporaryDirectory(prefix="compactor-matrix-") as scratch:
        folder = root or Path(scratch)
        outcomes = []
        for model in models:
            for case in cases:
                outcome = run_case(model, case, folder)
                progress(outcome)
                outcomes.append(outcome)
        _saved.cache_clear()
        return outcomes


def summary_table(outcomes: list[Outcome]) -> str:
    """Cases down, models across; each cell ok, an EngineError code, or FAIL and the exception type."""
    models = list(dict.fromkeys(o.model for o in outcomes))
    cases = list(dict.fromkeys(o.case for o in outcomes))
    cells = {(o.model, o.case): o.cell for o in outcomes}
    widths = [max(len(m), *(len(cells.get((m, c), "")) for c in cases)) for m in models]
    first = max(len("case"), *(len(c) for c in cases))
    lines = [" | ".join(["case".ljust(first), *(m.ljust(w) for m, w in zip(models, widths, strict=True))])]
    lines.append("-+-".join(["-" * first, *("-" * w for w in widths)]))
    for case in cases:
        row = [cells.get((m, case), "").ljust(w) for m, w in zip(models, widths, strict=True)]
        lines.append(" | ".join([case.ljust(first), *row]))
    return "\n".join(lines)


def _select(items, names: str | None):
    if not names:
        return items
    wanted = set(names.split(","))
    chosen = tuple(item for item in items if item.name in wanted)
    unknown = wanted - {item.name for item in chosen}
    if unknown:
        raise SystemExit(f"unknown names: {', '.join(sorted(unknown))}; known: {', '.join(i.name for i in items)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo model names (default: all)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.perf_counter()

    def report(outcome: Outcome) -> None:
        print(f"{outcome.model:16} {outcome.case:44} {outcome.cell:28} {outcome.seconds:6.1f} s", flush=True)

    outcomes = run_matrix(_select(MODELS, args.models), _select(CASES, args.cases), progress=report)
    wall = time.perf_counter() - started
    print("\n" + summary_table(outcomes))
    failed = [o for o in outcomes if o.status == "fail"]
    errors = [o for o in outcomes if o.status == "engine_error"]
    print(
        f"\n{len(outcomes)} cases in {wall:.0f} s: {len(outcomes) - len(failed) - len(errors)} ok, "
        f"{len(errors)} EngineError (recorded), {len(failed)} FAIL"
    )
    for outcome in errors + failed:
        print(f"  {outcome.cell}: {outcome.model} × {outcome.case}: {outcome.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
