"""The standby's commit checks only the chunks its applied snapshot does not vouch for (issue 17).

A snapshot stored in the standby's repository had every chunk checked at its own commit, and no GC
sweeps them while it is kept: a new shipment's rows that hold the applied snapshot's chunk lists need no
check. Only the rest are located, from the index files, so a no-change cycle at 1,000,000 files loads no
chunk index. What must still hold: a changed file naming a chunk that never arrived is refused, nothing
stored or applied; the same chunk list at another path is checked like any new one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import drsync.repository.repo as repo_mod
from drsync import engine
from drsync.agent.committer import Committer
from drsync.agent.state import StateStore
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from tests.conftest import age_tree, tree_state

CID, REL = "c", "1"


def _ship(primary: Repository, info: SnapshotInfo, standby: Repository, c: Committer, *,
          withhold: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
    """What a shipment does: asks about the chunks the standby's applied snapshot lacks (as the primary
    negotiates), sends those it lacks (but ``withhold``), then commits."""
    wanted = set(primary.load_manifest(info).chunk_ids())
    applied = c.store.current.applied_snapshot
    if applied:
        wanted -= set(standby.load_manifest(standby.find_snapshot(applied)).chunk_ids())
    with standby.write_session() as s:
        w = s.chunk_writer()
        for cid in standby.missing_chunks(sorted(wanted)) if wanted else []:
            if cid not in withhold:
                loc, stored = primary.read_stored(cid)
                w.add_stored(cid, loc.encoding, stored, loc.raw_length)
        w.flush()
    c.commit(info.to_bytes(), primary.manifest_bytes(info), [1, info.seq])


def make_standby(tmp_path: Path, files: int = 40, repeat: int = 50):  # type: ignore[no-untyped-def]
    """A primary repository, a standby repository with a committer, and the first snapshot of a small
    source shipped and applied: ``(src, primary, standby repo, standby root, committer, first)``."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:02}").write_bytes(f"file {i} ".encode() * (repeat + i))
    age_tree(src)
    primary = engine.init_repository(str(tmp_path / "prod-repo"), cluster_id=CID, release=REL)
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id=CID, release=REL)
    root = tmp_path / "root"
    root.mkdir()
    c = Committer(repo, str(root), StateStore(str(tmp_path / "state")), agent="standby",
                  max_delete_fraction=1.0, max_change_fraction=1.0)
    first = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _ship(primary, first, repo, c)
    assert tree_state(root) == tree_state(src)
    return src, primary, repo, root, c, first


