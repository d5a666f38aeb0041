"""Compression jobs as users see them: submit (idempotently), read, list, cancel, reports."""

from __future__ import annotations

import hashlib
import json
import logging
import math

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app import queue
from app.db import after_commit
from app.errors import Conflict, InvalidInput, NotFound
from app.models import CompressionJob
from app.models.base import utcnow
from app.models.job import JobStatus, job_progress
from app.outbound import AddressRefused
from app.schemas.job import DistillStep, JobSpec
from app.services import idempotency, lifecycle, webhooks
from app.services.datasets import get_dataset
from app.services.models import get_model
from app.services.pagination import paginate
from app.settings import get_settings

log = logging.getLogger(__name__)


def check_spec(session: Session, tenant: str, spec: JobSpec) -> None:
    """Refuse a spec whose references do not exist for this tenant (the schema checked the rest)."""
    if spec.callback_url:
        try:
            webhooks.check_callback_url(spec.callback_url)
        except AddressRefused as exc:
            raise InvalidInput(
                f"callback_url refused: {exc}",
                code="callback_url_refused",
                errors=[{"loc": ["body", "callback_url"], "msg": f"callback_url refused: {exc}"}],
            ) from None
    errors: list[dict] = []

    def exists(loc: list, getter, ref: str) -> None:
        try:
            getter(session, tenant, ref)
        except NotFound as exc:
            errors.append({"loc": ["body", *loc], "msg": exc.detail})

    exists(["model_id"], get_model, spec.model_id)
    for field in ("calibration_dataset_id", "eval_dataset_id"):
        if getattr(spec, field):
            exists([field], get_dataset, getattr(spec, field))
    for index, step in enumerate(spec.steps):
        if isinstance(step, DistillStep) and step.student_model_id:
            exists(["steps", index, "student_model_id"], get_model, step.student_model_id)
    errors += _oversized_inputs(spec)
    if errors:
        raise InvalidInput("; ".join(e["msg"] for e in errors), code="invalid_job_spec", errors=errors)


def _oversized_inputs(spec: JobSpec) -> list[dict]:
    """Declared input shapes past the service's limits: refused here, not when the worker tries to
    allocate them. A setting, not the schema: lowering it must not make stored jobs unreadable."""
    settings = get_settings()
    sizes = [math.prod(item.shape) for item in spec.input_spec or ()]
    errors = [
        {
            "loc": ["body", "input_spec", index, "shape"],
            "msg": f"shape {spec.input_spec[index].shape} has {size:,} elements; this service allows at most "
            f"{settings.max_input_elements:,} per input (COMPACTOR_MAX_INPUT_ELEMENTS)",
        }
        for index, size in enumerate(sizes)
        if size > settings.max_input_elements
    ]
    if not errors and sum(sizes) > settings.max_input_elements_total:
        errors.append(
            {
                "loc": ["body", "input_spec"],
                "msg": f"the inputs have {sum(sizes):,} elements together; this service allows at most "
                f"{settings.max_input_elements_total:,} (COMPACTOR_MAX_INPUT_ELEMENTS_TOTAL)",
            }
        )
    return errors


def _spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_job(
    session: Session, tenant: str, spec: JobSpec, idempotency_key: str | None, search_id: str | None = None
) -> tuple[CompressionJob, bool]:
    """Store a queued job and send it to the workers once committed; returns (job, created).

    With an `idempotency_key`, the same key and spec return the existing job; another spec is a 409.
    `search_id` makes it a trial of that search (app.services.searches).
    """
    spec_hash = _spec_hash(spec)
    existing = idempotency.stored(session, CompressionJob, tenant, idempotency_key, spec_hash, "job")
    if existing is not None:
        return existing, False
    check_spec(session, tenant, spec)
    stored_spec = spec.model_dump(mode="json")
    device_kind = queue.job_device_kind(stored_spec)
    job = CompressionJob(
        tenant=tenant,
        name=spec.name,
        model_id=spec.model_id,
        spec=stored_spec,
        spec_hash=spec_hash,
        idempotency_key=idempotency_key,
        status=JobStatus.QUEUED,
        progress=queued_progress(device_kind),
        search_id=search_id,
    )
    job, created = idempotency.insert(session, job, "job")
    if not created:
        return job, False
    job_id = job.id
    log.info("job %s created (%s)", job_id, device_kind, extra={"job_id": job_id})
    after_commit(session, lambda: dispatch(job_id, device_kind))
    return job, True


def queued_progress(device_kind: str) -> dict:
    """A new job's progress: a cuda job says that it waits for a GPU worker (none may be running)."""
    if device_kind == queue.CUDA:
        return job_progress(
            JobStatus.QUEUED,
            f"waiting for a GPU worker: it runs when a worker serving '{queue.CUDA}' takes it "
            f"(queue {queue.queue_for(queue.CUDA)})",
        )
    return job_progress(JobStatus.QUEUED)


