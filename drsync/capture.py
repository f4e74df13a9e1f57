"""Capturing a data root (local or HDFS) into a manifest and new chunks.

Files whose (size, mtime, ctime, inode) match the parent snapshot reuse its
chunk list without being read, unless they were "racy" (modified within two
seconds of the parent's capture, when a same-tick rewrite could hide). Other
files are read, cut, hashed and stored by a small pool of threads (the
compiled cores release the GIL); files below ``SMALL_FILE_BYTES`` by as many
threads as the root says (one on a local filesystem). On a live tree a file that changes while it
is read is read again, a bounded number of times, then reported in
``warnings``; from a frozen view (an HDFS snapshot) nothing can change.

For ``replication.engine = "distcp"`` (``content=HDFS_CHECKSUM``) files are not read: each new or
changed file gets its HDFS checksum from a datanode (an external row, see
:func:`drsync.repository.manifest.is_external`), and the HDFS snapshot the capture read from is
kept as the source a standby's DistCp copies the bytes from.
"""

from __future__ import annotations

import bisect
import itertools
import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import allocators, volumes
from drsync.dataroot import SMALL_FILE_BYTES, DataRoot, FileVersion, FrozenRoot, open_data_root, small_files_pool
from drsync.errors import OperationFailed, UsageError
from drsync.hardlink_groups import LinkGroups, holds
from drsync.read_once import SharedInodes, Version
from drsync.repository import chunks
from drsync.repository.ids import IdSet
from drsync.repository.link_leaders import in_sorted
from drsync.repository.link_walk import LeftOut, may_escape, path_and_above
from drsync.repository.manifest import (
    DIR,
    EMPTY_CONTENT,
    FILE,
    SCHEMA,
    SYMLINK,
    Entry,
    Manifest,
    ManifestFile,
    ManifestWriter,
    bool_mask,
    column_groups,
    content_digest,
    hdfs_checksum_digest,
    sort_by_path,
)
from drsync.repository.manifest_check import validate
from drsync.repository.manifest_root import with_root
from drsync.repository.repo import ChunkWriter
from drsync.repository.snapshots import WarningLog
from drsync.repository.spool import Spool
from drsync.text import printable
from drsync.tree import TreeScan, escaping_in
from drsync.warming import Warming

# Reading tasks are batched so that tiny files do not pay one executor round trip each.
_BATCH_FILES = 256
_BATCH_BYTES = 32 * 1024 * 1024
_RACY_NS = 2_000_000_000
_INT64 = (-(1 << 63), (1 << 63) - 1)

ProgressFn = Callable[[int], None]

CHUNKS = "chunks"                 # file bytes are read, cut into chunks and stored in the repository
HDFS_CHECKSUM = "hdfs-checksum"   # file bytes stay in an HDFS snapshot; the manifest holds their checksum


@dataclass
class CaptureResult:
    # The manifest as stored (Parquet), hashed as it was written; in a temporary file past 16 MiB, so
    # that the capture's scan and the manifest's bytes are not in memory together (``manifest`` parses it).
    stored: Spool
    files: int = 0
    bytes: int = 0
    read_bytes: int = 0
    reused_files: int = 0
    # Every warning counted, the first few kept (fmt.WARNING_SAMPLE, clipped): a million unreadable
    # files cost a count, not a million strings.
    warnings: WarningLog = field(default_factory=WarningLog)
    # Paths that exist but could not be read: kept at their last captured version (marked stale).
    stale: int = 0
    # Paths that could not be captured at all (and had no earlier version): left out, reported.
    skipped: int = 0
    # content=HDFS_CHECKSUM: the HDFS snapshot kept for DistCp, and the checksum algorithm(s) seen.
    content_snapshot: str | None = None
    checksum_algorithms: set[str] = field(default_factory=set)
    # Filesystems mounted inside the root -> files on each, as the snapshot records them (drsync.volumes).
    volumes: dict[str, int] = field(default_factory=dict)
    # The filesystem a local root lies on, off the host's root filesystem (drsync.volumes.root_volume_gone).
    root_volume: dict[str, str] = field(default_factory=dict)
    _parsed: Manifest | None = field(default=None, repr=False)

    @property
    def manifest(self) -> Manifest:
        """The manifest as a table (parsed from :attr:`stored` on first use)."""
        if self._parsed is None:
            self._parsed = Manifest.from_bytes(self.stored, "the captured manifest")
        return self._parsed


@dataclass(slots=True)
class _ReadFile:
    """What reading one file produced: its version as seen after the read, sized by what was read."""

    chunks: list[bytes]
    chunk_sizes: list[int]
    content: bytes
    version: FileVersion
    problem: str | None = None
    xattrs: bytes | None = None
    xattr_problem: str | None = None


def _read_one(view: FrozenRoot, rel: str, writer: ChunkWriter, attempts: int,
              progress: ProgressFn | None) -> _ReadFile | str:
    """Read, cut and store one file. Returns what was read, or "vanished"/a problem string."""
    result: _ReadFile | None = None
    for _attempt in range(attempts + 1):
        try:
            with view.open_file(rel) as f:
                before = f.before
                ids: list[bytes] = []
                sizes: list[int] = []
                for data in f.pieces():
                    cid = chunks.chunk_id(data)
                    writer.add(cid, data)
                    ids.append(cid)
                    sizes.append(len(data))
                    if progress:
                        progress(len(data))
                after = f.after()
                xattrs, xattr_problem = f.xattrs()
        except FileNotFoundError:
            return "vanished"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        total = sum(sizes)
        result = _ReadFile(ids, sizes, content_digest(ids) if ids else EMPTY_CONTENT, after._replace(size=total),
                           xattrs=xattrs, xattr_problem=xattr_problem)
        same = (before.size, before.mtime_ns, before.ctime_ns, before.inode) == (
            after.size, after.mtime_ns, after.ctime_ns, after.inode)
        if same and total == after.size:
            return result
    assert result is not None
    result.problem = f"changed while being read ({attempts + 1} attempts); captured as last read"
    return result


def _checksum_one(view: FrozenRoot, rel: str, algorithms: set[str],
                  progress: ProgressFn | None) -> _ReadFile | str:
    """One file's HDFS checksum instead of its bytes (an external row). Returns "vanished"/a problem."""
    try:
        version, algorithm, value = view.checksum_file(rel)  # type: ignore[attr-defined]
    except FileNotFoundError:
        return "vanished"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if progress:
        progress(version.size)
    if version.size == 0:
        return _ReadFile([], [], EMPTY_CONTENT, version)
    algorithms.add(algorithm)
    return _ReadFile([], [version.size], hdfs_checksum_digest(algorithm, value), version)


