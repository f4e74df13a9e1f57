"""A data root on HDFS, through WebHDFS (:mod:`drsync.storage.hdfs` holds the client).

Capture: when the root is snapshottable, each capture takes an HDFS snapshot
``drsync-<capture time in ms>-<host>-<pid>`` and reads ``<root>/.snapshot/<name>``, which
nothing can change; otherwise it reads the live tree and re-reads files that
change (the local rules), and says so once in the log. Where the namenode has
``GETSNAPSHOTDIFF``, the snapshot of the previous capture is kept as the base
of the next one, and the next capture lists only the directories the diff
touches: unchanged subtrees come from the parent manifest without a walk.
The base it replaces is deleted once a capture succeeds, and so is every
leftover of a crashed capture (its process is gone, or it is over an hour
old); a capture running concurrently keeps its own.

Apply: files are staged under ``<root>/.drsync-staging``, then renamed into
place (WebHDFS RENAME never replaces a file, so the old one is deleted first;
a journaled apply replays this idempotently). HDFS keeps modification times in
milliseconds and owners as names: owners are not replicated onto HDFS, and
symlinks (disabled in Hadoop) are skipped with a warning.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import posixpath
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from drsync import documents, faults, fsutil
from drsync.dataroot import STAGING, UNKNOWN_ID, FileVersion, stream_matches
from drsync.dataroot.distcp import HISTORY_PREFIX
from drsync.dataroot.hdfs_lease import RootLease, is_lease
from drsync.errors import RefusedError, UsageError
from drsync.flocks import ApplyBusy
from drsync.native_walk import UNLISTED_KEPT
from drsync.repository import chunks
from drsync.repository.manifest import DIR, FILE, SYMLINK, Entry
from drsync.repository.manifest_check import symlink_leaves_root
from drsync.storage.hdfs import HdfsError, HdfsFs, HdfsPermissionDenied, bounded, parse_hdfs_url
from drsync.text import printable
from drsync.tree import RESERVED_NAMES, LocalEntry, TreeScan

if TYPE_CHECKING:
    from drsync.apply import ApplyPlan
    from drsync.repository.manifest import Manifest

log = logging.getLogger("drsync.hdfs")
T = TypeVar("T")

SNAPSHOT_PREFIX = "drsync-"
STALE_SNAPSHOT_MS = 3600_000
FULL_WALK_EVERY_MS = 3600_000
_TYPES = {"FILE": FILE, "DIRECTORY": DIR, "SYMLINK": SYMLINK}
_warned_not_snapshottable: set[str] = set()
_warned_unlistable: set[str] = set()


_HOST = socket.gethostname().replace("-", "_") or "host"


def _stamp(name: str) -> str:
    """The capture time (ms) in a drsync snapshot's name: ``drsync-<ms>-<host>-<pid>``."""
    return name[len(SNAPSHOT_PREFIX):].split("-", 1)[0]


def _own(name: str) -> bool:
    """Whether a drsync snapshot was taken by this process (kept as a DistCp source, now superseded)."""
    stamp = _stamp(name)
    return stamp.isdigit() and name == f"{SNAPSHOT_PREFIX}{stamp}-{_HOST}-{os.getpid()}"


def _alive_here(name: str) -> bool:
    """Whether a drsync snapshot was taken on this host by a process that still runs (an agent)."""
    stamp = _stamp(name)
    host, _, pid = name[len(SNAPSHOT_PREFIX) + len(stamp) + 1:].rpartition("-")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover(name: str, now_ms: int) -> bool:
    stamp = _stamp(name)
    if not stamp.isdigit():
        return False  # not one of ours after all: leave it alone
    if now_ms - int(stamp) > STALE_SNAPSHOT_MS:
        return True
    rest = name[len(SNAPSHOT_PREFIX) + len(stamp) + 1:]
    host, _, pid = rest.rpartition("-")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True  # its capture crashed
    except PermissionError:
        return False
    return False


def _version(s: dict[str, Any]) -> FileVersion:
    mtime = int(s["modificationTime"]) * 1_000_000
    return FileVersion(int(s["length"]), mtime, mtime, int(s.get("fileId", 0)), int(s["permission"], 8),
                       UNKNOWN_ID, UNKNOWN_ID)


class HdfsOpenFile:
    def __init__(self, fs: HdfsFs, path: str, before: dict[str, Any], raw: Any, frozen: bool) -> None:
        self._fs, self._path, self._raw, self._frozen = fs, path, raw, frozen
        self.before = _version(before)

    def pieces(self) -> Iterator[memoryview | bytes]:
        yield from chunks.cut_stream(self._raw)

    def after(self) -> FileVersion:
        if self._frozen:
            return self.before  # a snapshot cannot change
        s = self._fs.status(self._path)
        if s is None:
            raise FileNotFoundError(self._path)
        return _version(s)

    def xattrs(self) -> tuple[bytes | None, str | None]:
        return None, None


