"""The chunk index on sorted arrays (issue 17): same answers as a dict, byte-compatible files, bounded memory."""

from __future__ import annotations

import io
import itertools
import os
import random
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drsync import engine
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list, ids_array
from drsync.repository.manifest import Manifest
from drsync.repository.packs import (
    INDEX_SCHEMA,
    ChunkIndex,
    ChunkLocation,
    IndexRows,
    index_bytes,
    read_index_file,
)
from drsync.repository.repo import Repository, damaged_paths
from drsync.storage.memory import MemoryStorage
from tests.conftest import make_tree

MiB = 1024 * 1024


def awkward_ids(rnd: random.Random, n: int) -> list[bytes]:
    """Ids numpy could mishandle: trailing and inner NUL bytes, and ids sharing their first 8 bytes."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(rnd.randbytes(32))
        elif kind == 1:
            out.append(rnd.randbytes(rnd.randint(0, 31)).ljust(32, b"\0"))
        elif kind == 2:
            out.append(b"\0" * 8 + bytes(rnd.choice((0, 1)) for _ in range(24)))
        else:
            out.append(b"\xff" * 8 + rnd.randbytes(24))
    return out


def sessions_repo(seed: int, sessions: int, per: int, size: int | tuple[int, int]
                  ) -> tuple[MemoryStorage, Repository, dict[bytes, bytes]]:
    """A repository in memory written by ``sessions`` write sessions (a pack and an index file each) of
    ``per`` random chunks of ``size`` bytes (or a random size in that range): ``(storage, repository,
    chunk id -> bytes)`` in the order written."""
    from drsync.repository import chunks

    storage = MemoryStorage()
    repo = Repository.init(storage, cluster_id="east", release="1")
    rnd = random.Random(seed)
    data: dict[bytes, bytes] = {}
    for _ in range(sessions):
        w = repo.chunk_writer()
        for _ in range(per):
            d = rnd.randbytes(size if isinstance(size, int) else rnd.randint(*size))
            data[chunks.chunk_id(d)] = d
            w.add(chunks.chunk_id(d), d)
        w.flush()
    return storage, repo, data


def loc(rnd: random.Random, packs: list[str]) -> ChunkLocation:
    n = rnd.randint(0, fmt.CHUNK_MAX)
    return ChunkLocation(rnd.choice(packs), rnd.randint(8, 2**40), n, n, fmt.ENC_RAW)


@pytest.mark.parametrize("max_runs", [1, 2, 8])
def test_index_answers_as_a_dict_does_through_adds_merges_and_files(monkeypatch: pytest.MonkeyPatch,
                                                                    max_runs: int) -> None:
    """Runs made, merged (at most ``max_runs`` kept) and searched together answer as one dict: the first
    location of an id wins wherever its repeats land; the runs stay sorted and disjoint."""
    monkeypatch.setattr(ChunkIndex, "_MERGE_MIN", 7)  # merge the recent-additions buffer often
    monkeypatch.setattr(ChunkIndex, "_MAX_RUNS", max_runs)
    rnd = random.Random(5)
    packs = [os.urandom(16).hex() for _ in range(5)]
    pool = awkward_ids(rnd, 400)
    index, model = ChunkIndex(), {}
    for step in range(6):
        for _ in range(60):  # one by one
            cid, where = rnd.choice(pool), loc(rnd, packs)
            index.add(cid, where)
            model.setdefault(cid, where)
        batch = [(rnd.choice(pool), loc(rnd, packs)) for _ in range(50)]  # a file, repeats inside
        if step % 2:
            index.load_file(index_bytes(batch), f"index/{step}.parquet")
        else:
            index.add_rows(IndexRows.from_pylist(batch))
        for cid, where in batch:
            model.setdefault(cid, where)
        assert len(index) == len(model)
        probe = [rnd.choice(pool) for _ in range(300)]
        assert [c in index for c in probe] == [c in model for c in probe]
        assert [index.get(c) for c in probe] == [model.get(c) for c in probe]
        assert index.contains_many(probe).tolist() == [c in model for c in probe]
        found, rows = index.locate_many(probe)
        assert found.tolist() == [c in model for c in probe]
        assert list(rows.iter_rows()) == [(c, model[c]) for c in probe if c in model]
        parts = [list(part.iter_rows()) for part in index.runs()]
        assert 1 <= len(parts) <= max_runs
        assert all([c for c, _ in part] == sorted({c for c, _ in part}) for part in parts)
        assert sorted(r for part in parts for r in part) == sorted(model.items())  # disjoint, complete
        assert sorted(IndexRows.concat(index.runs()).iter_rows()) == sorted(model.items())
    assert list(index.items()) == sorted(model.items())
    assert len(index.runs()) == 1  # rows() merged them
    assert index.pack_ids() == {w.pack_id for w in model.values()}
    by_pack = {p: list(r.iter_rows()) for p, r in index.pack_batches()}
    assert list(by_pack) == sorted(by_pack)
    for p, rows in by_pack.items():
        assert sorted(rows, key=lambda r: r[1].offset) == rows
        assert {c for c, _ in rows} == {c for c, w in model.items() if w.pack_id == p}


def test_sorted_rows_become_a_run_without_a_copy() -> None:
    """A write session's runs and an index file's batches come sorted: they are taken over, not copied;
    rows already indexed are left out of the new run (the first location kept)."""
    rnd = random.Random(4)
    packs = [os.urandom(16).hex() for _ in range(3)]
    first = IndexRows.from_pylist(sorted((os.urandom(32), loc(rnd, packs)) for _ in range(500)))
    index = ChunkIndex()
    index.add_rows(first)
    assert np.shares_memory(index.runs()[0].ids, first.ids)
    again = IndexRows.from_pylist(sorted([(c, loc(rnd, packs)) for c in id_list(first.ids[:10])]
                                         + [(os.urandom(32), loc(rnd, packs)) for _ in range(5)]))
    index.add_rows(again)
    assert len(index) == 505 and [len(r) for r in index.runs()] == [500, 5]
    assert all(index.get(c) == first.location(i) for i, c in enumerate(id_list(first.ids)))


def test_id_sets_search_sort_and_merge_like_python_sets() -> None:
    rnd = random.Random(9)
    for _ in range(50):
        pool = awkward_ids(rnd, rnd.randint(1, 60))
        a = [rnd.choice(pool) for _ in range(rnd.randint(0, 80))]
        b = [rnd.choice(pool) for _ in range(rnd.randint(0, 80))]
        sa, sb = IdSet.of(a), IdSet.of(b)
        assert id_list(sa.ids) == sorted(set(a))
        assert id_list(sa.union(sb).ids) == sorted(set(a) | set(b))
        assert id_list(sa.difference(sb).ids) == sorted(set(a) - set(b))
        assert sa.contains_many(pool).tolist() == [c in set(a) for c in pool]
        assert [c in sa for c in pool] == [c in set(a) for c in pool]
    big = [os.urandom(32) for _ in range(5000)]  # past the size where queries are sorted first
    s = IdSet.of(big[::2])
    assert s.contains_many(big).tolist() == [i % 2 == 0 for i in range(5000)]


def test_id_sets_of_pieces_equal_the_set_of_the_joined_ids() -> None:
    """A manifest's chunk column comes in pieces (row groups): the set is gathered from them without
    joining them first, the same set whatever the cuts, repeats across pieces and ids that share their
    first 8 bytes (``awkward_ids``) included."""
    rnd = random.Random(11)
    for _ in range(200):
        pool = awkward_ids(rnd, rnd.randint(1, 40))
        ids = [rnd.choice(pool) for _ in range(rnd.randint(0, 90))]
        cuts = sorted(rnd.randint(0, len(ids)) for _ in range(rnd.randint(0, 5)))
        arr = pa.array(ids, pa.binary(32))
        bounds = [0, *cuts, len(ids)]
        col = pa.chunked_array([arr.slice(a, b - a) for a, b in itertools.pairwise(bounds)], arr.type)
        for s in (IdSet.of(col), IdSet.of_pieces([ids_array(c) for c in col.chunks])):
            assert id_list(s.ids) == sorted(set(ids))
            assert s.key.tolist() == [int.from_bytes(c[:8], "big") for c in sorted(set(ids))]


def test_index_files_keep_their_layout() -> None:
    """Files this drsync writes read as the old ones did, and files the old writer wrote load."""
    rnd = random.Random(3)
    rows = [(c, loc(rnd, ["ab" * 16, "cd" * 16])) for c in awkward_ids(rnd, 100)]
    table = pq.read_table(pa.BufferReader(index_bytes(rows)))
    assert table.schema.equals(INDEX_SCHEMA)
    assert table.to_pylist() == [{"chunk": c, "pack": w.pack_id, "offset": w.offset, "stored_length": w.stored_length,
                                  "raw_length": w.raw_length, "encoding": w.encoding} for c, w in rows]
    old = io.BytesIO()  # as the writer before issue 17 wrote them: one pq.write_table of Python lists
    pq.write_table(pa.table([[c for c, _ in rows], [w.pack_id for _, w in rows], [w.offset for _, w in rows],
                             [w.stored_length for _, w in rows], [w.raw_length for _, w in rows],
                             [w.encoding for _, w in rows]], schema=INDEX_SCHEMA), old, compression="zstd")
    assert list(read_index_file(old.getvalue(), "old").iter_rows()) == rows
    assert list(read_index_file(index_bytes(IndexRows.from_pylist(rows)), "new").iter_rows()) == rows
    assert read_index_file(index_bytes([]), "empty").ids.shape == (0,)


def test_an_index_file_with_nulls_is_refused() -> None:
    table = pa.table({"chunk": pa.array([os.urandom(32), None], pa.binary(32)), "pack": ["ab" * 16] * 2,
                      "offset": pa.array([8, 9], pa.uint64()), "stored_length": pa.array([1, 1], pa.uint32()),
                      "raw_length": pa.array([1, 1], pa.uint32()), "encoding": pa.array([0, 0], pa.uint8())},
                     schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with pytest.raises(IntegrityError, match="has nulls"):
        ChunkIndex().load_file(buf.getvalue(), "index/x.parquet")


def test_capture_threads_add_and_ask_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChunkIndex, "_MERGE_MIN", 50)
    index = ChunkIndex()
    per_thread = [[os.urandom(32) for _ in range(2000)] for _ in range(4)]
    errors: list[str] = []

    def work(ids: list[bytes]) -> None:
        for i, cid in enumerate(ids):
            index.add(cid, ChunkLocation("ab" * 16, 8 + i, 1, 1, 0))
            if cid not in index or (i % 100 == 0 and not index.contains_many(ids[:i + 1]).all()):
                errors.append(cid.hex())

    threads = [threading.Thread(target=work, args=(ids,)) for ids in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 8000 and index.contains_many([c for ids in per_thread for c in ids]).all()


def test_a_million_chunks_fit_in_arrays() -> None:
    """1,000,000 index rows load into about 61 bytes a chunk, with no Python object per chunk: the
    arrays stay under 70 MiB and everything Python and NumPy allocate while loading under 160 MiB
    (tracemalloc sees NumPy's buffers; Arrow's own pool is not traced: its decoding is a batch at a time)."""
    n = 1_000_000
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, size=n * 32, dtype=np.uint8).tobytes()
    packs = [os.urandom(16).hex() for _ in range(40)]
    stored = rng.integers(1, 4096, size=n, dtype=np.uint32)
    table = pa.table([pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(ids)]),
                      pa.array(packs).take(pa.array(rng.integers(0, len(packs), size=n))),
                      pa.array(rng.integers(8, 2**32, size=n, dtype=np.uint64)), pa.array(stored), pa.array(stored),
                      pa.array(np.zeros(n, np.uint8))], schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")  # one row group of 1M rows, as the old writer made
    data = buf.getvalue()
    del table, buf, stored
    index = ChunkIndex()
    tracemalloc.start()
    try:
        index.load_file(data, "index/big.parquet")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == n
    assert index.nbytes < 70 * MiB, index.nbytes
    assert peak < 160 * MiB, peak
    probe = ids_array([ids[:32], ids[-32:], os.urandom(32)])
    assert index.contains_many(probe).tolist() == [True, True, False]


def test_merging_two_runs_lets_each_old_column_go_as_it_goes() -> None:
    """Two runs merged into one hold both runs and one column of the result at the peak, not both runs
    and the whole result: the index's growth during a merge stays under 0.85 of its size (it was 1.3,
    measured), and the merged index answers for every id of both runs."""
    n = 200_000
    rng = np.random.default_rng(7)
    packs = ("a" * 32,)

    def run(seed: int) -> IndexRows:
        ids = np.sort(np.frombuffer(np.random.default_rng(seed).bytes(32 * n), "S32"))
        z = np.zeros(n, np.uint32)
        return IndexRows(ids, z, rng.integers(8, 2**40, n, dtype=np.uint64), z + 1, z + 1, np.zeros(n, np.uint8),
                         packs)

    tracemalloc.start()  # before the runs are made, so that freeing their columns shows
    try:
        index = ChunkIndex()
        first, second = run(1), run(2)
        index.add_rows(first)
        index.add_rows(second)
        probe = np.concatenate([first.ids[::997], second.ids[::997]])  # copies: the runs' arrays are let go
        del first, second
        assert len(index.runs()) == 2
        size = index.nbytes
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        merged = index.rows()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(index.runs()) == 1 and len(merged) == 2 * n
    assert peak < 0.85 * size, (peak, size)
    assert index.contains_many(probe).all() and len(np.unique(merged.ids)) == 2 * n
    assert bool((merged.ids[1:] > merged.ids[:-1]).all())


def test_damaged_paths_names_each_file_by_its_first_bad_chunk(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Also over the stored manifest read a row group at a time (groups of 5 rows here), as verify reads it."""
    import drsync.repository.manifest as mf

    monkeypatch.setattr(mf, "ROW_GROUP", 5)
    data = tmp_path / "data"
    make_tree(data)
    repo = Repository.init(MemoryStorage(), cluster_id="east", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    manifest = repo.load_manifest(info)
    all_ids = sorted(manifest.chunk_ids())
    rnd = random.Random(2)
    gone = set(rnd.sample(all_ids, len(all_ids) // 3))
    bad = {c: f"bad {c.hex()[:8]}" for c in rnd.sample(all_ids, len(all_ids) // 4)}
    index = ChunkIndex()
    index.add_rows(repo.index.rows().take(~IdSet.of(list(gone)).contains_many(repo.index.rows().ids)))

    def reference(m: Manifest) -> list[tuple[str, str]]:
        out = []
        for e in m.entries():
            for cid in e.chunks:
                if cid in bad:
                    out.append((e.path, bad[cid]))
                    break
                if cid not in index:
                    out.append((e.path, f"chunk {cid.hex()[:16]} is missing from the repository"))
                    break
        return out

    expected = reference(manifest)
    assert expected and list(damaged_paths(manifest, index, bad)) == expected
    stored = mf.ManifestFile(manifest.to_bytes())
    assert stored.num_groups > 3
    assert list(damaged_paths(stored, index, bad)) == expected


def test_gc_repacks_a_mostly_dead_pack_and_counts_as_before(tmp_path: Path) -> None:
    """Mark's per-pack arithmetic on arrays: a pack of one live and one dead file is repacked, the
    counts are those of the per-chunk definition, and the kept snapshot stays whole."""
    data = tmp_path / "data"
    data.mkdir()
    rnd = random.Random(4)
    (data / "keep.bin").write_bytes(rnd.randbytes(300_000))
    (data / "drop.bin").write_bytes(rnd.randbytes(900_000))
    repo = Repository.init(MemoryStorage(), cluster_id="east", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    (data / "drop.bin").unlink()
    (data / "new.bin").write_bytes(rnd.randbytes(200_000))
    second = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    kept = repo.load_manifest(second).chunk_ids()
    every = {c for c, _ in repo.index.items()}
    (old_pack,) = {repo.index.get(c).pack_id for c in repo.load_manifest(first).chunk_ids()}  # type: ignore[union-attr]
    repo.delete_snapshot(first)
    report = engine.gc_repository(repo)
    assert (report.live_chunks, report.dead_chunks) == (len(kept), len(every - kept))
    assert (report.repacked_packs, report.deleted_packs, report.kept_packs) == (1, 0, 1)
    fresh = Repository.open(repo.storage)
    assert {c for c, _ in fresh.index.items()} == kept
    assert old_pack not in fresh.index.pack_ids()
    assert fresh.verify().ok
    out = tmp_path / "out"
    engine.restore_snapshot(fresh, second.id, str(out), cluster_id="east", release="1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in data.iterdir()}


def test_a_part_of_the_index_locates_chunks_across_index_files_without_loading_it() -> None:
    """``Repository.reader_for``: the chunks of three write sessions (three index files), one of them
    written twice (an export writer does not look at the index), located from the index files without
    loading the index; each read back and checked; a chunk not asked for is not located; one missing
    chunk makes it decline (None)."""
    from drsync.repository import chunks
    from drsync.repository.repo import ChunkReader

    storage, repo, data = sessions_repo(7, 3, 40, (1, 5000))
    rnd = random.Random(7)
    dup = sorted(data)[5]
    w = repo.chunk_writer(export=True)
    enc, stored = chunks.encode(data[dup])
    assert w.add_stored(dup, enc, bytes(stored), len(data[dup]))
    w.flush()
    assert len(storage.list(fmt.INDEX_DIR)) == 4
    fresh = Repository.open(storage)
    wanted = IdSet.of([*rnd.sample(sorted(data), 60), dup])
    reader = fresh.reader_for(wanted)
    assert isinstance(reader, ChunkReader) and fresh._index is None
    for cid in id_list(wanted.ids):
        assert reader.has_chunk(cid) and reader.read_chunk(cid) == data[cid]
    other = next(c for c in sorted(data) if c not in wanted)
    assert not reader.has_chunk(other)
    with pytest.raises(IntegrityError):
        reader.read_chunk(other)
    assert fresh.reader_for(IdSet.of([*id_list(wanted.ids), b"\x01" * 32])) is None
    assert fresh.reader_for(IdSet.of(sorted(data))) is not None


@pytest.mark.parametrize("loaded", [True, False])
def test_the_presence_check_works_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch, loaded: bool) -> None:
    """``check_chunks_present`` locates a slice of ids at a time (a manifest's chunk column, repeats and
    several Arrow chunks included): a missing id in any slice is named once however often it repeats,
    and a pack named by any slice that is gone is found. With the index not loaded (a standby lets it go
    after each commit) the same answers come from the index files, and the index stays unloaded."""
    import drsync.repository.repo as repo_mod

    monkeypatch.setattr(repo_mod, "_CHECK_SLICE", 3)
    monkeypatch.setattr(repo_mod, "CHECK_PART_IDS", 4)
    storage, repo, data = sessions_repo(3, 3, 5, 100)  # three packs
    made = list(data)
    last_pack = repo.index.get(made[-1]).pack_id  # type: ignore[union-attr]

    def check(ids: pa.ChunkedArray | pa.Array) -> None:
        r = repo if loaded else Repository.open(storage)
        try:
            r.check_chunks_present(ids, "snapshot x")
        finally:
            assert (r._index is None) is not loaded

    arr = pa.array(made, pa.binary(32))
    column = pa.chunked_array([arr.slice(0, 7), arr.slice(7), arr.slice(2, 4)])  # repeats, three chunks
    check(column)
    check(pa.chunked_array([], pa.binary(32)))
    absent = b"\x07" * 32
    bad = pa.chunked_array([arr.slice(0, 7), pa.array([absent, made[0], absent], pa.binary(32)), arr.slice(7)])
    with pytest.raises(IntegrityError, match=f"names 1 chunk.*first {absent.hex()[:16]}"):
        check(bad)
    storage.delete(fmt.pack_name(last_pack))
    with pytest.raises(IntegrityError, match="pack\\(s\\) that are gone"):
        check(column)
    check(arr.slice(0, 10))  # the first two packs only


def test_the_chunks_of_some_rows_are_taken_chunk_by_chunk() -> None:
    """An apply's presence check takes the chunk lists of the rows it writes from each Arrow chunk of the
    column (``ChunkedArray.take`` would join them first): the same ids as the plain take, any cuts; a chunk
    whose non-empty lists are all wanted is handed over as it is (no copy), with its empty ones."""
    from drsync.apply_chunks import take_sorted as _take_sorted

    rnd = np.random.default_rng(1)
    for _ in range(300):
        n = int(rnd.integers(0, 40))
        arr = pa.array([[bytes([i % 256]) * 32] * int(rnd.integers(0, 3)) for i in range(n)],
                       pa.list_(pa.binary(32)))
        bounds = [0, *sorted({int(x) for x in rnd.integers(0, n + 1, size=3)}), n]
        col = pa.chunked_array([arr.slice(a, b - a) for a, b in itertools.pairwise(bounds)], arr.type)
        rows = np.unique(rnd.integers(0, max(n, 1), size=int(rnd.integers(0, n + 1)))) if n else np.zeros(0, int)
        want = col.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []
        got = _take_sorted(col, rows)
        assert [c for lst in got.to_pylist() for c in lst] == [c for lst in want for c in lst]
        filled = [i for i, lst in enumerate(arr.to_pylist()) if lst]
        if filled and set(filled) <= set(rows.tolist()):  # the chunks handed over: their offsets not copied
            offsets = {(c.offset, c.buffers()[1].address) for c in col.chunks if len(c)}
            assert all((g.offset, g.buffers()[1].address) in offsets for g in got.chunks if len(g))


def test_lost_packs_are_found_from_the_index_files_pack_columns() -> None:
    """Packs the index names that are gone (damage), found without loading the index."""
    storage, repo, data = sessions_repo(8, 3, 1, 100)
    packs = [repo.index.get(c).pack_id for c in data]  # type: ignore[union-attr]
    fresh = Repository.open(storage)
    assert fresh.lost_packs() == set() and fresh._index is None
    storage.delete(fmt.pack_name(packs[1]))
    assert fresh.lost_packs() == {packs[1]} and fresh._index is None
    name = storage.list(fmt.INDEX_DIR)[0].name
    storage.write(name, b"not parquet")
    with pytest.raises(IntegrityError, match="damaged"):
        fresh.lost_packs()


def test_an_index_made_from_sorted_rows_answers_without_a_filter() -> None:
    """A reader's index (``from_sorted``: the chunks a restore writes, located) holds no Bloom filter (23
    bits an id for nothing), and still answers exactly: every id it was made for, with its location, and
    none other (ids sharing the first 8 bytes of one it holds included); rows added later get a filter."""
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(5000, 32), dtype=np.uint8)
    raw[1, :8] = raw[0, :8]  # two ids sharing their search key
    wanted = IdSet.of(ids_array([bytes(r) for r in raw]))
    n = len(wanted)
    rows = IndexRows(wanted.ids, np.zeros(n, np.uint32), np.arange(n, dtype=np.uint64), np.full(n, 7, np.uint32),
                     np.full(n, 9, np.uint32), np.zeros(n, np.uint8), ("p0",))
    index = ChunkIndex.from_sorted(wanted.ids, wanted.key, rows)
    assert index.nbytes == sum(r.nbytes for r in index._runs)  # no filter bytes
    ids = id_list(wanted.ids)
    assert all(cid in index for cid in ids)
    assert [index.get(cid).offset for cid in ids[:50]] == list(range(50))  # type: ignore[union-attr]
    others = [bytes(r) for r in rng.integers(0, 256, size=(200, 32), dtype=np.uint8)]
    others.append(ids[0][:8] + bytes(24))  # the key of a held id, another id
    assert not any(cid in index for cid in others) and index.get(others[-1]) is None
    assert index.contains_many(ids_array(others)).sum() == 0
    new = bytes(range(32))
    index.add(new, ChunkLocation("p1", 0, 1, 1, 0))
    assert new in index and all(cid in index for cid in ids[:100]) and others[0] not in index


def test_a_commit_check_takes_its_ids_in_parts_end_to_end_without_copies() -> None:
    """The unloaded commit check sorts and looks up ``CHECK_PART_IDS`` ids at a time: the parts hold every id
    once, in order, none larger than the size, and are views of the given arrays."""
    from drsync.repository.repo import _id_parts

    rnd = random.Random(7)
    for _ in range(200):
        arrays = [np.arange(rnd.randrange(0, 9)) + 100 * k for k in range(rnd.randrange(0, 5))]
        size = rnd.randrange(1, 6)
        parts = list(_id_parts(arrays, size))
        flat = [int(x) for part in parts for a in part for x in a]
        assert flat == [int(x) for a in arrays for x in a]
        assert all(0 < sum(len(a) for a in part) <= size for part in parts)
        assert all(sum(len(a) for a in part) == size for part in parts[:-1])
        assert all(a.base is not None for part in parts for a in part)
