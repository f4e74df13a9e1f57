"""Manifests gathered in a spool (issue 17): a manifest that arrives in a Commit, or is read out of a
repository to be shipped or backed up, is hashed as it is gathered and waits in a temporary file past
16 MiB instead of in memory beside its decoded table. The spool is tested on its own, then end to end
with limits shrunk so that small manifests take the temporary-file path: a shipment (primary's read,
standby's commit and apply), a damaged manifest arriving that way, and a backup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

import drsync.capture as capture_mod
import drsync.repository.repo as repo_mod
from drsync import backup
from drsync.agent.primary import ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.manifest import Manifest, ManifestFile, ManifestWriter
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool
from drsync.transport import Caller, CommitOutcome
from tests.test_snapshot_order import LocalLink, contents, new_repo, snap


def test_a_small_spool_stays_in_memory() -> None:
    s = Spool(memory_bytes=100)
    for piece in (b"abc", b"", b"def"):
        s.write(piece)
    assert s.in_memory and s.size == 6
    assert s.hexdigest() == blake3.blake3(b"abcdef").hexdigest()
    assert s.source() == b"abcdef" == s.getvalue()
    assert list(s.pieces(4)) == [b"abcd", b"ef"]
    assert list(Spool().pieces()) == [b""]  # an empty manifest still makes one piece


def test_a_large_spool_moves_to_a_temporary_file_with_independent_readers() -> None:
    data = os.urandom(10_000)
    s = Spool(memory_bytes=1000)
    for lo in range(0, len(data), 777):
        s.write(data[lo:lo + 777])
    assert not s.in_memory and s.size == len(data)
    assert s.hexdigest() == blake3.blake3(data).hexdigest()
    assert b"".join(s.pieces(999)) == data == s.getvalue()
    r1, r2 = s.source(), s.source()
    assert r1.read(10) == data[:10]
    r2.seek(5000)
    assert r2.read(10) == data[5000:5010]
    assert r1.read(10) == data[10:20]  # r2 did not move r1
    with pytest.raises(ValueError, match="written before it is read"):
        Spool.of(b"x").write(b"y")
    s.close()
    with pytest.raises(ValueError):
        r1.read(10)  # a reader of a closed spool fails; it never reads another file
    with pytest.raises(ValueError):
        s.source()


def test_a_manifest_decodes_from_a_file_spool(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i in range(50):
        (tmp_path / "data" / f"f{i:02}").write_bytes(os.urandom(i))
    repo = new_repo(tmp_path / "repo")
    info = snap(repo, tmp_path / "data")
    stored = repo.storage.read(fmt.manifest_name(info.id))
    s = Spool(memory_bytes=64)
    s.write(stored)
    assert not s.in_memory
    want = Manifest.from_bytes(stored).table
    assert Manifest.from_bytes(s.source(), "m", s.size).table.equals(want)
    assert ManifestFile(s.source(), "m", s.size).read().table.equals(want)


class SpoolingLink(LocalLink):
    """A LocalLink whose commit gathers the pieces into a spool of ``limit`` bytes in memory, as the gRPC
    server gathers them into one of 16 MiB: past it the standby's commit works from a temporary file."""

    def __init__(self, rx: StandbyReceiver, limit: int, damage: bool = False) -> None:
        super().__init__(rx)
        self.limit, self.damage = limit, damage
        self.spooled_to_file: list[bool] = []

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "",
               patch_of: str = "") -> CommitOutcome:
        with Spool(self.limit) as spool:
            for i, piece in enumerate(pieces):
                spool.write(piece if not (self.damage and i == 0) else b"\0" + piece[1:])
            self.spooled_to_file.append(not spool.in_memory)
            info, result = self.rx.commit(Caller(sender, epoch), snapshot_doc, spool, sender_seq)
        return CommitOutcome(info.id, result.written_files, result.removed, self.rx.state.applied_at)


def _tree(root: Path, generation: int) -> None:
    root.mkdir(exist_ok=True)
    for i in range(300):
        (root / f"f{i:03}.txt").write_text(f"file {i} of generation {generation if i % 7 == 0 else 0}\n" * 3)


