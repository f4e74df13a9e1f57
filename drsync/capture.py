"""Capturing a data root (local or HDFS) into a manifest and new chunks.

Files whose (size, mtime, ctime, inode) match the parent snapshot reuse its
chunk list without being read, unless they were "racy" (modified within two
seconds of the parent's capture, when a same-tick rewrite could hide). Other
files are read, cut, hashed and stored by a small pool of threads (the
compiled cores release the GIL). On a live tree a file that changes while it
is read is read again, a bounded number of times, then reported in
``warnings``; from a frozen view (an HDFS snapshot) nothing can change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from drsync.dataroot import DataRoot, FileVersion, FrozenRoot, open_data_root
from drsync.repository import chunks
from drsync.repository.manifest import EMPTY_CONTENT, FILE, SCHEMA, Manifest, content_digest, sort_by_path
from drsync.repository.repo import ChunkWriter
from drsync.tree import TreeScan

# Reading tasks are batched so that tiny files do not pay one executor round trip each.
_BATCH_FILES = 256
_BATCH_BYTES = 32 * 1024 * 1024
_RACY_NS = 2_000_000_000

ProgressFn = Callable[[int], None]


@dataclass
class CaptureResult:
    manifest: Manifest
    files: int = 0
    bytes: int = 0
    read_bytes: int = 0
    reused_files: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _ReadFile:
    """What reading one file produced: its version as seen after the read, sized by what was read."""

    chunks: list[bytes]
    chunk_sizes: list[int]
    content: bytes
    version: FileVersion
    problem: str | None = None


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
        except FileNotFoundError:
            return "vanished"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        total = sum(sizes)
        result = _ReadFile(ids, sizes, content_digest(ids) if ids else EMPTY_CONTENT, after._replace(size=total))
        same = (before.size, before.mtime_ns, before.ctime_ns, before.inode) == (
            after.size, after.mtime_ns, after.ctime_ns, after.inode)
        if same and total == after.size:
            return result
    assert result is not None
    result.problem = f"changed while being read ({attempts + 1} attempts); captured as last read"
    return result


class _ParentView:
    """The parent manifest's stat columns, for the unchanged-file check."""

    def __init__(self, parent: Manifest, captured_at: float) -> None:
        t = parent.table
        self.table = t
        self.row = {p: i for i, p in enumerate(t.column("path").to_pylist())}
        self.type = t.column("type").to_pylist()
        self.size = t.column("size").to_pylist()
        self.mtime = t.column("mtime_ns").to_pylist()
        self.ctime = t.column("ctime_ns").to_pylist()
        self.inode = t.column("inode").to_pylist()
        self.racy_after = int(captured_at * 1e9) - _RACY_NS

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
            if (i is not None and ptype[i] == FILE and psize[i] == size and pmtime[i] == mtime
                    and pctime[i] == ctime and pinode[i] == ino and mtime < racy):
                out[k] = i
        return out


def capture(root: str | DataRoot, writer: ChunkWriter, *, parent: Manifest | None = None,
            parent_captured_at: float | None = None, reread_attempts: int = 3,
            exclude: frozenset[str] = frozenset(), workers: int | None = None,
            progress: ProgressFn | None = None, on_total: Callable[[int], None] | None = None,
            captured_at: float | None = None) -> CaptureResult:
    """Capture ``root``. New chunks go to ``writer``; the caller flushes and commits.

    ``captured_at`` and ``parent_captured_at`` name the frozen views (HDFS
    snapshots) of this capture and of the parent's, so that the next capture
    can ask the namenode what changed since.
    """
    data_root = open_data_root(root) if isinstance(root, str) else root
    data_root.check_capturable()
    tag = _tag(captured_at)
    parent_tag = _tag(parent_captured_at) if parent is not None and parent_captured_at else None
    with data_root.frozen(tag, parent_tag, parent) as view:
        result = _capture_view(view, writer, parent=parent, parent_captured_at=parent_captured_at,
                               reread_attempts=0 if view.consistent else reread_attempts, exclude=exclude,
                               workers=workers, progress=progress, on_total=on_total)
        result.warnings[:0] = view.notes
    return result


