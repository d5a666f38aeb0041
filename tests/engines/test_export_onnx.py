"""ONNX artifacts on the zoo: exported with dynamic axes, loaded and checked in ONNX Runtime, int8
pipelines quantized by ONNX Runtime holding min_fidelity, and a refusal that says why."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from tests import zoo
from worker.engines.data import ModelData
from worker.engines.export import build_onnx_artifact
from worker.engines.export.onnx_artifact import FLOAT_AGREEMENT
from worker.engines.export.runtime import ort_session, run_session
from worker.engines.measure.quality import fidelity, fidelity_score
from worker.engines.pipeline import PipelineContext, parse_step, run_step


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pipeline(model, data: ModelData, steps: list[dict], calibration: ModelData | None = None):
    ctx = PipelineContext(teacher=model, calibration=calibration, evaluation=data)
    models, configs, details = [model], [], []
    for step in steps:
        config = parse_step(step)
        out = run_step(models[-1], config, ctx)
        models.append(out.model.eval())
        configs.append(config)
        details.append(out.details)
    return models, configs, details


def _export(tmp_path: Path, model, data, steps=(), calibration=None):
    models, configs, details = _pipeline(model, data, list(steps), calibration)
    path = tmp_path / "model.onnx"
    section = build_onnx_artifact(models, configs, details, data, calibration, path)
    return models, details, section, path


def _digits_model(kind):
    x_train, y_train, x_test, y_test = zoo.digits()
    eager = zoo.train_classifier(kind(), x_train, y_train, epochs=2)
    return eager, ModelData((x_test,), y_test), ModelData((x_train[:256],), y_train[:256])


ZOO = {
    "traced CNN": lambda: (zoo.trace(_digits_model(zoo.SequentialCNN)[0], torch.rand(2, 1, 32, 32)), "digits"),
    "traced ResNet": lambda: (zoo.trace(_digits_model(zoo.TinyResNet)[0], torch.rand(2, 1, 32, 32)), "digits"),
    "scripted ResNet": lambda: (zoo.script(_digits_model(zoo.TinyResNet)[0]), "digits"),
    "traced transformer MLP": lambda: (zoo.trace(zoo.TransformerMLP(), torch.rand(2, 64)), "vectors"),
    "scripted loop/if": lambda: (zoo.script(zoo.LoopIfNet()), "digits"),
}


def _data(kind: str) -> ModelData:
    if kind == "digits":
        _, _, x_test, y_test = zoo.digits()
        return ModelData((x_test[:96],), y_test[:96])
    return ModelData((torch.randn(96, 64, generator=torch.Generator().manual_seed(0)),))


@pytest.mark.parametrize("name", list(ZOO))
def test_the_zoo_exports_and_onnx_runtime_reproduces_it_at_another_batch_size(tmp_path, name):
    model, kind = ZOO[name]()
    model, _ = zoo.round_trip(model)
    data = _data(kind)

    _, _, section, path = _export(tmp_path, model, data)

    assert "missing" not in section, section
    assert section["precision"] == "float32" and section["fidelity"]["score"] >= FLOAT_AGREEMENT
    assert section["inputs"][0]["shape"][0] == "batch" and section["outputs"][0]["shape"][0] == "batch"
    onnx.checker.check_model(str(path))
    # exported from two samples, run here on 37: the batch axis is really dynamic
    batch = data.take(37).inputs
    with torch.inference_mode():
        expected = model(*batch)
    outputs = run_session(ort_session(path), batch)
    assert outputs[0].shape == expected.shape
    assert fidelity(expected, outputs[0])["cosine_min"] > 0.9999


def test_token_inputs_get_a_dynamic_sequence_axis(tmp_path):
    model, _ = zoo.round_trip(zoo.script(zoo.LSTMClassifier()))
    tokens = torch.randint(0, 1000, (64, 12), generator=torch.Generator().manual_seed(0))

    _, _, section, path = _export(tmp_path, model, ModelData((tokens,)))

    assert section["inputs"] == [{"name": "input", "shape": ["batch", "sequence"]}]
    longer = torch.randint(0, 1000, (5, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(longer)
    assert fidelity(expected, run_session(ort_session(path), (longer,))[0])["cosine_min"] > 0.9999


def test_a_model_the_exporter_cannot_express_is_missing_with_the_reason_and_no_file(tmp_path):
    # nn.MultiheadAttention inside a traced, reloaded module: the exporter loses the tensor's rank
    model, _ = zoo.round_trip(zoo.trace(zoo.TinyEncoder(), torch.randint(0, 1000, (2, 12))))

    _, _, section, path = _export(tmp_path, model, ModelData((torch.randint(0, 1000, (32, 12)),)))

    assert set(section) == {"missing"}
    assert "cannot export this model" in section["missing"] and len(section["missing"]) < 600
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_dynamic_int8_is_quantized_by_onnx_runtime_from_the_float_model(tmp_path):
    model, _ = zoo.round_trip(zoo.trace(zoo.TransformerMLP(), torch.rand(2, 64)))
    data = _data("vectors")

    models, _, section, path = _export(tmp_path, model, data, [{"op": "quantize", "scheme": "dynamic_int8"}])

    assert section["precision"] == "int8"
    assert section["quantization"]["method"] == "onnxruntime.quantization.quantize_dynamic"
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    # the Linear on 2-D input is exported as Gemm, rewritten so that it is quantized too
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert "Gemm" not in ops and "MatMul" not in ops
    assert section["fidelity_to_source"]["cosine_min"] > 0.999
    assert path.stat().st_size < 0.5 * len(_float_bytes(models[0], data))


def _float_bytes(model, data) -> bytes:
    from worker.engines.export.onnx_artifact import export_onnx

    return export_onnx(model, data.take(2))


def test_static_int8_is_qdq_calibrated_and_smaller(tmp_path):
    eager, data, calibration = _digits_model(zoo.SequentialCNN)
    model, _ = zoo.round_trip(zoo.trace(eager, torch.rand(2, 1, 32, 32)))

    models, _, section, path = _export(
        tmp_path, model, data, [{"op": "quantize", "scheme": "static_int8"}], calibration
    )

    assert section["precision"] == "int8" and section["quantization"]["format"] == "QDQ"
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert path.stat().st_size < 0.4 * len(_float_bytes(models[0], data))
    assert section["fidelity_to_source"]["top1_agreement"] >= 0.97


def test_min_fidelity_holds_on_the_reloaded_onnx_file_keeping_the_steps_float_layers(tmp_path):
    eager, data, calibration = _digits_model(zoo.SequentialCNN)
    model, _ = zoo.round_trip(zoo.trace(eager, torch.rand(2, 1, 32, 32)))
    step = {"op": "quantize", "scheme": "dynamic_int8", "exclude": ["fc2"], "min_fidelity": 0.995}

    models, details, section, path = _export(tmp_path, model, data, [step], calibration)

    kept = [row["module"] for row in details[0]["layers"] if row["precision"] == "float32"]
    assert "fc2" in kept and set(kept) <= set(section["quantization"]["modules_in_float"])
    assert section["quantization"]["nodes_in_float"], "the float modules were matched to ONNX nodes"
    # scored here again, independently, on the file as a user loads it
    with torch.inference_mode():
        reference = models[0](*data.inputs)
    outputs = run_session(ort_session(path), data.inputs)
    held = fidelity_score(fidelity(reference, outputs[0], class_scores=True))[1]
    assert held >= 0.995
    excluded = set(section["quantization"]["nodes_in_float"])
    float_matmuls = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"]
    assert excluded & set(float_matmuls), "fc2 runs as a float MatMul in the file"


def test_steps_after_the_int8_step_that_change_it_leave_onnx_missing(tmp_path):
    model, _ = zoo.round_trip(zoo.trace(zoo.TransformerMLP(), torch.rand(2, 64)))
    steps = [
        parse_step({"op": "quantize", "scheme": "dynamic_int8"}),
        parse_step({"op": "distill", "epochs": 1}),
    ]
    path = tmp_path / "model.onnx"

    section = build_onnx_artifact([model, model, model], steps, [{"layers": []}, {}], _data("vectors"), None, path)

    assert "distill" in section["missing"] and not path.exists()


def test_layers_kept_float_for_fidelity_keep_int8_weights_dequantized_to_float(tmp_path):
    from worker.engines.export.onnx_artifact import _gemm_as_matmul, _weights_as_int8, export_onnx

    model, _ = zoo.round_trip(zoo.trace(zoo.TransformerMLP(), torch.rand(2, 64)))
    data = _data("vectors")
    path = tmp_path / "mlp.onnx"
    onnx.save(_gemm_as_matmul(onnx.load_from_string(export_onnx(model, data.take(2)))), str(path))
    matmuls = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"]
    before = path.stat().st_size

    rewritten = _weights_as_int8(path, set(matmuls))

    assert rewritten == sorted(matmuls)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("DequantizeLinear") == len(matmuls)
    assert all(init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2 for init in graph.initializer)
    assert path.stat().st_size < 0.4 * before
    with torch.inference_mode():
        expected = model(*data.inputs)
    # float arithmetic on rounded weights only: far closer than int8 activations would be
    assert fidelity(expected, run_session(ort_session(path), data.inputs)[0])["cosine_min"] > 0.9999


def test_an_fp16_artifact_exports_in_half_precision(tmp_path):
    eager, data, _ = _digits_model(zoo.SequentialCNN)
    model, _ = zoo.round_trip(zoo.trace(eager, torch.rand(2, 1, 32, 32)))

    _, _, section, path = _export(tmp_path, model, data, [{"op": "quantize", "scheme": "fp16"}])

    assert section["precision"] == "float16" and section["quantization"] is None
    assert (
        section["fidelity"]["score"] >= FLOAT_AGREEMENT
        and section["fidelity"]["reference"] == "the TorchScript artifact"
    )
    assert path.stat().st_size < 0.6 * len(_float_bytes(model, data))


class _OutlierChannels(torch.nn.Module):
    """An MLP whose fc2 input has three channels 80× larger than the rest (the float function is
    an ordinary MLP: fc2 divides their weights back), so per-tensor int8 of that input crushes the
    other channels: the activation outliers SmoothQuant is for."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 16)
        with torch.no_grad():
            self.fc1.weight[:3] *= 80.0
            self.fc2.weight[:, :3] /= 80.0

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _outlier_model_and_data():
    model = torch.jit.trace(_OutlierChannels().eval(), torch.rand(2, 64))
    return model, ModelData((torch.randn(128, 64, generator=torch.Generator().manual_seed(1)),))


