"""The role supervisor: reads the group, decides with the pure rules, and carries the decision out.

:meth:`RoleSupervisor.coordinate` is one pass over one view of the group (ZooKeeper):
decide with :func:`drsync.agent.roles.decide_role`, then take the primary node,
pause, step down, promote this agent under automatic failover (fence first), or
serve as a standby (an ex-primary only once its writers are confirmed stopped:
safety rule 7). It also keeps this agent's record in the group current. The
supervisor owns what the agent *acts as* (:attr:`acting`, :attr:`paused`); the
shippers ask :meth:`guard` before every upload and commit. Only the agent's loop
thread calls :meth:`coordinate`; ZooKeeper's thread only reports session changes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from drsync import engine, faults
from drsync.agent.fencing import (
    clear_rejoin_approval,
    demote_env,
    fence_env,
    fencing_lost,
    rejoin_approved,
    run_command,
)
from drsync.agent.presence import ANSWERS, REFRESH_S, Heartbeat, probe
from drsync.agent.roles import (
    RANK_DELAY_S,
    FailoverPolicy,
    RoleDecision,
    candidate_rank,
    claimant_live,
    decide_role,
    fencing_ahead,
    highest_reported_epoch,
    superseded_reason,
)
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.agent.topology import targets_of
from drsync.config import Config
from drsync.coordination import (
    CoordinationUnavailable,
    Coordinator,
    DuplicateAgent,
    Epoch,
    EpochConflict,
    GroupView,
    PrimaryTaken,
    SessionState,
)
from drsync.dataroot import open_data_root
from drsync.errors import DrsyncError, FencedError, LockedError
from drsync.metrics import AgentMetrics
from drsync.repository.manifest_diff import diff
from drsync.repository.repo import Repository

log = logging.getLogger("drsync.agent")

# How often the agent's record in the group is refreshed (watches and changes publish sooner; the
# heartbeat thread refreshes members/<name> at the same interval while the loop is busy).
REGISTER_EVERY_S = REFRESH_S
# Snapshots that keep a former primary's data root before it is overwritten as a standby.
REJOIN_SNAPSHOT_TTL_S = 7 * 86400.0
# Fence and demote commands that fail are retried with this backoff (seconds: first, cap).
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
# A coordination pass that fails (ZooKeeper unreachable, a chroot that does not exist, wrong credentials,
# a registration refused...) is tried again after this delay, doubling up to the cap (seconds).
# How often the agent checks that its own advertised address answers (published as advertise_answers).
ADVERTISE_CHECK_S = 60.0
COORD_RETRY_FIRST_S = 1.0
COORD_RETRY_MAX_S = 30.0


class Backoff:
    """Growing delays after failures (``first`` doubling up to ``cap``), reset by a success; one log line per step."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.delay = first
        self.retry_at = 0.0  # monotonic
        self.failures = 0

    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at

    def failed(self) -> float:
        """Record a failure; the delay until the next try."""
        delay = self.delay
        self.failures += 1
        self.retry_at = time.monotonic() + delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def succeeded(self) -> bool:
        """Reset; True when there were failures before."""
        had = self.failures > 0
        self.delay, self.retry_at, self.failures = self.first, 0.0, 0
        return had


def has_data(root: str) -> bool:
    """Whether a data root holds anything besides drsync's own files (an empty one is never promoted
    over production by mistake)."""
    try:
        return open_data_root(root).has_data()
    except (OSError, DrsyncError):
        return False


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class GroupSeen:
    """What one coordination pass read of the group, published whole: the view (epoch, primary claim),
    the live agents' records, the standbys this agent ships to (address -> name) and, as primary, the
    standbys gone from the group (name -> last member record + ``gone_at``). The supervisor replaces it
    with one assignment per pass; a reader on another thread (the status page, the metrics) takes
    :attr:`RoleSupervisor.seen` once and reads every part from it, never parts of two passes. Nothing in
    it changes once published (the mappings are read-only)."""

    view: GroupView | None = None
    agents: Mapping[str, dict[str, Any]] = field(default_factory=lambda: _frozen({}))
    feeding: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    lost_standbys: Mapping[str, dict[str, Any]] = field(default_factory=lambda: _frozen({}))

    @classmethod
    def of(cls, view: GroupView | None, agents: Mapping[str, dict[str, Any]], feeding: Mapping[str, str],
           lost_standbys: Mapping[str, dict[str, Any]]) -> GroupSeen:
        return cls(view, _frozen(agents), _frozen(feeding), _frozen(lost_standbys))


