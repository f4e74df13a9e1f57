"""A storage that is a directory on a local (or locally mounted) filesystem."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable

from drsync import fsutil
from drsync.errors import IntegrityError, UsageError
from drsync.storage import ObjectExists, ObjectMissing, StoredObject, check_name, valid_name

_FD_CACHE_SIZE = 64
# Read descriptors are cached only for packs: named by their content, never rewritten (a pack deleted
# by GC and written again holds the same bytes).
_CACHED_PREFIX = "packs/"


class _CachedFd:
    """A read descriptor shared by threads; closed once retired (evicted, forgotten) and unused.
    Guarded by ``LocalStorage._fd_lock``."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False

    def retire(self) -> None:
        self.retired = True
        if self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_SMALL_WRITE = 64 * 1024  # writes below this are gathered ...
_WRITE_BUFFER = 1 << 20  # ... and written out once this many bytes are gathered (one call, not one a chunk)


class LocalBlobWriter:
    def __init__(self, storage: LocalStorage, name: str) -> None:
        self._storage = storage
        self._name = name
        self._final = storage._path(name)
        os.makedirs(os.path.dirname(self._final), exist_ok=True)
        self._tmp = fsutil.temp_name(self._final)
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._size = 0
        self._buf = bytearray()  # small writes (a pack's small chunks), written out a MiB at a time
        self._failed: OSError | None = None  # a write that failed: the file no longer holds what was written

    @property
    def size(self) -> int:
        """Bytes written so far (those still in the buffer included)."""
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "writer already closed"
        self._check_whole()
        if len(data) < _SMALL_WRITE:
            self._buf += data
            self._size += len(data)
            if len(self._buf) >= _WRITE_BUFFER:
                self._drain()
            return
        self._drain()
        self._write(data)
        self._size += len(data)

    def _drain(self) -> None:
        buf, self._buf = self._buf, bytearray()
        self._write(buf)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        try:
            fsutil.write_all(self._fd, data)
        except OSError as e:
            self._failed = e  # part of it may be written: every later write and the commit fail
            raise

    def _check_whole(self) -> None:
        if self._failed is not None:
            raise OSError(self._failed.errno, f"an earlier write to {self._name} failed ({self._failed.strerror})")

    def commit(self, *, durable: bool = True) -> None:
        assert self._fd is not None, "writer already closed"
        try:
            self._check_whole()
            self._drain()
            if durable:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        os.rename(self._tmp, self._final)
        self._storage._forget(self._name)
        if durable:
            fsutil.fsync_dir(os.path.dirname(self._final))

    def abort(self) -> None:
        self._buf = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LocalStorage:
    """Blobs are files below ``root``; temp files start with ``.tmp-`` and are never listed."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = fsutil.absolute(root)
        self.url = self.root
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise UsageError(f"{self.root} is a file, not a directory")
        if create:
            os.makedirs(self.root, exist_ok=True)
        self._fds: OrderedDict[str, _CachedFd] = OrderedDict()
        self._fd_lock = threading.Lock()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def read(self, name: str) -> bytes:
        fd = self._open(name)
        with open(fd, "rb", closefd=True) as f:
            return f.read()

    def _open(self, name: str) -> int:
        """A read descriptor of ``name``, a regular file: ObjectMissing when it is gone, IntegrityError for
        a directory, pipe, socket or device (non-blocking open: a pipe without a writer never blocks)."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.root}: {name} is missing") from None
        except IsADirectoryError:
            raise self._not_a_file(name, "a directory") from None
        except OSError as e:  # a socket (ENXIO) or a loop of symbolic links (ELOOP) in its place: damage
            if e.errno in (errno.ENXIO, errno.ELOOP):
                raise self._not_a_file(name, "a socket" if e.errno == errno.ENXIO else
                                       "a loop of symbolic links") from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise self._not_a_file(name, "a directory" if stat.S_ISDIR(mode) else "a pipe, socket or device")
        return fd

    def _not_a_file(self, name: str, what: str = "a directory") -> IntegrityError:
        return IntegrityError(f"{self.root}: {name} is {what}, not a file: the repository is damaged; run "
                              f"'drsync repo verify' and restore it from a backup or the standby")

    def _checkout(self, name: str) -> _CachedFd:
        """A cached read descriptor for ``name``, counted as in use until :meth:`_checkin`: another
        thread's eviction or delete never closes a descriptor a read is using (a closed number can be
        reused by the next ``open`` at once, and a pread on it would return another file's bytes)."""
        with self._fd_lock:
            held = self._fds.get(name)
            if held is not None:
                self._fds.move_to_end(name)
            else:
                held = _CachedFd(self._open(name))
                self._fds[name] = held
                while len(self._fds) > _FD_CACHE_SIZE:
                    _, old = self._fds.popitem(last=False)
                    old.retire()
            held.users += 1
            return held

    def _checkin(self, held: _CachedFd) -> None:
        with self._fd_lock:
            held.users -= 1
            if held.retired:
                held.retire()

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if not name.startswith(_CACHED_PREFIX):
            # Documents (locks, config, snapshot documents) are replaced in place by renames, here or in
            # another process: each read opens the name afresh, never an old inode's descriptor.
            fd = self._open(name)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        held = self._checkout(name)  # a pack: a short read means it is truncated (the caller says so)
        try:
            return os.pread(held.fd, length, offset)
        finally:
            self._checkin(held)

    def _forget(self, name: str) -> None:
        with self._fd_lock:
            held = self._fds.pop(name, None)
            if held is not None:
                held.retire()

    def write(self, name: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None:
        self._forget(name)
        try:
            fsutil.atomic_write(self._path(name), data, durable=durable, exclusive=exclusive)
        except FileExistsError:
            raise ObjectExists(f"{self.root}: {name} exists already") from None

    def writer(self, name: str) -> LocalBlobWriter:
        return LocalBlobWriter(self, name)

    def open_object(self, name: str) -> int:
        """A read descriptor of the stored object ``name`` (a regular file), the caller's to close:
        ObjectMissing when it is gone, IntegrityError when it is not a file. An optional capability of a
        storage: :meth:`drsync.repository.repo.Repository.manifest_spool` reads a large manifest through it
        instead of copying it. Objects are replaced by renames, never rewritten in place, so the descriptor
        reads the bytes it was opened on, whatever later happens to the name."""
        return self._open(name)

    def link(self, src: str, dst: str, *, size: int) -> bool:
        """Give the stored object ``src`` the name ``dst`` too (a hard link: its bytes are stored once), in
        place of whatever ``dst`` held, durable. False, nothing done, when ``src`` is not a file of ``size``
        bytes or the filesystem cannot link it (the caller writes the bytes instead). An optional capability
        of a storage: :meth:`drsync.repository.repo.Repository.commit_snapshot` uses it for a manifest with
        the bytes of one stored already."""
        s, d = self._path(src), self._path(dst)
        try:
            st = os.stat(s, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
            os.makedirs(os.path.dirname(d), exist_ok=True)
            tmp = fsutil.temp_name(d)
            os.link(s, tmp, follow_symlinks=False)
        except OSError:  # gone, a filesystem without hard links, the link count at its limit
            return False
        try:
            os.rename(tmp, d)
        except BaseException:
            os.unlink(tmp)
            raise
        self._forget(dst)
        fsutil.fsync_dir(os.path.dirname(d))
        return True

    def delete(self, name: str) -> None:
        self._forget(name)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def is_dir(self, name: str) -> bool:
        """Whether ``name`` is a directory (a symlink to one counts; a dangling one does not)."""
        return os.path.isdir(self._path(name))

    def touch(self, name: str) -> None:
        try:
            os.utime(self._path(name))  # an unlinked name fails: never created
        except FileNotFoundError:
            raise ObjectMissing(f"{self.root}: {name} is missing") from None

    def list(self, prefix: str = "") -> list[StoredObject]:
        """Blobs whose name starts with ``prefix`` (a folder, e.g. ``"packs/"``)."""
        base = self.root
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(base, *folder.split("/")) if folder else base
        out: list[StoredObject] = []
        if not os.path.isdir(start):
            return out
        stack = [start]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    if e.name.startswith(".tmp-"):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    rel = os.path.relpath(e.path, base).replace(os.sep, "/")
                    if rel.startswith(prefix) and valid_name(rel):
                        try:
                            st = e.stat(follow_symlinks=True)  # a link's object is what it points at
                        except (FileNotFoundError, NotADirectoryError):
                            continue  # deleted while listed (another process's lock, a GC), or dangling
                        except OSError:
                            st = None  # a link loop, a target that cannot be examined: a read says so
                        if st is not None and not stat.S_ISREG(st.st_mode):
                            continue  # a pipe, socket, device or directory (a link to one): no object
                        if st is None:
                            st = e.stat(follow_symlinks=False)
                        out.append(StoredObject(rel, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.name)
        return out

    def temporary_files(self, folder: str) -> list[str]:
        """The temporary files (``.tmp-*`` regular files, never listed as objects) in ``folder`` (e.g.
        ``"packs/"``) and its subfolders (a pack's is written beside its final name, ``packs/<xx>/``): those of
        writes under way, or of writes a killed process never finished. Links and directories are never
        followed or named. An optional capability of a storage: garbage collection removes them under the
        exclusive lock (:meth:`remove_temporary`)."""
        out: list[str] = []
        stack = [folder.strip("/")]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(os.path.join(self.root, *rel.split("/"))) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            if not e.name.startswith(".tmp-"):
                                stack.append(f"{rel}/{e.name}")
                        elif e.name.startswith(".tmp-") and e.is_file(follow_symlinks=False):
                            out.append(f"{rel}/{e.name}")
            except (FileNotFoundError, NotADirectoryError):
                continue
        return sorted(out)

    def remove_temporary(self, name: str) -> None:
        """Remove a temporary file :meth:`temporary_files` named; one gone or replaced by a directory since is
        left as it is."""
        folder, _, base = name.rpartition("/")
        if not base.startswith(".tmp-") or folder.startswith("/") or ".." in folder.split("/"):
            raise ValueError(f"not a temporary file of this storage: {name!r}")
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            os.unlink(os.path.join(self.root, *folder.split("/"), base))

    def not_files(self, folder: str) -> list[str]:
        """Names in ``folder`` (e.g. ``"snapshots/"``, not its subfolders) that :meth:`list` leaves out
        because they are no regular file: a pipe, socket, device, directory or dangling link where an object
        of that name would be. A repository reads them as damage (a snapshot document that is a fifo is
        still a snapshot: garbage collection must not take its chunks)."""
        start = os.path.join(self.root, *folder.strip("/").split("/"))
        out = []
        try:
            with os.scandir(start) as it:
                for e in it:
                    rel = f"{folder.rstrip('/')}/{e.name}"
                    if e.name.startswith(".tmp-") or not valid_name(rel):
                        continue
                    try:
                        regular = e.is_file(follow_symlinks=True)  # the directory entry's type: no stat
                    except OSError:
                        regular = False
                    if not regular:
                        out.append(rel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(out)

    def sync(self, names: Iterable[str]) -> None:
        dirs = set()
        for name in names:
            p = self._path(name)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(p))
        fsutil.fsync_dirs(dirs)

    def close(self) -> None:
        with self._fd_lock:
            for held in self._fds.values():
                held.retire()
            self._fds.clear()
