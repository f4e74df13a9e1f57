"""Manifest diff: which paths differ between two manifests.

Owns the merge of two path-sorted manifests a row group at a time (:func:`aligned`, :func:`fold_aligned`:
pairs of pieces holding the same range of paths), and over it :func:`diff` (added, removed and changed
paths as a :class:`ManifestDiff`) and :func:`content_changed` (the files whose content digest differs from
a base's); the guards (:mod:`drsync.guard`) count over it too. Pure, like
:mod:`drsync.repository.manifest`, which it builds on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.repository import format as fmt
from drsync.repository.ids import ID_DTYPE, IdSet, id_list, ids_array
from drsync.repository.manifest import (
    FILE,
    SCHEMA,
    Manifest,
    ManifestFile,
    column_groups,
    decode_name,
)

T = TypeVar("T")

_COMPARED = ("type", "mode", "size", "mtime_s", "mtime_nsec", "target", "content", "xattrs", "hardlink")


@dataclass(frozen=True)
class ManifestDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed}

    def paths(self) -> list[str]:
        """Every path that differs, sorted ([] when the two manifests hold the same tree)."""
        return sorted([*self.added, *self.removed, *self.changed])


def _file_digests(t: pa.Table) -> pa.Table:
    t = t.filter(pc.equal(t.column("type"), FILE))
    return pa.table({"path": t.column("path"), "content": pc.cast(t.column("content"), pa.binary())})


def content_changed(base: Manifest | ManifestFile, new: Manifest | ManifestFile) -> frozenset[str]:
    """Paths of ``new``'s regular files whose content digest differs from ``base``'s at the same path, or
    that ``base`` lacks: what an apply onto a root holding ``base`` must write whatever the root's sizes
    and times say (a rewrite can keep both). A merge (:func:`fold_aligned`), each step one join of paths
    and digests: memory for a few row groups of each side, not two whole tables."""
    def step(a: pa.Table, b: pa.Table) -> list[str]:
        nb = _file_digests(b)
        if nb.num_rows == 0:
            return []
        joined = nb.join(_file_digests(a), keys="path", join_type="left outer", right_suffix="_base")
        differs = pc.fill_null(pc.not_equal(joined.column("content"), joined.column("content_base")), True)
        return [decode_name(p) for p in pc.filter(joined.column("path"), differs).to_pylist()]  # type: ignore[misc]

    return frozenset(p for part in fold_aligned(base, new, ["path", "type", "content"], step) for p in part)


def chunks_beyond(base: Manifest | ManifestFile, new: Manifest | ManifestFile) -> pa.ChunkedArray:
    """The chunk ids ``new`` names beyond what ``base`` vouches for: the flattened chunk lists of ``new``'s
    rows whose list is not exactly the one ``base`` holds at the same path (every row of a path ``base``
    lacks), in row order, repeats kept (``fixed_size_binary(32)``). A chunk named by a row that ``base``
    has alike is in ``base`` too, so a repository that keeps ``base`` whole holds it already.

    A merge (:func:`fold_aligned`): each step holds a few row groups of each side and keeps only the ids
    of the rows that differ (nothing when the two manifests hold the same files)."""
    def step(a: pa.Table, b: pa.Table) -> pa.Array:
        lists = b.column("chunks").combine_chunks()
        if not len(lists):
            return pa.array([], pa.binary(fmt.ID_LEN))
        at = pc.fill_null(pc.index_in(b.column("path"), value_set=a.column("path").combine_chunks()), -1)
        pos = np.asarray(at.to_numpy(zero_copy_only=False), np.int64)
        lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), np.int64)
        base_lists = a.column("chunks").combine_chunks()
        base_lengths = np.asarray(pc.fill_null(pc.list_value_length(base_lists), 0).to_numpy(zero_copy_only=False),
                                  np.int64)
        present = pos >= 0
        alike = present.copy()
        alike[present] = base_lengths[pos[present]] == lengths[present]
        rows = np.flatnonzero(alike)
        if len(rows):  # same lengths: compare the ids one by one, a row differs where any of its ids does
            mine = ids_array(pc.list_flatten(lists.take(pa.array(rows))))
            theirs = ids_array(pc.list_flatten(base_lists.take(pa.array(pos[rows]))))
            owner = np.repeat(np.arange(len(rows)), lengths[rows])
            differs = np.zeros(len(rows), bool)
            differs[owner[mine != theirs]] = True
            alike[rows[differs]] = False
        if alike.all():
            return pa.array([], pa.binary(fmt.ID_LEN))
        return pc.list_flatten(lists.filter(pa.array(~alike)))

    parts = fold_aligned(base, new, ["path", "chunks"], step)
    return pa.chunked_array([p for p in parts if len(p)], pa.binary(fmt.ID_LEN))


class _Unsorted(Exception):
    """A manifest whose paths are not strictly increasing: no merge over it."""


def _sorted_pieces(m: Manifest | ManifestFile, columns: list[str]) -> Iterator[pa.Table]:
    """:func:`column_groups`, checked to be strictly increasing by path across pieces (_Unsorted)."""
    last: bytes | None = None
    for t in column_groups(m, columns):
        n = t.num_rows
        if not n:
            continue
        path = t.column("path").combine_chunks()
        if path.null_count or (n > 1 and not pc.all(pc.greater(path.slice(1), path.slice(0, n - 1))).as_py()):
            raise _Unsorted
        first = path[0].as_py()
        if last is not None and first <= last:
            raise _Unsorted
        last = path[n - 1].as_py()
        yield t


def _differs(x: pa.ChunkedArray, y: pa.ChunkedArray) -> pa.ChunkedArray:
    """Row by row, whether two columns differ, null equal to null (a file's symlink target, a dir's content)."""
    return pc.or_(pc.fill_null(pc.not_equal(x, y), False), pc.xor(pc.is_null(x), pc.is_null(y)))


def _diff_tables(a: pa.Table, b: pa.Table) -> tuple[list[str], list[str], list[str]]:
    """Added, removed and changed paths (each sorted) between two tables of ``path`` and the compared
    columns: compared row by row when both hold the same paths (the common case: a row group of an unchanged
    tree, with no copy of either side), else a join on ``path``."""
    if a.num_rows == b.num_rows and (not a.num_rows or pc.all(pc.equal(a.column("path"), b.column("path"))).as_py()):
        differs = None
        for c in _COMPARED:
            ne = _differs(a.column(c), b.column(c))
            differs = ne if differs is None else pc.or_(differs, ne)
        changed = pc.filter(a.column("path"), differs) if differs is not None else a.column("path")
        return [], [], [decode_name(p) for p in sorted(changed.to_pylist())]  # type: ignore[misc]
    joined = a.join(b, keys="path", join_type="full outer", left_suffix="_a", right_suffix="_b",
                    coalesce_keys=True)
    path = joined.column("path")
    in_a = pc.is_valid(joined.column("type_a"))
    in_b = pc.is_valid(joined.column("type_b"))
    differs = None
    for c in _COMPARED:
        ne = _differs(joined.column(f"{c}_a"), joined.column(f"{c}_b"))
        differs = ne if differs is None else pc.or_(differs, ne)
    both = pc.and_(in_a, in_b)

    def pick(mask: pa.ChunkedArray) -> list[str]:
        return [decode_name(p) for p in sorted(pc.filter(path, mask).to_pylist())]  # type: ignore[misc]

    return (pick(pc.and_(pc.invert(in_a), in_b)), pick(pc.and_(in_a, pc.invert(in_b))),
            pick(pc.and_(both, differs) if differs is not None else both))


def _upto(t: pa.Table, cut: bytes | None) -> int:
    """How many leading rows of the path-sorted ``t`` have a path <= ``cut`` (all when ``cut`` is None)."""
    if cut is None:
        return t.num_rows
    return int(pc.sum(pc.less_equal(t.column("path"), pa.scalar(cut, pa.binary()))).as_py() or 0)


def same_tree(old: Manifest | ManifestFile, new: Manifest | ManifestFile) -> bool:
    """Whether the two manifests hold the same tree (no path added, removed or changed); stops at the
    first row group that differs."""
    return not diff(old, new, stop_at_first=True).paths()


def aligned(old: Manifest | ManifestFile, new: Manifest | ManifestFile,
            columns: list[str]) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Pairs of pieces of ``old`` and ``new`` (their ``columns``, ``path`` among them) that hold the same
    range of paths, in path order, the pairs together covering both manifests: a merge of the two
    path-sorted manifests a row group at a time. Each pair holds what both sides have up to the smaller
    of their pieces' last paths, so a path is in one pair on both sides or on neither. _Unsorted (raised
    while iterating) for a manifest out of path order; :func:`fold_aligned` handles it."""
    ia, ib = _sorted_pieces(old, columns), _sorted_pieces(new, columns)
    empty = SCHEMA.empty_table().select(columns)
    a, b = empty, empty
    done_a = done_b = False
    while True:
        if not done_a and a.num_rows == 0:
            nxt = next(ia, None)
            done_a = nxt is None
            a = a if nxt is None else nxt
        if not done_b and b.num_rows == 0:
            nxt = next(ib, None)
            done_b = nxt is None
            b = b if nxt is None else nxt
        if not a.num_rows and not b.num_rows:
            return
        # Everything up to the smaller last path is complete on both sides (a side that is done is
        # complete everywhere).
        ends = [t.column("path")[t.num_rows - 1].as_py() for t, done in ((a, done_a), (b, done_b)) if not done]
        cut = min(ends) if ends else None
        ka, kb = _upto(a, cut), _upto(b, cut)
        yield a.slice(0, ka), b.slice(0, kb)
        a, b = a.slice(ka), b.slice(kb)


