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

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drsync import engine
from drsync.agent import clock
from drsync.agent.fencing import approve_rejoin, fence_env, fencing_lost, run_command
from drsync.agent.history import operator
from drsync.agent.hold import HoldFile
from drsync.agent.locks import StateDirLock
from drsync.agent.pointintime import RecoveryPoint, choose_point, newer_than, recovery_points
from drsync.agent.requests import submit
from drsync.agent.roles import (
    applied_position,
    epoch_behind,
    format_span,
    highest_reported_epoch,
    promotion_refusal,
    superseded_reason,
)
from drsync.agent.state import AgentState, StateStore, state_dir_of
from drsync.agent.supervisor import has_data
from drsync.config import Config
from drsync.coordination import Coordinator, GroupView, open_coordinator
from drsync.errors import ChunkDamaged, DrsyncError, OperationFailed, RefusedError, UsageError
from drsync.repository.ids import IdSet, id_at
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_diff import chunks_beyond
from drsync.repository.repo import Repository
from drsync.units import iso_time

# How long a promotion at a recovery point waits for the agent to apply it (a large tree takes a while).
POINT_APPLY_WAIT_S = 6 * 3600.0
ERRORS_BY_CODE: dict[int, type[Exception]] = {2: UsageError, 4: RefusedError}
log = logging.getLogger("drsync.identity")


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


