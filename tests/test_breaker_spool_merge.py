"""Breaker tests for the row-group merge (guards, content_changed, diff), the manifest spool and the part
of the index located in place. Every figure is checked against a reference computed here from the test's
own description of the trees (or the bytes written), never against the code under test.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

import drsync.repository.manifest as manifest_mod
import drsync.repository.packs as packs_mod
import drsync.repository.repo as repo_mod
import drsync.repository.spool as spool_mod
from drsync import backup, engine
from drsync.agent.primary import ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.errors import DrsyncError, IntegrityError, RefusedError
from drsync.guard import changed_files, deletion_guard, removed_files
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet
from drsync.repository.manifest import Manifest, ManifestFile, ManifestWriter
from drsync.repository.manifest_diff import content_changed, diff, same_tree
from drsync.repository.packs import ChunkLocation
from drsync.repository.repo import ChunkReader, Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from drsync.transport import Caller
from drsync.transport import grpc as transport
from tests.reliability import combinations
from tests.test_capture_any_tree import v1_bytes
from tests.test_guard_merge import _ref_changed, _ref_content_changed, _ref_removed
from tests.test_mass_change import Spec, manifest
from tests.test_peer_limits import Standby
from tests.test_snapshot_order import contents, new_repo, snap
from tests.test_spool import SpoolingLink

# --- the merge -------------------------------------------------------------------------------------------

# Name parts whose byte order differs from their str order and from each other's: control bytes, a
# byte below '/', undecodable bytes, multi-byte UTF-8, spaces.
_ODD = [b"a", b"a-b", b"a\x01", b"a.b", b"\xff", b"\xc3\xa9", b"\x7f", b"Z", b"a b", b"\xe2\x80\x8b", b"0"]



def _small_tree(data: Path, files: int) -> None:
    data.mkdir()
    for i in range(files):
        (data / f"f{i:03}").write_text(f"file {i}\n" + "y" * i)


def _snapped(repo_dir: Path, data: Path, files: int) -> tuple[Repository, Path, SnapshotInfo, bytes]:
    """A repository at ``repo_dir`` holding one snapshot of ``files`` small files made in ``data``:
    (repository, data, snapshot, its stored manifest bytes)."""
    repo = new_repo(repo_dir)
    _small_tree(data, files)
    info = snap(repo, data)
    return repo, data, info, repo.storage.read(fmt.manifest_name(info.id))

def _name(rnd: random.Random) -> str:
    return os.fsdecode(rnd.choice(_ODD) + rnd.choice(_ODD))


def _odd_tree(rnd: random.Random, n: int) -> dict[str, Spec]:
    tree: dict[str, Spec] = {}
    for _ in range(n):
        parts = [_name(rnd) for _ in range(rnd.randint(1, 3))]
        for i in range(1, len(parts)):
            tree["/".join(parts[:i])] = "dir"  # parents are directories (a tree, not a bag of paths)
        path = "/".join(parts)
        if tree.get(path) == "dir":
            continue
        r = rnd.random()
        tree[path] = (("symlink", f"t{rnd.randrange(3)}") if r < 0.15 else ("external", f"x{rnd.randrange(6)}")
                      if r < 0.3 else "dir" if r < 0.35 else f"c{rnd.randrange(8)}")  # few contents: duplicates
    return tree


def _odd_change(rnd: random.Random, old: dict[str, Spec]) -> dict[str, Spec]:
    new = dict(old)
    for path in rnd.sample(sorted(old), k=len(old) // 2):
        if path not in new:
            continue
        r = rnd.random()
        if r < 0.2:  # gone with everything below it
            for p in [p for p in new if p == path or p.startswith(path + "/")]:
                del new[p]
        elif r < 0.4 and new[path] != "dir":  # moved to another top-level name (another step of the merge)
            new[_name(rnd) + "-mv" + str(rnd.randrange(1000))] = new.pop(path)
        elif r < 0.55 and new[path] != "dir":  # a file replaced by a directory holding a file
            new[path] = "dir"
            new[path + "/" + _name(rnd)] = f"c{rnd.randrange(8)}"
        elif r < 0.7 and new[path] != "dir":
            new[path] = ("symlink", f"t{rnd.randrange(3)}")
        elif r < 0.85 and new[path] != "dir":
            new[path] = ("external", f"x{rnd.randrange(6)}")
        elif new[path] != "dir":
            new[path] = f"c{rnd.randrange(8)}"
    return new


def _ref_diff(a: dict[str, Spec], b: dict[str, Spec]) -> list[str]:
    return sorted({p for p in a if p not in b} | {p for p in b if p not in a}
                  | {p for p in a if p in b and a[p] != b[p]})


def _shuffled(m: Manifest, rnd: random.Random) -> Manifest:
    order = list(range(len(m)))
    rnd.shuffle(order)
    return Manifest(m.table.take(order))


def _check_all(a: Manifest | ManifestFile, b: Manifest | ManifestFile, old: dict[str, Spec],
               new: dict[str, Spec]) -> None:
    assert removed_files(a, b) == _ref_removed(old, new)
    for ext in (True, False):
        assert changed_files(a, b, compare_external=ext) == _ref_changed(old, new, ext)
    assert content_changed(a, b) == _ref_content_changed(old, new)
    assert diff(a, b).paths() == _ref_diff(old, new)
    assert same_tree(a, b) == (not _ref_diff(old, new))
    assert bool(diff(a, b, stop_at_first=True).paths()) == bool(_ref_diff(old, new))


@pytest.mark.parametrize(("seed", "group"), combinations(range(4), (1, 2, 5)))
def test_merge_over_odd_byte_paths_and_nested_replacements_matches_reference(
        monkeypatch: pytest.MonkeyPatch, seed: int, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    rnd = random.Random(100 + seed)
    old = _odd_tree(rnd, rnd.randrange(10, 60))
    new = _odd_change(rnd, old)
    ma, mb = manifest(old), manifest(new)
    fa, fb = ManifestFile(ma.to_bytes()), ManifestFile(mb.to_bytes())
    for x, y in ((fa, fb), (ma, fb), (fa, mb)):
        _check_all(x, y, old, new)
        _check_all(y, x, new, old)
    # Out of path order on either side (or both): the whole-table fallback, with the same answers.
    sa, sb = _shuffled(ma, rnd), _shuffled(mb, rnd)
    for x, y in ((sa, fb), (fa, sb), (sa, sb)):
        _check_all(x, y, old, new)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_an_early_stop_over_an_unsorted_manifest_answers_as_the_whole_table(
        monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    """FAULT (fixed): ``same_tree``/``diff(stop_at_first=True)`` stopped at the first step that seemed to
    differ, before reading the piece that shows the new manifest out of path order: the same tree, with
    its first path stored last, was reported as different (a removed path that is only further on)."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    tree: dict[str, Spec] = {f"f{i:02}": f"c{i}" for i in range(9)}
    m = manifest(tree)
    last_first = Manifest(m.table.take([*range(1, len(m)), 0]))  # the same rows, f00 stored last
    for new in (last_first, ManifestFile(last_first.to_bytes())):
        assert diff(m, new).paths() == []
        assert same_tree(m, new) and same_tree(ManifestFile(m.to_bytes()), new)
        assert diff(m, new, stop_at_first=True).paths() == []
    changed = Manifest(manifest({**tree, "f05": "other"}).table.take([*range(1, len(m)), 0]))
    assert not same_tree(m, changed)
    assert diff(m, changed, stop_at_first=True).paths() == ["f05"]  # compared whole: the one real change


