"""Maintenance beside replication: retention, garbage collection, backups and drills, on one thread.

One :class:`MaintenanceWorker` per agent, for both roles. Nothing here runs inside a
replication cycle or a shipment's commit, and nothing here takes a lock a promotion
waits for: a full backup that takes hours delays no capture, no shipment and no
promotion. Work is chosen per pass from the agent's role *now*:

* retention of cycle snapshots ([snapshots] keep) in both roles, keeping what the
  agent names as protected (the applied snapshot; on a primary what each standby
  applied and what is in flight); never while a standby holds applies back (the good
  snapshots must outlive the hold); never a snapshot stored less than ``[snapshots] protect``
  ago (drsync.protection); it gives up at once when the repository is in use;
* garbage collection with retention, at most every :data:`GC_EVERY_S` (remembered in the agent's state,
  so a restart or each `drsync agent --once` does not collect again);
* on a primary, a backup every ``backups.interval`` (then pruning to ``backups.keep``);
* on a standby with something applied, a drill every ``drills.interval``.

The agent wakes the worker after each capture and apply (:meth:`MaintenanceWorker.wake`);
it also looks every :data:`PASS_EVERY_S`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drsync import backup, engine
from drsync.agent.drill import drills_dir, load_reports, run_drill
from drsync.agent.state import StateStore
from drsync.config import Config
from drsync.coordination import Coordinator
from drsync.dataroot import open_data_root
from drsync.errors import DrsyncError, LockedError
from drsync.metrics import AgentMetrics
from drsync.protection import BreakGlassCount, read_break_glass
from drsync.repository.repo import Repository

log = logging.getLogger("drsync.agent")

# Garbage collection reads every kept manifest; once an hour is plenty.
GC_EVERY_S = 3600.0
PASS_EVERY_S = 30.0
# After a pass whose retention found the repository in use (a shipment, a reader): look again soon.
RETRY_EVERY_S = 5.0
BACKUP_RETRY_S = 600.0


@dataclass(frozen=True)
class Duties:
    """What the agent asks of one maintenance pass (read from the agent at the start of each pass)."""

    role: str  # "primary" or "standby" (what the agent acts as now)
    protect: frozenset[str]  # snapshots retention must keep
    held: bool = False  # a standby holds applies back: no retention
    has_applied: bool = False  # a standby has applied something: drills can run


class MaintenanceWorker:
    def __init__(self, cfg: Config, repo: Repository, metrics: AgentMetrics, *, store: StateStore,
                 duties: Callable[[], Duties], open_coord: Callable[[], Coordinator] | None) -> None:
        self.cfg = cfg
        self.name = cfg.agent.name
        self.repo = repo
        self.metrics = metrics
        self.store = store
        self.state_dir = store.dir
        self.duties = duties
        self.open_coord = open_coord
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_backup = 0.0  # Unix time of the newest good backup
        self._born = time.time()
        self._drills_mtime = -1
        self._locked_out = False  # the last retention found the repository in use
        self._gc_owed = False  # an expiry's collection was postponed: collect at the next pass even if not due
        self._retention_error = ""  # the last retention failure logged at WARNING
        self._damaged_backups_warned: set[tuple[str, str]] = set()  # (file, reason) said at WARNING
        self.busy = ""  # what the worker is doing now, for the status page ("" = idle)
        self._init_backup_metric()
        self.refresh_drill_metrics()
        # [snapshots] protect: break-glass deletions are recorded in the state directory (one-shot commands
        # too); the counter reads the record, and each pass logs the ones it has not logged yet.
        self._break_glass = BreakGlassCount(self.state_dir)
        metrics.track_break_glass(self._break_glass)
        self._break_glass_seen = self._break_glass()
        self._protected_seen = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drsync-maintenance", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, wait_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(wait_s)  # a backup or drill in progress is not waited for to the end

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RETRY_EVERY_S if self._locked_out else PASS_EVERY_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_pass()
            except Exception:  # a bug must not end maintenance silently
                log.exception("agent %s: maintenance pass failed", self.name)

    def run_pass(self) -> None:
        """One pass: whatever is due for the role the agent has now."""
        self._log_break_glass()
        d = self.duties()
        self.retention(d)
        if d.role == "primary":
            self.backup_if_due()
        elif d.has_applied and self._drill_due():
            self._drill(d)
        self.refresh_drill_metrics()

    # --- retention and GC ----------------------------------------------------------------

    def _retention_failed(self, e: DrsyncError) -> None:
        """WARNING the first time (and when the reason changes), DEBUG while the same reason repeats."""
        self._locked_out = False  # not a lock: the normal pace, not the lock retry's
        level = logging.DEBUG if str(e) == self._retention_error else logging.WARNING
        self._retention_error = str(e)
        log.log(level, "agent %s: retention failed (tried again at the next pass): %s", self.name, e)

    def retention(self, d: Duties) -> None:
        if d.held:
            log.debug("retention skipped: applies are held")  # the good snapshots stay until it is lifted
            return
        last = self.store.current.last_gc_at  # 0: never collected, collect at the first expiry
        since = time.time() - last
        collect = not 0 <= since < GC_EVERY_S  # a clock set back does not put collection off
        self.busy = "retention"
        try:
            res = engine.expire_snapshots(self.repo, self.cfg.snapshots.keep, collect=collect, protect=d.protect,
                                          lock_wait_s=0, protect_window_s=self.cfg.snapshots.protect)
        except LockedError as e:  # routine: the agent's own capture or shipment holds the lock; retried soon
            self._locked_out = True
            log.info("agent %s: retention skipped this time: %s", self.name, e)
            return
        except DrsyncError as e:  # a refusal (a damaged protect.json, a lost index): the operator must act
            self._retention_failed(e)
            return
        finally:
            self.busy = ""
        collected = res.gc is not None
        if res.gc_postponed:
            self._gc_owed = True
            log.info("agent %s: expired %d snapshot(s); garbage collection postponed: %s", self.name,
                     len(res.deleted), res.gc_postponed)
        if collect and (last or self._gc_owed) and not collected and not res.deleted:
            # Due, with nothing expiring now: what passes since the last collection expired (and uploads
            # never committed) is collected all the same, also when no snapshot expires again (captures stopped);
            # so is what an earlier pass expired when its collection was postponed (_gc_owed), also the first.
            try:
                engine.gc_repository(self.repo, lock_wait_s=0)
                collected = True
            except LockedError as e:
                log.info("agent %s: garbage collection postponed: %s", self.name, e)
            except DrsyncError as e:
                self._retention_failed(e)
                return
        self._retention_error = ""
        self._locked_out = collect and not collected
        if collected:
            self._gc_owed = False
            self.store.update(last_gc_at=time.time())
        if res.deleted:
            # Replication cycles' own snapshots expiring is routine (every cycle, in continuous mode): DEBUG.
            routine = all(s.kind == "cycle" for s in res.deleted)
            log.log(logging.DEBUG if routine else logging.INFO, "agent %s: expired %d snapshot(s)", self.name,
                    len(res.deleted))
        self.metrics.retention_protected.set(len(res.protected))
        if len(res.protected) != self._protected_seen:
            self._protected_seen = len(res.protected)
            if res.protected:
                log.info("agent %s: retention keeps %d snapshot(s) due for deletion: [snapshots] protect covers "
                         "them (oldest %s)", self.name, len(res.protected), res.protected[0].id)
        if self.cfg.replication.engine == "distcp":  # also on a promoted standby: its old history goes too
            self._drop_history()

    def _log_break_glass(self) -> None:
        """Say in the agent's log what operators deleted with --break-glass since the last pass."""
        if self._break_glass() == self._break_glass_seen:
            return
        entries = read_break_glass(self.state_dir)
        for e in entries[self._break_glass_seen:]:
            log.warning("agent %s: protected snapshot %s was deleted with --break-glass by %s on %s (%s)", self.name,
                        e.get("snapshot"), e.get("user"), e.get("host"), e.get("how"))
        self._break_glass_seen = len(entries)

    def _drop_history(self) -> None:
        """engine "distcp": HDFS history snapshots go with the drsync snapshots they stand for, in either
        role (on a promoted standby they would pin every overwritten block of production)."""
        try:
            root = open_data_root(self.cfg.cluster.data)
            gone = root.drop_history({s.id for s in self.repo.list_snapshots()})  # type: ignore[attr-defined]
        except (DrsyncError, AttributeError) as e:
            log.warning("agent %s: could not delete expired HDFS history snapshots of %s: %s", self.name,
                        self.cfg.cluster.data, e)
            return
        if gone:
            log.info("agent %s: deleted %d expired HDFS history snapshot(s) of %s", self.name, len(gone),
                     self.cfg.cluster.data)

    # --- backups (primary) -------------------------------------------------------------------

    def _init_backup_metric(self) -> None:
        dest = self.cfg.backups.destination
        if not dest or not os.path.isdir(dest):
            return
        try:
            listing = backup.list_backups(dest)
        except (DrsyncError, OSError):
            return
        self._warn_damaged_backups(listing.damaged)
        if listing.backups:  # one dated in the future is among the damaged: it does not delay the next
            self._last_backup = listing.backups[-1].created_at
            self.metrics.backup_last_success.set(self._last_backup)

    def _warn_damaged_backups(self, damaged: list[dict[str, str]]) -> None:
        """A backup whose backup.json cannot be read is kept and left alone; said at WARNING once per
        backup and reason (not at every pass)."""
        for d in damaged:
            key = (d["file"], d["reason"])
            if key not in self._damaged_backups_warned:
                self._damaged_backups_warned.add(key)
                log.warning("agent %s: backup %s is damaged and kept as it is (prune never removes it): %s; "
                            "check it with 'drsync backup verify', then remove or repair it", self.name,
                            d["file"].rsplit("/", 1)[0], d["reason"])

    def backup_if_due(self) -> None:
        """[backups]: pull the newest snapshot out as a portable backup every interval, then prune."""
        b = self.cfg.backups
        if not b.destination or time.time() - self._last_backup < b.interval:
            return
        snaps = self.repo.list_snapshots()
        if not snaps:
            return
        self.busy = f"backup of snapshot {snaps[-1].id}"
        try:
            os.makedirs(b.destination, exist_ok=True)
            info = backup.create_backup(self.repo, snaps[-1].id, b.destination, mode=b.mode,
                                        light_exclude=b.light_exclude)
            pruned = backup.prune_backups(b.destination, b.keep)
        except (DrsyncError, OSError) as e:
            self._last_backup = time.time() - b.interval + min(b.interval, BACKUP_RETRY_S)
            log.error("agent %s: backup of snapshot %s failed: %s", self.name, snaps[-1].id, e)
            return
        finally:
            self.busy = ""
        self._warn_damaged_backups(pruned.damaged)
        for f in pruned.failed:
            log.warning("agent %s: backup %s in %s could not be removed by the prune: %s", self.name, f["backup"],
                        b.destination, f["reason"])
        self._last_backup = info.created_at
        self.metrics.backup_last_success.set(info.created_at)
        log.info("agent %s: backup %s (%s) of snapshot %s written to %s", self.name, info.id, b.mode, snaps[-1].id,
                 b.destination)

    # --- drills (standby) ----------------------------------------------------------------------

    def refresh_drill_metrics(self) -> None:
        """Drill gauges from the newest report (a drill run from the command line counts too)."""
        try:
            mtime = os.stat(drills_dir(self.state_dir)).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._drills_mtime:
            return
        self._drills_mtime = mtime
        reports = load_reports(self.state_dir)
        if not reports:
            return
        last = reports[-1]
        m = self.metrics
        m.drill_last_result.set(1 if last.get("passed") else 0)
        passed = [r for r in reports if r.get("passed")]
        if passed:
            m.drill_last_success.set(float(passed[-1].get("finished_at") or 0.0))
        m.drill_rto.set(float("nan") if last.get("rto_s") is None else float(last["rto_s"]))
        m.drill_rpo.set(float("nan") if last.get("rpo_s") is None else float(last["rpo_s"]))

    def _drill_due(self) -> bool:
        interval = self.cfg.drills.interval
        if interval <= 0:
            return False
        # The first drill comes one interval after the agent started, not at once: a restart or a
        # fresh standby must not start a full trial restore by surprise.
        last = load_reports(self.state_dir, 1)
        since = float(last[-1].get("started_at", 0.0)) if last else self._born
        return time.time() - since >= interval

    def _drill(self, d: Duties) -> None:
        self.busy = "drill"
        try:
            report = run_drill(self.cfg, state_dir=self.state_dir, open_coord=self.open_coord,
                               is_primary=d.role == "primary")
        except DrsyncError as e:
            log.warning("agent %s: drill could not run: %s", self.name, e)
            return
        finally:
            self.busy = ""
        if report.passed:
            log.info("agent %s: drill %d passed on snapshot %s (RPO %s s, RTO %s s)", self.name, report.number,
                     report.snapshot, report.rpo_s, report.rto_s)
        else:
            log.error("agent %s: drill %d FAILED on snapshot %s: %s", self.name, report.number, report.snapshot,
                      "; ".join(f"{s.name}: {s.detail}" for s in report.steps if not s.passed))
