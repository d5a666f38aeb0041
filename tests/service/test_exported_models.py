"""torch.export archives (.pt2) through the real API and a real worker: recognised at upload without
unpickling anything, traced into TorchScript in the sandbox, compressed end to end into a TorchScript
artifact; damaged, unconvertible and hostile archives refused with a code and a reason."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch

from tests import exported, zoo
from tests.service.conftest import upload_dataset, upload_model, wait_for, wait_job

QUICK_BENCH = {"batch_sizes": [1, 4], "warmup": 1, "iterations": 5}


def _validated(api, content: bytes, name: str = "model.pt2") -> dict:
    model = upload_model(api, content, name)
    return wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] != "validating")


def test_a_pt2_upload_is_compressed_end_to_end_into_a_torchscript_artifact(api, tmp_path):
    torch.manual_seed(0)
    eager = zoo.SequentialCNN().eval()
    content = exported.export_bytes(eager, torch.rand(2, 1, 32, 32))
    x = torch.rand(32, 1, 32, 32)
    data = upload_dataset(api, input=x.numpy())

    model = upload_model(api, content, "cnn.pt2")
    assert model["format"] == "torch.export" and model["status"] == "validating"
    ready = wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] != "validating")
    assert ready["status"] == "ready", ready
    assert ready["summary"]["parameters"] == sum(p.numel() for p in eager.parameters())
    assert ready["summary"]["inputs"] == [{"name": "x", "type": "Tensor float32 [dynamic, 1, 32, 32]"}]
    download = api.get(f"/v1/models/{model['id']}/content")
    assert download.content == content and ".pt2" in download.headers["content-disposition"]

    job = api.post(
        "/v1/jobs",
        json={
            "model_id": model["id"],
            "calibration_dataset_id": data["id"],
            "steps": [{"op": "quantize", "scheme": "dynamic_int8"}],
            "benchmark": QUICK_BENCH,
        },
    )
    assert job.status_code == 202, job.text
    done = wait_job(api, job.json()["id"], 300)
    assert done["status"] == "succeeded", done
    report = api.get(f"/v1/jobs/{done['id']}/report").json()
    # the baseline is the TorchScript traced from the program, not the .pt2 file
    assert report["baseline"]["parameters"] == ready["summary"]["parameters"]
    assert report["baseline"]["size_bytes"] != len(content)
    artifact_bytes = api.get(f"/v1/jobs/{done['id']}/artifact").content
    artifact = torch.jit.load(io.BytesIO(artifact_bytes))
    with torch.no_grad():
        out, want = artifact(x[:5]), eager(x[:5])
    assert out.shape == want.shape
    assert torch.nn.functional.cosine_similarity(out, want).min() > 0.99


def test_a_damaged_pt2_is_refused_at_upload_with_a_code(api):
    content = exported.rewritten(exported.exported_cnn(), {"data/weights/model_weights_config.json": b"{]"})

    response = api.post("/v1/models", files={"file": ("broken.pt2", content, "application/octet-stream")})

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "export_archive_damaged"
    assert "model_weights_config.json is not JSON" in response.json()["detail"]


def test_a_pt2_with_control_flow_is_refused_by_validation_with_a_reason(api):
    invalid = _validated(api, exported.exported_branching(), "branching.pt2")

    assert invalid["status"] == "invalid" and invalid["format"] == "torch.export"
    assert invalid["error"]["code"] == "export_not_traceable"
    assert "data-dependent control flow" in invalid["error"]["message"]


def test_a_pt2_with_a_static_batch_is_refused_naming_the_fix(api):
    content = exported.export_bytes(zoo.SequentialCNN(), torch.rand(1, 1, 32, 32), dynamic_batch=False)

    invalid = _validated(api, content)

    assert invalid["status"] == "invalid" and invalid["error"]["code"] == "export_static_batch"
    assert "dynamic_shapes" in invalid["error"]["message"]


def test_a_pickled_weight_is_refused_by_the_api_without_unpickling(api, tmp_path):
    marker = tmp_path / "ran-in-the-api"
    content = exported.with_pickled_weight(exported.exported_cnn(), marker)

    response = api.post("/v1/models", files={"file": ("hostile.pt2", content, "application/octet-stream")})

    assert response.status_code == 422 and response.json()["code"] == "export_pickle_refused", response.text
    assert not marker.exists()


def test_hostile_sample_inputs_are_never_unpickled_by_the_api_nor_run_by_the_worker(api, tmp_path: Path):
    """The API reads no pickle, so it accepts the upload; torch.export.load would run this one (its
    fallback unpickler is unrestricted), and the sandboxed validation refuses it first."""
    marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = exported.with_hostile_sample_inputs(exported.exported_cnn(), marker)

    model = upload_model(api, content, "hostile.pt2")
    assert model["format"] == "torch.export" and not marker.exists()
    invalid = wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] != "validating")

    assert invalid["status"] == "invalid" and invalid["error"]["code"] == "export_pickle_refused", invalid
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"\x80\x02 a torch.save pickle"])
def test_files_that_are_neither_format_are_still_not_torchscript(api, content):
    response = api.post("/v1/models", files={"file": ("x.pt2", content, "application/octet-stream")})

    assert response.status_code == 422 and response.json()["code"] == "not_torchscript"
