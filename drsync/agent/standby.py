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
from typing import Any

import blake3

from drsync import fsutil
from drsync.agent import clock
from drsync.apply import ApplyResult, apply_manifest, recover_apply
from drsync.config import KeepPolicy
from drsync.engine import expire_snapshots
from drsync.errors import DrsyncError, IntegrityError, OperationFailed, RefusedError
from drsync.fsutil import describe_os_error
from drsync.guard import deletion_guard
from drsync.repository import chunks
from drsync.repository.manifest import Manifest, diff
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo, iso
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
    # An ex-primary whose demote_command succeeded after it lost its claim: it may rejoin as standby.
    demoted: bool = False
    # This agent's identity in its group, made at its first start: two configs with one agent.name
    # are two agents, and the second one is refused.
    agent_id: str = ""
    # While nothing is applied: a snapshot of what the root held when this agent (re)joined as a standby
    # (its before-rejoin snapshot); the deletion guard judges the first shipment against it.
    guard_baseline: str = ""


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


@dataclass
class ApplyHold:
    """What keeps a standby from applying shipments (state_dir/apply-hold.json; survives restarts).

    Two holds, independent of each other:

    * the deletion guard's: ``snapshot`` was shipped, stored, and not applied because it would remove
      too many of the applied snapshot's files (:func:`drsync.guard.deletion_guard`). The hold stays on
      that first snapshot while later shipments are stored and refused too, so that the snapshot an
      operator inspected is the one ``drsync apply --confirm`` applies; ``latest`` names the newest of
      them. It is lifted by that confirmation, or by a later shipment that passes the guard against the
      applied snapshot (production came back: nothing of concern is applied).
    * the operator's (``drsync apply --hold``, lifted by ``--resume``): every shipment is stored and
      refused, none applied.
    """

    snapshot: str = ""  # the held snapshot ("" when the deletion guard holds nothing)
    captured_at: float = 0.0
    applied: str = ""  # the applied snapshot it was judged against
    held_at: float = 0.0
    files: int = 0  # files (non-directory entries) of the applied snapshot
    removed: int = 0  # of those, how many the held snapshot would remove
    message: str = ""  # the refusal, as the primary was told
    latest: str = ""  # the newest shipment stored and refused while held
    refused: int = 0  # shipments refused since the hold began
    operator_since: float = 0.0  # drsync apply --hold in force since (0: not)
    position: list[int] = field(default_factory=list)  # the held snapshot's [sender epoch, sender seq]
    latest_position: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.snapshot or self.operator_since)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"held": self.active, "operator_hold": bool(self.operator_since)}


class HoldFile:
    """The durable :class:`ApplyHold` of a state directory; no file while nothing is held."""

    NAME = "apply-hold.json"

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.path = os.path.join(state_dir, self.NAME)

    def load(self) -> ApplyHold:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return ApplyHold()
        known = set(ApplyHold.__dataclass_fields__)
        return ApplyHold(**{k: v for k, v in doc.items() if k in known})

    def save(self, hold: ApplyHold) -> None:
        if hold.active:
            fsutil.atomic_write(self.path, json.dumps(asdict(hold)).encode(), durable=True)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsutil.fsync_dir(self.dir)


