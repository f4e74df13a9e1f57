"""The repository format through its API, on every storage backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drsync import engine
from drsync.errors import IntegrityError, NotFound, UsageError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.packs import read_pack_entries
from drsync.repository.repo import ChunkWriter, Repository
from drsync.storage import Storage
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import age_tree, make_tree


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "repo", create=True)
    return MemoryStorage()


@pytest.fixture
def repo(storage: Storage) -> Repository:
    return Repository.init(storage, cluster_id="east", release="6.2.1")


def test_init_then_open(storage: Storage) -> None:
    Repository.init(storage, cluster_id="east", release="1")
    r = Repository.open(storage)
    assert (r.config.cluster_id, r.config.release) == ("east", "1")
    with pytest.raises(UsageError, match="already a drsync repository"):
        Repository.init(storage, cluster_id="x", release="1")


def test_open_missing_repository() -> None:
    with pytest.raises(NotFound, match=r"no drsync repository at .*drsync init"):
        Repository.open(MemoryStorage())


def test_newer_format_is_a_clear_error(storage: Storage) -> None:
    Repository.init(storage, cluster_id="east", release="1")
    doc = json.loads(storage.read(fmt.CONFIG_NAME))
    doc["version"] = fmt.FORMAT_VERSION + 1
    storage.write(fmt.CONFIG_NAME, json.dumps(doc).encode())
    with pytest.raises(UsageError, match=f"format version {fmt.FORMAT_VERSION + 1}, newer.*upgrade drsync"):
        Repository.open(storage)


def test_chunks_dedup_pack_and_survive_reopen(repo: Repository, storage: Storage) -> None:
    w = ChunkWriter(repo, pack_target=64 * 1024)
    import random

    rnd = random.Random(3)
    blobs = [bytes([i]) * 50_000 for i in range(5)] + [rnd.randbytes(40_000) for _ in range(3)]
    ids = [chunks.chunk_id(b) for b in blobs]
    assert [w.add(i, b) for i, b in zip(ids, blobs, strict=True)] == [True] * 8
    assert w.add(ids[0], blobs[0]) is False  # same content twice is stored once
    w.flush()
    assert len(storage.list(fmt.PACKS_DIR)) >= 2  # the small pack target split them
    again = Repository.open(storage)
    for cid, b in zip(ids, blobs, strict=True):
        assert again.read_chunk(cid) == b
    # Compressible chunks are stored compressed.
    loc = again.index.get(ids[0])
    assert loc is not None and loc.encoding == fmt.ENC_ZSTD and loc.stored_length < 1000


def test_incompressible_chunks_are_stored_raw() -> None:
    import os

    data = os.urandom(1 << 20)
    enc, stored = chunks.encode(data)
    assert enc == fmt.ENC_RAW and bytes(stored) == data


def test_pack_trailer_describes_the_pack(repo: Repository, storage: Storage) -> None:
    w = repo.chunk_writer()
    w.add(chunks.chunk_id(b"abc"), b"abc")
    w.flush()
    (obj,) = storage.list(fmt.PACKS_DIR)
    pack_id = obj.name.rsplit("/", 1)[1].removesuffix(".pack")
    (entry,) = read_pack_entries(storage, pack_id, obj.size)
    assert entry.chunk_id == chunks.chunk_id(b"abc")
    with pytest.raises(IntegrityError, match=r"truncated|trailer"):
        read_pack_entries(storage, pack_id, obj.size - 3)


def _corrupt(storage: Storage, name: str, offset: int) -> None:
    data = bytearray(storage.read(name))
    data[offset] ^= 0xFF
    storage.write(name, bytes(data))


def test_corrupt_chunk_is_detected_on_read_and_verify(repo: Repository, storage: Storage,
                                                      tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_tree(data)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    # Flip a byte inside one chunk's stored bytes (the manifest's chunk set has no fixed order,
    # and some chunks are only a few bytes long; a fixed offset could land in the next chunk).
    locs = [repo.index.get(c) for c in sorted(repo.load_manifest(info).chunk_ids())]
    loc = max((x for x in locs if x is not None), key=lambda x: x.stored_length)
    _corrupt(storage, fmt.pack_name(loc.pack_id), loc.offset + loc.stored_length // 2)
    fresh = Repository.open(storage)
    report = fresh.verify()
    assert not report.ok
    assert report.damaged_files and all(d["snapshot"] == info.id for d in report.damaged_files)
    damaged = {d["path"] for d in report.damaged_files}
    cid = next(c for c, where in fresh.index.items() if where == loc)
    owners = {e.path for e in fresh.load_manifest(info).entries() if cid in e.chunks}
    assert owners <= damaged
    with pytest.raises(IntegrityError):
        fresh.read_chunk(cid)


def test_delete_and_gc_keep_other_snapshots_whole(repo: Repository, storage: Storage, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_tree(data)
    age_tree(data)
    s1 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    (data / "tables" / "orders" / "part-0.bin").write_bytes(b"replaced" * 100_000)
    (data / "catalog" / "new.txt").write_text("new")
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    before = sum(o.size for o in storage.list(fmt.PACKS_DIR))
    res = engine.delete_snapshots(repo, [s1.id])
    deleted, report = res.deleted, res.gc
    assert [d.id for d in deleted] == [s1.id]
    assert report is not None and report.freed_bytes > 0
    after = sum(o.size for o in storage.list(fmt.PACKS_DIR))
    assert after < before
    fresh = Repository.open(storage)
    assert [s.id for s in fresh.list_snapshots()] == [s2.id]
    assert fresh.verify().ok
    for cid in fresh.load_manifest(s2).chunk_ids():
        fresh.read_chunk(cid)
    assert not storage.exists(fmt.manifest_name(s1.id))


def test_unchanged_files_are_not_read_again(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_tree(data)
    age_tree(data)
    s1 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert s1.read_bytes == s1.bytes and s1.reused_files == 0
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert s2.read_bytes == 0 and s2.reused_files == s2.files and s2.new_bytes == 0
    assert s2.parent == s1.id
    # Touch one file: only it is read.
    p = data / "catalog" / "f002.txt"
    p.write_text("changed content")
    s3 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert s3.read_bytes == len("changed content") and s3.reused_files == s3.files - 1


def test_racy_files_are_read_again(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("v1")  # mtime is 'now': within the racy window of the capture
    engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    s2 = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert s2.reused_files == 0 and s2.read_bytes == 2


def test_find_snapshot_by_prefix_name_latest(repo: Repository, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    a = engine.create_snapshot(repo, engine.SnapshotRequest(str(data), name="nightly"))
    b = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    assert repo.find_snapshot("latest").id == b.id
    assert repo.find_snapshot("nightly").id == a.id
    assert repo.find_snapshot(a.id[:6]).id == a.id
    with pytest.raises(NotFound, match="no snapshot 'zzzz'"):
        repo.find_snapshot("zzzz")
