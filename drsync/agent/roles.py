"""Which role an agent takes, decided from what ZooKeeper says: pure functions, no I/O.

The rules (DESIGN.md safety rule 1 and "ZooKeeper layout"):

- The ``epoch`` node names the one agent (``promoted_by``) allowed to be
  primary at that epoch. Only that agent may take the ``primary`` node, and
  it acts as primary only while it holds the node, at the current epoch,
  with a connected session.
- A primary whose session is SUSPENDED pauses (it cannot know whether its
  claim still exists); when the session is LOST it steps down, and after
  reconnecting it decides again from a fresh read.
- Nobody makes itself primary except by a promotion. Under
  ``failover = automatic`` a standby promotes itself only when no maintenance
  marker says the primary's agent was stopped on purpose (safety rule 7: an
  agent restart is not an outage), after the primary node has been gone for
  the grace period (longer for standbys further
  behind), within the lag limit, and not within the cooldown after the last
  promotion, so that a flapping primary cannot cause ping-pong.
"""

from __future__ import annotations

from dataclasses import dataclass

from drsync.coordination import Epoch, GroupView, SessionState

# Extra wait per rank for standbys that are further behind: a live standby at a newer position gets this
# long to take over before the next one tries, so the most current one wins an automatic failover (on a
# busy machine too) and another takes over only when it cannot (its fence command fails, it is frozen).
RANK_DELAY_S = 10.0


@dataclass(frozen=True)
class FailoverPolicy:
    automatic: bool = False
    max_lag_s: float = 900.0
    grace_s: float = 1.0
    cooldown_s: float = 300.0


@dataclass(frozen=True)
class RoleDecision:
    action: str  # act-primary | claim | pause | step-down | standby | promote-self
    reason: str

    def __str__(self) -> str:
        return f"{self.action} ({self.reason})"


