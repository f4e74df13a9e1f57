"""Whether a process that left its mark in a shared place (a repository lock, a temporary file) is alive.

A mark names its writer as a :class:`ProcessRef`: host name, pid namespace, pid and the kernel's
start time of that pid. Liveness can be judged only from the same host and pid namespace: a pid of
another machine, or of a container with its own pid namespace on the same host (Docker
``--network host``, a Kubernetes ``hostNetwork`` pod: same host name), means nothing here, so such
a mark is never taken for dead (:meth:`ProcessRef.judgeable`). The start time guards against a pid
the kernel has given to another process since. Source: ``/proc/<pid>/stat`` (field 22, starttime),
``/proc/self/ns/pid`` (namespaces(7)).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

# The inode of the host's initial pid namespace: PROC_PID_INIT_INO (0xEFFFFFFC), include/linux/proc_ns.h.
INIT_PIDNS = "4026531836"


def process_start(pid: int | str) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, as text; ``"self"``: this
    process, whatever /proc is mounted); None when no such process is visible here; ``"?"`` when
    it exists but cannot be read."""
    if pid != "self" and int(pid) <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[-1].split()[19]


def proc_is_ours() -> bool:
    """True when /proc shows this pid namespace (``/proc/self`` is our own pid): a process in a pid
    namespace of its own that still sees the host's /proc cannot look other processes up by pid."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def pid_namespace() -> str | None:
    """This process's pid namespace (the inode of ``/proc/self/ns/pid``), None where unknown."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessRef:
    """One process as another may find it: ``pidns`` and ``start`` are None in marks written
    before they were recorded (then only a reader on that host in its initial pid namespace judges)."""

    host: str
    pid: int
    start: str | None = None
    pidns: str | None = None

    @classmethod
    def current(cls) -> ProcessRef:
        return cls(socket.gethostname(), os.getpid(), process_start("self"), pid_namespace())

    def _same_pidns(self) -> bool:
        here = pid_namespace()
        if self.pidns is None:
            # An older mark: its writer's namespace is unknown. Only the host's initial namespace,
            # where such writers ran unless containerised, judges it; a container never does.
            return here is None or here == INIT_PIDNS
        return here is None or self.pidns == here

    def judgeable(self) -> bool:
        """True when this process could see the referenced one: same host and pid namespace."""
        return self.host == socket.gethostname() and proc_is_ours() and self._same_pidns()

    def alive(self) -> bool:
        """False only when judgeable and gone (or its pid now belongs to a later process)."""
        if not self.judgeable():
            return True
        now = process_start(self.pid)
        if now is None:
            return False
        return self.start is None or now == "?" or now == self.start

    def is_current(self) -> bool:
        """True when this is the calling process itself."""
        return (self.pid == os.getpid() and self.host == socket.gethostname() and self.start is not None
                and self._same_pidns() and self.start == process_start("self"))
