"""Host-level exclusivity: one agent per state directory, per data root and per repository.

Each is a flock on a small file (released by the kernel when the process dies, so a crash
never leaves a stale lock); the file names the holder for the refusal message. A lock file in the host
lock directory is removed when its agent releases it.

The host lock directory is not always shared (a systemd unit's PrivateTmp, a container, another
DRSYNC_LOCK_DIR), so an agent also flocks the local data root and repository directories themselves: the
lock follows the directory's inode across bind mounts and mount namespaces, and nothing is written there.
Other drsync commands flock such a directory only to apply onto it (drsync.flocks.ApplyLock), which a
restore refuses onto a running agent's root anyway; the others run beside the agent.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat

from drsync.errors import OperationFailed
from drsync.flocks import (
    ApplyLock,
    exclusive_lock,
    flock_above,
    flock_directory,
    host_lock_dir,
    line,
    release_lock_file,
    unline,
)
from drsync.fsutil import lies_within, local_or_none
from drsync.text import printable


class DirectoryLock:
    """A flock on a local directory itself (its inode: bind mounts and private lock directories see the
    same lock), exclusive, and shared ones on each directory above it; nothing is written into them. An
    apply (drsync.flocks.ApplyLock) takes the same flocks on its target, so an agent is not started on a
    directory a restore is writing to, inside it or around it, nor a restore made onto or inside a
    running agent's directory."""

    def __init__(self, what: str, path: str) -> None:
        self.fds: list[int] = []
        self.path = os.path.realpath(path)
        if not os.path.isdir(self.path):
            return  # not created yet (a standby's root before its first apply): the host lock file still holds
        def anyone(pid: str) -> bool:
            return True

        def others(pid: str) -> bool:  # this agent's repository inside its own data root is not in the way
            return pid != str(os.getpid())

        fds, blocked = flock_above(self.path, others)
        self.fds = fds
        fd, pid = (None, "") if blocked else flock_directory(self.path, fcntl.LOCK_EX, anyone)
        if blocked or pid:
            self.release()
            where, pid = blocked or (self.path, pid)
            shown = "" if pid == "?" else f" (pid {pid})"
            if where != self.path:
                raise OperationFailed(
                    f"another drsync process{shown} holds {where}, a directory above {what} {self.path} (a restore "
                    f"writing to it, or an agent serving it): stop it, or point this config elsewhere") from None
            raise OperationFailed(
                f"another drsync agent{shown} already serves {what} {self.path}, or a restore is writing to it or "
                f"inside it (it holds the lock on the directory itself, seen through any mount or lock directory): "
                f"two agents must never share a data root or repository; stop it, or point this config at its own"
            ) from None
        if fd is not None:
            self.fds.append(fd)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class HostLock:
    """One running agent per data root and per repository on this host (a lock file named after the
    resolved location in /run/lock; nothing is written into production's data root). A location
    inside or around one another running agent serves (with another state directory) is refused
    too: an apply onto a root nested in production's would write over part of production."""

    def __init__(self, what: str, location: str, state_dir: str) -> None:
        key = location if "://" in location else os.path.realpath(location)
        lock_dir = host_lock_dir()
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]  # any path's bytes
        self.path = os.path.join(lock_dir, f"drsync-{digest}.lock")
        try:
            self.fd = exclusive_lock(self.path, 0o666, f"{os.getpid()}\n{line(state_dir)}\n{what}\n{line(key)}\n",
                                      lambda held: (
                f"another drsync agent (pid {held[0]}, state directory {held[1]}) already serves {what} {key}: two "
                f"agents must never share a data root or repository; stop it, or point this config at its own"))
        except PermissionError as e:
            raise OperationFailed(f"cannot open the host lock {self.path} for {what} {key} ({e.strerror}); "
                                  f"another user's agent may serve it, or set DRSYNC_LOCK_DIR to a writable "
                                  f"directory") from None
        self.dir_lock: DirectoryLock | None = None
        try:
            self._refuse_nested(lock_dir, what, key, state_dir)
            local = local_or_none(location)
            if local is not None:
                self.dir_lock = DirectoryLock(what, local)
        except BaseException:
            self.release()
            raise

    @classmethod
    def take_all(cls, locations: list[tuple[str, str]], state_dir: str) -> list[HostLock]:
        """A lock per (what, location); when one is refused, those already taken are released (their
        lock files removed) before the refusal goes on."""
        taken: list[HostLock] = []
        try:
            for what, where in locations:
                taken.append(cls(what, where, state_dir))
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return taken

    def _refuse_nested(self, lock_dir: str, what: str, key: str, state_dir: str) -> None:
        for name in sorted(os.listdir(lock_dir)):
            path = os.path.join(lock_dir, name)
            if not (name.startswith("drsync-") and name.endswith(".lock")) or path == self.path \
                    or name.startswith(ApplyLock.PREFIX):  # an apply's: its own apply lock refuses overlaps
                continue
            try:  # a link or a fifo someone put there is neither followed nor waited on
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    # Nobody holds it: a lock file left by an agent that stopped (older agents never removed
                    # theirs). Removed while locked here, if the name is still this file's: an agent that opened
                    # it meanwhile finds its path gone once it holds the flock, and locks a new file.
                    try:
                        held, named = os.fstat(fd), os.stat(path)
                        if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                            os.unlink(path)
                    except OSError:
                        pass  # another user's file in a shared lock directory: left as it is
                    continue
                except BlockingIOError:
                    pass
                lines = os.pread(fd, 8192, 0).decode("utf-8", "surrogateescape").split("\n")
            finally:
                os.close(fd)
            if len(lines) < 4 or not lines[3] or os.path.realpath(unline(lines[1])) == os.path.realpath(state_dir):
                continue  # an older agent's lock (no location), or this agent's own other lock
            other_what, other = lines[2], unline(lines[3])
            # by device and inode up each local path: a bind mount or symlink of the other counts
            inside = lies_within(key, other)
            if inside or lies_within(other, key):
                where = "inside" if inside else "around"
                raise OperationFailed(
                    f"{what} {key} lies {where} {other_what} {other}, which another drsync agent (pid {lines[0]}, "
                    f"state directory {lines[1]}) serves: two agents must never share a data root or repository, "
                    f"nor one inside the other; point this config at a location of its own")
        busy = ApplyLock.overlapping(key, lock_dir)
        if busy:
            raise OperationFailed(f"{what} {printable(key)}: {busy}; wait for it to finish (or stop it), then start "
                                  f"the agent")

    def release(self) -> None:
        """Unlink the lock file while the flock is still held (whoever opened it meanwhile finds that the
        path no longer names the file it locked, and takes the lock again on a new one), then close it."""
        if self.dir_lock is not None:
            self.dir_lock.release()
            self.dir_lock = None
        if self.fd >= 0:
            release_lock_file(self.fd, self.path)
            self.fd = -1


