"""Capturing a data root (local or HDFS) into a manifest and new chunks.

Files whose (size, mtime, ctime, inode) match the parent snapshot reuse its
chunk list without being read, unless they were "racy" (modified within two
seconds of the parent's capture, when a same-tick rewrite could hide). Other
files are read, cut, hashed and stored by a small pool of threads (the
compiled cores release the GIL). On a live tree a file that changes while it
is read is read again, a bounded number of times, then reported in
``warnings``; from a frozen view (an HDFS snapshot) nothing can change.

For ``replication.engine = "distcp"`` (``content=HDFS_CHECKSUM``) files are not read: each new or
changed file gets its HDFS checksum from a datanode (an external row, see
:func:`drsync.repository.manifest.is_external`), and the HDFS snapshot the capture read from is
kept as the source a standby's DistCp copies the bytes from.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from drsync.dataroot import DataRoot, FileVersion, FrozenRoot, open_data_root
from drsync.errors import OperationFailed, UsageError
from drsync.repository import chunks
from drsync.repository.manifest import (
    DIR,
    EMPTY_CONTENT,
    FILE,
    SCHEMA,
    SYMLINK,
    Manifest,
    content_digest,
    escaping_links,
    hdfs_checksum_digest,
    printable,
    sort_by_path,
    table_from_columns,
)
from drsync.repository.repo import ChunkWriter
from drsync.repository.snapshots import WarningLog
from drsync.tree import TreeScan

# Reading tasks are batched so that tiny files do not pay one executor round trip each.
_BATCH_FILES = 256
_BATCH_BYTES = 32 * 1024 * 1024
_RACY_NS = 2_000_000_000

ProgressFn = Callable[[int], None]

CHUNKS = "chunks"                 # file bytes are read, cut into chunks and stored in the repository
HDFS_CHECKSUM = "hdfs-checksum"   # file bytes stay in an HDFS snapshot; the manifest holds their checksum


@dataclass
class CaptureResult:
    manifest: Manifest
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


class _ParentView:
    """The parent manifest's stat columns, for the unchanged-file check."""

    def __init__(self, parent: Manifest, captured_at: float, *, external_ok: bool = False) -> None:
        t = parent.table
        self.table = t
        self.paths = parent.pycolumn("path")
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.type = t.column("type").to_pylist()
        self.size = t.column("size").to_pylist()
        self.mtime = parent.pycolumn("mtime_ns")
        self.ctime = t.column("ctime_ns").to_pylist()
        self.inode = t.column("inode").to_pylist()
        self.racy_after = int(captured_at * 1e9) - _RACY_NS
        # A row is reused only in the form this capture makes: a capture that stores chunks cannot reuse a
        # row whose bytes only an HDFS snapshot held, and a capture for DistCp checksums files the parent
        # has as chunks (a snapshot is all one kind, so a standby's checks cover every file).
        chunk_counts = pc.list_value_length(t.column("chunks")).to_pylist()
        size_counts = pc.list_value_length(t.column("chunk_sizes")).to_pylist()
        self.no_reuse: set[int] = {
            i for i, (n, m, size) in enumerate(zip(chunk_counts, size_counts, self.size, strict=True))
            if (n != m) != external_ok and (size or 0) > 0}

    def rows_kept_for(self, scan: TreeScan, kept: list[int], lost: list[str]) -> list[int]:
        """Parent rows to keep (stale) for paths that exist but could not be read: unreadable entries
        and everything below them, and everything below directories that could not be listed,
        unless the capture has it."""
        have = {scan.path[k] for k in kept}
        keys = self.table.column("path").to_pylist()  # bytes, sorted: subtrees are ranges
        out: set[int] = set()
        for rel in lost:
            i = self.row.get(rel)
            if i is not None and rel not in have:
                out.add(i)
        for rel in (*lost, *scan.unlisted):
            prefix = os.fsencode(rel) + b"/" if rel else b""
            i = bisect.bisect_left(keys, prefix)
            while i < len(keys) and keys[i].startswith(prefix):
                if self.paths[i] not in have:
                    out.add(i)
                i += 1
        return sorted(out)

    def reusable_rows(self, scan: TreeScan) -> list[int]:
        """For each scanned entry, the parent row whose chunks it can reuse, or -1."""
        out = [-1] * len(scan)
        row_get = self.row.get
        ptype, psize, pmtime, pctime, pinode = self.type, self.size, self.mtime, self.ctime, self.inode
        racy = self.racy_after
        for k, (path, typ, size, mtime, ctime, ino) in enumerate(zip(
                scan.path, scan.type, scan.size, scan.mtime_ns, scan.ctime_ns, scan.inode, strict=True)):
            if typ != FILE:
                continue
            i = row_get(path)
            if i in self.no_reuse:
                continue
            if (i is not None and ptype[i] == FILE and psize[i] == size and pmtime[i] == mtime
                    and pctime[i] == ctime and pinode[i] == ino and mtime < racy):
                out[k] = i
        return out


