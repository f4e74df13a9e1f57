"""Coordination: who is primary, the fencing epoch, and the group's shared records.

One small interface, :class:`Coordinator`, with ZooKeeper behind it
(``drsync.coordination.zookeeper``, the only module that imports kazoo). The
agent layer decides what to do from the plain records defined here; the rules
that turn a :class:`GroupView` into a role live in :mod:`drsync.agent.roles`.

The contract (DESIGN.md, "ZooKeeper layout"), under ``/drsync/<group>``:

- ``epoch`` (persistent): ``epoch``, ``promoted_by``, ``at`` (and ``reason``, and ``agent_id``).
  It changes only by a versioned compare-and-set, and ``promoted_by`` names the
  one agent allowed to hold ``primary`` at that epoch; ``agent_id`` (absent in records of an
  older drsync) is that agent's persistent identity, so that another process under the same
  name (a copied config with a fresh state directory) can never claim it.
- ``primary`` (ephemeral): ``agent``, ``address``, ``epoch``, ``since``. Taken
  only in a transaction that checks the ``epoch`` node's version, so a claim can
  never survive a promotion that happened in between.
- ``agents/<name>`` (ephemeral): each running agent's role, address, cluster,
  release, applied snapshot and lag. It lives exactly as long as the agent's session.
- ``members/<name>`` (persistent): every agent the group has known, written with each
  registration and refreshed by the agent's heartbeat (``address``, ``role``, ``last_seen``,
  ``refresh_s``...; ``left_at`` and ``left_reason`` once it stopped cleanly). Its ZooKeeper
  modification time is when the agent was last seen. Its ``agent_id`` owns the name: an agent
  with another id is refused under that name, live or not, until an operator replaces the
  identity (``drsync replace-identity``) or decommissions the name (deletes the record).
- ``state`` (persistent): the last snapshot a standby applied.
- ``maintenance`` (persistent): present while the primary's agent is stopped on purpose
  (``agent``, ``since``, ``reason``); no automatic promotion happens while it exists.
- ``switchover`` (persistent, transient): a planned hand-over being carried out.
- ``drills/<seq>`` (persistent sequential): drill reports.
- ``history/change-<seq>`` (persistent sequential): every change of primary (``epoch``, ``from``, ``to``,
  ``at``, ``why``, ``by``, ``detail``), created in the same transaction as the epoch change or
  claim it records; the newest :data:`HISTORY_KEEP` are kept.
- ``rehearsal`` (persistent): written by drills' dry-run promotions, never read for decisions.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from drsync.errors import OperationFailed, RefusedError
from drsync.units import iso_time

if TYPE_CHECKING:
    from drsync.config import Config


class SessionState(enum.Enum):
    CONNECTED = "connected"
    SUSPENDED = "suspended"  # connection lost; the session (and its ephemeral nodes) may still be alive
    LOST = "lost"  # the session expired: every ephemeral node of this agent is gone


@dataclass(frozen=True)
class Epoch:
    epoch: int = 0
    promoted_by: str = ""
    at: float = 0.0
    reason: str = ""
    version: int = -1  # the node's version for compare-and-set; -1 while the node does not exist
    # The promoted agent's persistent identity (its state directory's agent id); "" in a record of an
    # older drsync, where the name alone decides.
    agent_id: str = ""

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"epoch": self.epoch, "promoted_by": self.promoted_by, "at": self.at,
                               "reason": self.reason}
        if self.agent_id:
            doc["agent_id"] = self.agent_id
        return doc

    def names(self, agent: str, agent_id: str) -> bool:
        """Whether this epoch names the agent ``agent`` with identity ``agent_id`` (by name alone in a
        record that holds no id)."""
        return self.epoch > 0 and self.promoted_by == agent and (not self.agent_id or self.agent_id == agent_id)


@dataclass(frozen=True)
class PrimaryClaim:
    agent: str
    address: str
    epoch: int
    since: float
    mine: bool = False  # held by this coordinator's own session

    def doc(self) -> dict[str, Any]:
        return {"agent": self.agent, "address": self.address, "epoch": self.epoch, "since": self.since}


@dataclass(frozen=True)
class GroupView:
    """One consistent-enough read of the group: what role decisions are made from."""

    session: SessionState
    epoch: Epoch
    primary: PrimaryClaim | None
    switchover: dict[str, Any] | None = None
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    maintenance: dict[str, Any] | None = None  # the primary's agent is stopped on purpose


# Changes of primary kept in ``history/``.
HISTORY_KEEP = 100
# What of an agent's registration its persistent ``members/<name>`` record keeps.
# (A standby's last applied snapshot stays known after its session ends: status lists it, and the
# primary's lag keeps counting from it.)
MEMBER_FIELDS = ("address", "role", "cluster_id", "release", "epoch", "agent_id", "pid", "host", "refresh_s",
                 "applied_snapshot", "applied_captured_at", "last_refusal")


@dataclass(frozen=True)
class Member:
    """One agent the group has known: its persistent ``members/<name>`` record and, while its
    ZooKeeper session lives, its ephemeral ``agents/<name>`` registration."""

    name: str
    record: dict[str, Any] | None  # agents/<name>; None when no session of it is alive
    member: dict[str, Any]  # members/<name>; {} for an agent that never wrote one (an older drsync)
    refreshed_at: float  # ZooKeeper's time of the last refresh (members/<name>, else agents/<name>); 0 unknown


class CoordinationUnavailable(OperationFailed):
    """ZooKeeper cannot be reached (or has no quorum) right now."""


class EpochConflict(RefusedError):
    """The epoch changed between reading and writing it: somebody else promoted meanwhile."""


class PrimaryTaken(RefusedError):
    """Another agent holds the primary node."""


class DuplicateAgent(OperationFailed):
    """This agent's name belongs to another agent of the group (another agent id, live or not), or
    another live process runs with this agent's identity (a copied state directory)."""

    exit_code = 2  # a configuration mistake: two configs with one agent.name


