"""The agent: one process beside one cluster.

With ``agent.role = auto`` ZooKeeper decides the role: every pass of the loop
first calls :meth:`Agent.coordinate`, which reads the group, decides with
:func:`drsync.agent.roles.decide_role` and carries the decision out (take the
primary node, pause, step down, promote itself under automatic failover, carry
out a switchover). Then, while acting as primary, :meth:`Agent.run_cycle`
snapshots and ships; it returns a readable decision. :meth:`Agent.run` is the
loop with backoff around both. A fixed role (``primary`` / ``standby``) skips
coordination.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drsync import backup, engine
from drsync.agent import clock, requests, statuspage
from drsync.agent.drill import drills_dir, load_reports, run_drill
from drsync.agent.fencing import clear_rejoin_approval, demote_env, fence_env, rejoin_approved, run_command
from drsync.agent.primary import ship_snapshot
from drsync.agent.roles import FailoverPolicy, RoleDecision, candidate_rank, decide_role
from drsync.agent.standby import FencedError, StandbyReceiver, StateFile
from drsync.config import Config, fencing_problem
from drsync.coordination import (
    CoordinationUnavailable,
    Coordinator,
    DuplicateAgent,
    Epoch,
    EpochConflict,
    GroupView,
    PrimaryTaken,
    SessionState,
)
from drsync.dataroot import open_data_root
from drsync.errors import DrsyncError, OperationFailed, RefusedError, UsageError
from drsync.metrics import AgentMetrics, new_registry, serve
from drsync.repository.manifest import Manifest, diff, printable
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink, ReplicationServicer, start_server

log = logging.getLogger("drsync.agent")

# Garbage collection reads every kept manifest; once an hour is plenty.
GC_EVERY_S = 3600.0
# How often the loop looks at ZooKeeper (watches wake it sooner), and refreshes its record.
COORDINATE_EVERY_S = 0.5
REGISTER_EVERY_S = 5.0
# Snapshots that keep a former primary's data root before it is overwritten as a standby.
REJOIN_SNAPSHOT_TTL_S = 7 * 86400.0
# The status page's lag chart: one sample every few seconds, kept in memory for some hours.
LAG_SAMPLE_S = 5.0
LAG_WINDOW_S = 6 * 3600.0


@dataclass
class CycleDecision:
    """What one pass of the primary did, in words an operator can read in a log."""

    action: str
    snapshot: str = ""
    shipped: dict[str, str] = field(default_factory=dict)  # standby -> outcome, in words
    results: dict[str, dict[str, float]] = field(default_factory=dict)  # standby -> figures
    ok: bool = True
    duration_s: float = 0.0

    def __str__(self) -> str:
        parts = [self.action] + ([f"snapshot {self.snapshot}"] if self.snapshot else [])
        parts += [f"{t}: {o}" for t, o in self.shipped.items()]
        return "; ".join(parts)


def state_dir_of(cfg: Config) -> str:
    return cfg.agent.state_dir or os.path.join(engine.local_path(cfg.cluster.repository, "repository"), "agent")


def _host_lock_dir() -> str:
    for d in (os.environ.get("DRSYNC_LOCK_DIR", ""), "/run/lock", tempfile.gettempdir()):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def _exclusive_lock(path: str, mode: int, holder: str, refusal: Callable[[list[str]], str]) -> int:
    """Open ``path`` and take its flock without waiting, then write ``holder`` into it; the descriptor
    keeps the lock. OperationFailed with ``refusal(lines the current holder wrote)`` when it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lines = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
        os.close(fd)
        raise OperationFailed(refusal([*(line.strip() or "?" for line in lines), "?", "?"])) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