def capture(root: str | DataRoot, writer: ChunkWriter, *, parent: Manifest | None = None,
            parent_captured_at: float | None = None, reread_attempts: int = 3,
            exclude: frozenset[str] = frozenset(), workers: int | None = None,
            progress: ProgressFn | None = None, on_total: Callable[[int], None] | None = None,
            captured_at: float | None = None, allow_empty: bool = False, content: str = CHUNKS,
            pinned: frozenset[str] = frozenset()) -> CaptureResult:
    """Capture ``root``. New chunks go to ``writer``; the caller flushes and commits.

    ``captured_at`` and ``parent_captured_at`` name the frozen views (HDFS
    snapshots) of this capture and of the parent's, so that the next capture
    can ask the namenode what changed since. A path that exists but cannot be
    read keeps its version from ``parent``, marked stale (a read error is never
    a deletion). Raises OperationFailed when the root is empty but ``parent``
    was not (an unmounted volume looks like this), unless ``allow_empty``.

    ``content=HDFS_CHECKSUM``: files are checksummed by the datanodes instead of read, and the HDFS
    snapshot is kept (``result.content_snapshot``) for DistCp; ``pinned`` names older ones a
    shipment still copies from (all others of this process are deleted). UsageError on a root
    that is not a snapshottable HDFS directory.
    """
    data_root = open_data_root(root) if isinstance(root, str) else root
    data_root.check_capturable()
    tag = _tag(captured_at)
    parent_tag = _tag(parent_captured_at) if parent is not None and parent_captured_at else None
    if content == HDFS_CHECKSUM:
        if not getattr(data_root, "supports_distcp", False):
            raise UsageError(f"data root {data_root.url} is not on HDFS: replication.engine = \"distcp\" needs "
                             f"HDFS data roots on both clusters; use engine = \"agent\"")
        frozen = data_root.frozen(tag, parent_tag, parent, keep=True, pinned=pinned)  # type: ignore[call-arg]
    else:
        frozen = data_root.frozen(tag, parent_tag, parent)
    with frozen as view:
        result = _capture_view(view, writer, parent=parent, parent_captured_at=parent_captured_at,
                               reread_attempts=0 if view.consistent else reread_attempts, exclude=exclude,
                               workers=workers, progress=progress, on_total=on_total, content=content)
        result.content_snapshot = getattr(view, "snapshot", None) if content == HDFS_CHECKSUM else None
        notes = WarningLog(view.notes)  # the view's notes first
        notes.merge(result.warnings)
        result.warnings = notes
    if not allow_empty and parent is not None and parent.file_count() and not result.manifest.file_count():
        raise OperationFailed(f"data root {data_root.url} holds no files, but the last snapshot held "
                              f"{parent.file_count()}: is its volume mounted? Nothing was captured; if it is empty "
                              f"on purpose, run 'drsync snapshot create --allow-empty'")
    return result