@pytest.mark.parametrize("group", [2, 3])
def test_a_single_difference_at_every_position_around_row_group_boundaries(
        monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    old: dict[str, Spec] = {f"p{i:02}": f"c{i % 3}" for i in range(9)}  # duplicates of content
    fa = ManifestFile(manifest(old).to_bytes())
    assert fa.num_groups > 2
    for i in range(9):
        p = f"p{i:02}"
        for new in ({**old, p: "other"}, {k: v for k, v in old.items() if k != p},
                    {**{k: v for k, v in old.items() if k != p}, p + "x": old[p]},  # a move to the next path
                    {**old, p: "dir"}, {**old, p: ("symlink", "t")}, {**old, p + "!": "c9"}):
            fb = ManifestFile(manifest(new).to_bytes())
            _check_all(fa, fb, old, new)
            _check_all(fb, fa, new, old)
    assert same_tree(fa, ManifestFile(manifest(old).to_bytes()))


@pytest.mark.parametrize("group", [1, 3])
def test_empty_sides_and_all_moves(monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    empty: dict[str, Spec] = {}
    tree: dict[str, Spec] = {"a": "dir", "a/x": "c1", "a/y": "c1", "b": ("symlink", "a"), "c": ("external", "e")}
    moved: dict[str, Spec] = {"z/" + k.replace("/", "_"): v for k, v in tree.items() if v != "dir"} | {"z": "dir"}
    for old, new in ((empty, tree), (tree, empty), (empty, empty), (tree, moved), (moved, tree)):
        fa, fb = ManifestFile(manifest(old).to_bytes()), ManifestFile(manifest(new).to_bytes())
        _check_all(fa, fb, old, new)
        _check_all(manifest(old), fb, old, new)
    assert deletion_guard(ManifestFile(manifest(tree).to_bytes()), manifest(moved), 0.0) is None
    hold = deletion_guard(ManifestFile(manifest(tree).to_bytes()), manifest(empty), 0.9)
    assert hold is not None and hold.empties and hold.files == 4


def test_duplicate_paths_fall_back_to_the_whole_table() -> None:
    """A manifest holding one path twice (not strictly increasing): compared whole, as before the merge."""
    old: dict[str, Spec] = {f"f{i}": f"c{i}" for i in range(6)}
    m = manifest(old)
    doubled = Manifest(m.table.take([0, 1, 2, 2, 3, 4, 5]))
    assert removed_files(m, doubled) == (6, 0, 7)
    assert changed_files(m, doubled) == (6, 0)
    assert content_changed(m, doubled) == frozenset()
    assert removed_files(doubled, m) == (7, 0, 6)


# --- spools ----------------------------------------------------------------------------------------------


def test_a_spool_refuses_a_memoryview_of_wider_items_without_counting_it() -> None:
    """A memoryview of 4-byte items (``len`` counts items, not bytes) is refused before anything is counted
    or kept: the spool's size, hash and bytes stay those of what it took."""
    words = array("I", range(1000))
    for limit in (10, 1 << 20):
        s = Spool(memory_bytes=limit)
        s.write(b"head")
        with pytest.raises(BufferError):
            s.write(memoryview(words))
        s.write(memoryview(words.tobytes())[:8])
        want = b"head" + words.tobytes()[:8]
        assert s.size == len(want) and s.hexdigest() == blake3.blake3(want).hexdigest()
        assert b"".join(s.pieces(5)) == want == s.getvalue()
        s.close()


def test_a_file_spool_refuses_writes_once_read_as_an_in_memory_one_does() -> None:
    """FAULT (fixed): an in-memory spool refuses a write once read; a file spool took it, so a reader
    made before it (its size fixed) and the hash (covering the new bytes) no longer agreed."""
    for limit in (1 << 20, 4):
        s = Spool(memory_bytes=limit)
        s.write(b"0123456789")
        reader = s.source()
        with pytest.raises(ValueError, match="written before it is read"):
            s.write(b"more")
        assert s.hexdigest() == blake3.blake3(b"0123456789").hexdigest() and s.size == 10
        assert b"".join(s.pieces()) == b"0123456789"
        if not isinstance(reader, bytes):
            assert reader.read() == b"0123456789"
        s.close()


@pytest.mark.parametrize("seed", range(4))
def test_spools_give_what_was_written_whatever_the_limit_and_pieces(seed: int) -> None:
    rnd = random.Random(seed)
    pieces = [rnd.randbytes(rnd.choice((0, 1, 7, 100, 999))) for _ in range(rnd.randint(0, 30))]
    data = b"".join(pieces)
    for limit in sorted({0, 1, len(data) - 1, len(data), len(data) + 1, 50}):
        if limit < 0:
            continue
        s = Spool(memory_bytes=limit)
        for p in pieces:
            s.write(bytearray(p))
        assert s.in_memory == (len(data) <= limit)
        assert s.size == len(data) and s.hexdigest() == blake3.blake3(data).hexdigest()
        for size in (1, 3, 1 << 20):
            got = list(s.pieces(size))
            assert b"".join(got) == data and all(len(x) <= size for x in got) and len(got) >= 1
        r1, r2 = s.source(), s.source()
        if isinstance(r1, bytes):
            assert r1 == data == r2
        else:
            assert r1.read(5) == data[:5]
            r2.seek(len(data) // 2)
            assert r2.read() == data[len(data) // 2:]
            assert r1.read() == data[5:]
        s.close()
        if not s.in_memory:
            for read in (s.getvalue, s.source, lambda s=s: list(s.pieces())):
                with pytest.raises(ValueError):
                    read()


def test_a_closed_spool_fails_a_reader_in_the_middle_of_its_pieces() -> None:
    s = Spool(memory_bytes=10)
    s.write(os.urandom(1000))
    it = s.pieces(100)
    next(it)
    s.close()
    with pytest.raises(ValueError):
        next(it)


def _fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class _SwappingStorage(MemoryStorage):
    """Memory storage that, after the ``after``-th range read of a manifest, does ``then`` to it (swap it
    for another object's bytes, truncate it, delete it): the storage changing under a ranged read."""

    def __init__(self) -> None:
        super().__init__()
        self.arm: tuple[str, int, object] | None = None
        self.reads = 0

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if self.arm is not None and name.startswith(fmt.MANIFESTS_DIR):
            self.reads += 1
            if self.reads == self.arm[1] + 1:
                what, _, arg = self.arm
                if what == "swap":
                    self.write(name, arg)  # type: ignore[arg-type]
                elif what == "truncate":
                    self.write(name, self.read(name)[:offset])
                elif what == "delete":
                    self.delete(name)
        return super().read_range(name, offset, length)


@pytest.mark.parametrize(("what", "after"), [("swap", 1), ("swap", 3), ("truncate", 2), ("delete", 1),
                                             ("delete", 4)])
def test_a_manifest_changed_under_a_ranged_read_is_refused_without_leaks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, after: int) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 300)
    storage = _SwappingStorage()
    repo = Repository.init(storage, cluster_id="east", release="6.2.1")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(80):
        (data / f"f{i:03}").write_bytes(b"x" * i)
    first = snap(repo, data)
    (data / "f000").write_bytes(b"changed")
    second = snap(repo, data)
    m1 = storage.read(fmt.manifest_name(first.id))
    m2 = storage.read(fmt.manifest_name(second.id))
    assert len(m1) > 1500 and m1 != m2
    assert repo.load_manifest(first).table.equals(Manifest.from_bytes(m1).table)
    before = _fds()
    for read in (repo.manifest_spool, repo.load_manifest, repo.open_manifest):
        storage.write(fmt.manifest_name(first.id), m1)
        storage.reads = 0
        storage.arm = (what, after, m2)
        with pytest.raises(IntegrityError):
            read(first)
        storage.arm = None
    assert _fds() == before  # no temporary file left open


def _receiver(tmp_path: Path) -> tuple[Repository, StandbyReceiver, Path]:
    standby = new_repo(tmp_path / "standby")
    root = tmp_path / "standby-data"
    root.mkdir()
    return standby, StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="sb"), root


def test_a_commit_from_a_closed_file_spool_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool closed before its commit (its temporary file gone) is refused; no manifest, no partial object,
    no snapshot on the standby. The same manifest then commits from an open spool, stored byte for byte."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 256)
    primary, data, info, raw = _snapped(tmp_path / "primary", tmp_path / "data", 120)
    standby, rx, root = _receiver(tmp_path)
    ship_snapshot(primary, info, SpoolingLink(rx, limit=100), epoch=1, sender="east-1")  # chunks and commit
    assert standby.storage.read(fmt.manifest_name(info.id)) == raw
    assert contents(root) == contents(data)
    # A second standby gets the chunks, then a commit whose spool was closed.
    other = tmp_path / "b"
    other.mkdir()
    standby2, rx2, root2 = _receiver(other)

    class ClosingLink(SpoolingLink):
        def commit(self, epoch, sender, snapshot_doc, pieces, sender_seq=0, manifest_of="", patch_of=""):  # type: ignore[no-untyped-def]
            spool = Spool(self.limit)
            for p in pieces:
                spool.write(p)
            assert not spool.in_memory
            spool.close()
            return self.rx.commit(Caller(sender, epoch), snapshot_doc, spool, sender_seq)

    with pytest.raises((ValueError, IntegrityError)):
        ship_snapshot(primary, info, ClosingLink(rx2, limit=100), epoch=1, sender="east-1")
    assert standby2.list_snapshots() == [] and os.listdir(root2) == []
    assert not standby2.storage.exists(fmt.manifest_name(info.id))
    leftovers = [p for p in (other / "standby").rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


# --- the part of the index located in place ----------------------------------------------------------------


def _awkward(rnd: random.Random, n: int) -> list[bytes]:
    out: set[bytes] = set()
    while len(out) < n:
        k = len(out) % 5
        out.add(rnd.randbytes(32) if k == 0 else rnd.randbytes(rnd.randint(0, 31)).ljust(32, b"\0") if k == 1
                else b"\0" * 8 + bytes(rnd.choice((0, 1)) for _ in range(24)) if k == 2
                else b"\xab" * 8 + rnd.randbytes(23) + b"\0" if k == 3 else b"\0" * 31 + bytes([rnd.randrange(256)]))
    return sorted(out)


def test_a_part_of_the_index_locates_awkward_ids_as_the_whole_index_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids with NUL bytes and shared first 8 bytes, in eight index files of several row groups each:
    ``reader_for`` locates each wanted id where the whole index does, knows none it was not asked for, and
    declines (None) when one wanted id is absent, even one differing only in a NUL or its last byte."""
    monkeypatch.setattr(packs_mod, "INDEX_ROW_GROUP", 8)
    rnd = random.Random(11)
    storage = MemoryStorage()
    Repository.init(storage, cluster_id="east", release="1")
    ids = _awkward(rnd, 400)
    present, absent = ids[:320], ids[320:]
    rnd.shuffle(present)
    where: dict[bytes, ChunkLocation] = {}
    pack_ids = [rnd.randbytes(16).hex() for _ in range(12)]  # several a file: a dictionary per row group
    for f in range(8):
        rows = []
        for j, cid in enumerate(present[f * 40:(f + 1) * 40]):
            where[cid] = ChunkLocation(pack_ids[(f + rnd.randrange(5)) % 12], 8 + 100 * j, 10 + j, 10 + j, fmt.ENC_RAW)
            rows.append((cid, where[cid]))
        packs_mod.write_index(storage, f"{fmt.INDEX_DIR}{f:032x}.parquet", rows)
    fresh = Repository.open(storage)
    wanted = sorted(rnd.sample(present, 150))
    reader = fresh.reader_for(IdSet.of(wanted))
    assert isinstance(reader, ChunkReader) and fresh._index is None
    assert [reader.index.get(c) for c in wanted] == [where[c] for c in wanted]
    for cid in present:
        assert reader.has_chunk(cid) == (cid in set(wanted))
    for cid in absent[:20]:
        assert fresh.reader_for(IdSet.of([*wanted, cid])) is None
    near = bytes(wanted[3][:31]) + bytes([wanted[3][31] ^ 1])
    if near not in where:
        assert fresh.reader_for(IdSet.of([*wanted, near])) is None


def test_a_damaged_index_file_makes_the_part_of_the_index_decline_never_fail_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte of the data pages of an index file (three row groups, three packs) flipped in turn:
    ``reader_for`` gives None or a reader, never another error. FAULT (fixed): a flip in the pack column's
    dictionary indices raised IndexError out of ``iter_index_file`` (so out of ``reader_for`` and the
    index load) instead of IntegrityError. (Not fixed, a limitation shared with the whole index: index
    files carry no checksum, so some flips are taken as other locations; reads check each chunk's id.)"""
    monkeypatch.setattr(packs_mod, "INDEX_ROW_GROUP", 4)
    rnd = random.Random(3)
    storage = MemoryStorage()
    Repository.init(storage, cluster_id="east", release="1")
    packs = [rnd.randbytes(16).hex() for _ in range(3)]
    rows = [(bytes([i]) * 32, ChunkLocation(packs[i % 3], 8 + i, 5, 5, fmt.ENC_RAW)) for i in range(12)]
    name = f"{fmt.INDEX_DIR}{0:032x}.parquet"
    packs_mod.write_index(storage, name, rows)
    orig = storage.read(name)
    wanted = IdSet.of([r[0] for r in rows])
    declined = 0
    for at in range(0, 2000):
        blob = bytearray(orig)
        blob[at] ^= 0xFF
        storage.write(name, bytes(blob))
        declined += Repository.open(storage).reader_for(wanted) is None
    assert declined > 0
    storage.write(name, orig)
    reader = Repository.open(storage).reader_for(wanted)
    assert isinstance(reader, ChunkReader) and [reader.index.get(r[0]) for r in rows] == [r[1] for r in rows]


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_a_manifest_at_the_ranged_read_threshold_loads_whole_and_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delta: int) -> None:
    repo, _, info, raw = _snapped(tmp_path / "repo", tmp_path / "data", 30)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", len(raw) + delta)
    before = _fds()
    with repo.manifest_spool(info) as s:
        assert s.size == len(raw) and s.getvalue() == raw and b"".join(s.pieces(7)) == raw
        assert s.in_memory == (delta >= 0)
    assert repo.load_manifest(info).table.equals(Manifest.from_bytes(raw).table)
    assert repo.open_manifest(info).read().table.equals(Manifest.from_bytes(raw).table)
    assert _fds() == before


def test_the_standby_guards_over_its_applied_snapshot_read_by_row_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the standby's applied snapshot is read back by ranges into a file spool and a row group
    (three rows) at a time; a move of every file to another directory (the two ends of each move in
    different steps) is applied, a deletion of half the files is held, with the reference's figures."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 256)
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    standby = new_repo(tmp_path / "standby")
    root = tmp_path / "standby-data"
    root.mkdir()
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="sb",
                         max_delete_fraction=0.3)
    link = SpoolingLink(rx, limit=128)
    (data / "a").mkdir(parents=True)
    for i in range(20):
        (data / "a" / f"f{i:02}").write_text(f"file {i}\n")
    first = snap(primary, data)
    ship_snapshot(primary, first, link, epoch=1, sender="east-1")
    assert rx.state.applied_snapshot == first.id
    os.rename(data / "a", data / "z")
    moved = snap(primary, data)
    ship_snapshot(primary, moved, link, epoch=1, sender="east-1")
    assert rx.state.applied_snapshot == moved.id and contents(root) == contents(data)
    for i in range(0, 20, 2):
        (data / "z" / f"f{i:02}").unlink()
    (data / "z" / "f01").write_text("file 0\n")  # now holds removed f00's content: not a move (f01 kept)
    gone = snap(primary, data)
    with pytest.raises(RefusedError, match="10 of 20 files"):
        ship_snapshot(primary, gone, link, epoch=1, sender="east-1")
    assert rx.state.applied_snapshot == moved.id
    assert link.spooled_to_file and all(link.spooled_to_file)


