"""The ZooKeeper coordinator against a real server: compare-and-set epochs, the guarded primary claim,
ephemeral records, ACLs and chroot."""

from __future__ import annotations

import time

import pytest

from drsync.coordination import CoordinationUnavailable, Epoch, EpochConflict, PrimaryTaken, SessionState
from drsync.coordination.zookeeper import ZooKeeperCoordinator
from drsync.errors import UsageError


def coord(hosts: str, group: str, **kw: object) -> ZooKeeperCoordinator:
    c = ZooKeeperCoordinator(hosts, group, session_timeout_s=4.0, **kw)  # type: ignore[arg-type]
    c.start()
    return c


def test_epoch_is_a_compare_and_set(zk_server, group: str) -> None:
    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        e0 = a.read_epoch()
        assert e0 == Epoch()
        e1 = a.promote(e0, "east", "first")
        assert (e1.epoch, e1.promoted_by) == (1, "east")
        with pytest.raises(EpochConflict):
            b.promote(e0, "west", "stale read")  # b read the epoch before a's promotion
        seen = b.read_epoch()
        assert (seen.epoch, seen.promoted_by, seen.version) == (1, "east", e1.version)
        e2 = b.promote(seen, "west", "manual")
        with pytest.raises(EpochConflict):
            a.promote(e1, "east", "again")
        assert a.read_epoch().epoch == e2.epoch == 2
    finally:
        a.close()
        b.close()


def test_primary_claim_is_guarded_by_the_epoch_and_dies_with_the_session(zk_server, group: str) -> None:
    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        e1 = a.promote(a.read_epoch(), "east", "first")
        claim = a.claim_primary(e1, "east", "127.0.0.1:1")
        assert claim.mine and b.read_primary() == claim.__class__("east", "127.0.0.1:1", 1, claim.since, False)
        with pytest.raises(PrimaryTaken):
            b.claim_primary(e1, "west", "127.0.0.1:2")  # same epoch, another agent: no
        # A promotion between reading the epoch and claiming makes the claim fail, and changes nothing.
        e2 = b.promote(e1, "west", "forced")
        with pytest.raises(EpochConflict):
            a.claim_primary(e1, "east", "127.0.0.1:1")
        assert b.read_primary().agent == "east"  # type: ignore[union-attr]
        # The promoted agent replaces the fenced claim of the lower epoch in one transaction.
        won = b.claim_primary(e2, "west", "127.0.0.1:2")
        assert (won.agent, won.epoch) == ("west", 2)
        assert a.read_primary() == won.__class__("west", "127.0.0.1:2", 2, won.since, False)
        a.release_primary("east")  # not a's node any more: nothing happens
        assert a.read_primary().agent == "west"  # type: ignore[union-attr]
        b.close()  # the session ends: its ephemeral claim goes with it
        assert a.read_primary() is None
    finally:
        a.close()
        b.close()


def test_records_state_and_drills(zk_server, group: str) -> None:
    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        a.register("east", {"role": "primary", "address": "x"})
        b.register("west", {"role": "standby", "address": "y", "lag_s": 3.5})
        a.register("east", {"role": "primary", "address": "x2"})
        assert a.agents() == {"east": {"role": "primary", "address": "x2"},
                              "west": {"role": "standby", "address": "y", "lag_s": 3.5}}
        b.write_state({"snapshot": "s1", "epoch": 1})
        assert a.read_state() == {"snapshot": "s1", "epoch": 1}
        for i in range(5):
            a.add_drill({"n": i, "passed": True}, keep=3)
        assert [d["n"] for d in b.drills(10)] == [2, 3, 4]
        b.close()
        assert list(a.agents()) == ["east"]
    finally:
        a.close()
        b.close()


def test_session_states_reach_listeners(zk_server, group: str) -> None:
    a = coord(zk_server.hosts, group)
    seen: list[SessionState] = []
    a.add_listener(seen.append)
    assert a.state is SessionState.CONNECTED
    a.close()
    assert a.state is SessionState.LOST


