"""Garbage collection next to writers (issue 15, item 1): GC never deletes what a writer is writing.

A standby receives chunks (Upload) and only later the snapshot naming them (Commit). These tests
run GC between the two, in another process or another Repository object, on every storage
backend, and check that the committed snapshot is whole, that a cached index never claims a
chunk another process's GC deleted, that GC's mark does not block writers, and that a crash at
any step of a GC that overlaps a commit leaves a repository that verifies.
Orderings come from events (a log line of the GC process, a gate in a storage read), never sleeps.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from drsync import engine
from drsync.errors import IntegrityError, UsageError
from drsync.repository import format as fmt
from drsync.repository.lock import remove_locks
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage import Storage, StoredObject, open_storage
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import age_tree, make_tree
from tests.test_crash import CrashingStorage, SimulatedCrash, assert_whole

if TYPE_CHECKING:
    from drsync.repository.repo import WriteSession

ROOT = Path(__file__).resolve().parent.parent
SWEEP_LINE = "sweeping under the exclusive lock"
# The GC process logs at INFO (the CLI alone logs errors only), so the test sees its mark end.
GC_PROCESS = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
              "from drsync.cli import main; sys.exit(main(sys.argv[1:]))")


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def primary_snapshot(tmp_path: Path, name: str, seed: int) -> tuple[Repository, SnapshotInfo, Path]:
    """A primary's repository holding one captured snapshot: what a shipment carries."""
    data = tmp_path / name
    make_tree(data, seed=seed, files=12, big=2)
    age_tree(data)
    primary = Repository.init(MemoryStorage(), cluster_id="east", release="1")
    return primary, engine.create_snapshot(primary, engine.SnapshotRequest(str(data))), data


def upload(primary: Repository, info: SnapshotInfo, standby: Repository, session: WriteSession | None) -> list[bytes]:
    """Negotiate and ship the chunks the standby lacks (as the standby's Upload stores them)."""
    ids = sorted(primary.load_manifest(info).chunk_ids())
    missing = session.missing_chunks(ids) if session is not None else [c for c in ids if not standby.has_chunk(c)]
    writer = session.chunk_writer() if session is not None else standby.chunk_writer()
    for cid in missing:
        loc, stored = primary.read_stored(cid)
        writer.add_stored(cid, loc.encoding, stored, loc.raw_length)
    writer.flush()
    return missing


def manifest_bytes(primary: Repository, info: SnapshotInfo) -> bytes:
    return primary.storage.read(fmt.manifest_name(info.id))


def standby_with_garbage(storage: Storage, tmp_path: Path) -> tuple[Repository, SnapshotInfo, Path]:
    """A standby holding one snapshot it keeps and one deleted one, whose chunks are garbage."""
    standby = Repository.init(storage, cluster_id="east", release="1")
    primary, kept, kept_data = primary_snapshot(tmp_path, "kept", seed=11)
    upload(primary, kept, standby, None)
    with standby.lock(exclusive=False, wait_s=0):
        standby.commit_snapshot(kept, manifest_bytes(primary, kept))
    primary2, gone, _ = primary_snapshot(tmp_path, "gone", seed=12)
    upload(primary2, gone, standby, None)
    with standby.lock(exclusive=False, wait_s=0):
        committed = standby.commit_snapshot(gone, manifest_bytes(primary2, gone))
    standby.delete_snapshot(committed)
    return standby, kept, kept_data


def check_whole(storage: Storage, info: SnapshotInfo, data: Path, out: Path) -> None:
    """The snapshot is listed, every chunk reads back, verify passes, a restore gives the data back."""
    repo = Repository.open(storage)
    assert info.id in [s.id for s in repo.list_snapshots()]
    for cid in repo.load_manifest(repo.find_snapshot(info.id)).chunk_ids():
        repo.read_chunk(cid)
    report = repo.verify()
    assert report.ok, report.as_dict()
    engine.restore_snapshot(repo, info.id, str(out), cluster_id="east", release="1")
    assert files_of(out) == files_of(data)