@pytest.mark.parametrize("seed", range(3))
def test_manifests_of_different_row_group_sizes_merge_as_whole_tables(monkeypatch: pytest.MonkeyPatch,
                                                                     seed: int) -> None:
    """The two sides written with different row groups (2 and 7 rows) and a loaded table sliced by 3: the
    pieces of the two sides never line up, the answers still are the reference's."""
    rnd = random.Random(300 + seed)
    old = _odd_tree(rnd, rnd.randrange(20, 50))
    new = _odd_change(rnd, old)
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 2)
    fa = ManifestFile(manifest(old).to_bytes())
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 7)
    fb = ManifestFile(manifest(new).to_bytes())
    assert fa.num_groups > fb.num_groups > 1
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    for x, y in ((fa, fb), (fa, manifest(new)), (manifest(old), fb)):
        _check_all(x, y, old, new)
        _check_all(y, x, new, old)


def test_a_file_spool_writer_makes_the_same_manifest_bytes_as_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 5)
    m = manifest(_odd_tree(random.Random(9), 60))
    outs = []
    for limit in (0, 100, 1 << 30):
        w = ManifestWriter(memory_bytes=limit)
        for lo in range(0, len(m), 4):
            w.write(m.table.slice(lo, 4))
        s = w.finish()
        assert s.in_memory == (limit == 1 << 30)
        outs.append((s.getvalue(), s.hexdigest(), s.size))
        assert Manifest.from_bytes(s.source(), "m", s.size).table.equals(m.table)
        s.close()
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][1] == blake3.blake3(outs[0][0]).hexdigest() and outs[0][0] == m.to_bytes()