def _process_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists (another user's)
    except (TypeError, ValueError, OverflowError, OSError):
        return False
    return True


def identity_problem(name: str, group: str, agent_id: str, live: dict[str, Any] | None,
                     member: dict[str, Any] | None) -> str:
    """Why an agent with identity ``agent_id`` may not register as ``name`` ("" when it may), from the live
    registration ``live`` (agents/<name>, None when no session holds it) and the persistent ``members/<name>``.

    The name belongs to the agent id its members record holds (a record of an older drsync without one
    belongs to nobody); a live registration of another id is another agent, and one of the same id held by
    a live process elsewhere is a second process with this agent's identity (a copied state directory)."""
    mine = agent_id or "not made yet (its state directory was never used by an agent)"
    replace = (f"give this agent its own agent.name; if this host really replaces {name} for good "
               f"(reinstalled, state directory lost), stop the old agent and run drsync replace-identity once with "
               f"this config")
    if live is not None and live.get("agent_id") and live.get("agent_id") != agent_id:
        return (f"another agent is already registered as {name!r} in group {group} (address {live.get('address')}, "
                f"host {live.get('host')}, pid {live.get('pid')}, agent id {live.get('agent_id')}; this agent's id "
                f"is {mine}): agent names must be unique in a group; {replace}")
    owner = str((member or {}).get("agent_id") or "")
    if owner and owner != agent_id:
        seen = (member or {}).get("last_seen")
        when = iso_time(float(seen)) if isinstance(seen, int | float) else "at an unknown time"
        return (f"agent name {name!r} in group {group} belongs to another agent (agent id {owner}, last seen "
                f"{when} at {(member or {}).get('address')} on host {(member or {}).get('host')}; this agent's id is "
                f"{mine}): agent names must be unique in a group; {replace}")
    if live is not None and live.get("agent_id") == agent_id and agent_id:
        host, pid = live.get("host"), live.get("pid")
        same_host = host == socket.gethostname()
        if not same_host or (pid != os.getpid() and _process_alive(pid)):
            return (f"another process runs with agent {name!r}'s identity (agent id {agent_id}) in group {group}: "
                    f"host {host}, pid {pid}, address {live.get('address')}: a copied state directory? each agent "
                    f"needs its own state directory and agent.name; if that process was this agent and is gone, "
                    f"start again once its ZooKeeper session has expired")
    return ""


class Coordinator(Protocol):
    """Everything the agent and the command line need from ZooKeeper."""

    group: str

    @property
    def state(self) -> SessionState: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def add_listener(self, callback: Callable[[SessionState], None]) -> None:
        """Called (from another thread, must not block) on every session state change."""

    def on_change(self, callback: Callable[[], None]) -> None:
        """Called (from another thread, must not block) when ``epoch``, ``primary``, ``switchover`` or
        ``maintenance`` change."""

    def read_epoch(self) -> Epoch: ...

    def read_primary(self) -> PrimaryClaim | None: ...

    def view(self) -> GroupView:
        """Epoch, primary, pending switchover and maintenance marker, read fresh from the server."""

    def promote(self, expected: Epoch, agent: str, reason: str, history: dict[str, Any] | None = None,
                agent_id: str = "") -> Epoch:
        """Compare-and-set the epoch to ``expected.epoch + 1`` naming ``agent`` (with its persistent
        ``agent_id``: only that identity may claim it); EpochConflict if it moved.

        ``history`` (``from``, ``why``, ``by``, ``detail``...) becomes a ``history/change-<seq>`` entry, with
        ``epoch``, ``to`` and ``at`` filled in, in the same transaction as the epoch change."""

    def claim_primary(self, epoch: Epoch, agent: str, address: str,
                      history: dict[str, Any] | None = None, agent_id: str = "") -> PrimaryClaim:
        """Take ``primary`` at ``epoch`` if the epoch node is still at ``epoch.version`` (removing a stale
        claim of a lower epoch in the same transaction). EpochConflict or PrimaryTaken otherwise; PrimaryTaken
        too when ``epoch`` records another agent id than ``agent_id``. With ``history`` (a claim taken back at
        the same epoch) the entry is written in the same transaction."""

    def release_primary(self, agent: str) -> None:
        """Delete ``primary`` if this session holds it."""

    def hand_over(self, expected: Epoch, from_agent: str, to_agent: str,
                  history: dict[str, Any] | None = None, to_agent_id: str = "") -> Epoch:
        """Switchover: in one transaction bump the epoch naming ``to_agent`` (identity ``to_agent_id``), drop
        our primary claim (and write the ``history`` entry).

        ``expected`` is the epoch as read when the claim was taken (its version): if anything promoted
        since, or this session no longer holds ``primary``, nothing changes (EpochConflict)."""

    def take_fencing(self, agent: str, epoch: int) -> str:
        """Take the ephemeral ``fencing`` node (``agent``, ``epoch``, ``since``) before running fence_command
        to promote over the primary of ``epoch``, so that one agent of the group fences at a time (Hadoop
        ZKFC's order: the lock first, then the fence). Returns "" when this session holds it (now or
        already), else the name of the agent that does. It ends with the holder's session, or
        :meth:`release_fencing`. One no session owns (made by hand), one without drsync's record, or one
        left for an earlier epoch is removed (logged at WARNING)."""

    def fencing_holder(self, epoch: int) -> str:
        """The agent whose fencing node (:meth:`take_fencing`) another promotion at ``epoch`` must wait for, or
        "" (none, this session's, or one :meth:`take_fencing` would take over). Reads only."""

    def release_fencing(self) -> None:
        """Delete the ``fencing`` node if this session holds it."""

    def set_maintenance(self, doc: dict[str, Any]) -> None:
        """Create or replace the ``maintenance`` marker (``agent``, ``since``, ``reason``)."""

    def clear_maintenance(self, agent: str | None = None) -> None:
        """Remove the ``maintenance`` marker (only ``agent``'s when given)."""

    def read_maintenance(self) -> dict[str, Any] | None: ...

    def register(self, name: str, record: dict[str, Any]) -> None:
        """Create or update this agent's ephemeral ``agents/<name>`` record. ``record["agent_id"]`` is the
        agent's persistent identity: a ``members/<name>`` record or a live registration of the name with
        another id is another agent (DuplicateAgent), and so is a live registration with the same id held by
        another live process (a copied state directory); one with the same id whose process is gone is
        this agent's previous session and is replaced."""

    def replace_identity(self, name: str, agent_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        """An operator's step (``drsync replace-identity``): ``agent_id`` owns the name ``name`` from now on.
        In one transaction: ``members/<name>`` records the new id (and the one it replaced), the epoch, when
        it names ``name``, records the new id too, and ``entry`` becomes a ``history`` entry. RefusedError
        while a registration of the name is live. Returns the member record as it was before."""

    def agents(self) -> dict[str, dict[str, Any]]: ...

    def touch_member(self, name: str) -> bool:
        """The heartbeat: refresh ``members/<name>`` (``last_seen``) while this session holds ``agents/<name>``;
        False when it does not (nothing written)."""

    def deregister(self, name: str, agent_id: str, reason: str) -> None:
        """A clean stop: remove this session's ``agents/<name>`` and record ``left_at``/``left_reason`` in
        ``members/<name>`` (only when that record is ``agent_id``'s)."""

    def members(self) -> dict[str, Member]:
        """Every agent the group has known (``members/``), and every registered one (``agents/``)."""

    def history(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` changes of primary, newest first, each with its ``seq``."""

    def write_state(self, doc: dict[str, Any]) -> None: ...

    def read_state(self) -> dict[str, Any] | None: ...

    def request_switchover(self, doc: dict[str, Any]) -> None:
        """Create the ``switchover`` node; OperationFailed if one is already pending."""

    def update_switchover(self, doc: dict[str, Any] | None) -> None:
        """Rewrite the pending switchover (progress, result), or remove it (None)."""

    def read_switchover(self) -> dict[str, Any] | None: ...

    def add_drill(self, report: dict[str, Any], keep: int) -> str: ...

    def rehearse_promotion(self, agent: str) -> None:
        """Everything a promotion does but taking over: a versioned compare-and-set on a rehearsal node."""

    def drills(self, limit: int) -> list[dict[str, Any]]: ...


def open_coordinator(cfg: Config, *, connect_timeout_s: float | None = None) -> Coordinator:
    """The Coordinator of ``cfg``'s group ([coordination]): ZooKeeper, not yet started."""
    from drsync.coordination.zookeeper import from_config

    c = cfg.coordination
    return from_config(c.zookeeper, c.group, session_timeout_s=c.session_timeout, username=c.username,
                       password=c.password, connect_timeout_s=connect_timeout_s)