def test_digest_acls_keep_other_clients_out(zk_server, group: str) -> None:
    owner = coord(zk_server.hosts, group, username="drsync", password="s3cret")
    try:
        owner.promote(owner.read_epoch(), "east", "first")
        with pytest.raises(UsageError, match="check coordination.username"):
            coord(zk_server.hosts, group)  # no credentials
        with pytest.raises(UsageError, match="ACL"):
            coord(zk_server.hosts, group, username="drsync", password="wrong")
        other = coord(zk_server.hosts, group, username="drsync", password="s3cret")
        assert other.read_epoch().epoch == 1
        other.close()
    finally:
        owner.close()


def test_chroot_in_the_connect_string(zk_server, group: str) -> None:
    root = coord(zk_server.hosts, group)
    root.zk.ensure_path(f"/tenants/{group}")
    try:
        inside = coord(f"{zk_server.hosts}/tenants/{group}", "g")
        inside.promote(inside.read_epoch(), "east", "first")
        inside.close()
        assert root.zk.exists(f"/tenants/{group}/drsync/g/epoch") is not None
        with pytest.raises(UsageError, match="chroot"):
            coord(f"{zk_server.hosts}/no/such/{group}", "g")
    finally:
        root.close()


def test_unreachable_zookeeper_is_one_clear_error() -> None:
    from tests.zk import free_port

    c = ZooKeeperCoordinator(f"127.0.0.1:{free_port()}", "g", session_timeout_s=2.0, connect_timeout_s=1.0)
    with pytest.raises(CoordinationUnavailable, match="cannot reach ZooKeeper"):
        c.start()


def test_hand_over_uses_the_version_of_the_claim_and_a_promotion_in_between_wins(zk_server, group: str) -> None:
    """Switchover's compare-and-set: a promotion after the claim was taken (even one that the primary
    has not noticed yet) makes the hand-over fail and change nothing; the promotion stands."""
    east, operator = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        e1 = east.promote(east.read_epoch(), "east", "first")
        east.claim_primary(e1, "east", "127.0.0.1:1")
        forced = operator.promote(operator.read_epoch(), "north", "forced")
        with pytest.raises(EpochConflict, match="nothing was changed"):
            east.hand_over(e1, "east", "west")
        now = operator.read_epoch()
        assert (now.epoch, now.promoted_by, now.version) == (2, "north", forced.version)
        # Without the claim (released, or lost with the session) there is nothing to hand over either.
        e2b = operator.read_epoch()
        east.release_primary("east")
        with pytest.raises(EpochConflict, match="no longer holds the primary node"):
            east.hand_over(e2b, "east", "west")
        assert operator.read_epoch() == now
        # With the claim and no promotion in between, the hand-over is one transaction.
        e3 = east.promote(now, "east", "back")
        east.claim_primary(e3, "east", "127.0.0.1:1")
        done = east.hand_over(e3, "east", "west")
        assert (done.epoch, done.promoted_by) == (4, "west") and operator.read_primary() is None
    finally:
        east.close()
        operator.close()


def test_maintenance_marker_round_trip(zk_server, group: str) -> None:
    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        assert a.view().maintenance is None
        a.set_maintenance({"agent": "east", "since": 1.0, "reason": "agent stopped"})
        a.close()  # persistent: it outlives the session that wrote it
        assert b.view().maintenance == {"agent": "east", "since": 1.0, "reason": "agent stopped"}
        b.clear_maintenance("west")  # somebody else's marker: left alone
        assert b.read_maintenance() is not None
        b.clear_maintenance("east")
        assert b.read_maintenance() is None
    finally:
        b.close()