class StandbyReceiver:
    def __init__(self, repo: Repository, data_root: str, state: StateFile, *, agent: str,
                 keep: KeepPolicy | None = None, max_delete_fraction: float = 0.5) -> None:
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
        # The deletion guard (safety rule 8) and the operator's hold; changed under commit_lock only.
        self.max_delete_fraction = max_delete_fraction
        self.hold_file = HoldFile(state.dir)
        self.hold = self.hold_file.load()

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
        offset = self.clock.add(caller.sent_at, caller.received_at, source=caller.sender, instance=caller.instance)
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
                # RefusedError while held: stored, not applied
                result = self._take(info, manifest, started, [caller.epoch, sender_seq])
            self._maintain()  # outside the shared lock: retention takes the exclusive one
            return info, result

    def _take(self, info: SnapshotInfo, manifest: Manifest, started: float, position: list[int]) -> ApplyResult:
        """Apply a stored snapshot unless a hold keeps it back (then RefusedError, logged as a warning).

        Under commit_lock and the repository's shared lock."""
        if self.hold.operator_since:
            raise RefusedError(self._refuse(info, (
                f"standby {self.agent} holds applies (drsync apply --hold since {iso(self.hold.operator_since)}): "
                f"snapshot {info.id} stored, not applied; run 'drsync apply --resume' on standby {self.agent} "
                f"to apply again")))
        applied = self._applied_manifest()
        if applied is not None and self._same(applied, manifest):
            # Nothing changed since the applied snapshot: the root already holds it.
            self._record_applied(info.id, info.captured_at, position)
            log.info("snapshot %s has the content of the applied one; nothing to apply", info.id)
            self._release_guard(f"snapshot {info.id} has the content of the applied snapshot again")
            return ApplyResult(unchanged_files=manifest.file_count())
        base = applied if applied is not None else self._baseline_manifest()
        hold = deletion_guard(base, manifest, self.max_delete_fraction) if base is not None else None
        if hold is not None:
            h = self.hold
            if not h.snapshot:  # the hold stays on the first held snapshot (the one an operator inspects)
                h.snapshot, h.captured_at, h.applied, h.held_at = (info.id, info.captured_at,
                                                                   self.state.applied_snapshot or
                                                                   self.state.guard_baseline, time.time())
                h.files, h.removed, h.position = hold.files, hold.removed, list(position)
            what = (f"snapshot {info.id} {hold.describe()}: held, not applied" if h.snapshot == info.id else
                    f"snapshot {info.id} {hold.describe()}: stored, not applied (snapshot {h.snapshot} is held "
                    f"since {iso(h.held_at)})")
            message = (f"{what}; on standby {self.agent} inspect it with 'drsync snapshot diff {h.applied} "
                       f"{h.snapshot}' and confirm with 'drsync apply --confirm {h.snapshot}' if this deletion "
                       f"is intended")
            if h.snapshot == info.id:
                h.message = message
            raise RefusedError(self._refuse(info, message, position))
        result = self._apply(info, manifest, position)
        log.info("applied snapshot %s (%d files written, %d removed) in %.2fs", info.id,
                 result.written_files, result.removed, time.monotonic() - started)
        self._release_guard(f"snapshot {info.id} was applied: it removes few enough of the files "
                            f"(replication.max_delete_fraction {self.max_delete_fraction:g})")
        return result

    def _refuse(self, info: SnapshotInfo, message: str, position: list[int] | None = None) -> str:
        self.hold.latest = info.id
        self.hold.latest_position = list(position or [])
        self.hold.refused += 1
        self.hold_file.save(self.hold)
        log.warning("%s", message)
        return message

    def release_on_promotion(self) -> None:
        """A promoted standby serves its applied snapshot: holds on what it stored are moot. Caller holds
        commit_lock. The held snapshots stay in the repository."""
        if self.hold.active:
            held = self.hold.snapshot or self.hold.latest
            self.hold.operator_since = 0.0
            self._release_guard(f"agent {self.agent} was promoted at its applied snapshot "
                                f"{self.state.applied_snapshot or '(none)'}; the held snapshot {held} stays in its "
                                f"repository")
            self.hold_file.save(self.hold)

    def _release_guard(self, why: str) -> None:
        if not self.hold.snapshot:
            return
        held = self.hold.snapshot
        self.hold.snapshot, self.hold.applied, self.hold.message = "", "", ""
        self.hold.captured_at = self.hold.held_at = 0.0
        self.hold.files = self.hold.removed = 0
        if not self.hold.operator_since:
            self.hold.latest, self.hold.refused = "", 0
        self.hold_file.save(self.hold)
        log.warning("deletion guard: the hold on snapshot %s is lifted: %s", held, why)

    def _baseline_manifest(self) -> Manifest | None:
        """What the root held when this agent (re)joined, while nothing is applied yet (an ex-primary's
        live production data): emptying it is held like any other mass deletion (safety rule 8)."""
        if self.state.applied_snapshot or not self.state.guard_baseline:
            return None
        try:
            return self.repo.load_manifest(self.repo.find_snapshot(self.state.guard_baseline))
        except DrsyncError:
            return None

    def _applied_manifest(self) -> Manifest | None:
        if not self.state.applied_snapshot:
            return None
        try:
            return self.repo.load_manifest(self.repo.find_snapshot(self.state.applied_snapshot))
        except DrsyncError as e:
            log.warning("deletion guard: cannot read the applied snapshot %s (%s); the shipment is judged "
                        "without it", self.state.applied_snapshot, e)
            return None

    # --- operator requests (drsync apply), each under commit_lock: never during a shipment's commit ------

    def confirm(self, ref: str) -> dict[str, Any]:
        """Apply the snapshot the deletion guard holds (``ref``: its id or a unique prefix of 6+ characters).

        RefusedError when ``ref`` is not the held snapshot, or nothing is held."""
        started = time.monotonic()
        with self.commit_lock:
            if self.broken:
                raise OperationFailed(f"standby {self.agent} needs recovery: {self.broken}")
            held = self.hold.snapshot
            if not held:
                extra = (" (applies are held by 'drsync apply --hold'; 'drsync apply --resume' lifts that)"
                         if self.hold.operator_since else "")
                raise RefusedError(f"no snapshot is held by the deletion guard on standby {self.agent}{extra}; "
                                   f"nothing was applied")
            if ref != held and not (len(ref) >= 6 and held.startswith(ref)):
                raise RefusedError(f"snapshot {ref} is not the one held on standby {self.agent}: {held} is "
                                   f"(it would remove {self.hold.removed:,} of {self.hold.files:,} files); nothing "
                                   f"was applied; see 'drsync apply' and confirm the held snapshot")
            info = self.repo.find_snapshot(held)
            manifest = self.repo.load_manifest(info)
            with self.repo.lock(exclusive=False, wait_s=30.0):
                result = self._apply(info, manifest, list(self.hold.position))
            log.warning("snapshot %s applied on an operator's confirmation (%d files written, %d removed) in %.2fs",
                        info.id, result.written_files, result.removed, time.monotonic() - started)
            self._release_guard("an operator confirmed it (drsync apply --confirm) and it was applied")
            self._maintain()
            return {"applied": info.id, "written_files": result.written_files, "removed": result.removed,
                    "message": f"snapshot {info.id} applied on standby {self.agent}: {result.written_files} files "
                               f"written, {result.removed} removed"}

    def hold_applies(self) -> dict[str, Any]:
        """The operator's hold: store shipments, apply none until :meth:`resume`."""
        with self.commit_lock:
            if not self.hold.operator_since:
                self.hold.operator_since = time.time()
                self.hold_file.save(self.hold)
                log.warning("applies held by an operator (drsync apply --hold): shipments are stored, not applied, "
                            "until 'drsync apply --resume'")
            return {"message": f"standby {self.agent} holds applies since {iso(self.hold.operator_since)}: "
                               f"shipments are stored, not applied, until 'drsync apply --resume'"}

    def resume(self) -> dict[str, Any]:
        """Lift the operator's hold, and apply the newest snapshot stored meanwhile (the guard still judges it)."""
        with self.commit_lock:
            if not self.hold.operator_since:
                note = (f"; snapshot {self.hold.snapshot} stays held by the deletion guard "
                        f"('drsync apply --confirm {self.hold.snapshot}' applies it)" if self.hold.snapshot else "")
                return {"applied": None, "message": f"applies were not held by an operator on standby "
                                                    f"{self.agent}; nothing to resume{note}"}
            self.hold.operator_since = 0.0
            latest = self.hold.latest if not self.hold.snapshot else ""
            if not self.hold.snapshot:
                self.hold.latest, self.hold.refused = "", 0
            self.hold_file.save(self.hold)
            log.warning("applies resumed by an operator (drsync apply --resume)")
            message = f"standby {self.agent} applies shipments again"
            applied = None
            if latest and latest != self.state.applied_snapshot:
                try:
                    info = self.repo.find_snapshot(latest)
                    manifest = self.repo.load_manifest(info)
                    with self.repo.lock(exclusive=False, wait_s=30.0):
                        self._take(info, manifest, time.monotonic(), list(self.hold.latest_position))
                    applied = info.id
                    message += f"; snapshot {info.id}, stored while held, is applied"
                except RefusedError as e:
                    message += f"; {e}"
                except DrsyncError as e:
                    message += f"; the snapshot stored while held ({latest}) was not applied ({e}): the next " \
                               f"shipment brings a newer one"
            else:
                message += "; the next shipment is applied"
            return {"applied": applied, "message": message}

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
        commit; the applied snapshot is always kept. GC runs at most hourly. Nothing is expired while
        applies are held (deletion guard or operator): the good snapshots must outlive the hold."""
        if self.keep is None:
            return
        if self.hold.active:
            log.debug("retention skipped: applies are held")  # the good snapshots stay until it is lifted
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

    @staticmethod
    def _same(applied: Manifest, manifest: Manifest) -> bool:
        return not diff(applied, manifest).paths()

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