def fold_aligned(old: Manifest | ManifestFile, new: Manifest | ManifestFile, columns: list[str],
                 step: Callable[[pa.Table, pa.Table], T], *,
                 stop: Callable[[T], bool] | None = None) -> list[T]:
    """``step`` over each pair of :func:`aligned` (in path order), its results in a list; ``stop``: end
    after the first result it accepts. A manifest out of path order (none that drsync writes) is
    compared whole: one step over the two whole tables."""
    out: list[T] = []
    try:
        for a, b in aligned(old, new, columns):
            out.append(step(a, b))
            if stop is not None and stop(out[-1]):
                # A later piece out of order would mean this step was misaligned (a path it saw on one
                # side only may be further on in the other): stop early only over two sorted manifests.
                for m in (old, new):
                    for _ in _sorted_pieces(m, ["path"]):
                        pass
                break
    except _Unsorted:
        whole = [m.read() if isinstance(m, ManifestFile) else m.source.read() if m.source is not None else m
                 for m in (old, new)]
        out = [step(whole[0].table.select(columns), whole[1].table.select(columns))]
    return out


def diff(old: Manifest | ManifestFile, new: Manifest | ManifestFile, *, stop_at_first: bool = False) -> ManifestDiff:
    """Paths added, removed and changed from ``old`` to ``new``: a merge (:func:`fold_aligned`), each
    step a join on ``path`` of the compared columns; memory for a few row groups, not two whole tables
    (a manifest of 1,000,000 files is about 160 MiB as a table). ``stop_at_first``: return after the
    first step that finds a difference (the lists then hold only that step's paths)."""
    parts = fold_aligned(old, new, ["path", *_COMPARED], _diff_tables,
                         stop=(lambda r: any(r)) if stop_at_first else None)
    return ManifestDiff([p for r in parts for p in r[0]], [p for r in parts for p in r[1]],
                        [p for r in parts for p in r[2]])


