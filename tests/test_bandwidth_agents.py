"""Bandwidth schedules with real agents: a target that is off gets nothing and nothing counts as a failure, a
shipment in flight stops when its window turns off and resumes with what is missing, a low rate paces.

Time of day is never waited for: the in-process shipper reads an injected clock, and the agent processes
get windows chosen around the current local time when their configs are written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from drsync.agent.primary import UPLOAD_MESSAGE_BYTES
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import SLOW, init_repo, make_tree, run_drsync, tree_state
from tests.group import wait_for
from tests.zk import free_port

MiB = 1024 * 1024


class Agents:
    """Agents with fixed roles over loopback gRPC: a primary (production's data) and standbys."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.addr: dict[str, str] = {}
        self.metrics: dict[str, str] = {}
        self.cfg: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def data(self, name: str) -> Path:
        return self.tmp / f"{name}-data"

    def configure(self, name: str, role: str, extra: str = "") -> Path:
        if name not in self.addr:
            self.addr[name], self.metrics[name] = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            self.data(name).mkdir(exist_ok=True)
        p = self.cfg[name] = self.tmp / f"{name}.toml"
        p.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{self.data(name)}"\n'
                     f'repository = "{self.tmp / (name + "-repo")}"\n'
                     f'[agent]\nname = "{name}"\nrole = "{role}"\nlisten = "{self.addr[name]}"\n'
                     f'metrics = "{self.metrics[name]}"\n{extra}')
        if not (self.tmp / f"{name}-repo").exists():
            init_repo(p)
        return p

    def start(self, name: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config",
                                                 str(self.cfg[name])], stdout=log, stderr=log)
        link = GrpcStandbyLink(self.addr[name])
        try:
            wait_for(link.health, f"agent {name} to serve")
        finally:
            link.close()

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30 * SLOW)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def applied(self, name: str) -> str:
        link = GrpcStandbyLink(self.addr[name])
        try:
            return link.hello("test", 0).applied_snapshot
        finally:
            link.close()

    def synced(self, source: str, target: str, after: str = "") -> str:
        """The snapshot ``target`` applied once its root equals ``source``'s (and it is not ``after``)."""
        if tree_state(self.data(source)) != tree_state(self.data(target)):
            return ""
        applied = self.applied(target)
        return applied if applied and applied != after else ""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Agents]:
    a = Agents(tmp_path)
    yield a
    for name in list(a.procs):
        a.stop(name)


