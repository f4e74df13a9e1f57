"""The group view for ``drsync status``.

With ZooKeeper roles it comes from the group's nodes (so it works while the
primary is down); with fixed roles, from asking this agent and its configured
standbys over gRPC.

Lag is read on the primary's clock, never this machine's: with ZooKeeper roles
it is what each standby publishes; with fixed roles it is measured with the
primary's clock offset to this machine from its Hello (NTP-style), or, when the
primary does not answer, what the standby itself reports.
"""

from __future__ import annotations

import time
from typing import Any

from drsync.agent.clock import lag_s
from drsync.config import Config
from drsync.errors import DrsyncError
from drsync.repository.repo import Repository
from drsync.repository.snapshots import iso
from drsync.storage import open_storage
from drsync.transport import StandbyHello
from drsync.transport.grpc import GrpcStandbyLink


def collect_status(cfg: Config, *, timeout_s: float = 5.0) -> dict[str, Any]:
    if cfg.agent.role == "auto":
        return collect_group_status(cfg)
    return collect_pair_status(cfg, timeout_s=timeout_s)


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
    """The group as ZooKeeper records it: primary, epoch, and every running agent's record."""
    from drsync.agent.loop import open_coordinator

    coord = open_coordinator(cfg)
    coord.start()
    try:
        view = coord.view()
        records = coord.agents()
        state = coord.read_state()
        drills = coord.drills(1)
    finally:
        coord.close()
    now = time.time()
    primary = view.primary
    agents = []
    for name, r in records.items():
        role = r.get("role", "unknown")
        # The lag the standby published (on the primary's clock, at most a few seconds old); only a record
        # without one (an older agent) is recomputed here, on this machine's clock.
        lag = r.get("lag_s") if "lag_s" in r else lag_s(float(r.get("applied_captured_at") or 0.0), 0.0, now)
        agents.append({
            "name": name, "role": role, "address": r.get("address"), "epoch": r.get("epoch"),
            "lag_s": round(float(lag), 3) if lag is not None and role == "standby" else None,
            "applied_snapshot": r.get("applied_snapshot"), "cluster_id": r.get("cluster_id"),
            "release": r.get("release"), "heartbeat_age_s": round(now - float(r.get("heartbeat") or now), 3),
            "waiting_to_rejoin": r.get("waiting_to_rejoin"), "apply_hold": r.get("apply_hold"),
            "reachable": True})
    if primary is not None and primary.agent not in records:
        agents.append({"name": primary.agent, "role": "primary", "address": primary.address, "epoch": primary.epoch,
                       "lag_s": None, "applied_snapshot": None, "reachable": True})
    return {"group": cfg.coordination.group, "primary": primary.agent if primary else None,
            "epoch": view.epoch.epoch, "promoted_by": view.epoch.promoted_by or None,
            "promoted_at": iso(view.epoch.at) if view.epoch.at else None, "promotion_reason": view.epoch.reason or None,
            "primary_since": iso(primary.since) if primary else None, "agents": agents, "state": state,
            "switchover": view.switchover, "maintenance": _maintenance(view.maintenance),
            "last_snapshot": _last_snapshot(cfg),
            "last_drill": drills[-1] if drills else None}


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
                else None, "reachable": True})
            hellos.append((agents[-1], h, time.time()))
        except DrsyncError as e:
            agents.append({"name": cfg.agent.name if address == cfg.agent.listen else None, "role": "unknown",
                           "address": address, "epoch": None, "lag_s": None, "applied_snapshot": None,
                           "applied_at": None, "reachable": False, "error": str(e)})
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
        a["apply_hold"] = hold.as_dict() if a["address"] == cfg.agent.listen and hold.active else None
    return {"group": cfg.coordination.group, "primary": primaries[0] if len(primaries) == 1 else None,
            "epoch": max(epochs) if epochs else None, "agents": agents, "last_snapshot": last_snapshot,
            "last_drill": drills[-1] if drills else None}
