"""A planned switchover, carried out by the primary that hands over (``drsync switchover``).

Hook, quiescence proven, final snapshot shipped and applied, then the roles swap in
one ZooKeeper transaction guarded by the epoch version this agent's claim was taken
at. Runs on the agent's loop thread (called by the supervisor's pass).
"""

from __future__ import annotations

import logging
import time

from drsync import engine, faults
from drsync.agent.shipper import CycleDecision, Replication
from drsync.agent.supervisor import RoleSupervisor
from drsync.coordination import EpochConflict, GroupView
from drsync.errors import DrsyncError, OperationFailed
from drsync.text import printable

log = logging.getLogger("drsync.agent")


def carry_out(sup: RoleSupervisor, replication: Replication, view: GroupView) -> None:
    """Carry out the switchover ``view`` asks for, if this primary is the one to do it."""
    coord = sup.coord
    assert coord is not None
    req = view.switchover or {}
    if req.get("status") != "requested" or req.get("from") not in (None, "", sup.name):
        return
    to = str(req.get("to", ""))
    doc = dict(req)
    target = coord.agents().get(to)
    if to == sup.name or target is None or target.get("role") != "standby" or not target.get("address"):
        doc.update(status="failed", error=f"agent {to!r} is not a registered standby of group {coord.group}; "
                                          f"nothing was changed")
        coord.update_switchover(doc)
        return
    doc.update({"status": "running", "from": sup.name, "started_at": time.time()})
    coord.update_switchover(doc)
    log.warning("agent %s: switchover to %s started", sup.name, to)
    address = str(target["address"])
    hook = sup.cfg.coordination.switchover_hook
    try:
        if hook:
            engine.run_hook("pre-switchover", hook, {"DRSYNC_SWITCHOVER_TO": to, "DRSYNC_DATA": sup.data_root},
                            sup.cfg.snapshots.hook_timeout)
        final = ship_until_quiescent(sup, replication, address, to)
        sup.guard(True)
        if sup.claim is None:
            raise EpochConflict(f"{sup.name} holds no primary claim to hand over")
        new = coord.hand_over(sup.claim, sup.name, to, history={
            "from": sup.name, "why": "switchover", "by": str(req.get("operator") or f"agent {sup.name}"),
            "detail": f"planned hand-over carried out by {sup.name}; final snapshot {final.snapshot}",
            "snapshot": final.snapshot}, to_agent_id=str(target.get("agent_id") or ""))
    except DrsyncError as e:
        why = (f"a promotion or a lost session came first, and it stands: {e}" if isinstance(e, EpochConflict)
               else str(e))
        doc.update(status="failed", error=f"{why}; {sup.name} stays primary unless the group says otherwise" +
                   (" (the pre-switchover hook has run: undo what it did)" if hook else ""))
        coord.update_switchover(doc)
        log.error("agent %s: switchover to %s failed: %s", sup.name, to, why)
        sup.wake()
        return
    sup.step_down(f"switchover to {to} at epoch {new.epoch}")
    # The root holds the final snapshot (quiescence proven): it is what is applied here. Anything
    # written after it is kept in a snapshot when this agent rejoins, never silently overwritten.
    sup.switchover_final = final.snapshot
    sup.switchover_hooked = bool(hook)
    captured = replication.positions().get(address)
    try:
        seq = sup.repo.find_snapshot(final.snapshot).seq
    except DrsyncError:
        seq = 0
    # Captured here, on this clock, at the epoch this agent shipped it at.
    sup.store.update(applied_snapshot=final.snapshot,
                     applied_captured_at=captured.captured_at if captured else time.time(),
                     applied_at=time.time(), applied_position=(new.epoch - 1, seq))
    if sup.receiver is not None:
        sup.receiver.reset_clock(sup.name)
    else:
        sup.store.update(clock_offset_s=0.0, clock_source=sup.name)
    if sup.cfg.coordination.demote_command.strip():
        sup.demote("switchover")
    faults.pause("switchover-handed-over")  # tests: handed over, the request not yet marked so
    doc.update(status="handed-over", epoch=new.epoch, final_snapshot=final.snapshot, handed_over_at=time.time())
    coord.update_switchover(doc)
    log.warning("agent %s: switchover: handed over to %s at epoch %d after final snapshot %s", sup.name, to,
                new.epoch, final.snapshot)


def ship_until_quiescent(sup: RoleSupervisor, replication: Replication, address: str, to: str) -> CycleDecision:
    """Ship the final snapshot, then capture again until a capture finds no change (production is
    quiet), at most coordination.switchover_quiesce_attempts times; OperationFailed naming the
    changing paths otherwise. Returns the cycle of the last (unchanged) snapshot."""
    def ship() -> CycleDecision:
        cycle = replication.run_cycle([address])
        if not cycle.ok or cycle.paused:  # a paused target has not got the final snapshot either
            outcome = cycle.shipped.get(address, "not shipped")
            raise OperationFailed(f"the final snapshot did not reach {to}: {outcome}")
        return cycle

    attempts = max(1, sup.cfg.coordination.switchover_quiesce_attempts)
    cycle = ship()
    changed: list[str] = []
    for _ in range(attempts):
        again = ship()
        changed = sup.changed_paths(cycle.snapshot, again.snapshot)
        if not changed:
            return again
        cycle = again
    shown = ", ".join(printable(p) for p in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                                              else "")
    raise OperationFailed(f"production did not stop changing: {attempts} captures in a row after the final one "
                          f"found changes (last: {shown}); stop its writers (or set coordination.switchover_hook "
                          f"to do it) and retry")