class HostLock:
    """One running agent per data root and per repository on this host (a lock file named after the
    resolved location in /run/lock; nothing is written into production's data root)."""

    def __init__(self, what: str, location: str, state_dir: str) -> None:
        key = location if "://" in location else os.path.realpath(location)
        self.path = os.path.join(_host_lock_dir(), f"drsync-{hashlib.sha256(key.encode()).hexdigest()[:20]}.lock")
        try:
            self.fd = _exclusive_lock(self.path, 0o666, f"{os.getpid()}\n{state_dir}\n", lambda held: (
                f"another drsync agent (pid {held[0]}, state directory {held[1]}) already serves {what} {key}: two "
                f"agents must never share a data root or repository; stop it, or point this config at its own"))
        except PermissionError as e:
            raise OperationFailed(f"cannot open the host lock {self.path} for {what} {key} ({e.strerror}); "
                                  f"another user's agent may serve it, or set DRSYNC_LOCK_DIR to a writable "
                                  f"directory") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateDirLock:
    """One agent per state directory: a second one would share its epoch and its apply journal."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.pid")
        self.fd = _exclusive_lock(self.path, 0o644, f"{os.getpid()}\n", lambda held: (
            f"another drsync agent (pid {held[0]}) is running with state directory {state_dir}; stop it first"))

    @staticmethod
    def held(state_dir: str) -> bool:
        """Whether a running agent holds this state directory (for the command line)."""
        path = os.path.join(state_dir, "agent.pid")
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_coordinator(cfg: Config, *, connect_timeout_s: float | None = None) -> Coordinator:
    from drsync.coordination.zookeeper import from_config

    c = cfg.coordination
    return from_config(c.zookeeper, c.group, session_timeout_s=c.session_timeout, username=c.username,
                       password=c.password, connect_timeout_s=connect_timeout_s)


class Agent:
    def __init__(self, cfg: Config, *, serve_network: bool = True, coordinator: Coordinator | None = None) -> None:
        problem = fencing_problem(cfg)
        if problem:
            raise UsageError(problem)
        self.cfg = cfg
        self.name = cfg.agent.name
        self.role = cfg.agent.role
        self.auto = self.role == "auto"
        self.address = cfg.agent.advertise or cfg.agent.listen
        self.repo = Repository.open(open_storage(cfg.cluster.repository))
        self.data_root = engine.data_root_url(cfg.cluster.data)
        state_dir = state_dir_of(cfg)
        self.dir_lock = StateDirLock(state_dir) if serve_network else None
        self.host_locks = [HostLock(what, where, state_dir) for what, where in
                           (("data root", self.data_root), ("repository", cfg.cluster.repository))] \
            if serve_network else []
        self.state_file = StateFile(state_dir)
        self.receiver: StandbyReceiver | None = None
        if self.role in ("standby", "auto"):
            self.receiver = StandbyReceiver(self.repo, self.data_root, self.state_file, agent=self.name,
                                            keep=cfg.snapshots.keep,
                                            max_delete_fraction=cfg.replication.max_delete_fraction)
            self.receiver.trust_request_epochs = bool(cfg.tls.allowed_peers)
            if self.receiver.recover():
                log.warning("agent %s: finished an apply that was interrupted", self.name)
            self.state = self.receiver.state
        else:
            self.state = self.state_file.load()
            if self.state.epoch == 0:  # a static primary starts the epoch sequence
                self.state.epoch = 1
                self.state_file.save(self.state)
        if not self.state.agent_id:
            self.state.agent_id = uuid.uuid4().hex
            self.state_file.save(self.state)
        self.fatal: DrsyncError | None = None  # set when the agent must stop (its run() then returns)
        # What this agent does right now: "primary" or "standby". With ZooKeeper it starts as a
        # standby that refuses shipments until it has heard from the group.
        self.acting = "primary" if self.role == "primary" else "standby"
        self.paused = False
        self.metrics = AgentMetrics(new_registry(), group=cfg.coordination.group, agent=self.name)
        self.metrics.is_primary.set(1 if self.acting == "primary" else 0)
        self.metrics.epoch.set_function(lambda: self.state.epoch)  # read live: shipments can raise it
        # Only agents with ZooKeeper roles have a session to report; NaN never trips an alert.
        self.metrics.zookeeper_connected.set(0 if self.auto else float("nan"))
        self.standby_applied: dict[str, float] = {}  # standby address -> capture time of its applied snapshot
        self.standby_snapshot: dict[str, str] = {}  # standby address -> the snapshot id it has applied
        self._last_gc = 0.0
        self.metrics.track_applied(self._applied_captured_at, self.current_lag)
        latest = self.repo.list_snapshots()
        if latest:
            self.metrics.last_snapshot.set(latest[-1].captured_at)
        self.stop = threading.Event()
        self.wake = threading.Event()
        # Coordination state.
        self.coord: Coordinator | None = None
        self.policy = FailoverPolicy(cfg.coordination.failover == "automatic", cfg.coordination.max_lag_on_failover,
                                     cfg.coordination.failover_grace, cfg.coordination.failover_cooldown)
        self.view: GroupView | None = None
        self.last_decision: RoleDecision | None = None
        self._primary_absent_since: float | None = None
        self._registered: tuple[Any, ...] = ()
        self._registered_at = 0.0
        self._state_written = ""
        self._next_cycle = 0.0
        self.registered_standbys: list[str] = []
        self._started = False
        self._agents: dict[str, dict[str, Any]] = {}
        # Fencing and rejoining (safety rule 7).
        self.claim: Epoch | None = None  # the epoch (with its node version) the primary claim was taken at
        self._suspended_since: float | None = None  # monotonic; while a primary's session is not connected
        self._demote_retry_at = 0.0
        self._demote_backoff = 5.0
        self._fence_retry_at = 0.0
        self._fence_backoff = 5.0
        self._last_primary: dict[str, Any] = {}  # the last primary claim seen (whom a fence command fences)
        self._switchover_final = ""  # the final snapshot of a switchover this agent handed over with
        self._switchover_hooked = False  # ... and whether its switchover_hook ran (stopping the writers)
        self.holding_ex_primary = ""  # why this ex-primary does not rejoin as standby yet ("" = it may)
        # What the status page shows: lag samples, recent cycles (primary) or applies (standby), drills.
        self.lag_history: deque[tuple[float, float | None]] = deque(maxlen=int(LAG_WINDOW_S / LAG_SAMPLE_S))
        self._last_lag_sample = 0.0
        self.cycles: deque[dict[str, Any]] = deque(maxlen=20)
        self.state_dir = state_dir
        self._drill_thread: threading.Thread | None = None
        self._drills_mtime = -1
        self._last_backup = 0.0
        self._born = time.time()
        self._refresh_drill_metrics()
        self._init_backup_metric()
        self._track_hold()
        if self.receiver is not None:
            self.receiver.on_applied = self._on_applied
        if self.auto:
            assert self.receiver is not None
            self.receiver.refusal = (f"agent {self.name} has not joined its group in ZooKeeper yet; "
                                     f"it accepts shipments once it knows its role")
            self.receiver.group_epoch = self._zk_epoch
            self.coord = coordinator or open_coordinator(cfg, connect_timeout_s=2.0)
            self.coord.add_listener(self._on_session)
        pages = {"/": self._page_html, "/status": self._page_html, "/status.json": self._page_json}
        self.metrics_server = (serve(self.metrics.registry, cfg.agent.metrics, pages)
                               if cfg.agent.metrics and serve_network else None)
        self.tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
        self.server = start_server(
            ReplicationServicer(self.receiver, agent=self.name, role=lambda: self.acting,
                                cluster_id=cfg.cluster.id, release=cfg.cluster.release,
                                allowed_peers=cfg.tls.allowed_peers, epoch=lambda: self.state.epoch),
            cfg.agent.listen, tls=self.tls, allow_insecure_remote=cfg.agent.allow_insecure_remote,
        ) if serve_network else None

    # --- small helpers ----------------------------------------------------------------

    def _applied_captured_at(self) -> float | None:
        if self.acting == "standby" and self.receiver is not None:
            return self.receiver.state.applied_captured_at or None
        targets = self.registered_standbys if self.auto else list(self.cfg.replication.standbys)
        if not targets or any(t not in self.standby_applied for t in targets):
            return None
        return min(self.standby_applied[t] for t in targets) or None

    def _on_applied(self) -> None:
        st = self.state
        self.cycles.append({"at": time.time(), "snapshot": st.applied_snapshot, "ok": True,
                            "summary": f"applied (captured {self.lag_s() or 0.0:.1f}s before)"})
        self.wake.set()  # publish the new applied snapshot at once

    def current_lag(self) -> float | None:
        """This agent's lag (standby) or its standbys' (primary), always on the primary's clock."""
        if self.acting == "standby" and self.receiver is not None:
            return self.lag_s()
        # The primary's own view: capture times it stamped, its own clock (offset 0).
        return clock.lag_s(self._applied_captured_at() or 0.0)

    def _sample_lag(self) -> None:
        now = time.time()
        if now - self._last_lag_sample >= LAG_SAMPLE_S:
            self._last_lag_sample = now
            self.lag_history.append((now, self.current_lag()))

    # --- drills and backups ---------------------------------------------------------------

    def _refresh_drill_metrics(self) -> None:
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
        if interval <= 0 or self.acting != "standby" or not self.state.applied_snapshot:
            return False
        if self._drill_thread is not None and self._drill_thread.is_alive():
            return False
        # The first drill comes one interval after the agent started, not at once: a restart or a
        # fresh standby must not start a full trial restore by surprise.
        last = load_reports(self.state_dir, 1)
        since = float(last[-1].get("started_at", 0.0)) if last else self._born
        return time.time() - since >= interval

    def _start_drill(self) -> None:
        def drill() -> None:
            try:
                report = run_drill(self.cfg, state_dir=self.state_dir,
                                   open_coord=(lambda: open_coordinator(self.cfg)) if self.auto else None,
                                   is_primary=self.acting == "primary")
            except DrsyncError as e:
                log.warning("agent %s: drill could not run: %s", self.name, e)
                return
            if report.passed:
                log.info("agent %s: drill %d passed on snapshot %s (RPO %s s, RTO %s s)", self.name, report.number,
                         report.snapshot, report.rpo_s, report.rto_s)
            else:
                log.error("agent %s: drill %d FAILED on snapshot %s: %s", self.name, report.number, report.snapshot,
                          "; ".join(f"{s.name}: {s.detail}" for s in report.steps if not s.passed))
            self.wake.set()

        self._drill_thread = threading.Thread(target=drill, name="drsync-drill", daemon=True)
        self._drill_thread.start()

    def _init_backup_metric(self) -> None:
        dest = self.cfg.backups.destination
        if not dest or not os.path.isdir(dest):
            return
        try:
            done, _ = backup.list_backups(dest)
        except DrsyncError:
            return
        if done:
            self._last_backup = done[-1].created_at
            self.metrics.backup_last_success.set(done[-1].created_at)

    def _maybe_backup(self) -> None:
        """[backups]: pull the newest snapshot out as a portable backup every interval, then prune."""
        b = self.cfg.backups
        if not b.destination or self.acting != "primary" or time.time() - self._last_backup < b.interval:
            return
        snaps = self.repo.list_snapshots()
        if not snaps:
            return
        try:
            os.makedirs(b.destination, exist_ok=True)
            info = backup.create_backup(self.repo, snaps[-1].id, b.destination, mode=b.mode,
                                        light_exclude=b.light_exclude)
            backup.prune_backups(b.destination, b.keep)
        except (DrsyncError, OSError) as e:
            self._last_backup = time.time() - b.interval + min(b.interval, 600.0)  # retry in 10 minutes
            log.error("agent %s: backup of snapshot %s failed: %s", self.name, snaps[-1].id, e)
            return
        self._last_backup = info.created_at
        self.metrics.backup_last_success.set(info.created_at)
        log.info("agent %s: backup %s (%s) of snapshot %s written to %s", self.name, info.id, b.mode, snaps[-1].id,
                 b.destination)

    # --- operator requests and the apply hold (deletion guard) ---------------------------------

    def serve_requests(self) -> None:
        """Carry out the operator requests the command line left in the state directory (drsync apply...)."""
        try:
            requests.serve_pending(self.state_dir, self)
        except OSError as e:
            log.error("agent %s: cannot read operator requests in %s: %s", self.name, self.state_dir, e)

    def _track_hold(self) -> None:
        rx = self.receiver
        if rx is None:
            self.metrics.apply_held.set(0)
            self.metrics.apply_held_deletions.set(0)
            return
        self.metrics.apply_held.set_function(lambda: 1 if rx.hold.active else 0)
        self.metrics.apply_held_deletions.set_function(lambda: rx.hold.removed if rx.hold.snapshot else 0)

    def hold_summary(self) -> dict[str, Any] | None:
        """What holds applies back on this standby (None when nothing does)."""
        rx = self.receiver
        if rx is None or not rx.hold.active:
            return None
        return rx.hold.as_dict()

    # --- the status page --------------------------------------------------------------------

    def status_doc(self) -> dict[str, Any]:
        now = time.time()
        view = self.view
        if self.auto:
            agents = []
            for name, r in sorted(self._agents.items()):
                # The lag each standby publishes (primary's clock), never recomputed with this clock.
                lag = self.lag_s() if name == self.name else r.get("lag_s")
                agents.append({"name": name, "role": r.get("role"), "address": r.get("address"),
                               "epoch": r.get("epoch"), "applied_snapshot": r.get("applied_snapshot"),
                               "lag_s": round(float(lag), 3) if lag is not None and r.get("role") == "standby"
                               else None})
            primary = view.primary.agent if view is not None and view.primary is not None else None
            epoch = view.epoch.epoch if view is not None else self.state.epoch
            zk = self.coord.state.value if self.coord is not None else "closed"
        else:
            agents = [{"name": self.name, "role": self.acting, "address": self.address, "epoch": self.state.epoch,
                       "applied_snapshot": self.state.applied_snapshot or None,
                       "lag_s": self.current_lag() if self.acting == "standby" else None}]
            for t in self.cfg.replication.standbys if self.acting == "primary" else ():
                agents.append({"name": t, "role": "standby", "address": t, "epoch": None,
                               "applied_snapshot": self.standby_snapshot.get(t),
                               "lag_s": clock.lag_s(self.standby_applied[t], 0.0, now) if t in self.standby_applied
                               else None})
            primary = self.name if self.acting == "primary" else None
            epoch, zk = self.state.epoch, "not used (fixed roles)"
        try:
            snaps = self.repo.list_snapshots()[-5:]
        except DrsyncError:
            snaps = []
        drills = [{k: r.get(k) for k in ("number", "started_at", "passed", "rpo_s", "rto_s", "snapshot")} |
                  {"steps": [{"name": s.get("name"), "passed": s.get("passed"), "detail": s.get("detail")}
                             for s in r.get("steps", [])]} for r in load_reports(self.state_dir, 10)]
        return {"group": self.cfg.coordination.group, "agent": self.name,
                "role": self.acting + (" (paused)" if self.paused else ""), "epoch": epoch, "primary": primary,
                "zookeeper": zk, "agents": agents, "lag_s": self.current_lag(),
                "lag_history": list(self.lag_history), "lag_window_s": LAG_WINDOW_S,
                "snapshots": [{"id": s.id, "kind": s.kind, "captured_at": s.captured_at, "files": s.files,
                               "bytes": s.bytes} for s in reversed(snaps)],
                "cycles": list(reversed(self.cycles)), "drills": drills, "apply_hold": self.hold_summary()}

    def _page_html(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", statuspage.render(self.status_doc()).encode()

    def _page_json(self) -> tuple[str, bytes]:
        return "application/json", json.dumps(self.status_doc(), default=str).encode()

    def lag_s(self) -> float | None:
        """As a standby: lag on the primary's clock (drsync.agent.clock.lag_s, with the estimated offset)."""
        return self.receiver.lag_s() if self.receiver is not None else None

    def _seq_of(self, snapshot_id: str) -> int:
        try:
            return self.repo.find_snapshot(snapshot_id).seq
        except DrsyncError:
            return 0

    def _epoch_age_s(self, view: GroupView) -> float:
        """How long ago this agent first saw the group's current epoch, on its own clock (persisted;
        an epoch seen for the first time counts as just now, the safe side for the cooldown)."""
        st, now = self.state, time.time()
        if view.session is SessionState.CONNECTED and view.epoch.epoch != st.epoch_seen:
            st.epoch_seen, st.epoch_seen_at = view.epoch.epoch, now
            self.state_file.save(st)
        return max(0.0, now - st.epoch_seen_at) if st.epoch_seen == view.epoch.epoch else 0.0

    def _manifest_if_known(self, snapshot_id: str) -> Manifest | None:
        try:
            return self.repo.load_manifest(self.repo.find_snapshot(snapshot_id))
        except DrsyncError:
            return None  # gone from this repository (expired): negotiate everything

    def _on_session(self, state: SessionState) -> None:
        # Called from kazoo's thread: record and wake the loop, never block here.
        self.metrics.zookeeper_connected.set(1 if state is SessionState.CONNECTED else 0)
        if state is not SessionState.CONNECTED and self.acting == "primary":
            self.paused = True  # stop shipping at once; the loop decides the rest
            if self._suspended_since is None:
                self._suspended_since = time.monotonic()
        elif state is SessionState.CONNECTED:
            self._suspended_since = None
        self.wake.set()

    def _zk_epoch(self) -> tuple[int, str]:
        """The group's epoch and the agent it names, read fresh (CoordinationUnavailable when it cannot be:
        a shipment is then refused, never judged from a cached epoch)."""
        coord = self.coord
        if coord is None:
            raise CoordinationUnavailable("this agent has no ZooKeeper session")
        e = coord.read_epoch()
        return e.epoch, e.promoted_by

    # --- coordination -------------------------------------------------------------------

    def coordinate(self) -> RoleDecision | None:
        """Read the group, decide this agent's role, and carry the decision out."""
        if self.coord is None:
            return None
        coord = self.coord
        self._check_suspended()
        if not self._started:
            try:
                coord.start()
                self._started = True
                coord.on_change(self.wake.set)
                self.metrics.zookeeper_connected.set(1)
            except CoordinationUnavailable as e:
                self.metrics.zookeeper_connected.set(0)
                return self._decide(GroupView(SessionState.LOST, Epoch(), None), note=str(e))
        if not self._registered:
            # Prove this agent's name is its own before deciding anything (two configs with one name).
            try:
                self._publish(force=True)
            except DuplicateAgent as e:
                self._stop_fatally(e)
                return None
            except DrsyncError as e:
                log.warning("agent %s: cannot register in ZooKeeper yet: %s", self.name, e)
                return None
        try:
            view = coord.view()
        except CoordinationUnavailable:
            state = coord.state if coord.state is not SessionState.CONNECTED else SessionState.SUSPENDED
            last = self.view or GroupView(state, Epoch(), None)
            return self._decide(GroupView(state, last.epoch, last.primary if state is SessionState.SUSPENDED
                                          else None))
        self.view = view
        now = time.monotonic()
        if view.primary is None:
            self._primary_absent_since = self._primary_absent_since or now
        else:
            self._primary_absent_since = None
            self._fence_backoff, self._fence_retry_at = 5.0, 0.0  # a new outage starts a new backoff
            self._last_primary = {"agent": view.primary.agent, "address": view.primary.address,
                                  "epoch": view.primary.epoch}
        if self.acting == "standby" and self.receiver is not None:
            self.receiver.observe_epoch(view.epoch.epoch)
        try:
            agents = coord.agents()
        except DrsyncError:
            agents = {}
        previous = set(self.registered_standbys)
        self.registered_standbys = sorted(r.get("address", "") for n, r in agents.items()
                                          if n != self.name and r.get("role") == "standby" and r.get("address"))
        if self.acting == "primary" and set(self.registered_standbys) - previous:
            self._next_cycle = 0.0  # a standby (re)joined: ship to it now, not one interval later
        self._agents = agents
        decision = self._decide(view, agents=agents)
        if self.acting == "primary" and view.switchover and not self.paused:
            self._carry_out_switchover(view)
        try:
            self._publish()
        except DuplicateAgent as e:
            self._stop_fatally(e)
        except DrsyncError as e:
            log.debug("could not publish this agent's record: %s", e)
        return decision

    def _stop_fatally(self, e: DrsyncError) -> None:
        log.error("agent %s stops: %s", self.name, e)
        if self.acting == "primary":
            self._step_down(str(e))
        self.fatal = e
        self.stop.set()

    def _decide(self, view: GroupView, *, agents: dict[str, dict[str, Any]] | None = None,
                note: str = "") -> RoleDecision:
        absent = time.monotonic() - self._primary_absent_since if self._primary_absent_since else 0.0
        decision = decide_role(self.name, view, acting_primary=self.acting == "primary", policy=self.policy,
                               primary_absent_s=absent, lag_s=self.lag_s(),
                               rank=candidate_rank(self.name, agents or {}), epoch_age_s=self._epoch_age_s(view))
        if decision != self.last_decision:
            level = logging.INFO if decision.action in ("standby", "act-primary") else logging.WARNING
            log.log(level, "agent %s: %s%s", self.name, decision, f" [{note}]" if note else "")
            self.last_decision = decision
        if decision.action == "act-primary":
            if self.paused and self.state.demoted:
                self._demotion_to_undo(self.state.epoch)
                self.state_file.save(self.state)
            self.paused = False
            self.metrics.is_primary.set(1)
        elif decision.action == "pause":
            self.paused = True
            self.metrics.is_primary.set(0)  # it does not act as primary while paused
        elif decision.action == "step-down":
            self._step_down(decision.reason, demote="lost" if view.session is SessionState.LOST else "fenced")
        elif decision.action == "claim":
            self._become_primary(view.epoch)
        elif decision.action == "promote-self":
            self._promote_self(view.epoch)
        elif decision.action == "standby" and self.acting == "standby" and view.session is not SessionState.LOST:
            self._serve_as_standby(view)
        return decision

    def _become_primary(self, epoch: Epoch) -> None:
        assert self.coord is not None and self.receiver is not None
        rx = self.receiver
        with rx.commit_lock:  # an apply in flight finishes first: a promotion sees a whole snapshot
            rx.refusal = f"agent {self.name} is taking over as primary at epoch {epoch.epoch}; it accepts no shipments"
            rx.observe_epoch(epoch.epoch)
            if rx.broken:
                log.error("agent %s cannot become primary: %s", self.name, rx.broken)
                return
            rx.recover()
            try:
                self.coord.claim_primary(epoch, self.name, self.address)
                rx.release_on_promotion()
            except (EpochConflict, PrimaryTaken, CoordinationUnavailable) as e:
                log.warning("agent %s: could not take the primary node: %s", self.name, e)
                rx.refusal = ""
                return
            self.claim = epoch
            self.acting = "primary"
            self.paused = False
            self.holding_ex_primary = ""
            if self.state.last_role == "primary":
                self._demotion_to_undo(epoch.epoch)
            self.state.last_role = "primary"
            self.state.demoted = False
            self.state_file.save(self.state)
        try:
            # A new primary supersedes any maintenance marker (its own from a restart, or an old primary's).
            self.coord.clear_maintenance()
        except DrsyncError as e:
            log.warning("agent %s: could not remove the maintenance marker: %s", self.name, e)
        self.metrics.is_primary.set(1)
        self._next_cycle = 0.0  # snapshot (and ship, once a standby registers) right away
        log.warning("agent %s is now PRIMARY at epoch %d", self.name, epoch.epoch)
        self._publish(force=True)
        self.wake.set()

    def _promote_self(self, epoch: Epoch) -> None:
        """Automatic failover: fence production first (fence_command must succeed), then promote."""
        assert self.coord is not None
        if time.monotonic() < self._fence_retry_at:
            return
        c = self.cfg.coordination
        if c.fencing:
            old = self._last_primary if self._last_primary.get("agent") == epoch.promoted_by else {}
            address = str(old.get("address") or self._agents.get(epoch.promoted_by, {}).get("address") or "")
            log.warning("agent %s: primary %s gone: running fence_command before promoting itself", self.name,
                        epoch.promoted_by)
            result = run_command("fence_command", c.fence_command, fence_env(
                group=c.group, agent=self.name, fenced_agent=epoch.promoted_by, fenced_address=address,
                epoch=epoch.epoch, data=self.data_root), c.fence_timeout)
            if not result.ok:
                self._fence_retry_at = time.monotonic() + self._fence_backoff
                log.error("agent %s: automatic failover refused: %s; production's writers may still run, so this "
                          "agent does not promote itself (next try in %.0fs); fix the fence, or fence production "
                          "by hand and run drsync promote", self.name, result.summary(), self._fence_backoff)
                self._fence_backoff = min(self._fence_backoff * 2, 300.0)
                return
            self._fence_backoff = 5.0
            try:  # the fence took time: promote only if the group is still as it was
                view = self.coord.view()
            except CoordinationUnavailable as e:
                log.warning("agent %s: automatic failover did not happen: %s", self.name, e)
                return
            if view.primary is not None or view.epoch.version != epoch.version or view.maintenance:
                log.warning("agent %s: automatic failover abandoned: the group changed while fencing", self.name)
                return
        try:
            new = self.coord.promote(epoch, self.name, "automatic failover" +
                                     (" after fence_command succeeded" if c.fencing else " (fence_command = none)"))
        except (EpochConflict, CoordinationUnavailable) as e:
            log.warning("agent %s: automatic failover did not happen: %s", self.name, e)
            return
        log.warning("agent %s: automatic failover: promoted to epoch %d", self.name, new.epoch)
        self._become_primary(new)

    def _demotion_to_undo(self, epoch: int) -> None:
        """This agent is primary again: a demotion it ran meanwhile is the operator's to undo."""
        if self.state.demoted:
            log.warning("agent %s: primary again at epoch %d, but demote_command ran while its claim could "
                        "not be proven: production may be read-only; undo what demote_command did", self.name, epoch)
            self.state.demoted = False

    def _check_suspended(self) -> None:
        """A primary suspended for longer than the session timeout may have lost its claim: demote."""
        since = self._suspended_since
        if self.acting == "primary" and since is not None and \
                time.monotonic() - since > self.cfg.coordination.session_timeout:
            self._demote("suspended")

    def _demote(self, reason: str) -> bool:
        """Run demote_command once for this loss of the claim (retried with backoff when it fails).
        True when production is confirmed demoted."""
        if self.state.demoted:
            return True
        command = self.cfg.coordination.demote_command.strip()
        if not command:
            return False
        if time.monotonic() < self._demote_retry_at:
            return False
        c = self.cfg.coordination
        log.warning("agent %s: cannot prove its primary claim (%s): running demote_command", self.name, reason)
        result = run_command("demote_command", command, demote_env(
            group=c.group, agent=self.name, epoch=self.state.epoch, reason=reason, data=self.data_root),
            c.demote_timeout)
        if not result.ok:
            self._demote_retry_at = time.monotonic() + self._demote_backoff
            self._demote_backoff = min(self._demote_backoff * 2, 300.0)
            log.error("agent %s: %s; production may still be writing; retrying in %.0fs", self.name,
                      result.summary(), self._demote_backoff)
            return False
        self._demote_backoff = 5.0
        self.state.demoted = True
        self.state_file.save(self.state)
        return True

    def _step_down(self, reason: str, *, demote: str = "") -> None:
        was_primary = self.acting == "primary"
        self.acting = "standby"
        self.paused = False
        self.claim = None
        self.metrics.is_primary.set(0)
        if self.coord is not None:
            try:
                self.coord.release_primary(self.name)
            except DrsyncError:
                pass  # the session is gone or going: the node goes with it
        if was_primary:
            log.warning("agent %s stepped down as primary: %s", self.name, reason)
            if demote:
                self._demote(demote)

    def _rejoin_blocker(self) -> str:
        """Why this ex-primary may not overwrite its data root as a standby yet ("" = it may).

        Its writers may still run (safety rule 7) unless demote_command succeeded, an operator ran
        drsync rejoin, or it handed over by switchover (an operator's request, quiescence proven)."""
        if self.state.last_role != "primary" or self.state.demoted:
            return ""
        if self._switchover_final and self._switchover_hooked:
            return ""  # the switchover hook stopped production's writers (its job), and quiescence was proven
        if rejoin_approved(self.state_dir):
            return ""
        if self._demote("rejoin"):
            return ""
        how = ("demote_command has not succeeded" if self.cfg.coordination.demote_command.strip() else
               "no demote_command is configured")
        return (f"agent {self.name} was primary at epoch {self.state.epoch} and its production writers are not "
                f"confirmed stopped ({how}): it keeps its data root untouched and does not rejoin as a standby until "
                f"demote_command succeeds or an operator runs drsync rejoin")

    def _serve_as_standby(self, view: GroupView) -> None:
        """Accept shipments; first keep the data root of a former primary as a snapshot."""
        assert self.receiver is not None
        if self.receiver.refusal == "":
            return
        if view.epoch.epoch == 0:
            self.receiver.refusal = f"group {self.coord.group if self.coord else ''} has no primary yet"
            return
        blocker = self._rejoin_blocker()
        if blocker:
            if blocker != self.holding_ex_primary:
                log.warning("agent %s: %s", self.name, blocker)
            self.holding_ex_primary = blocker
            self.receiver.refusal = blocker
            return
        self.holding_ex_primary = ""
        keep_root = self.state.last_role == "primary" or (not self.state.applied_snapshot and
                                                          has_data(self.data_root))
        if keep_root:
            try:
                info = engine.create_snapshot(self.repo, engine.SnapshotRequest(
                    self.cfg.cluster.data, name=f"before-rejoin-epoch-{view.epoch.epoch}",
                    reason=(f"data root of {self.name} kept before it rejoined as a standby of "
                            f"{view.primary.agent if view.primary else view.epoch.promoted_by} at epoch "
                            f"{view.epoch.epoch}"),
                    ttl_s=REJOIN_SNAPSHOT_TTL_S, kind="manual", exclude_paths=(self.state_file.dir,),
                    allow_empty=True))
            except DrsyncError as e:
                log.error("agent %s: not rejoining as standby yet: could not keep its data root first: %s",
                          self.name, e)
                return
            unchanged = bool(self._switchover_final) and self._same_content(info.id, self._switchover_final)
            if unchanged:
                # Nothing was written after the switchover's final snapshot: no second copy needed.
                engine.delete_snapshots(self.repo, [info.id], prune=False)
                log.info("agent %s rejoins as standby after the switchover; nothing changed since its final "
                         "snapshot %s", self.name, self._switchover_final)
            elif self._switchover_final:
                log.warning("agent %s rejoins as standby: its data root changed after the switchover's final "
                            "snapshot %s; the changes are kept in snapshot %s (%s): compare them with drsync "
                            "snapshot diff", self.name, self._switchover_final, info.id, info.name)
            else:
                log.warning("agent %s rejoins as standby; its data root was kept as snapshot %s (%s)", self.name,
                            info.id, info.name)
            # Whatever it applied as a standby before, its root has moved on since: forget it, so
            # that the next shipment is applied in full (never skipped as "same content").
            if not unchanged:
                self.state.applied_snapshot, self.state.applied_captured_at, self.state.applied_at = "", 0.0, 0.0
                self.state.applied_position = []
                self.state.guard_baseline = info.id  # the first shipment may not empty what was kept
        self.state.last_role = "standby"
        self.state.demoted = False
        self.state_file.save(self.state)
        clear_rejoin_approval(self.state_dir)
        self._switchover_final = ""
        self.receiver.refusal = ""

    def _same_content(self, a: str, b: str) -> bool:
        try:
            return not self._changed_paths(a, b)
        except DrsyncError:
            return False

    def _role_word(self) -> str:
        if self.acting == "primary":
            return "paused" if self.paused else "primary"
        return "ex-primary" if self.holding_ex_primary else "standby"

    def _publish(self, force: bool = False) -> None:
        """Keep agents/<name> (and, after an apply, the group's state node) current."""
        if self.coord is None or self.coord.state is not SessionState.CONNECTED:
            return
        st = self.state
        lag = self.lag_s() if self.acting == "standby" else None
        role = self._role_word()
        key = (role, st.epoch, st.applied_snapshot)
        now = time.monotonic()
        if force or key != self._registered or now - self._registered_at >= REGISTER_EVERY_S:
            self.coord.register(self.name, {
                "role": role, "address": self.address, "cluster_id": self.cfg.cluster.id,
                "release": self.cfg.cluster.release,
                "epoch": st.epoch, "applied_snapshot": st.applied_snapshot or None,
                "applied_captured_at": st.applied_captured_at or None,
                "applied_position": st.applied_position or None, "clock_offset_s": round(st.clock_offset_s, 3),
                "lag_s": round(lag, 3) if lag is not None else None, "heartbeat": time.time(), "pid": os.getpid(),
                "waiting_to_rejoin": self.holding_ex_primary or None, "agent_id": st.agent_id,
                "apply_hold": self.hold_summary()})
            self._registered, self._registered_at = key, now
        if self.acting == "standby" and st.applied_snapshot and st.applied_snapshot != self._state_written:
            self.coord.write_state({"snapshot": st.applied_snapshot, "captured_at": st.applied_captured_at,
                                    "applied_at": st.applied_at, "epoch": st.epoch, "agent": self.name})
            self._state_written = st.applied_snapshot

    def _guard(self, final: bool) -> None:
        """Raise FencedError unless this agent may still act as primary (checked during shipping)."""
        if self.acting != "primary" or self.paused:
            raise FencedError(f"agent {self.name} is no longer acting as primary; shipment abandoned")
        if self.coord is None:
            return
        if self.coord.state is not SessionState.CONNECTED:
            raise FencedError("the ZooKeeper session is not connected; shipment abandoned until it is confirmed")
        if final:  # before a commit: a fresh read, so a promotion elsewhere fences us here too
            try:
                view = self.coord.view()
            except CoordinationUnavailable as e:
                raise FencedError(f"cannot confirm the primary claim before committing: {e}") from None
            p = view.primary
            if not (p is not None and p.mine and p.agent == self.name and p.epoch == self.state.epoch
                    and view.epoch.epoch == self.state.epoch):
                self.paused = True
                self.wake.set()
                raise FencedError(f"the primary claim at epoch {self.state.epoch} is gone (group epoch "
                                  f"{view.epoch.epoch}, primary {p.agent if p else 'none'}); not committing")

    # --- the primary's cycle ---------------------------------------------------------------

    def targets(self) -> list[str]:
        return list(self.registered_standbys) if self.auto else list(self.cfg.replication.standbys)

    def run_cycle(self, targets: list[str] | None = None) -> CycleDecision:
        """Snapshot, then ship to every standby what it lacks."""
        if self.acting != "primary":
            raise RefusedError(f"agent {self.name} is not the primary; it takes no replication cycle")
        started = time.monotonic()
        decision = self._cycle(self.targets() if targets is None else targets)
        decision.duration_s = round(time.monotonic() - started, 3)
        return decision

    def _cycle(self, targets: list[str]) -> CycleDecision:
        self._guard(False)
        snaps = self.cfg.snapshots
        req = engine.SnapshotRequest(self.cfg.cluster.data, kind="cycle", reason="replication cycle",
                                     hooks=engine.Hooks(snaps.pre_hook, snaps.post_hook, snaps.hook_timeout),
                                     reread_attempts=snaps.reread_attempts, exclude_paths=(self.state_file.dir,))
        info = engine.create_snapshot(self.repo, req)
        self.metrics.last_snapshot.set(info.captured_at)
        self.metrics.snapshot_stale_paths.set(info.stale_paths)
        self.metrics.snapshot_skipped_paths.set(info.skipped_paths)
        self.metrics.snapshot_duration.observe(info.duration_s)
        decision = CycleDecision("shipped" if targets else "snapshot only (no standby registered)", info.id)
        for target in targets:
            link = GrpcStandbyLink(target, tls=self.tls, sender=self.name)
            try:
                hello = link.hello(self.name, self.state.epoch)
                applied = None
                if hello.applied_snapshot:
                    self.standby_applied[target] = hello.applied_captured_at
                    self.standby_snapshot[target] = hello.applied_snapshot
                    applied = self._manifest_if_known(hello.applied_snapshot)
                res = ship_snapshot(self.repo, info, link, epoch=self.state.epoch, sender=self.name,
                                    bandwidth_bps=self.cfg.replication.bandwidth_limit, applied=applied,
                                    guard=self._guard)
                self.standby_applied[target] = info.captured_at
                self.standby_snapshot[target] = info.id
                self.metrics.ship_duration.observe(res.duration_s)
                self.metrics.shipped_bytes.inc(res.shipped_bytes)
                self.metrics.deduplicated_bytes.inc(res.deduplicated_bytes)
                decision.shipped[target] = (f"applied ({res.missing_chunks}/{res.chunks} chunks sent, "
                                            f"{res.shipped_bytes} B in {res.duration_s:.2f}s)")
                decision.results[target] = {"chunks": res.chunks, "missing_chunks": res.missing_chunks,
                                            "shipped_bytes": res.shipped_bytes, "duration_s": res.duration_s,
                                            "deduplicated_bytes": res.deduplicated_bytes}
            except RefusedError as e:
                decision.shipped[target] = f"refused: {e}"
                decision.ok = False
                self.metrics.ship_failures.inc()
                if isinstance(e, FencedError):
                    break  # this agent is fenced: ship to nobody else either
            except DrsyncError as e:
                decision.shipped[target] = f"failed: {e}"
                decision.ok = False
                self.metrics.ship_failures.inc()
            finally:
                link.close()
        return decision

    # --- switchover ----------------------------------------------------------------------------

    def _carry_out_switchover(self, view: GroupView) -> None:
        """Planned hand-over: hook, quiescence proven, final snapshot shipped and applied, then the roles
        swap in one transaction guarded by the epoch version this agent's claim was taken at."""
        assert self.coord is not None
        req = view.switchover or {}
        if req.get("status") != "requested" or req.get("from") not in (None, "", self.name):
            return
        to = str(req.get("to", ""))
        doc = dict(req)
        agents = self.coord.agents()
        target = agents.get(to)
        if to == self.name or target is None or target.get("role") != "standby" or not target.get("address"):
            doc.update(status="failed", error=f"agent {to!r} is not a registered standby of group "
                                              f"{self.coord.group}; nothing was changed")
            self.coord.update_switchover(doc)
            return
        doc.update({"status": "running", "from": self.name, "started_at": time.time()})
        self.coord.update_switchover(doc)
        log.warning("agent %s: switchover to %s started", self.name, to)
        address = str(target["address"])
        hook = self.cfg.coordination.switchover_hook
        try:
            if hook:
                engine.run_hook("pre-switchover", hook, {"DRSYNC_SWITCHOVER_TO": to, "DRSYNC_DATA": self.data_root},
                                self.cfg.snapshots.hook_timeout)
            final = self._ship_until_quiescent(address, to)
            self._guard(True)
            if self.claim is None:
                raise EpochConflict(f"{self.name} holds no primary claim to hand over")
            new = self.coord.hand_over(self.claim, self.name, to)
        except DrsyncError as e:
            why = (f"a promotion or a lost session came first, and it stands: {e}" if isinstance(e, EpochConflict)
                   else str(e))
            doc.update(status="failed", error=f"{why}; {self.name} stays primary unless the group says otherwise" +
                       (" (the pre-switchover hook has run: undo what it did)" if hook else ""))
            self.coord.update_switchover(doc)
            log.error("agent %s: switchover to %s failed: %s", self.name, to, why)
            self.wake.set()
            return
        self._step_down(f"switchover to {to} at epoch {new.epoch}")
        # The root holds the final snapshot (quiescence proven): it is what is applied here. Anything
        # written after it is kept in a snapshot when this agent rejoins, never silently overwritten.
        self._switchover_final = final.snapshot
        self._switchover_hooked = bool(hook)
        self.state.applied_snapshot = final.snapshot
        self.state.applied_captured_at = self.standby_applied.get(address, time.time())
        self.state.applied_at = time.time()
        # Captured here, on this clock, at the epoch this agent shipped it at.
        self.state.applied_position = [new.epoch - 1, self._seq_of(final.snapshot)]
        self.state.clock_offset_s, self.state.clock_source = 0.0, self.name
        if self.receiver is not None:
            self.receiver.clock = clock.ClockOffset(0.0, self.name)
        self.state_file.save(self.state)
        if self.cfg.coordination.demote_command.strip():
            self._demote("switchover")
        doc.update(status="handed-over", epoch=new.epoch, final_snapshot=final.snapshot, handed_over_at=time.time())
        self.coord.update_switchover(doc)
        log.warning("agent %s: switchover: handed over to %s at epoch %d after final snapshot %s", self.name, to,
                    new.epoch, final.snapshot)

    def _ship_until_quiescent(self, address: str, to: str) -> CycleDecision:
        """Ship the final snapshot, then capture again until a capture finds no change (production is
        quiet), at most coordination.switchover_quiesce_attempts times; OperationFailed naming the
        changing paths otherwise. Returns the cycle of the last (unchanged) snapshot."""
        def ship() -> CycleDecision:
            cycle = self.run_cycle([address])
            if not cycle.ok:
                outcome = cycle.shipped.get(address, "not shipped")
                raise OperationFailed(f"the final snapshot did not reach {to}: {outcome}")
            return cycle

        attempts = max(1, self.cfg.coordination.switchover_quiesce_attempts)
        cycle = ship()
        changed: list[str] = []
        for _ in range(attempts):
            again = ship()
            changed = self._changed_paths(cycle.snapshot, again.snapshot)
            if not changed:
                return again
            cycle = again
        shown = ", ".join(printable(p) for p in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                                                  else "")
        raise OperationFailed(f"production did not stop changing: {attempts} captures in a row after the final one "
                              f"found changes (last: {shown}); stop its writers (or set coordination.switchover_hook "
                              f"to do it) and retry")

    def _changed_paths(self, a: str, b: str) -> list[str]:
        ma = self.repo.load_manifest(self.repo.find_snapshot(a))
        mb = self.repo.load_manifest(self.repo.find_snapshot(b))
        return diff(ma, mb).paths()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Coordinate; as primary, run a cycle every replication.interval, backing off after failures."""
        log.info("agent %s running (role %s) on %s", self.name, self.role, self.cfg.agent.listen)
        backoff = 1.0
        while not self.stop.is_set():
            self.wake.clear()
            try:
                self.coordinate()
            except DrsyncError as e:
                log.warning("agent %s: coordination pass failed: %s", self.name, e)
            self._sample_lag()
            self._refresh_drill_metrics()
            self.serve_requests()
            if self._drill_due():
                self._start_drill()
            if self.acting == "primary" and not self.paused and time.monotonic() >= self._next_cycle:
                started = time.monotonic()
                try:
                    decision = self.run_cycle()
                except DrsyncError as e:
                    decision = CycleDecision(f"cycle failed: {e}", ok=False)
                log.log(logging.INFO if decision.ok else logging.WARNING, "agent %s: %s", self.name, decision)
                self.cycles.append({"at": time.time(), "snapshot": decision.snapshot, "ok": decision.ok,
                                    "summary": str(decision)})
                self.maintain()
                self._maybe_backup()
                if decision.ok:
                    backoff = 1.0
                    self._next_cycle = started + self.cfg.replication.interval
                else:
                    self._next_cycle = time.monotonic() + min(backoff, self.cfg.replication.interval)
                    backoff = min(backoff * 2, 60.0)
                continue  # coordinate again right after a cycle
            wait = COORDINATE_EVERY_S if self.auto else 1.0
            if self.acting == "primary":
                wait = max(0.01, min(wait, self._next_cycle - time.monotonic()))
            self.wake.wait(wait)
            if self.stop.is_set():
                break
        self.close()

    def maintain(self) -> None:
        """Retention for cycle snapshots ([snapshots] keep); garbage collection at most hourly."""
        collect = time.monotonic() - self._last_gc >= GC_EVERY_S
        try:
            res = engine.expire_snapshots(self.repo, self.cfg.snapshots.keep, collect=collect,
                                          protect=frozenset(self.standby_snapshot.values()) |
                                          {self.state.applied_snapshot} - {""})
        except DrsyncError as e:
            log.warning("agent %s: retention skipped: %s", self.name, e)
            return
        if res.gc is not None:
            self._last_gc = time.monotonic()
        if res.deleted:
            log.info("agent %s: expired %d snapshot(s)", self.name, len(res.deleted))

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        if self.coord is not None:
            if self.acting == "primary":
                if self.coord.state is SessionState.CONNECTED:
                    # An agent stop is not a production outage (safety rule 7): mark it first, so that no
                    # standby promotes itself when the primary node goes with this session.
                    try:
                        self.coord.set_maintenance({"agent": self.name, "since": time.time(),
                                                    "epoch": self.state.epoch, "reason": "agent stopped"})
                        log.warning("agent %s stops as primary of epoch %d: maintenance marker set; no automatic "
                                    "promotion until it is back (or an operator promotes)", self.name,
                                    self.state.epoch)
                    except DrsyncError as e:
                        log.error("agent %s: could not set the maintenance marker (%s): with automatic failover "
                                  "a standby may fence production and take over", self.name, e)
                    self._step_down("agent stopping")
                else:
                    self.acting = "standby"  # without a connection the session (and node) simply expires
            self.coord.close()
            self.coord = None
        if self.dir_lock is not None:
            self.dir_lock.release()
            self.dir_lock = None
        for lock in self.host_locks:
            lock.release()
        self.host_locks = []


def has_data(root: str) -> bool:
    """Whether a data root holds anything besides drsync's own files (an empty one is never promoted
    over production by mistake)."""
    try:
        return open_data_root(root).has_data()
    except (OSError, DrsyncError):
        return False
