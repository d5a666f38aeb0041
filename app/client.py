"""A thin HTTP client of the Compactor API (httpx, one method per operation), used by the CLI.

It speaks only the contract of docs/api.md: no database, no storage, no torch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
ACTIVE_JOB_STATUSES = ("queued", "running")
_CHUNK = 1024 * 1024


class ClientError(Exception):
    """Something the client could not do; the message says what."""


class ProblemError(ClientError):
    """The server refused a request: carries its problem+json document (`code`, `detail`, `errors`)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        self.code: str = problem.get("code") or f"http_{status}"
        self.detail: str = problem.get("detail") or problem.get("title") or ""
        self.errors: list[dict[str, Any]] = problem.get("errors") or []
        super().__init__(f"{self.code}: {self.detail}")


class Unreachable(ClientError):
    """No HTTP answer at all: the server is down, the URL is wrong, or the network failed."""


class DownloadMismatch(ClientError):
    """The downloaded bytes do not hash to the sha256 the server announced; nothing was kept."""


class CompactorClient:
    """The Compactor API over HTTP.

    Args:
        base_url: the service root, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        transport: an httpx transport (tests pass ``httpx.MockTransport``).

    Every method returns the decoded JSON of the answer, raises `ProblemError` when the server
    answers with an error status, and `Unreachable` when it does not answer.

    Example::

        with CompactorClient("http://127.0.0.1:8000") as client:
            job = client.create_job({"model_id": model_id, "steps": [{"op": "quantize", "scheme": "fp16"}]})
            job = client.wait_for_job(job["id"])
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, transport=transport, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def __enter__(self) -> CompactorClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # models and datasets

    def upload_model(self, path: Path, name: str | None = None) -> dict[str, Any]:
        """Upload a TorchScript or torch.export file (streamed from disk); the answer's `status` starts
        at `validating`."""
        return self._upload("/v1/models", path, name)

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{model_id}")

    def wait_for_model(self, model_id: str, interval: float = 1.0) -> dict[str, Any]:
        """Poll a model until its validation ends; returns it `ready` or `invalid`."""
        while (model := self.get_model(model_id))["status"] == "validating":
            time.sleep(interval)
        return model

    def upload_dataset(self, path: Path, name: str | None = None) -> dict[str, Any]:
        """Upload an `.npz` or `.safetensors` dataset (streamed from disk)."""
        return self._upload("/v1/datasets", path, name)

    # jobs

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a JobSpec; the answer is the queued job."""
        return self._json("POST", "/v1/jobs", json=spec)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def wait_for_job(
        self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None, reconnects: int = 5
    ) -> dict[str, Any]:
        """Follow a job's events (`GET /v1/jobs/{id}/events`) to its end, calling `on_update` with
        each state (`status`, `progress`, `error`); returns the finished job.

        A broken stream is resumed with `Last-Event-ID`, so no newer state is missed; `Unreachable`
        after `reconnects` failures in a row.
        """
        last_event_id: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                    if source.response.is_error:
                        source.response.read()
                        raise _problem(source.response)
                    for event in source.iter_sse():
                        if not event.data:  # a keep-alive ping
                            continue
                        last_event_id, failures = event.id, 0
                        if on_update is not None:
                            on_update(json.loads(event.data))
                job = self.get_job(job_id)  # the server ends the stream once the job has ended
                if job["status"] not in ACTIVE_JOB_STATUSES:
                    return job
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise Unreachable(f"{self.base_url}: {exc}") from exc
                time.sleep(min(2.0**failures, 10.0))

    def get_report(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def get_report_html(self, job_id: str) -> str:
        return self._send("GET", f"/v1/jobs/{job_id}/report.html").text

    def download_artifact(self, job_id: str, dest: Path) -> str:
        """Stream a job's artifact to `dest` and return its sha256.

        The bytes must hash to both the job's `artifact.sha256` and the response's ETag; otherwise
        `DownloadMismatch` is raised and `dest` is left untouched.
        """
        expected = (self.get_job(job_id).get("artifact") or {}).get("sha256")
        partial = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            # A service on an object store may answer 307 to a presigned URL; the ETag that names
            # the sha256 is the service's, not the store's.
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifact", follow_redirects=True) as response:
                if response.is_error:
                    response.read()
                    raise _problem(response)
                answer = response.history[0] if response.history else response
                etag = answer.headers.get("etag", "").removeprefix("W/").strip('"')
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise Unreachable(f"{self.base_url}: {exc}") from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        actual = digest.hexdigest()
        for source, announced in (("the job's artifact.sha256", expected), ("the ETag", etag)):
            if announced != actual:
                partial.unlink(missing_ok=True)
                raise DownloadMismatch(f"downloaded bytes hash to {actual}, {source} says {announced or 'nothing'}")
        partial.replace(dest)
        return actual

    # plumbing

    def _upload(self, route: str, path: Path, name: str | None) -> dict[str, Any]:
        with open(path, "rb") as file:
            data = {"name": name} if name else {}
            return self._json("POST", route, files={"file": (path.name, file, "application/octet-stream")}, data=data)

    def _json(self, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
        return self._send(method, route, **kwargs).json()

    def _send(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, route, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {exc}") from exc
        if response.is_error:
            raise _problem(response)
        return response


def _problem(response: httpx.Response) -> ProblemError:
    """The server's problem document, or one made up from a non-problem error (e.g. a proxy's page)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {
            "status": response.status_code,
            "title": response.reason_phrase,
            "detail": response.text[:300] or response.reason_phrase,
        }
    return ProblemError(response.status_code, body)
