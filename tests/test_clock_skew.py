"""Lag stays right when the agents' clocks disagree (DESIGN.md "lag").

One real agent runs under libfaketime, its clock 10 minutes ahead or behind the
others'. Lag is read on the primary's clock: the standby estimates the offset
from the timestamps on the primary's requests, keeps counting on its own clock
once the primary is frozen (also across its own restart), and automatic
failover eligibility does not change with the skew. The truth each figure is
checked against is the primary's clock (this test's clock plus the skew
injected into the primary, if any) minus the capture time the primary stamped
on the applied snapshot.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import time
import tomllib
from pathlib import Path

import pytest

from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import SLOW, make_tree, run_drsync
from tests.group import Group, scrape, wait_for
from tests.users import pair_configs, start_agent

SKEW_S = 600
ACCURACY_S = 2.0  # what the issue asks: lag within 2 s of the truth under +-10 minutes of skew
ERRORS: dict[str, float] = {}  # measured errors, shown with -s
DEVIATIONS: dict[str, str] = {}  # lag minus the middle of the truth's interval, and that interval's width


@pytest.fixture(scope="module", autouse=True)
def _report_errors():  # type: ignore[no-untyped-def]
    yield
    for what, err in ERRORS.items():
        print(f"lag error, {what}: {err:.3f} s")
    for what, dev in DEVIATIONS.items():
        print(f"lag - truth, {what}: {dev}")


def faketime_env(offset_s: int) -> dict[str, str]:
    """The environment of a process whose wall clock is ``offset_s`` seconds off (monotonic clocks real)."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime is not installed: run the tests with make test, which installs it")
    # tests/faketime_sleep: time.sleep fails under libfaketime with real monotonic clocks; a shim waits instead.
    shim = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faketime_sleep")
    path = os.pathsep.join(p for p in (shim, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "LD_PRELOAD": libs[0], "FAKETIME": f"{offset_s:+d}", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "PYTHONPATH": path}


def lag_error(metrics_addr: str, agent: str, primary_skew: int, group: str = "default") -> tuple[float, float]:
    """One scrape of the agent's lag; returns (lag, its distance from the truth). The truth is read just
    before and just after the scrape: the error is how far the lag is outside that interval."""
    before = time.time()
    m = scrape(metrics_addr, group, agent)
    after = time.time()
    lag, captured = m["drsync_replication_lag_seconds"], m["drsync_last_applied_snapshot_timestamp_seconds"]
    assert not math.isnan(lag) and captured > 0, m
    lo, hi = before + primary_skew - captured, after + primary_skew - captured
    DEVIATIONS[f"{agent} at lag {lag:.1f}s (skews: primary {primary_skew:+d}s)"] = \
        f"{lag - (lo + hi) / 2:+.3f} s (truth read over {hi - lo:.3f} s)"
    return lag, max(lo - lag, lag - hi, 0.0)


def truth_now(metrics_addr: str, agent: str, primary_skew: int, group: str = "default") -> float:
    captured = scrape(metrics_addr, group, agent)["drsync_last_applied_snapshot_timestamp_seconds"]
    return time.time() + primary_skew - captured if captured > 0 else 0.0


def serves_metrics(address: str) -> bool:
    try:
        return not math.isnan(scrape(address, "default", "standby").get("drsync_replication_lag_seconds", math.nan))
    except OSError:
        return False


def serves_grpc(address: str) -> bool:
    link = GrpcStandbyLink(address)
    try:
        return link.health()
    finally:
        link.close()


def hello(address: str):  # type: ignore[no-untyped-def]
    link = GrpcStandbyLink(address)
    try:
        return link.hello("test", 0)  # epoch 0: never taken as a sample of the primary's clock
    finally:
        link.close()


@pytest.mark.parametrize("standby_skew,primary_skew", [(SKEW_S, 0), (-SKEW_S, 0), (0, SKEW_S)],
                         ids=["standby-ahead", "standby-behind", "primary-ahead"])
def test_lag_is_right_under_clock_skew_and_keeps_counting_without_the_primary(
        tmp_path: Path, standby_skew: int, primary_skew: int) -> None:
    prod, standby = tmp_path / "prod", tmp_path / "standby"
    make_tree(prod, files=20, big=1)
    standby.mkdir()
    scfg, pcfg = pair_configs(tmp_path, prod, standby, primary_extra='interval = "1s"\n')
    s_metrics = tomllib.loads(scfg.read_text())["agent"]["metrics"]
    s_listen = tomllib.loads(scfg.read_text())["agent"]["listen"]
    s_env = faketime_env(standby_skew) if standby_skew else None
    p_env = faketime_env(primary_skew) if primary_skew else None
    procs = {"standby": start_agent(scfg, tmp_path / "standby.log", s_env)}
    case = f"standby {standby_skew:+d}s, primary {primary_skew:+d}s"
    try:
        wait_for(lambda: serves_grpc(s_listen), "the standby to serve")
        procs["primary"] = start_agent(pcfg, tmp_path / "primary.log", p_env)
        # Replicating: a few shipments applied, so the standby has had samples of the primary's clock.
        first = wait_for(lambda: hello(s_listen).applied_snapshot, "the first apply")
        wait_for(lambda: hello(s_listen).applied_snapshot not in ("", first), "a second apply")
        lag, err = lag_error(s_metrics, "standby", primary_skew)
        ERRORS[f"{case}, replicating"] = err
        assert err <= ACCURACY_S, f"{case}: lag {lag:.3f}s is {err:.3f}s off the truth while replicating"

        # drsync status on the pair (this machine's clock, unskewed) agrees: it reads the primary's
        # clock from its Hello.
        def status_error() -> float | None:
            h1 = hello(s_listen)
            before = time.time()
            r = run_drsync("status", "--json", "--config", pcfg)
            after = time.time()
            assert r.code == 0, r.err
            h2 = hello(s_listen)
            if h1.applied_snapshot != h2.applied_snapshot:
                return None  # an apply in between: measure again
            lag = next(a["lag_s"] for a in json.loads(r.out)["agents"] if a["role"] == "standby")
            lo = before + primary_skew - h1.applied_captured_at
            hi = after + primary_skew - h1.applied_captured_at
            return max(lo - lag, lag - hi, 0.0)

        # Every cycle is recorded as applied (unchanged content too): on a busy machine a status call
        # takes longer than a cycle, and a status between two applies might never come. The primary's
        # agent is frozen meanwhile (status asks the standby, not it); one apply may still land.
        measured: list[float] = []
        procs["primary"].send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: (e := status_error()) is not None and not measured.append(e),
                     "a status between applies")
        finally:
            procs["primary"].send_signal(signal.SIGCONT)
        err = measured[0]
        ERRORS[f"{case}, drsync status"] = err
        assert err <= ACCURACY_S, f"{case}: drsync status shows a lag {err:.3f}s off the truth"

        # The primary's agent frozen: the standby keeps counting on its own clock.
        procs["primary"].send_signal(signal.SIGSTOP)
        wait_for(lambda: truth_now(s_metrics, "standby", primary_skew) > 6.0, "the true lag to grow past 6 s")
        lag, err = lag_error(s_metrics, "standby", primary_skew)
        ERRORS[f"{case}, primary frozen"] = err
        assert lag > 4.0 and err <= ACCURACY_S, f"{case}: lag {lag:.3f}s is {err:.3f}s off with the primary frozen"

        # And across a restart of the standby while the primary is still gone (the offset was persisted).
        old = procs.pop("standby")
        old.send_signal(signal.SIGTERM)
        old.wait(timeout=30 * SLOW)
        procs["standby"] = start_agent(scfg, tmp_path / "standby.log", s_env)
        wait_for(lambda: serves_metrics(s_metrics), "the restarted standby to serve metrics")
        lag, err = lag_error(s_metrics, "standby", primary_skew)
        ERRORS[f"{case}, primary frozen, standby restarted"] = err
        assert lag > 4.0 and err <= ACCURACY_S, f"{case}: lag {lag:.3f}s is {err:.3f}s off after a restart"
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30 * SLOW)


