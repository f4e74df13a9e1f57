"""Roles from real ZooKeeper: promotion, fencing, failback, switchover, automatic failover.

Every agent is a real `drsync agent` process with agent.role = auto; ZooKeeper is
the Debian package's server. Each test tries to break safety rule 1 (one
primary per epoch) or 2 (a standby root is always a whole snapshot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from drsync.coordination import SessionState
from drsync.coordination.zookeeper import ZooKeeperCoordinator
from drsync.errors import RefusedError, UsageError
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import SLOW, init_repo, make_tree, run_drsync, tree_state
from tests.group import Group, PrimaryWatcher, scrape, wait_for
from tests.zk import ZkCluster, free_port


def bootstrap(g: Group, primary: str = "east") -> None:
    """Start every agent, make ``primary`` the first primary, wait until every standby is in sync."""
    for name in g.names:
        g.start(name)
    r = g.promote(primary)
    assert r.code == 0, r.err
    for name in g.names:
        if name != primary:
            wait_for(lambda n=name: g.in_sync(primary, n) and g.record(n).get("applied_snapshot"),
                     f"{name} to apply production")


def assert_root_is_snapshot(g: Group, name: str, snapshot: str) -> None:
    expected = g.tmp / f"expected-{name}-{snapshot}"
    r = run_drsync("snapshot", "restore", snapshot, "--config", g.cfg[name], "--target", expected)
    assert r.code == 0, r.err
    assert tree_state(g.data[name]) == tree_state(expected), f"{name}'s root is not snapshot {snapshot}"


def test_first_promotion_status_and_refusals(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"])
    g.start("east")
    g.start("west")
    st = g.status("west")
    assert st["primary"] is None and st["epoch"] == 0
    assert {a["name"]: a["role"] for a in st["agents"]} == {"east": "standby", "west": "standby"}
    # The empty standby cannot become the first primary by mistake: it would overwrite production.
    r = g.promote("west")
    assert r.code == 4 and "empty" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert g.coord.read_epoch().epoch == 0
    r = g.promote("east")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["epoch"] == 1 and doc["primary_confirmed"] and doc["reason"] == "first promotion"
    assert g.primary() == ("east", 1)
    wait_for(lambda: g.in_sync("east", "west"), "west to apply production")
    wait_for(lambda: g.record("west").get("applied_snapshot"), "west to publish its applied snapshot")
    st = g.status("west")
    roles = {a["name"]: a for a in st["agents"]}
    assert st["primary"] == "east" and st["epoch"] == 1 and st["promoted_by"] == "east"
    assert roles["east"]["role"] == "primary" and roles["west"]["role"] == "standby"
    assert 0 <= roles["west"]["lag_s"] < 60 and roles["west"]["applied_snapshot"]
    state = g.coord.read_state()
    assert state is not None and state["agent"] == "west" and state["epoch"] == 1
    human = g.drsync("west", "status")
    assert human.code == 0 and "primary east, epoch 1" in human.out
    # Promoting again is a no-op; promoting the standby while the primary lives needs --force.
    again = g.promote("east")
    assert again.code == 0 and again.json()["promoted"] is False
    r = g.promote("west")
    assert r.code == 4 and "switchover" in r.err and "--force" in r.err, r.err
    assert g.primary() == ("east", 1)
    m = scrape(g.metrics["east"], g.group, "east")
    assert m["drsync_is_primary"] == 1 and m["drsync_zookeeper_connected"] == 1 and m["drsync_epoch"] == 1
    m = scrape(g.metrics["west"], g.group, "west")
    assert m["drsync_is_primary"] == 0 and m["drsync_epoch"] == 1
    # A standby refuses shipments while it is primary: the primary accepts none.
    link = GrpcStandbyLink(g.addr["east"])
    try:
        with pytest.raises(RefusedError, match="not a standby"):
            list(link.missing(1, iter([[b"\x00" * 32]])))
    finally:
        link.close()


def test_kill_9_primary_promote_standby_then_failback(make_group) -> None:  # type: ignore[no-untyped-def]
    # The dead primary's session must outlive the two promotions below on a busy machine (CI once took
    # over 4 s between the kill and the forced promotion, and the promotion was no longer forced).
    g = make_group(["east", "west"], session_timeout="40s")
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    # Each cycle records a new applied snapshot (unchanged content too): compare both sides afresh on
    # every poll; an id read once from ZooKeeper may already be behind west's.
    wait_for(lambda: g.record("west").get("applied_snapshot") == g.hello("west").applied_snapshot,
             "west's applied snapshot in ZooKeeper")
    g.kill("east")  # kill -9: its session (and primary node) outlive it for the session timeout
    (g.data["east"] / "catalog" / "unshipped.txt").write_text("written after the last shipment\n")
    r = g.promote("west")
    assert r.code == 4 and "--force" in r.err, r.err  # the dead primary's session is still alive
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["epoch"] == 2 and doc["forced"] and doc["previous_primary"] == "east"
    assert g.primary() == ("west", 2)
    # What the new primary serves is exactly the last snapshot it applied: nothing newer is claimed.
    applied_at_promotion = doc["applied_snapshot"]
    assert applied_at_promotion == g.hello("west").applied_snapshot
    assert_root_is_snapshot(g, "west", applied_at_promotion)
    assert not (g.data["west"] / "catalog" / "unshipped.txt").exists()
    # The new primary works: its changes are the new production.
    (g.data["west"] / "catalog" / "after-failover.txt").write_text("new production write\n")
    shipped_before = scrape(g.metrics["west"], g.group, "west").get("drsync_shipped_bytes_total", 0.0)
    # The old primary comes back: it sees a higher epoch and another primary. Without a demote_command
    # nothing proves its production writers stopped: it keeps its root untouched until an operator says so.
    g.start("east")
    g.wait_role("east", "ex-primary")
    assert (g.data["east"] / "catalog" / "unshipped.txt").exists()
    waiting = {a["name"]: a for a in g.status("west")["agents"]}["east"]
    assert waiting["role"] == "ex-primary" and "drsync rejoin" in waiting["waiting_to_rejoin"]
    r = g.drsync("east", "rejoin", "--json")
    assert r.code == 0 and r.json()["rejoined"] is True, r.err
    g.wait_role("east", "standby")
    wait_for(lambda: g.in_sync("west", "east"), "east to resync from west")
    assert g.primary() == ("west", 2)
    assert g.hello("east").epoch == 2
    # Its resync was incremental: far less than the ~3.5 MiB data set crossed the wire.
    shipped = scrape(g.metrics["west"], g.group, "west")["drsync_shipped_bytes_total"] - shipped_before
    assert shipped < 256 * 1024, f"failback shipped {shipped} bytes"
    # The write east never shipped was not silently dropped: it is kept in a snapshot on east.
    snaps = g.drsync("east", "snapshot", "list", "--json").json()
    kept = [s for s in snaps if s["name"].startswith("before-rejoin-epoch-2")]
    assert len(kept) == 1
    restored = g.tmp / "kept"
    assert g.drsync("east", "snapshot", "restore", kept[0]["id"], "--target", str(restored)).code == 0
    assert (restored / "catalog" / "unshipped.txt").read_text() == "written after the last shipment\n"
    # One primary per epoch, epochs only ever grow.
    watcher.close()
    assert watcher.epochs == sorted(watcher.epochs) and watcher.epochs[-1] == 2
    holders: dict[int, set[str]] = {}
    for p in watcher.primary:
        if p is not None:
            holders.setdefault(p[1], set()).add(p[0])
    assert holders == {1: {"east"}, 2: {"west"}}


def test_promote_refuses_lag_over_the_limit(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"], extra='max_lag_on_failover = "3s"')
    bootstrap(g)
    g.kill("east", signal.SIGTERM)  # a clean stop: its primary node goes at once, a maintenance marker stays
    wait_for(lambda: g.primary() is None, "the primary node to go")
    assert g.coord.read_maintenance()["agent"] == "east"
    r = g.promote("west")
    assert r.code == 4 and "stopped on purpose" in r.err and "--force" in r.err, r.err
    wait_for(lambda: g.hello("west").applied_captured_at < time.time() - 3.5, "the lag to pass the limit")
    r = g.promote("west", "--force")
    assert r.code == 4, r.err
    assert "lag is" in r.err and "max_lag_on_failover 3s" in r.err and "--accept-data-loss" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert g.coord.read_epoch().epoch == 1 and g.primary() is None  # nothing changed
    r = g.promote("west", "--force", "--accept-data-loss")
    assert r.code == 0, r.err
    assert r.json()["data_loss_accepted"] is True and g.primary() == ("west", 2)
    assert g.coord.read_maintenance() is None  # the new primary superseded the marker


@pytest.mark.parametrize("when", ["idle", "mid-shipment"])
def test_frozen_primary_is_fenced_after_promotion(make_group, when: str) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the primary past its session timeout, promote a standby, SIGCONT: the old primary
    must not act as primary, and its late shipments are refused."""
    g = make_group(["east", "west", "north"], session_timeout="2s", replication='bandwidth_limit = "2MiB/s"')
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    east_pid = g.procs["east"].pid
    if when == "mid-shipment":
        # 6 MiB at 2 MiB/s: east is uploading to its standbys for seconds when it freezes.
        def big_captured() -> bool:
            snaps = g.drsync("east", "snapshot", "list", "--json").json()
            return any(s["files"] > 24 and s["kind"] == "cycle" for s in snaps)

        (g.data["east"] / "tables" / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
        def uploading() -> bool:  # chunks arriving in a standby's open pack (or the shipment already over)
            packs = [g.tmp / f"{n}-repo" / "packs" for n in ("west", "north")]
            try:
                if any(p.name.startswith(".tmp-") for d in packs if d.exists() for p in d.rglob(".tmp-*")):
                    return True
            except OSError:  # renamed under the walk: a pack just completed
                return True
            return all((g.data[n] / "tables" / "big.bin").exists() for n in ("west", "north"))

        wait_for(big_captured, "east to snapshot the big file", timeout=30)
        wait_for(uploading, "east's upload of the big file to get under way", timeout=30)
    g.procs["east"].send_signal(signal.SIGSTOP)
    # Production changes while its agent is frozen: if east shipped after waking, north would get this.
    (g.data["east"] / "catalog" / "late.txt").write_text("must never reach a standby after the promotion\n")
    wait_for(lambda: g.primary() is None, "the frozen primary's session to expire", timeout=30)
    # East may have shipped its last cycle to north before west (CI saw it): which standby is ahead is a
    # race this test is not about, so the promotion of west accepts losing what only north holds.
    r = g.promote("west", "--accept-data-loss")
    assert r.code == 0, r.err
    wait_for(lambda: g.record("north").get("epoch") == 2, "north to learn epoch 2")
    assert g.hello("north").epoch == 2
    log_before = len(g.log("east"))
    north_before = len(g.log("north"))
    g.procs["east"].send_signal(signal.SIGCONT)
    g.wait_role("east", "ex-primary")  # no demote_command: it waits for drsync rejoin
    # The role is published as east steps down; its log line follows.
    wait_for(lambda: any(w in g.log("east")[log_before:] for w in ("stepped down", "standby")),
             "east to log its step down")
    assert not (g.data["north"] / "catalog" / "late.txt").exists()
    # North follows the new primary, and an epoch-1 shipment is refused outright.
    (g.data["west"] / "catalog" / "from-west.txt").write_text("new primary\n")
    wait_for(lambda: (g.data["north"] / "catalog" / "from-west.txt").exists(), "north to follow west")
    link = GrpcStandbyLink(g.addr["north"], sender="east")
    try:
        with pytest.raises(RefusedError, match="epoch 1 from east is lower than epoch 2"):
            list(link.missing(1, iter([[b"\x00" * 32]])))
    finally:
        link.close()
    # Everything north applied once it knew epoch 2 came from west, none from the woken east.
    sources = {s["id"]: s["source"] for s in g.drsync("north", "snapshot", "list", "--json").json()}
    applied_after = [line.split("applied snapshot ", 1)[1].split()[0] for line in
                     g.log("north")[north_before:].splitlines() if "applied snapshot " in line]
    assert applied_after and {sources[i] for i in applied_after} == {str(g.data["west"])}
    m = scrape(g.metrics["east"], g.group, "east")
    assert m["drsync_is_primary"] == 0 and m["drsync_epoch"] == 2
    assert g.procs["east"].pid == east_pid and g.procs["east"].poll() is None  # the same process, still running
    watcher.close()
    assert [p for p in watcher.primary if p is not None and p[0] == "east" and p[1] >= 2] == []


def test_switchover_names_its_final_snapshot_when_the_new_primary_claims_first(make_group, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The new primary takes its claim as soon as the epoch names it, which can be before the old primary
    marks the request handed over (seen in CI: ``final_snapshot`` null in the switchover's output). The old
    primary is held at exactly that point: the output must still name the final snapshot, the one the
    hand-over's history entry names."""
    gates = tmp_path / "gates"
    gates.mkdir()
    g = make_group(["east", "west"], interval="1h")
    g.start("east", env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates)})
    g.start("west")
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to apply")
    (g.data["east"] / "catalog" / "late.txt").write_text("written after the last cycle\n")
    (gates / "switchover-handed-over").write_text("hold east before it marks the request handed over\n")
    try:
        r = g.drsync("west", "switchover", "--json")
        assert r.code == 0, r.err
        assert (gates / "switchover-handed-over.reached").exists(), "east was not held where the race is"
        doc = r.json()
        entry = g.drsync("west", "history", "--json", "--limit", "1").json()[0]
        assert entry["epoch"] == 2 and entry["why"] == "switchover"
        assert doc["final_snapshot"] and doc["final_snapshot"] == entry["snapshot"]
    finally:
        (gates / "switchover-handed-over").unlink()
    assert_root_is_snapshot(g, "west", doc["final_snapshot"])


def test_switchover_hands_over_with_zero_loss(make_group) -> None:  # type: ignore[no-untyped-def]
    marker = "readonly.marker"
    g = make_group(["east", "west"], interval="1h",
                   extra=f'switchover_hook = "touch $DRSYNC_DATA/../{marker}"')
    bootstrap(g)
    # Writes after the last cycle: a switchover must carry them over (interval 1h: no cycle will).
    (g.data["east"] / "catalog" / "last-minute.txt").write_text("written just before the switchover\n")
    (g.data["east"] / "catalog" / "f005.txt").unlink()
    production = tree_state(g.data["east"])  # nothing applies to the primary's root
    r = g.drsync("west", "switchover", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["from"] == "east" and doc["to"] == "west" and doc["epoch"] == 2
    assert (g.tmp / marker).exists()  # the pre-switchover hook ran on the primary
    assert g.primary() == ("west", 2)
    # Zero loss: everything production had is on the new primary. (Compared with production as it was,
    # not with east's root now: east turns standby and the new primary may already be shipping to it.)
    assert tree_state(g.data["west"]) == production
    assert_root_is_snapshot(g, "west", doc["final_snapshot"])
    g.wait_role("east", "standby")
    assert g.coord.read_switchover() is None
    # No safety snapshot was needed: the final snapshot holds everything east had. (The one kept while
    # rejoining goes at once, or, while east's repository is in use, on a later pass.)
    wait_for(lambda: not any(s["name"].startswith("before-rejoin")
                             for s in g.drsync("east", "snapshot", "list", "--json").json()),
             "east to delete its redundant before-rejoin snapshot")
    # And replication now runs the other way.
    (g.data["west"] / "catalog" / "after.txt").write_text("written on the new primary\n")
    r = g.drsync("west", "switchover", "--to", "west")
    assert r.code == 2 and "already the primary" in r.err


def test_switchover_to_an_unknown_agent_changes_nothing(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"])
    bootstrap(g)
    r = g.drsync("east", "switchover", "--to", "nobody")
    assert r.code == 4 and "not a running standby" in r.err
    assert g.primary() == ("east", 1) and g.coord.read_switchover() is None


def test_a_restarted_ex_primary_never_reads_as_a_caught_up_standby(make_group) -> None:  # type: ignore[no-untyped-def]
    """Killed and replaced, the old primary restarts: until it has rejoined (demote_command confirmed, its
    root kept) its record says ex-primary, never standby with the snapshot it applied before it was
    primary; a promotion that trusted such a record was refused ("never applied a snapshot")."""
    gate = "$DRSYNC_DATA/../demote"
    g = make_group(["east", "west"], extra=(f'demote_command = "touch {gate}-started-$DRSYNC_AGENT; '
                                            f'while [ ! -e {gate}-go ]; do sleep 0.05; done"'))
    bootstrap(g)
    before = g.record("west")["applied_snapshot"]
    g.kill("east")
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    g.start("east", wait=False)
    pid = g.procs["east"].pid
    wait_for(lambda: (g.tmp / "demote-started-east").exists(), "east's demote_command to start")
    record = wait_for(lambda: (rec := g.record("east")).get("pid") == pid and rec, "east's record of this start")
    assert record["role"] == "ex-primary", record
    (g.tmp / "demote-go").touch()
    g.wait_role("east", "standby")
    record = wait_for(lambda: (rec := g.record("east")).get("applied_snapshot") and rec, "east to apply")
    assert record["applied_position"][0] == 2 and record["applied_snapshot"] != before, record
    wait_for(lambda: g.in_sync("west", "east"), "east to follow west")
    # The bench's trial: west killed in turn, east promoted by hand at its caught-up record.
    g.kill("west")
    r = g.promote("east", "--force")
    assert r.code == 0, r.err


def test_automatic_failover_across_repeated_trials(make_group) -> None:  # type: ignore[no-untyped-def]
    """Kill -9 whoever is primary, again and again: the standby takes over by itself, the old one
    rejoins; never two primaries at one epoch, never an epoch going backwards."""
    trials = int(os.environ.get("DRSYNC_FAILOVER_TRIALS", "3"))
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "0s"\n'
                         'fence_command = "echo $DRSYNC_FENCE_AGENT >> $DRSYNC_DATA/../fenced.log"\n'
                         'demote_command = "echo $DRSYNC_AGENT $DRSYNC_REASON >> $DRSYNC_DATA/../demoted.log"')
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    current, other = "east", "west"
    acted: list[tuple[str, int]] = []
    for trial in range(trials):
        epoch = g.coord.read_epoch().epoch
        wait_for(lambda o=other: g.record(o).get("role") == "standby" and g.record(o).get("applied_snapshot"),
                 f"{other} to be a caught-up standby (trial {trial})")
        g.kill(current)
        wait_for(lambda o=other, e=epoch: g.primary() == (o, e + 1), f"{other} to take over (trial {trial})",
                 timeout=30)
        acted.append((other, epoch + 1))
        (g.data[other] / "catalog" / f"trial-{trial}.txt").write_text(f"written by {other} in trial {trial}\n")
        g.start(current)
        g.wait_role(current, "standby")
        wait_for(lambda c=current, o=other: g.in_sync(o, c), f"{current} to resync (trial {trial})")
        current, other = other, current
    watcher.close()
    # Each takeover fenced the agent it replaced first; each ex-primary demoted itself before rejoining.
    fenced = (g.tmp / "fenced.log").read_text().split()
    assert len(fenced) == trials and fenced == (["east", "west"] * trials)[:trials]
    demoted = (g.tmp / "demoted.log").read_text().splitlines()
    assert [line.split()[0] for line in demoted] == fenced and all(line.endswith("rejoin") for line in demoted)
    assert watcher.epochs == sorted(watcher.epochs) and len(set(watcher.epochs)) == len(watcher.epochs)
    holders: dict[int, set[str]] = {}
    for p in watcher.primary:
        if p is not None:
            holders.setdefault(p[1], set()).add(p[0])
    assert all(len(v) == 1 for v in holders.values()), holders
    assert [(next(iter(holders[e])), e) for _, e in acted] == acted
    # The group's history has each automatic failover, by the agent that promoted itself, in epoch order.
    entries = g.drsync("east", "history", "--json").json()[:trials]
    assert [(e["epoch"], e["to"], e["why"], e["by"].split()[:2]) for e in reversed(entries)] == \
        [(e, who, "automatic failover", ["agent", who]) for who, e in acted]
    assert all(e["from"] != e["to"] and e["from"] in g.names for e in entries)
    # Each agent says, in its own log, that it became primary exactly at the epochs ZooKeeper gave it.
    for name in g.names:
        became = [int(line.rsplit(" ", 1)[1]) for line in g.log(name).splitlines()
                  if "is now PRIMARY at epoch" in line]
        assert sorted(became) == sorted(e for e, who in holders.items() if name in who)


def test_flapping_primary_does_not_cause_ping_pong(make_group) -> None:  # type: ignore[no-untyped-def]
    """After an automatic failover, the cooldown keeps the next one from happening at once."""
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "1h"\nfence_command = "none"')
    bootstrap(g)
    # The first promotion is recent: within the cooldown, a dead primary is not replaced automatically.
    g.kill("east")
    wait_for(lambda: g.primary() is None, "the primary's session to expire", timeout=30)
    wait_for(lambda: "cooldown" in g.log("west"), "west to explain why it does not take over")
    assert g.primary() is None and g.coord.read_epoch().epoch == 1
    # An operator can still promote by hand.
    r = g.promote("west")
    assert r.code == 0 and g.primary() == ("west", 2), r.err


def test_zookeeper_leader_kill_and_quorum_loss(tmp_path: Path, zk_ensemble, group: str) -> None:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_ensemble.hosts, group, ["east", "west"], session_timeout="6s")
    try:
        bootstrap(g)
        # Kill the ensemble's leader: the other two elect a new one and replication goes on.
        leader = zk_ensemble.leader()
        assert leader is not None and leader.mode() == "leader"
        zk_ensemble.kill(leader)
        (g.data["east"] / "catalog" / "during-election.txt").write_text("after the leader died\n")
        wait_for(lambda: g.in_sync("east", "west"), "replication to continue after the leader died", timeout=90)
        wait_for(lambda: zk_ensemble.leader() is not None, "a new ZooKeeper leader")
        assert g.primary() == ("east", 1)
        # Lose quorum: nothing can be decided, so no promotion happens, and nothing breaks.
        survivor = [n for n in zk_ensemble.nodes if n.proc is not None]
        zk_ensemble.kill(survivor[0])
        wait_for(lambda: scrape(g.metrics["east"], g.group, "east")["drsync_zookeeper_connected"] == 0,
                 "east to notice that ZooKeeper is gone", timeout=30)
        wait_for(lambda: scrape(g.metrics["east"], g.group, "east")["drsync_is_primary"] == 0,
                 "east to pause as primary")
        r = g.promote("west", "--force")
        assert r.code == 1 and "ZooKeeper" in r.err and len(r.err.strip().splitlines()) == 1, r.err
        applied = g.hello("west").applied_snapshot
        assert_root_is_snapshot(g, "west", applied)
        (g.data["east"] / "catalog" / "during-outage.txt").write_text("written while ZooKeeper had no quorum\n")
        # Quorum back: the same primary at the same epoch carries on.
        zk_ensemble.start_node(survivor[0])
        zk_ensemble.wait_serving([survivor[0]], timeout_s=60)
        wait_for(lambda: g.in_sync("east", "west"), "replication to resume with quorum back", timeout=90)
        wait_for(lambda: g.coord.state is SessionState.CONNECTED, "the test's own client to reconnect")
        assert g.primary() == ("east", 1) and g.coord.read_epoch().epoch == 1
        assert scrape(g.metrics["east"], g.group, "east")["drsync_is_primary"] == 1
    finally:
        g.stop_all()


def test_acls_end_to_end_and_secrets_stay_out_of_logs(make_group) -> None:  # type: ignore[no-untyped-def]
    secret = "zk-s3cret-value"
    g = make_group(["east", "west"], extra=f'username = "drsync"\npassword = "{secret}"', auth=("drsync", secret))
    bootstrap(g)
    assert g.primary() == ("east", 1)
    # A client without the credentials is kept out of the group's nodes.
    with pytest.raises(UsageError, match="ACL"):
        ZooKeeperCoordinator(g.hosts, g.group).start()
    # A config with the wrong password gets one clear line and exit 2.
    bad = g.tmp / "bad.toml"
    bad.write_text(g.cfg["west"].read_text().replace(secret, "wrong"))
    r = run_drsync("status", "--config", bad)
    assert r.code == 2 and "check coordination.username and coordination.password" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and "wrong" not in r.err
    good = g.drsync("west", "status", "--json")
    assert good.code == 0 and '"primary": "east"' in good.out
    for name in g.names:
        assert secret not in g.log(name)
    assert secret not in urllib.request.urlopen(f"http://{g.metrics['east']}/metrics").read().decode()


def test_agent_started_before_zookeeper_joins_when_it_comes_up(tmp_path: Path, group: str) -> None:
    zk = ZkCluster.create(1)  # configured, not started yet
    try:
        zk_started = False
        data = tmp_path / "east-data"
        make_tree(data, files=5, big=0)
        cfg = tmp_path / "east.toml"
        cfg.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                       f'[agent]\nname = "east"\nlisten = "127.0.0.1:{free_port()}"\n'
                       f'metrics = ""\n[coordination]\nzookeeper = "{zk.hosts}"\ngroup = "{group}"\n')
        init_repo(cfg)
        log = tmp_path / "east.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=f, stderr=f)
        try:
            wait_for(lambda: "cannot reach ZooKeeper" in log.read_text(), "the agent to report ZooKeeper missing")
            assert proc.poll() is None  # it keeps running and retrying
            zk.start()
            zk_started = True
            watcher = ZooKeeperCoordinator(zk.hosts, group)
            watcher.start()
            wait_for(lambda: "east" in watcher.agents(), "the agent to register once ZooKeeper is up", timeout=60)
            assert watcher.agents()["east"]["role"] == "standby"
            watcher.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30 * SLOW)
        assert proc.returncode == 0 and zk_started
    finally:
        zk.stop()


