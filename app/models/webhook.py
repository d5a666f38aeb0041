"""Webhook deliveries (an outbox: one row per event to send, with every attempt) and tenants' secrets."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, Enum, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, UTCDateTime, utcnow


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # not yet accepted by the receiver; another attempt is due at next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # no 2xx within the retry window; nothing more is sent


class WebhookDelivery(IdMixin, Base):
    """One event for one callback URL. The row is written in the transaction that makes the event
    (a job's terminal state), so an event is never lost between the state change and its send."""

    __tablename__ = "webhook_deliveries"

    resource: Mapped[str] = mapped_column(String(16))  # "job" (searches later)
    resource_id: Mapped[str] = mapped_column(String(36), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(DeliveryStatus, native_enum=False, length=16, values_callable=lambda s: [m.value for m in s]),
        default=DeliveryStatus.PENDING,
        index=True,
    )
    # Each attempt: {"at", "status_code", "error", "duration_ms"}; a JSON list, since it is read
    # only with its delivery and never queried by field.
    attempts: Mapped[list] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class WebhookSecret(Base):
    """A tenant's signing secret (Standard Webhooks `whsec_…`), made on first use, rotatable."""

    __tablename__ = "webhook_secrets"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
