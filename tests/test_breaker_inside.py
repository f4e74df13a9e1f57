"""Hostile tests of issue 15 (locks between shipments and GC, maintenance beside replication).

Each test names the promise it tries to break. Real agent processes, real gRPC, real files; where a
timer is far too long for a test (the 600 s idle limit of an intake session) the agent is started
with that one default shortened, exactly as tests/test_agent_inside.py shortens it in process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import run_drsync
from tests.test_agents import Pair, wait_for

IDLE_S = 2.0

# Runs the drsync CLI with the intake's idle limit shortened to IDLE_S seconds (nothing else changed).
SHORT_IDLE = (
    "import sys, runpy\n"
    "from drsync.agent import intake\n"
    f"intake.ChunkIntake.__init__.__kwdefaults__['idle_s'] = {IDLE_S}\n"
    "sys.argv = ['drsync'] + sys.argv[1:]\n"
    "runpy.run_module('drsync', run_name='__main__')\n"
)


def start_short_idle(tmp: Path, name: str, cfg: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(tmp / f"{name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", SHORT_IDLE, "agent", "--config", str(cfg)], stdout=log,
                                stderr=log, env={**os.environ, **(env or {})})


def upload_then_die(prod_repo: Repository, snapshot: str, target: str, sender: str, epoch: int) -> int:
    """A primary's shipment that negotiates and uploads every chunk, then never commits (the sender
    died between upload and commit). Returns how many chunks the standby stored."""
    from drsync.agent.primary import UPLOAD_MESSAGE_CHUNKS, batched
    from drsync.transport import ReceivedChunk

    info = prod_repo.find_snapshot(snapshot)
    ids = sorted(prod_repo.load_manifest(info).chunk_ids())
    link = GrpcStandbyLink(target, sender=sender)
    try:
        missing = [i for reply in link.missing(epoch, batched(ids, 8192)) for i in reply]

        def batches():  # type: ignore[no-untyped-def]
            for b in batched(missing, UPLOAD_MESSAGE_CHUNKS):
                out = []
                for cid in b:
                    loc, stored = prod_repo.read_stored(cid)
                    out.append(ReceivedChunk(cid, loc.encoding, loc.raw_length, stored))
                yield out

        return link.upload(epoch, batches())[1] if missing else 0
    finally:
        link.close()


LAST_GC: dict[str, str] = {}


def gc_runs(cfg: Path) -> bool:
    r = run_drsync("repo", "gc", "--config", cfg, env={"DRSYNC_LOCK_WAIT": "0"})
    LAST_GC[str(cfg)] = r.err.strip()
    return r.code == 0


def wait_gc(cfg: Path, what: str) -> None:
    """Until 'drsync repo gc' runs (condition wait, bounded well past the shortened idle limit)."""
    try:
        wait_for(lambda: gc_runs(cfg), what, timeout=IDLE_S + 30)
    except AssertionError as e:
        raise AssertionError(f"{e}; last 'drsync repo gc' said: {LAST_GC.get(str(cfg))}") from None


# --- promise 1: a sender that dies mid-shipment does not block GC for ever -------------------------


def test_a_sender_that_died_after_upload_stops_blocking_gc_after_the_idle_limit(tmp_path: Path) -> None:
    """The primary uploads, then dies before its Commit, and nobody ships again (production is down).
    Promise: its session ends after the idle limit and GC runs. Today the idle check runs only when the
    next Negotiate/Upload arrives, so without another shipment the standby's repository stays locked
    for ever (its own retention/GC and 'drsync repo gc' are refused)."""
    p = Pair(tmp_path)
    proc = start_short_idle(tmp_path, "standby", p.standby_cfg)
    try:
        wait_for(lambda: GrpcStandbyLink(p.standby_addr).health(), "standby agent to serve")
        r = run_drsync("snapshot", "create", "--config", p.primary_cfg, "--json")
        assert r.code == 0, r.err
        prod_repo = Repository.open(open_storage(str(tmp_path / "primary-repo")))
        assert upload_then_die(prod_repo, r.json()["id"], p.standby_addr, "primary", 1) > 0
        assert not gc_runs(p.standby_cfg), "the shipment's session must hold GC off while it is live"
        # Well past the idle limit, with nothing else arriving, GC must run.
        wait_gc(p.standby_cfg, f"GC to run once the dead sender's session is idle {IDLE_S}s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_promoted_standby_does_not_keep_the_dead_primarys_session_for_ever(tmp_path: Path, zk_server,  # type: ignore[no-untyped-def]
                                                                           group: str) -> None:
    """Failover after production's agent died between Upload and Commit: the standby is promoted and
    never receives another shipment. Promise: the dead sender's session ends (at the latest after the
    idle limit) and GC runs on the new primary. Today the session is kept by the promoted agent, whose
    repository stays share-locked for as long as it runs: 'drsync repo gc' and its own GC are refused."""
    from tests.group import Group

    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        g.start("east")
        g.procs["west"] = start_short_idle(tmp_path, "west", g.cfg["west"])
        wait_for(lambda: "west" in g.coord.agents(), "west to register")
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "west to apply production")
        g.kill("east")
        (g.data["east"] / "catalog" / "last-words.bin").write_bytes(os.urandom(300_000))
        r = g.drsync("east", "snapshot", "create", "--json")
        assert r.code == 0, r.err
        east_repo = Repository.open(open_storage(str(tmp_path / "east-repo")))
        assert upload_then_die(east_repo, r.json()["id"], g.addr["west"], "east", 1) > 0  # ... then nothing
        wait_for(lambda: g.primary() is None, "east's ZooKeeper session to expire")
        r = g.promote("west", "--no-fence")
        assert r.code == 0, r.err
        wait_for(lambda: g.primary() == ("west", 2), "west to act as primary")
        wait_gc(g.cfg["west"], "GC on the new primary (the dead shipment's session ended)")
    finally:
        g.stop_all()
