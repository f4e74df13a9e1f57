"""Breaker s38: hostile cases for the upload pipeline (encode_chunk_batch, _Ahead), the GC cadence kept in
state.json (last_gc_at), the allocator settings and the early writeback of staged files.

Its findings are fixed: a refusal is reported while the producer still waits (it ends after its step), an
unreadable or corrupt last_gc_at collects now, a due collection runs with nothing expiring, GLIBC_TUNABLES
is respected, and an OSError while producing is named."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from drsync import engine, fsutil
from drsync.agent.maintenance import GC_EVERY_S, Duties, MaintenanceWorker
from drsync.agent.primary import ShippingPaused, ship_snapshot
from drsync.agent.state import AgentState, StateStore
from drsync.config import config_from_dict
from drsync.errors import DrsyncError, IntegrityError, OperationFailed
from drsync.metrics import AgentMetrics, new_registry
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.storage.local import LocalStorage
from drsync.transport import ReceivedChunk
from drsync.transport import grpc as tg
from drsync.transport.grpc import GrpcStandbyLink, encode_chunk_batch
from drsync.transport.pb import drsync_pb2 as pb
from tests.test_allocators import ARENAS, MAPPED
from tests.test_peer_limits import Standby
from tests.test_upload_ahead import producers, real_chunks

MiB = 1024 * 1024


def _kept(repo: Repository, cid: bytes) -> bool:
    try:
        repo.read_chunk(cid)
    except IntegrityError:
        return False
    return True


# --- 1. encode_chunk_batch -------------------------------------------------------------------------------


def _whole(head: pb.ChunkBatch, cs: list[ReceivedChunk]) -> pb.ChunkBatch:
    whole = pb.ChunkBatch()
    whole.CopyFrom(head)
    whole.chunks.extend(pb.Chunk(id=c.id, encoding=c.encoding, raw_length=c.raw_length, data=c.data) for c in cs)
    return whole


EDGE_BATCHES = {
    "all-default chunk": [ReceivedChunk(b"", 0, 0, b"")],
    "empty data, 32-byte id": [ReceivedChunk(b"\0" * 32, 0, 0, b"")],
    "largest uint32 sizes and encoding": [ReceivedChunk(b"\xff" * 32, 2**32 - 1, 2**32 - 1, b"\xff")],
    "20,000 empty chunks": [ReceivedChunk(b"", 0, 0, b"")] * 20_000,
    "one stored-max chunk then an empty one": [ReceivedChunk(b"a" * 32, 1, MiB, b"z" * fmt.STORED_MAX),
                                               ReceivedChunk(b"", 0, 0, b"")],
    "no chunks": [],
}


@pytest.mark.parametrize("name", list(EDGE_BATCHES))
@pytest.mark.parametrize("head", [
    pb.ChunkBatch(),  # every field default: the head serializes to nothing
    pb.ChunkBatch(epoch=2**64 - 1, sender="Zürich-東京-🚀\u200b", sent_at=-0.0, sender_instance="ö" * 256),
], ids=["default head", "odd head"])
def test_s38_encoded_batch_parses_as_the_whole_message(name: str, head: pb.ChunkBatch) -> None:
    cs = EDGE_BATCHES[name]
    wire = encode_chunk_batch(head, cs)
    whole = _whole(head, cs)
    assert pb.ChunkBatch.FromString(wire) == whole
    assert len(wire) == whole.ByteSize()
    assert len(pb.ChunkBatch.FromString(wire).chunks) == len(cs)


@pytest.mark.parametrize("bad", [ReceivedChunk(b"", 0, 2**32, b""), ReceivedChunk(b"", -1, 0, b""),
                                 ReceivedChunk(b"", 2**32, 0, b"")], ids=["raw_length 2**32", "encoding -1",
                                                                         "encoding 2**32"])
def test_s38_out_of_range_chunk_fields_fail_as_the_whole_message_does(bad: ReceivedChunk) -> None:
    with pytest.raises(ValueError):
        _whole(pb.ChunkBatch(), [bad])
    with pytest.raises(ValueError):
        encode_chunk_batch(pb.ChunkBatch(epoch=1), [bad])


def _raw_upload(standby: Standby, messages: list[bytes]) -> grpc.RpcError | pb.UploadReply:
    """Send already serialized Upload messages, as the primary now does (no serializer)."""
    call = standby.channel.stream_unary("/drsync.v1.Replication/Upload", request_serializer=None,
                                        response_deserializer=pb.UploadReply.FromString)
    try:
        return call(iter(messages), timeout=120)
    except grpc.RpcError as e:
        return e


def _malformed(case: str, good: ReceivedChunk) -> tuple[list[bytes], grpc.StatusCode]:
    head = pb.ChunkBatch(epoch=1, sender="primary", sender_instance="i")
    if case == "too many chunks":
        return [encode_chunk_batch(head, [ReceivedChunk(b"", 0, 0, b"")] * (tg.MESSAGE_MAX_ENTRIES + 1)
                                   + [good])], grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = {"31-byte id": ReceivedChunk(b"x" * 31, 0, 3, b"abc"),
           "empty id": ReceivedChunk(b"", 0, 3, b"abc"),
           "raw size unlike stored": ReceivedChunk(good.id, 0, good.raw_length - 1, good.data),
           "unknown encoding": ReceivedChunk(good.id, 7, good.raw_length, good.data),
           "raw length beyond a chunk": ReceivedChunk(good.id, 1, 2**32 - 1, b"\x28\xb5\x2f\xfd"),
           }.get(case)
    if bad is not None:
        return [encode_chunk_batch(head, [good, bad])], grpc.StatusCode.INVALID_ARGUMENT
    other = {"epoch changes mid-stream": pb.ChunkBatch(epoch=2, sender="primary", sender_instance="i"),
             "sender changes mid-stream": pb.ChunkBatch(epoch=1, sender="intruder", sender_instance="i")}[case]
    return [encode_chunk_batch(head, []), encode_chunk_batch(other, [good])], grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("case", ["too many chunks", "31-byte id", "empty id", "raw size unlike stored",
                                  "unknown encoding", "raw length beyond a chunk", "epoch changes mid-stream",
                                  "sender changes mid-stream"])
def test_s38_standby_refuses_malformed_encoded_uploads_before_keeping_them(tmp_path: Path, case: str) -> None:
    standby = Standby(tmp_path)
    try:
        good = real_chunks(1, 5000)[0]
        messages, code = _malformed(case, good)
        out = _raw_upload(standby, messages)
        assert isinstance(out, grpc.RpcError), f"{case}: accepted ({out})"
        assert out.code() == code, out.details()
        assert not _kept(standby.repo, good.id), f"{case}: the good chunk of the refused message was kept"
    finally:
        standby.close()


def test_s38_a_chunk_not_matching_its_id_is_refused_and_not_kept(tmp_path: Path) -> None:
    """(The valid chunk before it in the same message IS kept, as before the change: content-addressed, so
    harmless; the promise's "before keeping any of it" holds per size check, not for the hash check.)"""
    standby = Standby(tmp_path)
    try:
        good = real_chunks(1, 5000)[0]
        liar = ReceivedChunk(b"\1" * 32, 0, good.raw_length, good.data)
        out = _raw_upload(standby, [encode_chunk_batch(pb.ChunkBatch(epoch=1, sender="primary"), [good, liar])])
        assert isinstance(out, grpc.RpcError) and out.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not _kept(standby.repo, liar.id)
    finally:
        standby.close()


# --- 2. the producer thread (_Ahead) ---------------------------------------------------------------------


@pytest.fixture
def standby(tmp_path: Path) -> Iterator[Standby]:
    s = Standby(tmp_path)
    yield s
    s.close()


def test_s38_an_integrity_error_while_producing_reaches_the_caller(standby: Standby) -> None:
    sent = real_chunks(3)

    def damaged() -> Iterator[list[ReceivedChunk]]:
        yield sent[:2]
        raise IntegrityError("chunk abcd: pack 17 is truncated")

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(IntegrityError, match="pack 17 is truncated"):
            link.upload(1, damaged())
        assert producers() == []
    finally:
        link.close()


def test_s38_an_os_error_while_producing_is_named(standby: Standby) -> None:
    sent = real_chunks(3)

    def eio() -> Iterator[list[ReceivedChunk]]:
        yield sent[:2]
        raise OSError(errno.EIO, "Input/output error", "packs/17")

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(OperationFailed, match="reading what to send failed: .*Input/output error"):
            link.upload(1, eio())
    finally:
        link.close()
        assert producers() == []


def test_s38_a_refusal_is_not_held_up_by_a_producer_that_waits(standby: Standby) -> None:
    upload_returned = threading.Event()
    waited_out: list[bool] = []
    good = real_chunks(2)
    liar = ReceivedChunk(b"\1" * 32, 0, good[0].raw_length, good[0].data)

    def paced() -> Iterator[list[ReceivedChunk]]:
        yield [liar]  # refused by the standby
        # Stands for Pacer.sent_message's wait at a low bandwidth (message size / rate: minutes at 10 KiB/s).
        # 60 s bounds the test: a fixed upload returns at once and sets the event.
        if not upload_returned.wait(60):
            waited_out.append(True)
        yield good

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(IntegrityError, match="does not match its hash"):
            link.upload(1, paced())
        upload_returned.set()
        assert waited_out == [], "the refusal reached the caller only after the producer's wait ended"
    finally:
        upload_returned.set()
        link.close()


def test_s38_a_standby_that_dies_mid_stream_leaves_no_producer(standby: Standby) -> None:
    sent = real_chunks(4)

    def forever() -> Iterator[list[ReceivedChunk]]:
        yield sent[:2]
        standby.server.stop(None)  # the standby goes away while the primary still has messages to send
        for _ in range(10_000):
            yield sent[2:]

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(DrsyncError):
            link.upload(1, forever())
        assert producers() == []
    finally:
        link.close()


def test_s38_a_call_cancelled_by_its_deadline_leaves_no_producer(standby: Standby) -> None:
    """An upload that never ends (its messages keep coming) is cancelled by the link's deadline."""
    sent = real_chunks(2)
    link = GrpcStandbyLink(standby.addr, sender="primary", timeout_s=1)
    try:
        with pytest.raises(DrsyncError, match="(?i)deadline.exceeded"):
            link.upload(1, itertools.repeat(sent))
        assert producers() == []
    finally:
        link.close()


def test_s38_every_chunk_arrives_once_and_in_order_over_many_messages(standby: Standby) -> None:
    sent = real_chunks(40, 50_000)
    link = GrpcStandbyLink(standby.addr, sender="Zürich-東京")
    try:
        assert link.upload(1, iter([[c] for c in sent])) == (40, 40, 40 * 50_000)
        assert link.upload(1, iter([sent[:20], sent[20:]])) == (40, 0, 0)  # the second time all are there
        assert all(standby.repo.read_chunk(c.id) == c.data for c in sent)
        assert producers() == []
    finally:
        link.close()


def _primary_with_snapshot(tmp_path: Path, mib: int) -> tuple[Repository, object]:
    data = tmp_path / "pdata"
    data.mkdir()
    for i in range(mib):
        (data / f"f{i}.bin").write_bytes(os.urandom(MiB))
    repo = Repository.init(LocalStorage(tmp_path / "prepo", create=True), cluster_id="east", release="6.2.1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data), kind="cycle"))
    return repo, info


def test_s38_a_pause_mid_upload_keeps_what_was_sent_and_the_next_shipment_sends_the_rest(tmp_path: Path) -> None:
    standby = Standby(tmp_path / "s")
    repo, info = _primary_with_snapshot(tmp_path, 6)
    asked = [0]

    def window() -> float | None:  # the bandwidth window closes after a few messages
        asked[0] += 1
        return 0.0 if asked[0] <= 5 else None

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(ShippingPaused, match="stay on the standby"):
            ship_snapshot(repo, info, link, epoch=1, sender="primary", bandwidth_bps=window)
        assert producers() == []
        held = len(standby.repo.index)
        assert held > 0, "nothing of the paused upload stayed on the standby"
        result = ship_snapshot(repo, info, link, epoch=1, sender="primary")
        assert 0 < result.missing_chunks == result.chunks - held  # only the rest went
        assert producers() == []
    finally:
        link.close()
        standby.close()
    restored = tmp_path / "restored"
    engine.restore_snapshot(standby.repo, info.id, str(restored), cluster_id="east", release="6.2.1")
    for f in (tmp_path / "pdata").iterdir():
        assert (restored / f.name).read_bytes() == f.read_bytes()


# --- 3. GC cadence in state.json -----------------------------------------------------------------------


class Maint:
    """A maintenance worker over a real repository and state directory, keep = { last = 1 }."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "d"
        self.data.mkdir()
        self.cfg = config_from_dict({"cluster": {"id": "c", "release": "1", "data": str(self.data),
                                                 "repository": str(tmp / "r")},
                                     "agent": {"name": "east"}, "snapshots": {"keep": {"last": 1}}})
        self.repo = Repository.init(open_storage(str(tmp / "r")), cluster_id="c", release="1")
        self.state_dir = tmp / "state"
        self.worker = self.open()

    def open(self) -> MaintenanceWorker:
        """A worker as a (re)started agent or `drsync agent --once` makes it: the state read from disk."""
        return MaintenanceWorker(self.cfg, self.repo, AgentMetrics(new_registry(), group="g", agent="east"),
                                 store=StateStore(str(self.state_dir)),
                                 duties=lambda: Duties(role="primary", protect=frozenset()), open_coord=None)

    def snap(self) -> None:
        (self.data / "f.bin").write_bytes(os.urandom(MiB))  # no chunk shared with any other snapshot
        engine.create_snapshot(self.repo, engine.SnapshotRequest(str(self.data), kind="cycle"))

    def packs(self) -> int:
        return sum(1 for p in (self.tmp / "r" / "packs").rglob("*") if p.is_file())

    def snapshots(self) -> int:
        return len(self.repo.list_snapshots())

    def write_state(self, **fields: object) -> None:
        doc = dataclasses.asdict(AgentState())
        doc.update(fields)
        for k in [k for k, v in fields.items() if v is _DROP]:
            del doc[k]
        (self.state_dir / "state.json").write_text(json.dumps(doc))

    def last_gc_at(self) -> object:
        return json.loads((self.state_dir / "state.json").read_text()).get("last_gc_at")


_DROP = object()


@pytest.fixture
def maint(tmp_path: Path) -> Maint:
    return Maint(tmp_path)


def test_s38_state_of_an_older_version_collects(maint: Maint) -> None:
    maint.write_state(last_gc_at=_DROP, applied_snapshot="x")
    assert "last_gc_at" not in json.loads((maint.state_dir / "state.json").read_text())
    maint.snap()
    maint.snap()
    w = maint.open()
    w.run_pass()
    assert (maint.snapshots(), maint.packs()) == (1, 1)
    assert isinstance(maint.last_gc_at(), float) and maint.last_gc_at() > 0
    assert json.loads((maint.state_dir / "state.json").read_text())["applied_snapshot"] == "x"


def test_s38_retention_runs_each_time_gc_at_most_once_an_interval_across_restarts(maint: Maint) -> None:
    maint.snap()
    maint.snap()
    maint.open().run_pass()
    first = maint.last_gc_at()
    assert (maint.snapshots(), maint.packs()) == (1, 1)
    maint.snap()
    maint.open().run_pass()  # a restart (or the next --once): retention runs, GC is not due
    assert maint.snapshots() == 1 and maint.packs() == 2
    assert maint.last_gc_at() == first


def test_s38_a_last_gc_in_the_future_does_not_postpone_gc(maint: Maint) -> None:
    maint.snap()
    maint.snap()
    maint.write_state(last_gc_at=4102444800.0)  # 2100-01-01: written before the clock was set back
    maint.open().run_pass()
    assert (maint.snapshots(), maint.packs()) == (1, 1)
    assert maint.last_gc_at() < 4102444800.0


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1e308, 1e308, 0, True])
def test_s38_odd_numeric_last_gc_at_values_collect(maint: Maint, value: object) -> None:
    maint.snap()
    maint.snap()
    maint.write_state(last_gc_at=value)
    maint.open().run_pass()
    assert (maint.snapshots(), maint.packs()) == (1, 1)


@pytest.mark.parametrize("value", ["abc", None, "1700000000", [1]], ids=["word", "null", "numeric string", "list"])
def test_s38_corrupt_last_gc_at_does_not_stop_maintenance(maint: Maint, value: object) -> None:
    maint.snap()
    maint.snap()
    maint.write_state(last_gc_at=value)
    maint.open().run_pass()
    assert (maint.snapshots(), maint.packs()) == (1, 1)


def test_s38_chunks_of_a_snapshot_expired_while_gc_was_not_due_are_collected_later(maint: Maint) -> None:
    maint.snap()
    maint.snap()
    maint.open().run_pass()  # collects
    maint.snap()
    maint.open().run_pass()  # expires the second snapshot; GC not due: its pack stays for now
    assert maint.packs() == 2
    doc = json.loads((maint.state_dir / "state.json").read_text())
    maint.write_state(**{**doc, "last_gc_at": doc["last_gc_at"] - GC_EVERY_S - 1})  # an interval later
    maint.open().run_pass()  # nothing new expires
    assert maint.packs() == 1, "the expired snapshot's chunks are never collected"


# --- 4. allocators ---------------------------------------------------------------------------------------

def _mapped(out: subprocess.CompletedProcess[str]) -> int:
    """Bytes mapped on their own while a chunk-sized buffer was held (tests.test_allocators.MAPPED)."""
    return int(out.stdout.split()[0])


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "ARROW_DEFAULT_MEMORY_POOL")}
    return {**base, **extra}


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)


def test_s38_an_arena_max_set_with_glibc_tunables_is_respected() -> None:
    out = _run(ARENAS, _env(GLIBC_TUNABLES="glibc.malloc.arena_max=8"))
    assert sum(line.startswith("Arena ") for line in out.stderr.splitlines()) > 2


def test_s38_an_mmap_threshold_set_with_glibc_tunables_is_respected() -> None:
    assert _mapped(_run(MAPPED, _env(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072"))) >= fmt.STORED_MAX


def test_s38_the_legacy_variables_are_respected() -> None:
    assert sum(line.startswith("Arena ") for line in _run(ARENAS, _env(MALLOC_ARENA_MAX="8")).stderr.splitlines()) > 2
    assert _mapped(_run(MAPPED, _env(MALLOC_MMAP_THRESHOLD_="131072"))) >= fmt.STORED_MAX
    assert _mapped(_run(MAPPED, _env())) == 0


@pytest.mark.parametrize("extra", [
    {"MALLOC_ARENA_MAX": "garbage"}, {"MALLOC_MMAP_THRESHOLD_": "-5"}, {"MALLOC_ARENA_MAX": ""},
    {"GLIBC_TUNABLES": "nonsense=:=="}, {"ARROW_DEFAULT_MEMORY_POOL": "garbage"}, {"ARROW_DEFAULT_MEMORY_POOL": ""},
], ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_s38_garbage_allocator_settings_do_not_break_drsync(extra: dict[str, str]) -> None:
    code = ("import drsync, pyarrow as pa; from drsync.repository.repo import Repository; "
            "print(pa.array([1, 2, 3]).sum().as_py())")
    assert _run(code, _env(**extra)).stdout.split()[-1] == "6"


# --- 5. early writeback ----------------------------------------------------------------------------------


def test_s38_start_writeback_never_raises(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        fsutil.start_writeback(r)
        fsutil.start_writeback(w)
    finally:
        os.close(r)
        os.close(w)
    fsutil.start_writeback(r)  # closed
    for fd in (-1, 2**31, 2**40, -(2**31) - 1):
        fsutil.start_writeback(fd)
    f = tmp_path / "ro"
    f.write_bytes(b"x" * MiB)
    fd = os.open(f, os.O_RDONLY)
    try:
        fsutil.start_writeback(fd)
    finally:
        os.close(fd)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsutil.start_writeback(dfd)
    finally:
        os.close(dfd)
    if os.path.isdir("/dev/shm"):
        fd = os.open("/dev/shm", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fsutil.start_writeback(fd)
        finally:
            os.close(fd)


def _tree(root: Path) -> dict[str, int]:
    root.mkdir(parents=True)
    sizes = {"empty": 0, "below": MiB - 1, "exactly": MiB, "above": MiB + 1, "three": 3 * MiB}
    for name, size in sizes.items():
        (root / name).write_bytes(os.urandom(size))
    with open(root / "sparse", "wb") as f:  # 8 MiB, data only at both ends
        f.write(os.urandom(4096))
        f.seek(8 * MiB - 4096)
        f.write(os.urandom(4096))
    sizes["sparse"] = 8 * MiB
    with open(root / "all-hole", "wb") as f:
        f.truncate(2 * MiB)
    sizes["all-hole"] = 2 * MiB
    return sizes


@pytest.mark.parametrize("where", ["tmp", "tmpfs"])
def test_s38_restore_is_byte_identical_around_the_writeback_size(tmp_path: Path, where: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        base = Path(f"/dev/shm/brk-s38-{os.getpid()}")
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
    else:
        base = tmp_path
    calls: list[int] = []
    real = fsutil.start_writeback

    def counting(fd: int) -> None:
        calls.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(fsutil, "start_writeback", counting)
    try:
        sizes = _tree(base / "src")
        repo = Repository.init(LocalStorage(tmp_path / "repo", create=True), cluster_id="c", release="1")
        info = engine.create_snapshot(repo, engine.SnapshotRequest(str(base / "src")))
        engine.restore_snapshot(repo, info.id, str(base / "dst"), cluster_id="c", release="1")
        for name in sizes:
            a, b = base / "src" / name, base / "dst" / name
            assert b.read_bytes() == a.read_bytes(), name
            if a.stat().st_blocks * 512 < a.stat().st_size // 2:
                assert b.stat().st_blocks * 512 < b.stat().st_size // 2, f"{name}: its holes were filled"
        assert sorted(calls) == sorted(s for s in sizes.values() if s >= MiB)
    finally:
        if where == "tmpfs":
            shutil.rmtree(base, ignore_errors=True)
