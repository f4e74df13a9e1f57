"""``[snapshots] protect``: history that neither a primary nor a slip of the hand can shorten.

A snapshot stored in a repository less than ``protect`` ago cannot be deleted by expiry (TTLs and
``[snapshots] keep``, in the agent's retention and ``drsync snapshot expire``) nor by ``drsync
snapshot delete``, unless an operator passes ``--break-glass``; such a deletion is logged at WARNING
and recorded in the agent's state directory (:data:`LEDGER_NAME`), which the agent exports as the
counter ``drsync_protected_snapshot_deletions_total``. Garbage collection needs no rule of its own:
it only ever removes chunks no snapshot names, so a protected snapshot's data stays with it.

Whose clock: protection counts from the time *this* repository stored the snapshot, read as the
modification time of its document on this cluster's storage (:meth:`Repository.snapshot_stored_times`),
never from a time another machine wrote. A snapshot is captured before it is stored, so "younger than
``protect`` by its capture time or by its storing" is "stored less than ``protect`` ago": a primary
that sends a capture time far in the past (a wrong clock or a lie) shortens nothing, and one in the
future lengthens nothing. On the cluster that took the snapshot the two times are seconds apart.

Planning here is pure (:func:`split_protected`); the ledger is the only I/O.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drsync import fsutil
from drsync.errors import RefusedError
from drsync.repository.snapshots import SnapshotInfo
from drsync.units import iso_time

log = logging.getLogger("drsync.protection")
# Break-glass deletions: a logger of their own, which the command line shows on stderr (its refusals it
# prints as the error line instead).
glass_log = logging.getLogger("drsync.protection.break_glass")

# In the agent's state directory: one JSON line per snapshot deleted with --break-glass.
LEDGER_NAME = "protected-deletions.jsonl"


def human_duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``: the two largest units, rounded down."""
    s = max(0, int(seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{u}" for n, u in parts[:2] if n or len(parts) == 1) or "0s"


@dataclass(frozen=True)
class Protection:
    """The protect window (seconds; 0 = off) and when this repository stored each snapshot
    (snapshot id -> Unix seconds, its own storage's clock)."""

    window_s: float = 0.0
    stored_at: Mapping[str, float] = field(default_factory=dict)

    def since(self, s: SnapshotInfo, now: float) -> float:
        """When protection of ``s`` started counting: when this repository stored it. A snapshot whose
        stored time is unknown (committed after the listing) counts as stored ``now``."""
        return self.stored_at.get(s.id, now)

    def until(self, s: SnapshotInfo, now: float) -> float:
        """Unix time at which ``s`` stops being protected."""
        return self.since(s, now) + self.window_s

    def is_protected(self, s: SnapshotInfo, now: float) -> bool:
        return self.window_s > 0 and now < self.until(s, now)

    def refusal(self, s: SnapshotInfo, now: float, what: str = "deleted") -> str:
        """The one line an operator reads when ``s`` is protected: which, how long still, and the flag."""
        until = self.until(s, now)
        return (f"snapshot {s.id} is protected for another {human_duration(until - now)} (until {iso_time(until)}; "
                f"[snapshots] protect = {human_duration(self.window_s)} from when this repository stored it): "
                f"not {what}; an operator on this cluster may rerun with --break-glass to delete it anyway "
                f"(logged and counted)")


def as_stored_by_standby(info: SnapshotInfo) -> SnapshotInfo:
    """A shipped snapshot document as a standby stores it: without the sender's TTL. The standby's
    retention is its own ([snapshots] keep and protect of its config); a TTL the primary wrote would
    let the primary decide when the standby's copy goes."""
    return dataclasses.replace(info, ttl_s=None) if info.ttl_s is not None else info


def split_protected(due: Iterable[SnapshotInfo], protection: Protection | None,
                    now: float) -> tuple[list[SnapshotInfo], list[SnapshotInfo]]:
    """Split snapshots due for deletion into (deletable, protected), each in the given order."""
    deletable: list[SnapshotInfo] = []
    protected: list[SnapshotInfo] = []
    for s in due:
        (protected if protection is not None and protection.is_protected(s, now) else deletable).append(s)
    return deletable, protected


def check_deletable(infos: Iterable[SnapshotInfo], protection: Protection | None, now: float) -> None:
    """RefusedError (exit 4) naming the first protected snapshot of ``infos``, logged at WARNING."""
    _, protected = split_protected(infos, protection, now)
    if protected:
        assert protection is not None
        message = protection.refusal(protected[0], now)
        if len(protected) > 1:
            message += f" ({len(protected) - 1} more of the snapshots named are protected too; nothing was deleted)"
        log.warning("refused: %s", message)
        raise RefusedError(message)


# --- break glass: the ledger in the agent's state directory ----------------------------------------


def who() -> dict[str, Any]:
    """Who is deleting: user (and the sudo user behind it), host, process id and command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "sudo_user": os.environ.get("SUDO_USER", ""), "host": socket.gethostname(),
            "pid": os.getpid(), "command": " ".join(sys.argv)}


def record_break_glass(state_dir: str, infos: Iterable[SnapshotInfo], protection: Protection, now: float,
                       how: str) -> list[dict[str, Any]]:
    """Append one durable line per protected snapshot about to be deleted with --break-glass (before it is
    deleted: a deletion that is not recorded does not happen), and log each at WARNING. ``how`` names the
    command (e.g. ``"snapshot delete"``). Returns the entries; OSError when the ledger cannot be written."""
    actor = who()
    entries = [{"at": now, "snapshot": s.id, "how": how, "captured_at": s.captured_at,
                "stored_at": protection.since(s, now), "protected_until": protection.until(s, now), **actor}
               for s in infos]
    if not entries:
        return entries
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, LEDGER_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsutil.fsync_dir(state_dir)
    for e in entries:
        glass_log.warning("BREAK GLASS: %s deletes protected snapshot %s (protected until %s) by %s on %s (pid %d): %s",
                    e["user"] + (f" (sudo from {e['sudo_user']})" if e["sudo_user"] else ""), e["snapshot"],
                    iso_time(e["protected_until"]), how, e["host"], e["pid"], e["command"])
    return entries


def read_break_glass(state_dir: str) -> list[dict[str, Any]]:
    """Every recorded break-glass deletion, oldest first ([] when none; a torn last line is skipped)."""
    try:
        with open(os.path.join(state_dir, LEDGER_NAME), "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class BreakGlassCount:
    """How many break-glass deletions the ledger of one state directory records, re-read only when the
    file changed (cheap enough for every scrape)."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LEDGER_NAME)
        self.state_dir = state_dir
        self._key: tuple[int, int] | None = None
        self._count = 0

    def __call__(self) -> int:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        key = (st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._count = len(read_break_glass(self.state_dir))
            self._key = key
        return self._count
