"""Small files: read and staged by the root's small-file threads, their chunks read a run at a time (issue 17).

On a local filesystem one thread reads (capture) and stages (apply) files below ``SMALL_FILE_BYTES``: several
threads made a 20,000-file restore slower (the staging directory's lock, the GIL). An apply reads small
files' chunks with ``Repository.read_chunks`` (one read per run of chunks end to end in a pack). These tests
check what must not change with that: the bytes and errors of every read, the exact tree, which file a
damaged chunk is named by, and that the threads are the ones the root asks for.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from drsync import apply as apply_mod
from drsync import engine, fsutil
from drsync.apply import apply_manifest
from drsync.dataroot import SMALL_FILE_BYTES
from drsync.dataroot.local import LocalDataRoot, LocalFrozenRoot
from drsync.errors import IntegrityError, OperationFailed
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository import repo as repo_mod
from drsync.repository.repo import Repository
from drsync.storage.local import LocalBlobWriter, LocalStorage
from tests.conftest import init_repo_at, run_drsync
from tests.fsmake import open_deep
from tests.test_capture_any_tree import exact_state, odd_tree
from tests.test_lean_manifest import _snapshot


class CountingStorage(LocalStorage):
    """The local storage, counting its ranged reads."""

    reads = 0

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        CountingStorage.reads += 1
        return super().read_range(name, offset, length)


def _mixed_tree(root: Path, seed: int, small: int = 400) -> None:
    """``small`` small files (some alike, some empty), a few large ones, and the odd tree's hostile entries."""
    odd_tree(root)
    rnd = random.Random(seed)
    for i in range(small):
        d = root / f"d{i % 7}"
        d.mkdir(exist_ok=True)
        size = rnd.choice([0, 1, 100, 4095, 70_000, SMALL_FILE_BYTES - 1])
        (d / f"s{i:04}").write_bytes(b"same" * 50 if i % 50 == 0 else rnd.randbytes(size))
    for i in range(3):
        (root / f"large{i}").write_bytes(rnd.randbytes(SMALL_FILE_BYTES + i * 300_001))


def _repo(tmp_path: Path, src: Path) -> tuple[Path, Repository, object]:
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    rp, whole, _ = _snapshot(repo, src)
    return repo, rp, whole


def test_read_chunks_gives_what_read_chunk_gives_with_far_fewer_reads(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _mixed_tree(src, 1)
    repo, _, whole = _repo(tmp_path, src)
    ids = [c for e in whole.entries() for c in e.chunks]  # manifest order, repeats kept
    ids += ids[:5] + list(reversed(ids[-40:]))  # repeats and out-of-pack-order runs too
    rp = Repository.open(CountingStorage(str(repo)))
    one = [bytes(rp.read_chunk(c)) for c in ids]
    CountingStorage.reads = 0
    got = rp.read_chunks(ids)
    assert [bytes(g) for g in got] == one
    assert all(isinstance(g, bytes) for g in got)
    # One read per run of chunks end to end in a pack (a run cut at RUN_BYTES): fewer than one a chunk.
    locs = [rp.index.get(c) for c in ids]
    breaks = sum(1 for a, b in itertools.pairwise(locs)
                 if (a.pack_id, a.offset + a.stored_length) != (b.pack_id, b.offset))
    cuts = sum(loc.stored_length for loc in locs) // repo_mod.RUN_BYTES + 1
    assert CountingStorage.reads <= 1 + breaks + cuts < len(ids) // 2, (CountingStorage.reads, breaks, cuts, len(ids))
    assert rp.read_chunks([]) == []


def _first_small_chunk(whole: object) -> tuple[str, bytes]:
    e = next(e for e in whole.entries() if e.type == "file" and 0 < e.size < 4096 and e.path.startswith("d"))
    return e.path, e.chunks[0]


def test_read_chunks_fails_as_read_chunk_does(tmp_path: Path) -> None:
    """A chunk not in the index, a damaged one and one past a truncated pack: the same errors, whichever
    place in a run they have."""
    src = tmp_path / "src"
    _mixed_tree(src, 2)
    repo, rp, whole = _repo(tmp_path, src)
    ids = [c for e in whole.entries() for c in e.chunks]
    unknown = bytes(32)
    with pytest.raises(IntegrityError, match="is not in the repository"):
        rp.read_chunks([*ids[:3], unknown])

    _, victim = _first_small_chunk(whole)
    loc = rp.index.get(victim)
    pack = repo / fmt.pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.stored_length // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    fresh = Repository.open(LocalStorage(str(repo)))
    with pytest.raises(IntegrityError) as one:
        fresh.read_chunk(victim)
    with pytest.raises(IntegrityError) as many:
        fresh.read_chunks([*[c for c in ids if c != victim][:10], victim, *ids[-3:]])
    assert str(many.value) == str(one.value) and "does not match its hash" in str(one.value)

    pack.write_bytes(bytes(data[:loc.offset + 1]))  # the pack ends inside the chunk
    fresh = Repository.open(LocalStorage(str(repo)))
    with pytest.raises(IntegrityError, match="is truncated"):
        fresh.read_chunks([victim])


def test_a_damaged_small_file_is_named_and_the_target_is_left_as_it_was(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _mixed_tree(src, 3)
    repo, rp, whole = _repo(tmp_path, src)
    path, victim = _first_small_chunk(whole)
    loc = rp.index.get(victim)
    pack = repo / fmt.pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.offset] ^= 0x01
    pack.write_bytes(bytes(data))
    target = tmp_path / "t"
    target.mkdir()
    (target / "mine.txt").write_text("keep me\n")
    before = exact_state(target)
    with pytest.raises(IntegrityError) as err:
        apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(target))
    assert path in str(err.value) and "nothing was changed" in str(err.value)
    assert exact_state(target) == before