def test_a_shipment_through_file_spools_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)  # the primary reads its manifest into a file
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    root = tmp_path / "standby-data"
    root.mkdir()
    standby = new_repo(tmp_path / "standby")
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="standby-1")
    link = SpoolingLink(rx, limit=256)
    for generation in range(3):
        _tree(data, generation)
        info = snap(primary, data)
        assert not primary.manifest_spool(info).in_memory
        ship_snapshot(primary, info, link, epoch=1, sender="east-1")
        assert rx.state.applied_snapshot == info.id
        assert contents(root) == contents(data)
        # Stored exactly as sent (streamed from the spool's file into the standby's storage).
        assert standby.storage.read(fmt.manifest_name(info.id)) == primary.storage.read(fmt.manifest_name(info.id))
    assert link.spooled_to_file == [True, True, True]
    assert not [n for n in os.listdir(tmp_path / "standby" / "manifests") if n.startswith(".")]


def test_a_damaged_manifest_in_a_file_spool_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    primary = new_repo(tmp_path / "primary")
    _tree(tmp_path / "data", 0)
    info = snap(primary, tmp_path / "data")
    standby = new_repo(tmp_path / "standby")
    (tmp_path / "standby-data").mkdir()
    rx = StandbyReceiver(standby, str(tmp_path / "standby-data"), StateStore(str(tmp_path / "state")),
                         agent="standby-1")
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        ship_snapshot(primary, info, SpoolingLink(rx, limit=256, damage=True), epoch=1, sender="east-1")
    assert standby.list_snapshots() == [] and os.listdir(tmp_path / "standby-data") == []
    assert not standby.storage.exists(fmt.manifest_name(info.id))


def test_a_backup_of_a_manifest_read_into_a_file_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    info = snap(repo, tmp_path / "data")
    made = backup.create_backup(repo, info.id, str(tmp_path / "backups"))
    assert backup.verify_backup(made.path).ok
    assert (Path(made.path) / fmt.manifest_name(info.id)).read_bytes() == repo.storage.read(
        fmt.manifest_name(info.id))
    backup.restore_backup(made.path, str(tmp_path / "out"))
    assert contents(tmp_path / "out") == contents(tmp_path / "data")