def dispatch(job_id: str, device_kind: str) -> None:
    """Send a committed job to its device's queue and remember when; a failed send is retried by the sweeper."""
    if queue.send(queue.RUN_JOB, job_id, device_kind=device_kind):
        from app.db import unit_of_work

        with unit_of_work() as session:
            job = session.get(CompressionJob, job_id)
            if job is not None and job.enqueued_at is None:
                job.enqueued_at = utcnow()


def get_job(session: Session, tenant: str, job_id: str, with_report: bool = False) -> CompressionJob:
    if with_report:
        job = session.scalar(
            select(CompressionJob).options(undefer(CompressionJob.report)).where(CompressionJob.id == job_id)
        )
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {job_id} does not exist", code="job_not_found")
        return job
    return get_live_job(session, tenant, job_id)


def get_live_job(session: Session, tenant: str, job_id: str) -> CompressionJob:
    job = session.get(CompressionJob, job_id)
    if job is None or job.tenant != tenant:
        raise NotFound(f"job {job_id} does not exist", code="job_not_found")
    return job


def deliveries_of(session: Session, job: CompressionJob) -> list | None:
    """The job's webhook deliveries, or None when it has no callback_url (no query then)."""
    return webhooks.deliveries_of(session, job.id) if job.spec.get("callback_url") else None


def job_state(session: Session, tenant: str, job_id: str) -> dict:
    """What an event of the job carries: its revision, status, progress and error (one small query)."""
    job = CompressionJob
    row = session.execute(
        select(job.id, job.tenant, job.revision, job.status, job.progress, job.error).where(job.id == job_id)
    ).one_or_none()
    if row is None or row.tenant != tenant:
        raise NotFound(f"job {job_id} does not exist", code="job_not_found")
    return {"id": row.id, "revision": row.revision, "status": row.status, "progress": row.progress, "error": row.error}


def list_jobs(session: Session, tenant: str, limit: int, cursor: str | None, status: str | None, model_id: str | None):
    query = select(CompressionJob).where(CompressionJob.tenant == tenant)
    if status:
        query = query.where(CompressionJob.status == status)
    if model_id:
        query = query.where(CompressionJob.model_id == model_id)
    return paginate(session, query, CompressionJob, limit, cursor)


def cancel_job(session: Session, tenant: str, job_id: str) -> CompressionJob:
    """Cancel a queued or running job (its worker stops it); a finished job is returned unchanged.

    The job is returned as the database has it afterwards: a job that finished just before the
    cancel stays finished, whatever this request had read.
    """
    job = get_live_job(session, tenant, job_id)
    lifecycle.cancel(session, job_id)
    session.refresh(job)
    return job


def get_report(session: Session, tenant: str, job_id: str) -> dict:
    """The report of a succeeded job; 409 while it has not succeeded."""
    job = get_job(session, tenant, job_id, with_report=True)
    if job.status != JobStatus.SUCCEEDED or job.report is None:
        raise Conflict(
            f"job {job_id} is {job.status}: its report exists once it has succeeded", code="job_not_succeeded"
        )
    return job.report


def get_artifact(session: Session, tenant: str, job_id: str, artifact_format: str = "torchscript") -> tuple[str, int]:
    """The (sha256, size) of a succeeded job's artifact in `artifact_format` (`torchscript` or `onnx`).

    Raises:
        Conflict("job_not_succeeded"): the job has not succeeded (yet).
        NotFound("onnx_not_available"): the job succeeded without an ONNX file (not asked for, or
            its export or validation failed: the report's `onnx.missing` says why).
    """
    job = get_live_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED or job.artifact_sha256 is None:
        raise Conflict(
            f"job {job_id} is {job.status}: its artifact exists once it has succeeded", code="job_not_succeeded"
        )
    if artifact_format == "torchscript":
        return job.artifact_sha256, job.artifact_size_bytes
    if job.onnx_sha256 is None:
        asked = "onnx" in ((job.spec or {}).get("output_formats") or [])
        why = (
            "its export was not offered (the report's onnx.missing says why)"
            if asked
            else "its spec did not ask for one (output_formats)"
        )
        raise NotFound(f"job {job_id} has no ONNX artifact: {why}", code="onnx_not_available")
    return job.onnx_sha256, job.onnx_size_bytes


def compare_jobs(session: Session, tenant: str, job_ids: list[str]) -> list[dict]:
    """Summaries of several jobs side by side, in the order asked, for choosing between recipes."""
    if not 1 <= len(job_ids) <= 20:
        raise InvalidInput("give between 1 and 20 job ids", code="invalid_compare")
    rows = []
    for job_id in job_ids:
        job = get_job(session, tenant, job_id, with_report=True)
        report = job.report or {}
        rows.append(
            {
                "job_id": job.id,
                "name": job.name,
                "status": job.status,
                "steps": job.spec.get("steps", []),
                "summary": report.get("summary"),
                "result": report.get("result"),
            }
        )
    return rows
