"""A data root on a local (or locally mounted) filesystem.

Capture reads the live tree: a file that changes while it is read shows as a
different version after the read and is read again by the capture. Apply
stages files under ``<root>/.drsync-staging`` (same filesystem, so the final
step is a rename), and makes them durable with one ``syncfs`` instead of an
fsync per file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import shutil
import stat as st
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from drsync import allocators, documents, fsutil, native_walk
from drsync.dataroot import STAGING, FileVersion, stream_matches
from drsync.dataroot.beneath import Beneath
from drsync.errors import OperationFailed, RefusedError, UsageError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.manifest import DIR, FILE, SYMLINK, Entry, decode_xattrs
from drsync.text import printable
from drsync.tree import EntryColumns, LocalEntry, TreeScan, in_path_order, read_ahead, read_xattrs, scan_tree

log = logging.getLogger("drsync.dataroot.local")

if TYPE_CHECKING:
    from drsync.apply import ApplyPlan
    from drsync.repository.manifest import Manifest

# Files up to this size are read with one call and cut in memory.
_SMALL_FILE = 8 * 1024 * 1024
# A staged file this large starts its writeback at once (fsutil.start_writeback). Smaller ones are left
# to the apply's one syncfs, which writes them out together.
WRITEBACK_MIN = 1024 * 1024


def _version(s: os.stat_result) -> FileVersion:
    return FileVersion(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, st.S_IMODE(s.st_mode), s.st_uid, s.st_gid)


class LocalOpenFile:
    """An open file and its version; its own context manager (the capture opens one per file read)."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        # O_NONBLOCK: a file replaced by a fifo since the scan must not stall the capture (the type
        # check below then drops it); reads of regular files ignore the flag.
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) if fd is None else fd
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

    def xattrs(self) -> tuple[bytes | None, str | None]:
        return read_xattrs(self._fd)


