"""Changed chunks sent as deltas against the chunks they replace (issue 17: bytes on a WAN link).

A file rewritten in place keeps its FastCDC boundaries outside what changed, so each new chunk has an old
one, at the same offset of the same path, that holds most of its bytes. Over a far or limited link the
primary sends the new chunk as a zstd frame with the old one as a raw-content dictionary, when the standby
says (Hello) that it takes them and (Negotiate) that it holds the old one; the standby decodes it against
its own copy, checks it against its id and stores it as a capture would. Tested: the pure planning
(``delta_bases``, ``wants_deltas``), the codec against hostile frames, real agents over gRPC (bytes sent,
the standby's tree and repository), a hostile sender, and a standby whose base is damaged.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest
import zstandard

from drsync.agent.primary import DELTA_RTT_S, ship_snapshot, wants_deltas
from drsync.errors import IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_diff import delta_bases
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage import open_storage
from drsync.transport import ReceivedChunk, StandbyHello
from drsync.transport.grpc import GrpcStandbyLink, encode_chunk_batch
from drsync.transport.pb import drsync_pb2 as pb
from drsync.transport.pb import drsync_pb2_grpc as pb_grpc
from tests.conftest import run_drsync
from tests.test_agents import Pair, pair, scrape, wait_for  # noqa: F401 - pair is a fixture

# --- the codec -----------------------------------------------------------------------------------


def _edited(base: bytes, at: int, n: int, seed: int = 3) -> bytes:
    b = bytearray(base)
    b[at:at + n] = random.Random(seed).randbytes(n)
    return bytes(b)


def test_a_delta_is_about_the_bytes_that_changed_and_decodes_to_the_chunk() -> None:
    base = os.urandom(fmt.CHUNK_MAX)
    new = _edited(base, 400_000, 10_000)
    delta = chunks.delta_encode(new, base)
    assert len(delta) < 12_000  # a whole chunk is 1 MiB
    assert chunks.delta_decode(delta, base, len(new), chunks.chunk_id(new)) == new
    # A chunk smaller or larger than its base, and one that shares nothing with it, decode too.
    for other in (new[:70_000], base[:300_000] + os.urandom(5000), os.urandom(200_000), b""):
        assert chunks.delta_decode(chunks.delta_encode(other, base), base, len(other), chunks.chunk_id(other)) == other


def test_hostile_delta_frames_are_refused() -> None:
    base = os.urandom(300_000)
    new = _edited(base, 1000, 5000)
    cid = chunks.chunk_id(new)
    delta = chunks.delta_encode(new, base)
    cases = {
        "another base": (delta, os.urandom(300_000), len(new), cid),
        "another id": (delta, base, len(new), chunks.chunk_id(b"x")),
        "another length": (delta, base, len(new) - 1, cid),
        "no size in the frame": (zstandard.ZstdCompressor(write_content_size=False).compress(new), base, len(new), cid),
        "not zstd": (b"\x00" * 100, base, len(new), cid),
        "truncated": (delta[:-9], base, len(new), cid),
        "a claimed size over the limit": (delta, base, fmt.CHUNK_MAX + 1, cid),
        "a frame over the limit": (b"\x28\xb5\x2f\xfd" + b"\0" * fmt.STORED_MAX, base, len(new), cid),
        "a short id": (delta, base, len(new), cid[:31]),
    }
    for what, (frame, b, n, i) in cases.items():
        with pytest.raises(IntegrityError):
            chunks.delta_decode(frame, b, n, i)
            pytest.fail(what)
    # A frame that declares far more than it is allowed allocates nothing of it: refused from its header.
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (64 << 20))
    with pytest.raises(IntegrityError, match="declare"):
        chunks.delta_decode(bomb, base, 1000, cid)


# --- the planning: which chunk goes against which ----------------------------------------------------


def _cid(tag: str) -> bytes:
    return blake3.blake3(tag.encode()).digest()


def _manifest(files: dict[str, list[tuple[str, int]]]) -> Manifest:
    paths = sorted(files)
    n = len(paths)
    lists = [[_cid(t) for t, _ in files[p]] for p in paths]
    sizes = [[s for _, s in files[p]] for p in paths]
    return Manifest.from_columns({
        "path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n,
        "size": [sum(s) for s in sizes], "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)),
        "target": [None] * n, "content": [blake3.blake3(b"".join(c)).digest() for c in lists], "chunks": lists,
        "chunk_sizes": sizes})


def _pairs(old: Manifest, new: Manifest, wanted: list[str], limit: int | None = None
           ) -> dict[str, tuple[list[str], int]]:
    names = {_cid(t): t for t in ["a0", "a1", "a2", "a3", "b0", "b1", "c0", "d0", "x", "y", "z", "n0", "n1", "n2",
                                  "n3", "m0", "m1", "w0", "e0"]}
    args = (old, new, IdSet.of([_cid(t) for t in wanted]))
    plan = delta_bases(*args) if limit is None else delta_bases(*args, limit=limit)
    out = {}
    for i, cid in enumerate(id_list(plan.chunks)):
        bases, skip = plan.of(i)
        out[names[cid]] = ([names[b] for b in bases], skip)
    return out


def test_each_wanted_chunk_goes_against_the_old_bytes_at_its_offsets() -> None:
    old = _manifest({
        "a": [("a0", 100), ("a1", 100), ("a2", 100), ("a3", 100)],
        "b": [("b0", 100), ("b1", 100)],
        "c": [("c0", 100)],
        "d": [("d0", 100)],
    })
    new = _manifest({
        # a: rewritten in its second chunk, which FastCDC cut in two (x at 100, y at 150); z appended past
        # the old end has no base.
        "a": [("a0", 100), ("x", 50), ("y", 50), ("a2", 100), ("a3", 100), ("z", 10)],
        "b": [("b0", 100), ("b1", 100)],  # unchanged: its chunks are never wanted
        "c": [("n0", 60), ("n1", 60)],  # shrunk and grown: n1 starts at 60, inside c0
        "moved": [("n2", 100)],  # no such path before: no base
        "e": [("n3", 100)],  # new
        "d": [("m0", 100)],  # d changed but m0 is not wanted (the standby has it): no pair
    })
    assert _pairs(old, new, ["x", "y", "z", "n0", "n1", "n2", "n3"]) == {
        "x": (["a1"], 0), "y": (["a1"], 50), "n0": (["c0"], 0), "n1": (["c0"], 60)}
    assert _pairs(old, new, []) == {}
    assert len(_pairs(old, new, ["x", "y", "n0", "n1"], limit=2)) == 2


def test_a_chunk_named_twice_is_planned_once_and_spans_the_old_chunks_it_overlaps() -> None:
    old = _manifest({"p": [("a0", 10), ("a1", 10)], "q": [("b0", 10)]})
    new = _manifest({"p": [("a0", 10), ("w0", 10)], "q": [("w0", 10)], "r": [("a1", 10)]})
    assert _pairs(old, new, ["w0", "a1"]) == {"w0": (["a1"], 0)}
    # A chunk whose offsets cross an old boundary goes against both old chunks, less what lies before it.
    old = _manifest({"p": [("e0", 10), ("a1", 10), ("a2", 10)]})
    new = _manifest({"p": [("a0", 5), ("m0", 10), ("w0", 15)]})
    assert _pairs(old, new, ["a0", "m0", "w0"]) == {
        "a0": (["e0"], 0), "m0": (["e0", "a1"], 5), "w0": (["a1", "a2"], 5)}


def test_deltas_only_where_the_link_is_far_or_limited() -> None:
    def hello(rtt: float, takes: bool = True) -> StandbyHello:
        return StandbyHello("s", "standby", "c", "1", 1, "", 0.0, 0.0, round_trip_s=rtt, delta_chunks=takes)

    assert not wants_deltas(hello(0.0002), 0.0, False)  # loopback or a LAN, unlimited
    assert wants_deltas(hello(DELTA_RTT_S * 5), 0.0, False)  # a WAN round trip
    assert wants_deltas(hello(0.0002), 10e6, False)  # a bandwidth limit in force
    assert not wants_deltas(hello(0.05, takes=False), 10e6, False)  # an older standby
    assert not wants_deltas(hello(0.05), 10e6, True)  # the retry after a rejected delta


# --- real agents ------------------------------------------------------------------------------------


class RecordingLink:
    """The real gRPC link to the standby, keeping every chunk it uploads."""

    def __init__(self, link: GrpcStandbyLink) -> None:
        self.link, self.target = link, link.target
        self.sent: list[ReceivedChunk] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.link, name)

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        def recorded() -> Iterator[list[ReceivedChunk]]:
            for b in batches:
                self.sent += b
                yield b

        return self.link.upload(epoch, recorded())


def _snapshot(p: Pair, repo: Repository) -> SnapshotInfo:
    r = run_drsync("snapshot", "create", "--config", p.primary_cfg, "--json")
    assert r.code == 0, r.err
    return repo.find_snapshot(r.json()["id"])


def _ship(p: Pair, repo: Repository, info: SnapshotInfo, applied: SnapshotInfo | None = None,
          delta: bool = True) -> RecordingLink:
    link = RecordingLink(GrpcStandbyLink(p.standby_addr, sender="primary"))
    try:
        res = ship_snapshot(repo, info, link, epoch=1, sender="primary",  # type: ignore[arg-type]
                            applied=None if applied is None else repo.open_manifest(applied), delta=delta)
    finally:
        link.link.close()
    assert res.applied.snapshot == info.id and res.delta_chunks == sum(bool(c.bases) for c in link.sent)
    return link


def _rewrite_in_place(path: Path, at: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(os.urandom(n))


def test_a_rewrite_in_place_goes_as_deltas_and_the_standby_matches(pair: Pair) -> None:  # noqa: F811
    big = pair.prod / "tables" / "events"
    big.mkdir(parents=True)
    for i in range(3):
        (big / f"part-{i}.bin").write_bytes(os.urandom((4 << 20) + i * 999))
    (big / "export.csv").write_bytes(b"".join(b"%d,user-%d,%f,page_view\n" % (i, i * 7, i / 3) for i in range(90_000)))
    pair.start("standby")
    repo = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    first = _snapshot(pair, repo)
    assert not any(c.bases for c in _ship(pair, repo, first).sent)  # a first sync has nothing to go against
    assert pair.in_sync()

    for i in range(3):
        _rewrite_in_place(big / f"part-{i}.bin", 1_000_000 + i * 77_000, 20_000)
    _rewrite_in_place(big / "export.csv", 500_000, 3000)
    (big / "new.bin").write_bytes(os.urandom(600_000))  # new: goes whole
    second = _snapshot(pair, repo)
    link = _ship(pair, repo, second, applied=first)
    deltas = [c for c in link.sent if c.encoding == fmt.ENC_DELTA]
    assert len(deltas) >= 4 and all(c.bases and all(len(b) == 32 for b in c.bases) for c in deltas)
    sent = sum(len(c.data) for c in link.sent)
    whole = sum(c.raw_length for c in link.sent)
    # 63 KB changed in place and 600 KB new, against whole chunks of about 2 MiB.
    assert sent < 600_000 + 200_000 < whole, (sent, whole)
    assert pair.in_sync()
    # The standby stored every chunk as a capture would, checked by its own verify.
    r = run_drsync("repo", "verify", "--config", pair.standby_cfg, "--json")
    assert r.code == 0, r.err
    # Without deltas (an older standby, or a near one), the same change goes whole.
    _rewrite_in_place(big / "part-0.bin", 2_000_000, 20_000)
    third = _snapshot(pair, repo)
    link = _ship(pair, repo, third, applied=second, delta=False)
    assert link.sent and not any(c.bases for c in link.sent)
    assert pair.in_sync()


def _upload(addr: str, chunk: pb.Chunk) -> grpc.RpcError | None:
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.ReplicationStub(ch)
        msg = encode_chunk_batch(pb.ChunkBatch(epoch=1, sender="primary", sent_at=1.0), [])
        one = pb.ChunkBatch()
        one.chunks.append(chunk)
        try:
            stub.Upload(iter([pb.ChunkBatch.FromString(msg + one.SerializeToString())]), timeout=30)
        except grpc.RpcError as e:
            return e
    return None


def test_a_hostile_sender_cannot_store_what_its_delta_does_not_hold(pair: Pair) -> None:  # noqa: F811
    pair.start("standby")
    repo = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    first = _snapshot(pair, repo)
    _ship(pair, repo, first)
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    held = id_list(standby.load_manifest_chunks(standby.find_snapshot(first.id)).ids)[0]
    base = standby.read_chunk(held)
    new = _edited(base, 0, 100)
    good = chunks.delta_encode(new, base)
    held_twice = [held] * 17
    lies = {
        "an id its bytes do not have": pb.Chunk(id=chunks.chunk_id(b"other"), encoding=2, raw_length=len(new),
                                                data=good, bases=[held]),
        "a base the standby does not hold": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new),
                                                     data=chunks.delta_encode(new, b"nothing"),
                                                     bases=[chunks.chunk_id(b"nothing")]),
        "no base": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good),
        "too many bases": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good,
                                   bases=held_twice),
        "a short base id": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good,
                                    bases=[held[:31]]),
        "a skip past every base": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good,
                                           bases=[held], base_skip=fmt.CHUNK_MAX),
        "another base's bytes": pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good,
                                         bases=[held, held], base_skip=len(base) // 2),
        "an unknown encoding": pb.Chunk(id=chunks.chunk_id(new), encoding=3, raw_length=len(new), data=good,
                                        bases=[held]),
    }
    # A malformed delta is refused on arrival (INVALID_ARGUMENT); one the standby cannot use (no such base,
    # or bytes that decode to another chunk) is refused as unusable (DATA_LOSS: the primary then sends it whole).
    unusable = {"an id its bytes do not have", "a base the standby does not hold", "another base's bytes"}
    for what, chunk in lies.items():
        err = _upload(pair.standby_addr, chunk)
        assert err is not None, what
        assert err.code() == (grpc.StatusCode.DATA_LOSS if what in unusable else grpc.StatusCode.INVALID_ARGUMENT), (
            what, err)
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    assert standby.missing_chunks([chunks.chunk_id(new), chunks.chunk_id(b"other")]) == [
        chunks.chunk_id(new), chunks.chunk_id(b"other")]
    # The honest delta of the same chunk is stored, as its plain bytes.
    assert _upload(pair.standby_addr, pb.Chunk(id=chunks.chunk_id(new), encoding=2, raw_length=len(new), data=good,
                                               bases=[held])) is None
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    assert standby.read_chunk(chunks.chunk_id(new)) == new


def test_a_damaged_base_on_the_standby_does_not_stop_replication(pair: Pair) -> None:  # noqa: F811
    """The standby's copy of a base is damaged (a bad sector in its pack): the delta against it is rejected,
    the agent's next try sends whole chunks, and the standby follows production."""
    part = pair.prod / "tables" / "big.bin"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(random.Random(11).randbytes(3 << 20))  # the same chunks run after run
    with open(pair.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')  # a limit in force: deltas, on loopback
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to match production")
    pair.kill("primary")
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    prod = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    applied = prod.find_snapshot(GrpcStandbyLink(pair.standby_addr).hello("test", 1).applied_snapshot)
    m = prod.load_manifest(applied)
    row = next(r for r in m.entries() if r.path == "tables/big.bin")
    starts = np.cumsum([0, *row.chunk_sizes])
    k = int(np.searchsorted(starts, 1_500_000, side="right")) - 1
    base = row.chunks[k]
    loc = standby.index.get(base)
    pack = Path(pair.standby_site.url("standby-repo")) / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:  # the base's bytes flipped where they lie: its pack is damaged there
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\xff" * 64)
    # inside the damaged chunk only (its middle): whatever chunks the rewrite makes are taken against it
    _rewrite_in_place(part, int(starts[k] + starts[k + 1]) // 2 - 2500, 5000)
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to follow with whole chunks after the rejected delta")
    log = (pair.tmp / "primary.log").read_text()
    assert "came as a delta against chunks this standby cannot read" in log, log[-3000:]
    # The rejected delta crossed the link too: the primary's counter has it (counted once the standby's reply
    # to the retry is in, which may come after the standby's root matched).
    wait_for(lambda: scrape(pair.metrics["primary"]).get("drsync_delta_chunks_total", 0) >= 1,
             "the primary to count the rejected delta")


def test_a_whole_chunk_retry_reports_both_tries() -> None:
    """What a shipment reports after a standby rejected a delta: the retry's figures plus what the first try
    sent before the refusal (both crossed the link); nothing added when the first try's figures are unknown."""
    from drsync.agent.primary import ShipResult, Upload
    from drsync.agent.shipper import with_first_try
    from drsync.transport import CommitOutcome

    retry = ShipResult("s", chunks=40, missing_chunks=1, shipped_bytes=300_000, deduplicated_bytes=9_000_000,
                       duration_s=0.2, applied=CommitOutcome("s", 1, 0, 0.0), delta_chunks=0)
    both = with_first_try(retry, Upload(chunks=2, stored_bytes=6_000, raw_bytes=600_000, deltas=2))
    assert (both.missing_chunks, both.shipped_bytes, both.delta_chunks, both.deduplicated_bytes) == (
        3, 306_000, 2, 8_400_000)
    assert with_first_try(retry, None) == retry
