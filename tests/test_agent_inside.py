"""The agent's inside (issue 15): locks that hold between shipments and GC, maintenance beside
replication, one state record that is never torn. Real agent processes, real gRPC, real files (and
the WebHDFS stand-in for a standby on HDFS); where a fault cannot be produced on demand (a backup that
takes hours) the agent is held at a pause point (drsync.faults), never mocked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.agent import activity as activity_module
from drsync.agent import statuspage
from drsync.agent.activity import Activity
from drsync.agent.primary import ship_snapshot
from drsync.agent.state import StateStore
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport import CommitOutcome, ReceivedChunk, StandbyHello
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import run_drsync
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture


class GcBeforeCommit:
    """A real gRPC link to the standby that, after the chunks are uploaded and before the commit,
    lets a garbage collection of the standby's repository run as another process: the exact
    interleaving that wedged a standby (chunks uploaded, not yet named by any snapshot)."""

    target = "standby"

    def __init__(self, link: GrpcStandbyLink, gc: list[list[str]]) -> None:
        self.link = link
        self.gc = gc
        self.results: list[tuple[int, str]] = []
        self.uploaded = 0

    def hello(self, sender: str, epoch: int) -> StandbyHello:
        return self.link.hello(sender, epoch)

    def missing(self, epoch: int, batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        return self.link.missing(epoch, batches)

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        r = self.link.upload(epoch, batches)
        self.uploaded += r[1]
        return r

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "",
               patch_of: str = "") -> CommitOutcome:
        for args in self.gc:
            r = run_drsync(*args, env={"DRSYNC_LOCK_WAIT": "1"})
            self.results.append((r.code, r.out + r.err))
        return self.link.commit(epoch, sender, snapshot_doc, pieces, sender_seq)


@pytest.mark.parametrize("pair", ["local", "to-hdfs"], indirect=True)
def test_gc_between_upload_and_commit_never_deletes_what_the_shipment_uploaded(pair: Pair) -> None:  # noqa: F811
    pair.start("standby")
    prod_repo = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    r = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json")
    assert r.code == 0, r.err
    info = prod_repo.find_snapshot(r.json()["id"])
    gc = [["repo", "gc", "--config", str(pair.standby_cfg)],
          ["snapshot", "expire", "--config", str(pair.standby_cfg)]]
    link = GcBeforeCommit(GrpcStandbyLink(pair.standby_addr, sender="primary"), gc)
    try:
        res = ship_snapshot(prod_repo, info, link, epoch=1, sender="primary")
    finally:
        link.link.close()
    assert link.uploaded > 0 and res.applied.snapshot == info.id
    # The shipment held the repository's shared lock from its first upload to its commit: the
    # collections waited for it and gave up, deleting nothing.
    for code, out in link.results:
        assert code != 0 and "locked" in out, out
    assert pair.in_sync()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0
    # Once the shipment is committed, GC runs, and what the snapshot names stays.
    r = run_drsync("repo", "gc", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0
    restored = pair.tmp / "restored"
    assert run_drsync("snapshot", "restore", info.id, "--config", pair.standby_cfg, "--target", restored).code == 0


def test_a_shipper_that_went_silent_gives_its_lock_up(tmp_path: Path) -> None:
    """A primary that died between upload and commit must not block GC for ever: its session ends
    after the idle limit (here shortened on an in-process intake; the agent uses SESSION_IDLE_S)."""
    from drsync.agent.intake import ChunkIntake
    from drsync.repository import chunks
    from drsync.transport import Caller

    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    intake = ChunkIntake(repo, idle_s=0.0)
    data = os.urandom(1000)
    caller = Caller("east", 1, instance="a")
    assert intake.receive(caller, iter([[ReceivedChunk(chunks.chunk_id(data), 0, len(data), data)]]))[1] == 1
    assert intake.open_sessions() == 1
    with pytest.raises(Exception, match="locked"):
        repo.lock(exclusive=True, wait_s=0).acquire()
    intake.expire_idle()
    assert intake.open_sessions() == 0
    repo.lock(exclusive=True, wait_s=0).acquire().release()


def test_a_backup_that_takes_long_holds_up_no_replication_cycle(tmp_path: Path) -> None:
    """[backups] on the primary: while a backup is in progress (held at its pause point, as a backup
    of a very large snapshot would be), production keeps being captured, shipped and applied."""
    p = Pair(tmp_path)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "backup").write_text("hold the backup\n")
    dest = tmp_path / "backups"
    backups = f'[backups]\ndestination = "{dest}"\ninterval = "1s"\nkeep = {{ last = 3 }}\n'
    text = p.primary_cfg.read_text().replace("[replication]", backups + "[replication]")
    p.primary_cfg.write_text(text)
    os.environ["DRSYNC_FAULT_PAUSE"] = str(gates)  # inherited by the agents this test starts
    try:
        p.start("standby")
        p.start("primary")
        wait_for(lambda: (gates / "backup.reached").exists(), "the primary's first backup to start")
        for n in range(3):
            (p.prod / "catalog" / f"during-backup-{n}.txt").write_text(f"written while the backup runs {n}\n")
            wait_for(p.in_sync, f"change {n} to reach the standby while the backup is in progress")
        assert (gates / "backup").exists() and not [p for p in dest.iterdir() if not p.name.startswith(".")]
        status = json.loads(_get(p.metrics["primary"], "/status.json"))
        assert (status["maintenance"] or "").startswith("backup"), status["maintenance"]
        (gates / "backup").unlink()
        wait_for(lambda: any(not p.name.startswith(".") for p in dest.iterdir()), "the backup to finish")
    finally:
        os.environ.pop("DRSYNC_FAULT_PAUSE", None)
        p.stop_all()


def _get(address: str, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as r:
        return r.read().decode()


def test_the_state_record_is_never_torn(tmp_path: Path) -> None:
    """Writers on several threads (an apply, clock samples, the epoch floor), readers of memory and of
    the file: every record read has an applied snapshot with its own capture time and position."""
    store = StateStore(str(tmp_path))
    stop = threading.Event()
    torn: list[str] = []

    def applies() -> None:
        for i in range(1, 400):
            store.update(applied_snapshot=f"s{i}", applied_captured_at=float(i), applied_position=(1, i))

    def others() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.update(clock_offset_s=float(i % 7), epoch_seen=i)
            store.transform(lambda s, e=i: s if s.epoch >= e else dataclasses.replace(s, epoch=e))

    def check(st: object, where: str) -> None:
        snap, at, pos = st.applied_snapshot, st.applied_captured_at, st.applied_position  # type: ignore[attr-defined]
        if snap and (snap != f"s{int(at)}" or tuple(pos) != (1, int(at))):
            torn.append(f"{where}: {snap} {at} {pos}")

    def readers() -> None:
        while not stop.is_set():
            check(store.current, "memory")
            check(StateStore(str(tmp_path)).load(), "disk")

    threads = [threading.Thread(target=f) for f in (others, readers, readers)]
    for t in threads:
        t.start()
    applies()
    stop.set()
    for t in threads:
        t.join()
    assert not torn, torn[:5]
    assert store.current.applied_snapshot == "s399" == StateStore(str(tmp_path)).current.applied_snapshot


def test_the_status_page_reads_activity_while_other_threads_append(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shippers and the committer (gRPC threads) record activity and lag samples while the HTTP thread
    renders the page from them: every render sees whole records, and none fails. Iterating the live deques
    instead (no lock, or no copy) fails here with "deque mutated during iteration": the interpreter
    switches threads every microsecond meanwhile, so appends land inside the readers' loops."""
    act = Activity(lambda: 1.5)
    monkeypatch.setattr(activity_module, "LAG_SAMPLE_S", 0.0)  # from now on every sample_lag call records one
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(name: str) -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                act.add(f"{name}-{i}", i % 2 == 0, f"{name}: shipment {i}")
                act.sample_lag()
        except BaseException as e:  # reported by the test, not lost on the thread
            failures.append(e)

    reads = 0
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writers = [threading.Thread(target=writer, args=(n,)) for n in ("shipper", "committer")]
    for t in writers:
        t.start()
    try:
        while reads < 10_000 and not failures:
            cycles = act.recent()
            assert all(set(c) == {"at", "snapshot", "ok", "summary"} for c in cycles), cycles
            assert all(c["summary"].endswith(c["snapshot"].rsplit("-", 1)[1]) for c in cycles), cycles
            if reads % 200 == 0:  # the whole page now and then (its lag chart is the slow part)
                page = statuspage.render({"cycles": cycles, "lag_history": act.lag_history(), "lag_s": 1.5})
                assert all(c["snapshot"] in page for c in cycles)
            reads += 1
    finally:
        stop.set()
        for t in writers:
            t.join()
        sys.setswitchinterval(old_interval)
    assert not failures, failures[:3]
    assert len(act.recent()) == activity_module.RECENT


