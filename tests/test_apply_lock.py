"""One apply at a time onto a target (safety rule 2): a second restore onto a target another is writing to,
or onto a directory inside or around it, through another spelling, a symlink, a bind mount or another lock
directory, is refused at once with the other's pid, and changes nothing; the first completes exactly.

The first restore is a real process held still at the ``apply-staged`` pause point (drsync.faults: its
files staged and flushed, no journal yet), as a restore of a huge snapshot would be; the others run
while it is held. Before the lock, the second emptied the first's staging area and the first failed,
leaving a target that matched neither snapshot (breaker s51).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.errors import OperationFailed
from drsync.flocks import ApplyBusy, ApplyLock
from tests.conftest import init_repo_at, make_tree, run_drsync, snapshot_json, tree_state, write_files
from tests.group import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Held:
    """A restore process held at ``apply-staged``: started, and waited for until it is there."""

    def __init__(self, tmp: Path, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
        self.gates = tmp / f"gates-{len(list(tmp.glob('gates-*')))}"
        self.gates.mkdir()
        (self.gates / "apply-staged").write_text("")
        self.proc = subprocess.Popen([sys.executable, "-m", "drsync", *map(str, args)], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {}), "DRSYNC_FAULT_PAUSE": str(self.gates)})
        wait_for(lambda: (self.gates / "apply-staged.reached").exists() or self.proc.poll() is not None,
                 "the first restore to stage its files")
        assert self.proc.poll() is None, self.proc.communicate()

    def finish(self) -> tuple[int, str]:
        (self.gates / "apply-staged").unlink()
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A repository with two snapshots of one tree: (repository, first id, second id)."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    init_repo_at(repo, "east", "6.2.1")
    make_tree(src, files=20, big=1)
    first = snapshot_json(repo, src)["id"]
    write_files(src, {"catalog/f000.txt": "the second version\n", "new/only-in-second.txt": "new\n"})
    (src / "catalog" / "f001.txt").unlink()
    second = snapshot_json(repo, src)["id"]
    yield repo, first, second


def _restore(repo: Path, snap: str, target: Path | str, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target, "--overwrite",
                      "--delete-extra", *extra, env=env)


def _expected(tmp: Path, repo: Path, snap: str) -> dict[str, tuple]:
    ref = tmp / f"ref-{snap}"
    if not ref.exists():
        assert _restore(repo, snap, ref).code == 0
    return tree_state(ref)


def test_a_second_restore_onto_a_target_being_restored_is_refused_and_the_first_completes(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    want = _expected(tmp_path, repo, second)
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    try:
        staged_before = sorted(p.name for p in (target / ".drsync-staging").rglob("*"))
        assert staged_before, "the first restore stages into the target"
        # the same target, spelled three ways: as given, with a trailing "/.", through a symlink
        link = tmp_path / "link-to-target"
        link.symlink_to(target)
        for spelled in (target, f"{target}/.", link):
            r = _restore(repo, first, spelled)
            assert r.code == 1, (spelled, r.code, r.err)
            assert f"pid {held.proc.pid}" in r.err and "another drsync apply" in r.err, r.err
            assert "nothing was changed" in r.err and "Traceback" not in r.err
            assert len(r.err.strip().splitlines()) == 1, r.err
        # nothing of the first's staging area was touched
        assert sorted(p.name for p in (target / ".drsync-staging").rglob("*")) == staged_before
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == want
    assert not (target / ".drsync-staging").exists()
    # the lock is gone with the apply: the next restore goes ahead
    assert _restore(repo, first, target).code == 0
    assert tree_state(target) == _expected(tmp_path, repo, first)


def test_restores_inside_or_around_a_target_being_restored_are_refused_and_others_go_ahead(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    outer = tmp_path / "outer"
    target = outer / "target"
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target)
    try:
        for other, word in ((target / "catalog", "lies inside"), (target / "not-yet" / "deeper", "lies inside"),
                            (outer, "holds"), (tmp_path, "holds")):
            r = _restore(repo, first, other)
            assert r.code == 1, (other, r.err)
            assert word in r.err and f"pid {held.proc.pid}" in r.err, r.err
        assert not (target / "not-yet").exists() and sorted(os.listdir(outer)) == ["target"]
        # a sibling is another target: it goes ahead while the first is held
        sibling = tmp_path / "sibling"
        assert _restore(repo, first, sibling).code == 0
        assert tree_state(sibling) == _expected(tmp_path, repo, first)
        # a dry run is not refused: it says another apply is writing there
        dry = _restore(repo, first, target, "--dry-run", "--json")
        assert dry.code == 0, dry.err
        assert any("another drsync apply" in w and str(held.proc.pid) in w for w in dry.json()["warnings"]), dry.out
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_another_lock_directory_or_a_backup_restore_is_refused_by_the_directory_itself(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    """A restore whose host lock directory is another (a container, a systemd unit's own /run/lock, another
    DRSYNC_LOCK_DIR) still finds the target directory flocked; so does a backup restore (every apply path)."""
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    backup = tmp_path / "backup"
    assert run_drsync("backup", "create", "--snapshot", first, "--repo", repo, "--dest", backup).code == 0
    backups = [p for p in backup.iterdir() if p.is_dir()]
    assert len(backups) == 1
    elsewhere = tmp_path / "other-lock-dir"
    elsewhere.mkdir()
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    try:
        r = _restore(repo, first, target, env={"DRSYNC_LOCK_DIR": str(elsewhere)})
        assert r.code == 1 and f"pid {held.proc.pid}" in r.err and "holds" in r.err, r.err
        r = run_drsync("backup", "restore", backups[0], "--target", target, "--overwrite", "--delete-extra")
        assert r.code == 1 and f"pid {held.proc.pid}" in r.err and "another drsync apply" in r.err, r.err
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_a_restore_killed_while_it_holds_the_lock_leaves_no_lock_and_the_next_completes_it(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    held.kill()
    assert held.proc.returncode == -signal.SIGKILL
    r = _restore(repo, second, target)
    assert r.code == 0, r.err
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_an_agent_is_not_started_on_a_root_a_restore_is_writing_to(tmp_path: Path,
                                                                   two: tuple[Path, str, str]) -> None:
    """The agent's data-root lock and the apply's directory flock are one flock: whichever comes second is
    refused, naming the other's pid."""
    from drsync.agent.locks import HostLock

    repo, first, _second = two
    target = tmp_path / "target"
    held = Held(tmp_path, "snapshot", "restore", first, "--repo", repo, "--target", target)
    try:
        with pytest.raises(OperationFailed, match=f"pid {held.proc.pid}.*or a restore is writing to it"):
            HostLock("data root", str(target), str(tmp_path / "state"))
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    lock = HostLock("data root", str(target), str(tmp_path / "state"))
    try:
        r = run_drsync("snapshot", "restore", first, "--repo", repo, "--target", target, "--overwrite")
        assert r.code == 1 and f"pid {os.getpid()}" in r.err, r.err
    finally:
        lock.release()


