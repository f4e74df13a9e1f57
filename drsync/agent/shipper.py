"""The primary's replication: capture a snapshot every interval, and one shipper per standby.

Each :class:`Shipper` owns one standby target: its own thread, its own position (the
snapshot the standby last applied, as it said or as this shipper brought it) and its own
backoff, so a slow or unreachable standby never holds up another, and a capture is never
held up by any of them. A shipper always ships the newest snapshot it was offered:
snapshots captured while a shipment was in flight are skipped, not queued.
:meth:`Replication.run_cycle` is the synchronous form (``drsync agent --once``, the
switchover's final shipments): capture once, ship to the given targets, wait.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from drsync import engine
from drsync.agent.early import EarlyUpload, fan_out
from drsync.agent.primary import ShippingPaused, ShipResult, Upload, ship_snapshot, wants_deltas, wants_patches
from drsync.agent.throttle import TargetBandwidth, local_now
from drsync.bandwidth import Schedule
from drsync.config import Config
from drsync.errors import ChunkDamaged, ChunksLost, DeltaRejected, DrsyncError, FencedError, RefusedError
from drsync.metrics import AgentMetrics
from drsync.repository.lock import DEFAULT_WAIT_S
from drsync.repository.manifest import Manifest
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.transport import StandbyLink
from drsync.units import human_size

log = logging.getLogger("drsync.agent")

# Backoff after a failed shipment: doubles from the first value up to the cap (seconds).
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


@dataclass
class CycleDecision:
    """What one pass of the primary did, in words an operator can read in a log."""

    action: str
    snapshot: str = ""
    shipped: dict[str, str] = field(default_factory=dict)  # standby -> outcome, in words
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # standby -> figures
    ok: bool = True
    duration_s: float = 0.0
    paused: list[str] = field(default_factory=list)  # targets whose bandwidth schedule is off now

    def __str__(self) -> str:
        parts = [self.action] + ([f"snapshot {self.snapshot}"] if self.snapshot else [])
        parts += [f"{t}: {o}" for t, o in self.shipped.items()]
        return "; ".join(parts)


@dataclass(frozen=True)
class ShipOutcome:
    """One shipment to one standby."""

    target: str
    snapshot: str
    ok: bool
    summary: str  # in words: "applied (3/10 chunks sent, ...)", "refused: ...", "failed: ..."
    figures: dict[str, float] = field(default_factory=dict)
    fenced: bool = False
    paused: bool = False  # replication.bandwidth_schedule is off for this target: not a failure


@dataclass(frozen=True)
class Position:
    """What a standby has applied, as far as this primary knows (capture time on this primary's clock)."""

    snapshot: str = ""
    captured_at: float = 0.0


def with_first_try(res: ShipResult, first: object) -> ShipResult:
    """``res`` (a shipment's whole-chunk retry) with what its first try's upload sent before the standby
    rejected a delta (an :class:`Upload`, or None when unknown) added: both crossed the link. Pure."""
    if not isinstance(first, Upload):
        return res
    return dataclasses.replace(res, missing_chunks=res.missing_chunks + first.chunks,
                               shipped_bytes=res.shipped_bytes + first.stored_bytes,
                               delta_chunks=res.delta_chunks + first.deltas,
                               deduplicated_bytes=max(0, res.deduplicated_bytes - first.raw_bytes))


class Shipper:
    """One standby target with its own thread, position and backoff."""

    def __init__(self, target: str, *, repo: Repository, link: Callable[[str], StandbyLink], sender: str,
                 epoch: Callable[[], int], guard: Callable[[bool], None], bandwidth_bps: float,
                 metrics: AgentMetrics, on_outcome: Callable[[ShipOutcome], None],
                 bandwidth: TargetBandwidth | None = None,
                 relay_guard: Callable[[bool], None] | None = None) -> None:
        self.target = target
        self.repo = repo
        self._link = link
        self.sender = sender
        self._epoch = epoch
        self._guard = guard
        self._relay_guard = relay_guard or guard  # asked instead while relaying (a snapshot with an origin)
        self.bandwidth_bps = bandwidth_bps
        # The rate in force now, read per upload message (bandwidth_bps at every time of day when not given).
        self.bandwidth = bandwidth or TargetBandwidth.fixed(target, bandwidth_bps)
        self.metrics = metrics
        self.on_outcome = on_outcome
        self.position = Position()
        # The newest snapshot the standby stored from this primary (applied, or waiting for its
        # replication.apply_delay) and that delay, from its Hello and commit replies.
        self.received = ""
        self.apply_delay_s = 0.0
        self.offered: SnapshotInfo | None = None  # the newest snapshot this standby should get
        # Where the offered snapshot was produced, (epoch, seq in the producing primary's repository), when
        # this agent relays it (a cascade); None: this agent is its primary (its epoch, its own seq).
        self.offered_origin: tuple[int, int] | None = None
        self.in_flight = ""
        self.in_flight_info: SnapshotInfo | None = None
        self.held = ""  # the snapshot this standby's deletion guard holds (from its Hello)
        self.superseded = ""  # an offered snapshot the standby already holds a newer one than
        self.backoff_s = BACKOFF_FIRST_S
        self.retry_at = 0.0  # monotonic
        self.whole_chunks = False  # this standby rejected a delta: whole chunks only, for the rest of this process
        self.whole_manifests = False  # this standby refused a manifest patch: manifests whole, for this process
        # (snapshot id, what its capture's early upload sent here): added to that snapshot's shipment figures.
        self.early_sent: tuple[str, Upload] | None = None
        self.ship_lock = threading.Lock()  # one shipment at a time to this target
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- the background loop ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"drsync-ship-{self.target}", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 0.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if wait_s and self._thread is not None:
            self._thread.join(wait_s)

    def offer(self, info: SnapshotInfo, origin: tuple[int, int] | None = None) -> None:
        """Bring this standby to ``info`` (or to a newer snapshot offered before it gets there); ``origin``
        is (epoch, seq) of the primary that produced it when this agent relays it."""
        with self._cv:
            self.offered, self.offered_origin = info, origin
            self._cv.notify_all()

    def _due(self) -> SnapshotInfo | None:
        info = self.offered
        if info is None or info.id in (self.position.snapshot, self.received, self.superseded) or \
                time.monotonic() < self.retry_at:
            return None
        if self.bandwidth.paused():  # no shipment starts while the schedule is off
            return None
        return info

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and self._due() is None:
                    wait = self.retry_at - time.monotonic() if self.offered is not None else None
                    if self.offered is not None and (wait is None or wait <= 0):
                        wait = self.bandwidth.resume_in_s()  # off: look again when the schedule changes
                    self._cv.wait(None if wait is None or wait <= 0 else wait)
                if self._stop:
                    return
                info, origin = self._due(), self.offered_origin
            if info is not None:
                try:
                    self.ship(info, origin)
                except Exception:  # a bug must not end this target's replication silently
                    log.exception("shipper for %s: unexpected error", self.target)
                    self._failed()

    def _failed(self) -> None:
        self.retry_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)

    # --- one shipment -----------------------------------------------------------------------

    def ship(self, info: SnapshotInfo, origin: tuple[int, int] | None = None) -> ShipOutcome:
        """Ship ``info`` now (on the caller's thread), record the outcome and the position. ``origin``:
        see :meth:`offer`."""
        with self.ship_lock:
            self.in_flight, self.in_flight_info = info.id, info
            try:
                outcome = self._ship(info, origin)
            finally:
                self.in_flight, self.in_flight_info = "", None
        if outcome.ok:
            self.backoff_s, self.retry_at = BACKOFF_FIRST_S, 0.0
        elif not outcome.paused:  # a pause is the schedule's, not a failure: no backoff, not counted
            self._failed()
            self.metrics.ship_failures.inc()
        if outcome.ok or outcome.paused:
            # Nothing sent and nothing written (an unchanged capture, every poll in continuous mode): DEBUG.
            idle = outcome.figures.get("missing_chunks") == 0 and outcome.figures.get("changed") == 0
            log.log(logging.DEBUG if idle else logging.INFO, "snapshot %s to %s: %s", info.id, self.target,
                    outcome.summary)
        else:  # what went wrong first, then which shipment; retried after the backoff
            log.warning("%s (snapshot %s to %s; next try in %.0fs)", outcome.summary, info.id, self.target,
                        self.backoff_s)
        self.on_outcome(outcome)
        return outcome

    def _ship(self, info: SnapshotInfo, origin: tuple[int, int] | None) -> ShipOutcome:
        if self.bandwidth.paused():
            return ShipOutcome(self.target, info.id, False, f"not shipped: {self.bandwidth.pause_words()}",
                               paused=True)
        link = self._link(self.target)
        try:
            # A relay ships at the epoch that produced the snapshot: a cascaded standby refuses it once
            # ZooKeeper's epoch has moved past it (the producer was fenced).
            epoch, seq = origin if origin is not None else (self._epoch(), info.seq)
            hello = link.hello(self.sender, epoch)
            own = self.repo.config
            if hello.cluster_id and (hello.cluster_id, hello.release) != (own.cluster_id, own.release):
                # Checked before negotiating: nothing is shipped to (or stored by) a standby of another cluster.
                raise RefusedError(f"standby {hello.agent or self.target} keeps cluster {hello.cluster_id!r} release "
                                   f"{hello.release!r}, but this primary's snapshots are cluster {own.cluster_id!r} "
                                   f"release {own.release!r}; nothing was shipped: give that agent the cluster.id "
                                   f"and cluster.release of production (or its own group), or upgrade both "
                                   f"together")
            self.held = hello.held_snapshot  # its source stays on production until an operator decides
            # An unchanged capture (the tree the standby applied): its manifest is named, not sent again (a
            # manifest is about 73 bytes a file: 70 MiB a cycle at 1,000,000 files on a WAN link), and nothing
            # is asked about: the applied manifest is not even read.
            same_as = hello.applied_snapshot if hello.manifest_by_reference and self._same_manifest(
                hello.applied_snapshot, info) else ""
            applied = None
            self.apply_delay_s, self.received = hello.apply_delay_s, hello.received_snapshot
            if hello.applied_snapshot:
                self.position = Position(hello.applied_snapshot, hello.applied_captured_at)
                if seq and len(hello.applied_position) == 2 and tuple(hello.applied_position) > (epoch, seq) \
                        and info.captured_at <= hello.applied_captured_at:
                    # It holds a newer snapshot already (e.g. the primary shipped it directly while this relay
                    # was held up): shipping this one would take its root back.
                    self.superseded = info.id
                    return ShipOutcome(self.target, info.id, True, f"not shipped: {self.target} already applied "
                                       f"a newer snapshot {hello.applied_snapshot}")
                applied = None if same_as else self._manifest_if_known(hello.applied_snapshot)
            # A changed one over a far or limited link: a patch of the manifest the standby applied.
            patch_of = hello.applied_snapshot if applied is not None and wants_patches(
                hello, self.bandwidth.rate(), self.whole_manifests) else ""
            # A reader of this repository while it reads (not while the standby applies): GC never
            # removes a pack this shipment is reading.
            def ship(delta: bool, base: Manifest | None, ask_all: bool) -> ShipResult:
                return ship_snapshot(self.repo, info, link, epoch=epoch, sender=self.sender, sender_seq=seq,
                                     bandwidth_bps=self.bandwidth.rate, applied=base,
                                     guard=self._guard if origin is None else self._relay_guard,
                                     reading=lambda: self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S),
                                     delta=delta, manifest_of=same_as, ask_all=ask_all,
                                     patch_of=patch_of if base is not None else "")

            def attempt(base: Manifest | None, ask_all: bool = False) -> ShipResult:
                if base is None or not wants_deltas(hello, self.bandwidth.rate(), self.whole_chunks):
                    return ship(False, base, ask_all)
                try:
                    return ship(True, base, ask_all)
                except DeltaRejected as e:
                    # The standby could not use a delta (its copy of a base is damaged or unreadable): at once,
                    # and for the rest of this process, whole chunks; what it stored stays and is not sent again.
                    self.whole_chunks = True
                    log.warning("%s; sending whole chunks to %s from now on (snapshot %s)", e, self.target, info.id)
                    return with_first_try(ship(False, base, ask_all), e.sent)

            try:
                res = attempt(applied)
            except ChunksLost as e:
                # The standby lost chunks it held (a pack gone, an index file lost) and forgot them: ask it
                # about every chunk of the snapshot, not only those its applied one lacks, and send them.
                log.warning("%s; asking %s about every chunk of snapshot %s and sending what it lacks", e,
                            self.target, info.id)
                res = with_first_try(attempt(None, ask_all=True), e.sent)
            early_chunks = 0
            if self.early_sent is not None and self.early_sent[0] == info.id:  # sent while the capture ran
                early_chunks = self.early_sent[1].chunks
                res, self.early_sent = with_first_try(res, self.early_sent[1]), None
            if res.manifest_refused:
                # A damaged copy there (named), or a manifest rebuilt otherwise (patched): the bytes went.
                patched = res.manifest_tried == "patch"
                self.whole_manifests = self.whole_manifests or patched
                log.warning("%s; the manifest of snapshot %s was sent whole%s", res.manifest_refused, info.id,
                            f" (and is to {self.target} from now on)" if patched else "")
            done = res.applied
            self.received, self.apply_delay_s = info.id, done.apply_delay_s
            # Delayed (replication.apply_delay): stored and verified there, its root follows later.
            self.position = (Position(done.applied_snapshot, done.applied_captured_at) if done.deferred
                             else Position(info.id, info.captured_at))
            self.metrics.shipped_bytes.inc(res.shipped_bytes)
            self.metrics.deduplicated_bytes.inc(res.deduplicated_bytes)
            self.metrics.delta_chunks.inc(res.delta_chunks)
            self.metrics.manifest_bytes.inc(res.manifest_bytes)
            self.metrics.ship_duration.observe(res.duration_s)  # last: a shipment counted has all its figures in
            return ShipOutcome(self.target, info.id, True,
                               f"{'stored, applied later (apply_delay)' if done.deferred else 'applied'} "
                               f"({res.missing_chunks}/{res.chunks} chunks sent, {human_size(res.shipped_bytes)} in "
                               f"{res.duration_s:.2f}s)",
                               {"chunks": res.chunks, "missing_chunks": res.missing_chunks,
                                "delta_chunks": res.delta_chunks,
                                "manifest_bytes": res.manifest_bytes, "manifest_sent": res.manifest_sent,
                                "changed": done.written_files + done.removed,
                                "shipped_bytes": res.shipped_bytes, "duration_s": res.duration_s,
                                "early_chunks": early_chunks,
                                "deduplicated_bytes": res.deduplicated_bytes})
        except ShippingPaused as e:
            return ShipOutcome(self.target, info.id, False, f"{e} ({self.bandwidth.pause_words()})", paused=True)
        except RefusedError as e:
            if not isinstance(e, FencedError):
                # Perhaps held by its deletion guard: keep its source pinned (before the shipment stops
                # being in flight) until the standby's next Hello names what it holds.
                self.held = self.held or info.id
            said, by = str(e), f"standby {self.target} refused: "  # the transport says "standby X refused: why"
            summary = f"refused by standby {self.target}: {said[len(by):]}" if said.startswith(by) else \
                f"refused: {said}"
            return ShipOutcome(self.target, info.id, False, summary, fenced=isinstance(e, FencedError))
        except ChunkDamaged as e:  # read from this primary's own repository
            return ShipOutcome(self.target, info.id, False,
                               f"failed: this primary's repository is damaged: {e}; run 'drsync repo repair' on "
                               f"{self.repo.storage.url} (the next snapshot then reads the files again)")
        except DrsyncError as e:
            return ShipOutcome(self.target, info.id, False, f"failed: {e}")
        finally:
            link.close()

    def _same_manifest(self, snapshot_id: str, info: SnapshotInfo) -> bool:
        """Whether snapshot ``snapshot_id`` of this repository has ``info``'s manifest (by its hash)."""
        try:
            return bool(snapshot_id) and self.repo.find_snapshot(snapshot_id).manifest_hash == info.manifest_hash
        except DrsyncError:
            return False

    def _manifest_if_known(self, snapshot_id: str) -> Manifest | None:
        try:
            return self.repo.open_manifest(self.repo.find_snapshot(snapshot_id))
        except DrsyncError:
            return None  # gone from this repository (expired): negotiate everything


