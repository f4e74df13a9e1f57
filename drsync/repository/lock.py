"""Repository locks, restic style: one small file per holder under ``locks/``.

Shared locks (snapshot create, restore, verify) may coexist; an exclusive lock
(delete, garbage collection) excludes everyone. A lock is stale when its
process is gone (judged only from the same host and pid namespace:
:mod:`drsync.liveness`), when it is this very process's and none of its
operations holds it (a release that could not delete the file), or when it
has not been refreshed for ``STALE_AFTER``; stale locks are removed by the next
locker, so a crash never wedges a repository. Holders refresh their lock in the
background; a holder whose lock file another process removed (it was paused for
longer than ``STALE_AFTER``, or the clocks disagree) never writes it back: the
lock is *lost*, and :meth:`RepositoryLock.verify` (called before a snapshot is
committed) refuses to go on.

``DRSYNC_LOCK_WAIT`` (seconds, 0 or more; default 30) is how long a command
waits for a conflicting lock; a value that is not such a number is refused
(:func:`environment_problem`, checked by the CLI before any command runs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drsync import documents
from drsync.errors import IntegrityError, LockedError
from drsync.liveness import ProcessRef
from drsync.repository import format as fmt
from drsync.storage import ObjectMissing, Storage, read_bounded

log = logging.getLogger(__name__)

STALE_AFTER = 30 * 60.0
REFRESH_EVERY = 5 * 60.0
_DEFAULT_WAIT = 30.0
_SECONDS_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_LATEST = 1e11  # seconds since 1970 (year 5138): a lock time past it is not a time


def _wait_from_environment() -> tuple[float, str | None]:
    raw = os.environ.get("DRSYNC_LOCK_WAIT")
    if raw is None:
        return _DEFAULT_WAIT, None
    # Plain decimal seconds only: Python's float() would also take '1_0', ' 5 ', '1e3' or Unicode digits.
    value = float(raw) if _SECONDS_RE.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        return _DEFAULT_WAIT, (f"DRSYNC_LOCK_WAIT={raw!r} is not a number of seconds (0 or more) to wait for a "
                               f"repository lock: set it to one, e.g. 30, or unset it")
    return value, None


# How long a command waits for a conflicting lock before giving up (DRSYNC_LOCK_WAIT seconds).
DEFAULT_WAIT_S, _ENV_PROBLEM = _wait_from_environment()


def environment_problem() -> str | None:
    """What is wrong with ``DRSYNC_LOCK_WAIT`` (one line for the operator), None when nothing."""
    return _ENV_PROBLEM


# The lock files this process holds now (their names): a lock file of this process that is not
# among them is left over from a release that could not delete it, and is stale.
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def _seconds(value: object, fallback: float | None) -> float | None:
    """A Unix time from a lock document; ``fallback`` when it is none (NaN, out of range, a string)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return fallback
    return v if math.isfinite(v) and 0 <= v <= _LATEST else fallback


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    exclusive: bool
    command: str
    created: float | None
    refreshed: float
    start: str | None
    pidns: str | None = None
    readable: bool = True
    mtime: float = 0.0  # when the file was last written, by the storage's clock

    @property
    def holder(self) -> ProcessRef:
        return ProcessRef(self.host, self.pid, self.start, self.pidns)

    def describe(self) -> str:
        if not self.readable:
            return f"{self.command} {self.name}"
        kind = "exclusive" if self.exclusive else "shared"
        since = ("an unknown time" if self.created is None else
                 time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.created)))
        return f"{kind} lock by pid {self.pid} on {self.host} ({self.command}) since {since}"

    def held_here(self) -> bool:
        """True when an operation of this very process holds the lock now."""
        with _HELD_LOCK:
            if self.name not in _HELD:
                return False
        return self.holder.is_current()

    def is_stale(self, now: float) -> bool:
        # Not written for STALE_AFTER: by the storage's clock, and by the writer's own when it is not
        # ahead of this one (a clock ahead would keep a crashed host's lock for as long).
        last = max(self.mtime, self.refreshed) if self.refreshed <= now + 60 else self.mtime
        if now - last > STALE_AFTER:
            return True
        if not self.readable:
            return False
        if self.holder.is_current():
            return not self.held_here()
        return not self.holder.alive()