@pytest.fixture
def standby(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_standby(tmp_path)[:5]


def _index_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the index files read from now on (by a load or by a located check)."""
    read: list[str] = []
    real = repo_mod.iter_index_file

    def spy(data, name, *a, **k):  # type: ignore[no-untyped-def]
        read.append(name)
        return real(data, name, *a, **k)

    monkeypatch.setattr(repo_mod, "iter_index_file", spy)
    monkeypatch.setattr("drsync.repository.packs.iter_index_file", spy)
    return read


def test_a_no_change_commit_reads_no_chunk_index(standby, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    src, primary, repo, root, c = standby
    same = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    reads = _index_reads(monkeypatch)
    _ship(primary, same, repo, c)
    assert c.store.current.applied_snapshot == same.id
    assert reads == [], "every chunk of an unchanged tree is vouched for by the applied snapshot"
    assert tree_state(root) == tree_state(src)


def test_a_shipment_of_the_applied_manifest_is_stored_without_reading_the_applied_one(
        standby, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Nothing changed: the shipment's manifest has the applied snapshot's hash, which vouches for all of it.
    No manifest of this repository is read (no merge, no tree comparison), and it is applied. With a pack
    lost since, every chunk is checked again and the shipment refused, nothing stored."""
    src, primary, repo, root, c = standby
    same = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    assert same.manifest_hash == repo.find_snapshot(c.store.current.applied_snapshot).manifest_hash
    opened: list[str] = []
    real = repo.open_manifest
    monkeypatch.setattr(repo, "open_manifest", lambda info: opened.append(info.id) or real(info))
    _ship(primary, same, repo, c)
    assert opened == [] and c.store.current.applied_snapshot == same.id
    assert tree_state(root) == tree_state(src)
    for p in repo.storage.list(fmt.PACKS_DIR):
        repo.storage.delete(p.name)
    again = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    with pytest.raises(IntegrityError, match="does not hold|gone"):
        _ship(primary, again, repo, c)
    assert again.id not in {s.id for s in repo.list_snapshots()} and c.store.current.applied_snapshot == same.id


def test_a_changed_file_whose_chunk_never_arrived_is_refused(standby, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    src, primary, repo, root, c = standby
    applied = c.store.current.applied_snapshot
    before = tree_state(root)
    (src / "f07").write_bytes(b"rewritten " * 300)
    (src / "new").write_bytes(b"a new file " * 200)
    age_tree(src)
    changed = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    lost = set(primary.load_manifest(changed).chunk_ids()) - set(primary.load_manifest(
        primary.find_snapshot(applied)).chunk_ids())
    assert lost
    assert len(lost) >= 2
    # Nothing of the change sent; then all but one chunk (what was sent stays on the standby).
    for withheld in (lost, {min(lost)}):
        with pytest.raises(IntegrityError, match="does not hold"):
            _ship(primary, changed, repo, c, withhold=withheld)
        assert changed.id not in {s.id for s in repo.list_snapshots()}
        assert c.store.current.applied_snapshot == applied and tree_state(root) == before
    reads = _index_reads(monkeypatch)
    _ship(primary, changed, repo, c)
    assert c.store.current.applied_snapshot == changed.id and tree_state(root) == tree_state(src)
    assert reads, "the changed files' chunks were located in the index files"
    assert repo._index is None


def test_a_known_chunk_list_at_a_new_path_is_still_checked(standby, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A copy of an applied file under a new name names chunks the standby holds: accepted. A hostile or
    broken sender's manifest that puts the applied file's chunk list under a new path alongside a chunk
    nobody sent is refused: vouching is per path and list, never per id seen somewhere."""
    src, primary, repo, root, c = standby
    (src / "copy").write_bytes((src / "f03").read_bytes())
    age_tree(src)
    copied = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _ship(primary, copied, repo, c)
    assert tree_state(root) == tree_state(src)
    (src / "copy").write_bytes((src / "f03").read_bytes() + b"and a tail nobody sent " * 40)
    age_tree(src)
    grown = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    tail = set(primary.load_manifest(grown).chunk_ids()) - set(primary.load_manifest(copied).chunk_ids())
    assert tail
    with pytest.raises(IntegrityError, match="does not hold"):
        _ship(primary, grown, repo, c, withhold=tail)
    assert c.store.current.applied_snapshot == copied.id


def test_the_negotiations_index_is_let_go_before_the_manifest_is_decoded(standby,  # type: ignore[no-untyped-def]
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The index a negotiation loaded (61 bytes a chunk) is not held beside the decoded manifest (about
    165 bytes a file): at 1,000,000 files that was the standby's peak."""
    import drsync.agent.committer as committer_mod

    src, primary, repo, root, c = standby
    (src / "f11").write_bytes(b"changed " * 100)
    age_tree(src)
    changed = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    held: list[bool] = []
    real = committer_mod.Manifest.lean

    def decode(*a, **k):  # type: ignore[no-untyped-def]
        held.append(repo._index is not None)
        return real(*a, **k)

    monkeypatch.setattr(committer_mod.Manifest, "lean", decode)
    assert repo.missing_chunks([b"\x00" * 32]) and repo._index is not None  # a negotiation loads it
    _ship(primary, changed, repo, c)
    # The commit's decode (lean: what it holds through the apply).
    assert held == [False] and c.store.current.applied_snapshot == changed.id
    assert tree_state(root) == tree_state(src)
