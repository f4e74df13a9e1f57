"""Capturing a local data root into a manifest and new chunks.

Files whose (size, mtime, ctime, inode) match the parent snapshot reuse its
chunk list without being read, unless they were "racy" (modified within a
second of the parent's capture, when a same-tick rewrite could hide). Other
files are read, cut, hashed and stored by a small pool of threads (the
compiled cores release the GIL). A file that changes while it is read is read
again, a bounded number of times, then reported in ``warnings``.
"""

from __future__ import annotations

import os
import stat as st
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from drsync.errors import UsageError
from drsync.repository import chunks
from drsync.repository.manifest import DIR, EMPTY_CONTENT, FILE, SCHEMA, SYMLINK, Manifest, content_digest
from drsync.repository.manifest import symlink_stays_inside as _inside
from drsync.repository.repo import ChunkWriter

# Names at the top of a data root that belong to drsync itself (staging of an apply).
RESERVED_NAMES = frozenset({".drsync-staging", ".drsync-trash"})
# Files up to this size are read with one call and cut in memory.
_SMALL_FILE = 8 * 1024 * 1024
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


@dataclass
class _Walked:
    path: str
    abspath: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    target: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    content: bytes | None = None


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

    def unchanged(self, w: _Walked) -> int | None:
        i = self.row.get(w.path)
        if i is None or self.type[i] != FILE:
            return None
        if (self.size[i] == w.size and self.mtime[i] == w.mtime_ns and self.ctime[i] == w.ctime_ns
                and self.inode[i] == w.inode and self.mtime[i] < self.racy_after):
            return i
        return None


