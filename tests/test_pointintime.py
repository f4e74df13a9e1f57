"""Damage that replicated: promote a standby at an earlier snapshot, and a standby that applies late.

Real agents with ZooKeeper roles (tests/group.py); production is damaged the way a bad batch job or an
encryption sweep does it (files rewritten in place, a few deleted), the damage reaches the standby, and
the operator recovers from the standby's own history.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from drsync import engine
from drsync.agent.committer import delayed_until
from drsync.agent.pointintime import RecoveryPoint, choose_point, newer_than, parse_before, recovery_points
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import AgentState, StateStore
from drsync.errors import UsageError
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage.local import LocalStorage
from drsync.transport import Caller, ReceivedChunk
from tests.conftest import make_tree, tree_state
from tests.group import Group, scrape, wait_for

KEEP_ALL = '[snapshots]\nkeep = { last = 1000 }\n'  # retention out of the way (protect is tested elsewhere)


def _damage(root: Path) -> None:
    """Damage small enough to pass the standby's guards (a bad job rewrote a quarter of the files, deleted
    one and left a note): it replicates, and only the standby's history can undo it."""
    for p in sorted((root / "catalog").glob("f0*.txt"))[:6]:
        p.write_bytes(b"ENCRYPTED" + os.urandom(64))
    (root / "catalog" / "f019.txt").unlink()
    (root / "README-RANSOM.txt").write_text("pay up\n")


def _synced(make_group, **kw) -> Group:  # type: ignore[no-untyped-def]
    """east primary at epoch 1 and west its standby, in sync with an applied snapshot."""
    g: Group = make_group(["east", "west"], **kw)
    for n in g.names:
        g.start(n)
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.hello("west").applied_snapshot, "west's first sync")
    return g