def test_restores_leave_the_exact_tree(tmp_path: Path) -> None:
    """A new target, then a delta onto a changed copy: byte for byte, mode, times, links, xattrs, holes."""
    src = tmp_path / "src"
    _mixed_tree(src, 4)
    repo, _, whole = _repo(tmp_path, src)
    new = tmp_path / "new"
    apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(new))
    assert exact_state(new) == exact_state(src)
    rnd = random.Random(9)
    for f in sorted((new / "d3").iterdir())[::4]:
        f.write_bytes(rnd.randbytes(rnd.randrange(0, 5000)))
    (new / "d1" / "s0001").unlink()
    (new / "d1" / "s0001").mkdir()
    apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(new))
    assert exact_state(new) == exact_state(src)


def test_a_local_root_reads_and_stages_small_files_on_one_thread(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _mixed_tree(src, 5)
    sizes = {str(p.relative_to(src)): p.stat().st_size for p in [*src.glob("d[0-9]/s*"), *src.glob("large*")]}
    read: dict[bool, set[str]] = {True: set(), False: set()}
    opened = LocalFrozenRoot.open_file

    def open_file(self: LocalFrozenRoot, rel: str):  # type: ignore[no-untyped-def]
        if rel in sizes:
            read[sizes[rel] < SMALL_FILE_BYTES].add(threading.current_thread().name)
        return opened(self, rel)

    monkeypatch.setattr(LocalFrozenRoot, "open_file", open_file)
    repo = tmp_path / "repo"
    rp = Repository.init(LocalStorage(str(repo)), cluster_id="c", release="1")
    whole = rp.load_manifest(engine.create_snapshot(rp, engine.SnapshotRequest(str(src))))
    assert len(read[True]) == 1 and next(iter(read[True])).startswith("drsync-capture-small"), read
    assert read[False] and all(n.startswith("drsync-capture_") for n in read[False]), read

    staged: dict[bool, set[str]] = {True: set(), False: set()}
    write = LocalDataRoot.write_staged

    def write_staged(self: LocalDataRoot, n: int, e, data):  # type: ignore[no-untyped-def]
        staged[e.size < SMALL_FILE_BYTES].add(threading.current_thread().name)
        return write(self, n, e, data)

    monkeypatch.setattr(LocalDataRoot, "write_staged", write_staged)
    apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(tmp_path / "out"))
    assert len(staged[True]) == 1 and next(iter(staged[True])).startswith("drsync-apply-small"), staged
    assert staged[False] and all(n.startswith("drsync-apply_") for n in staged[False]), staged
    assert exact_state(tmp_path / "out") == exact_state(src)


