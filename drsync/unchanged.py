"""Which files of a manifest a target already holds, found by one sorted merge (the apply's first pass).

An apply at scale compares a million manifest rows with a million target
entries, and most are plain files that already match. Holding both sides as
Python objects costs about a kilobyte a file; instead the manifest (sorted by
path bytes) and the target's walk (:func:`drsync.dataroot.local.walk_target`,
in the same order) are merged one row at a time. A plain file that matches in
every way the planner compares (type, size, time at the common precision,
mode, owner and extended attributes where compared, one link) is counted and
dropped; everything else (directories, links, hard-link groups, differing or
missing files, paths only the target has) is kept for
:func:`drsync.apply.plan_apply`, which decides them exactly as it would have
with both sides whole. The counted files are what the planner would have left
alone without a single action, so the plan is the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.dataroot import UNKNOWN_ID
from drsync.repository.manifest import FILE, Manifest, external_mask
from drsync.tree import LocalEntry

if TYPE_CHECKING:
    from drsync.repository.manifest import Entry

__all__ = ["Residual", "WriteList", "split_unchanged"]

_BATCH = 16384  # manifest rows decoded to Python values at a time


@dataclass
class Residual:
    """What is left to plan: ``rows`` (int64 manifest rows, ascending), ``existing`` (target entries by
    path) and how many plain files were found ``unchanged`` (no action needed)."""

    rows: np.ndarray
    existing: dict[str, LocalEntry]
    unchanged: int
    # Plain files only the manifest has (int64 rows, ascending): written, nothing else to decide, so
    # they never reach the planner (:class:`WriteList`); and their parent directories (the commit
    # touches them).
    new_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    new_parents: set[str] = dataclasses.field(default_factory=set)


def split_unchanged(manifest: Manifest, walk: Iterable[LocalEntry], *, resolution_ns: int = 1,
                    compare_owner: bool = False, compare_xattrs: bool = False, mode_bits: int = 0o7777,
                    planned: Callable[[str], bool] = lambda p: False, drop_alike: bool = True) -> Residual | None:
    """Merge ``manifest`` with ``walk`` (the target's entries in path-bytes order) and drop the plain files
    both hold alike. ``planned(path)``: the path must go to the planner whatever it compares like
    (excluded, protected, known to have changed content). Memory: one record batch of the manifest and
    what is kept. ``drop_alike`` False (``--checksum``: alike files are read to be sure) keeps the files
    both hold for the planner and only splits off the new ones. Returns None when either side is out of
    path order (a hostile manifest): the caller plans the whole of both instead."""
    t = manifest.table
    if t.schema.field("path").type != pa.binary():
        return None
    res = max(1, resolution_ns)
    extra = 0o7777 & ~mode_bits
    leaders = set(pc.unique(t.column("hardlink").drop_null()).to_pylist()) if t.num_rows else set()
    rows = array("q")  # 8 bytes a row, not a Python int each
    new_rows = array("q")
    new_parents: set[bytes] = set()
    existing: dict[str, LocalEntry] = {}
    unchanged = 0
    it = iter(walk)
    have = next(it, None)
    have_key = _key(have)
    last_key = b""
    last_path = None
    start = 0
    for batch in t.to_batches(max_chunksize=_BATCH):
        bt = pa.Table.from_batches([batch])
        c = {n: bt.column(n).to_pylist() for n in ("path", "type", "size", "mtime_s", "mtime_nsec", "mode", "uid",
                                                     "gid", "xattrs", "hardlink")}
        ext = external_mask(bt).tolist()
        for i, p in enumerate(c["path"]):
            row = start + i
            if last_path is not None and p <= last_path:
                return None
            last_path = p
            while have is not None and have_key < p:
                existing[have.path] = have
                have = next(it, None)
                last_key, have_key = have_key, _key(have)
                if have is not None and have_key <= last_key:
                    return None
            if have is None or have_key != p:
                if (c["type"][i] == FILE and c["hardlink"][i] is None and not ext[i] and p not in leaders
                        and not c["mode"][i] & extra and not planned(os.fsdecode(p))):
                    new_rows.append(row)
                    new_parents.add(p.rpartition(b"/")[0])
                else:
                    rows.append(row)
                continue
            h = have
            have = next(it, None)
            last_key, have_key = have_key, _key(have)
            if have is not None and have_key <= last_key:
                return None
            mode, uid = c["mode"][i], c["uid"][i]
            if (drop_alike and c["type"][i] == FILE and h.type == FILE and c["hardlink"][i] is None and not ext[i]
                    and h.nlink == 1 and h.size == c["size"][i] and p not in leaders and not mode & extra
                    and h.mode == mode
                    and h.mtime_ns // res == (c["mtime_s"][i] * 1_000_000_000 + c["mtime_nsec"][i]) // res
                    and (not compare_owner or uid == UNKNOWN_ID or (h.uid, h.gid) == (uid, c["gid"][i]))
                    and (not compare_xattrs or h.xattrs == c["xattrs"][i])
                    and not planned(h.path)):
                unchanged += 1
                continue
            existing[h.path] = h
            rows.append(row)
        start += batch.num_rows
    while have is not None:
        existing[have.path] = have
        have = next(it, None)
        last_key, have_key = have_key, _key(have)
        if have is not None and have_key <= last_key:
            return None
    new_parents.discard(b"")
    return Residual(np.frombuffer(rows, dtype=np.int64).copy(), existing, unchanged,
                    np.frombuffer(new_rows, dtype=np.int64).copy(), {os.fsdecode(d) for d in new_parents})


class WriteList:
    """``ApplyPlan.write`` at scale: the planner's entries (``head``, a list), then the manifest rows
    ``rows`` as light entries decoded :data:`_BATCH` at a time whenever the list is walked, so a million
    new files cost 8 bytes each between walks. Supports what the apply, the commit and the journal do
    with the list: ``len``, iteration, slicing, ``append``/``extend`` (onto ``head``)."""

    def __init__(self, head: list[Entry], manifest: Manifest, rows: np.ndarray) -> None:
        self.head = head
        self.manifest = manifest
        self.rows = rows

    def __len__(self) -> int:
        return len(self.head) + len(self.rows)

    def __iter__(self) -> Iterator[Entry]:
        yield from self.head
        for i in range(0, len(self.rows), _BATCH):
            yield from self.manifest.entries_at(self.rows[i:i + _BATCH], light=True)

    def __getitem__(self, k: int | slice) -> Entry | list[Entry]:
        if isinstance(k, int):
            got = self[k:k + 1] if k >= 0 else self[len(self) + k:len(self) + k + 1]
            if not got:
                raise IndexError(k)
            return got[0]
        start, stop, step = k.indices(len(self))
        if step != 1:
            return list(itertools.islice(self, start, stop, step))
        h = len(self.head)
        out = list(self.head[start:stop])
        lo, hi = max(start - h, 0), max(stop - h, 0)
        if hi > lo:
            out.extend(self.manifest.entries_at(self.rows[lo:hi], light=True))
        return out

    def append(self, e: Entry) -> None:
        self.head.append(e)

    def extend(self, items: Iterable[Entry]) -> None:
        self.head.extend(items)

    def total_size(self) -> int:
        """Bytes of every file in the list: the rows' sizes summed a column chunk at a time, read in
        place (a take would join the column and copy the sizes: 15 MiB at 1,000,000 rows)."""
        total = sum(e.size for e in self.head)
        start = 0
        for chunk in self.manifest.table.column("size").chunks:
            sizes = chunk.to_numpy(zero_copy_only=False)
            mine = (self.rows >= start) & (self.rows < start + len(sizes))
            total += int(sizes[self.rows[mine] - start].sum())
            start += len(sizes)
        return total


def _key(e: LocalEntry | None) -> bytes:
    return b"" if e is None else os.fsencode(e.path)
