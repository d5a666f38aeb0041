"""Stored outputs of completed pipeline steps: the key that names one, recording it, finding the
longest stored prefix of a job's steps.

A step's output depends on the model's bytes, the data the steps may read, the seed, the device
kind it ran on, the batch sizes a step may decide by, and every step up to it: the key is the
sha256 of those, and of the tenant (a checkpoint is never seen across tenants, even for the same
bytes). Any job whose steps start with a stored prefix reuses it: a retried attempt resumes after
its last stored step, and a job sharing a prefix with an earlier one (a search's trials) starts
after the shared part. The checkpoint file itself is only a blob here; only the sandboxed child
loads it, like any stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import StepCheckpoint, UploadedModel
from app.storage import StoredBlob

# Bumped when what a step's output depends on changes meaning (old checkpoints are then missed).
KEY_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A stored step output, as a job about to reuse it needs it."""

    step_index: int
    job_id: str
    sha256: str
    size_bytes: int
    stage: dict


def step_keys(tenant: str, model_sha256: str, spec: dict, device_kind: str) -> list[str]:
    """The checkpoint key of each of the spec's steps: the key of step k covers steps[:k+1].

    Args:
        tenant: the job's tenant.
        model_sha256: the uploaded model's bytes.
        spec: the job's spec as stored (defaults filled in, so equal specs give equal keys).
        device_kind: "cpu" or "cuda", where the steps compute.

    Returns:
        One 64-hex key per step, in order.

    Example:
        >>> keys = step_keys("default", "ab" * 32, {"steps": [{"op": "prune"}, {"op": "compile"}]}, "cpu")
        >>> len(keys), keys[0] == step_keys("default", "ab" * 32, {"steps": [{"op": "prune"}]}, "cpu")[0]
        (2, True)
    """
    steps = spec.get("steps") or []
    benchmark = spec.get("benchmark") if isinstance(spec.get("benchmark"), dict) else {}
    inputs = {
        "version": KEY_VERSION,
        "tenant": tenant,
        "model_sha256": model_sha256,
        "calibration_dataset_id": spec.get("calibration_dataset_id"),
        "eval_dataset_id": spec.get("eval_dataset_id"),
        "input_spec": spec.get("input_spec"),
        "batch_sizes": benchmark.get("batch_sizes"),
        "seed": spec.get("seed", 0),
        "device_kind": device_kind,
    }
    return [_digest({**inputs, "steps": steps[: index + 1]}) for index in range(len(steps))]


def _digest(value: dict) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def stored_prefix(session: Session, tenant: str, keys: list[str]) -> list[Checkpoint]:
    """The longest run of steps from the first whose outputs are stored for this tenant (their model
    not deleted); the newest stored output of each step."""
    if not keys:
        return []
    rows = session.execute(
        select(StepCheckpoint)
        .join(UploadedModel, UploadedModel.id == StepCheckpoint.model_id)
        .where(
            StepCheckpoint.tenant == tenant,
            StepCheckpoint.key.in_(keys),
            UploadedModel.deleted_at.is_(None),
        )
        .order_by(StepCheckpoint.created_at.desc())
    ).scalars()
    newest: dict[str, StepCheckpoint] = {}
    for row in rows:
        newest.setdefault(row.key, row)
    prefix = []
    for index, key in enumerate(keys):
        row = newest.get(key)
        if row is None:
            break
        prefix.append(Checkpoint(index, row.job_id, row.sha256, row.size_bytes, row.stage))
    return prefix


def record(
    session: Session, tenant: str, key: str, job_id: str, model_id: str, step_index: int, blob: StoredBlob, stage: dict
) -> None:
    """Record a step's stored output (its blob already in the store) for `job_id`."""
    session.add(
        StepCheckpoint(
            tenant=tenant,
            key=key,
            job_id=job_id,
            model_id=model_id,
            step_index=step_index,
            sha256=blob.sha256,
            size_bytes=blob.size,
            stage=stage,
        )
    )


def referencing_condition():
    """What keeps a checkpoint's blob: its row, while its model is not deleted."""
    live_models = select(UploadedModel.id).where(UploadedModel.deleted_at.is_(None))
    return StepCheckpoint.model_id.in_(live_models)
