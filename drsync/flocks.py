"""Flocks on this host: the primitives of drsync's exclusivity, and one apply at a time per target.

A flock ends with its process, so a crash (kill -9, power loss) never leaves a stale lock; a lock file
names its holder for the refusal message, and is removed by the holder that releases it. Lock files live
in the host lock directory (``$DRSYNC_LOCK_DIR``, else ``/run/lock``, else the temporary directory).
:mod:`drsync.agent.locks` builds the agent's locks on these; :class:`ApplyLock` is the apply's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable

from drsync.errors import LockedError, OperationFailed
from drsync.fsutil import lies_within, local_or_none
from drsync.text import printable


def host_lock_dir() -> str:
    """The directory drsync's host lock files live in (a writable one)."""
    for d in (os.environ.get("DRSYNC_LOCK_DIR", ""), "/run/lock", tempfile.gettempdir()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def exclusive_lock(path: str, mode: int, holder: str, refusal: Callable[[list[str]], str]) -> int:
    """Open ``path`` and take its flock without waiting, then write ``holder`` into it; the descriptor
    keeps the lock. LockedError with ``refusal(lines the current holder wrote)`` when it is held.
    The file may be unlinked by a holder releasing it (:func:`release_lock_file`): the lock counts only
    when ``path`` still names the locked file once it is held, else it is taken again on the new file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
            os.close(fd)
            raise LockedError(refusal([*(line.strip() or "?" for line in lines), "?", "?"])) from None
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        os.close(fd)  # unlinked (or replaced) by its holder's release between our open and our flock
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode("utf-8", "surrogateescape"), 0)  # a path's bytes as they are
    return fd


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` names the file open as ``fd``."""
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def release_lock_file(fd: int, path: str) -> None:
    """Unlink the lock file while its flock is still held (whoever opened it meanwhile finds that the path
    no longer names the file it locked, and takes the lock again on a new one), then close it."""
    try:
        if _names(path, fd):
            os.unlink(path)
    except OSError:
        pass  # gone already, or a lock directory this user cannot write: the flock still ends below
    os.close(fd)


def flock_holder(st: os.stat_result) -> str:
    """The pid holding a flock on the file ``st`` describes, from /proc/locks ("" when not found)."""
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == inode:
                    return parts[4]
    except OSError:
        pass
    return ""


def held_lines(path: str) -> list[str] | None:
    """The lines a held lock file's holder wrote; None when nobody holds it (or it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        return os.pread(fd, 8192, 0).decode("utf-8", "surrogateescape").split("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


class ApplyBusy(LockedError):
    """Another apply holds the target (:class:`ApplyLock`); ``holder`` says which, in words."""

    def __init__(self, what: str, holder: str) -> None:
        super().__init__(f"{what}: {holder}; wait for it to finish (or stop it) and run again; nothing was changed")
        self.holder = holder


class ApplyLock:
    """One apply at a time onto a target, or onto anything inside or around it, on this host.

    Two applies onto one target would empty each other's staging area and leave a target that matches
    neither snapshot (safety rule 2). An apply (restore, backup restore, drill, a standby's) takes:

    - a lock file in the host lock directory, named by this user and the target's location and
      holding ``pid``, ``what`` (e.g. "snapshot 20261206T...") and the location; a held one of another
      apply whose location lies inside or around this one (compared by device and inode, so a bind mount or
      symlink of it counts; HDFS URLs by path on one authority) refuses this one too;
    - on a local target, a flock on the target directory itself (``directory=True``, once it exists: see
      :meth:`hold_directory`), seen through any mount or lock directory; a running agent holds the same
      flock on its data root, so an apply onto it from outside the agent is refused too.

    Refusals are :class:`ApplyBusy` (a LockedError: exit 1, nothing changed): the other apply is named, the
    operator waits for it or stops it. Two applies of one user onto one location contend on one file;
    overlapping ones each look for the other after taking their own, so at least one is refused (both, when
    they start together).
    Not covered: applies from other hosts onto one HDFS path, and hosts or containers that do not share the
    lock directory (local targets there are still covered by the directory's flock, when the same one).
    """

    PREFIX = "drsync-apply-"

    def __init__(self, location: str, what: str, *, directory: bool = True) -> None:
        local = local_or_none(location)
        self.location = os.path.realpath(local) if local is not None else location
        self.what = what
        self.fd = -1
        self.dir_fd = -1
        lock_dir = host_lock_dir()
        key = hashlib.sha256(self.location.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.path = os.path.join(lock_dir, f"{self.PREFIX}{os.getuid()}-{key}.lock")
        shown = printable(self.location)
        try:
            self.fd = exclusive_lock(self.path, 0o644, f"{os.getpid()}\n{what}\n{self.location}\n", lambda held: (
                f"another drsync apply ({held[1]}, pid {held[0]}) is writing to {shown}"))
        except LockedError as e:
            raise ApplyBusy(what, str(e)) from None
        except PermissionError as e:
            raise OperationFailed(f"{what}: cannot open the host lock {self.path} for {shown} ({e.strerror}); set "
                                  f"DRSYNC_LOCK_DIR to a writable directory; nothing was changed") from None
        try:
            self._refuse_overlapping(lock_dir)
            if directory and local is not None:
                self.hold_directory()
        except BaseException:
            self.release()
            raise

    def _refuse_overlapping(self, lock_dir: str) -> None:
        for name in sorted(os.listdir(lock_dir)):
            path = os.path.join(lock_dir, name)
            if not (name.startswith(self.PREFIX) and name.endswith(".lock")) or path == self.path:
                continue
            lines = held_lines(path)
            if lines is None or len(lines) < 3 or not lines[2]:
                continue
            other = lines[2]
            inside = lies_within(self.location, other)
            if inside or lies_within(other, self.location):
                raise ApplyBusy(self.what, (
                    f"{printable(self.location)} {'lies inside' if inside else 'holds'} {printable(other)}, which "
                    f"another drsync apply ({lines[1]}, pid {lines[0]}) is writing to"))

    def hold_directory(self) -> None:
        """Flock the local target directory itself, when it exists and is not held yet (an apply that makes its
        target calls this again once it has). LockedError when another process holds it."""
        local = local_or_none(self.location)
        if self.dir_fd >= 0 or local is None:
            return
        try:
            fd = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # not there yet, or not a directory: the apply says what is wrong with it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = flock_holder(os.fstat(fd))
            os.close(fd)
            raise ApplyBusy(self.what, (
                f"another drsync process{f' (pid {pid})' if pid else ''} holds {printable(local)} (a running agent "
                f"serving it as its data root, or an apply onto it through another path or lock directory)")) from None
        except BaseException:
            os.close(fd)
            raise
        self.dir_fd = fd

    def release(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
        if self.fd >= 0:
            release_lock_file(self.fd, self.path)
            self.fd = -1

    def __enter__(self) -> ApplyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
