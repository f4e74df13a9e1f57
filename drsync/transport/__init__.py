"""Transport: what crosses the wire between agents, independent of gRPC.

The agent layer talks to a standby through :class:`StandbyLink` and serves
shipments through a :class:`Receiver`; ``drsync.transport.grpc`` implements
both over gRPC. Only that module imports grpc.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ReceivedChunk:
    id: bytes
    encoding: int
    raw_length: int
    data: bytes


@dataclass(frozen=True)
class StandbyHello:
    agent: str
    role: str
    cluster_id: str
    release: str
    epoch: int
    applied_snapshot: str
    applied_captured_at: float
    applied_at: float


@dataclass(frozen=True)
class CommitOutcome:
    snapshot: str
    written_files: int
    removed: int
    applied_at: float


class StandbyLink(Protocol):
    """How a primary reaches one standby."""

    target: str

    def hello(self, sender: str, epoch: int) -> StandbyHello: ...

    def missing(self, epoch: int, batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]: ...

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]: ...

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes]) -> CommitOutcome: ...


class Receiver(Protocol):
    """What a standby does with a shipment (implemented by the agent's StandbyReceiver)."""

    state: Any

    def missing(self, epoch: int, ids: list[bytes]) -> list[bytes]: ...

    def receive(self, batches: Iterator[tuple[int, list[ReceivedChunk]]]) -> tuple[int, int, int]: ...

    def commit(self, epoch: int, snapshot_doc: bytes, manifest_bytes: bytes) -> tuple[Any, Any]: ...
