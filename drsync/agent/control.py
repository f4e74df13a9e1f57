"""Operator actions on a group through ZooKeeper: promote and switchover.

The command line runs these in its own process with its own ZooKeeper
session; the agents carry the decisions out. A promotion is the epoch's
compare-and-set naming the new primary (``promoted_by``); the named agent then
takes the ``primary`` node itself, because an ephemeral node must belong to
the session of the process that acts as primary. A switchover is a request
node that the current primary carries out (hook, final snapshot shipped and
applied, then one transaction that bumps the epoch and drops its claim).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from drsync import engine
from drsync.agent.loop import StateDirLock, has_data, open_coordinator, state_dir_of
from drsync.agent.roles import format_span, promotion_refusal
from drsync.agent.standby import StandbyReceiver, StateFile, state_lag_s
from drsync.config import Config
from drsync.coordination import Coordinator
from drsync.errors import OperationFailed, RefusedError, UsageError
from drsync.repository.repo import Repository
from drsync.storage import open_storage


def _require_auto(cfg: Config, what: str) -> None:
    if cfg.agent.role != "auto":
        raise UsageError(f"drsync {what} works with agent.role = \"auto\" (roles from ZooKeeper); this config fixes "
                         f"the role to {cfg.agent.role!r}: change agent.role in both agents' configs instead")


def _connected(cfg: Config) -> Coordinator:
    coord = open_coordinator(cfg)
    coord.start()
    return coord


def _wait(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)  # polling ZooKeeper for the agent's own confirmation


def promote(cfg: Config, *, force: bool = False, accept_data_loss: bool = False,
            wait_s: float = 30.0) -> dict[str, Any]:
    """Make this config's agent the primary. Raises RefusedError (exit 4) when unsafe."""
    _require_auto(cfg, "promote")
    started = time.monotonic()
    me = cfg.agent.name
    coord = _connected(cfg)
    try:
        view = coord.view()
        primary = view.primary
        if primary is not None and primary.agent == me and primary.epoch == view.epoch.epoch:
            return {"agent": me, "epoch": view.epoch.epoch, "promoted": False, "previous_primary": me,
                    "message": f"{me} is already the primary at epoch {view.epoch.epoch}"}
        if primary is not None and not force:
            raise RefusedError(f"agent {primary.agent} is primary at epoch {primary.epoch} and its ZooKeeper "
                               f"session is alive; for a planned hand-over use drsync switchover, or rerun with "
                               f"--force to fence it")
        first = view.epoch.epoch == 0
        data_root = engine.data_root_url(cfg.cluster.data)
        if first and not accept_data_loss and not has_data(data_root):
            raise RefusedError(f"group {cfg.coordination.group} has no primary yet and data root {data_root} is "
                               f"empty: the first promotion makes this agent the production side; run it with the "
                               f"production cluster's config (or --accept-data-loss if it is meant to start empty)")
        state_dir = state_dir_of(cfg)
        state = StateFile(state_dir).load()
        lag = state_lag_s(state)  # on the primary's clock, with the offset the agent last estimated
        refusal = promotion_refusal(lag_s=lag, applied_captured_at=state.applied_captured_at,
                                    max_lag_s=cfg.coordination.max_lag_on_failover,
                                    accept_data_loss=accept_data_loss, first_promotion=first)
        if refusal:
            raise RefusedError(refusal)
        agent_running = StateDirLock.held(state_dir)
        if not agent_running and not first:
            # Nobody else will finish an apply a crash interrupted before this agent takes over.
            repo = Repository.open(open_storage(cfg.cluster.repository))
            StandbyReceiver(repo, data_root, StateFile(state_dir), agent=me).recover()
        reason = "first promotion" if first else ("forced" if primary is not None else "manual")
        new = coord.promote(view.epoch, me, reason)
        doc: dict[str, Any] = {
            "agent": me, "epoch": new.epoch, "promoted": True, "reason": reason,
            "previous_primary": primary.agent if primary else (view.epoch.promoted_by or None),
            "forced": primary is not None, "lag_s": round(lag, 3) if lag is not None else None,
            "applied_snapshot": state.applied_snapshot or None,
            "data_loss_accepted": accept_data_loss and not first,
        }
        if not agent_running:
            doc.update(took_s=round(time.monotonic() - started, 3), primary_confirmed=False,
                       message=f"epoch {new.epoch} names {me}; its agent is not running and takes over as primary "
                               f"when it starts")
            return doc

        def confirmed() -> bool:
            p = coord.read_primary()
            rec = coord.agents().get(me, {})
            return p is not None and p.agent == me and p.epoch == new.epoch and rec.get("role") == "primary"

        if not _wait(confirmed, wait_s):
            raise OperationFailed(f"epoch {new.epoch} now names {me}, but its agent has not taken the primary node "
                                  f"within {wait_s:.0f}s; check the agent's log (it takes over as soon as it can)")
        doc.update(took_s=round(time.monotonic() - started, 3), primary_confirmed=True,
                   message=f"{me} is the primary at epoch {new.epoch}" +
                           (f" (lag {format_span(lag)} at promotion)" if lag is not None else ""))
        return doc
    finally:
        coord.close()


def switchover(cfg: Config, *, to: str | None = None, timeout_s: float | None = None,
               cancel: bool = False) -> dict[str, Any]:
    """Planned hand-over with zero data loss, carried out by the current primary."""
    _require_auto(cfg, "switchover")
    started = time.monotonic()
    coord = _connected(cfg)
    try:
        if cancel:
            pending = coord.read_switchover()
            coord.update_switchover(None)
            return {"cancelled": pending}
        view = coord.view()
        agents = coord.agents()
        primary = view.primary
        if primary is None:
            raise RefusedError(f"group {cfg.coordination.group} has no primary to hand over from; use drsync "
                               f"promote")
        if to is None:
            if cfg.agent.name != primary.agent:
                to = cfg.agent.name
            else:
                standbys = sorted(n for n, r in agents.items() if r.get("role") == "standby")
                if len(standbys) != 1:
                    raise UsageError(f"name the new primary with --to (standbys: {', '.join(standbys) or 'none'})")
                to = standbys[0]
        if to == primary.agent:
            raise UsageError(f"{to} is already the primary")
        if agents.get(to, {}).get("role") != "standby":
            raise RefusedError(f"agent {to} is not a running standby of group {cfg.coordination.group}; start it "
                               f"and let it catch up first")
        coord.request_switchover({"to": to, "from": primary.agent, "status": "requested",
                                  "requested_at": time.time(), "requested_by": cfg.agent.name,
                                  "epoch": view.epoch.epoch})
        limit = timeout_s if timeout_s is not None else cfg.coordination.switchover_timeout
        result: dict[str, Any] = {}

        def finished() -> bool:
            doc = coord.read_switchover() or {}
            if doc.get("status") == "failed":
                result["failed"] = doc.get("error", "failed")
                return True
            p = coord.read_primary()
            if p is not None and p.agent == to and p.epoch > view.epoch.epoch:
                result.update(doc)
                result["epoch"] = p.epoch
                return True
            return False

        done = _wait(finished, limit, 0.05)
        coord.update_switchover(None)
        if not done:
            raise OperationFailed(f"the switchover to {to} did not finish within {limit:.0f}s; the request was "
                                  f"withdrawn; check drsync status and the agents' logs")
        if "failed" in result:
            raise OperationFailed(f"switchover to {to} failed: {result['failed']}")
        return {"from": primary.agent, "to": to, "epoch": result["epoch"],
                "final_snapshot": result.get("final_snapshot"), "took_s": round(time.monotonic() - started, 3)}
    finally:
        coord.close()

