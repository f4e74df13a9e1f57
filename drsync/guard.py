"""The deletion guard (safety rule 8, second half): which shipped snapshots a standby must not apply
without an operator. Pure functions over manifests, tested without I/O.

A snapshot is *held* when applying it over the standby's applied snapshot would remove more than
``replication.max_delete_fraction`` of the applied snapshot's files, or would leave no file at all
where the applied snapshot had some (an unmounted volume, a bad script, ransomware deleting files).

"Files" are the non-directory entries of a manifest (regular files and symbolic links): directories
come and go with the files in them and are not counted. A file *removed* is a non-directory path of
the applied snapshot that the new snapshot does not hold as a non-directory (gone, or replaced by a
directory). A rename is not a removal: a removed file whose content (type, content hash, link
target) appears at a path the new snapshot adds counts as moved, each added file standing for at
most one removed file. Files whose content changed in place are not removals either (the guard
looks at deletions; what changed is visible with ``drsync snapshot diff``).

The mass-change guard (:func:`change_guard`) sees what the deletion guard does not: an encryption sweep
that rewrites files in place, under the same names. A snapshot is flagged when it rewrites the content
of more than ``replication.max_change_fraction`` of the applied snapshot's *regular files*: same path,
still a regular file, different content digest (BLAKE3 of the chunk ids, or of the HDFS checksum for
DistCp's external rows). Same-size rewrites count (the digest is of the bytes, never of size or time);
metadata-only changes (mode, owner, times, attributes) do not; files added or removed are not changes
of the applied set (removals are the deletion guard's; a rename is both). A file whose row is external
on one side and not on the other (the engine changed) has digests of different kinds and is not
compared; nor are external rows when the two snapshots' HDFS checksum algorithms differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from drsync.repository.manifest import DIR, FILE, Manifest, ManifestFile
from drsync.repository.manifest_diff import fold_aligned

_KEY = ["type", "content", "target"]


@dataclass(frozen=True)
class Hold:
    """Why a snapshot may not be applied without an operator: the figures of :func:`deletion_guard`."""

    files: int  # files (non-directory entries) of the applied snapshot
    removed: int  # of those, how many the new snapshot would remove (renames not counted)
    remaining: int  # files (non-directory entries) of the new snapshot
    limit: float  # replication.max_delete_fraction

    @property
    def fraction(self) -> float:
        return self.removed / self.files if self.files else 0.0

    @property
    def empties(self) -> bool:
        """The new snapshot holds no file at all where the applied one held some."""
        return self.remaining == 0 and self.files > 0

    def describe(self) -> str:
        """``would remove 9,871 of 10,000 files (98.7%, over replication.max_delete_fraction 0.5)``."""
        why = (f"over replication.max_delete_fraction {self.limit:g}" if self.fraction > self.limit else
               "it would leave the data root without any file")
        return f"would remove {self.removed:,} of {self.files:,} files ({self.fraction:.1%}, {why})"

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"files": self.files, "removed": self.removed, "remaining": self.remaining, "limit": self.limit,
                "fraction": round(self.fraction, 6), "empties": self.empties}


def _non_dirs(t: pa.Table) -> pa.Table:
    t = t.filter(pc.not_equal(t.column("type"), DIR))
    # Joins never match nulls: a file has no link target, a link no content.
    return pa.table({"path": t.column("path"), "type": t.column("type"),
                     "content": pc.fill_null(pc.cast(t.column("content"), pa.binary()), b""),
                     "target": pc.fill_null(t.column("target"), b"")})


def _key_counts(t: pa.Table) -> pa.Table:
    """How many files of ``t`` have each (type, content, target): columns ``_KEY`` and ``n``."""
    return t.group_by(_KEY).aggregate([("path", "count")]).rename_columns([*_KEY, "n"])


_NO_COUNTS = pa.table({"type": pa.array([], pa.string()), "content": pa.array([], pa.binary()),
                       "target": pa.array([], pa.binary()), "n": pa.array([], pa.int64())})


def removed_files(applied: Manifest | ManifestFile, new: Manifest | ManifestFile) -> tuple[int, int, int]:
    """(files of ``applied``, files of it that ``new`` removes, files of ``new``), renames not counted.

    Files are non-directory entries (see the module docstring). A merge of the two manifests a row group
    at a time (:func:`drsync.repository.manifest_diff.fold_aligned`): what is kept across steps is the
    (type, content, target) counts of the removed and added files, to match moves."""
    def step(a: pa.Table, b: pa.Table) -> tuple[int, int, pa.Table, pa.Table]:
        na, nb = _non_dirs(a), _non_dirs(b)
        if na.column("path").equals(nb.column("path")):  # the same files (common): none gone, none added
            return na.num_rows, nb.num_rows, _NO_COUNTS, _NO_COUNTS
        # Added files are counted in every step: a move's two ends can lie in different steps.
        gone = na.join(nb.select(["path"]), keys="path", join_type="left anti")
        added = nb.join(na.select(["path"]), keys="path", join_type="left anti")
        return na.num_rows, nb.num_rows, _key_counts(gone), _key_counts(added)

    parts = fold_aligned(applied, new, ["path", *_KEY], step)
    files, remaining = sum(p[0] for p in parts), sum(p[1] for p in parts)
    gone = [p[2] for p in parts if p[2].num_rows]
    removed = sum(int(pc.sum(t.column("n")).as_py() or 0) for t in gone)
    added = [p[3] for p in parts if p[3].num_rows]
    if removed and added:
        # A multiset match on content: each added file can account for one removed file (a move).
        g = pa.concat_tables(gone).group_by(_KEY).aggregate([("n", "sum")]).rename_columns([*_KEY, "n_gone"])
        n = pa.concat_tables(added).group_by(_KEY).aggregate([("n", "sum")]).rename_columns([*_KEY, "n_added"])
        both = g.join(n, keys=_KEY, join_type="inner")
        if both.num_rows:
            removed -= int(pc.sum(pc.min_element_wise(both.column("n_gone"), both.column("n_added"))).as_py() or 0)
    return files, removed, remaining


_FILE_COLUMNS = ["path", "type", "size", "content", "chunks"]


def _regular_files(t: pa.Table) -> pa.Table:
    """(path, content, external) of the regular files of a piece of a manifest (:data:`_FILE_COLUMNS`);
    content as variable binary (joins)."""
    t = t.filter(pc.equal(t.column("type"), FILE))
    # An external row (see drsync.repository.manifest.is_external) has bytes but no chunk ids; the
    # manifest's validation makes sure the rest of its shape.
    no_chunks = pc.equal(pc.fill_null(pc.list_value_length(t.column("chunks")), 0), 0)
    return pa.table({"path": t.column("path"),
                     "content": pc.fill_null(pc.cast(t.column("content"), pa.binary()), b""),
                     "external": pc.and_(no_chunks, pc.greater(t.column("size"), 0))})


def changed_files(applied: Manifest | ManifestFile, new: Manifest | ManifestFile, *,
                  compare_external: bool = True) -> tuple[int, int]:
    """(regular files of ``applied``, how many of them ``new`` holds at the same path with other content).

    A merge of the two manifests a row group at a time (:func:`drsync.repository.manifest_diff.fold_aligned`),
    each step column work (at most one join of paths and row numbers): cheap at millions of files, in
    memory for a few row groups. ``compare_external`` False (the snapshots' HDFS checksum algorithms
    differ) leaves external rows out of the count."""
    def step(pa_: pa.Table, pb: pa.Table) -> tuple[int, int]:
        a = _regular_files(pa_)
        if a.num_rows == 0:
            return 0, 0
        b = _regular_files(pb)
        if a.column("path").equals(b.column("path")):  # the same files (common): compare row by row
            ia, ib = a, b
        else:  # match rows by path: a join of paths and row numbers only (payload columns make joins slow)
            rows = pa.table({"path": a.column("path"), "i": pa.array(range(a.num_rows), pa.int64())}).join(
                pa.table({"path": b.column("path"), "j": pa.array(range(b.num_rows), pa.int64())}),
                keys="path", join_type="inner")
            if rows.num_rows == 0:
                return a.num_rows, 0
            ia, ib = a.take(rows.column("i")), b.take(rows.column("j"))
        comparable = pc.equal(ia.column("external"), ib.column("external"))
        if not compare_external:
            comparable = pc.and_(comparable, pc.invert(ia.column("external")))
        changed = pc.and_(comparable, pc.not_equal(ia.column("content"), ib.column("content")))
        return a.num_rows, int(pc.sum(pc.cast(changed, pa.int64())).as_py() or 0)

    parts = fold_aligned(applied, new, _FILE_COLUMNS, step)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


@dataclass(frozen=True)
class MassChange:
    """A snapshot that rewrites the content of an unusual share of files: the figures of :func:`change_guard`."""

    files: int  # regular files of the applied snapshot (or of ``since``)
    changed: int  # of those, how many the new snapshot holds with other content
    limit: float  # replication.max_change_fraction
    since: str = ""  # judged against this earlier snapshot (replication.mass_change_window), not the applied one

    @property
    def fraction(self) -> float:
        return self.changed / self.files if self.files else 0.0

    def describe(self) -> str:
        """``rewrites the content of 87.0% of the files (8,700 of 10,000, over replication.max_change_fraction
        0.5)``."""
        return (f"rewrites the content of {self.fraction:.1%} of the files "
                + (f"since snapshot {self.since} " if self.since else "")
                + f"({self.changed:,} of {self.files:,}, over replication.max_change_fraction {self.limit:g})")


def change_guard(applied: Manifest | ManifestFile, new: Manifest | ManifestFile, max_fraction: float, *,
                 compare_external: bool = True) -> tuple[float, MassChange | None]:
    """(share of the applied snapshot's regular files whose content ``new`` rewrites, a :class:`MassChange`
    when that share is *over* ``max_fraction``, else None). An applied snapshot without files: (0.0, None)."""
    files, changed = changed_files(applied, new, compare_external=compare_external)
    flag = MassChange(files=files, changed=changed, limit=max_fraction)
    return flag.fraction, (flag if files and flag.fraction > max_fraction else None)


# --- the mass-change window: a sweep spread over many shipments -------------------------------------

Checkpoint = tuple[str, float]  # (applied snapshot id, when it was applied: Unix seconds, this machine)


def change_baseline(checkpoints: tuple[Checkpoint, ...], now: float, window_s: float) -> str:
    """The snapshot a shipment is also judged against: the newest checkpoint applied at least ``window_s``
    ago (the oldest one while the standby is younger than that); "" when there is none. Pure."""
    if window_s <= 0 or not checkpoints:
        return ""
    old = [c for c in checkpoints if c[1] <= now - window_s]
    return (old[-1] if old else checkpoints[0])[0]


def next_checkpoints(checkpoints: tuple[Checkpoint, ...], applied: str, now: float,
                     window_s: float) -> tuple[Checkpoint, ...]:
    """The checkpoints after ``applied`` was applied at ``now``: one every quarter window at most, and
    none older than the one :func:`change_baseline` would pick. Pure; a handful of entries."""
    if window_s <= 0:
        return ()
    out = list(checkpoints)
    if not out or now - out[-1][1] >= window_s / 4:
        out.append((applied, now))
    old = [i for i, c in enumerate(out) if c[1] <= now - window_s]
    return tuple(out[old[-1]:] if old else out)


def deletion_guard(applied: Manifest | ManifestFile, new: Manifest | ManifestFile, max_fraction: float) -> Hold | None:
    """A :class:`Hold` when ``new`` must wait for an operator before it replaces ``applied``, else None.

    Held when the share of the applied snapshot's files that ``new`` removes is *over* ``max_fraction``
    (exactly at it is allowed), or when ``new`` has no file left while ``applied`` had some (whatever
    ``max_fraction`` says). An applied snapshot without files (an empty root) never holds anything back.
    """
    files, removed, remaining = removed_files(applied, new)
    if files == 0:
        return None
    hold = Hold(files=files, removed=removed, remaining=remaining, limit=max_fraction)
    if hold.fraction > max_fraction or hold.empties:
        return hold
    return None
