"""Who ships to whom: fan-out from the primary and cascades through standbys. Pure functions, no I/O.

Under ZooKeeper roles every agent publishes its ``upstream`` (``replication.upstream``: the agent it
follows, "" for the primary) in its ``agents/<name>`` record. A standby is fed by its upstream when
that upstream is a live standby and the links do not loop back to it; otherwise by the primary directly
(its upstream is down, unknown, an ex-primary, the primary itself, or the links loop), so that a
broken chain costs WAN bandwidth, never data. The primary ships to the standbys it feeds; a standby
ships each snapshot it applied to the standbys it feeds (a relay), with the epoch and position of the
primary that produced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def upstream_of(record: Mapping[str, Any]) -> str:
    """The agent a record says it follows ("" when none, or from an agent that does not say)."""
    up = record.get("upstream")
    return up if isinstance(up, str) else ""


def feeders(primary: str, agents: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """For each live standby (role ``standby`` in ``agents``, name -> record), the agent that ships to it:
    its upstream when that is a live standby and the standby is not on a loop of upstreams, else
    ``primary`` (the agent holding the primary node; "" when none). Every chain of upstreams so ends at a
    standby the primary feeds."""
    standbys = {n for n, r in agents.items() if r.get("role") == "standby" and n != primary}
    out: dict[str, str] = {}
    for name in sorted(standbys):
        up = upstream_of(agents[name])
        out[name] = up if up in standbys and not _on_loop(name, agents, standbys) else primary
    return out


def _on_loop(start: str, agents: Mapping[str, Mapping[str, Any]], standbys: set[str]) -> bool:
    """Whether following upstreams through live standbys from ``start`` comes back to it."""
    seen: set[str] = set()
    cur = upstream_of(agents[start])
    while cur in standbys and cur not in seen:
        if cur == start:
            return True
        seen.add(cur)
        cur = upstream_of(agents[cur])
    return False


def targets_of(me: str, primary: str, agents: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The standbys ``me`` ships to (address -> agent name), sorted by name."""
    fed = feeders(primary, agents)
    return {str(agents[n].get("address")): n for n in sorted(fed)
            if fed[n] == me and agents[n].get("address")}
