"""Webhook deliveries as a job shows them, and the tenant's signing secret."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.models.webhook import DeliveryStatus


class WebhookAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; null when there was none.")
    error: str | None = Field(description="Why there was no 2xx answer (refused, timeout, connection), if so.")
    duration_ms: float


class WebhookDeliveryRead(BaseModel):
    """One event sent to the job's callback_url: `webhook-id` is `msg_<id>` on every attempt."""

    id: str
    event_type: str = Field(description="job.succeeded, job.failed or job.canceled.")
    url: str
    status: DeliveryStatus
    attempts: list[WebhookAttempt]
    next_attempt_at: datetime | None = None


class WebhookSecretRead(BaseModel):
    """The secret every webhook of this tenant is signed with (Standard Webhooks `whsec_` + base64)."""

    secret: str = Field(description="Give it to a Standard Webhooks library to verify deliveries.")
    created_at: datetime