def _tag(at: float | None) -> str:
    return str(int((at or 0) * 1000))


def _capture_view(view: FrozenRoot, writer: ChunkWriter, *, parent: Manifest | None,
                  parent_captured_at: float | None, reread_attempts: int, exclude: frozenset[str],
                  workers: int | None, progress: ProgressFn | None,
                  on_total: Callable[[int], None] | None, content: str = CHUNKS) -> CaptureResult:
    scan = view.scan(exclude)
    warnings = scan.warnings
    pv = (_ParentView(parent, parent_captured_at or 0.0, external_ok=content == HDFS_CHECKSUM)
          if parent is not None and len(parent) else None)
    algorithms: set[str] = set()
    parent_row = pv.reusable_rows(scan) if pv is not None else [-1] * len(scan)
    to_read = [k for k in range(len(scan)) if scan.type[k] == FILE and parent_row[k] < 0]
    if on_total:
        on_total(sum(scan.size[k] for k in to_read))

    read: dict[int, _ReadFile] = {}
    gone: set[int] = set()
    lost = list(scan.unreadable)  # exist, but could not be read: never a deletion
    if to_read:
        batches: list[list[int]] = [[]]
        acc = 0
        for k in sorted(to_read, key=lambda k: scan.size[k], reverse=True):
            if len(batches[-1]) >= _BATCH_FILES or acc >= _BATCH_BYTES:
                batches.append([])
                acc = 0
            batches[-1].append(k)
            acc += scan.size[k]

        def run(batch: list[int]) -> list[tuple[int, _ReadFile | str]]:
            if content == HDFS_CHECKSUM:
                return [(k, _checksum_one(view, scan.path[k], algorithms, progress)) for k in batch]
            return [(k, _read_one(view, scan.path[k], writer, reread_attempts, progress)) for k in batch]

        n = workers or min(4, (os.cpu_count() or 2) + 1)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="drsync-capture") as pool:
            for results in pool.map(run, batches):
                for k, got in results:
                    if isinstance(got, str):
                        if got != "vanished":
                            lost.append(scan.path[k])
                            warnings.append(f"{printable(scan.path[k])}: {got}; its last captured version "
                                            f"is kept")
                        gone.add(k)
                        continue
                    if got.problem:
                        warnings.append(f"{printable(scan.path[k])}: {got.problem}")
                    if got.xattr_problem:
                        warnings.append(f"{printable(scan.path[k])}: {got.xattr_problem}")
                    read[k] = got

    keep = [k for k in range(len(scan)) if k not in gone]
    xattrs = _attributes(view, scan, keep, parent_row, pv, read, warnings)
    stale_rows = pv.rows_kept_for(scan, keep, lost) if pv is not None else []
    # Left out for good: unreadable paths with no earlier version, unlisted directories with no earlier content.
    skipped = sum(1 for p in lost if pv is None or p not in pv.row) + sum(
        1 for d in scan.unlisted if pv is None or not any(p.startswith(f"{d}/" if d else "") for p in pv.row))
    table = _build_table(scan, keep, parent_row, read, pv, xattrs, stale_rows)
    if stale_rows:  # the scan left escaping links out; merged stale links could make new ones
        table = _without_escaping_links(table, warnings)
    files = sum(1 for k in keep if scan.type[k] == FILE)
    total = sum(read[k].version.size if k in read else scan.size[k] for k in keep if scan.type[k] == FILE)
    return CaptureResult(Manifest(table), files=files, bytes=total,
                         read_bytes=0 if content == HDFS_CHECKSUM else sum(r.version.size for r in read.values()),
                         reused_files=sum(1 for k in keep if parent_row[k] >= 0 and scan.type[k] == FILE),
                         warnings=warnings,
                         stale=len(stale_rows), skipped=skipped, checksum_algorithms=algorithms)


