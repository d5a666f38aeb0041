"""The meter on every tensor kind a model may hold: none may crash it (issue 17's `data_ptr` of a
oneDNN-packed weight failed jobs as the model's fault), and each is counted once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.zoo import SequentialCNN, trace
from worker.engines.data import ModelData
from worker.engines.errors import MeterError
from worker.engines.measure import BenchmarkConfig, measure_models, weight_stats
from worker.engines.measure import measure as measure_module
from worker.engines.measure.size import _unique
from worker.engines.quantize.onednn import OnednnDynamicLinear, onednn_available
from worker.errors import describe_error


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.h = OnednnDynamicLinear(linear.weight, linear.bias, True)

    def forward(self, x):
        return self.h(x)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 ops")
def test_a_onednn_packed_weight_has_no_storage_and_is_not_counted_twice():
    linear = nn.Linear(64, 32)
    model = torch.jit.script(_Holder(linear))
    assert model.h.packed.layout == torch._mkldnn
    with pytest.raises(RuntimeError, match="doesn't have storage"):
        model.h.packed.data_ptr()  # what crashed the meter

    stats = weight_stats(model)
    # the int8 weight (64·32) and its bias, scales and zero points (32 each); the packed copy not again
    assert stats.parameters == 64 * 32 + 3 * 32


class _Kinds(nn.Module):
    """One parameter of each kind `parameters()` can yield."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.strided = nn.Parameter(weight.clone())
        self.view = self.strided  # the same tensor again: counted once
        self.sparse = nn.Parameter(weight.to_sparse())
        self.sparse_csr = nn.Parameter(weight.to_sparse_csr())
        self.mkldnn = nn.Parameter(weight.to_mkldnn(), requires_grad=False)
        self.meta = nn.Parameter(torch.empty(3, 4, device="meta"))
        self.meta_twin = nn.Parameter(torch.empty(3, 4, device="meta"))  # same address 0, a different tensor
        self.register_buffer("meta_buffer", torch.empty(5, device="meta"))
        self.register_buffer("mkldnn_buffer", torch.ones(2, 2).to_mkldnn())


class _Wrapper(torch.Tensor):
    """A wrapper subclass (as torchao's quantized tensors are): no storage of its own."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return _Wrapper(args[0].inner)
        raise NotImplementedError(f"{func} on a wrapper")


class _Plain(torch.Tensor):
    """A plain subclass that keeps its storage."""


def test_every_tensor_kind_is_counted_without_crashing():
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
    model = _Kinds(weight)
    stats = weight_stats(model)
    # strided, sparse, csr and mkldnn: 4 non-zeros of 12 each; meta values are unknown: all 12 count
    assert stats.parameters == 4 * 12 + 2 * 12
    assert stats.nonzero_parameters == 4 * 4 + 2 * 12
    assert stats.buffers_bytes == 5 * 4 + 4 * 4


def test_quantized_and_subclass_tensors_are_counted():
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    quantized = torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8)
    plain = weight.as_subclass(_Plain)
    wrapper = _Wrapper(weight)
    assert len(list(_unique([quantized, plain, plain, wrapper, wrapper]))) == 3
    model = nn.Module()
    model.plain = nn.Parameter(plain)
    model.wrapper = nn.Parameter(wrapper, requires_grad=False)
    stats = weight_stats(model)
    assert stats.parameters == 8
    assert stats.nonzero_parameters == 2 + 4  # the wrapper refuses counting: its values count as non-zero


def test_views_of_one_storage_that_differ_are_different_weights():
    base = torch.arange(12.0).reshape(3, 4)
    assert len(list(_unique([base, base.view(3, 4), base[1:], base.t()]))) == 3


def test_a_failure_of_the_meters_own_code_is_the_services_not_the_models(monkeypatch, tmp_path):
    model = trace(SequentialCNN().eval(), torch.randn(1, 1, 32, 32))
    data = ModelData((torch.randn(4, 1, 32, 32),))
    config = BenchmarkConfig(warmup=0, iterations=2, rounds=1, measure_memory=False)

    def broken(model):
        raise RuntimeError("Cannot access data pointer of Tensor that doesn't have storage")

    monkeypatch.setattr(measure_module, "weight_stats", broken)
    with pytest.raises(MeterError) as caught:
        measure_models({"baseline": model}, {}, "baseline", data, config)
    described = describe_error(caught.value)
    assert described["code"] == "internal_error"
    assert "not of the model" in described["message"] and "running the model failed" not in described["message"]

    monkeypatch.undo()

    def broken_counter(model, inputs):
        raise RuntimeError("a bug in the MAC counter")

    monkeypatch.setattr(measure_module, "count_macs", broken_counter)
    measured = measure_models({"baseline": model}, {}, "baseline", data, config)
    assert measured.metrics["baseline"]["macs"] is None
    assert any("MACs could not be counted" in note for note in measured.notes)
