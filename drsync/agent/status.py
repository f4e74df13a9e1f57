"""What the group and an agent show of themselves: the group view for ``drsync status``, and a
running agent's own status (:class:`AgentStatus`: its status page, /status.json and its lag).

With ZooKeeper roles the group view comes from the group's nodes (so it works while the
primary is down): every agent the group has known, ``up`` or ``down`` with when
it was last seen (rules in :mod:`drsync.agent.presence`); with fixed roles, from
asking this agent and its configured standbys over gRPC.

Lag is read on the primary's clock, never this machine's: with ZooKeeper roles
it is what each standby publishes; with fixed roles it is measured with the
primary's clock offset to this machine from its Hello (NTP-style), or, when the
primary does not answer, what the standby itself reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from drsync import fsutil
from drsync.agent import statuspage
from drsync.agent.activity import LAG_WINDOW_S, Activity
from drsync.agent.clock import lag_s
from drsync.agent.presence import ANSWERS, Presence, ago, judge, now_on, probe
from drsync.agent.topology import feeders
from drsync.config import Config
from drsync.coordination import Member
from drsync.errors import DrsyncError
from drsync.repository.repo import Repository
from drsync.repository.snapshots import iso
from drsync.storage import open_storage
from drsync.transport import StandbyHello
from drsync.transport.grpc import GrpcStandbyLink
from drsync.units import with_iso_times

if TYPE_CHECKING:  # the running agent's parts, as AgentStatus reads them (the command line needs none)
    from drsync.agent.continuous import CaptureSchedule
    from drsync.agent.maintenance import MaintenanceWorker
    from drsync.agent.shipper import Replication
    from drsync.agent.state import StateStore
    from drsync.agent.supervisor import GroupSeen, RoleSupervisor

# How long the health check of an agent whose port accepts connections may take.
PROBE_HEALTH_S = 2.0


def collect_status(cfg: Config, *, timeout_s: float = 5.0) -> dict[str, Any]:
    doc = collect_group_status(cfg) if cfg.agent.role == "auto" else collect_pair_status(cfg, timeout_s=timeout_s)
    doc["replication"] = replication_mode(cfg)
    return doc


def replication_mode(cfg: Config) -> dict[str, Any]:
    """How a primary with this config captures (``replication.mode``), in figures and in words."""
    r = cfg.replication
    doc: dict[str, Any] = {"mode": r.mode, "interval_s": r.interval}
    if r.mode != "continuous":
        return doc | {"summary": f"interval: a capture every {r.interval:g}s"}
    local = fsutil.is_local_location(cfg.cluster.data)
    doc |= {"min_interval_s": r.min_interval, "settle_s": r.settle}
    return doc | {"summary": (f"continuous: a capture {r.settle:g}s after a change of the data root, at most every "
                              f"{r.min_interval:g}s, at least every {r.interval:g}s" if local else
                              f"continuous: a capture every {r.min_interval:g}s (HDFS: polled, no notification)")}


def _last_snapshot(cfg: Config) -> dict[str, Any] | None:
    try:
        snaps = Repository.open(open_storage(cfg.cluster.repository)).list_snapshots()
    except DrsyncError:
        return None
    if not snaps:
        return None
    return {"id": snaps[-1].id, "captured_at": iso(snaps[-1].captured_at), "kind": snaps[-1].kind}


def _maintenance(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The maintenance marker with its time in ISO 8601 (and Unix seconds for scripts)."""
    if not doc:
        return None
    since = doc.get("since")
    return {"agent": doc.get("agent"), "reason": doc.get("reason"), "epoch": doc.get("epoch"),
            "since": iso(float(since)) if isinstance(since, int | float) else None, "since_unix": since}


