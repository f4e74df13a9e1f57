"""Warming (drsync.warming): a capture's next small-file batches asked of the disk ahead of the one reader,
never more than WARM_AHEAD batches ahead, never raising, never reading content or leaving the root."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from drsync.dataroot.local import LocalFrozenRoot
from drsync.warming import CACHED_SHARE, WARM_AHEAD, Warming
from tests.group import wait_for


def test_batches_after_the_first_are_warmed_in_order_never_more_than_the_bound_ahead_of_the_reader() -> None:
    batches = [[f"b{i}/f{j}" for j in range(3)] for i in range(12)]
    reads = 0
    lock = threading.Lock()
    warmed: list[tuple[int, int]] = []  # (batch index, batches read when it was warmed)

    def warm(rels: list[str]) -> int:
        with lock:
            warmed.append((batches.index(rels), reads))
        return len(rels)  # none of them cached

    with Warming(warm, batches) as w:
        for _ in batches:
            wait_for(lambda r=reads: len(warmed) >= min(r + WARM_AHEAD, len(batches) - 1), "the warmer to get ahead")
            with lock:
                reads += 1
            w.read_one()
    assert [i for i, _ in warmed] == list(range(1, 12))  # the first is being read: never warmed
    assert all(i - done <= WARM_AHEAD for i, done in warmed), warmed


def test_closing_stops_a_warmer_that_waits_for_the_reader_and_a_failing_warm_never_raises() -> None:
    calls: list[list[str]] = []

    def warm(rels: list[str]) -> int:
        calls.append(rels)
        return len(rels)

    w = Warming(warm, [["a"], ["b"], ["c"], ["d"], ["e"]])
    wait_for(lambda: len(calls) == WARM_AHEAD, "the warmer to fill its room")
    w.close()  # it waits for room that never comes: close ends it
    assert calls == [["b"], ["c"]]

    def broken(rels: list[str]) -> int:
        raise OSError("the disk said no")

    with Warming(broken, [["a"], ["b"], ["c"]]) as w2:
        w2.read_one()


def test_a_local_roots_warm_opens_nothing_it_should_not_and_never_hangs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "file").write_bytes(os.urandom(8192))
    os.mkfifo(root / "d" / "fifo")  # no writer: a blocking open would hang the warmer
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "pipe")
    os.symlink(outside, root / "link")  # a directory on the way swapped for a link out of the root
    os.symlink(outside / "pipe", root / "d" / "to-pipe")
    before = set(os.listdir("/proc/self/fd"))
    LocalFrozenRoot(str(root)).warm(["d/file", "d/fifo", "link/pipe", "d/to-pipe", "d/missing", "../outside/pipe"])
    assert set(os.listdir("/proc/self/fd")) <= before  # every descriptor closed
    with open(root / "d" / "file", "rb") as f:
        assert len(f.read()) == 8192  # and the file untouched


def test_a_capture_warms_its_small_files_ahead_and_captures_exactly_what_it_would_without(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from drsync import capture
    from drsync.repository.repo import Repository
    from drsync.storage.memory import MemoryStorage

    monkeypatch.setattr(capture, "_BATCH_FILES", 16)  # many batches in each window
    root = tmp_path / "data"
    for d in range(4):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (root / f"d{d}" / f"f{i:03}").write_bytes(f"{d}/{i} ".encode() * (1 + i % 9))
    evict(root)
    warmed: list[str] = []
    asked: list[int] = []
    real = LocalFrozenRoot.warm
    real_read_one = Warming.read_one
    reads = 0

    def counting(self: LocalFrozenRoot, rels: list[str]) -> int:
        n = real(self, rels)
        warmed.extend(rels)
        asked.append(n)
        return n

    def paced(self: Warming) -> None:
        """The reader starts its next batch once the warmer is done with it, as on a fast disk and an idle
        machine (else a busy machine lets the reader overtake the warmer, which then passes batches over)."""
        nonlocal reads
        reads += 1
        wait_for(lambda: len(warmed) >= min(reads * 16, len(files) - 16), "the warmer to warm the next batch")
        real_read_one(self)

    def manifest(warm: bool, pace: bool = False) -> bytes:
        with monkeypatch.context() as m:
            m.setattr(LocalFrozenRoot, "warm", counting if warm else (lambda self, rels: 0))
            if pace:
                m.setattr(Warming, "read_one", paced)
            repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
            with repo.write_session() as session:
                writer = session.chunk_writer()
                result = capture.capture(str(root), writer, captured_at=1.9e9)
                writer.flush()
                with result.stored:
                    return result.stored.getvalue()

    files = {f"d{d}/f{i:03}" for d in range(4) for i in range(100)}
    with_warming = manifest(True, pace=True)
    # every batch but the first (being read) warmed once, and the disk asked for most of their files
    assert set(warmed) <= files and len(warmed) == len(files) - 16 and len(warmed) == len(set(warmed))
    assert sum(asked) * CACHED_SHARE >= len(warmed), asked
    # read once, the files are in the page cache: at most one batch is looked at, then warming stops
    warmed.clear()
    asked.clear()
    assert manifest(True) == with_warming and len(warmed) <= 16 and sum(asked) == 0, asked
    evict(root)
    assert manifest(False) == with_warming  # without warming: the same bytes


def evict(root: Path) -> None:
    """Every file below ``root`` written back and dropped from the page cache (clean pages go at once)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_a_mostly_cached_batch_ends_the_warming_of_its_window() -> None:
    calls: list[list[str]] = []

    def warm(rels: list[str]) -> int:
        calls.append(rels)
        return 0  # every one of them in the page cache already

    with Warming(warm, [[f"f{i}"] * 8 for i in range(10)]) as w:
        for _ in range(10):
            w.read_one()
    assert len(calls) == 1


def test_batches_the_reader_has_reached_are_passed_over() -> None:
    """A busy machine lets the reader overtake the warmer: the warmer goes on from the batch after the
    reader's own, never warming one being read or read (too late, and their cached pages would end the
    warming of those still ahead)."""
    calls: list[int] = []
    first = threading.Event()
    batches = [[f"f{i}"] for i in range(10)]

    def warm(rels: list[str]) -> int:
        calls.append(batches.index(rels))
        if len(calls) == 1:
            first.wait(timeout=60)  # the warmer stalls on batch 1 while the reader reads batches 0 to 2
        return len(rels)

    with Warming(warm, batches) as w:
        wait_for(lambda: calls == [1], "the warmer to begin batch 1")
        for _ in range(3):
            w.read_one()  # the reader now reads batch 3
        first.set()
        wait_for(lambda: len(calls) == 3, "the warmer to fill its room again")
        assert calls == [1, 4, 5]  # 2 and 3 passed over; 5 is WARM_AHEAD past the reader's batch 3
        for want in (6, 7, 8, 9):
            w.read_one()
            wait_for(lambda want=want: calls[-1] == want, f"the warmer to warm batch {want}")
        for _ in range(3):
            w.read_one()
    assert calls == [1, 4, 5, 6, 7, 8, 9]