def test_the_apply_lock_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ApplyLock itself: one holder per location, overlaps refused both ways, a released lock leaves no file,
    and an agent's own apply (directory=False) beside its directory lock."""
    from drsync.agent.locks import DirectoryLock

    locks = tmp_path / "locks"
    locks.mkdir()
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(locks))
    a = tmp_path / "a"
    a.mkdir()
    with ApplyLock(str(a), "snapshot one") as held:
        assert held.dir_fd >= 0
        for other in (a, a / "x" / "y", tmp_path):
            with pytest.raises(ApplyBusy, match="snapshot one"):
                ApplyLock(str(other), "snapshot two")
        with ApplyLock(str(tmp_path / "b"), "snapshot three"):
            pass
    assert os.listdir(locks) == []
    root = DirectoryLock("data root", str(a))
    try:
        with pytest.raises(ApplyBusy, match=f"pid {os.getpid()}"):
            ApplyLock(str(a), "a restore")
        with ApplyLock(str(a), "the agent's apply", directory=False):
            pass
    finally:
        root.release()
    # names no UTF-8 decoder accepts lock like any other
    odd = tmp_path / os.fsdecode(b"odd-\xff-name")
    odd.mkdir()
    with ApplyLock(str(odd), "snapshot four"), pytest.raises(ApplyBusy):
        ApplyLock(str(odd / "in"), "snapshot five")
    shutil.rmtree(odd)
    # HDFS targets: by path on one authority (one host's applies; the lock file alone)
    with ApplyLock("hdfs://nn1:9870/warehouse/t?user=etl", "snapshot six") as held:
        assert held.dir_fd == -1
        for other in ("hdfs://nn1:9870/warehouse/t/part", "hdfs://nn1:9870/warehouse"):
            with pytest.raises(ApplyBusy, match="snapshot six"):
                ApplyLock(other, "snapshot seven")
        with ApplyLock("hdfs://nn2:9870/warehouse/t", "snapshot eight"):
            pass
