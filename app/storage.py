"""Content-addressed blob storage: files named by their sha256, written atomically.

`BlobStore` is the small interface both stores implement (the S3-compatible one is
`app.storage_s3`); `LocalBlobStore` keeps
blobs on local disk as `<root>/<aa>/<bb>/<sha256>`, written to a temp file and renamed into place,
so a reader never sees a half-written blob and a failed upload leaves nothing behind. A blob read
for a job or a download is first checked against its size and sha256 (once per process while the
file is unchanged), so a corrupted file fails loudly instead of becoming a silently wrong model.

Every write of a blob stamps its mtime anew, even when the same bytes were already stored, and a
blob is removed only if it still carries the stamp its remover saw: that is how collecting orphans
(`app.services.blobs`) spares a blob a writer has just stored but not yet referenced.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import BlobCorrupted, PayloadTooLarge

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredBlob:
    """A blob as one write left it in the store."""

    sha256: str
    size: int
    # The stamp this write created the blob with; None when the same bytes were already stored
    # (another writer may then still be about to reference them).
    created_stamp: int | None


class BlobWriter(ABC):
    """Receives an upload chunk by chunk, hashing it and enforcing the size limit as bytes arrive.

    The bytes are staged (a temp file, a temp object) until `commit()` stores them under their
    sha256; `discard()` drops them. `open_staged()` reads them back for the API's structural checks.
    """

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._account(chunk)
        self._stage(chunk)

    def _account(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise PayloadTooLarge(f"the upload exceeds the limit of {self._max_bytes} bytes")
        self._hash.update(chunk)

    async def awrite(self, chunk: bytes) -> None:
        """`write` from the event loop; a store whose writes may wait on the network runs it in a thread."""
        self.write(chunk)

    @abstractmethod
    def _stage(self, chunk: bytes) -> None: ...

    @abstractmethod
    def finish(self) -> str:
        """Make the staged bytes durable and return the sha256; the blob is not stored until `commit()`."""

    @abstractmethod
    def open_staged(self) -> BinaryIO:
        """The staged bytes as a seekable binary file (after `finish()`)."""

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @abstractmethod
    def commit(self) -> StoredBlob:
        """Store the finished bytes under their hash."""

    @abstractmethod
    def discard(self) -> None: ...


class LocalBlobWriter(BlobWriter):
    """Stages an upload in a temp file of the store's tmp directory."""

    def __init__(self, store: LocalBlobStore, max_bytes: int):
        super().__init__(max_bytes)
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self.temp_path = Path(name)

    def _stage(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def finish(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.sha256

    def open_staged(self) -> BinaryIO:
        return open(self.temp_path, "rb")

    def commit(self) -> StoredBlob:
        return StoredBlob(self.sha256, self.size, self._store.adopt(self.temp_path, self.sha256))

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.temp_path.unlink(missing_ok=True)


class BlobStore(ABC):
    """Where uploaded models, datasets and artifacts live, by sha256."""

    @abstractmethod
    def writer(self, max_bytes: int) -> BlobWriter: ...

    def put_file(self, path: Path) -> StoredBlob:
        """Copy a local file into the store (a job's artifact).

        The returned blob's `created_stamp` is the stamp when this write created the blob; None
        when those bytes were already stored (their blob is stamped anew, so a collection in
        progress spares it).
        """
        writer = self.writer(max_bytes=1 << 62)
        try:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    writer.write(chunk)
            writer.finish()
            return writer.commit()
        except BaseException:
            writer.discard()
            raise

    @abstractmethod
    def verified_path(self, sha256: str, size: int) -> Path:
        """A local file holding the blob, checked to have this size and sha256 (an object store
        downloads it into a bounded local cache first).

        Raises:
            BlobCorrupted: the blob is missing or its bytes no longer match.
        """

    def download_url(self, sha256: str, filename: str) -> str | None:
        """A URL the client may fetch the blob from directly (a presigned one); None: the API serves it."""
        return None

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def stored(self) -> Iterator[tuple[str, int]]:
        """Every blob in the store, as (sha256, stamp)."""

    @abstractmethod
    def stamp(self, sha256: str) -> int | None:
        """The blob's stamp (changed by every write of its bytes); None when it is not stored."""

    @abstractmethod
    def remove_unless_rewritten(self, sha256: str, stamp: int) -> bool:
        """Remove the blob if it still carries `stamp`; False when it was written again or is gone."""

    @abstractmethod
    def check(self) -> None:
        """Raise when the store is not usable (for /readyz)."""


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int, int, int]] = {}

    def writer(self, max_bytes: int) -> BlobWriter:
        return LocalBlobWriter(self, max_bytes)

    def local_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def adopt(self, path: Path, sha256: str) -> int | None:
        """Move a finished local file into the store (atomically) under `sha256`, stamping the blob;
        the stamp when this created the blob, None when those bytes were already stored."""
        target = self.local_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                # Already stored: keep that file, with a stamp no earlier write of it carries.
                stamp = max(time.time_ns(), os.stat(target).st_mtime_ns + 1)
                os.utime(target, ns=(stamp, stamp))
                created = None
            except FileNotFoundError:
                os.utime(path, ns=(time.time_ns(),) * 2)
                created = os.stat(path).st_mtime_ns  # as the file system keeps it
                try:
                    os.link(path, target)  # unlike a rename, never replaces a blob another writer just stored
                except FileExistsError:
                    continue
            Path(path).unlink(missing_ok=True)
            return created

    def verified_path(self, sha256: str, size: int) -> Path:
        path = self.local_path(sha256)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise BlobCorrupted(f"the stored file {sha256} is missing") from None
        # Any write changes ctime, and nothing can set ctime back: an unchanged stamp is an unchanged file.
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if self._verified.get(sha256) == stamp and info.st_size == size:
            return path
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256")
        if info.st_size != size or digest.hexdigest() != sha256:
            raise BlobCorrupted(
                f"the stored file {sha256} no longer matches its sha256 (or its size of {size} "
                "bytes): it was changed after it was stored and is not used; upload it again"
            )
        self._verified[sha256] = stamp
        return path

    def exists(self, sha256: str) -> bool:
        return self.local_path(sha256).exists()

    def stored(self) -> Iterator[tuple[str, int]]:
        for path in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            sha256 = path.name
            if _SHA256.fullmatch(sha256) and path.parent.name == sha256[2:4] and path.parent.parent.name == sha256[:2]:
                stamp = self.stamp(sha256)
                if stamp is not None:
                    yield sha256, stamp

    def stamp(self, sha256: str) -> int | None:
        try:
            return os.stat(self.local_path(sha256)).st_mtime_ns
        except FileNotFoundError:
            return None

    def remove_unless_rewritten(self, sha256: str, stamp: int) -> bool:
        target = self.local_path(sha256)
        doomed = self.tmp_dir / f"collect-{sha256}-{uuid.uuid4().hex}"
        try:
            # Out of writers' sight first: from here on, a writer of these bytes stores a new file.
            os.rename(target, doomed)
        except FileNotFoundError:
            return False
        try:
            if os.stat(doomed).st_mtime_ns == stamp:
                self._verified.pop(sha256, None)
                return True
            # Written again before it left: a writer may be about to reference it, so it goes back
            # (unless that writer, finding it gone, has stored the same bytes anew).
            try:
                os.link(doomed, target)
            except FileExistsError:
                pass
            return False
        finally:
            doomed.unlink()

    def check(self) -> None:
        probe = tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="ready-")
        probe.close()


_STORE: tuple[tuple, BlobStore] | None = None


def get_blob_store() -> BlobStore:
    """The process-wide blob store: the S3-compatible one at `storage_url` when it is set, else the
    local directory `storage_dir`."""
    global _STORE
    from app.settings import get_settings

    settings = get_settings()
    key = (settings.storage_url, settings.storage_dir, settings.cache_dir)
    if _STORE is None or _STORE[0] != key:
        if settings.storage_url:
            from app.storage_s3 import S3BlobStore  # s3fs is imported only where it is used

            store: BlobStore = S3BlobStore.from_settings(settings)
        else:
            store = LocalBlobStore(settings.storage_dir)
        _STORE = (key, store)
    return _STORE[1]
