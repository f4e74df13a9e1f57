"""The standby side of a shipment: who may ship (fencing), then intake and commit.

Transport-free: the gRPC servicer (drsync.transport.grpc) turns requests into
calls on :class:`StandbyReceiver`, and its exceptions into status codes. The
receiver only decides admission (safety rule 1) and the primary's clock offset;
chunks go to :class:`~drsync.agent.intake.ChunkIntake` (under the repository's
shared lock, one session per shipment) and snapshots to
:class:`~drsync.agent.committer.Committer` (journaled apply, deletion guard).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from drsync.agent import clock
from drsync.agent.committer import Committer
from drsync.agent.hold import ApplyHold
from drsync.agent.intake import ChunkIntake
from drsync.agent.state import AgentState, StateStore
from drsync.apply import ApplyResult
from drsync.dataroot.distcp import DistCpSettings
from drsync.errors import ChunkDamaged, ChunksLost, DrsyncError, FencedError, ManifestNotHeld, RefusedError
from drsync.fsutil import describe_os_error
from drsync.repository.manifest import ManifestFile
from drsync.repository.manifest_patch import apply_patch
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool
from drsync.transport import Caller, ReceivedChunk

log = logging.getLogger("drsync.agent.standby")

# The same refusal (same sender, same reason) is logged again at most this often (seconds), with a count.
REFUSAL_LOG_EVERY_S = 300.0


class StandbyReceiver:
    """Implements :class:`drsync.transport.Receiver` for one standby agent."""

    def __init__(self, repo: Repository, data_root: str, store: StateStore, *, agent: str,
                 max_delete_fraction: float = 0.5, distcp: DistCpSettings | None = None,
                 apply_delay_s: float = 0.0, max_change_fraction: float = 0.5,
                 on_mass_change: str = "hold", mass_change_window_s: float = 0.0) -> None:
        # Arrow's join engine (the apply's diff of two manifests) loads on first use: here, at the agent's
        # start, not inside the first shipment's apply (20-25 ms, more with cold caches).
        import pyarrow.acero  # noqa: F401
        self.repo = repo
        self.store = store
        self.agent = agent
        self.intake = ChunkIntake(repo)
        self.committer = Committer(repo, data_root, store, agent=agent, max_delete_fraction=max_delete_fraction,
                                   on_applied=lambda: self.on_applied(), distcp=distcp,
                                   apply_delay_s=apply_delay_s, max_change_fraction=max_change_fraction,
                                   on_mass_change=on_mass_change, mass_change_window_s=mass_change_window_s)
        # With ZooKeeper roles: why shipments are refused now ("" = accepted; not while primary or promoting).
        self.refusal = ""
        # With ZooKeeper roles: reads the group's (epoch, agent the epoch names) fresh from ZooKeeper;
        # raises DrsyncError when it cannot. None with fixed roles.
        self.group_epoch: Callable[[], tuple[int, str]] | None = None
        self.last_contact: Caller | None = None  # the newest request from a primary (clock sample)
        st = store.current
        self.clock = clock.ClockOffset(st.clock_offset_s, st.clock_source)
        self._clock_lock = threading.Lock()
        # Fixed roles only: a request may raise the floor when its certificate was checked against
        # tls.allowed_peers (set by the agent); an anonymous peer never can.
        self.trust_request_epochs = False
        # With ZooKeeper roles: the agent this standby follows (replication.upstream, a cascade); it may ship
        # too, at the group's epoch, besides the agent the epoch names.
        self.upstream = ""
        self.on_applied: Callable[[], None] = lambda: None
        # After each commit, locks released (the agent wakes its maintenance then).
        self.after_commit: Callable[[], None] = lambda: None
        # The last shipment this standby refused (sender, reason, when, how often): logged, and published in
        # its ZooKeeper record so that drsync status shows it; cleared by the next shipment it applies.
        self.last_refusal: dict[str, Any] | None = None
        self._refusal_logged = ("", 0.0)  # (sender + reason, monotonic time) of the last refusal logged
        self._refusal_lock = threading.Lock()

    @property
    def state(self) -> AgentState:
        return self.store.current

    @property
    def commit_lock(self) -> threading.Lock:
        return self.committer.lock

    @property
    def hold(self) -> ApplyHold:
        return self.committer.hold

    def held_snapshot(self) -> str:
        return self.committer.hold.snapshot

    @property
    def apply_delay_s(self) -> float:
        return self.committer.apply_delay_s

    @property
    def broken(self) -> str:
        return self.committer.broken

    def recover(self) -> bool:
        """Finish an apply a crash interrupted, before serving anything (safety rule 2)."""
        return self.committer.recover()

    def close(self) -> None:
        self.intake.close()

    # --- fencing ------------------------------------------------------------------

    def observe_epoch(self, epoch: int, holder: str = "") -> None:
        """Raise the fencing floor to an epoch seen elsewhere (ZooKeeper), durably, with the agent named at it
        (``holder``; recorded the first time it is known)."""
        def raised(s: AgentState) -> AgentState:
            if epoch > s.epoch:
                return dataclasses.replace(s, epoch=epoch, epoch_holder=holder)
            if epoch == s.epoch and holder and not s.epoch_holder:
                return dataclasses.replace(s, epoch_holder=holder)
            return s

        self.store.transform(raised)

    def greet(self, caller: Caller) -> None:
        """A Hello: no fencing (it only reads), but a sample of the caller's clock when it is the primary
        this agent hears from (the sender of admitted requests, at an epoch not below the floor), never a
        command-line tool's."""
        self.last_contact = caller
        known = self.clock.source
        if caller.epoch >= max(1, self.state.epoch) and caller.sender and caller.sender == (known or caller.sender):
            self._clock_sample(caller)

    def check_sender_cluster(self, sender: str, cluster_id: str, release: str) -> None:
        """A primary's Hello names its cluster: another cluster id or release is refused at once, before
        anything is negotiated or stored (its snapshots could never become this standby's data)."""
        own = self.repo.config
        if (cluster_id, release) == (own.cluster_id, own.release):
            return
        advice = ("this agent joined a group whose production is another cluster or release: give it "
                  "the cluster.id and cluster.release of production (upgrading both together), or its own "
                  "coordination.group" if self.group_epoch is not None else
                  f"check replication.standbys on {sender or 'the primary'}, or upgrade both clusters to the "
                  f"same release")
        raise RefusedError(f"{sender or 'the sender'} ships cluster {cluster_id!r} release {release!r}, but this "
                           f"standby ({self.agent}) keeps cluster {own.cluster_id!r} release {own.release!r}; "
                           f"{advice}")

    def note_refusal(self, sender: str, error: Exception) -> None:
        """Log a refusal at WARNING (the reason first; the same one again at most every
        REFUSAL_LOG_EVERY_S, with how often it happened), and keep it as :attr:`last_refusal`."""
        reason = str(error)
        now = time.time()
        with self._refusal_lock:
            last = self.last_refusal
            count = last["count"] + 1 if last and last["reason"] == reason and last["sender"] == sender else 1
            self.last_refusal = {"at": now, "sender": sender, "reason": reason, "count": count}
            key, logged_at = self._refusal_logged
            due = key != sender + "\0" + reason or time.monotonic() - logged_at >= REFUSAL_LOG_EVERY_S
            if due:
                self._refusal_logged = (sender + "\0" + reason, time.monotonic())
        if due:
            verb = "refused" if isinstance(error, RefusedError) else "could not take"
            log.warning("agent %s %s a shipment: %s (from %s%s)", self.agent, verb, reason,
                        sender or "an unnamed sender", f"; {count} times so far" if count > 1 else "")

    def _clock_sample(self, caller: Caller) -> None:
        """One sample of the primary's clock; the estimate is kept in the state (saved when it moved)."""
        with self._clock_lock:
            offset = self.clock.add(caller.sent_at, caller.received_at, source=caller.sender,
                                    instance=caller.instance)
            source = self.clock.source

        def moved(s: AgentState) -> AgentState:
            if abs(offset - s.clock_offset_s) > 0.5 or s.clock_source != source:
                return dataclasses.replace(s, clock_offset_s=offset, clock_source=source)
            return s

        self.store.transform(moved)

    def reset_clock(self, source: str) -> None:
        """This agent's own clock is the primary's (it shipped its applied snapshot itself)."""
        with self._clock_lock:
            self.clock = clock.ClockOffset(0.0, source)
        self.store.update(clock_offset_s=0.0, clock_source=source)

    def admit(self, caller: Caller) -> None:
        """May ``caller`` ship now? Raises RefusedError (FencedError for a wrong epoch or sender).

        With ZooKeeper roles (safety rule 1) the group's epoch is read fresh: the
        caller's epoch must equal it and the caller must be the agent it names, and
        when ZooKeeper cannot be read the shipment is refused (never judged from a
        cached epoch). The stored floor only ever follows ZooKeeper. With fixed roles
        the floor is never raised by a request; identity comes from tls.allowed_peers. A standby that
        follows another (``upstream``, a cascade) also admits that agent, at the group's epoch only: what a
        fenced primary produced is refused at every step of the chain.
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
            held_by = self.state.epoch_holder if self.state.epoch == epoch else ""
            if held_by and named and named != held_by:
                raise FencedError(f"ZooKeeper names {named} at epoch {epoch}, but this standby saw {held_by} hold "
                                  f"epoch {epoch}: two primaries at one epoch (ZooKeeper lost or rewrote the group?); "
                                  f"refused until the epoch node is repaired (docs/operations.md, 'A damaged or lost "
                                  f"epoch')")
            self.observe_epoch(epoch, named)
            relayed = bool(self.upstream) and caller.sender == self.upstream
            if caller.epoch != epoch or (caller.sender != named and not relayed):
                who = caller.sender or "an unnamed sender"
                if caller.epoch < epoch and relayed:
                    raise FencedError(f"{who} relays a snapshot produced at epoch {caller.epoch}, lower than epoch "
                                      f"{epoch} ZooKeeper names ({named}): its primary was fenced; not applied")
                if caller.epoch < epoch:
                    raise FencedError(f"shipment epoch {caller.epoch} from {who} is lower than epoch {epoch} "
                                      f"ZooKeeper names ({named}); the sender is fenced and must not act as primary")
                raise FencedError(f"shipment from {who} at epoch {caller.epoch} refused: ZooKeeper names "
                                  f"{named or 'nobody'} at epoch {epoch}; only that agent"
                                  + (f" (or {self.upstream}, this standby's replication.upstream, relaying epoch "
                                     f"{epoch})" if self.upstream else "") + " may ship")
        self._check_floor(caller)
        if self.group_epoch is None and self.trust_request_epochs and caller.epoch > self.state.epoch:
            self.observe_epoch(caller.epoch, caller.sender)  # fixed roles, caller proven by tls.allowed_peers
        self.last_contact = caller
        self._clock_sample(caller)

    def _check_floor(self, caller: Caller) -> None:
        if caller.epoch < self.state.epoch:
            raise FencedError(f"shipment epoch {caller.epoch} is lower than epoch {self.state.epoch} this standby "
                              f"has seen; the sender is fenced and must not act as primary")

    # --- the three steps ----------------------------------------------------------

    def missing(self, caller: Caller, ids: list[bytes]) -> list[bytes]:
        self._check_floor(caller)
        return self.intake.missing(caller, ids)

    def receive(self, caller: Caller, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        """Store uploaded chunks, each checked against its id. Durable when this returns."""
        def fenced(stream: Iterator[list[ReceivedChunk]]) -> Iterator[list[ReceivedChunk]]:
            for batch in stream:
                self._check_floor(caller)  # a promotion seen meanwhile (watch) fences the rest of the stream
                yield batch

        return self.intake.receive(caller, fenced(batches))

    def held_manifest(self, snapshot_id: str, snapshot_doc: bytes) -> Spool:
        """The manifest of snapshot ``snapshot_id`` in this repository, checked against its hash, for a commit
        of ``snapshot_doc`` that names it instead of sending its bytes (an unchanged capture: the same tree as
        the snapshot applied here). ManifestNotHeld when that snapshot or its manifest is gone or damaged
        here, or the document names another manifest: the sender then sends the bytes. IntegrityError for a
        document that does not parse."""
        wanted = SnapshotInfo.from_bytes(snapshot_doc, "shipped snapshot document").manifest_hash
        try:
            held = self.repo.find_snapshot(snapshot_id)
            if held.manifest_hash != wanted:
                raise ManifestNotHeld(f"snapshot {snapshot_id}'s manifest here is not the one the shipped snapshot "
                                      f"names")
            # In place: the commit checks it unchanged as it stores it (Repository._link_manifest), and a
            # root that holds it already (the common case) reads nothing more of it.
            return self.repo.manifest_spool(held, in_place=True)
        except ManifestNotHeld:
            raise
        except DrsyncError as e:
            raise ManifestNotHeld(f"the manifest of snapshot {snapshot_id} cannot be read here: {e}") from e

    def patched_manifest(self, snapshot_id: str, snapshot_doc: bytes, patch: Spool) -> Spool:
        """The manifest ``patch`` (:mod:`drsync.repository.manifest_patch`, from the sender) makes of snapshot
        ``snapshot_id``'s in this repository, as a spool hashed as written: it must be the manifest
        ``snapshot_doc`` names, byte for byte. ManifestNotHeld when the base is gone or damaged here, the patch
        does not read, or the rebuilt manifest has another hash (e.g. the sender's Parquet writer is of
        another version): the sender then sends the bytes. IntegrityError for a document that does not parse."""
        wanted = SnapshotInfo.from_bytes(snapshot_doc, "shipped snapshot document").manifest_hash
        try:
            with self.repo.manifest_spool(self.repo.find_snapshot(snapshot_id)) as base:
                out = apply_patch(ManifestFile(base, f"manifest of snapshot {snapshot_id}"),
                                  ManifestFile(patch, "manifest patch"))
        except DrsyncError as e:
            raise ManifestNotHeld(f"the manifest could not be rebuilt from snapshot {snapshot_id}'s here: {e}") from e
        if out.hexdigest() != wanted:
            out.close()
            raise ManifestNotHeld(f"the manifest rebuilt from snapshot {snapshot_id}'s and the patch is not the one "
                                  f"the shipped snapshot names (the sender writes manifests otherwise)")
        return out

    def commit(self, caller: Caller, snapshot_doc: bytes, manifest_bytes: bytes | Spool,
               sender_seq: int = 0) -> tuple[SnapshotInfo, ApplyResult]:
        """Admit (again, fresh, under the lock a promotion takes), store and apply; the shipment's intake
        session ends with it. The repository's shared lock is taken (or held by the session) before the
        commit lock: a commit waiting for a garbage collection's sweep never holds up a promotion."""
        lost = self.committer.lost_packs_seen = False
        damaged: dict[str, set[bytes]] = {}
        try:
            with self.intake.session(caller), self.committer.lock:
                self.committer.check_usable()
                self.admit(caller)
                done = self.committer.commit(snapshot_doc, manifest_bytes, [caller.epoch, sender_seq])
                self.last_refusal = None  # shipments go through again
                return done
        except ChunksLost:
            lost = True
            raise
        except ChunkDamaged as e:  # the apply read a chunk of its own repository that is damaged
            damaged = {e.pack_id: {e.chunk_id}}
            raise ChunksLost(f"{e}: this standby's copy of that chunk is damaged; it forgets it, and the primary "
                             f"sends it again") from None
        except OSError as e:  # its state directory or repository cannot be written: an error it reports itself
            raise describe_os_error(e, f"recording the shipment on standby {self.agent} (state directory "
                                       f"{self.store.dir})") from None
        finally:
            self.intake.end(caller)
            for pack, ids in self.intake.take_damaged().items():  # damaged delta bases of this shipment
                damaged.setdefault(pack, set()).update(ids)
            if lost or damaged or self.committer.lost_packs_seen:  # else every commit would check every chunk
                self.committer.forget_lost(damaged)
            self.after_commit()

    # --- operator requests (drsync apply) --------------------------------------------------------

    def confirm(self, ref: str) -> dict[str, Any]:
        return self.committer.confirm(ref)

    def hold_applies(self) -> dict[str, Any]:
        return self.committer.hold_applies()

    def resume(self) -> dict[str, Any]:
        return self.committer.resume()

    def release_on_promotion(self) -> None:
        self.committer.release_on_promotion()

    def lag_s(self, now: float | None = None) -> float | None:
        """Lag on the primary's clock (drsync.agent.clock.lag_s with this agent's offset estimate)."""
        return self.state.lag_s(now)

    def failover_lag_s(self, now: float | None = None) -> float | None:
        """The lag an automatic failover judges against ``max_lag_on_failover``: what this standby would
        serve as primary. Taking over, it applies everything it received first (``replication.apply_delay``
        does not hold a take-over back: :meth:`Committer.apply_due` with ``everything``), so its lag is the
        received lag, not the applied lag that always includes the delay. While applies are held (an
        operator's ``drsync apply --hold``, or the deletion or mass-change guard) it applies nothing when it
        takes over and would serve its root as applied: then the applied lag counts, and a held standby
        whose applied state is over the limit does not promote itself (an operator chooses: ``drsync promote
        --delayed-state``, ``--to-snapshot``). None before anything was applied (not eligible)."""
        st = self.state
        if not st.applied_snapshot:
            return None
        if self.committer.hold.active:
            return st.lag_s(now)
        return st.received_lag_s(now)