def test_automatic_failover_is_eligible_with_the_standby_ten_minutes_ahead(
        tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Before lag was read on the primary's clock, a standby 10 minutes ahead thought its lag was 600 s,
    over max_lag_on_failover, and refused to take over from a dead primary."""
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], session_timeout="2s", failover="automatic",
              extra='fence_command = "none"\nmax_lag_on_failover = "60s"\nfailover_cooldown = "0s"')
    try:
        g.start("east")
        g.start("west", env=faketime_env(SKEW_S))
        r = g.promote("east")
        assert r.code == 0, r.err
        wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"),
                 "west to apply production")
        lag, err = lag_error(g.metrics["west"], "west", 0, group)
        ERRORS["group: standby +600s, replicating"] = err
        # What west publishes (and drsync status shows) is on the primary's clock too, not 600 s off.
        row = next(a for a in g.status("east")["agents"] if a["name"] == "west")
        record = g.record("west")
        epoch = g.coord.read_epoch().epoch
        g.kill("east")
        wait_for(lambda: g.primary() == ("west", epoch + 1), "west to take over by itself", timeout=60)
        assert "exceeds max_lag_on_failover" not in g.log("west")
        assert err <= ACCURACY_S, f"west's lag {lag:.3f}s is {err:.3f}s off the truth"
        assert row["lag_s"] is not None and row["lag_s"] < 60, row
        # West ranks by position, published as [epoch of the sender, its sequence number], never by time.
        position = record.get("applied_position")
        assert isinstance(position, list) and position[0] == epoch and position[1] >= 1, record
    finally:
        g.stop_all()
