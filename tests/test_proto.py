"""The committed gRPC code must match proto/drsync.proto, and what the transport serializes by hand parses as it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from drsync.transport import ReceivedChunk
from drsync.transport.grpc import encode_chunk_batch
from drsync.transport.pb import drsync_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(tmp_path)
    committed = ROOT / "drsync" / "transport" / "pb"
    for name in ("drsync_pb2.py", "drsync_pb2_grpc.py", "__init__.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run 'make proto' and commit the result")


def test_only_the_transport_imports_grpc() -> None:
    offenders = []
    for path in (ROOT / "drsync").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("drsync/transport/"):
            continue
        text = path.read_text()
        if "import grpc" in text or "from grpc" in text:
            offenders.append(rel)
    assert offenders == []


# Chunk batches as the primary serializes them (transport.grpc.encode_chunk_batch): one ChunkBatch
# on the wire, whatever the chunks hold, parsed by protobuf itself exactly as the message built whole.
_chunks = st.lists(st.builds(ReceivedChunk, st.binary(min_size=0, max_size=40), st.integers(0, 2**32 - 1),
                             st.integers(0, 2**32 - 1), st.binary(min_size=0, max_size=3000)), max_size=8)


@settings(max_examples=150, deadline=None)
@given(chunks=_chunks, epoch=st.integers(0, 2**64 - 1), sender=st.text(max_size=20),
       sent_at=st.floats(allow_nan=False), instance=st.text(max_size=40))
def test_an_upload_message_parses_as_the_batch_built_whole(chunks: list[ReceivedChunk], epoch: int, sender: str,
                                                            sent_at: float, instance: str) -> None:
    head = pb.ChunkBatch(epoch=epoch, sender=sender, sent_at=sent_at, sender_instance=instance)
    wire = encode_chunk_batch(head, chunks)
    whole = pb.ChunkBatch(epoch=epoch, sender=sender, sent_at=sent_at, sender_instance=instance,
                          chunks=[pb.Chunk(id=c.id, encoding=c.encoding, raw_length=c.raw_length, data=c.data)
                                  for c in chunks])
    assert pb.ChunkBatch.FromString(wire) == whole
    assert len(wire) == whole.ByteSize()


def test_an_upload_message_keeps_chunks_of_a_mebibyte_and_their_order() -> None:
    big = [ReceivedChunk(bytes([i]) * 32, 1, 1 << 20, os.urandom((1 << 20) + 4160)) for i in range(3)]
    got = pb.ChunkBatch.FromString(encode_chunk_batch(pb.ChunkBatch(epoch=7, sender="p"), big))
    assert (got.epoch, got.sender) == (7, "p")
    assert [(c.id, c.encoding, c.raw_length, c.data) for c in got.chunks] == \
        [(c.id, c.encoding, c.raw_length, c.data) for c in big]
