"""Points in time a standby can be promoted to (damage that replicated), and how an operator names one.

A standby keeps every snapshot it stored in its own repository: the ones applied, the ones
waiting for ``replication.apply_delay``, the ones its deletion guard or an operator holds, and
its own (``before-rejoin``). Each of them is a **recovery point**: ``drsync promote
--to-snapshot ID`` or ``--before TIME`` applies it (atomically, like any apply) and then
promotes the standby at a new epoch; the snapshots newer than it stay in the repository.

Whose order, whose clock: points are ordered by the standby's own arrival order (the sequence
number its repository gave each snapshot), and ``--before TIME`` judges by when *this* repository
stored each one (:meth:`drsync.repository.repo.Repository.snapshot_stored_times`, the standby's
clock, as for ``[snapshots] protect`` and ``apply_delay``), never by the capture time the primary
wrote: a primary that backdates the captures of its damaged snapshots cannot make ``--before``
pick one of them, nor hide one from the snapshots named as newer than the chosen point.

Everything here is pure (tests call it directly); :mod:`drsync.agent.control` does the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from drsync.agent.state import AgentState
from drsync.config import parse_duration
from drsync.errors import UsageError
from drsync.repository.snapshots import AmbiguousRef, SnapshotInfo, pick_by_ref
from drsync.units import iso_time, parse_iso


@dataclass(frozen=True)
class RecoveryPoint:
    """One snapshot a standby could be promoted at. ``state``: ``applied`` (its root holds it now),
    ``pending`` (stored, waiting for apply_delay), ``held`` (held back by the deletion guard) or
    ``stored`` (any other snapshot of this cluster in its repository)."""

    id: str
    captured_at: float  # Unix seconds, on the primary's clock for shipped snapshots (its word only)
    kind: str
    state: str
    files: int
    bytes: int
    name: str = ""
    seq: int = 0  # the repository's sequence (arrival order): points are ordered by it
    stored_at: float = 0.0  # when this repository stored it (its own clock); 0: unknown (not listed yet)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "captured_at": self.captured_at, "stored_at": self.stored_at or None,
                "kind": self.kind, "state": self.state, "files": self.files, "bytes": self.bytes,
                "name": self.name or None}


def recovery_points(snapshots: list[SnapshotInfo], state: AgentState, *, cluster_id: str,
                    held: str = "", stored_at: Mapping[str, float] | None = None) -> list[RecoveryPoint]:
    """This standby's recovery points, in the order it stored them (oldest first: by its repository's
    sequence, :attr:`SnapshotInfo.order_key`, never by the capture times a primary wrote): every snapshot
    of ``cluster_id`` it holds. ``stored_at``: when this repository stored each (snapshot id -> Unix
    seconds, :meth:`Repository.snapshot_stored_times`); what ``--before`` judges by."""
    pending = {p[0] for p in state.pending}
    stored = stored_at or {}
    out = []
    for s in sorted((s for s in snapshots if s.cluster_id == cluster_id), key=lambda s: s.order_key):
        what = ("applied" if s.id == state.applied_snapshot else "pending" if s.id in pending else
                "held" if s.id == held else "stored")
        out.append(RecoveryPoint(s.id, s.captured_at, s.kind, what, s.files, s.bytes, s.name, s.seq,
                                 float(stored.get(s.id) or 0.0)))
    return out


def parse_before(text: str, now: float) -> float:
    """``--before TIME``: an ISO 8601 time (``2026-12-01T09:00:00Z``, ``2026-12-01 10:00+01:00``; without a
    zone it is the local time of the machine that runs the command), Unix seconds (digits only), or a
    span ago (``90m``, ``2h``, ``1d``, from ``now``). Returns Unix seconds; UsageError names the forms
    when ``text`` is none of them."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    if re.fullmatch(r"\d+(\.\d+)?\s*[a-zA-Z]+", t):
        try:
            return now - parse_duration(t, "--before")
        except Exception:
            pass
    try:
        return parse_iso(t)  # naive: local time
    except ValueError:
        raise UsageError(f"--before {text!r} is not a time: give ISO 8601 (2026-12-01T09:00:00Z) within years 1 "
                         f"to 9999, Unix seconds, or a span ago (90m, 2h, 1d)") from None


def choose_point(points: list[RecoveryPoint], *, to_snapshot: str | None = None,
                 before: float | None = None) -> RecoveryPoint:
    """The recovery point an operator named: ``to_snapshot`` (id, snapshot name (newest of that name),
    ``latest``, or a unique id prefix of 4+ characters) or the newest (in arrival order) that this
    standby *stored* at or before ``before``: its own clock, never the capture time a primary wrote (a
    backdated capture cannot make a damaged snapshot look older than the damage). A snapshot captured
    just before ``before`` and stored just after it is not chosen: the one before it is (the safe side).
    A point whose stored time is unknown (committed after the listing) counts as stored now. UsageError
    when none matches (the message lists the nearest points). ``points`` in arrival order
    (:func:`recovery_points`)."""
    if to_snapshot:
        # The rules of ``drsync snapshot show``: an id, a name (newest of it), ``latest``, a prefix of 4+.
        try:
            found = pick_by_ref(to_snapshot, sorted(points, key=lambda p: p.seq), id_of=lambda p: p.id,
                                name_of=lambda p: p.name or "")
        except AmbiguousRef as e:
            raise UsageError(f"--to-snapshot {to_snapshot}: {e}; {_nearest(points)}") from None
        if found is None:
            raise UsageError(f"--to-snapshot {to_snapshot}: is not a snapshot this standby holds; {_nearest(points)}")
        return found
    if before is None:
        raise UsageError("name the point: --to-snapshot ID or --before TIME")
    earlier = [p for p in points if p.stored_at and p.stored_at <= before]
    if not earlier:
        raise UsageError(f"this standby holds no snapshot it stored at or before {iso_time(before)} (--before "
                         f"judges by when this standby stored a snapshot, its own clock); {_nearest(points)}")
    return earlier[-1]


def newer_than(points: list[RecoveryPoint], point: RecoveryPoint) -> list[RecoveryPoint]:
    """The points this standby stored after ``point`` (arrival order, whatever their capture times say):
    kept in the repository when the standby is promoted at it. ``points`` as :func:`recovery_points`
    returns them."""
    ids = [p.id for p in points]
    return points[ids.index(point.id) + 1:] if point.id in ids else []


def _nearest(points: list[RecoveryPoint]) -> str:
    if not points:
        return "it holds no snapshot at all"
    shown = ", ".join(f"{p.id} (stored {iso_time(p.stored_at) if p.stored_at else 'just now'}, captured "
                      f"{iso_time(p.captured_at)}, {p.state})" for p in points[-5:])
    return f"its newest points: {shown} (drsync status --points lists them all)"