class RoleSupervisor:
    def __init__(self, cfg: Config, *, repo: Repository, store: StateStore, receiver: StandbyReceiver | None,
                 coord: Coordinator | None, data_root: str, state_dir: str, metrics: AgentMetrics,
                 wake: Callable[[], None], hold_summary: Callable[[], dict[str, Any] | None]) -> None:
        self.cfg = cfg
        self.name = cfg.agent.name
        self.address = cfg.agent.advertise or cfg.agent.listen
        self.repo = repo
        self.store = store
        self.receiver = receiver
        self.coord = coord
        self.data_root = data_root
        self.state_dir = state_dir
        self.metrics = metrics
        self.wake = wake
        self.hold_summary = hold_summary
        self.policy = FailoverPolicy(cfg.coordination.failover == "automatic", cfg.coordination.max_lag_on_failover,
                                     cfg.coordination.failover_grace, cfg.coordination.failover_cooldown)
        # What this agent does right now: "primary" or "standby". With ZooKeeper it starts as a
        # standby that refuses shipments until it has heard from the group.
        self.acting = "primary" if cfg.agent.role == "primary" else "standby"
        self.paused = False
        self.fatal: DrsyncError | None = None  # set when the agent must stop
        self.cycle_now = threading.Event()  # set when the primary should capture and ship at once
        self.last_decision: RoleDecision | None = None
        # The group as the last pass read it (GroupSeen: one object, replaced whole). Its feeding: the standbys
        # this agent ships to, as primary those it feeds, as a standby those that follow it
        # (replication.upstream); drsync.agent.topology decides. Its lost_standbys, as primary: standbys the
        # group has known (members/<name>, last role standby) that have no live registration now (killed,
        # stopped or cut off); their last position keeps counting in the lag until they are back or
        # decommissioned (members/<name> deleted).
        self.seen = GroupSeen()
        self._primary_absent_since: float | None = None
        self._registered: tuple[Any, ...] = ()
        self._registered_at = 0.0
        self._state_written = ""
        self._started = False
        # Fencing and rejoining (safety rule 7).
        self.claim: Epoch | None = None  # the epoch (with its node version) the primary claim was taken at
        self._suspended_since: float | None = None  # monotonic; while a primary's session is not connected
        self._demote_retry_at = 0.0
        self._demote_backoff = RETRY_FIRST_S
        self._fence_retry_at = 0.0
        self._fencing_holder = ""  # another agent holding the group's fencing node, as last seen
        self._fence_backoff = RETRY_FIRST_S
        # This agent's automatic takeover as its record tells the others ({"state": "fencing" or
        # "fence-failed", "epoch": N}; None when it is not taking over), and since when (own monotonic
        # clock) it has seen a better-placed standby fencing: ``(name, since)``.
        self._takeover: dict[str, Any] | None = None
        self._ahead_fencing: tuple[str, float] = ("", 0.0)
        self._last_primary: dict[str, Any] = {}  # the last primary claim seen (whom a fence command fences)
        self.switchover_final = ""  # the final snapshot of a switchover this agent handed over with
        self.switchover_hooked = False  # ... and whether its switchover_hook ran (stopping the writers)
        self.holding_ex_primary = ""  # why this ex-primary does not rejoin as standby yet ("" = it may)
        self.on_switchover: Callable[[GroupView], None] = lambda view: None
        self.heartbeat = Heartbeat(coord, self.name) if coord is not None else None
        self._claimed = False  # this process has held the primary claim (a claim again is after a lost session)
        self.coord_backoff = Backoff(COORD_RETRY_FIRST_S, COORD_RETRY_MAX_S)
        # Before-rejoin snapshots equal to a switchover's final one: deleted once the repository is free.
        self._redundant: dict[str, bool] = {}  # snapshot id -> its wait for the repository was logged
        self._live_standbys: frozenset[str] = frozenset()
        self._members_read_at = 0.0
        self._advertise_ok: bool | None = None  # does this agent's advertised address answer (None: not checked)
        self._advertise_checked_at = -ADVERTISE_CHECK_S
        if coord is not None:
            coord.add_listener(self._on_session)

    # --- what other parts ask -----------------------------------------------------------

    # One part of :attr:`seen` each (a reader that needs two parts takes ``seen`` once instead).
    @property
    def view(self) -> GroupView | None:
        return self.seen.view

    @property
    def agents(self) -> Mapping[str, dict[str, Any]]:
        return self.seen.agents

    @property
    def feeding(self) -> Mapping[str, str]:
        return self.seen.feeding

    @property
    def lost_standbys(self) -> Mapping[str, dict[str, Any]]:
        return self.seen.lost_standbys

    @property
    def acting_primary(self) -> bool:
        return self.acting == "primary" and not self.paused

    def role_word(self) -> str:
        if self.acting == "primary":
            return "paused" if self.paused else "primary"
        # A former primary is "ex-primary" until it has rejoined (its root kept, last_role "standby"), not
        # only while something holds it: at its start and while its demote_command runs it has applied
        # nothing of this epoch, and its record must not read as a caught-up standby meanwhile.
        if self.holding_ex_primary or self.store.current.last_role == "primary":
            return "ex-primary"
        return "standby"

    def shown_role(self) -> str:
        """The role a Hello reports (and shipments are judged by) and the status page shows: "ex-primary" for
        a former primary that has not rejoined (it accepts no shipment, and its applied snapshot predates its
        time as primary), else the role it acts in ("primary" when paused too)."""
        return "ex-primary" if self.role_word() == "ex-primary" else self.acting

    def lag_s(self) -> float | None:
        return self.receiver.lag_s() if self.receiver is not None else None

    def guard(self, final: bool) -> None:
        """Raise FencedError unless this agent may still act as primary (asked during shipping, from the
        shippers' threads). With ``final`` (before a commit) the claim is read fresh from ZooKeeper."""
        if not self.acting_primary:
            raise FencedError(f"agent {self.name} is no longer acting as primary; shipment abandoned")
        coord = self.coord
        if coord is None:
            return
        if coord.state is not SessionState.CONNECTED:
            raise FencedError("the ZooKeeper session is not connected; shipment abandoned until it is confirmed")
        if final:
            epoch = self.store.current.epoch
            try:
                view = coord.view()
            except CoordinationUnavailable as e:
                raise FencedError(f"cannot confirm the primary claim before committing: {e}") from None
            p = view.primary
            if not (p is not None and p.mine and p.agent == self.name and p.epoch == epoch
                    and view.epoch.epoch == epoch):
                self.wake()  # the loop decides what this means (pause, step down)
                raise FencedError(f"the primary claim at epoch {epoch} is gone (group epoch {view.epoch.epoch} names "
                                  f"{view.epoch.promoted_by or 'nobody'}, primary node held by "
                                  f"{p.agent if p else 'nobody'}); not committing")

    def _on_session(self, state: SessionState) -> None:
        # Called from kazoo's thread: record and wake the loop, never block here. The shippers see the
        # session state themselves (guard), so shipping stops at once.
        self.metrics.zookeeper_connected.set(1 if state is SessionState.CONNECTED else 0)
        if state is SessionState.CONNECTED:
            self._suspended_since = None
        elif self._suspended_since is None:
            self._suspended_since = time.monotonic()
        self.wake()

    def read_group_epoch(self) -> tuple[int, str]:
        """The group's epoch and the agent it names, read fresh (CoordinationUnavailable when it cannot be:
        a shipment is then refused, never judged from a cached epoch)."""
        coord = self.coord
        if coord is None:
            raise CoordinationUnavailable("this agent has no ZooKeeper session")
        e = coord.read_epoch()
        return e.epoch, e.promoted_by

    # --- one pass -------------------------------------------------------------------------

    def pass_failed(self, e: DrsyncError, what: str = "coordination pass failed") -> None:
        """A coordination pass failed: one WARNING, and no new pass before the next backoff step."""
        delay = self.coord_backoff.failed()
        log.warning("agent %s: %s: %s (attempt %d; next try in %.0fs)", self.name, what, e,
                    self.coord_backoff.failures, delay)

    def join(self) -> Callable[[], None] | None:
        """Before the agent says it started: join the group and prove that this agent's name is its own.
        DuplicateAgent goes to the caller (the agent must not start). Any other failure is the first step
        of the coordination backoff: returned as the call that logs it (one line), for after the start line."""
        coord = self.coord
        if coord is None or self._started:
            return None
        try:
            coord.start()
        except DrsyncError as e:
            self.metrics.zookeeper_connected.set(0)
            failure = e

            def report() -> None:
                self.pass_failed(failure, "cannot join the group in ZooKeeper")
                self._decide(GroupView(SessionState.LOST, Epoch(), None), reported=True)
            return report
        self._started = True
        coord.on_change(self.wake)
        self.metrics.zookeeper_connected.set(1)
        try:
            self.publish(force=True, probe=False)  # its advertised address is checked by the loop's first pass
        except DuplicateAgent as e:
            self.fatal = e
            raise
        except DrsyncError as e:
            failure = e
            return lambda: self.pass_failed(failure, "cannot register in ZooKeeper yet")
        if self.heartbeat is not None:
            self.heartbeat.start()
        return None

    def coordinate(self) -> RoleDecision | None:
        """Read the group, decide this agent's role, and carry the decision out. After a failed pass the
        next one waits for its backoff step (the caller reports failures it catches with :meth:`pass_failed`)."""
        if self.coord is None:
            return None
        coord = self.coord
        self._check_suspended()
        if not self.coord_backoff.ready():
            return None
        if not self._started:
            try:
                coord.start()
                self._started = True
                coord.on_change(self.wake)
                self.metrics.zookeeper_connected.set(1)
            except CoordinationUnavailable as e:
                self.metrics.zookeeper_connected.set(0)
                self.pass_failed(e, "cannot join the group in ZooKeeper")
                return self._decide(GroupView(SessionState.LOST, Epoch(), None), reported=True)
            except DrsyncError as e:
                self.metrics.zookeeper_connected.set(0)
                self.pass_failed(e, "cannot join the group in ZooKeeper")
                return None
        if not self._registered:
            # Prove this agent's name is its own before deciding anything (two configs with one name).
            try:
                self.publish(force=True)
            except DuplicateAgent as e:
                self.stop_fatally(e)
                return None
            except DrsyncError as e:
                self.pass_failed(e, "cannot register in ZooKeeper yet")
                return None
            if self.heartbeat is not None:
                self.heartbeat.start()
        seen = self.seen
        floor = self.store.current.epoch  # read before the view: an epoch seen after it cannot be above it
        try:
            view = coord.view()
        except CoordinationUnavailable:
            state = coord.state if coord.state is not SessionState.CONNECTED else SessionState.SUSPENDED
            last = seen.view or GroupView(state, Epoch(), None)
            return self._decide(GroupView(state, last.epoch, last.primary if state is SessionState.SUSPENDED
                                          else None))
        now = time.monotonic()
        if view.primary is None:
            self._primary_absent_since = self._primary_absent_since or now
        else:
            self._primary_absent_since = None
            self._fence_backoff, self._fence_retry_at = RETRY_FIRST_S, 0.0  # a new outage starts a new backoff
            self._takeover = None
            self._last_primary = {"agent": view.primary.agent, "address": view.primary.address,
                                  "epoch": view.primary.epoch}
        if self.acting == "standby" and self.receiver is not None:
            self.receiver.observe_epoch(view.epoch.epoch, view.epoch.promoted_by)
        try:
            agents = coord.agents()
        except DrsyncError:
            agents = {}
        feeding: Mapping[str, str] = seen.feeding
        if agents:  # unreadable: keep shipping where it went
            primary = self.name if self.acting == "primary" else view.primary.agent if view.primary else ""
            feeding = targets_of(self.name, primary, agents)
        lost = self._track_standbys(coord, agents, seen.lost_standbys) if self.acting == "primary" else {}
        self.seen = GroupSeen.of(view, agents, feeding, lost)  # the pass's one view, published whole
        if set(feeding) - set(seen.feeding):
            self.cycle_now.set()  # a standby (re)joined: ship to it now, not one interval later
        decision = self._decide(view, agents=agents, floor=floor)
        if self.acting == "primary" and view.switchover and not self.paused:
            self.on_switchover(view)
        try:
            self.publish()
        except DuplicateAgent as e:
            self.stop_fatally(e)
        except DrsyncError as e:
            log.debug("could not publish this agent's record: %s", e)
        if self._redundant:
            self._drop_redundant()
        if self.coord_backoff.succeeded():  # a whole pass went through
            log.info("agent %s: coordination works again (ZooKeeper at %s)", self.name,
                     self.cfg.coordination.zookeeper)
        return decision

    def _track_standbys(self, coord: Coordinator, agents: dict[str, dict[str, Any]],
                        before_lost: Mapping[str, dict[str, Any]]) -> Mapping[str, dict[str, Any]]:
        """As primary: the standbys of the group that have no live registration any more (``before_lost``:
        the last pass's), one WARNING per change (and one line for one that is back). Members are re-read
        when the live standbys change, else every REGISTER_EVERY_S."""
        live = frozenset(n for n, r in agents.items() if r.get("role") == "standby" and n != self.name)
        now = time.monotonic()
        if live == self._live_standbys and now - self._members_read_at < REGISTER_EVERY_S:
            return before_lost
        try:
            members = coord.members()
        except DrsyncError as e:
            log.debug("agent %s: could not read the group's members: %s", self.name, e)
            return before_lost
        self._live_standbys, self._members_read_at = live, now
        lost: dict[str, dict[str, Any]] = {}
        for name, m in members.items():
            if name == self.name or m.record is not None or m.member.get("role") != "standby":
                continue
            before = before_lost.get(name)
            lost[name] = {**m.member, "gone_at": before["gone_at"] if before else time.time()}
        base = f"/drsync/{self.cfg.coordination.group}/members"
        for name in sorted(lost.keys() - before_lost.keys()):
            m = lost[name]
            how = (f"stopped cleanly ({m.get('left_reason') or 'agent stopped'})" if m.get("left_at") else
                   "its ZooKeeper session ended without a clean stop (killed, crashed or cut off)")
            log.warning("agent %s: standby %s at %s is gone: %s; its last applied snapshot is %s. Replication lag "
                        "keeps counting from it until it is back, or until it is decommissioned (zkCli.sh delete "
                        "%s/%s)", self.name, name, m.get("address") or "?", how, m.get("applied_snapshot") or "none",
                        base, name)
        for name in sorted(before_lost.keys() - lost.keys()):
            back = name in live
            log.log(logging.INFO if back else logging.WARNING, "agent %s: standby %s %s", self.name, name,
                    "is back" if back else "was decommissioned (its members record is gone); its lag no longer "
                                           "counts")
        return lost

    def stop_fatally(self, e: DrsyncError) -> None:
        log.error("agent %s stops: %s", self.name, e)
        if self.acting == "primary":
            self.step_down(str(e))
        self.fatal = e
        self.wake()

    def _epoch_age_s(self, view: GroupView) -> float:
        """How long ago this agent first saw the group's current epoch, on its own clock (persisted;
        an epoch seen for the first time counts as just now, the safe side for the cooldown)."""
        now = time.time()
        if view.session is SessionState.CONNECTED and view.epoch.epoch != self.store.current.epoch_seen:
            self.store.update(epoch_seen=view.epoch.epoch, epoch_seen_at=now)
        st = self.store.current
        return max(0.0, now - st.epoch_seen_at) if st.epoch_seen == view.epoch.epoch else 0.0

    def _decide(self, view: GroupView, *, agents: dict[str, dict[str, Any]] | None = None,
                note: str = "", reported: bool = False, floor: int = 0) -> RoleDecision:
        """``reported``: why the group cannot be read was just logged at WARNING (one line per backoff
        step): a standby decision that follows from it is logged at INFO, not as a second warning."""
        absent = time.monotonic() - self._primary_absent_since if self._primary_absent_since else 0.0
        ahead = self._fencing_ahead(view, agents or {})
        st = self.store.current
        superseded = superseded_reason(last_role=st.last_role, primary_epoch=st.primary_epoch, epoch=view.epoch.epoch)
        decision = decide_role(self.name, view, agent_id=self.store.current.agent_id,
                               acting_primary=self.acting == "primary", policy=self.policy,
                               primary_absent_s=absent,
                               lag_s=self.receiver.failover_lag_s() if self.receiver is not None else None,
                               rank=candidate_rank(self.name, agents or {}), epoch_age_s=self._epoch_age_s(view),
                               claimant_live=claimant_live(self.name, view.epoch, agents or {}),
                               fencing_ahead=ahead,
                               held=self.receiver is not None and self.receiver.committer.hold.active,
                               superseded=superseded, floor=floor,
                               others_floor=highest_reported_epoch(self.name, agents or {}))
        if decision != self.last_decision:
            # Routine confirmations at INFO; anything that keeps the group from working (no session,
            # a refusal, stepping down) at WARNING, so that an operator's filters see it. A routine re-claim
            # (the epoch names this agent, which held the claim at that epoch before a restart) is INFO.
            routine = (decision.action in ("standby", "act-primary") and view.session is SessionState.CONNECTED) or (
                decision.action == "claim" and st.last_role == "primary" and st.primary_epoch == view.epoch.epoch)
            # An ex-primary whose writers are not confirmed stopped is not a standby yet: say so.
            ex = (decision.action == "standby" and self.acting == "standby" and bool(superseded) and not st.demoted
                  and not (self.switchover_final and self.switchover_hooked) and not rejoin_approved(self.state_dir))
            level = logging.INFO if (routine or (reported and decision.action == "standby")) and not ex \
                else logging.WARNING
            text = (f"ex-primary of epoch {st.primary_epoch}, not serving as a standby until its writers are "
                    f"confirmed stopped ({decision.reason})" if ex else str(decision))
            log.log(level, "agent %s: %s%s", self.name, text, f" [{note}]" if note else "")
            self.last_decision = decision
        if decision.action == "act-primary":
            if self.paused:
                self._demotion_to_undo(self.store.current.epoch)
            self.paused = False
            self.metrics.is_primary.set(1)
        elif decision.action == "pause":
            self.paused = True
            self.metrics.is_primary.set(0)  # it does not act as primary while paused
        elif decision.action == "step-down":
            self.step_down(decision.reason, demote="lost" if view.session is SessionState.LOST else "fenced")
        elif decision.action == "claim":
            self._become_primary(view.epoch)
        elif decision.action == "promote-self":
            self._promote_self(view.epoch)
        elif decision.action == "standby" and self.acting == "standby" and view.session is not SessionState.LOST:
            self._serve_as_standby(view)
        return decision

    def _fencing_ahead(self, view: GroupView, agents: dict[str, dict[str, Any]]) -> str:
        """A better-placed standby fencing to take over (:func:`fencing_ahead`), waited for at most its
        fence_timeout and one rank delay more, on this agent's clock: a fencer stuck past its own
        timeout is not waited for."""
        name = fencing_ahead(self.name, view.epoch.epoch, agents) if view.primary is None else ""
        now = time.monotonic()
        if name != self._ahead_fencing[0]:
            self._ahead_fencing = (name, now)
        if name and now - self._ahead_fencing[1] > self.cfg.coordination.fence_timeout + RANK_DELAY_S:
            return ""
        return name

    def _set_takeover(self, state: str | None, epoch: int = 0) -> None:
        """Tell the group (this agent's record, published now) that it is fencing to take over, that its
        fence failed, or neither."""
        self._takeover = {"state": state, "epoch": epoch} if state else None
        try:
            self.publish(force=True)
        except DrsyncError as e:
            log.debug("agent %s: could not publish its takeover state: %s", self.name, e)

    # --- becoming primary --------------------------------------------------------------------

    def _become_primary(self, epoch: Epoch) -> None:
        assert self.coord is not None and self.receiver is not None
        faults.pause("claim")  # tests: the epoch names this agent; it stops before it takes over
        rx = self.receiver
        st = self.store.current
        # The promotion was recorded in the group's history; taking the claim back at the same epoch is too.
        history = ({"from": self.name, "why": "claim after lost session" if self._claimed else "claim after restart",
                    "by": f"agent {self.name} on {socket.gethostname()}",
                    "detail": f"{self.name} took its primary claim at epoch {epoch.epoch} back"}
                   if st.last_role == "primary" and st.epoch == epoch.epoch else None)
        rx.refusal = f"agent {self.name} is taking over as primary at epoch {epoch.epoch}; it accepts no shipments"
        rx.committer.cancel_staging()  # a DistCp copy (hours, maybe) stops; the root stays as applied
        # replication.apply_delay: what was received and not applied yet is applied first (a switchover's
        # final snapshot, an automatic failover's smallest loss); `drsync promote` settled it already
        # (--apply-received, --delayed-state, --to-snapshot), leaving nothing pending.
        if rx.committer.apply_due(everything=True):
            log.warning("agent %s applied the snapshots it had received before taking over", self.name)
        with rx.commit_lock:  # an apply in flight finishes first: a promotion sees a whole snapshot
            rx.refusal = f"agent {self.name} is taking over as primary at epoch {epoch.epoch}; it accepts no shipments"
            rx.observe_epoch(epoch.epoch, epoch.promoted_by)
            if rx.broken:
                log.error("agent %s cannot become primary: %s", self.name, rx.broken)
                return
            rx.recover()
            try:
                self.coord.claim_primary(epoch, self.name, self.address, history, agent_id=st.agent_id)
                rx.release_on_promotion()
                # Shipments of the old primary that never committed (it died mid-shipment) end here:
                # a primary receives none, and their sessions would keep GC out for ever.
                rx.intake.close()
            except (EpochConflict, PrimaryTaken, CoordinationUnavailable) as e:
                log.warning("agent %s: could not take the primary node: %s", self.name, e)
                rx.refusal = ""
                return
            self.claim = epoch
            self._claimed = True
            self.acting = "primary"
            self.paused = False
            self.holding_ex_primary = ""
            if self.store.current.last_role == "primary":
                self._demotion_to_undo(epoch.epoch)
            self.store.update(last_role="primary", demoted=False, primary_epoch=epoch.epoch)
        try:
            # A new primary supersedes any maintenance marker (its own from a restart, or an old primary's).
            self.coord.clear_maintenance()
        except DrsyncError as e:
            log.warning("agent %s: could not remove the maintenance marker: %s", self.name, e)
        self.metrics.is_primary.set(1)
        self.cycle_now.set()  # snapshot (and ship, once a standby registers) right away
        log.warning("agent %s is now PRIMARY at epoch %d", self.name, epoch.epoch)
        self.publish(force=True)
        self.wake()

    def _promote_self(self, epoch: Epoch) -> None:
        """Automatic failover: fence production first (fence_command must succeed), then promote."""
        assert self.coord is not None
        if time.monotonic() < self._fence_retry_at:
            return
        c = self.cfg.coordination
        if c.fencing:
            try:  # one agent of the group fences at a time (the lock first, then the fence, as ZKFC does)
                holder = self.coord.take_fencing(self.name, epoch.epoch)
            except CoordinationUnavailable as e:
                log.warning("agent %s: automatic failover did not happen: %s", self.name, e)
                return
            if holder:
                if self._fencing_holder != holder:
                    log.warning("agent %s: primary %s gone: agent %s is fencing it to take over; this agent waits",
                                self.name, epoch.promoted_by, holder)
                self._fencing_holder = holder
                return
            self._fencing_holder = ""
            try:
                self._fence_and_promote(epoch)
            finally:
                try:
                    self.coord.release_fencing()
                except DrsyncError as e:
                    log.debug("agent %s: could not release the fencing node: %s", self.name, e)
        else:
            self._promote(epoch)

    def _fence_and_promote(self, epoch: Epoch) -> None:
        """Run fence_command against the primary of ``epoch`` (this agent holds the fencing node), then
        promote if the group is still as it was."""
        assert self.coord is not None
        c = self.cfg.coordination
        old = self._last_primary if self._last_primary.get("agent") == epoch.promoted_by else {}
        address = str(old.get("address") or self.agents.get(epoch.promoted_by, {}).get("address") or "")
        log.warning("agent %s: primary %s gone: running fence_command before promoting itself", self.name,
                    epoch.promoted_by)
        self._set_takeover("fencing", epoch.epoch)  # standbys further behind wait for this one
        result = run_command("fence_command", c.fence_command, fence_env(
            group=c.group, agent=self.name, fenced_agent=epoch.promoted_by, fenced_address=address,
            epoch=epoch.epoch, data=self.data_root), c.fence_timeout, abort=fencing_lost(self.coord))
        if not result.ok:
            self._set_takeover("fence-failed", epoch.epoch)
            self._fence_retry_at = time.monotonic() + self._fence_backoff
            log.error("agent %s: automatic failover refused: %s; production's writers may still run, so this "
                      "agent does not promote itself (next try in %.0fs); fix the fence, or fence production "
                      "by hand and run drsync promote", self.name, result.summary(), self._fence_backoff)
            self._fence_backoff = min(self._fence_backoff * 2, RETRY_MAX_S)
            return
        self._fence_backoff = RETRY_FIRST_S
        try:  # the fence took time: promote only if the group is still as it was
            view = self.coord.view()
        except CoordinationUnavailable as e:
            log.warning("agent %s: automatic failover did not happen: %s", self.name, e)
            self._set_takeover(None)
            return
        if view.primary is not None or view.epoch.version != epoch.version or view.maintenance:
            log.warning("agent %s: automatic failover abandoned: the group changed while fencing", self.name)
            self._set_takeover(None)
            return
        self._promote(epoch)

    def _promote(self, epoch: Epoch) -> None:
        """Automatic failover's compare-and-set of the epoch (after the fence, when there is one)."""
        assert self.coord is not None
        c = self.cfg.coordination
        reason = "automatic failover" + (" after fence_command succeeded" if c.fencing else " (fence_command = none)")
        lag = self.lag_s()
        try:
            new = self.coord.promote(epoch, self.name, reason, history={
                "from": epoch.promoted_by or None, "why": "automatic failover", "detail": reason,
                "by": f"agent {self.name} on {socket.gethostname()}", "lag_s": round(lag, 3) if lag is not None
                else None, "snapshot": self.store.current.applied_snapshot or None},
                agent_id=self.store.current.agent_id)
        except (EpochConflict, CoordinationUnavailable) as e:
            log.warning("agent %s: automatic failover did not happen: %s", self.name, e)
            self._set_takeover(None)
            return
        log.warning("agent %s: automatic failover: promoted to epoch %d", self.name, new.epoch)
        self._takeover = None  # its record says primary once it holds the node (published there)
        self._become_primary(new)

    # --- losing the claim --------------------------------------------------------------------

    def _demotion_to_undo(self, epoch: int) -> None:
        """This agent is primary again: a demotion it ran meanwhile is the operator's to undo."""
        if self.store.current.demoted:
            log.warning("agent %s: primary again at epoch %d, but demote_command ran while its claim could "
                        "not be proven: production may be read-only; undo what demote_command did", self.name, epoch)
            self.store.update(demoted=False)

    def _check_suspended(self) -> None:
        """A primary suspended for longer than the session timeout may have lost its claim: demote."""
        since = self._suspended_since
        if self.acting == "primary" and since is not None and \
                time.monotonic() - since > self.cfg.coordination.session_timeout:
            self.paused = True
            self.demote("suspended")

    def demote(self, reason: str) -> bool:
        """Run demote_command once for this loss of the claim (retried with backoff when it fails).
        True when production is confirmed demoted."""
        st = self.store.current
        if st.demoted:
            return True
        command = self.cfg.coordination.demote_command.strip()
        if not command or time.monotonic() < self._demote_retry_at:
            return False
        c = self.cfg.coordination
        log.warning("agent %s: cannot prove its primary claim (%s): running demote_command", self.name, reason)
        result = run_command("demote_command", command, demote_env(
            group=c.group, agent=self.name, epoch=st.epoch, reason=reason, data=self.data_root), c.demote_timeout)
        if not result.ok:
            self._demote_retry_at = time.monotonic() + self._demote_backoff
            self._demote_backoff = min(self._demote_backoff * 2, RETRY_MAX_S)
            log.error("agent %s: %s; production may still be writing; retrying in %.0fs", self.name,
                      result.summary(), self._demote_backoff)
            return False
        self._demote_backoff = RETRY_FIRST_S
        self.store.update(demoted=True)
        return True

    def step_down(self, reason: str, *, demote: str = "") -> None:
        was_primary = self.acting == "primary"
        self.acting = "standby"
        self.paused = False
        self.claim = None
        self.metrics.is_primary.set(0)
        if self.coord is not None:
            try:
                self.coord.release_primary(self.name)
            except DrsyncError:
                pass  # the session is gone or going: the node goes with it
        if was_primary:
            log.warning("agent %s stepped down as primary: %s", self.name, reason)
            if demote:
                self.demote(demote)

    # --- serving as a standby ----------------------------------------------------------------

    def _rejoin_blocker(self) -> str:
        """Why this ex-primary may not overwrite its data root as a standby yet ("" = it may).

        Its writers may still run (safety rule 7) unless demote_command succeeded, an operator ran
        drsync rejoin, or it handed over by switchover (an operator's request, quiescence proven)."""
        st = self.store.current
        if st.last_role != "primary" or st.demoted:
            return ""
        if self.switchover_final and self.switchover_hooked:
            return ""  # the switchover hook stopped production's writers (its job), and quiescence was proven
        if rejoin_approved(self.state_dir):
            return ""
        if self.demote("rejoin"):
            return ""
        how = ("demote_command has not succeeded" if self.cfg.coordination.demote_command.strip() else
               "no demote_command is configured")
        held = st.primary_epoch or st.epoch  # the epoch it held (st.epoch is the newest it has seen since)
        return (f"agent {self.name} was primary at epoch {held} and its production writers are not "
                f"confirmed stopped ({how}): it keeps its data root untouched and does not rejoin as a standby until "
                f"demote_command succeeds or an operator runs drsync rejoin")

    def _serve_as_standby(self, view: GroupView) -> None:
        """Accept shipments; first keep the data root of a former primary as a snapshot."""
        assert self.receiver is not None
        if self.receiver.refusal == "":
            return
        if view.epoch.epoch == 0:
            self.receiver.refusal = f"group {self.coord.group if self.coord else ''} has no primary yet"
            return
        blocker = self._rejoin_blocker()
        if blocker:
            if blocker != self.holding_ex_primary:
                log.warning("%s", blocker)  # it names the agent
            self.holding_ex_primary = blocker
            self.receiver.refusal = blocker
            return
        self.holding_ex_primary = ""
        st = self.store.current
        keep_root = st.last_role == "primary" or (not st.applied_snapshot and has_data(self.data_root))
        if keep_root and not self._keep_root(view):
            return
        self.store.update(last_role="standby", demoted=False)
        clear_rejoin_approval(self.state_dir)
        self.switchover_final = ""
        self.receiver.refusal = ""

    def _keep_root(self, view: GroupView) -> bool:
        """Keep the data root as a before-rejoin snapshot; False when that failed (not rejoining yet)."""
        try:
            info = engine.create_snapshot(self.repo, engine.SnapshotRequest(
                self.cfg.cluster.data, name=f"before-rejoin-epoch-{view.epoch.epoch}",
                reason=(f"data root of {self.name} kept before it rejoined as a standby of "
                        f"{view.primary.agent if view.primary else view.epoch.promoted_by} at epoch "
                        f"{view.epoch.epoch}"),
                ttl_s=REJOIN_SNAPSHOT_TTL_S, kind="manual", exclude_paths=(self.store.dir,), allow_empty=True))
        except DrsyncError as e:
            log.error("agent %s: not rejoining as standby yet: could not keep its data root first: %s", self.name, e)
            return False
        final = self.switchover_final
        unchanged = bool(final) and self._same_content(info.id, final)
        if unchanged:
            # Nothing was written after the switchover's final snapshot: no second copy needed, unless
            # [snapshots] protect keeps every snapshot this young (it stays then, sharing every chunk).
            self._redundant[info.id] = False
            self._drop_redundant()
            log.info("agent %s rejoins as standby after the switchover; nothing changed since its final "
                     "snapshot %s", self.name, final)
            return True
        if final:
            log.warning("agent %s rejoins as standby: its data root changed after the switchover's final "
                        "snapshot %s; the changes are kept in snapshot %s (%s): compare them with drsync "
                        "snapshot diff", self.name, final, info.id, info.name)
        else:
            log.warning("agent %s rejoins as standby; its data root was kept as snapshot %s (%s)", self.name,
                        info.id, info.name)
        # Whatever it applied as a standby before, its root has moved on since: forget it, so that the
        # next shipment is applied in full (never skipped as "same content"); the first shipment may not
        # empty what was kept (deletion guard baseline).
        self.store.update(applied_snapshot="", applied_captured_at=0.0, applied_at=0.0, applied_position=(),
                          guard_baseline=info.id)
        return True

    def _drop_redundant(self) -> None:
        """Delete the before-rejoin snapshots that equal a switchover's final snapshot, without waiting on
        this (the loop) thread: the exclusive lock a deletion takes is tried once, and while the repository
        is in use (a backup, a drill, a GC's mark: hours, maybe) the deletion is tried again on a later pass."""
        for sid, told in list(self._redundant.items()):
            try:
                protection = engine.protection_of(self.repo, self.cfg.snapshots.protect)
                if protection is None or not protection.is_protected(self.repo.find_snapshot(sid), time.time()):
                    engine.delete_snapshots(self.repo, [sid], prune=False, lock_wait_s=0)
                    log.log(logging.INFO if told else logging.DEBUG, "agent %s: deleted snapshot %s (the "
                            "switchover's final snapshot holds the same)", self.name, sid)
            except LockedError as e:
                log.log(logging.DEBUG if told else logging.INFO,
                        "agent %s: snapshot %s is deleted once the repository is free: %s", self.name, sid, e)
                self._redundant[sid] = True
                continue
            except DrsyncError as e:
                log.info("agent %s keeps snapshot %s: %s", self.name, sid, e)
            del self._redundant[sid]

    def _same_content(self, a: str, b: str) -> bool:
        try:
            return not self.changed_paths(a, b)
        except DrsyncError:
            return False

    def changed_paths(self, a: str, b: str) -> list[str]:
        ma = self.repo.open_manifest(self.repo.find_snapshot(a))
        mb = self.repo.open_manifest(self.repo.find_snapshot(b))
        return diff(ma, mb).paths()

    # --- the agent's record in the group -------------------------------------------------------

    def advertise_answers(self) -> bool | None:
        """Whether this agent's advertised address answers its health check (checked every ADVERTISE_CHECK_S;
        a WARNING when that changes to no). drsync status then tells a live agent with a wrong advertise from
        a dead one."""
        now = time.monotonic()
        if now - self._advertise_checked_at < ADVERTISE_CHECK_S:
            return self._advertise_ok
        self._advertise_checked_at = now
        from drsync.transport.grpc import GrpcStandbyLink

        t = self.cfg.tls
        tls = (t.ca, t.cert, t.key) if t.enabled else None

        def health(address: str) -> bool:
            link = GrpcStandbyLink(address, tls=tls)
            try:
                return link.health(timeout_s=2.0)
            finally:
                link.close()

        ok = probe(self.address, health) == ANSWERS
        if not ok and self._advertise_ok is not False:
            log.warning("agent %s: nothing answers on its advertised address %s (agent.listen %s): other agents and "
                        "drsync status cannot reach it; set agent.advertise to an address of this host that reaches "
                        "agent.listen", self.name, self.address, self.cfg.agent.listen)
        self._advertise_ok = ok
        return ok

    def publish(self, force: bool = False, probe: bool = True) -> None:
        """Keep agents/<name> (and, after an apply, the group's state node) current. ``probe=False``: the
        advertised address is not dialled now (the first registration, before the agent's start line)."""
        if self.coord is None or self.coord.state is not SessionState.CONNECTED:
            return
        st = self.store.current
        lag = self.lag_s() if self.acting == "standby" else None
        role = self.role_word()
        refusal = self.receiver.last_refusal if self.receiver is not None else None
        answers = self.advertise_answers() if probe else self._advertise_ok
        key = (role, st.epoch, st.applied_snapshot, (refusal or {}).get("reason"), answers,
               repr(self._takeover))
        now = time.monotonic()
        if force or key != self._registered or now - self._registered_at >= REGISTER_EVERY_S:
            self.coord.register(self.name, {
                "role": role, "address": self.address, "cluster_id": self.cfg.cluster.id,
                "release": self.cfg.cluster.release,
                "epoch": st.epoch, "applied_snapshot": st.applied_snapshot or None,
                "applied_captured_at": st.applied_captured_at or None,
                "applied_position": list(st.applied_position) or None, "clock_offset_s": round(st.clock_offset_s, 3),
                "lag_s": round(lag, 3) if lag is not None else None, "heartbeat": time.time(), "pid": os.getpid(),
                "waiting_to_rejoin": self.holding_ex_primary or None, "agent_id": st.agent_id,
                "apply_hold": self.hold_summary(), "host": socket.gethostname(), "refresh_s": REGISTER_EVERY_S,
                "advertise_answers": answers, "upstream": self.cfg.replication.upstream or None,
                "last_refusal": self.receiver.last_refusal if self.receiver is not None and self.acting == "standby"
                else None, "takeover": self._takeover})
            self._registered, self._registered_at = key, now
        # The group's applied state comes from a standby only: an ex-primary's applied snapshot is the one it
        # applied before it was primary, which says nothing of what the group holds now.
        if role == "standby" and st.applied_snapshot and st.applied_snapshot != self._state_written:
            self.coord.write_state({"snapshot": st.applied_snapshot, "captured_at": st.applied_captured_at,
                                    "applied_at": st.applied_at, "epoch": st.epoch, "agent": self.name})
            self._state_written = st.applied_snapshot

    def leave(self) -> None:
        """The agent stops: as a connected primary, set the maintenance marker first and step down; then
        leave the group's records saying it stopped cleanly."""
        coord = self.coord
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if coord is None or isinstance(self.fatal, DuplicateAgent):
            return  # a refused name: the records under it are another agent's (or its identity's live process)
        if coord.state is not SessionState.CONNECTED:
            self.acting = "standby"  # without a connection the session (and node) simply expires
            return
        if self.acting == "primary":
            self._leave_as_primary(coord)
        try:
            coord.deregister(self.name, self.store.current.agent_id, "agent stopped")
        except DrsyncError as e:
            log.warning("agent %s: could not record its clean stop in ZooKeeper: %s", self.name, e)

    def _leave_as_primary(self, coord: Coordinator) -> None:
        # An agent stop is not a production outage (safety rule 7): mark it first, so that no
        # standby promotes itself when the primary node goes with this session.
        epoch = self.store.current.epoch
        try:
            coord.set_maintenance({"agent": self.name, "since": time.time(), "epoch": epoch,
                                   "reason": "agent stopped"})
            log.warning("agent %s stops as primary of epoch %d: maintenance marker set; no automatic promotion "
                        "until it is back (or an operator promotes)", self.name, epoch)
        except DrsyncError as e:
            log.error("agent %s: could not set the maintenance marker (%s): with automatic failover a standby may "
                      "fence production and take over", self.name, e)
        self.step_down("agent stopping")