def test_batches_keep_small_and_large_files_apart_in_order() -> None:
    """Pure: every item once; each batch one kind, positions ascending, within its limits; batches start
    in ascending positions."""
    rnd = random.Random(11)
    for _ in range(300):
        n = rnd.randrange(0, 900)
        items = [(i, SimpleNamespace(size=rnd.choice([0, 10, SMALL_FILE_BYTES - 1, SMALL_FILE_BYTES, 9 << 20])))
                 for i in range(n)]
        files, cap = rnd.randrange(1, 300), rnd.randrange(1, 64 << 20)
        got = list(apply_mod._batches(iter(items), max_files=files, max_bytes=cap))
        assert sorted(i for b in got for i, _ in b) == list(range(n))
        for b in got:
            assert b and len({e.size < SMALL_FILE_BYTES for _, e in b}) == 1
            assert [i for i, _ in b] == sorted(i for i, _ in b)
            assert len(b) <= files and sum(e.size for _, e in b[:-1]) < cap
        for a, b in itertools.pairwise(got):
            assert a[0][0] < b[0][0]


@pytest.mark.parametrize("native", [True, False])
def test_open_beneath_never_follows_a_link_nor_leaves_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               native: bool) -> None:
    """The capture opens every file it reads this way: with openat2 (one call) and component by component
    (no openat2, or a path past LONG_PATH), the same answers."""
    if not native:
        monkeypatch.setattr(fsutil, "_openat2", None)
    elif fsutil._openat2 is None:
        pytest.skip("drsync._listdir was not built")
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_bytes(b"outside")
    (root / "up").symlink_to(tmp_path / "outside")
    (root / "d" / "rel").symlink_to("e")
    (root / "d" / "e" / "g").symlink_to("f")
    fd = fsutil.open_beneath(str(root), "d/e/f")
    try:
        assert os.read(fd, 100) == b"inside" and os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    for rel in ("up/f", "d/rel/f", "d/e/g", "up"):
        with pytest.raises(OSError) as err:
            os.close(fsutil.open_beneath(str(root), rel, os.O_RDONLY | os.O_NONBLOCK))
        assert err.value.errno in (errno.ELOOP, errno.ENOTDIR), (rel, err.value)
    with pytest.raises(FileNotFoundError):
        fsutil.open_beneath(str(root), "d/e/missing")
    with pytest.raises(NotADirectoryError):
        fsutil.open_beneath(str(root), "d/e/f/x")
    fd = fsutil.open_beneath(str(root), "d/e", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fstat(fd).st_ino == (root / "d" / "e").stat().st_ino
    finally:
        os.close(fd)
    # Past LONG_PATH (and past PATH_MAX): one component at a time, either way.
    rel = [f"{i:02}-" + "x" * 250 for i in range(20)]
    deep = open_deep(root, rel)
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep), "wb") as f:
        f.write(b"deep")
    os.close(deep)
    fd = fsutil.open_beneath(str(root), "/".join([*rel, "leaf"]))
    try:
        assert os.read(fd, 10) == b"deep"
    finally:
        os.close(fd)


