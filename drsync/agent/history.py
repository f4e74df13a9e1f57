"""The group's history of promotions, for ``drsync history``.

Every change of primary is a persistent sequential node ``history/change-<seq>`` in the group's ZooKeeper
namespace, written in the same transaction as the change it records (the epoch's compare-and-set
of a promotion or an automatic failover, a switchover's hand-over, a primary taking its claim back
at the same epoch), so the history never disagrees with the epoch. The newest
:data:`~drsync.coordination.HISTORY_KEEP` are kept. Each entry: ``epoch``, ``from`` (the previous
primary, null for the first), ``to``, ``at``, ``why`` (one of :data:`WHYS`), ``by`` (``user@host``
of the operator who ran the command, or ``agent NAME on HOST``), ``detail``, and where known
``lag_s`` and ``snapshot`` (what the new primary started from). ``drsync replace-identity`` is recorded
too (``why`` "identity replaced", ``from`` and ``to`` the agent's name, the ids in ``detail``): it
changes which process may act under a name.
"""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

from drsync.config import Config
from drsync.errors import UsageError
from drsync.repository.snapshots import iso

WHYS = ("first promotion", "manual", "forced", "automatic failover", "switchover", "claim after restart",
        "claim after lost session", "identity replaced")


def operator() -> str:
    """``user@host`` of whoever runs this command (recorded as ``by``)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def collect_history(cfg: Config, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` entries (0: every one kept), newest first, with ``at`` in ISO 8601 and ``at_unix``."""
    if cfg.agent.role != "auto":
        raise UsageError(f"drsync history reads the group's history in ZooKeeper: it needs agent.role = \"auto\" "
                         f"(this config fixes the role to {cfg.agent.role!r})")
    from drsync.coordination import HISTORY_KEEP, open_coordinator

    coord = open_coordinator(cfg)
    coord.start()
    try:
        entries = coord.history(limit if limit > 0 else HISTORY_KEEP)
    finally:
        coord.close()
    out = []
    for e in entries:
        at = e.get("at")
        out.append({**e, "at": iso(float(at)) if isinstance(at, int | float) else None, "at_unix": at})
    return out


def history_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: EPOCH, WHEN, FROM, TO, WHY, BY, DETAIL."""
    return [[str(e.get("epoch", "?")), str(e.get("at") or "?"), str(e.get("from") or "-"), str(e.get("to") or "?"),
             str(e.get("why") or "?"), str(e.get("by") or "?"), str(e.get("detail") or "")] for e in entries]
