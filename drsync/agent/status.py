"""The group view for ``drsync status`` (static roles: this agent and its configured standbys)."""

from __future__ import annotations

import time
from typing import Any

from drsync.config import Config
from drsync.errors import DrsyncError
from drsync.repository.repo import Repository
from drsync.repository.snapshots import iso
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink


def collect_status(cfg: Config, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask every agent of the pair who it is; works while some of them are down."""
    tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
    addresses = [cfg.agent.listen, *[a for a in cfg.replication.standbys if a != cfg.agent.listen]]
    now = time.time()
    agents: list[dict[str, Any]] = []
    for address in addresses:
        link = GrpcStandbyLink(address, tls=tls)
        try:
            h = link.hello("drsync-status", 0, timeout_s=timeout_s)
            agents.append({
                "name": h.agent, "role": h.role, "address": address, "epoch": h.epoch,
                "lag_s": round(now - h.applied_captured_at, 3) if h.applied_snapshot else None,
                "applied_snapshot": h.applied_snapshot or None, "applied_at": iso(h.applied_at) if h.applied_at
                else None, "reachable": True})
        except DrsyncError as e:
            agents.append({"name": cfg.agent.name if address == cfg.agent.listen else None, "role": "unknown",
                           "address": address, "epoch": None, "lag_s": None, "applied_snapshot": None,
                           "applied_at": None, "reachable": False, "error": str(e)})
        finally:
            link.close()
    primaries = [a["name"] for a in agents if a["role"] == "primary"]
    last_snapshot = None
    try:
        snaps = Repository.open(open_storage(cfg.cluster.repository)).list_snapshots()
        if snaps:
            last_snapshot = {"id": snaps[-1].id, "captured_at": iso(snaps[-1].captured_at), "kind": snaps[-1].kind}
    except DrsyncError:
        pass
    epochs = [a["epoch"] for a in agents if a["epoch"] is not None]
    return {"group": cfg.coordination.group, "primary": primaries[0] if len(primaries) == 1 else None,
            "epoch": max(epochs) if epochs else None, "agents": agents, "last_snapshot": last_snapshot,
            "last_drill": None}
