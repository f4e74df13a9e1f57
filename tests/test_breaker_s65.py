"""Breaker s65: early upload (drsync.agent.early) and apply lock leftovers (drsync.flocks), attacked with real
agent processes, real lock files and real killed processes.

Fault points are drsync's own (DRSYNC_FAULT_PAUSE, ``snapshot-commit``: the capture's chunks are stored and
flushed, the early stream still open, the snapshot not committed yet).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drsync.flocks import ApplyBusy, ApplyLock
from tests.conftest import SLOW, make_tree, run_drsync, tree_state
from tests.group import wait_for
from tests.test_bandwidth_agents import Agents, agents  # noqa: F401  (the fixture)

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


# --- helpers ----------------------------------------------------------------------------------------------------

def _pair(agents: Agents, big: int = 6, extra: str = "") -> Path:  # noqa: F811
    agents.configure("standby", "standby")
    make_tree(agents.data("primary"), files=10, big=big)
    cfg = agents.configure("primary", "primary", f'[replication]\nstandbys = ["{agents.addr["standby"]}"]\n{extra}')
    agents.start("standby")
    return cfg


def _once_proc(cfg: Path, pause: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "DRSYNC_FAULT_PAUSE": str(pause)}
    return subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg), "--once", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _paused_at_commit(tmp: Path, cfg: Path) -> tuple[subprocess.Popen[str], Path]:
    pause = tmp / "pause"
    pause.mkdir(exist_ok=True)
    gate = pause / "snapshot-commit"
    gate.write_text("")
    proc = _once_proc(cfg, pause)
    wait_for(lambda: (pause / "snapshot-commit.reached").exists() or proc.poll() is not None,
             "the capture to reach its commit")
    assert proc.poll() is None, proc.communicate()
    return proc, gate


def _packs(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if p.is_file() and "pack" in str(p.parent)]


def _stored_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in _packs(repo))


def _verify(agents: Agents, name: str) -> None:  # noqa: F811
    r = run_drsync("repo", "verify", "--config", agents.cfg[name])
    assert r.code == 0, r.out + r.err


def _once(cfg: Path) -> dict[str, dict[str, float]]:
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code == 0, r.out + r.err
    return r.json()["results"]


def _kill(agents: Agents, name: str) -> None:  # noqa: F811
    p = agents.procs.pop(name)
    p.kill()
    p.wait(timeout=30 * SLOW)


# --- early upload: a standby killed while the early stream is open -----------------------------------------------

def _killed_with_early_chunks_there(agents: Agents, tmp_path: Path) -> tuple[Path, subprocess.Popen[str], Path]:  # noqa: F811
    """A cycle held at its commit once part of its early stream is stored at the standby, which is then
    SIGKILLed: (primary config, the cycle's process, its pause gate)."""
    cfg = _pair(agents)
    proc, gate = _paused_at_commit(tmp_path, cfg)
    # The early stream had the whole capture to send 18 MiB: some of it is at the standby now.
    wait_for(lambda: _stored_bytes(tmp_path / "standby-repo") >= 3 * MiB, "early chunks at the standby")
    _kill(agents, "standby")
    return cfg, proc, gate


def test_standby_killed_and_restarted_during_the_capture_loses_nothing_and_figures_stay_near_the_truth(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    _, proc, gate = _killed_with_early_chunks_there(agents, tmp_path)
    agents.start("standby")
    gate.unlink()
    out, err = proc.communicate(timeout=120 * SLOW)
    assert proc.returncode == 0, out + err
    res = json.loads(out)["results"][agents.addr["standby"]]
    wait_for(lambda: tree_state(agents.data("standby")) == tree_state(agents.data("primary")), "standby synced")
    _verify(agents, "standby")
    _verify(agents, "primary")
    total = 6 * 3 * MiB
    # Random data does not compress: what crossed the link is between the tree's size and twice it.
    assert total * 0.9 <= res["shipped_bytes"] <= 2 * total, res


def test_standby_sigkilled_mid_stream_then_back_the_next_cycle_still_ships_everything(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    cfg, proc, gate = _killed_with_early_chunks_there(agents, tmp_path)
    gate.unlink()
    proc.communicate(timeout=180 * SLOW)
    assert proc.returncode != 0  # the shipment found no standby
    agents.start("standby")
    res = _once(cfg)[agents.addr["standby"]]
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary")), res
    _verify(agents, "standby")
    _verify(agents, "primary")


# --- early upload: chunks sent but never committed ----------------------------------------------------------------

def test_primary_killed_mid_capture_leaves_the_standby_unapplied_verifiable_and_the_next_cycle_works(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    cfg = _pair(agents)
    proc, gate = _paused_at_commit(tmp_path, cfg)
    wait_for(lambda: _stored_bytes(tmp_path / "standby-repo") >= 3 * MiB, "early chunks at the standby")
    proc.kill()
    proc.communicate(timeout=30 * SLOW)
    gate.unlink()
    assert agents.applied("standby") == ""  # nothing applied from chunks alone
    assert not any((agents.data("standby")).iterdir()) or tree_state(agents.data("standby")) != \
        tree_state(agents.data("primary"))
    _verify(agents, "standby")
    res = _once(cfg)[agents.addr["standby"]]
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary")), res
    _verify(agents, "standby")
    _verify(agents, "primary")


def _failing_hook(tmp: Path, kind: str) -> tuple[Path, str]:
    """A ``kind`` ("pre" or "post") snapshot hook that fails while its flag file exists: (flag, config text)."""
    flag = tmp / "hook-fails"
    flag.write_text("")
    hook = tmp / f"{kind}.sh"
    hook.write_text(f"#!/bin/sh\ntest -e {flag} && exit 3\nexit 0\n")
    hook.chmod(0o755)
    return flag, f'[snapshots]\n{kind}_hook = "{hook}"\n'


def test_a_failing_post_snapshot_hook_applies_nothing_and_the_next_cycle_ships(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    flag, extra = _failing_hook(tmp_path, "post")
    cfg = _pair(agents, extra=extra)
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code != 0, r.out
    assert agents.applied("standby") == ""
    _verify(agents, "standby")
    flag.unlink()
    res = _once(cfg)[agents.addr["standby"]]  # the shipper's lock was released by the failed capture
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary")), res
    _verify(agents, "standby")


def test_a_failing_pre_snapshot_hook_sends_nothing_and_releases_the_shipper(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    flag, extra = _failing_hook(tmp_path, "pre")
    cfg = _pair(agents, extra=extra)
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code != 0, r.out
    assert _packs(tmp_path / "standby-repo") == []
    flag.unlink()
    res = _once(cfg)[agents.addr["standby"]]
    assert res["early_chunks"] >= 6, res
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary")), res


def test_a_long_running_agent_keeps_cycling_with_early_uploads(agents: Agents) -> None:  # noqa: F811
    cfg = _pair(agents, big=3, extra='interval = "1s"\n')
    assert cfg.exists()
    agents.start("primary")
    first = wait_for(lambda: agents.synced("primary", "standby"), "the first sync")
    (agents.data("primary") / "tables" / "later.bin").write_bytes(os.urandom(4 * MiB))
    wait_for(lambda: agents.synced("primary", "standby", after=first), "the later big file to arrive")
    (agents.data("primary") / "tables" / "later2.bin").write_bytes(os.urandom(4 * MiB))
    wait_for(lambda: tree_state(agents.data("standby")) == tree_state(agents.data("primary")), "a third cycle")
    agents.stop("primary")
    _verify(agents, "standby")


# --- apply lock leftovers -----------------------------------------------------------------------------------------

_HOLDER = """
import os, sys
os.environ["DRSYNC_LOCK_DIR"] = sys.argv[1]
from drsync.flocks import ApplyLock
lock = ApplyLock(sys.argv[2], "snapshot held", directory=False)
print(lock.path, flush=True)
sys.stdin.read()
"""


def _holder(lock_dir: Path, location: Path) -> tuple[subprocess.Popen[str], Path]:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_dir), str(location)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout is not None
    return p, Path(p.stdout.readline().strip())


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "locks"
    d.mkdir()
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(d))
    return d


def test_a_killed_applys_leftover_goes_a_held_one_stays_a_probe_clears_nothing(
        lock_dir: Path, tmp_path: Path) -> None:
    for n in ("dead", "live", "mine", "other-user"):
        (tmp_path / n).mkdir()
    live, held = _holder(lock_dir, tmp_path / "live")
    dead, leftover = _holder(lock_dir, tmp_path / "dead")  # (an apply that takes its lock clears leftovers)
    dead.kill()
    dead.wait()
    foreign = lock_dir / f"{ApplyLock.PREFIX}{os.geteuid() + 4242}-0123456789abcdef0123.lock"
    foreign.write_text("1\nsnapshot x\n/elsewhere\n")
    if os.geteuid() == 0:
        os.chown(foreign, os.geteuid() + 4242, -1)
    try:
        assert leftover.exists() and held.exists()
        assert ApplyLock.probe(str(tmp_path / "mine")) is None  # a dry run's look: clears nothing
        assert leftover.exists()
        with ApplyLock(str(tmp_path / "mine"), "snapshot mine", directory=False):
            assert not leftover.exists()  # the killed apply's leftover went
            assert held.exists()  # a held one stays
            assert foreign.exists()  # another user's stays
        with pytest.raises(ApplyBusy):
            ApplyLock(str(tmp_path / "live"), "snapshot second", directory=False)
        assert held.exists()
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait()


_CLEARER = """
import os, sys, hashlib
os.environ["DRSYNC_LOCK_DIR"] = sys.argv[1]
from drsync.flocks import ApplyLock
victim, mine, stop = sys.argv[2], sys.argv[3], sys.argv[4]
key = hashlib.sha256(os.path.realpath(victim).encode()).hexdigest()[:20]
leftover = os.path.join(sys.argv[1], f"{ApplyLock.PREFIX}{os.geteuid()}-{key}.lock")
while not os.path.exists(stop):
    try:  # a killed apply's leftover for the victim's location, as it leaves it
        fd = os.open(leftover, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, f"999999\\nsnapshot killed\\n{victim}\\n".encode())
        os.close(fd)
    except FileExistsError:
        pass
    with ApplyLock(mine, "snapshot elsewhere", directory=False):  # clears the leftover
        pass
"""


# Found by breaker s65 as a regression of 400a048 (32 refusals in 7,700 tries, naming the dead pid): an apply
# clearing another location's leftover holds its flock until its unlink; an apply onto that location opening
# the leftover then failed its flock and was refused. Fixed: the flock is retried for a moment (_flock_soon).
def test_an_apply_is_never_refused_by_a_leftover_being_cleared_by_an_unrelated_apply(
        lock_dir: Path, tmp_path: Path) -> None:
    victim, mine, stop = tmp_path / "victim", tmp_path / "unrelated", tmp_path / "stop"
    victim.mkdir()
    mine.mkdir()
    clearers = [subprocess.Popen([sys.executable, "-c", _CLEARER, str(lock_dir), str(victim), str(mine) + str(i),
                                  str(stop)], cwd=ROOT) for i in range(2)]
    refusals: list[str] = []
    try:
        deadline = time.monotonic() + 10 * SLOW
        while time.monotonic() < deadline and not refusals:
            try:
                with ApplyLock(str(victim), "snapshot now", directory=False):
                    pass
            except ApplyBusy as e:
                refusals.append(str(e))
    finally:
        stop.write_text("")
        for c in clearers:
            c.wait(timeout=30)
    assert refusals == []


_OVERLAPPER = """
import os, sys, time
os.environ["DRSYNC_LOCK_DIR"] = sys.argv[1]
from drsync.flocks import ApplyBusy, ApplyLock
loc, marks, stop = sys.argv[2], sys.argv[3], sys.argv[4]
held = both = 0
while not os.path.exists(stop):
    try:
        with ApplyLock(loc, "snapshot " + loc, directory=False):
            held += 1
            try:  # only one apply of the overlapping ones may be here at a time
                os.close(os.open(os.path.join(marks, "in"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.unlink(os.path.join(marks, "in"))
            except FileExistsError:
                both += 1
    except ApplyBusy:
        pass
print(held, both)
"""


def test_overlapping_applies_stay_exclusive_while_leftovers_are_cleared(lock_dir: Path, tmp_path: Path) -> None:
    outer, inner, other, marks, own, stop = (tmp_path / n for n in ("t", "t/sub", "other", "marks", "own", "stop"))
    for d in (inner, other, marks, own):
        d.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", _OVERLAPPER, str(lock_dir), str(loc), str(m), str(stop)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for loc, m in ((outer, marks), (inner, marks), (outer, marks), (other, own))]
    # killed applies' leftovers planted for all of them while they run (some thousands of locks taken)
    def leftover(loc: Path) -> Path:
        key = hashlib.sha256(os.path.realpath(loc).encode()).hexdigest()[:20]
        return lock_dir / f"{ApplyLock.PREFIX}{os.geteuid()}-{key}.lock"

    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            for loc in (outer, inner, other):
                try:
                    fd = os.open(leftover(loc), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(fd, f"999999\nsnapshot killed\n{loc}\n".encode())
                    os.close(fd)
                except FileExistsError:
                    pass
    finally:
        stop.write_text("")
        results = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(r[0] > 0 for r in results), results
    assert sum(r[1] for r in results[:3]) == 0, results  # never two of outer/inner/outer at once
