"""dynamic_int8's speed guard for LSTM/GRU: the timing probe, and layers kept in float when int8 is slower."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import LSTMClassifier, script
from worker.engines.data import ModelData
from worker.engines.errors import EngineError
from worker.engines.pipeline import PipelineContext, run_step
from worker.engines.quantize import dynamic
from worker.engines.quantize.backend import activation_reduce_range, int8_backend
from worker.engines.quantize.recurrent_speed import RecurrentLayout, int8_slower, probe_recurrent_speed

SLOWER = {"batch 1": {"float": 0.5, "int8": 0.9}, "batch 32": {"float": 2.0, "int8": 1.5}}
FASTER = {"batch 1": {"float": 0.9, "int8": 0.5}, "batch 32": {"float": 2.0, "int8": 1.5}}


class LSTMOnly(nn.Module):
    """A float sequence in, the LSTM's last hidden output out: nothing but the recurrent layer."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lstm = nn.LSTM(16, 24, batch_first=True, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out[:, -1]


def _quantize(model, step, *inputs, batch_sizes=(1,)):
    ctx = PipelineContext(teacher=model, calibration=None, evaluation=ModelData(inputs), batch_sizes=batch_sizes)
    return run_step(model, {"op": "quantize", "scheme": "dynamic_int8", **step}, ctx)


@pytest.mark.parametrize(
    "kind, bidirectional, bias", [("LSTM", False, True), ("GRU", True, True), ("LSTM", False, False)]
)
def test_probe_times_float_and_int8_at_each_batch(kind, bidirectional, bias):
    layer = getattr(nn, kind)(8, 16, num_layers=2, bidirectional=bidirectional, bias=bias)
    layout = RecurrentLayout(kind, 8, 16, 2, bidirectional, bias)
    backend = int8_backend()
    timings = probe_recurrent_speed(
        list(layer._flat_weights), layout, True, backend, activation_reduce_range(backend), (4, 1, 4)
    )
    assert list(timings) == ["batch 1", "batch 4"]
    assert all(set(t) == {"float", "int8"} and min(t.values()) > 0 for t in timings.values())


def test_int8_slower_names_where_it_lost_and_where_it_won():
    reason = int8_slower(SLOWER)
    assert reason == "int8 slower at batch 1 (0.90 ms vs 0.50 ms float), though faster at batch 32 (1.50 ms vs 2.00 ms)"
    assert int8_slower(FASTER) is None
    assert int8_slower({"batch 1": {"float": 1.0, "int8": 1.0}}) is not None  # a tie is no speed-up


def test_lstm_measured_slower_stays_float_with_reason(monkeypatch):
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: SLOWER)
    model = script(LSTMClassifier())
    tokens = torch.randint(0, 1000, (32, 12))
    out = _quantize(model, {}, tokens)

    rows = {layer["module"]: layer for layer in out.details["layers"]}
    assert rows["lstm"]["precision"] == "float32" and rows["lstm"]["reason"] == int8_slower(SLOWER)
    assert rows["embed"]["precision"] == rows["head"]["precision"] == "int8"
    assert out.details["quantized_layers"] == 2
    assert out.details["recurrent_probe_ms"] == {"LSTM 64→128 ×2 layers": SLOWER}
    assert "quantized_lstm" not in out.model.code and "aten::lstm" in str(out.model.graph)
    with torch.no_grad():
        assert float(nn.functional.cosine_similarity(model(tokens), out.model(tokens)).min()) >= 0.99


def test_lstm_measured_faster_runs_int8(monkeypatch):
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: FASTER)
    out = _quantize(script(LSTMClassifier()), {}, torch.randint(0, 1000, (16, 12)))
    rows = {layer["module"]: layer for layer in out.details["layers"]}
    assert rows["lstm"]["precision"] == "int8" and "reason" not in rows["lstm"]
    assert "quantized_lstm" in out.model.code


def test_lstm_without_biases_runs_int8(monkeypatch):
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: FASTER)
    model = script(LSTMOnly(bias=False))
    x = torch.randn(8, 5, 16)
    out = _quantize(model, {}, x)
    assert "quantized_lstm" in out.model.code
    with torch.no_grad():
        assert float(nn.functional.cosine_similarity(model(x), out.model(x)).min()) >= 0.99


def test_report_agrees_with_this_cpus_probe():
    """No monkeypatching: whatever this CPU measures, the report and the artifact say the same."""
    out = _quantize(script(LSTMClassifier()), {}, torch.randint(0, 1000, (16, 12)))
    timings = out.details["recurrent_probe_ms"]["LSTM 64→128 ×2 layers"]
    row = next(layer for layer in out.details["layers"] if layer["module"] == "lstm")
    slower = any(t["int8"] >= t["float"] for t in timings.values())
    assert (row["precision"] == "float32") == slower == ("quantized_lstm" not in out.model.code)
    if slower:
        assert row["reason"].startswith("int8 slower at")


def test_exclude_wins_over_the_speed_reason(monkeypatch):
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: SLOWER)
    out = _quantize(script(LSTMClassifier()), {"exclude": ["lstm"]}, torch.randint(0, 1000, (16, 12)))
    row = next(layer for layer in out.details["layers"] if layer["module"] == "lstm")
    assert row["precision"] == "float32" and "exclude" in row["reason"]


def test_recurrent_only_model_slower_in_int8_is_nothing_quantized(monkeypatch):
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: SLOWER)
    model = script(LSTMOnly())
    with pytest.raises(EngineError) as info:
        _quantize(model, {}, torch.randn(8, 5, 16))
    assert info.value.code == "nothing_quantized" and "int8 slower at" in info.value.message


def test_probe_runs_once_per_layout_across_min_fidelity_conversions(monkeypatch):
    calls = []
    monkeypatch.setattr(dynamic, "probe_recurrent_speed", lambda *args: calls.append(args[1]) or FASTER)
    # int8 never reproduces float exactly: the search tries every kept count, then gives up
    with pytest.raises(EngineError) as info:
        _quantize(script(LSTMClassifier()), {"min_fidelity": 1.0}, torch.randint(0, 1000, (16, 12)))
    assert info.value.code == "fidelity_unreachable"
    assert calls == [RecurrentLayout("LSTM", 64, 128, 2, False, True)]


def test_the_jobs_own_batch_sizes_decide(monkeypatch):
    """int8 faster at batch 1, slower at 32: a job served at batch 1 gets int8, one at 1 and 32 does not."""
    measured = {1: {"float": 1.38, "int8": 0.97}, 32: {"float": 2.0, "int8": 3.1}}
    asked = []
    monkeypatch.setattr(
        dynamic,
        "probe_recurrent_speed",
        lambda *args: asked.append(args[5]) or {f"batch {b}": measured[b] for b in args[5]},
    )
    model, tokens = script(LSTMClassifier()), torch.randint(0, 1000, (16, 12))

    at_one = _quantize(model, {}, tokens, batch_sizes=(1,))
    at_both = _quantize(model, {}, tokens, batch_sizes=(1, 32))

    assert asked == [(1,), (1, 32)]
    assert "quantized_lstm" in at_one.model.code
    row = next(layer for layer in at_both.details["layers"] if layer["module"] == "lstm")
    assert row["precision"] == "float32"
    assert (
        row["reason"]
        == "int8 slower at batch 32 (3.10 ms vs 2.00 ms float), though faster at batch 1 (0.97 ms vs 1.38 ms)"
    )
