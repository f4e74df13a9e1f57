"""Flocks on this host: the primitives of drsync's exclusivity, and one apply at a time per target.

A flock ends with its process, so a crash (kill -9, power loss) never leaves a stale lock; a lock file
names its holder for the refusal message, and is removed by the holder that releases it. Lock files live
in the host lock directory (``$DRSYNC_LOCK_DIR``, else ``/run/lock``, else the temporary directory).
:mod:`drsync.agent.locks` builds the agent's locks on these; :class:`ApplyLock` is the apply's.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Callable

from drsync.errors import LockedError, OperationFailed
from drsync.fsutil import lies_within, local_or_none
from drsync.text import printable

# How long (seconds) an apply finding its lock file flocked waits for it to be a leftover being cleared
# (:func:`_flock_soon`) before it is refused: a clearer holds it for two system calls.
CLEARING_GRACE_S = 0.25


def host_lock_dir() -> str:
    """The directory drsync's host lock files live in (a writable one)."""
    for d in (os.environ.get("DRSYNC_LOCK_DIR", ""), "/run/lock", tempfile.gettempdir()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def exclusive_lock(path: str, mode: int, holder: str, refusal: Callable[[list[str]], str], *,
                   own: bool = False) -> int:
    """Open ``path`` and take its flock without waiting, then write ``holder`` into it; the descriptor
    keeps the lock. LockedError with ``refusal(lines the current holder wrote)`` when it is held.
    The file may be unlinked by a holder releasing it (:func:`release_lock_file`): the lock counts only
    when ``path`` still names the locked file once it is held, else it is taken again on the new file.

    In a lock directory every user can write, a name can be planted: a symlink is never followed (root would
    write into what it names), and anything but a regular file (``own``: one this user owns) is refused with
    OperationFailed naming it, as is a lock that cannot be written (a full lock directory)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO):
                raise
            raise OperationFailed(f"the host lock {path} is not a regular file (a link or a device someone put "
                                  f"there); remove it, or set DRSYNC_LOCK_DIR to a directory of your own") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (own and st.st_uid != os.geteuid()):
                raise OperationFailed(
                    f"the host lock {path} is not a regular file of this user's (uid {st.st_uid} made it); "
                    f"remove it, or set DRSYNC_LOCK_DIR to a directory of your own")
            if not _flock_soon(fd, path):
                if not _names(path, fd):  # unlinked while held: by a release, or a look clearing it
                    os.close(fd)
                    continue
                raise BlockingIOError
        except BlockingIOError:
            lines = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
            pid = flock_holder(os.fstat(fd))
            os.close(fd)
            if pid and (not lines or not lines[0].strip()):
                lines = [pid]  # taken a moment ago, its holder's lines not written yet
            raise LockedError(refusal([*(line.strip() or "?" for line in lines), "?", "?"])) from None
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        os.close(fd)  # unlinked (or replaced) by its holder's release between our open and our flock
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8", "surrogateescape"), 0)  # a path's bytes as they are
    except OSError as e:
        release_lock_file(fd, path)
        raise OperationFailed(f"cannot write the host lock {path} ({e.strerror}); free space in "
                              f"{os.path.dirname(path)}, or set DRSYNC_LOCK_DIR to another directory") from None
    return fd


def _flock_soon(fd: int, path: str, grace_s: float = CLEARING_GRACE_S) -> bool:
    """Take ``fd``'s exclusive flock without waiting, or within ``grace_s`` seconds while ``path`` still names
    that file: a look clearing a leftover lock file (:func:`_clear_leftover`) holds its flock for an instant
    before it unlinks it, and an apply must not be refused for that (breaker s65: 32 refusals in 7,700 tries
    under a steady stream of leftovers). A lock really held is refused after the grace."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline or not _names(path, fd):
                return False
            time.sleep(0.002)  # the clearer's unlink is a system call away


def line(text: str) -> str:
    """``text`` as one line of a lock file (a backslash and a newline escaped): :func:`unline` undoes it."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def unline(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


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


Holders = dict[tuple[int, int, int], tuple[str, bool]]


def flock_holders() -> Holders:
    """Every flock on this host: (major, minor, inode) -> (the pid holding it, whether exclusively), from
    /proc/locks (read without taking any lock: looking never gets in the way of another's flock)."""
    out: Holders = {}
    try:  # bytes: no codec is looked up (a process that dropped to another user may not reach the encodings)
        with open("/proc/locks", "rb") as f:
            for row in f:
                parts = row.split()
                if len(parts) > 5 and parts[1] == b"FLOCK":
                    dev = parts[5].split(b":")
                    if len(dev) == 3:
                        try:
                            key = (int(dev[0], 16), int(dev[1], 16), int(dev[2]))
                        except ValueError:
                            continue
                        out.setdefault(key, (parts[4].decode(), parts[3] == b"WRITE"))
    except OSError:
        pass
    return out


def flock_holder(st: os.stat_result, holders: Holders | None = None) -> str:
    """The pid holding a flock on the file ``st`` describes ("" when none is found)."""
    return _held(st, flock_holders() if holders is None else holders)[0]


def _held(st: os.stat_result, holders: Holders) -> tuple[str, bool]:
    return holders.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), ("", False))


