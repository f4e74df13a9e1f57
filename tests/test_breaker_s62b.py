"""Breaker session 62b: manifests by reference and by patch in topologies the first breaker did not reach
(fan-out, relays, apply_delay, failover and rejoin, repair, older standbys, HDFS), kills, and what the
operator sees.

Each test either guards a promise (said so in its docstring) or pins a fault (severity in its docstring).
Real agents over real gRPC, real repositories and files; no mocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.test_manifest_reference import _many_files
from tests.test_reliability import hello as _hello
from tests.zk import free_port

# --- helpers ------------------------------------------------------------------------------------------


def _run_once(cfg: Path) -> tuple[dict, str]:
    """One primary cycle (``drsync agent --once --json``): (its results by target, its stderr)."""
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err[-3000:])
    return r.json()["results"], r.err


def _once(p: Pair) -> tuple[dict, str]:
    results, err = _run_once(p.primary_cfg)
    assert len(results) == 1, results
    return next(iter(results.values())), err


def _prod_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.prod_site.url("primary-repo")))


def _standby_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.standby_site.url("standby-repo")))


def _limit(cfg: Path, rate: str = "1GiB/s") -> None:
    """A bandwidth limit in force (appended to the config's last table, [replication])."""
    with open(cfg, "a") as f:
        f.write(f'bandwidth_limit = "{rate}"\n')


def _verify(cfg: Path) -> None:
    v = run_drsync("repo", "verify", "--config", cfg)
    assert v.code == 0, (v.out[-1500:], v.err[-1500:])


class Fan:
    """The pair's primary with a second standby (``standby2``), both fixed roles, listed in ``standbys``."""

    def __init__(self, p: Pair) -> None:
        self.p = p
        self.data2 = p.tmp / "standby2-data"
        self.data2.mkdir()
        self.port2 = free_port()
        self.addr2 = f"127.0.0.1:{self.port2}"
        self.cfg2 = p._config("standby2", "standby", p.standby_site, "standby2-data", self.port2)
        text = p.primary_cfg.read_text()
        p.primary_cfg.write_text(text.replace(f'standbys = ["{p.standby_addr}"]',
                                              f'standbys = ["{p.standby_addr}", "{self.addr2}"]'))
        self.proc2: subprocess.Popen | None = None

    def start2(self) -> None:
        with open(self.p.tmp / "standby2.log", "ab") as log:
            self.proc2 = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(self.cfg2)],
                                          stdout=log, stderr=log)
        link = GrpcStandbyLink(self.addr2)
        wait_for(link.health, "standby2 to serve")
        link.close()

    def stop2(self) -> None:
        if self.proc2 is not None:
            self.proc2.send_signal(signal.SIGTERM)
            self.proc2.wait(timeout=60)
            self.proc2 = None


