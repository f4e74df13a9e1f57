"""What an agent remembers across restarts: one immutable record, one store, one lock.

:class:`AgentState` is frozen: nobody changes a field in place. :class:`StateStore`
is the only way to change it: :meth:`StateStore.update` (or :meth:`StateStore.transform`
for a change that depends on the current value) builds the new record, writes it
atomically and durably (``state_dir/state.json``: temp file, fsync, rename) and only
then makes it current, all under one lock. Readers take ``store.current`` once and read
a consistent record from it: an applied snapshot never appears with another
snapshot's capture time, on disk or in memory, whatever thread wrote last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from drsync import documents, engine, fsutil
from drsync.agent import clock
from drsync.config import Config
from drsync.errors import IntegrityError, UsageError
from drsync.repository import format as fmt


@dataclass(frozen=True)
class AgentState:
    """One agent's durable record (``state_dir/state.json``); times are Unix seconds."""

    epoch: int = 0  # the fencing floor: the highest group epoch this agent has seen
    # The agent ZooKeeper named at that epoch when this agent saw it: another agent named at the same epoch
    # later (ZooKeeper lost or rewrote the group) would be a second primary at one epoch, and is refused.
    epoch_holder: str = ""
    applied_snapshot: str = ""
    applied_captured_at: float = 0.0  # on the primary's clock
    applied_at: float = 0.0  # on this machine's clock
    last_role: str = ""  # the role this agent last acted in (auto role): "primary" or "standby"
    primary_epoch: int = 0  # the epoch at which this agent last held the primary claim (0: never)
    # Where the applied snapshot stands in the primary's sequence: (epoch of its sender, its seq number in
    # the sender's repository); standbys are ranked by it, never by capture times (other clocks).
    applied_position: tuple[int, ...] = ()
    # The primary's clock minus this machine's (estimated from its requests; see drsync.agent.clock), and
    # the agent it was estimated from: lag is counted with it, also after a restart while the primary is gone.
    clock_offset_s: float = 0.0
    clock_source: str = ""
    # The group epoch this agent last saw change, and when (this machine's clock): the failover cooldown
    # is measured from it, never from a time another machine wrote.
    epoch_seen: int = 0
    epoch_seen_at: float = 0.0
    # An ex-primary whose demote_command succeeded after it lost its claim: it may rejoin as standby.
    demoted: bool = False
    # This agent's identity in its group, made at its first start: two configs with one agent.name
    # are two agents, and the second one is refused.
    agent_id: str = ""
    # The agent.name this state directory belongs to (set at the agent's first start): a second
    # agent's config pointing at it is refused, and config check says so.
    agent_name: str = ""
    # While nothing is applied: a snapshot of what the root held when this agent (re)joined as a standby
    # (its before-rejoin snapshot); the deletion guard judges the first shipment against it.
    guard_baseline: str = ""
    # The newest snapshot stored from a shipment, applied or not (with replication.apply_delay the root
    # follows later): the received lag is counted from its capture time (primary's clock).
    received_snapshot: str = ""
    received_captured_at: float = 0.0
    # replication.apply_delay: snapshots stored and verified but not applied yet, in arrival order, each
    # (snapshot id, capture time on the primary's clock, position, when stored on this machine's clock);
    # applied once the delay has passed since both (:func:`drsync.agent.committer.delayed_until`).
    pending: tuple[tuple[str, float, tuple[int, ...], float], ...] = ()
    # The mass-change window: (applied snapshot, when applied on this machine's clock), a handful, oldest
    # first; a shipment is also judged against the one applied at least replication.mass_change_window ago.
    change_checkpoints: tuple[tuple[str, float], ...] = ()
    # When maintenance last collected this agent's repository (this machine's clock): the GC cadence
    # (drsync.agent.maintenance.GC_EVERY_S) holds across restarts and `drsync agent --once` runs.
    last_gc_at: float = 0.0

    @classmethod
    def from_doc(cls, doc: Any) -> AgentState:
        """The record of a state.json document. ValueError naming the field when a value is not of its
        field's type (a hand edit, a damaged file): a NaN epoch, say, would compare as neither below nor
        above any sender's and so fence nothing."""
        documents.typed(doc, _FIELD_TYPES, "state.json")
        if "epoch" not in doc:  # drsync always writes it: without it the fencing floor is unknown, not 0
            raise ValueError("state.json has no epoch")
        for name in ("epoch", "primary_epoch", "epoch_seen"):
            if doc.get(name, 0) < 0:
                raise ValueError(f"state.json: {name} is {doc[name]}, below 0")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in doc.items() if k in known}
        read_at = time.time()
        readers: dict[str, Callable[[Any], Any]] = {
            "applied_position": _ints,
            # An entry written before the stored time was recorded counts as stored when it is read: its
            # delay starts again (later, never sooner).
            "pending": lambda v: tuple((_text(p[0]), _finite(p[1]), _ints(p[2]), _finite(p[3]) if len(p) > 3
                                        else read_at) for p in v),
            "change_checkpoints": lambda v: tuple((_text(c[0]), _finite(c[1])) for c in v)}
        for name, read in readers.items():
            if name in fields:
                try:
                    fields[name] = read(fields[name])
                except (TypeError, ValueError, IndexError, KeyError) as e:
                    raise ValueError(f"state.json: {name} is not what drsync writes ({e})") from None
        if "last_gc_at" in fields:  # anything but a number (a hand edit): never collected, so collect now
            v = fields["last_gc_at"]
            fields["last_gc_at"] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0.0
        return cls(**fields)

    def lag_s(self, now: float | None = None) -> float | None:
        """The lag of this record (None before its first apply), on the primary's clock with the recorded
        offset: what a running standby reports and what the command line reads from state.json."""
        if not self.applied_snapshot:
            return None
        return clock.lag_s(self.applied_captured_at, self.clock_offset_s, now)

    def received_lag_s(self, now: float | None = None) -> float | None:
        """Like :meth:`lag_s` for the newest snapshot stored (applied or waiting for apply_delay): how much
        work a promotion that applies everything received first would lose."""
        newest = max(self.received_captured_at, self.applied_captured_at)
        return clock.lag_s(newest, self.clock_offset_s, now) if newest else None

    def primary_now(self, now: float | None = None) -> float:
        """Now on the primary's clock (this machine's clock plus the estimated offset)."""
        return (time.time() if now is None else now) + self.clock_offset_s