def test_a_same_size_same_time_rewrite_is_written_by_the_standby(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """content_changed over the applied snapshot read by row groups: a file rewritten with the same size
    and modification time (only its content digest says so) is written on the standby, in a late row
    group of the merge."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 256)
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        (data / f"f{i:02}").write_text(f"file {i:02} one\n")
        os.utime(data / f"f{i:02}", (1_700_000_000, 1_700_000_000))
    standby = new_repo(tmp_path / "standby")
    root = tmp_path / "standby-data"
    root.mkdir()
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="sb")
    link = SpoolingLink(rx, limit=128)
    ship_snapshot(primary, snap(primary, data), link, epoch=1, sender="east-1")
    assert contents(root) == contents(data)
    for i in (0, 17):
        (data / f"f{i:02}").write_text(f"file {i:02} two\n")  # same size
        os.utime(data / f"f{i:02}", (1_700_000_000, 1_700_000_000))
    second = snap(primary, data)
    ship_snapshot(primary, second, link, epoch=1, sender="east-1")
    assert rx.state.applied_snapshot == second.id
    assert contents(root) == contents(data)
    assert (root / "f17").read_text() == "file 17 two\n"


def test_readers_of_one_file_spool_in_threads_each_read_it_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 4)
    m = manifest(_odd_tree(random.Random(21), 80))
    raw = m.to_bytes()
    s = Spool(memory_bytes=64)
    for lo in range(0, len(raw), 100):
        s.write(raw[lo:lo + 100])
    assert not s.in_memory

    def work(i: int) -> bool:
        if i % 2:
            return b"".join(s.pieces(37 + i)) == raw
        return ManifestFile(s.source(), "m", s.size).read().table.equals(m.table) and \
            Manifest.from_bytes(s.source(), "m", s.size).table.equals(m.table)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))
    s.close()


def test_a_file_spool_failing_while_streamed_into_storage_leaves_nothing(tmp_path: Path) -> None:
    """``commit_snapshot`` streams a file spool into storage; the spool failing (closed) aborts the write:
    no manifest, no temporary object, no snapshot document. The same bytes from an open spool are stored
    byte for byte."""
    repo, _, info, raw = _snapped(tmp_path / "repo", tmp_path / "data", 40)
    other = new_repo(tmp_path / "other")
    s = Spool(memory_bytes=16)
    s.write(raw)
    s.close()
    with pytest.raises(ValueError):
        other.commit_snapshot(info, s)
    assert other.list_snapshots() == [] and not other.storage.exists(fmt.manifest_name(info.id))
    assert [p for p in (tmp_path / "other").rglob("*") if p.name.startswith(".tmp")] == []
    with Spool(memory_bytes=16) as s:
        s.write(raw)
        other.commit_snapshot(info, s)
    assert other.storage.read(fmt.manifest_name(info.id)) == raw
    assert other.load_manifest(other.find_snapshot(info.id)).table.equals(repo.load_manifest(info).table)


def test_a_large_unsorted_index_file_of_clashing_ids_is_located_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """One index file of 5,000 rows out of id order (more than the sorted-query threshold), most ids sharing
    their first 8 bytes with others and some only differing in trailing NULs, some listed twice (the first
    location wins, as the whole index has it), in row groups of 700: each wanted id at its location."""
    monkeypatch.setattr(packs_mod, "INDEX_ROW_GROUP", 700)
    rnd = random.Random(5)
    storage = MemoryStorage()
    Repository.init(storage, cluster_id="east", release="1")
    heads = [b"\0" * 8, b"\x01" * 8, b"\xff" * 7 + b"\0"]
    ids: set[bytes] = set()
    while len(ids) < 5000:
        tail = rnd.randbytes(rnd.randint(0, 24)).ljust(24, b"\0")
        ids.add(rnd.choice(heads) + tail)
    order = list(ids)
    rnd.shuffle(order)
    packs = [rnd.randbytes(16).hex() for _ in range(4)]
    rows = [(cid, ChunkLocation(packs[i % 4], 8 + i, 3, 3, fmt.ENC_RAW)) for i, cid in enumerate(order)]
    twice = order[:50]
    rows += [(cid, ChunkLocation(packs[0], 10**9 + i, 3, 3, fmt.ENC_RAW)) for i, cid in enumerate(twice)]
    packs_mod.write_index(storage, f"{fmt.INDEX_DIR}{1:032x}.parquet", rows)
    first = {}
    for cid, where in rows:
        first.setdefault(cid, where)
    wanted = sorted(rnd.sample(order, 2500) + twice[:10])
    fresh = Repository.open(storage)
    reader = fresh.reader_for(IdSet.of(wanted))
    assert isinstance(reader, ChunkReader)
    whole = Repository.open(storage).index
    for cid in wanted:
        assert reader.index.get(cid) == first[cid] == whole.get(cid)
    missing = next(h + b"\x02" * 24 for h in heads if h + b"\x02" * 24 not in ids)
    assert fresh.reader_for(IdSet.of([*wanted, missing])) is None


def test_a_shipment_over_real_grpc_through_file_spools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real gRPC server gathers the Commit into a spool past its (shrunk) memory: a shipment is stored
    byte for byte and applied; a commit of the next snapshot missing its last piece, or with one byte
    flipped, is refused (IntegrityError) and nothing of it is stored or applied."""
    monkeypatch.setattr(spool_mod, "SPOOL_MEMORY_BYTES", 200)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 300)
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    _small_tree(data, 60)
    (tmp_path / "sb").mkdir()
    standby = Standby(tmp_path / "sb")
    link = transport.GrpcStandbyLink(standby.addr, sender="east-1")
    try:
        first = snap(primary, data)
        ship_snapshot(primary, first, link, epoch=1, sender="east-1")
        assert standby.repo.storage.read(fmt.manifest_name(first.id)) == primary.storage.read(
            fmt.manifest_name(first.id))
        assert contents(tmp_path / "sb" / "data") == contents(data)
        (data / "f07").write_text("seven, again\n")
        second = snap(primary, data)
        raw = primary.storage.read(fmt.manifest_name(second.id))
        assert len(raw) > 1000
        doc = primary.storage.read(fmt.snapshot_name(second.id))
        doc = dataclasses.replace(SnapshotInfo.from_bytes(doc, "d"), seq=0).to_bytes()
        pieces = [raw[lo:lo + 256] for lo in range(0, len(raw), 256)]
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 1
        for bad in (pieces[:-1], [bytes(flipped)]):
            with pytest.raises(IntegrityError):
                link.commit(1, "east-1", doc, iter(bad))
            assert not standby.repo.storage.exists(fmt.manifest_name(second.id))
            assert standby.rx.state.applied_snapshot == first.id
        assert contents(tmp_path / "sb" / "data") != contents(data)
        ship_snapshot(primary, second, link, epoch=1, sender="east-1")
        assert standby.repo.storage.read(fmt.manifest_name(second.id)) == raw
        assert contents(tmp_path / "sb" / "data") == contents(data)
    finally:
        link.close()
        standby.close()


