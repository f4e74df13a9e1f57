"""The agent: one process beside one cluster, with a fixed role (ZooKeeper roles come later).

The primary's pass is :meth:`Agent.run_cycle`, which returns a readable
decision; :meth:`Agent.run` is the loop with backoff around it. The standby
serves shipments and, before anything else, finishes or rolls back an apply
that a crash interrupted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from drsync import engine
from drsync.agent.primary import ship_snapshot
from drsync.agent.standby import StandbyReceiver, StateFile
from drsync.config import Config
from drsync.errors import DrsyncError, RefusedError, UsageError
from drsync.metrics import AgentMetrics, new_registry, serve
from drsync.repository.manifest import Manifest
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink, ReplicationServicer, start_server

log = logging.getLogger("drsync.agent")

# Garbage collection reads every kept manifest; once an hour is plenty.
GC_EVERY_S = 3600.0


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


class Agent:
    def __init__(self, cfg: Config, *, serve_network: bool = True) -> None:
        self.cfg = cfg
        self.name = cfg.agent.name
        self.role = cfg.agent.role
        if self.role == "auto":
            raise UsageError("agent.role = auto needs ZooKeeper coordination, which this build does not have "
                             "yet; set agent.role = \"primary\" or \"standby\"")
        self.repo = Repository.open(open_storage(cfg.cluster.repository))
        state_dir = cfg.agent.state_dir or os.path.join(engine.local_path(cfg.cluster.repository, "repository"),
                                                        "agent")
        self.state_file = StateFile(state_dir)
        self.receiver: StandbyReceiver | None = None
        if self.role == "standby":
            self.receiver = StandbyReceiver(self.repo, engine.local_path(cfg.cluster.data, "data root"),
                                            self.state_file, agent=self.name, keep=cfg.snapshots.keep)
            if self.receiver.recover():
                log.warning("agent %s: finished an apply that was interrupted", self.name)
            self.state = self.receiver.state
        else:
            self.state = self.state_file.load()
            if self.state.epoch == 0:  # a static primary starts the epoch sequence
                self.state.epoch = 1
                self.state_file.save(self.state)
        self.metrics = AgentMetrics(new_registry(), group=cfg.coordination.group, agent=self.name)
        self.metrics.is_primary.set(1 if self.role == "primary" else 0)
        self.metrics.epoch.set_function(lambda: self.state.epoch)  # read live: shipments can raise it
        # Capture time of the newest snapshot each standby has applied (primary's view).
        self.standby_applied: dict[str, float] = {}
        self.standby_snapshot: dict[str, str] = {}  # standby -> the snapshot id it has applied
        self._last_gc = 0.0
        if self.receiver is not None:
            receiver = self.receiver
            self.metrics.track_applied(lambda: receiver.state.applied_captured_at or None)
        else:
            self.metrics.track_applied(self._oldest_standby_applied)
        latest = self.repo.list_snapshots()
        if latest:
            self.metrics.last_snapshot.set(latest[-1].captured_at)
        self.metrics_server = (serve(self.metrics.registry, cfg.agent.metrics)
                               if cfg.agent.metrics and serve_network else None)
        tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
        self.tls = tls
        self.server = start_server(
            ReplicationServicer(self.receiver, agent=self.name, role=self.role, cluster_id=cfg.cluster.id,
                                release=cfg.cluster.release),
            cfg.agent.listen, tls=tls, allow_insecure_remote=cfg.agent.allow_insecure_remote,
        ) if serve_network else None
        self.stop = threading.Event()

    def _oldest_standby_applied(self) -> float | None:
        standbys = self.cfg.replication.standbys
        if not standbys or any(t not in self.standby_applied for t in standbys):
            return None
        return min(self.standby_applied[t] for t in standbys) or None

    def _manifest_if_known(self, snapshot_id: str) -> Manifest | None:
        try:
            return self.repo.load_manifest(self.repo.find_snapshot(snapshot_id))
        except DrsyncError:
            return None  # gone from this repository (expired): negotiate everything

    def run_cycle(self) -> CycleDecision:
        """Snapshot, then ship to every standby what it lacks."""
        assert self.role == "primary"
        started = time.monotonic()
        decision = self._cycle()
        decision.duration_s = round(time.monotonic() - started, 3)
        return decision

    def _cycle(self) -> CycleDecision:
        snaps = self.cfg.snapshots
        req = engine.SnapshotRequest(self.cfg.cluster.data, kind="cycle", reason="replication cycle",
                                     hooks=engine.Hooks(snaps.pre_hook, snaps.post_hook, snaps.hook_timeout),
                                     reread_attempts=snaps.reread_attempts)
        info = engine.create_snapshot(self.repo, req)
        self.metrics.last_snapshot.set(info.captured_at)
        self.metrics.snapshot_duration.observe(info.duration_s)
        decision = CycleDecision("shipped", info.id)
        for target in self.cfg.replication.standbys:
            link = GrpcStandbyLink(target, tls=self.tls)
            try:
                hello = link.hello(self.name, self.state.epoch)
                applied = None
                if hello.applied_snapshot:
                    self.standby_applied[target] = hello.applied_captured_at
                    self.standby_snapshot[target] = hello.applied_snapshot
                    applied = self._manifest_if_known(hello.applied_snapshot)
                res = ship_snapshot(self.repo, info, link, epoch=self.state.epoch, sender=self.name,
                                    bandwidth_bps=self.cfg.replication.bandwidth_limit, applied=applied)
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
            except DrsyncError as e:
                decision.shipped[target] = f"failed: {e}"
                decision.ok = False
                self.metrics.ship_failures.inc()
            finally:
                link.close()
        return decision

    def run(self) -> None:
        """Serve; as primary, run a cycle every replication.interval, backing off after failures."""
        log.info("agent %s running as %s on %s", self.name, self.role, self.cfg.agent.listen)
        backoff = 1.0
        while not self.stop.is_set():
            if self.role != "primary":
                self.stop.wait(1.0)
                continue
            started = time.monotonic()
            try:
                decision = self.run_cycle()
            except DrsyncError as e:
                decision = CycleDecision(f"cycle failed: {e}", ok=False)
            log.info("agent %s: %s", self.name, decision)
            self.maintain()
            if decision.ok:
                backoff = 1.0
                wait = max(0.0, self.cfg.replication.interval - (time.monotonic() - started))
            else:
                wait = min(backoff, self.cfg.replication.interval)
                backoff = min(backoff * 2, 60.0)
            self.stop.wait(wait)
        self.close()

    def maintain(self) -> None:
        """Retention for cycle snapshots ([snapshots] keep); garbage collection at most hourly."""
        collect = time.monotonic() - self._last_gc >= GC_EVERY_S
        try:
            res = engine.expire_snapshots(self.repo, self.cfg.snapshots.keep, collect=collect,
                                          protect=frozenset(self.standby_snapshot.values()))
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
