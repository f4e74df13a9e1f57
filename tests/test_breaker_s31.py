"""Breaker, session 31: hostile cases against the vouched commit check, the unloaded presence check, the
chunk index's runs, id sets from pieces and an apply's presence check."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest

import drsync.repository.manifest as manifest_mod
from drsync import engine
from drsync.apply import apply_manifest
from drsync.errors import IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list, ids_array
from drsync.repository.manifest import Manifest, ManifestFile, table_from_columns
from drsync.repository.manifest_diff import chunks_beyond
from drsync.repository.packs import ChunkIndex, ChunkLocation, IndexRows, PackWriter, index_bytes, write_index
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage
from tests.conftest import age_tree, tree_state
from tests.test_chunk_index import awkward_ids, loc, sessions_repo
from tests.test_commit_vouched import _ship, make_standby

# --- the standby's vouched commit check ---------------------------------------------------------


@pytest.fixture
def standby(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_standby(tmp_path, files=6, repeat=300)


@pytest.fixture(params=[1, 2, 65536])
def grouped_standby(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A standby whose applied manifest is stored in row groups of ``request.param`` rows."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", request.param)
    return make_standby(tmp_path, files=6, repeat=300)


def _stored_ids(repo: Repository) -> set[str]:
    return {s.id for s in repo.list_snapshots()}


def test_applied_snapshot_deleted_and_collected_vouches_for_nothing(standby) -> None:  # type: ignore[no-untyped-def]
    """The standby's applied snapshot is deleted and its chunks collected: a shipment of the same tree whose
    chunks are not sent again is refused (nothing vouches for them any more), nothing stored."""
    src, primary, repo, _root, c, first = standby
    engine.delete_snapshots(repo, [first.id])
    assert repo.list_snapshots() == []
    same = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    repo.reload_index()
    with pytest.raises(IntegrityError, match="does not hold"):
        c.commit(same.to_bytes(), primary.manifest_bytes(same), [1, same.seq])
    assert same.id not in _stored_ids(repo)


def _forged(primary: Repository, info, rows: list[tuple[bytes, list[bytes] | None]], tail: str = "beef"):  # type: ignore[no-untyped-def]
    """A snapshot document of ``info`` with a forged manifest (rows in the given order, no sorting), its
    hash in the document: what a hostile primary can send."""
    import dataclasses

    n = len(rows)
    lists = [c or [] for _, c in rows]
    t = table_from_columns({
        "path": [p for p, _ in rows], "type": ["dir" if c is None else "file" for _, c in rows],
        "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": [len(c) for c in lists], "mtime_ns": [0] * n,
        "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": [None] * n,
        "content": [None if c is None else blake3.blake3(b"".join(c)).digest() for _, c in rows],
        "chunks": lists, "chunk_sizes": [[1] * len(c) for c in lists]})
    data = Manifest(t).to_bytes()
    doc = dataclasses.replace(info, id=info.id[:-4] + tail, manifest_hash=blake3.blake3(data).hexdigest())
    return doc, data


@pytest.mark.parametrize("shape", ["dup-after", "dup-before", "unsorted", "moved", "dir", "longer"])
def test_a_forged_manifest_naming_a_missing_chunk_is_refused(grouped_standby, shape: str) -> None:  # type: ignore[no-untyped-def]
    """Hostile manifests around the applied snapshot's own rows: the path held alike plus a second row of
    the same path naming a chunk nobody sent (before or after it), rows out of order, an applied list moved
    to a new path beside a missing chunk, a directory row turned into a file of a missing chunk, the applied
    list plus one missing chunk; row groups of 1 and 2 rows. Each refused, nothing stored or applied."""
    _src, primary, repo, root, c, first = grouped_standby
    groups = ManifestFile(repo.manifest_bytes(first)).num_groups
    assert groups == -(-len(repo.load_manifest(first)) // manifest_mod.ROW_GROUP)
    applied = repo.load_manifest(repo.find_snapshot(first.id))
    rows = [(p, cs) for p, cs in zip(applied.table.column("path").to_pylist(),
                                     applied.table.column("chunks").to_pylist(), strict=True)]
    ghost = blake3.blake3(b"never sent").digest()
    p0, l0 = rows[0]
    if shape == "dup-after":
        forged = [rows[0], (p0, [ghost]), *rows[1:]]
    elif shape == "dup-before":
        forged = [(p0, [ghost]), *rows]
    elif shape == "unsorted":
        forged = [*rows[::-1][:-1], (p0, [*l0[:-1], ghost])]
    elif shape == "moved":
        forged = [*rows, (b"zz-moved", l0), (b"zz-new", [ghost])]
    elif shape == "dir":
        forged = [*rows, (b"zz-dir", None)]
    else:
        forged = [(p0, [*l0, ghost]), *rows[1:]]
    if shape == "dir":  # first a directory at zz-dir (applied), then a file of a missing chunk there
        doc, data = _forged(primary, first, forged)
        c.commit(doc.to_bytes(), data, [1, first.seq + 1])
        forged = [*rows, (b"zz-dir", [ghost])]
        doc, data = _forged(primary, first, forged, "cafe")
    else:
        doc, data = _forged(primary, first, forged)
    before = tree_state(root)
    applied_now = c.store.current.applied_snapshot
    with pytest.raises(IntegrityError, match="does not hold"):
        c.commit(doc.to_bytes(), data, [1, first.seq + 2])
    assert doc.id not in _stored_ids(repo)
    assert c.store.current.applied_snapshot == applied_now and tree_state(root) == before


def test_a_shipment_naming_chunks_of_a_lost_pack_is_refused_even_when_the_applied_snapshot_names_them(standby) -> None:  # type: ignore[no-untyped-def]
    """The standby's repository lost a pack after the applied snapshot was stored (a disk fault, a hand
    deletion). A shipment of the same tree names chunks this repository no longer holds: it must be refused
    ("does not hold" / "gone"), nothing stored, as before the vouched check. Vouching takes the applied
    snapshot's word for chunks that are not there."""
    src, primary, repo, _root, c, first = standby
    packs = repo.storage.list(fmt.PACKS_DIR)
    assert packs
    for p in packs:
        repo.storage.delete(p.name)
    repo.reload_index()
    (src / "f00").write_bytes(b"a change so the snapshot differs " * 10)
    st = (src / "f01").stat()
    os.utime(src / "f00", ns=(st.st_atime_ns, st.st_mtime_ns))  # old enough to capture; the rest untouched
    changed = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    with pytest.raises(IntegrityError) as refused:
        _ship(primary, changed, repo, c)
    assert changed.id not in _stored_ids(repo), "stored although its chunks are gone"
    assert c.store.current.applied_snapshot == first.id
    assert "does not hold" in str(refused.value) or "gone" in str(refused.value)


