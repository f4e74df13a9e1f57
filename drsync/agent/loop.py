"""The agent: one process beside one cluster, wiring its parts together.

* :class:`~drsync.agent.state.StateStore`: the durable record, one lock.
* :class:`~drsync.agent.standby.StandbyReceiver`: admission, chunk intake, committer (gRPC threads).
* :class:`~drsync.agent.supervisor.RoleSupervisor`: the role, from ZooKeeper (this loop's thread).
* :class:`~drsync.agent.shipper.Replication`: captures (this loop) and one shipper thread per standby.
* :class:`~drsync.agent.maintenance.MaintenanceWorker`: retention, GC, backups, drills (its own thread).
* :class:`~drsync.agent.status.AgentStatus`: the status page's document and the lag (its HTTP thread reads).

:meth:`Agent.run` is the loop: coordinate, serve operator requests, keep the shippers'
targets current, and as primary capture a snapshot when :class:`~drsync.agent.continuous.CaptureSchedule`
says (every ``replication.interval``, or on change in continuous mode; backing off after failed
captures). A fixed role (``primary`` / ``standby``) skips coordination.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from drsync import engine, faults
from drsync.agent import requests, switchover
from drsync.agent.continuous import CaptureSchedule
from drsync.agent.locks import HostLock, StateDirLock
from drsync.agent.maintenance import Duties, MaintenanceWorker
from drsync.agent.shipper import CycleDecision, Replication, ShipOutcome
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore, state_dir_of, state_dir_owner_problem
from drsync.agent.status import AgentStatus
from drsync.agent.supervisor import RoleSupervisor
from drsync.config import Config, engine_problem, fencing_problem, layout_problem, topology_problem
from drsync.coordination import Coordinator, open_coordinator
from drsync.errors import DrsyncError, RefusedError, UsageError
from drsync.metrics import AgentMetrics, new_registry, serve
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink, ReplicationServicer, start_server

log = logging.getLogger("drsync.agent")

# How often the loop looks at ZooKeeper (watches wake it sooner), and for operator requests.
COORDINATE_EVERY_S = 0.5
REQUESTS_EVERY_S = 0.2
DELAYED_APPLY_EVERY_S = 1.0  # how often a standby with replication.apply_delay looks for snapshots due
# As primary, retention keeps the snapshot last applied by at most this many vanished standbys.
LOST_STANDBY_KEEP = 4


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else v  # a gauge without a value: NaN never trips an alert


class Agent:
    def __init__(self, cfg: Config, *, serve_network: bool = True, coordinator: Coordinator | None = None) -> None:
        problem = layout_problem(cfg) or fencing_problem(cfg) or engine_problem(cfg) or topology_problem(cfg)
        if problem:
            raise UsageError(problem)
        self.cfg = cfg
        self.name = cfg.agent.name
        self.role = cfg.agent.role
        self.auto = self.role == "auto"
        self.repo = Repository.open(open_storage(cfg.cluster.repository))
        self.repo.refuse_if_read_only()  # an agent writes its repository (snapshots, shipments, retention)
        self.data_root = engine.data_root_url(cfg.cluster.data)
        self.state_dir = state_dir_of(cfg)
        self.dir_lock = StateDirLock(self.state_dir, cfg.agent.listen, cfg.cluster.data) if serve_network else None
        self.host_locks = HostLock.take_all([("data root", self.data_root), ("repository", cfg.cluster.repository)],
                                            self.state_dir) if serve_network else []
        self.store = StateStore(self.state_dir)
        owner = self.store.current.agent_name  # before anything acts on what the state says
        if owner and owner != self.name:
            raise UsageError(state_dir_owner_problem(self.state_dir, owner, self.name))
        if not owner:
            self.store.update(agent_name=self.name)
        try:  # [snapshots] protect in the repository too: commands run with --repo alone keep it
            engine.record_protection(self.repo, cfg.snapshots.protect, by=f"agent {self.name}",
                                     state_dir=self.state_dir)
        except (DrsyncError, OSError) as e:
            log.warning("agent %s: could not record [snapshots] protect in repository %s (commands run with --repo "
                        "alone do not see it): %s", self.name, self.repo.storage.url, e)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.metrics = AgentMetrics(new_registry(), group=cfg.coordination.group, agent=self.name)
        self.receiver: StandbyReceiver | None = None
        if self.role in ("standby", "auto"):
            self.receiver = StandbyReceiver(self.repo, self.data_root, self.store, agent=self.name,
                                            max_delete_fraction=cfg.replication.max_delete_fraction,
                                            distcp=engine.distcp_settings(cfg),
                                            apply_delay_s=cfg.replication.apply_delay,
                                            max_change_fraction=cfg.replication.max_change_fraction,
                                            on_mass_change=cfg.replication.on_mass_change,
                                            mass_change_window_s=cfg.replication.mass_change_window)
            self.receiver.trust_request_epochs = bool(cfg.tls.allowed_peers)
            self.receiver.upstream = cfg.replication.upstream
            if self.receiver.recover():
                log.warning("agent %s: finished an apply that was interrupted", self.name)
            self.receiver.on_applied = self._on_applied
            self.receiver.after_commit = lambda: self.maintenance.wake()
        elif self.store.current.epoch == 0:
            self.store.update(epoch=1)  # a static primary starts the epoch sequence
        if not self.store.current.agent_id:
            self.store.update(agent_id=uuid.uuid4().hex)

        coord = (coordinator or open_coordinator(cfg, connect_timeout_s=2.0)) if self.auto else None
        self.supervisor = RoleSupervisor(cfg, repo=self.repo, store=self.store, receiver=self.receiver, coord=coord,
                                         data_root=self.data_root, state_dir=self.state_dir, metrics=self.metrics,
                                         wake=self.wake.set, hold_summary=self.hold_summary)
        self.tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
        self.replication = Replication(
            cfg, self.repo, self.metrics, sender=self.name,
            link=lambda target: GrpcStandbyLink(target, tls=self.tls, sender=self.name, cluster_id=cfg.cluster.id,
                                                release=cfg.cluster.release, clock=self._shipping_clock),
            epoch=lambda: self.store.current.epoch, guard=self.supervisor.guard, relay_guard=self._relay_guard,
            exclude_paths=(self.store.dir,), on_outcome=self._on_shipped)
        self.supervisor.on_switchover = lambda view: switchover.carry_out(self.supervisor, self.replication, view)
        # When the primary captures: replication.mode (interval, or continuous: on change of the data root).
        self.schedule = CaptureSchedule(cfg, data_root=self.data_root, exclude=(self.store.dir, cfg.cluster.repository),
                                        metrics=self.metrics, wake=self.wake.set)
        self.maintenance = MaintenanceWorker(cfg, self.repo, self.metrics, store=self.store,
                                             duties=self._duties,
                                             open_coord=(lambda: open_coordinator(cfg)) if self.auto else None)
        self.status = AgentStatus(cfg, repo=self.repo, store=self.store, supervisor=self.supervisor,
                                  replication=self.replication, schedule=self.schedule, maintenance=self.maintenance,
                                  hold_summary=self.hold_summary, state_dir=self.state_dir)
        self._setup_metrics()
        if self.auto:
            assert self.receiver is not None
            self.receiver.refusal = (f"agent {self.name} has not joined its group in ZooKeeper yet; "
                                     f"it accepts shipments once it knows its role")
            self.receiver.group_epoch = self.supervisor.read_group_epoch
        pages = {"/": self.status.page_html, "/status": self.status.page_html, "/status.json": self.status.page_json}
        self.metrics_server = (serve(self.metrics.registry, cfg.agent.metrics, pages)
                               if cfg.agent.metrics and serve_network else None)
        self.server = start_server(
            ReplicationServicer(self.receiver, agent=self.name, role=self.supervisor.shown_role,
                                cluster_id=cfg.cluster.id, release=cfg.cluster.release,
                                allowed_peers=cfg.tls.allowed_peers, epoch=lambda: self.store.current.epoch),
            cfg.agent.listen, tls=self.tls, allow_insecure_remote=cfg.agent.allow_insecure_remote,
        ) if serve_network else None

    # --- what the parts ask of each other --------------------------------------------------

    @property
    def acting(self) -> str:
        return self.supervisor.acting

    @property
    def paused(self) -> bool:
        return self.supervisor.paused

    @property
    def fatal(self) -> DrsyncError | None:
        return self.supervisor.fatal

    def _setup_metrics(self) -> None:
        m = self.metrics
        m.is_primary.set(1 if self.acting == "primary" else 0)
        m.epoch.set_function(lambda: self.store.current.epoch)  # read live: shipments can raise it
        # Only agents with ZooKeeper roles have a session to report; NaN never trips an alert.
        m.zookeeper_connected.set(0 if self.auto else float("nan"))
        m.track_applied(self.status.applied_captured_at, self.status.lag)
        latest = self.repo.list_snapshots()
        if latest:
            m.last_snapshot.set(latest[-1].captured_at)
        m.apply_delay.set_function(lambda: self.cfg.replication.apply_delay if self.acting != "primary"
                                   else self.replication.apply_delay_s())
        m.received_lag.set_function(lambda: _nan_if_none(self.status.received_lag()))
        m.pending_applies.set_function(lambda: len(self.store.current.pending))
        rx = self.receiver
        if rx is None:
            m.apply_held.set(0)
            m.apply_held_by_guard.set(0)
            m.apply_held_by_operator.set(0)
            m.apply_held_deletions.set(0)
            m.mass_change.set(0)
        else:
            m.apply_held.set_function(lambda: 1 if rx.hold.active else 0)
            m.apply_held_by_guard.set_function(lambda: 1 if rx.hold.snapshot else 0)
            m.apply_held_by_operator.set_function(lambda: 1 if rx.hold.operator_since else 0)
            m.apply_held_deletions.set_function(lambda: rx.hold.removed if rx.hold.snapshot else 0)
            m.mass_change.set_function(lambda: 1 if rx.hold.mass_change else 0)
            m.snapshot_changed_fraction.set_function(lambda: rx.committer.changed_fraction)

    def targets(self) -> list[str]:
        """The standbys this agent ships to: as primary those it feeds, as a standby those that follow it
        (a cascade: replication.upstream under ZooKeeper, replication.standbys with fixed roles)."""
        return list(self.supervisor.feeding) if self.auto else list(self.cfg.replication.standbys)

    @property
    def relaying(self) -> bool:
        """A standby (not an ex-primary waiting to rejoin) ships what it applied to the standbys it feeds."""
        return self.acting == "standby" and self.receiver is not None and not self.supervisor.holding_ex_primary

    def _shipping_clock(self) -> float:
        # A relay stamps its requests with the primary's clock as it estimates it: lag stays one definition.
        return time.time() if self.acting == "primary" else self.store.current.primary_now()

    def _relay_guard(self, final: bool) -> None:
        if final:
            faults.pause("relay-commit")  # tests: a relayed shipment held before its commit
        if not self.relaying:
            raise RefusedError(f"agent {self.name} is no longer a standby; it relays nothing")

    def _relay_applied(self) -> None:
        """Offer the applied snapshot to the standbys that follow this one, with the epoch and position of
        the primary that produced it."""
        st = self.store.current
        if not self.relaying or not st.applied_snapshot or not self.replication.targets():
            return
        try:
            info = self.repo.find_snapshot(st.applied_snapshot)
        except DrsyncError as e:
            log.warning("agent %s: cannot relay snapshot %s: %s", self.name, st.applied_snapshot, e)
            return
        pos = tuple(st.applied_position)
        self.replication.offer(info, (pos[0], pos[1]) if len(pos) == 2 else (st.epoch, 0))

    def _lost_standby_snapshots(self) -> set[str]:
        """The snapshots the newest LOST_STANDBY_KEEP vanished standbys last applied: kept, so that one back
        after a restart negotiates only what changed since; beyond the bound it gets a full negotiation."""
        lost = sorted(self.supervisor.lost_standbys.values(), key=lambda m: -float(m.get("applied_captured_at") or 0))
        return {str(m.get("applied_snapshot") or "") for m in lost[:LOST_STANDBY_KEEP]}

    def _on_applied(self) -> None:
        st = self.store.current
        self.status.activity.add(st.applied_snapshot, True, f"applied (captured {st.lag_s() or 0.0:.1f}s before)")
        self._relay_applied()
        self.wake.set()  # publish the new applied snapshot at once

    def _on_shipped(self, outcome: ShipOutcome) -> None:
        self.status.activity.add(outcome.snapshot, outcome.ok or outcome.paused, f"{outcome.target}: {outcome.summary}")
        self.maintenance.wake()  # retention after the shipments, not while they read the repository
        if outcome.fenced:
            self.wake.set()

    def _duties(self) -> Duties:
        st = self.store.current
        if self.acting == "primary":
            return Duties("primary", frozenset(self.replication.protected() | {st.applied_snapshot}
                                               | self._lost_standby_snapshots()) - {""})
        rx = self.receiver
        # pending: applied later (apply_delay); checkpoints: what the mass-change window judges against
        keep = {st.applied_snapshot, *(p[0] for p in st.pending), *(c[0] for c in st.change_checkpoints),
                *self.replication.protected()} - {""}  # and what a relay ships onward
        # A flagged mass change pauses retention too: the snapshots before it may be the good copy.
        held = rx is not None and (rx.hold.active or bool(rx.hold.flagged))
        return Duties("standby", frozenset(keep), held=held,
                      has_applied=bool(st.applied_snapshot))

    def hold_summary(self) -> dict[str, Any] | None:
        """What holds applies back on this standby (None when nothing does)."""
        rx = self.receiver
        if rx is None or not (rx.hold.active or rx.hold.flagged):
            return None
        return rx.hold.as_dict()

    def serve_requests(self) -> None:
        """Carry out the operator requests the command line left in the state directory (drsync apply...)."""
        try:
            requests.serve_pending(self.state_dir, self)
        except OSError as e:
            log.error("agent %s: cannot read operator requests in %s: %s", self.name, self.state_dir, e)

    def _serve_requests_loop(self) -> None:
        # Its own thread: an operator's confirmed apply may take long, and coordination goes on meanwhile.
        while not self.stop.wait(REQUESTS_EVERY_S):
            try:
                self.serve_requests()
            except Exception:  # a bug must not end request serving silently
                log.exception("agent %s: serving operator requests failed", self.name)

    def _delayed_apply_loop(self) -> None:
        # replication.apply_delay: stored snapshots reach the root once old enough; its own thread, so an
        # apply never stalls coordination (a promotion takes the commit lock and waits for it).
        rx = self.receiver
        assert rx is not None
        while not self.stop.wait(DELAYED_APPLY_EVERY_S):
            if self.acting == "primary":
                continue
            try:
                rx.committer.apply_due()
            except DrsyncError as e:
                log.warning("agent %s: a delayed apply did not run: %s", self.name, e)
            except Exception:  # a bug must not end delayed applies silently
                log.exception("agent %s: delayed apply failed", self.name)

    # --- the primary's captures ---------------------------------------------------------------

    def run_cycle(self, targets: list[str] | None = None) -> CycleDecision:
        """One synchronous cycle: capture, ship to every standby, wait (``drsync agent --once``)."""
        if self.acting != "primary":
            raise RefusedError(f"agent {self.name} is not the primary; it takes no replication cycle")
        return self.replication.run_cycle(self.targets() if targets is None else targets)

    def maintain(self) -> None:
        """One maintenance pass now, on this thread (``drsync agent --once``)."""
        self.maintenance.run_pass()

    def _capture(self) -> bool:
        """Capture a cycle snapshot and offer it to every shipper; False when the capture failed."""
        try:
            self.supervisor.guard(False)
            info = self.replication.capture()
        except DrsyncError as e:
            log.warning("agent %s: cycle failed: %s", self.name, e)
            self.status.activity.add("", False, f"cycle failed: {e}")
            return False
        targets = self.replication.targets()
        self.status.activity.add(info.id, True, f"captured; offered to {', '.join(targets)}" if targets
                          else "snapshot only (no standby registered)")
        gone = sorted(self.supervisor.lost_standbys)
        # An unchanged capture shipping as usual is routine (DEBUG); one that cannot ship (standbys down) is not.
        routine = bool(targets or not gone) and self._unchanged(info)
        log.log(logging.DEBUG if routine else logging.INFO, "agent %s: snapshot %s captured%s",
                self.name, info.id,
                 f"; shipping to {', '.join(targets)}" if targets else
                 f" (no standby to ship to: {', '.join(gone)} down)" if gone else " (no standby registered)")
        self.replication.offer(info)
        if not targets:
            self.maintenance.wake()
        return True

    def _unchanged(self, info: SnapshotInfo) -> bool:
        """The capture's manifest is its parent's, byte for byte (nothing changed since)."""
        if not info.parent:
            return False
        try:
            return self.repo.find_snapshot(info.parent).manifest_hash == info.manifest_hash
        except DrsyncError:
            return False

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Coordinate; as primary, capture every replication.interval; shippers and maintenance run beside."""
        a = self.cfg.agent
        try:
            not_joined = self.supervisor.join()  # a name that is not this agent's own: refused before it starts
        except BaseException:
            self.close()
            raise
        log.info("agent %s started (role %s, pid %d): gRPC on %s%s%s", self.name, self.role, os.getpid(), a.listen,
                 f" (advertised as {a.advertise})" if a.advertise else "",
                 f"; metrics at http://{a.metrics}/metrics, status page at http://{a.metrics}/" if a.metrics else
                 "; no metrics address")
        if not_joined is not None:
            not_joined()  # why it could not join yet: the first step of the coordination backoff
        from drsync.agent.presence import advertise_problem

        problem = advertise_problem(a.advertise, a.listen)
        if problem:
            log.warning("agent %s: %s", self.name, problem)
        self.replication.background = True
        self.maintenance.start()
        threading.Thread(target=self._serve_requests_loop, name="drsync-requests", daemon=True).start()
        if self.receiver is not None and self.cfg.replication.apply_delay > 0:
            threading.Thread(target=self._delayed_apply_loop, name="drsync-delayed-apply", daemon=True).start()
        try:
            self._loop()
        except BaseException as e:
            # Not an error drsync knows (a bug, an I/O error nothing caught): the agent stops whole. Left
            # half alive (servers, ZooKeeper session and role kept, no loop) it would hold its role and
            # answer peers while nothing coordinates: a switchover or promotion would wait on it forever.
            if not isinstance(e, KeyboardInterrupt):
                log.critical("agent %s stops: unexpected error in its loop: %r (its role is released; the "
                             "service manager restarts it)", self.name, e, exc_info=True)
            raise
        finally:
            self.close()
        log.info("agent %s stopped (%s)", self.name, f"fatal: {self.supervisor.fatal}"
                 if self.supervisor.fatal is not None else "on request")

    def _loop(self) -> None:
        sched = self.schedule
        sup = self.supervisor
        ship_mode = ""
        while not self.stop.is_set() and sup.fatal is None:
            self.wake.clear()
            try:
                sup.coordinate()
            except DrsyncError as e:
                sup.pass_failed(e)  # one line per backoff step, never a pass per wake-up
            if sup.fatal is not None:
                break
            self.status.activity.sample_lag()
            if self.receiver is not None:
                self.receiver.intake.expire_idle()  # a sender that died mid-shipment lets GC run again
            primary = sup.acting_primary
            relaying = self.relaying
            mode = "primary" if primary else "relay" if relaying else ""
            if mode != ship_mode:  # a relay's offers (an earlier epoch's snapshots) never go out as a primary's
                self.replication.set_targets([])
                ship_mode = mode
            self.replication.target_names = dict(sup.feeding)
            new = self.replication.set_targets(self.targets() if primary or relaying else [])
            if new and relaying:
                self._relay_applied()  # a standby started to follow this one: its applied snapshot at once
            sched.set_active(primary)
            if sup.cycle_now.is_set() or (new and primary):
                sup.cycle_now.clear()
                sched.request()
            wait = COORDINATE_EVERY_S if self.auto else 1.0
            if primary:
                nxt = sched.next()
                if nxt.due:
                    sched.started(nxt)
                    sched.finished(self._capture())
                    continue  # coordinate again right after a capture
                wait = max(0.01, min(wait, nxt.wait_s))
            self.wake.wait(wait)

    def close(self) -> None:
        self.stop.set()
        self.schedule.set_active(False)
        self.replication.close()
        self.maintenance.stop()
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        if self.receiver is not None:
            self.receiver.close()
        coord = self.supervisor.coord
        if coord is not None:
            self.supervisor.leave()
            coord.close()
            self.supervisor.coord = None
        if self.dir_lock is not None:
            self.dir_lock.release()
            self.dir_lock = None
        for lock in self.host_locks:
            lock.release()
        self.host_locks = []
