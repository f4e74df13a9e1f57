"""Capturing a live data root: files changing under us, hooks, special files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from drsync import engine
from drsync.errors import OperationFailed
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage


@pytest.fixture
def repo() -> Repository:
    return Repository.init(MemoryStorage(), cluster_id="c", release="1")


def test_file_changing_while_read_is_retried_then_reported(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    hot = data / "hot.log"
    hot.write_bytes(os.urandom(40 << 20))
    (data / "calm.txt").write_text("still")
    stop = threading.Event()
    started = threading.Event()

    def writer() -> None:
        with open(hot, "ab", buffering=0) as f:
            while not stop.is_set():
                f.write(b"x" * 512)
                started.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert started.wait(10)
        info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data), reread_attempts=2))
    finally:
        stop.set()
        t.join()
    assert any(w.startswith("hot.log: changed while being read (3 attempts)") for w in info.warnings)
    assert not any(w.startswith("calm.txt") for w in info.warnings)
    # The snapshot is still complete and readable.
    m = repo.load_manifest(info)
    assert {e.path for e in m.entries()} == {"hot.log", "calm.txt"}


def test_a_file_that_settles_is_captured_without_warning(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"a" * 1000)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert info.warnings == [] and info.files == 1 and info.bytes == 1000


def test_pre_and_post_hooks_run_around_the_capture(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "hooks.log"
    hooks = engine.Hooks(pre=f'echo "pre $DRSYNC_DATA" >> {log}; touch {data}/frozen',
                         post=f"echo post >> {log}; rm {data}/frozen")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data), hooks=hooks))
    assert log.read_text().splitlines() == [f"pre {data}", "post"]
    # The pre hook ran before the capture: its marker is in the snapshot; the post hook removed it after.
    assert [e.path for e in repo.load_manifest(info).entries()] == ["frozen"]
    assert not (data / "frozen").exists()


def test_failing_pre_hook_takes_no_snapshot(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    hooks = engine.Hooks(pre="echo cannot quiesce >&2; exit 7")
    with pytest.raises(OperationFailed, match="pre-snapshot hook .* exited with 7: cannot quiesce"):
        engine.create_snapshot(repo, engine.SnapshotRequest(str(data), hooks=hooks))
    assert repo.list_snapshots() == []


def test_failing_post_hook_is_reported_but_snapshot_kept(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    hooks = engine.Hooks(post="exit 3")
    with pytest.raises(OperationFailed, match=r"snapshot \w+ was taken, but post-snapshot hook"):
        engine.create_snapshot(repo, engine.SnapshotRequest(str(data), hooks=hooks))
    assert len(repo.list_snapshots()) == 1


def test_hook_timeout(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    hooks = engine.Hooks(pre="sleep 5", timeout_s=0.2)
    with pytest.raises(OperationFailed, match="did not finish within"):
        engine.create_snapshot(repo, engine.SnapshotRequest(str(data), hooks=hooks))


def test_special_files_and_escaping_links_are_skipped_with_warnings(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "pipe")
    os.symlink("/etc/passwd", data / "abs-link")
    os.symlink("../../outside", data / "rel-link")
    os.symlink("inside", data / "ok-link")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    paths = [e.path for e in repo.load_manifest(info).entries()]
    assert paths == ["ok-link"]
    assert len(info.warnings) == 3 and any("pipe: special file" in w for w in info.warnings)


def test_hooks_from_config_via_cli(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "data").mkdir()
    marker = tmp_path / "pre-ran"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nid="c"\nrelease="1"\ndata="data"\nrepository="repo"\n'
                   f'[snapshots]\npre_hook = "touch {marker}"\npost_hook = "exit 9"\n')
    assert drsync("init", "--config", cfg).code == 0
    r = drsync("snapshot", "create", "--config", cfg)
    assert marker.exists()
    assert r.code == 1 and "post-snapshot hook" in r.err and "exited with 9" in r.err
