"""Repository locks, restic style: one small file per holder under ``locks/``.

Shared locks (snapshot create, restore, verify) may coexist; an exclusive lock
(delete, garbage collection) excludes everyone. A lock is stale when its
process is gone (same host) or it has not been refreshed for ``STALE_AFTER``;
stale locks are removed by the next locker, so a crash never wedges a
repository. Holders refresh their lock in the background.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drsync.errors import IntegrityError, LockedError
from drsync.repository import format as fmt
from drsync.storage import ObjectMissing, Storage, read_bounded

STALE_AFTER = 30 * 60.0
REFRESH_EVERY = 5 * 60.0
# How long a command waits for a conflicting lock before giving up (DRSYNC_LOCK_WAIT seconds).
DEFAULT_WAIT_S = float(os.environ.get("DRSYNC_LOCK_WAIT", "30"))


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against pid reuse), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    now = _process_start(pid)
    if now is None:
        return False
    return start is None or now == "?" or now == start


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    exclusive: bool
    command: str
    created: float
    refreshed: float
    start: str | None

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.created))
        return f"{kind} lock by pid {self.pid} on {self.host} ({self.command}) since {since} UTC"

    def is_this_process(self) -> bool:
        """True when the lock is held by the calling process itself (another of its operations)."""
        return (self.host == socket.gethostname() and self.pid == os.getpid()
                and self.start == _process_start(self.pid))

    def is_stale(self, now: float) -> bool:
        if now - self.refreshed > STALE_AFTER:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid, self.start)


def read_locks(storage: Storage, *, oversized_ok: bool = False) -> list[LockInfo]:
    """Every lock file. One larger than any lock can be is not read: IntegrityError, unless
    ``oversized_ok`` (``repo unlock --all``), where it is listed as an unreadable lock."""
    out = []
    for obj in storage.list(fmt.LOCKS_DIR):
        try:
            if obj.size > fmt.SMALL_DOC_MAX_BYTES and oversized_ok:
                out.append(LockInfo(obj.name, "?", 0, True, "oversized lock file", obj.mtime, obj.mtime, None))
                continue
            if obj.size > fmt.SMALL_DOC_MAX_BYTES:
                raise IntegrityError(f"lock file {storage.url}/{obj.name} is {obj.size} bytes, larger than a lock "
                                     f"can be ({fmt.SMALL_DOC_MAX_BYTES}; docs/FORMAT.md, Limits): it is damaged; "
                                     f"if no drsync runs on this repository, remove it with 'drsync repo unlock "
                                     f"--all'")
            doc = json.loads(read_bounded(storage, obj.name, fmt.SMALL_DOC_MAX_BYTES, f"lock file {obj.name}"))
            out.append(LockInfo(obj.name, doc["host"], int(doc["pid"]), bool(doc["exclusive"]),
                                doc.get("command", "?"), float(doc["created"]), float(doc["refreshed"]),
                                doc.get("start")))
        except ObjectMissing:
            continue
        except (ValueError, KeyError, TypeError):
            # An unreadable lock file is treated as a fresh foreign lock would be:
            # it blocks, and 'drsync repo unlock' removes it.
            out.append(LockInfo(obj.name, "?", 0, True, "unreadable lock file", obj.mtime, obj.mtime, None))
    return out


def _conflict_message(url: str, conflict: LockInfo) -> str:
    if conflict.is_this_process():
        # Never advise 'repo unlock' for a lock this very process holds: it is alive and will let go.
        return (f"repository {url} is locked by another operation of this process: {conflict.describe()}; "
                f"it is released when that operation finishes")
    return (f"repository {url} is locked: {conflict.describe()}; wait for it to finish, or if that "
            f"process is gone run 'drsync repo unlock'")


class RepositoryLock:
    """One lock file under ``locks/``: :meth:`acquire` (or ``with``) takes it, :meth:`release` drops it.

    ``wait_s`` (seconds) is how long :meth:`acquire` retries while a conflicting lock is held
    before it raises :class:`~drsync.errors.LockedError` (0: give up at once). ``on_acquire`` and
    ``on_release`` are called with the lock right after it is taken and right before it is
    dropped (the repository uses them to know when its cached index can be trusted).
    """

    def __init__(self, storage: Storage, *, exclusive: bool, wait_s: float = 0.0,
                 on_acquire: Callable[[RepositoryLock], None] | None = None,
                 on_release: Callable[[RepositoryLock], None] | None = None) -> None:
        self.storage = storage
        self.exclusive = exclusive
        self.wait_s = wait_s
        self._on_acquire = on_acquire
        self._on_release = on_release
        self.held = False
        self.name = f"{fmt.LOCKS_DIR}{secrets.token_hex(16)}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = 0.0

    def _doc(self) -> bytes:
        pid = os.getpid()
        return json.dumps({
            "host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
            "exclusive": self.exclusive, "command": " ".join(os.path.basename(a) for a in sys.argv[:3]),
            "created": self._created, "refreshed": time.time(),
        }).encode()

    def acquire(self) -> RepositoryLock:
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            conflict = self._try_once()
            if conflict is None:
                break
            if time.monotonic() >= deadline:
                raise LockedError(_conflict_message(self.storage.url, conflict))
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # backoff between attempts
            delay = min(delay * 2, 1.0)
        self._thread = threading.Thread(target=self._refresh_loop, name="drsync-lock-refresh", daemon=True)
        self._thread.start()
        self.held = True
        if self._on_acquire is not None:
            try:
                self._on_acquire(self)
            except BaseException:
                self.release()
                raise
        return self

    def _try_once(self) -> LockInfo | None:
        now = time.time()
        for lock in read_locks(self.storage):
            if lock.is_stale(now):
                self.storage.delete(lock.name)
        self._created = time.time()
        self.storage.write(self.name, self._doc(), durable=True, exclusive=True)
        try:
            for lock in read_locks(self.storage):
                if lock.name == self.name or lock.is_stale(time.time()):
                    continue
                if self.exclusive or lock.exclusive:
                    self.storage.delete(self.name)
                    return lock
        except BaseException:
            # Never leave this lock file behind when the check itself failed: it would name a live
            # process and block every other locker until this one exits.
            try:
                self.storage.delete(self.name)
            except Exception as e:
                raise LockedError(f"repository {self.storage.url}: could not take a lock, and the lock file "
                                  f"{self.name} could not be removed ({e}); run 'drsync repo unlock'") from e
            raise
        return None

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self.storage.write(self.name, self._doc(), durable=True)
            except Exception:  # a failed refresh is retried; staleness takes 30 minutes
                continue

    def release(self) -> None:
        if self.held and self._on_release is not None:
            self._on_release(self)
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.storage.delete(self.name)

    def __enter__(self) -> RepositoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_locks(storage: Storage, *, all_locks: bool = False) -> list[LockInfo]:
    """Remove stale locks (or every lock with ``all_locks``); returns what was removed."""
    removed = []
    now = time.time()
    for lock in read_locks(storage, oversized_ok=all_locks):
        if all_locks or lock.is_stale(now):
            storage.delete(lock.name)
            removed.append(lock)
    return removed
