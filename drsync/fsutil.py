"""Local filesystem helpers for durable, atomic writes.

Durability on POSIX needs three steps: fsync the file, rename it into place,
fsync the directory that holds the name. ``syncfs`` flushes a whole
filesystem in one call, which is how drsync batches the fsyncs of many small
files (one flush instead of one per file).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import posixpath
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

from drsync.errors import OperationFailed, UsageError

_libc = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter runs on
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str | os.PathLike[str]]) -> None:
    for p in sorted({os.fspath(p) for p in paths}):
        fsync_dir(p)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (Linux syncfs(2))."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is not None:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), os.fspath(path))
        else:  # pragma: no cover - non-Linux fallback
            os.sync()
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to the device now (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that a later fsync or :func:`syncfs` finds less
    left to write: the disk works while the caller writes the next file. Durability still comes
    from that later flush; this returns without waiting for the writes (it may wait while the
    device's queue is full). Does nothing where the call is missing or fails."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def temp_name(final: str | os.PathLike[str]) -> str:
    p = os.fspath(final)
    d, base = os.path.split(p)
    return os.path.join(d, f".tmp-{secrets.token_hex(6)}-{base}")


def pieces(data: bytes | bytearray | memoryview | Iterable[bytes]) -> Iterator[memoryview]:
    """``data`` as memoryviews: itself, or each piece of an iterable of bytes (written in turn)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield memoryview(data)
        return
    for piece in data:
        yield memoryview(piece)


def write_all(fd: int, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Write every byte of ``data`` (see :func:`pieces`) to ``fd``."""
    for view in pieces(data):
        while view:
            view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes], *, durable: bool = True,
                 exclusive: bool = False, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or pieces written one after the other) so that ``path`` is either the old
    content or the new one.

    With ``exclusive`` the call fails with FileExistsError when ``path`` exists;
    the final step is then a hard link, which is atomic and never overwrites.
    """
    p = os.fspath(path)
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    tmp = temp_name(p)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, p)
            with contextlib.suppress(FileNotFoundError):  # written: a GC that took its lock may have swept tmp
                os.unlink(tmp)
        else:
            os.rename(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(p) or ".")


def describe_os_error(e: OSError, action: str) -> OperationFailed:
    """One line for an operator, with a hint for the common causes."""
    hint = ""
    if e.errno == errno.ENOSPC:
        hint = "; free some space and run the command again"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "; check the permissions of that path"
    elif e.errno == errno.EROFS:
        hint = "; the filesystem is read-only"
    elif e.errno == errno.ENOTDIR:
        hint = "; a part of that path is a file where a directory is needed: check the path, or choose another"
    elif e.errno == errno.EISDIR:
        hint = "; that path is a directory where a file is needed: check the path, or choose another"
    elif e.errno == errno.ELOOP:
        hint = "; a part of that path is a symlink, which drsync does not follow there: name the real path"
    elif e.errno == errno.ENAMETOOLONG:
        hint = "; a name in that path is too long for its filesystem"
    where = f" {e.filename}:" if e.filename else ""
    return OperationFailed(f"{action} failed:{where} {e.strerror or e}{hint}")



# Paths longer than this many bytes are opened one component at a time (PATH_MAX is 4096 bytes on Linux).
LONG_PATH = 3072

try:
    from drsync._listdir import open_beneath as _openat2
except ImportError:  # the C listing was not built: open_beneath goes one component at a time
    _openat2 = None


