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

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.dataroot import UNKNOWN_ID
from drsync.repository.manifest import FILE, Manifest, external_mask
from drsync.tree import LocalEntry

__all__ = ["Residual", "split_unchanged"]

_BATCH = 16384  # manifest rows decoded to Python values at a time


@dataclass
class Residual:
    """What is left to plan: ``rows`` (int64 manifest rows, ascending), ``existing`` (target entries by
    path) and how many plain files were found ``unchanged`` (no action needed)."""

    rows: np.ndarray
    existing: dict[str, LocalEntry]
    unchanged: int


def split_unchanged(manifest: Manifest, walk: Iterable[LocalEntry], *, resolution_ns: int = 1,
                    compare_owner: bool = False, compare_xattrs: bool = False, mode_bits: int = 0o7777,
                    planned: Callable[[str], bool] = lambda p: False) -> Residual | None:
    """Merge ``manifest`` with ``walk`` (the target's entries in path-bytes order) and drop the plain files
    both hold alike. ``planned(path)``: the path must go to the planner whatever it compares like
    (excluded, protected, known to have changed content). Memory: one record batch of the manifest and
    what is kept. Returns None when either side is out of path order (a hostile manifest): the caller
    plans the whole of both instead."""
    t = manifest.table
    if t.schema.field("path").type != pa.binary():
        return None
    res = max(1, resolution_ns)
    extra = 0o7777 & ~mode_bits
    leaders = set(pc.unique(t.column("hardlink").drop_null()).to_pylist()) if t.num_rows else set()
    rows: list[int] = []
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
                rows.append(row)
                continue
            h = have
            have = next(it, None)
            last_key, have_key = have_key, _key(have)
            if have is not None and have_key <= last_key:
                return None
            mode, uid = c["mode"][i], c["uid"][i]
            if (c["type"][i] == FILE and h.type == FILE and c["hardlink"][i] is None and not ext[i]
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
    return Residual(np.asarray(rows, dtype=np.int64), existing, unchanged)


def _key(e: LocalEntry | None) -> bytes:
    return b"" if e is None else os.fsencode(e.path)