def collect_group_status(cfg: Config) -> dict[str, Any]:
    """The group as ZooKeeper records it: primary, epoch, and every agent it has known, up or down
    (the rules are in :mod:`drsync.agent.presence`)."""
    from drsync.coordination import open_coordinator

    coord = open_coordinator(cfg)
    coord.start()
    try:
        view = coord.view()
        members = coord.members()
        state = coord.read_state()
        drills = coord.drills(1)
        changes = coord.history(1)
    finally:
        coord.close()
    primary = view.primary
    if primary is not None and primary.agent not in members:  # a claim without records: an older agent
        members[primary.agent] = Member(primary.agent, {"role": "primary", "address": primary.address}, {}, 0.0)
    probes = _probe_all(cfg, members)
    now = now_on(members)
    marker = view.maintenance or {}
    agents = [_agent_row(m, judge(m, now=now, probe=probes.get(name)), probes.get(name), now,
                         maintenance=marker.get("agent") == name) for name, m in members.items()]
    states = {a["name"]: a["state"] for a in agents}
    # Who ships to whom (fan-out and cascades), from the records of the agents that are up.
    fed = feeders(primary.agent if primary is not None else "",
                  {n: m.record for n, m in members.items() if m.record and states.get(n) == "up"})
    for a in agents:
        a["fed_by"] = fed.get(a["name"])
    claim = None
    if primary is not None:
        claim = {"agent": primary.agent, "epoch": primary.epoch, "since": iso(primary.since),
                 "state": states.get(primary.agent)}
    last = dict(changes[0]) if changes else None
    if last is not None:
        last["at"], last["at_unix"] = iso(float(last.get("at") or 0.0)), last.get("at")
        last["operator"] = last.get("by")  # who made the change (a person or an agent), beside "to"
    return {"group": cfg.coordination.group,
            "primary": primary.agent if primary is not None and states.get(primary.agent) == "up" else None,
            "primary_claim": claim, "epoch": view.epoch.epoch, "promoted_by": view.epoch.promoted_by or None,
            # The epoch node's promoted_by (DESIGN's ZooKeeper layout) names the agent the epoch promoted, not
            # a person: promoted_agent says so plainly; who did it is last_change.operator.
            "promoted_agent": view.epoch.promoted_by or None,
            "promoted_at": iso(view.epoch.at) if view.epoch.at else None, "promotion_reason": view.epoch.reason or None,
            "primary_since": iso(primary.since) if primary else None, "agents": agents, "state": state,
            "switchover": view.switchover, "maintenance": _maintenance(view.maintenance),
            "last_change": last, "last_snapshot": _last_snapshot(cfg),
            "last_drill": drills[-1] if drills else None}


def _probe_all(cfg: Config, members: dict[str, Member]) -> dict[str, str]:
    """Probe the address of every registered agent at once (a kill -9 leaves its registration behind)."""
    tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None

    def health(address: str) -> bool:
        link = GrpcStandbyLink(address, tls=tls)
        try:
            return link.health(timeout_s=PROBE_HEALTH_S)
        finally:
            link.close()

    targets = {n: str(m.record.get("address")) for n, m in members.items() if m.record and m.record.get("address")}
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
        futures = {n: pool.submit(probe, a, health) for n, a in targets.items()}
        return {n: f.result() for n, f in futures.items()}


def _agent_row(m: Member, p: Presence, probed: str | None, now: float, *, maintenance: bool) -> dict[str, Any]:
    r = m.record or {}
    doc = {**m.member, **r}
    up = p.state == "up"
    role = r.get("role") if up else None
    # The lag the standby published (on the primary's clock, at most a few seconds old); only a record
    # without one (an older agent) is recomputed here, on this machine's clock.
    lag = r.get("lag_s") if "lag_s" in r else lag_s(float(r.get("applied_captured_at") or 0.0), 0.0, now)
    if not up and doc.get("role") == "standby":
        # A standby that is down: its lag keeps growing from its last known applied snapshot (members/<name>),
        # on this machine's clock (the best left while it publishes nothing).
        lag, role_for_lag = lag_s(float(doc.get("applied_captured_at") or 0.0), 0.0, now), "standby"
    else:
        role_for_lag = role
    seen = p.last_seen or None
    return {
        "name": m.name, "state": p.state, "down_reason": p.why or None, "role": role,
        "last_role": doc.get("role", "unknown"), "maintenance": maintenance, "address": doc.get("address"),
        "epoch": doc.get("epoch"),
        "lag_s": round(float(lag), 3) if lag is not None and role_for_lag == "standby" else None,
        "applied_snapshot": doc.get("applied_snapshot"), "cluster_id": doc.get("cluster_id"),
        "release": doc.get("release"), "host": doc.get("host"),
        "last_seen": iso(seen) if seen else None, "last_seen_unix": round(seen, 3) if seen else None,
        "last_seen_age_s": round(now - seen, 3) if seen else None, "registered": m.record is not None,
        "probe": probed, "reachable": None if probed is None else probed == ANSWERS,
        "heartbeat_age_s": round(now - float(r["heartbeat"]), 3) if r.get("heartbeat") else None,
        "waiting_to_rejoin": r.get("waiting_to_rejoin") if up else None,
        "last_refusal": _refusal(doc.get("last_refusal")), "note": p.note or None,
        "apply_hold": r.get("apply_hold") if up else None, "upstream": doc.get("upstream") or None}


