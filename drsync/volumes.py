"""Filesystems mounted inside a data root, judged between two captures (safety rule 8).

A volume mounted below the data root (``/srv/data/disk1`` under ``/srv/data``) can be unmounted, or
replaced by an empty one (a failed fsck, a fresh volume, the wrong device), while production keeps
running. A capture that took what it saw at face value would make the volume's files deletions on
every standby, and a small volume stays under ``replication.max_delete_fraction``. So each snapshot
records the volumes it saw and how many files each held (``volumes`` in the snapshot document,
docs/FORMAT.md), and the next capture keeps a volume's files at their last captured version (stale)
when the volume

* was mounted at the last snapshot, held files, and is not mounted now (its mount point still a
  directory), or
* is mounted but holds no files, where the last snapshot had files below its mount point.

A volume's files are those below its mount point, nested volumes' included, counted by path (a bind mount
of a directory of the root's own filesystem is a volume too).

Everything else in the tree is captured as usual. ``drsync snapshot create --allow-empty`` captures the
volumes as they are. Pure functions; the capture (:mod:`drsync.capture`) does the I/O.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from drsync.text import printable


@dataclass(frozen=True)
class VolumeVerdict:
    """What a capture does about the volumes inside its root.

    ``keep``: mount point (relative path) -> why its files keep their last captured version (one line
    for the snapshot's warnings). ``record``: mount point -> files on it, for the new snapshot document
    (a kept volume records what it held before, so the next capture judges it the same way)."""

    keep: dict[str, str] = field(default_factory=dict)
    record: dict[str, int] = field(default_factory=dict)


def left_out(recorded: Mapping[str, int], mounted: Iterable[str], is_dir: Callable[[str], bool]) -> set[str]:
    """Before the walk: the volumes recorded with files below them that are not mounted now, whose mount
    point is still a directory. The walk leaves them out (files written into the bare mount point are not a
    volume's contents); :func:`judge` keeps their last version. A mount point that is gone altogether
    was removed on purpose and is captured as removed (the deletion guard still weighs it); one below a
    volume that is left out goes with it."""
    now = set(mounted)
    out = {m for m, files in recorded.items() if files > 0 and m not in now and is_dir(m)}
    return {m for m in out if not any(_below(m, o) for o in out)}


def removed(recorded: Mapping[str, int], mounted: Iterable[str], is_dir: Callable[[str], bool]) -> set[str]:
    """Recorded volumes whose mount point is gone altogether (not mounted, not a directory): retired on
    purpose; their files do not count for the volume they were mounted in."""
    now = set(mounted)
    return {m for m in recorded if m not in now and not is_dir(m)}


def judge(recorded: Mapping[str, int], files_below: Mapping[str, int], gone: Iterable[str],
          parent_files_below: Callable[[str], int], retired: Iterable[str] = ()) -> VolumeVerdict:
    """After the walk. ``recorded``: the parent snapshot's volumes (mount point -> files below it, nested
    volumes' included); ``files_below``: each volume mounted now -> the files this capture found below its
    mount point; ``gone``: :func:`left_out`'s answer; ``parent_files_below``: how many files the parent
    snapshot holds below a path (asked only for an empty volume the parent snapshot did not record, e.g.
    the first capture after an upgrade); ``retired``: :func:`removed`'s answer, whose files a volume that
    held them is not missing. A kept volume's record, and those of volumes recorded below it,
    are carried as they were."""
    retired = set(retired)
    outer_retired = {r for r in retired if not any(_below(r, o) for o in retired)}
    keep: dict[str, str] = {}
    for m in sorted(gone):
        keep[m] = (f"{printable(m)}: a filesystem holding {recorded[m]} file(s) was mounted here at the last "
                   f"snapshot and is not now; they keep their last captured version (stale) and nothing of it "
                   f"is deleted on a standby. Mount it again, or run 'drsync snapshot create --allow-empty' if "
                   f"it was removed on purpose")
    record: dict[str, int] = {}
    for m, files in sorted(files_below.items()):
        if any(_below(m, k) for k in keep):
            continue
        before = recorded[m] - sum(recorded[r] for r in outer_retired if _below(r, m)) if m in recorded \
            else parent_files_below(m)
        if files == 0 and before > 0:
            keep[m] = (f"{printable(m)}: the filesystem mounted here holds no files, but the last snapshot had "
                       f"{before} below it (the wrong or an empty volume?); they keep their last captured "
                       f"version (stale) and nothing of it is deleted on a standby. Mount the right volume, or "
                       f"run 'drsync snapshot create --allow-empty' if it is empty on purpose")
            record[m] = before
        else:
            record[m] = files
    for m, files in recorded.items():
        if any(m == k or _below(m, k) for k in keep):
            record[m] = files
    return VolumeVerdict(keep=keep, record=record)


def root_volume_gone(recorded: Mapping[str, str], host: str, holding: str, mounted: frozenset[str]) -> str | None:
    """Whether the filesystem the data root lay on at the last snapshot is unmounted now: what the root
    shows then is the directory under the mount point (an older copy, a stub, nothing), never production.
    ``recorded``: the last snapshot's ``root_volume``; ``host``: this host's name; ``holding``: the mount
    point the root lies on now; ``mounted``: every mount point now. Judged only on the host that recorded
    it (another host's mounts say nothing about this one's: a standby promoted, a moved agent). A filesystem
    mounted deeper than before (a new volume at the root, the old one still mounted) is a choice, not
    judged. Returns the one-line reason to refuse the capture, or None."""
    was = recorded.get("mount_point") if recorded else None
    if not was or recorded.get("host") != host or was == holding or was in mounted:
        return None
    return (f"the filesystem mounted at {printable(was)} held the data root at the last snapshot and is not mounted "
            f"now: the root shows the directory under its mount point, not production's data; nothing was captured. "
            f"Mount it again, or run 'drsync snapshot create --allow-empty' if it was retired on purpose")


def valid_root_volume(doc: object) -> bool:
    """Whether ``doc`` may be a snapshot's ``root_volume``: {} or a host name and an absolute, normalised
    mount point (a document from a peer or a damaged disk may say anything)."""
    if doc == {}:
        return True
    return (isinstance(doc, dict) and set(doc) == {"host", "mount_point"}
            and all(isinstance(v, str) and v and "\x00" not in v for v in doc.values())
            and doc["mount_point"].startswith("/") and posixpath.normpath(doc["mount_point"]) == doc["mount_point"])


def _below(path: str, top: str) -> bool:
    return path.startswith(top + "/")


def valid_mount_point(rel: object) -> bool:
    """Whether ``rel`` may be a recorded mount point: a normalised relative path inside the root (a
    document from a peer or a damaged disk may say anything)."""
    if not (isinstance(rel, str) and rel not in ("", ".", "..") and not rel.startswith(("/", "../"))
            and "\x00" not in rel and posixpath.normpath(rel) == rel):
        return False
    try:
        os.fsencode(rel)  # a lone surrogate no file name can hold
    except UnicodeEncodeError:
        return False
    return True