def decide_role(me: str, view: GroupView, *, acting_primary: bool, policy: FailoverPolicy,
                primary_absent_s: float, lag_s: float | None, rank: int, epoch_age_s: float,
                agent_id: str = "", claimant_live: bool = False, fencing_ahead: str = "",
                held: bool = False, superseded: str = "", floor: int = 0,
                others_floor: tuple[str, int] = ("", 0)) -> RoleDecision:
    """What this agent should do now. ``agent_id`` is its persistent identity: an epoch that records
    another id names another agent of the same name, never this one. ``primary_absent_s`` is how
    long the primary node has been seen missing; ``lag_s`` this agent's lag (None before it applied
    anything; on the primary's clock); ``rank`` its place among the standbys ordered by how up to
    date they are (0 = the newest); ``epoch_age_s`` how long ago this agent first saw the current
    epoch, on its own clock (never a time another machine wrote), for the cooldown; ``claimant_live``
    whether the agent the current epoch names (not this one) has a live registration: it is taking the
    primary node (after a promotion, or back after a lost session), and nobody promotes over it;
    ``fencing_ahead`` names a live standby further ahead that is running its fence command to take over
    (see :func:`fencing_ahead`): this one waits for it whatever its rank delay says. ``held``: applies
    are held on this standby (an operator's hold or a guard's), so a take-over would serve its root as
    applied; the refusal then names the choices that fit a hold. ``superseded``: why this agent is a former
    primary that a later epoch replaced and that has not rejoined as a standby since ("" when it is not):
    its root is its own production as it left it, none of the later primary's changes, and what it applied
    before it was primary says nothing of them; it is never a candidate. ``floor``: the highest epoch this
    agent has seen (its state): a group epoch below it means ZooKeeper lost data or was rewritten, and this
    agent then takes no role action at all (a claim or promotion there could repeat an epoch another
    primary held: safety rule 1). ``others_floor``: the live agent whose registration reports the highest
    epoch it has seen, and that epoch: above the group's, this agent neither claims nor promotes itself (it
    may never have seen that epoch itself: added after ZooKeeper lost the group); an acting primary is not
    stepped down for another agent's word."""
    if view.session is SessionState.SUSPENDED:
        if acting_primary:
            return RoleDecision("pause", "ZooKeeper connection suspended: no shipping and no role actions "
                                         "until the session is confirmed")
        return RoleDecision("standby", "ZooKeeper connection suspended")
    if view.session is SessionState.LOST:
        if acting_primary:
            return RoleDecision("step-down", "ZooKeeper session lost: the primary claim is gone")
        return RoleDecision("standby", "no ZooKeeper session")
    epoch, primary = view.epoch, view.primary
    if epoch.epoch < floor:
        what = epoch_behind(epoch.epoch, floor)
        if acting_primary or (primary is not None and primary.mine):
            return RoleDecision("step-down", what)
        return RoleDecision("standby", what)
    impostor = epoch.epoch > 0 and epoch.promoted_by == me and not epoch.names(me, agent_id)
    if impostor:
        what = (f"epoch {epoch.epoch} names agent {me} with agent id {epoch.agent_id}, not this agent (agent id "
                f"{agent_id or 'none'}): another agent owns this name")
        if acting_primary or (primary is not None and primary.mine):
            return RoleDecision("step-down", what)
        return RoleDecision("standby", what)
    who, seen = others_floor
    behind = epoch_behind(epoch.epoch, seen, f"agent {who}") if seen > epoch.epoch else ""
    if epoch.names(me, agent_id):
        if primary is not None and primary.agent == me and primary.epoch == epoch.epoch and primary.mine:
            return RoleDecision("act-primary", f"holding the primary node at epoch {epoch.epoch}")
        if behind:
            return RoleDecision("standby", behind)
        if primary is None or primary.epoch < epoch.epoch or primary.agent == me:
            return RoleDecision("claim", f"epoch {epoch.epoch} names this agent")
        return RoleDecision("standby", f"agent {primary.agent} holds the primary node at epoch {primary.epoch}, "
                                       f"not below epoch {epoch.epoch}")
    if acting_primary or (primary is not None and primary.mine):
        who = epoch.promoted_by or "nobody"
        return RoleDecision("step-down", f"epoch {epoch.epoch} names {who}, not this agent")
    if primary is not None or epoch.epoch == 0 or not policy.automatic:
        return RoleDecision("standby", f"primary {primary.agent} at epoch {primary.epoch}" if primary else
                            "no primary; waiting for drsync promote" if epoch.epoch == 0 or not policy.automatic
                            else "waiting")
    # Automatic failover candidates only from here on.
    if view.maintenance:
        m = view.maintenance
        return RoleDecision("standby", f"primary node gone, but agent {m.get('agent')} is stopped on purpose "
                                       f"({m.get('reason') or 'maintenance'}): an agent stop is not a production "
                                       f"outage, so no automatic promotion")
    if claimant_live:
        return RoleDecision("standby", f"no primary node, but agent {epoch.promoted_by}, which epoch {epoch.epoch} "
                                       f"names, is live and taking it: no automatic promotion over a live agent "
                                       f"(promote by hand if it cannot take over)")
    if fencing_ahead:
        return RoleDecision("standby", f"primary gone; standby {fencing_ahead}, further ahead, is fencing the old "
                                       f"primary to take over: waiting for it")
    if superseded:
        return RoleDecision("standby", f"primary gone, but this agent {superseded}: its root holds none of the "
                                       f"later primary's changes, so it is not eligible (it becomes a candidate "
                                       f"once it has rejoined and applied; promote it by hand with "
                                       f"--accept-data-loss if it is all there is)")
    if lag_s is None:
        return RoleDecision("standby", "primary gone, but this agent has applied nothing: not eligible")
    if lag_s > policy.max_lag_s and held:
        return RoleDecision("standby", f"primary gone, but applies are held on this standby and its root is "
                                       f"{lag_s:.0f}s behind (max_lag_on_failover {policy.max_lag_s:.0f}s): "
                                       f"automatic failover refused; promote by hand with --delayed-state (the "
                                       f"root as it is) or --to-snapshot ID (drsync status --points), or lift the "
                                       f"hold with drsync apply --resume")
    if lag_s > policy.max_lag_s:
        return RoleDecision("standby", f"primary gone, but lag {lag_s:.0f}s exceeds max_lag_on_failover "
                                       f"{policy.max_lag_s:.0f}s: automatic failover refused, promote by hand "
                                       f"with --accept-data-loss if acceptable")
    if epoch_age_s < policy.cooldown_s:
        return RoleDecision("standby", f"primary gone, but the last promotion (epoch {epoch.epoch}) was seen "
                                       f"{epoch_age_s:.0f}s ago (cooldown {policy.cooldown_s:.0f}s)")
    wait = policy.grace_s + rank * RANK_DELAY_S
    if primary_absent_s < wait:
        return RoleDecision("standby", f"primary gone for {primary_absent_s:.1f}s of {wait:.1f}s grace")
    if behind:
        return RoleDecision("standby", behind)
    return RoleDecision("promote-self", f"primary gone for {primary_absent_s:.1f}s, lag {lag_s:.1f}s within "
                                        f"{policy.max_lag_s:.0f}s")