def _tag(at: float | None) -> str:
    return str(int((at or 0) * 1000))


def _capture_view(view: FrozenRoot, writer: ChunkWriter, *, parent: Manifest | None,
                  parent_captured_at: float | None, reread_attempts: int, exclude: frozenset[str],
                  workers: int | None, progress: ProgressFn | None,
                  on_total: Callable[[int], None] | None) -> CaptureResult:
    scan = view.scan(exclude)
    warnings = list(scan.warnings)
    pv = _ParentView(parent, parent_captured_at or 0.0) if parent is not None and len(parent) else None
    parent_row = pv.reusable_rows(scan) if pv is not None else [-1] * len(scan)
    to_read = [k for k in range(len(scan)) if scan.type[k] == FILE and parent_row[k] < 0]
    if on_total:
        on_total(sum(scan.size[k] for k in to_read))

    read: dict[int, _ReadFile] = {}
    gone: set[int] = set()
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
            return [(k, _read_one(view, scan.path[k], writer, reread_attempts, progress)) for k in batch]

        n = workers or min(4, (os.cpu_count() or 2) + 1)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="drsync-capture") as pool:
            for results in pool.map(run, batches):
                for k, got in results:
                    if isinstance(got, str):
                        if got != "vanished":
                            warnings.append(f"{scan.path[k]}: {got}; not captured")
                        gone.add(k)
                        continue
                    if got.problem:
                        warnings.append(f"{scan.path[k]}: {got.problem}")
                    read[k] = got

    keep = [k for k in range(len(scan)) if k not in gone]
    table = _build_table(scan, keep, parent_row, read, pv)
    files = sum(1 for k in keep if scan.type[k] == FILE)
    total = sum(read[k].version.size if k in read else scan.size[k] for k in keep if scan.type[k] == FILE)
    return CaptureResult(Manifest(table), files=files, bytes=total,
                         read_bytes=sum(r.version.size for r in read.values()),
                         reused_files=sum(1 for k in keep if parent_row[k] >= 0), warnings=warnings)


def _build_table(scan: TreeScan, keep: list[int], parent_row: list[int], read: dict[int, _ReadFile],
                 pv: _ParentView | None) -> pa.Table:
    """The path-sorted manifest table. Chunk columns of reused files come from the parent.

    The chunk lists of unchanged files never become Python objects: one Arrow
    ``take`` over (parent rows + fresh rows) assembles the three chunk columns.
    """
    fresh = [k for k in keep if parent_row[k] < 0]
    fresh_tbl = pa.table({
        "content": pa.array([read[k].content if k in read else None for k in fresh],
                            SCHEMA.field("content").type),
        "chunks": pa.array([read[k].chunks if k in read else [] for k in fresh], SCHEMA.field("chunks").type),
        "chunk_sizes": pa.array([read[k].chunk_sizes if k in read else [] for k in fresh],
                                SCHEMA.field("chunk_sizes").type),
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
        base = pv.table.select(["content", "chunks", "chunk_sizes"])
        data = pa.concat_tables([base, fresh_tbl]).take(pa.array(take, pa.int64()))

    def col(values: list, name: str) -> list:  # type: ignore[type-arg]
        if len(keep) == len(values) and not read:
            return values
        return [getattr(read[k].version, name) if k in read else values[k] for k in keep]

    table = pa.table({
        "path": [scan.path[k] for k in keep] if len(keep) != len(scan) else scan.path,
        "type": [scan.type[k] for k in keep] if len(keep) != len(scan) else scan.type,
        "mode": col(scan.mode, "mode"), "uid": col(scan.uid, "uid"), "gid": col(scan.gid, "gid"),
        "size": col(scan.size, "size"), "mtime_ns": col(scan.mtime_ns, "mtime_ns"),
        "ctime_ns": col(scan.ctime_ns, "ctime_ns"), "inode": col(scan.inode, "inode"),
        "target": [scan.target[k] for k in keep] if len(keep) != len(scan) else scan.target,
        "content": data.column("content"), "chunks": data.column("chunks"),
        "chunk_sizes": data.column("chunk_sizes"),
    }, schema=SCHEMA)
    return sort_by_path(table).combine_chunks()
