"""One conformance suite that every storage backend passes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from drsync.storage import ObjectExists, ObjectMissing, Storage, check_name, open_storage
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage


@pytest.fixture(params=["local", "memory", "hdfs"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store", create=True)
    if request.param == "hdfs":
        cluster = request.getfixturevalue("webhdfs")
        return open_storage(cluster.url(f"{cluster.test_dir}/store"), create=True)
    return MemoryStorage()


def test_is_a_storage(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_write_read_roundtrip(storage: Storage) -> None:
    storage.write("a/b/c.bin", b"hello world")
    assert storage.read("a/b/c.bin") == b"hello world"
    assert storage.read_range("a/b/c.bin", 6, 5) == b"world"
    assert storage.exists("a/b/c.bin")
    assert not storage.exists("a/b/other")


def test_overwrite_replaces_whole_blob(storage: Storage) -> None:
    storage.write("x", b"long old content")
    storage.write("x", b"new")
    assert storage.read("x") == b"new"


def test_exclusive_write_never_overwrites(storage: Storage) -> None:
    storage.write("lock", b"mine", exclusive=True)
    with pytest.raises(ObjectExists):
        storage.write("lock", b"theirs", exclusive=True)
    assert storage.read("lock") == b"mine"


def test_missing_blob_is_a_clear_error(storage: Storage) -> None:
    with pytest.raises(ObjectMissing):
        storage.read("nope")
    storage.delete("nope")  # deleting what is not there is fine


def test_writer_is_invisible_until_commit(storage: Storage) -> None:
    w = storage.writer("packs/aa/p1")
    w.write(b"abc")
    w.write(memoryview(b"def"))
    assert w.size == 6
    assert not storage.exists("packs/aa/p1")
    assert [o.name for o in storage.list("packs/")] == []
    w.commit(durable=False)
    assert storage.read("packs/aa/p1") == b"abcdef"
    storage.sync(["packs/aa/p1"])


def test_aborted_writer_leaves_nothing(storage: Storage) -> None:
    w = storage.writer("packs/bb/p2")
    w.write(b"partial")
    w.abort()
    assert not storage.exists("packs/bb/p2")
    assert storage.list("") == []


def test_list_by_prefix_sorted_with_sizes(storage: Storage) -> None:
    storage.write("snapshots/b.json", b"22")
    storage.write("snapshots/a.json", b"1")
    storage.write("index/x", b"333")
    listed = storage.list("snapshots/")
    assert [(o.name, o.size) for o in listed] == [("snapshots/a.json", 1), ("snapshots/b.json", 2)]
    assert {o.name for o in storage.list("")} == {"snapshots/a.json", "snapshots/b.json", "index/x"}


def test_delete(storage: Storage) -> None:
    storage.write("d/e", b"x")
    storage.delete("d/e")
    assert not storage.exists("d/e")
    with pytest.raises(ObjectMissing):
        storage.read("d/e")


def test_touch_moves_the_time_and_never_creates(storage: Storage) -> None:
    """A lock's refresh: the object's time moves on, its bytes stay; a missing object is ObjectMissing
    and stays missing (a lock another process removed is never brought back)."""
    storage.write("locks/t.json", b"held")
    before = next(o for o in storage.list("locks/") if o.name == "locks/t.json").mtime
    storage.touch("locks/t.json")
    after = next(o for o in storage.list("locks/") if o.name == "locks/t.json").mtime
    assert after >= before and storage.read("locks/t.json") == b"held"
    storage.delete("locks/t.json")
    with pytest.raises(ObjectMissing):
        storage.touch("locks/t.json")
    assert not storage.exists("locks/t.json") and storage.list("locks/") == []


def test_local_listing_leaves_out_what_no_read_could_address(tmp_path: Path) -> None:
    """A name check_name refuses (a backslash) and a pipe, socket or device (or a link to one) are no
    objects: not listed (a pipe opened for reading blocked every locker), and a read of a pipe is
    refused, never blocks."""
    store = LocalStorage(tmp_path / "store", create=True)
    store.write("locks/good.json", b"{}")
    (tmp_path / "store" / "locks" / "a\\b.json").write_bytes(b"{}")
    os.mkfifo(tmp_path / "store" / "locks" / "pipe.json")
    os.symlink("pipe.json", tmp_path / "store" / "locks" / "link.json")
    os.symlink("good.json", tmp_path / "store" / "locks" / "same.json")  # a link to a file: that file
    assert [o.name for o in store.list("locks/")] == ["locks/good.json", "locks/same.json"]
    from drsync.errors import IntegrityError

    for name in ("locks/pipe.json", "locks/link.json"):
        with pytest.raises(IntegrityError, match="a pipe, socket or device"):
            store.read(name)
        with pytest.raises(IntegrityError, match="a pipe, socket or device"):
            store.read_range(name, 0, 10)


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "..", "a//b", "./a", "a\\b"])
def test_names_that_escape_are_refused(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError):
        check_name(bad)
    with pytest.raises(ValueError):
        storage.write(bad, b"x")


def test_concurrent_exclusive_writes_have_one_winner(storage: Storage) -> None:
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            storage.write("race", str(n).encode(), exclusive=True)
            wins.append(n)
        except ObjectExists:
            pass

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert storage.read("race") == str(wins[0]).encode()


def test_concurrent_reads_deletes_and_rewrites_return_each_blobs_own_bytes(storage: Storage) -> None:
    """Threads read blobs (asking for more than they hold, as bounded reads of small documents do)
    while others delete and rewrite blobs: every read returns that blob's own bytes or ObjectMissing,
    never an error from a descriptor another thread closed and never another blob's bytes."""
    local = isinstance(storage, (LocalStorage, MemoryStorage))  # HDFS: a few round trips, same races
    # Packs (the local backend caches their read descriptors, more of them than it keeps) and documents.
    names = [f"{kind}/{i:03d}" for kind in ("packs", "doc") for i in range(48 if local else 3)]
    reads, churns = (300, 150) if local else (12, 6)
    for n in names:
        storage.write(n, n.encode() * 4, durable=False)
    barrier = threading.Barrier(6)
    failures: list[str] = []

    def reader(k: int) -> None:
        barrier.wait()
        for r in range(reads):
            n = names[(k * 31 + r * 7) % len(names)]
            try:
                got = storage.read_range(n, 0, 4096)
            except ObjectMissing:
                continue
            except Exception as e:
                failures.append(f"{n}: {e!r}")
                continue
            if got not in (b"", n.encode() * 4):
                failures.append(f"{n}: read {got[:24]!r}")

    def churner() -> None:
        barrier.wait()
        for r in range(churns):
            n = names[(r * 13) % len(names)]
            storage.delete(n)
            storage.write(n, n.encode() * 4, durable=False)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(5)] + [threading.Thread(target=churner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_replaced_document_reads_back_its_new_bytes(storage: Storage, tmp_path: Path) -> None:
    """Documents are replaced in place (locks, config, snapshot documents): every read, whole or a range,
    returns what is there now, also when another process replaced or removed it."""
    storage.write("doc/config", b"old settings, long")
    assert storage.read_range("doc/config", 0, 4096) == b"old settings, long"
    storage.write("doc/config", b"new settings, long")
    assert storage.read_range("doc/config", 0, 4096) == b"new settings, long"
    assert storage.read("doc/config") == b"new settings, long"
    if isinstance(storage, LocalStorage):  # behind its back, as another process does
        path = Path(storage.root) / "doc" / "config"
        (path.parent / "elsewhere").write_bytes(b"replaced by another process")
        os.rename(path.parent / "elsewhere", path)
        assert storage.read_range("doc/config", 0, 4096) == b"replaced by another process"
        path.unlink()
        with pytest.raises(ObjectMissing):
            storage.read_range("doc/config", 0, 4096)


def test_local_read_keeps_its_descriptor_while_other_threads_evict_it(tmp_path: Path) -> None:
    """The local backend caches read descriptors; one in use by a read survives eviction by other
    reads (a closed descriptor number is reused by the next open, so a read on it returns another
    file's bytes)."""
    s = LocalStorage(tmp_path / "s", create=True)
    s.write("packs/first", b"first's bytes")
    held = s._checkout("packs/first")
    for i in range(200):
        s.write(f"packs/other/{i}", b"other bytes")
        assert s.read_range(f"packs/other/{i}", 0, 100) == b"other bytes"
    s.delete("packs/first")
    assert os.pread(held.fd, 100, 0) == b"first's bytes"
    s._checkin(held)
    assert held.fd == -1


def test_memory_crash_forgets_only_non_durable_writes() -> None:
    m = MemoryStorage()
    m.write("durable", b"1", durable=True)
    m.write("volatile", b"2", durable=False)
    m.write("synced", b"3", durable=False)
    m.sync(["synced"])
    m.crash()
    assert m.exists("durable") and m.exists("synced")
    assert not m.exists("volatile")


def test_local_temp_files_are_not_listed(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path / "s", create=True)
    w = s.writer("packs/cc/p3")
    w.write(b"x")
    assert s.list("") == []
    w.abort()


def test_open_storage_urls(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage("memory://shared") is open_storage("memory://shared")
    from drsync.errors import UsageError

    with pytest.raises(UsageError, match="unknown storage scheme"):
        open_storage("s3://bucket/x")
    with pytest.raises(UsageError, match="is not host:port"):
        open_storage("hdfs://namenode/x")
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        open_storage(str(f))


def test_a_read_only_storage_refuses_every_write_but_a_lock() -> None:
    from drsync.errors import UsageError
    from drsync.storage import ReadOnlyStorage

    inner = MemoryStorage()
    inner.write("config.json", b"{}")
    ro = ReadOnlyStorage(inner, "a backup: nothing was changed")
    assert isinstance(ro, Storage) and ro.read("config.json") == b"{}" and ro.exists("config.json")
    assert [o.name for o in ro.list()] == ["config.json"]
    for attempt in (lambda: ro.write("packs/x", b"1"), lambda: ro.writer("index/y"), lambda: ro.delete("config.json"),
                    lambda: ro.touch("config.json")):
        with pytest.raises(UsageError, match="nothing was changed"):
            attempt()
    assert [o.name for o in inner.list()] == ["config.json"] and inner.read("config.json") == b"{}"
    ro.write("locks/reader.json", b"{}")  # readers take locks
    ro.touch("locks/reader.json")
    ro.delete("locks/reader.json")
    assert not inner.exists("locks/reader.json")
