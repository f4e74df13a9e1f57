"""Several standbys: fan-out from one primary, cascades through a standby, failover to the most current one.

Real agents (processes), real gRPC on loopback, real ZooKeeper.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from tests.conftest import init_repo, tree_state
from tests.group import Group, PrimaryWatcher, scrape, wait_for


def shipped_to(g: Group, sender: str, target: str) -> list[tuple[int, int]]:
    """(chunks sent, chunks in the snapshot) of every shipment ``sender`` logged to agent ``target``."""
    pat = re.compile(rf"to {re.escape(g.addr[target])}: applied \((\d+)/(\d+) chunks sent")
    return [(int(a), int(b)) for a, b in pat.findall(g.log(sender))]


def change(g: Group, name: str, i: int) -> None:
    (g.data[name] / "catalog" / f"change-{i}.txt").write_text(f"change {i}\n" * (i + 1))


def test_a_stalled_standby_never_delays_the_others_and_catches_up_with_only_what_it_lacks(make_group: Any) -> None:
    g: Group = make_group(["east", "west", "north"])
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    g.wait_synced("east", "north", "north's first sync")
    first = wait_for(lambda: shipped_to(g, "east", "north"), "the first sync logged")
    assert first and first[0][0] == first[0][1]  # the first sync sent everything
    g.procs["north"].send_signal(signal.SIGSTOP)  # frozen: its shipper's stream hangs
    try:
        applied = ""
        for i in range(3):
            change(g, "east", i)
            applied = g.wait_synced("east", "west", f"west to get change {i} while north is frozen", after=applied)
        assert not (g.data["north"] / "catalog" / "change-0.txt").exists()
    finally:
        g.procs["north"].send_signal(signal.SIGCONT)
    g.wait_synced("east", "north", "north to catch up")
    # North's applied snapshot stayed in the primary's repository while north was behind, so its catch-up
    # negotiated only what changed since: a few chunks, not the whole tree again.
    # The primary logs a shipment once the standby's commit reply is back, which may be a moment after the
    # standby reports the snapshot applied.
    later = wait_for(lambda: [s for s in shipped_to(g, "east", "north")[len(first):] if s[0]], "the catch-up logged")
    assert later and all(sent < total for sent, total in later), later


def test_a_cascade_crosses_the_wan_once_and_follows_the_promoted_middle_without_a_resync(
        make_group: Any) -> None:
    g: Group = make_group(["east", "near", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east")
    g.wait_synced("east", "near", "near's first sync")
    g.wait_synced("east", "far", "far to receive through near")
    change(g, "east", 1)
    g.wait_synced("east", "far", "a change to reach far through near")
    assert shipped_to(g, "near", "far"), "near relays to far"
    assert not shipped_to(g, "east", "far"), "the primary must not ship to a standby that follows near"
    # Positions are the producer's: far stands where near stands, comparable for failover.
    wait_for(lambda: g.record("far").get("applied_position") == g.record("near").get("applied_position"),
             "far to publish near's position")
    status = g.status("east")
    fed = {a["name"]: a.get("fed_by") for a in status["agents"]}
    assert fed["far"] == "near" and fed["near"] == "east", status["agents"]
    # Far's lag is on the primary's clock, and small: near stamps the primary's clock it estimates.
    lag = scrape(g.metrics["far"], g.group, "far")["drsync_replication_lag_seconds"]
    assert 0 <= lag < 600, lag

    # The primary is lost; the middle of the cascade is promoted; far follows it and gets only the new chunks.
    g.kill("east", signal.SIGKILL)
    relayed_before = len(shipped_to(g, "near", "far"))
    r = g.promote("near", "--force")
    assert r.code == 0, r.err
    change(g, "near", 2)
    g.wait_synced("near", "far", "far to follow the promoted near")
    after = wait_for(lambda: shipped_to(g, "near", "far")[relayed_before:], "near's shipment to far logged")
    assert after and all(sent < total for sent, total in after), after


def test_failover_picks_the_most_current_standby_and_the_other_refollows(make_group: Any) -> None:
    g: Group = make_group(["east", "west", "north"], session_timeout="2s", failover="automatic",
                          extra='failover_cooldown = "0s"\nfence_command = "none"')
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    g.wait_synced("east", "north", "north's first sync")
    # North holds its applies: it receives, but its root (and position) stays behind west's.
    assert g.drsync("north", "apply", "--hold").code == 0
    change(g, "east", 1)
    g.wait_synced("east", "west", "west to apply a change north holds back")
    wait_for(lambda: tuple(g.record("west").get("applied_position") or ()) >
             tuple(g.record("north").get("applied_position") or ()), "west's position to pass north's")
    # By hand, the standby further behind is refused: it would lose what west holds (exit 4, nothing changed).
    r = g.promote("north", "--force")
    assert r.code == 4 and "standby west has applied a newer snapshot" in r.err, (r.code, r.err)
    assert g.primary() == ("east", 1)
    watcher = PrimaryWatcher(g.hosts, g.group)
    try:
        g.kill("east", signal.SIGKILL)
        wait_for(lambda: (p := g.primary()) is not None and p != ("east", 1), "an automatic failover")
        assert g.primary() == ("west", 2), "\n".join(
            f"{n}: {line}" for n in ("west", "north") for line in g.log(n).splitlines()
            if any(w in line for w in ("PRIMARY", "session", "failover", "epoch", "promot")))
        assert g.drsync("north", "apply", "--resume").code == 0
        change(g, "west", 2)
        g.wait_synced("west", "north", "north to follow west")
        assert [p for p in watcher.primary if p is not None and p[0] == "north"] == []
    finally:
        watcher.close()
    assert tree_state(g.data["north"]) == tree_state(g.data["west"])


def test_fixed_roles_a_standby_listing_standbys_relays_what_it_applied(tmp_path: Any) -> None:
    """Without ZooKeeper: primary -> near (role standby, replication.standbys = [far]) -> far."""
    import subprocess
    import sys

    from tests.conftest import make_tree
    from tests.zk import free_port

    addr = {n: f"127.0.0.1:{free_port()}" for n in ("prod", "near", "far")}
    nxt = {"prod": "near", "near": "far"}
    make_tree(tmp_path / "prod-data", files=20, big=1)
    procs = []
    try:
        for name in ("far", "near", "prod"):
            if name != "prod":
                (tmp_path / f"{name}-data").mkdir()
            cfg = tmp_path / f"{name}.toml"
            role = "primary" if name == "prod" else "standby"
            cfg.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{tmp_path / (name + "-data")}"\n'
                           f'repository = "{tmp_path / (name + "-repo")}"\n[agent]\nname = "{name}"\n'
                           f'role = "{role}"\nlisten = "{addr[name]}"\nmetrics = ""\n[replication]\ninterval = "1s"\n'
                           + (f'standbys = ["{addr[nxt[name]]}"]\n' if name in nxt else ""))
            init_repo(cfg)
            with open(tmp_path / f"{name}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)],
                                              stdout=log, stderr=log))
        wait_for(lambda: tree_state(tmp_path / "far-data") == tree_state(tmp_path / "prod-data"),
                 "far to receive production's tree through near")
        (tmp_path / "prod-data" / "catalog" / "late.txt").write_text("late\n")
        wait_for(lambda: (tmp_path / "far-data" / "catalog" / "late.txt").exists(), "a change to reach far")
        prod_log = (tmp_path / "prod.log").read_text()
        assert f"to {addr['far']}" not in prod_log and f"to {addr['near']}: applied" in prod_log
        assert f"to {addr['far']}: applied" in (tmp_path / "near.log").read_text()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def test_a_cascaded_standby_refuses_what_a_fenced_primary_produced(make_group: Any, tmp_path: Any) -> None:
    """near relays a snapshot east produced at epoch 1; before it commits, east is lost and west promoted
    (epoch 2): far refuses the relayed snapshot, then takes what west produced, through near."""
    import os

    pause = tmp_path / "pause"
    pause.mkdir()
    g: Group = make_group(["east", "west", "near", "far"])
    g.add_replication("far", 'upstream = "near"')
    g.start_all("east", env={"near": {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}})
    for n in ("west", "near", "far"):
        g.wait_synced("east", n, f"{n}'s first sync")
    (pause / "relay-commit").touch()
    change(g, "east", 1)
    wait_for(lambda: (pause / "relay-commit.reached").exists(), "near to hold its relayed commit")
    g.kill("east", signal.SIGKILL)
    r = g.promote("west", "--force")
    assert r.code == 0, r.err
    (pause / "relay-commit").unlink()
    wait_for(lambda: "relays a snapshot produced at epoch 1, lower than epoch 2" in g.log("far"),
             "far to refuse the snapshot of the fenced primary")
    change(g, "west", 2)
    g.wait_synced("west", "far", "far to follow west's snapshots through near")
    assert not shipped_to(g, "west", "far")
