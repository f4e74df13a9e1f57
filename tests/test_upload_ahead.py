"""The primary serializes Upload messages on a thread of their own, ahead of gRPC's sends
(transport.grpc._Ahead): everything arrives once and in order, an error raised while producing
reaches the caller as itself, and no producer thread outlives its upload."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.errors import RefusedError
from drsync.repository import chunks
from drsync.transport import ReceivedChunk
from drsync.transport.grpc import GrpcStandbyLink, _Ahead
from tests.test_peer_limits import Standby


def producers() -> list[threading.Thread]:
    """The upload producers still running once each was given up to 60 s to end (a producer whose
    upload failed ends after its current step; one that ends returns at once)."""
    for t in [t for t in threading.enumerate() if t.name == "drsync-upload-ahead"]:
        t.join(60)
    return [t for t in threading.enumerate() if t.name == "drsync-upload-ahead"]


def test_every_message_arrives_once_and_in_order() -> None:
    ahead = _Ahead(iter(range(1000)), 2)
    assert list(ahead) == list(range(1000))
    ahead.close()
    assert producers() == []


def test_the_producer_stays_at_most_depth_ahead() -> None:
    made: list[int] = []

    def numbers() -> Iterator[int]:
        for n in range(100):
            made.append(n)
            yield n

    ahead = _Ahead(numbers(), 2)
    assert next(ahead) == 0
    ahead.close()  # waits for the producer: whatever it made is in ``made``
    # Taken: 1. Waiting to be taken: at most 2. Made and then dropped by close: at most 1.
    assert len(made) <= 1 + 2 + 1
    assert producers() == []


def test_an_error_comes_after_the_messages_made_before_it() -> None:
    def breaks() -> Iterator[int]:
        yield 1
        yield 2
        raise RefusedError("no longer primary")

    ahead = _Ahead(breaks(), 2)
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(RefusedError, match="no longer primary"):
        next(ahead)
    ahead.close()


def test_closing_while_the_producer_waits_ends_it() -> None:
    ahead = _Ahead(iter(range(10**9)), 2)  # never drained
    next(ahead)
    ahead.close()
    assert producers() == []
    with pytest.raises(StopIteration):
        next(ahead)


def real_chunks(n: int, size: int = 300_000) -> list[ReceivedChunk]:
    """``n`` chunks of ``size`` random bytes, each with its true id."""
    blobs = [os.urandom(size) for _ in range(n)]
    return [ReceivedChunk(chunks.chunk_id(b), 0, len(b), b) for b in blobs]


def test_a_refusal_raised_mid_upload_reaches_the_caller(tmp_path: Path) -> None:
    """A primary deposed during its upload (its guard raises) sees that refusal, not gRPC's
    "Exception iterating requests", and its producer thread ends with the upload."""
    standby = Standby(tmp_path)
    sent = real_chunks(6)

    def deposed_after_two() -> Iterator[list[ReceivedChunk]]:
        yield sent[:2]
        yield sent[2:4]
        raise RefusedError("this agent is no longer the primary (epoch 2 > 1)")

    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        with pytest.raises(RefusedError, match="no longer the primary"):
            link.upload(1, deposed_after_two())
        assert producers() == []
    finally:
        link.close()
        standby.close()


def test_a_whole_upload_arrives_byte_for_byte(tmp_path: Path) -> None:
    standby = Standby(tmp_path)
    sent = real_chunks(12)
    link = GrpcStandbyLink(standby.addr, sender="primary")
    try:
        received, stored, stored_bytes = link.upload(1, iter([sent[i:i + 5] for i in range(0, 12, 5)]))
        assert (received, stored, stored_bytes) == (12, 12, 12 * 300_000)
        assert [standby.repo.read_chunk(c.id) for c in sent] == [c.data for c in sent]
        assert producers() == []
    finally:
        link.close()
        standby.close()
