"""The HTML report: summary figures, escaping, tolerance of missing fields, no torch, and a real
browser (headless Chromium) that loads it without a single console message."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.reports.html import headline, render_report_html

CHROMIUM = Path("/usr/bin/chromium")


def _metrics(size, compressed, params, nonzero, macs, p50s, top1, fidelity=None, peak=None, by_op=None):
    latency = {
        b: {"p50": p, "p90": p * 1.08, "p99": p * 1.6, "mean": p * 1.03, "iterations": 105} for b, p in p50s.items()
    }
    return {
        "size_bytes": size,
        "compressed_size_bytes": compressed,
        "parameters": params,
        "nonzero_parameters": nonzero,
        "buffers_bytes": 2304,
        "macs": macs,
        "macs_by_operator": by_op or {"aten::conv2d": macs - 131_712, "aten::linear": 131_712},
        "macs_uncounted": [],
        "latency_ms": latency,
        "throughput_per_s": {b: int(b) / (s["mean"] / 1000) for b, s in latency.items()},
        "peak_memory_bytes": peak,
        "accuracy": {"top1": top1},
        "fidelity": fidelity or {"top1_agreement": 1.0, "cosine_min": 1.0, "cosine_mean": 1.0, "max_abs_error": 0.0},
    }


def realistic_report() -> dict:
    """A prune → quantize job on a small CNN, shaped like the worker's report."""
    baseline = _metrics(
        2_252_800, 2_087_000, 545_098, 545_098, 5_830_000, {"1": 0.912, "32": 24.8}, 0.9562, peak=41_900_000
    )
    pruned = _metrics(
        1_140_000,
        1_050_000,
        273_000,
        273_000,
        2_960_000,
        {"1": 0.52, "32": 12.1},
        0.9529,
        {"top1_agreement": 0.981, "cosine_min": 0.912, "cosine_mean": 0.991, "max_abs_error": 1.72},
        peak=24_100_000,
        by_op={"aten::conv2d": 2_828_288, "aten::linear": 131_712},
    )
    result = _metrics(
        578_000,
        402_000,
        273_000,
        271_400,
        2_960_000,
        {"1": 0.301, "32": 8.0},
        0.9542,
        {"top1_agreement": 0.984, "cosine_min": 0.905, "cosine_mean": 0.989, "max_abs_error": 1.9},
        peak=12_700_000,
        by_op={"quantized::conv2d": 2_828_288, "quantized::linear": 131_712},
    )
    prune_layers = [
        {"module": f"features.{i}", "kind": "Conv2d", "channels_before": c, "channels_after": c // 2, "sparsity": 0.5}
        for i, c in ((0, 32), (3, 64), (7, 128))
    ]
    prune_layers.append(
        {"module": "fc1", "kind": "Linear", "channels_before": 256, "channels_after": 256, "sparsity": 0.0}
    )
    quant_layers = [
        {"module": m, "kind": k, "precision": "int8", "sensitivity": s}
        for m, k, s in (
            ("features.0", "Conv2d", 0.004),
            ("features.3", "Conv2d", 0.002),
            ("features.7", "Conv2d", 0.003),
        )
    ]
    quant_layers.append(
        {
            "module": "fc2",
            "kind": "Linear",
            "precision": "float32",
            "sensitivity": 0.031,
            "reason": "kept in float to hold min_fidelity 0.9",
        }
    )
    return {
        "job_id": "7b0c5a9e-52d4-4cde-9f0a-1f6c1c3f8e21",
        "spec": {
            "model_id": "m-1",
            "name": "cnn <fast> & small",
            "steps": [
                {"op": "prune", "structure": "channel", "criterion": "l1", "amount": 0.5},
                {"op": "quantize", "scheme": "static_int8"},
            ],
            "benchmark": {"device": "cpu", "batch_sizes": [1, 32]},
            "target": {"max_accuracy_drop": 0.01},
        },
        "environment": {
            "device": "cpu",
            "device_name": "Intel(R) Xeon(R) Processor",
            "torch": "2.13.0+cpu",
            "threads": 1,
            "worker": "worker-1 (x86_64)",
            "measured_at": "2026-11-29T12:00:00Z",
            "rounds": 7,
            "timing": "perf_counter per call",
        },
        "baseline": baseline,
        "result": result,
        "stages": [
            {
                "op": "prune",
                "params": {"structure": "channel", "amount": 0.5},
                "metrics": pruned,
                "speedup": {"1": 1.75, "32": 2.05},
                "details": {
                    "layers": prune_layers,
                    "skipped": [{"module": "fc2", "reason": "output layer: its width is the model's interface"}],
                },
            },
            {
                "op": "quantize",
                "params": {"scheme": "static_int8"},
                "metrics": result,
                "speedup": {"1": 3.03, "32": 3.1},
                "details": {"layers": quant_layers, "skipped": []},
            },
        ],
        "summary": {
            "speedup": {"1": 3.03, "32": 3.1},
            "speedup_spread": {
                "1": {"median": 3.03, "min": 2.88, "max": 3.2, "rounds": 7},
                "32": {"median": 3.1, "min": 3.02, "max": 3.17, "rounds": 7},
            },
            "size_ratio": 3.9,
            "accuracy_drop": 0.002,
            "fidelity_cosine_min": 0.905,
            "targets": {"max_accuracy_drop": {"limit": 0.01, "actual": 0.002, "met": True}},
        },
        "notes": ["quantize: fc2 kept in float32 to hold min_fidelity"],
    }


def profile_report() -> dict:
    """A profile-only job: `steps: []`, result = baseline."""
    report = realistic_report()
    report["spec"]["steps"] = []
    report["stages"] = []
    report["result"] = report["baseline"]
    report["summary"] = {"speedup": {}, "size_ratio": 1.0, "accuracy_drop": 0.0}
    return report


def test_headline_has_the_summary_figures():
    assert headline(realistic_report()) == "3.1× faster at batch 32, 3.9× smaller, −0.2 pt accuracy"
    page = render_report_html(realistic_report())
    assert "3.1× faster at batch 32, 3.9× smaller, −0.2 pt accuracy" in page


def test_headline_variants():
    slower = realistic_report()
    slower["summary"].update(speedup={"1": 0.8}, size_ratio=0.5, accuracy_drop=-0.004)
    assert headline(slower) == "1.25× slower at batch 1, 2.0× larger, +0.4 pt accuracy"
    unlabelled = realistic_report()
    unlabelled["summary"]["accuracy_drop"] = None
    assert headline(unlabelled).endswith("98.4% top-1 agreement")
    assert (
        headline(profile_report())
        == "Profile: p50 0.912 ms at batch 1, 24.8 ms at batch 32; 2.15 MiB; 5.83 M MACs per sample"
    )


def test_a_speedup_whose_interval_includes_one_is_never_called_faster_and_noise_is_shown():
    report = realistic_report()
    report["summary"]["speedup"] = {"32": 1.01}
    report["summary"]["speedup_spread"] = {
        "32": {
            "median": 1.01,
            "min": 0.82,
            "max": 1.29,
            "rounds": 31,
            "interval": {"low": 0.93, "high": 1.12, "confidence": 0.97},
            "noisy": True,
        }
    }
    assert headline(report).startswith("no clear speed-up at batch 32 (0.93–1.12×)")
    page = render_report_html(report)
    assert "faster" not in headline(report) and "0.93–1.12×" in page and ">noisy</strong>" in page
    report["summary"]["speedup_spread"]["32"].update(interval={"low": 1.02, "high": 1.08, "confidence": 0.97})
    assert headline(report).startswith("1.01× faster at batch 32")


def test_headline_of_an_embedding_model_is_its_cosine():
    # a sentence-embedding model: unlabelled data, outputs that are no class scores, so no top-1 agreement
    report = realistic_report()
    report["summary"]["accuracy_drop"] = None
    report["result"]["fidelity"] = {
        "top1_agreement": None,
        "cosine_min": 0.98996,
        "cosine_mean": 0.9991,
        "max_abs_error": 0.03,
    }
    assert headline(report) == "3.1× faster at batch 32, 3.9× smaller, cosine ≥ 0.9899"
    assert "top-1" not in headline(report)


def test_page_shows_charts_tables_and_environment():
    page = render_report_html(realistic_report())
    assert page.count("<svg") == 2 + 1 + 2  # two latency panels, the stage scatter, two layer charts
    for text in (
        "p50 latency at batch 32",
        "features.7",
        "kept in float to hold min_fidelity 0.9",
        "output layer: its width is the model&#x27;s interface",
        "Intel(R) Xeon(R) Processor",
        "quantized::conv2d",
        "range 2.88–3.20× over 7 paired rounds",
        "max_accuracy_drop",
    ):
        assert text in page, text


def test_user_strings_are_escaped():
    report = realistic_report()
    report["spec"]["name"] = "<script>alert(1)</script>"
    report["stages"][0]["details"]["layers"][0]["module"] = "<img src=x onerror=alert(1)>"
    report["notes"] = ["<b>bold</b> & more"]

    page = render_report_html(report)

    assert "<script>alert(1)" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp; more" in page


def test_nothing_is_fetched_and_there_are_no_scripts():
    page = render_report_html(realistic_report())
    assert "<script" not in page
    assert not re.search(r"""\b(src|href)\s*=""", page)
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page


@pytest.mark.parametrize(
    "report",
    [
        {},
        None,
        {"baseline": None, "stages": [None, {"op": 3}], "summary": "broken"},
        {
            "baseline": {"latency_ms": {"1": {"p50": None}}, "size_bytes": "big"},
            "result": {},
            "stages": [{"op": "prune"}],
        },
        {
            "stages": [
                {
                    "op": "prune",
                    "metrics": {"latency_ms": {"8": {"p50": 2.0}}},
                    "details": {"layers": [{"sparsity": 2}]},
                }
            ],
            "baseline": {"latency_ms": {"8": {"p50": 3.0, "p90": float("nan")}}},
        },
    ],
)
def test_missing_and_malformed_fields_still_render(report):
    page = render_report_html(report)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_profile_only_report():
    page = render_report_html(profile_report())
    assert "profile only (no steps)" in page
    assert page.count("<svg") == 2  # one latency panel per batch size, baseline only
    assert "speed-up" not in page


def test_rendering_does_not_import_torch():
    code = "import sys; import app.reports.html as h; h.render_report_html({}); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "False"


def _chromium(page: Path, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """Load `page` in headless Chromium; return the DOM after load and every console message."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


chromium_only = pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None,
    reason="headless Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
)


@chromium_only
def test_console_capture_sees_errors_and_blocked_fetches(tmp_path):
    """The harness itself: a page with a script error and an external image must be caught."""
    page = render_report_html(realistic_report()).replace(
        "</main>", '<img alt="" src="https://example.com/x.png"></main>'
    )
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")

    _, console = _chromium(probe, tmp_path)

    assert any("Content Security Policy" in line for line in console), console


@chromium_only
def test_chromium_renders_the_report_without_console_messages(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_report_html(realistic_report()), encoding="utf-8")

    dom, console = _chromium(page, tmp_path, "--window-size=1200,4000", f"--screenshot={tmp_path / 'report.png'}")

    assert console == []
    assert "3.1× faster at batch 32, 3.9× smaller, −0.2 pt accuracy" in dom
    assert dom.count("<svg") == 5
    assert (tmp_path / "report.png").stat().st_size > 10_000


@chromium_only
def test_chromium_renders_a_profile_an_empty_and_a_serving_report(tmp_path):
    for name, report in (("profile", profile_report()), ("empty", copy.deepcopy({})), ("serving", serving_report())):
        page = tmp_path / f"{name}.html"
        page.write_text(render_report_html(report), encoding="utf-8")
        dom, console = _chromium(page, tmp_path)
        assert console == [], name
        assert "<h1" in dom


def _spread(median: float, low: float, high: float, **extra) -> dict:
    return {
        "median": median,
        "min": low * 0.9,
        "max": high * 1.1,
        "rounds": 9,
        "interval": {"low": low, "high": high, "confidence": 0.96},
        "noisy": False,
        **extra,
    }


def serving_report() -> dict:
    """The realistic report served plain, optimized and on ONNX Runtime (no ONNX file for the result)."""
    report = realistic_report()
    report["spec"]["benchmark"]["serving"] = ["plain", "optimized", "onnxruntime"]
    for side, optimized in (("baseline", {"1": 0.85, "32": 15.2}), ("result", {"1": 0.28, "32": 6.1})):
        metrics = report[side]
        metrics["serving"] = {
            "optimized": {
                "unavailable": None,
                "max_abs_difference": 2.4e-6,
                "lossless": True,
                "latency_ms": {
                    b: {"p50": p, "p90": p, "p99": p, "mean": p, "iterations": 105} for b, p in optimized.items()
                },
                "speedup": {
                    b: _spread(report["baseline"]["latency_ms"][b]["p50"] / p, 1.0, 2.0) for b, p in optimized.items()
                },
            },
            "onnxruntime": {"unavailable": "no ONNX file of <this> model was made in this job"},
        }
    report["summary"]["lossless_floor"] = {
        "1": _spread(1.07, 0.98, 1.15, model="baseline", mode="optimized", p50_ms=0.85),
        "32": _spread(1.63, 1.55, 1.70, model="baseline", mode="optimized", p50_ms=15.2),
    }
    report["summary"]["beyond_floor"] = {
        "1": _spread(2.9, 2.7, 3.1, mode="plain"),
        "32": _spread(2.5, 2.4, 2.6, mode="optimized"),
    }
    return report


def test_the_headline_credits_a_lossy_result_only_beyond_a_floor_clearly_above_plain():
    report = serving_report()
    assert (
        headline(report)
        == "3.1× faster at batch 32 (2.5× beyond the 1.63× lossless floor), 3.9× smaller, −0.2 pt accuracy"
    )
    report["summary"]["beyond_floor"]["32"].update(
        median=1.02, interval={"low": 0.97, "high": 1.06, "confidence": 0.96}
    )
    assert "(no clear gain beyond the 1.63× lossless floor)" in headline(report)
    report["summary"]["beyond_floor"]["32"].update(median=0.8, interval={"low": 0.75, "high": 0.85, "confidence": 0.96})
    assert "(1.25× slower than the 1.63× lossless floor)" in headline(report)
    # a floor whose interval includes 1.0 is no faster than plain: nothing to subtract, nothing said
    report["summary"]["lossless_floor"]["32"]["interval"] = {"low": 0.98, "high": 1.7, "confidence": 0.96}
    assert headline(report) == "3.1× faster at batch 32, 3.9× smaller, −0.2 pt accuracy"


def test_the_page_shows_every_mode_the_floor_and_why_a_mode_did_not_run():
    page = render_report_html(serving_report())
    section = page.split("Serving modes and the lossless floor", 1)[1].split("</section>", 1)[0]
    # the baseline and the result (the last stage) have figures for both modes; the fixture's prune stage has none
    assert section.count(">optimized<") == 2 and section.count(">onnxruntime<") == 2
    assert "not run: no ONNX file of &lt;this&gt; model was made in this job" in section
    assert "batch 32: lossless floor 1.63× (baseline served optimized" in section
    assert "the result adds 2.5× beyond it, served optimized, interval 2.40–2.60×" in section
    # a report served plain, whose floor is the baseline as uploaded, has no such section
    assert "Serving modes" not in render_report_html(realistic_report())


@pytest.mark.parametrize(
    "serving",
    [
        {"baseline": {"serving": {"optimized": "x", "onnxruntime": {"unavailable": 5}}}},
        {"summary": {"lossless_floor": {"1": None, "8": {"model": 3}}, "beyond_floor": "x"}},
        {"spec": {"benchmark": {"serving": "plain"}}, "baseline_compiled": {"metrics": None, "speedup": [1]}},
    ],
)
def test_malformed_serving_figures_still_render(serving):
    report = serving_report()
    for key, value in serving.items():
        report[key] = {**report[key], **value} if isinstance(report.get(key), dict) else value
    page = render_report_html(report)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
