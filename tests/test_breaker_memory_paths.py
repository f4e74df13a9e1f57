"""Breaker: the memory paths of 71f7ed2 (manifests and index files read by ranges, the chunk check of an
apply limited to what it writes, the standby's no-change check on row groups, the change guard on row
groups). Each test asserts a promise; a failure is a broken promise.

Found, and fixed: a refused restore into a new nested target left the parents it had made (the chunk
check ran after the target was made: a new target is now checked first, excluded paths aside); the
streamed presence check read only the chunk column and said yes over an index file damaged elsewhere
(now checked as a load checks it); a manifest read by ranges was decoded from a second read of the
stored object, so one changed after its hash check could be decoded as the snapshot (now copied into a
local temporary file while hashed, and decoded from that copy); one deleted during the decode raised
ObjectMissing instead of IntegrityError."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drsync import engine
from drsync.apply import apply_manifest
from drsync.errors import IntegrityError
from drsync.guard import change_guard, changed_files
from drsync.repository import format as fmt
from drsync.repository import manifest as manifest_mod
from drsync.repository import repo as repo_mod
from drsync.repository.ids import IdSet
from drsync.repository.manifest import Manifest, ManifestFile
from drsync.repository.manifest_diff import diff, same_tree
from drsync.repository.packs import IndexRows, read_index_file, write_index
from drsync.repository.repo import Repository
from drsync.storage import ObjectMissing, Storage
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import age_tree, make_tree, run_drsync, tree_state
from tests.reliability import combinations

CID, REL = "c", "1"


def full_state(path: Path) -> dict[str, tuple]:
    s = path.lstat()
    return {".": (s.st_mode & 0o7777, s.st_mtime_ns), **tree_state(path)}


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "repo", create=True)
    return MemoryStorage()


def _repo_with_snapshots(storage: Storage, tmp_path: Path) -> tuple[Repository, list]:
    repo = Repository.init(storage, cluster_id=CID, release=REL)
    data = tmp_path / "data"
    make_tree(data, files=40)
    age_tree(data)
    s1 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    (data / "catalog" / "added.txt").write_text("added\n")
    age_tree(data)
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    return repo, [s1, s2]


def _whole(repo: Repository, info) -> Manifest:  # type: ignore[no-untyped-def]
    return Manifest.from_bytes(repo.manifest_bytes(info), "whole")


# --- 1. manifests read by ranges -----------------------------------------------------------------


@pytest.mark.parametrize("delta", ["size", "size-1", "size+1", "half", "third", "one", "size*2"])
def test_ranged_manifest_equals_whole_parse_at_every_boundary(storage: Storage, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, delta: str) -> None:
    repo, (s1, s2) = _repo_with_snapshots(storage, tmp_path)
    for info in (s1, s2):
        size = storage.list(fmt.manifest_name(info.id))[0].size
        want = _whole(repo, info)
        limit = {"size": size, "size-1": size - 1, "size+1": size + 1, "half": size // 2, "third": size // 3,
                 "one": 1, "size*2": size * 2}[delta]
        monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", limit)
        got = Repository.open(storage).load_manifest(info)
        assert got.table.equals(want.table)
        opened = Repository.open(storage).open_manifest(info)
        assert opened.read().table.equals(want.table)
        assert opened.file_count() == want.file_count()


def _damage(storage: Storage, name: str, how: str, other: str) -> None:
    data = storage.read(name)
    if how == "flip-first":
        new = bytes([data[0] ^ 0xFF]) + data[1:]
    elif how == "flip-middle":
        k = len(data) // 2
        new = data[:k] + bytes([data[k] ^ 0x01]) + data[k + 1:]
    elif how == "flip-last":
        new = data[:-1] + bytes([data[-1] ^ 0x01])
    elif how == "truncate-1":
        new = data[:-1]
    elif how == "truncate-half":
        new = data[: len(data) // 2]
    elif how == "append-1":
        new = data + b"\0"
    elif how == "append-copy":
        new = data + data
    elif how == "swap":
        new = storage.read(other)
    elif how == "empty":
        new = b""
    elif how == "missing":
        storage.delete(name)
        return
    else:
        raise AssertionError(how)
    storage.write(name, new)


DAMAGE = ["flip-first", "flip-middle", "flip-last", "truncate-1", "truncate-half", "append-1", "append-copy",
          "swap", "empty", "missing"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("limit", ["tiny", "size-1", "size", "default"])
def test_damaged_manifest_is_integrity_error_by_ranges_and_whole(storage: Storage, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, how: str,
                                                               limit: str) -> None:
    _repo, (s1, s2) = _repo_with_snapshots(storage, tmp_path)
    name = fmt.manifest_name(s1.id)
    size = storage.list(name)[0].size
    lim = {"tiny": 1000, "size-1": size - 1, "size": size, "default": repo_mod.RANGED_MANIFEST_BYTES}[limit]
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", lim)
    _damage(storage, name, how, fmt.manifest_name(s2.id))
    for call in ("load_manifest", "open_manifest"):
        fresh = Repository.open(storage)
        with pytest.raises(IntegrityError):
            m = getattr(fresh, call)(s1)
            if isinstance(m, ManifestFile):
                m.read()


class _Swapping:
    """A storage that, once the whole manifest has been read through once (the hash), serves other
    bytes for it (or none): the object changed between the hash check and the decoding."""

    def __init__(self, inner: Storage, name: str, then: bytes | None) -> None:
        self.inner, self.name, self.then, self.hashed = inner, name, then, False

    def __getattr__(self, attr: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, attr)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if name == self.name and self.hashed:
            if self.then is None:
                raise ObjectMissing(f"{name} is missing")
            return self.then[offset:offset + length]
        out = self.inner.read_range(name, offset, length)
        if name == self.name and offset > 0 and not out:
            self.hashed = True  # the hashing loop has read to the end
        return out


@pytest.mark.parametrize("then", ["other-manifest", "same-size-other", "vanished"])
def test_manifest_changed_after_its_hash_is_never_decoded_as_the_snapshot(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        then: str) -> None:
    """The whole-bytes path decodes exactly the bytes it hashed; the ranged path hashes, then reads the
    object again. A manifest replaced (or deleted) in between must still be IntegrityError, never a wrong
    table (the whole-bytes path can never return one)."""
    storage = MemoryStorage()
    repo, (s1, s2) = _repo_with_snapshots(storage, tmp_path)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 1000)
    name = fmt.manifest_name(s1.id)
    other = storage.read(fmt.manifest_name(s2.id)) if then == "other-manifest" else None
    want = _whole(repo, s1)
    if then == "same-size-other":
        size = len(storage.read(name))
        t = want.table
        for mode in range(0o600, 0o777):
            col = pa.array([mode, *t.column("mode").to_pylist()[1:]], t.schema.field("mode").type)
            cand = Manifest(t.set_column(t.schema.get_field_index("mode"), "mode", col)).to_bytes()
            if len(cand) == size and cand != storage.read(name):
                other = cand
                break
        assert other is not None
    for call in ("load_manifest", "open_manifest"):
        fresh = Repository.open(_Swapping(storage, name, other))  # type: ignore[arg-type]
        try:
            m = getattr(fresh, call)(s1)
            got = m.read() if isinstance(m, ManifestFile) else m
        except IntegrityError:
            continue
        assert got.table.equals(want.table), (f"{call}: a manifest changed after its hash check was decoded as "
                                              f"snapshot {s1.id} ({got.table.num_rows} rows, want "
                                              f"{want.table.num_rows})")


# --- 2. index files read by ranges ----------------------------------------------------------------


def _index_items(repo: Repository) -> dict:
    return dict(repo.index.items())


@pytest.mark.parametrize("limit", [1, 200, "size-1", "size", "size+1"])
def test_ranged_index_load_equals_whole_load(storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            limit: object) -> None:
    _repo, _ = _repo_with_snapshots(storage, tmp_path)
    want = _index_items(Repository.open(storage))
    sizes = [o.size for o in storage.list(fmt.INDEX_DIR)]
    assert sizes
    lim = {"size-1": min(sizes) - 1, "size": min(sizes), "size+1": min(sizes) + 1}.get(limit, limit)  # type: ignore[call-overload]
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", lim)
    assert _index_items(Repository.open(storage)) == want


@pytest.mark.parametrize("how", ["flip-middle", "truncate-1", "truncate-half", "append-1", "empty", "flip-first",
                                 "flip-last"])
def test_damaged_index_file_by_ranges_is_integrity_error(storage: Storage, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    _repo, _ = _repo_with_snapshots(storage, tmp_path)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 100)
    name = storage.list(fmt.INDEX_DIR)[0].name
    # What the whole-bytes load says of this damage is the reference.
    _damage(storage, name, how, name)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 1 << 40)
    try:
        whole = _index_items(Repository.open(storage))
        whole_err = None
    except IntegrityError as e:
        whole, whole_err = None, e
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 100)
    if whole_err is not None:
        with pytest.raises(IntegrityError):
            _index_items(Repository.open(storage))
    else:
        assert _index_items(Repository.open(storage)) == whole


class _VanishAfterFirstRead:
    """Deletes ``name`` after the first ranged read of it (a GC replacing it while we load)."""

    def __init__(self, inner: Storage, name: str) -> None:
        self.inner, self.name, self.reads = inner, name, 0

    def __getattr__(self, attr: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, attr)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if name == self.name:
            self.reads += 1
            if self.reads > 1:
                raise ObjectMissing(f"{name} is missing")
        return self.inner.read_range(name, offset, length)

    def read(self, name: str) -> bytes:
        if name == self.name:
            raise ObjectMissing(f"{name} is missing")
        return self.inner.read(name)


def test_index_file_deleted_while_loading_by_ranges_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = MemoryStorage()
    _repo_with_snapshots(storage, tmp_path)
    names = [o.name for o in storage.list(fmt.INDEX_DIR)]
    assert len(names) >= 2
    gone = names[0]
    rest_rows = [read_index_file(storage.read(n), n) for n in names[1:]]
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 100)
    repo = Repository.open(_VanishAfterFirstRead(storage, gone))  # type: ignore[arg-type]
    items = _index_items(repo)  # no error: the vanished file is skipped
    held = {bytes(i) for r in rest_rows for i in r.ids}
    assert set(items) == held
    # all_indexed with the vanishing file: False, never a wrong True, never an exception
    repo2 = Repository.open(_VanishAfterFirstRead(storage, gone))  # type: ignore[arg-type]
    gone_ids = read_index_file(storage.read(gone), gone).ids
    assert repo2.all_indexed(IdSet.of(gone_ids)) is False


# --- 3. all_indexed ------------------------------------------------------------------------------


def test_all_indexed_true_and_false(storage: Storage, tmp_path: Path) -> None:
    repo, (_s1, s2) = _repo_with_snapshots(storage, tmp_path)
    ids = repo.load_manifest(s2).chunk_id_array()
    assert Repository.open(storage).all_indexed(IdSet.of(ids)) is True
    assert Repository.open(storage).all_indexed(IdSet.empty()) is True
    stranger = blake3.blake3(b"never stored").digest()
    for extra in ([stranger], [stranger, b"\xff" * 32], [b"\0" * 32]):
        wanted = IdSet.of(np.concatenate([ids, np.array(extra, dtype=ids.dtype)]))
        fresh = Repository.open(storage)
        assert fresh.all_indexed(wanted) is False
        assert fresh.all_indexed(IdSet.of(np.array(extra, dtype=ids.dtype))) is False
        loaded = Repository.open(storage)
        _ = loaded.index
        assert loaded.all_indexed(wanted) is False


def _column_ranges(data: bytes) -> dict[str, list[tuple[int, int]]]:
    md = pq.ParquetFile(pa.BufferReader(data)).metadata
    out: dict[str, list[tuple[int, int]]] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else \
                col.data_page_offset
            out.setdefault(col.path_in_schema, []).append((start, start + col.total_compressed_size))
    return out


def test_all_indexed_is_false_when_an_index_file_is_damaged_outside_the_chunk_column(
        tmp_path: Path) -> None:
    """Damage that the index load reports (IntegrityError) in a column other than the chunk ids:
    all_indexed must say False (the promise: never a wrong True when an index file is damaged)."""
    storage = MemoryStorage()
    repo, (_s1, s2) = _repo_with_snapshots(storage, tmp_path)
    ids = repo.load_manifest(s2).chunk_id_array()
    name = max(storage.list(fmt.INDEX_DIR), key=lambda o: o.size).name
    data = storage.read(name)
    ranges = _column_ranges(data)
    found = None
    for col, spans in ranges.items():
        if col == "chunk":
            continue
        for lo, hi in spans:
            for k in range(lo, hi):
                bad = data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1:]
                storage.write(name, bad)
                try:
                    _index_items(Repository.open(storage))
                except IntegrityError:
                    found = (col, k)
                    break
            if found:
                break
        if found:
            break
    assert found is not None, "no detectable damage outside the chunk column found"
    assert Repository.open(storage).all_indexed(IdSet.of(ids)) is False, \
        f"index file {name} damaged in column {found[0]} at byte {found[1]} (the index load says IntegrityError), " \
        f"yet all_indexed says every id is indexed"


@pytest.mark.parametrize("how", ["flip-middle", "truncate-1", "truncate-half", "append-1", "empty"])
def test_all_indexed_never_true_when_the_index_load_fails(storage: Storage, tmp_path: Path, how: str) -> None:
    repo, (_s1, s2) = _repo_with_snapshots(storage, tmp_path)
    ids = repo.load_manifest(s2).chunk_id_array()
    name = max(storage.list(fmt.INDEX_DIR), key=lambda o: o.size).name
    _damage(storage, name, how, name)
    try:
        _index_items(Repository.open(storage))
    except IntegrityError:
        assert Repository.open(storage).all_indexed(IdSet.of(ids)) is False
    else:
        pytest.skip("this damage is not detected by the index load either")


# --- 4. apply: the chunk check covers what the apply writes ------------------------------------


def drop_chunks(storage: Storage, lost: set[bytes]) -> None:
    """Take ``lost`` out of every index file (as if their packs had been lost and the index repaired)."""
    dropped = 0
    for obj in list(storage.list(fmt.INDEX_DIR)):
        rows = read_index_file(storage.read(obj.name), obj.name)
        keep = np.array([bytes(i) not in lost for i in rows.ids], bool)
        if keep.all():
            continue
        dropped += int((~keep).sum())
        write_index(storage, obj.name, IndexRows(rows.ids[keep], rows.pack[keep], rows.offset[keep],
                                                 rows.stored_length[keep], rows.raw_length[keep],
                                                 rows.encoding[keep], rows.packs))
    assert dropped == len(lost)


def chunks_of(m: Manifest, path: str) -> list[bytes]:
    e = next(e for e in m.entries() if e.path == path)
    return list(e.chunks)


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "new.txt").write_bytes(b"brand new file " * 50)
    (src / "changed.txt").write_bytes(b"the snapshot's version " * 40)
    (src / "typechg").write_bytes(b"a file where the target has a directory " * 10)
    (src / "d" / "kept.txt").write_bytes(b"kept as is " * 30)
    (src / "empty").write_bytes(b"")
    (src / "hl-a").write_bytes(b"hard linked content " * 20)
    os.link(src / "hl-a", src / "hl-b")
    os.symlink("d/kept.txt", src / "link")
    age_tree(src)
    return src


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    storage = LocalStorage(tmp_path / "repo", create=True)
    repo = Repository.init(storage, cluster_id=CID, release=REL)
    src = _src(tmp_path)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    return storage, repo, src, info


def _holding_target(tmp_path: Path, repo: Repository, info, name: str = "target") -> Path:  # type: ignore[no-untyped-def]
    target = tmp_path / name
    engine.restore_snapshot(repo, info.id, str(target), cluster_id=CID, release=REL)
    return target


def _fails_unchanged(storage: Storage, info, target: Path, *, loaded: bool = False, **kw) -> None:  # type: ignore[no-untyped-def]
    existed = target.exists()
    before = full_state(target) if existed else None
    repo = Repository.open(storage)
    if loaded:
        _ = repo.index
    m = repo.load_manifest(info)
    with pytest.raises(IntegrityError, match="missing|damaged"):
        apply_manifest(m, repo, str(target), **kw)
    if existed:
        assert full_state(target) == before
    else:
        assert not os.path.lexists(target)


@pytest.mark.parametrize("loaded", [False, True], ids=["index-unloaded", "index-loaded"])
@pytest.mark.parametrize("path", ["new.txt", "changed.txt", "typechg", "hl-a", "d/kept.txt"])
def test_missing_chunk_of_a_written_file_fails_and_changes_nothing(setup, tmp_path: Path, loaded: bool,  # type: ignore[no-untyped-def]
                                                                   path: str) -> None:
    storage, repo, _src, info = setup
    target = _holding_target(tmp_path, repo, info)
    m = repo.load_manifest(info)
    # Make the target need ``path`` written.
    if path == "new.txt":
        (target / "new.txt").unlink()
    elif path == "changed.txt":
        (target / "changed.txt").write_bytes(b"the target's older version " * 40)
    elif path == "typechg":
        (target / "typechg").unlink()
        (target / "typechg").mkdir()
        (target / "typechg" / "inner").write_text("x")
    elif path == "hl-a":
        (target / "hl-a").unlink()
        (target / "hl-b").unlink()
    elif path == "d/kept.txt":
        (target / "d" / "kept.txt").write_bytes(b"x")
    age_tree(target, 100)
    drop_chunks(storage, set(chunks_of(m, path)))
    _fails_unchanged(storage, info, target, loaded=loaded)
    _fails_unchanged(storage, info, target, loaded=loaded, dry_run=True)


@pytest.mark.parametrize("nested", [0, 1, 3])
def test_missing_chunk_into_a_new_target_leaves_no_directory(setup, tmp_path: Path, nested: int) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    drop_chunks(storage, set(chunks_of(repo.load_manifest(info), "new.txt")))
    top = tmp_path / "fresh"
    target = top
    for k in range(nested):
        target = target / f"level{k}"
    _fails_unchanged(storage, info, target)
    _fails_unchanged(storage, info, target, dry_run=True)
    assert not os.path.lexists(top), f"{top} left behind by a refused restore into {target}"


def test_missing_chunk_restore_via_engine_into_nested_new_target(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    drop_chunks(storage, set(chunks_of(repo.load_manifest(info), "new.txt")))
    target = tmp_path / "a" / "b"
    with pytest.raises(IntegrityError):
        engine.restore_snapshot(Repository.open(storage), info.id, str(target), cluster_id=CID, release=REL)
    assert not os.path.lexists(tmp_path / "a")


@pytest.mark.parametrize("checksum", [False, True])
def test_target_holding_the_snapshot_needs_no_chunk(setup, tmp_path: Path, checksum: bool) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    target = _holding_target(tmp_path, repo, info)
    before = tree_state(target)
    m = repo.load_manifest(info)
    # Every chunk of the snapshot is gone.
    drop_chunks(storage, set(m.chunk_ids()))
    fresh = Repository.open(storage)
    result = apply_manifest(fresh.load_manifest(info), fresh, str(target), checksum=checksum)
    assert result.written_files == 0
    assert tree_state(target) == before


def test_checksum_restore_over_silently_changed_file_with_missing_chunk(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    target = _holding_target(tmp_path, repo, info)
    p = target / "changed.txt"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[3] ^= 0x20
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    drop_chunks(storage, set(chunks_of(repo.load_manifest(info), "changed.txt")))
    _fails_unchanged(storage, info, target, checksum=True)


def test_exclude_keeps_the_missing_chunk_out_of_the_check(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    drop_chunks(storage, set(chunks_of(repo.load_manifest(info), "new.txt")))
    fresh = Repository.open(storage)
    m = fresh.load_manifest(info)
    target = tmp_path / "t-excl"
    apply_manifest(m, fresh, str(target), exclude=("new.txt",))
    assert not (target / "new.txt").exists() and (target / "changed.txt").exists()
    # Not excluded: refused, target as it was.
    _fails_unchanged(storage, info, target, exclude=("changed.txt",))


def test_structure_only_needs_no_chunk(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    m = repo.load_manifest(info)
    drop_chunks(storage, set(m.chunk_ids()))
    fresh = Repository.open(storage)
    target = tmp_path / "t-struct"
    apply_manifest(fresh.load_manifest(info), fresh, str(target), structure_only=True)
    assert (target / "d").is_dir()


def test_only_empty_files_written_needs_no_chunk(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    target = _holding_target(tmp_path, repo, info)
    (target / "empty").unlink()
    m = repo.load_manifest(info)
    drop_chunks(storage, set(m.chunk_ids()))
    fresh = Repository.open(storage)
    r = apply_manifest(fresh.load_manifest(info), fresh, str(target))
    assert r.written_files == 1 and (target / "empty").read_bytes() == b""


def test_hard_link_member_linked_to_a_held_leader_needs_no_chunk(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    target = _holding_target(tmp_path, repo, info)
    m = repo.load_manifest(info)
    member = next(e.path for e in m.entries() if e.hardlink)
    (target / member).unlink()
    drop_chunks(storage, set(chunks_of(m, "hl-a")))
    fresh = Repository.open(storage)
    try:
        apply_manifest(fresh.load_manifest(info), fresh, str(target))
    except IntegrityError:
        # Acceptable only if the target is unchanged (a planner that rewrites the group writes hl-a).
        pass
    else:
        assert os.path.samefile(target / "hl-a", target / "hl-b")


def _without_repo(state: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in state.items() if not k.startswith("drsync-repo")}


def test_restore_into_a_target_holding_the_repository(tmp_path: Path) -> None:
    target = tmp_path / "target"
    src = _src(tmp_path)
    shutil.copytree(src, target, symlinks=True)
    store = target / "drsync-repo"
    repo = engine.init_repository(str(store), cluster_id=CID, release=REL)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    (target / "new.txt").unlink()
    (target / "changed.txt").write_bytes(b"old")
    age_tree(target, 100)
    drop_chunks(repo.storage, set(chunks_of(repo.load_manifest(info), "new.txt")))
    before = _without_repo(tree_state(target))
    with pytest.raises(IntegrityError):
        engine.restore_snapshot(engine.open_repository(str(store)), info.id, str(target), cluster_id=CID, release=REL)
    assert _without_repo(tree_state(target)) == before
    with pytest.raises(IntegrityError):
        engine.restore_snapshot(engine.open_repository(str(store)), info.id, str(target), cluster_id=CID,
                                release=REL, dry_run=True)
    assert _without_repo(tree_state(target)) == before
    assert engine.open_repository(str(store)).verify  # the repository is still there


def test_all_indexed_wrong_true_on_damaged_index_still_changes_nothing(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """all_indexed says True over an index file the load rejects (see above): the apply must still fail
    with IntegrityError and leave a new target absent."""
    storage, _repo, _src, info = setup
    name = max(storage.list(fmt.INDEX_DIR), key=lambda o: o.size).name
    _damage(storage, name, "flip-middle", name)
    with pytest.raises(IntegrityError):
        _index_items(Repository.open(storage))
    target = tmp_path / "t-dmg"
    fresh = Repository.open(storage)
    with pytest.raises(IntegrityError):
        apply_manifest(fresh.load_manifest(info), fresh, str(target))
    assert not os.path.lexists(target)


def test_cli_restore_and_dry_run_with_a_missing_chunk(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage, repo, _src, info = setup
    drop_chunks(storage, set(chunks_of(repo.load_manifest(info), "new.txt")))
    target = tmp_path / "cli-target"
    codes = []
    for extra in ((), ("--dry-run",)):
        r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra", info.id, "--repo",
                       tmp_path / "repo", "--target", target, *extra)
        codes.append(r.code)
        assert r.code != 0 and "missing" in r.err and "Traceback" not in r.err, (extra, r.code, r.err)
        assert not os.path.lexists(target)
    assert codes[0] == codes[1]


# --- 5. same_tree / diff(stop_at_first) over several row groups -------------------------------------


def _rows(n: int, prefix: str = "f") -> dict[str, dict]:  # type: ignore[type-arg]
    return {f"{prefix}{i:04}": {"type": "file", "mode": 0o644, "size": 3, "mtime_ns": 1_000_000_000 + i,
                                "target": None, "content": blake3.blake3(f"c{i}".encode()).digest(),
                                "hardlink": None} for i in range(n)}


def _mk(rows: dict[str, dict]) -> Manifest:  # type: ignore[type-arg]
    paths = sorted(rows)
    n = len(paths)
    col = {k: [rows[p][k] for p in paths] for k in ("type", "mode", "size", "mtime_ns", "target", "content",
                                                     "hardlink")}
    return Manifest.from_columns({"path": paths, **col, "uid": [0] * n, "gid": [0] * n, "ctime_ns": [0] * n,
                                  "inode": list(range(1, n + 1)), "chunks": [[] for _ in paths],
                                  "chunk_sizes": [[] for _ in paths]})


def _variants(n: int) -> dict[str, dict]:  # type: ignore[type-arg]
    base = _rows(n)
    keys = sorted(base)
    out: dict[str, dict] = {}  # type: ignore[type-arg]

    def v(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        r = {k: dict(x) for k, x in base.items()}
        fn(r)
        out[name] = r

    for where, k in (("first", keys[0]), ("last", keys[-1]), ("mid", keys[n // 2]), ("group-edge", keys[8]),
                     ("before-edge", keys[7])):
        v(f"mode-{where}", lambda r, k=k: r[k].update(mode=0o600))
        v(f"size-{where}", lambda r, k=k: r[k].update(size=4))
        v(f"mtime-{where}", lambda r, k=k: r[k].update(mtime_ns=r[k]["mtime_ns"] + 1))
        v(f"mtime-s-{where}", lambda r, k=k: r[k].update(mtime_ns=r[k]["mtime_ns"] + 10**9))
        v(f"content-{where}", lambda r, k=k: r[k].update(content=b"\1" * 32))
        v(f"removed-{where}", lambda r, k=k: r.pop(k))
        v(f"symlink-{where}", lambda r, k=k: r[k].update(type="symlink", target="x", content=None, size=1))
        v(f"hardlink-{where}", lambda r, k=k: r[k].update(hardlink=keys[0] if k != keys[0] else keys[1]))
    v("added-before-all", lambda r: r.update({"a": dict(base[keys[0]])}))
    v("added-after-all", lambda r: r.update({"zzz": dict(base[keys[0]])}))
    v("added-after-all-many", lambda r: r.update({f"zz{i:03}": dict(base[keys[0]]) for i in range(20)}))
    v("added-mid", lambda r: r.update({keys[n // 2] + "x": dict(base[keys[0]])}))
    v("renamed-last", lambda r: r.update({keys[-1] + "b": r.pop(keys[-1])}))
    v("all-removed", lambda r: r.clear())
    out["same"] = {k: dict(x) for k, x in base.items()}
    return out


def _reference(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return a == b


N_ROWS = 50


def _n_rows(group: int) -> int:
    """Rows for a row-group size: 50 rows span several groups of 7 or 8; with groups of 1 to 3 rows,
    12 rows already make 4 to 12 groups, and every variant's position (first, 7, 8, middle, last) is
    still a group's edge or inside one (each group costs pyarrow about a millisecond a read)."""
    return N_ROWS if group >= 7 else 12