def test_fanout_each_target_its_own_form(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (2). Fan-out to two standbys: ``standby`` behind a per-target limit, ``standby2``
    unlimited (near loopback), and standby2 joins later (its applied snapshot older). A changed capture goes
    as a patch to the limited one and whole to the other; an unchanged one by reference to both."""
    _many_files(pair.prod, 2000)
    fan = Fan(pair)
    with open(pair.primary_cfg, "a") as f:
        f.write(f'[replication.targets."{pair.standby_addr}"]\nbandwidth_limit = "1GiB/s"\n')
    try:
        pair.start("standby")
        first = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
        assert first.code == 1, first.err[-1500:]  # standby2 not up yet
        fan.start2()
        (pair.prod / "catalog" / "f003.txt").write_text("changed 1")
        _run_once(pair.primary_cfg)
        (pair.prod / "catalog" / "f004.txt").write_text("changed 2")
        res, _ = _run_once(pair.primary_cfg)
        assert res[pair.standby_addr]["manifest_sent"] == "patch", res
        # Whole to the unlimited one, unless this busy host made its loopback look far (a 10 ms round trip).
        assert res[fan.addr2]["manifest_sent"] in ("bytes", "patch"), res
        res, _err = _run_once(pair.primary_cfg)
        assert res[pair.standby_addr]["manifest_sent"] == "reference", res
        assert res[fan.addr2]["manifest_sent"] == "reference", res
        assert tree_state(fan.data2) == tree_state(pair.prod) == tree_state(pair.standby_data)
    finally:
        fan.stop2()


OLD_STANDBY = """\
import sys
from drsync.transport import grpc as g
_hello = g.ReplicationServicer.Hello
def Hello(self, request, context):  # the release before: no manifest_by_reference, no manifest_patches
    reply = _hello(self, request, context)
    reply.manifest_by_reference = False
    reply.manifest_patches = False
    return reply
g.ReplicationServicer.Hello = Hello
from drsync.cli.entry import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_older_standby_is_sent_whole_manifests(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (1, 2: rolling upgrade). A standby of the release before (simulated: a real agent
    process whose Hello leaves out the two new flags, by a wrapper that patches its Hello reply; nothing
    else can produce one) is sent whole manifests over a limited link, changed or not, and follows."""
    _many_files(pair.prod, 1000)
    _limit(pair.primary_cfg)
    wrapper = pair.tmp / "old_standby.py"
    wrapper.write_text(OLD_STANDBY)
    with open(pair.tmp / "standby.log", "ab") as log:
        pair.procs["standby"] = subprocess.Popen(
            [sys.executable, str(wrapper), "agent", "--config", str(pair.standby_cfg)], stdout=log, stderr=log,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    link = GrpcStandbyLink(pair.standby_addr)
    wait_for(link.health, "the older standby to serve")
    link.close()
    h = _hello(pair.standby_addr)
    assert not h.manifest_by_reference and not h.manifest_patches
    for i in range(3):
        if i != 2:
            (pair.prod / "catalog" / f"f00{i}.txt").write_text(f"change {i}")
        res, err = _once(pair)
        assert res["manifest_sent"] == "bytes", res
        assert res["manifest_bytes"] > 0, res
        assert "was sent whole" not in err
    assert pair.in_sync()


def test_apply_delay_patches_against_the_applied_snapshot(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (2 with apply_delay). A standby with apply_delay stores shipments and applies them
    later; over a limited link each changed capture is a patch of the APPLIED snapshot's manifest (not of a
    received one); once the delay is lifted the root follows and both repositories verify."""
    _many_files(pair.prod, 2000)
    _limit(pair.primary_cfg)
    pair.start("standby")
    _once(pair)
    applied = _hello(pair.standby_addr).applied_snapshot
    pair.kill("standby", signal.SIGTERM)
    with open(pair.standby_cfg, "a") as f:
        f.write('[replication]\napply_delay = "1h"\n')
    pair.start("standby")
    for i in range(3):
        (pair.prod / "catalog" / f"f00{i}.txt").write_text(f"change {i}")
        (pair.prod / "logs" / "d001" / f"f00{i}.log").unlink()
        res, err = _once(pair)
        assert res["manifest_sent"] == "patch" and "was sent whole" not in err, (res, err[-2000:])
        h = _hello(pair.standby_addr)
        assert h.applied_snapshot == applied and h.received_snapshot != applied
    res, err = _once(pair)  # unchanged since the last received: not the applied one, so not by reference
    assert res["manifest_sent"] in ("patch", "bytes"), res
    pair.kill("standby", signal.SIGTERM)
    pair.standby_cfg.write_text(pair.standby_cfg.read_text().replace('apply_delay = "1h"', 'apply_delay = "0s"'))
    pair.start("standby")
    res, err = _once(pair)
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _hello(pair.standby_addr).applied_snapshot == newest.id, "the standby to apply", 30)
    assert pair.in_sync()
    pair.stop_all()
    _verify(pair.standby_cfg)


def test_repair_on_the_standby_then_an_unchanged_capture_by_reference(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (1 with repo repair). The standby's copy of a chunk of its applied snapshot rots;
    ``drsync repo repair`` there forgets it. The next capture is unchanged (by reference: nothing asked in
    negotiation): the standby must find the chunk lacking, be sent it, and verify afterwards."""
    from tests.test_breaker_s62 import _rot_chunk
    _many_files(pair.prod, 300)
    pair.start("standby")
    _once(pair)
    sr = _standby_repo(pair)
    info = sr.find_snapshot(_hello(pair.standby_addr).applied_snapshot)
    row = next(e for e in sr.load_manifest(info).entries() if e.path == "logs/d000/f000.log")
    _rot_chunk(Path(pair.standby_site.url("standby-repo")), row.chunks[0])
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg)
    assert r.code in (0, 3), r.err[-1500:]
    res, _err = _once(pair)
    assert res["manifest_sent"] == "reference", res
    assert res["missing_chunks"] >= 1, res
    pair.stop_all()
    _verify(pair.standby_cfg)
    assert pair.in_sync()


def test_a_standby_that_lost_its_applied_snapshot_document(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (1). The standby's repository lost the DOCUMENT of its applied snapshot (its manifest
    is intact): a reference is refused (ABORTED), the bytes go, the standby commits and verifies."""
    _many_files(pair.prod, 300)
    pair.start("standby")
    _once(pair)
    applied = _hello(pair.standby_addr).applied_snapshot
    (Path(pair.standby_site.url("standby-repo")) / fmt.snapshot_name(applied)).unlink()
    res, err = _once(pair)
    assert res["manifest_sent"] == "bytes" and "was sent whole" in err, (res, err[-2000:])
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _hello(pair.standby_addr).applied_snapshot == newest.id, "the standby to apply")
    (pair.prod / "catalog" / "f001.txt").write_text("after")
    _limit(pair.primary_cfg)
    res, err = _once(pair)
    assert res["manifest_sent"] == "patch", res
    pair.stop_all()
    assert pair.in_sync()
    _verify(pair.standby_cfg)


def _manifest_bytes(g, name: str) -> float:  # type: ignore[no-untyped-def]
    from tests.group import scrape
    return scrape(g.metrics[name], g.group, name).get("drsync_manifest_bytes_total", 0.0)


def _new_applied(g, name: str, after: str, count: int = 1) -> str:  # type: ignore[no-untyped-def]
    """Wait until ``name`` applied ``count`` snapshots after ``after`` (by watching its Hello)."""
    seen = [after]

    def moved() -> bool:
        a = g.hello(name).applied_snapshot
        if a and a != seen[-1]:
            seen.append(a)
        return len(seen) > count
    wait_for(moved, f"{name} to apply {count} more snapshot(s)")
    return seen[-1]


def test_a_relay_ships_by_reference_and_by_patch(make_group) -> None:  # type: ignore[no-untyped-def]
    """Guards a promise (1, 2 through a cascade). east -> near -> far (far's upstream is near, near relays
    under a bandwidth limit). Unchanged cycles cross near->far by reference (near's manifest_bytes counter
    does not grow by a manifest a cycle), a changed one as a patch (far grows by less than half a manifest);
    far's root follows and its repository verifies."""
    from tests.group import Group
    g: Group = make_group(["east", "near", "far"])
    _many_files(g.data["east"], 3000)
    g.add_replication("far", 'upstream = "near"')
    g.add_replication("near", 'bandwidth_limit = "1GiB/s"')
    g.start_all("east")
    first = g.wait_synced("east", "far", "far to receive through near")
    size = len(Repository.open(open_storage(str(g.tmp / "east-repo"))).manifest_bytes(
        Repository.open(open_storage(str(g.tmp / "east-repo"))).list_snapshots()[-1]))
    m0 = _manifest_bytes(g, "near")
    last = _new_applied(g, "far", first, 3)  # three unchanged cycles relayed
    m1 = _manifest_bytes(g, "near")
    assert m1 - m0 < size, (m0, m1, size)
    (g.data["east"] / "logs" / "d003" / "f010.log").write_text("changed")
    g.wait_synced("east", "far", "a change to reach far", after=last)
    m2 = _manifest_bytes(g, "near")
    assert 0 < m2 - m1 < size / 2, (m1, m2, size)
    assert "was sent whole" not in g.log("near")
    g.kill("east", signal.SIGTERM)
    g.kill("near", signal.SIGTERM)
    g.kill("far", signal.SIGTERM)
    for n in ("near", "far"):
        v = g.drsync(n, "repo", "verify")
        assert v.code == 0, v.err[-1500:]


_FULL = pytest.mark.skipif(os.environ.get("DRSYNC_RELIABILITY") != "full",
                           reason="the other kill moments run with DRSYNC_RELIABILITY=full (make reliability)")


@pytest.mark.parametrize("frac", [pytest.param(0.5, marks=_FULL), 0.8, pytest.param(0.95, marks=_FULL)])
def test_kill_9_of_the_standby_while_a_large_patch_is_rebuilt(pair: Pair, frac: float) -> None:  # noqa: F811
    """Guards a promise (2 with safety rule 2). 30,000 files, a limited link, a few files changed: the
    commit carries a patch the standby merges into its 30,000-row manifest. The standby is killed -9 at a
    point of that cycle (a fraction of a cycle's measured duration); after restart its root holds exactly
    the snapshot it records as applied, its repository verifies, and the next cycle brings it in sync."""
    import time
    _many_files(pair.prod, 30000)
    _limit(pair.primary_cfg)
    pair.start("standby")
    _once(pair)
    (pair.prod / "logs" / "d010" / "f001.log").write_text("measure")
    t0 = time.monotonic()
    res, _ = _once(pair)
    took = time.monotonic() - t0
    assert res["manifest_sent"] == "patch", res
    for i in range(5):
        (pair.prod / "logs" / f"d{20 + i:03}" / "f002.log").write_text(f"changed {i}")
    (pair.prod / "logs" / "d030" / "f003.log").unlink()
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(pair.primary_cfg), "--once"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(took * frac)  # a deliberate delay: the kill lands at a different moment of the cycle
    pair.kill("standby")
    proc.wait(timeout=120)
    pair.start("standby")
    pair.assert_root_is_applied_snapshot(f"patch-{frac}")
    pair.kill("standby", signal.SIGTERM)
    _verify(pair.standby_cfg)
    pair.start("standby")
    res, err = _once(pair)
    assert res["manifest_sent"] in ("patch", "reference"), (res, err[-1500:])
    assert pair.in_sync()


@pytest.mark.parametrize("pair", ["to-hdfs"], indirect=True)
def test_an_hdfs_standby_takes_patches_and_references(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (1, 2 on HDFS). A standby whose root and repository are on HDFS, behind a limited
    link: a changed capture (a file changed, one removed, one added) goes as a patch, an unchanged one by
    reference; the root matches production and the repository verifies."""
    _many_files(pair.prod, 600)
    _limit(pair.primary_cfg)
    pair.start("standby")
    res, _ = _once(pair)
    assert res["manifest_sent"] == "bytes", res
    (pair.prod / "logs" / "d001" / "f001.log").write_text("changed")
    (pair.prod / "logs" / "d002" / "f002.log").unlink()
    (pair.prod / "logs" / "d003" / "new.log").write_text("new")
    res, err = _once(pair)
    assert res["manifest_sent"] == "patch" and "was sent whole" not in err, (res, err[-2000:])
    res, err = _once(pair)
    assert res["manifest_sent"] == "reference" and "was sent whole" not in err, (res, err[-2000:])
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _hello(pair.standby_addr).applied_snapshot == newest.id, "the standby to apply")
    pair.stop_all()
    assert pair.in_sync()
    _verify(pair.standby_cfg)


def test_switchover_and_failover_then_the_new_primary_patches_and_names(make_group) -> None:  # type: ignore[no-untyped-def]
    """Guards a promise (1, 2 across role changes). east and west both ship under a bandwidth limit. After
    ``drsync switchover`` to west, west ships to the old primary: unchanged cycles by reference (west's
    manifest_bytes does not grow by a manifest a cycle), a change as a patch. Then west is killed, east is
    promoted (--force), west rejoins, and east ships to it by patch; nobody refuses a manifest, both roots
    match, both repositories verify."""
    from tests.group import Group
    g: Group = make_group(["east", "west"], interval="1s", extra='switchover_hook = "true"\n',
                          replication='bandwidth_limit = "1GiB/s"')
    _many_files(g.data["east"], 3000)
    g.start("east")
    g.start("west")
    assert g.promote("east").code == 0
    first = g.wait_synced("east", "west", "west's first sync")
    size = len(Repository.open(open_storage(str(g.tmp / "east-repo"))).manifest_bytes(
        Repository.open(open_storage(str(g.tmp / "east-repo"))).list_snapshots()[-1]))
    r = g.drsync("west", "switchover", "--json")
    assert r.code == 0, r.err
    g.wait_role("east", "standby")
    a = g.wait_synced("west", "east", "east to follow west", after=first)
    m0 = _manifest_bytes(g, "west")
    a = _new_applied(g, "east", a, 3)
    m1 = _manifest_bytes(g, "west")
    assert m1 - m0 < size, ("unchanged cycles sent manifests", m0, m1, size)
    (g.data["west"] / "logs" / "d004" / "f004.log").write_text("on west")
    a = g.wait_synced("west", "east", "east to get west's change", after=a)
    m2 = _manifest_bytes(g, "west")
    assert 0 < m2 - m1 < size / 2, ("a change did not go as a patch", m1, m2, size)
    # failover back to east, west rejoins
    g.kill("west", signal.SIGKILL)
    r = g.promote("east", "--force")
    assert r.code == 0, r.err
    (g.data["east"] / "logs" / "d005" / "f005.log").write_text("on east after failover")
    g.start("west")
    g.wait_role("west", "ex-primary")
    assert g.drsync("west", "rejoin").code == 0
    g.wait_role("west", "standby")
    b = g.wait_synced("east", "west", "west to follow east after rejoining")
    b = _new_applied(g, "west", b, 2)
    m3 = _manifest_bytes(g, "east")
    (g.data["east"] / "logs" / "d006" / "f006.log").write_text("on east again")
    g.wait_synced("east", "west", "west to get east's change", after=b)
    m4 = _manifest_bytes(g, "east")
    assert m4 - m3 < size, ("a change after rejoin did not go as a patch", m3, m4, size)
    for n in ("east", "west"):
        assert "was sent whole" not in g.log(n), g.log(n)[-3000:]
    g.kill("east", signal.SIGTERM)
    g.kill("west", signal.SIGTERM)
    for n in ("east", "west"):
        v = g.drsync(n, "repo", "verify")
        assert v.code == 0, v.err[-1500:]