def read_locks(storage: Storage, *, oversized_ok: bool = False) -> list[LockInfo]:
    """Every lock file. One larger than any lock can be is not read: IntegrityError, unless
    ``oversized_ok`` (``repo unlock --all``), where it is listed as an unreadable lock."""
    out = []
    for obj in storage.list(fmt.LOCKS_DIR):
        if obj.size > fmt.SMALL_DOC_MAX_BYTES and oversized_ok:
            out.append(LockInfo(obj.name, "?", 0, True, "oversized lock file", obj.mtime, obj.mtime, None,
                                readable=False, mtime=obj.mtime))
            continue
        if obj.size > fmt.SMALL_DOC_MAX_BYTES:
            raise IntegrityError(f"lock file {storage.url}/{obj.name} is {obj.size} bytes, larger than a lock "
                                 f"can be ({fmt.SMALL_DOC_MAX_BYTES}; docs/FORMAT.md, Limits): it is damaged; "
                                 f"if no drsync runs on this repository, remove it with 'drsync repo unlock "
                                 f"--all'")
        try:
            doc = documents.loads(read_bounded(storage, obj.name, fmt.SMALL_DOC_MAX_BYTES, f"lock file {obj.name}"))
            pid, host, pidns = doc["pid"], doc["host"], doc.get("pidns")
            if (type(pid) is not int or pid < 0 or not isinstance(host, str)
                    or not (pidns is None or isinstance(pidns, str) or type(pidns) is int)):
                raise ValueError("not a host, pid and pid namespace")  # never written by drsync: damaged
            start = doc.get("start")
            out.append(LockInfo(obj.name, host, pid, bool(doc["exclusive"]), str(doc.get("command", "?")),
                                _seconds(doc.get("created"), None), _seconds(doc.get("refreshed"), obj.mtime) or 0.0,
                                start if isinstance(start, str) else None, None if pidns is None else str(pidns),
                                mtime=obj.mtime))
        except ObjectMissing:
            continue
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError, IntegrityError):
            # An unreadable lock file blocks as a fresh foreign lock would, for STALE_AFTER after
            # it was written; 'drsync repo unlock --all' removes it at once.
            out.append(LockInfo(obj.name, "?", 0, True, "unreadable lock file", obj.mtime, obj.mtime, None,
                                readable=False, mtime=obj.mtime))
    return out


