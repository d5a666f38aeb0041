"""Serving modes and the lossless floor, through the meter a job uses (issue 18 point 2, issue 15 point 2).

On the digits CNN and the ResNet-style CNN (trained briefly), at batch 1 and 32, one thread, every
model reloaded from its file and run by `measure_models` in each serving mode, all of them in the
same interleaved rounds:
- plain: the uploaded model; freeze: plain `torch.jit.freeze`, saved and reloaded; compile: the
  `compile` step's artifact; static_int8; prune50 (channel, 50 %); prune50+compile;
- each served plain (`torch.jit.load`), optimized (`optimize_for_inference` after loading) and, for
  the uploaded model, on ONNX Runtime float (its ONNX export, CPU provider, one thread).
Speed-ups are the meter's: the median of per-round ratios over the uploaded model served plain,
with the distribution-free 95 % interval of that median and the min–max of the rounds. Then the
lossless floor (the fastest of plain, freeze and compile in their lossless modes) and what each
lossy model adds beyond it, and the compile artifact against plain freezing (target: at least as
fast, max |Δ| ≤ 1e-5), paired the same way.

Run: .venv/bin/python benchmarks/serving_modes.py   (one thread; a few minutes)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from quantize_timing import print_table, reload

from tests.zoo import SequentialCNN, TinyResNet, digits, trace, train_classifier
from worker.engines.data import ModelData
from worker.engines.measure import BenchmarkConfig, measure_models
from worker.engines.measure.latency import paired_speedup, time_interleaved
from worker.engines.pipeline import PipelineContext, run_step

BATCHES = (1, 32)
MODES = ("plain", "optimized", "onnxruntime")
CONFIG = BenchmarkConfig(
    batch_sizes=BATCHES,
    warmup=20,
    iterations=300,
    rounds=15,
    max_rounds=31,
    extra_time_s=40,
    threads=1,
    serving=MODES,
    measure_memory=False,
)
LOSSLESS = ("upload", "freeze", "compile")


def variants(traced: torch.jit.ScriptModule, ctx: PipelineContext) -> dict[str, torch.jit.ScriptModule]:
    pruned = run_step(traced, {"op": "prune", "structure": "channel", "amount": 0.5}, ctx).model.eval()
    return {
        "upload": reload(traced),
        "freeze": reload(torch.jit.freeze(traced.eval())),
        "compile": reload(run_step(traced, {"op": "compile"}, ctx).model),
        "static_int8": reload(run_step(traced, {"op": "quantize", "scheme": "static_int8"}, ctx).model),
        "prune50": reload(pruned),
        "prune50+compile": reload(run_step(pruned, {"op": "compile"}, ctx).model),
    }


def _interval(spread: dict) -> str:
    return f"{spread['interval']['low']:.2f}–{spread['interval']['high']:.2f}"


def _range(spread: dict) -> str:
    return f"{spread['min']:.2f}–{spread['max']:.2f}"


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    folder = Path(tempfile.mkdtemp(prefix="serving-modes-"))
    for title, net in (("digits CNN", SequentialCNN()), ("ResNet-style", TinyResNet())):
        torch.manual_seed(0)
        traced = trace(train_classifier(net, x_train, y_train, epochs=2), x_train[:2])
        evaluation = ModelData((x_test,), y_test)
        ctx = PipelineContext(
            teacher=traced,
            calibration=ModelData((x_train[:256],), y_train[:256]),
            evaluation=evaluation,
            batch_sizes=BATCHES,
        )
        models = variants(traced, ctx)
        files = {}
        for name, model in models.items():
            files[name] = folder / f"{title.split()[0]}-{name}.pt"
            torch.jit.save(model, str(files[name]))
        onnx = folder / f"{title.split()[0]}-upload.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                traced, (x_test[:2],), str(onnx), dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "b"}}
            )
        m = measure_models(models, files, "upload", evaluation, CONFIG, onnx_files={"upload": onnx}, lossless=LOSSLESS)

        rows = []
        for batch in map(str, BATCHES):
            for name in models:
                metrics = m.metrics[name]
                for mode in MODES:
                    if mode == "plain":
                        figures, spread = metrics, m.speedup.get(name, {}).get(batch)
                        difference = metrics["fidelity"]["max_abs_error"]
                    else:
                        figures = metrics["serving"][mode]
                        if "unavailable" in figures:
                            continue
                        spread, difference = figures["speedup"][batch], figures["max_abs_difference"]
                    p50 = figures["latency_ms"][batch]["p50"]
                    if spread is None:  # the reference itself
                        rows.append((batch, name, mode, p50, 1.0, "—", "—", "—", "", f"{difference:.1e}"))
                        continue
                    rows.append(
                        (
                            batch,
                            name,
                            mode,
                            p50,
                            spread["median"],
                            _interval(spread),
                            _range(spread),
                            spread["rounds"],
                            "noisy" if spread["noisy"] else "",
                            f"{difference:.1e}",
                        )
                    )
        print_table(
            f"{title}, one thread, every model × mode in the same interleaved rounds (speed-up over plain served plain)",
            ("batch", "model", "mode", "p50 ms", "speed-up", "95% interval", "rounds min–max", "rounds", "", "max |Δ|"),
            rows,
        )
        print("  (max |Δ|: served plain, against the uploaded model; other modes, against the same model served plain)")

        floor_rows = []
        for batch in map(str, BATCHES):
            floor = m.floor[batch]
            floor_rows.append(
                (batch, "lossless floor", f"{floor['model']} {floor['mode']}", floor["median"], _interval(floor))
            )
            for name, beyond in m.beyond_floor.items():
                spread = beyond[batch]
                floor_rows.append((batch, f"{name} beyond floor", spread["mode"], spread["median"], _interval(spread)))
        print_table(
            f"{title}: the floor and what each lossy model adds beyond it",
            ("batch", "", "served", "×", "95% interval"),
            floor_rows,
        )

        # the compile step's artifact against plain freezing, paired round by round
        calls = {
            b: {
                "freeze": lambda x=x_test[:b]: models["freeze"](x),
                "compile": lambda x=x_test[:b]: models["compile"](x),
            }
            for b in BATCHES
        }
        with torch.inference_mode():
            timed = time_interleaved(calls, CONFIG, torch.device("cpu"), reference="freeze")
            reference = traced(x_test)
            difference = float((models["compile"](x_test) - reference).abs().max())
        target_rows = []
        for b in BATCHES:
            spread = paired_speedup(timed.round_medians_ms["freeze"][b], timed.round_medians_ms["compile"][b])
            target_rows.append(
                (b, spread["median"], _interval(spread), _range(spread), spread["rounds"], f"{difference:.1e}")
            )
        print_table(
            f"{title}: compile artifact over plain torch.jit.freeze (target ≥ 1.0×, max |Δ| ≤ 1e-5)",
            ("batch", "speed-up", "95% interval", "rounds min–max", "rounds", "max |Δ| vs plain"),
            target_rows,
        )
        print(
            f"  environment: {m.environment['device_name']}, torch {m.environment['torch']}, {m.environment['serving']}"
        )
        print(f"  load average start/end: {m.environment['load_average']}; notes: {m.notes}")


if __name__ == "__main__":
    main()