# --- the presence check with the index not loaded ----------------------------------------------------


def _one_chunk_in_two_packs(storage: MemoryStorage) -> tuple[bytes, bytes, list[ChunkLocation]]:
    d = b"the same chunk stored twice " * 8
    cid = chunks.chunk_id(d)
    enc, stored = chunks.encode(d)
    locs = []
    for _ in range(2):
        pw = PackWriter(storage)
        e = pw.add(cid, enc, stored, len(d))
        pw.finish(durable=False)
        locs.append(ChunkLocation(pw.pack_id, e.offset, e.stored_length, e.raw_length, e.encoding))
    return cid, d, locs


@pytest.mark.parametrize("gone", [0, 1])
def test_an_id_listed_twice_in_one_index_file_is_located_as_the_loaded_index_does(gone: int) -> None:
    """An index file may name a chunk twice (a GC's new index lists the copies of a repacked pack's live
    chunks and, when a snapshot committed during the mark rescues that pack, its own rows too). The loaded
    index keeps the first location; located from the index files (index not loaded) the last one of a
    batch wins. With one of the two packs gone the two answers differ: the unloaded check passes where the
    loaded one reports the gone pack (or the reverse), and ``reader_for`` reads from another place."""
    storage = MemoryStorage()
    Repository.init(storage, cluster_id="e", release="1")
    cid, data, locs = _one_chunk_in_two_packs(storage)
    write_index(storage, fmt.INDEX_DIR + "dup.parquet", IndexRows.from_pylist([(cid, locs[0]), (cid, locs[1])]))
    storage.delete(fmt.pack_name(locs[gone].pack_id))

    def outcome(loaded: bool) -> str:
        r = Repository.open(storage)
        if loaded:
            assert r.index.get(cid) == locs[0]  # the first location given wins
        try:
            r.check_chunks_present([cid], "snapshot x")
            return "ok"
        except IntegrityError as e:
            return "gone" if "gone" in str(e) else str(e)

    assert outcome(loaded=False) == outcome(loaded=True)

    def read(loaded: bool) -> str:
        r = Repository.open(storage)
        if loaded:
            assert r.index is not None  # loaded now
        reader = r.reader_for(IdSet.of([cid]))
        assert reader is not None
        try:
            return "read" if reader.read_chunk(cid) == data else "wrong"
        except IntegrityError:
            return "missing pack"

    assert read(loaded=False) == read(loaded=True)


