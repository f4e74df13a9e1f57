"""A file of several names (hard links) read once per capture, not once per name.

A backup rotation (rsnapshot, ``cp -al``) gives one file a name in every day it kept: a capture that read each
name would read a 64 MiB file as many times as it has names (breaker s57b: about 20 ms a name). What one name's
read produced (its chunk ids, content digest, metadata) stands for another name of the same device and inode
when the scan saw that name with the version the read saw (size, modification time, status-change time,
inode): one inode, one version, one content. Anything else (the file changed between the reads) is read again.

Within one scan window every name of an inode is known at once (the first is read, the others take its
result); across windows, results of files of at least ``keep_bytes`` are held until as many names as the
inode has links were seen (names outside the root or excluded keep it held to the capture's end): at most one
entry per ``keep_bytes`` of data read, so memory stays bounded on a tree of a million small linked files,
which cost little to read again.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["SharedInodes", "Version"]

T = TypeVar("T")
# (size in bytes, modification time ns, status-change time ns, inode): what must match for one read to stand
# for another name.
Version = tuple[int, int, int, int]


class SharedInodes(Generic[T]):
    """Read results held by (device, inode) across a capture's windows, each with the version it was read at
    and how many names of the inode are still to come."""

    def __init__(self, keep_bytes: int = 1 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._held: dict[Hashable, tuple[Version, T, int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def take(self, key: Hashable, version: Version) -> T | None:
        """The result read for ``key`` at ``version`` (one name of it used), or None: read it."""
        got = self._held.get(key)
        if got is None:
            return None
        held_version, result, left = got
        if held_version != version:
            return None
        if left <= 1:
            del self._held[key]
        else:
            self._held[key] = (held_version, result, left - 1)
        return result

    def keep(self, key: Hashable, version: Version, result: T, names_left: int) -> None:
        """Hold ``result`` (read at ``version``) for ``names_left`` more names of ``key``, when its file is
        large enough to be worth holding (``keep_bytes``)."""
        if names_left > 0 and version[0] >= self.keep_bytes:
            self._held[key] = (version, result, names_left)