def _state(g: Group, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((g.tmp / f"{name}-repo" / "agent" / "state.json").read_text())


def _unchanged_after_kill(g: Group) -> bool:
    """Nothing was promoted since east (primary at epoch 1) was killed: the epoch is 1 still, and the primary
    node names east or (its session expired meanwhile) nobody."""
    return g.connected().read_epoch().epoch == 1 and g.primary() in (("east", 1), None)


def _repo(g: Group, name: str) -> Repository:
    return Repository.open(LocalStorage(str(g.tmp / f"{name}-repo")))


def _received_holding(g: Group, name: str, path: str) -> str:
    """The snapshot agent ``name`` last received, when it holds ``path`` ("" otherwise: the caller asks again)."""
    sid = _state(g, name).get("received_snapshot")
    if not sid:
        return ""
    repo = _repo(g, name)
    paths = {os.fsdecode(p) for p in repo.load_manifest(repo.find_snapshot(sid)).pycolumn("path")}
    return str(sid) if path in paths else ""


def _receives_the_primarys_newest(g: Group, primary: str, standby: str) -> bool:
    """Whether the snapshot ``standby`` last received is the newest ``primary`` took (read in this order: a
    capture in between makes it false, and the caller asks again)."""
    newest = _repo(g, primary).list_snapshots()[-1].id
    return bool(_state(g, standby).get("received_snapshot") == newest)


def test_promote_at_an_earlier_snapshot_after_damage_replicated(make_group) -> None:  # type: ignore[no-untyped-def]
    g = _synced(make_group, extra=KEEP_ALL)
    good_tree = tree_state(g.data["east"])
    good = g.hello("west").applied_snapshot
    _damage(g.data["east"])
    damaged = g.wait_synced("east", "west", "the damage to reach west", after=good)
    g.kill("east", signal.SIGKILL)  # production is lost too (or must not be trusted)
    points = g.drsync("west", "status", "--points", "--json")
    assert points.code == 0, points.err
    listed = {p["id"]: p for p in json.loads(points.out)["points"]}
    assert listed[good]["state"] == "stored" and listed[damaged]["state"] == "applied"
    st = g.status("west")  # the group view says how many points this agent holds, and names the command
    assert st["recovery_points"]["count"] == len(listed) and "newest_captured_at_unix" in st["recovery_points"]
    assert "drsync status --points" in g.drsync("west", "status").out
    # A dry run names the point and changes nothing.
    dry = g.promote("west", "--to-snapshot", good, "--dry-run", "--force")
    assert dry.code == 0, dry.err
    assert json.loads(dry.out)["point"]["id"] == good and _unchanged_after_kill(g)
    assert tree_state(g.data["west"]) != good_tree
    r = g.promote("west", "--to-snapshot", good, "--force")  # east's session may linger after kill -9
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["applied_snapshot"] == good and damaged in doc["newer_kept"] and doc["epoch"] == 2
    assert g.primary() == ("west", 2)
    assert tree_state(g.data["west"]) == good_tree  # the root is the chosen snapshot, nothing else
    listed = [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
    assert good in listed and damaged in listed  # the newer ones are kept
    hist = g.drsync("west", "history", "--json").json()
    assert hist[0]["to"] == "west" and hist[0]["snapshot"] == good and f"at snapshot {good}" in hist[0]["detail"]


def test_point_choices_are_refused_with_a_reason(make_group) -> None:  # type: ignore[no-untyped-def]
    g = _synced(make_group, extra=KEEP_ALL)
    r = g.promote("west", "--to-snapshot", "nosuchsnapshot", "--force")
    assert r.code == 2 and "is not a snapshot this standby holds" in r.err and len(r.err.strip().splitlines()) == 1
    r = g.promote("west", "--before", "2001-01-01T00:00:00Z", "--force")
    assert r.code == 2 and "no snapshot it stored at or before 2001-01-01" in r.err
    r = g.promote("west", "--before", "yesterday-ish", "--force")
    assert r.code == 2 and "ISO 8601" in r.err
    assert g.primary() == ("east", 1)  # nothing changed


@pytest.mark.parametrize("choice", ["--apply-received", "--delayed-state"])
def test_a_delayed_standby_stores_at_once_and_applies_late(make_group, choice: str) -> None:  # type: ignore[no-untyped-def]
    g = _synced(make_group, extra=KEEP_ALL, replication='apply_delay = "1h"')
    before = tree_state(g.data["west"])
    applied = g.hello("west").applied_snapshot
    (g.data["east"] / "catalog" / "late.txt").write_text("written after the first sync\n")
    wait_for(lambda: _state(g, "west").get("pending"), "west to store a shipment it applies later")
    # What it received is current: the newest snapshot the primary took, the change in it.
    wait_for(lambda: _receives_the_primarys_newest(g, "east", "west"), "west to receive east's newest snapshot")
    received = wait_for(lambda: _received_holding(g, "west", "catalog/late.txt"), "west to receive the change")
    m = scrape(g.metrics["west"], g.group, "west")
    assert m["drsync_apply_delay_seconds"] == 3600 and m["drsync_pending_applies"] >= 1
    assert m["drsync_replication_received_lag_seconds"] <= m["drsync_replication_lag_seconds"]
    # The primary counts the delay as expected: its lag minus the standby's delay is what alerts see.
    wait_for(lambda: scrape(g.metrics["east"], g.group, "east").get("drsync_apply_delay_seconds") == 3600,
             "east to learn west's apply_delay")
    assert tree_state(g.data["west"]) == before and g.hello("west").applied_snapshot == applied
    g.kill("east", signal.SIGKILL)
    r = g.promote("west", "--force")
    assert r.code == 2 and "--apply-received" in r.err and "--delayed-state" in r.err, r.err
    assert _unchanged_after_kill(g)
    r = g.promote("west", "--force", choice)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    if choice == "--apply-received":
        newest = _state(g, "west")["applied_snapshot"]
        assert (g.data["west"] / "catalog" / "late.txt").exists() and doc["applied_snapshot"] == newest
        assert tree_state(g.data["west"]) == tree_state(g.data["east"])
        assert received in [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
    else:
        assert tree_state(g.data["west"]) == before and doc["applied_snapshot"] == applied
        assert received in [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
    assert g.primary() == ("west", 2) and _state(g, "west")["pending"] == []


def test_a_delayed_standby_is_promoted_at_a_received_snapshot_it_has_not_applied(make_group) -> None:  # type: ignore[no-untyped-def]
    """apply_delay = 1h: a snapshot west received (stored, pending) but has not applied is a recovery point
    too. Production changes (good), then is damaged; both reach west's repository, neither its root. West
    is promoted at the good received snapshot: its root is production's tree as it was then, and the
    newer received snapshots (the damage) are kept and named."""
    g = _synced(make_group, extra=KEEP_ALL, replication='apply_delay = "1h"')
    applied = g.hello("west").applied_snapshot
    (g.data["east"] / "catalog" / "late.txt").write_text("a good change, received and not applied yet\n")
    point = wait_for(lambda: _received_holding(g, "west", "catalog/late.txt"), "west to receive the change")
    good_tree = tree_state(g.data["east"])  # production as the point holds it (nothing changed since)
    _damage(g.data["east"])
    damaged = wait_for(lambda: _received_holding(g, "west", "README-RANSOM.txt"), "west to receive the damage")
    assert g.hello("west").applied_snapshot == applied and tree_state(g.data["west"]) != good_tree
    listed = {p["id"]: p["state"] for p in json.loads(g.drsync("west", "status", "--points", "--json").out)["points"]}
    assert listed[applied] == "applied" and listed[point] == "pending" and listed[damaged] == "pending"
    g.kill("east", signal.SIGKILL)  # production must not be trusted
    r = g.promote("west", "--to-snapshot", point, "--force")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["applied_snapshot"] == point and damaged in doc["newer_kept"] and point not in doc["newer_kept"]
    assert g.primary() == ("west", 2)
    assert tree_state(g.data["west"]) == good_tree  # the received point, applied from west's own repository
    kept = [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
    assert point in kept and damaged in kept and set(doc["newer_kept"]) <= set(kept)
    assert _state(g, "west")["pending"] == []


def test_a_delayed_snapshot_reaches_the_root_once_old_enough(make_group) -> None:  # type: ignore[no-untyped-def]
    g = _synced(make_group, replication='apply_delay = "3s"')
    first = _state(g, "west")["applied_snapshot"]
    (g.data["east"] / "catalog" / "late.txt").write_text("applied three seconds after capture\n")
    # The root shows the file a moment before the apply is recorded: wait for both.
    wait_for(lambda: (g.data["west"] / "catalog" / "late.txt").exists() and
             _state(g, "west")["applied_snapshot"] != first, "the delayed apply")
    st = _state(g, "west")
    # Applied no earlier than the delay after capture (one machine: both clocks are this one).
    assert st["applied_at"] >= st["applied_captured_at"] + 3.0


def test_recovery_points_are_chosen_by_id_prefix_name_or_time() -> None:
    def snap(i: int, at: float, name: str = "") -> SnapshotInfo:
        return SnapshotInfo(id=f"abcdef{i:02d}" + "0" * 56, captured_at=at, cluster_id="c", release="1",
                            manifest_hash="", name=name, seq=i, kind="received")

    snaps = [snap(1, 100.0), snap(2, 200.0, "nightly"), snap(3, 300.0), snap(4, 400.0)]
    other = SnapshotInfo(id="ff" * 32, captured_at=250.0, cluster_id="elsewhere", release="1", manifest_hash="")
    state = AgentState(applied_snapshot=snaps[3].id, pending=((snaps[2].id, 300.0, (1, 3)),))
    stored = {s.id: s.captured_at for s in [*snaps, other]}  # stored as captured (one honest machine)
    pts = recovery_points([*snaps, other], state, cluster_id="c", held="", stored_at=stored)
    assert [p.state for p in pts] == ["stored", "stored", "pending", "applied"]  # other clusters left out
    assert choose_point(pts, to_snapshot=snaps[0].id).id == snaps[0].id
    assert choose_point(pts, to_snapshot=snaps[1].id[:8]).id == snaps[1].id
    assert choose_point(pts, to_snapshot="nightly").id == snaps[1].id
    assert choose_point(pts, before=299.0).id == snaps[1].id and choose_point(pts, before=300.0).id == snaps[2].id
    assert [p.id for p in newer_than(pts, pts[1])] == [snaps[2].id, snaps[3].id]
    with pytest.raises(UsageError, match="ambiguous"):
        choose_point(pts, to_snapshot="abcdef")  # a prefix of every one
    with pytest.raises(UsageError, match="not a snapshot this standby holds"):
        choose_point(pts, to_snapshot="abc")  # too short to be taken as a prefix
    with pytest.raises(UsageError, match="no snapshot it stored at or before"):
        choose_point(pts, before=50.0)
    assert isinstance(pts[0], RecoveryPoint)


def test_points_are_ordered_and_chosen_by_the_standbys_arrival_not_a_backdated_capture() -> None:
    """A hostile primary ships damaged snapshots whose documents claim old capture times. The standby orders
    its points by its own arrival (repository sequence) and --before judges by when it stored each one: the
    backdated damage is neither picked by --before nor left out of the snapshots kept newer than the point."""
    def snap(i: int, captured: float) -> SnapshotInfo:
        return SnapshotInfo(id=f"{i:02d}" + "0" * 62, captured_at=captured, cluster_id="c", release="1",
                            manifest_hash="", seq=i, kind="received")

    good1, good2 = snap(1, 100.0), snap(2, 200.0)
    damaged1 = snap(3, 50.0)  # claims a capture before every good one
    damaged2 = snap(4, 240.0)  # claims a capture before the operator's --before time (250)
    late = snap(5, 260.0)  # listed, but its stored time is not known yet (committed after the listing)
    stored = {good1.id: 110.0, good2.id: 210.0, damaged1.id: 310.0, damaged2.id: 410.0}
    state = AgentState(applied_snapshot=damaged2.id)
    pts = recovery_points([damaged2, late, good1, damaged1, good2], state, cluster_id="c", stored_at=stored)
    assert [p.id for p in pts] == [good1.id, good2.id, damaged1.id, damaged2.id, late.id]  # arrival order
    assert pts[0].as_dict()["stored_at"] == 110.0 and pts[-1].as_dict()["stored_at"] is None
    # By capture time, 250 would pick damaged2 (captured 240, the newest capture at or before it); by the
    # standby's own stored time it is good2, the newest snapshot stored at or before 250.
    assert choose_point(pts, before=250.0).id == good2.id
    assert choose_point(pts, before=209.9).id == good1.id
    assert choose_point(pts, before=10_000.0).id == damaged2.id  # the unknown stored time counts as now
    # Every snapshot that arrived after the point is kept and named, the backdated one too.
    assert [p.id for p in newer_than(pts, pts[1])] == [damaged1.id, damaged2.id, late.id]
    assert newer_than(pts, pts[-1]) == []
    with pytest.raises(UsageError, match="stored at or before"):
        choose_point(pts, before=105.0)  # good1 was captured before 105 but stored after it


def test_before_takes_iso_unix_or_a_span_ago() -> None:
    now = 1_800_000_000.0
    assert parse_before("2h", now) == now - 7200
    assert parse_before("1700000000", now) == 1_700_000_000.0
    assert parse_before("2026-12-01T09:00:00Z", now) == 1_796_115_600.0
    assert parse_before("2026-12-01T10:00:00+01:00", now) == 1_796_115_600.0
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_before("tuesday", now)


def test_a_drill_rehearses_a_promotion_at_an_earlier_point(make_group) -> None:  # type: ignore[no-untyped-def]
    g = _synced(make_group, extra=KEEP_ALL)
    good = g.hello("west").applied_snapshot
    _damage(g.data["east"])
    wait_for(lambda: g.in_sync("east", "west"), "the damage to reach west")
    damaged_root = tree_state(g.data["west"])
    r = g.drsync("west", "drill", "run", "--to-snapshot", good, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    steps = {s["name"]: s for s in rep["steps"]}
    assert rep["point_in_time"] is True and rep["snapshot"] == good and rep["passed"] is True
    assert steps["verify"]["figures"]["checked"] == steps["verify"]["figures"]["chunks"] > 0
    assert "a promotion at this point would start from them" in steps["restore"]["detail"]
    assert steps["promotion"]["passed"] and rep["rpo_s"] is not None
    assert tree_state(g.data["west"]) == damaged_root and g.primary() == ("east", 1)  # nothing changed
    r = g.drsync("west", "drill", "run", "--to-snapshot", "nosuch", "--json")
    assert r.code == 1 and "nosuch" in r.err


def test_a_switchover_to_a_delayed_standby_loses_nothing(make_group) -> None:  # type: ignore[no-untyped-def]
    """The final snapshot of a switchover reaches a delayed standby's root before it takes over: the
    zero-loss promise holds whatever apply_delay says. Both keep [snapshots] protect: the old primary
    rejoins all the same (the copy of its root it takes first is kept, not deleted)."""
    g = _synced(make_group, interval="1h", replication='apply_delay = "1h"', extra='[snapshots]\nprotect = "1h"\n')
    (g.data["east"] / "catalog" / "last-minute.txt").write_text("written just before the switchover\n")
    production = tree_state(g.data["east"])
    r = g.drsync("west", "switchover", "--json")
    assert r.code == 0, r.err
    assert g.primary() == ("west", 2)
    assert tree_state(g.data["west"]) == production and _state(g, "west")["pending"] == []
    r = g.drsync("east", "rejoin")  # no demote_command or switchover_hook: the operator confirms
    assert r.code == 0, r.err
    g.wait_role("east", "standby")
    names = [s["name"] for s in g.drsync("east", "snapshot", "list", "--json").json()]
    assert any(n.startswith("before-rejoin") for n in names), names  # protected: kept


def test_an_agent_killed_during_a_point_promotion_changes_no_epoch(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the standby while it prepares a promotion at an earlier point: the command ends (exit 1,
    saying so) instead of waiting for hours, the epoch does not move, and the restarted standby holds
    applies until an operator resumes them."""
    import subprocess
    import sys

    pause = tmp_path / "pause"
    pause.mkdir()
    g: Group = make_group(["east", "west"], extra=KEEP_ALL)
    g.start("east")
    g.start("west", env={**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)})
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.hello("west").applied_snapshot, "west to sync")
    good = g.hello("west").applied_snapshot
    _damage(g.data["east"])
    wait_for(lambda: g.in_sync("east", "west"), "the damage to reach west")
    (pause / "point-apply").touch()
    cmd = subprocess.Popen([sys.executable, "-m", "drsync", "promote", "--to-snapshot", good, "--force", "--config",
                            str(g.cfg["west"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (pause / "point-apply.reached").exists(), "west to reach the point apply")
        g.kill("west", signal.SIGKILL)
        _, err = cmd.communicate(timeout=120)
    finally:
        cmd.kill()
    assert cmd.returncode == 1 and "stopped while carrying out" in err, err
    assert g.primary() == ("east", 1) and g.connected().read_epoch().epoch == 1
    (pause / "point-apply").unlink()
    g.start("west")
    wait_for(lambda: _state(g, "west").get("applied_snapshot"), "west to start again")
    r = g.drsync("west", "apply", "--json")
    assert r.code == 0 and json.loads(r.out).get("operator_hold"), r.out


# --- apply_delay counts from when the standby stored a snapshot ------------------------------------------

HOUR = 3600.0


def test_the_delay_runs_from_when_the_standby_stored_a_snapshot_and_from_its_capture() -> None:
    now = 1_800_000_000.0
    # A document that claims a capture two hours ago, stored now: due an hour from now, not at once.
    assert delayed_until(now - 2 * HOUR, now, HOUR, 0.0) == now + HOUR
    # Captured a minute before it was stored: the later of the two counts.
    assert delayed_until(now - 60, now, HOUR, 0.0) == now + HOUR
    # A capture time ahead of the storing (on the primary's clock, 10 minutes ahead of this one): it was
    # captured a moment before storing, due an hour after.
    assert delayed_until(now + 600 - 1, now, HOUR, 600.0) == now + HOUR
    # A capture time in the future by this machine's estimate of the primary's clock: the delay counts
    # from it (a shipment is never applied before it is delay old on either clock).
    assert delayed_until(now + HOUR, now, HOUR, 0.0) == now + 2 * HOUR
    # Stored long ago (an hour and more waiting): due now if captured long ago too.
    assert delayed_until(now - 3 * HOUR, now - 2 * HOUR, HOUR, 0.0) == now - HOUR
    # Pending entries written before the stored time was kept read as stored when read: later, never sooner.
    st = AgentState.from_doc({"epoch": 0, "pending": [["a" * 16, now - 2 * HOUR, [1, 5]]]})
    assert st.pending[0][:3] == ("a" * 16, now - 2 * HOUR, (1, 5)) and st.pending[0][3] >= time.time() - 60


def _ship(primary: Repository, taken: SnapshotInfo, rx: StandbyReceiver, caller: Caller, doc: bytes) -> str:
    """Ship snapshot ``taken`` of ``primary`` to ``rx`` the way the gRPC servicer does (chunks, then the commit
    of document ``doc``); returns the id the standby stored."""
    manifest = primary.load_manifest(taken)
    ids = list(manifest.chunk_ids())
    stored = [primary.read_stored(cid) for cid in ids]
    rx.receive(caller, iter([[ReceivedChunk(cid, loc.encoding, loc.raw_length, bytes(data))
                              for cid, (loc, data) in zip(ids, stored, strict=True)]]))
    info, _ = rx.commit(caller, doc, primary.storage.read(f"manifests/{taken.id}.parquet"), sender_seq=taken.seq)
    return info.id


def test_a_backdated_snapshot_waits_the_whole_delay_on_the_standby(tmp_path: Path) -> None:
    """A primary (valid epoch) ships a snapshot whose document claims it was captured two hours ago to a
    standby with apply_delay = 1h: the standby stores it and queues it for an hour from when it stored it,
    its root unchanged; it comes due only once that hour has passed on the standby's clock."""
    prod = tmp_path / "prod"
    make_tree(prod, files=10, big=0)
    primary = Repository.init(LocalStorage(str(tmp_path / "prod-repo"), create=True), cluster_id="c", release="1")
    first = engine.create_snapshot(primary, engine.SnapshotRequest(str(prod), kind="cycle"))
    (prod / "ransom-note.txt").write_text("pay up\n")
    second = engine.create_snapshot(primary, engine.SnapshotRequest(str(prod), kind="cycle"))
    standby_repo = Repository.init(LocalStorage(str(tmp_path / "standby-repo"), create=True), cluster_id="c",
                                   release="1")
    data = tmp_path / "standby-data"
    data.mkdir()
    store = StateStore(str(tmp_path / "state"))
    rx = StandbyReceiver(standby_repo, str(data), store, agent="standby", apply_delay_s=HOUR)
    try:
        caller = Caller(sender="primary", epoch=1, sent_at=time.time(), received_at=time.time(), instance="i1")
        assert _ship(primary, first, rx, caller, first.to_bytes()) == first.id  # the first is applied at once
        assert store.current.applied_snapshot == first.id
        applied_tree = tree_state(data)
        backdated = dataclasses.replace(second, captured_at=time.time() - 2 * HOUR)
        before = time.time()
        assert _ship(primary, second, rx, caller, backdated.to_bytes()) == second.id
        st = store.current
        assert st.applied_snapshot == first.id and tree_state(data) == applied_tree  # queued, not applied
        assert [p[0] for p in st.pending] == [second.id] and st.pending[0][3] >= before
        assert rx.committer.apply_due() == "" and tree_state(data) == applied_tree
        # While an operator holds applies, not even a take-over's "apply everything received" (an automatic
        # failover) applies it (docs/operations.md section 13c).
        rx.hold_applies()
        assert rx.committer.apply_due(everything=True) == "" and tree_state(data) == applied_tree
        rx.resume()
        assert [p[0] for p in store.current.pending] == [second.id]
        # An hour after the standby stored it (its own clock), it comes due.
        store.update(pending=tuple((p[0], p[1], p[2], p[3] - HOUR) for p in st.pending))
        assert rx.committer.apply_due() == second.id
        assert store.current.applied_snapshot == second.id and store.current.pending == ()
        assert (data / "ransom-note.txt").exists() and tree_state(data) == tree_state(prod)
    finally:
        rx.close()


# --- a delayed standby takes over: its delay does not count against max_lag_on_failover ---------------------

DELAYED = 'apply_delay = "1h"'


def _applied_older_than(g: Group, name: str, seconds: float) -> bool:
    """Whether agent ``name``'s applied snapshot was captured more than ``seconds`` ago (its applied lag, which
    on a delayed standby grows with the delay, is over a limit of that many seconds)."""
    captured = g.hello(name).applied_captured_at
    return bool(captured) and captured < time.time() - seconds


def test_a_delayed_standby_fails_over_automatically_with_what_it_received(make_group) -> None:  # type: ignore[no-untyped-def]
    """apply_delay = 1h, max_lag_on_failover = 15s: west's applied lag passes 15s while what it received is
    current. Production dies; west takes over by itself (its received lag is within the limit), applying
    everything it received first (docs/operations.md section 4 and 13c): its root is the last snapshot it
    received, production's tree."""
    g = _synced(make_group, session_timeout="2s", failover="automatic", replication=DELAYED,
                extra='failover_cooldown = "0s"\nfence_command = "none"\nmax_lag_on_failover = "15s"\n' + KEEP_ALL)
    applied = g.hello("west").applied_snapshot
    (g.data["east"] / "catalog" / "late.txt").write_text("received, applied only when west takes over\n")
    wait_for(lambda: _received_holding(g, "west", "catalog/late.txt"), "west to receive the change")
    wait_for(lambda: _applied_older_than(g, "west", 16), "west's applied lag to pass max_lag_on_failover")
    assert g.hello("west").applied_snapshot == applied and not (g.data["west"] / "catalog" / "late.txt").exists()
    g.kill("east", signal.SIGKILL)
    wait_for(lambda: g.primary() == ("west", 2), "west to take over by itself")
    st = _state(g, "west")
    assert st["applied_snapshot"] == st["received_snapshot"] and st["pending"] == []
    assert tree_state(g.data["west"]) == tree_state(g.data["east"])  # the last received snapshot, production's
    assert "automatic failover refused" not in g.log("west")
    hist = g.drsync("west", "history", "--json").json()
    assert hist[0]["to"] == "west" and "automatic failover" in json.dumps(hist[0])


def test_a_delayed_state_is_promoted_after_the_delay_passed_max_lag(make_group) -> None:  # type: ignore[no-untyped-def]
    """--delayed-state judges what the standby received, not its applied lag (which includes the delay): with
    the applied lag over max_lag_on_failover and what it received current, the promotion goes through, its
    root stays at the delayed state and the received snapshots stay in its repository."""
    g = _synced(make_group, replication=DELAYED, extra='max_lag_on_failover = "10s"\n' + KEEP_ALL)
    before = tree_state(g.data["west"])
    applied = g.hello("west").applied_snapshot
    (g.data["east"] / "catalog" / "late.txt").write_text("received, not applied\n")
    received = wait_for(lambda: _received_holding(g, "west", "catalog/late.txt"), "west to receive the change")
    wait_for(lambda: _applied_older_than(g, "west", 11), "west's applied lag to pass max_lag_on_failover")
    g.kill("east", signal.SIGKILL)
    dry = g.promote("west", "--force", "--delayed-state", "--dry-run")
    assert dry.code == 0, dry.out
    lag = next(c for c in json.loads(dry.out)["checks"] if c["name"] == "lag")
    assert lag["ok"] and lag["detail"].startswith("received lag") and f"applied snapshot {applied}" in lag["detail"]
    r = g.promote("west", "--force", "--delayed-state")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["applied_snapshot"] == applied and doc["data_loss_accepted"] is False
    assert g.primary() == ("west", 2) and tree_state(g.data["west"]) == before
    assert received in [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]


def test_a_held_standby_judges_its_applied_lag_for_failover(tmp_path: Path) -> None:
    """An automatic failover applies everything a standby received, unless applies are held (an operator, a
    guard): then it would serve its applied root, so that lag is what max_lag_on_failover judges."""
    prod = tmp_path / "prod"
    make_tree(prod, files=5, big=0)
    primary = Repository.init(LocalStorage(str(tmp_path / "prod-repo"), create=True), cluster_id="c", release="1")
    first = engine.create_snapshot(primary, engine.SnapshotRequest(str(prod), kind="cycle"))
    (prod / "after.txt").write_text("received, waiting for the delay\n")
    second = engine.create_snapshot(primary, engine.SnapshotRequest(str(prod), kind="cycle"))
    standby_repo = Repository.init(LocalStorage(str(tmp_path / "standby-repo"), create=True), cluster_id="c",
                                   release="1")
    (tmp_path / "standby-data").mkdir()
    store = StateStore(str(tmp_path / "state"))
    rx = StandbyReceiver(standby_repo, str(tmp_path / "standby-data"), store, agent="standby", apply_delay_s=HOUR)
    try:
        caller = Caller(sender="primary", epoch=1, sent_at=time.time(), received_at=time.time(), instance="i1")
        assert rx.failover_lag_s() is None  # nothing applied: not eligible
        # The first snapshot, captured two hours ago (by its document), is applied at once; the second waits.
        _ship(primary, first, rx, caller, dataclasses.replace(first, captured_at=time.time() - 2 * HOUR).to_bytes())
        _ship(primary, second, rx, caller, second.to_bytes())
        now = time.time()
        assert [p[0] for p in store.current.pending] == [second.id]
        assert rx.lag_s(now) >= 2 * HOUR and rx.failover_lag_s(now) == store.current.received_lag_s(now) < HOUR
        rx.hold_applies()  # the operator suspects damage: the take-over would apply nothing
        assert rx.failover_lag_s(now) == rx.lag_s(now) >= 2 * HOUR
        rx.resume()
        assert rx.failover_lag_s(now) < HOUR
    finally:
        rx.close()


def test_promote_before_a_time_between_the_good_and_the_damaged_arrivals(make_group) -> None:  # type: ignore[no-untyped-def]
    """--before TIME end to end: TIME falls after west stored the good state and before the damage reached it.
    A drill rehearses exactly the point the promotion then picks; the promoted root is the good state, and the
    damaged snapshots stay in the repository, named in the output."""
    from drsync.agent.drill import run_drill
    from drsync.config import load_config

    g = _synced(make_group, extra=KEEP_ALL)
    good_tree = tree_state(g.data["east"])
    good = g.hello("west").applied_snapshot
    cut = time.time()  # west stored the good state before this; the damage is made after it
    _damage(g.data["east"])
    damaged = g.wait_synced("east", "west", "the damage to reach west", after=good)
    stored = _repo(g, "west").snapshot_stored_times()
    assert stored[good] <= cut < stored[damaged]
    # drsync drill run --before TIME (run_drill is what the command calls) rehearses the same point.
    report = run_drill(load_config(g.cfg["west"]), state_dir=str(g.tmp / "west-repo" / "agent"), open_coord=None,
                       before=str(cut))
    assert report.passed and report.point_in_time and report.before == cut, report.as_dict()
    assert stored[report.snapshot or ""] <= cut
    g.kill("east", signal.SIGKILL)
    r = g.promote("west", "--before", str(cut), "--force")  # Unix seconds; east's session may linger
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    chosen = doc["applied_snapshot"]
    assert chosen == report.snapshot and stored[chosen] <= cut and damaged in doc["newer_kept"]
    assert f"{len(doc['newer_kept'])} newer snapshot(s) stay in its repository" in doc["message"]
    assert g.primary() == ("west", 2)
    assert tree_state(g.data["west"]) == good_tree  # the good state, nothing of the damage
    listed = [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
    assert chosen in listed and damaged in listed and set(doc["newer_kept"]) <= set(listed)


def test_a_drill_before_a_time_refuses_a_wrong_command(tmp_path: Path) -> None:
    """drill run --before: both --to-snapshot and --before, or a TIME of no known form, are usage errors."""
    from drsync.agent.drill import run_drill
    from drsync.config import load_config

    cfg_path = tmp_path / "c.toml"
    (tmp_path / "data").mkdir()
    cfg_path.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                        f'repository = "{tmp_path / "repo"}"\n[agent]\nname = "west"\nrole = "standby"\n'
                        f'listen = "127.0.0.1:1"\n')
    cfg = load_config(cfg_path)
    with pytest.raises(UsageError, match="choose one"):
        run_drill(cfg, state_dir=str(tmp_path / "state"), open_coord=None, point="abcd", before="2h")
    with pytest.raises(UsageError, match="ISO 8601"):
        run_drill(cfg, state_dir=str(tmp_path / "state"), open_coord=None, before="tuesday")


def test_the_promote_message_counts_the_newer_snapshots_it_does_not_name() -> None:
    from drsync.agent.control import _kept_words

    ids = [f"s{i}" for i in range(1, 9)]
    words = _kept_words(ids)
    assert words.startswith("8 newer snapshot(s) stay in the repository: s1, s2, s3, s4, s5 and 3 more")
    assert "newest s8" in words and "newer_kept" in words and "drsync status --points" in words
    assert _kept_words(ids[:2]) == "2 newer snapshot(s) stay in the repository: s1, s2"
