"""API keys and tenants: no key is 401; another tenant's resource is answered like a missing one."""

from __future__ import annotations

from tests.service.conftest import second_api, torchscript_bytes, traced_cnn
from tests.service.servers import api_client


def test_tenants_are_isolated(service, tmp_path):
    with second_api(service, tmp_path, COMPACTOR_API_KEYS='["acme:key-a", "globex:key-b"]') as url:
        with api_client(url) as anonymous:
            response = anonymous.get("/v1/models")
            assert response.status_code == 401 and response.json()["code"] == "unauthorized"
            assert anonymous.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert anonymous.get("/healthz").status_code == 200
        a = api_client(url, headers={"Authorization": "Bearer key-a"})
        b = api_client(url, headers={"Authorization": "Bearer key-b"})
        with a, b:
            model = a.post("/v1/models", files={"file": ("m.pt", torchscript_bytes(traced_cnn()))}).json()
            assert a.get(f"/v1/models/{model['id']}").status_code == 200
            hidden = b.get(f"/v1/models/{model['id']}")
            assert hidden.status_code == 404 and hidden.json()["code"] == "model_not_found"
            assert b.delete(f"/v1/models/{model['id']}").status_code == 404
            assert model["id"] not in [m["id"] for m in b.get("/v1/models", params={"limit": 500}).json()["items"]]
            job = b.post("/v1/jobs", json={"model_id": model["id"], "input_spec": [{"shape": [1, 1, 32, 32]}]})
            assert job.status_code == 422 and job.json()["errors"][0]["loc"] == ["body", "model_id"]
