"""A garbage collection that cannot have its lock after an expiry: the snapshots stay deleted, the
result says why the collection waits, and each caller reports it at its own level: ``snapshot expire``
warns the operator (who can run ``repo gc``), the agent (which retries within minutes, and whose own
capture or shipment is the usual holder) logs INFO and never WARNING.

The lock is taken between the expiry's deletions and the collection's sweep: the collection is held at
its pause point ``gc-mark`` (drsync.faults) while a shared lock is taken, as an agent's capture would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from drsync import engine
from drsync.config import KeepPolicy
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import make_tree
from tests.group import wait_for
from tests.test_breaker_s38 import Maint


def _two_snapshots(data: Path, repo: Repository) -> None:
    make_tree(data, files=4, big=0)
    engine.create_snapshot(repo, engine.SnapshotRequest(str(data), kind="cycle"))
    (data / "catalog" / "new.txt").write_text("the second snapshot differs")
    engine.create_snapshot(repo, engine.SnapshotRequest(str(data), kind="cycle"))


def spawn(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "drsync", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def gate(tmp: Path, name: str, point: str) -> Path:
    pause = tmp / name
    pause.mkdir()
    (pause / point).touch()
    return pause


def wait_reached(pause: Path, point: str, proc: subprocess.Popen[str]) -> None:
    wait_for(lambda: (pause / f"{point}.reached").exists() or proc.poll() is not None, f"pause point {point}", 60)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"exited {proc.returncode} before {point}: {out} {err}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def collect_under_a_held_lock(proc: subprocess.Popen[str], pause: Path, repo: Repository) -> tuple[int, str, str]:
    """Once ``proc`` waits at ``gc-mark``, take the repository's shared lock (this process: another
    operation's), let the collection go on to its sweep, and finish ``proc`` (code, stdout, stderr)."""
    try:
        wait_reached(pause, "gc-mark", proc)
        held = repo.lock(exclusive=False, wait_s=0).acquire()
        try:
            (pause / "gc-mark").unlink()
            return finish(proc)
        finally:
            held.release()
    finally:
        (pause / "gc-mark").unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()


def test_expire_reports_a_postponed_collection_and_the_command_warns(tmp_path: Path) -> None:
    data, url = tmp_path / "data", str(tmp_path / "repo")
    repo = Repository.init(open_storage(url), cluster_id="c", release="1")
    _two_snapshots(data, repo)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{url}"\n'
                   f'[agent]\nname = "a"\n[snapshots]\nkeep = {{ last = 1 }}\n')
    pause = gate(tmp_path, "pause", "gc-mark")
    proc = spawn("snapshot", "expire", "--config", cfg, "--json",
                 env={"DRSYNC_FAULT_PAUSE": str(pause), "DRSYNC_LOCK_WAIT": "0"})
    code, out, err = collect_under_a_held_lock(proc, pause, repo)  # another process's capture, say
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["deleted"]) == 1 and doc["gc"] is None
    assert "is locked" in doc["gc_postponed"]
    assert "warning: garbage collection postponed" in err and "drsync repo gc" in err, err
    assert len(repo.list_snapshots()) == 1  # the deletion stands


def test_the_agent_logs_a_postponed_collection_at_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    m = Maint(tmp_path)
    m.snap()
    m.snap()
    monkeypatch.setenv("DRSYNC_FAULT_PAUSE", str(gate(tmp_path, "pause", "gc-mark")))
    worker = m.open()
    caplog.set_level(logging.DEBUG, logger="drsync")
    t = threading.Thread(target=worker.run_pass)
    t.start()
    wait_for(lambda: (tmp_path / "pause" / "gc-mark.reached").exists() or not t.is_alive(), "the collection's mark", 60)
    assert t.is_alive(), "the pass collected without pausing at gc-mark"
    held = m.repo.lock(exclusive=False, wait_s=0).acquire()  # as the agent's own capture holds it
    try:
        (tmp_path / "pause" / "gc-mark").unlink()
        t.join(120)
    finally:
        held.release()
    assert not t.is_alive()
    assert m.snapshots() == 1
    postponed = [r for r in caplog.records if "postponed" in r.getMessage()]
    assert postponed and all(r.levelno == logging.INFO for r in postponed), [(r.levelname, r.getMessage())
                                                                            for r in postponed]
    # The pause point's own records (drsync.faults) are the trial's, not the agent's.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "drsync.faults"], caplog.text


def test_expire_without_contention_collects_and_postpones_nothing(tmp_path: Path) -> None:
    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    _two_snapshots(tmp_path / "data", repo)
    res = engine.expire_snapshots(repo, KeepPolicy(last=1))
    assert len(res.deleted) == 1 and res.gc is not None and res.gc_postponed == ""
