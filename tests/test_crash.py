"""Crash safety: cut every write sequence at every step and check what survives.

The in-memory storage models a power cut exactly: whatever was not made
durable is lost. Each trial stops an operation at its N-th storage mutation,
"crashes", reopens the repository and checks that every listed snapshot is
whole, then that a normal run of the operation completes. A subprocess
kill -9 trial does the same against real files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from drsync import engine
from drsync.repository.lock import remove_locks
from drsync.repository.repo import Repository
from drsync.storage import StoredObject
from drsync.storage.memory import MemoryStorage
from tests.conftest import age_tree, init_repo_at, make_tree, run_drsync

TRIALS = int(os.environ.get("DRSYNC_CRASH_TRIALS", "3"))


class SimulatedCrash(BaseException):
    """Raised instead of a storage mutation: the process 'dies' here."""


class CrashingStorage:
    """Delegates to a MemoryStorage and dies at the ``crash_at``-th mutation."""

    def __init__(self, inner: MemoryStorage, crash_at: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.crash_at = crash_at
        self.mutations = 0

    def _tick(self) -> None:
        self.mutations += 1
        if self.mutations == self.crash_at:
            raise SimulatedCrash(self.mutations)

    def read(self, name: str) -> bytes:
        return self.inner.read(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.read_range(name, offset, length)

    def write(self, name: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None:
        self._tick()
        self.inner.write(name, data, durable=durable, exclusive=exclusive)

    def writer(self, name: str):  # type: ignore[no-untyped-def]
        outer = self
        w = self.inner.writer(name)

        class _W:
            size = property(lambda self: w.size)

            def write(self, data):  # type: ignore[no-untyped-def]
                w.write(data)

            def commit(self, *, durable: bool = True) -> None:
                outer._tick()
                w.commit(durable=durable)

            def abort(self) -> None:
                w.abort()

        return _W()

    def delete(self, name: str) -> None:
        self._tick()
        self.inner.delete(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def touch(self, name: str) -> None:  # a lock's refresh: its time only, no data (never a crash point)
        self.inner.touch(name)

    def list(self, prefix: str = "") -> list[StoredObject]:
        return self.inner.list(prefix)

    def sync(self, names: Iterable[str]) -> None:
        self._tick()
        self.inner.sync(names)

    def close(self) -> None:
        pass


def assert_whole(storage: MemoryStorage) -> list[str]:
    """Every snapshot the repository lists is complete and verified. Returns their ids."""
    repo = Repository.open(storage)
    report = repo.verify()
    assert not report.damaged_files, report.damaged_files
    assert not [p for p in report.problems if "manifest" in p], report.problems
    for s in repo.list_snapshots():
        m = repo.load_manifest(s)
        for cid in m.chunk_ids():
            repo.read_chunk(cid)
    return [s.id for s in repo.list_snapshots()]


def run_until_done(base: MemoryStorage, op: Callable[[Repository], object],
                   check: Callable[[list[str]], None]) -> int:
    """Crash ``op`` at mutation 1, 2, 3, ... until it completes; check each aftermath."""
    n = 1
    while True:
        trial = base.clone()
        crashing = CrashingStorage(trial, n)
        try:
            op(Repository.open(crashing))  # type: ignore[arg-type]
        except SimulatedCrash:
            trial.crash()
            remove_locks(trial, all_locks=True)  # the process that held them is dead
            check(assert_whole(trial))
            # After the crash, the next normal run finishes the job and leaves a clean repository.
            op(Repository.open(trial))
            check(assert_whole(trial))
            gc = Repository.open(trial).gc()
            assert gc.dead_chunks == 0 or gc.freed_bytes >= 0
            assert_whole(trial)
            n += 1
            continue
        check(assert_whole(trial))
        return n


@pytest.fixture
def three_snapshots(tmp_path: Path) -> tuple[MemoryStorage, list[str], Path]:
    storage = MemoryStorage()
    repo = Repository.init(storage, cluster_id="east", release="1")
    data = tmp_path / "data"
    make_tree(data, files=10, big=2)
    age_tree(data)
    ids = [engine.create_snapshot(repo, engine.SnapshotRequest(str(data))).id]
    (data / "tables" / "orders" / "part-0.bin").write_bytes(os.urandom(2_000_000))
    ids.append(engine.create_snapshot(repo, engine.SnapshotRequest(str(data))).id)
    (data / "tables" / "orders" / "part-1.bin").write_bytes(os.urandom(1_500_000))
    (data / "catalog" / "f003.txt").unlink()
    ids.append(engine.create_snapshot(repo, engine.SnapshotRequest(str(data))).id)
    return storage, ids, data


def test_crash_at_every_step_of_delete_and_gc(three_snapshots) -> None:  # type: ignore[no-untyped-def]
    storage, (s1, s2, s3), _ = three_snapshots

    def op(repo: Repository) -> None:
        if any(s.id == s2 for s in repo.list_snapshots()):
            engine.delete_snapshots(repo, [s2])
        else:
            engine.gc_repository(repo)

    def check(ids: list[str]) -> None:
        assert s1 in ids and s3 in ids
        assert set(ids) <= {s1, s2, s3}

    steps = run_until_done(storage, op, check)
    assert steps > 4  # the scenario really was cut at several points


def test_crash_at_every_step_of_snapshot_create(three_snapshots) -> None:  # type: ignore[no-untyped-def]
    storage, ids, data = three_snapshots
    (data / "catalog" / "fresh.bin").write_bytes(os.urandom(3_000_000))

    def op(repo: Repository) -> None:
        engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))

    def check(listed: list[str]) -> None:
        assert set(ids) <= set(listed)

    assert run_until_done(storage, op, check) > 3


def test_kill_9_during_snapshot_create_and_delete(tmp_path: Path) -> None:
    """Real processes, real files: kill -9 at several moments; the repository stays whole."""
    data = tmp_path / "data"
    make_tree(data, files=50, big=12)
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "c", "1")
    first = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert first.code == 0, first.err
    keep_id = first.json()["id"]
    for trial in range(TRIALS):
        (data / "tables" / "orders" / f"grow-{trial}.bin").write_bytes(os.urandom(24 << 20))
        for action in ("create", "delete"):
            if action == "create":
                args = ["snapshot", "create", "--source", str(data)]
            else:
                others = [s["id"] for s in run_drsync("snapshot", "list", "--repo", repo, "--json").json()
                          if s["id"] != keep_id]
                if trial % 2 == 0 or not others:
                    continue
                args = ["snapshot", "delete", others[-1]]
            proc = subprocess.Popen([sys.executable, "-m", "drsync", *args, "--repo", repo],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = 0.05 + 0.15 * ((trial * 7) % 5)  # kill at different moments
            deadline = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            verify = run_drsync("repo", "verify", "--repo", repo, "--json")
            assert verify.code == 0, verify.out + verify.err
            listed = run_drsync("snapshot", "list", "--repo", repo, "--json").json()
            assert keep_id in [s["id"] for s in listed]
    restore = run_drsync("snapshot", "restore", keep_id, "--repo", repo, "--target", tmp_path / "out")
    assert restore.code == 0, restore.err
    gc = run_drsync("repo", "gc", "--repo", repo, "--json")
    assert gc.code == 0, gc.err
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
