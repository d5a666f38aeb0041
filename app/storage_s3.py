"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph, R2…), through fsspec's s3fs.

Layout under `s3://bucket/prefix`: `blobs/<sha256>` (user metadata `stamp`, a write's time in ns)
and `tmp/upload-<uuid>` (an upload being received). An upload streams into its temp object as a
multipart upload (one part in memory), is hashed and size-checked on the way like a local one, and
is copied server-side to its `blobs/` key on commit. Every write of a blob copies it anew with a
fresh `stamp`, the counterpart of the local store's mtime: `app.services.blobs` deletes a blob only
if it still carries the stamp it saw.

Reads go through a bounded local cache keyed by sha256 (a `LocalBlobStore` in `cache_dir`): a blob
is downloaded once per host, verified against its sha256 while it is written there, and the least
recently used copies are evicted past `cache_max_bytes`.

S3 has no conditional delete, so `remove_unless_rewritten` is a HEAD then a DELETE: a rewrite of
the same bytes landing between the two (after the blob sat unreferenced for the whole grace period)
is lost. The local store has no such window.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
import s3fs
from fsspec.asyn import sync

from app.errors import BlobCorrupted, PayloadTooLarge
from app.settings import Settings
from app.storage import _SHA256, BlobStore, BlobWriter, LocalBlobStore, StoredBlob

log = logging.getLogger(__name__)

# Chunks received from the event loop are handed to s3fs in batches this large, so a 1 GiB upload
# costs a thousand thread hops, not one per network read.
_HOP_BYTES = 1 << 20
# CopyObject's limit; larger blobs are copied part by part.
_COPY_OBJECT_MAX = 5 * 1024**3
# A cached copy used this recently may be a job's input still being copied: never evicted.
_IN_USE_S = 300.0


class S3BlobWriter(BlobWriter):
    """Streams an upload into a temp object (multipart: at most one part buffered)."""

    def __init__(self, store: S3BlobStore, max_bytes: int):
        super().__init__(max_bytes)
        self._store = store
        self.temp_key = f"{store.prefix}/tmp/upload-{uuid.uuid4().hex}"
        self._file = store.fs.open(self.temp_key, "wb", block_size=store.part_bytes)
        self._pending = bytearray()

    def _stage(self, chunk: bytes) -> None:
        if self._pending:
            self._flush_pending()
        self._file.write(chunk)

    def _flush_pending(self) -> None:
        self._file.write(bytes(self._pending))
        self._pending.clear()

    async def awrite(self, chunk: bytes) -> None:
        # A part upload blocks on the network, so writes to s3fs leave the event loop.
        self._account(chunk)
        self._pending += chunk
        if len(self._pending) >= _HOP_BYTES:
            await anyio.to_thread.run_sync(self._flush_pending)

    def finish(self) -> str:
        if self._pending:
            self._flush_pending()
        self._file.close()  # completes the multipart upload
        return self.sha256

    def open_staged(self) -> BinaryIO:
        # Range reads: a zip's central directory is read without the rest of the file.
        return self._store.fs.open(self.temp_key, "rb", block_size=256 * 1024, cache_type="readahead")

    def commit(self) -> StoredBlob:
        created = self._store.adopt_object(self.temp_key, self.sha256, self.size)
        return StoredBlob(self.sha256, self.size, created)

    def discard(self) -> None:
        self._pending.clear()
        try:
            if not self._file.closed:
                self._file.discard()  # aborts the multipart upload
            self._store.fs.rm_file(self.temp_key)
        except FileNotFoundError:
            pass
        except Exception:
            # Discarding follows a failure already being reported; the bucket's lifecycle rule
            # (README) removes what is left.
            log.warning("could not remove the staged upload %s", self.temp_key, exc_info=True)


class S3BlobStore(BlobStore):
    def __init__(
        self,
        fs: s3fs.S3FileSystem,
        url: str,
        cache: LocalBlobStore,
        cache_max_bytes: int,
        part_bytes: int = 8 * 1024 * 1024,
        presign_expires_s: int | None = None,
    ):
        if not url.startswith("s3://") or len(url) <= len("s3://"):
            raise ValueError(f"COMPACTOR_STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
        self.fs = fs
        self.prefix = url.removeprefix("s3://").rstrip("/")
        self.bucket = self.prefix.split("/", 1)[0]
        self.cache = cache
        self.cache_max_bytes = cache_max_bytes
        self.part_bytes = max(part_bytes, 5 * 1024 * 1024)  # S3's smallest part
        self.presign_expires_s = presign_expires_s
        self._fetching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._last_used: dict[str, int] = {}
        self.in_use_s = _IN_USE_S

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        fs = s3fs.S3FileSystem(
            key=settings.s3_access_key_id,
            secret=secret,
            endpoint_url=settings.s3_endpoint_url,
            client_kwargs={"region_name": settings.s3_region} if settings.s3_region else {},
            # s3v4 for presigned URLs too (SigV2 is gone from AWS). Completing a multipart upload
            # or copying a large object may take a store tens of seconds: s3fs' 15 s read timeout
            # would retry a request that is still succeeding.
            config_kwargs={"signature_version": "s3v4", "read_timeout": 300},
            # Other processes write and delete blobs: a cached listing would be a stale answer.
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        return cls(
            fs,
            settings.storage_url,
            LocalBlobStore(settings.cache_dir),
            settings.cache_max_bytes,
            settings.s3_part_bytes,
            settings.s3_presign_expires_s if settings.s3_presign_downloads else None,
        )

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/blobs/{sha256}"

    def writer(self, max_bytes: int) -> BlobWriter:
        return S3BlobWriter(self, max_bytes)

    def adopt_object(self, temp_key: str, sha256: str, size: int) -> int | None:
        """Copy a finished temp object to its blob key with a new stamp, then drop the temp object;
        the stamp when this created the blob, None when those bytes were already stored."""
        previous = self.stamp(sha256)
        stamp = max(time.time_ns(), (previous or 0) + 1)
        self._copy(temp_key, self.key(sha256), stamp, size)
        self.fs.rm_file(temp_key)
        return None if previous is not None else stamp

    def _copy(self, source: str, target: str, stamp: int, size: int) -> None:
        metadata = {"Metadata": {"stamp": str(stamp)}}
        if size > _COPY_OBJECT_MAX:
            sync(self.fs.loop, self.fs._copy_managed, source, target, size, **metadata)
            return
        bucket, source_key = source.split("/", 1)
        self.fs.call_s3(
            "copy_object",
            Bucket=self.bucket,
            Key=target.split("/", 1)[1],
            CopySource={"Bucket": bucket, "Key": source_key},
            MetadataDirective="REPLACE",
            **metadata,
        )

    def verified_path(self, sha256: str, size: int) -> Path:
        with self._lock:
            fetching = self._fetching.setdefault(sha256, threading.Lock())
            self._last_used[sha256] = time.time_ns()
        with fetching:  # one download of a blob per process; other blobs download meanwhile
            try:
                return self.cache.verified_path(sha256, size)
            except BlobCorrupted:
                self.cache.local_path(sha256).unlink(missing_ok=True)  # missing, or a damaged copy
            self._fetch(sha256, size)
            path = self.cache.verified_path(sha256, size)
        self._evict(keep=sha256)
        return path

    def _fetch(self, sha256: str, size: int) -> None:
        writer = self.cache.writer(max_bytes=size)
        try:
            with self.fs.open(self.key(sha256), "rb", block_size=self.part_bytes) as source:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    writer.write(chunk)
            writer.finish()
        except FileNotFoundError:
            writer.discard()
            raise BlobCorrupted(f"the stored object {sha256} is missing") from None
        except PayloadTooLarge:
            writer.discard()
            raise BlobCorrupted(f"the stored object {sha256} is larger than its {size} bytes") from None
        except BaseException:
            writer.discard()
            raise
        if writer.sha256 != sha256 or writer.size != size:
            writer.discard()
            raise BlobCorrupted(
                f"the stored object {sha256} no longer matches its sha256 (or its size of {size} "
                "bytes): it was changed after it was stored and is not used; upload it again"
            )
        writer.commit()

    def _evict(self, keep: str) -> None:
        """Remove the least recently used cached copies until the cache fits its bound."""
        with self._lock:
            now = time.time_ns()
            entries = []
            for sha256, stamp in self.cache.stored():
                used = self._last_used.get(sha256, stamp)
                entries.append((used, sha256, stamp, self.cache.local_path(sha256).stat().st_size))
            total = sum(entry[3] for entry in entries)
            for used, sha256, stamp, size in sorted(entries):
                if total <= self.cache_max_bytes:
                    break
                if sha256 == keep or now - used < self.in_use_s * 1e9:
                    continue
                if self.cache.remove_unless_rewritten(sha256, stamp):
                    total -= size
                    self._last_used.pop(sha256, None)

    def download_url(self, sha256: str, filename: str) -> str | None:
        if self.presign_expires_s is None:
            return None
        return self.fs.url(
            self.key(sha256),
            expires=self.presign_expires_s,
            ResponseContentDisposition=f'attachment; filename="{filename}"',
            ResponseContentType="application/octet-stream",
        )

    def exists(self, sha256: str) -> bool:
        return self.stamp(sha256) is not None

    def stored(self) -> Iterator[tuple[str, int]]:
        for key in self.fs.find(f"{self.prefix}/blobs/"):
            sha256 = key.rsplit("/", 1)[-1]
            if _SHA256.fullmatch(sha256):
                stamp = self.stamp(sha256)
                if stamp is not None:
                    yield sha256, stamp

    def stamp(self, sha256: str) -> int | None:
        bucket, key = self.key(sha256).split("/", 1)
        try:
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return int(head.get("Metadata", {}).get("stamp", 0))

    def remove_unless_rewritten(self, sha256: str, stamp: int) -> bool:
        if self.stamp(sha256) != stamp:
            return False
        self.fs.rm_file(self.key(sha256))
        return True

    def check(self) -> None:
        self.fs.call_s3("head_bucket", Bucket=self.bucket)
