"""A commit is acknowledged however long the standby's apply takes; a dead standby is found by keepalive.

The first tests run in this process, in seconds: the option sets drsync.transport.grpc builds for a client
and a server agree at any keepalive, and a real server (``start_server``) in front of a real
:class:`StandbyReceiver` acknowledges a commit whose apply lasts many keepalive intervals, with no deadline
on the call (and, as a control, cuts it with the server's ping policy at gRPC's defaults). The others use a
real agent process as the standby. In both the primary side is this process shipping a real snapshot over
:class:`GrpcStandbyLink` (``ship_snapshot``); the apply is slowed with the test-only fault injection
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
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from drsync import engine
from drsync.agent.primary import ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.errors import OperationFailed
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.transport import grpc as transport
from drsync.transport.grpc import GrpcStandbyLink
from drsync.transport.pb import drsync_pb2 as pb
from tests.conftest import make_tree
from tests.test_agents import Pair, wait_for
from tests.zk import free_port

FULL = os.environ.get("DRSYNC_RELIABILITY") == "full"


def _primary_snapshot(tmp: Path) -> tuple[Repository, str]:
    """A primary-side repository (the pair's cluster id and release) with one snapshot of a new tree."""
    make_tree(tmp / "primary-data", seed=7, files=10, big=1)
    repo = Repository.init(LocalStorage(tmp / "primary-repo-x", create=True), cluster_id="analytics",
                           release="6.2.1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp / "primary-data")))
    return repo, info.id


# --- in this process, in seconds --------------------------------------------------------------------

# The channel arguments drsync sets, by the names gRPC reads (grpc/impl/channel_arg_names.h and chttp2's
# internal.h). A name gRPC does not know is ignored without a word: the server once set
# "grpc.http2.min_recv_ping_interval_without_data_ms", which is none of these.
RECV_PING_INTERVAL = "grpc.http2.min_ping_interval_without_data_ms"  # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_...
GRPC_ARGS = {"grpc.max_receive_message_length", "grpc.max_send_message_length", "grpc.keepalive_time_ms",
             "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms", "grpc.keepalive_permit_without_calls",
             "grpc.http2.max_pings_without_data", "grpc.so_reuseport", RECV_PING_INTERVAL,
             "grpc.http2.max_ping_strikes"}
# What a server does with its clients' pings when its options do not say (gRPC core, chttp2): it accepts one
# ping per 5 minutes on a connection without data, answers the third early one with GOAWAY "too_many_pings",
# and takes pings on a connection without calls as early. The old server set none of these.
GRPC_SERVER_DEFAULTS = {RECV_PING_INTERVAL: 300_000, "grpc.http2.max_ping_strikes": 2,
                        "grpc.keepalive_permit_without_calls": 0}
# And a client: two pings without data, then none until data is sent; a ping times out after a minute.
GRPC_CLIENT_DEFAULTS = {"grpc.http2.max_pings_without_data": 2, "grpc.http2.ping_timeout_ms": 60_000}


@pytest.mark.parametrize("keepalive", [None, "300", "1", "0.1"], ids=["default-20s", "300s", "1s", "0.1s"])
def test_the_servers_ping_policy_accepts_the_clients_keepalive_pings(monkeypatch: pytest.MonkeyPatch,
                                                                      keepalive: str | None) -> None:
    """The real option sets (what GrpcStandbyLink and start_server pass to gRPC) at any keepalive: the server
    accepts a ping every keepalive interval on a call without data, for as long as the call lasts. The old
    options (the client's keepalive 20 s and nothing else, the server on gRPC's defaults) fail each check."""
    if keepalive is None:
        monkeypatch.delenv(transport.KEEPALIVE_ENV, raising=False)
    else:
        monkeypatch.setenv(transport.KEEPALIVE_ENV, keepalive)
    assert {k for k, _ in transport.server_options()} <= GRPC_ARGS, "an option gRPC does not read"
    client = {**GRPC_CLIENT_DEFAULTS, **dict(transport.channel_options())}
    server = {**GRPC_CLIENT_DEFAULTS, **GRPC_SERVER_DEFAULTS, **dict(transport.server_options())}
    ka_ms = client["grpc.keepalive_time_ms"]
    assert ka_ms == int(transport.keepalive_s() * 1000) == int(float(keepalive or 20) * 1000)
    # Pings at the client's interval are never early for the server, and early ones never end the call.
    assert server[RECV_PING_INTERVAL] <= ka_ms
    assert server["grpc.http2.max_ping_strikes"] == 0
    # A client that pings an idle connection talks to a server that accepts pings without calls.
    if client.get("grpc.keepalive_permit_without_calls"):
        assert server["grpc.keepalive_permit_without_calls"] == 1
    # The client keeps pinging a call without data (how a frozen standby is found), each ping timed out
    # after the keepalive timeout rather than gRPC's minute.
    assert client["grpc.http2.max_pings_without_data"] == 0
    assert client["grpc.http2.ping_timeout_ms"] == client["grpc.keepalive_timeout_ms"] <= max(5_000, ka_ms)


class WatchedServicer(transport.ReplicationServicer):
    """The real servicer; it notes what the handler of each Commit sees of the call's deadline (seconds
    left, None for none) and when the handler is done."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.deadlines: list[float | None] = []
        self.done = threading.Event()

    def Commit(self, request_iterator: Iterator[pb.CommitPart], context: grpc.ServicerContext) -> pb.CommitReply:
        self.deadlines.append(context.time_remaining())
        try:
            return super().Commit(request_iterator, context)
        finally:
            self.done.set()


def _ship_in_process(tmp: Path, monkeypatch: pytest.MonkeyPatch, *, apply_s: float) -> tuple[
        WatchedServicer, object, float]:
    """Ship a snapshot from a primary repository here to a standby here (a real StandbyReceiver behind
    ``start_server``) whose apply takes ``apply_s`` (DRSYNC_FAULT_APPLY_DELAY_S). Returns the servicer,
    the shipment's result or the error it raised, and how long it took."""
    repo, snap = _primary_snapshot(tmp)
    srepo = Repository.init(LocalStorage(tmp / "standby-repo", create=True), cluster_id="analytics",
                            release="6.2.1")
    (tmp / "standby-data").mkdir()
    rx = StandbyReceiver(srepo, str(tmp / "standby-data"), StateStore(str(tmp / "standby-state")), agent="standby")
    servicer = WatchedServicer(rx, agent="standby", role="standby", cluster_id="analytics", release="6.2.1")
    addr = f"127.0.0.1:{free_port()}"
    server = transport.start_server(servicer, addr)
    link = GrpcStandbyLink(addr, sender="primary")
    monkeypatch.setenv("DRSYNC_FAULT_APPLY_DELAY_S", str(apply_s))  # read by the apply, in this process
    started = time.monotonic()
    try:
        try:
            out: object = ship_snapshot(repo, repo.find_snapshot(snap), link, epoch=1, sender="primary")
        except OperationFailed as e:
            out = e
        took = time.monotonic() - started
        assert servicer.done.wait(apply_s + 60), "the standby's commit handler never ended"
    finally:
        link.close()
        server.stop(None).wait()
    return servicer, out, took


# The slowed apply of the two tests below. The client pings at most once a second on a call however short
# its keepalive (gRPC's own floor), and a server on gRPC's defaults cuts the call at the fourth ping without
# data: measured 4-5 s into the shipment, so 8 s leaves room on a busy machine.
SLOW_APPLY_S = 8.0


def test_a_commit_waiting_many_keepalive_intervals_is_acknowledged_without_a_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalive 0.1 s on both ends (production's option-building functions, shortened through
    DRSYNC_GRPC_KEEPALIVE_S), an apply of 8 s: the client pings the standby all along a call without data,
    and the commit is acknowledged with the snapshot applied. The standby's handler sees no deadline on the
    call (the old client set one hour, after which the primary gave up on an apply still running)."""
    monkeypatch.setenv(transport.KEEPALIVE_ENV, "0.1")
    servicer, out, took = _ship_in_process(tmp_path, monkeypatch, apply_s=SLOW_APPLY_S)
    assert not isinstance(out, Exception), f"the commit was not acknowledged: {out}"
    assert out.applied.snapshot == out.snapshot and took >= SLOW_APPLY_S, (out, took)  # type: ignore[attr-defined]
    # gRPC shows a call without a deadline as infinitely far (or None); the old client's hour as 3600 s.
    assert len(servicer.deadlines) == 1, servicer.deadlines
    assert servicer.deadlines[0] is None or servicer.deadlines[0] > 10**9, \
        f"the Commit call carries a deadline: {servicer.deadlines[0]:.0f} s"


def test_the_same_commit_is_cut_by_a_server_on_grpcs_default_ping_policy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above, so that it cannot pass for want of pings: the same pair, the server's
    ping policy left at gRPC's defaults, ends the commit with GOAWAY too_many_pings before the apply ends
    (the standby finishes it anyway: the defect as it happened, in seconds)."""
    monkeypatch.setenv(transport.KEEPALIVE_ENV, "0.1")
    ours = transport.server_options
    monkeypatch.setattr(transport, "server_options",
                        lambda: [o for o in ours() if o[0] not in GRPC_SERVER_DEFAULTS])
    _, out, took = _ship_in_process(tmp_path, monkeypatch, apply_s=SLOW_APPLY_S)
    assert isinstance(out, OperationFailed), f"the commit went through: {out}"
    assert "unreachable (Too many pings)" in str(out) and took < SLOW_APPLY_S, (str(out), took)


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