# The most chunks one shipment plans deltas for: 65,536 hold a few MiB of ids; a shipment that replaces more
# chunks than that is a bulk rewrite, whose other chunks go whole.
DELTA_PAIRS_MAX = 65_536


@dataclass(frozen=True)
class DeltaBases:
    """Per planned chunk, what a delta of it is taken against: the bytes its path held at its offsets in the
    base snapshot, as ``bases[starts[i]:starts[i + 1]]`` (the chunks of the old file overlapping those
    offsets, in file order, at most ``format.DELTA_BASES_MAX``) joined, less their first ``skip[i]`` bytes,
    cut to the chunk's length. ``chunks`` (K,) and ``bases`` (M,) are :data:`ID_DTYPE` arrays, ``starts``
    (K+1,) and ``skip`` (K,) integers."""

    chunks: np.ndarray
    bases: np.ndarray
    starts: np.ndarray
    skip: np.ndarray

    @classmethod
    def empty(cls) -> DeltaBases:
        return cls(np.empty(0, ID_DTYPE), np.empty(0, ID_DTYPE), np.zeros(1, np.int64), np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.chunks)

    def of(self, i: int) -> tuple[list[bytes], int]:
        """Chunk ``i``'s base ids and skip."""
        return id_list(self.bases[self.starts[i]:self.starts[i + 1]]), int(self.skip[i])

    def keep(self, mask: np.ndarray) -> DeltaBases:
        """Only the chunks where ``mask`` (K,) is True."""
        counts = np.diff(self.starts)
        take = np.repeat(mask, counts)
        return DeltaBases(self.chunks[mask], self.bases[take], np.concatenate([[0], np.cumsum(counts[mask])]),
                          self.skip[mask])


