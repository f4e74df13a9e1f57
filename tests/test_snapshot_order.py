"""Snapshots are ordered by their repository's sequence numbers, never by capture time.

The defect these guard against: a snapshot taken while the clock was a day fast
stayed ``latest`` after the clock was corrected and newer snapshots were taken,
so ``restore latest`` silently restored old data. Capture times come from the
machine's clock (``engine.create_snapshot(clock=...)`` in process, libfaketime
for the real CLI); only sequence numbers decide what is newest.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from drsync import engine
from drsync.agent.primary import ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.config import KeepPolicy
from drsync.errors import IntegrityError, RefusedError
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.retention import plan_retention
from drsync.storage.local import LocalStorage
from drsync.transport import Caller, CommitOutcome, ReceivedChunk, StandbyHello
from tests.conftest import Result, init_repo_at, run_drsync

DAY = 86400.0


def fast_clock(offset_s: float = DAY):  # type: ignore[no-untyped-def]
    """A wall clock that is ``offset_s`` ahead, like a machine whose clock was set wrong."""
    return lambda: time.time() + offset_s


def new_repo(path: Path) -> Repository:
    return Repository.init(LocalStorage(path, create=True), cluster_id="east", release="6.2.1")


def write_data(root: Path, generation: int) -> None:
    """A small tree whose content (and sizes) say which generation it is."""
    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "gen.txt").write_text(f"generation {generation}\n" * (generation + 1))
    (root / "d" / f"only-in-{generation}.txt").write_text(f"made by generation {generation}")
    for old in (root / "d").iterdir():
        if old.name != f"only-in-{generation}.txt":
            old.unlink()


def contents(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".drsync"):
            out[rel] = p.read_bytes()
    return out


def snap(repo: Repository, data: Path, *, clock=time.time, name: str = "",  # type: ignore[no-untyped-def]
         kind: str = "manual") -> SnapshotInfo:
    return engine.create_snapshot(repo, engine.SnapshotRequest(str(data), name=name, kind=kind), clock=clock)


def rewrite_doc(repo: Repository, snapshot_id: str, **changes: object) -> None:
    """Change (or with a value of ``...``, remove) keys of a stored snapshot document."""
    name = fmt.snapshot_name(snapshot_id)
    doc = json.loads(repo.storage.read(name))
    for k, v in changes.items():
        if v is ...:
            doc.pop(k, None)
        else:
            doc[k] = v
    repo.storage.write(name, json.dumps(doc).encode(), durable=True)


# --- in process: the capture seam ------------------------------------------------------


def test_a_snapshot_from_a_fast_clock_does_not_stay_latest(tmp_path: Path) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    fast = snap(repo, data, clock=fast_clock())          # the clock is a day fast
    write_data(data, 2)
    second = snap(repo, data)                              # the clock was corrected
    write_data(data, 3)
    third = snap(repo, data)

    assert fast.captured_at > third.captured_at > second.captured_at  # what the clock said
    assert (fast.seq, second.seq, third.seq) == (1, 2, 3)               # what happened
    assert [s.id for s in repo.list_snapshots()] == [fast.id, second.id, third.id]
    assert repo.find_snapshot("latest").id == third.id
    # Each capture's parent is the newest snapshot by sequence, not the one with the latest clock.
    assert second.parent == fast.id and third.parent == second.id
    assert [s.parent for s in repo.list_snapshots()] == [None, fast.id, second.id]

    restored, _ = engine.restore_snapshot(repo, "latest", str(tmp_path / "out"), cluster_id="east",
                                          release="6.2.1")
    assert restored.id == third.id
    assert contents(tmp_path / "out") == contents(data)
    assert (tmp_path / "out" / "d" / "only-in-3.txt").exists()


def test_a_name_resolves_to_its_newest_by_sequence(tmp_path: Path) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    first = snap(repo, data, name="nightly", clock=fast_clock())
    write_data(data, 2)
    second = snap(repo, data, name="nightly")
    snap(repo, data, name="other", clock=fast_clock(2 * DAY))
    assert repo.find_snapshot("nightly").id == second.id != first.id


def test_the_next_capture_compares_with_the_newest_by_sequence(tmp_path: Path) -> None:
    """The parent decides which files are read again: it must be what the root last held."""
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    snap(repo, data, clock=fast_clock())
    write_data(data, 2)
    second = snap(repo, data)
    third = snap(repo, data)  # nothing changed since the second
    assert third.parent == second.id
    assert third.new_bytes == 0


def test_keep_last_counts_by_sequence(tmp_path: Path) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    fast = snap(repo, data, kind="periodic", clock=fast_clock())
    ids = [fast.id]
    for gen in (2, 3):
        write_data(data, gen)
        ids.append(snap(repo, data, kind="periodic").id)
    snaps = repo.list_snapshots()
    doomed = engine.plan_expiry(snaps, KeepPolicy(last=2), now=time.time())
    assert [s.id for s in doomed] == [fast.id]  # the oldest by sequence, although its clock said "newest"
    # The policy's order does not depend on the order it is given the snapshots in.
    assert [s.id for s in engine.plan_expiry(list(reversed(snaps)), KeepPolicy(last=2), now=time.time())] \
        == [fast.id]
    res = engine.expire_snapshots(repo, KeepPolicy(last=2))
    assert [s.id for s in res.deleted] == [fast.id]
    assert [s.id for s in repo.list_snapshots()] == ids[1:]


def test_calendar_buckets_use_capture_times_but_newest_by_order() -> None:
    t = 1_795_000_000.0  # a Unix time in the middle of a UTC day
    # Oldest to newest by sequence; "b" was captured with the clock a day fast.
    items = [("a", t), ("b", t + DAY), ("c", t + 60), ("d", t + 120)]
    d = plan_retention(items, KeepPolicy(last=1, daily=3), in_order=True)
    assert [x.id for x in d] == ["d", "c", "b", "a"]
    kept = {x.id: x.reasons for x in d if x.keep}
    # "d" is the newest of its day; "b" alone stands for the (wrong) next day; the day of
    # "a", "c" and "d" counts once although "b" comes between them, so "a" is not kept.
    assert kept == {"d": ["last", "daily"], "b": ["daily"]}
    # Without an order the items are ordered by time, as for backups.
    d = plan_retention(items, KeepPolicy(last=1))
    assert [x.id for x in d if x.keep] == ["b"]


def test_concurrent_commits_in_one_process_get_distinct_numbers(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    manifest = b"not read by commit"
    infos = [SnapshotInfo(id=f"{i:016x}", captured_at=time.time(), cluster_id="east", release="6.2.1",
                          manifest_hash=blake3.blake3(manifest).hexdigest()) for i in range(12)]
    done: list[SnapshotInfo] = []
    threads = [threading.Thread(target=lambda i=i: done.append(repo.commit_snapshot(i, manifest)))
               for i in infos]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(s.seq for s in done) == list(range(1, 13))
    assert [s.seq for s in repo.list_snapshots()] == list(range(1, 13))


def test_commit_numbers_after_the_highest_and_ignores_a_given_seq(tmp_path: Path) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    first = snap(repo, data)
    manifest = repo.storage.read(fmt.manifest_name(first.id))
    claimed = SnapshotInfo(id="ffffffffffffffff", captured_at=0.0, cluster_id="east", release="6.2.1",
                           manifest_hash=first.manifest_hash, seq=999)
    stored = repo.commit_snapshot(claimed, manifest)
    assert stored.seq == 2
    assert json.loads(repo.storage.read(fmt.snapshot_name(stored.id)))["seq"] == 2
    assert repo.find_snapshot("latest").id == stored.id  # although captured at 1970


# --- documents written by earlier versions, damaged documents ----------------------------


def test_documents_without_seq_load_and_sort_first_by_capture_time(tmp_path: Path) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    old_fast = snap(repo, data, clock=fast_clock(2 * DAY))
    write_data(data, 2)
    old = snap(repo, data)
    # Written as a version before sequence numbers would: no "seq" key at all.
    for s in (old_fast, old):
        rewrite_doc(repo, s.id, seq=...)
        assert "seq" not in json.loads(repo.storage.read(fmt.snapshot_name(s.id)))
    listed = repo.list_snapshots()
    assert [(s.id, s.seq) for s in listed] == [(old.id, 0), (old_fast.id, 0)]  # among themselves: by time
    write_data(data, 3)
    new = snap(repo, data)
    assert new.seq == 1 and new.parent == old_fast.id  # before the upgrade, newest was by time
    assert [s.id for s in repo.list_snapshots()] == [old.id, old_fast.id, new.id]
    assert repo.find_snapshot("latest").id == new.id
    # An old document is written back the way it was read: without a seq.
    info = repo.find_snapshot(old.id)
    assert "seq" not in json.loads(info.to_bytes())
    assert SnapshotInfo.from_bytes(info.to_bytes(), "doc") == info


@pytest.mark.parametrize("bad", ["3", -1, True, False, 1.5, None, [1]])
def test_a_damaged_seq_is_an_integrity_error(tmp_path: Path, bad: object) -> None:
    repo, data = new_repo(tmp_path / "repo"), tmp_path / "data"
    write_data(data, 1)
    s = snap(repo, data)
    rewrite_doc(repo, s.id, seq=bad)
    with pytest.raises(IntegrityError, match="seq"):
        SnapshotInfo.from_bytes(repo.storage.read(fmt.snapshot_name(s.id)), "snapshot document")
    with pytest.raises(IntegrityError, match="seq"):
        repo.list_snapshots()
    r = run_drsync("snapshot", "list", "--repo", tmp_path / "repo")
    assert r.code == 3 and "seq" in r.err


# --- a standby numbers what it receives in arrival order ---------------------------------


class LocalLink:
    """A StandbyLink that calls a StandbyReceiver in this process (what gRPC carries otherwise)."""

    target = "in-process"

    def __init__(self, rx: StandbyReceiver) -> None:
        self.rx = rx
        self.docs: list[bytes] = []

    def hello(self, sender: str, epoch: int) -> StandbyHello:
        st = self.rx.state
        return StandbyHello("standby-1", "standby", "east", "6.2.1", st.epoch, st.applied_snapshot,
                            st.applied_captured_at, st.applied_at)

    def missing(self, epoch: int, batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        caller = Caller("primary", epoch)
        self.rx.admit(caller)
        for b in batches:
            yield self.rx.missing(caller, b)

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        caller = Caller("primary", epoch)
        self.rx.admit(caller)
        return self.rx.receive(caller, batches)

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "",
               patch_of: str = "") -> CommitOutcome:
        self.docs.append(snapshot_doc)
        info, result = self.rx.commit(Caller(sender, epoch), snapshot_doc, b"".join(pieces), sender_seq)
        return CommitOutcome(info.id, result.written_files, result.removed, self.rx.state.applied_at)


def test_a_standby_orders_what_it_receives_by_arrival(tmp_path: Path) -> None:
    primary, data = new_repo(tmp_path / "primary"), tmp_path / "data"
    taken = []
    for gen, clock in ((1, time.time), (2, fast_clock()), (3, time.time), (4, time.time)):
        write_data(data, gen)
        taken.append(snap(primary, data, clock=clock))
    a, b_fast, c, d = taken

    standby = new_repo(tmp_path / "standby")
    root = tmp_path / "standby-data"
    root.mkdir()
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="standby-1")
    link = LocalLink(rx)
    # They arrive in another order than they were taken: b, whose capture time a fast clock put a day
    # ahead, after c. It is numbered by arrival, and applied (a later capture time with a lower sequence is
    # what a primary whose repository was re-created sends).
    for info in (a, c, b_fast):
        ship_snapshot(primary, info, link, epoch=1, sender="east-1")
    listed = standby.list_snapshots()
    assert [(s.id, s.seq) for s in listed] == [(a.id, 1), (c.id, 2), (b_fast.id, 3)]
    # A resent older snapshot (lower position, captured earlier) would take the root back: refused, not stored.
    with pytest.raises(RefusedError, match="arrived late"):
        ship_snapshot(primary, a, link, epoch=1, sender="east-1")
    assert len(standby.list_snapshots()) == 3
    assert standby.find_snapshot("latest").id == b_fast.id == rx.state.applied_snapshot
    assert contents(root) == contents_of(primary, b_fast, tmp_path / "check-b")
    # Shipped documents leave the sender's seq out: it means nothing in another repository.
    assert all("seq" not in json.loads(doc) for doc in link.docs)

    # A document that does carry a seq (a sender of another version) is renumbered on arrival.
    ship_snapshot(primary, d, LocalLink(rx), epoch=1, sender="east-1")  # d's chunks arrive
    standby.delete_snapshot(standby.find_snapshot(d.id))
    manifest = primary.storage.read(fmt.manifest_name(d.id))
    claimed = SnapshotInfo.from_bytes(primary.storage.read(fmt.snapshot_name(d.id)), "doc")
    assert claimed.seq == 4
    info, _ = rx.commit(Caller("primary", 1), dataclasses.replace(claimed, seq=999).to_bytes(), manifest)
    assert info.seq == 4 and standby.find_snapshot("latest").id == d.id
    assert [s.seq for s in standby.list_snapshots()] == [1, 2, 3, 4]
    # The same shipment again (a retried commit) keeps its number.
    info, _ = rx.commit(Caller("primary", 1), primary.storage.read(fmt.snapshot_name(d.id)), manifest)
    assert info.seq == 4 and len(standby.list_snapshots()) == 4


def contents_of(repo: Repository, info: SnapshotInfo, where: Path) -> dict[str, bytes]:
    engine.restore_snapshot(repo, info.id, str(where), cluster_id="east", release="6.2.1")
    return contents(where)


# --- the real CLI, with the process's clock really a day fast ----------------------------


def drsync_with_clock(offset: str, *args: str | os.PathLike[str]) -> Result:
    """Run the CLI under libfaketime: every clock the process reads is ``offset`` off.

    The library is preloaded directly, not through the ``faketime`` wrapper: the wrapper names a POSIX
    semaphore after its own pid and leaves it in /dev/shm when it is killed, and a later wrapper that
    gets the same pid (pid_max 32768 on the CI machine) then fails with "sem_open: File exists"."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime is not installed: run the tests with make test, which installs it")
    env = {**os.environ, "LD_PRELOAD": libs[0], "FAKETIME": offset}
    proc = subprocess.run([sys.executable, "-m", "drsync", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_cli_latest_list_and_restore_after_the_clock_stepped_back(tmp_path: Path) -> None:
    repo, data = tmp_path / "repo", tmp_path / "data"
    init_repo_at(repo, "east", "6.2.1")
    write_data(data, 1)
    r = drsync_with_clock("+1d", "snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert r.code == 0, r.err
    created = [r.json()]
    for gen in (2, 3):
        write_data(data, gen)
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
        assert r.code == 0, r.err
        created.append(r.json())
    ids = [c["id"] for c in created]

    # The defect: 'latest' was the snapshot with the latest clock reading, and restored old data.
    out = tmp_path / "out"
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", out, "--json")
    assert r.code == 0, r.err
    assert r.json()["snapshot"] == ids[2]
    assert contents(out) == contents(data)
    listed = run_drsync("snapshot", "list", "--repo", repo, "--json").json()
    assert [s["id"] for s in listed] == ids
    assert [c["seq"] for c in created] == [1, 2, 3]
    assert [(s["id"], s["seq"]) for s in listed] == [(ids[0], 1), (ids[1], 2), (ids[2], 3)]
    assert listed[0]["captured_at"] > listed[2]["captured_at"] > listed[1]["captured_at"]  # ISO, UTC
    table = run_drsync("snapshot", "list", "--repo", repo, env={"COLUMNS": "250"}).out.splitlines()
    assert table[0].split()[:5] == ["SEQ", "ID", "NAME", "KIND", "CAPTURED"]
    rows = [line.split() for line in table[1:]]
    assert [(row[0], row[1]) for row in rows] == [("1", ids[0]), ("2", ids[1]), ("3", ids[2])]
    assert [row[4] for row in rows] == [s["captured_at"] for s in listed]

    shown = run_drsync("snapshot", "show", "latest", "--repo", repo, "--json").json()
    assert shown["id"] == ids[2] and shown["seq"] == 3 and shown["parent"] == ids[1]
    human = run_drsync("snapshot", "show", "latest", "--repo", repo).out
    assert any(line.split() == ["seq", "3"] for line in human.splitlines())
    assert any(line.split()[0] == "captured_at" for line in human.splitlines())

    # A snapshot from before sequence numbers shows '-' in the table and 0 in JSON.
    old = Repository.open(LocalStorage(repo))
    rewrite_doc(old, ids[0], seq=...)
    listed = run_drsync("snapshot", "list", "--repo", repo, "--json").json()
    assert [(s["id"], s["seq"]) for s in listed] == [(ids[0], 0), (ids[1], 2), (ids[2], 3)]
    table = run_drsync("snapshot", "list", "--repo", repo, env={"COLUMNS": "250"}).out.splitlines()
    assert table[1].split()[:2] == ["-", ids[0]]
    human = run_drsync("snapshot", "show", ids[0], "--repo", repo).out
    assert any(line.split() == ["seq", "-"] for line in human.splitlines())
