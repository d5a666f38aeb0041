"""/v1/searches: accuracy-aware searches, their trials, front, pick and the pick's artifact."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import HTMLResponse

from app.api.deps import CursorQuery, LimitQuery, ReadSessionDep, SessionDep, StoreDep, TenantDep
from app.api.files import blob_response
from app.api.openapi import COMMON_PROBLEMS, created_responses, download_responses, problems
from app.models import Search
from app.models.job import JobStatus
from app.reports.search_html import render_search_html
from app.schemas.common import Page
from app.schemas.search import SearchRead, SearchSpec, stored_search_spec
from app.services import searches as service

router = APIRouter(prefix="/v1/searches", tags=["searches"], responses=problems(*COMMON_PROBLEMS))

SEARCH_SPEC_EXAMPLES = {
    "max-drop": {
        "summary": "fastest recipe losing at most one accuracy point",
        "value": {
            "model_id": "3f6c2a0e-8d1b-4f57-9a7e-0c1d2b3a4f5e",
            "calibration_dataset_id": "9b1e4c7d-2a3f-4e6b-8c5d-7f0a1b2c3d4e",
            "eval_dataset_id": "5d2c8e1f-3b4a-4c6d-9e7f-1a2b3c4d5e6f",
            "constraints": {"max_accuracy_drop": 0.01},
            "objective": {"metric": "latency", "batch_size": 32},
            "budget": {"max_trials": 12, "time_limit_s": 1800},
        },
    }
}


def to_read(search: Search) -> SearchRead:
    result = search.result or {}
    return SearchRead(
        id=search.id,
        name=search.name,
        model_id=search.model_id,
        status=search.status,
        spec=stored_search_spec(search.spec),
        progress=search.progress,
        feasible=result.get("feasible"),
        pick=_brief(result.get("pick") or result.get("closest")),
        error=search.error,
        created_at=search.created_at,
        started_at=search.started_at,
        finished_at=search.finished_at,
        revision=search.revision,
    )


def _brief(trial: dict | None) -> dict[str, Any] | None:
    if not trial:
        return None
    return {key: trial.get(key) for key in ("number", "job_id", "steps", "figures", "on_front", "check")}


_CREATED = created_responses("search")
_CREATED["headers"]["Idempotent-Replayed"] = {
    "description": "`true` when an earlier request with this Idempotency-Key made the search.",
    "schema": {"type": "string"},
}


@router.post(
    "",
    status_code=202,
    operation_id="create_search",
    response_model=SearchRead,
    responses={202: _CREATED, **problems(400, 404, 409)},
)
def create_search(
    spec: Annotated[SearchSpec, Body(openapi_examples=SEARCH_SPEC_EXAMPLES)],
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
):
    """Start an accuracy-aware search: trials run as jobs until the budget is spent.

    Replays with the same Idempotency-Key return the same search.
    """
    search, created = service.create_search(session, tenant, spec, idempotency_key)
    response.headers["Location"] = f"/v1/searches/{search.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return to_read(search)


@router.get("", operation_id="list_searches", response_model=Page[SearchRead])
def list_searches(
    session: ReadSessionDep,
    tenant: TenantDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
    status: JobStatus | None = None,
):
    """List searches, newest first, optionally by status."""
    rows, next_cursor = service.list_searches(session, tenant, limit, cursor, status)
    return Page[SearchRead](items=[to_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/{search_id}", operation_id="get_search", response_model=SearchRead, responses=problems(404))
def get_search(search_id: str, session: ReadSessionDep, tenant: TenantDep):
    """Get a search: status, progress (trials done / planned), and its pick once finished."""
    return to_read(service.get_search(session, tenant, search_id, with_result=True))


@router.post("/{search_id}/cancel", operation_id="cancel_search", response_model=SearchRead, responses=problems(404))
def cancel_search(search_id: str, session: SessionDep, tenant: TenantDep):
    """Cancel a search and every trial it has queued or running (a finished one is returned unchanged)."""
    search = service.cancel_search(session, tenant, search_id)
    return to_read(service.get_search(session, tenant, search.id, with_result=True))


@router.get("/{search_id}/report", operation_id="get_search_report", responses=problems(404))
def get_search_report(search_id: str, session: ReadSessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Every trial with its figures and job, the Pareto front and the pick (partial while running)."""
    return service.get_result(session, tenant, search_id)


@router.get(
    "/{search_id}/report.html",
    operation_id="get_search_report_html",
    response_class=HTMLResponse,
    responses=problems(404),
)
def get_search_report_html(search_id: str, session: ReadSessionDep, tenant: TenantDep):
    """The report as one self-contained page: the front chart and the trials with links to their jobs."""
    return HTMLResponse(render_search_html(service.get_result(session, tenant, search_id)))


@router.get(
    "/{search_id}/artifact",
    operation_id="download_search_artifact",
    responses=download_responses("The pick's TorchScript file (the closest candidate's when infeasible)"),
)
def download_search_artifact(
    search_id: str, request: Request, session: ReadSessionDep, tenant: TenantDep, store: StoreDep
):
    """Download the pick's artifact, or the closest candidate's when nothing met the constraints (409 before)."""
    sha256, size = service.get_artifact(session, tenant, search_id)
    return blob_response(request, store, sha256, size, f"{search_id}.pt")
