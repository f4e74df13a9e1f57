"""Manifest patches: a manifest shipped as what differs from one the standby holds.

A manifest is about 73 bytes a file, most of it chunk ids that do not compress: a cycle that changed a few
files of a 1,000,000-file tree sent 70 MiB of manifest for a few MiB of chunks. A *patch* holds only the
rows of the new manifest that the base manifest lacks or holds otherwise, and a *tombstone* row (type
:data:`TOMBSTONE`, only its path) for each path of the base that the new one lacks, path-sorted, written as
a manifest is (:class:`~drsync.repository.manifest.ManifestWriter`, with the new manifest's schema and its
metadata: the root's). :func:`apply_patch` merges it into the base and serializes the result the same way,
so that it is the new manifest byte for byte when both sides write Parquet alike; the receiver checks that
by the hash the snapshot document names and otherwise asks for the bytes. Both are merges of path-sorted
pieces (:func:`~drsync.repository.manifest_diff.aligned`): memory for a few row groups of each side.
Pure, like :mod:`drsync.repository.manifest_diff`, which it builds on.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.errors import IntegrityError
from drsync.repository.manifest import SCHEMA, Manifest, ManifestFile, ManifestWriter, sort_by_path
from drsync.repository.manifest_diff import _Unsorted, aligned, fold_aligned
from drsync.repository.spool import Spool

TOMBSTONE = "-"  # the type of a patch row that removes its path (a manifest's types are words)
_COLUMNS = list(SCHEMA.names)


def _schema_of(m: Manifest | ManifestFile) -> pa.Schema:
    """``m``'s schema, with its metadata (the root's); :class:`ManifestWriter` writes it as :data:`SCHEMA`."""
    source = m.source if isinstance(m, Manifest) and m.source is not None else m
    return source.schema if isinstance(source, ManifestFile) else source.table.schema  # type: ignore[union-attr]


def _canon(t: pa.Table) -> pa.Table:
    """``t`` with :data:`SCHEMA`'s fields, no metadata (read back from Parquet a list's item is "element", and
    an upgraded version-1 piece has SCHEMA's): pieces of either kind concatenate."""
    t = t.replace_schema_metadata(None)
    return t if t.schema.equals(SCHEMA, check_metadata=False) else t.cast(SCHEMA.remove_metadata())


def _alike(x: pa.ChunkedArray | pa.Array, y: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) bool: row i of ``x`` holds what row i of ``y`` holds (nulls alike; lists element by element)."""
    x = x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x
    y = y.combine_chunks() if isinstance(y, pa.ChunkedArray) else y
    if pa.types.is_list(x.type):
        lx = np.asarray(pc.fill_null(pc.list_value_length(x), -1).to_numpy(zero_copy_only=False), np.int64)
        ly = np.asarray(pc.fill_null(pc.list_value_length(y), -1).to_numpy(zero_copy_only=False), np.int64)
        same = lx == ly
        rows = np.flatnonzero(same & (lx > 0))
        if len(rows):
            at = pa.array(rows)
            values = _alike(pc.list_flatten(x.take(at)), pc.list_flatten(y.take(at)))
            owner = np.repeat(np.arange(len(rows)), lx[rows])
            differs = np.zeros(len(rows), bool)
            differs[owner[~values]] = True
            same[rows[differs]] = False
        return same
    eq = pc.fill_null(pc.equal(x, y), False)
    both_null = pc.and_(pc.is_null(x), pc.is_null(y))
    return np.asarray(pc.or_(eq, both_null).to_numpy(zero_copy_only=False), bool)


def _tombstones(paths: pa.Array | pa.ChunkedArray, schema: pa.Schema) -> pa.Table:
    n = len(paths)
    cols = {name: pa.nulls(n, schema.field(name).type) for name in _COLUMNS}
    cols["path"] = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
    cols["type"] = pa.array([TOMBSTONE] * n, schema.field("type").type)
    return pa.table(cols, schema=schema.remove_metadata())


def _patch_step(a: pa.Table, b: pa.Table) -> pa.Table:
    """The patch rows for one aligned pair: ``b``'s rows that ``a`` lacks or holds otherwise, and tombstones
    for ``a``'s paths that ``b`` lacks; path-sorted."""
    pos = np.asarray(pc.fill_null(pc.index_in(b.column("path"), value_set=a.column("path").combine_chunks()), -1)
                     .to_numpy(zero_copy_only=False), np.int64)
    present = pos >= 0
    alike = present.copy()
    if present.any():
        theirs = a.take(pa.array(pos[present]))
        mine = b.filter(pa.array(present))
        same = np.ones(int(present.sum()), bool)
        for name in _COLUMNS:
            same &= _alike(mine.column(name), theirs.column(name))
        alike[present] = same
    parts = [b.filter(pa.array(~alike))] if not alike.all() else []
    gone = pc.invert(pc.is_in(a.column("path"), value_set=b.column("path").combine_chunks()))
    if pc.any(gone).as_py():
        parts.append(_tombstones(pc.filter(a.column("path"), gone), b.schema))
    if not parts:
        return b.schema.empty_table()  # not a slice of ``b``: that would hold its buffers until the patch is done
    return sort_by_path(pa.concat_tables([_canon(p) for p in parts]))


def make_patch(base: Manifest | ManifestFile, new: Manifest | ManifestFile, *,
               memory_bytes: int | None = None) -> tuple[Spool, int]:
    """(The patch that turns ``base`` into ``new``, its row count): a :class:`Spool` of Parquet bytes (past
    ``memory_bytes`` in a temporary file). IntegrityError when a manifest is damaged."""
    out = ManifestWriter(_schema_of(new), memory_bytes=memory_bytes)
    rows = 0
    try:
        for piece in fold_aligned(base, new, _COLUMNS, _patch_step):
            out.write(piece)
            rows += piece.num_rows
        return out.finish(), rows
    except BaseException:
        out.finish().close()
        raise


def _merge_step(a: pa.Table, p: pa.Table) -> pa.Table:
    """One aligned pair of the base and the patch merged: the base's rows the patch does not name, and the
    patch's rows that are not tombstones; path-sorted."""
    kept = a.filter(pc.invert(pc.is_in(a.column("path"), value_set=p.column("path").combine_chunks())))
    live = p.filter(pc.not_equal(p.column("type"), TOMBSTONE))
    if not live.num_rows:
        return kept
    if not kept.num_rows:
        return live
    return sort_by_path(pa.concat_tables([_canon(kept), _canon(live)]))


def apply_patch(base: Manifest | ManifestFile, patch: ManifestFile, *, memory_bytes: int | None = None) -> Spool:
    """The manifest ``patch`` (:func:`make_patch`) makes of ``base``, serialized with the patch's schema (the
    new manifest's, its metadata the root's): a :class:`Spool`, hashed as written, for the caller to check
    against the hash it expects. IntegrityError when either is damaged or out of path order."""
    out = ManifestWriter(_schema_of(patch), memory_bytes=memory_bytes)
    try:
        for a, p in aligned(base, patch, _COLUMNS):  # written as merged: never the whole manifest held
            out.write(_merge_step(a, p))
        return out.finish()
    except _Unsorted:
        out.finish().close()
        raise IntegrityError(f"{patch.what} is not in path order, as every manifest is; it was not used") from None
    except BaseException:
        out.finish().close()
        raise