def _without_escaping_links(table: pa.Table, warnings: WarningLog) -> pa.Table:
    """Leave out links that, with the kept (stale) rows merged in, resolve outside the root: what a
    capture writes always passes the manifest rule its restore applies."""
    while True:
        m = Manifest(table)
        types = table.column("type").to_pylist()
        paths, targets = m.pycolumn("path"), m.pycolumn("target")
        links = {p: t for p, t, ty in zip(paths, targets, types, strict=True) if ty == SYMLINK}
        bad = set(escaping_links(links)) if links else set()
        if not bad:
            return table
        for p in sorted(bad):
            warnings.append(f"{printable(p)}: symlink to {printable(links[p] or '')} leads outside the data root "
                            f"through other links; not captured")
        table = table.filter(pa.array([p not in bad for p in paths], pa.bool_()))


def _attributes(view: FrozenRoot, scan: TreeScan, keep: list[int], parent_row: list[int],
                pv: _ParentView | None, read: dict[int, _ReadFile],
                warnings: WarningLog) -> dict[int, bytes | None]:
    """Extended attributes of the kept entries: files read anew brought theirs (read from the open
    file, in the reading threads); directories whose ctime moved are read here (changing an attribute
    moves the ctime). Reused files and unchanged directories take the parent's; symlinks carry none
    (Linux refuses user attributes on links)."""
    out: dict[int, bytes | None] = {k: r.xattrs for k, r in read.items() if r.xattrs is not None}
    types = scan.type
    for k in [k for k in keep if types[k] != FILE]:
        typ = types[k]
        if typ == SYMLINK:
            blob, _ = view.xattrs(scan.path[k])
            if blob:
                warnings.append(f"{printable(scan.path[k])}: extended attributes of a symlink are not carried")
            continue
        if typ != DIR:
            continue
        i = pv.row.get(scan.path[k]) if pv is not None else None
        same_dir = i is not None and pv is not None and pv.type[i] == DIR
        if same_dir and pv is not None and i is not None and pv.ctime[i] == scan.ctime_ns[k]:
            parent_row[k] = i  # unchanged directory: its attributes come from the parent
            continue
        blob, problem = view.xattrs(scan.path[k])
        if problem:
            # Unreadable attributes are not removed attributes: keep the last captured ones.
            warnings.append(f"{printable(scan.path[k])}: {problem}" + ("; the last captured ones are kept"
                                                                       if same_dir else ""))
            if same_dir and i is not None:
                parent_row[k] = i
                continue
        out[k] = blob
    return out


_CARRIED = ("content", "chunks", "chunk_sizes", "xattrs")


