"""drsync status and history tell the truth (issue 20): every agent the group has known, up or down with
when it was last seen, and every change of primary. Real ZooKeeper, real agent processes."""

from __future__ import annotations

import getpass
import json
import signal
import socket
import time
import urllib.request
from typing import Any

from tests.group import Group, wait_for


def bootstrap(g: Group) -> None:
    for name in g.names:
        g.start(name)
    r = g.promote("east")
    assert r.code == 0, r.err
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")


def rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in doc["agents"]}


def table(g: Group, name: str) -> str:
    r = g.drsync(name, "status")
    assert r.code == 0, r.err
    print(r.out)  # shown with pytest -s: what an operator reads
    return r.out


def test_kill_9_primary_is_down_at_once_and_stays_listed(make_group) -> None:  # type: ignore[no-untyped-def]
    """A kill -9 leaves the session (registration and primary node) alive for the session timeout; status
    says down at once, because nothing listens on the agent's address any more."""
    g = make_group(["east", "west"], session_timeout="30s")
    bootstrap(g)
    up = g.status("west")
    assert up["primary"] == "east"
    assert {n: (a["state"], a["role"]) for n, a in rows(up).items()} == {"east": ("up", "primary"),
                                                                         "west": ("up", "standby")}
    assert all(a["last_seen_age_s"] < 60 and a["last_seen"].endswith("Z") for a in up["agents"])
    killed_at = time.time()
    g.kill("east")
    doc = g.status("west")
    east, west = rows(doc)["east"], rows(doc)["west"]
    # The session is still alive (the registration is there): this is long before it times out.
    assert east["registered"] is True and g.coord.read_primary().agent == "east"  # type: ignore[union-attr]
    assert east["state"] == "down" and east["role"] is None and east["last_role"] == "primary"
    assert "nothing listens on" in east["down_reason"] and east["probe"] == "refused"
    assert east["last_seen_unix"] <= killed_at and east["last_seen"].endswith("Z")
    assert doc["primary"] is None and doc["primary_claim"]["agent"] == "east"
    assert doc["primary_claim"]["state"] == "down"
    assert west["state"] == "up" and west["role"] == "standby"
    out = table(g, "west")
    assert "primary east is DOWN" in out and "--force" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("east "))
    assert " down " in line and "was primary" in line and " ago" in line
    assert "agent east is down: nothing listens on" in out
    # After the session timeout the registration is gone; east is still listed, down, last seen before the kill.
    wait_for(lambda: "east" not in g.coord.agents(), "east's session to expire", timeout=90)
    doc = g.status("west")
    east = rows(doc)["east"]
    assert east["state"] == "down" and east["registered"] is False and east["last_role"] == "primary"
    assert "session ended without a clean stop" in east["down_reason"]
    assert east["last_seen_unix"] <= killed_at and east["last_seen_age_s"] >= time.time() - killed_at - 1
    assert doc["primary"] is None and doc["primary_claim"] is None
    out = table(g, "west")
    assert "primary (none; epoch 1 names east, which is down)" in out