class StateDirLock:
    """One agent per state directory: a second one would share its epoch and its apply journal."""

    def __init__(self, state_dir: str, listen: str = "", data_root: str = "") -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.pid")
        # The holder's pid and agent.listen: config check tells the running agent of a config from another;
        # and its data root: a restore given only --repo tells the running agent's root from another.
        self.fd = exclusive_lock(self.path, 0o644, f"{os.getpid()}\n{line(listen)}\n{line(data_root)}\n", lambda held: (
            f"another drsync agent (pid {held[0]}) is running with state directory {state_dir}; stop it first"))
        from drsync.agent import registry  # it reads these locks

        self.announced = registry.announce(state_dir) if data_root else ""

    @staticmethod
    def holder(state_dir: str) -> tuple[str, str] | None:
        """(pid, agent.listen) of the running agent holding this state directory; None when none does
        (the listen address is "" for an agent of an older drsync)."""
        lines = StateDirLock.record(state_dir)
        if lines is None:
            return None
        return (lines[0].strip() or "?") if lines else "?", (lines[1].strip() if len(lines) > 1 else "")

    @staticmethod
    def data_root(state_dir: str) -> str:
        """The data root of the running agent holding this state directory ("" when none runs, or an agent of
        an older drsync does)."""
        lines = StateDirLock.record(state_dir)
        return unline(lines[2].strip()) if lines is not None and len(lines) > 2 else ""

    @staticmethod
    def held(state_dir: str) -> bool:
        """Whether a running agent holds this state directory (for the command line)."""
        return StateDirLock.record(state_dir) is not None

    @staticmethod
    def record(state_dir: str) -> list[str] | None:
        """The lines of ``agent.pid`` (pid, agent.listen, data root) while a running agent holds it; None when
        none does. Only a regular file counts, opened without following a link or waiting (a fifo or
        device planted there never hangs the caller); [] when it cannot be read."""
        try:
            fd = os.open(os.path.join(state_dir, "agent.pid"), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it
            except BlockingIOError:
                pass
            try:
                return os.read(fd, 8192).decode("utf-8", "replace").split("\n")
            except OSError:
                return []
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.announced:
            from drsync.agent import registry

            registry.retract(self.announced)
            self.announced = ""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
