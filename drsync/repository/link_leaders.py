"""A manifest's hard-link groups, numbered by their first file's row: which group a row leads or names.

A file of a hard-link group names its first file by path (the manifest's ``hardlink`` column). An apply
that settles groups as a whole needs, for each row, the group it leads or belongs to. Hashing the names
(``pc.value_counts`` over the column) held every distinct name twice over while its table grew: at
500,000 groups of 63-byte paths, 100 MiB for a moment and 33 MiB after. Here a group is its leader's row
number instead. Each path's 64-bit hash is held in one sorted NumPy column (with the row it came from), a
name is looked up by its hash and then compared byte for byte with the path at that row, so a collision
never joins two groups. About 20 bytes a manifest row, no Python object per row or group.

Pure: built from a manifest's columns, used by :mod:`drsync.unchanged`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_STEP = 1 << 16  # names hashed at a time (bounds the Python objects made at once)


def hashes_of(values: pa.Array) -> np.ndarray:
    """Python's hash of each value (binary, no nulls), as int64, a step of values at a time."""
    out = np.empty(len(values), np.int64)
    for start in range(0, len(values), _STEP):
        part = values.slice(start, _STEP).to_pylist()
        out[start:start + len(part)] = np.fromiter(map(hash, part), np.int64, count=len(part))
    return out


def in_sorted(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Whether each of ``hashes`` is among ``sorted_hashes`` (ascending int64): a bool mask."""
    if not len(sorted_hashes):
        return np.zeros(len(hashes), bool)
    at = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
    return sorted_hashes[at] == hashes


def _take(column: pa.ChunkedArray, starts: np.ndarray, rows: np.ndarray) -> pa.Array:
    """``column.take(rows)`` a chunk at a time (``starts``: each chunk's first row): Arrow's take over a
    chunked binary column joins the whole column first (a million paths: 60 MiB for every batch)."""
    which = np.searchsorted(starts, rows, side="right") - 1
    by_chunk = np.argsort(which, kind="stable")
    grouped, chunks = rows[by_chunk], which[by_chunk]
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    pieces = [column.chunk(int(chunks[a])).take(pa.array(grouped[a:b] - starts[chunks[a]]))
              for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)], strict=True) if b > a]
    joined = pa.concat_arrays(pieces) if pieces else pa.array([], column.type)
    back = np.empty(len(rows), np.int64)
    back[by_chunk] = np.arange(len(rows))
    return joined.take(pa.array(back))


class LinkLeaders:
    """The hard-link groups of a manifest's ``paths`` column and its ``hardlinks`` column, read a piece at a
    time (path-sorted, unique paths; a hard link names a path of the same column, as validation requires).
    Groups are numbered 0..n-1 in their leaders' row order; ``size[g]`` counts group ``g``'s files, its
    leader included (int64)."""

    def __init__(self, paths: pa.ChunkedArray, hardlinks: Iterable[pa.Array | pa.ChunkedArray]) -> None:
        self._paths = paths.cast(pa.binary())
        self._starts = np.cumsum([0, *(len(c) for c in self._paths.chunks)])[:-1].astype(np.int64)
        self.rows = np.zeros(0, np.int64)  # each group's leader row, ascending
        self.size = np.zeros(0, np.int64)
        self._sorted = np.zeros(0, np.int64)  # the hashes of the paths looked up, ascending: every path's
        self._order = np.zeros(0, np.int64)  # while the leaders are found, then the leaders'; and their rows
        hashes: np.ndarray | None = None
        named: list[np.ndarray] = []
        for piece in hardlinks:
            names = piece.drop_null()
            if not len(names):
                continue
            if hashes is None:  # the first hard link: every path is indexed, to find the leaders' rows
                hashes = np.concatenate([hashes_of(c) for c in self._paths.chunks])
                self._order = np.argsort(hashes, kind="stable").astype(np.int32 if len(hashes) < 2**31 else np.int64)
                self._sorted = hashes[self._order]
            named.append(self.rows_of(names))
        if hashes is None:
            return
        leaders = np.concatenate(named)
        del named
        self.rows, counts = np.unique(leaders[leaders >= 0], return_counts=True)
        self.size = counts.astype(np.int64) + 1
        lead = hashes[self.rows]  # from here on only the leaders are looked up (a hard link names one)
        del hashes
        by = np.argsort(lead, kind="stable")
        self._sorted, self._order = lead[by], self.rows[by]

    def __len__(self) -> int:
        return len(self.rows)

    def rows_of(self, names: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The row of each of ``names`` (paths; a null or a path not among them: -1), int64. Once built,
        only the leaders' paths are found (what a hard link names)."""
        names = names.cast(pa.binary())
        if isinstance(names, pa.ChunkedArray):
            names = names.combine_chunks()
        out = np.full(len(names), -1, np.int64)
        valid = np.flatnonzero(pc.is_valid(names).to_numpy(zero_copy_only=False))
        if not len(valid) or not len(self._sorted):
            return out
        asked = names.take(pa.array(valid)) if len(valid) < len(names) else names
        h = hashes_of(asked)
        at = np.minimum(np.searchsorted(self._sorted, h), len(self._sorted) - 1)
        maybe = self._sorted[at] == h
        row = np.where(maybe, self._order[at], 0).astype(np.int64)
        same = maybe & pc.equal(_take(self._paths, self._starts, row), asked).to_numpy(zero_copy_only=False)
        out[valid[same]] = row[same]
        for k in np.flatnonzero(maybe & ~same).tolist():  # another path of the same hash first: the next ones
            out[valid[k]] = self._collided(asked[k].as_py(), int(h[k]), int(at[k]) + 1)
        return out

    def _collided(self, name: bytes, h: int, at: int) -> int:
        while at < len(self._sorted) and self._sorted[at] == h:
            row = int(self._order[at])
            if self._paths[row].as_py() == name:
                return row
            at += 1
        return -1

    def group_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The group each of ``rows`` (int64) leads, or -1."""
        at = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        if not len(self.rows):
            return np.full(len(rows), -1, np.int64)
        return np.where(self.rows[at] == rows, at, -1).astype(np.int64)

    def group_of_names(self, names: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The group each of ``names`` (a ``hardlink`` column's values; null: none) names, or -1."""
        rows = self.rows_of(names)
        groups = self.group_of_rows(np.maximum(rows, 0))
        return np.where(rows >= 0, groups, -1)