def test_a_standby_collecting_garbage_is_promoted_at_once(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """The standby's retention and GC run beside replication, never under the lock a promotion waits
    for: with its garbage collection in progress (held at its pause point, the repository's exclusive
    lock taken, as a collection over millions of chunks would be), the operator's promotion completes."""
    from tests.group import Group

    gates = tmp_path / "gates"
    gates.mkdir()
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], extra="[snapshots]\nkeep = { last = 1 }\n")
    try:
        for name in g.names:
            g.start(name, env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates)} if name == "west" else None)
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "west to apply production")
        (gates / "gc").write_text("hold west's garbage collection\n")
        for n in range(3):  # new snapshots on west: retention deletes the older ones, then collects
            (g.data["east"] / "catalog" / f"more-{n}.txt").write_text(f"change {n}\n")
            wait_for(lambda: g.in_sync("east", "west") or (gates / "gc.reached").exists(), f"change {n} on west")
        wait_for(lambda: (gates / "gc.reached").exists(), "west's garbage collection to start")
        g.kill("east")  # production's agent is gone; the operator promotes west once its session expired
        wait_for(lambda: g.primary() is None, "east's ZooKeeper session to expire")
        r = g.promote("west", "--no-fence")
        assert r.code == 0, r.err
        assert (gates / "gc").exists(), "the promotion must not have waited for the collection"
        wait_for(lambda: g.primary() == ("west", 2), "west to act as primary")
        (gates / "gc").unlink()
        wait_for(lambda: "fault trial: gc resumed" in g.log("west"), "west's collection to go on")
        assert run_drsync("repo", "verify", "--config", g.cfg["west"]).code == 0
    finally:
        g.stop_all()


