"""Failover that operators can trust: hostile tests of safety rules 1 and 7.

Real ZooKeeper, real `drsync agent` processes (agent.role = auto unless a test says
otherwise), a real production writer process (tests/fencing_helpers/writer.py)
and fence commands that really stop it. Written from the user's side only:
README.md, docs/operations.md, DESIGN.md and `drsync --help`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drsync.errors import DrsyncError, RefusedError
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import ROOT, SLOW, init_repo_at, run_drsync, tree_state
from tests.group import Group, PrimaryWatcher, pid_alive, scrape, wait_for
from tests.test_agents import Pair
from tests.test_failover import bootstrap
from tests.test_tls import make_ca, make_cert

WRITER = Path(__file__).resolve().parent / "fencing_helpers" / "writer.py"


# --- fixtures and helpers ---------------------------------------------------------------



class Writer:
    """A real production writer process; its journal lists every file it wrote (after the fsync)."""

    def __init__(self, tmp: Path, root: Path, period: float = 0.05) -> None:
        self.root = root
        self.journal = tmp / "writer.journal"
        self.pidfile = tmp / "writer.pid"
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(root), str(self.journal), str(self.pidfile),
                                      str(period)])
        # Reap it as soon as it dies, so that `kill -0 PID` in a fence command sees it gone (no zombie).
        self.reaper = threading.Thread(target=self.proc.wait, daemon=True)
        self.reaper.start()
        wait_for(lambda: self.pidfile.exists() and self.written(), "the writer to write its first file")

    def written(self) -> list[str]:
        if not self.journal.exists():
            return []
        return [line.split()[0] for line in self.journal.read_text().splitlines() if line.strip()]

    def written_with_times(self) -> list[tuple[str, float]]:
        return [(line.split()[0], float(line.split()[1])) for line in self.journal.read_text().splitlines()
                if line.strip()]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.reaper.join(timeout=30)

    @staticmethod
    def content(name: str) -> bytes:
        n = int(name[2:8])
        return (f"written by the production writer, file {n}\n" * 8).encode()


def fence_killing(writer_pidfile: Path, log: Path) -> str:
    """A fence command that really stops production's writer: kill -9 by pid, wait until it is gone."""
    return (f'fence_command = "echo $DRSYNC_FENCE_AGENT $DRSYNC_EPOCH >> {log} && '
            f'kill -9 $(cat {writer_pidfile}) ; while kill -0 $(cat {writer_pidfile}) 2>/dev/null; '
            f'do sleep 0.05; done"\n')


def before_rejoin_snapshots(g: Group, name: str) -> list[dict]:
    r = g.drsync(name, "snapshot", "list", "--json")
    assert r.code == 0, r.err
    return [s for s in r.json() if str(s.get("name") or "").startswith("before-rejoin")]


def restore(g: Group, name: str, snap_id: str, target: Path) -> Path:
    r = run_drsync("snapshot", "restore", snap_id, "--target", target, "--config", g.cfg[name])
    assert r.code == 0, r.err
    return target


def lost_files(writer: Writer, places: list[Path]) -> list[str]:
    """Every file the writer journaled that is in none of ``places`` with its content."""
    lost = []
    for name in writer.written():
        if not any((p / "writer" / name).is_file() and (p / "writer" / name).read_bytes() == Writer.content(name)
                   for p in places):
            lost.append(name)
    return lost


def one_clean_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def holders_by_epoch(watcher: PrimaryWatcher) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for p in watcher.primary:
        if p is not None:
            out.setdefault(p[1], set()).add(p[0])
    return out


def became_primary(g: Group, name: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in g.log(name).splitlines() if "is now PRIMARY at epoch" in line]


# --- promise 1: restarting production's agent is not an outage --------------------------