@pytest.fixture(params=["local", "memory", "hdfs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Storage]:
    if request.param == "local":
        return "local", LocalStorage(tmp_path / "standby", create=True)
    if request.param == "hdfs":
        cluster = request.getfixturevalue("webhdfs")
        return "hdfs", open_storage(cluster.url(f"{cluster.test_dir}/standby"), create=True)
    return "memory", MemoryStorage()


class _GcRun:
    """GC of a repository in another process (local, HDFS) or another Repository object (memory)."""

    def __init__(self, kind: str, storage: Storage) -> None:
        self.marked = threading.Event()
        self.result: dict[str, Any] = {}
        if kind == "memory":
            self.proc = None
            repo = Repository.open(storage)  # its own object: its own cache, its own locks
            handler = _OnMessage(SWEEP_LINE, self.marked)
            logger = logging.getLogger("drsync.repository")
            level = logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)

            def run() -> None:
                try:
                    self.result["report"] = engine.gc_repository(repo, lock_wait_s=120).as_dict()
                except BaseException as e:  # reported by wait()
                    self.result["error"] = e
                finally:
                    logger.removeHandler(handler)
                    logger.setLevel(level)
                    self.marked.set()

            self.thread = threading.Thread(target=run)
            self.thread.start()
            return
        self.proc = subprocess.Popen([sys.executable, "-c", GC_PROCESS, "repo", "gc", "--repo", storage.url,
                                      "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "DRSYNC_LOCK_WAIT": "120"})
        self.stderr: list[str] = []

        def read_stderr() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line)
                if SWEEP_LINE in line:
                    self.marked.set()
            self.marked.set()  # ended without marking: wait() reports how

        self.reader = threading.Thread(target=read_stderr)
        self.reader.start()

    def wait_marked(self) -> None:
        assert self.marked.wait(120), "GC never finished its mark"

    def wait(self) -> dict[str, Any]:
        if self.proc is None:
            self.thread.join(120)
            if "error" in self.result:
                raise self.result["error"]
            return self.result["report"]
        out, _ = self.proc.communicate(timeout=120)
        self.reader.join(10)
        assert self.proc.returncode == 0, "".join(self.stderr)
        import json

        return json.loads(out)


class _OnMessage(logging.Handler):
    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_gc_between_upload_and_commit_keeps_the_shipment(backend: tuple[str, Storage], tmp_path: Path) -> None:
    """(a, e) The standby holds its write session from Upload to Commit; GC (another process, or
    another Repository object for the in-memory storage) marks meanwhile and sweeps after the
    commit: the shipment's chunks, garbage at the mark, are kept; the deleted snapshot's go."""
    kind, storage = backend
    standby, kept, kept_data = standby_with_garbage(storage, tmp_path)
    primary, info, data = primary_snapshot(tmp_path, "shipped", seed=13)
    session = standby.write_session(wait_s=0)
    try:
        assert upload(primary, info, standby, session)
        gc = _GcRun(kind, storage)
        gc.wait_marked()  # the GC has read every manifest: the uploaded chunks are garbage to it
        committed = session.commit(info, manifest_bytes(primary, info))
    finally:
        session.close()
    report = gc.wait()
    assert report["deleted_packs"] + report["repacked_packs"] >= 1  # the sweep really ran and deleted
    check_whole(storage, committed, data, tmp_path / "out")
    check_whole(storage, kept, kept_data, tmp_path / "out-kept")


def test_stale_index_never_claims_what_another_process_collected(tmp_path: Path) -> None:
    """(b) Process A uploaded (its cached index lists the chunks); `drsync repo gc` in process B
    deletes them (nothing names them yet); A's has_chunk then says they are missing, so the
    sender sends them again and the commit is whole. The old code answered from the cache."""
    storage = LocalStorage(tmp_path / "standby", create=True)
    standby, _, _ = standby_with_garbage(storage, tmp_path)
    primary, info, data = primary_snapshot(tmp_path, "shipped", seed=14)
    uploaded = upload(primary, info, standby, None)  # an Upload RPC: locked while it writes, not after
    assert uploaded and all(standby.has_chunk(c) for c in uploaded)
    gc = subprocess.run([sys.executable, "-m", "drsync", "repo", "gc", "--repo", storage.url, "--json"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    gone = {c for c in uploaded if not Repository.open(LocalStorage(storage.root)).has_chunk(c)}
    assert gone == set(uploaded)  # the premise: nothing named them, so GC collected them
    assert not any(standby.has_chunk(c) for c in uploaded)
    with pytest.raises(IntegrityError, match="does not hold"):
        standby.commit_snapshot(info, manifest_bytes(primary, info), require_chunks=True)
    with standby.write_session(wait_s=0) as s:
        assert sorted(upload(primary, info, standby, s)) == sorted(uploaded)  # negotiated again
        committed = s.commit(info, manifest_bytes(primary, info))
    check_whole(storage, committed, data, tmp_path / "out")


class GatedStorage:
    """A MemoryStorage whose first read of ``gate_prefix`` stops until the test opens the gate."""

    def __init__(self, inner: Storage, gate_prefix: str) -> None:
        self.inner, self.url, self.gate_prefix = inner, inner.url, gate_prefix
        self.reached, self.open = threading.Event(), threading.Event()

    def read(self, name: str) -> bytes:
        if name.startswith(self.gate_prefix) and not self.reached.is_set():
            self.reached.set()
            assert self.open.wait(60), "the test never opened the gate"
        return self.inner.read(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list(self, prefix: str = "") -> list[StoredObject]:
        return self.inner.list(prefix)


def test_writer_is_not_blocked_while_gc_marks(tmp_path: Path) -> None:
    """(c) GC stops in the middle of reading manifests; meanwhile a writer takes its shared lock at
    once (wait 0), ships and commits a snapshot. Only then does the GC go on; its sweep keeps the
    new snapshot whole. The old code held the exclusive lock for the whole GC."""
    inner = MemoryStorage()
    standby, kept, kept_data = standby_with_garbage(inner, tmp_path)
    for seed in range(20, 24):  # more manifests for the mark to read
        p, i, _ = primary_snapshot(tmp_path, f"extra{seed}", seed=seed)
        upload(p, i, standby, None)
        with standby.lock(exclusive=False, wait_s=0):
            standby.commit_snapshot(i, manifest_bytes(p, i))
    gated = GatedStorage(inner, fmt.MANIFESTS_DIR)
    result: dict[str, Any] = {}

    def gc() -> None:
        try:
            result["report"] = engine.gc_repository(Repository.open(gated))  # type: ignore[arg-type]
        except BaseException as e:
            result["error"] = e
            gated.reached.set()

    thread = threading.Thread(target=gc)
    thread.start()
    try:
        assert gated.reached.wait(60)
        assert "error" not in result, result
        primary, info, data = primary_snapshot(tmp_path, "shipped", seed=15)
        # The standby's shared lock, at once: LockedError here if the mark held the exclusive lock.
        with standby.lock(exclusive=False, wait_s=0):
            upload(primary, info, standby, None)
            committed = standby.commit_snapshot(info, manifest_bytes(primary, info))
    finally:
        gated.open.set()
        thread.join(60)
    assert "error" not in result, result
    assert result["report"].deleted_packs >= 1
    check_whole(inner, committed, data, tmp_path / "out")
    check_whole(inner, kept, kept_data, tmp_path / "out-kept")


class CommitDuringMark(CrashingStorage):
    """Dies at the ``crash_at``-th mutation; at the GC's first read of the index (its mark has read
    the snapshots), a writer commits the uploaded snapshot through another Repository object."""

    def __init__(self, inner: MemoryStorage, crash_at: int, commit: Any) -> None:
        super().__init__(inner, crash_at)
        self.commit: Any = commit
        self.committed: SnapshotInfo | None = None

    def read(self, name: str) -> bytes:
        if name.startswith(fmt.INDEX_DIR) and self.commit is not None:
            commit, self.commit = self.commit, None
            self.committed = commit()
        return self.inner.read(name)


def test_crash_at_every_step_of_a_gc_that_overlaps_a_commit(tmp_path: Path) -> None:
    """(d) A snapshot is committed while GC marks (its chunks were garbage at the mark); the GC is
    cut at each of its storage mutations in turn. Every cut leaves a repository that verifies,
    with the committed snapshot whole; a later GC finishes the job."""
    base = MemoryStorage()
    standby, kept, _ = standby_with_garbage(base, tmp_path)
    primary, info, _ = primary_snapshot(tmp_path, "shipped", seed=16)
    upload(primary, info, standby, None)  # uploaded; committed only while the GC marks
    n = 1
    while True:
        trial = base.clone()

        def commit(trial: MemoryStorage = trial) -> SnapshotInfo:
            writer = Repository.open(trial)
            with writer.lock(exclusive=False, wait_s=0):  # LockedError if the mark held the exclusive lock
                return writer.commit_snapshot(info, manifest_bytes(primary, info))

        crashing = CommitDuringMark(trial, n, commit)
        try:
            engine.gc_repository(Repository.open(crashing))  # type: ignore[arg-type]
            done = True
        except SimulatedCrash:
            done = False
            trial.crash()
            remove_locks(trial, all_locks=True)
        listed = assert_whole(trial)
        assert kept.id in listed
        if crashing.committed is not None:
            assert crashing.committed.id in listed
        engine.gc_repository(Repository.open(trial))
        assert Repository.open(trial).verify().ok
        assert set(assert_whole(trial)) == set(listed)
        if done:
            break
        n += 1
    assert n > 4  # the GC really was cut at several points


def test_an_unlocked_write_is_refused_or_locks_itself() -> None:
    """A chunk writer given a lock that is not held refuses; one without a lock holds its own."""
    storage = MemoryStorage()
    repo = Repository.init(storage, cluster_id="east", release="1")
    lock = repo.lock(exclusive=False)
    with pytest.raises(UsageError, match="needs a lock held"):
        repo.chunk_writer(lock=lock)
    session = repo.write_session(wait_s=0)
    writer = session.chunk_writer()
    session.close()
    with pytest.raises(UsageError, match="released"):
        writer.add(b"\1" * 32, b"x")
    writer = repo.chunk_writer()
    writer.add(bytes(32), b"")
    assert len(storage.list(fmt.LOCKS_DIR)) == 1  # writing: its own shared lock
    writer.flush()
    assert storage.list(fmt.LOCKS_DIR) == []