def test_a_delta_restore_sees_the_xattrs_of_a_file_whose_multibyte_path_passes_path_max(tmp_path: Path) -> None:
    """The target's listing reads attributes by path only below PATH_MAX, counted in bytes: a path of 1,500
    characters and 4,400 bytes is read through its directory, and an attribute the snapshot lacks goes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "top.txt").write_bytes(b"top\n")
    names = [f"{i % 10}" + "漢" * 80 for i in range(18)]

    fd = open_deep(src, names)
    with open(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep\n")
    os.close(fd)
    rel = "/".join([*names, "leaf.txt"])
    assert len(os.fsencode(str(tmp_path / "out" / rel))) > 4096 > 3072 > len(str(tmp_path / "out" / rel))
    repo, _, whole = _repo(tmp_path, src)
    out = tmp_path / "out"
    apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(out))
    assert exact_state(out) == exact_state(src)
    fd = open_deep(out, names)
    try:
        os.setxattr(f"/proc/self/fd/{fd}/leaf.txt", "user.extra", b"not in the snapshot")
    finally:
        os.close(fd)
    assert exact_state(out) != exact_state(src)
    apply_manifest(whole, Repository.open(LocalStorage(str(repo))), str(out))
    assert exact_state(out) == exact_state(src)


class _FillingWriter(LocalBlobWriter):
    """A local blob writer on a disk that fills up after ``room`` more bytes of packs (half of the write that
    crosses it lands, as a short write would): the fault a full disk gives at an arbitrary byte."""

    room = 0

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._name.startswith(fmt.PACKS_DIR):
            if len(data) > _FillingWriter.room:
                part = bytes(memoryview(data)[:len(data) // 2])
                try:
                    os.write(self._fd, part)  # type: ignore[arg-type]
                finally:
                    self._failed = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self._failed
            _FillingWriter.room -= len(data)
        super()._write(data)


class _FillingStorage(LocalStorage):
    def writer(self, name: str) -> LocalBlobWriter:
        return _FillingWriter(self, name)


def test_a_pack_that_cannot_be_written_is_never_indexed_and_the_writer_takes_nothing_more(tmp_path: Path) -> None:
    """Packs written whole before the disk filled are indexed by the flush (an upload keeps what arrived);
    the pack that failed is not, nothing more is added, and the flush says so (OperationFailed, not an
    OSError a capture could take for one file's)."""
    root = tmp_path / "repo"
    Repository.init(LocalStorage(str(root), create=True), cluster_id="c", release="1")
    repo = Repository.open(_FillingStorage(str(root)))
    rnd = random.Random(3)
    _FillingWriter.room = 5 * 64 * 1024 + 12_345
    added: list[bytes] = []
    originals: dict[bytes, bytes] = {}
    with repo.write_session() as s:
        w = s.chunk_writer(pack_target=64 * 1024)
        with pytest.raises(OperationFailed) as err:
            for _ in range(10_000):
                data = rnd.randbytes(rnd.randrange(1, 9000))
                cid = chunks.chunk_id(data)
                w.add(cid, data)
                added.append(cid)
                originals[cid] = data
        assert not isinstance(err.value, OSError) and "No space left" in str(err.value)
        with pytest.raises(OperationFailed):
            w.add(chunks.chunk_id(b"later"), b"later")
        with pytest.raises(OperationFailed):
            w.flush()
    fresh = Repository.open(LocalStorage(str(root)))
    indexed = [c for c in added if fresh.has_chunk(c)]
    assert 0 < len(indexed) < len(added)
    assert indexed == added[:len(indexed)]  # the packs written whole: a prefix of what was added
    assert all(bytes(fresh.read_chunk(c)) == originals[c] for c in indexed)
    assert not fresh.has_chunk(chunks.chunk_id(b"later"))
    v = run_drsync("repo", "verify", "--repo", root)
    assert v.code == 0, v.err


def test_a_file_that_cannot_be_read_is_reported_as_kept_only_when_an_earlier_snapshot_has_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old.txt").write_bytes(b"captured before\n")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo"), create=True), cluster_id="c", release="1")
    engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    (src / "old.txt").write_bytes(b"changed, and now unreadable\n")
    (src / "new.txt").write_bytes(b"never captured\n")
    opened = LocalFrozenRoot.open_file

    def open_file(self: LocalFrozenRoot, rel: str):  # type: ignore[no-untyped-def]
        if rel in ("old.txt", "new.txt"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), rel)
        return opened(self, rel)

    monkeypatch.setattr(LocalFrozenRoot, "open_file", open_file)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    said = {w.split(":")[0]: w for w in info.warnings}
    assert "its last captured version is kept" in said["old.txt"], said
    assert "not captured (no earlier snapshot has it)" in said["new.txt"], said
    paths = {e.path for e in repo.load_manifest(info).entries()}
    assert "old.txt" in paths and "new.txt" not in paths
