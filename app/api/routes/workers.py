"""/v1/workers: which workers are alive, where, on what device and queues."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import TenantDep
from app.api.openapi import COMMON_PROBLEMS, problems
from app.schemas.common import WorkerList
from app.services import workers as service

router = APIRouter(prefix="/v1/workers", tags=["service"], responses=problems(*COMMON_PROBLEMS))


@router.get("", operation_id="list_workers", response_model=WorkerList, responses=problems(503))
def list_workers(_: TenantDep):
    """The workers that answer now: node name, host and process, device, queues, running jobs, last heartbeat."""
    return service.list_workers()