class LocalFrozenRoot:
    """The live tree: a local filesystem has no snapshot drsync can take, so capture re-reads what changes."""

    consistent = False
    # One thread reads small files: measured on 20,000 files of 256 B to 4 KiB, three threads took 3.6 to 4.1 s
    # against one thread's 2.6 s (warm cache), 5.1 to 5.5 s against 4.4 to 4.8 s (cold): the per-file work
    # holds the GIL, and the threads' opens contend in the kernel (twice the system time). Large files are
    # read by several (their hashing and reads release the GIL): 1 GiB cold in 3.3 s against one thread's 4.5 s.
    small_file_threads = 1

    def __init__(self, root: str) -> None:
        self.root = root
        self.notes: list[str] = []

    def scan(self, exclude: frozenset[str]) -> TreeScan:
        return scan_tree(self.root, exclude)

    def xattrs(self, rel: str) -> tuple[bytes | None, str | None]:
        """``rel``'s extended attributes, through its parent directory opened beneath the root (a
        directory on the way swapped for a link since the scan is never followed out of it)."""
        try:
            with fsutil.beneath(self.root, rel) as path:
                return read_xattrs(path)
        except OSError as e:
            return None, f"extended attributes cannot be read ({e.strerror or e})"

    def open_file(self, rel: str) -> LocalOpenFile:
        """``rel`` opened one component at a time from the root, never through a link: a directory on the
        way swapped for a link since the scan (to a file outside the root) fails the open (ELOOP or
        ENOTDIR), and the path keeps its last captured version."""
        return LocalOpenFile(os.path.join(self.root, rel),
                             fsutil.open_beneath(self.root, rel, os.O_RDONLY | os.O_NONBLOCK))

    def warm(self, rels: list[str]) -> int:
        """Each of ``rels`` opened as :meth:`open_file` opens it (never through a link), and if it is a regular
        file whose first byte is not in the page cache (a read with ``RWF_NOWAIT`` would block), its bytes
        asked of the disk (``posix_fadvise(WILLNEED)``); closed unread. Returns how many were asked for.
        Errors ignored."""
        asked = 0
        probe = bytearray(1)
        for rel in rels:
            try:
                fd = fsutil.open_beneath(self.root, rel, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if not st.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    os.preadv(fd, [probe], 0, os.RWF_NOWAIT)
                    continue  # in the page cache already (or empty)
                except BlockingIOError:
                    pass
                except OSError:
                    pass  # no RWF_NOWAIT for this filesystem: asked for, as if not cached
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                asked += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return asked


class LocalDataRoot:
    mtime_resolution_ns = 1
    supports_symlinks = True
    mode_bits = 0o7777
    supports_xattrs = True
    # One thread stages small files: they are all created in one staging directory, whose lock serialises
    # the creations (threads spin on it in the kernel), and the per-file work holds the GIL. A 20,000-file
    # restore took 3.8 to 4.1 s with one staging thread against 4.8 to 5.2 s with four.
    small_file_threads = 1

    def __init__(self, path: str) -> None:
        self.root = fsutil.absolute(path)
        self.url = self.root
        self.warnings: list[str] = []
        self._mount_list: list[str] | None = None
        self._staging_fds: dict[str, int] = {}
        self._root_opened = False  # open_root recorded the root's own mode (an apply by its owner, not root)
        self._link_max: dict[str, int] = {}  # PC_LINK_MAX by domain (the mount point holding a path; "" the root's)
        self.link_copies = 0  # names of hard-link groups the last commit wrote as copies (no link could be made)
        self.link_copy_bytes = 0  # and their bytes

    @property
    def _mounts(self) -> list[str]:
        if self._mount_list is None:
            self._mount_list = self.mount_points()
        return self._mount_list

    # --- capture ---

    def check_capturable(self) -> None:
        if not os.path.isdir(self.root):
            what = "is not a directory" if os.path.exists(self.root) else "does not exist"
            raise UsageError(f"data root {self.root} {what}")
        if RootJournal(self.root).load() is not None:
            # A restore onto this directory was cut short in its commit: it holds part of the old tree and
            # part of the new one until that restore is run again (which finishes it from the journal).
            raise RefusedError(f"data root {self.root} holds a restore that was interrupted while it committed "
                               f"({RootJournal.REL} is there): run that restore again to finish it, then capture; "
                               f"nothing was captured")

    @contextmanager
    def frozen(self, tag: str, parent_tag: str | None = None,
               parent: Manifest | None = None) -> Iterator[LocalFrozenRoot]:
        yield LocalFrozenRoot(self.root)

    def has_data(self) -> bool:
        """Whether the root holds anything but drsync's own files and the empty ``lost+found`` of a
        freshly made filesystem (which a new volume's root always has)."""
        try:
            with os.scandir(self.root) as it:
                return any(not e.name.startswith(".drsync") and not _empty_lost_found(e) for e in it)
        except OSError:
            return False

    # --- apply ---

    def prepare_target(self) -> bool:
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise UsageError(f"target {self.root} exists and is not a directory; name a directory")
        above = os.path.dirname(self.root.rstrip("/"))
        while above not in ("", "/") and not os.path.lexists(above):
            above = os.path.dirname(above)
        if above and not os.path.isdir(above):
            raise UsageError(f"target {self.root} cannot be made: {above} is not a directory; name a target "
                             f"below a directory")
        created = not os.path.exists(self.root)
        os.makedirs(self.root, exist_ok=True)
        return created

    def missing(self) -> bool:
        return not os.path.isdir(self.root)

    def relative_inside(self, path: str) -> str | None:
        local = fsutil.local_or_none(path)
        if local is None:
            return None
        real = os.path.realpath(local)
        top = os.path.realpath(self.root)
        if real != top and not real.startswith(top.rstrip("/") + "/"):
            # Another spelling through a bind mount (of the root, or of the path): compared as places in
            # their filesystem (device and path within it, from /proc/self/mountinfo).
            here, there = _in_filesystem(real), _in_filesystem(top)
            if here is None or there is None or here[0] != there[0]:
                return None
            real, top = here[1], there[1]
            if real != top and not real.startswith(top.rstrip("/") + "/"):
                return None
        if real == top:
            raise UsageError(f"{path} is the target itself; drsync's own files cannot be the data root")
        return real[len(top.rstrip("/")) + 1:]

    def lies_within(self, path: str) -> bool:
        # by device and inode up the root's path: a bind mount or other spelling of ``path`` counts
        return fsutil.is_local_location(path) and fsutil.lies_within(self.root, path)

    def mount_points(self) -> list[str]:
        """Filesystems mounted inside the root, as relative paths (deepest first)."""
        return _mounts_below(os.path.realpath(self.root))

    def root_volume(self) -> tuple[str, frozenset[str]] | None:
        """The mount point of the filesystem the root lies on (the deepest one at or above its real path),
        and every mount point of this host (absolute paths); None when /proc/self/mountinfo cannot be read."""
        points = _all_mounts()
        if points is None:
            return None
        real = os.path.realpath(self.root)
        holding = max((m for m in points if m == "/" or real == m or real.startswith(m.rstrip("/") + "/")),
                      key=len, default="/")
        return holding, frozenset(points)

    def existing(self) -> dict[str, LocalEntry]:
        return scan_target(self.root, {"", *self.mount_points()})

    def repositories_at(self, dirs: Iterable[str], subtrees: Iterable[str]) -> list[str]:
        """Which of ``dirs`` (relative) are drsync repositories, and which directories at any depth of
        ``subtrees`` are: each is a directory whose ``config.json`` says ``kind: drsync-repository``.
        Links are never followed."""
        found = [d for d in dirs if is_repository(os.path.join(self.root, d) if d else self.root)]
        for top in subtrees:
            full = os.path.join(self.root, top)
            if not os.path.isdir(full) or os.path.islink(full):
                continue
            for dirpath, _dirnames, filenames in os.walk(full):
                if REPO_CONFIG in filenames and is_repository(dirpath):
                    found.append(os.path.relpath(dirpath, self.root))
        return found

    def walk_existing(self) -> Iterator[EntryColumns]:
        """:meth:`existing` as columns in the manifest's order (:func:`walk_target_columns`), walked by a
        thread of its own a few runs ahead (:func:`drsync.tree.read_ahead`)."""
        return read_ahead(walk_target_columns(self.root, {"", *self.mount_points()}), batch=1, depth=8,
                          name="drsync-target-walk")

    def same_content(self, e: Entry, have: LocalEntry) -> bool:
        try:
            with Beneath(self.root) as fs:
                fd = fs.open_read(have.path)
            with os.fdopen(fd, "rb", buffering=0) as f:
                return stream_matches(f, e)
        except OSError:
            return False

    def owners_settable(self) -> bool:
        return os.geteuid() == 0

    def root_entry(self) -> Entry | None:
        """The root directory's own mode, owner, time and extended attributes (path ""); None when it is not a
        directory (missing). A root given as a symlink to a directory is that directory. One this user may not
        read has its mode, owner and time (its attributes taken as none)."""
        try:
            s = os.stat(self.root)
        except OSError:
            return None
        if not st.S_ISDIR(s.st_mode):
            return None
        mode = st.S_IMODE(s.st_mode)
        if (mode & 0o700) == 0o700 and s.st_uid == os.geteuid() != 0:  # opened up by an apply cut short?
            with contextlib.suppress(OSError), Beneath(self.root) as fs:
                mode = _read_record(fs).get("modes", {}).get("", mode)
        return Entry("", DIR, mode, s.st_uid, s.st_gid, 0, s.st_mtime_ns, None, [], [], read_xattrs(self.root)[0])

    def open_root(self) -> int | None:
        """Open the root up (owner rwx) for an apply when this user owns it but may not write or search it (a
        read-only root restored as such); returns the mode it had, or None when nothing was changed. That mode
        is recorded (the staging area's record) until the apply gives the root its own: an apply killed
        meanwhile leaves the root open, and the next one takes the recorded mode as the root's
        (:meth:`root_entry`)."""
        if os.geteuid() == 0:
            return None
        s = os.stat(self.root)
        mode = st.S_IMODE(s.st_mode)
        if s.st_uid != os.geteuid():
            return None
        if (mode & 0o700) != 0o700:
            os.chmod(self.root, mode | 0o700)
        with Beneath(self.root) as fs:
            record = _read_record(fs)
            recorded = record.get("modes", {}).get("")
            if recorded is None and (mode & 0o700) != 0o700:
                record.setdefault("modes", {})[""] = recorded = mode
                _write_record(fs, record)
        self._root_opened = recorded is not None
        return recorded

    def set_root(self, e: Entry) -> None:
        """Give the root directory ``e``'s owner (as root), extended attributes, mode and time. OSError."""
        if self._root_opened:  # the mode recorded when the apply opened the root up is the root's no more
            self._root_opened = False
            with Beneath(self.root) as fs:
                record = _read_record(fs)
                if record.get("modes", {}).pop("", None) is not None:
                    if any(record.values()) or _staging_kind(fs, STAGING, (RECORD_NAME,)) != "marked" or len(
                            os.listdir(fs.dir_fd(STAGING))) > 1:
                        _write_record(fs, record)
                    else:  # nothing else staged there (a refused apply): the staging area goes
                        fs.forget(STAGING)
                        fs.remove_tree(STAGING)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._set_file_meta(fd, dataclasses.replace(e, path="."))  # named "." in what it reports
            os.fsync(fd)
        finally:
            os.close(fd)

    def link_max(self, lead: str, name: str) -> int:
        """How many names the file at ``lead`` may have for ``name`` to be made one of them: 0 when a filesystem
        mounted in the root parts them, else ``fpathconf(PC_LINK_MAX)`` of the filesystem holding ``lead`` (at
        its mount point's directory, not followed; 0 when it cannot be opened): 65,000 on ext4, 1 on vfat;
        glibc answers 127 for a filesystem it does not know."""
        domain = self._domain(lead)
        if domain != self._domain(name):
            return 0
        if domain not in self._link_max:  # one filesystem a domain (the root's, or one mounted in it)
            try:
                with Beneath(self.root) as fs:
                    self._link_max[domain] = os.fpathconf(fs.dir_fd(domain), "PC_LINK_MAX")
            except OSError:
                self._link_max[domain] = 0
        return self._link_max[domain]

    def claim(self, what: str) -> AbstractContextManager[None]:
        """Nothing more: the apply lock's flocks hold a local root (one host reaches it)."""
        return nullcontext()

    def claimant(self) -> str | None:
        return None

    def verify_claim(self, what: str) -> None:
        """Nothing to check: a local root's flocks are held by the kernel for as long as the apply runs."""

    def journal(self) -> RootJournal:
        return RootJournal(self.root)

    def _domain(self, rel: str) -> str:
        """The mount point (relative; "" for the root's own filesystem) holding ``rel``."""
        for m in self._mounts:
            if rel.startswith(m + "/"):
                return m
        return ""

    @staticmethod
    def _staging_of(domain: str) -> str:
        return f"{domain}/{STAGING}" if domain else STAGING

    def check_plan(self, plan: ApplyPlan) -> None:
        """Refuse up front what the commit could not do: move a mount point, or change a directory
        this user may not write (unless it owns it and can open it up). A hard link that would span
        two filesystems mounted in the target is written as a copy instead (and reported)."""
        self._mount_list = self.mount_points()
        across = [e for e in plan.hardlink if self._domain(e.path) != self._domain(e.hardlink or "")]
        if across:
            plan.hardlink = [e for e in plan.hardlink if e not in across]
            plan.write.extend(across)
            self.warnings.append(f"{len(across)} hard link(s) would span two filesystems and were written as "
                                 f"copies (e.g. {printable(across[0].path)})")
        mounts = set(self._mounts)
        moved = itertools.chain(plan.remove, (e.path for e in plan.write), (e.path for e in plan.link))
        for p in moved if mounts else ():
            hit = p if p in mounts else next((m for m in self._mounts if m.startswith(p + "/")), None)
            if hit is not None:
                raise UsageError(f"a filesystem is mounted at {os.path.join(self.root, hit)}, where the snapshot "
                                 f"has no directory (it would replace {p}); unmount it or restore elsewhere; "
                                 f"nothing was changed")
        # What exists and will change: new paths need only their directory to be writable. Walked, never
        # listed: a plan that fixes the modes of a million files holds them as manifest rows.
        def changed() -> Iterator[tuple[str, bool]]:  # (path, the commit sets its metadata)
            yield from ((p, False) for p in itertools.chain(plan.remove, plan.replaces))
            yield from ((e.path, True) for e in plan.fix_meta)

        dirs = sorted({"", *(plan.touched_dirs or ())})
        with Beneath(self.root) as fs:
            for rel, _ in itertools.chain(((d, False) for d in dirs), changed()):
                if _frozen(fs, rel):
                    raise OperationFailed(f"{os.path.join(self.root, rel)} is immutable or append-only (chattr); "
                                          f"clear the flag (chattr -i -a) or restore elsewhere; nothing was changed")
            if os.geteuid() == 0:
                return
            me = os.geteuid()
            finish = {e.path for e in plan.dirs_to_finish(made=False)}  # made ones are not there yet
            for rel, meta in itertools.chain(((d, False) for d in dirs), changed()):
                try:
                    s = fs.lstat(rel)
                    parent = fs.lstat(rel.rpartition("/")[0]) if rel else None
                except PermissionError:
                    continue  # behind a directory that is itself checked (the plan opens up what it passes)
                if s is None or s.st_uid == me:
                    continue
                full = os.path.join(self.root, rel) if rel else self.root
                why = None
                if st.S_ISDIR(s.st_mode) and rel in dirs and not os.access(full, os.W_OK | os.X_OK):
                    why = "cannot be written"
                elif rel in finish or meta:
                    why = "its mode and times can only be set by its owner"
                elif st.S_ISDIR(s.st_mode) and rel not in dirs and not os.access(full, os.W_OK):
                    why = "a directory is moved away only by a user who may write it"  # rename(2) to the trash
                elif parent is not None and parent.st_mode & st.S_ISVTX and parent.st_uid != me:
                    why = "it lies in a sticky directory of another user"
                if why:
                    raise OperationFailed(f"{full}: permission denied (owned by uid {s.st_uid}; {why}); run drsync "
                                          f"as the owner of the data root or as root; nothing was changed")

    def foreign_staging(self, top_only: bool = False) -> str | None:
        try:
            if self.missing():
                return None
            return self._foreign_staging(top_only)
        except OSError:  # a root that cannot be read: what reads it next says so
            return None

    def _foreign_staging(self, top_only: bool) -> str | None:
        with Beneath(self.root) as fs:
            # The root's holds the apply's record (written first) or journal; without one, staged files are
            # nobody's. A mounted filesystem's holds only staged files, made after the root's record.
            top = _staging_kind(fs, STAGING, (RECORD_NAME, JOURNAL_NAME))
            if top in ("foreign", "drsync's"):
                return os.path.join(self.root, STAGING)
            for d in () if top_only else self.mount_points():
                rel = self._staging_of(d)
                kind = _staging_kind(fs, rel, ())
                if kind == "foreign" or (kind == "drsync's" and top != "marked"):
                    return os.path.join(self.root, rel)
        return None

    def reset_staging(self, plan: ApplyPlan) -> None:
        used = {""} | ({self._domain(p) for p in itertools.chain(
            plan.remove, (e.path for e in itertools.chain(plan.write, plan.link, plan.hardlink)))}
            if self._mounts else set())  # no mount point below the root: one domain, no walk of the lists
        with Beneath(self.root) as fs:
            # Making a staging area moves its directory's mtime: the times they had are recorded
            # durably first, and an apply that ends before its commit (failed, or killed and
            # recovered) sets them back.
            record = _read_record(fs)
            record["mtimes"] = {d: (fs.lstat(d) if d else os.fstat(fs.root_fd)).st_mtime_ns  # type: ignore[union-attr]
                                for d in sorted(used) if not d or fs.lstat(d) is not None}
            _write_record(fs, record)
            for d in sorted(used):
                rel = self._staging_of(d)
                if d:
                    with _writable(fs, d):
                        fs.remove_tree(rel)
                        fs.mkdir(rel, 0o700)
                else:
                    _empty_keeping(fs, rel, {RECORD_NAME})
                fs.mkdir(f"{rel}/trash", 0o700)
                # Making the staging area moved the mount point's mtime: the commit sets it back.
                if d and plan.touched_dirs is not None:
                    plan.touched_dirs.add(d)
        with Beneath(self.root) as fs:
            for d in sorted(used):
                self._staging_fds[d] = os.dup(fs.dir_fd(self._staging_of(d)))

    def staged_name(self, n: int, e: Entry) -> str:
        """Where :meth:`write_staged` puts the ``n``-th file of a plan (relative to the root)."""
        return f"{self._staging_of(self._domain(e.path))}/{n}"

    def write_staged(self, n: int, e: Entry, data: Iterable[bytes]) -> str:
        domain = self._domain(e.path)
        dfd = self._staging_fds[domain]
        fd = os.open(str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            for piece in data:
                for view in _data_runs(piece) if e.sparse else (memoryview(piece),):
                    if view.readonly and len(view) and view.obj is _HOLE:
                        os.lseek(fd, len(view), os.SEEK_CUR)  # a hole, as the file had
                        continue
                    while view:
                        view = view[os.write(fd, view):]
            if e.sparse:
                os.ftruncate(fd, e.size)
            if e.size >= WRITEBACK_MIN:
                fsutil.start_writeback(fd)  # the disk writes it while the next file is staged; flush() waits
            self._set_file_meta(fd, e)
        finally:
            os.close(fd)
        return f"{self._staging_of(domain)}/{n}"

    def _set_file_meta(self, fd: int, e: Entry) -> None:
        """Give the open file ``fd`` entry ``e``'s owner (as root), extended attributes, mode and time."""
        if os.geteuid() == 0:
            os.fchown(fd, e.uid, e.gid)
        self._set_xattrs(fd, e)
        os.fchmod(fd, e.mode)  # after the ACL: the mode's group bits are the ACL mask
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def flush(self) -> None:
        """One syncfs per filesystem the apply touches (the root's and each mount point's)."""
        for d in ["", *self._mounts]:
            full = os.path.join(self.root, d) if d else self.root
            if os.path.isdir(full):
                fsutil.syncfs(full)

    def drop_staging(self) -> None:
        """Remove the staging areas (the root's journal stays until its caller removes it), setting
        each staging area's directory back to the mtime in the record: the one it had before the
        apply, or after a commit the one the commit gave it (see :meth:`seal`)."""
        for fd in self._staging_fds.values():
            os.close(fd)
        self._staging_fds = {}
        if self.missing():
            return
        stray = self.foreign_staging()
        if stray is not None:  # not drsync's: recovery and clean-up leave it as it is (the apply refuses it)
            log.warning("%s holds what drsync did not put there; left as it is", stray)
            return
        with Beneath(self.root) as fs:
            mtimes = _read_record(fs).get("mtimes", {})
            for d in self.mount_points():
                rel = self._staging_of(d)
                if fs.lstat(rel) is not None:
                    fs.forget(rel)
                    with _writable(fs, d):
                        fs.remove_tree(rel)
                if d in mtimes and fs.lstat(d) is not None:
                    with contextlib.suppress(OSError):  # a read-only mount: nothing there moved either
                        fs.utime(d, mtimes[d])
            s = fs.lstat(STAGING)
            if s is not None and not st.S_ISDIR(s.st_mode):
                fs.unlink(STAGING)
            elif s is not None:
                _empty_keeping(fs, STAGING, {JOURNAL_NAME, RECORD_NAME})
                with contextlib.suppress(FileNotFoundError):
                    fs.unlink(f"{STAGING}/{RECORD_NAME}")  # last: a replay needs it until here
                if fs.lstat(f"{STAGING}/{JOURNAL_NAME}") is None:
                    fs.forget(STAGING)
                    fs.remove_tree(STAGING)
            if "" in mtimes:
                os.utime(fs.root_fd, ns=(mtimes[""], mtimes[""]))

    def seal(self) -> None:
        """After a commit, before its journal says done: record the mtimes the commit gave the
        directories holding staging areas, so that removing those areas (even replayed after a
        crash half-way) ends with them."""
        with Beneath(self.root) as fs:
            record = _read_record(fs)
            record["mtimes"] = {d: fs.lstat(d).st_mtime_ns for d in self.mount_points()  # type: ignore[union-attr]
                                if fs.lstat(self._staging_of(d)) is not None and fs.lstat(d) is not None}
            _write_record(fs, record)

    def settle(self) -> None:
        """Set back directory modes a scan opened up and was killed before restoring."""
        if self.missing():
            return
        with Beneath(self.root) as fs:
            record = _read_record(fs)
            if not record.get("modes"):
                return
            opened = record["modes"].pop("", None) if self._root_opened else None  # this apply's: kept
            for rel, mode in record["modes"].items():
                s = fs.lstat(rel) if rel else os.fstat(fs.root_fd)
                if s is not None and st.S_ISDIR(s.st_mode):
                    if rel:
                        fs.chmod(rel, mode)
                    else:
                        os.fchmod(fs.root_fd, mode)
            record["modes"] = {"": opened} if opened is not None else {}
            _write_record(fs, record)

    def remove_root(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def commit(self, plan: ApplyPlan, staged: dict[str, str]) -> None:
        """Every step checks what is already done, so a replay after a crash at any instant, any
        number of times, ends in the same tree: paths that go away are renamed into the trash under
        a number (present there = done), directories are made unless they exist, staged files are
        renamed unless already gone, links are made unless right, metadata is set again."""
        at = [""]
        try:
            self._commit(plan, staged, at)
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.path.join(self.root, at[0])) from None

    def _commit(self, plan: ApplyPlan, staged: dict[str, str], at: list[str]) -> None:
        root_owner = os.geteuid() == 0
        with Beneath(self.root) as fs:
            for path in plan.unlock:
                at[0] = path
                s = fs.lstat(path)
                if s is not None and st.S_ISDIR(s.st_mode) and (s.st_mode & 0o700) != 0o700:
                    fs.chmod(path, st.S_IMODE(s.st_mode) | 0o700)
            for k, path in enumerate(plan.remove):
                at[0] = path
                trash = f"{self._staging_of(self._domain(path))}/trash/{k}"
                if fs.lstat(trash) is not None:
                    continue  # moved by the run this one completes
                if fs.lstat(path) is None:
                    fs.mkdir(trash)  # gone already: mark the step done all the same
                else:
                    _move_aside(fs, path, trash)
            for e in plan.mkdir:
                at[0] = e.path
                s = fs.lstat(e.path)
                if s is None:
                    fs.mkdir(e.path, 0o700)
                elif not st.S_ISDIR(s.st_mode):
                    raise OperationFailed(f"{os.path.join(self.root, e.path)} appeared during the apply and is not "
                                          f"a directory; stop what writes into the target and run again")
            for n, e in enumerate(plan.write):
                at[0] = e.path
                src = staged.get(e.path) or self.staged_name(n, e)
                if fs.lstat(src) is None:
                    s = fs.lstat(e.path)
                    if s is None or not st.S_ISREG(s.st_mode):
                        raise OperationFailed(f"staged file {src} for {e.path} is gone; the apply cannot be "
                                              f"completed; restore the target from a snapshot")
                    continue  # moved already by the interrupted run this one completes
                fs.rename(src, e.path, directory=False)
            allocators.give_back()  # the written files' entries, before the hard links' (their names read too)
            copied: list[tuple[str, str, int]] = []  # (path, why, size): names written as copies of the group file
            for k, e in enumerate(plan.hardlink):
                at[0] = e.path
                lead = e.hardlink or ""
                s, ls = fs.lstat(e.path), fs.lstat(lead)
                if ls is None or not st.S_ISREG(ls.st_mode):
                    raise OperationFailed(f"{os.path.join(self.root, lead)} is missing after the commit placed it; "
                                          f"stop what writes into the target and run again")
                if s is not None and (s.st_ino, s.st_dev) == (ls.st_ino, ls.st_dev):
                    continue  # linked already
                tmp = f"{self._staging_of(self._domain(e.path))}/H{k}"
                fs.remove_tree(tmp)
                try:
                    fs.link(lead, tmp)
                except OSError as err:
                    # The group has more names than this filesystem lets one file have (EMLINK: ext4 allows
                    # 65,000), or it makes no hard links at all: the name gets a file of its own with the same
                    # bytes. A replay finds it unlinked and copies it again: the same end.
                    if err.errno not in _NO_MORE_LINKS:
                        raise
                    _copy_of(fs, lead, tmp, e, self._set_file_meta)
                    copied.append((e.path, err.strerror or str(err), e.size))
                fs.rename(tmp, e.path, directory=False)
            self.link_copies = len(copied)
            self.link_copy_bytes = sum(size for _, _, size in copied)
            if copied:
                self.warnings.append(f"{len(copied)} name(s) of hard-linked files written as copies, not links: "
                                     f"{printable(copied[0][0])}: {copied[0][1]} (the target's filesystem allows fewer "
                                     f"names a file than the snapshot's group has, or no hard links)")
            for k, e in enumerate(plan.link):
                at[0] = e.path
                s = fs.lstat(e.path)
                # A link that shares its inode with another name (``ln`` of a symlink, inside the target or out)
                # is made anew: setting its time or owner in place would change that other name too.
                if s is None or not st.S_ISLNK(s.st_mode) or s.st_nlink > 1 or fs.readlink(e.path) != e.target:
                    tmp = f"{self._staging_of(self._domain(e.path))}/L{k}"
                    fs.remove_tree(tmp)
                    fs.symlink(e.target or "", tmp)
                    fs.rename(tmp, e.path, directory=False)
                if root_owner:
                    fs.chown(e.path, e.uid, e.gid)
                fs.utime(e.path, e.mtime_ns)
            for e in plan.fix_meta:
                at[0] = e.path
                if root_owner:
                    fs.chown(e.path, e.uid, e.gid)
                self._set_xattrs_at(fs, e)
                fs.chmod(e.path, e.mode)
            # Deepest directories first, so setting a child's times does not disturb its parent's.
            for e in plan.dirs_to_finish():
                at[0] = e.path
                if root_owner:
                    fs.chown(e.path, e.uid, e.gid)
                s = fs.lstat(e.path)
                if s is None or not st.S_ISDIR(s.st_mode):
                    raise OperationFailed(f"{os.path.join(self.root, e.path)} is not a directory after the "
                                          f"commit; stop what writes into the target and run again")
                self._set_xattrs_at(fs, e)
                if st.S_IMODE(s.st_mode) != e.mode:
                    fs.chmod(e.path, e.mode)
                if s.st_mtime_ns != e.mtime_ns:
                    fs.utime(e.path, e.mtime_ns)

    def _set_xattrs_at(self, fs: Beneath, e: Entry) -> None:
        try:
            fd = fs.open_read(e.path) if e.type == FILE else os.open(
                e.path.rpartition("/")[2], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=fs.dir_fd(e.path.rpartition("/")[0]))
        except PermissionError:
            self.warnings.append(f"{printable(e.path)}: extended attributes not set (cannot open it)")
            return
        try:
            self._set_xattrs(fd, e)
        finally:
            os.close(fd)

    def _set_xattrs(self, fd: int, e: Entry) -> None:
        """Make the file's extended attributes (ACLs included) exactly the manifest's."""
        want = dict(decode_xattrs(e.xattrs))
        try:
            have = {os.fsencode(n) for n in os.listxattr(fd)}
        except OSError as err:
            if want:
                self.warnings.append(f"{printable(e.path)}: extended attributes not set ({err.strerror or err})")
            return
        for name in have - set(want):
            with contextlib.suppress(OSError):
                os.removexattr(fd, name)
        for name, value in want.items():
            try:
                os.setxattr(fd, name, value)
            except OSError as err:
                self.warnings.append(f"{printable(e.path)}: extended attribute {printable(os.fsdecode(name))} "
                                     f"not set ({err.strerror or err})")


JOURNAL_NAME = "journal.json"
# What an apply must set back if it ends before its commit (modes a scan opened, mtimes staging moved).
RECORD_NAME = "restore.json"


def _read_record(fs: Beneath) -> dict[str, dict[str, int]]:
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=fs.dir_fd(STAGING))
    except OSError:
        return {}
    try:
        if not st.S_ISREG(os.fstat(fd).st_mode):
            return {}
        with os.fdopen(os.dup(fd), "rb") as f:
            doc = documents.loads(f.read(), allow_nan=True)
    except ValueError:
        return {}  # written atomically; anything else is not ours
    finally:
        os.close(fd)
    try:
        return {k: {str(p): _exact_int(v) for p, v in doc.get(k, {}).items()} for k in ("modes", "mtimes")}
    except (AttributeError, TypeError, ValueError):
        return {}  # not what drsync writes: not ours either


def _exact_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not an integer")
    return v


def _write_record(fs: Beneath, doc: dict[str, dict[str, int]]) -> None:
    """Durably, atomically, into the root's staging area (made a real directory if it is not one)."""
    _real_dir(fs, STAGING)
    fs.write_atomic(f"{STAGING}/{RECORD_NAME}", json.dumps(doc).encode())


def _staging_kind(fs: Beneath, rel: str, marks: tuple[str, ...]) -> str:
    """What is at staging area ``rel``: "absent", "empty" (a directory), "marked" (a directory holding one
    of ``marks`` as a regular file, and otherwise only names an apply gives its files), "drsync's" (only such
    names, no mark), or "foreign" (anything else: a file, a link, another name, or unreadable)."""
    try:
        s = fs.lstat(rel)
        if s is None:
            return "absent"
        if not st.S_ISDIR(s.st_mode):
            return "foreign"
        with os.scandir(fs.dir_fd(rel)) as it:
            entries = [(x.name, _kind_of(x)) for x in it]
        if not entries:
            return "empty"
        marked = False
        for name, kind in entries:
            if name in marks:  # written atomically: a JSON object, or it is not drsync's
                if kind != "file" or not _json_object(fs, f"{rel}/{name}"):
                    return "foreign"
                marked = True
            # the new one Beneath.write_atomic was writing beside a mark (NAME.<12 hex digits>) when killed:
            # the record is written first, so one killed then leaves this alone
            elif name[:-13] in marks and name[-13:-12] == "." and _is_hex(name[-12:]):
                if kind != "file":
                    return "foreign"
                marked = True
            elif _staged_kind(name) != kind:
                return "foreign"
    except OSError:
        return "foreign"
    return "marked" if marked else "drsync's"


def _kind_of(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "link"
    return "dir" if entry.is_dir(follow_symlinks=False) else "file" if entry.is_file(follow_symlinks=False) \
        else "other"


def _json_object(fs: Beneath, rel: str) -> bool:
    """Whether ``rel`` holds a JSON object, as drsync's record and journal do (one of more than 1 MiB, a
    large apply's journal, by its first character: reading it is the journal's own check)."""
    fd = fs.open_read(rel)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read((1 << 20) + 1)
    finally:
        os.close(fd)
    if len(data) > 1 << 20:
        return data.lstrip()[:1] == b"{"
    try:
        return isinstance(documents.loads(data, allow_nan=True), dict)
    except ValueError:
        return False


def _staged_kind(name: str) -> str:
    """What an apply stages under ``name``: ``N`` and ``HN`` a file (a new hard link's too), ``LN`` a link,
    ``trash`` a directory; "" for a name it never uses."""
    def number(text: str) -> bool:
        return text.isdecimal() and text.isascii()
    if name == "trash":
        return "dir"
    if number(name) or (name[:1] == "H" and number(name[1:])):
        return "file"
    return "link" if name[:1] == "L" and number(name[1:]) else ""


def _is_hex(text: str) -> bool:
    return len(text) == 12 and all(c in "0123456789abcdef" for c in text)


def _real_dir(fs: Beneath, rel: str) -> bool:
    """Make ``rel`` a real directory (replacing a file or link there); True when it was one already."""
    s = fs.lstat(rel)
    if s is not None and st.S_ISDIR(s.st_mode):
        return True
    if s is not None:
        fs.unlink(rel)
    fs.mkdir(rel, 0o700)
    return False


def _empty_keeping(fs: Beneath, rel: str, keep: set[str]) -> None:
    """Make ``rel`` an empty real directory but for the names in ``keep``."""
    if not _real_dir(fs, rel):
        return
    with os.scandir(fs.dir_fd(rel)) as it:
        names = [x.name for x in it]
    for name in names:
        if name not in keep:
            fs.remove_tree(f"{rel}/{name}")
_FS_IOC_GETFLAGS = 0x80086601
_FROZEN_FLAGS = 0x10 | 0x20  # FS_IMMUTABLE_FL | FS_APPEND_FL


def _frozen(fs: Beneath, rel: str) -> bool:
    """Whether an existing file or directory carries the immutable or append-only flag."""
    import fcntl

    try:
        fd = fs.open_read(rel) if rel else os.dup(fs.root_fd)
    except OSError:
        return False  # missing, a link, or unreadable to us: nothing a flag check can tell
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8)
    except OSError:
        return False  # the filesystem has no such flags
    finally:
        os.close(fd)
    return bool(int.from_bytes(buf[:4], "little") & _FROZEN_FLAGS)


class RootJournal:
    """The journal of an apply that has none of its own, in the target's staging area. Read and
    written only through descriptors that follow no link, and only if it is a regular file: whoever
    can write the target must not be able to point drsync at another journal or another place."""

    REL = f"{STAGING}/{JOURNAL_NAME}"

    def __init__(self, root: str) -> None:
        self.root = root

    def load(self) -> bytes | None:
        try:
            with Beneath(self.root) as fs:
                pfd, name = fs.dir_fd(STAGING), JOURNAL_NAME
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
        except OSError:
            return None  # none, or not ours (a link, or no staging directory): the apply resets it
        try:
            if not st.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def save(self, data: bytes | Iterable[bytes]) -> None:
        with Beneath(self.root) as fs:
            fs.write_atomic(self.REL, data)

    def remove(self) -> None:
        with Beneath(self.root) as fs:
            try:
                fs.unlink(self.REL)
            except (FileNotFoundError, NotADirectoryError):
                return
            os.fsync(fs.dir_fd(STAGING))


@contextmanager
def _writable(fs: Beneath, rel: str) -> Iterator[None]:
    """``rel`` (a mount point in the target: its staging area is made and removed in it) opened up while
    inside, when this user owns it but may not write it (the snapshot has it read-only); its mode set back
    after, or after a kill by the next apply's :meth:`LocalDataRoot.settle` (the record holds it)."""
    s = fs.lstat(rel)
    me = os.geteuid()
    if s is None or me == 0 or s.st_uid != me or (s.st_mode & 0o300) == 0o300:
        yield
        return
    mode = st.S_IMODE(s.st_mode)
    record = _read_record(fs)
    record.setdefault("modes", {}).setdefault(rel, mode)
    _write_record(fs, record)
    fs.chmod(rel, mode | 0o700)
    try:
        yield
    finally:
        fs.chmod(rel, mode)
        record = _read_record(fs)
        record.get("modes", {}).pop(rel, None)
        _write_record(fs, record)


def _move_aside(fs: Beneath, path: str, trash: str) -> None:
    """Rename into the trash; a directory this user owns but may not write (moving a directory to
    another parent rewrites its ``..``) is opened up first."""
    try:
        fs.rename(path, trash)
    except PermissionError:
        s = fs.lstat(path)
        if s is None or not st.S_ISDIR(s.st_mode) or s.st_uid != os.geteuid():
            raise
        fs.chmod(path, st.S_IMODE(s.st_mode) | 0o700)
        fs.rename(path, trash)


def _empty_lost_found(e: os.DirEntry[str]) -> bool:
    if e.name != "lost+found" or not e.is_dir(follow_symlinks=False):
        return False
    try:
        with os.scandir(e.path) as it:
            return next(it, None) is None
    except OSError:
        return False  # unreadable: say it may hold data


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
_HOLE = bytes(1 << 20)  # views of this object stand for holes


def _data_runs(piece: bytes | memoryview) -> Iterator[memoryview]:
    """A sparse file's chunk as runs of data and of holes (views of ``_HOLE``), block by block, so that
    a restored sparse file is allocated where the original was, to 4 KiB."""
    raw = bytes(piece)  # bytes compare with memcmp; memoryviews element by element
    view = memoryview(raw)
    if raw == bytes(len(raw)):
        for at in range(0, len(view), len(_HOLE)):
            yield memoryview(_HOLE)[:min(len(_HOLE), len(view) - at)]
        return
    start = 0  # of the current data run
    for at in range(0, len(view), _BLOCK):
        if raw[at:at + _BLOCK] == _ZERO_BLOCK:
            if at > start:
                yield view[start:at]
            yield memoryview(_HOLE)[:_BLOCK]
            start = at + _BLOCK
    if start < len(view):
        yield view[start:]


def _all_mounts() -> list[str] | None:
    """Every mount point of this process's mount namespace (/proc/self/mountinfo); None when unreadable."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return [_unescape_mountinfo(line.split()[4]) for line in f if len(line.split()) > 4]
    except OSError:
        return None


def _in_filesystem(real: str) -> tuple[str, str] | None:
    """Where the real path ``real`` lies: its filesystem's device (``major:minor``) and its path from that
    filesystem's root, through the mount that holds it (a bind mount's root below the filesystem's own
    is added: ``/mnt/b`` binding ``/srv/data`` gives ``/srv/data/...``); None when mountinfo is unreadable."""
    best: tuple[str, str, str] | None = None  # mount point, device, root
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                point = _unescape_mountinfo(fields[4])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= len(best[0])):  # the deepest; the last mounted there
                    best = (point, fields[2], _unescape_mountinfo(fields[3]))
    except OSError:
        return None
    if best is None:
        return None
    point, device, root = best
    rest = real[len(point.rstrip("/")):]
    return device, (root.rstrip("/") + rest) or "/"


def _mounts_below(real_root: str) -> list[str]:
    """Mount points strictly inside ``real_root`` (from /proc/self/mountinfo), deepest first."""
    prefix = real_root.rstrip("/") + "/"
    points = _all_mounts() or []
    rel = {p[len(prefix):] for p in points if p.startswith(prefix)}
    return sorted(rel, key=lambda p: (-p.count("/"), p))


def scan_target(root: str, domain_tops: set[str]) -> dict[str, LocalEntry]:
    """Every entry of an apply's target by path (:func:`walk_target`, held whole: HDFS-sized trees,
    tests and the few callers that need random access)."""
    return {e.path: e for e in walk_target(root, domain_tops)}


def walk_target(root: str, domain_tops: set[str]) -> Iterator[LocalEntry]:
    """Every entry of an apply's target, whatever it is, one at a time in the manifest's order (path
    bytes; a directory's contents placed by ``name + "/"`` as :func:`drsync.tree.scan_tree` does), so a
    planner merges it with a manifest holding only one directory's listing per level: links wherever
    they point, special files (type ``other``), so that the plan replaces rather than follows them.
    drsync's staging areas (``.drsync-staging`` at the top of the root and of each mount point) are left
    out. A directory this user owns but cannot list is opened for the walk and set back when the walk
    ends (or is closed); one it cannot list and does not own is an error naming it (raised before
    anything changes). Directories are read through descriptors, so paths beyond PATH_MAX are walked
    too. Raises OperationFailed."""
    opened: list[tuple[str, int]] = []
    with Beneath(root) as fs:
        try:
            me = os.geteuid()
            # An item of a listing is (key, entry) for an entry or (key, None, rel) for a directory's contents.
            yield from in_path_order(_target_listing(fs, "", domain_tops, me, opened),
                                     lambda item: _target_listing(fs, item[2], domain_tops, me, opened))
        finally:
            _set_back(fs, opened)


def _set_back(fs: Beneath, opened: list[tuple[str, int]]) -> None:
    """Give the directories a target walk opened up their modes back, last opened first."""
    for rel, mode in reversed(opened):
        with contextlib.suppress(OSError):
            if rel:
                fs.chmod(rel, mode)
            else:
                os.fchmod(fs.root_fd, mode)
    if opened:
        record = _read_record(fs)
        record["modes"] = {}
        _write_record(fs, record)


def walk_target_columns(root: str, domain_tops: set[str]) -> Iterator[EntryColumns]:
    """:func:`walk_target` as runs of columns (:class:`drsync.tree.EntryColumns`): the same entries in the
    same order, each run a stretch of one directory's listing that no other directory's entries come
    between. A directory is listed through the C listing without a Python object per entry; one holding
    special files, or whose paths may pass PATH_MAX, the way :func:`walk_target` lists it. Same errors, and
    the same setting back of the directories it opened up when it ends or is closed."""
    opened: list[tuple[str, int]] = []
    ahead: native_walk.ReadAhead[_Listed | None] = native_walk.ReadAhead()
    with Beneath(root) as fs:
        try:
            me = os.geteuid()
            frames = [(_target_columns(fs, "", domain_tops, me, opened), 0)]
            while frames:
                (columns, subdirs), at = frames.pop()
                if subdirs:
                    (pos, rel, _), rest = subdirs[0], subdirs[1:]
                    if pos > at:
                        yield columns.slice(at, pos)
                    frames.append(((columns, rest), pos))
                    read_ahead_too = rel in ahead.ahead
                    listed = ahead.take(rel)
                    if listed is None and read_ahead_too:
                        ahead.settle()  # listed in turn with no descriptor held by read-ahead (ReadAhead.settle)
                    frames.append((listed or _target_columns(fs, rel, domain_tops, me, opened), 0))
                    if native_walk.available():
                        _plan_target(ahead, frames, fs.root, domain_tops, me)
                elif at < len(columns):
                    yield columns.slice(at, len(columns))
        finally:
            ahead.close()
            _set_back(fs, opened)


_Listed = tuple[EntryColumns, list[tuple[int, str, int]]]  # a directory's columns and its subdirectories


def _plan_target(ahead: native_walk.ReadAhead[_Listed | None], frames: list[tuple[_Listed, int]], root: str,
                 domain_tops: set[str], me: int) -> None:
    """Read ahead, up to the bound, the next directories of the target walk's innermost frames (a few of
    each: a frame of many small directories is not looked through again and again)."""
    for (_, subdirs), _ in reversed(frames):
        for _, rel, dir_bytes in subdirs[:4 * native_walk.PREFETCH_AHEAD]:
            if ahead.full:
                return
            if native_walk.worth_reading_ahead(dir_bytes):
                ahead.submit(rel, _read_target, root, rel, domain_tops, me)


def _read_target(root: str, rel_dir: str, domain_tops: set[str], me: int) -> _Listed | None:
    """One directory of the target walk listed ahead of it, on another thread: with its own descriptor (opened
    beneath the root, never through a symlink), and nothing noted, opened up or raised. None: anything out of
    the plain case (a directory to open up, special files, problems, a long path, an error), which the walk
    then lists itself (:func:`_target_columns`), as it lists any directory it did not read ahead."""
    full_dir = os.path.join(root, rel_dir)
    if len(os.fsencode(full_dir)) + 256 > fsutil.LONG_PATH:
        return None
    try:
        fd = fsutil.open_beneath(root, rel_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        s = os.fstat(fd)
        if not (s.st_uid != me or me == 0 or (s.st_mode & 0o500) == 0o500):
            return None  # this user's, not readable: opened up by the walk (and set back)
        staging = (os.fsencode(STAGING),) if rel_dir in domain_tops else ()
        columns, subdirs, specials, problems = native_walk.target_columns(fd, rel_dir, staging,
                                                                          os.fsencode(full_dir))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if specials or problems else (columns, subdirs)


def _target_columns(fs: Beneath, rel_dir: str, domain_tops: set[str], me: int,
                    opened: list[tuple[str, int]]) -> _Listed:
    """One directory of :func:`walk_target_columns`: its columns and ``(pos, rel, dir_bytes)`` of each
    subdirectory (``dir_bytes`` 0 where not known)."""
    if native_walk.available():
        try:
            dfd = _open_listable(fs, rel_dir, me, opened)
        except FileNotFoundError:
            return EntryColumns.of_entries([]), []
        full_dir = os.path.join(fs.root, rel_dir) if rel_dir else fs.root
        if len(os.fsencode(full_dir)) + 256 <= fsutil.LONG_PATH:
            staging = (os.fsencode(STAGING),) if rel_dir in domain_tops else ()
            try:
                columns, subdirs, specials, problems = native_walk.target_columns(dfd, rel_dir, staging,
                                                                                  os.fsencode(full_dir))
            except FileNotFoundError:
                return EntryColumns.of_entries([]), []
            _raise_problems(full_dir, problems)
            if not specials:
                return columns, subdirs
    entries: list[LocalEntry] = []
    subdirs = []
    for item in reversed(_target_listing(fs, rel_dir, domain_tops, me, opened)):  # ascending
        if item[1] is None:
            subdirs.append((len(entries), item[2], 0))
        else:
            entries.append(item[1])
    return EntryColumns.of_entries(entries), subdirs


def _target_listing(fs: Beneath, rel_dir: str, domain_tops: set[str], me: int,
                    opened: list[tuple[str, int]]) -> list[tuple]:  # type: ignore[type-arg]
    """One directory of :func:`walk_target`: its entries examined and sorted descending by key."""
    from drsync.apply import OTHER

    try:
        dfd = _open_listable(fs, rel_dir, me, opened)
        if native_walk.available():
            return _target_listing_native(fs, dfd, rel_dir, domain_tops)
        names = os.listdir(dfd)
    except FileNotFoundError:
        return []
    prefix = f"{rel_dir}/" if rel_dir else ""
    out: list[tuple] = []  # type: ignore[type-arg]
    for name in names:
        if name == STAGING and rel_dir in domain_tops:
            continue
        try:
            s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise OperationFailed(f"target directory {os.path.join(fs.root, rel_dir)}: its entries cannot be "
                                  f"examined (permission denied); run drsync as the owner of the data root or "
                                  f"as root; nothing was changed") from None
        m = s.st_mode
        rel = prefix + name
        key = os.fsencode(name)
        target = None
        if st.S_ISREG(m):
            typ = FILE
        elif st.S_ISDIR(m):
            typ = DIR
            out.append((key + b"/", None, rel))
        elif st.S_ISLNK(m):
            typ, target = SYMLINK, os.readlink(name, dir_fd=dfd)
        else:
            typ = OTHER
        full = os.path.join(fs.root, rel)
        if typ not in (FILE, DIR):
            xattrs = None
        elif len(os.fsencode(full)) <= fsutil.LONG_PATH:
            xattrs = read_xattrs(full)[0]  # one llistxattr for the many entries that have none
        else:
            xattrs = _xattrs_at(dfd, name)
        out.append((key, LocalEntry(rel, typ, m & 0o7777, s.st_uid, s.st_gid, s.st_size if typ == FILE else 0,
                                    s.st_mtime_ns, target, s.st_ino, xattrs, s.st_nlink)))
    out.sort(key=lambda item: item[0], reverse=True)  # keys are unique: a name never holds "/"
    return out


def _target_listing_native(fs: Beneath, dfd: int, rel_dir: str,
                           domain_tops: set[str]) -> list[tuple]:  # type: ignore[type-arg]
    """:func:`_target_listing` through the C listing (:func:`drsync.native_walk.target_entries`): the same
    entries, read without a Python call per entry (special files and refusals as there)."""
    from drsync.apply import OTHER

    full_dir = os.path.join(fs.root, rel_dir) if rel_dir else fs.root
    long = len(os.fsencode(full_dir)) + 256 > fsutil.LONG_PATH  # some entry's path (in bytes) may pass it
    staging = (os.fsencode(STAGING),) if rel_dir in domain_tops else ()
    items, specials, problems = native_walk.target_entries(dfd, rel_dir, staging,
                                                           None if long else os.fsencode(full_dir))
    _raise_problems(full_dir, problems)
    if long:  # extended attributes read entry by entry, as the Python listing does
        for item in items:
            e = item[1]
            if e is not None and e.type in (FILE, DIR):
                full = os.path.join(fs.root, e.path)
                e.xattrs = (read_xattrs(full)[0] if len(os.fsencode(full)) <= fsutil.LONG_PATH
                            else _xattrs_at(dfd, e.path.rpartition("/")[2]))
    if specials:
        prefix = f"{rel_dir}/" if rel_dir else ""
        for name in specials:
            try:
                s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            rel = prefix + os.fsdecode(name)
            items.append((os.fsencode(rel), LocalEntry(rel, OTHER, s.st_mode & 0o7777, s.st_uid, s.st_gid, 0,
                                                       s.st_mtime_ns, None, s.st_ino, None, s.st_nlink)))
        items.sort(key=lambda item: item[0], reverse=True)
    return items


def _raise_problems(full_dir: str, problems: list[tuple[bytes, int]]) -> None:
    """An entry of a target directory that could not be examined stops the walk (nothing changed yet)."""
    for name, err in problems:
        if err in (errno.EACCES, errno.EPERM):
            raise OperationFailed(f"target directory {full_dir}: its entries cannot be examined (permission "
                                  f"denied); run drsync as the owner of the data root or as root; nothing was "
                                  f"changed")
        raise OSError(err, os.strerror(err), os.path.join(full_dir, os.fsdecode(name)))


REPO_CONFIG = fmt.CONFIG_NAME


def is_repository(path: str) -> bool:
    """Whether directory ``path`` holds a drsync repository (its config.json says so; read at most 64 KiB).
    Only a regular file is read: a device node or fifo of that name is never opened (opening some has
    effects: a watchdog armed, a tape rewound)."""
    try:
        fd = fsutil.open_regular(os.path.join(path, REPO_CONFIG))
    except OSError:
        return False
    try:
        doc = documents.loads(os.read(fd, 65536) or b"null", allow_nan=True)
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    return isinstance(doc, dict) and doc.get("kind") == fmt.REPOSITORY_KIND


def _xattrs_at(dfd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None  # unreadable to us: compared as having none
    try:
        return read_xattrs(fd)[0]
    finally:
        os.close(fd)


def _open_listable(fs: Beneath, rel: str, me: int, opened: list[tuple[str, int]]) -> int:
    """The directory's descriptor; one this user owns but cannot read is opened up (and noted)."""
    try:
        fd = fs.dir_fd(rel)
        s = os.fstat(fd)
        if s.st_uid != me or me == 0 or (s.st_mode & 0o500) == 0o500:
            return fd  # readable; searching it is checked entry by entry
    except PermissionError:
        s = fs.lstat(rel) if rel else os.fstat(fs.root_fd)
    full = os.path.join(fs.root, rel)
    if s is None:
        raise FileNotFoundError(full)
    if s.st_uid != me:
        raise OperationFailed(f"target directory {full}: cannot be listed (permission denied, owned by uid "
                              f"{s.st_uid}); run drsync as the owner of the data root or as root; nothing was "
                              f"changed") from None
    # Ours: opened for the scan (and what lies below it), its mode set back when the scan ends (or,
    # after a kill, by the next apply's settle); the commit opens what it changes again and finishes
    # with the snapshot's mode.
    opened.append((rel, st.S_IMODE(s.st_mode)))
    record = _read_record(fs)
    record.setdefault("modes", {}).setdefault(rel, st.S_IMODE(s.st_mode))
    _write_record(fs, record)
    if rel:
        fs.chmod(rel, st.S_IMODE(s.st_mode) | 0o500)
        return fs.dir_fd(rel)
    os.fchmod(fs.root_fd, st.S_IMODE(s.st_mode) | 0o500)
    return fs.root_fd


# link(2)'s answers that no further name can be linked to that file here: too many links, or hard links not
# supported by the filesystem (EPERM on vfat; also fs.protected_hardlinks refusing a file this user cannot write).
_NO_MORE_LINKS = frozenset({errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP})


def _copy_of(fs: Beneath, lead: str, tmp: str, e: Entry, set_meta: Callable[[int, Entry], None]) -> None:
    """Write ``tmp`` as a copy of the file ``lead`` (both relative to ``fs``'s root, neither followed if a
    link) with entry ``e``'s metadata (``set_meta``), durably (fsynced). Raises OSError."""
    src = fs.open_read(lead)
    try:
        fd = fs.create(tmp)
        try:
            size = os.fstat(src).st_size
            for start, end in fsutil.data_ranges(src, size) if e.sparse else ((0, size),):
                done = start
                while done < end:  # the holes between ranges stay holes (copy_file_range would fill them)
                    n = os.copy_file_range(src, fd, end - done, done, done)
                    if n == 0:
                        break  # the file shrank: it is the group's file as committed, so this does not happen
                    done += n
            os.ftruncate(fd, size)  # a hole at the end
            set_meta(fd, e)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(src)