def walk(root: str, exclude: frozenset[str] = frozenset(),
         warnings: list[str] | None = None) -> list[_Walked]:
    """Every entry below ``root`` (not following links), in no particular order."""
    out: list[_Walked] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            it = os.scandir(abs_dir)
        except FileNotFoundError:
            continue  # removed while we walked: it is simply not in this snapshot
        except PermissionError:
            if warnings is not None:
                warnings.append(f"{rel_dir or '.'}: permission denied; not captured")
            continue
        with it:
            for e in it:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if (not rel_dir and e.name in RESERVED_NAMES) or e.path in exclude:
                    continue
                try:
                    s = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                m = s.st_mode
                if st.S_ISDIR(m):
                    typ = DIR
                    stack.append((rel, e.path))
                elif st.S_ISREG(m):
                    typ = FILE
                elif st.S_ISLNK(m):
                    typ = SYMLINK
                else:
                    if warnings is not None:
                        warnings.append(f"{rel}: special file (fifo, socket or device) not captured")
                    continue
                w = _Walked(rel, e.path, typ, st.S_IMODE(m), s.st_uid, s.st_gid,
                            s.st_size if typ == FILE else 0, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                if typ == SYMLINK:
                    try:
                        w.target = os.readlink(e.path)
                    except FileNotFoundError:
                        continue
                    if not _inside(rel, w.target):
                        if warnings is not None:
                            warnings.append(f"{rel}: symlink to {w.target} leaves the data root; not captured")
                        continue
                out.append(w)
    return out


def _stable(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns,
                                                                   b.st_ino)


def _read_one(w: _Walked, writer: ChunkWriter, attempts: int, progress: ProgressFn | None) -> str | None:
    """Read, cut and store one file; fill ``w``. Returns a warning, or None."""
    for _attempt in range(attempts + 1):
        try:
            fd = os.open(w.abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return "vanished"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        try:
            before = os.fstat(fd)
            if not st.S_ISREG(before.st_mode):
                return "vanished"
            ids: list[bytes] = []
            sizes: list[int] = []
            if before.st_size <= _SMALL_FILE:
                buf = _read_all(fd, before.st_size)
                pieces = chunks.cut_buffer(buf) if buf else iter(())
            else:
                f = os.fdopen(os.dup(fd), "rb", buffering=0)
                pieces = _closing(chunks.cut_stream(f), f)
            for data in pieces:
                cid = chunks.chunk_id(data)
                writer.add(cid, data)
                ids.append(cid)
                sizes.append(len(data))
                if progress:
                    progress(len(data))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        total = sum(sizes)
        w.chunks, w.chunk_sizes = ids, sizes
        w.content = content_digest(ids) if ids else EMPTY_CONTENT
        w.size, w.mtime_ns, w.ctime_ns, w.inode = total, after.st_mtime_ns, after.st_ctime_ns, after.st_ino
        w.mode, w.uid, w.gid = st.S_IMODE(after.st_mode), after.st_uid, after.st_gid
        if _stable(before, after) and total == after.st_size:
            return None
    return f"changed while being read ({attempts + 1} attempts); captured as last read"


def _closing(it, f):  # type: ignore[no-untyped-def]
    try:
        yield from it
    finally:
        f.close()


def _read_all(fd: int, size_hint: int) -> bytes:
    parts = []
    want = size_hint + 1  # one byte more reveals growth without a second call
    while True:
        b = os.read(fd, max(want, 65536))
        if not b:
            break
        parts.append(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def capture(root: str, writer: ChunkWriter, *, parent: Manifest | None = None,
            parent_captured_at: float | None = None, reread_attempts: int = 3,
            exclude: frozenset[str] = frozenset(), workers: int | None = None,
            progress: ProgressFn | None = None, on_total: Callable[[int], None] | None = None) -> CaptureResult:
    """Capture ``root``. New chunks go to ``writer``; the caller flushes and commits."""
    if not os.path.exists(root):
        raise UsageError(f"data root {root} does not exist")
    if not os.path.isdir(root):
        raise UsageError(f"data root {root} is not a directory")
    warnings: list[str] = []
    entries = walk(os.path.abspath(root), exclude, warnings)
    pv = _ParentView(parent, parent_captured_at or 0.0) if parent is not None and len(parent) else None

    reused: list[tuple[_Walked, int]] = []
    others: list[_Walked] = []
    to_read: list[_Walked] = []
    for w in entries:
        i = pv.unchanged(w) if pv is not None and w.type == FILE else None
        if i is not None:
            reused.append((w, i))
            continue
        others.append(w)
        if w.type == FILE:
            to_read.append(w)
    if on_total:
        on_total(sum(w.size for w in to_read))

    read_bytes = 0
    vanished: set[str] = set()
    if to_read:
        batches: list[list[_Walked]] = [[]]
        acc = 0
        for w in sorted(to_read, key=lambda x: x.size, reverse=True):
            if len(batches[-1]) >= _BATCH_FILES or acc >= _BATCH_BYTES:
                batches.append([])
                acc = 0
            batches[-1].append(w)
            acc += w.size

        def run(batch: list[_Walked]) -> list[tuple[_Walked, str | None]]:
            return [(w, _read_one(w, writer, reread_attempts, progress)) for w in batch]

        n = workers or min(4, (os.cpu_count() or 2) + 1)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="drsync-capture") as pool:
            for results in pool.map(run, batches):
                for w, problem in results:
                    if problem == "vanished":
                        vanished.add(w.path)
                    elif problem:
                        warnings.append(f"{w.path}: {problem}")
                    read_bytes += w.size
    if vanished:
        # A directory entry of a vanished file is harmless; the file itself is not captured.
        others = [w for w in others if w.path not in vanished]

    tables = []
    if reused:
        assert pv is not None
        idx = pa.array([i for _, i in reused], pa.int64())
        from_parent = pv.table.take(idx)
        ws = [w for w, _ in reused]
        tables.append(pa.table({
            "path": [w.path for w in ws], "type": [FILE] * len(ws), "mode": [w.mode for w in ws],
            "uid": [w.uid for w in ws], "gid": [w.gid for w in ws], "size": [w.size for w in ws],
            "mtime_ns": [w.mtime_ns for w in ws], "ctime_ns": [w.ctime_ns for w in ws],
            "inode": [w.inode for w in ws], "target": pa.nulls(len(ws), pa.string()),
            "content": from_parent.column("content"), "chunks": from_parent.column("chunks"),
            "chunk_sizes": from_parent.column("chunk_sizes"),
        }, schema=SCHEMA))
    if others:
        tables.append(pa.table({
            "path": [w.path for w in others], "type": [w.type for w in others],
            "mode": [w.mode for w in others], "uid": [w.uid for w in others],
            "gid": [w.gid for w in others], "size": [w.size for w in others],
            "mtime_ns": [w.mtime_ns for w in others], "ctime_ns": [w.ctime_ns for w in others],
            "inode": [w.inode for w in others], "target": [w.target for w in others],
            "content": [w.content if w.type == FILE else None for w in others],
            "chunks": [w.chunks for w in others], "chunk_sizes": [w.chunk_sizes for w in others],
        }, schema=SCHEMA))
    if tables:
        table = pa.concat_tables(tables)
        from drsync.repository.manifest import sort_by_path

        manifest = Manifest(sort_by_path(table).combine_chunks())
    else:
        manifest = Manifest.empty()
    files = len(reused) + sum(1 for w in others if w.type == FILE)
    total = sum(w.size for w, _ in reused) + sum(w.size for w in others if w.type == FILE)
    return CaptureResult(manifest, files=files, bytes=total, read_bytes=read_bytes,
                         reused_files=len(reused), warnings=warnings)
