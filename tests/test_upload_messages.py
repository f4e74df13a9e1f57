"""Upload messages stay under the allocator's mapping threshold (drsync.allocators): a message of
chunks is built, serialized, sent and parsed thousands of times a second, and a buffer at or above the
threshold is mapped, faulted in page by page and unmapped each time. A real standby agent over real
gRPC, a real repository, chunks of every size (incompressible 1 MiB chunks among small files)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from drsync import allocators
from drsync.agent.primary import UPLOAD_MESSAGE_BYTES, ship_snapshot
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport import ReceivedChunk
from drsync.transport.grpc import GrpcStandbyLink, encode_chunk_batch
from drsync.transport.pb import drsync_pb2 as pb
from tests.conftest import run_drsync
from tests.test_agents import Pair, pair  # noqa: F401 - pair is a fixture


class RecordingLink:
    """The real gRPC link to the standby, recording every upload message it is given."""

    def __init__(self, link: GrpcStandbyLink) -> None:
        self.link = link
        self.target = link.target
        self.messages: list[list[ReceivedChunk]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.link, name)

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        def recorded() -> Iterator[list[ReceivedChunk]]:
            for b in batches:
                self.messages.append(b)
                yield b

        return self.link.upload(epoch, recorded())


def test_upload_messages_stay_under_the_mapping_threshold(pair: Pair) -> None:  # noqa: F811
    rnd = os.urandom
    # Chunks of the largest size (incompressible data cuts at FastCDC's 1 MiB maximum only by chance, so
    # several MiB of it give chunks of many sizes, some near it), and many small files' small chunks.
    (pair.prod / "big").mkdir()
    for i in range(6):
        (pair.prod / "big" / f"b{i}.bin").write_bytes(rnd((3 << 20) + i * 77_777))
    (pair.prod / "many").mkdir()
    for i in range(400):
        (pair.prod / "many" / f"s{i}").write_bytes(rnd(500 + 37 * i))
    pair.start("standby")
    prod_repo = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    r = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json")
    assert r.code == 0, r.err
    info = prod_repo.find_snapshot(r.json()["id"])
    link = RecordingLink(GrpcStandbyLink(pair.standby_addr, sender="primary"))
    try:
        res = ship_snapshot(prod_repo, info, link, epoch=1, sender="primary")  # type: ignore[arg-type]
    finally:
        link.link.close()
    assert res.applied.snapshot == info.id and pair.in_sync()
    assert len(link.messages) > 10
    for m in link.messages:
        stored = sum(len(c.data) for c in m)
        assert stored <= UPLOAD_MESSAGE_BYTES or len(m) == 1, (len(m), stored)
        wire = len(encode_chunk_batch(pb.ChunkBatch(epoch=1, sender="primary", sent_at=1.0), m))
        assert wire < allocators.MMAP_THRESHOLD, (len(m), wire)
    # Messages are filled, not cut short: each but the last ends where the next chunk would not fit.
    for m, after in zip(link.messages, link.messages[1:], strict=False):
        assert sum(len(c.data) for c in m) + len(after[0].data) > UPLOAD_MESSAGE_BYTES
