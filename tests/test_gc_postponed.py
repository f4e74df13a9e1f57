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


def _gate(tmp: Path) -> Path:
    pause = tmp / "pause"
    pause.mkdir()
    (pause / "gc-mark").touch()
    return pause


def test_expire_reports_a_postponed_collection_and_the_command_warns(tmp_path: Path) -> None:
    data, url = tmp_path / "data", str(tmp_path / "repo")
    repo = Repository.init(open_storage(url), cluster_id="c", release="1")
    _two_snapshots(data, repo)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{url}"\n'
                   f'[agent]\nname = "a"\n[snapshots]\nkeep = {{ last = 1 }}\n')
    pause = _gate(tmp_path)
    env = {"DRSYNC_FAULT_PAUSE": str(pause), "DRSYNC_LOCK_WAIT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "expire", "--config", str(cfg), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        wait_for(lambda: (pause / "gc-mark.reached").exists() or proc.poll() is not None, "the collection's mark", 60)
        assert proc.poll() is None, proc.communicate()
        held = repo.lock(exclusive=False, wait_s=0).acquire()  # another process's capture, say
        try:
            (pause / "gc-mark").unlink()
            out, err = proc.communicate(timeout=120)
        finally:
            held.release()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
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
    monkeypatch.setenv("DRSYNC_FAULT_PAUSE", str(_gate(tmp_path)))
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