def test_a_manifest_damaged_in_storage_is_refused_by_its_spool(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    info = snap(repo, tmp_path / "data")
    path = tmp_path / "repo" / fmt.manifest_name(info.id)
    raw = bytearray(path.read_bytes())
    raw[700] ^= 1  # past the first range: found only by hashing the whole copy
    path.write_bytes(bytes(raw))
    for read in (repo.manifest_spool, repo.load_manifest, repo.open_manifest):
        with pytest.raises(IntegrityError, match="damaged"):
            read(info)


def test_a_capture_spools_its_manifest_into_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture's manifest past the spool's memory goes to a temporary file while it is written, and is
    stored from there: read back against the hash the spool computed, and restored."""
    monkeypatch.setattr(capture_mod, "_SPOOL_BYTES", 300)  # a capture's own threshold (2 MiB)
    made: list[Spool] = []
    real_finish = ManifestWriter.finish

    def finish(self: ManifestWriter) -> Spool:
        made.append(real_finish(self))
        return made[-1]

    monkeypatch.setattr(ManifestWriter, "finish", finish)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    for f in (tmp_path / "data").iterdir():  # old enough not to be re-read as racy
        os.utime(f, (1_700_000_000, 1_700_000_000))
    first = snap(repo, tmp_path / "data")
    assert made and not made[-1].in_memory
    (tmp_path / "data" / "f001.txt").write_text("changed")
    second = snap(repo, tmp_path / "data")
    assert second.reused_files == 299
    for info in (first, second):
        assert repo.load_manifest(info).file_count() == 300  # checked against the hash the spool computed
    restored = tmp_path / "out"
    from drsync import engine

    engine.restore_snapshot(repo, second.id, str(restored), cluster_id="east", release="6.2.1")
    assert contents(restored) == contents(tmp_path / "data")


def test_a_closed_spool_lets_go_of_its_bytes_and_refuses_use() -> None:
    s = Spool()
    s.write(b"abc")
    assert s.source() == b"abc"
    s.close()
    assert s.closed
    for use in (s.source, s.getvalue, lambda: list(s.pieces())):
        with pytest.raises(ValueError, match="closed"):
            use()
    with pytest.raises(ValueError, match="closed"):
        s.write(b"more")


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_large_manifest_in_a_local_repository_is_read_in_place_and_keeps_the_bytes_it_hashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past RANGED_MANIFEST_BYTES a local repository's manifest is hashed through a descriptor of the stored
    file and read back through it: no temporary copy is made; the name replaced meanwhile (stored objects are
    replaced by renames) leaves the spool's bytes those it hashed; closing it closes every descriptor."""
    import tempfile

    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    info = snap(repo, tmp_path / "data")
    name = fmt.manifest_name(info.id)
    stored = repo.storage.read(name)
    before = _fds()

    def no_copy(*a: object, **k: object) -> None:
        raise AssertionError("the manifest was copied into a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_copy)
    spool = repo.manifest_spool(info, in_place=True)
    assert not spool.in_memory and spool.size == len(stored) and spool.hexdigest() == info.manifest_hash
    repo.storage.write(name, b"replaced by a rename" * 100)  # another inode under the name
    assert b"".join(spool.pieces(100)) == stored
    assert Manifest.from_bytes(stored, "m").file_count() == ManifestFile(spool, "m").file_count()
    spool.close()
    assert _fds() <= before
    with pytest.raises(IntegrityError, match="damaged"):  # the replaced bytes are read anew, and refused
        repo.manifest_spool(info, in_place=True)
    assert _fds() <= before


@pytest.mark.parametrize("harm", ["truncated", "grown past the limit", "missing", "a directory"])
def test_a_large_local_manifest_that_is_harmed_is_refused_and_no_descriptor_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, harm: str) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    info = snap(repo, tmp_path / "data")
    path = tmp_path / "repo" / fmt.manifest_name(info.id)
    raw = path.read_bytes()
    if harm == "truncated":
        path.write_bytes(raw[:-100])
    elif harm == "grown past the limit":
        monkeypatch.setattr(fmt, "MANIFEST_MAX_BYTES", len(raw) // 2)  # read no further than the limit: refused
    elif harm == "missing":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    before = _fds()
    for in_place in (True, False):
        with pytest.raises(IntegrityError, match="damaged|missing|not a file"):
            repo.manifest_spool(info, in_place=in_place)
    assert _fds() <= before


def test_an_unchanged_capture_links_its_manifest_without_copying_or_hashing_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged capture's manifest is its parent's bytes: a duplicate of the parent's stored file (no
    temporary copy), linked to it without reading it again (it was hashed through that very file)."""
    import tempfile

    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    first = snap(repo, tmp_path / "data")
    reads: list[str] = []
    real = repo.storage.read_range

    def counted(name: str, offset: int, length: int) -> bytes:
        reads.append(name)
        return real(name, offset, length)

    def no_copy(*a: object, **k: object) -> None:
        raise AssertionError("a manifest was copied into a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_copy)
    monkeypatch.setattr(repo.storage, "read_range", counted)
    second = snap(repo, tmp_path / "data")
    assert second.manifest_hash == first.manifest_hash
    one, two = (tmp_path / "repo" / fmt.manifest_name(s.id) for s in (first, second))
    assert os.stat(one).st_ino == os.stat(two).st_ino  # linked
    assert fmt.manifest_name(first.id) not in reads  # read once, through its descriptor, not again by ranges
    assert repo.manifest_spool(second, in_place=True).hexdigest() == second.manifest_hash


def test_a_link_to_another_file_of_the_same_hash_is_made_only_after_hashing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool of snapshot A's stored manifest committed for B, where the newest snapshot of that hash is C,
    whose file is another (not linked) and damaged: C is hashed before any link, found damaged, and B's
    bytes are written from the spool; with C intact, B is linked to C."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 512)
    for damaged in (True, False):
        repo = new_repo(tmp_path / f"repo-{damaged}")
        _tree(tmp_path / "data", 0)
        a = snap(repo, tmp_path / "data")
        c = snap(repo, tmp_path / "data")
        path_a, path_c = (tmp_path / f"repo-{damaged}" / fmt.manifest_name(s.id) for s in (a, c))
        raw = bytearray(path_a.read_bytes())
        if damaged:
            raw[700] ^= 1
        path_c.unlink()
        path_c.write_bytes(bytes(raw))  # C's own file, not a link to A's
        b = SnapshotInfo(id="0123456789abcdef", captured_at=a.captured_at + 10, cluster_id=a.cluster_id,
                         release=a.release, manifest_hash=a.manifest_hash, files=a.files)
        with repo.manifest_spool(a) as spool:
            repo.commit_snapshot(b, spool)
        path_b = tmp_path / f"repo-{damaged}" / fmt.manifest_name(b.id)
        assert path_b.read_bytes() == path_a.read_bytes()
        assert (os.stat(path_b).st_ino == os.stat(path_c).st_ino) is not damaged