def test_sigterm_of_primary_agent_is_maintenance_not_failover(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A clean stop of the primary's agent, with production writing: no standby promotes itself, the
    maintenance marker is set and shown, and the agent comes back primary at the same epoch with
    everything production wrote meanwhile — nothing of it overwritten, all of it shipped."""
    fenced = tmp_path / "fenced.log"
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "0s"\n' + fence_killing(tmp_path / "writer.pid", fenced))
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    writer = Writer(tmp_path, g.data["east"])
    try:
        g.kill("east", signal.SIGTERM)
        wait_for(lambda: g.primary() is None, "the primary node to go")
        marker = g.coord.read_maintenance()
        assert marker is not None and marker["agent"] == "east"
        human = g.drsync("west", "status")
        assert human.code == 0 and "MAINTENANCE" in human.out and "east" in human.out, human.out
        # The standby has looked at the group without a primary and decided: the marker keeps it a standby.
        wait_for(lambda: "stopped on purpose" in g.log("west"), "west to decide with the primary node gone")
        assert g.primary() is None and g.coord.read_epoch().epoch == 1
        assert not fenced.exists(), "the standby fenced production although its agent was only stopped"
        assert writer.alive(), "production's writer was stopped by a mere agent restart"
        assert g.record("west").get("role") == "standby"
        # The agent comes back: primary again at the same epoch, the marker gone.
        g.start("east")
        wait_for(lambda: g.primary() == ("east", 1), "east to take its claim back at epoch 1")
        wait_for(lambda: g.coord.read_maintenance() is None, "the maintenance marker to be removed")
        written_while_down = writer.written()
    finally:
        writer.stop()
    # Nothing production wrote meanwhile is lost: still in production's root, and shipped to the standby.
    assert lost_files(writer, [g.data["east"]]) == []
    wait_for(lambda: g.in_sync("east", "west"), "west to receive what production wrote during the restart")
    assert lost_files(writer, [g.data["west"]]) == [] and len(written_while_down) > 0
    watcher.close()
    assert set(watcher.epochs) == {1} and holders_by_epoch(watcher) == {1: {"east"}}


@pytest.mark.parametrize("fence", ["fails", "hangs"])
def test_kill_9_primary_with_a_broken_fence_never_promotes(make_group, tmp_path: Path, fence: str) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the primary's agent; the standby's fence command fails (exit 3) or hangs past
    fence_timeout. Several fence attempts later nothing is promoted, the epoch is unchanged,
    and a hung fence is killed with its whole process group each time."""
    attempts = tmp_path / "fence-attempts"
    sleeps = tmp_path / "fence-sleeps"
    if fence == "fails":
        cmd = f'fence_command = "echo $DRSYNC_FENCE_AGENT >> {attempts}; echo fence says no >&2; exit 3"\n'
    else:
        cmd = (f'fence_command = "echo $DRSYNC_FENCE_AGENT >> {attempts}; sleep 300 & echo $! >> {sleeps}; wait"\n'
               f'fence_timeout = "1s"\n')
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "0s"\n' + cmd)
    bootstrap(g)
    g.kill("east")  # kill -9: production itself may still be writing
    wait_for(lambda: g.primary() is None, "the dead primary's session to expire", timeout=30)
    wait_for(lambda: attempts.exists() and len(attempts.read_text().split()) >= 2,
             "the standby to try its fence again after a failure", timeout=45)
    assert set(attempts.read_text().split()) == {"east"}
    assert g.primary() is None and g.coord.read_epoch().epoch == 1, "promoted although the fence never succeeded"
    assert g.record("west").get("role") == "standby" and became_primary(g, "west") == []
    assert scrape(g.metrics["west"], g.group, "west")["drsync_is_primary"] == 0
    assert "fence_command" in g.log("west")
    if fence == "fails":
        assert "exited with" in g.log("west") and "fence says no" in g.log("west")
    else:
        pids = [int(p) for p in sleeps.read_text().split()]
        assert len(pids) >= 2
        wait_for(lambda: not any(pid_alive(p) for p in pids[:-1]),
                 "every timed-out fence (with its children) to be killed")


@pytest.mark.parametrize("fence_line", ['fence_command = ""', 'fence_command = "   "'], ids=["empty", "blank"])
def test_automatic_failover_without_a_fence_is_refused(tmp_path: Path, zk_server, group: str,
                                                       fence_line: str) -> None:  # type: ignore[no-untyped-def]
    """An explicitly empty (or blank) fence_command is no fence: config check exits 2, the agent
    refuses to start with one line and exit 2, and nothing registers in ZooKeeper."""
    g = Group(tmp_path, zk_server.hosts, group, ["west"], failover="automatic", extra=fence_line, data=False)
    try:
        r = g.drsync("west", "config", "check", "--json")
        assert r.code == 2, r.out + r.err
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert not checks["fencing"]["ok"] and "fence_command" in checks["fencing"]["detail"]
        r = run_drsync("agent", "--config", g.cfg["west"], timeout=60)
        assert r.code == 2 and "fence_command" in r.err and one_clean_line(r.err), (r.code, r.err)
        assert "west" not in g.coord.agents()
    finally:
        g.stop_all()


def test_kill_9_with_a_live_writer_loses_nothing(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Production keeps writing; its agent is killed -9. The standby fences (kills the writer for real)
    and only then promotes; the old primary comes back, demotes, rejoins, and every file the writer
    ever wrote is on the new primary or in the old primary's before-rejoin snapshot."""
    fenced = tmp_path / "fenced.log"
    demoted = tmp_path / "demoted.log"
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "0s"\n' + fence_killing(tmp_path / "writer.pid", fenced)
                   + f'demote_command = "echo $DRSYNC_AGENT $DRSYNC_REASON >> {demoted}"\n')
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    writer = Writer(tmp_path, g.data["east"])
    try:
        wait_for(lambda: (g.data["west"] / "writer").is_dir() and any((g.data["west"] / "writer").iterdir()),
                 "some of the writer's files to reach west")
        g.kill("east")
        wait_for(lambda: g.primary() == ("west", 2), "west to take over at epoch 2", timeout=40)
        # The promotion came only after the fence really stopped production's writer.
        assert fenced.read_text().split()[0] == "east"
        assert not writer.alive(), "west became primary while production's writer still ran"
        promoted_at = g.coord.read_epoch().at
        last_write = max(t for _, t in writer.written_with_times())
        assert last_write <= promoted_at, "production's writer wrote after west's promotion"
    finally:
        writer.stop()
    g.start("east")
    # A restarted agent first registers as a standby (before it has looked at the group): wait for the
    # demotion itself, then for the standby it becomes.
    wait_for(lambda: demoted.exists() and demoted.read_text().split()[:1] == ["east"], "east to demote itself")
    g.wait_role("east", "standby")
    # Its root is kept before anything overwrites it. (Many unshipped files can make the resync wait for
    # `drsync apply --confirm` under replication.max_delete_fraction: that is rule 8, not a loss.)
    wait_for(lambda: before_rejoin_snapshots(g, "east"), "east to keep its root as a before-rejoin snapshot")
    kept = before_rejoin_snapshots(g, "east")
    assert [s["name"] for s in kept] == ["before-rejoin-epoch-2"], kept
    recovered = restore(g, "east", kept[0]["id"], tmp_path / "recovered")
    lost = lost_files(writer, [g.data["west"], recovered])
    assert lost == [], f"{len(lost)} of {len(writer.written())} written files lost: {lost[:10]}"
    watcher.close()
    assert watcher.epochs == sorted(watcher.epochs) and holders_by_epoch(watcher) == {1: {"east"}, 2: {"west"}}


def test_primary_that_cannot_prove_its_claim_runs_demote_command(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Freeze the primary's agent past its session timeout (manual failover: nobody promotes).
    When it wakes its session is gone: it must run demote_command before acting as primary again,
    and warn that the demotion must be undone by hand when it gets its claim back."""
    demoted = tmp_path / "demoted.log"
    g = make_group(["east", "west"], session_timeout="2s",
                   extra=f'demote_command = "echo $DRSYNC_AGENT $DRSYNC_REASON >> {demoted}"\n')
    bootstrap(g)
    g.procs["east"].send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: g.primary() is None, "the frozen primary's session to expire", timeout=30)
    finally:
        g.procs["east"].send_signal(signal.SIGCONT)
    wait_for(lambda: demoted.exists() and demoted.read_text().strip(), "east to run its demote_command", timeout=30)
    first = demoted.read_text().splitlines()[0].split()
    assert first[0] == "east" and first[1] in ("lost", "suspended"), first
    wait_for(lambda: g.primary() == ("east", 1), "east to take its claim back at the same epoch", timeout=30)
    wait_for(lambda: "demote_command ran while its claim could not be proven" in g.log("east"),
             "east to warn that the demotion must be undone")


def test_ex_primary_with_failing_demote_waits_for_rejoin(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fenced primary whose demote_command fails must not overwrite its root as a standby until an
    operator runs drsync rejoin; then its unshipped changes are kept as before-rejoin-epoch-2."""
    demoted = tmp_path / "demoted.log"
    g = make_group(["east", "west"], interval="1h",
                   extra=f'demote_command = "echo $DRSYNC_AGENT $DRSYNC_REASON >> {demoted}; exit 1"\n')
    bootstrap(g)
    (g.data["east"] / "catalog" / "unshipped.txt").write_text("production wrote this after the last cycle\n")
    r = g.promote("west", "--force", "--no-fence")
    assert r.code == 0, r.err
    g.wait_role("east", "ex-primary")
    wait_for(lambda: demoted.exists() and "east fenced" in demoted.read_text(), "east to try its demote_command")
    east_before = tree_state(g.data["east"])
    (g.data["west"] / "catalog" / "new-primary.txt").write_text("west's production\n")
    # The demotion fails again on its retry: all that time nothing may touch east's root.
    wait_for(lambda: len(demoted.read_text().splitlines()) >= 2, "east to retry its failing demote_command")
    assert g.record("east").get("role") == "ex-primary"
    assert tree_state(g.data["east"]) == east_before and before_rejoin_snapshots(g, "east") == []
    r = g.drsync("east", "rejoin", "--json")
    assert r.code == 0, r.err
    g.wait_role("east", "standby")
    wait_for(lambda: not (g.data["east"] / "catalog" / "unshipped.txt").exists(), "east to follow west")
    kept = before_rejoin_snapshots(g, "east")
    assert [s["name"] for s in kept] == ["before-rejoin-epoch-2"], kept
    recovered = restore(g, "east", kept[0]["id"], tmp_path / "recovered")
    assert (recovered / "catalog" / "unshipped.txt").read_text() == "production wrote this after the last cycle\n"


# --- promise 2: epochs come only from ZooKeeper ----------------------------------------


def rogue_snapshot(tmp: Path) -> tuple[bytes, bytes]:
    """A snapshot of the same cluster id and release that would wipe a standby: one empty file, no chunks."""
    root = tmp / "rogue-data"
    root.mkdir()
    (root / "ROGUE-WAS-HERE").write_bytes(b"")
    repo = tmp / "rogue-repo"
    init_repo_at(repo, "analytics", "6.2.1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", root, "--json")
    assert r.code == 0, r.err
    sid = r.json()["id"]
    return (repo / "snapshots" / f"{sid}.json").read_bytes(), (repo / "manifests" / f"{sid}.parquet").read_bytes()


def a_valid_chunk() -> object:
    from drsync.repository import chunks
    from drsync.transport import ReceivedChunk

    data = b"rogue payload " * 512
    return ReceivedChunk(chunks.chunk_id(data), 0, len(data), data)


@pytest.mark.parametrize("who", ["huge-epoch", "right-epoch-wrong-sender", "standby-name-as-sender"])
def test_rogue_peer_cannot_raise_epochs_or_ship(make_group, tmp_path: Path, who: str) -> None:  # type: ignore[no-untyped-def]
    """A peer that is not the agent ZooKeeper's epoch names — with epoch 2**62, or at the right epoch
    number — is refused on Negotiate, Upload and Commit; the standby's epoch stays ZooKeeper's, its root
    is untouched, and the real primary keeps shipping (also after the standby restarts)."""
    g = make_group(["east", "west"])
    bootstrap(g)
    doc, manifest = rogue_snapshot(tmp_path)
    sender, epoch = {"huge-epoch": ("rogue", 2**62), "right-epoch-wrong-sender": ("rogue", 1),
                     "standby-name-as-sender": ("west", 1)}[who]
    before = tree_state(g.data["west"])
    link = GrpcStandbyLink(g.addr["west"], sender=sender)
    try:
        with pytest.raises(RefusedError):
            list(link.missing(epoch, iter([[b"\0" * 32]])))
        with pytest.raises(RefusedError):
            link.upload(epoch, iter([[a_valid_chunk()]]))
        with pytest.raises(RefusedError):
            link.commit(epoch, sender, doc, iter([manifest]))
    finally:
        link.close()
    assert g.hello("west").epoch == 1
    assert scrape(g.metrics["west"], g.group, "west")["drsync_epoch"] == 1
    assert tree_state(g.data["west"]) == before
    assert not any(s.get("source") == str(tmp_path / "rogue-data")
                   for s in g.drsync("west", "snapshot", "list", "--json").json())
    # The real primary keeps shipping, and after a restart of the standby too.
    (g.data["east"] / "catalog" / "after-rogue.txt").write_text("the real primary still ships\n")
    wait_for(lambda: g.in_sync("east", "west"), "the real primary to ship after the rogue")
    g.kill("west")
    g.start("west", wait=False)
    g.wait_serving("west")
    (g.data["east"] / "catalog" / "after-restart.txt").write_text("and after the standby restarted\n")
    wait_for(lambda: g.in_sync("east", "west"), "the real primary to ship after the standby restarted")
    assert g.hello("west").epoch == 1 and g.primary() == ("east", 1)


def test_tls_allowed_peers_refuses_other_names_of_the_same_ca(tmp_path: Path) -> None:
    """Fixed roles, mutual TLS, allowed_peers = ["primary"] on the standby: the standby's own certificate
    and names that merely contain "primary" (same CA) are refused on every RPC; the primary ships."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    for name in ("primary", "standby", "primary-evil", "xprimary"):
        make_cert(pki, "ca", name)
    pair = Pair(tmp_path)
    pair.standby_cfg.write_text(pair.standby_cfg.read_text() + f'[tls]\nca = "{pki / "ca.pem"}"\n'
                                f'cert = "{pki / "standby.pem"}"\nkey = "{pki / "standby.key"}"\n'
                                f'allowed_peers = ["primary"]\n')
    pair.primary_cfg.write_text(pair.primary_cfg.read_text() + f'[tls]\nca = "{pki / "ca.pem"}"\n'
                                f'cert = "{pki / "primary.pem"}"\nkey = "{pki / "primary.key"}"\n')
    snap = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json")
    assert snap.code == 0, snap.err
    sid = snap.json()["id"]
    doc = (tmp_path / "primary-repo" / "snapshots" / f"{sid}.json").read_bytes()
    manifest = (tmp_path / "primary-repo" / "manifests" / f"{sid}.parquet").read_bytes()
    try:
        with open(tmp_path / "standby.log", "ab") as log:
            pair.procs["standby"] = subprocess.Popen(
                [sys.executable, "-m", "drsync", "agent", "--config", str(pair.standby_cfg)], stdout=log, stderr=log)
        good = GrpcStandbyLink(pair.standby_addr, tls=(str(pki / "ca.pem"), str(pki / "primary.pem"),
                                                       str(pki / "primary.key")), sender="primary")
        wait_for(good.health, "the TLS standby to serve")
        for name in ("standby", "primary-evil", "xprimary"):
            link = GrpcStandbyLink(pair.standby_addr, tls=(str(pki / "ca.pem"), str(pki / f"{name}.pem"),
                                                           str(pki / f"{name}.key")), sender="primary")
            try:
                with pytest.raises(DrsyncError):
                    list(link.missing(2**62, iter([[b"\0" * 32]])))
                with pytest.raises(DrsyncError):
                    link.upload(2**62, iter([[a_valid_chunk()]]))
                with pytest.raises(DrsyncError):
                    link.commit(1, "primary", doc, iter([manifest]))
            finally:
                link.close()
        assert set(tree_state(pair.standby_data)) <= {"."}, "a refused certificate changed the standby's root"
        assert good.hello("primary", 0).epoch < 2**62
        good.close()
        pair.start("primary")
        wait_for(pair.in_sync, "the allowed primary to ship over mutual TLS")
    finally:
        pair.stop_all()


# --- promise 3: a promotion racing a switchover ----------------------------------------


def test_promotion_inside_the_switchover_hook_wins_and_switchover_says_so(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The switchover hook itself force-promotes a third agent: that promotion came first, so the
    switchover must fail with a clear one-line message; one primary per epoch, epochs increasing,
    and the switchover's target never becomes primary."""
    hook_out = tmp_path / "hook-promote.out"
    hook = (f'{sys.executable} -m drsync promote --force --no-fence --json --config {tmp_path / "north.toml"} '
            f'> {hook_out} 2>&1; echo $? >> {tmp_path / "hook-promote.rc"}')
    g = make_group(["east", "west", "north"], interval="1h", extra=f'switchover_hook = "{hook}"\n')
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    r = g.drsync("west", "switchover", "--to", "west", "--timeout", "40")
    assert (tmp_path / "hook-promote.rc").read_text().split() == ["0"], hook_out.read_text()
    assert r.code != 0, f"switchover reported success although north was promoted first: {r.out}"
    assert r.code == 1 and one_clean_line(r.err), (r.code, r.err)
    assert "promot" in r.err.lower() or "north" in r.err, r.err
    wait_for(lambda: g.primary() == ("north", 2), "north to be the primary at epoch 2")
    assert g.coord.read_epoch().epoch == 2
    wait_for(lambda: sum(scrape(g.metrics[n], g.group, n).get("drsync_is_primary", 0) for n in g.names) == 1,
             "exactly one agent to act as primary")
    assert became_primary(g, "west") == []
    watcher.close()
    holders = holders_by_epoch(watcher)
    assert all(len(v) == 1 for v in holders.values()) and holders == {1: {"east"}, 2: {"north"}}, holders
    assert watcher.epochs == sorted(set(watcher.epochs)), watcher.epochs


def test_promotion_right_after_a_switchover_request(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Request a switchover to west and immediately force-promote north: whatever wins, one primary
    per epoch, strictly increasing epochs, and a failed switchover says why in one line."""
    g = make_group(["east", "west", "north"], interval="1h")
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    sw = subprocess.Popen([sys.executable, "-m", "drsync", "switchover", "--to", "west", "--json", "--config",
                           str(g.cfg["west"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: g.coord.read_switchover() is not None or sw.poll() is not None, "the switchover request")
    # --accept-data-loss: the switchover's final snapshot may put west ahead of north (a promotion behind another
    # live standby is refused without it); the race is what this test is about.
    pr = g.promote("north", "--force", "--no-fence", "--accept-data-loss")
    out, err = sw.communicate(timeout=120)
    assert pr.code == 0, pr.err
    final = g.coord.read_epoch().epoch
    if sw.returncode == 0:
        doc = json.loads(out)
        assert doc["to"] == "west" and doc["epoch"] == 2 and final == 3, (doc, final)
        expected = {1: {"east"}, 2: {"west"}, 3: {"north"}}
    else:
        assert sw.returncode == 1 and one_clean_line(err), (sw.returncode, err)
        assert "promot" in err.lower() or "north" in err, err
        # The promotion came first (epoch 2), or right after the hand-over to west (epoch 3), before west was
        # seen holding the primary node (it may have held it for milliseconds, or never got to take it).
        expected = {1: {"east"}, 2: {"north"}} if final == 2 else {1: {"east"}, 2: {"west"}, 3: {"north"}}
    wait_for(lambda: g.primary() == ("north", final), "north to hold the newest epoch")
    wait_for(lambda: sum(scrape(g.metrics[n], g.group, n).get("drsync_is_primary", 0) for n in g.names) == 1,
             "exactly one agent to act as primary")
    watcher.close()
    holders = holders_by_epoch(watcher)
    if sw.returncode != 0 and final == 3 and 2 not in holders:
        holders[2] = {"west"}  # handed over to west, which never got to claim before north's promotion
    assert holders == expected
    assert watcher.epochs == sorted(set(watcher.epochs)) and watcher.epochs[-1] == final


# --- promise 4: switchover while production keeps writing -----------------------------


@pytest.mark.parametrize("period", [0.05, 0.8], ids=["busy-writer", "intermittent-writer"])
def test_switchover_with_a_running_writer_is_aborted_or_loses_nothing(make_group, tmp_path: Path,
                                                                     period: float) -> None:  # type: ignore[no-untyped-def]
    """No hook, a writer keeps writing on the primary: the switchover either aborts naming the changing
    paths (and east stays primary), or everything written on east before it returned is on west or in
    east's before-rejoin snapshot."""
    g = make_group(["east", "west"], interval="1h")
    bootstrap(g)
    writer = Writer(tmp_path, g.data["east"], period=period)
    try:
        r = g.drsync("west", "switchover", "--json", "--timeout", "40")
        returned = time.time()
    finally:
        writer.stop()
    if r.code != 0:
        assert r.code == 1 and one_clean_line(r.err), (r.code, r.err)
        assert "did not stop changing" in r.err and "writer/w-" in r.err, r.err
        assert g.primary() == ("east", 1) and g.coord.read_epoch().epoch == 1
        assert lost_files(writer, [g.data["east"]]) == []
        return
    assert g.primary() == ("west", 2)
    # No switchover_hook and no demote_command: nothing stopped the writers, so the old primary waits
    # as an ex-primary (root untouched) until an operator says they are stopped.
    g.wait_role("east", "ex-primary")
    assert g.drsync("east", "rejoin").code == 0
    g.wait_role("east", "standby")
    wait_for(lambda: g.in_sync("west", "east"), "east to follow west")
    recovered = [restore(g, "east", s["id"], tmp_path / f"recovered-{i}")
                 for i, s in enumerate(before_rejoin_snapshots(g, "east"))]
    before_return = {n for n, t in writer.written_with_times() if t < returned}
    lost = [n for n in lost_files(writer, [g.data["west"], *recovered]) if n in before_return]
    assert lost == [], f"switchover succeeded and silently lost {lost}"


def test_switchover_then_old_primarys_writer_keeps_writing_loses_nothing(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An intermittent writer (quiet longer than a capture) fools the quiescence proof. After the
    hand-over it keeps writing on the old primary for a few seconds, as a real production would until
    someone stops it: the old primary's root is live production, so whatever it wrote must end up on
    the new primary or in a before-rejoin snapshot — never silently overwritten by an apply."""
    g = make_group(["east", "west"], interval="1s")
    bootstrap(g)
    writer = Writer(tmp_path, g.data["east"], period=1.5)
    try:
        r = g.drsync("west", "switchover", "--json", "--timeout", "40")
        if r.code != 0:
            assert r.code == 1 and "did not stop changing" in r.err and one_clean_line(r.err), (r.code, r.err)
            return
        assert g.primary() == ("west", 2)
        n = len(writer.written())
        wait_for(lambda: len(writer.written()) >= n + 3, "the writer to write on the old primary after hand-over")
        time.sleep(2)  # let production keep writing while east follows west: the fault lasts
    finally:
        writer.stop()
    wait_for(lambda: g.record("east").get("role") in ("standby", "ex-primary"), "east to settle")
    places = [g.data["west"]]
    if g.record("east").get("role") == "standby":
        # East's root is a standby's now: the new primary's next change is applied over it.
        (g.data["west"] / "catalog" / "after-handover.txt").write_text("the new primary changed something\n")
        wait_for(lambda: (g.data["east"] / "catalog" / "after-handover.txt").exists(),
                 "east to apply the new primary's change")
    else:
        places.append(g.data["east"])  # an ex-primary leaves its root alone until it rejoins
    recovered = [restore(g, "east", s["id"], tmp_path / f"recovered-{i}")
                 for i, s in enumerate(before_rejoin_snapshots(g, "east"))]
    lost = lost_files(writer, [*places, *recovered])
    assert lost == [], (f"{len(lost)} of {len(writer.written())} files the writer wrote on the old primary are "
                        f"nowhere: {lost}; east role {g.record('east').get('role')}, "
                        f"before-rejoin snapshots {[s['name'] for s in before_rejoin_snapshots(g, 'east')]}")


def test_rejoin_run_against_the_live_primary_is_refused(make_group) -> None:  # type: ignore[no-untyped-def]
    """An operator runs `drsync rejoin` with production's config by mistake: refused in one line
    (exit 4 or 2), the primary stays primary at the same epoch and its root is untouched."""
    g = make_group(["east", "west"], interval="1h")
    bootstrap(g)
    (g.data["east"] / "catalog" / "fresh.txt").write_text("not shipped yet\n")
    before = tree_state(g.data["east"])
    r = g.drsync("east", "rejoin", "--wait", f"{5 * SLOW:g}")  # the agent refuses; a busy one later
    assert r.code in (2, 4) and one_clean_line(r.err), (r.code, r.out, r.err)
    assert g.primary() == ("east", 1) and g.record("east").get("role") == "primary"
    assert tree_state(g.data["east"]) == before


# --- a newcomer following README's "Roles from ZooKeeper" ------------------------------


def readme_coordination_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```toml\n(\[coordination\]\n.*?)```", text, re.S)
    assert m, "README has no [coordination] example"
    return m.group(1)


def test_newcomer_copies_readme_coordination_block(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """The README's [coordination] example, pasted as is (only the ZooKeeper hosts and group changed),
    is accepted; switched to automatic failover as written it is refused with one line and exit 2;
    the first promotion then works as README says, and an empty standby's promotion is refused (4)."""
    block = readme_coordination_block()
    block = re.sub(r'zookeeper = "[^"]*"', f'zookeeper = "{zk_server.hosts}"', block)
    block = re.sub(r'group = "[^"]*"', f'group = "{group}"', block)
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        for name in g.names:
            text = g.cfg[name].read_text()
            start = text.index("[coordination]")
            end = text.index("[replication]")
            g.cfg[name].write_text(text[:start] + block + "\n" + text[end:])
        r = g.drsync("east", "config", "check", "--json")
        bad = [c for c in json.loads(r.out)["checks"] if not c["ok"]] if r.out.strip() else r.err
        assert r.code == 0, bad
        auto = tmp_path / "east-auto.toml"
        auto.write_text(g.cfg["east"].read_text().replace('failover = "manual"', 'failover = "automatic"'))
        r = run_drsync("config", "check", "--config", auto)
        assert r.code == 2 and "fence_command" in (r.out + r.err), (r.code, r.out, r.err)
        r = run_drsync("agent", "--config", auto, timeout=60)
        assert r.code == 2 and "fence_command" in r.err and one_clean_line(r.err), (r.code, r.err)
        for name in g.names:
            g.start(name)
        r = g.promote("west")
        assert r.code == 4 and "empty" in r.err and one_clean_line(r.err), (r.code, r.err)
        r = g.drsync("east", "promote")
        assert r.code == 0 and "epoch 1" in r.out, (r.code, r.out, r.err)
        wait_for(lambda: g.in_sync("east", "west"), "west to follow production")
    finally:
        g.stop_all()


@pytest.mark.parametrize("case", ["rejoin-a-standby", "switchover-without-primary", "promote-zk-down",
                                  "bad-fence-timeout", "unknown-coordination-key", "rejoin-zk-down"])
def test_newcomer_errors_are_one_line_with_the_right_exit_code(tmp_path: Path, zk_server, group: str,
                                                              case: str) -> None:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        if case in ("rejoin-a-standby", "switchover-without-primary"):
            for name in g.names:
                g.start(name)
        cfg = g.cfg["west"]
        dead_zk = f"127.0.0.1:{__import__('tests.zk', fromlist=['free_port']).free_port()}"
        expected = {"rejoin-a-standby": (4, 2), "switchover-without-primary": (1, 4),
                    "promote-zk-down": (1,), "rejoin-zk-down": (1,),
                    "bad-fence-timeout": (2,), "unknown-coordination-key": (2,)}[case]
        if case == "rejoin-a-standby":
            r = run_drsync("rejoin", "--config", cfg, "--wait", f"{5 * SLOW:g}")
        elif case == "switchover-without-primary":
            r = run_drsync("switchover", "--config", cfg, "--timeout", "10")
        elif case in ("promote-zk-down", "rejoin-zk-down"):
            cfg.write_text(cfg.read_text().replace(zk_server.hosts, dead_zk))
            r = run_drsync("promote" if case == "promote-zk-down" else "rejoin", "--config", cfg, timeout=120)
        elif case == "bad-fence-timeout":
            cfg.write_text(cfg.read_text().replace('failover_grace = "1s"', 'failover_grace = "1s"\n'
                                                   'fence_timeout = "sixty seconds"'))
            r = run_drsync("promote", "--config", cfg)
        else:
            cfg.write_text(cfg.read_text().replace('failover_grace = "1s"', 'failover_grace = "1s"\n'
                                                   'fence_comand = "true"'))
            r = run_drsync("status", "--config", cfg)
        assert r.code in expected, (case, r.code, r.out, r.err)
        assert one_clean_line(r.err), (case, r.err)
        if case == "bad-fence-timeout":
            assert "fence_timeout" in r.err
        if case == "unknown-coordination-key":
            assert "fence_comand" in r.err
        if case in ("promote-zk-down", "rejoin-zk-down"):
            assert "ZooKeeper" in r.err
    finally:
        g.stop_all()