class NotRegular(OSError):
    """What :func:`open_regular` found is a directory, pipe, socket or device (or a link)."""


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read descriptor of ``path`` if it is a regular file, never through a final symlink; the caller
    closes it. A pipe, socket, device or directory is never opened (a fifo blocks its reader for good, a
    device's open can act: arm a watchdog, rewind a tape): it is looked at with ``O_PATH`` and refused
    (:class:`NotRegular`); the file is then opened through that descriptor (``/proc/self/fd``), or without
    /proc by name and checked to be the same inode. FileNotFoundError and other OSErrors as ``open``."""
    at = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        s = os.fstat(at)
        if not stat.S_ISREG(s.st_mode):
            raise NotRegular(errno.EINVAL, "not a regular file", os.fspath(path))
        try:
            return os.open(f"/proc/self/fd/{at}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:  # no /proc
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            r = os.fstat(fd)
            if (r.st_dev, r.st_ino) != (s.st_dev, s.st_ino):
                os.close(fd)
                raise NotRegular(errno.EAGAIN, "replaced while it was opened", os.fspath(path)) from None
            return fd
    finally:
        os.close(at)


@contextmanager
def beneath(root: str, rel: str) -> Iterator[str]:
    """A path to ``root/rel`` that no symlink on the way can lead elsewhere: its parent directory is
    opened one component at a time from ``root`` (never following a link) and named through
    ``/proc/self/fd``. For calls that do not follow a link at the end themselves (``O_NOFOLLOW``,
    ``follow_symlinks=False``), of any type of entry; valid inside the ``with``. OSError (ELOOP,
    ENOTDIR) when a component on the way is a link or not a directory."""
    head, _, name = rel.rstrip("/").rpartition("/")
    fd = open_beneath(root, head, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def open_beneath(root: str, rel: str, flags: int = os.O_RDONLY) -> int:
    """Open ``root/rel`` from ``root``, never following a symlink on the way or at the end (ELOOP or
    ENOTDIR), nothing above ``root`` reached: one openat2 call (drsync._listdir) where the kernel has it,
    else one component at a time (also for paths longer than :data:`LONG_PATH`). The caller closes the
    descriptor."""
    global _openat2
    name = os.fsencode(rel.lstrip("/"))
    # PATH_MAX counts bytes, not characters: a path of accented or CJK names has two or three a character.
    if _openat2 is not None and name.strip(b"/") and len(os.fsencode(root)) + len(name) < LONG_PATH:
        try:
            return int(_openat2(os.fsencode(root), name, flags))
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.ENAMETOOLONG):
                raise
            if e.errno == errno.ENOSYS:
                _openat2 = None  # no openat2 in this kernel: never asked again
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = [p for p in rel.split("/") if p]
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:
            return os.dup(fd)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def link_beneath(root: str, rel: bytes) -> bytes | None:
    """The target of the symlink at ``root/rel`` (bytes), None when nothing or no link is there, or when
    it cannot be read (a permission error: what cannot be read is taken as it was listed, never as a
    reason to leave something out); its parent reached as :func:`open_beneath` does. ``b"/"`` (a link
    leaving the root, the cautious answer) when a directory on the way became a link meanwhile."""
    head, _, name = os.fsdecode(rel).rpartition("/")
    try:
        fd = open_beneath(root, head, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        return b"/" if e.errno == errno.ELOOP else None
    try:
        if not stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            return None
        return os.fsencode(os.readlink(name, dir_fd=fd))
    except OSError:
        return None
    finally:
        os.close(fd)


def open_walked_dir(root: str, rel_dir: bytes, abs_dir: bytes,
                    examined: tuple[int, int] | None) -> tuple[int, os.stat_result] | str | None:
    """Open a directory a tree walk is about to list (``rel_dir`` below ``root``, at ``abs_dir``): never
    through a symlink anywhere below the root, which may itself be named through one (:func:`open_beneath`:
    an ancestor swapped for a link to where the real directory was moved would otherwise lead out of the
    root to that very directory), and only if it is still the directory its parent's listing ``examined``
    (device, inode). Returns the descriptor and its stat (the caller closes it), None when it was removed
    meanwhile (simply not in the walk), or why it cannot be listed (the walk keeps its last captured
    content): replaced by a link, a file or another directory, vanished (the root), or the error."""
    try:
        if rel_dir:
            fd = open_beneath(root, os.fsdecode(rel_dir), os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(abs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None if rel_dir else "vanished while it was walked"  # the root itself: never an empty tree
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            return "replaced by a link or a file while it was walked"
        return f"cannot be listed ({e.strerror or e})"
    try:
        st_dir = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        return f"cannot be listed ({e.strerror or e})"
    if examined is not None and (st_dir.st_dev, st_dir.st_ino) != examined:
        os.close(fd)
        return "replaced while it was walked"
    return fd, st_dir


def absolute(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute as the kernel reads it: a ``..`` climbs from where the link before it leads
    (``/srv/lnk/../x`` with ``lnk -> /a/b`` is ``/a/x``; ``os.path.abspath`` would say ``/srv/x``, another
    directory). The part up to the last ``..`` is resolved (:func:`os.path.realpath`), the rest kept as
    written (less ``.`` and repeated slashes), so a final symlink is still named, not followed.
    UsageError when the kernel cannot go up from that part (a file, a missing name, a link loop before the
    ``..``): the path names nothing."""
    p = os.fspath(path)
    if not p.startswith("/"):
        p = os.path.join(os.getcwd(), p)
    comps = p.split("/")
    if ".." not in comps:
        return "/" + os.path.abspath(p).lstrip("/")  # POSIX keeps a leading "//"; the kernel reads it as "/"
    last = len(comps) - 1 - comps[::-1].index("..")
    head = "/".join(comps[:last + 1]) or "/"
    try:
        os.stat(head)  # where the kernel goes up from: every name before the ".." must be a directory
    except OSError as e:
        raise UsageError(f"{p}: the '..' in it climbs from {'/'.join(comps[:last]) or '/'}, which is not a "
                         f"directory the system can enter ({e.strerror}); name an existing path") from None
    resolved = os.path.realpath(head)
    return "/" + os.path.abspath(os.path.join(resolved, *[c for c in comps[last + 1:] if c])).lstrip("/")


def local_location(url: str) -> str | None:
    """The local path a location names, or None when it names another storage (``hdfs://``, ``memory://``):
    a plain path as it is; a file URL (RFC 8089, scheme and host in any case, %-escapes decoded) as its
    path, so ``file:///p``, ``file:/p`` and ``file://localhost/p`` all name ``/p``. UsageError for a file
    URL naming another host, no absolute path, or a query or fragment (never a directory named ``file:``,
    after a host, or holding ``?``)."""
    if not _is_file_url(url):
        return None if "://" in url else url
    parts = urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise UsageError(f"{url}: a file URL names a path on this machine (file:///PATH); {parts.netloc!r} would "
                         f"be another host")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise UsageError(f"{url}: a file URL with a query or fragment ('?', '#'); give a plain path instead")
    path = unquote(parts.path, errors="surrogateescape")
    if not path.startswith("/"):
        raise UsageError(f"{url}: a file URL names an absolute path (file:///PATH); give a plain path instead")
    return path


def is_local_location(url: str) -> bool:
    """Whether ``url`` names a local path (a plain path or a file URL, as :func:`local_location` reads
    them), not another storage."""
    return _is_file_url(url) or "://" not in url


def _is_file_url(url: str) -> bool:
    return url[:5].lower() == "file:"


def local_or_none(url: str) -> str | None:
    """:func:`local_location`, with None for a file URL it refuses (for comparisons, not for opening)."""
    try:
        return local_location(url)
    except UsageError:
        return None


def same_place(a: str, b: str) -> bool:
    """Whether two locations (plain paths, ``file://`` or other URLs) name one directory: local ones by
    device and inode (a symlink, a bind mount or another spelling of it; by resolved path when either does
    not exist), others as written."""
    la, lb = local_or_none(a), local_or_none(b)
    if la is None or lb is None:
        return a.rstrip("/") == b.rstrip("/")
    try:
        sa, sb = os.stat(la), os.stat(lb)
    except OSError:
        return os.path.realpath(la) == os.path.realpath(lb)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def lies_within(path: str, top: str) -> bool:
    """Whether location ``path`` is ``top`` or lies below it. Local ones (plain paths, ``file://``) are
    compared by device and inode of ``path`` and each existing directory above it, after resolving
    symlinks, so another spelling, a symlink or a bind mount of ``top`` counts; ``path`` need not exist.
    Others (``hdfs://...``) by their normalised paths on the same authority."""
    lp, lt = local_or_none(path), local_or_none(top)
    if lp is None or lt is None:
        if lp is not None or lt is not None:
            return False
        a, b = urlsplit(path), urlsplit(top)
        pa_, pb = posixpath.normpath(a.path or "/"), posixpath.normpath(b.path or "/")
        return a.netloc == b.netloc and (pa_ == pb or pa_.startswith(pb.rstrip("/") + "/"))
    real, real_top = os.path.realpath(lp), os.path.realpath(lt)
    if real == real_top or real.startswith(real_top.rstrip("/") + "/"):
        return True
    try:
        st_top = os.stat(real_top)
    except OSError:
        return False
    p = real
    while True:
        try:
            st = os.stat(p)
            if (st.st_dev, st.st_ino) == (st_top.st_dev, st_top.st_ino):
                return True
        except OSError:
            pass
        up = os.path.dirname(p)
        if up == p:
            return False
        p = up


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges of the first ``size`` bytes of ``fd`` that hold data, by ``SEEK_DATA`` and
    ``SEEK_HOLE`` (lseek(2)); the whole of them where the filesystem cannot say."""
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return  # only a hole from here to the end
            yield at, size  # no SEEK_DATA here: all of it
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        at = end
