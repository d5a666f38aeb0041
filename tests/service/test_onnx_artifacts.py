"""ONNX artifacts end to end: the real API and a real worker make both formats, the test downloads
them and runs the ONNX file in ONNX Runtime; a model the exporter cannot express still succeeds."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import onnxruntime as ort
import torch

from app.client import CompactorClient
from tests import zoo
from tests.service.conftest import digits_arrays, traced_cnn, upload_dataset, upload_model, wait_job

QUICK_BENCH = {"batch_sizes": [1, 8], "warmup": 2, "iterations": 10}


def _job(api, **spec) -> dict:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return wait_job(api, response.json()["id"], timeout=300)


def test_a_job_makes_both_formats_and_the_onnx_file_runs_in_onnx_runtime(api, tmp_path):
    model = upload_model(api, traced_cnn())
    data = upload_dataset(api, **digits_arrays(128))

    done = _job(
        api,
        model_id=model["id"],
        calibration_dataset_id=data["id"],
        steps=[{"op": "quantize", "scheme": "static_int8"}],
        benchmark=QUICK_BENCH,
        output_formats=["torchscript", "onnx"],
    )

    assert done["status"] == "succeeded", done
    report = api.get(f"/v1/jobs/{done['id']}/report").json()
    section = report["onnx"]
    assert section["precision"] == "int8" and section["quantization"]["format"] == "QDQ", section
    onnx_file = api.get(f"/v1/jobs/{done['id']}/artifact", params={"format": "onnx"})
    assert onnx_file.status_code == 200
    digest = hashlib.sha256(onnx_file.content).hexdigest()
    assert digest == section["sha256"] == done["onnx_artifact"]["sha256"]
    assert onnx_file.headers["etag"] == f'"{digest}"' and len(onnx_file.content) == section["size_bytes"]
    assert onnx_file.headers["content-disposition"].endswith('.onnx"')
    # what `compactor jobs download --format onnx` does: the bytes checked against onnx_artifact.sha256
    with CompactorClient(str(api.base_url)) as client:
        assert client.download_artifact(done["id"], tmp_path / "model.onnx", "onnx") == digest
    assert (tmp_path / "model.onnx").read_bytes() == onnx_file.content

    torchscript = api.get(f"/v1/jobs/{done['id']}/artifact")
    assert hashlib.sha256(torchscript.content).hexdigest() == done["artifact"]["sha256"] != digest
    compressed = torch.jit.load(io.BytesIO(torchscript.content))
    x = digits_arrays(128)["input"][:40]
    session = ort.InferenceSession(onnx_file.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[0] == "batch"
    (logits,) = session.run(None, {"input": x})
    with torch.inference_mode():
        expected = compressed(torch.from_numpy(x)).numpy()
    assert logits.shape == expected.shape == (40, 10)
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_a_model_the_exporter_cannot_express_still_succeeds_and_says_why(api):
    model = upload_model(api, zoo.trace(zoo.TinyEncoder(), torch.randint(0, 1000, (2, 12))))

    done = _job(
        api,
        model_id=model["id"],
        input_spec=[{"shape": [1, 12], "dtype": "int64", "low": 0, "high": 1000}],
        steps=[{"op": "quantize", "scheme": "dynamic_int8"}],
        benchmark=QUICK_BENCH,
        output_formats=["torchscript", "onnx"],
    )

    assert done["status"] == "succeeded", done
    assert done["artifact"] is not None and done["onnx_artifact"] is None
    report = api.get(f"/v1/jobs/{done['id']}/report").json()
    assert "cannot export this model" in report["onnx"]["missing"]
    assert any(note.startswith("no ONNX file:") for note in report["notes"])
    refused = api.get(f"/v1/jobs/{done['id']}/artifact", params={"format": "onnx"})
    assert refused.status_code == 404 and refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "onnx_not_available" and "onnx.missing" in refused.json()["detail"]


def test_without_output_formats_there_is_no_onnx_and_the_404_says_so(api):
    model = upload_model(api, traced_cnn())

    done = _job(
        api,
        model_id=model["id"],
        input_spec=[{"shape": [1, 1, 32, 32]}],
        benchmark=QUICK_BENCH,
    )

    assert done["status"] == "succeeded" and done["onnx_artifact"] is None
    report = api.get(f"/v1/jobs/{done['id']}/report").json()
    assert report.get("onnx") is None
    refused = api.get(f"/v1/jobs/{done['id']}/artifact", params={"format": "onnx"})
    assert refused.status_code == 404 and refused.json()["code"] == "onnx_not_available"
    assert "did not ask" in refused.json()["detail"]
    assert api.get(f"/v1/jobs/{done['id']}/artifact", params={"format": "tflite"}).status_code == 422
    assert np.frombuffer(api.get(f"/v1/jobs/{done['id']}/artifact").content[:2], np.uint8).tolist() == [80, 75]