def test_stopped_primary_is_down_with_the_maintenance_marker(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"])
    bootstrap(g)
    g.kill("east", signal.SIGTERM)  # a clean stop: maintenance marker, claim released, record marked
    doc = g.status("west")
    east = rows(doc)["east"]
    assert east["state"] == "down" and east["maintenance"] is True and east["role"] is None
    assert east["down_reason"] == "stopped cleanly (agent stopped)" and east["last_role"] == "primary"
    assert doc["primary"] is None and doc["maintenance"]["agent"] == "east"
    out = table(g, "west")
    line = next(ln for ln in out.splitlines() if ln.startswith("east "))
    assert "down (maintenance)" in line and "was primary" in line
    assert "MAINTENANCE: agent east" in out
    # Back: it takes its claim back at the same epoch, which the history records.
    g.start("east")
    wait_for(lambda: rows(g.status("west"))["east"]["role"] == "primary", "east to be primary again")
    doc = g.status("west")
    assert doc["primary"] == "east" and rows(doc)["east"]["state"] == "up" and doc["maintenance"] is None
    newest = g.drsync("west", "history", "--json").json()[0]
    assert (newest["epoch"], newest["from"], newest["to"], newest["why"]) == (1, "east", "east", "claim after restart")
    assert newest["by"].startswith("agent east on ")


def test_frozen_agent_is_down_once_its_heartbeat_is_stale(make_group) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP: the port still accepts connections (the kernel does) and the session lives for a minute, but
    the heartbeat stops and nothing answers: down after twice the refresh interval plus 5 s."""
    g = make_group(["east", "west"], session_timeout="60s")
    bootstrap(g)
    g.procs["west"].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        def west() -> dict[str, Any]:
            return rows(g.status("east"))["west"]

        row = wait_for(lambda: (w := west())["state"] == "down" and w, "west to be shown down", timeout=60)
        assert row["registered"] is True and row["probe"] == "silent" and "no heartbeat for" in row["down_reason"]
        assert row["last_seen_unix"] <= stopped_at + 1 and time.time() - row["last_seen_unix"] > 15
    finally:
        g.procs["west"].send_signal(signal.SIGCONT)
    wait_for(lambda: west()["state"] == "up", "west to be up again")


def test_history_of_first_forced_and_switchover(make_group) -> None:  # type: ignore[no-untyped-def]
    g = make_group(["east", "west"])
    bootstrap(g)  # epoch 1: first promotion of east
    r = g.promote("west", "--force")  # epoch 2: forced, east's session alive
    assert r.code == 0, r.err
    g.wait_role("east", "ex-primary")
    assert g.drsync("east", "rejoin").code == 0
    g.wait_role("east", "standby")
    wait_for(lambda: g.in_sync("west", "east") and g.record("east").get("applied_snapshot"), "east to follow west")
    r = g.drsync("east", "switchover", "--json")  # epoch 3: planned hand-over back to east
    assert r.code == 0, r.err
    me = f"{getpass.getuser()}@{socket.gethostname()}"
    r = g.drsync("west", "history", "--json")
    assert r.code == 0, r.err
    # A primary that lost its ZooKeeper session (a busy machine) and took its claim back at the same
    # epoch is recorded too ("claim after lost session"): a real event, not one this test makes.
    entries = [e for e in json.loads(r.out) if not str(e["why"]).startswith("claim after")]
    assert [(e["epoch"], e["from"], e["to"], e["why"], e["by"]) for e in entries] == [
        (3, "west", "east", "switchover", me), (2, "east", "west", "forced", me),
        (1, None, "east", "first promotion", me)]
    assert [e["seq"] for e in entries] == sorted((e["seq"] for e in entries), reverse=True)
    assert entries[2]["at_unix"] < entries[1]["at_unix"] < entries[0]["at_unix"]
    assert all(e["at"].endswith("Z") for e in entries)
    assert entries[0]["snapshot"] and entries[1]["snapshot"] and "--force" in entries[1]["detail"]
    assert [e["epoch"] for e in g.drsync("east", "history", "--json", "--limit", "1").json()] == [3]
    out = g.drsync("west", "history")
    assert out.code == 0
    print(out.out)
    lines = [ln for ln in out.out.splitlines() if "claim after" not in ln]
    assert lines[0].split()[:6] == ["EPOCH", "WHEN", "FROM", "TO", "WHY", "BY"]
    assert lines[1].split()[0] == "3" and "switchover" in lines[1] and lines[3].split()[0] == "1"
    bad = g.drsync("west", "history", "--limit", "-1")
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1


def page(g: Group, name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{g.metrics[name]}/status.json", timeout=10) as r:
        return json.loads(r.read())


def test_a_dead_standby_keeps_the_primarys_lag_growing_and_stays_listed(make_group) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: kill -9 the standby; once its session expired the primary's lag was NaN (no alert could
    fire), the standby vanished from its page, and the primary logged nothing above INFO. Now the lag keeps
    growing from the standby's last known position, it stays listed (down), the primary warns once, and
    drsync status keeps its last applied snapshot."""
    import math

    from tests.group import scrape

    g = make_group(["east", "west"], session_timeout="4s")
    bootstrap(g)
    applied = g.record("west")["applied_snapshot"]
    g.kill("west")
    wait_for(lambda: "west" not in g.coord.agents(), "west's session to expire", timeout=60)

    def west_row() -> dict[str, Any] | None:
        return next((a for a in page(g, "east")["agents"] if a["name"] == "west"), None)

    row = wait_for(lambda: (r := west_row()) and r.get("state") == "down" and r, "east's page to list west down")
    assert row["applied_snapshot"] == applied and row["lag_s"] is not None
    first = page(g, "east")["lag_s"]
    assert first is not None
    lag_metric = "drsync_replication_lag_seconds"
    wait_for(lambda: (v := scrape(g.metrics["east"], g.group, "east").get(lag_metric)) is not None
             and not math.isnan(v) and v > first + 1, "the primary's lag metric to keep growing")
    wait_for(lambda: page(g, "east")["lag_s"] > first + 1, "the primary's page lag to keep growing")
    with urllib.request.urlopen(f"http://{g.metrics['east']}/", timeout=10) as r:
        html = r.read().decode()
    assert 'data-agent="west"' in html and 'id="lag-now">-<' not in html
    # One WARNING for the change, not one per cycle; the capture lines say why nothing is shipped.
    warnings = [ln for ln in g.log("east").splitlines() if "standby west" in ln and "is gone" in ln]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and applied in warnings[0], warnings
    wait_for(lambda: "(no standby to ship to: west down)" in g.log("east"), "a capture that names west as down")
    # drsync status keeps west's last applied snapshot from its persistent member record.
    doc = g.status("east")
    west = rows(doc)["west"]
    assert west["state"] == "down" and west["applied_snapshot"] == applied and west["lag_s"] is not None
    # Back: no longer counted as lost.
    g.start("west")
    wait_for(lambda: (r := west_row()) and r.get("state") == "up", "west to be listed up again")
    wait_for(lambda: "standby west is back" in g.log("east"), "east to say west is back")


def test_the_ex_primary_names_the_epoch_it_held_once(make_group) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: "agent east: agent east was primary at epoch 2" (it held epoch 1), then an INFO role line
    "standby (primary west at epoch 2)" contradicting it. Now the epoch it held, one prefix, and a role line
    that says ex-primary."""
    g = make_group(["east", "west"])
    bootstrap(g)
    assert g.promote("west", "--force").code == 0  # epoch 2; east's session is alive
    g.wait_role("east", "ex-primary")
    # The role is reported as soon as east steps down; the line saying why it keeps its root follows.
    wait_for(lambda: "was primary at epoch" in g.log("east"), "east to say which epoch it held")
    lines = g.log("east").splitlines()
    held = [ln for ln in lines if "was primary at epoch" in ln]
    assert held and all("was primary at epoch 1 " in ln for ln in held), held
    assert not any("agent east: agent east" in ln for ln in lines)
    role = [ln for ln in lines if "ex-primary of epoch 1" in ln]
    assert role and " WARNING " in role[0], lines[-10:]
    assert not any(" INFO " in ln and ": standby (primary west at epoch 2)" in ln for ln in lines)
    # A restart of the primary re-claims its own epoch: routine, INFO (a takeover stays WARNING).
    g.kill("west")
    g.start("west")

    def claim_lines() -> list[str]:
        return [ln for ln in g.log("west").splitlines() if "claim (epoch 2 names this agent)" in ln]

    claims = wait_for(lambda: len(claim_lines()) >= 2 and claim_lines(), "west to take its claim back after restart")
    assert claims and " WARNING " in claims[0] and " INFO " in claims[-1], claims