def highest_reported_epoch(me: str, agents: dict[str, dict[str, object]]) -> tuple[str, int]:
    """The live agent other than ``me`` whose registration reports the highest epoch it has seen, and that
    epoch; ("", 0) when none reports one. Pure."""
    reported = [(n, r["epoch"]) for n, r in agents.items() if n != me and type(r.get("epoch")) is int]
    return max(reported, key=lambda x: x[1], default=("", 0))


def epoch_behind(epoch: int, floor: int, who: str = "this agent") -> str:
    """Why nothing may change roles while the group's epoch in ZooKeeper (``epoch``) is below the highest
    one ``who`` has seen (``floor``). Pure."""
    return (f"ZooKeeper's epoch {epoch} is below epoch {floor}, which {who} has already seen: ZooKeeper lost "
            f"data, or was restored or edited; no promotion, claim or switchover until the epoch node is repaired "
            f"(docs/operations.md, 'A damaged or lost epoch')")


def superseded_reason(*, last_role: str, primary_epoch: int, epoch: int) -> str:
    """Why an agent is a former primary that epoch ``epoch`` replaced and that has not rejoined as a standby
    since (``last_role`` is still "primary"), or "" when it is not. Pure."""
    if last_role == "primary" and 0 < primary_epoch < epoch:
        return f"was primary at epoch {primary_epoch}, epoch {epoch} replaced it, and it has not rejoined since"
    return ""


def promotion_refusal(*, lag_s: float | None, applied_captured_at: float, max_lag_s: float,
                      accept_data_loss: bool, first_promotion: bool, received: bool = False) -> str | None:
    """Why a manual promotion must be refused for its lag, or None. ``received``: ``lag_s`` is the received
    lag (``promote --delayed-state``: the snapshots received and not applied stay in the repository, so
    only what was never received is lost). Pure."""
    if first_promotion or accept_data_loss:
        return None
    if lag_s is None:
        return ("this agent has never applied a snapshot: promoting it would lose all of the primary's data; "
                "rerun with --accept-data-loss only if that is intended")
    if lag_s > max_lag_s:
        what = ("the newest snapshot this standby received was captured" if received else
                "the last applied snapshot was captured")
        return (f"{'received lag' if received else 'lag'} is {format_span(lag_s)} ({what} {format_span(lag_s)} "
                f"ago), over max_lag_on_failover {format_span(max_lag_s)}: promoting would lose every change made "
                f"on the primary in the last {format_span(lag_s)}; rerun with --accept-data-loss to promote anyway")
    return None


def format_span(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def applied_position(record: dict[str, object]) -> tuple[int, int]:
    """Where an agent's applied snapshot stands: (epoch of its sender, its seq in the sender's repository),
    from the agent's record; (0, 0) when it has applied nothing or does not say. Pure."""
    v = record.get("applied_position")
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    return 0, 0


def candidate_rank(me: str, agents: dict[str, dict[str, object]]) -> int:
    """This agent's place among registered standbys, furthest applied position first (a later epoch beats
    any seq of an earlier one). Never by capture times: they come from other machines' clocks. Pure."""
    standbys = sorted((n for n, r in agents.items() if r.get("role") == "standby" or n == me),
                      key=lambda n: (tuple(-x for x in applied_position(agents.get(n, {}))), n))
    return standbys.index(me) if me in standbys else len(standbys)


def claimant_live(me: str, epoch: Epoch, agents: dict[str, dict[str, object]]) -> bool:
    """Whether another agent that the epoch names has a live registration (``agents``: the group's live
    records by name). A record without an ``agent_id`` counts by its name. Pure."""
    other = epoch.promoted_by
    if not other or other == me or other not in agents:
        return False
    return epoch.names(other, str(agents[other].get("agent_id") or epoch.agent_id or ""))


def fencing_ahead(me: str, epoch: int, agents: dict[str, dict[str, object]]) -> str:
    """The name of a live standby placed ahead of this agent (as :func:`candidate_rank` orders them) whose
    record says it is fencing the old primary at ``epoch`` to promote itself, or "". Pure."""
    mine = tuple(-x for x in applied_position(agents.get(me, {})))
    for name, r in sorted(agents.items()):
        if name == me or r.get("role") != "standby":
            continue
        t = r.get("takeover")
        if not (isinstance(t, dict) and t.get("state") == "fencing" and t.get("epoch") == epoch):
            continue
        if (tuple(-x for x in applied_position(r)), name) < (mine, me):
            return name
    return ""
