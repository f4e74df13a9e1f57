"""The standby side of a shipment: fencing, missing chunks, verified storage, atomic apply.

Transport-free: the gRPC servicer (drsync.transport.grpc) turns requests into
calls on :class:`StandbyReceiver`, and its exceptions into status codes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import blake3

from drsync import fsutil
from drsync.agent import clock
from drsync.apply import ApplyResult, apply_manifest, recover_apply
from drsync.config import KeepPolicy
from drsync.engine import expire_snapshots
from drsync.errors import DrsyncError, IntegrityError, OperationFailed, RefusedError
from drsync.fsutil import describe_os_error
from drsync.repository import chunks
from drsync.repository.manifest import Manifest, diff
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.transport import Caller, ReceivedChunk

log = logging.getLogger("drsync.agent.standby")


class FencedError(RefusedError):
    """A shipment carries an epoch lower than the highest this agent has seen."""


@dataclass
class AgentState:
    """What an agent remembers across restarts (state_dir/state.json)."""

    epoch: int = 0
    applied_snapshot: str = ""
    applied_captured_at: float = 0.0
    applied_at: float = 0.0
    last_role: str = ""  # the role this agent last acted in (auto role): "primary" or "standby"
    # Where the applied snapshot stands in the primary's sequence: [epoch of its sender, its seq number in
    # the sender's repository]; standbys are ranked by it, never by capture times (other clocks).
    applied_position: list[int] = field(default_factory=list)
    # The primary's clock minus this machine's (estimated from its requests; see drsync.agent.clock), and
    # the agent it was estimated from: lag is counted with it, also after a restart while the primary is gone.
    clock_offset_s: float = 0.0
    clock_source: str = ""
    # The group epoch this agent last saw change, and when (this machine's clock): the failover cooldown
    # is measured from it, never from a time another machine wrote.
    epoch_seen: int = 0
    epoch_seen_at: float = 0.0


class StateFile:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "state.json")
        self.journal = os.path.join(state_dir, "apply.journal")
        self._lock = threading.Lock()

    def load(self) -> AgentState:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            known = set(AgentState.__dataclass_fields__)
            return AgentState(**{k: v for k, v in doc.items() if k in known})
        except FileNotFoundError:
            return AgentState()

    def save(self, state: AgentState) -> None:
        with self._lock:
            fsutil.atomic_write(self.path, json.dumps(asdict(state)).encode(), durable=True)


class StandbyReceiver:
    def __init__(self, repo: Repository, data_root: str, state: StateFile, *, agent: str,
                 keep: KeepPolicy | None = None) -> None:
        self.repo = repo
        self.data_root = data_root
        self.state_file = state
        self.agent = agent
        self.state = state.load()
        # Held for a whole commit (store + apply): a promotion takes it to wait for an apply in flight.
        self.commit_lock = threading.Lock()
        self.broken = ""
        self.keep = keep
        self._last_gc = 0.0
        # With ZooKeeper roles: whether shipments are accepted now (not while primary or promoting),
        # and where to read the group's current epoch before committing.
        self.refusal = ""
        # With ZooKeeper roles: reads the group's (epoch, agent the epoch names) fresh from ZooKeeper;
        # raises DrsyncError when it cannot. None with fixed roles.
        self.group_epoch: Callable[[], tuple[int, str]] | None = None
        self.last_contact: Caller | None = None  # the newest request from a primary (clock sample)
        self.clock = clock.ClockOffset(self.state.clock_offset_s, self.state.clock_source)
        # Fixed roles only: a request may raise the floor when its certificate was checked against
        # tls.allowed_peers (set by the agent); an anonymous peer never can.
        self.trust_request_epochs = False
        self.on_applied: Callable[[], None] = lambda: None
        self._epoch_lock = threading.Lock()

    def recover(self) -> bool:
        """Finish an apply a crash interrupted, before serving anything (safety rule 2)."""
        pending = os.path.join(self.state_file.dir, "applying.json")
        doc = None
        if os.path.exists(pending):
            with open(pending, "rb") as f:
                doc = json.loads(f.read())
        finished = recover_apply(self.data_root, self.state_file.journal)
        if finished and doc is not None:
            self._record_applied(doc["snapshot"], doc["captured_at"], doc.get("position") or [])
        # Without a journal the apply either never changed the root or was recorded already.
        if doc is not None:
            os.unlink(pending)
        return finished

    # --- fencing ------------------------------------------------------------------

    def _after_failed_apply(self) -> None:
        """An apply failed while this agent keeps running: never leave a half-applied root behind.

        Before the journal was written nothing changed, so there is nothing to do. After it,
        roll forward now; if even that fails, refuse shipments until an operator steps in.
        """
        try:
            self.recover()
        except Exception as e:
            self.broken = (f"an apply failed half-way and could not be completed ({e}); fix the cause, then "
                           f"restart the agent, which completes it first")
            log.error("%s", self.broken)

    def observe_epoch(self, epoch: int) -> None:
        """Raise the fencing floor to an epoch seen elsewhere (ZooKeeper), durably."""
        with self._epoch_lock:
            if epoch > self.state.epoch:
                self.state.epoch = epoch
                self.state_file.save(self.state)

    def greet(self, caller: Caller) -> None:
        """A Hello: no fencing (it only reads), but a sample of the caller's clock when it is the primary
        this agent hears from (the sender of admitted requests, at an epoch not below the floor), never a
        command-line tool's."""
        self.last_contact = caller
        known = self.clock.source
        if caller.epoch >= max(1, self.state.epoch) and caller.sender and caller.sender == (known or caller.sender):
            self._clock_sample(caller)

    def _clock_sample(self, caller: Caller) -> None:
        """One sample of the primary's clock; the estimate is kept in the state (saved when it moved)."""
        offset = self.clock.add(caller.sent_at, caller.received_at, source=caller.sender)
        st = self.state
        moved = abs(offset - st.clock_offset_s) > 0.5 or st.clock_source != self.clock.source
        st.clock_offset_s, st.clock_source = offset, self.clock.source
        if moved:
            self.state_file.save(st)

    def admit(self, caller: Caller) -> None:
        """May ``caller`` ship now? Raises RefusedError (FencedError for a wrong epoch or sender).

        With ZooKeeper roles (safety rule 1) the group's epoch is read fresh: the
        caller's epoch must equal it and the caller must be the agent it names, and
        when ZooKeeper cannot be read the shipment is refused (never judged from a
        cached epoch). The stored floor only ever follows ZooKeeper. With fixed roles
        the floor is never raised by a request; identity comes from tls.allowed_peers.
        """
        if self.refusal:
            raise RefusedError(self.refusal)
        if self.group_epoch is not None:
            try:
                epoch, named = self.group_epoch()
            except DrsyncError as e:
                who = caller.sender or "the sender"
                raise RefusedError(f"cannot read the group's epoch from ZooKeeper to confirm {who} may ship ({e}); "
                                   f"refused until it can be read") from None
            self.observe_epoch(epoch)
            if caller.epoch != epoch or caller.sender != named:
                who = caller.sender or "an unnamed sender"
                if caller.epoch < epoch:
                    raise FencedError(f"shipment epoch {caller.epoch} from {who} is lower than epoch {epoch} "
                                      f"ZooKeeper names ({named}); the sender is fenced and must not act as primary")
                raise FencedError(f"shipment from {who} at epoch {caller.epoch} refused: ZooKeeper names "
                                  f"{named or 'nobody'} at epoch {epoch}; only that agent may ship")
        self._check_floor(caller)
        if self.group_epoch is None and self.trust_request_epochs and caller.epoch > self.state.epoch:
            self.observe_epoch(caller.epoch)  # fixed roles, caller proven by tls.allowed_peers
        self.last_contact = caller
        self._clock_sample(caller)

    def _check_floor(self, caller: Caller) -> None:
        if caller.epoch < self.state.epoch:
            raise FencedError(f"shipment epoch {caller.epoch} is lower than epoch {self.state.epoch} this standby "
                              f"has seen; the sender is fenced and must not act as primary")

    # --- the three steps ----------------------------------------------------------

    def missing(self, caller: Caller, ids: list[bytes]) -> list[bytes]:
        self._check_floor(caller)
        index = self.repo.index
        return [i for i in ids if i not in index]

    def receive(self, caller: Caller, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        """Store uploaded chunks, each checked against its id. Durable when this returns."""
        writer = self.repo.chunk_writer()
        received = stored = stored_bytes = 0
        started = time.monotonic()
        try:
            for batch in batches:
                self._check_floor(caller)  # a promotion seen meanwhile (watch) fences the rest of the stream
                for c in batch:
                    received += 1
                    chunks.decode(c.encoding, c.data, c.raw_length, c.id)  # IntegrityError if it lies
                    if writer.add_stored(c.id, c.encoding, c.data, c.raw_length):
                        stored += 1
                        stored_bytes += len(c.data)
        finally:
            # What arrived intact is kept even if the stream broke: the retry sends only the rest.
            writer.flush()
            log.info("received %d chunks, stored %d (%.1f MiB) in %.2fs", received, stored, stored_bytes / 2**20,
                     time.monotonic() - started)
        return received, stored, stored_bytes

    def commit(self, caller: Caller, snapshot_doc: bytes, manifest_bytes: bytes,
               sender_seq: int = 0) -> tuple[SnapshotInfo, ApplyResult]:
        started = time.monotonic()
        with self.commit_lock:
            if self.broken:
                raise OperationFailed(f"standby {self.agent} needs recovery: {self.broken}")
            self.admit(caller)  # again, fresh, under the lock a promotion takes
            info = SnapshotInfo.from_bytes(snapshot_doc, "shipped snapshot document")
            cfg = self.repo.config
            if (info.cluster_id, info.release) != (cfg.cluster_id, cfg.release):
                raise RefusedError(
                    f"snapshot {info.id} is from cluster {info.cluster_id!r} release {info.release!r}, but this "
                    f"standby keeps cluster {cfg.cluster_id!r} release {cfg.release!r}; check "
                    f"replication.standbys on the primary, or upgrade both clusters to the same release")
            if blake3.blake3(manifest_bytes).hexdigest() != info.manifest_hash:
                raise IntegrityError(f"snapshot {info.id}: the manifest arrived damaged or truncated "
                                     f"(hash mismatch); it was not applied")
            manifest = Manifest.from_bytes(manifest_bytes, f"manifest of snapshot {info.id}")
            missing = [c for c in manifest.chunk_ids() if not self.repo.has_chunk(c)]
            if missing:
                raise IntegrityError(f"snapshot {info.id} names {len(missing)} chunk(s) the standby never "
                                     f"received (first {missing[0].hex()[:16]}); it was not applied")
            known = {s.id: s for s in self.repo.list_snapshots()}
            with self.repo.lock(exclusive=False, wait_s=30.0):
                # Stored with this repository's next sequence number (arrival order), whatever
                # seq the sender's document carries; a retried commit keeps the stored one.
                info = known[info.id] if info.id in known else self.repo.commit_snapshot(info, manifest_bytes)
                if self._same_as_applied(manifest):
                    # Nothing changed since the applied snapshot: the root already holds it.
                    self._record_applied(info.id, info.captured_at, [caller.epoch, sender_seq])
                    result = ApplyResult(unchanged_files=manifest.file_count())
                    log.info("snapshot %s has the content of the applied one; nothing to apply", info.id)
                else:
                    result = self._apply(info, manifest, [caller.epoch, sender_seq])
                    log.info("applied snapshot %s (%d files written, %d removed) in %.2fs", info.id,
                             result.written_files, result.removed, time.monotonic() - started)
            self._maintain()  # outside the shared lock: retention takes the exclusive one
            return info, result

    def _apply(self, info: SnapshotInfo, manifest: Manifest, position: list[int]) -> ApplyResult:
        pending = os.path.join(self.state_file.dir, "applying.json")
        fsutil.atomic_write(pending, json.dumps({"snapshot": info.id, "captured_at": info.captured_at,
                                                 "position": position}).encode())
        try:
            result = apply_manifest(
                manifest, self.repo, self.data_root, what=f"snapshot {info.id}", journal=self.state_file.journal,
                on_committed=lambda: self._record_applied(info.id, info.captured_at, position),
                protect=(self.repo.storage.url, self.state_file.dir))
        except BaseException as e:
            self._after_failed_apply()
            if isinstance(e, OSError):
                raise describe_os_error(e, f"applying snapshot {info.id} on the standby") from None
            raise
        os.unlink(pending)
        return result

    def _maintain(self) -> None:
        """Retention of received snapshots, under the commit lock so that GC never races a shipment's
        commit; the applied snapshot is always kept. GC runs at most hourly."""
        if self.keep is None:
            return
        collect = time.monotonic() - self._last_gc >= 3600.0
        try:
            # Never wait for the lock here: a shipment's commit is waiting for this to return,
            # and a drill reading the repository must not hold replication up.
            res = expire_snapshots(self.repo, self.keep, protect=frozenset({self.state.applied_snapshot}),
                                   collect=collect, lock_wait_s=0)
        except DrsyncError as e:
            log.warning("retention skipped: %s", e)
            return
        if res.gc is not None:
            self._last_gc = time.monotonic()

    def _same_as_applied(self, manifest: Manifest) -> bool:
        if not self.state.applied_snapshot:
            return False
        try:
            applied = self.repo.load_manifest(self.repo.find_snapshot(self.state.applied_snapshot))
        except DrsyncError:
            return False
        d = diff(applied, manifest)
        return not (d.added or d.removed or d.changed)

    def _record_applied(self, snapshot_id: str, captured_at: float, position: list[int]) -> None:
        self.state.applied_snapshot = snapshot_id
        self.state.applied_captured_at = captured_at
        self.state.applied_position = list(position)
        self.state.applied_at = time.time()
        self.state_file.save(self.state)
        self.on_applied()

    def lag_s(self, now: float | None = None) -> float | None:
        """Lag on the primary's clock (drsync.agent.clock.lag_s with this agent's offset estimate)."""
        return state_lag_s(self.state, now)


def state_lag_s(state: AgentState, now: float | None = None) -> float | None:
    """The lag of an agent's recorded state (None before its first apply), with its recorded offset to
    the primary's clock: what a running agent reports and what the command line reads from state.json."""
    if not state.applied_snapshot:
        return None
    return clock.lag_s(state.applied_captured_at, state.clock_offset_s, now)


def batched(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