@pytest.mark.parametrize(("group", "kinds"), combinations([8, 7, 50, 49, 1], ["FF", "MF", "FM", "MM"]))
def test_same_tree_says_false_for_every_difference(monkeypatch: pytest.MonkeyPatch, kinds: str, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    base = _rows(_n_rows(group))
    failures = []
    for name, rows in _variants(_n_rows(group)).items():
        for old_rows, new_rows, label in ((base, rows, "base->v"), (rows, base, "v->base")):
            ms = [_mk(old_rows), _mk(new_rows)]
            sides = [m if k == "M" else ManifestFile(m.to_bytes()) for m, k in zip(ms, kinds, strict=True)]
            want_same = _reference(old_rows, new_rows)
            try:
                got = same_tree(*sides)
                d = diff(*sides, stop_at_first=True)
                full = diff(*sides)
            except Exception as e:
                failures.append(f"{name} {label}: {type(e).__name__}: {e}")
                continue
            if got != want_same or bool(d.paths()) == want_same or bool(full.paths()) == want_same:
                failures.append(f"{name} {label}: same_tree={got}, want {want_same}")
            # the full diff must be exact
            added = sorted(set(new_rows) - set(old_rows))
            removed = sorted(set(old_rows) - set(new_rows))
            changed = sorted(k for k in set(old_rows) & set(new_rows) if old_rows[k] != new_rows[k])
            if (sorted(full.added), sorted(full.removed), sorted(full.changed)) != (added, removed, changed):
                failures.append(f"{name} {label}: diff {full} want {(added, removed, changed)}")
    assert not failures, "\n".join(failures)


def test_same_tree_of_empty_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 4)
    empty, one = Manifest.empty(), _mk(_rows(9))
    for a in (empty, ManifestFile(empty.to_bytes())):
        for b in (one, ManifestFile(one.to_bytes())):
            assert same_tree(a, b) is False and same_tree(b, a) is False
        assert same_tree(a, empty) is True


