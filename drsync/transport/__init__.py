"""Transport: what crosses the wire between agents, independent of gRPC.

The agent layer talks to a standby through :class:`StandbyLink` and serves
shipments through a :class:`Receiver`; ``drsync.transport.grpc`` implements
both over gRPC. Only that module imports grpc.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from drsync import allocators

if TYPE_CHECKING:
    from drsync.repository.spool import Spool

# gRPC's C core writes its own lines to stderr ("E1201 ... add_port.cc:83] Failed to add port"): they
# bypass drsync's log (and break --log-format json), and every failure they describe reaches the operator
# as drsync's own one-line error. Set before grpc is imported (drsync.transport.grpc); an operator's own
# GRPC_VERBOSITY (e.g. ERROR, to debug) wins, and commands the agent runs do not get drsync's.
allocators.set_for_this_process("GRPC_VERBOSITY", "NONE", blank_is_unset=False)


@dataclass(frozen=True)
class ReceivedChunk:
    """One chunk of an Upload: ``data`` stored as ``encoding`` (0 raw, 1 zstd), or with ``encoding``
    :data:`format.ENC_DELTA` a zstd frame whose dictionary is the chunks ``bases`` (32-byte ids) the standby
    holds, joined, less their first ``base_skip`` bytes, cut to ``raw_length``
    (:func:`drsync.repository.chunks.delta_dictionary`)."""

    id: bytes
    encoding: int
    raw_length: int
    data: bytes
    bases: tuple[bytes, ...] = ()
    base_skip: int = 0


@dataclass(frozen=True)
class Caller:
    """Who sent one request, as the receiving agent knows it.

    ``sender`` and ``epoch`` are what the request claims; ``peer_names`` are the
    names in the caller's TLS certificate (empty without TLS), checked against
    ``tls.allowed_peers`` by the transport before any receiver method runs.
    ``sent_at`` is the sender's clock and ``received_at`` the receiver's, both
    Unix seconds: one sample of the clock offset between the two machines.
    """

    sender: str
    epoch: int
    sent_at: float = 0.0
    received_at: float = 0.0
    peer_names: tuple[str, ...] = ()
    instance: str = ""  # one id per sender process: its clock may have moved across a restart


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
    # Clock figures of the exchange, NTP-style (seconds; 0.0 when the standby does not send them):
    # the standby's clock minus the caller's, and the round trip.
    clock_offset_s: float = 0.0
    round_trip_s: float = 0.0
    # The standby's own lag, on the primary's clock (its estimate); None before it applied anything or when
    # the agent does not send it.
    lag_s: float | None = None
    # The snapshot the standby's deletion guard holds back (stored, waiting for an operator), or "".
    held_snapshot: str = ""
    # replication.apply_delay of the standby (seconds), and the newest snapshot it stored (applied or not).
    apply_delay_s: float = 0.0
    received_snapshot: str = ""
    applied_position: tuple[int, ...] = ()  # (epoch, seq) of the producing primary; () when unknown
    delta_chunks: bool = False  # it takes chunks sent as deltas against chunks it holds (older agents: False)
    # It takes a commit that names the manifest of a snapshot it holds instead of its bytes (older agents: False).
    manifest_by_reference: bool = False
    # It takes a commit whose pieces patch the manifest of a snapshot it holds (older agents: False).
    manifest_patches: bool = False


@dataclass(frozen=True)
class CommitOutcome:
    snapshot: str
    written_files: int
    removed: int
    applied_at: float
    # What the standby's root holds after the commit: ``snapshot`` itself, or (``deferred``, with
    # replication.apply_delay) an older one; "" when the standby does not say (older agents).
    applied_snapshot: str = ""
    applied_captured_at: float = 0.0
    deferred: bool = False
    apply_delay_s: float = 0.0


class StandbyLink(Protocol):
    """How a primary reaches one standby. Every request carries the sending agent's name (given
    when the link is made) and its clock."""

    target: str

    def hello(self, sender: str, epoch: int) -> StandbyHello: ...

    def missing(self, epoch: int, batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]: ...

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]: ...

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "", patch_of: str = "") -> CommitOutcome:
        """Store and apply ``snapshot_doc``; its manifest is ``pieces`` or, when ``manifest_of`` names a snapshot
        the standby said it applied and ``pieces`` is empty, that snapshot's; with ``patch_of``, ``pieces`` are a
        patch (:mod:`drsync.repository.manifest_patch`) of that snapshot's manifest. ManifestNotHeld when the
        standby cannot read or rebuild it: send the bytes."""


class Receiver(Protocol):
    """What a standby does with a shipment (implemented by the agent's StandbyReceiver).

    ``admit`` is the fencing check the transport makes at the start of Negotiate,
    Upload and Commit (before any manifest piece is kept); ``commit`` makes it
    again itself, under the lock a promotion takes. It
    raises RefusedError when the caller may not ship now. ``greet`` sees every
    Hello (no fencing: Hello only reads).
    """

    state: Any

    def greet(self, caller: Caller) -> None: ...

    def check_sender_cluster(self, sender: str, cluster_id: str, release: str) -> None:
        """RefusedError when a sender's cluster id or release (from its Hello) is not this standby's."""
        ...

    def note_refusal(self, sender: str, error: Exception) -> None:
        """A request of ``sender`` was refused: log it (rate-limited) and keep it as the last refusal."""
        ...

    def lag_s(self) -> float | None: ...

    def held_snapshot(self) -> str:
        """The snapshot the deletion guard holds back ("" when none)."""
        ...

    @property
    def apply_delay_s(self) -> float:
        """replication.apply_delay in seconds (0: shipments are applied at once)."""
        ...

    def admit(self, caller: Caller) -> None: ...

    def missing(self, caller: Caller, ids: list[bytes]) -> list[bytes]: ...

    def receive(self, caller: Caller, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]: ...

    def commit(self, caller: Caller, snapshot_doc: bytes, manifest_bytes: bytes | Spool,
               sender_seq: int = 0) -> tuple[Any, Any]: ...

    def held_manifest(self, snapshot_id: str, snapshot_doc: bytes) -> Spool:
        """The manifest of snapshot ``snapshot_id`` held here, checked, for a commit of ``snapshot_doc`` that
        names it instead of sending it; ManifestNotHeld when it is not held or is not that document's."""
        ...

    def patched_manifest(self, snapshot_id: str, snapshot_doc: bytes, patch: Spool) -> Spool:
        """The manifest ``patch`` makes of snapshot ``snapshot_id``'s (held here), checked against the hash
        ``snapshot_doc`` names; ManifestNotHeld when that cannot be done or the hash differs."""
        ...