def test_the_unloaded_check_answers_as_the_loaded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random inputs (repeats, several Arrow chunks, empty pieces, absent ids, ids sharing 8 bytes) over a
    repository of several small write sessions whose chunk index is kept in many runs: the same answer
    with and without the index loaded, and the index stays unloaded."""
    import drsync.repository.repo as repo_mod

    monkeypatch.setattr(ChunkIndex, "_MERGE_MIN", 2)
    monkeypatch.setattr(ChunkIndex, "_MAX_RUNS", 2)
    monkeypatch.setattr(repo_mod, "CHECK_PART_IDS", 3)  # the unloaded check takes its ids a part at a time
    storage, repo, data = sessions_repo(31, 3, 12, (1, 200))
    made = list(data)
    rnd = random.Random(31)
    fresh = Repository.open(storage)
    assert dict(fresh.index.items()) == dict(repo.index.items()) and len(dict(fresh.index.items())) == len(set(made))
    absent = [b"\0" * 32, b"\0" * 31 + b"\1", made[0][:8] + b"\0" * 24]
    for _ in range(40):
        pool = made + absent if rnd.random() < 0.5 else made
        ids = [rnd.choice(pool) for _ in range(rnd.randrange(0, 20))]
        cuts = sorted(rnd.randint(0, len(ids)) for _ in range(rnd.randrange(0, 3)))
        bounds = [0, *cuts, len(ids)]
        col = pa.chunked_array([pa.array(ids[a:b], pa.binary(32)) for a, b in itertools.pairwise(bounds)],
                               pa.binary(32))
        answers = []
        for loaded in (True, False):
            r = Repository.open(storage)
            if loaded:
                assert r.index is not None  # loaded now
            try:
                r.check_chunks_present(col, "x")
                answers.append("ok")
            except IntegrityError as e:
                answers.append(str(e))
            assert (r._index is None) is not loaded
        assert answers[0] == answers[1]
        assert (answers[0] == "ok") == all(c in made for c in ids)


# --- the chunk index ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_index_answers_as_a_dict_under_any_mix(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(ChunkIndex, "_MERGE_MIN", rnd.choice([0, 1, 3]))
    monkeypatch.setattr(ChunkIndex, "_MAX_RUNS", rnd.choice([1, 2, 3]))
    packs = [os.urandom(16).hex() for _ in range(4)]
    pool = list(dict.fromkeys(awkward_ids(rnd, 50) + [b"\x05" * 8 + bytes([i]) * 24 for i in range(8)]
                              + [b"\x05" * 8 + b"\0" * 23 + bytes([i]) for i in range(4)]))
    index, model = ChunkIndex(), {}
    for _ in range(20):
        op = rnd.randrange(4)
        if op == 0:
            for _ in range(rnd.randrange(5)):
                cid, where = rnd.choice(pool), loc(rnd, packs)
                index.add(cid, where)
                model.setdefault(cid, where)
        elif op == 1:
            batch = [(rnd.choice(pool), loc(rnd, packs)) for _ in range(rnd.randrange(0, 30))]
            if rnd.random() < 0.5:
                batch.sort(key=lambda x: x[0])
            index.add_rows(IndexRows.from_pylist(batch))
            for cid, where in batch:
                model.setdefault(cid, where)
        elif op == 2:
            parts, rows = [], []
            for _ in range(rnd.randrange(1, 4)):
                b = [(rnd.choice(pool), loc(rnd, packs)) for _ in range(rnd.randrange(0, 20))]
                if rnd.random() < 0.5:
                    b = sorted(dict(b[::-1]).items())
                parts.append(IndexRows.from_pylist(b))
                rows += b
            index.load_file(index_bytes(parts), "index/x.parquet")
            for cid, where in rows:
                model.setdefault(cid, where)
        else:
            other = ChunkIndex()
            b = [(rnd.choice(pool), loc(rnd, packs)) for _ in range(rnd.randrange(0, 20))]
            first: dict[bytes, ChunkLocation] = {}
            for cid, where in b:
                other.add(cid, where)
                first.setdefault(cid, where)
            for run in other.runs():
                index.add_rows(run)
            for cid, where in first.items():
                model.setdefault(cid, where)
        probe = [rnd.choice(pool) for _ in range(60)]
        assert len(index) == len(model)
        assert [index.get(c) for c in probe] == [model.get(c) for c in probe]
        assert index.contains_many(probe).tolist() == [c in model for c in probe]
        _found, located = index.locate_many(probe)
        assert list(located.iter_rows()) == [(c, model[c]) for c in probe if c in model]
        parts_ = [list(p.iter_rows()) for p in index.runs()]
        assert len(parts_) <= ChunkIndex._MAX_RUNS
        assert all([c for c, _ in p] == sorted({c for c, _ in p}) for p in parts_)
        assert sorted(r for p in parts_ for r in p) == sorted(model.items())
        assert index.pack_ids() == {w.pack_id for w in model.values()}
    assert list(index.items()) == sorted(model.items())


def test_an_index_file_of_several_batches_is_taken_over_intact() -> None:
    """Batches of an index file are taken over without a copy: every batch's ids and locations stay right
    once later batches are decoded."""
    from drsync.repository.ids import ID_DTYPE, sort_unique

    rng = np.random.default_rng(3)
    ids = np.frombuffer(rng.bytes(32 * 70_000), ID_DTYPE)
    ids = ids[sort_unique(ids)]
    n = len(ids)
    packs = tuple(os.urandom(16).hex() for _ in range(5))
    rows = IndexRows(ids, rng.integers(0, 5, n).astype(np.uint32), rng.integers(8, 2**40, n).astype(np.uint64),
                     np.full(n, 100, np.uint32), np.full(n, 100, np.uint32), np.zeros(n, np.uint8), packs)
    index = ChunkIndex()
    index.load_file(index_bytes(rows), "index/big.parquet")
    assert len(index.runs()) > 1
    got = index.rows()
    assert (got.ids == ids).all() and (got.offset == rows.offset).all()
    assert [got.packs[int(p)] for p in got.pack] == [packs[int(p)] for p in rows.pack]


# --- id sets from pieces -----------------------------------------------------------------------------


def test_id_sets_of_pieces_with_empty_pieces_and_tied_keys() -> None:
    rnd = random.Random(17)
    for _ in range(200):
        pool = awkward_ids(rnd, rnd.randint(1, 20)) + [b"\x07" * 8 + bytes([i]) * 24 for i in range(rnd.randint(0, 5))]
        pieces = [ids_array([rnd.choice(pool) for _ in range(rnd.randrange(0, 8))]) for _ in range(rnd.randrange(0, 6))]
        joined = [c for p in pieces for c in id_list(p)]
        s = IdSet.of_pieces(pieces)
        assert id_list(s.ids) == sorted(set(joined))
        assert s.key.tolist() == [int.from_bytes(c[:8], "big") for c in sorted(set(joined))]
        if pieces:
            s2 = IdSet.of(pa.chunked_array([pa.array(id_list(p), pa.binary(32)) for p in pieces], pa.binary(32)))
            assert id_list(s2.ids) == sorted(set(joined))


def test_a_forged_manifest_with_a_null_chunk_id_is_refused_as_an_integrity_error(standby) -> None:  # type: ignore[no-untyped-def]
    """A hostile manifest whose first file lists null chunk ids (valid Arrow, Parquet keeps them): it names
    no chunk the standby holds, so it is refused as damaged or incomplete (IntegrityError: the transport
    answers it as such), nothing stored. A ValueError escapes instead (chunk ids must not be null), which
    the gRPC servicer answers as INTERNAL."""
    import dataclasses

    _src, _primary, repo, _root, c, first = standby
    t = repo.load_manifest(first).table
    lists = t.column("chunks").to_pylist()
    lists[0] = [None] * len(lists[0])
    t = t.set_column(t.schema.get_field_index("chunks"), "chunks", pa.array(lists, t.schema.field("chunks").type))
    data = Manifest(t).to_bytes()
    doc = dataclasses.replace(first, id=first.id[:-4] + "0000", manifest_hash=blake3.blake3(data).hexdigest())
    with pytest.raises(IntegrityError):
        c.commit(doc.to_bytes(), data, [1, first.seq + 1])
    assert doc.id not in _stored_ids(repo)


# --- an apply's presence check -----------------------------------------------------------------------


def _unindex(storage, hidden: set[bytes]) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the repository's index without ``hidden`` (the chunks are then not held)."""
    repo = Repository.open(storage)
    kept = [(c, w) for c, w in repo.index.items() if c not in hidden]
    for o in storage.list(fmt.INDEX_DIR):
        storage.delete(o.name)
    write_index(storage, fmt.INDEX_DIR + "only.parquet", IndexRows.from_pylist(kept))