# --- 6. change guard with a ManifestFile --------------------------------------------------------------


@pytest.mark.parametrize("group", [3, 8, 65536])
def test_change_guard_same_numbers_for_manifest_file(monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    base = _rows(_n_rows(group))
    for name, rows in _variants(_n_rows(group)).items():
        for old_rows, new_rows in ((base, rows), (rows, base)):
            old, new = _mk(old_rows), _mk(new_rows)
            f = ManifestFile(old.to_bytes())
            for ext in (True, False):
                got = changed_files(f, new, compare_external=ext)
                assert got == changed_files(old, new, compare_external=ext), name
                for lim in (0.0, 0.01, 0.5):
                    a = change_guard(f, new, lim, compare_external=ext)
                    b = change_guard(old, new, lim, compare_external=ext)
                    assert (a[0] == b[0] or (a[0] != a[0] and b[0] != b[0])) and a[1] == b[1], (name, lim, a, b)
    empty = Manifest.empty()
    ef = ManifestFile(empty.to_bytes())
    one = _mk(_rows(5))
    assert changed_files(ef, one) == changed_files(empty, one)
    assert change_guard(ef, one, 0.5) == change_guard(empty, one, 0.5)


# --- 4b. the standby's committer: take() and _holds_already ---------------------------------------


def _committer(tmp_path: Path, repo: Repository, root: Path):  # type: ignore[no-untyped-def]
    from drsync.agent.committer import Committer
    from drsync.agent.state import StateStore

    return Committer(repo, str(root), StateStore(str(tmp_path / "state")), agent="standby",
                     max_delete_fraction=1.0, max_change_fraction=1.0)


def _small_row_groups_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int
                               ) -> tuple[Path, Repository, Any]:
    """A source of ``files`` files and a repository holding its snapshot, with 4-row row groups and the
    ranged-read threshold at 500 bytes (the large-manifest paths on a small tree)."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 4)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 500)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:03}").write_bytes(f"file {i} ".encode() * 20)
    age_tree(src)
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id=CID, release=REL)
    return src, repo, engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))


@pytest.mark.parametrize("where", ["first", "last"])
def test_committer_take_writes_a_change_in_the_first_or_last_row_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     where: str) -> None:
    import time

    src, repo, s1 = _small_row_groups_snapshot(tmp_path, monkeypatch, 30)
    root = tmp_path / "root"
    c = _committer(tmp_path, repo, root)
    root.mkdir()
    c.take(s1, repo.load_manifest(s1), time.time(), [1, s1.seq])
    assert tree_state(root) == tree_state(src)
    name = "f000" if where == "first" else "f029"
    p = src / name
    st = p.stat()
    p.write_bytes(b"X" * len(p.read_bytes()))  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    assert ManifestFile(repo.manifest_bytes(s2)).num_groups > 2
    # Its chunk is missing: the take must fail with IntegrityError and leave the root as it was.
    m2 = repo.load_manifest(s2)
    before = tree_state(root)
    store = tmp_path / "repo"
    lost = set(chunks_of(m2, name)) - set(repo.load_manifest(s1).chunk_ids())
    assert lost
    saved = {o.name: repo.storage.read(o.name) for o in repo.storage.list(fmt.INDEX_DIR)}
    drop_chunks(repo.storage, lost)
    fresh = engine.open_repository(str(store))
    c = _committer(tmp_path, fresh, root)
    with pytest.raises(IntegrityError):
        c.take(s2, fresh.load_manifest(s2), time.time(), [1, s2.seq])
    assert tree_state(root) == before
    # Chunks back: the take applies the change (never "nothing changed").
    for n in [o.name for o in repo.storage.list(fmt.INDEX_DIR)]:
        repo.storage.delete(n)
    for n, d in saved.items():
        repo.storage.write(n, d)
    fresh = engine.open_repository(str(store))
    c = _committer(tmp_path, fresh, root)
    c.take(s2, fresh.load_manifest(s2), time.time(), [1, s2.seq])
    assert tree_state(root) == tree_state(src)


def test_committer_take_of_the_same_tree_needs_no_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    src, repo, s1 = _small_row_groups_snapshot(tmp_path, monkeypatch, 20)
    root = tmp_path / "root"
    root.mkdir()
    c = _committer(tmp_path, repo, root)
    c.take(s1, repo.load_manifest(s1), time.time(), [1, s1.seq])
    # Same tree, other manifest bytes (ctime is not compared): touch ctimes.
    for p in src.iterdir():
        os.chmod(p, p.stat().st_mode)
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    assert s2.manifest_hash != s1.manifest_hash  # not the hash shortcut: same_tree on row groups decides
    before = tree_state(root)
    drop_chunks(repo.storage, set(repo.load_manifest(s2).chunk_ids()))
    fresh = engine.open_repository(str(tmp_path / "repo"))
    c = _committer(tmp_path, fresh, root)
    r = c.take(s2, fresh.load_manifest(s2), time.time(), [1, s2.seq])
    assert r.written_files == 0
    assert tree_state(root) == before