def capture(root: str | DataRoot, writer: ChunkWriter, *, parent: Manifest | ManifestFile | None = None,
            parent_captured_at: float | None = None, reread_attempts: int = 3,
            exclude: frozenset[str] = frozenset(), workers: int | None = None,
            progress: ProgressFn | None = None, on_total: Callable[[int], None] | None = None,
            captured_at: float | None = None, allow_empty: bool = False, content: str = CHUNKS,
            pinned: frozenset[str] = frozenset(), parent_volumes: Mapping[str, int] | None = None,
            parent_root_volume: Mapping[str, str] | None = None, lost: IdSet | None = None) -> CaptureResult:
    """Capture ``root``. New chunks go to ``writer``; the caller flushes and commits.

    ``lost``: chunk ids the repository no longer holds (a repair forgot them, :mod:`drsync.repository.repair`):
    a file whose parent row names one is read again even when it did not change.

    ``captured_at`` and ``parent_captured_at`` name the frozen views (HDFS
    snapshots) of this capture and of the parent's, so that the next capture
    can ask the namenode what changed since. A path that exists but cannot be
    read keeps its version from ``parent``, marked stale (a read error is never
    a deletion). Raises OperationFailed when the root is empty but ``parent``
    was not (an unmounted volume looks like this), unless ``allow_empty``. Filesystems mounted inside
    the root are judged against ``parent_volumes`` (the parent snapshot's ``volumes``) by
    :mod:`drsync.volumes`: one unmounted, or empty where the parent had files, keeps its last captured
    version, unless ``allow_empty``; ``result.volumes`` is what the new snapshot records. A local root whose
    filesystem (``parent_root_volume``, the parent snapshot's ``root_volume``) is unmounted now is refused
    (OperationFailed, unless ``allow_empty``): it shows what lies under the mount point.

    ``content=HDFS_CHECKSUM``: files are checksummed by the datanodes instead of read, and the HDFS
    snapshot is kept (``result.content_snapshot``) for DistCp; ``pinned`` names older ones a
    shipment still copies from (all others of this process are deleted). UsageError on a root
    that is not a snapshottable HDFS directory.
    """
    data_root = open_data_root(root) if isinstance(root, str) else root
    data_root.check_capturable()
    listed_parent = parent  # a root that lists only what changed takes the rest from the parent's table
    if isinstance(parent, ManifestFile) and getattr(data_root, "lists_from_parent", False):
        listed_parent = parent = parent.read()
    tag = _tag(captured_at)
    parent_tag = _tag(parent_captured_at) if parent is not None and parent_captured_at else None
    if content == HDFS_CHECKSUM:
        if not getattr(data_root, "supports_distcp", False):
            raise UsageError(f"data root {data_root.url} is not on HDFS: replication.engine = \"distcp\" needs "
                             f"HDFS data roots on both clusters; use engine = \"agent\"")
        frozen = data_root.frozen(tag, parent_tag, listed_parent, keep=True,  # type: ignore[call-arg]
                                  pinned=pinned)
    else:
        frozen = data_root.frozen(tag, parent_tag, listed_parent)  # type: ignore[arg-type]
    root_volume = _root_volume(data_root, parent_root_volume or {}, allow_empty)
    top = data_root.root_entry()  # the root's own mode, owner, time: the manifest's key-value metadata
    watch = _volume_watch(data_root, parent, parent_volumes or {}, exclude, allow_empty)
    with frozen as view:
        result = _capture_view(view, writer, parent=parent, parent_captured_at=parent_captured_at, lost=lost,
                               reread_attempts=0 if view.consistent else reread_attempts,
                               exclude=exclude | watch.gone if watch else exclude,
                               workers=workers, progress=progress, on_total=on_total, content=content,
                               watch=watch, top=top)
        result.content_snapshot = getattr(view, "snapshot", None) if content == HDFS_CHECKSUM else None
        result.root_volume = root_volume
        notes = WarningLog(view.notes)  # the view's notes first
        notes.merge(result.warnings)
        result.warnings = notes
    stray = data_root.foreign_staging(top_only=True)  # below the top, the walk says so itself
    if stray is not None:  # named as the walk names paths: relative to the root (it is at the top)
        result.warnings.append(f"{printable(stray.rstrip('/').rpartition('/')[2])}: the name is reserved for "
                               f"drsync's staging area; not captured")
    if (not allow_empty and parent is not None and not result.files and parent.file_count()
            and not result.manifest.file_count()):
        raise OperationFailed(f"data root {data_root.url} holds no files, but the last snapshot held "
                              f"{parent.file_count()}: is its volume mounted? Nothing was captured; if it is empty "
                              f"on purpose, run 'drsync snapshot create --allow-empty'")
    return result


def _root_volume(data_root: DataRoot, recorded: Mapping[str, str], allow_empty: bool) -> dict[str, str]:
    """What the new snapshot records of the filesystem a local root lies on ({} on the host's root
    filesystem, or for other roots); OperationFailed when the parent's is unmounted now (safety rule 8:
    :func:`drsync.volumes.root_volume_gone`), unless ``allow_empty``."""
    where = getattr(data_root, "root_volume", None)
    now = where() if where is not None else None
    if now is None:
        return {}
    holding, mounted = now
    host = socket.gethostname()
    gone = None if allow_empty else volumes.root_volume_gone(recorded, host, holding, mounted)
    if gone is not None:
        raise OperationFailed(f"data root {data_root.url}: {gone}")
    return {} if holding == "/" else {"host": host, "mount_point": holding}


@dataclass
class _VolumeWatch:
    """The filesystems mounted inside a local root, as a capture watches them (:mod:`drsync.volumes`):
    ``mounted`` now (relative mount points), ``gone`` recorded volumes left out of the walk, ``retired``
    recorded ones whose mount point is gone."""

    recorded: Mapping[str, int]
    mounted: list[str]
    gone: frozenset[str]
    retired: frozenset[str]
    parent: Manifest | ManifestFile | None
    allow_empty: bool

    def verdict(self, files_below: Mapping[str, int]) -> volumes.VolumeVerdict:
        if self.allow_empty or self.parent is None:
            return volumes.VolumeVerdict(record=dict(files_below))
        return volumes.judge(self.recorded, files_below, self.gone, self._parent_files_below, self.retired)

    def _parent_files_below(self, rel: str) -> int:
        """Files of the parent snapshot below ``rel`` (the rare path: an empty volume it did not record)."""
        assert self.parent is not None
        return _files_below(_Parent(self.parent).table(), [rel])[rel]


def _volume_watch(data_root: DataRoot, parent: Manifest | ManifestFile | None, recorded: Mapping[str, int],
                  exclude: frozenset[str], allow_empty: bool) -> _VolumeWatch | None:
    """What the capture of a local root with filesystems mounted inside it, or recorded by the parent
    snapshot, watches; None for any other root."""
    mount_points = getattr(data_root, "mount_points", None)
    if mount_points is None:
        return None
    root = data_root.url

    def excluded(rel: str) -> bool:
        return any(rel == x or rel.startswith(x + "/") for x in exclude)

    mounted = sorted(m for m in mount_points() if not excluded(m))
    if not mounted and not recorded:
        return None

    def is_dir(rel: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(os.path.join(root, rel)).st_mode)
        except OSError:
            return False

    gone = frozenset() if allow_empty or parent is None else frozenset(
        m for m in volumes.left_out(recorded, mounted, is_dir) if not excluded(m))
    return _VolumeWatch(recorded, mounted, gone, frozenset(volumes.removed(recorded, mounted, is_dir)), parent,
                        allow_empty)


def _tag(at: float | None) -> str:
    return str(int((at or 0) * 1000))