@pytest.fixture
def hidden_repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
        for i in range(3):
            (src / d / f"f{i}").write_bytes(f"{d}{i} ".encode() * 200)
    (src / "b" / "empty").write_bytes(b"")
    (src / "e").mkdir()
    age_tree(src)
    url = str(tmp_path / "repo")
    repo = engine.init_repository(url, cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src), kind="cycle"))
    return src, url, info


@pytest.mark.parametrize("cuts", [(), (1, 5, 9), (4, 8), (13,)])
@pytest.mark.parametrize("path", ["a/f0", "b/f1", "c/f2"])
def test_a_restore_needs_only_the_chunks_of_what_it_writes(hidden_repo, tmp_path: Path, cuts, path: str) -> None:  # type: ignore[no-untyped-def]
    """A chunk of one file is not held (first, middle or last file; the manifest's chunk column in several
    Arrow chunks): a restore into a new target fails naming the file, nothing made; excluding that file
    (by path or by a last-component glob) restores the rest; onto a target whose copy of the file is right
    nothing needs it; onto one where it differs it fails and the target stays as it was."""
    src, url, info = hidden_repo
    repo = engine.open_repository(url)
    whole = repo.load_manifest(info)
    t = whole.table
    bounds = [0, *[c for c in cuts if c < t.num_rows], t.num_rows]
    m = Manifest(pa.concat_tables([t.slice(a, b - a) for a, b in itertools.pairwise(bounds)]))
    row = t.column("path").to_pylist().index(path.encode())
    _unindex(repo.storage, set(t.column("chunks")[row].as_py()))

    def apply(target: Path, exclude: tuple[str, ...] = ()) -> None:
        r = Repository.open(engine.open_repository(url).storage)
        apply_manifest(m, r, str(target), what="snapshot x", exclude=exclude)

    with pytest.raises(IntegrityError, match=f"{path}: chunk .* is missing"):
        apply(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    for exclude in ((path,), (path.rsplit("/", 1)[1],)):
        target = tmp_path / f"ex-{len(exclude[0])}"
        apply(target, exclude)
        assert not (target / path).exists() and (target / "a").is_dir()
    import shutil

    same = tmp_path / "same"
    shutil.copytree(src, same)
    (same / "a" / "f1").write_bytes(b"another")
    apply(same)
    assert tree_state(same) == tree_state(src)
    differs = tmp_path / "differs"
    shutil.copytree(src, differs)
    (differs / path).write_bytes(b"another")
    before = tree_state(differs)
    with pytest.raises(IntegrityError, match=f"{path}: chunk .* is missing"):
        apply(differs)
    assert tree_state(differs) == before


@pytest.mark.parametrize("baseline_gone", [False, True])
def test_a_rejoined_ex_primary_vouches_only_by_a_baseline_it_keeps(standby, baseline_gone: bool) -> None:  # type: ignore[no-untyped-def]
    """Nothing applied, the guard baseline (the before-rejoin capture) vouches: the baseline's rows moved
    beside a chunk nobody sent are refused; with the baseline deleted and collected, a shipment of the same
    rows whose chunks were not sent again is refused too."""
    _src, primary, repo, _root, c, first = standby
    c.store.update(applied_snapshot="", applied_captured_at=0.0, applied_at=0.0, applied_position=(),
                   guard_baseline=first.id)
    base = repo.load_manifest(first)
    rows = list(zip(base.table.column("path").to_pylist(), base.table.column("chunks").to_pylist(), strict=True))
    if baseline_gone:
        engine.delete_snapshots(repo, [first.id])
        repo.reload_index()
        doc, data = _forged(primary, first, rows)
    else:
        doc, data = _forged(primary, first, [*rows, (b"zz", [*rows[0][1], blake3.blake3(b"ghost").digest()])])
    with pytest.raises(IntegrityError, match="does not hold"):
        c.commit(doc.to_bytes(), data, [1, first.seq + 1])
    assert doc.id not in _stored_ids(repo)


def test_write_sessions_of_many_runs_load_back_and_verify_and_collect(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Write sessions whose own index holds many runs (index files written run by run, chunks added again
    across sessions): a fresh open loads the same rows and reads every chunk; snapshots over them verify,
    survive a deletion and its GC, and a flipped byte in a pack is found."""
    monkeypatch.setattr(ChunkIndex, "_MERGE_MIN", 1)
    monkeypatch.setattr(ChunkIndex, "_MAX_RUNS", 2)
    storage = MemoryStorage()
    repo = Repository.init(storage, cluster_id="e", release="1")
    rnd = random.Random(8)
    data: dict[bytes, bytes] = {}
    for _ in range(3):
        w = repo.chunk_writer()
        for c in rnd.sample(sorted(data), min(4, len(data))):
            w.add(c, data[c])
        for _ in range(15):
            d = rnd.randbytes(rnd.randint(1, 300))
            data[chunks.chunk_id(d)] = d
            w.add(chunks.chunk_id(d), d)
        w.flush()
    fresh = Repository.open(storage)
    assert dict(fresh.index.items()) == dict(repo.index.items())
    assert {c for c, _ in fresh.index.items()} == set(data)
    assert all(fresh.read_chunk(c) == d for c, d in data.items())

    src = tmp_path / "src"
    src.mkdir()
    disk = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    snaps = []
    for k in range(3):
        for i in range(4):
            (src / f"f{k}-{i}").write_bytes(rnd.randbytes(200 + i))
        age_tree(src)
        snaps.append(engine.create_snapshot(disk, engine.SnapshotRequest(str(src), kind="cycle")))
    assert disk.verify().ok
    engine.delete_snapshots(disk, [snaps[0].id])
    disk = engine.open_repository(str(tmp_path / "repo"))
    assert disk.verify().ok
    pack = disk.storage.list(fmt.PACKS_DIR)[0]
    path = tmp_path / "repo" / pack.name
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    report = engine.open_repository(str(tmp_path / "repo")).verify()
    assert not report.ok and report.damaged_chunks and report.damaged_files


# --- chunks_beyond over hostile manifests ------------------------------------------------------------

_POOL = [blake3.blake3(bytes([i])).digest() for i in range(8)]


def _rows_manifest(rows: list[tuple[str, list[bytes] | None]]) -> Manifest:
    """A manifest holding ``rows`` in the order given (duplicates and disorder kept)."""
    n = len(rows)
    lists = [c or [] for _, c in rows]
    return Manifest(table_from_columns({
        "path": [p for p, _ in rows], "type": ["dir" if c is None else "file" for _, c in rows],
        "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": [len(c) for c in lists], "mtime_ns": [0] * n,
        "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": [None] * n,
        "content": [None if c is None else blake3.blake3(b"".join(c)).digest() for _, c in rows],
        "chunks": lists, "chunk_sizes": [[1] * len(c) for c in lists]}))


P = _POOL
_SHAPES = {
    "dup paths in new": ([("a", [P[0]]), ("b", [P[1]])], [("a", [P[0]]), ("a", [P[7]]), ("b", [P[1]])]),
    "dup paths, the odd one first": ([("a", [P[0]]), ("b", [P[1]])], [("a", [P[7]]), ("a", [P[0]]), ("b", [P[1]])]),
    "unsorted": ([("a", [P[0]]), ("b", [P[1]]), ("c", [P[2]])], [("c", [P[2]]), ("b", [P[6]]), ("a", [P[0]])]),
    "empty new": ([("a", [P[0]])], []),
    "empty base": ([], [("a", [P[0]])]),
    "dir to file": ([("a", None)], [("a", [P[5]])]),
    "file to dir": ([("a", [P[5]])], [("a", None)]),
    "moved beside a missing one": ([("a", [P[0], P[1]])], [("b", [P[0], P[1]]), ("c", [P[7]])]),
    "swapped": ([("a", [P[0], P[1]])], [("a", [P[1], P[0]])]),
    "shorter": ([("a", [P[0], P[1]])], [("a", [P[0]])]),
    "longer by a repeat": ([("a", [P[0]])], [("a", [P[0], P[0]])]),
    "one id swapped": ([("a", [P[0], P[1]]), ("b", [P[2]])], [("a", [P[0], P[3]]), ("b", [P[2]])]),
}


@pytest.mark.parametrize("group", [1, 2, 65536])
@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_chunks_beyond_hostile_shapes(monkeypatch: pytest.MonkeyPatch, group: int, shape: str) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    base_rows, new_rows = _SHAPES[shape]
    first: dict[str, list[bytes]] = {}
    for p, c in base_rows:
        first.setdefault(p, c or [])
    want = [x for p, c in new_rows for x in (c or []) if p not in first or (c or []) != first[p]]
    mb, mn = _rows_manifest(base_rows), _rows_manifest(new_rows)
    for base in (mb, ManifestFile(mb.to_bytes())):
        for new in (mn, ManifestFile(mn.to_bytes())):
            assert chunks_beyond(base, new).to_pylist() == want


def test_excluding_a_directory_leaves_out_what_lies_below_it(tmp_path: Path) -> None:
    """An exclude pattern that names a directory leaves out its contents too (a restore never writes
    ``b/f0`` without ``b``, which crashed the commit on a new target)."""
    src = tmp_path / "src"
    (src / "b" / "deep").mkdir(parents=True)
    (src / "a").mkdir()
    (src / "b" / "f0").write_bytes(b"zero")
    (src / "b" / "deep" / "f1").write_bytes(b"one")
    (src / "a" / "b").write_bytes(b"a file named b")
    (src / "a" / "keep").write_bytes(b"kept")
    age_tree(src)
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    snap = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    out = tmp_path / "out"
    apply_manifest(repo.load_manifest(snap), repo, str(out), exclude=("b",))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["a", "a/keep"]
    assert (out / "a" / "keep").read_bytes() == b"kept"