def state_dir_of(cfg: Config) -> str:
    """The agent's state directory: ``agent.state_dir``, else ``<repository>/agent``. UsageError when that
    would be inside a backup directory, which drsync never changes (:data:`drsync.repository.format.
    BACKUP_META`)."""
    if cfg.agent.state_dir:
        return cfg.agent.state_dir
    repo = engine.local_path(cfg.cluster.repository, "repository")
    if os.path.lexists(os.path.join(repo, fmt.BACKUP_META)):
        raise UsageError(f"repository {cfg.cluster.repository} is a backup (it holds {fmt.BACKUP_META}), which drsync "
                         f"keeps exactly as written: an agent, its drills and status keep their state beside a "
                         f"repository they write; point [cluster] repository at one (drsync init --config), or "
                         f"restore the backup with 'drsync backup restore'; nothing was changed")
    return os.path.join(repo, "agent")


# The type of each field of state.json (documents.typed); last_gc_at is read leniently (from_doc).
_FIELD_TYPES: dict[str, type] = {
    "epoch": int, "epoch_holder": str, "applied_snapshot": str, "applied_captured_at": float, "applied_at": float,
    "last_role": str,
    "primary_epoch": int, "applied_position": list, "clock_offset_s": float, "clock_source": str,
    "epoch_seen": int, "epoch_seen_at": float, "demoted": bool, "agent_id": str, "agent_name": str,
    "guard_baseline": str, "received_snapshot": str, "received_captured_at": float, "pending": list,
    "change_checkpoints": list}


def _ints(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{v!r} is not a list of integers")
    return tuple(v)


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    return float(v)


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a string")
    return v


class StateStore:
    """The durable :class:`AgentState` of one state directory; every change goes through one lock."""

    NAME = "state.json"

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, self.NAME)
        self.journal = os.path.join(state_dir, "apply.journal")
        self._lock = threading.Lock()
        self._state = self.load()

    def load(self) -> AgentState:
        """Read the record from disk (a missing file is a fresh agent)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return AgentState()
        try:
            return AgentState.from_doc(documents.typed_loads(data, {}, self.NAME))  # from_doc checks the fields
        except ValueError as e:
            raise IntegrityError(f"agent state file {self.path} is damaged ({e}); fix that value by hand or "
                                 f"restore the file from a copy, then start the agent again") from None

    @property
    def current(self) -> AgentState:
        """The record now (immutable: read as many fields of it as needed, they belong together)."""
        return self._state

    def update(self, **changes: Any) -> AgentState:
        """Change some fields at once, durably; returns the new record."""
        return self.transform(lambda s: dataclasses.replace(s, **changes))

    def transform(self, change: Callable[[AgentState], AgentState]) -> AgentState:
        """Replace the record with ``change(current)`` under the store's lock (written only when it differs)."""
        with self._lock:
            new = change(self._state)
            if new != self._state:
                fsutil.atomic_write(self.path, json.dumps(asdict(new)).encode(), durable=True)
                self._state = new
            return self._state


def state_dir_owner_problem(state_dir: str, owner: str, name: str) -> str:
    """One line: a state directory that belongs to another agent (two agents must never share one)."""
    return (f"state directory {state_dir} belongs to agent {owner!r} (its state.json), not {name!r}: give each agent "
            f"its own agent.state_dir; if you renamed this agent, set agent.name back or start from a new state "
            f"directory")