class Replication:
    """The primary's side: captures, and the shippers of the current standby targets."""

    def __init__(self, cfg: Config, repo: Repository, metrics: AgentMetrics, *, sender: str,
                 link: Callable[[str], StandbyLink], epoch: Callable[[], int], guard: Callable[[bool], None],
                 exclude_paths: tuple[str, ...], on_outcome: Callable[[ShipOutcome], None],
                 relay_guard: Callable[[bool], None] | None = None,
                 now: Callable[[], datetime] = local_now) -> None:
        self.cfg = cfg
        self.repo = repo
        self.metrics = metrics
        self.sender = sender
        self._link = link
        self._epoch = epoch
        self._guard = guard
        self._relay_guard = relay_guard
        self.exclude_paths = exclude_paths
        self.on_outcome = on_outcome
        self.shippers: dict[str, Shipper] = {}
        # Target address -> its standby's agent name (from ZooKeeper; empty with fixed roles): a target's
        # [replication.targets."..."] settings are looked up by name first, then by address.
        self.target_names: dict[str, str] = {}
        self.now = now  # the agent host's clock, for replication.bandwidth_schedule
        # The last position of each target that is no longer one (its standby vanished): the primary's lag
        # keeps counting from it (see AgentStatus.lag).
        self.last_positions: dict[str, Position] = {}
        self._lock = threading.Lock()
        self.background = False  # shippers run their own threads (the agent's loop); else only synchronous

    def _shipper(self, target: str) -> Shipper:
        with self._lock:
            s = self.shippers.get(target)
            if s is None:
                s = self.shippers[target] = Shipper(
                    target, repo=self.repo, link=self._link, sender=self.sender, epoch=self._epoch,
                    guard=self._guard, bandwidth_bps=self.cfg.replication.bandwidth_limit, metrics=self.metrics,
                    on_outcome=self.on_outcome, bandwidth=self._bandwidth(target), relay_guard=self._relay_guard)
                self.metrics.track_bandwidth(target, s.bandwidth.limit_gauge, s.bandwidth.paused_gauge)
                if self.background:
                    s.start()
            return s

    def set_targets(self, targets: list[str]) -> list[str]:
        """Keep one shipper per target; returns the targets that are new."""
        with self._lock:
            gone = [t for t in self.shippers if t not in targets]
            stopped = [self.shippers.pop(t) for t in gone]
            for s in stopped:
                if s.position.snapshot:
                    self.last_positions[s.target] = s.position
        for s in stopped:
            s.stop()
            self.metrics.forget_bandwidth(s.target)
        new = [t for t in targets if t not in self.shippers]
        for t in targets:
            self._shipper(t)
        return new

    def targets(self) -> list[str]:
        with self._lock:
            return list(self.shippers)

    def _bandwidth(self, target: str) -> TargetBandwidth:
        """The target's rate, looked up at every call (its agent name may become known later)."""
        def schedule() -> Schedule:
            return self.cfg.replication.bandwidth_for(self.target_names.get(target, ""), target)

        def label() -> str:
            name = self.target_names.get(target, "")
            return f"{name} ({target})" if name and name != target else target

        return TargetBandwidth(target, schedule, now=lambda: self.now(), label=label)

    def bandwidth_status(self) -> dict[str, dict[str, Any]]:
        """Per target: the rate in force and whether (and until when) its shipping is paused."""
        return {t: s.bandwidth.as_dict() for t, s in list(self.shippers.items())}

    def capture(self, targets: list[str] | None = None) -> SnapshotInfo:
        """One cycle snapshot of the data root (hooks, re-reads, exclusions from the config). Its new chunks go
        early to those of ``targets`` (default: the current ones) that take them (:meth:`_early_uploads`)."""
        snaps = self.cfg.snapshots
        req = engine.SnapshotRequest(self.cfg.cluster.data, kind="cycle", reason="replication cycle",
                                     hooks=engine.Hooks(snaps.pre_hook, snaps.post_hook, snaps.hook_timeout),
                                     reread_attempts=snaps.reread_attempts, exclude_paths=self.exclude_paths,
                                     distcp=engine.distcp_settings(self.cfg), pinned=self.pinned_hdfs_snapshots())
        early = self._early_uploads(self.targets() if targets is None else targets)
        try:  # from here on, whatever raises: each early upload ends and its shipper's lock is released
            req.on_chunk = fan_out(list(early.values()))
            info = engine.create_snapshot(self.repo, req)
        finally:
            sent = {t: u.finish() for t, u in early.items()}  # each shipper's lock released
        for t, up in sent.items():
            s = self.shippers.get(t)
            if up is not None and s is not None:
                s.early_sent = (info.id, up)
        # The chunk index the capture loaded to find chunks stored already (61 bytes a chunk) is let go: the
        # shipment's negotiation does not need it, and held beside it, it made the primary's first sync of
        # 1,000,000 files the largest peak of all. The upload reads where its chunks are from the index
        # files (Repository.located); the next capture loads the index again (about a second at 1,000,000).
        self.repo.reload_index()
        self.metrics.last_snapshot.set(info.captured_at)
        self.metrics.snapshot_stale_paths.set(info.stale_paths)
        self.metrics.snapshot_skipped_paths.set(info.skipped_paths)
        self.metrics.snapshot_duration.observe(info.duration_s)
        return info

    def _early_uploads(self, targets: list[str]) -> dict[str, EarlyUpload]:
        """An early upload for each of ``targets`` whose shipper is idle (its lock is taken here and held until
        the upload's ``finish``), not waiting out a backoff, and with no bandwidth limit or pause in force; the
        upload itself checks the standby's Hello (:class:`drsync.agent.early.EarlyUpload`). None with the
        HDFS-checksum engine (replication.engine = "distcp": a capture stores no chunks)."""
        out: dict[str, EarlyUpload] = {}
        if self.cfg.replication.engine == "distcp":
            return out
        own = (self.repo.config.cluster_id, self.repo.config.release)
        epoch = self._epoch()
        wanted = [s for s in (self._shipper(t) for t in targets)
                  if not (s.bandwidth.paused() or s.bandwidth.rate() or time.monotonic() < s.retry_at)]
        for s in wanted:  # nothing between taking a shipper's lock and handing it to its upload raises
            if s.ship_lock.acquire(blocking=False):  # else shipping an older snapshot now: this one goes after
                out[s.target] = EarlyUpload(s.target, lambda t=s.target: self._link(t), epoch=epoch,
                                            sender=self.sender, cluster=own, guard=self._guard,
                                            rate=s.bandwidth.rate, release=s.ship_lock.release)
        return out

    def offer(self, info: SnapshotInfo, origin: tuple[int, int] | None = None) -> None:
        for s in list(self.shippers.values()):
            s.offer(info, origin)

    def run_cycle(self, targets: list[str]) -> CycleDecision:
        """Capture, then ship to every target in parallel and wait (synchronous)."""
        started = time.monotonic()
        self._guard(False)
        shippers = [self._shipper(t) for t in targets]
        info = self.capture(targets)
        decision = CycleDecision("shipped" if targets else "snapshot only (no standby registered)", info.id)
        for s in shippers:
            s.offer(info)
        if shippers:
            with ThreadPoolExecutor(max_workers=min(8, len(shippers)), thread_name_prefix="drsync-cycle") as pool:
                outcomes = list(pool.map(lambda s: s.ship(info), shippers))
            for o in outcomes:
                decision.shipped[o.target] = o.summary
                if o.figures:
                    decision.results[o.target] = dict(o.figures)
                # A target paused by its bandwidth schedule was not failed: the cycle is ok without it.
                decision.ok = decision.ok and (o.ok or o.paused)
                if o.paused:
                    decision.paused.append(o.target)
        decision.duration_s = round(time.monotonic() - started, 3)
        return decision

    def positions(self) -> dict[str, Position]:
        return {t: s.position for t, s in list(self.shippers.items())}

    def applied_captured_at(self) -> float | None:
        """The capture time applied on the target furthest behind, counting each target's apply_delay as
        expected (None until every target has applied something)."""
        worst = self._furthest_behind()
        return worst.position.captured_at or None if worst is not None else None

    def apply_delay_s(self) -> float:
        """The apply_delay of the target :meth:`applied_captured_at` speaks of (0 when none)."""
        worst = self._furthest_behind()
        return worst.apply_delay_s if worst is not None else 0.0

    def _furthest_behind(self) -> Shipper | None:
        shippers = list(self.shippers.values())
        if not shippers or any(not s.position.snapshot for s in shippers):
            return None
        return min(shippers, key=lambda s: s.position.captured_at + s.apply_delay_s)

    def pinned_hdfs_snapshots(self) -> frozenset[str]:
        """The kept HDFS snapshots (engine "distcp") a standby may still copy from: those of the
        snapshots offered, in flight, or held by a standby's deletion guard. A capture deletes its
        process's other ones."""
        out = set()
        for s in list(self.shippers.values()):
            infos = [s.offered, s.in_flight_info]
            if s.held:  # held by a standby's deletion guard: `drsync apply --confirm` copies from it later
                try:
                    infos.append(self.repo.find_snapshot(s.held))
                except DrsyncError:
                    pass
            for info in infos:
                if info is not None and info.content_snapshot:
                    out.add(info.content_snapshot.rstrip("/").rsplit("/", 1)[-1])
        return frozenset(out)

    def protected(self) -> set[str]:
        """Snapshots retention must keep: what each standby applied, and what is offered or in flight."""
        out: set[str] = set()
        for s in list(self.shippers.values()):
            out |= {s.position.snapshot, s.received, s.in_flight, s.offered.id if s.offered is not None else "",
                    s.held}
        return out - {""}

    def close(self) -> None:
        with self._lock:
            shippers, self.shippers = list(self.shippers.values()), {}
        for s in shippers:
            s.stop()