def by_target(address: str, name: str) -> dict[str, float]:
    """A primary's per-target series ``name`` from a real scrape: target -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {s.labels["target"]: s.value for fam in text_string_to_metric_families(body) for s in fam.samples
            if s.name == name}


def scrape_one(address: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return next(s.value for fam in text_string_to_metric_families(body) for s in fam.samples if s.name == name)


def around_now(rate: str) -> tuple[str, datetime]:
    """A window of local time of day that holds now (an hour either side; it may wrap midnight), and its end."""
    now = datetime.now()
    end = now + timedelta(hours=1)
    return f"{now - timedelta(hours=1):%H:%M}-{end:%H:%M} {rate}", end


def test_an_off_target_gets_nothing_while_the_other_syncs_then_a_low_rate_paces(agents: Agents) -> None:
    agents.configure("fast", "standby")
    slow_cfg = agents.configure("slow", "standby")
    fast, slow = agents.addr["fast"], agents.addr["slow"]
    make_tree(agents.tmp / "primary-data", files=20, big=2)
    window, end = around_now("off")
    agents.configure("primary", "primary", f'[replication]\ninterval = "1s"\nstandbys = ["{fast}", "{slow}"]\n'
                                           f'[replication.targets."{slow}"]\nbandwidth_schedule = "{window}"\n')
    agents.start("fast")
    agents.start("slow")
    agents.start("primary")
    first = wait_for(lambda: agents.synced("primary", "fast"), "the unlimited standby to sync")
    # Another cycle with a change: the off target is offered every snapshot and ships none of them.
    (agents.data("primary") / "catalog" / "later.txt").write_text("a change after the first sync")
    wait_for(lambda: agents.synced("primary", "fast", after=first), "the unlimited standby to follow a change")
    m = agents.metrics["primary"]
    assert by_target(m, "drsync_bandwidth_paused") == {fast: 0.0, slow: 1.0}
    assert by_target(m, "drsync_bandwidth_limit_bytes_per_second") == {fast: 0.0, slow: -1.0}
    assert scrape_one(m, "drsync_ship_failures_total") == 0.0
    assert agents.applied("slow") == "" and set(tree_state(agents.data("slow"))) <= {"."}
    assert run_drsync("snapshot", "list", "--config", slow_cfg, "--json").json() == []
    log = agents.log("primary")
    said = f"shipping to {slow} paused by replication.bandwidth_schedule until {end:%H:%M}"
    assert log.count(said) == 1, log  # once, not once per cycle
    assert f"to {slow}:" not in log and "failed" not in log, log
    status = json.loads(urllib.request.urlopen(f"http://{m}/status.json", timeout=10).read())
    paused = status["bandwidth"][slow]
    assert paused["paused"] is True and paused["paused_until"].endswith("Z"), paused  # ISO 8601 with its zone
    assert datetime.fromisoformat(paused["paused_until"]).timestamp() == paused["paused_until_unix"]
    assert status["bandwidth"][fast] == {"rate": "unlimited", "limit_bytes_per_second": 0.0, "paused": False,
                                         "paused_until": None, "paused_until_unix": None}

    # Now a window in force with a low rate: the slow standby gets everything, no faster than the rate.
    agents.stop("primary")
    rate = 4 * MiB
    window, _ = around_now("4MiB/s")
    primary_cfg = agents.configure("primary", "primary", f'[replication]\nstandbys = ["{fast}", "{slow}"]\n'
                                                         f'[replication.targets."{slow}"]\n'
                                                         f'bandwidth_schedule = "{window}"\n')
    (agents.data("primary") / "tables" / "bulk.bin").write_bytes(os.urandom(12 * MiB))
    r = run_drsync("agent", "--config", primary_cfg, "--once", "--json")
    assert r.code == 0, r.out + r.err
    results = r.json()["results"]
    paced, unpaced = results[slow], results[fast]
    assert paced["shipped_bytes"] >= 18 * MiB and unpaced["shipped_bytes"] >= 12 * MiB
    # Paced: after each message the upload waits until the bytes sent fit the rate, so the shipment cannot
    # take less than all but its last message at that rate (however fast or slow the machine is).
    assert paced["duration_s"] >= 0.99 * (paced["shipped_bytes"] - UPLOAD_MESSAGE_BYTES) / rate, paced
    assert agents.synced("primary", "slow") and agents.synced("primary", "fast")
    assert run_drsync("repo", "verify", "--config", slow_cfg).code == 0


def test_a_shipment_in_flight_stops_when_its_window_turns_off_and_resumes_with_what_is_missing(
        agents: Agents, caplog: pytest.LogCaptureFixture) -> None:
    from drsync import bandwidth, engine
    from drsync.agent.shipper import BACKOFF_FIRST_S, ShipOutcome, Shipper
    from drsync.agent.throttle import TargetBandwidth
    from drsync.metrics import AgentMetrics, new_registry
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    agents.configure("standby", "standby")
    target = agents.addr["standby"]
    agents.start("standby")
    data = agents.tmp / "primary-data"
    make_tree(data, files=20, big=2)
    for i in range(4):
        (data / "tables" / f"bulk-{i}.bin").write_bytes(os.urandom(3 * MiB))
    repo = Repository.init(open_storage(str(agents.tmp / "primary-repo")), cluster_id="analytics", release="6.2.1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    every_chunk = sorted(repo.load_manifest(info).chunk_ids())

    schedule = bandwidth.parse_schedule("10:00-11:00 2MiB/s, 11:00-12:00 off", "replication.bandwidth_schedule")
    clock = [datetime(2026, 1, 5, 10, 30)]  # the shipper's clock: the test moves it
    metrics = AgentMetrics(new_registry(), group="g", agent="primary")
    outcomes: list[ShipOutcome] = []
    shipper = Shipper(target, repo=repo, sender="primary", epoch=lambda: 1, guard=lambda final: None,
                      link=lambda t: GrpcStandbyLink(t, sender="primary", cluster_id="analytics", release="6.2.1"),
                      bandwidth_bps=0.0, metrics=metrics, on_outcome=outcomes.append,
                      bandwidth=TargetBandwidth(target, lambda: schedule, now=lambda: clock[0]))
    packs = agents.tmp / "standby-repo" / "packs"

    def receiving() -> int:  # bytes in the standby's open pack: an upload under way
        return sum(p.stat().st_size for p in packs.rglob(".tmp-*")) if packs.exists() else 0

    def missing() -> list[bytes]:
        link = GrpcStandbyLink(target)
        try:
            return [i for batch in link.missing(1, iter([every_chunk])) for i in batch]
        finally:
            link.close()

    def failures() -> float | None:
        return metrics.registry.get_sample_value("drsync_ship_failures_total", {"group": "g", "agent": "primary"})

    with caplog.at_level(logging.INFO, logger="drsync.agent"):
        shipper.start()
        shipper.offer(info)
        wait_for(lambda: receiving() >= 2 * MiB, "the paced upload to be under way")
        clock[0] = datetime(2026, 1, 5, 11, 30)  # the window turns off mid-shipment
        wait_for(lambda: outcomes, "the shipment to stop at its next message")
        stopped = outcomes[0]
        assert stopped.paused and not stopped.ok, stopped
        assert "paused after" in stopped.summary and "until 12:00" in stopped.summary, stopped.summary
        assert failures() == 0 and shipper.backoff_s == BACKOFF_FIRST_S and shipper.retry_at == 0.0
        still = missing()
        assert 0 < len(still) < len(every_chunk)  # what was sent stayed on the standby
        # While off, no shipment starts (synchronous form: nothing reaches the standby).
        assert shipper.ship(info).summary == "not shipped: paused by replication.bandwidth_schedule until 12:00"
        assert failures() == 0 and missing() == still and agents.applied("standby") == ""

        clock[0] = datetime(2026, 1, 5, 12, 30)  # outside every window: unlimited
        shipper.offer(info)  # the next capture's offer (the agent offers one every interval)
        wait_for(lambda: any(o.ok for o in outcomes), "the shipment to resume once the window allows")
        done = next(o for o in outcomes if o.ok)
        assert done.figures["missing_chunks"] == len(still)  # only the rest was sent
        assert agents.applied("standby") == info.id and missing() == []
        assert failures() == 0
    shipper.stop(wait_s=10)
    said = [r.getMessage() for r in caplog.records if "replication.bandwidth_schedule" in r.getMessage()
            and r.name == "drsync.agent" and r.levelno >= logging.INFO and "shipping to" in r.getMessage()]
    assert said == [f"shipping to {target} paused by replication.bandwidth_schedule until 12:00",
                    f"shipping to {target} resumed: replication.bandwidth_schedule allows unlimited"], said
