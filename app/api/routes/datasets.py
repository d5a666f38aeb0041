"""/v1/datasets: calibration, training and evaluation data."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import metrics
from app.api.deps import CursorQuery, LimitQuery, ReadSessionDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.openapi import COMMON_PROBLEMS, created_responses, problems, upload_body
from app.multipart import receive_upload
from app.schemas.common import Page
from app.schemas.resources import DatasetRead
from app.services import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problems(*COMMON_PROBLEMS))


@router.post(
    "",
    status_code=201,
    operation_id="upload_dataset",
    response_model=DatasetRead,
    responses={201: created_responses("dataset"), **problems(413, 415, 503)},
    openapi_extra=upload_body("An .npz (no pickles) or .safetensors file with 'input'/'input_k' and optional 'label'."),
)
async def upload_dataset(
    request: Request, response: Response, session: SessionDep, tenant: TenantDep, store: StoreDep, settings: SettingsDep
) -> DatasetRead:
    """Upload a dataset (multipart `file`, optional `name`)."""
    upload = await receive_upload(request, store, settings.max_upload_bytes)
    dataset = service.create_dataset(session, store, tenant, upload)
    metrics.UPLOAD_BYTES.labels("dataset").inc(dataset.size_bytes)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetRead.model_validate(dataset)


@router.get("", operation_id="list_datasets", response_model=Page[DatasetRead])
def list_datasets(session: ReadSessionDep, tenant: TenantDep, limit: LimitQuery = 50, cursor: CursorQuery = None):
    """List datasets, newest first."""
    rows, next_cursor = service.list_datasets(session, tenant, limit, cursor)
    return Page[DatasetRead](items=[DatasetRead.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", operation_id="get_dataset", response_model=DatasetRead, responses=problems(404))
def get_dataset(dataset_id: str, session: ReadSessionDep, tenant: TenantDep):
    """Get one dataset with its arrays' shapes and dtypes."""
    return DatasetRead.model_validate(service.get_dataset(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204, operation_id="delete_dataset", responses=problems(404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> Response:
    """Delete a dataset (refused while an unfinished job uses it)."""
    service.delete_dataset(session, store, tenant, dataset_id)
    return Response(status_code=204)