def test_fenced_primary_with_unshipped_writes_is_reset_on_rejoin(make_group) -> None:  # type: ignore[no-untyped-def]
    """A primary fenced with writes it never shipped must not keep them in its root as a standby, even
    when the new primary's content equals the snapshot it had applied long before."""
    g = make_group(["east", "west"], interval="1h")
    bootstrap(g)
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    g.wait_role("east", "ex-primary")
    assert g.drsync("east", "rejoin").code == 0
    g.wait_role("east", "standby")
    wait_for(lambda: g.in_sync("west", "east") and g.record("east").get("applied_snapshot"), "east to follow west")
    (g.data["west"] / "catalog" / "never-shipped.txt").write_text("west wrote this and was fenced\n")
    r = g.promote("east", "--force")
    assert r.code == 0, r.err
    g.wait_role("west", "ex-primary")
    assert g.drsync("west", "rejoin").code == 0
    g.wait_role("west", "standby")
    wait_for(lambda: g.hello("west").applied_snapshot and g.in_sync("east", "west"),
             "west's root to become east's snapshot", timeout=30)
    assert not (g.data["west"] / "catalog" / "never-shipped.txt").exists()
    assert_root_is_snapshot(g, "west", g.hello("west").applied_snapshot)
    kept = [s for s in g.drsync("west", "snapshot", "list", "--json").json() if s["name"] == "before-rejoin-epoch-3"]
    assert len(kept) == 1