def _refusal(r: Any) -> dict[str, Any] | None:
    """The last shipment a standby refused, its time in ISO 8601 (and Unix seconds)."""
    if not isinstance(r, dict) or not r.get("reason"):
        return None
    at = r.get("at")
    return {"reason": r.get("reason"), "sender": r.get("sender"), "count": r.get("count"),
            "at": iso(float(at)) if isinstance(at, int | float) else None, "at_unix": at}


def refusal_lines(doc: dict[str, Any]) -> list[str]:
    """One line per agent that is up with a problem (its advertised address does not answer) or refuses
    shipments (``drsync status`` prints them under the table)."""
    lines = [f"agent {a['name']} is {a['note']}" for a in doc["agents"] if a.get("note")]
    return lines + [f"agent {a['name']} REFUSES shipments: {r['reason']} (from {r.get('sender') or '?'}, last at "
                    f"{r.get('at') or '?'}, {r.get('count') or 1} times)" for a in doc["agents"]
                    if (r := a.get("last_refusal"))]


def headline(doc: dict[str, Any]) -> str:
    """The first line of ``drsync status``: the primary (or why there is none up), the epoch, the last change."""
    claim = doc.get("primary_claim")
    if doc["primary"]:
        who = f"primary {doc['primary']}"
    elif claim:
        who = (f"primary {claim['agent']} is DOWN (its ZooKeeper session has not expired yet: drsync promote needs "
               f"--force)")
    else:
        named = doc.get("promoted_by")
        who = f"primary (none; epoch {doc['epoch']} names {named}, which is down)" if named else "primary (none)"
    line = f"group {doc['group']}: {who}, epoch {doc['epoch']}"
    last = doc.get("last_change")
    if last and last.get("epoch") == doc["epoch"]:
        return line + f" ({last.get('why')} {last.get('at')} by {last.get('by')})"
    if doc.get("promoted_at"):
        return line + f" (promoted {doc['promoted_at']}: {doc['promotion_reason']})"
    return line


