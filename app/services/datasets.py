"""Uploaded datasets: accept a streamed .npz / .safetensors file after checking its array headers."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput
from app.inspection import inspect_dataset
from app.models import CompressionJob, Dataset
from app.models.job import ACTIVE_STATUSES
from app.multipart import ReceivedUpload
from app.services.uploads import display_name, get_live, list_live, soft_delete
from app.storage import BlobStore


def create_dataset(session: Session, store: BlobStore, tenant: str, upload: ReceivedUpload) -> Dataset:
    """Validate the file's arrays (names, dtypes, sample counts; no pickles) and store it."""
    writer = upload.writer
    try:
        name = display_name(upload, "dataset")
        if writer.size == 0:
            raise InvalidInput("the file is empty", code="empty_file")
        with writer.open_staged() as staged:
            file_format, arrays, num_samples = inspect_dataset(staged, writer.size)
        sha256 = writer.commit().sha256
    except BaseException:
        writer.discard()
        raise
    dataset = Dataset(
        tenant=tenant,
        name=name,
        file_format=file_format,
        size_bytes=writer.size,
        sha256=sha256,
        num_samples=num_samples,
        arrays=arrays,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    return get_live(session, Dataset, tenant, dataset_id, "dataset")


def list_datasets(session: Session, tenant: str, limit: int, cursor: str | None):
    return list_live(session, Dataset, tenant, limit, cursor)


def delete_dataset(session: Session, store: BlobStore, tenant: str, dataset_id: str) -> None:
    """Delete a dataset unless an unfinished job still reads it."""
    dataset = get_dataset(session, tenant, dataset_id)
    for job in session.scalars(
        select(CompressionJob).where(CompressionJob.tenant == tenant, CompressionJob.status.in_(ACTIVE_STATUSES))
    ):
        if dataset_id in (job.spec.get("calibration_dataset_id"), job.spec.get("eval_dataset_id")):
            raise Conflict(
                f"dataset {dataset_id} is used by job {job.id}, which has not finished", code="dataset_in_use"
            )
    soft_delete(session, store, dataset)