def _snapshot_names(g, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    r = g.drsync(name, "snapshot", "list", "--json")
    assert r.code == 0, r.err
    return [str(s["name"]) for s in r.json()]


def test_collections_in_their_mark_hold_up_no_cycle_and_no_switchover(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """[snapshots] on both sides: while the primary's and the standby's garbage collections are in their
    mark (held at its pause point, the repository's shared lock taken, as a mark over millions of chunks
    would be), production keeps being captured, shipped and applied cycle after cycle, and a switchover
    to the standby completes. The ex-primary rejoins as a standby at once: the before-rejoin snapshot it
    no longer needs (nothing changed after the switchover's final snapshot) is deleted once its repository
    is free, never waited for on its loop thread."""
    from tests.group import Group

    gates = {n: tmp_path / f"gates-{n}" for n in ("east", "west")}
    for d in gates.values():
        d.mkdir()
        (d / "gc-mark").write_text("hold this agent's garbage collection in its mark\n")
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"],
              extra='switchover_hook = "true"\n[snapshots]\nkeep = { last = 1 }\n')
    try:
        for name in g.names:  # a lock waited for on a loop thread would hold it for an hour: the test times out
            g.start(name, env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates[name]), "DRSYNC_LOCK_WAIT": "3600"})
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "west to apply production")
        marking = lambda: all((d / "gc-mark.reached").exists() for d in gates.values())  # noqa: E731
        for n in range(20):  # new snapshots on both sides: retention deletes the older ones, then collects
            if marking():
                break
            (g.data["east"] / "catalog" / f"before-gc-{n}.txt").write_text(f"change {n}\n")
            wait_for(lambda: g.in_sync("east", "west") or marking(), f"change {n} on west")
        wait_for(marking, "both garbage collections to reach their mark")
        for n in range(3):  # cycles go on: captured on east, shipped, applied on west
            (g.data["east"] / "catalog" / f"during-gc-{n}.txt").write_text(f"written while both collect {n}\n")
            wait_for(lambda: g.in_sync("east", "west"), f"change {n} to reach west while both collections mark")
        assert json.loads(_get(g.metrics["east"], "/status.json"))["maintenance"] == "retention"
        r = g.drsync("west", "switchover", "--json")
        assert r.code == 0, r.err
        assert r.json()["to"] == "west" and g.primary() == ("west", 2)
        g.wait_role("east", "standby")
        (g.data["west"] / "catalog" / "after-switchover.txt").write_text("written on the new primary\n")
        wait_for(lambda: g.in_sync("west", "east"), "east to apply the new primary's change")
        assert all((d / "gc-mark").exists() for d in gates.values()), "nothing may have waited for a collection"
        assert not any("fault trial: gc-mark resumed" in g.log(n) for n in g.names)
        # East's collection holds its repository: the redundant before-rejoin snapshot waits (east did not).
        assert any(s.startswith("before-rejoin") for s in _snapshot_names(g, "east"))
        for d in gates.values():
            (d / "gc-mark").unlink()
        for name in g.names:
            wait_for(lambda n=name: "fault trial: gc-mark resumed" in g.log(n), f"{name}'s collection to go on")
        wait_for(lambda: not any(s.startswith("before-rejoin") for s in _snapshot_names(g, "east")),
                 "east to delete its redundant before-rejoin snapshot once its repository is free")
        for name in g.names:
            r = g.drsync(name, "repo", "verify")
            assert r.code == 0, r.out + r.err
    finally:
        g.stop_all()