@pytest.mark.parametrize("mode", ["full", "light", "dataless"])
def test_backups_of_a_manifest_read_into_a_file_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      mode: str) -> None:
    """Each backup mode from a manifest past the ranged-read threshold: the backup's manifest is what its
    document's hash says, and (full, light) the backup restores the tree (less the light backup's globs)."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 300)
    monkeypatch.setattr(spool_mod, "SPOOL_MEMORY_BYTES", 300)
    repo = new_repo(tmp_path / "repo")
    data = tmp_path / "data"
    (data / "bulk").mkdir(parents=True)
    for i in range(40):
        (data / f"f{i:02}").write_text(f"file {i}\n")
        (data / "bulk" / f"b{i:02}").write_text(f"bulk {i}\n" * 50)
    info = snap(repo, data)
    made = backup.create_backup(repo, info.id, str(tmp_path / "backups"), mode=mode,
                                light_exclude=("bulk",) if mode == "light" else ())
    stored = (Path(made.path) / fmt.manifest_name(info.id)).read_bytes()
    doc = SnapshotInfo.from_bytes((Path(made.path) / fmt.snapshot_name(info.id)).read_bytes(), "d")
    assert blake3.blake3(stored).hexdigest() == doc.manifest_hash
    want = contents(data)
    if mode == "full":
        assert stored == repo.storage.read(fmt.manifest_name(info.id))
    if mode == "light":
        want = {k: v for k, v in want.items() if not k.startswith("bulk")}
        assert not any(p.startswith(b"bulk") for p in Manifest.from_bytes(stored).table.column("path").to_pylist())
    if mode != "dataless":
        assert backup.verify_backup(made.path).ok
        backup.restore_backup(made.path, str(tmp_path / "out"))
        assert contents(tmp_path / "out") == want




@pytest.mark.parametrize("seed", range(2))
def test_a_version_1_applied_manifest_merges_as_the_reference_says(monkeypatch: pytest.MonkeyPatch,
                                                                   seed: int) -> None:
    """An applied snapshot stored by drsync before version 2 (UTF-8 paths, row groups of 3): read and
    upgraded a row group at a time, merged with a version-2 manifest of another row-group size."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 4)
    rnd = random.Random(500 + seed)
    old: dict[str, Spec] = {}
    for i in range(40):
        name = rnd.choice(["a", "é", "z", "a-b", "a b"]) + f"{i:02}"
        old[name] = (("symlink", "t") if i % 9 == 0 else ("external", f"x{i % 4}") if i % 7 == 0
                     else f"c{rnd.randrange(6)}")
    new = _odd_change(rnd, old)
    v1 = ManifestFile(v1_bytes(manifest(old), 3))
    assert v1.num_groups > 5
    for y in (manifest(new), ManifestFile(manifest(new).to_bytes())):
        _check_all(v1, y, old, new)
        _check_all(y, v1, new, old)


