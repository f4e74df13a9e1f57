"""Where an apply reads the chunks of the files it writes from, checked before the target changes.

Every chunk of what an apply writes is checked to be present before anything on
the target changes (:func:`check_chunks_present`, naming a file when one is
missing). A repository then locates just those chunks, without loading its
whole index (:meth:`~drsync.repository.repo.Repository.reader_for`: 61 bytes
a chunk). A write list of more than about :data:`PART_CHUNKS` chunks (a first
sync, a restore to a new directory at 1,000,000 files) is checked and located
a part at a time (:class:`PartReaders`): the part being staged is located, the
others are not held, so the apply holds about 16 MiB of locations however
large the tree, for one more pass over the index files per part.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import allocators
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list
from drsync.repository.manifest import Entry, Manifest, column_groups
from drsync.text import printable
from drsync.unchanged import WriteList

if TYPE_CHECKING:
    from drsync.apply import ChunkSource

# Chunks located at a time: about 16 MiB of ids and their locations (61 bytes a chunk). A part is cut by
# its files' sizes (a file of S bytes holds about S / CHUNK_AVG chunks, one at least).
PART_CHUNKS = 262_144


def head(write: list[Entry] | WriteList) -> list[Entry]:
    """The planner's own entries of ``write`` (a :class:`WriteList`'s rows aside)."""
    return write.head if isinstance(write, WriteList) else write


def written_rows(write: list[Entry] | WriteList, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """The manifest rows of the files at positions ``lo..hi`` of ``write`` that are staged from the
    repository (sorted, each once)."""
    h = head(write)
    hi = len(write) if hi is None else hi
    rows = np.fromiter((e.row for e in h[lo:hi] if e.row >= 0 and not e.external), np.int64)
    if isinstance(write, WriteList):
        rows = np.concatenate((rows, write.rows[max(lo - len(h), 0):max(hi - len(h), 0)].astype(np.int64)))
    return np.unique(rows)


def unlisted_ids(write: list[Entry] | WriteList, lo: int = 0, hi: int | None = None) -> list[bytes]:
    """The chunk ids of the files at positions ``lo..hi`` of ``write`` that no manifest row lists."""
    return [c for e in head(write)[lo:hi] if e.row < 0 for c in e.chunks]


def check_chunks_present(manifest: Manifest, source: ChunkSource, what: str, rows: np.ndarray,
                         more: list[bytes] | None = None, slice_ids: int = 65_536) -> ChunkSource:
    """IntegrityError (naming a file) unless ``source`` holds every chunk the files at manifest ``rows``
    (and ``more`` ids) name; asks a slice of unique ids at a time (:meth:`Repository.missing_chunks` when
    the source has it). Returns what to read those chunks from: a repository first locates just them
    without loading its whole index (:meth:`Repository.reader_for`)."""
    if not len(rows) and not more:
        return source
    ids = chunk_ids_at(manifest, rows)
    wanted = IdSet.of(pa.chunked_array([*ids.chunks, pa.array(list(more), ids.type)], ids.type)
                      if more else ids)
    del ids  # a lean manifest's ids were read for this: the set holds them now
    narrowed = getattr(source, "reader_for", None)
    got = narrowed(wanted) if narrowed is not None else None
    if got is not None:
        return got  # type: ignore[no-any-return]
    ids = wanted.ids
    del wanted
    many = getattr(source, "missing_chunks", None)
    refresh = getattr(source, "refresh_index", None)
    for start in range(0, len(ids), slice_ids):
        part = id_list(ids[start:start + slice_ids])
        missing = many(part) if many is not None else [c for c in part if not source.has_chunk(c)]
        if missing and refresh is not None:
            # A repository's cached index misses what other writers added while a lock of ours is held
            # (a drill restoring the snapshot the agent just stored): look at the index files again.
            refresh()
            missing = many(missing) if many is not None else [c for c in missing if not source.has_chunk(c)]
        if missing:
            cid = missing[0]
            paths = manifest.paths_naming(cid, 1)
            raise IntegrityError(f"{what}: {printable(paths[0]) if paths else '?'}: chunk {cid.hex()[:16]} is missing "
                                 f"from the repository; nothing was changed")
    return source


def chunk_ids_at(manifest: Manifest, rows: np.ndarray) -> pa.ChunkedArray:
    """The chunk ids the files at ascending manifest ``rows`` name, flattened (repeats kept): from the
    table's ``chunks`` column, or a lean manifest's file a row group at a time."""
    if manifest.source is None:
        return pc.list_flatten(take_sorted(manifest.table.column("chunks"), rows))
    parts: list[pa.Array] = []
    starts = manifest.source.starts
    for g, t in enumerate(column_groups(manifest.source, ["chunks"])):
        lo, hi = np.searchsorted(rows, [starts[g], starts[g + 1]])
        if hi > lo:
            parts.extend(pc.list_flatten(take_sorted(t.column("chunks"), rows[lo:hi] - starts[g])).chunks)
    return pa.chunked_array(parts, pa.binary(fmt.ID_LEN))


def take_sorted(col: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """The lists of ``col`` (a list column) at ascending ``rows``, or more: empty lists may be left in.
    Taken chunk by chunk (``ChunkedArray.take`` joins the chunks first, a copy of the whole column: 35 MiB
    of chunk ids at 1,000,000 files for a 1 % delta); a chunk whose every non-empty list is wanted (a new
    target, a first sync) is kept as it is, not copied."""
    parts: list[pa.Array] = []
    start = 0
    for chunk in col.chunks:
        lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
        if hi > lo:
            mine = rows[lo:hi] - start
            if hi - lo == len(chunk):
                parts.append(chunk)
                start += len(chunk)
                continue
            lengths = pc.fill_null(pc.list_value_length(chunk), 0).to_numpy(zero_copy_only=False)
            filled = np.flatnonzero(lengths)
            parts.append(chunk if np.isin(filled, mine).all() else chunk.take(pa.array(mine, pa.int64())))
        start += len(chunk)
    return pa.chunked_array(parts, col.type)


def part_bounds(write: list[Entry] | WriteList, part_chunks: int | None = None) -> list[int]:
    """Where the parts of ``write`` start, and its length last (``[0, ..., len(write)]``): each part holds
    files of about ``part_chunks`` chunks (:func:`bounds_of`). Pure."""
    h = head(write)
    sizes = np.fromiter((e.size for e in h), np.int64, len(h))
    if isinstance(write, WriteList) and len(write.rows):
        sizes = np.concatenate((sizes, sizes_at(write.manifest, write.rows)))
    return bounds_of(sizes, part_chunks)


def sizes_at(manifest: Manifest, rows: np.ndarray) -> np.ndarray:
    """(K,) int64: the ``size`` of the files at manifest ``rows`` (any order), read a column chunk at a
    time (no joined copy of the column)."""
    out = np.empty(len(rows), np.int64)
    start = 0
    for chunk in manifest.table.column("size").chunks:
        s = chunk.to_numpy(zero_copy_only=False)
        mine = (rows >= start) & (rows < start + len(s))
        out[mine] = s[rows[mine] - start]
        start += len(s)
    return out


def bounds_of(sizes: np.ndarray, part_chunks: int | None = None) -> list[int]:
    """Cuts of files of ``sizes`` (bytes, in order) into parts of about ``part_chunks`` (default
    :data:`PART_CHUNKS`) chunks each, a non-empty file of S bytes counted as ``S // CHUNK_AVG + 1``:
    ``[0, ..., len(sizes)]``, each part but the last reaching the budget with its last file. Pure."""
    part_chunks = part_chunks or PART_CHUNKS
    cum = np.cumsum(np.where(sizes > 0, sizes // fmt.CHUNK_AVG + 1, 0))
    bounds = [0]
    while True:
        base = int(cum[bounds[-1] - 1]) if bounds[-1] else 0
        end = int(np.searchsorted(cum, base + part_chunks, side="left")) + 1  # the first that reaches the budget
        if end >= len(sizes):
            break
        bounds.append(end)
    bounds.append(len(sizes))
    return bounds


def check_rows(manifest: Manifest, source: ChunkSource, what: str, rows: np.ndarray,
               part_chunks: int | None = None) -> ChunkSource | None:
    """:func:`check_chunks_present` for the files at ascending manifest ``rows``, a part of about
    ``part_chunks`` chunks at a time. Returns the reader of them all when they are one part, else None
    (each part's reader was let go once checked)."""
    bounds = bounds_of(sizes_at(manifest, rows), part_chunks)
    if len(bounds) <= 2:
        return check_chunks_present(manifest, source, what, rows)
    for lo, hi in itertools.pairwise(bounds):
        check_chunks_present(manifest, source, what, rows[lo:hi])
    return None


class PartReaders:
    """The readers of a write list's parts (:func:`part_bounds`): every part is checked up front
    (:meth:`check`); while the apply stages, the readers of the parts it is at are held
    (:meth:`cover`), the others let go. Not thread-safe: :meth:`cover` is called between the
    staging pool's windows, :meth:`reader` from the pool's threads while a window is staged."""

    def __init__(self, manifest: Manifest, source: ChunkSource, what: str, write: list[Entry] | WriteList,
                 part_chunks: int | None = None, whole: ChunkSource | None = None) -> None:
        """``whole``: a reader of every chunk of ``write`` already (:func:`check_rows` of one part), used for
        every part."""
        self.manifest, self.source, self.what, self.write = manifest, source, what, write
        self.bounds = [0, len(write)] if whole is not None else part_bounds(write, part_chunks)
        self.readers: dict[int, ChunkSource] = {0: whole} if whole is not None else {}

    @property
    def parts(self) -> int:
        return len(self.bounds) - 1

    def _locate(self, k: int) -> ChunkSource:
        lo, hi = self.bounds[k], self.bounds[k + 1]
        allocators.give_back()  # what the last part's location freed: at 1,000,000 chunks each part peaks
        return check_chunks_present(self.manifest, self.source, self.what, written_rows(self.write, lo, hi),
                                    unlisted_ids(self.write, lo, hi))

    def check(self) -> None:
        """IntegrityError (naming a file) unless every chunk of every part is present. The first part's
        reader is kept (staging starts there); the others are let go as soon as they are checked."""
        for k in range(self.parts):
            got = self._locate(k)
            if k == 0:
                self.readers[0] = got

    def cover(self, lo: int, hi: int) -> None:
        """Hold the readers of the parts of positions ``lo..hi`` (inclusive) of the write list, and only
        those (located again, and checked again, when they were let go)."""
        first, last = self.part_of(lo), self.part_of(hi)
        for k in [k for k in self.readers if not first <= k <= last]:
            del self.readers[k]
        for k in range(first, last + 1):
            if k not in self.readers:
                self.readers[k] = self._locate(k)

    def split(self, items: Iterable[tuple[int, Entry]]) -> Iterator[Iterator[tuple[int, Entry]]]:
        """``(position, entry)`` items in ascending positions, grouped by part (lazily)."""
        for _, group in itertools.groupby(items, key=lambda item: self.part_of(item[0])):
            yield group

    def part_of(self, n: int) -> int:
        return min(bisect.bisect_right(self.bounds, n) - 1, self.parts - 1)

    def reader(self, n: int) -> ChunkSource:
        """The reader of the part holding position ``n`` (held by :meth:`cover`)."""
        return self.readers[self.part_of(n)]
