"""Models and datasets through the HTTP API: upload, validation by the worker, list, download, delete,
and every kind of bad upload refused with a clear code and nothing left half-stored."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
import torch

from tests import zoo
from tests.service.conftest import (
    scripted_loop_if,
    torchscript_bytes,
    traced_cnn,
    upload_dataset,
    upload_model,
    wait_for,
)


def _blob_files(service) -> set[str]:
    root = service.log_dir / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file() and "tmp" not in p.parts}


def _tmp_files(service) -> list[str]:
    return os.listdir(service.log_dir / "blobs" / "tmp")


def test_upload_validates_and_summarises_traced_and_scripted(api):
    for module, name in ((traced_cnn(), "cnn.pt"), (scripted_loop_if(), "loop.pt")):
        content = torchscript_bytes(module)
        model = upload_model(api, content, name)
        assert model["status"] == "validating" and model["name"] == name
        assert model["sha256"] == hashlib.sha256(content).hexdigest() and model["size_bytes"] == len(content)
        ready = wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] != "validating")
        assert ready["status"] == "ready", ready
        assert ready["summary"]["parameters"] == sum(p.numel() for p in module.parameters())
        assert ready["summary"]["inputs"][0]["type"] == "Tensor"


def test_download_with_etag_and_range(api):
    content = torchscript_bytes(traced_cnn())
    model = upload_model(api, content)
    full = api.get(f"/v1/models/{model['id']}/content")
    assert full.status_code == 200 and full.content == content
    assert full.headers["etag"] == f'"{model["sha256"]}"'
    part = api.get(f"/v1/models/{model['id']}/content", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(content)}"
    assert (
        api.get(f"/v1/models/{model['id']}/content", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    )
    assert (
        api.get(f"/v1/models/{model['id']}/content", headers={"Range": f"bytes={len(content) + 5}-"}).status_code == 416
    )
    tail = api.get(f"/v1/models/{model['id']}/content", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == content[-50:]
    # If-Range: the range only while the file is still the one the client saw, else all of it
    same = api.get(
        f"/v1/models/{model['id']}/content", headers={"Range": "bytes=0-9", "If-Range": full.headers["etag"]}
    )
    assert same.status_code == 206 and same.content == content[:10]
    changed = api.get(f"/v1/models/{model['id']}/content", headers={"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert changed.status_code == 200 and changed.content == content


def test_name_field_list_paging_and_delete(api):
    ids = [upload_model(api, traced_cnn())["id"] for _ in range(3)]
    named = api.post("/v1/models", files={"file": ("x.pt", torchscript_bytes(traced_cnn()))}, data={"name": "my model"})
    assert named.json()["name"] == "my model"
    seen, cursor = [], None
    while True:
        page = api.get("/v1/models", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    assert api.delete(f"/v1/models/{ids[0]}").status_code == 204
    gone = api.get(f"/v1/models/{ids[0]}")
    assert gone.status_code == 404 and gone.json()["code"] == "model_not_found"
    assert gone.headers["content-type"].startswith("application/problem+json")


def _refused(api, content: bytes, code: str, status: int = 422) -> dict:
    response = api.post("/v1/models", files={"file": ("bad.pt", content)})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["detail"], body
    return body


def test_bad_model_uploads_are_refused_and_leave_nothing(api, service):
    before = _blob_files(service)
    _refused(api, b"", "empty_file")
    _refused(api, os.urandom(4096), "not_torchscript")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
    _refused(api, buffer.getvalue(), "not_torchscript")
    eager = io.BytesIO()
    torch.save(zoo.SequentialCNN(), eager)  # an eager pickle: refused, never unpickled
    assert "torch.save" in _refused(api, eager.getvalue(), "not_torchscript")["detail"]
    legacy = io.BytesIO()
    torch.save(zoo.SequentialCNN(), legacy, _use_new_zipfile_serialization=False)
    _refused(api, legacy.getvalue(), "not_torchscript")
    content = torchscript_bytes(traced_cnn())
    _refused(api, content[: len(content) // 2], "not_torchscript")  # truncated archive
    assert _blob_files(service) == before
    assert _tmp_files(service) == []


def test_oversized_chunked_upload_is_413_while_streaming(api, service):
    limit = int(service.env["COMPACTOR_MAX_UPLOAD_BYTES"])
    boundary = "compactorboundary"
    sent = {"bytes": 0}

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.pt"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        chunk = b"\0" * (1 << 20)
        for _ in range(limit // len(chunk) + 64):
            sent["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = api.post(
            "/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    except Exception:  # the server may close the connection mid-stream after answering
        response = None
    if response is not None:
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "payload_too_large"
    assert _tmp_files(service) == []


def test_model_that_does_not_load_becomes_invalid(api):
    content = torchscript_bytes(traced_cnn())
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(content)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"garbage" if info.filename.endswith("data.pkl") else data)
    model = upload_model(api, buffer.getvalue())
    invalid = wait_for(api, f"/v1/models/{model['id']}", lambda m: m["status"] != "validating")
    assert invalid["status"] == "invalid" and invalid["error"]["code"] == "model_invalid", invalid
    assert invalid["error"]["message"]


def test_datasets_npz_and_safetensors(api):
    x = np.random.rand(20, 1, 32, 32).astype(np.float32)
    y = np.arange(20, dtype=np.int64) % 10
    ds = upload_dataset(api, input=x, label=y)
    assert ds["num_samples"] == 20 and ds["arrays"]["input"] == {"shape": [20, 1, 32, 32], "dtype": "float32"}
    from safetensors.numpy import save

    st = api.post("/v1/datasets", files={"file": ("d.safetensors", save({"input_0": x, "input_1": x, "label": y}))})
    assert st.status_code == 201, st.text
    assert set(st.json()["arrays"]) == {"input_0", "input_1", "label"}
    assert api.get(f"/v1/datasets/{ds['id']}").json()["sha256"] == ds["sha256"]
    assert ds["id"] in [d["id"] for d in api.get("/v1/datasets", params={"limit": 500}).json()["items"]]
    assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert api.get(f"/v1/datasets/{ds['id']}").status_code == 404


@pytest.mark.parametrize(
    "arrays,code",
    [
        ({"input": np.zeros((4, 2)), "label": np.zeros(5, dtype=np.int64)}, "dataset_invalid"),
        ({"weights": np.zeros((4, 2))}, "dataset_invalid"),
        ({"input": np.array([{"a": 1}] * 4, dtype=object)}, "dataset_pickle_refused"),
        ({"input": np.zeros((4, 2)), "label": np.zeros(4, dtype=np.float32)}, "dataset_invalid"),
    ],
)
def test_bad_datasets_are_refused(api, arrays, code):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    response = api.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue())})
    assert response.status_code == 422 and response.json()["code"] == code, response.text


@pytest.mark.parametrize(
    "header, reason",
    [
        ([], "neither .npz nor .safetensors"),
        ("hello", "neither .npz nor .safetensors"),
        ({"input": 1}, "not an object"),
        ({"input": {"dtype": "F32", "shape": [2, 2]}}, "no data_offsets"),
        ({"input": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, "no shape"),
    ],
)
def test_safetensors_with_a_malformed_header_is_a_422_naming_it(api, header, reason):
    raw = json.dumps(header).encode()
    content = struct.pack("<Q", len(raw)) + raw + bytes(16)

    response = api.post("/v1/datasets", files={"file": ("d.safetensors", content)})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "dataset_invalid" and reason in response.json()["detail"]


def test_unknown_ids_are_404_problems(api):
    for path in (
        "/v1/models/nope",
        "/v1/datasets/nope",
        "/v1/jobs/nope",
        "/v1/jobs/nope/report",
        "/v1/jobs/nope/artifact",
        "/v1/models/nope/content",
    ):
        response = api.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"].endswith("not_found")


def test_a_method_not_allowed_is_a_405_problem_with_allow(api):
    response = api.put("/v1/models")

    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.headers["content-type"].startswith("application/problem+json")
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert api.delete("/v1/jobs/x/cancel").headers["allow"] == "POST"


def test_nul_bytes_anywhere_are_422_not_a_database_error(api):
    """Postgres text holds no NUL: each place one can come in is refused before a query sees it."""
    model = upload_model(api, traced_cnn())
    cursor = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|a\x00b").decode()
    for response, code in (
        (api.get("/v1/models/a%00b"), "nul_byte"),
        (api.get("/v1/jobs", params={"model_id": "a\x00b"}), "nul_byte"),
        (api.get("/v1/jobs/compare", params={"ids": "a\x00b"}), "nul_byte"),
        (api.get("/v1/models", params={"cursor": cursor}), "invalid_cursor"),
        (
            api.post("/v1/jobs", json={"model_id": model["id"], "name": "a\x00b", "input_spec": [{"shape": [1, 4]}]}),
            "validation_failed",
        ),
        (
            api.post("/v1/models", files={"file": ("m.pt", torchscript_bytes(traced_cnn()))}, data={"name": "a\x00b"}),
            "invalid_name",
        ),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["code"] == code, response.text


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_archives_with_entries_pointing_outside_are_refused(api, service):
    before = _blob_files(service)
    original = torchscript_bytes(traced_cnn())
    for name, link in (("../../../tmp/evil.py", False), ("/etc/evil", False), ("model/code/escape", True)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(original)) as source, zipfile.ZipFile(buffer, "w") as archive:
            for entry in source.infolist():
                archive.writestr(entry, source.read(entry))
            extra = zipfile.ZipInfo(name)
            if link:
                extra.external_attr = 0o120777 << 16
            archive.writestr(extra, "/etc/passwd" if link else "print('escaped')")
        assert "outside" in _refused(api, buffer.getvalue(), "not_torchscript")["detail"]
    assert _blob_files(service) == before