def test_a_layer_kept_float_for_fidelity_is_smoothed_and_runs_int8_in_onnx(tmp_path):
    model, data = _outlier_model_and_data()
    step = {"op": "quantize", "scheme": "dynamic_int8", "min_fidelity": 0.999}

    models, details, section, path = _export(tmp_path, model, data, [step])

    kept = [row["module"] for row in details[0]["layers"] if row["precision"] == "float32"]
    quantization = section["quantization"]
    assert kept == ["fc2"], "the TorchScript step needs fc2 in float (the premise of this test)"
    assert quantization["modules_smoothed"] == ["fc2"] and quantization["modules_in_float"] == []
    assert quantization["smoothing"]["method"] == "SmoothQuant" and quantization["nodes_smoothed"]
    graph = onnx.load(str(path)).graph
    assert "MatMul" not in {n.op_type for n in graph.node}, "every MatMul runs in int8"
    assert [n.op_type for n in graph.node].count("Mul") >= 1
    with torch.inference_mode():
        reference = models[0](*data.inputs)
    held = fidelity_score(fidelity(reference, run_session(ort_session(path), data.inputs)[0]))[1]
    assert held >= 0.999 and section["fidelity_to_source"]["score"] >= 0.999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "no smoothed or float copy left"


def test_smoothing_keeps_the_float_function_and_shares_one_mul_per_input(tmp_path):
    from worker.engines.export.onnx_artifact import _gemm_as_matmul, export_onnx
    from worker.engines.export.smoothing import smooth_matmuls

    model, data = _outlier_model_and_data()
    graph_model = _gemm_as_matmul(onnx.load_from_string(export_onnx(model, data.take(2))))
    matmuls = [n.name for n in graph_model.graph.node if n.op_type == "MatMul"]
    before = run_session(ort_session(graph_model.SerializeToString()), data.inputs)[0]

    rewritten = smooth_matmuls(graph_model, matmuls, data)

    assert rewritten == sorted(matmuls)
    assert [n.op_type for n in graph_model.graph.node].count("Mul") == len(matmuls)  # one input each here
    onnx.checker.check_model(graph_model)
    after = run_session(ort_session(graph_model.SerializeToString()), data.inputs)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_exporting_leaves_the_model_it_was_given_as_it_was():
    from worker.engines.export.onnx_artifact import export_onnx

    eager, data, calibration = _digits_model(zoo.SequentialCNN)
    model = zoo.trace(eager, torch.rand(2, 1, 32, 32))
    graph = str(model.graph)

    export_onnx(model, data.take(2))

    # torch's exporter inlines the graph it exports in place; a quantize step after it then found
    # one layer named '' and left conv-BN unfolded (2x slower static int8)
    assert str(model.graph) == graph
    step = parse_step({"op": "quantize", "scheme": "static_int8"})
    out = run_step(model, step, PipelineContext(teacher=model, calibration=calibration, evaluation=data))
    assert {row["module"] for row in out.details["layers"]} == {"features.0", "features.4", "fc1", "fc2"}
