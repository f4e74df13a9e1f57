"""The mount points inside a directory tree, and whether they changed: for change notification, which
sees nothing of a filesystem mounted over a watched directory (or uncovered by an unmount) after the
watch was set up.

The kernel marks ``/proc/self/mountinfo`` readable with priority (``POLLPRI``) whenever the process's
mount table changes (proc(5)); :meth:`MountWatch.changed` polls it without blocking and reads the table
again only then. Mount points are field 5 of each line, with space, tab, newline and backslash written
as octal escapes (``\\040``).
"""

from __future__ import annotations

import os
import re
import select

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mount_points(table: bytes) -> set[str]:
    """Every mount point of a mountinfo table (absolute paths, escapes undone)."""
    out = set()
    for line in table.splitlines():
        fields = line.split(b" ")
        if len(fields) > 4:
            out.add(os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return out


def under(points: set[str], root: str) -> set[str]:
    """The mount points strictly inside ``root`` (an absolute path without symlinks)."""
    prefix = root.rstrip("/") + "/"
    return {p for p in points if p.startswith(prefix)}


class MountWatch:
    """The mount points inside ``root`` as they were when made; :meth:`changed` says which differ now.
    Where the table cannot be read or polled, nothing is reported."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._f = None
        self._poll: select.poll | None = None
        self.points: set[str] = set()
        try:
            self._f = open(MOUNTINFO, "rb")  # noqa: SIM115 - kept open: poll needs the same open file
            self._poll = select.poll()
            self._poll.register(self._f, select.POLLPRI | select.POLLERR)
            self.points = self._read()
        except OSError:
            self.close()

    def _read(self) -> set[str]:
        assert self._f is not None
        self._f.seek(0)
        return under(mount_points(self._f.read()), self.root)

    def changed(self) -> list[str]:
        """Mount points inside the root added or removed since the last call (sorted; empty when none, or
        when the mount table did not change at all: no read then)."""
        if self._poll is None or not self._poll.poll(0):
            return []
        try:
            now = self._read()
        except OSError:
            return []
        diff, self.points = sorted(now ^ self.points), now
        return diff

    def close(self) -> None:
        f, self._f, self._poll = self._f, None, None
        if f is not None:
            f.close()
