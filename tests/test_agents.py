"""Two real agents as subprocesses over loopback gRPC: shipping, applying, fencing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drsync.errors import RefusedError
from drsync.transport.grpc import GrpcStandbyLink
from tests import reliability
from tests.conftest import SLOW, init_repo, run_drsync, tree_state
from tests.fsmake import tmpfs
from tests.group import wait_for as group_wait_for
from tests.sites import LocalSite, Site, make_site, same_tree
from tests.zk import free_port


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    group_wait_for(cond, what, timeout, step=0.1)  # the timeout scaled for a busy machine


class Pair:
    """A primary and a standby agent; each cluster's data root and repository live on a site
    (a local directory by default, or HDFS)."""

    def __init__(self, tmp: Path, prod_site: Site | None = None, standby_site: Site | None = None) -> None:
        self.tmp = tmp
        self.prod_site: Site = prod_site or LocalSite(tmp)
        self.standby_site: Site = standby_site or LocalSite(tmp)
        self.prod = tmp / "prod-data"  # the paths, when the site is local
        self.standby_data = tmp / "standby-data"
        self.standby_port = free_port()
        self.standby_addr = f"127.0.0.1:{self.standby_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics: dict[str, str] = {}
        self.prod_site.make_tree("prod-data", files=20, big=2)
        if self.standby_site.kind == "local":
            self.standby_data.mkdir()
        self.standby_cfg = self._config("standby", "standby", self.standby_site, "standby-data", self.standby_port)
        self.primary_cfg = self._config("primary", "primary", self.prod_site, "prod-data", free_port(),
                                        f'[replication]\ninterval = "1s"\nstandbys = ["{self.standby_addr}"]\n')

    def _config(self, name: str, role: str, site: Site, data: str, port: int, extra: str = "") -> Path:
        p = self.tmp / f"{name}.toml"
        self.metrics[name] = f"127.0.0.1:{free_port()}"
        # The agent's own state (journal, lock) is always local; it sits beside a local repository.
        state = f'state_dir = "{self.tmp / (name + "-state")}"\n' if site.kind != "local" else ""
        p.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{site.url(data)}"\n'
                     f'repository = "{site.url(name + "-repo")}"\n'
                     f'[agent]\nname = "{name}"\nrole = "{role}"\nlisten = "127.0.0.1:{port}"\n'
                     f'metrics = "{self.metrics[name]}"\n{state}{extra}')
        init_repo(p)
        return p

    def start(self, name: str) -> None:
        cfg = self.standby_cfg if name == "standby" else self.primary_cfg
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own copy of the fd
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)],
                                                stdout=log, stderr=log)
        if name == "standby":
            link = GrpcStandbyLink(self.standby_addr)
            wait_for(link.health, "standby agent to serve")
            link.close()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        p.send_signal(sig)
        p.wait(timeout=30 * SLOW)  # a stop finishes the cycle under way first

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def in_sync(self) -> bool:
        if self.prod_site.kind == self.standby_site.kind == "local":  # tests may move the local roots
            return tree_state(self.standby_data) == tree_state(self.prod)
        return same_tree(self.standby_site, "standby-data", self.prod_site, "prod-data")

    def assert_root_is_applied_snapshot(self, label: str) -> None:
        """The standby's root holds exactly the snapshot it records as applied: never a mix.

        Only meaningful while nothing ships: with a primary running, an apply could be under way
        while the root is walked, and the walk would see a mix that no crash made."""
        assert "primary" not in self.procs, "stop the primary before comparing the standby's root"
        link = GrpcStandbyLink(self.standby_addr)
        applied = link.hello("test", 1).applied_snapshot
        link.close()
        expected = self.tmp / f"expected-{label}"
        r = run_drsync("snapshot", "restore", applied, "--config", self.standby_cfg, "--target", expected)
        assert r.code == 0, r.err
        assert same_tree(self.standby_site, "standby-data", LocalSite(self.tmp), f"expected-{label}"), \
            f"mixed state after a kill ({label})"


# Where production and the standby keep their data and repositories: (production, standby).
STORAGES = {"local": ("local", "local"), "to-hdfs": ("local", "hdfs"), "from-hdfs": ("hdfs", "local"),
            "hdfs": ("hdfs", "hdfs")}


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Local on both sides, unless a test asks for other storages with indirect parametrisation."""
    kinds = STORAGES[getattr(request, "param", "local")]
    cluster = request.getfixturevalue("webhdfs") if "hdfs" in kinds else None
    sites = [make_site(k, tmp_path, cluster) for k in kinds]
    p = Pair(tmp_path, *sites)
    yield p
    p.stop_all()