class _Reuse:
    """What a snapshot diff says about the tree: where to look, and what the parent manifest still covers."""

    def __init__(self, diff: list[dict[str, str]], parent: Manifest) -> None:
        self.look: set[str] = set()    # touched paths and their ancestors: list these directories
        self.fresh: set[str] = set()   # created or renamed-in subtrees: walk them whole
        for d in diff:
            for key in ("sourcePath", "targetPath"):
                p = (d.get(key) or "").strip("/")
                if p in ("", "."):
                    continue
                parts = p.split("/")
                self.look.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
            if d.get("type") in ("CREATE", "RENAME"):
                target = (d.get("targetPath") if d.get("type") == "RENAME" else d.get("sourcePath")) or ""
                self.fresh.add(target.strip("/"))
        cols = {c: parent.pycolumn(c) for c in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns",
                                                "ctime_ns", "inode", "target")}
        self.cols = cols
        self.paths: list[str] = cols["path"]
        self.dirs = {p for p, ty in zip(cols["path"], cols["type"], strict=True) if ty == DIR}

    def reusable(self, rel: str) -> bool:
        """True when the directory ``rel`` is untouched and the parent manifest has its subtree."""
        if rel in self.look or rel not in self.dirs:
            return False
        parts = rel.split("/")
        return not any("/".join(parts[:i]) in self.fresh for i in range(1, len(parts) + 1))

    def add_subtree(self, scan: TreeScan, rel: str) -> None:
        prefix = rel + "/"
        i = bisect.bisect_left(self.paths, prefix)
        c = self.cols
        while i < len(self.paths) and self.paths[i].startswith(prefix):
            scan.path.append(c["path"][i])
            scan.type.append(c["type"][i])
            scan.mode.append(c["mode"][i])
            scan.uid.append(c["uid"][i])
            scan.gid.append(c["gid"][i])
            scan.size.append(c["size"][i])
            scan.mtime_ns.append(c["mtime_ns"][i])
            scan.ctime_ns.append(c["ctime_ns"][i])
            scan.inode.append(c["inode"][i])
            scan.target.append(c["target"][i])
            scan.nlink.append(1)
            scan.dev.append(0)
            scan.blocks.append((c["size"][i] + 511) // 512)
            i += 1


class HdfsFrozenRoot:
    small_file_threads = None  # each read is round trips to the namenode and a datanode: threads overlap them

    def __init__(self, fs: HdfsFs, path: str, live_root: str, *, consistent: bool,
                 reuse: _Reuse | None = None, snapshot: str | None = None, frozen_ms: int | None = None,
                 parent: Manifest | None = None) -> None:
        self.fs, self.path, self.live_root = fs, path, live_root
        self.snapshot = snapshot  # the HDFS snapshot this view reads, if any
        self.frozen_ms, self.parent = frozen_ms, parent  # when it was taken (namenode ms); the last capture
        self.consistent = consistent
        self.reuse = reuse
        self.notes: list[str] = []
        self.open_files: list[str] = []
        self.listed_dirs = 0  # how many directories the scan listed (the diff's saving shows here)

    def scan(self, exclude: frozenset[str]) -> TreeScan:
        return walk(self.fs, self.path, exclude=exclude, live_root=self.live_root, reuse=self.reuse,
                    counter=self, frozen_ms=self.frozen_ms, parent=self.parent)

    def xattrs(self, rel: str) -> tuple[bytes | None, str | None]:
        """Not carried on HDFS (WebHDFS GETXATTRS exists; documented as not replicated)."""
        return None, None

    @contextmanager
    def _file(self, rel: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """A file's path and status, HDFS errors as the OSErrors capture expects (vanished, denied).

        In a snapshot, a file that was open for write is not frozen (HDFS's default
        dfs.namenode.snapshot.capture.openfiles=false): its length there grows as the writer
        completes blocks, so such a file is noted (and read no further than the length looked at)."""
        path = posixpath.join(self.path, rel)
        try:
            before = self.fs.status(path)
            if before is None or before["type"] != "FILE":
                raise FileNotFoundError(errno.ENOENT, "vanished", path)
            if self.consistent and _whole_blocks(before):
                self._note_if_open(rel, int(before["length"]))
            yield path, before
        except HdfsPermissionDenied as e:
            raise PermissionError(errno.EACCES, f"permission denied ({e})", path) from None
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                raise FileNotFoundError(errno.ENOENT, "vanished", path) from None
            raise

    @contextmanager
    def open_file(self, rel: str) -> Iterator[HdfsOpenFile]:
        with self._file(rel) as (path, before), \
                self.fs.open(path, length=int(before["length"]) if self.consistent else None) as raw:
            yield HdfsOpenFile(self.fs, path, before, raw, self.consistent)

    def warm(self, rels: list[str]) -> int:
        """Nothing (0): each read is round trips to the namenode and a datanode, overlapped by threads instead."""
        return 0

    def checksum_file(self, rel: str) -> tuple[FileVersion, str, bytes]:
        """A file's version and HDFS checksum ``(algorithm, bytes)``, without reading its data here
        (a capture for DistCp). FileNotFoundError when it vanished, PermissionError when denied."""
        with self._file(rel) as (path, before):
            algorithm, value = self.fs.file_checksum(path)
            after = before if self.consistent else self.fs.status(path)
        if after is None or _version(after) != _version(before):
            raise OSError(errno.EAGAIN, "changed while its checksum was computed", path)
        return _version(before), algorithm, value

    def _note_if_open(self, rel: str, length: int) -> None:
        """Remember a file that is being written (or was written since the snapshot).

        Such a file shows only its completed blocks in the snapshot, and no later GETSNAPSHOTDIFF
        reports its growth or its close (seen on Hadoop 3.5): a capture that diffs against this
        snapshot would keep the short version for good. So this snapshot must not become the next
        diff base; the next capture walks the whole tree and compares sizes and times.
        """
        try:
            now = self.fs.open_for_write(posixpath.join(self.live_root, rel))
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return  # deleted since: a change the next diff reports
            raise
        if now is not None and (now[0] or now[1] != length):
            self.open_files.append(rel)


def _hdfs_holds(path: str, at_top: bool) -> bool:
    """Whether a namenode accepts this path relative to the root (DFSUtil.isValidName and the reserved
    names; ``.reserved`` only directly below ``/``, ``at_top``)."""
    parts = path.split("/")
    if at_top and parts[0] == ".reserved":
        return False
    return not any(":" in p or p in (".snapshot", ".", "..", "") for p in parts)


def _whole_blocks(status: dict[str, Any]) -> bool:
    """Whether a file's length is a whole number of its blocks (0 included): what an open file
    shows in a snapshot, so only such files are asked whether they are being written."""
    block = int(status.get("blockSize") or 0)
    return block > 0 and int(status["length"]) % block == 0


def _link_target(fs: HdfsFs, top: str, rel: str) -> bytes | None:
    """The target of the symlink at ``rel`` below ``top`` (None: nothing, no link there, or its parent
    cannot be listed), from its parent's listing (a file status resolves links)."""
    head, _, name = rel.rpartition("/")
    try:
        for s in fs.list_dir(posixpath.join(top, head) if head else top):
            if s["pathSuffix"] == name:
                return os.fsencode(s.get("symlink") or "/") if s["type"] == "SYMLINK" else None
    except HdfsError:
        return None  # gone, or not readable: taken as listed (what cannot be read never leaves a link out)
    return None


def walk(fs: HdfsFs, top: str, *, exclude: frozenset[str] = frozenset(), live_root: str | None = None,
         reuse: _Reuse | None = None, counter: HdfsFrozenRoot | None = None, frozen_ms: int | None = None,
         parent: Manifest | None = None) -> TreeScan:
    """Every entry below ``top`` as scan columns (paths relative to ``top``).

    ``frozen_ms``: when ``top`` is an HDFS snapshot, the namenode's time it was taken (ms). A snapshot
    does not freeze a directory's modification time (seen on Hadoop 3.5: a file created in ``d`` after
    the snapshot moves ``d``'s mtime under ``.snapshot/<name>`` too, while the file is not listed there).
    Such a directory gets the time ``parent`` (the previous capture) has for it when the snapshot lists
    the same children it had then, else ``frozen_ms``: never a time from after the snapshot."""
    scan = TreeScan(top)
    scan.read_link = lambda rel: _link_target(fs, top, os.fsdecode(rel))
    stack = [""]
    reused = False
    leaked: dict[str, int] = {}          # directory -> its row, where the listed mtime is after the snapshot
    listed_names: dict[str, set[str]] = {}
    while stack:
        rel_dir = stack.pop()
        try:
            children = list(fs.list_dir(posixpath.join(top, rel_dir) if rel_dir else top))
        except HdfsPermissionDenied:
            scan.unlisted.append(rel_dir)
            scan.warnings.append(f"{rel_dir or '.'}: cannot be listed (permission denied); {UNLISTED_KEPT}")
            continue
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                continue
            raise
        if counter is not None:
            counter.listed_dirs += 1
        names = listed_names.setdefault(rel_dir, set()) if rel_dir in leaked else None
        for s in children:
            name = s["pathSuffix"]
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name in RESERVED_NAMES or (exclude and rel in exclude):
                if rel_dir and name in RESERVED_NAMES:
                    scan.warnings.append(f"{rel}: the name is reserved for drsync's staging area; not captured")
                    scan.nested_staging.append(rel)
                if s["type"] in ("DIRECTORY", "SYMLINK"):  # a link there or below is read when a walk reaches it
                    scan.passed_over(os.fsencode(rel))
                continue
            typ = _TYPES.get(s["type"])
            if typ is None:
                scan.warnings.append(f"{rel}: unknown HDFS type {s['type']}; not captured")
                scan.specials.append(hash(os.fsencode(rel)))
                continue
            target = None
            if typ == SYMLINK:
                target = s.get("symlink") or ""
                if symlink_leaves_root(rel, target):
                    scan.warnings.append(f"{rel}: symlink to {target} leaves the data root; not captured")
                    scan.left_out(os.fsencode(rel))
                    continue
            v = _version(s)
            scan.path.append(rel)
            if names is not None:
                names.add(name)
            scan.type.append(typ)
            scan.mode.append(v.mode)
            scan.uid.append(UNKNOWN_ID)
            scan.gid.append(UNKNOWN_ID)
            scan.size.append(v.size if typ == FILE else 0)
            scan.mtime_ns.append(v.mtime_ns)
            scan.ctime_ns.append(v.ctime_ns)
            scan.inode.append(v.inode)
            scan.target.append(target)
            scan.nlink.append(1)
            scan.dev.append(0)
            scan.blocks.append((v.size + 511) // 512 if typ == FILE else 0)
            if typ == DIR:
                if frozen_ms is not None and int(s["modificationTime"]) > frozen_ms:
                    leaked[rel] = len(scan.path) - 1
                if reuse is not None and reuse.reusable(rel):
                    reuse.add_subtree(scan, rel)
                    reused = True
                    if rel in leaked:  # untouched up to the snapshot (the diff says so): the parent's time holds
                        listed_names[rel] = set()
                else:
                    stack.append(rel)
    if leaked:
        _settle_leaked_dir_times(scan, leaked, listed_names, parent, frozen_ms or 0, reused=reuse)
    scan.seal()
    if reused and scan.linked:
        # A directory taken from the parent was not listed: a reserved or excluded place in it, and a link
        # there that a kept link passes through, would go unseen. Links on HDFS are rare: list it all.
        return walk(fs, top, exclude=exclude, live_root=live_root, reuse=None, counter=counter,
                    frozen_ms=frozen_ms, parent=parent)
    scan.drop_escaping_links()
    return scan


def _settle_leaked_dir_times(scan: TreeScan, leaked: dict[str, int], listed_names: dict[str, set[str]],
                             parent: Manifest | None, frozen_ms: int, reused: _Reuse | None) -> None:
    """Give each directory whose listed mtime came from after the snapshot (see :func:`walk`) the
    previous capture's time for it when nothing was added, removed or renamed in it since, else
    the snapshot's own time."""
    before = _parent_dir_times(parent, leaked) if parent is not None else {}
    for rel, row in leaked.items():
        had = before.get(rel)
        untouched = reused is not None and reused.reusable(rel)
        if had is not None and (untouched or had[1] == listed_names.get(rel)):
            scan.mtime_ns[row] = had[0]
        else:
            scan.mtime_ns[row] = frozen_ms * 1_000_000
        scan.ctime_ns[row] = scan.mtime_ns[row]


def _parent_dir_times(parent: Manifest, dirs: Iterable[str]) -> dict[str, tuple[int, set[str]]]:
    """``{dir: (mtime_ns, names of its children)}`` in ``parent`` for the directories it has among ``dirs``
    (few: the ones changed while a capture listed them); one vectorised pass over its paths each."""
    paths = parent.table.column("path")
    out: dict[str, tuple[int, set[str]]] = {}
    for rel in dirs:
        key = os.fsencode(rel)
        row = pc.index(paths, pa.scalar(key, paths.type)).as_py()
        if row < 0 or parent.pycolumn_at("type", row) != DIR:
            continue
        prefix = key + b"/"
        below = paths.filter(pc.starts_with(paths, pattern=prefix))
        # An explicit stop: pyarrow 26's binary_slice without one fails on an even number of rows.
        rest = pc.binary_slice(below, len(prefix), stop=2**31 - 1) if len(below) else below
        names = {os.fsdecode(n) for n in rest.filter(pc.invert(pc.match_substring(rest, "/"))).to_pylist()} \
            if len(below) else set()
        out[rel] = (int(parent.pycolumn_at("mtime_ns", row)), names)
    return out


class HdfsDataRoot:
    mtime_resolution_ns = 1_000_000
    supports_symlinks = False
    mode_bits = 0o1777  # no setuid or setgid on HDFS
    supports_xattrs = False
    supports_distcp = True  # captures can keep their snapshot for DistCp (replication.engine = "distcp")
    lists_from_parent = True  # a capture lists only what the snapshot diff names; the rest is the parent's
    small_file_threads = None  # each file staged is round trips to the namenode and a datanode: threads overlap them

    def __init__(self, url: str, *, fs: HdfsFs | None = None, retry_s: float | None = None) -> None:
        self.warnings: list[str] = []
        self.location = parse_hdfs_url(url)
        self.fs = fs or HdfsFs(self.location, **bounded(retry_s))
        self.root = self.location.path
        self.url = self.location.url
        self._lease: RootLease | None = None
        self._root_after: Entry | None = None  # the root's metadata, set once the apply's claim is let go
        self._nested_staging: list[str] = []  # staging areas inside the root (:meth:`existing`)

    def _p(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    # --- capture ---

    def check_capturable(self) -> None:
        s = self.fs.status(self.root)
        if s is None:
            raise UsageError(f"data root {self.url} does not exist")
        if s["type"] != "DIRECTORY":
            raise UsageError(f"data root {self.url} is not a directory")
        if self.journal().load() is not None:
            # A restore onto this directory was cut short in its commit: part old tree, part new one.
            raise RefusedError(f"data root {self.url} holds a restore that was interrupted while it committed (a "
                               f"journal in {STAGING}): run that restore again to finish it, then capture; nothing "
                               f"was captured")

    @contextmanager
    def frozen(self, tag: str, parent_tag: str | None = None, parent: Manifest | None = None, *,
               keep: bool = False, pinned: frozenset[str] = frozenset()) -> Iterator[HdfsFrozenRoot]:
        """A read-only view of the root for one capture (see the module's docstring).

        ``keep``: the capture's HDFS snapshot outlives the capture, as the source DistCp copies from
        (``replication.engine = "distcp"``; the view's ``snapshot`` names it, and a root that cannot
        be snapshotted is refused). Then every other snapshot of this process goes once a capture
        succeeds, except the diff base and ``pinned`` (those a shipment still copies from).
        """
        name = f"{SNAPSHOT_PREFIX}{tag}-{_HOST}-{os.getpid()}"
        try:
            self.fs.create_snapshot(self.root, name)
        except HdfsError as e:
            if e.exception not in ("SnapshotException", "AccessControlException", "FileNotFoundException"):
                raise
            if keep:
                raise UsageError(f"data root {self.url} cannot be snapshotted ({str(e).split(' (', 1)[-1].rstrip(')')}"
                                 f"), and replication.engine = \"distcp\" copies from HDFS snapshots: run "
                                 f"'hdfs dfsadmin -allowSnapshot {self.root}' as the HDFS superuser") from None
            if self.url not in _warned_not_snapshottable:
                _warned_not_snapshottable.add(self.url)
                log.warning("data root %s is not snapshottable (%s); capturing the live tree, re-reading files "
                            "that change. For consistent captures: hdfs dfsadmin -allowSnapshot %s",
                            self.url, str(e).split(" (", 1)[-1].rstrip(")"), self.root)
            view = HdfsFrozenRoot(self.fs, self.root, self.root, consistent=False)
            yield view
            return
        existing = self._drsync_snapshots()
        listable = name in existing
        if not listable and self.url not in _warned_unlistable:
            # A gateway that hides <root>/.snapshot and lacks GETSNAPSHOTLIST: no snapshot can be
            # found again, so none is kept as the next diff base (kept ones would pile up forever).
            _warned_unlistable.add(self.url)
            log.warning("the snapshots of %s cannot be listed through %s; each capture deletes its own snapshot "
                        "and walks the whole tree. Point drsync at the namenodes' WebHDFS (not a gateway) for "
                        "incremental captures", self.url, ", ".join(self.location.namenodes))
        bases = [n for n in existing if parent_tag and _stamp(n) == parent_tag]
        base = bases[0] if bases else None
        if base is not None and tag.isdigit() and parent_tag and parent_tag.isdigit() \
                and int(tag) - int(parent_tag) > FULL_WALK_EVERY_MS:
            # A snapshot diff leaves out time-only changes (SETTIMES: touch -m, DistCp -pt), so a whole
            # walk at least this often bounds how stale a modification time can be.
            log.info("capturing %s by a whole walk: the last one is over %d minutes old", self.url,
                     FULL_WALK_EVERY_MS // 60_000)
            base = None
        reuse = None
        diff_supported = False
        if base is not None and parent is not None:
            diff = self.fs.snapshot_diff(self.root, base, name)
            if diff is not None:
                diff_supported = True
                reuse = _Reuse(diff, parent)
        else:  # one cheap call tells whether keeping this snapshot as the next base would pay
            diff_supported = self.fs.snapshot_diff(self.root, name, name) is not None
        frozen = posixpath.join(self.root, ".snapshot", name)
        # The snapshot's own directory carries the namenode's time it was taken (its subdirectories'
        # times are not frozen: see walk()).
        taken = self.fs.status(frozen)
        view = HdfsFrozenRoot(self.fs, frozen, self.root, consistent=True, reuse=reuse, snapshot=name,
                              frozen_ms=int(taken["modificationTime"]) if taken else None, parent=parent)
        ok = False
        try:
            yield view
            ok = True
            log.debug("captured %s from HDFS snapshot %s: %d directories listed%s", self.url, name, view.listed_dirs,
                     f" (the rest unchanged since {base}, by GETSNAPSHOTDIFF)" if reuse is not None else "")
        finally:
            if view.open_files:
                log.info("%d file(s) of %s were being written when captured (%s%s); snapshot %s is not kept as "
                         "the next diff base, so the next capture walks the whole tree", len(view.open_files),
                         self.url, ", ".join(view.open_files[:3]), ", ..." if len(view.open_files) > 3 else "", name)
            base_next = ok and diff_supported and listable and not view.open_files
            self._tidy(name, ok=ok, keep=ok and (keep or base_next), base=base, existing=existing,
                       sweep_own=keep and ok, pinned=pinned)

    def _drsync_snapshots(self) -> list[str]:
        return [n for n in self.fs.list_snapshots(self.root) if n.startswith(SNAPSHOT_PREFIX)]

    def _tidy(self, name: str, *, ok: bool, keep: bool, base: str | None, existing: list[str],
              sweep_own: bool = False, pinned: frozenset[str] = frozenset()) -> None:
        """Drop this capture's snapshot unless it is the next base, the base it replaces, and leftovers.

        A leftover is a drsync snapshot whose capture is over: taken on this host by a process that
        is gone (a crash), or over an hour old. A capture running concurrently keeps its own; a
        failed capture keeps the base, which the next attempt still diffs against.
        """
        now_ms = int(time.time() * 1000)
        doomed = [] if keep else [name]
        for n in existing:
            if n == name or n in pinned:
                continue
            if n == base:
                # Superseded by this capture's snapshot (or a full walk), when it is this process's or its
                # process is over: an agent's snapshot may still be a standby's DistCp source.
                if ok and (_own(n) or _leftover(n, now_ms) or not _alive_here(n)):
                    doomed.append(n)
            elif _leftover(n, now_ms) or (sweep_own and _own(n)):
                doomed.append(n)
        for n in doomed:
            try:
                self.fs.delete_snapshot(self.root, n)
            except HdfsError as e:
                log.warning("could not delete HDFS snapshot %s of %s: %s", n, self.url, e)

    # --- history (replication.engine = "distcp") ---

    def keep_history(self, snapshot_id: str) -> None:
        """Keep the root as it is now as HDFS snapshot ``drsync-snap-<snapshot id>`` (once)."""
        name = f"{HISTORY_PREFIX}{snapshot_id}"
        if name in self.history_snapshots():
            return
        try:
            self.fs.create_snapshot(self.root, name)
        except HdfsError as e:
            if e.exception == "SnapshotException" and "already" in str(e).lower():
                return
            raise

    def snapshottable(self) -> bool:
        """Whether HDFS snapshots of the root can be taken (``hdfs dfsadmin -allowSnapshot``)."""
        s = self.fs.status(self.root)
        return bool(s and s.get("snapshotEnabled"))

    def history_snapshots(self) -> list[str]:
        """The HDFS snapshots :meth:`keep_history` made, by name."""
        return [n for n in self.fs.list_snapshots(self.root) if n.startswith(HISTORY_PREFIX)]

    def drop_history(self, keep_ids: set[str]) -> list[str]:
        """Delete the history snapshots of drsync snapshots not in ``keep_ids``; returns their ids."""
        gone = []
        for n in self.history_snapshots():
            sid = n[len(HISTORY_PREFIX):]
            if sid not in keep_ids:
                self.fs.delete_snapshot(self.root, n)
                gone.append(sid)
        return gone

    def history_url(self, snapshot_id: str) -> str:
        """Where :meth:`keep_history` keeps a snapshot, as a path below the root's URL."""
        return f"{self.url.rstrip('/')}/.snapshot/{HISTORY_PREFIX}{snapshot_id}"

    def has_data(self) -> bool:
        try:
            return any(not s["pathSuffix"].startswith(".drsync") for s in self.fs.list_dir(self.root))
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return False
            raise

    # --- apply ---

    def prepare_target(self) -> bool:
        s = self.fs.status(self.root)
        if s is not None and s["type"] != "DIRECTORY":
            raise UsageError(f"target {self.url} exists and is not a directory; name a directory")
        if s is None:
            above = posixpath.dirname(self.root.rstrip("/"))
            while above not in ("", "/") and (up := self.fs.status(above)) is None:
                above = posixpath.dirname(above)
            if above not in ("", "/") and up is not None and up["type"] != "DIRECTORY":
                raise UsageError(f"target {self.url} cannot be made: {above} is not a directory; name a target "
                                 f"below a directory")
            self.fs.mkdirs(self.root)
            return True
        return False

    def missing(self) -> bool:
        s = self.fs.status(self.root)
        return s is None or s["type"] != "DIRECTORY"

    def relative_inside(self, path: str) -> str | None:
        if fsutil.is_local_location(path):
            return None
        try:
            other = parse_hdfs_url(path).path
        except (UsageError, ValueError):
            return None
        top = self.root.rstrip("/")
        if other.rstrip("/") == top:
            raise UsageError(f"{path} is the target itself; drsync's own files cannot be the data root")
        return other[len(top) + 1:].strip("/") if other.startswith(top + "/") else None

    def lies_within(self, path: str) -> bool:
        if fsutil.is_local_location(path):
            return False
        try:
            other = parse_hdfs_url(path).path.rstrip("/")
        except (UsageError, ValueError):
            return False
        top = self.root.rstrip("/")
        return top == other or top.startswith(other + "/")

    def existing(self) -> dict[str, LocalEntry]:
        scan = walk(self.fs, self.root)
        self._nested_staging = scan.nested_staging  # checked for other applies' leases (check_plan)
        return scan.entries()

    def same_content(self, e: Entry, have: LocalEntry) -> bool:
        try:
            with self.fs.open(self._p(have.path)) as raw:
                return stream_matches(raw, e)
        except HdfsError:
            return False

    def owners_settable(self) -> bool:
        return False

    def root_entry(self) -> Entry | None:
        """The root directory's own permission and time (path ""; owners are names, never compared); None
        when it is not a directory (missing)."""
        s = self.fs.status(self.root)
        if s is None or s["type"] != "DIRECTORY":
            return None
        return Entry("", DIR, int(s["permission"], 8), UNKNOWN_ID, UNKNOWN_ID, 0,
                     int(s["modificationTime"]) * 1_000_000, None, [], [])

    def open_root(self) -> int | None:
        """Open the root up (owner rwx) for an apply when this URL's user owns it but may not write or search
        it; returns the permission it had, or None when nothing was changed."""
        s = self.fs.status(self.root)
        if s is None or s["type"] != "DIRECTORY":
            return None
        mode = int(s["permission"], 8)
        if (mode & 0o700) == 0o700 or not self.fs.location.user or s.get("owner") != self.fs.location.user:
            return None
        self.fs.set_permission(self.root, mode | 0o700)
        return mode

    def set_root(self, e: Entry) -> None:
        """Give the root directory ``e``'s time and permission (times first, as :meth:`finish_staged`); during
        an apply's :meth:`claim`, when the claim is let go (which moves the root's time)."""
        if self._lease is not None:
            self._root_after = e
            return
        self.fs.set_times(self.root, e.mtime_ns)
        self.fs.set_permission(self.root, e.mode & self.mode_bits)

    def link_max(self, lead: str, name: str) -> int:
        """1: HDFS has no hard links (a group's other names are written as copies: :meth:`check_plan`)."""
        return 1

    def check_plan(self, plan: ApplyPlan) -> None:
        """Refuse names a namenode refuses (``:`` anywhere, ``.snapshot``, ``.reserved`` at the top:
        DFSUtil.isValidName), before anything changes; HDFS has no mount points or symlinks to go
        through. What HDFS does not keep is reported: hard links are written as copies, extended
        attributes are not set."""
        for rel in self._nested_staging:  # another host's apply onto a directory inside this target
            holder = RootLease(self.fs, self._p(rel), self.url).holder()
            if holder is not None:
                raise ApplyBusy("this apply", f"{holder} is writing to {printable(self._p(posixpath.dirname(rel)))}"
                                f", inside {printable(self.url)}")
        at_top = self.root == "/"
        refused = [e.path for e in (*plan.write, *plan.mkdir, *plan.hardlink) if not _hdfs_holds(e.path, at_top)]
        if refused:
            shown = ", ".join(printable(p) for p in refused[:3]) + (f" and {len(refused) - 3} more"
                                                                   if len(refused) > 3 else "")
            raise UsageError(f"{self.url} cannot hold {len(refused)} path(s) of the snapshot ({shown}): HDFS "
                             f"refuses ':' in names and the names .snapshot and .reserved; nothing was changed. "
                             f"Rename them at the source, or restore onto a local disk")
        if plan.hardlink:
            self.warnings.append(f"{len(plan.hardlink)} hard link(s) written as copies: HDFS has no hard links "
                                 f"(e.g. {plan.hardlink[0].path})")
            plan.write.extend(plan.hardlink)
            plan.hardlink = []
        with_xattrs = sum(1 for e in (*plan.write, *plan.dirs) if e.xattrs)
        if with_xattrs:
            self.warnings.append(f"extended attributes of {with_xattrs} path(s) not set: drsync does not carry "
                                 f"them onto HDFS")

    @contextmanager
    def claim(self, what: str) -> Iterator[None]:
        """The root's lease for one apply, against applies from any host (:mod:`drsync.dataroot.hdfs_lease`)."""
        with RootLease(self.fs, self._staging, self.url).hold(what) as lease:
            above = self.root.rstrip("/")  # ours written first, then another host's apply onto a directory
            while above not in ("", "/"):  # holding this one looked for (it looks inside: check_plan)
                above = posixpath.dirname(above)
                holder = RootLease(self.fs, posixpath.join(above, STAGING), self.url).holder()
                if holder is not None:
                    busy = ApplyBusy(what, f"{holder} is writing to {printable(above)}, which holds "
                                           f"{printable(self.url)}")
                    log.warning("%s", busy)
                    raise busy
            self._lease = lease
            try:
                yield
            finally:
                self._lease = None
        # The root's own metadata once the lease is let go (its place in the staging area, gone now, moved the
        # root's time): what set_root was given while it was held.
        top, self._root_after = self._root_after, None
        if top is not None:
            try:
                self.set_root(top)
            except (HdfsError, OSError) as e:  # the apply is done: said, not failed
                log.warning("%s: its own permission or time not set (%s)", self.url, e)

    def verify_claim(self, what: str) -> None:
        """ApplyBusy when another host's apply took the root over from this one's lease (it was held up)."""
        if self._lease is not None:
            self._lease.verify(what)

    def claimant(self) -> str | None:
        return RootLease(self.fs, self._staging, self.url).holder()

    def journal(self) -> HdfsJournal:
        return HdfsJournal(self.fs, self._staging)

    @property
    def _staging(self) -> str:
        return self._p(STAGING)

    def foreign_staging(self, top_only: bool = False) -> str | None:
        try:
            kind = self.fs.status(self._staging)
            if kind is None:
                return None
            is_dir = kind.get("type") == "DIRECTORY"
            children = list(self.fs.list_dir(self._staging)) if is_dir else None
        except HdfsError:
            children = None
        if children is not None:
            # drsync's: empty, or its mark (or a journal) as a file, and otherwise only what an apply stages
            marks = [c for c in children
                     if c["pathSuffix"] == STAGING_MARK or is_lease(c["pathSuffix"]) or _journal_name(c["pathSuffix"])]
            if not children or (marks and all(c.get("type") == "FILE" for c in marks) and all(
                    _staged_name(c["pathSuffix"]) for c in children if c not in marks)):
                return None
        return f"{self.url.rstrip('/')}/{STAGING}"

    def reset_staging(self, plan: ApplyPlan) -> None:
        """An empty staging area but for the apply's lease (:meth:`claim`), with its mark and trash."""
        for name in self._staging_names():
            if not is_lease(name):
                delete_tree(self.fs, posixpath.join(self._staging, name))
        self.fs.mkdirs(self._staging, 0o700)
        self.fs.write(posixpath.join(self._staging, STAGING_MARK), b"", overwrite=True)  # first: see foreign_staging
        self.fs.mkdirs(posixpath.join(self._staging, "trash"), 0o700)

    def staged_name(self, n: int, e: Entry) -> str:
        """Where :meth:`write_staged` puts the ``n``-th file of a plan (relative to the root)."""
        return f"{STAGING}/{n}"

    def write_staged(self, n: int, e: Entry, data: Iterable[bytes]) -> str:
        """Returns the staged file's path relative to the root (a journal stays valid wherever the root is).
        ApplyBusy, nothing written, when this apply's lease was taken over (it was held up): the staging area
        is the new holder's."""
        if self._lease is not None:
            self._lease.verify_held("this apply")
        path = posixpath.join(self._staging, str(n))
        w = self.fs.writer(path, overwrite=True)
        try:
            for piece in data:
                w.write(bytes(piece))
        except BaseException:
            w.abort()
            raise
        w.close()
        return self.finish_staged(f"{STAGING}/{n}", e)

    def finish_staged(self, rel: str, e: Entry) -> str:
        """Give a staged file (written here, or by DistCp), ``rel`` below the root, the entry's times
        and mode; returns ``rel``. The namenode applies its umask at CREATE, so the mode is set
        afterwards, and after the times: a real namenode wants WRITE access for SETTIMES, owners too."""
        path = self._p(rel)
        self.fs.set_times(path, e.mtime_ns)
        self.fs.set_permission(path, e.mode)
        return rel

    def flush(self) -> None:
        """Nothing to do: a closed HDFS file is on its datanodes, and namenode edits are logged."""

    def drop_staging(self) -> None:
        """The staging area goes, except a journal still in it (the caller removes that, then calls again).
        One that is not drsync's is left as it is (the apply refuses it), and so is one whose lease this
        apply lost (another apply's now)."""
        if self._lease is not None and self._lease.lost_now():
            log.warning("%s: this apply's lease was taken over; the staging area is left to its new holder", self.url)
            return
        stray = self.foreign_staging()
        if stray is not None:
            log.warning("%s holds what drsync did not put there; left as it is", stray)
            return
        names = self._staging_names()
        journals = [n for n in names if n.startswith(HdfsJournal.PREFIX)]
        if not journals and not any(is_lease(n) for n in names):
            delete_tree(self.fs, self._staging)
            return
        # A lease goes with the apply that holds it (its claim), which then removes the emptied directory.
        _side_by_side(lambda n: delete_tree(self.fs, posixpath.join(self._staging, n)),
                      [n for n in names if n not in journals and not is_lease(n)])

    def _staging_names(self) -> list[str]:
        """The names in the staging area (none when it does not exist)."""
        try:
            return [c["pathSuffix"] for c in self.fs.list_dir(self._staging)]
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return []
            raise

    def remove_root(self) -> None:
        """The target this apply made goes, unless something other than drsync's staging area is in it now:
        another host may have made it too, and restored into it (MKDIRS says nothing of who made a directory)."""
        try:
            others = [c["pathSuffix"] for c in self.fs.list_dir(self.root) if c["pathSuffix"] != STAGING]
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return
            raise
        if others:
            log.warning("%s: left in place: it holds %d path(s) this apply did not write", self.url, len(others))
            return
        delete_tree(self.fs, self.root)

    def settle(self) -> None:
        """Nothing to set back: an HDFS scan never changes modes."""

    def seal(self) -> None:
        """Nothing to record: the staging area's removal moves only the root's own mtime on HDFS."""

    def commit(self, plan: ApplyPlan, staged: dict[str, str]) -> None:
        """Each step's calls are independent of each other, so they go to the namenode side by side:
        an apply on HDFS is bound by round trips, not by the namenode's work. Each call checks what is
        done already, so a replay after a crash at any instant ends in the same tree: what goes away is
        renamed into the numbered trash (present there = done), staged files are moved unless gone."""
        faults.pause("hdfs-commit")  # tests: the journal is written, nothing moved yet
        fs = self.fs

        def writable(e: Entry) -> None:
            # HDFS checks permissions for owners too: directories we write into, and whose times we
            # set (SETTIMES needs WRITE), must be writable now, whatever mode they end with.
            s = fs.status(self._p(e.path))
            if s is not None and s["type"] == "DIRECTORY" and int(s["permission"], 8) & 0o700 != 0o700:
                fs.set_permission(self._p(e.path), int(s["permission"], 8) | 0o700)

        def trash(item: tuple[int, str]) -> None:
            k, path = item
            dst = posixpath.join(self._staging, "trash", str(k))
            if fs.status(dst) is not None:
                return  # moved by the run this one completes
            if fs.status(self._p(path)) is None:
                fs.mkdirs(dst, 0o700)  # gone already: mark the step done all the same
            elif not fs.rename(self._p(path), dst):
                raise HdfsError(f"HDFS refused to move {self._p(path)} aside; check that its directory is writable")

        def make_dir(e: Entry) -> None:
            s = fs.status(self._p(e.path))
            if s is None:
                fs.mkdirs(self._p(e.path), 0o700)
            elif s["type"] != "DIRECTORY":
                raise HdfsError(f"{self._p(e.path)} appeared during the apply and is not a directory")

        def move(item: tuple[int, Entry]) -> None:
            n, e = item
            src, dst = self._p(staged.get(e.path) or self.staged_name(n, e)), self._p(e.path)
            if fs.status(src) is None:
                if fs.status(dst) is None:
                    raise HdfsError(f"staged file {src} for {dst} is gone; the apply cannot be completed")
                return  # moved already by the interrupted run this one completes
            fs.delete(dst)  # RENAME never replaces: remove the old version of the same file first
            if not fs.rename(src, dst):
                raise HdfsError(f"HDFS refused to rename {src} to {dst}; check that the directory is writable")

        def finish_dir(e: Entry) -> None:
            # Times first: SETTIMES needs WRITE access (owners included) and SETPERMISSION moves no mtime.
            fs.set_times(self._p(e.path), e.mtime_ns)
            fs.set_permission(self._p(e.path), e.mode)

        # Only directories the apply changes are touched: a one-file change costs a few calls, not
        # two per directory of the tree.
        finish = plan.dirs_to_finish()
        _side_by_side(writable, finish)
        _side_by_side(trash, list(enumerate(plan.remove)))  # top-most paths only
        for depth_group in _by_depth(plan.mkdir, deepest_first=False):
            _side_by_side(make_dir, depth_group)
        _side_by_side(move, list(enumerate(plan.write)))
        _side_by_side(lambda e: fs.set_permission(self._p(e.path), e.mode), plan.fix_meta)
        # Deepest directories first (a directory's mode may take away what its children's calls need).
        for depth_group in _by_depth(finish, deepest_first=True):
            _side_by_side(finish_dir, depth_group)


def _by_depth(entries: list[Entry], *, deepest_first: bool) -> list[list[Entry]]:
    groups: dict[int, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.path.count("/"), []).append(e)
    return [groups[d] for d in sorted(groups, reverse=deepest_first)]


def _journal_name(name: str) -> bool:
    return name.startswith(HdfsJournal.PREFIX) and name[len(HdfsJournal.PREFIX):].isdecimal()


def _staged_name(name: str) -> bool:
    """A name an apply gives what it stages on HDFS: ``N`` (a file), ``trash``, ``distcp-<hex>`` (a copy)."""
    return name == "trash" or (name.isdecimal() and name.isascii()) or (
        name.startswith("distcp-") and all(c in "0123456789abcdef" for c in name[7:]))


# An empty file drsync writes first into every staging area it makes on HDFS (where a journal comes later): what
# it finds there is its own, never an operator's directory of that name.
STAGING_MARK = "drsync.staging"


class HdfsJournal:
    """An apply's journal on HDFS, where RENAME never replaces: each save is a new numbered file,
    written completely before the older ones are deleted; the newest one that parses is current."""

    PREFIX = "journal."

    def __init__(self, fs: HdfsFs, directory: str) -> None:
        self.fs = fs
        self.dir = directory

    def _names(self) -> list[tuple[int, str]]:
        try:
            out = []
            for c in self.fs.list_dir(self.dir):
                n = c["pathSuffix"]
                if n.startswith(self.PREFIX) and n[len(self.PREFIX):].isdigit():
                    out.append((int(n[len(self.PREFIX):]), n))
            return sorted(out)
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return []
            raise

    def load(self) -> bytes | None:

        for _, name in reversed(self._names()):
            with self.fs.open(posixpath.join(self.dir, name)) as raw:
                data = raw.read()
            try:
                documents.loads(data, allow_nan=True)
            except ValueError:
                continue  # cut short while written: the one before is current
            return data
        return None

    def save(self, data: bytes | Iterable[bytes]) -> None:
        names = self._names()
        seq = names[-1][0] + 1 if names else 1
        w = self.fs.writer(posixpath.join(self.dir, f"{self.PREFIX}{seq}"), overwrite=False)
        for piece in fsutil.pieces(data):
            w.write(bytes(piece))
        w.close()
        for _, old in names:
            self.fs.delete(posixpath.join(self.dir, old))

    def remove(self) -> None:
        for _, name in self._names():
            self.fs.delete(posixpath.join(self.dir, name))


# Namenode calls in flight at once while committing an apply (DRSYNC_HDFS_WORKERS to tune).
_COMMIT_WORKERS = max(1, int(os.environ.get("DRSYNC_HDFS_WORKERS", "8")))


def delete_tree(fs: HdfsFs, path: str) -> None:
    """Recursive DELETE of ``path`` (nothing if it is gone), read-only directories below it included.

    A namenode wants ALL access to every directory of the subtree, from its owner too
    (FSDirDeleteOp), so a tree that holds a read-only directory (a removed 0o555 directory moved to
    the trash) is refused as a whole. When that happens, every directory below that lacks the
    owner's rwx gets it (the tree is going away), then the delete is made again.
    """
    try:
        fs.delete(path, recursive=True)
        return
    except HdfsPermissionDenied:
        pass
    top = fs.status(path)
    if top is None:
        return
    todo = [(path, top)]
    while todo:
        p, st = todo.pop()
        if st["type"] != "DIRECTORY":
            continue
        mode = int(st["permission"], 8)
        if mode & 0o700 != 0o700:
            fs.set_permission(p, mode | 0o700)
        todo.extend((posixpath.join(p, c["pathSuffix"]), c) for c in fs.list_dir(p) if c["type"] == "DIRECTORY")
    fs.delete(path, recursive=True)


def _side_by_side(fn: Callable[[T], object], items: list[T]) -> None:
    """Run ``fn`` over independent items on a few threads; the first error is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=_COMMIT_WORKERS, thread_name_prefix="drsync-hdfs-commit") as pool:
        for f in [pool.submit(fn, item) for item in items]:
            f.result()
