"""The target root directory's own metadata in an apply (docs/FORMAT.md, ``drsync.root``): what it gets, and
giving it. The apply (:mod:`drsync.apply`) decides when; this module what, and how a root its user may not write
is opened up and given back.

The root is not a path of the manifest: its mode, owner, time and extended attributes ride in the manifest's
key-value metadata (:mod:`drsync.repository.manifest_root`). A target the apply makes, an empty one, and the
cluster's own data root get the snapshot's; a kept target (a restore without ``--overwrite`` onto a directory
that holds something) keeps its own, and its time unless the commit writes into it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

from drsync import fsutil
from drsync.dataroot import UNKNOWN_ID, DataRoot
from drsync.errors import DrsyncError, OperationFailed
from drsync.repository.manifest import Entry
from drsync.text import one_line

__all__ = ["RootOpening", "close_up", "holds_data", "plan_root", "set_root"]


def plan_root(want: Entry | None, have: Entry | None, *, keep: bool, touched: bool, compare_owner: bool,
              compare_xattrs: bool, mode_bits: int) -> tuple[Entry | None, bool]:
    """What an apply gives the target's root directory once it is done, and whether that sets back its mode,
    owner or extended attributes. Pure.

    ``want``: the snapshot's root (its manifest's ``drsync.root``; None: a snapshot that has none). ``have``:
    the target's root before the apply (None: made by it). ``keep``: a kept target (a restore without
    ``--overwrite`` onto a directory that holds something): its root keeps its mode, owner and extended
    attributes (a difference is for the caller to refuse), and its time unless the commit writes into it
    (``touched``), when it gets the snapshot's, as any directory written into does. Otherwise the root gets
    the snapshot's metadata. Where the snapshot has none, a root the commit wrote nothing into gets its own
    time back (the staging area made in it moved that); one written into keeps the time the commit left.
    Returns (the entry to give the root, or None for nothing; whether mode, owner or attributes differ)."""
    if want is None:
        return (have if have is not None and not touched else None), False
    want = dataclasses.replace(want, mode=want.mode & mode_bits)
    differs = have is not None and (have.mode != want.mode or (compare_owner and want.uid != UNKNOWN_ID and (
        have.uid, have.gid) != (want.uid, want.gid)) or (compare_xattrs and (have.xattrs or None) != (
            want.xattrs or None)))
    if keep and have is not None:
        return (dataclasses.replace(have, mtime_ns=want.mtime_ns) if touched else have), differs
    return want, differs


def holds_data(root: DataRoot) -> bool:
    """Whether the root holds anything but drsync's own files; one this user cannot list is taken to."""
    try:
        if root.has_data():
            return True
    except (OSError, DrsyncError):
        return True
    local = fsutil.local_or_none(root.url)
    return local is not None and os.path.isdir(local) and not os.access(local, os.R_OK | os.X_OK)


def set_root(root: DataRoot, top: Entry, *, writable: bool = False) -> list[str]:
    """Give the target's root directory ``top``'s metadata (``writable``: with owner rwx, so that what is left
    of the clean-up can still go); what cannot be set is a warning, the commit being done. Returns the warnings."""
    before = len(root.warnings)
    try:
        root.set_root(dataclasses.replace(top, mode=top.mode | 0o700) if writable else top)
    except (OSError, OperationFailed) as e:
        return [*root.warnings[before:], f"{root.url}: its own mode, owner or time not set "
                                         f"({one_line(getattr(e, 'strerror', None) or str(e))})"]
    notes = root.warnings[before:]
    del root.warnings[before:]
    return notes


@dataclass
class RootOpening:
    """What an apply must give back to its target's root when it ends without giving it its metadata (refused,
    failed, or nothing to give): ``entry``, the root's metadata and time before the apply moved them (an
    interrupted apply completed first: as that left them); ``mode``, its mode before the apply opened it up
    (None: not opened); ``done``, the apply gave the root its metadata."""

    entry: Entry | None
    mode: int | None = None
    done: bool = False


def close_up(root: DataRoot, opening: RootOpening) -> None:
    """At the end of an apply that opened up its root and did not give it its metadata: the mode and time it had
    (its staging area, made and removed meanwhile, moved the time)."""
    if opening.mode is None or opening.done or opening.entry is None:
        return
    with contextlib.suppress(OSError, DrsyncError):
        root.set_root(dataclasses.replace(opening.entry, mode=opening.mode))
