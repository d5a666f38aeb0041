"""/v1/models: uploaded models (TorchScript or torch.export archives)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import metrics
from app.api.deps import CursorQuery, LimitQuery, ReadSessionDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.files import blob_response
from app.api.openapi import COMMON_PROBLEMS, created_responses, download_responses, problems, upload_body
from app.multipart import receive_upload
from app.schemas.common import Page
from app.schemas.resources import ModelRead
from app.services import models as service

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problems(*COMMON_PROBLEMS))


@router.post(
    "",
    status_code=201,
    operation_id="upload_model",
    response_model=ModelRead,
    responses={201: created_responses("model"), **problems(413, 415, 503)},
    openapi_extra=upload_body(
        "A TorchScript archive (torch.jit.save) or a torch.export archive (torch.export.save, .pt2)."
    ),
)
async def upload_model(
    request: Request, response: Response, session: SessionDep, tenant: TenantDep, store: StoreDep, settings: SettingsDep
) -> ModelRead:
    """Upload a TorchScript or torch.export model (multipart `file`, optional `name`); a worker validates it."""
    upload = await receive_upload(request, store, settings.max_upload_bytes)
    model = service.create_model(session, store, tenant, upload)
    metrics.UPLOAD_BYTES.labels("model").inc(model.size_bytes)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return ModelRead.model_validate(model)


@router.get("", operation_id="list_models", response_model=Page[ModelRead])
def list_models(session: ReadSessionDep, tenant: TenantDep, limit: LimitQuery = 50, cursor: CursorQuery = None):
    """List uploaded models, newest first."""
    rows, next_cursor = service.list_models(session, tenant, limit, cursor)
    return Page[ModelRead](items=[ModelRead.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", operation_id="get_model", response_model=ModelRead, responses=problems(404))
def get_model(model_id: str, session: ReadSessionDep, tenant: TenantDep):
    """Get one model, with its validation status and summary."""
    return ModelRead.model_validate(service.get_model(session, tenant, model_id))


@router.delete("/{model_id}", status_code=204, operation_id="delete_model", responses=problems(404, 409))
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    """Delete a model (refused while an unfinished job uses it)."""
    service.delete_model(session, store, tenant, model_id)
    return Response(status_code=204)


@router.get("/{model_id}/content", operation_id="download_model", responses=download_responses("The original bytes"))
def download_model(model_id: str, request: Request, session: ReadSessionDep, tenant: TenantDep, store: StoreDep):
    """Download the original bytes of a model (ETag = sha256, Range supported)."""
    model = service.get_model(session, tenant, model_id)
    suffix = ".pt2" if model.format == "torch.export" else ".pt"
    return blob_response(request, store, model.sha256, model.size_bytes, f"{model.id}{suffix}")
