"""Storage: the one small interface every place a repository can live implements.

A storage holds named blobs (``"packs/3f/3fa0….pack"``, ``"config.json"``).
Names are relative, slash-separated and never contain ``..``. Writes are
atomic: a blob is either absent or complete under its name. ``durable=True``
means the blob survives a crash once the call returns; ``durable=False`` lets a
caller batch many writes and make them durable with one :meth:`Storage.sync`.

Implementations: :class:`~drsync.storage.local.LocalStorage` (a directory),
:class:`~drsync.storage.hdfs.HdfsStorage` (a directory on HDFS, over WebHDFS)
and :class:`~drsync.storage.memory.MemoryStorage` (an in-memory double that
also models crashes). All pass ``tests/test_storage_conformance.py``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drsync.errors import OperationFailed, UsageError
from drsync.fsutil import local_location


class ObjectMissing(OperationFailed):
    """A named blob does not exist."""


class ObjectExists(OperationFailed):
    """An exclusive write found the name already taken."""


@dataclass(frozen=True)
class StoredObject:
    name: str
    size: int
    mtime: float


class BlobWriter(Protocol):
    """A blob being written; invisible under its name until :meth:`commit`."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self, *, durable: bool = True) -> None: ...

    def abort(self) -> None: ...

    @property
    def size(self) -> int: ...


@runtime_checkable
class Storage(Protocol):
    url: str

    def read(self, name: str) -> bytes: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def write(self, name: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None: ...

    def writer(self, name: str) -> BlobWriter: ...

    def delete(self, name: str) -> None: ...

    def exists(self, name: str) -> bool: ...

    def touch(self, name: str) -> None:
        """Set the object's modification time to now, never creating it: ObjectMissing when it is gone
        (a lock's refresh, which must not bring back a lock another process removed)."""
        ...

    def list(self, prefix: str = "") -> list[StoredObject]:
        """The objects whose name starts with ``prefix``, sorted by name. Only what the storage can hold
        as an object: a name :func:`check_name` refuses, or (on a file system) a pipe, socket or device,
        is not listed."""
        ...

    def sync(self, names: Iterable[str]) -> None: ...

    def close(self) -> None: ...


class ReadOnlyStorage:
    """A storage whose objects are kept as they are (a backup directory: :data:`drsync.repository.format.
    BACKUP_META`): reads pass through; a write, writer, delete or touch raises UsageError(``refusal``) before
    it reaches the storage, except under ``locks/`` (readers take locks). A decorator, as restic wraps its
    backends: one place refuses every write, whatever command or code path asks for it."""

    def __init__(self, inner: Storage, refusal: str) -> None:
        self.inner = inner
        self.url = inner.url
        self.refusal = refusal

    def _writable(self, name: str) -> None:
        if not name.startswith("locks/"):
            raise UsageError(self.refusal)

    def read(self, name: str) -> bytes:
        return self.inner.read(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.read_range(name, offset, length)

    def write(self, name: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None:
        self._writable(name)
        self.inner.write(name, data, durable=durable, exclusive=exclusive)

    def writer(self, name: str) -> BlobWriter:
        self._writable(name)
        return self.inner.writer(name)

    def delete(self, name: str) -> None:
        self._writable(name)
        self.inner.delete(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def touch(self, name: str) -> None:
        self._writable(name)
        self.inner.touch(name)

    def list(self, prefix: str = "") -> list[StoredObject]:
        return self.inner.list(prefix)

    def sync(self, names: Iterable[str]) -> None:
        self.inner.sync(names)

    def close(self) -> None:
        self.inner.close()


def read_bounded(storage: Storage, name: str, limit: int, what: str) -> bytes:
    """The whole of a small object, reading at most ``limit`` + 1 bytes of it: IntegrityError (naming
    ``what`` and the limit) when it is larger, so a damaged or hostile one is never read whole.
    ObjectMissing as :meth:`Storage.read`."""
    from drsync.errors import IntegrityError

    data = storage.read_range(name, 0, limit + 1)
    if len(data) > limit:
        raise IntegrityError(f"{what} is larger than {limit} bytes, the most drsync reads of it (docs/FORMAT.md, "
                             f"Limits): it is damaged or not drsync's; remove or restore it")
    return data


class OffsetReader(io.RawIOBase):
    """A seekable, read-only file of ``size`` bytes whose reads go to ``read_at(offset, length)``, with
    a position of its own: a Parquet reader's file over a stored object (:class:`RangeReader`) or over
    a local file read by ``os.pread``."""

    def __init__(self, size: int, read_at: Callable[[int, int], bytes]) -> None:
        super().__init__()
        self.size, self.pos, self._read_at = size, 0, read_at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(b), self.size - self.pos))
        if not n:
            return 0
        data = self._read_at(self.pos, n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class RangeReader(OffsetReader):
    """A stored object as a seekable, read-only file read by :meth:`Storage.read_range`: a reader
    that needs parts of a large object (Parquet's footer, then some column chunks) holds only
    those. ``size``: the object's size (from :meth:`Storage.list`)."""

    def __init__(self, storage: Storage, name: str, size: int) -> None:
        super().__init__(size, lambda offset, length: storage.read_range(name, offset, length))
        self.storage, self.name = storage, name


def valid_name(name: str) -> bool:
    """True when :func:`check_name` accepts ``name``: a listing skips what no read could address."""
    try:
        check_name(name)
    except ValueError:
        return False
    return True


def check_name(name: str) -> str:
    """Reject names that could escape the storage root."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ValueError(f"invalid storage name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid storage name {name!r}")
    return name


# URL schemes of HDFS (WebHDFS over HTTP, or over HTTPS for swebhdfs).
HDFS_SCHEMES = {"hdfs": "http", "webhdfs": "http", "swebhdfs": "https"}


def open_storage(url: str, *, create: bool = False, retry_s: float | None = None) -> Storage:
    """Open the storage a URL names: a plain path, ``file://PATH``, ``hdfs://NN:PORT[,NN2:PORT]/PATH`` or
    ``memory://NAME``. ``retry_s``: for HDFS, how long (seconds) a request is retried and may take."""
    from drsync.storage.local import LocalStorage
    from drsync.storage.memory import MemoryStorage

    if url.startswith("memory://"):
        return MemoryStorage.named(url[len("memory://"):])
    local = local_location(url)
    if local is None:
        scheme = url.split("://", 1)[0]
        if scheme in HDFS_SCHEMES:
            from drsync.storage.hdfs import HdfsStorage

            return HdfsStorage(url, create=create, retry_s=retry_s)
        raise UsageError(f"{url}: unknown storage scheme {scheme!r}; use a path, file://PATH or "
                         f"hdfs://namenode:9870/PATH")
    return LocalStorage(local, create=create)
