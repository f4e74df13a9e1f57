"""An in-memory storage: a real implementation for tests, including crashes.

Every committed blob is visible at once; a blob written with ``durable=False``
is lost by :meth:`MemoryStorage.crash` unless :meth:`sync` covered it. That is
exactly the contract the repository relies on, so crash-safety tests of the
repository can run against this double as well as against real files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import ClassVar

from drsync.storage import ObjectExists, ObjectMissing, StoredObject, check_name


class MemoryBlobWriter:
    def __init__(self, storage: MemoryStorage, name: str) -> None:
        self._storage = storage
        self._name = check_name(name)
        self._buf = bytearray()
        self._open = True

    @property
    def size(self) -> int:
        return len(self._buf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._open, "writer already closed"
        self._buf += data

    def commit(self, *, durable: bool = True) -> None:
        assert self._open, "writer already closed"
        self._open = False
        self._storage.write(self._name, bytes(self._buf), durable=durable)

    def abort(self) -> None:
        self._open = False
        self._buf = bytearray()


class MemoryStorage:
    _named: ClassVar[dict[str, MemoryStorage]] = {}

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._durable: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> MemoryStorage:
        """One shared instance per name, so ``memory://x`` means the same store twice."""
        if name not in cls._named:
            cls._named[name] = cls(f"memory://{name}")
        return cls._named[name]

    def read(self, name: str) -> bytes:
        with self._lock:
            try:
                return self._blobs[check_name(name)][0]
            except KeyError:
                raise ObjectMissing(f"{self.url}: {name} is missing") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.read(name)[offset:offset + length]

    def write(self, name: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None:
        check_name(name)
        with self._lock:
            if exclusive and name in self._blobs:
                raise ObjectExists(f"{self.url}: {name} exists already")
            entry = (bytes(data), time.time())
            self._blobs[name] = entry
            if durable:
                self._durable[name] = entry

    def writer(self, name: str) -> MemoryBlobWriter:
        return MemoryBlobWriter(self, name)

    def delete(self, name: str) -> None:
        with self._lock:
            self._blobs.pop(name, None)
            self._durable.pop(name, None)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._blobs

    def touch(self, name: str) -> None:
        with self._lock:
            if name not in self._blobs:
                raise ObjectMissing(f"{self.url}: {name} is missing")
            data = self._blobs[name][0]
            self._blobs[name] = (data, time.time())
            if name in self._durable:
                self._durable[name] = self._blobs[name]

    def list(self, prefix: str = "") -> list[StoredObject]:
        with self._lock:
            return sorted(
                (StoredObject(n, len(b), t) for n, (b, t) in self._blobs.items() if n.startswith(prefix)),
                key=lambda o: o.name,
            )

    def sync(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                if name not in self._blobs:
                    raise ObjectMissing(f"{self.url}: {name} is missing")
                self._durable[name] = self._blobs[name]

    def clone(self) -> MemoryStorage:
        """An independent copy (same blobs, same durability), to replay a scenario."""
        other = MemoryStorage(self.url)
        with self._lock:
            other._blobs = dict(self._blobs)
            other._durable = dict(self._durable)
        return other

    def crash(self) -> None:
        """Forget every write that was never made durable, as a power loss would."""
        with self._lock:
            self._blobs = dict(self._durable)

    def corrupt(self, name: str, offset: int, new: bytes) -> None:
        """Flip bytes in place (for integrity tests)."""
        with self._lock:
            data, t = self._blobs[name]
            data = data[:offset] + new + data[offset + len(new):]
            self._blobs[name] = (data, t)
            self._durable[name] = (data, t)

    def close(self) -> None:
        pass
