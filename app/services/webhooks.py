"""Webhooks: a job's terminal state POSTed to its `callback_url`, signed, retried for a day.

- The delivery row is written in the same transaction as the terminal state (an outbox), and
  sent once that commits; the sweeper re-sends a delivery whose message was lost.
- Each attempt claims the row first (a guarded UPDATE), so a duplicate message never sends twice.
- Signed in the Standard Webhooks format (`webhook-id`, `webhook-timestamp`, `webhook-signature`:
  HMAC-SHA256 of `id.timestamp.body` with the tenant's secret), by that format's reference library.
- Every attempt (status code or error, duration) is stored on the delivery and shown on the job.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from app import outbound, queue
from app.db import after_commit, unit_of_work
from app.models import CompressionJob, DeliveryStatus, WebhookDelivery, WebhookSecret
from app.models.base import utcnow
from app.settings import get_settings

log = logging.getLogger(__name__)

# How long an attempt holds its delivery: longer than a receiver may take to answer.
_CLAIM_S = 120.0
# An attempt message may arrive this early (countdowns are not exact) and still count as due.
_EARLY_S = 2.0
# Longer waits are not a message's countdown: Redis would hand a message held unacknowledged for
# hours out again (its visibility timeout), so the sweeper sends the attempt once it is due.
COUNTDOWN_LIMIT_S = 600.0


def check_callback_url(url: str) -> None:
    """Raise outbound.AddressRefused when `url` may not be called under the current settings."""
    outbound.check_url(url, get_settings().webhook_allow_private)


def tenant_secret(session: Session, tenant: str, rotate: bool = False) -> WebhookSecret:
    """The tenant's signing secret, made on first use; `rotate` replaces it (older signatures stop verifying)."""
    row = session.get(WebhookSecret, tenant)
    fresh = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    if row is None:
        try:
            with session.begin_nested():
                row = WebhookSecret(tenant=tenant, secret=fresh, created_at=utcnow())
                session.add(row)
        except IntegrityError:  # made meanwhile by another request or worker: that one stands
            row = session.get(WebhookSecret, tenant, populate_existing=True)
    elif rotate:
        row.secret, row.created_at = fresh, utcnow()
    return row


def _job_summary(session: Session, job_id: str) -> dict | None:
    """What a receiver gets: where the job ended, why, its headline and where to fetch the rest.

    Read column by column, so objects the caller holds in this session are left as they are.
    """
    job = CompressionJob
    row = session.execute(
        select(
            job.id,
            job.tenant,
            job.name,
            job.model_id,
            job.status,
            job.error,
            job.attempts,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.artifact_sha256,
            job.artifact_size_bytes,
            job.spec,
            job.report,
        ).where(job.id == job_id)
    ).one_or_none()
    if row is None or not row.spec.get("callback_url"):
        return None
    artifact = None
    if row.artifact_sha256:
        artifact = {"sha256": row.artifact_sha256, "size_bytes": row.artifact_size_bytes}
    return {
        "id": row.id,
        "tenant": row.tenant,
        "url": row.spec["callback_url"],
        "data": {
            "id": row.id,
            "name": row.name,
            "model_id": row.model_id,
            "status": str(row.status),
            "error": row.error,
            "attempts": row.attempts,
            "created_at": _iso(row.created_at),
            "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at),
            "artifact": artifact,
            "summary": (row.report or {}).get("summary"),
            "links": {
                "self": f"/v1/jobs/{row.id}",
                "report": f"/v1/jobs/{row.id}/report",
                "artifact": f"/v1/jobs/{row.id}/artifact",
            },
        },
    }


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def record_job_event(session: Session, job_id: str) -> None:
    """A job just reached a terminal state in `session`'s transaction: store its delivery, if it
    has a callback_url, and send it once the transaction commits."""
    summary = _job_summary(session, job_id)
    if summary is None:
        return
    event_type = f"job.{summary['data']['status']}"
    now = utcnow()
    delivery = WebhookDelivery(
        tenant=summary["tenant"],
        resource="job",
        resource_id=job_id,
        event_type=event_type,
        url=summary["url"],
        payload={"type": event_type, "timestamp": now.isoformat(), "data": summary["data"]},
        status=DeliveryStatus.PENDING,
        attempts=[],
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    delivery_id = delivery.id
    after_commit(session, lambda: queue.send(queue.DELIVER_WEBHOOK, delivery_id))


def deliveries_of(session: Session, resource_id: str) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.resource_id == resource_id)
            .order_by(WebhookDelivery.created_at)
        )
    )


def _claim(session: Session, delivery_id: str) -> bool:
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now + timedelta(seconds=_EARLY_S),
        )
        .values(next_attempt_at=now + timedelta(seconds=_CLAIM_S))
    )
    return result.rowcount == 1


def attempt(delivery_id: str) -> float | None:
    """Make one attempt at a due delivery; the seconds until the next one, or None when done.

    A delivery not due (already delivered, failed, or claimed by another attempt) is left alone.
    """
    settings = get_settings()
    with unit_of_work() as session:
        if not _claim(session, delivery_id):
            return None
        delivery = session.get(WebhookDelivery, delivery_id)
        url, payload, tenant = delivery.url, delivery.payload, delivery.tenant
        secret = tenant_secret(session, tenant).secret
    body = json.dumps(payload, separators=(",", ":"))
    sent_at = utcnow()
    # The same message id on every attempt, so receivers can de-duplicate.
    headers = signed_headers(secret, f"msg_{delivery_id}", sent_at, body)
    outcome = outbound.post(url, body.encode(), headers, settings.webhook_timeout_s, settings.webhook_allow_private)
    with unit_of_work() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        delivery.attempts = [
            *delivery.attempts,
            {
                "at": sent_at.isoformat(),
                "status_code": outcome.status_code,
                "error": outcome.error,
                "duration_ms": outcome.duration_ms,
            },
        ]
        if outcome.ok:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.DELIVERED, None
            return None
        delay = _next_delay(len(delivery.attempts), delivery.created_at, settings)
        if delay is None:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            log.warning("webhook %s to %s failed %d times; giving up", delivery_id, url, len(delivery.attempts))
            return None
        delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
        return delay


def signed_headers(secret: str, message_id: str, sent_at: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (signature over `id.timestamp.body`)."""
    return {
        "content-type": "application/json",
        "user-agent": "Compactor-Webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, sent_at, body),
    }


def _next_delay(attempts_made: int, created_at, settings) -> float | None:
    """The wait before the next attempt, or None when the schedule or the retry window is spent."""
    delays = settings.webhook_retry_delays_s
    if attempts_made > len(delays):
        return None
    delay = delays[attempts_made - 1]
    if utcnow() + timedelta(seconds=delay) > created_at + timedelta(seconds=settings.webhook_retry_window_s):
        return None
    return delay


def overdue_deliveries(session: Session, overdue_s: float) -> list[str]:
    """Pending deliveries whose attempt is overdue by `overdue_s`: their message was lost, or their
    wait was left to the sweeper (`COUNTDOWN_LIMIT_S`)."""
    cutoff = utcnow() - timedelta(seconds=overdue_s)
    return list(
        session.scalars(
            select(WebhookDelivery.id).where(
                WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at < cutoff
            )
        )
    )