def _open_same(path: str, st: os.stat_result) -> int | None:
    """A read-only descriptor of ``path`` if it still names the file ``st`` describes (never through a link),
    else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        held = os.fstat(fd)
    except OSError:
        held = None
    if held is None or (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        return None
    return fd


def _clear_leftover(path: str, st: os.stat_result) -> None:
    """Remove the lock file ``path`` (``st``: what a look found there, held by no process) if no process
    holds it still: its flock taken without waiting, and unlinked only while the name is still that file."""
    fd = _open_same(path, st)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _names(path, fd):
            os.unlink(path)
    except OSError:
        pass  # held after all (taken since the look), or gone: left as it is
    finally:
        os.close(fd)


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError):
        return None


def _counts(pid: str) -> bool:
    """Whether a flock held by ``pid`` stands in this process's way: not when it is this process's own (an
    agent's drill restoring beside its data root), nor another user's (other than root's), which anybody who
    can read a directory could take to stop every apply."""
    if not pid or pid == str(os.getpid()):
        return not pid
    uid = _uid_of(pid)
    return uid is None or uid in (0, os.geteuid())


def flock_directory(path: str, how: int, counts: Callable[[str], bool] = _counts) -> tuple[int | None, str]:
    """A flock ``how`` (LOCK_EX or LOCK_SH) on directory ``path``, without waiting: (its descriptor, "");
    (None, "") when it cannot be opened (not there, not a directory, not readable) or only a holder that does
    not ``count`` has it; (None, the holder's pid) when one that counts does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None, ""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return fd, ""
    except BlockingIOError:
        pid = flock_holder(os.fstat(fd))
        os.close(fd)
        return None, (pid or "?") if counts(pid) else ""
    except BaseException:
        os.close(fd)
        raise


def flock_above(path: str, counts: Callable[[str], bool] = _counts) -> tuple[list[int], tuple[str, str] | None]:
    """Shared flocks on every existing directory above local ``path``, up to /: (their descriptors, None), or
    (those taken, (the directory, the pid) of the first held exclusively by a holder that counts)."""
    fds: list[int] = []
    parent = os.path.dirname(path)
    while parent != path:
        fd, pid = flock_directory(parent, fcntl.LOCK_SH, counts)
        if pid:
            return fds, (parent, pid)
        if fd is not None:
            fds.append(fd)
        path, parent = parent, os.path.dirname(parent)
    return fds, None


def _holds(path: str, target: str, pid: str) -> str:
    """The words for another process (``pid``, "?" unknown) holding a flock on ``path``, at or above ``target``."""
    around = "" if path == target else " (a directory above the target)"
    return (f"another drsync process{f' (pid {pid})' if pid != '?' else ''} holds {printable(path)}{around} (a "
            f"running agent serving it or a directory in it as its data root, or an apply onto it, inside it or "
            f"around it)")


class ApplyBusy(LockedError):
    """Another apply holds the target (:class:`ApplyLock`); ``holder`` says which, in words."""

    def __init__(self, what: str, holder: str) -> None:
        super().__init__(f"{what}: {holder}; wait for it to finish (or stop it) and run again; nothing was changed")
        self.holder = holder


class ApplyLock:
    """One apply at a time onto a target, or onto anything inside or around it, on this host.

    Two applies onto one target would empty each other's staging area and leave a target that matches
    neither snapshot (safety rule 2). An apply (restore, backup restore, drill, a standby's) takes:

    - a lock file in the host lock directory, named by this user and the target's location and holding
      ``pid``, ``what`` (e.g. "snapshot 20261206T...") and the location (:func:`line` escapes them); a
      held one of this user's or root's whose location lies inside or around this one (compared by device
      and inode, so a bind mount or symlink of it counts; HDFS URLs by path on one authority) refuses this
      one too;
    - on a local target (``directory=True``), flocks on the directories themselves, seen through any mount
      or lock directory: exclusive on the target (once it exists: :meth:`hold_directory`), shared on each
      directory above it. An apply inside or around another one's target meets its exclusive flock; so
      does one onto a running agent's data root, or inside it (the agent holds the same flocks:
      :class:`drsync.agent.locks.DirectoryLock`), and an agent started on a target being applied to.

    Refusals are :class:`ApplyBusy` (a LockedError: exit 1, nothing changed): the other apply is named, the
    operator waits for it or stops it. Looking at others' locks takes none (/proc/locks says who holds
    what), so a look never refuses another apply. Two applies of one user onto one location contend on one
    file; overlapping ones each look for the other after taking their own, so at least one is refused (both,
    when they start together). Flocks and lock files of this process (an agent's drill beside its own root)
    and of other users but root (anyone who can read a directory can flock it) are not in the way.
    Applies from other hosts onto one HDFS root meet the root's lease (:mod:`drsync.dataroot.hdfs_lease`).
    Not covered: a target reached through a bind mount of a directory below another apply's target, in a
    lock directory that apply does not share.
    """

    PREFIX = "drsync-apply-"

    def __init__(self, location: str, what: str, *, directory: bool = True) -> None:
        local = local_or_none(location)
        self.location = os.path.realpath(local) if local is not None else location
        self.what = what
        self.directory = directory and local is not None
        self.fd = -1
        self.dir_fds: list[int] = []
        self.held_target = False
        lock_dir = host_lock_dir()
        key = hashlib.sha256(self.location.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.path = os.path.join(lock_dir, f"{self.PREFIX}{os.geteuid()}-{key}.lock")
        shown = printable(self.location)
        try:
            self.fd = exclusive_lock(self.path, 0o644, f"{os.getpid()}\n{line(what)}\n{line(self.location)}\n",
                                     lambda held: f"another drsync apply ({held[1]}, pid {held[0]}) is writing to "
                                                  f"{shown}", own=True)
        except LockedError as e:
            raise ApplyBusy(what, str(e)) from None
        except PermissionError as e:
            raise OperationFailed(f"{what}: cannot open the host lock {self.path} for {shown} ({e.strerror}); set "
                                  f"DRSYNC_LOCK_DIR to a writable directory; nothing was changed") from None
        try:
            busy = self.overlapping(self.location, lock_dir, mine=self.path, clear_leftovers=True)
            if busy:
                raise ApplyBusy(what, busy)
            if self.directory:
                self._lock_above()
                self.hold_directory()
        except BaseException:
            self.release()
            raise

    @classmethod
    def overlapping(cls, location: str, lock_dir: str | None = None, mine: str = "",
                    holders: Holders | None = None, *, clear_leftovers: bool = False) -> str | None:
        """Why another apply's held lock file is in the way of ``location`` (its words), or None. Takes no lock
        but, with ``clear_leftovers`` (an apply that holds its own), those of leftover lock files of this user.

        A lock file no process holds (left by an apply that was killed) is passed over by its inode alone,
        without opening it; with ``clear_leftovers`` it is removed, as its holder's release would have (its
        flock taken, the name checked to still be that file, unlinked while held): leftovers do not pile up,
        and with them the cost of every apply's look. An apply opening that file at that moment finds it
        unlinked and takes its lock on a new one (:func:`exclusive_lock`)."""
        lock_dir = lock_dir or host_lock_dir()
        holders = flock_holders() if holders is None else holders
        try:
            names = sorted(os.listdir(lock_dir))
        except OSError:
            return None
        me = os.geteuid()
        for name in names:
            path = os.path.join(lock_dir, name)
            if not (name.startswith(cls.PREFIX) and name.endswith(".lock")) or path == mine:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, me):
                continue  # not a lock, or someone else's (anyone can write one)
            pid = flock_holder(st, holders)
            if not pid:
                if clear_leftovers and st.st_uid == me:
                    _clear_leftover(path, st)
                continue
            if pid == str(os.getpid()):
                continue  # this process's own
            fd = _open_same(path, st)
            if fd is None:
                continue  # gone, or released and made anew since the look: its new holder looks for this apply
            try:
                lines = os.pread(fd, 8192, 0).decode("utf-8", "surrogateescape").split("\n")
            except OSError:
                continue
            finally:
                os.close(fd)
            if len(lines) < 3 or not lines[2]:
                continue
            other = unline(lines[2])
            inside, around = lies_within(location, other), lies_within(other, location)
            if inside or around:
                who = f"another drsync apply ({printable(unline(lines[1]))}, pid {pid})"
                if inside and around:
                    return f"{who} is writing to {printable(other)}"
                return (f"{printable(location)} {'lies inside' if inside else 'holds'} {printable(other)}, which "
                        f"{who} is writing to")
        return None

    @classmethod
    def probe(cls, location: str) -> str | None:
        """Why an apply onto ``location`` would be refused now (another apply's words), or None: what a dry run
        says. Takes no lock, so a look never refuses a real apply starting at that moment."""
        local = local_or_none(location)
        location = os.path.realpath(local) if local is not None else location
        holders = flock_holders()
        busy = cls.overlapping(location, holders=holders)
        if busy or local is None:
            return busy
        path = location
        while True:
            try:
                pid, exclusive = _held(os.stat(path), holders)
            except OSError:
                pid, exclusive = "", False
            # the target held any way (an apply inside it holds it shared), a directory above it exclusively
            if pid and (exclusive or path == location) and _counts(pid):
                return _holds(path, location, pid)
            up = os.path.dirname(path)
            if up == path:
                return None
            path = up

    def _busy(self, path: str, pid: str) -> ApplyBusy:
        return ApplyBusy(self.what, _holds(path, self.location, pid))

    def _lock_above(self) -> None:
        """Shared flocks on every existing directory above the target, up to /."""
        fds, blocked = flock_above(self.location)
        self.dir_fds += fds
        if blocked is not None:
            raise self._busy(*blocked)

    def hold_directory(self) -> None:
        """The exclusive flock on the local target directory itself, when it exists and is not held yet (an
        apply that makes its target calls this again once it has). ApplyBusy when a process holds it."""
        if not self.directory or self.held_target:
            return
        fd, pid = flock_directory(self.location, fcntl.LOCK_EX)
        if pid:
            raise self._busy(self.location, pid)
        if fd is not None:
            self.dir_fds.append(fd)
            self.held_target = True

    def release(self) -> None:
        for fd in self.dir_fds:
            os.close(fd)
        self.dir_fds = []
        self.held_target = False
        if self.fd >= 0:
            release_lock_file(self.fd, self.path)
            self.fd = -1

    def __enter__(self) -> ApplyLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