def _capture_view(view: FrozenRoot, writer: ChunkWriter, *, parent: Manifest | None,
                  parent_captured_at: float | None, reread_attempts: int, exclude: frozenset[str],
                  workers: int | None, progress: ProgressFn | None,
                  on_total: Callable[[int], None] | None, content: str = CHUNKS,
                  watch: _VolumeWatch | None = None, top: Entry | None = None,
                  lost: IdSet | None = None) -> CaptureResult:
    """The capture of one frozen view, in windows of :data:`_WINDOW` path-sorted scan rows.

    A local tree is walked as the windows are taken (:meth:`TreeScan.windows`), so memory holds one
    window of the scan, never all of it. Which rows of a window reuse the parent's chunks is decided
    by column comparisons with the parent's row groups of the same range of paths (:class:`_Matcher`,
    reading them in step); files are read and manifest rows assembled, and streamed into the
    manifest's Parquet bytes. ``on_total`` is called after each window with the bytes to read found
    so far (a total that grows as the walk goes). What needs every row is done at the end, on the
    stored manifest, a path the rare case pays for: links that escape the root through other links
    are left out (:func:`_without_paths`), paths that could not be read are merged in from the parent
    (:func:`_merge_stale`), with the files of the volumes ``watch`` keeps (files below each mount point
    counted as the windows pass). ``top``: the root directory's own metadata, which the manifest carries
    (:mod:`drsync.repository.manifest_root`).
    """
    scan = view.scan(exclude)
    below: dict[str, int] = dict.fromkeys(watch.mounted, 0) if watch is not None else {}
    warnings = scan.warnings
    pv = _Parent(parent) if parent is not None and len(parent) else None
    matcher = _Matcher(pv, parent_captured_at or 0.0, external_ok=content == HDFS_CHECKSUM, lost=lost)
    links = LinkGroups()
    algorithms: set[str] = set()
    state = _Totals()
    to_read = 0
    # The manifest goes to its spool's temporary file past 2 MiB, not 16: at 1,000,000 files the capture's
    # peak (its scan and the chunk index held) came while the first 16 MiB were still in memory.
    out = ManifestWriter(with_root(SCHEMA, top), memory_bytes=_SPOOL_BYTES)
    n = workers or min(4, (os.cpu_count() or 2) + 1)
    # A window's manifest rows are encoded into Parquet on a thread of their own while the next window is
    # matched (one window in flight): both release the GIL for most of their work.
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="drsync-capture") as big, \
            small_files_pool(view.small_file_threads, n, "drsync-capture-small") as small, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="drsync-manifest") as encoder:
        pool = _Readers(big, small or big)
        encoding: Future[None] | None = None
        unchanged = _Unchanged.of(parent, pv, out.schema)
        read_some = False
        for w in scan.windows(_WINDOW):
            if read_some:  # what the last window's reads freed inside glibc's heaps (see below)
                allocators.give_back()
            same, reuse = matcher.match(w)
            is_file = _np(pc.equal(w.column("type"), FILE))
            # A window whose files are all unchanged reads none: what it frees is what the next one takes
            # again, and trimming it cost 3 ms a window in page faults (0.2 s of a no-change cycle at
            # 1,000,000 files).
            read_some = bool((is_file & (reuse < 0)).any())
            if below:
                for m, n in _files_below(w, below, is_file).items():
                    below[m] += n
            if on_total:
                to_read += int(_np(w.column("size"))[is_file & (reuse < 0)].sum())
                on_total(to_read)
            rows = _window(view, writer, w, pv, same, reuse, links, state, warnings, pool,
                           reread_attempts, progress, content, algorithms, lost)
            if unchanged is not None and unchanged.extends(rows):
                continue  # the parent's rows so far: their encoding waits (the parent's bytes, if all are)
            if encoding is not None:
                encoding.result()
            if unchanged is not None:  # the first row that is not the parent's: the rows before it are written
                encoding = encoder.submit(unchanged.write_then, out, rows)
                unchanged = None
            else:
                encoding = encoder.submit(out.write, rows)
        if encoding is not None:
            encoding.result()
    if pv is not None:
        pv.done_before(pv.num_groups)  # the windows are done: what follows reads the parent anew, if at all
    if scan.root_problem is not None and pv is None:  # nothing earlier to keep: an empty tree would be a lie
        raise OperationFailed(f"data root {scan.root}: {scan.root_problem}; nothing was captured (no earlier "
                              f"snapshot of it to keep): check that it is mounted and that drsync can read it")
    if unchanged is not None and unchanged.whole():
        # Every row the parent's, in order, under the same root metadata: the bytes the writer would make
        # (one serializer: the same rows make the same bytes), copied instead of encoded again.
        out.abandon()
        stored = unchanged.copy(_SPOOL_BYTES)
    else:
        if unchanged is not None:
            unchanged.write_then(out, None)
        stored = out.finish()
    # A scan sorted whole left out its escaping links before its windows; one walked window by window, some
    # target of which climbs, has them told now: every link captured, read back from the manifest, resolved
    # together.
    escaping: set[bytes] = set()
    if scan.links_to_judge:
        captured = ManifestFile(stored, "the captured manifest")
        escaping = escaping_in(lambda: column_groups(captured, ["path", "type", "target"]), scan.warnings,
                               scan.left_out_links())
        scan.climbs = scan.linked = False
    if escaping:
        stored = _without_paths(stored, escaping)
    stale = skipped = stale_files = stale_bytes = 0
    lost = [*scan.unreadable, *state.lost]
    recorded: dict[str, int] = {}
    verdict = volumes.VolumeVerdict()
    if watch is not None:
        verdict = watch.verdict(below)
        recorded = verdict.record
        for m, why in verdict.keep.items():
            warnings.append(why)
            lost.append(m)
    if lost or scan.unlisted or scan.vanished or state.vanished or state.unread:
        stored, stale, skipped, stale_files, stale_bytes = _merge_stale(
            stored, pv.table() if pv else None, lost, scan.unlisted, {**scan.devices, **state.devices},
            links, warnings, scan.vanished, state.vanished, state.unread, scan.left_out_links(),
            _left_on_purpose(escaping, scan, exclude - watch.gone if watch is not None else exclude))
    if watch is not None and verdict.keep:  # what the snapshot holds below each volume, kept files included
        recorded = _files_below(Manifest.from_bytes(stored, "the captured manifest").table, recorded)
    # The snapshot's files and bytes are what it holds: the stale files kept at their last version count too.
    return CaptureResult(stored=stored, files=state.files + stale_files, bytes=state.bytes + stale_bytes,
                         read_bytes=0 if content == HDFS_CHECKSUM else state.read_bytes,
                         reused_files=state.reused, warnings=warnings, stale=stale, skipped=skipped,
                         checksum_algorithms=algorithms, volumes=recorded)


@dataclass(frozen=True)
class _Readers:
    """The capture's reading threads: ``big`` for files of at least ``SMALL_FILE_BYTES``, ``small`` (as many
    threads as the root's ``small_file_threads``, or ``big`` itself) for the rest."""

    big: ThreadPoolExecutor
    small: ThreadPoolExecutor


