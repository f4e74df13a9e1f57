"""A capture's hard-link groups: which kept file each multiply-linked name links to, as the path-sorted windows go by.

Files with more than one link are grouped by device and inode. The first kept member in path order leads;
a later member names it (the manifest's ``hardlink``) only when it holds what the leader holds (size,
content, mode, owner). A member that does not (the file was rewritten between the reads of two of its names)
stands alone with what was read of it, and a warning says so: a manifest never links a row to other bytes
than its own, which a restore would refuse.

A group is held open until as many of its names have gone by as the most links any of them was seen with
(all inside the tree). A backup tree whose days are hard-linked to each other (``daily.0`` .. ``daily.N``)
keeps every group open from the first day's walk to the last's, so the open groups are held in NumPy
columns sorted by device and inode (about 50 bytes a group, and its leader's path in Arrow), never as
Python objects per group: at 500,000 groups open about 35 MiB instead of about 250.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct

import numpy as np
import pyarrow as pa

from drsync.repository.snapshots import WarningLog
from drsync.text import printable

_KEY = "S16"  # a group's device and inode, big-endian: byte order is numeric order
_HOLDS = "S16"  # a digest of what a leader holds (size, mode, owner, content)
_COMPACT = 1 << 16  # leader paths let go of before the path store is rebuilt


def holds(size: int, content: bytes | None, mode: int, uid: int, gid: int) -> bytes:
    """What a file holds, as the group compares it: a 16-byte BLAKE2b digest of its size, mode, owner and
    content digest (None: no content digest)."""
    packed = struct.pack("<qIII", size, mode, uid, gid) + (b"\x00" if content is None else b"\x01" + content)
    return hashlib.blake2b(packed, digest_size=16).digest()


def _keys(devs: np.ndarray, inodes: np.ndarray) -> np.ndarray:
    both = np.empty((len(devs), 2), dtype=">u8")
    both[:, 0] = devs
    both[:, 1] = inodes
    return both.view(_KEY).ravel()


class LinkGroups:
    """The open hard-link groups of one capture (see the module). Columns sorted by key; a group that has
    seen all its names is dropped at the end of the window that closed it."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, _KEY)
        self._holds = np.zeros(0, _HOLDS)
        self._seen = np.zeros(0, np.int64)  # names gone by
        self._most = np.zeros(0, np.int64)  # the most links any of them was seen with
        self._slots = np.zeros(0, np.int64)  # where its leader's path lies in the path store
        self._store: list[pa.Array] = []  # leader paths (binary), appended a window at a time
        self._starts: list[int] = []
        self._stored = 0

    def __len__(self) -> int:
        """Groups open."""
        return len(self._keys)

    def window(self, paths: list[bytes], devs: np.ndarray, inodes: np.ndarray, nlinks: np.ndarray,
               held: list[bytes], warnings: WarningLog) -> list[bytes | None]:
        """The ``hardlink`` value of each of a window's kept multiply-linked files, given in path order with
        their device, inode, link count and what each holds (:func:`holds`): a leader's path, or None (it leads,
        or it holds other bytes than its leader, which ``warnings`` is told)."""
        keys = _keys(devs, inodes)
        mine = np.asarray(held, dtype=_HOLDS)
        found = self._find(keys)
        safe = np.maximum(found, 0)
        same = (found >= 0) & (self._holds[safe] == mine) if len(self._keys) else np.zeros(len(keys), bool)
        out: list[bytes | None] = [None] * len(paths)
        fresh: dict[bytes, list[object]] = {}  # groups first met in this window: key -> [path, holds, seen, most]
        for j, path in enumerate(paths):
            i, n = int(found[j]), int(nlinks[j])
            if i >= 0 and self._seen[i] < self._most[i]:
                lead = self._path(i)
                if same[j]:
                    out[j] = lead
                else:
                    _differs(warnings, path, lead)
                self._seen[i] += 1
                self._most[i] = max(int(self._most[i]), n)
                continue
            key = keys[j].tobytes()
            group = fresh.get(key)
            if group is None:
                fresh[key] = [path, mine[j], 1, n]
                continue
            if group[1] == mine[j]:
                out[j] = group[0]  # type: ignore[assignment]
            else:
                _differs(warnings, path, group[0])  # type: ignore[arg-type]
            group[2] = group[2] + 1  # type: ignore[operator]
            group[3] = max(group[3], n)  # type: ignore[call-overload]
            if group[2] >= group[3]:  # type: ignore[operator]
                del fresh[key]
        self._settle(fresh)
        return out

    def leader(self, dev: int, inode: int, what: bytes) -> bytes | None:
        """The leader's path of the open group of ``dev`` and ``inode`` when it holds ``what``
        (:func:`holds`), else None."""
        i = int(self._find(_keys(np.array([dev], np.uint64), np.array([inode], np.uint64)))[0])
        if i < 0 or self._holds[i] != np.asarray([what], dtype=_HOLDS)[0]:
            return None
        return self._path(i)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's group index, or -1."""
        if not len(self._keys) or not len(keys):
            return np.full(len(keys), -1, np.int64)
        at = np.searchsorted(self._keys, keys)
        safe = np.minimum(at, len(self._keys) - 1)
        return np.where(self._keys[safe] == keys, safe, -1).astype(np.int64)

    def _path(self, i: int) -> bytes:
        slot = int(self._slots[i])
        c = bisect.bisect_right(self._starts, slot) - 1
        return self._store[c][slot - self._starts[c]].as_py()

    def _settle(self, fresh: dict[bytes, list[object]]) -> None:
        """Drop the groups closed, and add the window's groups still open, keeping the columns sorted."""
        live = self._seen < self._most
        if not live.all():
            self._keys, self._holds, self._seen, self._most, self._slots = (
                a[live] for a in (self._keys, self._holds, self._seen, self._most, self._slots))
        if fresh:
            keys = np.array(list(fresh), dtype=_KEY)
            order = np.argsort(keys, kind="stable")
            values = list(fresh.values())
            groups = [values[k] for k in order.tolist()]
            keys = keys[order]
            at = np.searchsorted(self._keys, keys)
            slots = np.arange(self._stored, self._stored + len(groups), dtype=np.int64)
            self._store.append(pa.array([g[0] for g in groups], pa.binary()))
            self._starts.append(self._stored)
            self._stored += len(groups)
            self._keys = np.insert(self._keys, at, keys)
            self._holds = np.insert(self._holds, at, np.array([g[1] for g in groups], dtype=_HOLDS))
            self._seen = np.insert(self._seen, at, np.array([g[2] for g in groups], np.int64))
            self._most = np.insert(self._most, at, np.array([g[3] for g in groups], np.int64))
            self._slots = np.insert(self._slots, at, slots)
        if self._stored > 2 * len(self._keys) + _COMPACT:  # most stored paths are of closed groups: rebuild
            paths = pa.chunked_array(self._store, pa.binary()).take(pa.array(self._slots)).combine_chunks()
            self._store, self._starts = [paths], [0]
            self._stored = len(paths)
            self._slots = np.arange(len(paths), dtype=np.int64)


def _differs(warnings: WarningLog, path: bytes, lead: bytes) -> None:
    warnings.append(f"{printable(os.fsdecode(path))}: hard link to {printable(os.fsdecode(lead))}, but the two were "
                    f"read with different contents (rewritten while read); captured as a file of its own")