def agent_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Table rows: AGENT, STATE, ROLE, ADDRESS, LAST SEEN, LAG, APPLIED SNAPSHOT."""
    rows = []
    for a in doc["agents"]:
        state = a.get("state") or ("up" if a.get("reachable") else "down")
        if a.get("maintenance"):
            state += " (maintenance)"
        if a.get("last_refusal") and a.get("state") == "up":
            state += " (refusing)"
        role = a.get("role") or (f"was {a['last_role']}" if a.get("last_role") not in (None, "unknown") else "-")
        if a.get("fed_by") and a["fed_by"] != doc.get("primary"):
            role += f" (via {a['fed_by']})"  # a cascade: this standby receives from another standby
        elif a.get("upstream") not in (None, a.get("fed_by")) and a.get("state") == "up" and a.get("role") == "standby":
            role += f" (upstream {a['upstream']} not live: from the primary)"
        age = a.get("last_seen_age_s")
        rows.append([a["name"] or "?", state, role, a["address"] or "-", "-" if age is None else ago(age),
                     "-" if a["lag_s"] is None else f"{a['lag_s']:.1f}s", a["applied_snapshot"] or "-"])
    return rows


def collect_pair_status(cfg: Config, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask every agent of the pair who it is; works while some of them are down."""
    tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
    addresses = [cfg.agent.listen, *[a for a in cfg.replication.standbys if a != cfg.agent.listen]]
    agents: list[dict[str, Any]] = []
    hellos: list[tuple[dict[str, Any], StandbyHello, float]] = []
    for address in addresses:
        link = GrpcStandbyLink(address, tls=tls)
        try:
            h = link.hello("drsync-status", 0, timeout_s=timeout_s)
            agents.append({
                "name": h.agent, "role": h.role, "address": address, "epoch": h.epoch, "lag_s": h.lag_s,
                "applied_snapshot": h.applied_snapshot or None, "applied_at": iso(h.applied_at) if h.applied_at
                else None, "reachable": True, "state": "up", "last_seen": iso(time.time()),
                "last_seen_unix": round(time.time(), 3), "last_seen_age_s": 0.0})
            hellos.append((agents[-1], h, time.time()))
        except DrsyncError as e:
            agents.append({"name": cfg.agent.name if address == cfg.agent.listen else None, "role": "unknown",
                           "address": address, "epoch": None, "lag_s": None, "applied_snapshot": None,
                           "applied_at": None, "reachable": False, "error": str(e), "state": "down",
                           "down_reason": str(e), "last_seen": None, "last_seen_unix": None,
                           "last_seen_age_s": None})
        finally:
            link.close()
    # The primary's clock from its Hello (its clock minus this machine's): the lag of each standby is then
    # measured on it; without the primary, each standby's own figure stands (an older agent that reports
    # none: this machine's clock, the best left).
    offsets = [h.clock_offset_s for _, h, _ in hellos if h.role == "primary"]
    for a, h, at in hellos:
        lag = None
        if h.role == "standby" and h.applied_snapshot:
            lag = (lag_s(h.applied_captured_at, offsets[0], at) if len(offsets) == 1 else
                   h.lag_s if h.lag_s is not None else lag_s(h.applied_captured_at, 0.0, at))
        a["lag_s"] = round(lag, 3) if lag is not None else None
    primaries = [a["name"] for a in agents if a["role"] == "primary"]
    last_snapshot = _last_snapshot(cfg)
    epochs = [a["epoch"] for a in agents if a["epoch"] is not None]
    from drsync.agent.drill import load_reports
    from drsync.agent.state import state_dir_of

    drills = load_reports(state_dir_of(cfg), 1)
    from drsync.agent.hold import HoldFile

    hold = HoldFile(state_dir_of(cfg)).load()  # this config's agent: its hold is in its state directory
    for a in agents:
        a["apply_hold"] = (hold.as_dict() if a["address"] == cfg.agent.listen and (hold.active or hold.flagged)
                           else None)
    return {"group": cfg.coordination.group, "primary": primaries[0] if len(primaries) == 1 else None,
            "epoch": max(epochs) if epochs else None, "agents": agents, "last_snapshot": last_snapshot,
            "last_drill": drills[-1] if drills else None}


def local_points(cfg: Config) -> dict[str, Any]:
    """``drsync status --points``: this agent's recovery points, read from its own repository and state
    directory only (no ZooKeeper, no primary): what ``drsync promote --to-snapshot``/``--before`` can pick.

    Returns ``{"agent", "applied_snapshot", "apply_delay_s", "pending", "summary", "points": [...]}``
    (points as :meth:`drsync.agent.pointintime.RecoveryPoint.as_dict`, in the order this standby stored
    them, oldest first; ``stored_at`` is its own clock, ``captured_at`` the primary's word)."""
    from drsync.agent.hold import HoldFile
    from drsync.agent.pointintime import recovery_points
    from drsync.agent.state import StateStore, state_dir_of

    state_dir = state_dir_of(cfg)
    state = StateStore(state_dir).load()
    repo = Repository.open(open_storage(cfg.cluster.repository))
    points = recovery_points(repo.list_snapshots(), state, cluster_id=cfg.cluster.id,
                             held=HoldFile(state_dir).load().snapshot, stored_at=repo.snapshot_stored_times())
    delay = cfg.replication.apply_delay
    summary = (f"agent {cfg.agent.name}: {len(points)} point(s) in time in its repository"
               + (f", stored from {iso(points[0].stored_at or points[0].captured_at)} to "
                  f"{iso(points[-1].stored_at or points[-1].captured_at)}" if points else "")
               + f"; its root holds {state.applied_snapshot or 'nothing applied yet'}"
               + (f"; {len(state.pending)} received snapshot(s) wait for apply_delay" if state.pending else "")
               + ". Promote at one with drsync promote --to-snapshot ID (or --before TIME)")
    return {"agent": cfg.agent.name, "applied_snapshot": state.applied_snapshot or None, "apply_delay_s": delay,
            "pending": len(state.pending), "summary": summary, "points": [p.as_dict() for p in points]}


