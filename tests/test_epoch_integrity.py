"""Safety rule 1 against the documents role decisions are made from: the group's epoch and primary nodes in
ZooKeeper and the agent's own state.json. A node or file that holds something else than drsync writes (an
operator's ``zkCli.sh set /drsync/G/epoch 7``, a NaN, a string, a damaged file) is never read as a default:
an epoch read as 0 let a promotion repeat epoch 1 while another agent held it, and a NaN epoch floor compares
as neither below nor above any sender's, so it fences nothing. An epoch in ZooKeeper below the one an agent
has already seen (ZooKeeper lost data, or was restored or edited) stops every role change."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from drsync import documents
from drsync.agent.roles import FailoverPolicy, decide_role
from drsync.agent.state import AgentState, StateStore
from drsync.coordination import Epoch, GroupView, PrimaryClaim, SessionState
from drsync.coordination.zookeeper import ZooKeeperCoordinator
from drsync.errors import IntegrityError
from tests.group import wait_for
from tests.test_failover import bootstrap

NOW = 1_800_000_000.0
AUTO = FailoverPolicy(automatic=True, max_lag_s=60, grace_s=2, cooldown_s=300)


def _decide(me: str, view: GroupView, *, acting: bool = False, floor: int = 0) -> tuple[str, str]:
    d = decide_role(me, view, acting_primary=acting, policy=AUTO, primary_absent_s=600, lag_s=1.0, rank=0,
                    epoch_age_s=3600, floor=floor)
    return d.action, d.reason


def test_an_epoch_below_the_agents_floor_changes_no_role() -> None:
    gone = GroupView(SessionState.CONNECTED, Epoch(3, "east", NOW, "manual", 7), None)
    assert _decide("west", gone, floor=3)[0] == "promote-self"  # the control: everything else allows it
    action, reason = _decide("west", gone, floor=4)
    assert action == "standby" and "below epoch 4" in reason and "no promotion, claim or switchover" in reason
    # The epoch names this agent, but it has seen a later one: no claim.
    assert _decide("east", gone, floor=3)[0] == "claim"
    assert _decide("east", gone, floor=5)[0] == "standby"
    # A wiped group (no epoch node, no primary): a new group waits anyway; an agent that saw epoch 5 says why.
    wiped = GroupView(SessionState.CONNECTED, Epoch(), None)
    action, reason = _decide("west", wiped, floor=5)
    assert action == "standby" and "epoch 0 is below epoch 5" in reason
    # An acting primary cannot prove its claim at an epoch ZooKeeper no longer has: it steps down.
    held = GroupView(SessionState.CONNECTED, Epoch(1, "east", NOW, "manual", 7),
                     PrimaryClaim("east", "a", 1, NOW, mine=True))
    assert _decide("east", held, acting=True, floor=1)[0] == "act-primary"
    assert _decide("east", held, acting=True, floor=2)[0] == "step-down"


def test_a_maintenance_marker_counts_whatever_it_holds(zk_server, group: str) -> None:
    """An operator's ``zkCli.sh create /drsync/G/maintenance`` holds no record: it stops automatic promotion
    all the same (an empty record used to read as no marker)."""
    coord = ZooKeeperCoordinator(zk_server.hosts, group)
    coord.start()
    try:
        for data in (b"", b"not json", b"[]", b"{}"):
            coord.zk.create(f"/drsync/{group}/maintenance", data, makepath=True)
            view = coord.view()
            assert view.maintenance, data
            action, reason = _decide("west", replace(view, epoch=Epoch(3, "east", NOW, "manual", 7)))
            assert action == "standby" and "no automatic promotion" in reason, (data, reason)
            coord.zk.delete(f"/drsync/{group}/maintenance")
    finally:
        coord.close()


@pytest.mark.parametrize("data,why", [
    (b"7", "is 7, not a JSON object"),
    (b'{"epoch": "9", "promoted_by": "east"}', 'epoch is "9", not an integer'),
    (b'{"epoch": NaN}', "does not hold a JSON document"),
    (b'{"epoch": true}', "epoch is true, not an integer"),
    (b'{"epoch": 2.5}', "epoch is 2.5, not an integer"),
    (b'{"epoch": -1}', "below 0"),
    (b'{"promoted_by": "east"}', "has no epoch"),
    (b'{"epoch": 3, "promoted_by": 7}', "promoted_by is 7, not a string"),
    (b'{"epoch": 3, "at": 1e999}', "at is Infinity, not a finite number"),
    (b"", "does not hold a JSON document"),
])
def test_a_damaged_epoch_node_is_an_integrity_error_never_epoch_0(zk_server, group: str, data: bytes,
                                                                  why: str) -> None:
    coord = ZooKeeperCoordinator(zk_server.hosts, group)
    coord.start()
    try:
        coord.zk.create(f"/drsync/{group}/epoch", data, makepath=True)
        for read in (coord.read_epoch, coord.view):
            with pytest.raises(IntegrityError) as e:
                read()
            assert why in str(e.value) and f"/drsync/{group}/epoch" in str(e.value)
            assert "\n" not in str(e.value)
        assert coord.zk.get(f"/drsync/{group}/epoch")[0] == data
    finally:
        coord.close()


def test_a_damaged_primary_node_is_an_integrity_error(zk_server, group: str) -> None:
    coord = ZooKeeperCoordinator(zk_server.hosts, group)
    coord.start()
    try:
        coord.zk.create(f"/drsync/{group}/epoch", json.dumps(Epoch(2, "east").doc()).encode(), makepath=True)
        coord.zk.create(f"/drsync/{group}/primary", b'{"agent": "east", "epoch": NaN}')
        with pytest.raises(IntegrityError, match="primary does not hold a JSON document"):
            coord.view()
        with pytest.raises(IntegrityError):
            coord.claim_primary(coord.read_epoch(), "east", "127.0.0.1:1")
    finally:
        coord.close()


def test_typed_names_the_key_and_what_it_should_be() -> None:
    spec = {"epoch": int, "at": float, "name": str, "ok": bool}
    assert documents.typed({"epoch": 3, "at": 1, "name": "x", "ok": False, "other": None}, spec, "doc")
    for doc, text in [({"epoch": math.nan}, "epoch is NaN, not an integer"), ({"at": "1"}, 'at is "1"'),
                      ({"at": math.inf}, "at is Infinity"), ({"ok": 1}, "ok is 1, not true or false"),
                      ([], "doc is list, not a JSON object"), ({"name": ["x"]}, "name is list, not a string")]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(")):
            documents.typed(doc, spec, "doc")


def test_agent_state_round_trips_and_refuses_mistyped_fields(tmp_path: Path) -> None:
    full = AgentState(epoch=4, epoch_holder="east", applied_snapshot="s1", applied_captured_at=NOW,
                      applied_at=NOW + 1, last_role="primary",
                      primary_epoch=3, applied_position=(3, 17), clock_offset_s=-0.25, clock_source="east",
                      epoch_seen=4, epoch_seen_at=NOW, demoted=True, agent_id="a" * 32, agent_name="west",
                      guard_baseline="b", received_snapshot="s2", received_captured_at=NOW + 2,
                      pending=(("s2", NOW + 2, (4, 1), NOW + 3),), change_checkpoints=(("s1", NOW),),
                      last_gc_at=NOW)
    assert AgentState.from_doc(json.loads(json.dumps(asdict(full)))) == full
    store_dir = tmp_path / "state"
    store_dir.mkdir()
    bad = [{"epoch": math.nan}, {"epoch": "7"}, {"epoch": True}, {"epoch": 1.0}, {"applied_captured_at": math.inf},
           {"clock_offset_s": math.nan}, {"applied_position": [1, "2"]}, {"pending": 5}, {"pending": [["s", 1.0]]},
           {"pending": [["s", math.nan, [1, 2]]]}, {"change_checkpoints": [[1, 2]]}, {"demoted": "yes"},
           {"agent_id": 7}, {"epoch": -1}, {"applied_snapshot": "s"}]
    for doc in bad:
        with pytest.raises(ValueError):
            AgentState.from_doc(doc)
        (store_dir / "state.json").write_text(json.dumps(doc))
        with pytest.raises(IntegrityError) as e:
            StateStore(str(store_dir))
        assert str(store_dir / "state.json") in str(e.value) and ("epoch" in str(e.value) or next(iter(doc)) in
                                                                   str(e.value))
    (store_dir / "state.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="state.json is not JSON"):
        StateStore(str(store_dir))
    # last_gc_at stays lenient: anything but a finite number means "never collected" (collect now).
    assert AgentState.from_doc({"epoch": 0, "last_gc_at": math.nan}).last_gc_at == 0.0


def test_a_damaged_state_file_stops_the_agent_with_one_line(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east"])
    g.start("east")
    g.stop_all()
    state = Path(g.tmp / "east-repo" / "agent" / "state.json")
    assert state.exists(), state
    doc = json.loads(state.read_text())
    state.write_text(json.dumps({**doc, "epoch": math.nan}))
    r = g.drsync("east", "agent")
    assert r.code == 3, (r.code, r.err)
    assert r.err.strip().count("\n") == 0 and "epoch is NaN, not an integer" in r.err and str(state) in r.err


def test_a_damaged_or_backward_epoch_node_stops_promotions_and_repairs(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"])
    bootstrap(g, "east")
    zk = g.connected().zk
    node = f"/drsync/{g.group}/epoch"
    good = zk.get(node)[0]
    assert json.loads(good)["epoch"] == 1
    # An operator "fixes" the epoch with a bare number: it used to read as epoch 0, and promoting west then
    # made it primary at epoch 1, the epoch east held.
    zk.set(node, b"7")
    for args in (("promote", "--json"), ("promote", "--force", "--no-fence"), ("status",)):
        r = g.drsync("west", *args)
        assert r.code == 3, (args, r.code, r.out, r.err)
        assert r.err.strip().count("\n") == 0 and node in r.err and "A damaged or lost epoch" in r.err, r.err
    assert zk.get(node)[0] == b"7"
    wait_for(lambda: f"coordination pass failed: ZooKeeper node {node} is 7" in g.log("west"),
             "west to report the damaged node")
    # A well-formed epoch below the one every agent has seen (ZooKeeper restored from an old copy).
    zk.set(node, json.dumps(Epoch(0).doc()).encode())
    r = g.drsync("west", "promote", "--force", "--no-fence")
    assert r.code == 4 and "ZooKeeper's epoch 0 is below epoch 1" in r.err and r.err.strip().count("\n") == 0, r.err
    assert json.loads(zk.get(node)[0])["epoch"] == 0
    # east cannot prove its claim at an epoch ZooKeeper no longer has: it steps down, and says why.
    wait_for(lambda: "step-down (ZooKeeper's epoch 0 is below epoch 1" in g.log("east"), "east to step down")
    # Switchover does not send the operator to promote, which is refused too.
    wait_for(lambda: g.primary() is None, "east's primary node to go")
    r = g.drsync("west", "switchover")
    assert r.code == 4 and "ZooKeeper's epoch 0 is below epoch 1" in r.err and "use drsync promote" not in r.err, r
    # Repaired (the node as drsync wrote it), east takes its claim back.
    zk.set(node, good)
    g.wait_role("east", "primary")
    assert g.primary() == ("east", 1)


@pytest.mark.parametrize("content,why", [
    (b"{half", "apply-hold.json is not JSON"), (b"[]", "apply-hold.json is list, not a JSON object"),
    (b'{"operator_since": "yes"}', 'operator_since is "yes", not a finite number'),
    (b'{"snapshot": 7}', "snapshot is 7, not a string"),
    (b'{"snapshot": "s", "position": [1, "2"]}', "position is not a list of integers"),
])
def test_a_damaged_apply_hold_file_is_never_read_as_lifted(tmp_path: Path, content: bytes, why: str) -> None:
    """A hold is what keeps a deletion from reaching the standby's root (safety rule 8): a damaged hold file
    is an integrity error naming it, never an empty hold (nor a string "false" read as true)."""
    from drsync.agent.hold import ApplyHold, HoldFile

    f = HoldFile(str(tmp_path))
    f.save(ApplyHold(snapshot="s", captured_at=NOW, position=[2, 5], files=10, removed=9))
    assert f.load() == ApplyHold(snapshot="s", captured_at=NOW, position=[2, 5], files=10, removed=9)
    (tmp_path / HoldFile.NAME).write_bytes(content)
    with pytest.raises(IntegrityError) as e:
        f.load()
    assert why in str(e.value) and str(tmp_path / HoldFile.NAME) in str(e.value) and "\n" not in str(e.value)


def _standby_config(tmp_path: Path) -> Path:
    from tests.conftest import init_repo
    from tests.zk import free_port

    (tmp_path / "data").mkdir()
    cfg = tmp_path / "standby.toml"
    cfg.write_text(f'[cluster]\nid = "c1"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[agent]\nname = "s1"\nrole = "standby"\n'
                   f'listen = "127.0.0.1:{free_port()}"\nmetrics = ""\n')
    init_repo(cfg)
    (tmp_path / "repo" / "agent").mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.mark.parametrize("name,content,why", [
    ("applying.json", b"{half", "applying.json is not JSON"),
    ("applying.json", b'{"snapshot": "abc", "captured_at": NaN}', "captured_at is NaN, not a finite number"),
    ("applying.json", b'{"captured_at": 1}', "does not name a snapshot"),
    ("state.json", b'{"epoch": "7"}', 'epoch is "7", not an integer'),
    ("apply-hold.json", b'{"operator_since": "yes"}', 'operator_since is "yes"'),
])
def test_an_agent_with_a_damaged_state_directory_does_not_start(tmp_path: Path, name: str, content: bytes,
                                                                why: str) -> None:
    from tests.conftest import run_drsync

    cfg = _standby_config(tmp_path)
    (tmp_path / "repo" / "agent" / name).write_bytes(content)
    r = run_drsync("agent", "--config", cfg, timeout=120)
    assert r.code == 3, (r.code, r.err)
    assert r.err.strip().count("\n") == 0 and why in r.err and name in r.err and "Traceback" not in r.err, r.err
