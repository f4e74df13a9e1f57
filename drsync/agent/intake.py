"""The standby's chunk intake: Negotiate and Upload, under the repository's shared lock.

Chunks a primary uploads are named by no snapshot until its Commit arrives, and a
garbage collection in between would take them for garbage (and the chunk index
would still say they are there: negotiation would never send them again). So a
shipment holds one *session*: the repository's shared lock, taken at its first
Negotiate or Upload and held until its Commit is done (or until the sender has
been silent for :data:`SESSION_IDLE_S`: a primary that died mid-shipment does not
block GC for ever; the agent's loop looks for idle sessions on every pass, and a promotion
ends them all). A session is keyed by the sender, its epoch and its process
instance, so a retried upload of the same shipment continues the same session.
GC takes the exclusive lock, so it runs only between shipments.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from drsync.errors import ChunkDamaged, DeltaRejected, DrsyncError, IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.lock import DEFAULT_WAIT_S
from drsync.repository.repo import Repository, WriteSession
from drsync.transport import Caller, ReceivedChunk
from drsync.units import human_size

log = logging.getLogger("drsync.agent.standby")

# A shipment whose sender sent nothing for this long gives up its session (seconds).
SESSION_IDLE_S = 600.0

SessionKey = tuple[str, int, str]


@dataclass
class _Session:
    write: WriteSession  # the repository's shared lock, held for the whole shipment
    last_used: float  # monotonic
    busy: int = 0


class ChunkIntake:
    """Negotiate (which chunks are missing) and Upload (store them, each checked against its id)."""

    def __init__(self, repo: Repository, *, idle_s: float = SESSION_IDLE_S) -> None:
        self.repo = repo
        self.idle_s = idle_s
        self._sessions: dict[SessionKey, _Session] = {}
        self._lock = threading.Lock()
        # Pack id -> chunks a delta's base read found damaged: the commit's end forgets them (take_damaged).
        self.damaged: dict[str, set[bytes]] = {}

    @staticmethod
    def key(caller: Caller) -> SessionKey:
        return caller.sender, caller.epoch, caller.instance

    def _enter(self, caller: Caller) -> _Session:
        """The caller's session (opened now, taking the shared lock: LockedError while GC sweeps for longer
        than the lock wait), marked busy."""
        self.expire_idle()
        key = self.key(caller)
        with self._lock:
            s = self._sessions.get(key)
            if s is not None:
                s.busy += 1
                s.last_used = time.monotonic()
                return s
        write = self.repo.write_session(wait_s=DEFAULT_WAIT_S)
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                s = self._sessions[key] = _Session(write, time.monotonic())
            else:
                write.close()  # a concurrent request of the same shipment opened it first
            s.busy += 1
            s.last_used = time.monotonic()
        return s

    @contextlib.contextmanager
    def session(self, caller: Caller) -> Iterator[None]:
        """Hold the caller's session (the repository's shared lock) for the duration of the block."""
        s = self._enter(caller)
        try:
            yield
        finally:
            self._leave(s)

    def _leave(self, s: _Session) -> None:
        with self._lock:
            s.busy -= 1
            s.last_used = time.monotonic()

    def end(self, caller: Caller) -> None:
        """The shipment committed (or its commit failed): its uploaded chunks are named or garbage now."""
        with self._lock:
            s = self._sessions.get(self.key(caller))
            if s is None or s.busy:
                return
            del self._sessions[self.key(caller)]
        s.write.close()

    def expire_idle(self) -> None:
        """Release the sessions whose sender has been silent for ``idle_s``."""
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if not s.busy and now - s.last_used >= self.idle_s]
            gone = [self._sessions.pop(k) for k in idle]
        for k, s in zip(idle, gone, strict=True):
            log.warning("shipment from %s at epoch %d went silent for %.0fs; its session ends (chunks it uploaded "
                        "and never committed are garbage now)", k[0], k[1], now - s.last_used)
            s.write.close()

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.write.close()

    def take_damaged(self) -> dict[str, set[bytes]]:
        """The damaged bases found so far (pack id -> chunk ids), forgotten here."""
        with self._lock:
            out, self.damaged = self.damaged, {}
        return out

    def missing(self, caller: Caller, ids: list[bytes]) -> list[bytes]:
        s = self._enter(caller)
        try:
            return s.write.missing_chunks(ids)
        finally:
            self._leave(s)

    def receive(self, caller: Caller, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        """Store uploaded chunks, each checked against its id. Durable when this returns; what arrived
        intact is kept even if the stream broke (the retry sends only the rest)."""
        s = self._enter(caller)
        writer = s.write.chunk_writer()
        received = stored = stored_bytes = 0
        started = time.monotonic()
        try:
            for batch in batches:
                for c in batch:
                    received += 1
                    if c.encoding == fmt.ENC_DELTA:
                        if writer.has(c.id):
                            continue
                        enc, data = chunks.encode(self._undelta(c))
                    else:
                        chunks.decode(c.encoding, c.data, c.raw_length, c.id)  # IntegrityError if it lies
                        enc, data = c.encoding, c.data
                    if writer.add_stored(c.id, enc, data, c.raw_length):
                        stored += 1
                        stored_bytes += len(data)
                with self._lock:
                    s.last_used = time.monotonic()
        finally:
            try:
                writer.flush()
            finally:
                self._leave(s)
            log.info("received %d chunks, stored %d (%s) in %.2fs", received, stored, human_size(stored_bytes),
                     time.monotonic() - started)
        return received, stored, stored_bytes

    def _undelta(self, c: ReceivedChunk) -> bytes:
        """The chunk a delta holds, decoded against its bases (chunks this repository holds: the primary asked
        about them in Negotiate), checked against its id. IntegrityError."""
        try:
            bases = [self.repo.read_chunk(b) for b in c.bases]
        except DrsyncError as e:  # damaged (IntegrityError) or unreadable (an HDFS or disk error)
            if isinstance(e, ChunkDamaged):  # forgotten when the shipment ends: the primary sends it again
                with self._lock:
                    self.damaged.setdefault(e.pack_id, set()).add(e.chunk_id)
            raise DeltaRejected(f"chunk {c.id.hex()[:16]} came as a delta against chunks this standby cannot "
                                f"read ({e}); the primary sends it whole instead, and a damaged one again after "
                                f"this shipment") from None
        try:
            return chunks.delta_decode(c.data, chunks.delta_dictionary(bases, c.base_skip, c.raw_length),
                                       c.raw_length, c.id)
        except IntegrityError as e:
            raise DeltaRejected(f"{e}; nothing of it was stored; the primary sends it whole instead") from None
