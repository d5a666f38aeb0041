"""/v1/jobs: compression pipelines, their reports and artifacts."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.deps import CursorQuery, LimitQuery, ReadSessionDep, SessionDep, StoreDep, TenantDep
from app.api.files import blob_response
from app.api.openapi import COMMON_PROBLEMS, created_responses, download_responses, problems
from app.db import read_only_session
from app.models import CompressionJob
from app.models.job import FINAL_STATUSES, JobStatus
from app.reports.html import render_report_html
from app.schemas.common import Page
from app.schemas.job import JOB_SPEC_EXAMPLES, ArtifactInfo, JobEvent, JobRead, JobSpec, stored_spec
from app.schemas.report import JobComparison, Report
from app.schemas.webhook import WebhookDeliveryRead
from app.services import jobs as service
from app.settings import get_settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problems(*COMMON_PROBLEMS))


def to_read(job: CompressionJob, deliveries: list | None = None) -> JobRead:
    artifact = onnx_artifact = None
    if job.artifact_sha256:
        artifact = ArtifactInfo(size_bytes=job.artifact_size_bytes, sha256=job.artifact_sha256)
    if job.onnx_sha256:
        onnx_artifact = ArtifactInfo(size_bytes=job.onnx_size_bytes, sha256=job.onnx_sha256)
    return JobRead(
        id=job.id,
        name=job.name,
        model_id=job.model_id,
        status=job.status,
        spec=stored_spec(job.spec),
        progress=job.progress,
        error=job.error,
        attempts=job.attempts,
        worker=job.worker,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        artifact=artifact,
        onnx_artifact=onnx_artifact,
        revision=job.revision,
        webhooks=None
        if deliveries is None
        else [WebhookDeliveryRead.model_validate(d, from_attributes=True) for d in deliveries],
    )


_CREATED_JOB = created_responses("job")
_CREATED_JOB["headers"]["Idempotent-Replayed"] = {
    "description": "`true` when an earlier request with this Idempotency-Key made the job.",
    "schema": {"type": "string"},
}


@router.post(
    "",
    status_code=202,
    operation_id="create_job",
    response_model=JobRead,
    responses={202: _CREATED_JOB, **problems(400, 409)},
)
def create_job(
    spec: Annotated[JobSpec, Body(openapi_examples=JOB_SPEC_EXAMPLES)],
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Submit a compression job; it is queued for a worker.

    Replays with the same Idempotency-Key return the same job.
    """
    job, created = service.create_job(session, tenant, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return to_read(job)


@router.get("", operation_id="list_jobs", response_model=Page[JobRead])
def list_jobs(
    session: ReadSessionDep,
    tenant: TenantDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
    status: JobStatus | None = None,
    model_id: str | None = None,
):
    """List jobs, newest first, optionally by status or model."""
    rows, next_cursor = service.list_jobs(session, tenant, limit, cursor, status, model_id)
    return Page[JobRead](items=[to_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/compare", operation_id="compare_jobs", response_model=list[JobComparison], responses=problems(404))
def compare_jobs(
    session: ReadSessionDep, tenant: TenantDep, ids: Annotated[str, Query(description="Comma-separated job ids.")]
):
    """Compare jobs' summaries side by side, to choose between recipes."""
    job_ids = [i.strip() for i in ids.split(",") if i.strip()]
    return service.compare_jobs(session, tenant, job_ids)


@router.get("/{job_id}", operation_id="get_job", response_model=JobRead, responses=problems(404))
def get_job(job_id: str, session: ReadSessionDep, tenant: TenantDep):
    """Get a job: status, progress, error and artifact."""
    # The hottest route (clients poll it): serialised once here instead of validated twice.
    job = service.get_job(session, tenant, job_id)
    return Response(to_read(job, service.deliveries_of(session, job)).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", operation_id="cancel_job", response_model=JobRead, responses=problems(404))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    """Cancel a queued or running job (a finished job is returned unchanged)."""
    job = service.cancel_job(session, tenant, job_id)
    return to_read(job, service.deliveries_of(session, job))


def _job_state(tenant: str, job_id: str) -> dict:
    # A session per look, never one held for the stream's life: a watcher holds no connection.
    with read_only_session() as session:
        return service.job_state(session, tenant, job_id)


async def _watched_job(job_id: str, tenant: TenantDep) -> dict:
    """The job's state before the stream starts, so an unknown job is a 404, not a broken stream."""
    return await run_in_threadpool(_job_state, tenant, job_id)


@router.get(
    "/{job_id}/events",
    operation_id="job_events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "A `job` event (JSON `JobEvent`, id = revision) at every change, until the job ends.",
            "model": JobEvent,
        },
        **problems(404),
    },
)
async def job_events(
    job_id: str,
    tenant: TenantDep,
    state: Annotated[dict, Depends(_watched_job)],
    last_event_id: Annotated[
        str | None,
        Header(max_length=20, description="The id of the last event seen: only newer states are sent."),
    ] = None,
) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events of the job's status and progress until it ends (`curl -N`).

    Each event is the job's whole state at a revision, so a client that reconnects with
    `Last-Event-ID` gets the newest state it has not seen (intermediate progress it missed is not
    replayed: only the newest counts). The stream ends after the event of a final state.
    """
    seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    poll_s = get_settings().events_poll_interval_s
    while True:
        if state["revision"] > seen:
            seen = state["revision"]
            event = JobEvent(**state)
            yield ServerSentEvent(id=str(seen), event="job", raw_data=event.model_dump_json())
        if state["status"] in FINAL_STATUSES:
            return
        await anyio.sleep(poll_s)
        state = await run_in_threadpool(_job_state, tenant, job_id)


@router.get("/{job_id}/report", operation_id="get_report", response_model=Report, responses=problems(404, 409))
def get_report(job_id: str, session: ReadSessionDep, tenant: TenantDep):
    """The benchmark report of a succeeded job (409 before)."""
    return service.get_report(session, tenant, job_id)


@router.get(
    "/{job_id}/report.html", operation_id="get_report_html", response_class=HTMLResponse, responses=problems(404, 409)
)
def get_report_html(job_id: str, session: ReadSessionDep, tenant: TenantDep):
    """The report as one self-contained HTML page with tables and charts (409 before success)."""
    return HTMLResponse(render_report_html(service.get_report(session, tenant, job_id)))


@router.get(
    "/{job_id}/artifact",
    operation_id="download_artifact",
    responses=download_responses("The compressed TorchScript file, or with `format=onnx` the ONNX file"),
)
def download_artifact(
    job_id: str,
    request: Request,
    session: ReadSessionDep,
    tenant: TenantDep,
    store: StoreDep,
    artifact_format: Annotated[
        Literal["torchscript", "onnx"],
        Query(alias="format", description="`onnx`: the ONNX file (404 `onnx_not_available` when there is none)."),
    ] = "torchscript",
):
    """Download the compressed artifact: TorchScript, or ONNX with `?format=onnx` (ETag = sha256, Range supported)."""
    sha256, size = service.get_artifact(session, tenant, job_id, artifact_format)
    suffix = ".onnx" if artifact_format == "onnx" else ".pt"
    return blob_response(request, store, sha256, size, f"{job_id}{suffix}")
