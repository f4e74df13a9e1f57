"""The standby's committer: store a shipped snapshot, judge it, apply it atomically (safety rules 2 and 8).

Everything here runs under :attr:`Committer.lock` (one commit, confirmation or resume
at a time); a promotion takes the same lock, so it always sees a whole snapshot. The
repository's shared lock is held while the snapshot is stored and applied, so garbage
collection never removes what it names. Retention and GC are not done here (see
:mod:`drsync.agent.maintenance`): nothing slow sits between a shipment and its
acknowledgement, or between a promotion and the lock it waits for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from drsync import allocators, documents, faults, fsutil
from drsync.agent.hold import HoldFile
from drsync.agent.roles import format_span
from drsync.agent.state import StateStore
from drsync.apply import ApplyResult, RootRemovalHeld, abandon_apply, apply_manifest, recover_apply
from drsync.dataroot import open_data_root
from drsync.dataroot.distcp import Cancelled, DistCpSettings, DistCpStager, content_source
from drsync.errors import ChunkDamaged, DrsyncError, IntegrityError, OperationFailed, RefusedError
from drsync.flocks import ApplyBusy
from drsync.fsutil import describe_os_error
from drsync.guard import Hold, MassChange, change_baseline, change_guard, deletion_guard, next_checkpoints
from drsync.protection import as_stored_by_standby
from drsync.repository import repair
from drsync.repository.lock import DEFAULT_WAIT_S
from drsync.repository.manifest import Manifest, ManifestFile
from drsync.repository.manifest_diff import chunks_beyond, same_tree
from drsync.repository.manifest_root import root_of, same_but_time
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo, iso
from drsync.repository.spool import Spool

log = logging.getLogger("drsync.agent.standby")

# Seconds a standby waits for its repository's exclusive lock to forget chunks it lost (after a refused commit).
FORGET_WAIT_S = 10.0


def delayed_until(captured_at: float, stored_at: float, delay_s: float, clock_offset_s: float) -> float:
    """When a snapshot waiting for ``replication.apply_delay`` comes due, on this machine's clock: once the
    delay has passed since this standby stored it (``stored_at``, this machine's clock) and since it was
    captured (``captured_at``, the primary's clock, turned into this machine's with ``clock_offset_s``,
    the primary's clock minus this one's). The stored time is the standby's own: a primary that writes an
    old capture time (a wrong clock, or a lie) cannot make a snapshot skip the delay, as [snapshots]
    protect counts from when the repository stored a snapshot."""
    return max(stored_at, captured_at - clock_offset_s) + delay_s


class Committer:
    def __init__(self, repo: Repository, data_root: str, store: StateStore, *, agent: str,
                 max_delete_fraction: float = 0.5, on_applied: Callable[[], None] = lambda: None,
                 distcp: DistCpSettings | None = None, apply_delay_s: float = 0.0,
                 max_change_fraction: float = 0.5, on_mass_change: str = "hold",
                 mass_change_window_s: float = 0.0) -> None:
        self.repo = repo
        self.data_root = data_root
        self.store = store
        self.agent = agent
        self.max_delete_fraction = max_delete_fraction
        # replication.apply_delay: a shipment is stored at once and applied once stored and captured this
        # long ago (delayed_until).
        self.apply_delay_s = apply_delay_s
        # The mass-change guard: replication.max_change_fraction, and "hold" or "alert" when it is exceeded.
        self.max_change_fraction = max_change_fraction
        self.on_mass_change = on_mass_change
        self.mass_change_window_s = mass_change_window_s
        self.changed_fraction = float("nan")  # of the last shipment judged (drsync_snapshot_changed_fraction)
        self.on_applied = on_applied
        # Held for a whole commit (store + apply): a promotion takes it to wait for an apply in flight.
        self.lock = threading.Lock()
        self.broken = ""  # set when an apply failed half-way and could not be completed
        self.lost_packs_seen = False  # the last commit found packs the index names gone (the standby forgets them)
        # The deletion guard (safety rule 8) and the operator's hold; changed under self.lock only.
        self.hold_file = HoldFile(store.dir)
        self.hold = self.hold_file.load()
        self._pending = os.path.join(store.dir, "applying.json")
        # replication.engine = "distcp": DistCp stages files, and each applied snapshot is kept as an
        # HDFS snapshot of the root (history). Each apply has a cancel token of its own, set by a promotion
        # (cancel_staging) to stop that copy in flight: never one the promotion starts itself afterwards.
        self.distcp = distcp
        self._in_flight: threading.Event | None = None

    # --- crash recovery --------------------------------------------------------------

    def recover(self) -> bool:
        """Finish an apply a crash interrupted, before serving anything (safety rule 2)."""
        doc = None
        if os.path.exists(self._pending):
            with open(self._pending, "rb") as f:
                data = f.read()
            try:
                doc = documents.typed_loads(data, {"snapshot": str, "captured_at": float, "position": list},
                                            "applying.json")
                if not isinstance(doc.get("snapshot"), str) or "captured_at" not in doc:
                    raise ValueError("applying.json does not name a snapshot and its capture time")
            except ValueError as e:
                raise IntegrityError(f"the record of an interrupted apply, {self._pending}, is damaged ({e}); "
                                     f"the agent does not start until it is fixed by hand: it names the "
                                     f"snapshot being applied, as {{\"snapshot\": ID, \"captured_at\": UNIX "
                                     f"SECONDS, \"position\": [EPOCH, SEQ]}}") from None
        if doc is not None and doc.get("reapply"):
            return self._reapply(doc)
        try:
            finished = recover_apply(self.data_root, self.store.journal)
        except ApplyBusy:
            raise  # another host applies to this root now: nothing here to complete or redo
        except (OperationFailed, OSError) as e:
            if doc is None:
                raise
            log.warning("standby %s: the apply of snapshot %s cut short cannot be completed (%s): the data root was "
                        "changed since; the snapshot is applied again, every file compared", self.agent,
                        doc["snapshot"], e)
            return self._reapply(doc)
        if finished and doc is not None:
            self._record_applied(doc["snapshot"], doc["captured_at"], doc.get("position") or [])
        # Without a journal the apply either never changed the root or was recorded already. Recorded, the
        # root holds it: its history snapshot is taken now if the crash came before (once: idempotent).
        if doc is not None and self.store.current.applied_snapshot == doc["snapshot"]:
            self._keep_history(doc["snapshot"])
        if doc is not None:
            os.unlink(self._pending)
        return finished

    def _reapply(self, doc: dict[str, Any]) -> bool:
        """Apply the snapshot ``doc`` (the pending record) again onto a root nothing vouches for: an apply cut
        short whose journal no replay completes left it part old, part new. The record says so first (a
        crash from here on comes back here), then the journal goes and the snapshot is applied with every
        file compared by content. Raises what the apply raises; the record stays until it succeeds."""
        info = self.repo.find_snapshot(doc["snapshot"])
        position = list(doc.get("position") or [])
        self._write_pending(info, position, reapply=True)
        abandon_apply(self.data_root, self.store.journal)
        self._apply(info, self.repo.load_manifest(info, lean=True), position, base=None, reapply=True)
        log.warning("standby %s: snapshot %s applied again; the data root holds it whole", self.agent, info.id)
        return True

    def _after_failed_apply(self) -> None:
        """An apply failed while this agent keeps running: never leave a half-applied root behind.

        Before the journal was written nothing changed, so there is nothing to do. After it,
        roll forward now; if even that fails, refuse shipments until an operator steps in.
        """
        try:
            self.recover()
        except ApplyBusy as e:  # another host's apply holds the root now: the next apply completes ours first
            log.warning("standby %s: %s; the next apply completes what this one left", self.agent, e)
        except Exception as e:
            self.broken = (f"an apply failed half-way and could not be completed ({e}); fix the cause, then "
                           f"restart the agent, which completes it first")
            log.error("%s", self.broken)

    def cancel_staging(self) -> None:
        """Stop the DistCp copy in flight, if any (a promotion does not wait hours for it): its apply ends
        before the journal, the root unchanged, and a snapshot waiting for apply_delay stays pending. Only
        that apply is stopped: the ones started afterwards (the promotion's own) run to the end."""
        token = self._in_flight
        if token is not None:
            token.set()

    def check_usable(self) -> None:
        if self.broken:
            raise OperationFailed(f"standby {self.agent} needs recovery: {self.broken}")

    def forget_lost(self, damaged: dict[str, set[bytes]] | None = None) -> None:
        """After a commit refused for chunks this standby lost (:class:`ChunksLost`), or one that found packs
        gone (named only by older snapshots, say): its index stops naming packs that are gone, so the
        sender's next negotiation, asking about every chunk, learns it lacks them and sends them again.
        Under the exclusive lock, waited for briefly (its own session has just ended; another sender's keeps
        it): when it cannot be had, or the repair is refused (every pack gone: an unmounted storage, say), an
        ERROR says so and the next commit tries again. ``damaged``: pack id -> ids of chunks found damaged
        there (an apply's read), forgotten too."""
        self.repo.reload_index()  # the loaded index (61 bytes a chunk) is not kept beside the repair's rows
        allocators.give_back()
        try:
            with self.repo.lock(exclusive=True, wait_s=FORGET_WAIT_S) as lock:
                if damaged:  # the other chunks of that pack too (a truncated pack: all of them at once)
                    damaged = repair.damaged_in(self.repo, set(damaged)) or damaged
                report = repair.forget(self.repo, lock, damaged=damaged)
        except DrsyncError as e:
            log.error("standby %s could not forget the chunks its repository lost: %s", self.agent, e)
            return
        if report.changed:
            log.warning("standby %s lost %d pack(s) and %d damaged chunk(s) of its repository (%s): it forgot "
                        "%d chunk(s), and the primary sends those a snapshot still needs again; run 'drsync repo "
                        "verify' to check the rest", self.agent, len(report.lost_packs), report.damaged_chunks,
                        ", ".join(report.lost_packs[:3]) or "no pack lost", report.forgotten_chunks)

    # --- a shipment's commit ---------------------------------------------------------

    def commit(self, snapshot_doc: bytes, manifest_bytes: bytes | Spool,
               position: list[int]) -> tuple[SnapshotInfo, ApplyResult]:
        """Store and apply a shipped snapshot. Caller holds :attr:`lock` and admitted the sender.

        ``manifest_bytes``: the manifest as it arrived, best a :class:`Spool` (a large one then waits
        in a temporary file, not beside its decoded table, while the snapshot is applied).
        Raises RefusedError (other cluster, or held back), IntegrityError (damaged or incomplete)."""
        spool = manifest_bytes if isinstance(manifest_bytes, Spool) else Spool.of(manifest_bytes)
        del manifest_bytes
        started = time.monotonic()
        info = as_stored_by_standby(SnapshotInfo.from_bytes(snapshot_doc, "shipped snapshot document"))
        cfg = self.repo.config
        if (info.cluster_id, info.release) != (cfg.cluster_id, cfg.release):
            raise RefusedError(
                f"snapshot {info.id} is from cluster {info.cluster_id!r} release {info.release!r}, but this "
                f"standby keeps cluster {cfg.cluster_id!r} release {cfg.release!r}; give both agents production's "
                f"cluster.id and cluster.release (upgrade both together), or check where the primary ships "
                f"(replication.standbys, or with ZooKeeper roles the agents of its coordination.group)")
        if spool.hexdigest() != info.manifest_hash:
            raise IntegrityError(f"snapshot {info.id}: the manifest arrived damaged or truncated "
                                 f"(hash mismatch); it was not applied")
        self._refuse_if_stale(info, position)
        # The chunk index the shipment's negotiation loaded (61 bytes a chunk) is let go before the manifest
        # is decoded beside it: the check below locates what it needs from the index files.
        self.repo.reload_index()
        allocators.give_back()  # and what receiving the shipment freed inside glibc's heaps
        # Lean when decoded: the chunk lists and digests stay in the spool's file until a row asks for them
        # (about 70 MiB of a 1,000,000-file table); the spool is kept open until the apply is over.
        with spool:
            return self._store_and_take(info, spool, ManifestFile(spool, f"manifest of snapshot {info.id}"),
                                        started, position)

    def _store_and_take(self, info: SnapshotInfo, spool: Spool, file: ManifestFile, started: float,
                        position: list[int]) -> tuple[SnapshotInfo, ApplyResult]:
        with self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S) as lock:
            # Under the shared lock no GC sweeps between this check and the apply: every chunk is
            # indexed and its pack exists (IntegrityError otherwise; the primary sends them again).
            # A snapshot stored here vouches for its chunks (its own commit checked them, and no GC sweeps
            # them while it is kept): only the files that differ from the applied one (or the guard's
            # baseline) are checked, so a no-change cycle at 1,000,000 files loads no index. Unless a pack
            # the index names is gone (damage, not GC): then every chunk is checked, as before. A manifest
            # with the root's own hash (nothing changed) needs no merge to say so.
            # After a repair forgot chunks (repaired.json), stored snapshots no longer vouch for theirs: every
            # chunk is checked until a commit passes that (ChunksLost otherwise: the primary sends them again).
            same = self._known_root_hash() == info.manifest_hash
            root = None if same else self._known_root()
            repaired = bool(repair.repaired_snapshots(self.repo))
            self.lost_packs_seen = bool(self.repo.lost_packs())  # the standby forgets them after this commit
            # The manifest of what the root holds already (by its hash, the common no-change cycle) is not
            # decoded: its file is read by the row groups it needs, if at all (a file count).
            manifest: Manifest | ManifestFile = file
            if repaired or self.lost_packs_seen or (root is None and not same):
                manifest = Manifest.lean(file)
                self.repo.check_chunks_present(manifest.chunk_id_column(), f"snapshot {info.id}")
                if repaired and repair.clear_repaired(self.repo):
                    log.warning("standby %s holds every chunk of snapshot %s again (after a repair of its "
                                "repository)", self.agent, info.id)
            elif root is not None:
                manifest = Manifest.lean(file)
                self.repo.check_chunks_present(chunks_beyond(root, manifest), f"snapshot {info.id}")
            self.repo.reload_index()  # not kept through the guards and the apply: see _apply
            known = {s.id: s for s in self.repo.list_snapshots()}
            # Stored with this repository's next sequence number (arrival order), whatever
            # seq the sender's document carries; a retried commit keeps the stored one.
            if info.id in known and known[info.id].manifest_hash != info.manifest_hash:
                message = (f"snapshot {info.id} is stored here already with another manifest: a shipment may not "
                           f"change a stored snapshot; refused, nothing was stored or applied (a sender that "
                           f"reuses snapshot ids is broken or hostile: check {self.agent}'s primary)")
                log.error("%s", message)
                raise RefusedError(message)
            info = known[info.id] if info.id in known else self.repo.commit_snapshot(info, spool, lock=lock)
            stored_at = time.time()  # apply_delay counts from here, on this machine's clock
            self._record_received(info)
            # RefusedError while held: stored, not applied
            result = self.take(info, manifest, started, position, stored_at=stored_at)
        return info, result

    def _refuse_if_stale(self, info: SnapshotInfo, position: list[int]) -> None:
        """A snapshot behind the newest this standby applied or keeps for apply_delay (a lower position, the
        producing primary's epoch and sequence, and captured no later) arrives late, e.g. relayed after the
        primary shipped a newer one directly: applying it would take the root back. Refused, nothing stored.
        (A primary whose repository was re-created numbers from 1 again, but captures later: accepted.)"""
        st = self.store.current
        known = [(tuple(st.applied_position), st.applied_captured_at, st.applied_snapshot)]
        known += [(tuple(p[2]), p[1], p[0]) for p in st.pending]
        newest = max((k for k in known if len(k[0]) == 2 and k[0][1]), default=None)
        if newest is None or len(position) != 2 or not position[1] or info.id == newest[2]:
            return
        if tuple(position) < newest[0] and info.captured_at <= newest[1]:
            raise RefusedError(
                f"snapshot {info.id} (position {position[0]}/{position[1]}, epoch/sequence) is older than "
                f"snapshot {newest[2]} ({newest[0][0]}/{newest[0][1]}) this standby already holds: it arrived "
                f"late (a relay or a retry behind a newer shipment); not stored, not applied")

    def take(self, info: SnapshotInfo, manifest: Manifest | ManifestFile, started: float, position: list[int], *,
             due: bool = False, stored_at: float | None = None) -> ApplyResult:
        """Apply a stored snapshot unless a hold keeps it back (then RefusedError, logged as a warning).

        With ``replication.apply_delay``, a snapshot younger than the delay is judged now and put on the
        pending list (:meth:`apply_due` applies it later; an empty result is returned); ``due``: it is old
        enough, or an operator chose it; ``stored_at``: when this standby stored it (default now: a snapshot
        stored while applies were held waits the whole delay from when it is taken). Under :attr:`lock` and the
        repository's shared lock."""
        self._check_history_root(info)
        if self.hold.operator_since:
            raise RefusedError(self._refuse(info, (
                f"standby {self.agent} holds applies (drsync apply --hold since {iso(self.hold.operator_since)}): "
                f"snapshot {info.id} stored, not applied; run 'drsync apply --resume' on standby {self.agent} "
                f"to apply again")))
        # The first snapshot is applied at once: there is nothing older to protect, and a new standby is
        # useful from its first sync on.
        stored_at = time.time() if stored_at is None else stored_at
        if not due and self.apply_delay_s > 0 and self.store.current.applied_snapshot and \
                not self._is_due(info.captured_at, stored_at):
            return self._defer(info, _lean(manifest), position, stored_at)
        if self._holds_already(info, manifest):
            # Nothing changed since the applied snapshot: the root already holds it. With history (engine
            # "distcp") recorded and kept under the pending record, as an apply is: recover() takes a history
            # snapshot a crash lost.
            if self.distcp is not None:
                self._write_pending(info, position)
            self._record_applied(info.id, info.captured_at, position)
            self._keep_history(info.id)
            if self.distcp is not None:
                os.unlink(self._pending)
            log.debug("snapshot %s has the content of the applied one; nothing to apply", info.id)
            self._release_guard_for(info, f"snapshot {info.id} has the content of the applied snapshot again")
            return ApplyResult(unchanged_files=manifest.file_count())
        manifest = _lean(manifest)
        applied = self._applied_manifest()
        base = applied if applied is not None else self._baseline_manifest()
        change = self._judge(info, base, manifest, position)
        if change is not None:  # replication.on_mass_change = "alert": applied, flagged until acknowledged
            self._flag(info, change, good=change.since or self.store.current.applied_snapshot)
        try:
            result = self._apply(info, manifest, position, base=base, root_guard=True)
        except RootRemovalHeld as e:  # the root holds files drsync never applied there: held like a deletion
            raise RefusedError(self._hold_by_guard(info, Hold(e.files, e.removed, e.files - e.removed, e.limit),
                                                   position, on_root=str(e))) from None
        log.info("applied snapshot %s (%d files written, %d removed) in %.2fs", info.id,
                 result.written_files, result.removed, time.monotonic() - started)
        self._release_guard_for(info, f"snapshot {info.id} was applied: it removes few enough of the files "
                            f"(replication.max_delete_fraction {self.max_delete_fraction:g}) and rewrites few "
                            f"enough (replication.max_change_fraction {self.max_change_fraction:g})")
        return result

    # --- replication.apply_delay ------------------------------------------------------------------

    def _due_at(self, captured_at: float, stored_at: float) -> float:
        return delayed_until(captured_at, stored_at, self.apply_delay_s, self.store.current.clock_offset_s)

    def _is_due(self, captured_at: float, stored_at: float) -> bool:
        return time.time() >= self._due_at(captured_at, stored_at)

    def _record_received(self, info: SnapshotInfo) -> None:
        if info.captured_at >= self.store.current.received_captured_at:
            self.store.update(received_snapshot=info.id, received_captured_at=info.captured_at)

    def _defer(self, info: SnapshotInfo, manifest: Manifest, position: list[int], stored_at: float) -> ApplyResult:
        """Judge a young snapshot now, against what the root holds (the applied snapshot: everything
        pending before it counts too, as it would in an immediate apply), then queue it."""
        st = self.store.current
        if any(p[0] == info.id for p in st.pending):
            return ApplyResult()  # a retried commit
        self._judge(info, self._known_root(), manifest, position)  # alert mode: flagged when it is applied
        from drsync.agent.state import AgentState

        entry = (info.id, info.captured_at, tuple(position), stored_at)

        def queued(s: AgentState) -> AgentState:  # read and written under the store's own lock: nothing lost
            if any(p[0] == info.id for p in s.pending):
                return s
            return dataclasses.replace(s, pending=(*s.pending, entry))

        self.store.transform(queued)
        log.info("snapshot %s stored; applied at %s (replication.apply_delay %s)", info.id,
                 iso(self._due_at(info.captured_at, stored_at)), format_span(self.apply_delay_s))
        self._release_guard_for(info, f"snapshot {info.id}, shipped after it, passes the guards")
        return ApplyResult()

    def apply_due(self, *, everything: bool = False) -> str:
        """Apply the newest pending snapshot that is old enough (``replication.apply_delay``, see
        :func:`delayed_until`; ``everything``: the newest pending one, as a switchover or an automatic failover
        does before taking over), dropping the pending ones that arrived before it (the root goes straight to
        it). Returns its id, or "" when none is due or applies are held. Takes the repository's shared lock,
        then :attr:`lock`; refusals are logged."""
        st = self.store.current
        if not st.pending or not (everything or any(self._is_due(p[1], p[3]) for p in st.pending)) or \
                self.hold.operator_since:
            return ""
        damaged: dict[str, set[bytes]] = {}
        try:
            return self._apply_due(everything, damaged)
        finally:
            if damaged:
                self.forget_lost(damaged)

    def _apply_due(self, everything: bool, damaged: dict[str, set[bytes]]) -> str:
        with self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S), self.lock:
            st = self.store.current
            due = [i for i, p in enumerate(st.pending) if everything or self._is_due(p[1], p[3])]
            if not due or self.hold.operator_since or self.broken:
                return ""
            snapshot, _, position, _ = st.pending[due[-1]]
            try:
                info = self.repo.find_snapshot(snapshot)
                self.take(info, self.repo.load_manifest(info, lean=True), time.monotonic(), list(position),
                          due=True)
            except RefusedError:
                pass  # held (logged by the hold); the hold names it from now on
            except Cancelled:
                # A promotion stopped this copy: the snapshots stay pending (the promotion applies them next).
                log.warning("the apply of pending snapshot %s was stopped by a promotion; it stays pending", snapshot)
                return ""
            except DrsyncError as e:
                log.error("pending snapshot %s could not be applied (%s); the next due one is tried", snapshot, e)
                if isinstance(e, ChunkDamaged):  # forgotten (below): the next commit checks all, the primary resends
                    damaged[e.pack_id] = {e.chunk_id}
            # The pending list is in arrival order, which is the primary's order (a later capture time says
            # nothing: a re-created primary numbers anew, a wrong clock goes back): what arrived before the
            # one taken is behind the root now.
            taken = st.pending[:due[-1] + 1]
            self.store.transform(lambda s: dataclasses.replace(s, pending=tuple(p for p in s.pending
                                                                                if p not in taken)))
            return snapshot if self.store.current.applied_snapshot == snapshot else ""

    def keep_delayed(self, why: str) -> dict[str, Any]:
        """Before a promotion of the delayed state (``promote --delayed-state``): hold applies and drop the
        pending list, so the root stays as it is; the snapshots stay in the repository."""
        with self.lock:
            if not self.hold.operator_since:
                self.hold.operator_since = time.time()
            self.hold_file.save(self.hold)
            dropped = [p[0] for p in self.store.current.pending]
            self.store.update(pending=())
            log.warning("applies held %s: %d received snapshot(s) stay unapplied in the repository, the root stays "
                        "at %s", why, len(dropped), self.store.current.applied_snapshot or "(none)")
            return {"applied": self.store.current.applied_snapshot, "not_applied": dropped,
                    "message": f"{self.agent} keeps its root at {self.store.current.applied_snapshot}; "
                               f"{len(dropped)} received snapshot(s) stay unapplied"}

    def apply_now(self, ref: str, why: str) -> dict[str, Any]:
        """Apply stored snapshot ``ref`` (id or unique prefix) now, whatever the delay, the holds and the
        guard say, and hold applies after it (an operator's choice before a promotion: ``why``). The pending
        list is dropped (the snapshots stay in the repository). RefusedError when ``ref`` is unknown."""
        started = time.monotonic()
        with self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S), self.lock:
            self.check_usable()
            info = self.repo.find_snapshot(ref)
            if info.cluster_id != self.repo.config.cluster_id:
                raise RefusedError(f"snapshot {info.id} is of cluster {info.cluster_id!r}, not "
                                   f"{self.repo.config.cluster_id!r}: it cannot become this standby's data")
            held_before = self.hold.operator_since
            if not self.hold.operator_since:
                self.hold.operator_since = time.time()
            self.hold_file.save(self.hold)
            faults.pause("point-apply")  # tests: the agent stops here, between the hold and the apply
            st = self.store.current
            # Applied again when it is the applied one too: the root is made to hold exactly this snapshot,
            # read and compared file by file (it may have been changed by hand, or by a forged shipment).
            position = next((list(p[2]) for p in st.pending if p[0] == info.id), list(st.applied_position)
                            if st.applied_snapshot == info.id else [])
            try:
                result = self._apply(info, self.repo.load_manifest(info, lean=True), position, base=None,
                                     when_gone=(
                    f"standby {self.agent} never applied snapshot {info.id}, so it has no HDFS snapshot "
                    f"drsync-snap-{info.id} of it and production no longer keeps its bytes: promote to a snapshot "
                    f"it applied (its data root lists them as HDFS snapshots drsync-snap-<id>), or without "
                    f"--to-snapshot and --before to keep the root as it is"))
            except (IntegrityError, RefusedError):
                # Damage found or refused while staging, before the root changed: no hold is left behind (an
                # I/O failure mid-commit keeps it: the root may hold the point now).
                if not held_before and not self.broken:
                    self.hold.operator_since = held_before
                    self.hold_file.save(self.hold)
                raise
            self.store.update(pending=())
            log.warning("snapshot %s applied %s (%d files written, %d removed) in %.2fs; applies held until the "
                        "promotion", info.id, why, result.written_files, result.removed, time.monotonic() - started)
            return {"applied": info.id, "captured_at": info.captured_at, "written_files": result.written_files,
                    "removed": result.removed,
                    "message": f"snapshot {info.id} is applied on {self.agent} ({result.written_files} files "
                               f"written, {result.removed} removed); applies are held until the promotion"}

    def _judge(self, info: SnapshotInfo, base: Manifest | ManifestFile | None, manifest: Manifest,
               position: list[int]) -> MassChange | None:
        """The deletion and mass-change guards against ``base`` (what the root holds): RefusedError (logged)
        when they hold ``info``; else the mass change to flag (on_mass_change = "alert"), or None."""
        hold = deletion_guard(base, manifest, self.max_delete_fraction) if base is not None else None
        change = self._judge_changes(info, base, manifest)
        held_change = change if change is not None and self.on_mass_change == "hold" else None
        if hold is not None or held_change is not None:
            raise RefusedError(self._hold_by_guard(info, hold, position, held_change))
        return change

    def _hold_by_guard(self, info: SnapshotInfo, hold: Hold | None, position: list[int],
                       held_change: MassChange | None = None, on_root: str = "") -> str:
        """Hold ``info`` for the deletion guard (``hold``) and/or the mass-change guard (``held_change``):
        the hold stays on the first held snapshot. Returns the refusal (logged as a warning). ``on_root``:
        the files counted are on the root itself, not in the applied snapshot (:class:`RootRemovalHeld`'s
        words, which then say what would be removed)."""
        st, h = self.store.current, self.hold
        if not h.snapshot:  # the hold stays on the first held snapshot (the one an operator inspects)
            h.snapshot, h.captured_at, h.applied, h.held_at = (info.id, info.captured_at,
                                                               st.applied_snapshot or st.guard_baseline,
                                                               time.time())
            h.files, h.removed = (hold.files, hold.removed) if hold else (held_change.files if held_change else 0, 0)
            h.changed, h.position = (held_change.changed if held_change else 0), list(position)
        figures = on_root.removeprefix(f"snapshot {info.id} ") if on_root else \
            " and ".join(x.describe() for x in (held_change, hold) if x is not None)
        what = (f"snapshot {info.id} {figures}: held, not applied" if h.snapshot == info.id else
                f"snapshot {info.id} {figures}: stored, not applied (snapshot {h.snapshot} is held "
                f"since {iso(h.held_at)})")
        kind = "deletion" if held_change is None else "rewrite" if hold is None else "deletion and rewrite"
        message = (f"{what}; on standby {self.agent} inspect it with 'drsync snapshot diff {h.applied} "
                   f"{h.snapshot}' and confirm with 'drsync apply --confirm {h.snapshot}' if this {kind} "
                   f"is intended")
        if held_change is not None and held_change.since:
            message += (f"; if it is not (an encryption sweep over several shipments?), keep this standby as it is: "
                        f"snapshot {held_change.since} predates the whole change, the applied {h.applied} holds "
                        f"part of it already (docs/operations.md section 13d)")
        elif held_change is not None:
            message += (f"; if it is not (an encryption sweep?), keep this standby as it is: snapshot "
                        f"{h.applied} is the last good one (docs/operations.md section 13d)")
        if h.snapshot == info.id:
            h.message = message
        return self._refuse(info, message, position)

    def _judge_changes(self, info: SnapshotInfo, base: Manifest | ManifestFile | None,
                       manifest: Manifest) -> MassChange | None:
        """The mass-change guard: how much of the applied snapshot's content ``manifest`` rewrites (kept for
        the metrics), and a :class:`MassChange` when that is over replication.max_change_fraction."""
        if base is None:
            self.changed_fraction = float("nan")
            return None
        st = self.store.current
        try:  # HDFS checksums of different algorithms never match: such external rows are not compared
            algorithm = self.repo.find_snapshot(st.applied_snapshot or st.guard_baseline).content_checksum
        except DrsyncError:
            algorithm = info.content_checksum
        compare = algorithm == info.content_checksum
        self.changed_fraction, change = change_guard(base, manifest, self.max_change_fraction,
                                                     compare_external=compare)
        if change is not None:
            return change
        # A sweep spread over many shipments: also against the snapshot applied a window ago.
        since = change_baseline(self._live_checkpoints(st.change_checkpoints), time.time(),
                                self.mass_change_window_s)
        if not since or since == st.applied_snapshot:
            return None
        # Read a row group at a time and not kept: a standby of a million files would otherwise hold a
        # second whole manifest for as long as the window lasts.
        old = self._manifest_of(since)
        if old is None:
            return None
        fraction, change = change_guard(old, manifest, self.max_change_fraction, compare_external=compare)
        self.changed_fraction = max(self.changed_fraction, fraction)
        return dataclasses.replace(change, since=since) if change is not None else None

    def _flag(self, info: SnapshotInfo, change: MassChange, good: str) -> None:
        """``replication.on_mass_change = "alert"``: apply, but flag the snapshot (drsync_mass_change) until
        an operator acknowledges it. Logged as a warning before the apply starts."""
        message = (f"snapshot {info.id} {change.describe()}: applied, not held (replication.on_mass_change = "
                   f"\"alert\"); if this is not intended (an encryption sweep?), run 'drsync apply --hold' on "
                   f"standby {self.agent} at once and recover from snapshot {good or '(none)'} (docs/"
                   f"operations.md section 13d); if it is, acknowledge with 'drsync apply --confirm {info.id}'")
        self.hold.flagged, self.hold.flagged_message = info.id, message
        self.hold_file.save(self.hold)
        log.warning("%s", message)

    def _refuse(self, info: SnapshotInfo, message: str, position: list[int] | None = None) -> str:
        self.hold.latest = info.id
        self.hold.latest_position = list(position or [])
        self.hold.refused += 1
        self.hold_file.save(self.hold)
        log.warning("%s", message)
        return message

    def release_on_promotion(self) -> None:
        """A promoted standby serves its applied snapshot: holds on what it stored are moot. Caller holds
        :attr:`lock`. The held snapshots stay in the repository."""
        if self.store.current.pending:
            log.warning("promoted with %d snapshot(s) stored and not applied (replication.apply_delay): they stay "
                        "in the repository, the root stays at %s", len(self.store.current.pending),
                        self.store.current.applied_snapshot or "(none)")
            self.store.update(pending=())
        if self.hold.active:
            held = self.hold.snapshot or self.hold.latest
            self.hold.operator_since = 0.0
            self._release_guard(f"agent {self.agent} was promoted at its applied snapshot "
                                f"{self.store.current.applied_snapshot or '(none)'}; the held snapshot {held} stays "
                                f"in its repository")
            self.hold_file.save(self.hold)

    def _release_guard_for(self, info: SnapshotInfo, why: str) -> None:
        """A snapshot passed the guards: it lifts a hold only when it was captured after the held one
        (production came back); an older one (pending for apply_delay) says nothing about the held change."""
        if self.hold.snapshot and info.captured_at > self.hold.captured_at:
            self._release_guard(why)

    def _release_guard(self, why: str) -> None:
        if not self.hold.snapshot:
            return
        held = self.hold.snapshot
        self.hold.snapshot, self.hold.applied, self.hold.message = "", "", ""
        self.hold.captured_at = self.hold.held_at = 0.0
        self.hold.files = self.hold.removed = self.hold.changed = 0
        if not self.hold.operator_since:
            self.hold.latest, self.hold.refused = "", 0
        self.hold_file.save(self.hold)
        log.warning("guard: the hold on snapshot %s is lifted: %s", held, why)

    def _baseline_manifest(self) -> ManifestFile | None:
        """What the root held when this agent (re)joined, while nothing is applied yet (an ex-primary's
        live production data): emptying it is held like any other mass deletion (safety rule 8). A
        row-group reader, as :meth:`_applied_manifest`."""
        st = self.store.current
        if st.applied_snapshot or not st.guard_baseline:
            return None
        try:
            return self.repo.open_manifest(self.repo.find_snapshot(st.guard_baseline))
        except DrsyncError:
            return None

    def _holds_already(self, info: SnapshotInfo, manifest: Manifest) -> bool:
        """Whether the applied snapshot has ``manifest``'s tree already: the same manifest (its hash), or
        one that differs in no path (compared a row group at a time: no second whole manifest held) nor in
        the root directory's own mode, owner or attributes (``drsync.root``: production's root chmod-ed alone is
        applied; its time alone is not, as drsync's own HDFS snapshots of production's root move it at every
        cycle)."""
        applied = self.store.current.applied_snapshot
        if not applied:
            return False
        try:
            had = self.repo.find_snapshot(applied)
            if had.manifest_hash == info.manifest_hash:
                return True
            opened = self.repo.open_manifest(had)
            return same_but_time(root_of(opened), root_of(manifest)) and same_tree(opened, manifest)
        except DrsyncError:
            return False

    def _known_root_hash(self) -> str:
        """The manifest hash of what the root is known to hold (see :meth:`_known_root`), or ""."""
        st = self.store.current
        try:
            return self.repo.find_snapshot(st.applied_snapshot or st.guard_baseline).manifest_hash \
                if st.applied_snapshot or st.guard_baseline else ""
        except DrsyncError:
            return ""

    def _known_root(self) -> ManifestFile | None:
        """What the root is known to hold: the applied snapshot, or (an ex-primary that rejoined, nothing
        applied yet) its before-rejoin capture; None when nothing vouches for it."""
        applied = self._applied_manifest()
        return applied if applied is not None else self._baseline_manifest()

    def _applied_manifest(self) -> ManifestFile | None:
        """The applied snapshot's manifest as a row-group reader: the guards and the apply's content check
        merge it with the new manifest a row group at a time, so a standby holds one whole manifest (the
        one it applies), not two."""
        applied = self.store.current.applied_snapshot
        return self._manifest_of(applied) if applied else None

    def _manifest_of(self, snapshot_id: str) -> ManifestFile | None:
        """The snapshot's manifest as a row-group reader (checked against its hash); None (a warning) when
        it cannot be read."""
        try:
            info = self.repo.find_snapshot(snapshot_id)
            return self.repo.open_manifest(info)
        except DrsyncError as e:
            log.warning("deletion guard: cannot read snapshot %s (%s); the shipment is judged without it",
                        snapshot_id, e)
            return None

    # --- operator requests (drsync apply), each under the lock: never during a shipment's commit ------

    def confirm(self, ref: str) -> dict[str, Any]:
        """Apply the snapshot the deletion guard holds (``ref``: its id or a unique prefix of 6+ characters).

        RefusedError when ``ref`` is not the held snapshot, or nothing is held."""
        started = time.monotonic()
        # The repository's lock before the commit lock, as a shipment's commit does (never wait for a
        # garbage collection while holding what a promotion waits for).
        with self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S), self.lock:
            self.check_usable()
            held = self.hold.snapshot
            if not held and self.hold.flagged and self._names(ref, self.hold.flagged):
                return self._acknowledge("an operator confirmed it (drsync apply --confirm)")
            if not held:
                extra = (" (applies are held by 'drsync apply --hold'; 'drsync apply --resume' lifts that)"
                         if self.hold.operator_since else "")
                raise RefusedError(f"no snapshot is held by the deletion or mass-change guard on standby "
                                   f"{self.agent}{extra}; nothing was applied")
            if not self._names(ref, held):
                figures = "; ".join(x for x in (
                    f"it rewrites the content of {self.hold.changed:,} files" if self.hold.changed else "",
                    f"it would remove {self.hold.removed:,} of {self.hold.files:,} files" if self.hold.removed
                    else "") if x)
                raise RefusedError(f"snapshot {ref} is not the one held on standby {self.agent}: {held} is "
                                   f"({figures}); nothing was applied; see 'drsync apply' and confirm the held "
                                   f"snapshot")
            info = self.repo.find_snapshot(held)
            manifest = self.repo.load_manifest(info, lean=True)
            result = self._apply(info, manifest, list(self.hold.position), base=self._known_root())
            log.warning("snapshot %s applied on an operator's confirmation (%d files written, %d removed) in %.2fs",
                        info.id, result.written_files, result.removed, time.monotonic() - started)
            behind = (self.hold.latest, list(self.hold.latest_position))  # stored and refused after it
            self._release_guard("an operator confirmed it (drsync apply --confirm) and it was applied")
            self._restart_window(info.id)
            self.store.transform(lambda s: dataclasses.replace(  # older pending ones are behind the root now
                s, pending=tuple(p for p in s.pending if p[1] > info.captured_at)))
            newer = self._take_stored_behind(info, *behind)
            return {"applied": info.id, "written_files": result.written_files, "removed": result.removed,
                    "then_applied": newer or None,
                    "message": f"snapshot {info.id} applied on standby {self.agent}: {result.written_files} files "
                               f"written, {result.removed} removed" + (f"; then snapshot {newer}, stored behind it"
                                                                       if newer else "")}

    def _take_stored_behind(self, confirmed: SnapshotInfo, latest: str, position: list[int]) -> str:
        """After a confirmation: the newest snapshot stored (and refused) behind the held one goes through the
        guards and the delay now, instead of waiting for the primary's next shipment. Its id when applied."""
        if not latest or latest == confirmed.id or self.hold.operator_since:
            return ""
        try:
            info = self.repo.find_snapshot(latest)
            if info.captured_at <= confirmed.captured_at:
                return ""
            self.take(info, self.repo.load_manifest(info, lean=True), time.monotonic(), position)
        except DrsyncError as e:  # held again, or unreadable: the primary's next shipment is judged as usual
            log.info("snapshot %s, stored behind the confirmed one, is not applied now: %s", latest, e)
            return ""
        return latest if self.store.current.applied_snapshot == latest else ""

    @staticmethod
    def _names(ref: str, snapshot: str) -> bool:
        """Whether ``ref`` names ``snapshot``: its id or a unique prefix of 6+ characters."""
        return ref == snapshot or (len(ref) >= 6 and snapshot.startswith(ref))

    def _acknowledge(self, why: str) -> dict[str, Any]:
        """Clear the mass-change flag of an applied snapshot (replication.on_mass_change = "alert")."""
        flagged = self.hold.flagged
        self.hold.flagged, self.hold.flagged_message = "", ""
        self.hold_file.save(self.hold)
        log.warning("mass-change guard: snapshot %s is acknowledged: %s", flagged, why)
        self._restart_window(self.store.current.applied_snapshot or flagged)
        return {"applied": None, "acknowledged": flagged,
                "message": f"the mass change of snapshot {flagged} (already applied) is acknowledged on standby "
                           f"{self.agent}"}

    def hold_applies(self) -> dict[str, Any]:
        """The operator's hold: store shipments, apply none until :meth:`resume`."""
        with self.lock:
            if not self.hold.operator_since:
                self.hold.operator_since = time.time()
                self.hold_file.save(self.hold)
                log.warning("applies held by an operator (drsync apply --hold): shipments are stored, not applied, "
                            "until 'drsync apply --resume'")
            return {"message": f"standby {self.agent} holds applies since {iso(self.hold.operator_since)}: "
                               f"shipments are stored, not applied, until 'drsync apply --resume'"}

    def resume(self) -> dict[str, Any]:
        """Lift the operator's hold, and apply the newest snapshot stored meanwhile (the guard still judges it)."""
        with self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S), self.lock:
            if not self.hold.operator_since:
                note = (f"; snapshot {self.hold.snapshot} stays held by a guard "
                        f"('drsync apply --confirm {self.hold.snapshot}' applies it)" if self.hold.snapshot else
                        f"; the mass change of snapshot {self.hold.flagged} stays flagged ('drsync apply "
                        f"--confirm {self.hold.flagged}' acknowledges it)" if self.hold.flagged else "")
                return {"applied": None, "message": f"applies were not held by an operator on standby "
                                                    f"{self.agent}; nothing to resume{note}"}
            self.hold.operator_since = 0.0
            if self.hold.flagged:  # the operator held applies over a flagged mass change, and goes on
                self._acknowledge("applies were resumed (drsync apply --resume)")
            latest = self.hold.latest if not self.hold.snapshot else ""
            if not self.hold.snapshot:
                self.hold.latest, self.hold.refused = "", 0
            self.hold_file.save(self.hold)
            log.warning("applies resumed by an operator (drsync apply --resume)")
            message = (f"the operator's hold on standby {self.agent} is lifted" if self.hold.snapshot else
                       f"standby {self.agent} applies shipments again")
            applied = None
            if latest and latest != self.store.current.applied_snapshot:
                try:
                    info = self.repo.find_snapshot(latest)
                    manifest = self.repo.load_manifest(info, lean=True)
                    self.take(info, manifest, time.monotonic(), list(self.hold.latest_position))
                    if self.store.current.applied_snapshot == info.id:
                        applied = info.id
                        message += f"; snapshot {info.id}, stored while held, is applied"
                    else:
                        message += (f"; snapshot {info.id}, stored while held, is applied at "
                                    f"{iso(self._due_at(info.captured_at, time.time()))} (replication.apply_delay)")
                except RefusedError as e:
                    message += f"; {e}"
                except DrsyncError as e:
                    message += f"; the snapshot stored while held ({latest}) was not applied ({e}): the next " \
                               f"shipment brings a newer one"
            elif self.hold.snapshot:  # the guard's hold is not the operator's: it stays until confirmed
                guard = "mass-change" if self.hold.changed and not self.hold.removed else "deletion"
                message += (f"; snapshot {self.hold.snapshot} stays held by the {guard} guard ('drsync apply "
                            f"--confirm {self.hold.snapshot}' applies it), and shipments behind it are stored, "
                            f"not applied")
            else:
                message += "; the next shipment is applied"
            return {"applied": applied, "message": message}

    # --- the apply itself ------------------------------------------------------------------

    def _apply(self, info: SnapshotInfo, manifest: Manifest, position: list[int], *,
               base: Manifest | ManifestFile | None,
               when_gone: str = "the primary's next shipment copies from its newer capture",
               root_guard: bool = False, reapply: bool = False) -> ApplyResult:
        """Apply through the journal. ``base``: what the root is known to hold (:meth:`_known_root`): files
        whose content differs from it are written whatever their sizes and times say. ``base`` None (nothing
        vouches for the root, e.g. a promotion at a recovery point): every file whose size and time match is
        read and compared. ``reapply`` (:meth:`_reapply`): the pending record says so, and a failure is raised
        as it is (the record makes the next recovery try again)."""
        what = f"snapshot {info.id}"
        # DistCp copies from this root's own history snapshot of it where there is one (a promotion to an
        # earlier snapshot: production's capture snapshot of it is long gone), else from production's.
        token = threading.Event()  # this apply's own: cancel_staging stops this one only
        external = (DistCpStager(self.distcp, content_source(info, self.data_root, self.distcp), cancel=token,
                                 what=what, algorithm=info.content_checksum, when_gone=when_gone)
                    if self.distcp is not None and manifest.external_count() else None)
        self._in_flight = token
        self._write_pending(info, position, reapply=reapply)
        # The whole chunk index (61 bytes a chunk, loaded by the intake and the commit's check) is not
        # kept through the apply: the apply locates just the chunks it writes (Repository.reader_for), and
        # the next shipment loads the index again. At 1,000,000 chunks, 60 MiB less at the standby's peak.
        self.repo.reload_index()
        try:
            result = apply_manifest(
                manifest, self.repo, self.data_root, what=what, journal=self.store.journal,
                on_committed=lambda: self._record_applied(info.id, info.captured_at, position),
                protect=(self.repo.storage.url, self.store.dir), external=external,
                checksum=base is None, base=base,
                max_remove_fraction=self.max_delete_fraction if root_guard else None, keep_uncarried=True,
                root_held=True)  # the agent flocks its data root for its lifetime (drsync.agent.locks)
        except BaseException as e:
            self._in_flight = None
            if not reapply and not isinstance(e, ApplyBusy):  # refused: another host's apply; nothing changed
                self._after_failed_apply()
            if isinstance(e, OSError):
                raise describe_os_error(e, f"applying snapshot {info.id} on the standby") from None
            raise
        self._in_flight = None
        # The history snapshot before the pending record goes: a crash in between leaves the record, and
        # recover() takes the history snapshot then.
        faults.pause("keep-history")  # tests: committed and recorded, its history snapshot not yet taken
        self._keep_history(info.id)
        os.unlink(self._pending)
        return result

    def _write_pending(self, info: SnapshotInfo, position: list[int], *, reapply: bool = False) -> None:
        """What recover() finishes after a crash: the snapshot being applied (its record and history snapshot);
        ``reapply``: the root is not vouched for, the snapshot is applied again whole (:meth:`_reapply`)."""
        doc: dict[str, Any] = {"snapshot": info.id, "captured_at": info.captured_at, "position": position}
        if reapply:
            doc["reapply"] = True
        fsutil.atomic_write(self._pending, json.dumps(doc).encode())

    def _check_history_root(self, info: SnapshotInfo) -> None:
        """engine "distcp": a root that cannot be snapshotted would run without the history restores
        and promotions rely on; refuse (RefusedError, logged) before anything changes."""
        if self.distcp is None:
            return
        root = open_data_root(self.data_root)
        snapshottable = getattr(root, "snapshottable", None)
        if snapshottable is not None and not snapshottable():
            message = (f"snapshot {info.id} not applied: standby data root {self.data_root} cannot be snapshotted, "
                       f"and replication.engine = \"distcp\" keeps each applied snapshot as an HDFS snapshot of "
                       f"it; run 'hdfs dfsadmin -allowSnapshot {getattr(root, 'root', self.data_root)}' as the HDFS "
                       f"superuser")
            log.warning("%s", message)
            raise RefusedError(message)

    def _keep_history(self, snapshot_id: str) -> None:
        """engine "distcp": keep the applied root as HDFS snapshot ``drsync-snap-<id>`` (cheap, and
        what restore and a promotion to an earlier snapshot copy from). Idempotent: one already taken
        stays as it is. A failure is a warning."""
        if self.distcp is None:
            return
        try:
            open_data_root(self.data_root).keep_history(snapshot_id)  # type: ignore[attr-defined]
        except (DrsyncError, AttributeError) as e:
            log.warning("snapshot %s applied, but not kept as an HDFS snapshot of %s: %s", snapshot_id,
                        self.data_root, e)

    def _restart_window(self, snapshot_id: str) -> None:
        """An operator accepted what ``snapshot_id`` holds: the mass-change window counts from it."""
        self.store.update(change_checkpoints=((snapshot_id, time.time()),) if self.mass_change_window_s > 0 else ())

    def _live_checkpoints(self, checkpoints: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        """The mass-change window's checkpoints whose snapshot this repository still holds. One expired while
        this agent was primary (its retention does not keep them) is dropped: the window then counts from
        the snapshots applied since, never "judged without" a baseline for a whole window."""
        if not checkpoints:
            return checkpoints
        try:
            held = self.repo.snapshot_stored_times()  # one listing of the snapshots' names; no document read
        except (DrsyncError, OSError):
            return checkpoints
        return tuple(c for c in checkpoints if c[0] in held)

    def _record_applied(self, snapshot_id: str, captured_at: float, position: list[int]) -> None:
        # One record: the applied snapshot, its capture time and position change together.
        now = time.time()
        live = self._live_checkpoints(self.store.current.change_checkpoints)
        self.store.transform(lambda st: dataclasses.replace(
            st, applied_snapshot=snapshot_id, applied_captured_at=captured_at, applied_position=tuple(position),
            applied_at=now, change_checkpoints=next_checkpoints(
                tuple(c for c in st.change_checkpoints if c in live), snapshot_id, now, self.mass_change_window_s)))
        self.on_applied()


def _lean(manifest: Manifest | ManifestFile) -> Manifest:
    """``manifest`` decoded (lean, :meth:`Manifest.lean`) unless it is already."""
    return manifest if isinstance(manifest, Manifest) else Manifest.lean(manifest)
