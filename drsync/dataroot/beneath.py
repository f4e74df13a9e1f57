"""File operations confined to one directory tree: nothing they do can land outside it.

Every path is relative to the root and slash-separated. Parents are reached by
opening one component at a time from the root's file descriptor with
``O_NOFOLLOW | O_DIRECTORY`` (the ``openat`` walk), and the last component is
acted on through its parent's descriptor with the no-follow variant of each
call. A symlink in the tree, absolute or relative, to a parent or in a chain,
is therefore never followed: where a directory is expected and a symlink is
found, the call fails with :class:`EscapeRefused` instead of writing through it.

Containment is a property of the real filesystem here, not of path strings.
Not thread-safe; an apply uses one instance from one thread (staging threads
use descriptors they were handed).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as st
from collections import OrderedDict
from collections.abc import Iterable

from drsync.fsutil import write_all

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE = 256  # directory descriptors kept open (an apply walks the tree in path order)


class EscapeRefused(OSError):
    """A path component is not a directory of the tree (a symlink, a file): drsync will not go through it."""


class Beneath:
    """Descriptor-relative, no-follow operations below ``root`` (which must be a directory)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- descriptors ------------------------------------------------------------------

    def dir_fd(self, rel: str) -> int:
        """The descriptor of directory ``rel`` (cached; do not close it)."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, _, name = rel.rpartition("/")
        _plain(name, rel)
        pfd = self.dir_fd(parent)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise EscapeRefused(errno.ENOTDIR, "not a directory of the target (a symlink or a file); "
                                    "drsync does not follow it", os.path.join(self.root, rel)) from None
            raise
        self._fds[rel] = fd
        if len(self._fds) > _CACHE:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget(self, rel: str) -> None:
        """Drop cached descriptors of ``rel`` and below (it was moved or removed)."""
        prefix = rel + "/"
        for k in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(k))

    def _at(self, rel: str) -> tuple[int, str]:
        parent, _, name = rel.rpartition("/")
        _plain(name, rel)
        return self.dir_fd(parent), name

    # --- queries ------------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry itself (a symlink is not followed); None when it does not exist."""
        try:
            pfd, name = self._at(rel)
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except EscapeRefused:
            return None  # a parent is not a directory: ``rel`` does not exist in the tree

    def readlink(self, rel: str) -> str:
        pfd, name = self._at(rel)
        return os.readlink(name, dir_fd=pfd)

    # --- changes ------------------------------------------------------------------------

    def rename(self, src: str, dst: str, *, directory: bool = True) -> None:
        """Atomically move ``src`` to ``dst`` (replacing a file or symlink there). ``directory=False``
        says ``src`` is not a directory, so no cached descriptor can lie below it (the hot path)."""
        sfd, sname = self._at(src)
        dfd, dname = self._at(dst)
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        if directory:
            self.forget(src)
            self.forget(dst)

    def mkdir(self, rel: str, mode: int = 0o700) -> None:
        pfd, name = self._at(rel)
        os.mkdir(name, mode, dir_fd=pfd)

    def link(self, existing: str, rel: str) -> None:
        """A hard link at ``rel`` to the file ``existing`` (neither followed if a symlink)."""
        sfd, sname = self._at(existing)
        dfd, dname = self._at(rel)
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def symlink(self, target: str, rel: str) -> None:
        pfd, name = self._at(rel)
        os.symlink(target, name, dir_fd=pfd)

    def unlink(self, rel: str) -> None:
        pfd, name = self._at(rel)
        os.unlink(name, dir_fd=pfd)

    def chmod(self, rel: str, mode: int) -> None:
        """Set the mode of a file or directory; a symlink (whose mode Linux ignores) is left alone."""
        pfd, name = self._at(rel)
        chmod_at(pfd, name, mode)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        pfd, name = self._at(rel)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def utime(self, rel: str, mtime_ns: int) -> None:
        pfd, name = self._at(rel)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def create(self, rel: str, mode: int = 0o600) -> int:
        """A new file opened for writing (fails when anything exists there); the caller closes it."""
        pfd, name = self._at(rel)
        return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                       dir_fd=pfd)

    def write_atomic(self, rel: str, data: bytes | Iterable[bytes]) -> None:
        """Replace ``rel`` with ``data`` (bytes, or pieces in turn) durably and atomically: a new file
        beside it, fsynced, renamed over it, then the directory fsynced."""
        parent = rel.rpartition("/")[0]
        tmp = f"{rel}.{secrets.token_hex(6)}"
        fd = self.create(tmp)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rename(tmp, rel, directory=False)
        os.fsync(self.dir_fd(parent))

    def open_read(self, rel: str) -> int:
        """An existing file opened for reading, never through a link; the caller closes it."""
        pfd, name = self._at(rel)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)

    def remove_tree(self, rel: str) -> None:
        """Remove ``rel`` and everything below it, never following a link; a directory we
        own but cannot read or write is opened up first. Missing is fine."""
        s = self.lstat(rel)
        if s is None:
            return
        pfd, name = self._at(rel)
        if st.S_ISDIR(s.st_mode):
            self.forget(rel)
            _remove_dir_contents(pfd, name)
            os.rmdir(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)


def _plain(name: str, rel: str) -> None:
    """A path component must name an entry of its directory: never '', '.' or '..' (which would
    leave the directory without any symlink being involved)."""
    if name in ("", ".", "..") or "\x00" in name:
        raise EscapeRefused(errno.EINVAL, "not a plain name below the target; drsync does not go there", rel)


def chmod_at(pfd: int, name: str, mode: int) -> None:
    """Set the mode of the entry ``name`` of directory ``pfd`` itself. fchmodat(2) follows a final symlink
    and cannot be told not to (before Linux 6.6), so a name swapped for a link between a check and the
    call would change a file anywhere: the entry is opened as it is (``O_PATH | O_NOFOLLOW``) and changed
    through that descriptor (``/proc/self/fd``, which names the inode opened, never a path). A symlink
    (whose mode Linux ignores) is left alone. Without /proc, a file or directory is opened for reading
    (never through a link) and changed with fchmod; other types raise the OSError."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        s = os.fstat(fd)
        if st.S_ISLNK(s.st_mode):
            return
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
            return
        except FileNotFoundError:
            if not (st.S_ISREG(s.st_mode) or st.S_ISDIR(s.st_mode)):
                raise
        rfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        try:
            r = os.fstat(rfd)
            if (r.st_dev, r.st_ino) != (s.st_dev, s.st_ino):
                raise OSError(errno.EAGAIN, "changed while its mode was set", name)
            os.fchmod(rfd, mode)
        finally:
            os.close(rfd)
    finally:
        os.close(fd)


def _open_dir_forcing(pfd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=pfd)
    except PermissionError:
        chmod_at(pfd, name, 0o700)
        return os.open(name, _DIR_FLAGS, dir_fd=pfd)


def _remove_dir_contents(pfd: int, name: str) -> None:
    fd = _open_dir_forcing(pfd, name)
    try:
        s = os.fstat(fd)
        if (s.st_mode & 0o300) != 0o300:
            os.fchmod(fd, st.S_IMODE(s.st_mode) | 0o700)
        with os.scandir(fd) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in children:
            if is_dir:
                _remove_dir_contents(fd, child)
                os.rmdir(child, dir_fd=fd)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