# Scan rows read and assembled at a time: a quarter of a manifest row group (the writer gathers them), so that
# wide rows (extended attributes and ACLs on every file) cost 70 MiB less at peak, at no measured loss of speed.
_WINDOW = 16384
_SPOOL_BYTES = 2 << 20  # the captured manifest's bytes kept in memory before its spool moves to a file


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A non-null Arrow column as a NumPy array (zero-copy when it is one chunk)."""
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks() if a.num_chunks != 1 else a.chunk(0)
    return a.to_numpy(zero_copy_only=False)


def _without_paths(stored: Spool, paths: set[bytes]) -> Spool:
    """The stored manifest less the rows of ``paths`` (links found to escape the root once all were
    known), rewritten a row group at a time."""
    drop = pa.array(sorted(paths), pa.binary())
    with stored:
        source = ManifestFile(stored, "the captured manifest")
        out = ManifestWriter(source.schema, memory_bytes=_SPOOL_BYTES)  # the root's metadata with it
        for g in range(source.num_groups):
            t = source.group(g)
            out.write(t.filter(pc.invert(pc.is_in(t.column("path"), value_set=drop))))
    return out.finish()


_MATCHED = ["path", "type", "size", "mtime_s", "mtime_nsec", "ctime_ns", "inode", "chunks", "chunk_sizes"]
_CARRIED = ("content", "chunks", "chunk_sizes", "xattrs")
# The parent's columns held a group at a time: all of them (matching compares some, a reused row carries
# some, and a window is compared whole with the parent's rows: _Unchanged).
_HELD = tuple(SCHEMA.names)


def _files_below(rows: pa.Table | pa.RecordBatch, mount_points: Iterable[str],
                 is_file: np.ndarray | None = None) -> dict[str, int]:
    """How many of ``rows`` (path-sorted manifest or scan rows, so a subtree is one range) are files below
    each mount point; ``is_file``: their type column compared with FILE already."""
    paths = rows.column("path")
    counts = np.concatenate([np.zeros(1, np.int64), np.cumsum(
        _np(pc.equal(rows.column("type"), FILE)) if is_file is None else is_file, dtype=np.int64)])
    out = {}
    for m in mount_points:
        prefix = os.fsencode(m) + b"/"
        lo, hi = _bisect(paths, prefix, right=False), _bisect(paths, prefix[:-1] + b"0", right=False)  # "/"+1
        out[m] = int(counts[hi] - counts[lo])
    return out


def _bisect(paths: pa.ChunkedArray | pa.Array, key: bytes, *, right: bool) -> int:
    """Where ``key`` goes in the sorted ``paths`` (bisect_left, or bisect_right)."""
    lo, hi = 0, len(paths)
    while lo < hi:
        mid = (lo + hi) // 2
        v = paths[mid].as_py()
        if v < key or (right and v == key):
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Matcher:
    """The parent's rows for path-sorted scan windows taken in order: the parent is read a row group at
    a time, in step with the windows, holding the groups of about one window's range of paths."""

    def __init__(self, parent: _Parent | None, parent_captured_at: float, *, external_ok: bool,
                 lost: IdSet | None = None) -> None:
        self.parent = parent
        self.lost = lost if lost is not None and len(lost) else None
        self.racy_s, self.racy_ns = divmod(int(parent_captured_at * 1e9) - _RACY_NS, 1_000_000_000)
        self.external_ok = external_ok
        self.next = 0  # the first parent group a later window can need
        self.bounds: dict[int, tuple[bytes, bytes] | None] = {}  # group -> (first path, last path)

    def _bounds(self, g: int) -> tuple[bytes, bytes] | None:
        """Parent group ``g``'s first and last paths (None when it is empty), from the group held or else its
        ``path`` column alone: a group looked at only to learn that it lies past a window is not held."""
        assert self.parent is not None
        if g not in self.bounds:
            paths = self.parent.paths(g)
            self.bounds[g] = (paths[0].as_py(), paths[-1].as_py()) if len(paths) else None
        return self.bounds[g]

    def match(self, t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """For each row of the window ``t``, the parent row with the same path (``same``, -1: none) and the
        parent row whose content, chunks and attributes it takes (``reuse``, -1: captured anew).

        A file reuses its parent row when type, size, modification time, ctime and inode all match and
        it was not "racy" (modified within 2 s of the parent's capture, where a same-tick rewrite could
        hide), and the row is of the form this capture makes (chunks, or an HDFS checksum for DistCp).
        A directory takes its attributes from the parent when its ctime did not move. Both (N,) int64
        arrays of global parent row numbers."""
        n = t.num_rows
        same = np.full(n, -1, np.int64)
        reuse = np.full(n, -1, np.int64)
        p = self.parent
        if p is None or n == 0:
            return same, reuse
        tpath = t.column("path")
        first, last = tpath[0].as_py(), tpath[-1].as_py()
        while self.next < p.num_groups:  # groups wholly before this window are done with
            bounds = self._bounds(self.next)
            if bounds is not None and bounds[1] >= first:
                break
            self.bounds.pop(self.next, None)
            self.next += 1
        p.done_before(self.next)
        g = self.next
        while g < p.num_groups:
            bounds = self._bounds(g)
            g += 1
            if bounds is None:
                continue
            lo_path, hi_path = bounds
            if lo_path > last:
                break
            pg = p.held(g - 1)
            a = _bisect(tpath, lo_path, right=False)
            b = _bisect(tpath, hi_path, right=True)
            if a < b:
                s, r = self._match_group(t.slice(a, b - a), pg, p.starts[g - 1])
                same[a:b] = np.where(s >= 0, s, same[a:b])
                reuse[a:b] = np.where(r >= 0, r, reuse[a:b])
        return same, reuse

    def _match_group(self, ts: pa.Table, pg: pa.Table, start: int) -> tuple[np.ndarray, np.ndarray]:
        # Only the parent's rows within this slice's range of paths can match: a window is a few thousand
        # rows and a group 65,536, so hashing the whole group for each window cost most of a no-change cycle.
        # The group's columns are taken over that range only (``pg`` from here on), rows counted from ``lo``.
        ppath = pg.column("path").combine_chunks()
        tpath = ts.column("path")
        lo = _bisect(ppath, tpath[0].as_py(), right=False)
        pg = pg.slice(lo, _bisect(ppath, tpath[-1].as_py(), right=True) - lo)
        ppath = ppath.slice(lo, pg.num_rows)
        start += lo
        if not pg.num_rows:  # none of the parent's names in this range
            none = np.full(ts.num_rows, -1, np.int64)
            return none, none.copy()
        if len(tpath) == len(ppath) and pc.all(pc.equal(tpath, ppath)).as_py():
            loc = np.arange(len(ppath), dtype=np.int64)  # the parent's names exactly: no hash table
        else:
            loc = _np(pc.fill_null(pc.index_in(tpath, value_set=ppath), -1)).astype(np.int64)
        has = loc >= 0
        at = np.where(has, loc, 0)

        def theirs(name: str) -> np.ndarray:
            return _np(pg.column(name))[at]

        mine = {name: _np(ts.column(name)) for name in ("size", "mtime_s", "mtime_nsec", "ctime_ns", "inode")}
        t_type = ts.column("type")
        same_ctime = mine["ctime_ns"] == theirs("ctime_ns")
        p_type = pg.column("type")
        ok = has & _np(pc.equal(t_type, FILE)) & _np(pc.equal(p_type, FILE))[at] & same_ctime
        for name in ("size", "mtime_s", "mtime_nsec", "inode"):
            ok &= mine[name] == theirs(name)
        mt_s, mt_ns = mine["mtime_s"], mine["mtime_nsec"]
        ok &= (mt_s < self.racy_s) | ((mt_s == self.racy_s) & (mt_ns < self.racy_ns))
        n_chunks = _np(pc.fill_null(pc.list_value_length(pg.column("chunks")), 0))[at]
        n_sizes = _np(pc.fill_null(pc.list_value_length(pg.column("chunk_sizes")), 0))[at]
        # A capture that stores chunks cannot reuse a row whose bytes only an HDFS snapshot held, and a
        # capture for DistCp checksums files the parent has as chunks (a snapshot is all one kind).
        ok &= ~(((n_chunks != n_sizes) != self.external_ok) & (theirs("size") > 0))
        if self.lost is not None:  # a row naming a chunk the repository lost: the file is read again
            ok &= ~self._names_lost(pg)[at]
        ok |= has & _np(pc.equal(t_type, DIR)) & _np(pc.equal(p_type, DIR))[at] & same_ctime
        return np.where(has, loc + start, -1), np.where(ok, loc + start, -1)

    def _names_lost(self, pg: pa.Table) -> np.ndarray:
        """(rows of ``pg``,) bool: the row's chunk list names a chunk of :attr:`lost`."""
        assert self.lost is not None
        return _naming(pg.column("chunks").combine_chunks(), self.lost)


def _naming(lists: pa.ListArray, lost: IdSet) -> np.ndarray:
    """(len(lists),) bool: the chunk list names a chunk of ``lost``."""
    out = np.zeros(len(lists), bool)
    flat = pc.list_flatten(lists)
    if len(flat):
        out[_np(pc.list_parent_indices(lists))[lost.contains_many(flat)]] = True
    return out


class _Unchanged:
    """Whether the windows so far made exactly the parent manifest's first rows (all columns), in order:
    their encoding is put off, so that a capture that changed nothing stores the parent's manifest bytes
    as they are (:meth:`copy`) instead of encoding every row again. The first window that differs has the
    rows before it written from the parent (:meth:`write_then`), and the capture goes on as usual."""

    def __init__(self, file: ManifestFile, parent: _Parent) -> None:
        self.file, self.parent = file, parent
        self.rows = 0  # the parent's rows matched so far: 0 .. rows - 1

    @classmethod
    def of(cls, parent: Manifest | ManifestFile | None, pv: _Parent | None, schema: pa.Schema) -> _Unchanged | None:
        """None unless ``parent`` is a stored manifest of this layout whose schema and root metadata are
        those the capture writes (``schema``), written as this process's writer writes (the same Parquet
        library, row groups, compression and dictionary pages): only then are its bytes the ones the writer
        would make of the same rows. (A parent written otherwise, by an older drsync or another pyarrow, is
        encoded anew: a patch of it rebuilt on a standby by that standby's writer would not match.)"""
        if not isinstance(parent, ManifestFile) or pv is None or parent.is_v1:
            return None
        # The columns' types (a list's item is named "element" once read back: not compared), then the
        # key-value metadata (the format, the root's own metadata).
        if not parent.schema.equals(schema) or parent.schema.metadata != schema.metadata:
            return None
        if not parent.written_as(ManifestWriter.fingerprint()):
            return None
        return cls(parent, pv)

    def extends(self, rows: pa.Table) -> bool:
        """Whether ``rows`` (a window's manifest rows) are the parent's next rows; if so, counted."""
        n = rows.num_rows
        theirs = self.parent.held_rows(self.rows, n)
        if theirs is None or not _same_rows(rows, theirs):
            return False
        self.rows += n
        return True

    def whole(self) -> bool:
        """Whether the rows matched are all of the parent's."""
        return self.rows == len(self.file)

    def copy(self, memory_bytes: int) -> Spool:
        return self.file.copy(memory_bytes)

    def write_then(self, out: ManifestWriter, rows: pa.Table | None) -> None:
        """Write the parent's rows matched so far to ``out`` (a row group at a time), then ``rows``. Runs on
        the encoder's thread, beside the windows' reads: through a reader of its own."""
        file = self.file.reopen() if self.rows else self.file
        for g in range(file.num_groups):
            lo, hi = file.starts[g], min(file.starts[g + 1], self.rows)
            if lo >= hi:
                break
            out.write(file.group(g).slice(0, hi - lo))
        if rows is not None:
            out.write(rows)


def _same_rows(mine: pa.Table, theirs: pa.Table) -> bool:
    """Whether two tables of :data:`SCHEMA` hold the same rows (values and nulls, column by column)."""
    if mine.num_rows != theirs.num_rows:
        return False
    return all(mine.column(name).equals(theirs.column(name)) for name in SCHEMA.names)


class _Parent:
    """The parent manifest by row groups: a stored :class:`ManifestFile`, or an in-memory
    :class:`Manifest` cut into slices. Its groups are read once, with the columns the matching and the
    carried rows both need (:data:`_HELD`), and held while the windows need them: the matcher lets go of
    each once the windows have passed it (:meth:`done_before`), so one or two are held at a time."""

    def __init__(self, parent: Manifest | ManifestFile) -> None:
        self._file = parent if isinstance(parent, ManifestFile) else None
        self._table = parent.table if isinstance(parent, Manifest) else None
        if self._file is not None:
            self.starts = list(self._file.starts)
        else:
            n = len(parent)
            self.starts = [*range(0, n, _WINDOW), n]
        self.num_groups = len(self.starts) - 1
        self._held: dict[int, pa.Table] = {}

    def group(self, g: int, columns: list[str]) -> pa.Table:
        if self._file is not None:
            return self._file.group(g, columns)
        assert self._table is not None
        return self._table.select(columns).slice(self.starts[g], self.starts[g + 1] - self.starts[g])

    def paths(self, g: int) -> pa.ChunkedArray:
        """Group ``g``'s ``path`` column: from the group when it is held, else read alone."""
        t = self._held.get(g)
        return (t if t is not None else self.group(g, ["path"])).column("path")

    def held(self, g: int) -> pa.Table:
        """Group ``g`` with the :data:`_HELD` columns, read at its first call and held until
        :meth:`done_before` passes it."""
        t = self._held.get(g)
        if t is None:
            t = self._held[g] = self.group(g, list(_HELD))
        return t

    def held_rows(self, lo: int, n: int) -> pa.Table | None:
        """The parent's rows ``lo`` to ``lo + n`` (all of :data:`_HELD`'s columns) from the groups held, None
        when one of them is not held (or the rows run past the parent's end)."""
        if n == 0 or lo + n > self.starts[-1]:
            return None if n else SCHEMA.empty_table()
        parts = []
        g = int(np.searchsorted(np.asarray(self.starts), lo, side="right") - 1)
        while n:  # lo + n is within the parent (above)
            t = self._held.get(g)
            if t is None:
                return None
            at = lo - self.starts[g]
            take = min(n, t.num_rows - at)
            parts.append(t.slice(at, take))
            lo, n, g = lo + take, n - take, g + 1
        return pa.concat_tables(parts)

    def done_before(self, g: int) -> None:
        """Let go of the groups before ``g``: no later window needs them."""
        for k in [k for k in self._held if k < g]:
            del self._held[k]

    def rows(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The parent's ``rows`` (ascending global row numbers), ``columns`` (of :data:`_HELD`) only."""
        groups = np.searchsorted(np.asarray(self.starts), rows, side="right") - 1
        parts = []
        # ``groups`` ascends: its distinct values without np.unique (whose first call imports numpy.ma, 20 ms
        # of every snapshot's start).
        for g in groups[np.flatnonzero(np.diff(groups, prepend=-1))].tolist():
            t = self.held(g).select(columns)
            local = rows[groups == g] - self.starts[g]
            if len(local) and local[-1] - local[0] == len(local) - 1:  # a run of rows (ascending, distinct)
                parts.append(t.slice(int(local[0]), len(local)))  # as they are: no copy
            else:
                parts.append(t.take(pa.array(local, pa.int64())))
        return pa.concat_tables(parts)

    def type_of(self, row: int) -> str:
        g = int(np.searchsorted(np.asarray(self.starts), row, side="right") - 1)
        return self.group(g, ["type"]).column("type")[row - self.starts[g]].as_py()

    def table(self) -> pa.Table:
        """The whole manifest (the rare path that merges stale rows)."""
        return self._table if self._table is not None else self._file.read().table  # type: ignore[union-attr]


@dataclass
class _Totals:
    """What the windows add up: counts for the snapshot document, and what could not be read."""

    files: int = 0
    bytes: int = 0
    read_bytes: int = 0
    reused: int = 0
    lost: list[str] = field(default_factory=list)      # exist but could not be read: kept stale
    devices: dict[str, int] = field(default_factory=dict)  # the device of each of those
    # New names that vanished before their read, with their inode: renamed, perhaps back to a name the
    # parent has (the parent's file of that inode is kept, stale)
    vanished: list[tuple[str, int]] = field(default_factory=list)
    # New names that exist but could not be read, with their inode and why: renamed from a name the parent
    # has, perhaps (the parent's file of that inode is kept, stale: a read error is never a deletion)
    unread: list[tuple[str, int, str, int, int]] = field(default_factory=list)  # and size, mtime (ns)
    # Large files of several names read in an earlier window, for their names still to come (drsync.read_once).
    shared: SharedInodes[_ReadFile] = field(default_factory=SharedInodes)


def _hard_links(links: LinkGroups, w: pa.Table, kept: np.ndarray, sizes: np.ndarray, out: pa.Table,
                warnings: WarningLog) -> list[bytes | None] | None:
    """The ``hardlink`` values of the scan window ``w`` (``kept``: its files kept, ``out``: its manifest rows
    before the others are left out, ``sizes``: their sizes as read), None when none is linked: its kept files
    with more than one link, over ``links`` (:mod:`drsync.hardlink_groups`)."""
    nlink = _np(w.column("nlink"))
    multi = np.flatnonzero(kept & (nlink > 1))
    if not len(multi):
        return None
    at = pa.array(multi, pa.int64())
    sub, mine = w.take(at), out.take(at)
    held = [holds(int(size), content, mode, uid, gid) for size, content, mode, uid, gid in zip(
        sizes[multi].tolist(), *(mine.column(c).to_pylist() for c in ("content", "mode", "uid", "gid")), strict=True)]
    named = links.window(sub.column("path").to_pylist(), _np(sub.column("dev")), _np(sub.column("inode")),
                         nlink[multi], held, warnings)
    result: list[bytes | None] = [None] * w.num_rows
    for k, lead in zip(multi.tolist(), named, strict=True):
        result[k] = lead
    return result


class _Stats:
    """Window ``w``'s identity columns as arrays, read once: what :mod:`drsync.read_once` compares."""

    def __init__(self, w: pa.Table) -> None:
        self.dev, self.inode, self.nlink = (_np(w.column(c)) for c in ("dev", "inode", "nlink"))
        self.size, self.ctime = _np(w.column("size")), _np(w.column("ctime_ns"))
        self.mtime = _np(w.column("mtime_s")).astype(np.int64) * 1_000_000_000 + _np(w.column("mtime_nsec"))

    def key(self, k: int) -> tuple[int, int]:
        return int(self.dev[k]), int(self.inode[k])

    def version(self, k: int) -> Version:
        """The version the scan saw of row ``k`` (:data:`drsync.read_once.Version`)."""
        return int(self.size[k]), int(self.mtime[k]), int(self.ctime[k]), int(self.inode[k])


def _read_version(r: _ReadFile) -> Version:
    v = r.version
    return (v.size, v.mtime_ns, v.ctime_ns, v.inode)


def _one_read_per_inode(w: _Stats, to_read: list[int], shared: SharedInodes[_ReadFile], read: dict[int, _ReadFile],
                        borrowed: set[int], progress: ProgressFn | None) -> tuple[list[int], dict[int, int]]:
    """Of the window's files ``to_read``, those to read: a name of a file of several links that an earlier
    window read at the version the scan saw takes that read at once (into ``read`` and ``borrowed``), and of
    the names of one inode in this window only the first is read. Returns (to read, {other name: first})."""
    rows = np.asarray(to_read, np.int64)
    multi = rows[w.nlink[rows] > 1]
    if not len(multi):
        return to_read, {}
    # Only names that share their inode with another of the window, or large enough to have been held, are
    # looked at one by one (a rotation's million names of small files, each once a window, pass as arrays).
    # (By inode number alone: one on two devices is looked at too, and told apart by its key.)
    _, inverse, counts = np.unique(w.inode[multi], return_inverse=True, return_counts=True)
    looked = (counts[inverse] > 1) | ((w.size[multi] >= shared.keep_bytes) & (len(shared) > 0))
    first: dict[tuple[int, int], int] = {}
    later: dict[int, int] = {}
    for k in multi[looked].tolist():
        key = w.key(k)
        held = shared.take(key, w.version(k)) if len(shared) else None
        if held is not None:
            read[k] = held
            borrowed.add(k)
            if progress:
                progress(held.version.size)
        elif key in first:
            later[k] = first[key]
        else:
            first[key] = k
    if not later and not borrowed:
        return to_read, {}
    return [k for k in to_read if k not in later and k not in borrowed], later


def _borrow(w: _Stats, k: int, got: _ReadFile | None, read: dict[int, _ReadFile], borrowed: set[int],
            progress: ProgressFn | None) -> bool:
    """Give name ``k`` the read ``got`` of another name of the inode the scan saw ``k`` name, if that read was of
    that inode; False: ``k`` is to be read itself. A read of a file that changed since the scan, or while read
    (its problem said once), stands for every name of it in the window all the same: each would be read
    again, changing again (breaker s58: a 64 MiB file of 200 names written to was read 200 times), and the
    names stay one group, as read."""
    if got is None or got.version.inode != int(w.inode[k]):
        return False
    read[k] = got
    borrowed.add(k)
    if progress:
        progress(got.version.size)
    return True


def _hold_shared(w: _Stats, later: dict[int, int], read: dict[int, _ReadFile], borrowed: set[int],
                 shared: SharedInodes[_ReadFile]) -> None:
    """Hold each file of several links read in this window (first names of ``later`` and the others alike)
    for its names still to come in later windows: its links less the names this window gave it to."""
    given: dict[int, int] = {}
    for k, first in later.items():
        if k in borrowed and read.get(k) is read.get(first):
            given[first] = given.get(first, 0) + 1
    for k in np.flatnonzero((w.nlink > 1) & (w.size >= shared.keep_bytes)).tolist():
        got = read.get(k)
        if got is None or k in borrowed:
            continue
        shared.keep(w.key(k), _read_version(got), got, int(w.nlink[k]) - 1 - given.get(k, 0))


def _names_lost(p: _Parent, row: int, lost: IdSet | None) -> bool:
    """Whether the parent's ``row`` names a chunk of ``lost`` (the rare path: an unreadable file after a
    repair; its group read anew, not through the parent's one-group cache of other columns)."""
    if lost is None or not len(lost):
        return False
    g = int(np.searchsorted(np.asarray(p.starts), row, side="right") - 1)
    lists = p.group(g, ["chunks"]).column("chunks").combine_chunks()
    return bool(_naming(lists.slice(row - p.starts[g], 1), lost)[0])


def _window(view: FrozenRoot, writer: ChunkWriter, w: pa.Table, p: _Parent | None,
            same: np.ndarray, reuse: np.ndarray, links: LinkGroups, totals: _Totals,
            warnings: WarningLog, pool: _Readers, reread_attempts: int, progress: ProgressFn | None,
            content: str, algorithms: set[str], lost: IdSet | None = None) -> pa.Table:
    """Manifest rows of the scan window ``w`` (their parent rows ``same`` and
    ``reuse``): files not reused are read (in ``pool``), the rest take the parent's carried columns,
    hard links are named over what was kept (``links``); rows that vanished or could not be read are
    left out."""
    count = w.num_rows
    rows = reuse
    sizes = _np(w.column("size"))
    is_file = _np(pc.equal(w.column("type"), FILE)) if count else np.zeros(0, bool)
    to_read = np.flatnonzero((rows < 0) & is_file).tolist()
    paths: list[str] = [] if not to_read else [os.fsdecode(x) for x in w.column("path").to_pylist()]
    read: dict[int, _ReadFile] = {}
    gone: list[int] = []
    # Names of a file of several links whose read another name's stands for (drsync.read_once): not read.
    borrowed: set[int] = set()
    stats = _Stats(w) if to_read else None
    to_read, later = _one_read_per_inode(stats, to_read, totals.shared, read, borrowed, progress) if stats else ([], {})
    if to_read:
        # Large files largest first (the pool's threads finish together); small files in path order, which
        # their chunks then have in the packs: an apply reads a run of them with one call (read_chunks).
        small = [k for k in to_read if sizes[k] < SMALL_FILE_BYTES]
        large = sorted((k for k in to_read if sizes[k] >= SMALL_FILE_BYTES), key=lambda k: sizes[k], reverse=True)
        batches: list[list[int]] = []
        for kind in (large, small):
            batches.append([])
            acc = 0
            for k in kind:
                if len(batches[-1]) >= _BATCH_FILES or acc >= _BATCH_BYTES:
                    batches.append([])
                    acc = 0
                batches[-1].append(k)
                acc += int(sizes[k])

        def run(batch: list[int]) -> list[tuple[int, _ReadFile | str]]:
            if content == HDFS_CHECKSUM:
                return [(k, _checksum_one(view, paths[k], algorithms, progress)) for k in batch]
            return [(k, _read_one(view, paths[k], writer, reread_attempts, progress)) for k in batch]

        def take(k: int, got: _ReadFile | str) -> None:
            if isinstance(got, str):
                # Gone between the listing and the read: renamed (its new name may be in a directory
                # listed earlier) or removed. What the parent snapshot has of it is kept for this one,
                # so a rename during the walk is never a deletion on the standby; the next capture says.
                totals.devices[paths[k]] = int(_np(w.column("dev"))[k])
                inode = int(_np(w.column("inode"))[k])
                if got == "vanished" and same[k] < 0:
                    totals.vanished.append((paths[k], inode))
                elif same[k] < 0:  # said by _merge_stale, which looks for its inode in the parent
                    totals.unread.append((paths[k], inode, got, int(sizes[k]),
                                          int(_np(w.column("mtime_s"))[k]) * 1_000_000_000
                                          + int(_np(w.column("mtime_nsec"))[k])))
                else:
                    totals.lost.append(paths[k])
                    why = "vanished while the snapshot was taken (renamed or removed)" if got == "vanished" \
                        else got
                    kept = ("its last captured version is kept" if p is None or not _names_lost(p, int(same[k]), lost)
                            else "its content is lost from this repository (a repair forgot its chunks) and "
                                 "this snapshot names what it cannot restore: restore the file from the standby "
                                 "or a backup, or make it readable for the next snapshot")
                    warnings.append(f"{printable(paths[k])}: {why}; {kept}")
                gone.append(k)
                return
            if got.problem:
                warnings.append(f"{printable(paths[k])}: {got.problem}")
            if got.xattr_problem:
                warnings.append(f"{printable(paths[k])}: {got.xattr_problem}")
            read[k] = got

        # Small files are read by the root's small-file threads, beside the large files' pool; with one such
        # thread (a local root), the next batches are warmed ahead of it (drsync.warming).
        batches = [b for b in batches if b]
        cut = next((i for i, b in enumerate(batches) if sizes[b[0]] < SMALL_FILE_BYTES), len(batches))
        small = batches[cut:]
        warming = Warming(view.warm, [[paths[k] for k in b] for b in small]) \
            if len(small) > 1 and view.small_file_threads == 1 else None

        def run_small(batch: list[int]) -> list[tuple[int, _ReadFile | str]]:
            try:
                return run(batch)
            finally:
                if warming is not None:
                    warming.read_one()

        try:
            for results in itertools.chain(pool.big.map(run, batches[:cut]), pool.small.map(run_small, small)):
                for k, got in results:
                    take(k, got)
        finally:
            if warming is not None:
                warming.close()
        # The other names of an inode read in this window take its read, when it was of the inode the scan saw
        # them name (else they are read themselves); a large file's read is held for its names in later windows.
        assert stats is not None
        again = [k for k, first in later.items() if not _borrow(stats, k, read.get(first), read, borrowed, progress)]
        for k, got in run(again) if again else ():
            take(k, got)
        _hold_shared(stats, later, read, borrowed, totals.shared)
    xattrs = _attributes(view, w, is_file, rows, same, p, warnings)

    # Stat columns from the scan; a file read anew is described as it was read.
    cols = {name: w.column(name) for name in ("path", "type", "mode", "uid", "gid", "size", "mtime_s",
                                              "mtime_nsec", "ctime_ns", "inode", "target")}
    if read:
        over = {name: _np(w.column(name)).copy() for name in ("size", "ctime_ns", "inode", "mode", "uid", "gid",
                                                              "mtime_s", "mtime_nsec")}
        for k, r in read.items():
            v = r.version
            over["size"][k], over["inode"][k] = v.size, v.inode
            over["mode"][k], over["uid"][k], over["gid"][k] = v.mode, v.uid, v.gid
            over["ctime_ns"][k] = min(max(v.ctime_ns, _INT64[0]), _INT64[1])
            over["mtime_s"][k], over["mtime_nsec"][k] = divmod(v.mtime_ns, 1_000_000_000)
        for name, values in over.items():
            cols[name] = pa.array(values, w.schema.field(name).type)
        sizes = over["size"]

    # Carried columns: the parent's row where reused, what was read (or nothing) otherwise.
    fresh_rows = np.flatnonzero(rows < 0)
    fresh = pa.table({
        "content": pa.array([read[k].content if k in read else None for k in fresh_rows.tolist()],
                            SCHEMA.field("content").type),
        "chunks": pa.array([read[k].chunks if k in read else [] for k in fresh_rows.tolist()],
                           SCHEMA.field("chunks").type),
        "chunk_sizes": pa.array([read[k].chunk_sizes if k in read else [] for k in fresh_rows.tolist()],
                                SCHEMA.field("chunk_sizes").type),
        "xattrs": pa.array([read[k].xattrs if k in read else xattrs.get(k) for k in fresh_rows.tolist()],
                           pa.binary()),
    })
    if len(fresh_rows) == count or p is None:
        carried = fresh
    elif not len(fresh_rows):  # every row reused: the parent's rows in the window's order
        carried = p.rows(rows, list(_CARRIED))
    else:
        reused = np.flatnonzero(rows >= 0)
        base = p.rows(rows[reused], list(_CARRIED))
        order = np.empty(count, np.int64)
        order[reused] = np.arange(len(reused))
        order[fresh_rows] = len(reused) + np.arange(len(fresh_rows))
        carried = pa.concat_tables([base, fresh]).take(pa.array(order, pa.int64()))
    blocks = _np(w.column("blocks"))
    out = pa.table({
        **{name: cols[name] for name in ("path", "type", "mode", "uid", "gid", "size", "mtime_s", "mtime_nsec",
                                         "ctime_ns", "inode", "target")},
        "content": carried.column("content"), "chunks": carried.column("chunks"),
        "chunk_sizes": carried.column("chunk_sizes"), "xattrs": carried.column("xattrs"),
        "hardlink": pa.nulls(count, pa.binary()),
        "sparse": pa.array(is_file & (blocks * 512 < sizes), pa.bool_()),
        "stale": pa.array(np.zeros(count, bool), pa.bool_()),
    }).select(SCHEMA.names).cast(SCHEMA)
    keep = np.ones(count, bool)
    keep[gone] = False
    hardlink = _hard_links(links, w, keep & is_file, sizes, out, warnings)
    if hardlink is not None:
        out = out.set_column(out.schema.get_field_index("hardlink"), "hardlink", pa.array(hardlink, pa.binary()))
    if gone:
        out = out.filter(pa.array(keep, pa.bool_()))
        is_file, sizes, rows = is_file[keep], sizes[keep], rows[keep]
    totals.files += int(is_file.sum())
    totals.bytes += int(sizes[is_file].sum())
    totals.read_bytes += sum(r.version.size for k, r in read.items() if k not in borrowed)
    totals.reused += int((is_file & (rows >= 0)).sum())
    return out


def _attributes(view: FrozenRoot, w: pa.Table, is_file: np.ndarray, rows: np.ndarray, same: np.ndarray,
                p: _Parent | None, warnings: WarningLog) -> dict[int, bytes | None]:
    """Extended attributes of directories and links not reused (files read anew brought theirs, in
    the reading threads): a directory whose ctime moved is read (changing an attribute moves the
    ctime); one whose attributes cannot be read keeps the parent's (``rows`` is set to reuse them).
    Symlinks carry none (Linux refuses user attributes on links). Window row -> blob."""
    out: dict[int, bytes | None] = {}
    todo = np.flatnonzero(~is_file & (rows < 0))
    if not len(todo):
        return out
    at = pa.array(todo, pa.int64())
    paths, types = w.column("path").take(at).to_pylist(), w.column("type").take(at).to_pylist()
    for k, path, ty in zip(todo.tolist(), paths, types, strict=True):
        rel = os.fsdecode(path)
        if ty == SYMLINK:
            blob, _ = view.xattrs(rel)
            if blob:
                warnings.append(f"{printable(rel)}: extended attributes of a symlink are not carried")
            continue
        blob, problem = view.xattrs(rel)
        if problem:
            i = int(same[k])
            if i >= 0 and p is not None and p.type_of(i) == DIR:
                # Unreadable attributes are not removed attributes: keep the last captured ones.
                warnings.append(f"{printable(rel)}: {problem}; the last captured ones are kept")
                rows[k] = i
                continue
            warnings.append(f"{printable(rel)}: {problem}")
        out[k] = blob
    return out


def _merge_stale(stored: Spool, p: pa.Table | None, lost: list[str], unlisted: list[str],
                 devices: dict[str, int], groups: LinkGroups,
                 warnings: WarningLog, vanished: Sequence[tuple[str, int]] = (),
                 vanished_files: Sequence[tuple[str, int]] = (),
                 unread_files: Sequence[tuple[str, int, str, int, int]] = (),
                 outside: LeftOut | None = None,
                 on_purpose: Callable[[bytes], bool] | None = None) -> tuple[Spool, int, int, int, int]:
    """The rare path: merge in the parent's rows of paths that exist but could not be read
    (unreadable entries and all below them, all below directories that could not be listed, or that
    vanished between their parent's listing and their own: renamed meanwhile, so below the parent's
    directory of the same inode too, whatever its name; a file of a new name that vanished: the parent's
    file of its inode, whatever its name) marked stale, unless this capture has them. A file or directory
    of a new name that cannot be read, and that the parent has under another name (the same inode, size and
    modification time: renamed, then made unreadable), keeps the parent's version under its new name.
    A directory that cannot be listed and is new or changed since the parent (its time moved) may hold
    what went missing elsewhere (``mv b z/b; chmod 000 z``): then every path of the parent this capture
    lacks is kept. Kept rows whose directory this capture has as something else are left out. Their
    hard links worked out against this capture's ``groups`` on the device of the path they are kept for
    (``devices``, :func:`_stale_links`);
    links that the merged rows make escape the root left out. ``on_purpose``: paths this capture left out by
    rule (an excluded place, a link leading outside), never kept from the parent.
    The result is validated as a restore will (IntegrityError rather than a snapshot no restore
    takes). Returns (the manifest, stale rows, skipped paths, stale files, their bytes)."""
    with stored:
        table = Manifest.from_bytes(stored, "the captured manifest").table
    stale_rows: list[int] = []
    skipped = 0
    held: list[str] = []
    if p is not None:
        ppaths = p.column("path").to_pylist()  # bytes, sorted: subtrees are ranges
        have = set(table.column("path").to_pylist())
        row = {x: i for i, x in enumerate(ppaths)}
        keep: dict[int, int | None] = {}  # parent row -> the device of the path it is kept for
        for rel in lost:
            i = row.get(os.fsencode(rel))
            if i is not None and ppaths[i] not in have:
                keep.setdefault(i, devices.get(rel))
        # A directory that vanished was renamed, perhaps back to the name the parent has it under (and this
        # walk listed its parent before): the parent's directory of that inode is kept too, itself included.
        unlisted_ids = _identities(table, unlisted)
        files_of = _rows_by_inode(p, {ino for _, ino in vanished_files} | {u[1] for u in unread_files}, FILE)
        dirs_of = _rows_by_inode(p, {ino for _, ino in vanished} | {ino for ino, _ in unlisted_ids.values()}, DIR)
        pmtime = p.column("mtime_s").to_numpy(zero_copy_only=False) * 1_000_000_000 + \
            p.column("mtime_nsec").to_numpy(zero_copy_only=False).astype(np.int64)
        pdir = bool_mask(pc.equal(p.column("type"), DIR))
        moved: list[str] = []
        for f, ino in vanished_files:  # a file of a new name gone before its read: renamed back, perhaps
            for i in files_of.get(ino, ()):
                if ppaths[i] not in have:
                    keep.setdefault(i, devices.get(f))
                    warnings.append(f"{printable(f)}: vanished while the snapshot was taken (renamed or removed); "
                                    f"its last captured version (as {printable(os.fsdecode(ppaths[i]))}) is kept")
        repath: dict[int, bytes] = {}  # parent row -> the new name it is kept under (renamed, then unreadable)
        psize = p.column("size")
        for f, ino, why, size, mtime in unread_files:  # a new name that cannot be read: renamed from another?
            key = os.fsencode(f)
            old = next((i for i in files_of.get(ino, ()) if ppaths[i] != key and int(pmtime[i]) == mtime
                        and psize[i].as_py() == size and i not in repath), None)
            if old is not None:
                keep[old] = devices.get(f)
                repath[old] = key
            warnings.append(f"{printable(f)}: {why}; " + (
                f"its last captured version (as {printable(os.fsdecode(ppaths[old]))}) is kept, stale"
                if old is not None else "not captured (no earlier snapshot has it)"))
            skipped += 0 if old is not None else 1
        for d, (ino, mtime) in unlisted_ids.items():  # a directory renamed, then made unlistable
            key = os.fsencode(d)
            if key in row:
                continue  # the parent has it under this name: what it holds below is kept already
            old = next((i for i in dirs_of.get(ino, ()) if ppaths[i] != key and int(pmtime[i]) == mtime), None)
            if old is None:
                continue
            prefix = ppaths[old] + b"/"
            i = bisect.bisect_left(ppaths, prefix)
            while i < len(ppaths) and ppaths[i].startswith(prefix):
                if i not in repath:
                    keep[i] = devices.get(d)
                    repath[i] = key + ppaths[i][len(prefix) - 1:]
                i += 1
            warnings.append(f"{printable(d)}: cannot be listed; what the last snapshot holds below it (as "
                            f"{printable(os.fsdecode(ppaths[old]))}) is kept, stale")
        # new since the parent, or its time moved (entries added or removed in it)
        held = [d for d, (_, mtime) in unlisted_ids.items()
                if (i := row.get(os.fsencode(d))) is None or not pdir[i] or int(pmtime[i]) != mtime]
        if held:
            missing = [i for i, x in enumerate(ppaths)
                       if x not in have and i not in keep and not (on_purpose is not None and on_purpose(x))]
            for i in missing:
                keep[i] = None
            if missing:
                warnings.append(f"{printable(held[0]) or '.'}: cannot be listed, and it is new or changed since the "
                                f"last snapshot: what went missing elsewhere may have moved into it, so "
                                f"{len(missing)} path(s) the last snapshot has and this one lacks keep their last "
                                f"captured version (stale); nothing is removed on a standby until it can be listed")
        for d, ino in vanished:
            for i in dirs_of.get(ino, ()):
                if ppaths[i] not in have:
                    keep.setdefault(i, devices.get(d))
                    moved.append(os.fsdecode(ppaths[i]))
        for rel in (*lost, *unlisted, *(d for d, _ in vanished), *moved):
            prefix = os.fsencode(rel) + b"/" if rel else b""
            i = bisect.bisect_left(ppaths, prefix)
            while i < len(ppaths) and ppaths[i].startswith(prefix):
                if ppaths[i] not in have:
                    keep.setdefault(i, devices.get(rel))
                i += 1
        now_dirs = {x for x, d in zip(table.column("path").to_pylist(), bool_mask(pc.equal(table.column("type"), DIR)),
                                      strict=True) if d}
        if on_purpose is not None:  # what this capture left out by rule (not for a read error) stays out
            for i in [i for i in keep if on_purpose(repath.get(i, ppaths[i]))]:
                del keep[i]
        stale_rows = _placeable(now_dirs, ppaths, pdir, sorted(keep, key=lambda i: repath.get(i, ppaths[i])), repath)
        new_dirs = [d for d in unlisted if not _any_below(ppaths, d)]
        skipped += sum(1 for x in lost if os.fsencode(x) not in row) + len(new_dirs)
        for d, ino in vanished:
            also = [os.fsdecode(ppaths[i]) for i in dirs_of.get(ino, ()) if os.fsdecode(ppaths[i]) != d]
            if _any_below(ppaths, d) or also:
                as_ = f" (as {printable(also[0])})" if also else ""
                warnings.append(f"{printable(d)}: vanished while the snapshot was taken (renamed or removed); "
                                f"what the last snapshot holds below it{as_} is kept, stale")
    else:
        new_dirs = unlisted
        skipped = len(lost) + len(unlisted) + len(unread_files)
        for f, _, why, _, _ in unread_files:
            warnings.append(f"{printable(f)}: {why}; not captured (no earlier snapshot has it)")
    for d in new_dirs:
        if d in held:
            continue  # said above: what the parent had elsewhere is kept
        warnings.append(f"{printable(d) or '.'}: not listed, and no earlier snapshot has anything below it: nothing "
                        f"below it is captured")
    if not stale_rows or p is None:
        return Manifest(table).to_spool(), 0, skipped, 0, 0  # the spool was read: the same rows in a new one
    old = p.take(pa.array(stale_rows, pa.int64()))
    if repath:
        old = old.set_column(old.schema.get_field_index("path"), "path",
                             pa.array([repath.get(i, ppaths[i]) for i in stale_rows], old.schema.field("path").type))
    kept_files = old.filter(pc.equal(old.column("type"), FILE))
    stale_files, stale_bytes = kept_files.num_rows, int(pc.sum(kept_files.column("size")).as_py() or 0)
    old = old.set_column(old.schema.get_field_index("stale"), "stale", pa.array([True] * old.num_rows, pa.bool_()))
    old = old.set_column(old.schema.get_field_index("hardlink"), "hardlink",
                         pa.array(_stale_links(old, [keep[i] for i in stale_rows], groups, warnings), pa.binary()))
    table = sort_by_path(pa.concat_tables([table, old]))
    table = _without_escaping_links(table, warnings, outside)
    merged = Manifest(table.combine_chunks())
    validate(merged, "the captured manifest with its stale rows")
    return merged.to_spool(), len(stale_rows), skipped, stale_files, stale_bytes


def _identities(table: pa.Table, unlisted: list[str]) -> dict[str, tuple[int, int]]:
    """Each directory of ``unlisted`` this capture has a row for (all but the root): its inode and
    modification time (ns)."""
    out: dict[str, tuple[int, int]] = {}
    paths = table.column("path")
    for d in unlisted:
        at = pc.index(paths, pa.scalar(os.fsencode(d), paths.type)).as_py() if d else -1
        if at >= 0:
            out[d] = (int(table.column("inode")[at].as_py() or 0),
                      table.column("mtime_s")[at].as_py() * 1_000_000_000 + table.column("mtime_nsec")[at].as_py())
    return out


def _placeable(dirs: set[bytes], ppaths: list[bytes], pdir: np.ndarray, rows: list[int],
               repath: Mapping[int, bytes]) -> list[int]:
    """The parent's ``rows`` (in the order of the paths they are kept under, ``repath`` or their own; none
    of them in this capture) that can be merged into it: each one's directory is one of this capture's
    ``dirs`` or a kept directory (``pdir``: which parent rows are directories), the root's entries always.
    A row below a path this capture has as a file or a link (a type change) is left out: a manifest never
    holds a path below a file. Returns them ascending by parent row."""
    out = []
    for i in rows:  # path order: a kept directory comes before what is kept below it
        path = repath.get(i, ppaths[i])
        parent = path.rpartition(b"/")[0]
        if parent and parent not in dirs:
            continue
        out.append(i)
        if pdir[i]:
            dirs.add(path)
    return sorted(out)


def _rows_by_inode(p: pa.Table, inodes: set[int], kind: str) -> dict[int, list[int]]:
    """Rows of table ``p`` of type ``kind`` by their inode, for the ``inodes`` asked (0, not known, never)."""
    inodes.discard(0)
    if not inodes:
        return {}
    hit = pc.and_(pc.equal(p.column("type"), kind),
                  pc.is_in(p.column("inode"), value_set=pa.array(sorted(inodes), pa.uint64())))
    rows = np.flatnonzero(bool_mask(hit))
    out: dict[int, list[int]] = {}
    for i, ino in zip(rows.tolist(), p.column("inode").take(pa.array(rows)).to_pylist(), strict=True):
        out.setdefault(ino, []).append(i)
    return out


def _any_below(ppaths: list[bytes], rel: str) -> bool:
    """Whether the sorted paths ``ppaths`` have one below directory ``rel`` ("": the root)."""
    prefix = os.fsencode(rel) + b"/" if rel else b""
    i = bisect.bisect_left(ppaths, prefix)
    return i < len(ppaths) and ppaths[i].startswith(prefix)


def _left_on_purpose(escaping: set[bytes], scan: TreeScan, exclude: frozenset[str]) -> Callable[[bytes], bool]:
    """Whether a path (bytes) was left out of this capture by rule: a link leading outside the root (by its
    text or through others), a special file, or an excluded path; or lies below one of them."""
    dropped = np.sort(np.concatenate([np.frombuffer(scan.outside, np.int64), np.frombuffer(scan.specials, np.int64)]))
    excluded = [os.fsencode(x) for x in exclude]

    def left(path: bytes) -> bool:  # the path, or a directory above it (what stood there is left out)
        if any(path == x or path.startswith(x + b"/") for x in excluded):
            return True
        at = path_and_above(path)
        return any(p in escaping for p in at) or bool(
            len(dropped) and in_sorted(dropped, np.array([hash(p) for p in at], np.int64)).any())
    return left


def _without_escaping_links(table: pa.Table, warnings: WarningLog, outside: LeftOut | None = None) -> pa.Table:
    """Leave out links that, with the kept (stale) rows merged in, resolve outside the root: what a
    capture writes always passes the manifest rule its restore applies."""
    if outside is None and not may_escape(table.filter(pc.equal(table.column("type"), SYMLINK)).column("target")):
        return table  # no link climbs: none leaves the root through others (link_walk.escaping_in)
    while True:
        bad = escaping_in(lambda links=table.select(["path", "type", "target"]): [links], warnings, outside)
        if not bad:
            return table
        gone = pa.array(sorted(bad), pa.binary())
        table = table.filter(pc.invert(pc.and_(pc.equal(table.column("type"), SYMLINK),
                                               pc.is_in(table.column("path").cast(pa.binary()), value_set=gone))))


def _stale_links(old: pa.Table, devices: list[int | None], groups: LinkGroups,
                 warnings: WarningLog) -> list[bytes | None]:
    """Hard links of kept (stale) rows, in path order (``devices``: each row's device where known).
    A stale file joins this capture's group of its device and inode only if it holds what that
    group's leader (read today) holds: the same inode number with other bytes is a file rewritten
    since, or a number reused by another file, and a link to it would restore other bytes under this
    name; an inode number on another device is another file. Otherwise it keeps its parent's group
    among the stale rows (the first stale member of that group leads, a member holding other bytes
    stands alone)."""
    out: list[bytes | None] = []
    stale_lead: dict[bytes, tuple[bytes, tuple[object, ...]]] = {}  # parent's group leader -> stale leader
    for dev, path, link, ino, typ, size, content, mode, uid, gid in zip(
            devices, *(old.column(c).to_pylist() for c in ("path", "hardlink", "inode", "type", "size", "content",
                                                            "mode", "uid", "gid")), strict=True):
        if typ != FILE:
            out.append(None)
            continue
        key = (size, content, mode, uid, gid)
        today = groups.leader(dev, ino, holds(size, content, mode, uid, gid)) if dev is not None else None
        if today is not None:
            out.append(today)
            continue
        lead = stale_lead.setdefault(link or path, (path, key))
        if lead[0] == path:
            out.append(None)
        elif lead[1] == key:
            out.append(lead[0])
        else:
            warnings.append(f"{printable(os.fsdecode(path))}: kept stale as a file of its own, not as a hard link "
                            f"to {printable(os.fsdecode(lead[0]))}, which holds other bytes")
            out.append(None)
    return out