# --- a running agent's own status ---------------------------------------------------------------------


class AgentStatus:
    """What a running agent shows of itself: the document its status page renders (/, /status) and serves as
    /status.json, the lag it reports (page, metrics) and the recent past (:attr:`activity`).

    Every lag is :func:`drsync.agent.clock.lag_s` on the primary's clock: a standby's from its state record
    (with its clock-offset estimate), a primary's from its shippers' positions, and a standby that vanished
    counts with its last known position. Read from the HTTP and metrics threads; the parts it reads keep
    their own locks."""

    def __init__(self, cfg: Config, *, repo: Repository, store: StateStore, supervisor: RoleSupervisor,
                 replication: Replication, schedule: CaptureSchedule, maintenance: MaintenanceWorker,
                 hold_summary: Callable[[], dict[str, Any] | None], state_dir: str) -> None:
        self.cfg = cfg
        self.name = cfg.agent.name
        self.auto = cfg.agent.role == "auto"
        self.repo, self.store, self.supervisor, self.replication = repo, store, supervisor, replication
        self.schedule, self.maintenance, self.hold_summary, self.state_dir = schedule, maintenance, hold_summary, \
            state_dir
        self.activity = Activity(self.lag)

    # --- lag ------------------------------------------------------------------------------------------

    def lag(self, seen: GroupSeen | None = None) -> float | None:
        """This agent's lag (standby) or its standbys' (primary), always on the primary's clock. A standby
        that vanished (killed, stopped, cut off) counts with its last known position until it is back or
        decommissioned: its lag keeps growing. ``seen``: the group as one pass read it (default: the last)."""
        if self.supervisor.acting == "standby":
            return self.store.current.lag_s()
        seen = self.supervisor.seen if seen is None else seen
        lag = lag_s(self.replication.applied_captured_at() or 0.0)  # its own stamps, its own clock
        if lag is None and self.auto:
            # No shipment has reached every standby since this agent started (they fail): the last
            # lag each standby published (on the primary's clock), not "unknown".
            published = [float(r["lag_s"]) for r in seen.agents.values()
                         if r.get("role") == "standby" and r.get("lag_s") is not None]
            lag = max(published) if published else None
        lost = [lag_s(at) for at in self.lost_positions(seen).values()]
        known = [x for x in (lag, *lost) if x is not None]
        return max(known) if known else None

    def received_lag(self) -> float | None:
        """As a standby, :meth:`lag` of the newest snapshot stored (applied or waiting for apply_delay)."""
        return self.store.current.received_lag_s() if self.supervisor.acting != "primary" else None

    def applied_captured_at(self) -> float | None:
        """The capture time of what is applied: this standby's, or as primary the oldest of its standbys'."""
        if self.supervisor.acting == "standby":
            return self.store.current.applied_captured_at or None
        lost = self.lost_positions(self.supervisor.seen).values()
        known = [t for t in (self.replication.applied_captured_at(), *lost) if t]
        return min(known) if known else None

    def lost_positions(self, seen: GroupSeen) -> dict[str, float]:
        """As primary: the capture time last known applied on each standby that vanished (name -> time on
        this primary's clock): the newer of its persistent member record and this primary's last shipment."""
        out: dict[str, float] = {}
        for name, m in seen.lost_standbys.items():
            last = self.replication.last_positions.get(str(m.get("address") or ""))
            at = max(float(m.get("applied_captured_at") or 0.0), last.captured_at if last else 0.0)
            if at:
                out[name] = at
        return out

    # --- the document ------------------------------------------------------------------------------

    def _agents(self, seen: GroupSeen) -> tuple[list[dict[str, Any]], str | None, int, str]:
        """The agents table, the primary, the epoch and ZooKeeper's state, from one pass's ``seen``."""
        sup, st, acting = self.supervisor, self.store.current, self.supervisor.acting
        view = seen.view
        if not self.auto:
            agents = [{"name": self.name, "role": acting, "address": sup.address, "epoch": st.epoch,
                       "applied_snapshot": st.applied_snapshot or None,
                       "lag_s": st.lag_s() if acting == "standby" else None}]
            positions = self.replication.positions() if acting == "primary" else {}
            for t in self.cfg.replication.standbys if acting == "primary" else ():
                p = positions.get(t)
                agents.append({"name": t, "role": "standby", "address": t, "epoch": None,
                               "applied_snapshot": p.snapshot if p and p.snapshot else None,
                               "lag_s": lag_s(p.captured_at) if p and p.snapshot else None})
            return agents, self.name if acting == "primary" else None, st.epoch, "not used (fixed roles)"
        agents = []
        fed = feeders(view.primary.agent if view is not None and view.primary is not None else "", seen.agents)
        for name, r in sorted(seen.agents.items()):
            # The lag each standby publishes (primary's clock), never recomputed with this clock.
            lag = st.lag_s() if name == self.name else r.get("lag_s")
            agents.append({"name": name, "state": "up", "role": r.get("role"), "address": r.get("address"),
                           "epoch": r.get("epoch"), "applied_snapshot": r.get("applied_snapshot"),
                           "lag_s": round(float(lag), 3) if lag is not None and r.get("role") == "standby"
                           else None, "last_refusal": r.get("last_refusal"), "upstream": r.get("upstream"),
                           "fed_by": fed.get(name)})
        positions = self.lost_positions(seen)
        for name, m in sorted(seen.lost_standbys.items()):  # it stays listed, down, its lag growing
            lag = lag_s(positions.get(name, 0.0))
            agents.append({"name": name, "state": "down", "role": "standby (down)", "address": m.get("address"),
                           "epoch": m.get("epoch"), "applied_snapshot": m.get("applied_snapshot"),
                           "lag_s": round(lag, 3) if lag is not None else None,
                           "gone_at": m.get("gone_at")})
        primary = view.primary.agent if view is not None and view.primary is not None else None
        epoch = view.epoch.epoch if view is not None else st.epoch
        zk = sup.coord.state.value if sup.coord is not None else "closed"
        return agents, primary, epoch, zk

    def doc(self) -> dict[str, Any]:
        """The status document (times in Unix seconds; :meth:`page_json` adds ISO 8601)."""
        seen = self.supervisor.seen  # read once: the table, the primary, the epoch and the lag of one pass
        agents, primary, epoch, zk = self._agents(seen)
        try:
            snaps = self.repo.list_snapshots()[-5:]
        except DrsyncError:
            snaps = []
        drills = [{k: r.get(k) for k in ("agent", "number", "started_at", "passed", "rpo_s", "rto_s", "snapshot")} |
                  {"steps": [{"name": s.get("name"), "passed": s.get("passed"), "detail": s.get("detail")}
                             for s in r.get("steps", [])]} for r in self.drill_reports(10)]
        return {"group": self.cfg.coordination.group, "agent": self.name,
                "role": self.supervisor.shown_role() + (" (paused)" if self.supervisor.paused else ""), "epoch": epoch,
                "primary": primary, "zookeeper": zk, "agents": agents, "lag_s": self.lag(seen),
                "lag_history": self.activity.lag_history(), "lag_window_s": LAG_WINDOW_S,
                "snapshots": [{"id": s.id, "kind": s.kind, "captured_at": s.captured_at, "files": s.files,
                               "bytes": s.bytes} for s in reversed(snaps)],
                "cycles": self.activity.recent(), "drills": drills, "apply_hold": self.hold_summary(),
                "replication": self.schedule.describe(),
                "maintenance": self.maintenance.busy or None,
                "bandwidth": self.replication.bandwidth_status() or None}  # per target: rate now, paused until

    def drill_reports(self, limit: int) -> list[dict[str, Any]]:
        """The group's drills (ZooKeeper keeps every standby's), so that every agent's page shows them;
        this agent's own reports with fixed roles or while ZooKeeper cannot be read."""
        coord = self.supervisor.coord
        if coord is not None:
            try:
                return sorted(coord.drills(limit), key=lambda r: float(r.get("started_at") or 0.0))
            except DrsyncError:
                pass
        from drsync.agent.drill import load_reports

        return load_reports(self.state_dir, limit)

    def page_html(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", statuspage.render(self.doc()).encode()

    def page_json(self) -> tuple[str, bytes]:
        doc = self.doc()
        # The one time format: each lag sample an object with its time in ISO 8601 (and at_unix).
        doc["lag_history"] = [{"at": t, "lag_s": v} for t, v in doc["lag_history"]]
        return "application/json", json.dumps(with_iso_times(doc), default=str).encode()
