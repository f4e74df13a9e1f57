"""A commit is acknowledged however long the standby's apply takes; a dead standby is found by keepalive.

The standby is a real agent process; the primary side is this process shipping a real snapshot over
:class:`GrpcStandbyLink` (``ship_snapshot``). The apply is slowed with the test-only fault injection
``DRSYNC_FAULT_APPLY_DELAY_S`` (drsync/apply.py), and the keepalive interval is shortened with
``DRSYNC_GRPC_KEEPALIVE_S`` (drsync/transport/grpc.py) on both ends.

What the old options did (measured with grpc 1.85 before the fix): the client pinged every 20 s,
sent two pings without data and then one a minute; the server's default policy (one ping per
5 minutes without data, GOAWAY after 2 strikes) answered the fifth ping, 220 s into the apply, with
GOAWAY ``too_many_pings``: the commit failed UNAVAILABLE while the standby kept applying.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from drsync import engine
from drsync.agent.primary import ship_snapshot
from drsync.errors import OperationFailed
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import make_tree
from tests.test_agents import Pair, wait_for

FULL = os.environ.get("DRSYNC_RELIABILITY") == "full"


def _primary_snapshot(tmp: Path) -> tuple[Repository, str]:
    """A primary-side repository (the pair's cluster id and release) with one snapshot of a new tree."""
    make_tree(tmp / "primary-data", seed=7, files=10, big=1)
    repo = Repository.init(LocalStorage(tmp / "primary-repo-x", create=True), cluster_id="analytics",
                           release="6.2.1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp / "primary-data")))
    return repo, info.id


def _ship_with_slow_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keepalive_s: float | None,
                          delay_s: float) -> None:
    if keepalive_s is not None:
        monkeypatch.setenv("DRSYNC_GRPC_KEEPALIVE_S", str(keepalive_s))  # this process and the agent
    monkeypatch.setenv("DRSYNC_FAULT_APPLY_DELAY_S", str(delay_s))  # read by the standby agent's apply
    pair = Pair(tmp_path)
    try:
        pair.start("standby")
        monkeypatch.delenv("DRSYNC_FAULT_APPLY_DELAY_S")  # this process applies nothing; keep it clean
        repo, snap = _primary_snapshot(tmp_path)
        link = GrpcStandbyLink(pair.standby_addr, sender="primary")
        try:
            started = time.monotonic()
            result = ship_snapshot(repo, repo.find_snapshot(snap), link, epoch=1, sender="primary")
            took = time.monotonic() - started
            assert result.applied.snapshot == snap, "the commit was not acknowledged with the snapshot id"
            assert took >= delay_s, f"the apply was not slowed ({took:.1f}s)"
            assert link.hello("test", 1).applied_snapshot == snap
        finally:
            link.close()
        # One commit, acknowledged: the standby received exactly one shipment of this snapshot.
        log = (tmp_path / "standby.log").read_text(errors="replace")
        assert log.count(f"applied snapshot {snap}") == 1, log[-2000:]
    finally:
        pair.stop_all()


def test_a_long_apply_is_acknowledged_with_a_short_keepalive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalive 1 s, apply 15 s: the client pings about 15 times on a call without data; both ends must
    agree. With the new client against the old server policy the commit fails "unreachable (Too many
    pings)" (GOAWAY after the third strike). With the old options on both ends it passes: the old client
    sends two pings without data and then one a minute, so its GOAWAY comes only ~184 s into an apply
    at any keepalive up to a minute (the slow test below has the defect as it happened; the dead-peer
    test shows the old client's blindness)."""
    _ship_with_slow_apply(tmp_path, monkeypatch, keepalive_s=1.0, delay_s=15.0)


def test_a_dead_standby_is_found_by_keepalive_not_by_a_deadline(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The standby agent freezes (SIGSTOP) in the middle of an apply: the commit fails as unreachable
    within a few keepalive intervals (1 s + its 5 s ping timeout), not after an hour's deadline. The old
    options found it after 80 s (a 20 s keepalive, then gRPC's default ping timeout of 1 minute)."""
    monkeypatch.setenv("DRSYNC_GRPC_KEEPALIVE_S", "1")
    monkeypatch.setenv("DRSYNC_FAULT_APPLY_DELAY_S", "120")
    pair = Pair(tmp_path)
    proc = None
    try:
        pair.start("standby")
        monkeypatch.delenv("DRSYNC_FAULT_APPLY_DELAY_S")
        proc = pair.procs["standby"]
        repo, snap = _primary_snapshot(tmp_path)
        link = GrpcStandbyLink(pair.standby_addr, sender="primary")
        applying = tmp_path / "standby-repo" / "agent" / "applying.json"
        outcome: list[BaseException | object] = []

        def ship() -> None:
            try:
                outcome.append(ship_snapshot(repo, repo.find_snapshot(snap), link, epoch=1, sender="primary"))
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=ship)
        t.start()
        wait_for(applying.exists, "the standby to start applying")
        proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        t.join(timeout=60)
        found_after = time.monotonic() - frozen_at
        assert outcome, "the commit still waits for a frozen standby after 60 s"
        assert isinstance(outcome[0], OperationFailed) and "unreachable" in str(outcome[0]), outcome[0]
        assert found_after < 20, f"a frozen standby was found only after {found_after:.0f}s"
        link.close()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGCONT)
        pair.stop_all()


@pytest.mark.skipif(not FULL, reason="a 250 s apply: runs with DRSYNC_RELIABILITY=full (make reliability)")
def test_an_apply_longer_than_4_minutes_is_acknowledged_at_the_default_keepalive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect as it happened: default keepalive (20 s), an apply of 250 s. The old options ended the
    commit with GOAWAY too_many_pings at 220 s."""
    monkeypatch.delenv("DRSYNC_GRPC_KEEPALIVE_S", raising=False)
    _ship_with_slow_apply(tmp_path, monkeypatch, keepalive_s=None, delay_s=250.0)