def test_members_outlive_sessions_with_heartbeat_and_clean_leave(zk_server, group: str) -> None:
    """members/<name> is persistent: refreshed by the heartbeat, marked on a clean stop, kept after expiry."""
    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        a.register("east", {"role": "primary", "address": "x", "agent_id": "A", "refresh_s": 5.0, "lag_s": 1})
        b.register("west", {"role": "standby", "address": "y", "agent_id": "W"})
        east = a.members()["east"]
        assert east.record is not None and east.record["address"] == "x"
        assert {k: east.member[k] for k in ("name", "role", "address", "agent_id", "refresh_s")} == \
            {"name": "east", "role": "primary", "address": "x", "agent_id": "A", "refresh_s": 5.0}
        assert "lag_s" not in east.member and east.member["session_timeout_s"] > 0
        assert abs(east.refreshed_at - time.time()) < 60
        # The heartbeat refreshes the record, only from the session holding the registration.
        assert a.touch_member("east") is True
        beat = a.members()["east"]
        assert beat.member["last_seen"] > east.member["last_seen"] and beat.refreshed_at >= east.refreshed_at
        assert b.touch_member("east") is False
        # A clean stop: the registration goes, the record says so; another agent id's record is left alone.
        b.deregister("east", "W", "agent stopped")
        assert a.members()["east"].record is not None and "left_at" not in a.members()["east"].member
        a.deregister("east", "A", "agent stopped")
        gone = b.members()["east"]
        assert gone.record is None and gone.member["left_reason"] == "agent stopped" and gone.member["left_at"] > 0
        # A session that ends without a word (kill -9, expiry): the record stays, without left_at.
        b.close()
        west = a.members()["west"]
        assert west.record is None and west.member["address"] == "y" and "left_at" not in west.member
        # Registering again clears the clean-stop mark.
        a.register("east", {"role": "standby", "address": "x", "agent_id": "A"})
        assert "left_at" not in a.members()["east"].member
    finally:
        a.close()
        b.close()