def _conflict_message(url: str, conflict: LockInfo, own: bool) -> str:
    """``own``: the conflict was, when found, a lock an operation of this process held."""
    if not conflict.readable:
        return (f"repository {url} is locked: {conflict.describe()}; if no drsync process uses this "
                f"repository, remove it with 'drsync repo unlock --all'")
    if own:
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
        self.lost = False  # another process removed this lock's file while it was held
        self.name = f"{fmt.LOCKS_DIR}{secrets.token_hex(16)}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = 0.0
        self._owner = 0  # the pid that took it: a forked child holds nothing
        self._io = threading.Lock()  # a refresh write and the release never overlap

    def _doc(self) -> bytes:
        me = ProcessRef.current()
        return json.dumps({
            "host": me.host, "pid": me.pid, "start": me.start, "pidns": me.pidns,
            "exclusive": self.exclusive, "command": " ".join(os.path.basename(a) for a in sys.argv[:3]),
            "created": self._created, "refreshed": time.time(),
        }).encode()

    def acquire(self) -> RepositoryLock:
        if not math.isfinite(self.wait_s) or self.wait_s < 0:
            raise ValueError(f"lock wait {self.wait_s!r} is not a number of seconds")
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            found = self._try_once()
            if found is None:
                break
            if time.monotonic() >= deadline:
                raise LockedError(_conflict_message(self.storage.url, *found))
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # backoff between attempts
            delay = min(delay * 2, 1.0)
        self._stop.clear()
        self.lost = False
        self._owner = os.getpid()
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

    def _try_once(self) -> tuple[LockInfo, bool] | None:
        """One attempt: None when taken, else the conflicting lock and whether, when found, an
        operation of this process held it."""
        now = time.time()
        for lock in read_locks(self.storage):
            if lock.is_stale(now):
                self.storage.delete(lock.name)
        # A new name for every attempt: another thread that listed an earlier attempt's file and
        # judges it stale later deletes that name, never this attempt's file.
        self.name = f"{fmt.LOCKS_DIR}{secrets.token_hex(16)}.json"
        self._created = time.time()
        with _HELD_LOCK:  # before the file exists: a thread of this process must never find it stale
            _HELD.add(self.name)
        try:
            self.storage.write(self.name, self._doc(), durable=True, exclusive=True)
        except BaseException:
            self._forget()
            raise
        try:
            for lock in read_locks(self.storage):
                if lock.name == self.name or lock.is_stale(time.time()):
                    continue
                if self.exclusive or lock.exclusive:
                    own = lock.held_here()
                    self.storage.delete(self.name)
                    self._forget()
                    return lock, own
        except BaseException:
            # Never leave this lock file behind when the check itself failed: it would name a live
            # process and block every other locker until this one exits.
            try:
                self.storage.delete(self.name)
            except Exception as e:
                raise LockedError(f"repository {self.storage.url}: could not take a lock, and the lock file "
                                  f"{self.name} could not be removed ({e}); run 'drsync repo unlock'") from e
            finally:
                self._forget()  # a file left over is stale for this process, and for others once it exits
            raise
        return None

    def _forget(self) -> None:
        with _HELD_LOCK:
            _HELD.discard(self.name)

    def _refresh_loop(self) -> None:
        failing = False  # warned of the failures since the last refresh that worked
        while not self._stop.wait(REFRESH_EVERY):
            try:
                with self._io:
                    if self._stop.is_set():
                        return  # released meanwhile: writing now would bring the file back
                    # The file's time is its refresh (readers take the later of it and "refreshed"):
                    # touched, never rewritten, so a file another locker removed is never brought back.
                    self.storage.touch(self.name)
                if failing:
                    log.warning("repository %s: this process's lock %s is refreshed again", self.storage.url,
                                self.name)
                    failing = False
            except ObjectMissing:
                # Another locker judged it stale (or 'repo unlock --all') and may hold a conflicting
                # lock now. This operation is told at its next verify() and stops there.
                self.lost = True
                log.error("repository %s: this process's %s lock %s was removed by another process "
                          "(not refreshed for %d minutes: a paused process or a clock ahead); the "
                          "operation holding it stops before it commits; run it again",
                          self.storage.url, "exclusive" if self.exclusive else "shared", self.name,
                          STALE_AFTER // 60)
                return
            except Exception as e:  # a failed refresh (an I/O error) is retried; staleness takes 30 minutes
                if not failing:
                    log.warning("repository %s: could not refresh this process's lock %s (%s); retrying every "
                                "%gs (a lock not refreshed for %d minutes may be removed as stale)",
                                self.storage.url, self.name, str(e) or type(e).__name__, REFRESH_EVERY,
                                STALE_AFTER // 60)
                    failing = True

    def verify(self) -> None:
        """Check that this lock is still this operation's, before a commit or a deletion: LockedError when
        its file is gone (another process removed it as stale and may hold a conflicting lock now; run
        the operation again). Refreshes it (one ``touch``); an I/O error of the storage is raised as is."""
        if not self.held:
            return
        if not self.lost:
            with self._io:
                try:
                    self.storage.touch(self.name)
                except ObjectMissing:
                    self.lost = True
        if self.lost:
            raise LockedError(f"repository {self.storage.url}: the lock of this operation was removed by another "
                              f"process while it was held (not refreshed for {STALE_AFTER // 60:.0f} minutes: this "
                              f"process was paused, or a clock is ahead); it stopped there, committing or deleting "
                              f"nothing more: run it again")

    def release(self) -> None:
        if self.held and self._owner != os.getpid():
            self.held = False  # a forked child: the lock is its parent's, to keep and to release
            return
        if self.held and self._on_release is not None:
            self._on_release(self)
        self.held = False
        self._stop.set()
        with self._io:  # a refresh write under way ends first; none starts after
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.storage.delete(self.name)
        finally:
            self._forget()  # a file the delete left is stale from now on (no operation holds it)

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