def delta_bases(base: Manifest | ManifestFile, new: Manifest | ManifestFile, wanted: IdSet,
                limit: int = DELTA_PAIRS_MAX) -> DeltaBases:
    """For chunks of ``new`` in ``wanted`` (what a shipment sends), what each may be sent as a delta against:
    the bytes the same path held at the same offsets in ``base`` (:class:`DeltaBases`). A file rewritten in
    place keeps its bytes outside what changed at their offsets, so those old bytes hold most of a new
    chunk's, whatever chunk boundaries the change moved; a delta reaches back exactly one chunk length
    (zstd's window for a chunk), where these lie. At most ``limit`` chunks, in path order, each once (the
    first path naming it). Pure: a merge (:func:`fold_aligned`) that looks one by one only at the rows
    naming a wanted chunk."""
    if not len(wanted) or limit <= 0:
        return DeltaBases.empty()
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # chunks, counts, bases, skips
    count = 0

    def step(a: pa.Table, b: pa.Table) -> None:
        nonlocal count
        if count >= limit or not b.num_rows or not a.num_rows:
            return
        at = pc.fill_null(pc.index_in(b.column("path"), value_set=a.column("path").combine_chunks()), -1)
        pos = np.asarray(at.to_numpy(zero_copy_only=False), np.int64)
        present = np.flatnonzero(pos >= 0)
        if not len(present):
            return
        lists = b.column("chunks").combine_chunks().take(pa.array(present))
        lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), np.int64)
        hit = wanted.contains_many(ids_array(pc.list_flatten(lists)))
        # Only the rows naming a wanted chunk are looked at one by one: the files this shipment changes.
        for row in present[np.unique(np.repeat(np.arange(len(present)), lengths)[hit])]:
            if count >= limit:
                return
            new_ids, old_ids = b.column("chunks")[int(row)].values, a.column("chunks")[int(pos[row])].values
            if new_ids is None or old_ids is None or not len(new_ids) or not len(old_ids):
                continue
            mine, theirs = ids_array(new_ids), ids_array(old_ids)
            sizes = np.asarray(b.column("chunk_sizes")[int(row)].values.to_numpy(), np.int64)
            old_sizes = np.asarray(a.column("chunk_sizes")[int(pos[row])].values.to_numpy(), np.int64)
            if len(sizes) != len(mine) or len(old_sizes) != len(theirs):
                continue  # a row whose lists disagree (DistCp's, or damage): no delta
            ends = np.cumsum(sizes)
            starts = ends - sizes
            old_ends = np.cumsum(old_sizes)
            first = np.searchsorted(old_ends, starts, side="right")  # the old chunk holding the chunk's start
            last = np.searchsorted(old_ends - old_sizes, ends, side="left")  # past the last old chunk overlapping
            last = np.minimum(last, first + fmt.DELTA_BASES_MAX)
            pick = np.flatnonzero(wanted.contains_many(mine) & (first < len(theirs)) & (sizes > 0))
            pick = pick[: limit - count]
            if not len(pick):
                continue
            counts = last[pick] - first[pick]
            at_old = np.concatenate([np.arange(f, t) for f, t in zip(first[pick], last[pick], strict=True)])
            skips = starts[pick] - (old_ends - old_sizes)[first[pick]]
            found.append((mine[pick], counts, theirs[at_old], skips))
            count += len(pick)

    fold_aligned(base, new, ["path", "chunks", "chunk_sizes"], step)
    if not found:
        return DeltaBases.empty()
    chunks = np.concatenate([f[0] for f in found])
    counts = np.concatenate([f[1] for f in found])
    bases = np.concatenate([f[2] for f in found])
    skips = np.concatenate([f[3] for f in found])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    _, first_at = np.unique(chunks, return_index=True)  # a chunk named twice (a copied file) keeps its first
    keep = np.zeros(len(chunks), bool)
    keep[first_at] = True
    return DeltaBases(chunks, bases, offsets, skips).keep(keep)
