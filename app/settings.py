"""The one settings object, read from `COMPACTOR_*` environment variables by API, worker and CLI."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


class Settings(BaseSettings):
    """Service configuration; every field is `COMPACTOR_<NAME>` in the environment.

    The defaults are the embedded mode: SQLite and a SQLite-backed Celery broker under `data_dir`,
    so `compactor serve` runs with no Postgres or Redis. Production points `database_url` at
    `postgresql+psycopg://…` and `broker_url` at `redis://…`.
    """

    model_config = SettingsConfigDict(env_prefix="COMPACTOR_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of the embedded defaults (database, broker, blobs).")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    broker_url: str | None = Field(
        None, description="Celery broker URL; default: SQLite (kombu sqlalchemy transport) in data_dir."
    )
    storage_dir: Path | None = Field(None, description="Blob store directory; default: data_dir/blobs.")
    storage_url: str | None = Field(
        None,
        description="s3://bucket/prefix: keep blobs in an S3-compatible object store instead of "
        "storage_dir, so API and workers need no shared directory.",
    )
    s3_endpoint_url: str | None = Field(None, description="The S3 API endpoint (MinIO, Ceph, R2…); default: AWS.")
    s3_region: str | None = Field(None, description="The bucket's region; default: the SDK's.")
    s3_access_key_id: str | None = Field(None, description="Access key; default: the SDK's credential chain.")
    s3_secret_access_key: SecretStr | None = Field(None, description="Secret key of s3_access_key_id.")
    s3_part_bytes: int = Field(
        8 * 1024 * 1024,
        description="Multipart part size of uploads to the object store: what one upload holds in memory.",
    )
    s3_presign_downloads: bool = Field(
        False, description="Answer model and artifact downloads with a 307 to a presigned object-store URL."
    )
    s3_presign_expires_s: int = Field(900, description="How long a presigned download URL stays valid.")
    cache_dir: Path | None = Field(
        None,
        description="Local copies of object-store blobs, by sha256 (workers, API downloads); default: data_dir/cache.",
    )
    cache_max_bytes: int = Field(20 * GIB, description="Bytes the local blob cache keeps before evicting the oldest.")
    work_dir: Path | None = Field(
        None,
        description="Where a worker makes each job's private directory (copies of "
        "its inputs, its outputs); default: data_dir/work.",
    )
    max_upload_bytes: int = Field(2 * GIB, description="Largest accepted upload, enforced while streaming.")
    max_request_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line plus headers the API reads; past it the connection gets a 400 and is closed.",
    )
    max_input_elements: int = Field(
        2**24,
        ge=1,
        description="Most elements one declared input_spec shape may have (the product of its dims); more is a 422.",
    )
    max_input_elements_total: int = Field(
        2**25, ge=1, description="Most elements all of a job's declared input_spec shapes may have together."
    )
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer API keys; empty = auth off. 'key' or 'tenant:key'."
    )
    auto_migrate: bool = Field(True, description="Upgrade the database schema when the API starts.")
    job_time_limit_s: float = Field(3600.0, description="Wall-clock limit of one job's torch work.")
    validate_time_limit_s: float = Field(300.0, description="Wall-clock limit of a model's validation.")
    job_memory_limit_bytes: int | None = Field(None, description="Address-space limit of a job's child process.")
    max_attempts: int = Field(3, description="Attempts of a job before it is failed as lost (or killed).")
    heartbeat_timeout_s: float = Field(
        30.0,
        description="A running job whose worker has not beaten for this long is lost: it is re-queued "
        "ahead of newer jobs (workers beat every sixth of it).",
    )
    requeue_interval_s: float = Field(
        5.0, description="How often each worker sweeps for lost jobs, dead attempts' leftovers and unsent work."
    )
    requeue_after_s: float = Field(
        60.0, description="A job the API could not send (the broker was down) is sent again once this old."
    )
    blob_grace_s: float = Field(
        86400.0,
        description="A blob no row references is deleted only once nobody has "
        "written it for this long: far more than storing a blob and committing the row "
        "that references it ever takes, so a blob in between is never taken.",
    )
    blob_collect_interval_s: float = Field(3600.0, description="How often a worker deletes blobs no row references.")
    queue_name: str = Field("compactor", description="Celery queue the API sends to and workers consume.")
    worker_metrics_port: int | None = Field(
        None, description="Port of a worker's own Prometheus /metrics (its jobs); none: not served."
    )
    worker_device: str = Field("auto", description="Device the worker computes on: auto, cpu or cuda.")
    worker_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op CPU threads of each job; default: the cores this worker may use "
        "(affinity and cgroup quota) divided by its concurrent job slots.",
    )
    sandbox: Literal["on", "off"] = Field(
        "on",
        description="Run uploaded models only inside the bubblewrap sandbox; "
        "'off' runs them as the worker's own user (shown in /readyz and every report).",
    )
    sandbox_max_output_bytes: int = Field(
        16 * GIB,
        description="Bytes a sandboxed job may write in all (artifact, stages, temp files); the job fails past it.",
    )
    sandbox_max_processes: int = Field(
        4096,
        description="RLIMIT_NPROC of a sandboxed job: processes and threads "
        "of the worker's user (Linux does not apply it to uid 0).",
    )
    measure_extra_time_s: float = Field(
        30.0,
        ge=0,
        description="Seconds a job's measurement may add rounds while a speed-up's interval is still wide.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow callback URLs on loopback, link-local and private addresses "
        "(off: no webhook can reach into the operator's own network).",
    )
    webhook_retry_delays_s: list[float] = Field(
        [5, 300, 1800, 7200, 18000, 36000, 36000],
        description="Waits between a webhook's attempts (the Standard Webhooks schedule); "
        "no attempt is made after webhook_retry_window_s.",
    )
    webhook_retry_window_s: float = Field(86400.0, description="How long a webhook is retried before it is failed.")
    webhook_timeout_s: float = Field(10.0, description="Time a receiver has to answer one webhook attempt.")
    events_poll_interval_s: float = Field(
        0.5, gt=0, description="How often an open event stream (GET /v1/jobs/{id}/events) looks for changes."
    )
    log_format: Literal["console", "json"] = Field(
        "console", description="'json': every log line one JSON object, with request id, tenant and job id."
    )
    environment: str = Field("development", description="'production' refuses insecure defaults.")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'compactor.sqlite'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "blobs"
        if self.cache_dir is None:
            self.cache_dir = self.data_dir / "cache"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("production needs COMPACTOR_DATABASE_URL pointing at Postgres")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
