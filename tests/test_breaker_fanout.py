"""Hostile trials of fan-out and cascades (issue 19), with real agents, real gRPC, real ZooKeeper.

Each test states the promise it attacks. Written from the docs only.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tree_state
from tests.faultproxy import FaultProxy
from tests.group import Group, PrimaryWatcher, scrape, wait_for
from tests.test_clock_skew import faketime_env

# Cases the pure topology tests and tests/test_fanout.py cover in make test; the real-agent versions run under
# make reliability (DRSYNC_RELIABILITY=full) to keep make test short.
FULL_ONLY = pytest.mark.skipif(os.environ.get("DRSYNC_RELIABILITY") != "full",
                               reason="covered in make test by tests/test_topology.py and tests/test_fanout.py; "
                                      "the real-agent case runs with DRSYNC_RELIABILITY=full (make reliability)")


def shipped_to(g: Group, sender: str, target: str) -> list[tuple[int, int]]:
    pat = re.compile(rf"to {re.escape(g.addr[target])}: applied \((\d+)/(\d+) chunks sent")
    return [(int(a), int(b)) for a, b in pat.findall(g.log(sender))]


def change(g: Group, name: str, i: int) -> None:
    (g.data[name] / "catalog" / f"change-{i}.txt").write_text(f"change {i}\n" * (i + 1))


def fed(g: Group, via: str) -> dict[str, Any]:
    return {a["name"]: a.get("fed_by") for a in g.status(via)["agents"]}


# --- topology oddities -------------------------------------------------------------------------------


@FULL_ONLY
def test_two_standbys_following_each_other_are_both_fed_by_the_primary(make_group: Any) -> None:
    g: Group = make_group(["east", "a", "b"])
    g.add_replication("a", 'upstream = "b"')
    g.add_replication("b", 'upstream = "a"')
    g.start_all("east")
    g.wait_synced("east", "a", "a's first sync (loop of upstreams)")
    g.wait_synced("east", "b", "b's first sync (loop of upstreams)")
    change(g, "east", 1)
    g.wait_synced("east", "a", "a gets a change")
    g.wait_synced("east", "b", "b gets a change")
    f = fed(g, "east")
    assert f["a"] == "east" and f["b"] == "east", f


@FULL_ONLY
def test_upstream_naming_a_missing_agent_or_the_primary(make_group: Any) -> None:
    g: Group = make_group(["east", "ghostly", "direct"])
    g.add_replication("ghostly", 'upstream = "ghost"')
    g.add_replication("direct", 'upstream = "east"')
    g.start_all("east")
    g.wait_synced("east", "ghostly", "a standby following a missing agent is fed by the primary")
    g.wait_synced("east", "direct", "a standby following the primary is fed by it")
    f = fed(g, "east")
    assert f["ghostly"] == "east" and f["direct"] == "east", f
    # The primary it names is lost; another standby is promoted: 'direct' must follow the new primary.
    g.kill("east", signal.SIGKILL)
    r = g.promote("ghostly", "--force")
    assert r.code == 0, r.err
    change(g, "ghostly", 2)
    g.wait_synced("ghostly", "direct", "the standby that followed the dead primary follows the new one")


# --- fan-out: a black-holed standby, and retention of what a vanished standby applied ----------------


def _advertise(g: Group, name: str, address: str) -> None:
    cfg = g.cfg[name]
    text = cfg.read_text()
    text = text.replace(f'listen = "{g.addr[name]}"\n', f'listen = "{g.addr[name]}"\nadvertise = "{address}"\n')
    cfg.write_text(text)


def test_a_black_holed_standby_never_delays_another(make_group: Any) -> None:
    g: Group = make_group(["east", "west", "north"])
    proxy = FaultProxy(g.addr["north"])
    try:
        _advertise(g, "north", proxy.address)
        for n in g.names:
            g.start(n)
        assert g.promote("east").code == 0
        g.wait_synced("east", "west", "west's first sync")
        g.wait_synced("east", "north", "north's first sync through the proxy")
        proxy.set("drop")  # a partition: TCP accepts, nothing arrives
        applied = ""
        for i in range(4):
            change(g, "east", i)
            # Each change reaches west while north's shipper hangs on the partition (no deadline on a stream).
            applied = g.wait_synced("east", "west", f"west to get change {i} while north is black-holed",
                                    after=applied, timeout=20)
        assert not (g.data["north"] / "catalog" / "change-0.txt").exists()
        proxy.set("pass")
        g.wait_synced("east", "north", "north to catch up after the partition heals", timeout=120)
    finally:
        proxy.close()


def test_the_primary_keeps_what_a_killed_standby_applied_despite_keep_last_1(make_group: Any) -> None:
    g: Group = make_group(["east", "west", "north"],
                          extra='\n[snapshots]\nkeep = { last = 1 }')
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    g.wait_synced("east", "north", "north's first sync")
    first = len(wait_for(lambda: shipped_to(g, "east", "north"), "north's first sync logged"))
    g.kill("north", signal.SIGKILL)
    applied = ""
    for i in range(6):
        change(g, "east", i)
        applied = g.wait_synced("east", "west", f"west to get change {i}", after=applied)
    g.start("north")
    g.wait_synced("east", "north", "north to catch up after its restart")
    later = wait_for(lambda: [s for s in shipped_to(g, "east", "north")[first:] if s[0]], "the catch-up logged")
    assert later and all(sent < total for sent, total in later), later


# --- cascades under faults -------------------------------------------------------------------------


def test_a_stale_relayed_snapshot_arriving_after_a_newer_one_is_refused(make_group: Any, tmp_path: Path) -> None:
    """near holds its relay of S1 to far; near freezes (its session expires: not live), east ships S2 to far
    directly; far acknowledges S2. near thaws and finishes relaying S1: far must keep S2 (same epoch, older
    position). The regression is watched continuously (east keeps shipping newer snapshots that would hide it)."""
    import threading

    pause = tmp_path / "pause"
    pause.mkdir()
    g: Group = make_group(["east", "near", "far"], session_timeout="2s")
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east", env={"near": {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}})
    g.wait_synced("east", "near", "near's first sync")
    g.wait_synced("east", "far", "far's first sync through near")
    (pause / "relay-commit").touch()
    change(g, "east", 1)
    wait_for(lambda: (pause / "relay-commit.reached").exists(), "near to hold its relayed commit of S1")
    g.procs["near"].send_signal(signal.SIGSTOP)
    try:
        (g.data["east"] / "catalog" / "change-1.txt").unlink()  # S2: change-1 gone, change-2 there
        change(g, "east", 2)
        s2_id = g.wait_synced("east", "far", "the primary to ship S2 to far while near is frozen", timeout=120)
        # Production is lost right after far acknowledged S2 (nothing newer will come to hide a regression).
        g.kill("east", signal.SIGKILL)
        (pause / "relay-commit").unlink()
    finally:
        g.procs["near"].send_signal(signal.SIGCONT)
    seen_back = threading.Event()
    done = threading.Event()

    def watch() -> None:  # every moment until the late relay was dealt with: far never goes back
        while not done.is_set():
            if (g.data["far"] / "catalog" / "change-1.txt").exists() or \
                    not (g.data["far"] / "catalog" / "change-2.txt").exists():
                seen_back.set()
            time.sleep(0.005)
    t = threading.Thread(target=watch)
    t.start()
    try:
        # near skips the late relay (far already applied a newer snapshot), or far refuses it.
        wait_for(lambda: "already applied a newer snapshot" in g.log("near") or "arrived late" in g.log("far"),
                 "the late relay of S1 to be skipped or refused")
    finally:
        done.set()
        t.join()
    applied = g.hello("far").applied_snapshot
    assert not seen_back.is_set(), f"far went back from S2 {s2_id} to an older snapshot (now {applied})"
    # S2, or a later capture of the same content east shipped before it was killed: never S1's.
    assert (g.data["far"] / "catalog" / "change-2.txt").exists()
    assert not (g.data["far"] / "catalog" / "change-1.txt").exists(), applied


def test_kill_9_near_mid_relay_far_stays_whole_and_is_fed_directly(make_group: Any, tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    pause.mkdir()
    g: Group = make_group(["east", "near", "far"], session_timeout="2s")
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east", env={"near": {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}})
    g.wait_synced("east", "far", "far's first sync through near")
    before = tree_state(g.data["far"])
    (pause / "relay-commit").touch()
    change(g, "east", 1)
    wait_for(lambda: (pause / "relay-commit.reached").exists(), "near to hold its relayed commit")
    g.kill("near", signal.SIGKILL)
    assert tree_state(g.data["far"]) == before
    change(g, "east", 2)
    g.wait_synced("east", "far", "far to be fed by the primary while near is dead", timeout=120)
    f = fed(g, "east")
    assert f["far"] == "east", f
    (pause / "relay-commit").unlink()
    g.start("near", env={**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)})
    change(g, "east", 3)
    g.wait_synced("east", "near", "near back")
    g.wait_synced("east", "far", "far back behind near")
    wait_for(lambda: fed(g, "east")["far"] == "near", "far to be fed by near again")


def test_promote_far_while_near_relays_no_split_brain_and_near_follows(make_group: Any, tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    pause.mkdir()
    g: Group = make_group(["east", "near", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east", env={"near": {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}})
    g.wait_synced("east", "far", "far's first sync through near")
    (pause / "relay-commit").touch()
    change(g, "east", 1)
    wait_for(lambda: (pause / "relay-commit.reached").exists(), "near to hold its relayed commit")
    watcher = PrimaryWatcher(g.hosts, g.group)
    try:
        r = g.promote("far", "--force")
        # near applied S1 and holds its relay: far is behind near, so this is refused (exit 4) ...
        assert r.code == 4 and "standby near has applied a newer snapshot" in r.err, (r.code, r.err)
        r = g.promote("far", "--force", "--accept-data-loss")
        assert r.code == 0, (r.code, r.err)
        own = tree_state(g.data["far"])
        to_far = f"to {g.addr['far']}"
        before = g.log("near").count(to_far)
        (pause / "relay-commit").unlink()
        wait_for(lambda: g.log("near").count(to_far) > before, "near's held relay to far to end")
        assert tree_state(g.data["far"]) == own, "the new primary's root was changed by a relay"
        (g.data["far"] / "catalog" / "far-own.txt").write_text("written on the new primary\n")
        g.wait_synced("far", "near", "near to follow far")
        wait_for(lambda: g.record("east").get("role") != "primary", "east to step down")
        assert [p for p in watcher.primary if p and p[0] == "east" and p[1] >= 2] == []
    finally:
        watcher.close()


def test_changing_upstream_and_restarting_far_needs_no_full_resync(make_group: Any) -> None:
    g: Group = make_group(["east", "near", "west", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east")
    for n in ("near", "west", "far"):
        g.wait_synced("east", n, f"{n}'s first sync")
    text = g.cfg["far"].read_text().replace('upstream = "near"', 'upstream = "west"')
    g.kill("far", signal.SIGTERM)
    g.cfg["far"].write_text(text)
    g.start("far")
    change(g, "east", 1)
    g.wait_synced("east", "west", "west gets change 1")
    g.wait_synced("east", "far", "far gets change 1 through west")
    wait_for(lambda: fed(g, "east")["far"] == "west", "far to be fed by west")
    sent = wait_for(lambda: shipped_to(g, "west", "far"), "west's shipment to far logged")
    assert sent and all(a < b for a, b in sent), sent


@FULL_ONLY
def test_far_lag_metric_is_small_in_a_cascade(make_group: Any) -> None:
    g: Group = make_group(["east", "near", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east")
    g.wait_synced("east", "far", "far's first sync")
    change(g, "east", 1)
    g.wait_synced("east", "far", "far gets change")
    lag_far = scrape(g.metrics["far"], g.group, "far")["drsync_replication_lag_seconds"]
    lag_near = scrape(g.metrics["near"], g.group, "near")["drsync_replication_lag_seconds"]
    assert 0 <= lag_far < 60 and 0 <= lag_near < 60, (lag_far, lag_near)


def test_far_lag_is_on_the_primarys_clock_when_near_and_far_clocks_are_wrong(make_group: Any) -> None:
    g: Group = make_group(["east", "near", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start("east")
    g.start("near", env=faketime_env(+600))
    g.start("far", env=faketime_env(-300))
    assert g.promote("east").code == 0
    g.wait_synced("east", "far", "far's first sync through near")
    change(g, "east", 1)
    g.wait_synced("east", "far", "far gets change through near")
    assert shipped_to(g, "near", "far"), "near relays"
    lag_far = scrape(g.metrics["far"], g.group, "far")["drsync_replication_lag_seconds"]
    lag_near = scrape(g.metrics["near"], g.group, "near")["drsync_replication_lag_seconds"]
    st = {a["name"]: a.get("lag_s") for a in g.status("east")["agents"]}
    assert 0 <= lag_near < 60, lag_near
    assert 0 <= lag_far < 60, (lag_far, st)


def test_promote_is_not_refused_because_of_a_live_ex_primarys_own_snapshots(make_group: Any) -> None:
    """west is promoted over a live east (fenced: an ex-primary waiting for rejoin, holding its own newer
    captures). west dies. Promoting north must not be refused for being 'behind' the ex-primary."""
    g: Group = make_group(["east", "west", "north"])
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    g.wait_synced("east", "north", "north's first sync")
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    wait_for(lambda: g.record("east").get("role") == "ex-primary", "east to wait as ex-primary")
    change(g, "east", 9)  # written on the fenced production: captured by nobody? east keeps its own
    g.kill("west", signal.SIGKILL)
    r = g.promote("north", "--force")
    assert r.code == 0, (r.code, r.err, g.status("north")["agents"])


def test_far_following_the_old_primary_never_gets_what_it_wrote_after_being_fenced(make_group: Any) -> None:
    """far follows east (upstream = "east"). west is promoted over a live east; east, fenced, has a file
    nobody shipped; it rejoins as a standby and becomes far's upstream again: far must never see that file,
    and ends equal to west."""
    g: Group = make_group(["east", "west", "far"])
    g.add_replication("far", 'upstream = "east"')
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    g.wait_synced("east", "far", "far's first sync")
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    wait_for(lambda: g.record("east").get("role") == "ex-primary", "east to wait as ex-primary")
    (g.data["east"] / "catalog" / "unshipped.txt").write_text("written on fenced production\n")
    change(g, "west", 1)
    g.wait_synced("west", "far", "far fed by west while east is an ex-primary")
    r = g.drsync("east", "rejoin")
    assert r.code == 0, (r.code, r.err)
    g.wait_synced("west", "east", "east rejoined as a standby")
    change(g, "west", 2)
    g.wait_synced("west", "far", "far gets change 2")
    wait_for(lambda: fed(g, "west")["far"] == "east", "far to follow the rejoined east")
    change(g, "west", 3)
    g.wait_synced("west", "far", "far gets change 3 through east")
    assert not (g.data["far"] / "catalog" / "unshipped.txt").exists()


@FULL_ONLY
def test_automatic_failover_with_the_best_standby_frozen_then_thawed(make_group: Any) -> None:
    """west is the most current but frozen (SIGSTOP) when east dies: north takes over; west thaws and
    must follow north (never a second primary), and a cascaded far (upstream west) keeps being fed."""
    g: Group = make_group(["east", "west", "north", "far"], session_timeout="2s", failover="automatic",
                          extra='failover_cooldown = "0s"\nfence_command = "none"')
    g.add_replication("far", 'upstream = "west"')
    g.start_all("east")
    for n in ("west", "north", "far"):
        g.wait_synced("east", n, f"{n}'s first sync")
    watcher = PrimaryWatcher(g.hosts, g.group)
    try:
        g.procs["west"].send_signal(signal.SIGSTOP)
        g.kill("east", signal.SIGKILL)
        wait_for(lambda: (p := g.primary()) is not None and p[0] != "east", "an automatic failover", 120)
        new = g.primary()
        assert new is not None and new[0] in ("north", "far"), new
        g.procs["west"].send_signal(signal.SIGCONT)
        change(g, new[0], 1)
        others = [n for n in ("west", "north", "far") if n != new[0]]
        for n in others:
            g.wait_synced(new[0], n, f"{n} to follow {new[0]}", timeout=120)
        primaries = {p for p in watcher.primary if p is not None}
        assert primaries == {("east", 1), new}, watcher.primary
    finally:
        g.procs["west"].send_signal(signal.SIGCONT)
        watcher.close()
