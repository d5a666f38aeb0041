"""/v1/webhooks: the secret a tenant's webhooks are signed with."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.api.openapi import COMMON_PROBLEMS, problems
from app.schemas.webhook import WebhookSecretRead
from app.services import webhooks as service

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=problems(*COMMON_PROBLEMS))


@router.get("/secret", operation_id="get_webhook_secret", response_model=WebhookSecretRead)
def get_webhook_secret(session: SessionDep, tenant: TenantDep):
    """The tenant's webhook signing secret (made on first request); verify each delivery with it."""
    return WebhookSecretRead.model_validate(service.tenant_secret(session, tenant), from_attributes=True)


@router.post("/secret/rotate", operation_id="rotate_webhook_secret", response_model=WebhookSecretRead)
def rotate_webhook_secret(session: SessionDep, tenant: TenantDep):
    """Replace the secret: attempts from now on are signed with the new one only."""
    return WebhookSecretRead.model_validate(service.tenant_secret(session, tenant, rotate=True), from_attributes=True)