def test_a_restore_over_a_damaged_index_file_never_writes_a_wrong_byte(tmp_path: Path) -> None:
    """A byte of the repository's index file flipped, position after position (index files carry no
    checksum: some flips move a chunk's location): each restore, located through ``reader_for``, either
    fails with a drsync error or writes exactly the tree."""
    repo = new_repo(tmp_path / "repo")
    data = tmp_path / "data"
    data.mkdir()
    rnd = random.Random(8)
    for i in range(12):
        (data / f"f{i:02}").write_bytes(rnd.randbytes(rnd.randint(1, 3000)))
    info = snap(repo, data)
    want = contents(data)
    [index] = list((tmp_path / "repo" / "index").iterdir())
    orig = index.read_bytes()
    outcomes: Counter[str] = Counter()
    for n, at in enumerate(range(0, len(orig), max(1, len(orig) // 60))):
        blob = bytearray(orig)
        blob[at] ^= 0x55
        index.write_bytes(bytes(blob))
        out = tmp_path / f"out{n}"
        fresh = Repository.open(LocalStorage(tmp_path / "repo"))
        try:
            engine.restore_snapshot(fresh, info.id, str(out), cluster_id="east", release="6.2.1")
        except DrsyncError:
            outcomes["refused"] += 1
            continue
        assert contents(out) == want, f"byte {at} of the index flipped: a restore wrote a wrong tree"
        outcomes["right"] += 1
    index.write_bytes(orig)
    assert outcomes["refused"] and outcomes["right"]