def test_the_status_page_reads_one_pass_of_the_group(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """The group as one coordination pass read it (view, agents, standbys fed and lost) is one immutable
    object, replaced whole: the status page, read on other threads while passes replace it, never shows
    the primary and epoch of one pass with the agents table of another."""
    from drsync.agent.loop import Agent
    from drsync.agent.supervisor import GroupSeen
    from drsync.config import load_config
    from drsync.coordination import Epoch, GroupView, PrimaryClaim, SessionState
    from tests.group import Group

    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    agent = Agent(load_config(str(g.cfg["east"])), serve_network=False)
    coord, agent.supervisor.coord = agent.supervisor.coord, None  # never started: the test publishes the passes
    passes = []
    for epoch, (primary, standby) in enumerate((("east", "west"), ("west", "east")), start=1):
        view = GroupView(SessionState.CONNECTED, Epoch(epoch, primary), PrimaryClaim(primary, g.addr[primary], epoch,
                                                                                     0.0))
        agents = {primary: {"role": "primary", "address": g.addr[primary], "epoch": epoch},
                  standby: {"role": "standby", "address": g.addr[standby], "epoch": epoch, "lag_s": 1.0}}
        passes.append(GroupSeen.of(view, agents, {}, {}))
    seen = passes[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen.view = passes[1].view  # type: ignore[misc]
    with pytest.raises(TypeError):
        seen.agents["north"] = {}  # type: ignore[index]
    failures: list[str] = []
    done = threading.Event()

    def publisher() -> None:
        n = 0
        while not done.is_set():
            agent.supervisor.seen = passes[n % 2]
            n += 1

    def reader() -> None:
        for _ in range(200):
            doc = agent.status.doc()
            primaries = [(a["name"], a["epoch"]) for a in doc["agents"] if a["role"] == "primary"]
            if primaries != [(doc["primary"], doc["epoch"])]:
                failures.append(f"primary {doc['primary']} at epoch {doc['epoch']}, agents {doc['agents']}")

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=publisher)] + [threading.Thread(target=reader) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
    finally:
        done.set()
        threads[0].join()
        sys.setswitchinterval(old_interval)
        agent.close()
        if coord is not None:
            coord.close()
        g.stop_all()
    assert not failures, failures[:3]


def test_a_frozen_standby_holds_up_no_other(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Each standby has its own shipper: with one standby frozen (SIGSTOP: it accepts connections and
    never answers), the other keeps receiving every change, and the frozen one catches up when thawed."""
    import signal

    from tests.group import Group

    g = Group(tmp_path, zk_server.hosts, group, ["east", "west", "north"])
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        for name in ("west", "north"):
            wait_for(lambda n=name: g.in_sync("east", n), f"{name} to apply production")
        g.procs["north"].send_signal(signal.SIGSTOP)
        for n in range(3):
            (g.data["east"] / "catalog" / f"while-north-sleeps-{n}.txt").write_text(f"change {n}\n")
            wait_for(lambda: g.in_sync("east", "west"), f"west to apply change {n} while north is frozen")
        assert not g.in_sync("east", "north")
        g.procs["north"].send_signal(signal.SIGCONT)
        wait_for(lambda: g.in_sync("east", "north"), "north to catch up once thawed")
    finally:
        for p in g.procs.values():
            p.send_signal(signal.SIGCONT)
        g.stop_all()


def test_an_unexpected_error_in_the_loop_stops_the_agent_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An error drsync does not know (here an EIO the real disk cannot be made to raise on demand, put in
    the loop's coordination pass) stops the agent whole: logged CRITICAL with its traceback, the gRPC
    port, metrics port and state-dir lock released, so nothing half alive keeps answering peers or
    holding its role while no loop coordinates (a switchover would wait on it forever)."""
    import errno
    import socket

    from drsync.agent.loop import Agent
    from drsync.config import load_config

    two = Pair(tmp_path)
    cfg = load_config(str(two.standby_cfg))
    agent = Agent(cfg)
    passes: list[int] = []

    def broken_pass() -> None:
        passes.append(1)
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "standby-repo"))

    monkeypatch.setattr(agent.supervisor, "coordinate", broken_pass)
    with caplog.at_level("CRITICAL", logger="drsync.agent"), pytest.raises(OSError, match="Input/output"):
        agent.run()
    assert passes == [1]
    assert any(r.levelname == "CRITICAL" and "unexpected error in its loop" in r.getMessage() and r.exc_info
               for r in caplog.records)
    for address in (cfg.agent.listen, cfg.agent.metrics):
        host, port = address.rsplit(":", 1)
        with socket.socket() as s:
            s.bind((host, int(port)))  # free again
    again = Agent(cfg)  # the state directory's lock was released
    again.close()
