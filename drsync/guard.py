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
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from drsync.repository.manifest import DIR, Manifest

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


def _non_dirs(m: Manifest) -> pa.Table:
    t = m.table.select(["path", *_KEY])
    t = t.filter(pc.not_equal(t.column("type"), DIR))
    # Joins never match nulls: a file has no link target, a link no content.
    return pa.table({"path": t.column("path"), "type": t.column("type"),
                     "content": pc.fill_null(pc.cast(t.column("content"), pa.binary()), b""),
                     "target": pc.fill_null(t.column("target"), b"")})


def removed_files(applied: Manifest, new: Manifest) -> tuple[int, int, int]:
    """(files of ``applied``, files of it that ``new`` removes, files of ``new``), renames not counted.

    Files are non-directory entries (see the module docstring)."""
    a, b = _non_dirs(applied), _non_dirs(new)
    if a.num_rows == 0:
        return 0, 0, b.num_rows
    gone = a.join(b.select(["path"]), keys="path", join_type="left anti")
    if gone.num_rows == 0:
        return a.num_rows, 0, b.num_rows
    added = b.join(a.select(["path"]), keys="path", join_type="left anti")
    removed = gone.num_rows
    if added.num_rows:
        # A multiset match on content: each added file can account for one removed file (a move).
        g = gone.group_by(_KEY).aggregate([("path", "count")]).rename_columns([*_KEY, "n_gone"])
        n = added.group_by(_KEY).aggregate([("path", "count")]).rename_columns([*_KEY, "n_added"])
        both = g.join(n, keys=_KEY, join_type="inner")
        if both.num_rows:
            moved = pc.sum(pc.min_element_wise(both.column("n_gone"), both.column("n_added"))).as_py() or 0
            removed -= int(moved)
    return a.num_rows, removed, b.num_rows


def deletion_guard(applied: Manifest, new: Manifest, max_fraction: float) -> Hold | None:
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
