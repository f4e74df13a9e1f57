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

Where the window lives: in the agent's config, and in the repository itself (:data:`REPO_DOC`,
``protect.json``, written by the agent at every start and by ``drsync init`` when given a window), so that
a command run with ``--repo`` alone (no config) keeps it too. Every deletion applies the longer of the two
(:func:`drsync.engine.protection_of`). The document also names the agent's state directory, where a
``--repo --break-glass`` deletion is recorded like one run with the config.

Planning here is pure (:func:`split_protected`); the ledger and the repository document are the only I/O.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drsync import documents, fsutil
from drsync.errors import IntegrityError, RefusedError
from drsync.repository.format import PROTECT_NAME
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage import ObjectMissing, Storage
from drsync.units import iso_time, parse_iso, with_iso_times

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


# --- the window the repository carries (docs/FORMAT.md, "protect.json") -------------------------------------

REPO_DOC = PROTECT_NAME
REPO_DOC_KIND = "drsync-protection"
REPO_DOC_FORMAT = 1
REPO_DOC_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class RecordedWindow:
    """``protect.json``: the window (seconds, 0 = off), when and by whom it was written, and the state
    directory (absolute, on ``host``) of the agent that keeps the repository ("" when none is known)."""

    window_s: float
    set_at: float = 0.0
    set_by: str = ""
    state_dir: str = ""
    host: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps({"kind": REPO_DOC_KIND, "format": REPO_DOC_FORMAT, "window_s": self.window_s,
                           "set_at": iso_time(self.set_at), "set_by": self.set_by, "state_dir": self.state_dir,
                           "host": self.host}, indent=1, sort_keys=True).encode()


def read_window(storage: Storage) -> RecordedWindow | None:
    """The window a repository carries, or None when it has no ``protect.json``. A document that cannot be
    read as one is an IntegrityError (exit 3): deletions stop until the agent (or ``drsync init``) writes
    it again; one of a newer format is refused (exit 4): upgrade drsync."""
    try:
        data = storage.read_range(REPO_DOC, 0, REPO_DOC_MAX_BYTES + 1)
    except ObjectMissing:
        return None
    where = f"repository {storage.url}: {REPO_DOC}"
    fix = ("no snapshot is deleted until it is written again: restart the agent that keeps this repository "
           "(it writes its [snapshots] protect there)")
    if len(data) > REPO_DOC_MAX_BYTES:
        raise IntegrityError(f"{where} is {len(data)} bytes, over {REPO_DOC_MAX_BYTES}; {fix}")
    try:
        doc = documents.loads(data)
        if not isinstance(doc, dict) or doc.get("kind") != REPO_DOC_KIND:
            raise ValueError(f"kind is not {REPO_DOC_KIND!r}")
        fmt = doc.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > REPO_DOC_FORMAT:
            raise RefusedError(f"{where} has format {fmt}, newer than this drsync understands "
                               f"({REPO_DOC_FORMAT}): upgrade drsync before deleting snapshots here")
        if fmt != REPO_DOC_FORMAT:
            raise ValueError(f"format {fmt!r}")
        window = doc.get("window_s")
        if isinstance(window, bool) or not isinstance(window, int | float) or not window >= 0 or \
                window == float("inf"):
            raise ValueError(f"window_s {window!r} is not a non-negative number of seconds")
        texts = [doc.get(k, "") for k in ("set_at", "set_by", "state_dir", "host")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("set_at, set_by, state_dir and host must be strings")
        set_at = parse_iso(texts[0]) if texts[0] else 0.0
    except RefusedError:
        raise
    except (ValueError, TypeError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IntegrityError(f"{where} is damaged ({e}); {fix}") from None
    return RecordedWindow(float(window), set_at, texts[1], texts[2], texts[3])


def record_window(storage: Storage, window_s: float, *, by: str, state_dir: str = "") -> RecordedWindow | None:
    """Write ``protect.json`` (atomically, durably) unless it says the same already, or there is none and
    ``window_s`` is 0. Returns what it said before (None when there was none or it was unreadable). A
    shorter window than before is logged at WARNING (an operator shortened [snapshots] protect); a newer
    format is left alone (RefusedError)."""
    damaged = False
    try:
        before = read_window(storage)
    except IntegrityError as e:
        log.warning("%s; %s writes it again", e, by)
        before, damaged = None, True
    if before is None and window_s <= 0 and not damaged:
        return None  # never on: nothing to record
    state_dir = fsutil.absolute(state_dir) if state_dir else ""
    host = socket.gethostname() if state_dir else ""
    if before is not None and (before.window_s, before.state_dir, before.host) == (window_s, state_dir, host):
        return before
    storage.write(REPO_DOC, RecordedWindow(window_s, time.time(), by, state_dir, host).to_bytes(), durable=True)
    if before is not None and window_s < before.window_s:
        log.warning("repository %s: [snapshots] protect shortened from %s to %s by %s", storage.url,
                    human_duration(before.window_s), human_duration(window_s) if window_s else "off", by)
    return before


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
        # Times as every JSON drsync writes has them: ISO 8601 with zone, the Unix time in <key>_unix.
        os.write(fd, b"".join(json.dumps(with_iso_times(e), sort_keys=True).encode() + b"\n" for e in entries))
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
            out.append(documents.loads(line))
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
