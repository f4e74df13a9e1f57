"""Breaker: bandwidth by time of day (issue 19 part 4) with real agents, fixed roles, one primary and two
standbys: "near" (unlimited) and "far" (its own [replication.targets."<address>"])."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import SLOW, init_repo, make_tree, run_drsync, tree_state
from tests.group import wait_for
from tests.test_continuous import metric
from tests.zk import free_port


class FanOut:
    def __init__(self, tmp: Path, replication: str, targets: str) -> None:
        self.tmp = tmp
        self.prod = tmp / "prod"
        make_tree(self.prod, files=10, big=1)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.addr = {n: f"127.0.0.1:{free_port()}" for n in ("primary", "near", "far")}
        self.metrics = {n: f"127.0.0.1:{free_port()}" for n in ("primary", "near", "far")}
        self.data = {"primary": self.prod, "near": tmp / "near-data", "far": tmp / "far-data"}
        self.cfg: dict[str, Path] = {}
        for n in ("near", "far"):
            self.data[n].mkdir()
            self._write(n, "standby", "")
        standbys = json.dumps([self.addr["near"], self.addr["far"]])
        self._write("primary", "primary",
                    f'[replication]\nstandbys = {standbys}\n{replication}\n'
                    + targets.replace("FAR", self.addr["far"]).replace("NEAR", self.addr["near"]))

    def _write(self, n: str, role: str, extra: str) -> None:
        p = self.tmp / f"{n}.toml"
        p.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{self.data[n]}"\n'
                     f'repository = "{self.tmp / (n + "-repo")}"\n'
                     f'[agent]\nname = "{n}"\nrole = "{role}"\nlisten = "{self.addr[n]}"\n'
                     f'metrics = "{self.metrics[n]}"\n{extra}')
        init_repo(p)
        self.cfg[n] = p

    def start(self, n: str) -> None:
        with open(self.tmp / f"{n}.log", "ab") as log:
            self.procs[n] = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(self.cfg[n])],
                                             stdout=log, stderr=log)
        if n != "primary":
            link = GrpcStandbyLink(self.addr[n])
            wait_for(link.health, f"{n} to serve")
            link.close()

    def start_all(self) -> None:
        self.start("near")
        self.start("far")
        self.start("primary")

    def stop_all(self) -> None:
        for n in list(self.procs):
            p = self.procs.pop(n)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30 * SLOW)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def synced(self, n: str) -> bool:
        return tree_state(self.data[n]) == tree_state(self.prod)

    def log(self, n: str = "primary") -> str:
        return (self.tmp / f"{n}.log").read_text(errors="replace")

    def status(self) -> dict:  # type: ignore[type-arg]
        with urllib.request.urlopen(f"http://{self.metrics['primary']}/status.json", timeout=10) as r:
            return json.loads(r.read())


def hhmm(t: dt.datetime) -> str:
    return t.strftime("%H:%M")


# These wait for a real window of time of day to end (30-90 s each): make reliability runs them.
WAITS_FOR_A_WINDOW = pytest.mark.skipif(os.environ.get("DRSYNC_RELIABILITY") != "full",
                                        reason="waits for a real bandwidth window to end: DRSYNC_RELIABILITY=full "
                                               "(make reliability)")


def window_from_now(minutes: int) -> tuple[str, str, dt.datetime]:
    """A window holding now (UTC) that ends ``minutes`` minute boundaries later (at least 30 s away)."""
    now = dt.datetime.now(dt.UTC)
    start = now.replace(second=0, microsecond=0)
    end = start + dt.timedelta(minutes=minutes)
    if (end - now).total_seconds() < 30:
        end += dt.timedelta(minutes=1)
    return hhmm(start), hhmm(end), end


@pytest.fixture
def fan(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[FanOut] = []

    def make(replication: str, targets: str) -> FanOut:
        f = FanOut(tmp_path, replication, targets)
        made.append(f)
        return f
    yield make
    for f in made:
        f.stop_all()


def test_the_rate_in_force_is_honoured(fan) -> None:  # type: ignore[no-untyped-def]
    f = fan('interval = "1s"', '[replication.targets."FAR"]\nbandwidth_limit = "1MiB/s"\n')
    f.start_all()
    wait_for(lambda: f.synced("near") and f.synced("far"), "the first shipments", 60)
    assert metric(f.metrics["primary"], "drsync_bandwidth_limit_bytes_per_second", target=f.addr["far"]) == 1048576
    (f.prod / "big.bin").write_bytes(os.urandom(8 << 20))
    t0 = time.monotonic()
    wait_for(lambda: f.synced("near"), "near (unlimited) to get 8 MiB", 30)
    # The slow target did not hold near back: near has it while far (at least 7 s at 1 MiB/s) does not yet.
    assert not f.synced("far"), "far got 8 MiB at 1 MiB/s as soon as near: not paced"
    wait_for(lambda: f.synced("far"), "far (1MiB/s) to get 8 MiB", 60)
    far_s = time.monotonic() - t0
    # A lower bound only (the pacer's guarantee, whatever the machine's speed): 8 MiB less one message.
    assert far_s >= 6.5, f"8 MiB at 1 MiB/s took {far_s:.1f}s"


@WAITS_FOR_A_WINDOW
def test_an_off_window_pauses_one_target_only_and_resumes_at_its_end(fan) -> None:  # type: ignore[no-untyped-def]
    start, end, end_at = window_from_now(1)
    f = fan('interval = "1s"', f'[replication.targets."FAR"]\nbandwidth_schedule = "{start}-{end} off UTC"\n')
    f.start_all()
    wait_for(lambda: f.synced("near"), "near", 60)
    wait_for(lambda: metric(f.metrics["primary"], "drsync_bandwidth_paused", target=f.addr["far"]) == 1,
             "drsync_bandwidth_paused{far} = 1", 20)
    assert metric(f.metrics["primary"], "drsync_bandwidth_limit_bytes_per_second", target=f.addr["far"]) == -1
    assert not f.synced("far")
    st = f.status()
    print(json.dumps(st.get("bandwidth"), indent=1))
    assert st["bandwidth"][f.addr["far"]]["paused_until"]
    (f.prod / "during.txt").write_text("written during the off window")
    wait_for(lambda: f.synced("near"), "near to keep following while far is off", 20)
    fails = metric(f.metrics["primary"], "drsync_ship_failures_total", target=f.addr["far"]) or 0
    assert fails == 0
    pauses = [ln for ln in f.log().splitlines() if "paused by replication.bandwidth_schedule" in ln]
    assert len(pauses) == 1, pauses
    # The window ends: far resumes (no backoff) within a few seconds of its end.
    wait_for(lambda: f.synced("far"), "far to resume at the window's end",
             (end_at - dt.datetime.now(dt.UTC)).total_seconds() / SLOW + 10)
    assert (metric(f.metrics["primary"], "drsync_ship_failures_total", target=f.addr["far"]) or 0) == 0


@WAITS_FOR_A_WINDOW
def test_a_slow_window_ending_speeds_up_a_shipment_in_flight(fan) -> None:  # type: ignore[no-untyped-def]
    """2 KiB/s now, unlimited from the window's end: "the rate in force is read before every upload message",
    so the shipment in flight must finish soon after the window ends, not after 1 MiB at 2 KiB/s (512 s)."""
    start, end, end_at = window_from_now(1)
    f = fan('interval = "1s"', f'[replication.targets."FAR"]\nbandwidth_schedule = "{start}-{end} 2KiB/s UTC"\n')
    (f.prod / "big.bin").write_bytes(os.urandom(4 << 20))
    f.start_all()
    wait_for(lambda: f.synced("near"), "near", 60)
    left = (end_at - dt.datetime.now(dt.UTC)).total_seconds()
    wait_for(lambda: f.synced("far"), "far to finish once the slow window is over",
             (left + 30) / SLOW)
    late = (dt.datetime.now(dt.UTC) - end_at).total_seconds()
    print(f"far synced {late:.1f}s after the slow window's end")


def test_an_agent_throttled_to_a_crawl_stops_promptly(fan) -> None:  # type: ignore[no-untyped-def]
    f = fan('interval = "1s"', '[replication.targets."FAR"]\nbandwidth_limit = "1KiB/s"\n')
    (f.prod / "big.bin").write_bytes(os.urandom(2 << 20))
    f.start_all()
    wait_for(lambda: f.synced("near"), "near", 60)
    wait_for(lambda: "shipping to" in f.log() or "captured" in f.log(), "a shipment to start", 30)
    # near synced while the shipment to far (2 MiB at 1 KiB/s: it cannot finish) runs beside it.
    p = f.procs.pop("primary")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError("the primary did not stop within 60 s of SIGTERM while throttled") from None
    print(f"stopped in {time.monotonic() - t0:.1f}s")


def test_a_target_key_matching_no_standby_is_reported(fan) -> None:  # type: ignore[no-untyped-def]
    """Fixed roles: the standbys are known, so a target keyed "localhost:PORT" for "127.0.0.1:PORT" (or a typo)
    limits nothing; expected: a config error (exit 2) or at least a warning naming the key."""
    f = fan('interval = "1s"', '[replication.targets."localhost:1"]\nbandwidth_limit = "1MiB/s"\n')
    r = run_drsync("config", "check", "--timeout", "0.2", "--config", f.cfg["primary"])
    out = r.out + r.err
    assert r.code == 2 or "localhost:1" in out.replace(str(f.cfg["primary"]), ""), out


def test_agent_once_reports_a_paused_target_as_not_shipped_and_exits_0(fan) -> None:  # type: ignore[no-untyped-def]
    start, end, _ = window_from_now(2)
    f = fan('interval = "1s"', f'[replication.targets."FAR"]\nbandwidth_schedule = "{start}-{end} off UTC"\n')
    f.start("near")
    f.start("far")
    r = run_drsync("agent", "--once", "--config", f.cfg["primary"])
    print(r.code, r.out, r.err)
    assert "not shipped: paused" in (r.out + r.err), r.out + r.err
    assert r.code == 0, "a paused target is not a failure"