def test_history_is_written_in_the_same_transaction_as_the_epoch(zk_server, group: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from drsync.coordination import zookeeper

    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    try:
        e1 = a.promote(a.read_epoch(), "east", "first promotion", history={"from": None, "why": "first promotion",
                                                                            "by": "ops@h"})
        claim = a.claim_primary(e1, "east", "127.0.0.1:1")
        assert claim.mine
        (h1,) = b.history(10)
        assert (h1["epoch"], h1["from"], h1["to"], h1["why"], h1["by"]) == (1, None, "east", "first promotion", "ops@h")
        # A promotion that loses the compare-and-set leaves no history behind.
        with pytest.raises(EpochConflict):
            b.promote(Epoch(), "west", "manual", history={"from": "east", "why": "manual", "by": "ops@h"})
        assert len(b.history(10)) == 1
        e2 = b.promote(b.read_epoch(), "west", "forced", history={"from": "east", "why": "forced", "by": "ops@h"})
        b.claim_primary(e2, "west", "127.0.0.1:2")
        b.release_primary("west")
        b.claim_primary(e2, "west", "127.0.0.1:2", history={"from": "west", "why": "claim after restart", "by": "w"})
        done = b.hand_over(e2, "west", "east", history={"from": "west", "why": "switchover", "by": "ops@h"})
        assert done.epoch == 3
        entries = a.history(10)
        assert [(e["epoch"], e["from"], e["to"], e["why"]) for e in entries] == [
            (3, "west", "east", "switchover"), (2, "west", "west", "claim after restart"),
            (2, "east", "west", "forced"), (1, None, "east", "first promotion")]
        assert [e["seq"] for e in entries] == sorted((e["seq"] for e in entries), reverse=True)
        assert a.history(2) == entries[:2]
        # Bounded to the newest HISTORY_KEEP.
        monkeypatch.setattr(zookeeper, "HISTORY_KEEP", 3)
        e = a.read_epoch()
        for _ in range(3):
            e = a.promote(e, "east", "manual", history={"from": "east", "why": "manual", "by": "ops@h"})
        assert [x["epoch"] for x in a.history(100)] == [6, 5, 4]
    finally:
        a.close()
        b.close()


def test_a_name_belongs_to_its_agent_id_live_or_not_until_an_operator_replaces_it(zk_server, group: str) -> None:
    """Issue 20: members/<name> holds the agent id that owns the name; another id is refused under it while
    the owner is down too, and an epoch naming the agent records its id, so that only that identity claims
    it. replace_identity (drsync replace-identity) moves both to a new id in one transaction, with history."""
    import os
    import socket

    from drsync.coordination import DuplicateAgent
    from drsync.errors import RefusedError

    a, b = coord(zk_server.hosts, group), coord(zk_server.hosts, group)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        a.register("east", {"role": "standby", "address": "x", "agent_id": "REAL", **me})
        e1 = b.promote(b.read_epoch(), "east", "first", agent_id="REAL")
        assert b.read_epoch().agent_id == "REAL" and e1.agent_id == "REAL"
        with pytest.raises(DuplicateAgent, match="another agent is already registered as 'east'.*address x"):
            b.register("east", {"role": "standby", "address": "y", "agent_id": "COPY", **me})
        a.deregister("east", "REAL", "agent stopped")  # the real agent stops cleanly
        with pytest.raises(DuplicateAgent, match="agent name 'east' .* belongs to another agent \\(agent id REAL"):
            b.register("east", {"role": "standby", "address": "y", "agent_id": "COPY", **me})
        assert "east" not in b.agents() and b.members()["east"].member["agent_id"] == "REAL"
        # Another identity cannot take the primary node at an epoch that records the real one.
        with pytest.raises(PrimaryTaken, match="agent id REAL, not this agent"):
            b.claim_primary(b.read_epoch(), "east", "y", agent_id="COPY")
        assert b.read_primary() is None
        # The same identity in another live process elsewhere (a copied state directory) is refused too;
        # its own earlier session (same host, process gone) is replaced.
        a.register("east", {"role": "standby", "address": "x", "agent_id": "REAL", "host": "elsewhere", "pid": 1})
        with pytest.raises(DuplicateAgent, match="another process runs with agent 'east''s identity.*host elsewhere"):
            b.register("east", {"role": "standby", "address": "y", "agent_id": "REAL", **me})
        a.register("east", {"role": "standby", "address": "x", "agent_id": "REAL", "host": me["host"],
                            "pid": os.getppid()})  # alive, and not the registering process
        with pytest.raises(DuplicateAgent, match="another process runs"):
            b.register("east", {"role": "standby", "address": "y", "agent_id": "REAL", **me})
        a.register("east", {"role": "standby", "address": "x", "agent_id": "REAL", "host": me["host"],
                            "pid": 2 ** 22 + 1})  # a pid above pid_max: gone
        b.register("east", {"role": "standby", "address": "y", "agent_id": "REAL", **me})
        assert b.agents()["east"]["address"] == "y"
        # Replacing the identity is refused while the name is registered live, and changes nothing.
        with pytest.raises(RefusedError, match="registered live"):
            a.replace_identity("east", "NEW", {"from": "east", "why": "identity replaced", "by": "ops@h"})
        assert b.read_epoch().agent_id == "REAL"
        b.deregister("east", "REAL", "agent stopped")
        before = a.replace_identity("east", "NEW", {"from": "east", "why": "identity replaced", "by": "ops@h"})
        assert before["agent_id"] == "REAL"
        member = a.members()["east"].member
        assert (member["agent_id"], member["replaced_agent_id"]) == ("NEW", "REAL")
        e = a.read_epoch()
        assert (e.epoch, e.promoted_by, e.agent_id) == (1, "east", "NEW")
        assert (a.history(1)[0]["why"], a.history(1)[0]["to"]) == ("identity replaced", "east")
        with pytest.raises(DuplicateAgent, match="agent id NEW"):
            a.register("east", {"role": "standby", "address": "x", "agent_id": "REAL", **me})
        assert a.claim_primary(e, "east", "z", agent_id="NEW").agent == "east"
    finally:
        a.close()
        b.close()
