"""Uploaded models: accept a streamed TorchScript or torch.export archive, queue its validation,
list and delete."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import queue
from app.db import after_commit
from app.errors import Conflict
from app.inspection import inspect_model_archive
from app.models import CompressionJob, UploadedModel
from app.models.job import ACTIVE_STATUSES
from app.multipart import ReceivedUpload
from app.services import lifecycle
from app.services.uploads import display_name, get_live, list_live, soft_delete
from app.storage import BlobStore


def create_model(session: Session, store: BlobStore, tenant: str, upload: ReceivedUpload) -> UploadedModel:
    """Check the archive's structure, store its bytes, and queue full validation on a worker."""
    writer = upload.writer
    try:
        name = display_name(upload, "model.pt")
        with writer.open_staged() as staged:
            model_format = inspect_model_archive(staged, writer.size)
        sha256 = writer.commit().sha256
    except BaseException:
        writer.discard()
        raise
    model = UploadedModel(
        tenant=tenant, name=name, format=model_format, size_bytes=writer.size, sha256=sha256, status="validating"
    )
    session.add(model)
    session.flush()
    model_id = model.id
    after_commit(session, lambda: dispatch_validation(model_id))
    return model


def dispatch_validation(model_id: str) -> None:
    """Send a committed model's validation; when the broker refuses it, mark the model so that the
    sweeper sends it (a validation waiting in the queue is never sent twice)."""
    if queue.send(queue.VALIDATE_MODEL, model_id):
        return
    from app.db import unit_of_work

    with unit_of_work() as session:
        lifecycle.mark_validation_unsent(session, [model_id])


def get_model(session: Session, tenant: str, model_id: str) -> UploadedModel:
    return get_live(session, UploadedModel, tenant, model_id, "model")


def list_models(session: Session, tenant: str, limit: int, cursor: str | None):
    return list_live(session, UploadedModel, tenant, limit, cursor)


def delete_model(session: Session, store: BlobStore, tenant: str, model_id: str) -> None:
    """Delete a model unless a queued or running job still needs it; finished jobs keep their record."""
    model = get_model(session, tenant, model_id)
    active = session.scalar(
        select(CompressionJob.id)
        .where(CompressionJob.model_id == model_id, CompressionJob.status.in_(ACTIVE_STATUSES))
        .limit(1)
    )
    if active:
        raise Conflict(
            f"model {model_id} is used by job {active}, which has not finished: cancel it first", code="model_in_use"
        )
    soft_delete(session, store, model)
