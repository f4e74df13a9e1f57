"""A data root on a local (or locally mounted) filesystem.

Capture reads the live tree: a file that changes while it is read shows as a
different version after the read and is read again by the capture. Apply
stages files under ``<root>/.drsync-staging`` (same filesystem, so the final
step is a rename), and makes them durable with one ``syncfs`` instead of an
fsync per file.
"""

from __future__ import annotations

import os
import shutil
import stat as st
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from drsync import fsutil
from drsync.dataroot import STAGING, FileVersion, stream_matches
from drsync.errors import UsageError
from drsync.repository import chunks
from drsync.tree import LocalEntry, TreeScan, scan_tree

if TYPE_CHECKING:
    from drsync.apply import ApplyPlan
    from drsync.repository.manifest import Entry, Manifest

# Files up to this size are read with one call and cut in memory.
_SMALL_FILE = 8 * 1024 * 1024


def _version(s: os.stat_result) -> FileVersion:
    return FileVersion(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid)


class LocalOpenFile:
    """An open file and its version; its own context manager (the capture opens one per file read)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            before = os.fstat(self._fd)
            if not st.S_ISREG(before.st_mode):
                raise FileNotFoundError(path)  # replaced by something else: not the file we scanned
        except BaseException:
            os.close(self._fd)
            raise
        self.before = _version(before)

    def __enter__(self) -> LocalOpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def pieces(self) -> Iterator[memoryview | bytes]:
        fd, size_hint = self._fd, self.before.size
        if size_hint >= 1 << 20:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead on a cold cache
        if size_hint <= _SMALL_FILE:
            parts = []
            while True:
                # Ask for one byte more than expected: growth shows without an extra call.
                b = os.read(fd, max(size_hint + 1, 65536))
                if not b:
                    break
                parts.append(b)
            buf = parts[0] if len(parts) == 1 else b"".join(parts)
            if buf:
                yield from chunks.cut_buffer(buf)
            return
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            yield from chunks.cut_stream(f)

    def after(self) -> FileVersion:
        return _version(os.fstat(self._fd))


class LocalFrozenRoot:
    """The live tree: a local filesystem has no snapshot drsync can take, so capture re-reads what changes."""

    consistent = False

    def __init__(self, root: str) -> None:
        self.root = root
        self.notes: list[str] = []

    def scan(self, exclude: frozenset[str]) -> TreeScan:
        return scan_tree(self.root, exclude)

    def open_file(self, rel: str) -> LocalOpenFile:
        return LocalOpenFile(os.path.join(self.root, rel))


class LocalDataRoot:
    mtime_resolution_ns = 1
    supports_symlinks = True

    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(path)
        self.url = self.root

    # --- capture ---

    def check_capturable(self) -> None:
        if not os.path.isdir(self.root):
            what = "is not a directory" if os.path.exists(self.root) else "does not exist"
            raise UsageError(f"data root {self.root} {what}")

    @contextmanager
    def frozen(self, tag: str, parent_tag: str | None = None,
               parent: Manifest | None = None) -> Iterator[LocalFrozenRoot]:
        yield LocalFrozenRoot(self.root)

    def has_data(self) -> bool:
        try:
            with os.scandir(self.root) as it:
                return any(not e.name.startswith(".drsync") for e in it)
        except OSError:
            return False

    # --- apply ---

    def prepare_target(self) -> bool:
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise UsageError(f"target {self.root} exists and is not a directory; name a directory")
        created = not os.path.exists(self.root)
        os.makedirs(self.root, exist_ok=True)
        return created

    def existing(self) -> dict[str, LocalEntry]:
        return scan_tree(self.root).entries() if os.listdir(self.root) else {}

    def same_content(self, e: Entry, have: LocalEntry) -> bool:
        try:
            with open(have.abspath, "rb", buffering=0) as f:
                return stream_matches(f, e)
        except OSError:
            return False

    def owners_settable(self) -> bool:
        return os.geteuid() == 0

    @property
    def _staging(self) -> str:
        return os.path.join(self.root, STAGING)

    def reset_staging(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        os.mkdir(self._staging, 0o700)

    def write_staged(self, n: int, e: Entry, data: Iterable[bytes]) -> str:
        tmp = os.path.join(self._staging, str(n))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for piece in data:
                view = memoryview(piece)
                while view:
                    k = os.write(fd, view)
                    view = view[k:]
            if os.geteuid() == 0:
                os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode)
        finally:
            os.close(fd)
        os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
        return tmp

    def flush(self) -> None:
        fsutil.syncfs(self.root)

    def drop_staging(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def remove_root(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def commit(self, plan: ApplyPlan, staged: dict[str, str]) -> None:
        target = self.root
        root_owner = os.geteuid() == 0

        def full(path: str) -> str:
            return os.path.join(target, *path.split("/"))

        # Directories we write into must be writable by us until the end.
        for e in plan.dirs:
            try:
                s = os.lstat(full(e.path))
            except FileNotFoundError:
                continue
            if st.S_ISDIR(s.st_mode) and (s.st_mode & 0o700) != 0o700:
                os.chmod(full(e.path), st.S_IMODE(s.st_mode) | 0o700)
        for path in plan.remove:
            p = full(path)
            if os.path.isdir(p) and not os.path.islink(p):
                _rmtree_forcing(p)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        for e in plan.mkdir:
            os.makedirs(full(e.path), 0o700, exist_ok=True)
        for e in plan.write:
            try:
                os.replace(staged[e.path], full(e.path))
            except FileNotFoundError:
                if not os.path.exists(full(e.path)):
                    raise
                # Already moved by the interrupted run this one completes.
        for e in plan.link:
            p = full(e.path)
            tmp = fsutil.temp_name(p)
            os.symlink(e.target or "", tmp)
            os.replace(tmp, p)
            if root_owner:
                os.lchown(p, e.uid, e.gid)
            os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        for e in plan.fix_meta:
            p = full(e.path)
            if root_owner:
                os.lchown(p, e.uid, e.gid)
            os.chmod(p, e.mode)
        # Deepest directories first, so setting a child's times does not disturb its parent's.
        for e in plan.dirs:
            p = full(e.path)
            if root_owner:
                os.lchown(p, e.uid, e.gid)
            s = os.lstat(p)
            if st.S_IMODE(s.st_mode) != e.mode:
                os.chmod(p, e.mode)
            if s.st_mtime_ns != e.mtime_ns:
                os.utime(p, ns=(e.mtime_ns, e.mtime_ns))


def _rmtree_forcing(path: str) -> None:
    def onerror(func, p, exc):  # type: ignore[no-untyped-def]
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=onerror)
