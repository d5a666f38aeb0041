"""/v1/jobs: compression pipelines, their reports and artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import HTMLResponse

from app.api.deps import CursorQuery, LimitQuery, ReadSessionDep, SessionDep, StoreDep, TenantDep
from app.api.files import blob_response
from app.api.openapi import COMMON_PROBLEMS, created_responses, download_responses, problems
from app.models import CompressionJob
from app.models.job import JobStatus
from app.reports.html import render_report_html
from app.schemas.common import Page
from app.schemas.job import JOB_SPEC_EXAMPLES, ArtifactInfo, JobRead, JobSpec
from app.schemas.report import JobComparison, Report
from app.services import jobs as service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problems(*COMMON_PROBLEMS))


def to_read(job: CompressionJob) -> JobRead:
    artifact = None
    if job.artifact_sha256:
        artifact = ArtifactInfo(size_bytes=job.artifact_size_bytes, sha256=job.artifact_sha256)
    return JobRead(
        id=job.id,
        name=job.name,
        model_id=job.model_id,
        status=job.status,
        spec=job.spec,
        progress=job.progress,
        error=job.error,
        attempts=job.attempts,
        worker=job.worker,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        artifact=artifact,
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
    return Response(to_read(service.get_job(session, tenant, job_id)).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", operation_id="cancel_job", response_model=JobRead, responses=problems(404))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    """Cancel a queued or running job (a finished job is returned unchanged)."""
    return to_read(service.cancel_job(session, tenant, job_id))


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
    responses=download_responses("The compressed TorchScript file"),
)
def download_artifact(job_id: str, request: Request, session: ReadSessionDep, tenant: TenantDep, store: StoreDep):
    """Download the compressed TorchScript artifact (ETag = sha256, Range supported)."""
    job = service.get_artifact(session, tenant, job_id)
    return blob_response(request, store, job.artifact_sha256, job.artifact_size_bytes, f"{job.id}.pt")