@pytest.mark.parametrize("pair", list(STORAGES), indirect=True)
def test_primary_ships_and_standby_applies(pair: Pair) -> None:
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to match production")
    # Keep changing production: the standby follows.
    pair.prod_site.write("prod-data", "catalog/f003.txt", b"changed on production")
    pair.prod_site.write("prod-data", "catalog/new.bin", os.urandom(300_000))
    pair.prod_site.remove("prod-data", "tables/orders/part-1.bin")
    pair.prod_site.chmod("prod-data", "catalog/f004.txt", 0o640)
    wait_for(pair.in_sync, "the standby to follow a change")
    # Every cycle (unchanged content too) is recorded as applied and retention expires the older ones:
    # with the primary shipping on, the snapshot Hello names may be gone by the time it is looked up.
    pair.kill("primary", signal.SIGTERM)
    link = GrpcStandbyLink(pair.standby_addr)
    hello = link.hello("test", 1)
    link.close()
    # Fixed roles without tls.allowed_peers: no request raises the standby's epoch floor.
    assert hello.role == "standby" and hello.epoch == 0 and hello.applied_snapshot
    # The standby stored what it applied in its own repository, verified.
    listed = run_drsync("snapshot", "list", "--config", pair.standby_cfg, "--json").json()
    assert hello.applied_snapshot in [s["id"] for s in listed]
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0


def test_a_huge_epoch_from_an_anonymous_peer_poisons_nothing(pair: Pair) -> None:
    """Fixed roles without tls.allowed_peers: any peer may talk, so none may raise the fencing floor."""
    pair.start("standby")
    link = GrpcStandbyLink(pair.standby_addr, sender="rogue")
    try:
        assert list(link.missing(2**62, iter([[b"\x00" * 32]]))) == [[b"\x00" * 32]]
        assert link.hello("rogue", 2**62).epoch == 0
    finally:
        link.close()
    # The real primary (epoch 1) still ships, also after a restart of the standby.
    pair.kill("standby")
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the real primary to ship after the rogue's message")
    link = GrpcStandbyLink(pair.standby_addr)
    try:
        assert link.hello("test", 0).epoch == 0
    finally:
        link.close()