def _build_table(scan: TreeScan, keep: list[int], parent_row: list[int], read: dict[int, _ReadFile],
                 pv: _ParentView | None, xattrs: dict[int, bytes | None], stale_rows: list[int]) -> pa.Table:
    """The path-sorted manifest table. Chunk and attribute columns of reused entries come from the parent.

    The chunk lists of unchanged files never become Python objects: one Arrow
    ``take`` over (parent rows + fresh rows) assembles the carried columns.
    Directories reuse a parent row for their attributes only (they have no chunks).
    """
    fresh = [k for k in keep if parent_row[k] < 0]
    fresh_tbl = pa.table({
        "content": pa.array([read[k].content if k in read else None for k in fresh],
                            SCHEMA.field("content").type),
        "chunks": pa.array([read[k].chunks if k in read else [] for k in fresh], SCHEMA.field("chunks").type),
        "chunk_sizes": pa.array([read[k].chunk_sizes if k in read else [] for k in fresh],
                                SCHEMA.field("chunk_sizes").type),
        "xattrs": pa.array([xattrs.get(k) for k in fresh], pa.binary()),
    })
    if pv is None or len(fresh) == len(keep):
        data = fresh_tbl
    else:
        offset = pv.table.num_rows
        take: list[int] = []
        n_fresh = 0
        for k in keep:
            i = parent_row[k]
            if i >= 0:
                take.append(i)
            else:
                take.append(offset + n_fresh)
                n_fresh += 1
        base = pv.table.select(list(_CARRIED))
        data = pa.concat_tables([base, fresh_tbl]).take(pa.array(take, pa.int64()))

    def col(values: list, name: str) -> list:  # type: ignore[type-arg]
        if len(keep) == len(values) and not read:
            return values
        return [getattr(read[k].version, name) if k in read else values[k] for k in keep]

    def pick(values: list) -> list:  # type: ignore[type-arg]
        return [values[k] for k in keep] if len(keep) != len(scan) else values

    paths, types = pick(scan.path), pick(scan.type)
    sizes = col(scan.size, "size")
    links = _hardlinks(scan, keep, paths, types)
    table = table_from_columns({
        "path": paths, "type": types,
        "mode": col(scan.mode, "mode"), "uid": col(scan.uid, "uid"), "gid": col(scan.gid, "gid"),
        "size": sizes, "mtime_ns": col(scan.mtime_ns, "mtime_ns"),
        "ctime_ns": col(scan.ctime_ns, "ctime_ns"), "inode": col(scan.inode, "inode"),
        "target": pick(scan.target),
        "content": data.column("content"), "chunks": data.column("chunks"),
        "chunk_sizes": data.column("chunk_sizes"), "xattrs": data.column("xattrs"),
        "hardlink": links,
        "sparse": [t == FILE and b * 512 < s for t, b, s in zip(types, pick(scan.blocks), sizes, strict=True)],
    })
    if stale_rows and pv is not None:
        old = pv.table.take(pa.array(stale_rows, pa.int64()))
        old = old.set_column(old.schema.get_field_index("stale"), "stale",
                             pa.array([True] * old.num_rows, pa.bool_()))
        # Multiply-linked files of this capture by inode, to the first path of their group.
        groups = {scan.inode[k]: os.fsencode(links[j] or paths[j]) for j, k in enumerate(keep)
                  if types[j] == FILE and scan.nlink[k] > 1}
        old = old.set_column(old.schema.get_field_index("hardlink"), "hardlink",
                             pa.array(_stale_links(old, groups), pa.binary()))
        table = pa.concat_tables([table, old])
    return sort_by_path(table).combine_chunks()


def _stale_links(old: pa.Table, leader_of_inode: dict[int, bytes]) -> list[bytes | None]:
    """Hard links of kept (stale) rows: a stale file whose inode is a multiply-linked file's of this
    capture joins that file's group (whose first path is read today, so the group has today's
    content); one whose last leader is stale too keeps that link; any other stands alone."""
    stale_paths = set(old.column("path").to_pylist())
    out: list[bytes | None] = []
    for link, ino, typ in zip(old.column("hardlink").to_pylist(), old.column("inode").to_pylist(),
                              old.column("type").to_pylist(), strict=True):
        if typ != FILE:
            out.append(None)
        elif ino in leader_of_inode:
            out.append(leader_of_inode[ino])
        else:
            out.append(link if link in stale_paths else None)
    return out


def _hardlinks(scan: TreeScan, keep: list[int], paths: list[str], types: list[str]) -> list[str | None]:
    """For each kept entry, the first path (in manifest order) of its hard-link group, or None."""
    groups: dict[tuple[int, int], list[int]] = {}
    nlink = scan.nlink
    for j, k in [(j, k) for j, k in enumerate(keep) if nlink[k] > 1 and types[j] == FILE]:
        groups.setdefault((scan.dev[k], scan.inode[k]), []).append(j)
    out: list[str | None] = [None] * len(keep)
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda j: os.fsencode(paths[j]))
        for j in members[1:]:
            out[j] = paths[members[0]]
    return out