def _when(ts: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(ts)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "an unknown time"


def _no_fence_words(cfg: Config) -> str:
    """How a config without fencing says so: the operator's explicit "none", or nothing configured."""
    return ('fence_command = "none" (the operator\'s explicit choice: nothing runs)'
            if cfg.coordination.fence_command.strip() == "none" else "fence_command not configured")


@dataclass
class PromotionCheck:
    """One thing a promotion checks before it changes anything (``promote --dry-run`` lists them)."""

    name: str
    ok: bool
    detail: str
    refusal: type[Exception] = RefusedError  # what the promotion raises when this check fails


def _fencing_words(holder: str, old: str) -> str:
    return (f"agent {holder} is fencing {old} to take over (automatic failover); wait for it and run drsync "
            f"status, or rerun once it is done")


def _promotion_checks(cfg: Config, coord: Coordinator, view: GroupView, *, force: bool, accept_data_loss: bool,
                      no_fence: bool, promote_empty_root: bool, point: PointChoice, dry_run: bool = False
                      ) -> tuple[list[PromotionCheck], dict[str, Any]]:
    """Every check of a promotion, in order, and what the promotion would use (lag, state, fence target);
    ``dry_run``: also, last, the check the real promotion leaves to its apply (a point's bytes)."""
    me, group = cfg.agent.name, cfg.coordination.group
    primary, maintenance = view.primary, view.maintenance
    first = view.epoch.epoch == 0
    checks: list[PromotionCheck] = []
    if primary is None:
        checks.append(PromotionCheck("primary", True, f"group {group} has no live primary"))
    else:
        checks.append(PromotionCheck("primary", force, (
            f"agent {primary.agent} is primary at epoch {primary.epoch}; --force fences it" if force else
            f"agent {primary.agent} is primary at epoch {primary.epoch} and its ZooKeeper session is alive; for a "
            f"planned hand-over use drsync switchover, or rerun with --force to fence it")))
    if maintenance and maintenance.get("agent") != me:
        checks.append(PromotionCheck("maintenance", force, (
            f"primary {maintenance.get('agent')}'s agent is stopped for maintenance; --force promotes anyway"
            if force else
            f"primary {maintenance.get('agent')}'s agent was stopped on purpose at {_when(maintenance.get('since'))} "
            f"({maintenance.get('reason') or 'maintenance'}): production is probably still running; start its agent "
            f"again, or rerun with --force to promote {me} anyway" + (" (fence_command runs first)"
                                                                      if cfg.coordination.fencing else
                                                                      f" ({_no_fence_words(cfg)}: nothing "
                                                                      f"stops its writers)"))))
    data_root = engine.data_root_url(cfg.cluster.data)
    if promote_empty_root or has_data(data_root):
        checks.append(PromotionCheck("data root", True, f"{data_root} holds data" if not promote_empty_root else
                                     f"{data_root}: --promote-empty-root (not checked)"))
    elif first:  # never suggested as a way out: an empty production makes every standby delete its data
        checks.append(PromotionCheck("data root", False, (
            f"group {group} has no primary yet and data root {data_root} is empty: the first promotion makes this "
            f"agent the production side; run it with the production cluster's config")))
    else:
        checks.append(PromotionCheck("data root", False, (
            f"data root {data_root} of {me} is empty, and group {group} has had a primary (epoch "
            f"{view.epoch.epoch}): promoting it would make an empty tree production; restore this cluster's data "
            f"first (drsync snapshot restore or backup restore), then promote")))
    state_dir = state_dir_of(cfg)
    state = StateStore(state_dir).load()
    # Never overridden: the next epoch could be one another primary held. Other live agents' word counts too
    # (this one may never have seen the epoch they saw: added after ZooKeeper lost the group).
    try:
        other = highest_reported_epoch(me, coord.agents())
    except DrsyncError:
        other = ("", 0)
    who, seen = max([(me, state.epoch), other], key=lambda x: x[1])
    if view.epoch.epoch < seen:
        checks.insert(0, PromotionCheck("epoch", False, epoch_behind(view.epoch.epoch, seen,
                                                                      "this agent" if who == me else f"agent {who}")))
    target, point_check = _point_check(cfg, state, point)
    if point.explicit and view.epoch.promoted_by == me:
        target, point_check = None, PromotionCheck("point", False, (
            f"{me} is this group's primary (epoch {view.epoch.epoch} names it): a promotion at a recovery point "
            f"is for a standby; to take production itself back to a snapshot, stop its agent and its writers, "
            f"then run drsync snapshot restore ID"), UsageError)
    if point_check is not None:
        checks.append(point_check)
    if point.explicit and target is not None:  # the operator named the point: its age is the choice made
        lag = clock.lag_s(target.captured_at, state.clock_offset_s)
        checks.append(PromotionCheck("lag", True, f"promotes at a chosen point: lag {format_span(lag or 0.0)} "
                                                  f"(max_lag_on_failover does not apply)"))
    else:
        # --delayed-state keeps the root as it is, and what was received and not applied stays in the
        # repository (a point to promote at, to restore from): only what this standby never received is
        # lost, so the received lag is judged, not the applied lag (which always includes the delay).
        received = point.delayed_state and target is None and state.applied_captured_at > 0
        captured_at = (max(state.received_captured_at, state.applied_captured_at) if received else
                       target.captured_at if target is not None else state.applied_captured_at)
        lag = clock.lag_s(captured_at, state.clock_offset_s)  # the primary's clock, the offset last estimated
        refusal = promotion_refusal(lag_s=lag, applied_captured_at=captured_at,
                                    max_lag_s=cfg.coordination.max_lag_on_failover,
                                    accept_data_loss=accept_data_loss, first_promotion=first, received=received)
        applied_lag = clock.lag_s(state.applied_captured_at, state.clock_offset_s)
        kept = (f"; its root stays at the applied snapshot {state.applied_snapshot} (applied lag "
                f"{format_span(applied_lag or 0.0)}), what it received after it stays in its repository"
                if received and state.pending else "")
        checks.append(PromotionCheck("lag", refusal is None, refusal or (
            "first promotion: no lag" if first else "--accept-data-loss" if accept_data_loss and lag is None else
            f"{'received lag' if received else 'lag'} {format_span(lag or 0.0)}, within max_lag_on_failover "
            f"{format_span(cfg.coordination.max_lag_on_failover)}{kept}")))
    superseded = superseded_reason(last_role=state.last_role, primary_epoch=state.primary_epoch,
                                   epoch=view.epoch.epoch)
    if superseded and not point.explicit:  # a recovery point replaces the root: that one is judged above
        checks.append(PromotionCheck("ex-primary", accept_data_loss, (
            f"{me} {superseded}: --accept-data-loss promotes its root as it is, without what later primaries "
            f"changed (epoch {state.primary_epoch + 1} on)" if accept_data_loss else
            f"{me} {superseded}: its root holds nothing later primaries changed (epoch {state.primary_epoch + 1} "
            f"on; the lag above is of what it applied before it was primary); promoting it would lose that; let "
            f"it rejoin and apply first (demote_command, or drsync rejoin), or rerun with --accept-data-loss if it "
            f"is all there is")))
    if not first and not point.explicit:
        checks.append(_position_check(cfg, coord, state, accept_data_loss))
    running, proof = _agent_alive(cfg, coord, state_dir)
    where = "primary" if primary is None else f"primary {primary.agent}"
    checks.append(PromotionCheck("agent", running, f"agent {me} is running ({proof})" if running else (
        f"agent {me} is not running ({proof}): start it, then rerun drsync promote; nothing was changed, group "
        f"{group} stays at epoch {view.epoch.epoch} with " + (f"{where} (live)" if primary else "no live primary")),
        OperationFailed))
    old = primary.agent if primary is not None else view.epoch.promoted_by
    fence = not first and bool(old) and old != me and cfg.coordination.fencing and not no_fence
    holder = coord.fencing_holder(view.epoch.epoch) if fence else ""
    checks.append(PromotionCheck("fence", not holder, (
        _fencing_words(holder, old) if holder else
        f"fence_command runs first against {old} and must exit 0" if fence else
        "skipped (--no-fence)" if no_fence else "no earlier primary to fence" if first or not old or old == me
        else _no_fence_words(cfg))))
    if dry_run and target is not None:  # last, as the real promotion reads them: when every check above passed
        problem = _unusable(engine.open_repository(cfg.cluster.repository), target,
                            read_against=state.applied_snapshot)
        checks.append(PromotionCheck("point bytes", not problem, problem or (
            f"every chunk the apply of snapshot {target.id} reads is intact"), OperationFailed))
    return checks, {"first": first, "lag": lag, "state": state, "old": old, "fence": fence, "running": running,
                    "data_root": data_root, "target": target}


def _position_check(cfg: Config, coord: Coordinator, state: AgentState, accept_data_loss: bool) -> PromotionCheck:
    """Another live standby holding a newer snapshot than this one (by applied position: the producing
    primary's epoch and sequence, never clock times) is the one to promote; this one would lose the
    difference. --accept-data-loss overrides."""
    me = cfg.agent.name
    try:
        records = coord.agents()
    except DrsyncError:
        records = {}
    mine = applied_position({"applied_position": list(state.applied_position)})
    ahead = sorted(((applied_position(r), n) for n, r in records.items()
                    if n != me and r.get("role") == "standby" and applied_position(r) > mine), reverse=True)
    if not ahead:
        return PromotionCheck("position", True, f"no live standby has applied a newer snapshot than {me}")
    pos, best = ahead[0]
    if accept_data_loss:
        return PromotionCheck("position", True, f"standby {best} is further ahead (position {pos[0]}/{pos[1]}); "
                                                f"--accept-data-loss")
    return PromotionCheck("position", False, (
        f"standby {best} has applied a newer snapshot (position {pos[0]}/{pos[1]}, epoch/sequence) than {me} "
        f"({mine[0]}/{mine[1]}): promoting {me} would lose what {best} holds; promote {best} instead, or rerun "
        f"with --accept-data-loss"))


@dataclass(frozen=True)
class PointChoice:
    """Where a promotion puts the standby's root first (``drsync promote`` options)."""

    to_snapshot: str | None = None  # --to-snapshot ID
    before: float | None = None  # --before TIME (Unix seconds)
    apply_received: bool = False  # --apply-received: the newest snapshot waiting for apply_delay
    delayed_state: bool = False  # --delayed-state: the root as it is (apply_delay's window kept)

    @property
    def explicit(self) -> bool:
        return self.to_snapshot is not None or self.before is not None


def _point_check(cfg: Config, state: AgentState, point: PointChoice) -> tuple[RecoveryPoint | None,
                                                                              PromotionCheck | None]:
    """The recovery point the promotion applies first (None: the root as it is), and its check."""
    if point.explicit and (point.apply_received or point.delayed_state):
        return None, PromotionCheck("point", False, "--to-snapshot/--before name the point themselves; leave out "
                                                    "--apply-received and --delayed-state", UsageError)
    if point.to_snapshot is not None and point.before is not None:
        return None, PromotionCheck("point", False, "choose one: --to-snapshot ID or --before TIME", UsageError)
    if point.to_snapshot is not None and not point.to_snapshot.strip():
        return None, PromotionCheck("point", False, "--to-snapshot needs a snapshot id (it was empty); "
                                                    "drsync status --points lists them", UsageError)
    if point.apply_received and point.delayed_state:
        return None, PromotionCheck("point", False, "choose one: --apply-received or --delayed-state", UsageError)
    if not (point.explicit or state.pending):
        extra = "" if not (point.apply_received or point.delayed_state) else \
            " (nothing is waiting for replication.apply_delay: the root is current)"
        return None, (PromotionCheck("point", True, f"at the applied snapshot {state.applied_snapshot}{extra}")
                      if state.applied_snapshot and extra else None)
    repo = engine.open_repository(cfg.cluster.repository)
    held = HoldFile(state_dir_of(cfg)).load().snapshot
    points = recovery_points(repo.list_snapshots(), state, cluster_id=cfg.cluster.id, held=held,
                             stored_at=repo.snapshot_stored_times())
    if point.explicit:
        try:
            chosen = choose_point(points, to_snapshot=point.to_snapshot, before=point.before)
        except UsageError as e:
            return None, PromotionCheck("point", False, str(e), UsageError)
        problem = _unusable(repo, chosen)
        if problem:
            return None, PromotionCheck("point", False, problem, OperationFailed)
        newer = newer_than(points, chosen)
        return chosen, PromotionCheck("point", True, (
            f"applies snapshot {chosen.id} (stored {_stored_words(chosen)}, captured {iso_time(chosen.captured_at)}, "
            f"{chosen.state}) first" + (f"; {_kept_words([p.id for p in newer])}" if newer else "")))
    pending = [p for p in points if p.state == "pending"]
    newest = pending[-1] if pending else None
    if point.delayed_state:
        return None, PromotionCheck("point", True, (
            f"at the applied snapshot {state.applied_snapshot} (--delayed-state); {len(pending)} received "
            f"snapshot(s) stay in the repository unapplied"))
    if point.apply_received and newest is not None:
        problem = _unusable(repo, newest)
        if problem:
            return None, PromotionCheck("point", False, problem, OperationFailed)
        return newest, PromotionCheck("point", True, (
            f"applies the newest received snapshot {newest.id} (captured {iso_time(newest.captured_at)}) first "
            f"(--apply-received)"))
    applied = next((p for p in points if p.state == "applied"), None)
    return None, PromotionCheck("point", False, (
        f"{cfg.agent.name} has {len(state.pending)} received snapshot(s) not applied yet (replication.apply_delay "
        f"{format_span(cfg.replication.apply_delay)}; newest {newest.id if newest else '?'} captured "
        f"{iso_time(newest.captured_at) if newest else '?'}); its root holds {state.applied_snapshot or 'nothing'}"
        + (f" (captured {iso_time(applied.captured_at)})" if applied else "") + ": rerun with --apply-received "
        "to apply everything received first, or --delayed-state to promote the root as it is (if the damage "
        "is in what was received, --to-snapshot ID picks any earlier point)"), UsageError)


# How many of the snapshots kept newer than a chosen point a human-readable line names before "and N more".
KEPT_NAMED = 5


def _kept_words(kept: list[str]) -> str:
    """The snapshots newer than the chosen point, for a human mid-outage: how many, the first few (the first
    is the one right after the point: most likely where the damage starts), how many more, and where the
    whole list is."""
    named = ", ".join(kept[:KEPT_NAMED])
    more = (f" and {len(kept) - KEPT_NAMED} more (newest {kept[-1]}; --json lists all of them as newer_kept, "
            f"drsync status --points shows them)" if len(kept) > KEPT_NAMED else "")
    return f"{len(kept)} newer snapshot(s) stay in the repository: {named}{more}"


def _stored_words(point: RecoveryPoint) -> str:
    return iso_time(point.stored_at) if point.stored_at else "just now"


def _unusable(repo: Repository, point: RecoveryPoint, *, read_against: str | None = None) -> str:
    """Why ``point`` cannot be applied, or "": its manifest unreadable, chunks missing. The real promotion
    leaves the chunks' bytes to the apply, which reads them; ``read_against`` (a dry run: the snapshot the
    root holds, "" when unknown) reads and checks now every chunk that apply would read (those of the files
    that differ from it: :func:`chunks_beyond`), so that the dry run ends as the promotion would. Reads from
    this repository only; errors are returned as words, never raised."""
    try:
        manifest = repo.load_manifest(repo.find_snapshot(point.id), lean=True)
        repo.check_chunks_present(manifest.chunk_id_column(), f"snapshot {point.id}")
        if read_against is not None:
            _read_what_the_apply_reads(repo, manifest, read_against)
    except DrsyncError as e:
        repair = "; run 'drsync repo repair' on this standby (its primary then sends them again)" \
            if isinstance(e, ChunkDamaged) else ""
        return f"snapshot {point.id} cannot be applied: {e}{repair}; or choose another point (drsync status --points)"
    return ""


def _read_what_the_apply_reads(repo: Repository, manifest: Manifest, applied: str) -> None:
    """Read and check each chunk an apply of ``manifest`` onto a root holding ``applied`` reads (every chunk
    when ``applied`` is "" or unreadable): ChunkDamaged (IntegrityError) at the first one damaged."""
    base = None
    if applied:
        try:
            base = repo.load_manifest(repo.find_snapshot(applied), lean=True)
        except DrsyncError:
            base = None  # the apply then compares the root by content: every chunk may be read
    wanted = IdSet.of(chunks_beyond(base, manifest) if base is not None else manifest.chunk_id_column())
    for i in range(len(wanted)):
        repo.read_chunk(id_at(wanted.ids, i))


def _points(cfg: Config, state_dir: str) -> list[RecoveryPoint]:
    repo = engine.open_repository(cfg.cluster.repository)
    return recovery_points(repo.list_snapshots(), StateStore(state_dir).load(), cluster_id=cfg.cluster.id,
                           held=HoldFile(state_dir).load().snapshot, stored_at=repo.snapshot_stored_times())


def _apply_point(cfg: Config, target: RecoveryPoint, point: PointChoice) -> dict[str, Any]:
    """Have the agent apply ``target`` (and hold applies after it) before the epoch names it."""
    _require_local_agent(cfg)
    why = ("to promote at an earlier point (drsync promote --to-snapshot/--before)" if point.explicit else
           "to promote with everything received (drsync promote --apply-received)")
    reply = submit(cfg, "promote-prepare", {"snapshot": target.id, "why": why}, wait_s=POINT_APPLY_WAIT_S)
    if not reply.ok:
        raise ERRORS_BY_CODE.get(reply.exit_code, OperationFailed)(
            f"not promoted: applying snapshot {target.id} first failed: {reply.message}")
    return reply.result


def _require_local_agent(cfg: Config) -> None:
    """The agent must run on this machine (its state directory locked): it applies the point here."""
    state_dir = state_dir_of(cfg)
    if not StateDirLock.held(state_dir):
        raise OperationFailed(f"not promoted: agent {cfg.agent.name} does not run on this machine (its state "
                              f"directory {state_dir} is not locked): run this drsync promote on the standby's "
                              f"own host, where its agent runs; nothing was changed")


def _keep_delayed(cfg: Config) -> dict[str, Any]:
    """``--delayed-state``: the agent holds applies and forgets what waits for apply_delay (else it would
    apply it when it takes over)."""
    _require_local_agent(cfg)
    reply = submit(cfg, "promote-prepare", {"keep_delayed": True, "why": "to promote the delayed state (drsync "
                                                                         "promote --delayed-state)"}, wait_s=60.0)
    if not reply.ok:
        raise ERRORS_BY_CODE.get(reply.exit_code, OperationFailed)(f"not promoted: {reply.message}")
    return reply.result


def _agent_alive(cfg: Config, coord: Coordinator, state_dir: str) -> tuple[bool, str]:
    """Whether this config's agent process is alive, and the proof (or why not). A ZooKeeper registration
    alone proves nothing: after a kill -9 it lingers until the session times out. Alive = its state
    directory is locked (same machine), or the agent at its registered address answers Hello with its name."""
    me = cfg.agent.name
    if StateDirLock.held(state_dir):
        return True, f"its state directory {state_dir} is locked by the running agent"
    try:
        record = coord.agents().get(me)
    except OperationFailed:
        record = None
    if record is None:
        return False, f"its state directory {state_dir} is not locked and ZooKeeper has no live registration of it"
    address = str(record.get("address") or "")
    from drsync.transport.grpc import GrpcStandbyLink

    link = GrpcStandbyLink(address, tls=(cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None)
    try:
        hello = link.hello("drsync-promote", 0, timeout_s=5.0)
    except DrsyncError:
        return False, (f"its state directory {state_dir} is not locked, and its ZooKeeper registration names "
                       f"{address}, where it does not answer: killed or hung, its registration lingers until "
                       f"its session times out")
    finally:
        link.close()
    if hello.agent != me:
        return False, f"its ZooKeeper registration names {address}, where agent {hello.agent!r} answers instead"
    return True, f"it answers at {address}"


def _identity_of(cfg: Config, coord: Coordinator, state: AgentState) -> str:
    """The persistent agent id of this config's running agent, recorded in the epoch so that only that
    agent may claim it: its state directory's when it runs here, else its live registration's."""
    if StateDirLock.held(state_dir_of(cfg)) and state.agent_id:
        return state.agent_id
    try:
        record = coord.agents().get(cfg.agent.name) or {}
    except OperationFailed:
        record = {}
    return str(record.get("agent_id") or state.agent_id or "")


def replace_identity(cfg: Config) -> dict[str, Any]:
    """An operator's step: this config's agent (its state directory's agent id) owns its agent.name in the
    group from now on, in place of the agent id the group recorded (a reinstalled host, a lost state
    directory). The other identity is refused under this name afterwards. Refused while a registration of
    the name is live; recorded in the group's history."""
    _require_auto(cfg, "replace-identity")
    me = cfg.agent.name
    state_dir = state_dir_of(cfg)
    if StateDirLock.held(state_dir):
        raise UsageError(f"agent {me} runs with state directory {state_dir}: replace-identity is for an agent "
                         f"that was refused its name; stop it first")
    store = StateStore(state_dir)
    owner = store.current.agent_name
    if owner and owner != me:
        raise UsageError(f"state directory {state_dir} belongs to agent {owner}, not {me}; nothing was changed")
    coord = _connected(cfg)
    try:
        member = coord.members().get(me)
        old = str((member.member if member else {}).get("agent_id") or "")
        new = store.current.agent_id or uuid.uuid4().hex
        if old == new:
            return {"agent": me, "agent_id": new, "replaced": False,
                    "message": f"agent {me} already owns its name in group {cfg.coordination.group} (agent id "
                               f"{new}): nothing to replace"}
        store.update(agent_id=new, agent_name=me)
        epoch = coord.read_epoch()
        detail = (f"drsync replace-identity: agent id {old or '(none recorded)'} replaced by {new}"
                  + (f"; epoch {epoch.epoch} names {me}: the new identity may claim it" if epoch.promoted_by == me
                     else ""))
        coord.replace_identity(me, new, {"from": me, "why": "identity replaced", "by": operator(),
                                         "detail": detail})
        log.warning("agent %s of group %s: identity replaced by %s: agent id %s replaced by %s; an agent with the "
                    "old identity is refused under this name from now on", me, cfg.coordination.group, operator(),
                    old or "(none recorded)", new)
        return {"agent": me, "agent_id": new, "replaced": True, "replaced_agent_id": old or None,
                "epoch": epoch.epoch, "primary_of_epoch": epoch.promoted_by == me,
                "message": f"agent {me} owns its name in group {cfg.coordination.group} with agent id {new} now "
                           f"(replaced {old or 'no recorded id'}); an agent with the old identity is refused under "
                           f"this name; start this agent" + (f" (epoch {epoch.epoch} names it: it takes the primary "
                                                              f"claim back)" if epoch.promoted_by == me else "")}
    finally:
        coord.close()


def promote(cfg: Config, *, force: bool = False, accept_data_loss: bool = False, wait_s: float = 30.0,
            no_fence: bool = False, promote_empty_root: bool = False, dry_run: bool = False,
            point: PointChoice | None = None) -> dict[str, Any]:
    """Make this config's agent the primary, and return only when its agent acts as primary.

    Raises RefusedError (exit 4) when unsafe, OperationFailed (exit 1) when its agent is not running
    or does not take over within ``wait_s``. ``dry_run``: run every check, change nothing, and return
    them (``would_promote``, ``checks``, ``exit_code``). ``point``: a recovery point the agent applies
    first (:mod:`drsync.agent.pointintime`), or what to do with snapshots waiting for apply_delay;
    UsageError (exit 2) when received snapshots wait and ``point`` does not say."""
    point = point or PointChoice()
    _require_auto(cfg, "promote")
    started = time.monotonic()
    me = cfg.agent.name
    coord = _connected(cfg)
    try:
        view = coord.view()
        primary = view.primary
        if primary is not None and primary.agent == me and primary.epoch == view.epoch.epoch and not point.explicit:
            return {"agent": me, "epoch": view.epoch.epoch, "promoted": False, "previous_primary": me,
                    "message": f"{me} is already the primary at epoch {view.epoch.epoch}"}
        checks, ctx = _promotion_checks(cfg, coord, view, force=force, accept_data_loss=accept_data_loss,
                                        no_fence=no_fence, promote_empty_root=promote_empty_root, point=point,
                                        dry_run=dry_run)
        target: RecoveryPoint | None = ctx["target"]
        # A usage error (the command itself is wrong) is said before any refusal: fixing the refusal first
        # would only lead to it.
        failed = next((c for c in checks if not c.ok and c.refusal is UsageError), None) or next(
            (c for c in checks if not c.ok), None)
        if dry_run:
            code = 0 if failed is None else {RefusedError: 4, UsageError: 2}.get(failed.refusal, 1)
            return {"agent": me, "dry_run": True, "would_promote": failed is None, "exit_code": code,
                    "epoch": view.epoch.epoch, "epoch_after": view.epoch.epoch + 1 if failed is None else None,
                    "previous_primary": ctx["old"] or None,
                    "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
                    "point": target.as_dict() if target is not None else None,
                    "message": (f"dry run: {me} would become primary at epoch {view.epoch.epoch + 1}"
                                if failed is None else f"dry run: not promoted: {failed.detail}")}
        if failed is not None:
            raise failed.refusal(failed.detail)
        first, lag, state, old = ctx["first"], ctx["lag"], ctx["state"], ctx["old"]
        reason = "first promotion" if first else ("forced" if primary is not None else "manual")
        fenced = None
        if ctx["fence"]:
            holder = coord.take_fencing(me, view.epoch.epoch)  # held until this command's session ends
            if holder:
                raise RefusedError(f"not promoted: {_fencing_words(holder, old)}")
            address = primary.address if primary is not None else str(
                coord.agents().get(old, {}).get("address") or "")
            result = run_command("fence_command", cfg.coordination.fence_command, fence_env(
                group=cfg.coordination.group, agent=me, fenced_agent=old, fenced_address=address,
                epoch=view.epoch.epoch, data=engine.data_root_url(cfg.cluster.data)), cfg.coordination.fence_timeout,
                reported=True, abort=fencing_lost(coord))
            if not result.ok:
                raise RefusedError(f"not promoted: {result.summary()}; {old}'s production writers may still run; "
                                   f"fix the fence, or stop them by hand and rerun with --no-fence")
            fenced = True
            view2 = coord.view()  # the fence took time: promote only over the group as it was
            if view2.epoch.version != view.epoch.version:
                raise RefusedError(f"the group changed while fence_command ran (epoch {view2.epoch.epoch} now names "
                                   f"{view2.epoch.promoted_by}); nothing was promoted; run drsync status")
        applied_first = None
        if target is not None and (point.explicit or target.id != state.applied_snapshot):
            applied_first = _apply_point(cfg, target, point)
        elif point.delayed_state and state.pending:
            applied_first = _keep_delayed(cfg)
        new = coord.promote(view.epoch, me, reason, agent_id=_identity_of(cfg, coord, state), history={
            "from": old or None, "why": reason, "by": operator(),
            "detail": (f"drsync promote{' --force' if force else ''}{' --accept-data-loss' if accept_data_loss else ''}"
                       f"{' --no-fence' if no_fence else ''}{' --promote-empty-root' if promote_empty_root else ''}"
                       + (f" at snapshot {target.id}" if target else "")
                       + (f"; {primary.agent}'s session was alive (fenced)" if primary is not None else "")),
            "lag_s": round(lag, 3) if lag is not None else None,
            "snapshot": (target.id if target else state.applied_snapshot) or None})
        doc: dict[str, Any] = {
            "agent": me, "epoch": new.epoch, "promoted": True, "reason": reason,
            "previous_primary": primary.agent if primary else (view.epoch.promoted_by or None),
            "forced": primary is not None, "lag_s": round(lag, 3) if lag is not None else None,
            "applied_snapshot": (target.id if target else state.applied_snapshot) or None,
            "applied_first": applied_first,
            "data_loss_accepted": accept_data_loss and not first,
            "fenced": fenced if fenced is not None else ("skipped (--no-fence)" if no_fence else
                                                         _no_fence_words(cfg) if not cfg.coordination.fencing
                                                         else None),
        }
        def confirmed() -> bool:
            p = coord.read_primary()
            rec = coord.agents().get(me, {})
            return p is not None and p.agent == me and p.epoch == new.epoch and rec.get("role") == "primary"

        if not _wait(confirmed, wait_s):
            p = coord.read_primary()
            role = coord.agents().get(me, {}).get("role") or "not registered"
            raise OperationFailed(f"epoch {new.epoch} now names {me}, but it does not act as primary within "
                                  f"{wait_s:.0f}s (its agent reports role {role}; primary node: "
                                  f"{p.agent + ' at epoch ' + str(p.epoch) if p else 'none'}); the group has no "
                                  f"working primary until it does: check its log, or promote another agent")
        kept = [p.id for p in newer_than(_points(cfg, state_dir_of(cfg)), target)] if target is not None else []
        doc.update(took_s=round(time.monotonic() - started, 3), primary_confirmed=True, newer_kept=kept,
                   message=f"{me} is the primary at epoch {new.epoch}" +
                           (f" at snapshot {target.id} (captured {iso_time(target.captured_at)})" if target else "") +
                           (f" (lag {format_span(lag)} at promotion)" if lag is not None else "") +
                           (f"; {_kept_words(kept).replace('the repository', 'its repository')}" if kept
                            else ""))
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
            who, seen = highest_reported_epoch("", agents)
            if view.epoch.epoch < seen:  # promote is refused too: do not send the operator there
                raise RefusedError(epoch_behind(view.epoch.epoch, seen, f"agent {who}"))
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
                                  "operator": operator(),
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
                if not result.get("final_snapshot"):
                    # The new primary can claim before the old one marks the request handed over; the
                    # hand-over's history entry (written in the same transaction as the epoch) names it.
                    result["final_snapshot"] = next((h.get("snapshot") for h in coord.history(10)
                                                     if h.get("epoch") == p.epoch and h.get("why") == "switchover"),
                                                    None)
                return True
            if doc.get("status") == "handed-over":  # a promotion right after the hand-over wins over it
                e = coord.read_epoch()
                if e.epoch > int(doc.get("epoch") or 0) and e.promoted_by != to:
                    result["failed"] = (f"{primary.agent} handed over to {to} at epoch {doc.get('epoch')}, but a "
                                        f"promotion of {e.promoted_by} at epoch {e.epoch} came right after it; "
                                        f"{e.promoted_by} is the primary (see drsync history)")
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



def rejoin(cfg: Config, *, wait_s: float = 30.0) -> dict[str, Any]:
    """An operator's word that this ex-primary's production writers are stopped: it may rejoin as a
    standby (its data root is kept as a snapshot first, then overwritten by the primary's)."""
    _require_auto(cfg, "rejoin")
    me = cfg.agent.name
    state_dir = state_dir_of(cfg)
    state = StateStore(state_dir).load()
    coord = _connected(cfg)
    try:
        view = coord.view()
        if view.epoch.promoted_by == me:
            raise RefusedError(f"epoch {view.epoch.epoch} names {me}: it is this group's primary, not an ex-primary; "
                               f"nothing to rejoin")
        if state.last_role != "primary":
            raise UsageError(f"agent {me} is not waiting to rejoin (it last acted as {state.last_role or 'nothing'}); "
                             f"nothing to do")
        approve_rejoin(state_dir, {"at": time.time(), "epoch": view.epoch.epoch,
                                   "by": os.environ.get("USER") or str(os.getuid())})
        if not StateDirLock.held(state_dir):
            return {"agent": me, "rejoined": False, "approved": True,
                    "message": f"recorded; agent {me} is not running: it rejoins as a standby of "
                               f"{view.epoch.promoted_by} when it starts"}
        if not _wait(lambda: coord.agents().get(me, {}).get("role") == "standby", wait_s, 0.1):
            raise OperationFailed(f"the rejoin of {me} is recorded, but its agent did not report itself a standby "
                                  f"within {wait_s:.0f}s; check its log")
        return {"agent": me, "rejoined": True, "approved": True,
                "message": f"{me} rejoined as a standby of {view.epoch.promoted_by} at epoch {view.epoch.epoch}"}
    finally:
        coord.close()