def test_kill_9_standby_during_shipping_then_recover(pair: Pair) -> None:
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    trials = max(1, int(os.environ.get("DRSYNC_CRASH_TRIALS", "2")) // 13)  # make reliability: 3
    for trial in range(trials):
        (pair.prod / "tables" / "orders" / f"bulk-{trial}.bin").write_bytes(os.urandom(20 << 20))
        (pair.prod / "catalog" / f"f00{trial}.txt").unlink()
        time.sleep(0.2 + 0.3 * trial)  # a deliberate delay: kill at a different moment of the cycle
        pair.kill("standby")
        pair.kill("primary", signal.SIGTERM)
        # Restarted, the standby first finishes or rolls back the interrupted apply: its root
        # then holds exactly the snapshot it records as applied, never a mix.
        pair.start("standby")
        pair.assert_root_is_applied_snapshot(f"random-{trial}")
        pair.start("primary")
        wait_for(pair.in_sync, f"the standby to catch up after kill {trial}")


def test_bad_shipments_are_refused_and_change_nothing(pair: Pair) -> None:
    from drsync.errors import IntegrityError
    from drsync.repository import chunks
    from drsync.transport import ReceivedChunk

    pair.start("standby")
    (pair.standby_data / "keep.txt").write_text("the last good state")
    before = tree_state(pair.standby_data)
    link = GrpcStandbyLink(pair.standby_addr)
    try:
        # A chunk whose bytes do not match its id.
        good = b"payload" * 1000
        lie = ReceivedChunk(chunks.chunk_id(good), 0, len(good), b"x" * len(good))
        with pytest.raises(IntegrityError, match="does not match its hash"):
            link.upload(1, iter([[lie]]))
        assert list(link.missing(1, iter([[lie.id]]))) == [[lie.id]]  # nothing was stored
        # A commit whose manifest names a chunk that was never sent.
        prod_repo = pair.tmp / "primary-repo"
        snap = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json").json()
        doc = (prod_repo / "snapshots" / f"{snap['id']}.json").read_bytes()
        manifest = (prod_repo / "manifests" / f"{snap['id']}.parquet").read_bytes()
        with pytest.raises(IntegrityError, match="does not hold"):
            link.commit(1, "test", doc, iter([manifest]))
        # A truncated manifest.
        with pytest.raises(IntegrityError, match="damaged or truncated"):
            link.commit(1, "test", doc, iter([manifest[: len(manifest) // 2]]))
    finally:
        link.close()
    assert tree_state(pair.standby_data) == before


def scrape(address: str) -> dict[str, float]:
    """name{labels} -> value, from a real HTTP scrape, parsed by Prometheus' own text parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.labels.get("group") == "default" and s.labels.get("agent") in ("primary", "standby"):
                out[s.name] = s.value
    return out


def test_metrics_report_lag_and_shipping(pair: Pair) -> None:
    import math

    pair.start("standby")
    before = scrape(pair.metrics["standby"])
    assert before["drsync_is_primary"] == 0 and math.isnan(before["drsync_replication_lag_seconds"])
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    wait_for(lambda: scrape(pair.metrics["primary"]).get("drsync_shipped_bytes_total", 0) > 0,
             "the primary to count shipped bytes")
    p = scrape(pair.metrics["primary"])
    s = scrape(pair.metrics["standby"])
    assert p["drsync_is_primary"] == 1 and p["drsync_epoch"] == 1 and s["drsync_epoch"] == 0  # fixed roles
    assert p["drsync_snapshot_duration_seconds_count"] >= 1 and p["drsync_ship_duration_seconds_count"] >= 1
    assert p["drsync_last_snapshot_timestamp_seconds"] > 0
    assert 0 <= s["drsync_replication_lag_seconds"] < 60
    assert s["drsync_last_applied_snapshot_timestamp_seconds"] > 0
    # Unchanged data ships nothing new: deduplicated bytes grow, shipped bytes stay.
    shipped = p["drsync_shipped_bytes_total"]
    wait_for(lambda: scrape(pair.metrics["primary"])["drsync_deduplicated_bytes_total"] > 0,
             "a cycle over unchanged data")
    assert scrape(pair.metrics["primary"])["drsync_shipped_bytes_total"] == shipped
    # With the standby gone, shipments fail and the primary's view of the lag keeps growing.
    pair.kill("standby")
    wait_for(lambda: scrape(pair.metrics["primary"])["drsync_ship_failures_total"] >= 1, "a failed shipment")
    lag1 = scrape(pair.metrics["primary"])["drsync_replication_lag_seconds"]
    wait_for(lambda: scrape(pair.metrics["primary"])["drsync_replication_lag_seconds"] > lag1 + 1,
             "the lag to grow while the standby is down")


def test_status_shows_the_pair(pair: Pair) -> None:
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    wait_for(lambda: run_drsync("status", "--config", pair.primary_cfg, "--json").json()["agents"][1]["lag_s"]
             is not None, "the standby to report an applied snapshot")
    doc = run_drsync("status", "--config", pair.primary_cfg, "--json").json()
    assert doc["group"] == "default" and doc["primary"] == "primary" and doc["epoch"] == 1
    by_name = {a["name"]: a for a in doc["agents"]}
    assert by_name["primary"]["role"] == "primary"
    assert by_name["standby"]["role"] == "standby" and by_name["standby"]["address"] == pair.standby_addr
    assert by_name["standby"]["applied_snapshot"] and 0 <= by_name["standby"]["lag_s"] < 60
    assert doc["last_snapshot"]["id"]
    human = run_drsync("status", "--config", pair.primary_cfg)
    assert "primary primary, epoch 1" in human.out and pair.standby_addr in human.out
    # With the standby down, status still answers and says so.
    pair.kill("standby")
    doc = run_drsync("status", "--config", pair.primary_cfg, "--json").json()
    down = next(a for a in doc["agents"] if a["address"] == pair.standby_addr)
    assert down["reachable"] is False and doc["primary"] == "primary"


def test_commit_refusals_cluster_and_oversized(pair: Pair) -> None:
    import json as _json

    from drsync.errors import OperationFailed
    from drsync.transport import ReceivedChunk

    pair.start("standby")
    snap = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json").json()
    repo = pair.tmp / "primary-repo"
    doc = (repo / "snapshots" / f"{snap['id']}.json").read_bytes()
    manifest = (repo / "manifests" / f"{snap['id']}.parquet").read_bytes()
    before = tree_state(pair.standby_data)
    link = GrpcStandbyLink(pair.standby_addr)
    try:
        assert link.hello("t", 4).epoch == 0
        # A snapshot of another cluster or release is refused.
        other = _json.loads(doc)
        other["release"] = "7.0.0"
        with pytest.raises(RefusedError, match="release '7.0.0'"):
            link.commit(4, "t", _json.dumps(other).encode(), iter([manifest]))
        # An oversized message is cut off by the transport's explicit limit.
        huge = ReceivedChunk(b"\x02" * 32, 0, 9 << 20, b"\x00" * (9 << 20))
        with pytest.raises(OperationFailed, match="RESOURCE_EXHAUSTED|larger than max"):
            link.upload(4, iter([[huge]]))
    finally:
        link.close()
    assert tree_state(pair.standby_data) == before


def test_agent_once_runs_one_cycle(pair: Pair) -> None:
    pair.start("standby")
    r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["ok"] is True and pair.standby_addr in doc["shipped"] and pair.in_sync()
    pair.kill("standby")
    r = run_drsync("agent", "--config", pair.primary_cfg, "--once")
    assert r.code == 1 and "unreachable" in r.out
    assert run_drsync("agent", "--config", pair.standby_cfg, "--once").code == 2


def _phase(pair: Pair) -> str | None:
    """Which step of a shipment the standby is in, seen from its files."""
    local = pair.standby_site.kind == "local"
    state_dir = pair.tmp / "standby-repo" / "agent" if local else pair.tmp / "standby-state"
    if (state_dir / "applying.json").exists():
        return "apply"
    if not local:
        return "upload" if any(".tmp-" in p for p in pair.standby_site.paths("standby-repo")) else None
    packs = pair.tmp / "standby-repo" / "packs"
    try:
        if packs.exists() and any(p.name.startswith(".tmp-") for p in packs.rglob(".tmp-*")):
            return "upload"
    except OSError:  # a pack completed (renamed) under the walk: look again
        return None
    return None


# An upload to HDFS is over too fast to be caught from outside; its atomicity is the repository
# storage's (tests/test_storage_conformance.py). The apply onto HDFS is caught and killed.
# HDFS to HDFS (its apply is the to-hdfs one, from a slower source) only in make reliability.
@pytest.mark.parametrize(("phase", "pair"), [("upload", "local"), ("apply", "local"), ("apply", "to-hdfs"),
                                              *[("apply", "hdfs")] * (reliability.LEVEL == "full")], indirect=["pair"])
def test_kill_9_standby_in_each_phase(pair: Pair, phase: str) -> None:
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    kills = 0
    wanted = max(1, int(os.environ.get("DRSYNC_CRASH_TRIALS", "2")) // 4)  # make reliability: 10
    for attempt in range(6 * wanted):
        if kills >= wanted:
            break
        pair.prod_site.write("prod-data", f"tables/orders/grow-{attempt}.bin", os.urandom(48 << 20))
        # Wait for the standby to enter the phase (or the cycle to finish without us seeing it).
        deadline = time.monotonic() + 30
        seen = None
        next_sync_check = time.monotonic() + 1
        while time.monotonic() < deadline:
            seen = _phase(pair)
            if seen == phase:
                break
            if time.monotonic() > next_sync_check:  # comparing trees is slow on HDFS: not every poll
                if pair.in_sync():
                    break
                next_sync_check = time.monotonic() + 1
        if seen != phase:
            continue
        pair.kill("standby")
        kills += 1
        pair.kill("primary", signal.SIGTERM)
        pair.start("standby")  # recovers before it serves
        pair.assert_root_is_applied_snapshot(f"{phase}-{attempt}")
        pair.start("primary")
        wait_for(pair.in_sync, f"catching up after a kill during {phase}")
    assert kills >= 1, f"never caught the standby during {phase}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB filesystem (tmpfs) for the standby's data root."""
    with tmpfs(tmp_path / "small-disk", "24m") as mnt:
        yield mnt


def test_standby_disk_full_mid_apply_keeps_last_good_snapshot(pair: Pair, small_disk: Path) -> None:
    # Point the standby's data root at the small filesystem.
    pair.standby_data = small_disk / "data"
    pair.standby_data.mkdir()
    text = pair.standby_cfg.read_text().replace(str(pair.tmp / "standby-data"), str(pair.standby_data))
    pair.standby_cfg.write_text(text)
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    good = tree_state(pair.standby_data)
    big = pair.prod / "tables" / "too-big.bin"
    pair.kill("primary", signal.SIGTERM)  # a capture of the file half-written could fit the disk
    big.write_bytes(os.urandom(30 << 20))
    pair.start("primary")
    wait_for(lambda: "No space left" in (pair.tmp / "primary.log").read_text(errors="replace"),
             "the primary to report the standby's full disk")
    assert tree_state(pair.standby_data) == good  # still the last good snapshot
    assert not (pair.standby_data / ".drsync-staging").exists()
    # Once production no longer needs the space, the next cycle goes through.
    big.unlink()
    (pair.prod / "catalog" / "after.txt").write_text("fits")
    wait_for(pair.in_sync, "the standby to recover after the disk-full failures")


def test_interrupted_upload_resumes_with_what_is_missing(pair: Pair) -> None:
    """Chunks that arrived before a stream broke stay; the retry sends only the rest."""
    from drsync.repository import chunks as chunking
    from drsync.transport import ReceivedChunk

    pair.start("standby")
    blobs = [os.urandom(200_000) for _ in range(6)]
    sent = [ReceivedChunk(chunking.chunk_id(b), 0, len(b), b) for b in blobs]
    ids = [c.id for c in sent]

    packs = pair.tmp / "standby-repo" / "packs"

    def received_bytes() -> int:
        return sum(p.stat().st_size for p in packs.rglob(".tmp-*")) if packs.exists() else 0

    def breaks_after_two_batches():  # type: ignore[no-untyped-def]
        yield sent[0:2]
        yield sent[2:4]
        # Break only once the standby has taken in four chunks (its open pack holds them): messages
        # still in flight when a stream is cancelled are dropped by gRPC, which is not what is tested.
        wait_for(lambda: received_bytes() >= 4 * 200_000, "the standby to take in four chunks", 30)
        raise ConnectionError("the network went away")

    link = GrpcStandbyLink(pair.standby_addr)
    try:
        with pytest.raises(Exception):  # noqa: B017 - any transport failure will do
            link.upload(1, breaks_after_two_batches())
        wait_for(lambda: len(next(iter(link.missing(1, iter([ids])))) ) <= 2,
                 "the standby to keep the chunks that arrived")
        still = set(next(iter(link.missing(1, iter([ids])))))
        assert still >= set(ids[4:])
        link.upload(1, iter([[c for c in sent if c.id in still]]))
        assert next(iter(link.missing(1, iter([ids])))) == []
    finally:
        link.close()


def test_once_collects_garbage_at_most_every_gc_interval_and_remembers_it(pair: Pair) -> None:
    """`drsync agent --once` expires snapshots every time, but collects garbage at most every
    GC_EVERY_S, remembered in the agent's state: a cron job running it every minute does not mark the
    whole repository each time, and a restart does not reset the interval."""
    from drsync.agent.maintenance import GC_EVERY_S

    pair.primary_cfg.write_text(pair.primary_cfg.read_text() + "[snapshots]\nkeep = { last = 1 }\n")
    pair.start("standby")
    state = pair.tmp / "primary-repo" / "agent" / "state.json"
    packs_dir = pair.tmp / "primary-repo" / "packs"
    churn = pair.prod / "catalog" / "churn.bin"

    def once() -> set[str]:
        churn.write_bytes(os.urandom(3 << 20))  # each cycle's snapshot holds chunks no other one has
        r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
        assert r.code == 0, r.err
        return {p.name for p in packs_dir.rglob("*") if p.is_file()}

    once()
    after_second = once()  # the first snapshot expires: the first collection runs
    collected_at = json.loads(state.read_text())["last_gc_at"]
    assert collected_at > 0
    after_third = once()  # the second expires, but the collection is not due: its chunks stay
    assert after_third >= after_second
    assert json.loads(state.read_text())["last_gc_at"] == collected_at
    # An interval later (the record set back), the next run collects what the expired snapshots held.
    doc = json.loads(state.read_text())
    state.write_text(json.dumps({**doc, "last_gc_at": collected_at - GC_EVERY_S - 1}))
    after_fourth = once()
    assert not after_third <= after_fourth, "the collection due again removed nothing"
    assert json.loads(state.read_text())["last_gc_at"] > collected_at - GC_EVERY_S
    assert pair.in_sync()


def test_cycle_snapshots_follow_the_retention_policy_on_both_sides(pair: Pair) -> None:
    for cfg in (pair.primary_cfg, pair.standby_cfg):
        cfg.write_text(cfg.read_text() + "[snapshots]\nkeep = { last = 2 }\n")
    pair.start("standby")
    manual = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--name", "keep-me", "--json").json()
    for n in range(3):  # one more than the policy keeps: retention must expire on both sides
        (pair.prod / "catalog" / f"cycle-{n}.txt").write_text(f"cycle {n}")
        r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
        assert r.code == 0, r.err
    assert pair.in_sync()
    prod = run_drsync("snapshot", "list", "--config", pair.primary_cfg, "--json").json()
    # Manual snapshots live on; cycle snapshots are kept by the policy (2 newest), on both sides.
    assert manual["id"] in [s["id"] for s in prod]
    assert len([s for s in prod if s["kind"] == "cycle"]) == 2
    # The standby's retention runs beside replication (its maintenance worker), after the commit.
    def standby_snapshots() -> list[dict[str, object]]:
        return run_drsync("snapshot", "list", "--config", pair.standby_cfg, "--json").json()

    def checkpoints() -> set[str]:  # the mass-change window's baselines: retention keeps them too
        doc = json.loads((pair.tmp / "standby-repo" / "agent" / "state.json").read_text())
        return {c[0] for c in doc.get("change_checkpoints", [])}

    wait_for(lambda: len([s for s in standby_snapshots() if s["id"] not in checkpoints()]) == 2,
             "the standby's retention to keep the 2 newest (and the mass-change window's checkpoints)")
    standby = standby_snapshots()
    assert 2 <= len(standby) <= 2 + len(checkpoints())
    link = GrpcStandbyLink(pair.standby_addr)
    applied = link.hello("t", 1).applied_snapshot
    link.close()
    assert applied == standby[-1]["id"]
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0
