"""Prometheus metrics of one agent: the only module that imports prometheus_client.

Metrics live in a registry passed in (never module globals), carry the
``group`` and ``agent`` labels, and use base units (seconds, bytes). Lag is
computed when scraped (by the agent's one lag function, drsync.agent.clock.lag_s,
on the primary's clock), so it keeps growing while shipments fail instead of
freezing at its last value.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from drsync.errors import UsageError

PREFIX = "drsync_"
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, *, group: str, agent: str) -> None:
        self.registry = registry
        labels = ["group", "agent"]
        values = {"group": group, "agent": agent}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry).labels(**values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry).labels(**values)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=_DURATION_BUCKETS,
                             registry=registry).labels(**values)

        self.is_primary = gauge("is_primary", "1 when this agent acts as primary")
        self.epoch = gauge("epoch", "Highest fencing epoch this agent has seen")
        self.zookeeper_connected = gauge("zookeeper_connected",
                                         "1 while this agent's ZooKeeper session is connected (agent.role = auto)")
        self.replication_lag = gauge("replication_lag_seconds",
                                     "Now minus the capture time of the newest snapshot applied on the standby, "
                                     "both on the primary's clock")
        self.apply_delay = gauge("apply_delay_seconds", (
            "replication.apply_delay of the standby this lag is about (a primary: of its standby furthest behind "
            "beyond its delay); alert on replication_lag_seconds minus this"))
        self.received_lag = gauge("replication_received_lag_seconds", (
            "Now minus the capture time of the newest snapshot stored on this standby, applied or not "
            "(primary's clock): the work a promotion that applies everything received would lose"))
        self.pending_applies = gauge("pending_applies", "Snapshots stored on this standby and waiting for "
                                                        "replication.apply_delay")
        self.last_snapshot = gauge("last_snapshot_timestamp_seconds", "Capture time of the newest snapshot taken")
        self.last_applied = gauge("last_applied_snapshot_timestamp_seconds",
                                  "Capture time of the newest snapshot applied on the standby")
        self.snapshot_stale_paths = gauge(
            "snapshot_stale_paths", "Paths that exist but could not be read in the newest snapshot (kept at their "
                                    "last captured version, never deleted)")
        self.snapshot_skipped_paths = gauge("snapshot_skipped_paths",
                                            "Paths the newest snapshot could not capture at all")
        # Why each capture of the primary was taken (drsync.agent.cadence): change, heartbeat, poll, interval...
        self.captures = Counter(PREFIX + "captures", "Snapshots the primary captured for replication, by what "
                                "triggered them", [*labels, "trigger"], registry=registry)
        self._capture_labels = values
        self.change_watch = gauge("change_watch", "replication.mode = \"continuous\": 1 while changes of the data "
                                                  "root are notified (inotify), 0 while it is polled every "
                                                  "min_interval (HDFS, or notification given up); NaN in "
                                                  "interval mode")
        self.snapshot_duration = histogram("snapshot_duration_seconds", "Time to capture a snapshot")
        self.ship_duration = histogram("ship_duration_seconds", "Time to negotiate, ship and commit a snapshot")
        self.shipped_bytes = counter("shipped_bytes", "Stored bytes sent to standbys")
        self.deduplicated_bytes = counter("deduplicated_bytes",
                                          "Bytes of shipped snapshots the standby already had")
        self.delta_chunks = counter("delta_chunks", "Chunks sent to standbys as deltas against chunks they hold "
                                                    "(a far or limited link)")
        self.manifest_bytes = counter("manifest_bytes", "Bytes of manifests, or of manifest patches, sent to "
                                                        "standbys in commits (none for a manifest named)")
        self.ship_failures = counter("ship_failures", "Shipments that failed or were refused")
        self.backup_last_success = gauge("backup_last_success_timestamp_seconds", "Time of the last good backup")
        self.drill_last_success = gauge("drill_last_success_timestamp_seconds", "Time of the last passed drill")
        self.drill_last_result = gauge("drill_last_result", "1 when the last drill passed, 0 when it failed")
        self.drill_rto = gauge("drill_rto_seconds", "Recovery time estimated by the last drill")
        self.drill_rpo = gauge("drill_rpo_seconds", "Data-loss window (lag) measured by the last drill")
        self.apply_held = gauge("apply_held", "1 while this standby holds applies back (a snapshot held by the "
                                              "deletion guard, or drsync apply --hold), else 0")
        self.apply_held_by_guard = gauge("apply_held_by_guard", "1 while the deletion or mass-change guard of "
                                                                "this standby holds a snapshot back, else 0 (what "
                                                                "DrsyncApplyHeld pages for)")
        self.apply_held_by_operator = gauge("apply_held_by_operator", "1 while an operator's drsync apply --hold "
                                                                      "is in force on this standby, else 0 (an "
                                                                      "intentional hold: no page)")
        self.apply_held_deletions = gauge("apply_held_deletions", "Files the snapshot held by the deletion guard "
                                                                  "would remove (0 when none is held)")
        self.retention_protected = gauge(
            "retention_protected_snapshots", "Snapshots the last retention pass found due for deletion (TTL or "
                                             "[snapshots] keep) but kept because [snapshots] protect covers them")
        self._break_glass: Callable[[], int] = lambda: 0
        registry.register(_CountFromCallable(
            PREFIX + "protected_snapshot_deletions", "Snapshots deleted with --break-glass while [snapshots] "
            "protect covered them (recorded in the agent's state directory, so one-shot commands count)",
            values, lambda: self._break_glass()))
        self.mass_change = gauge("mass_change", "1 while a mass change awaits an operator: a snapshot held because "
                                                "it rewrites the content of more than replication.max_change_"
                                                "fraction of the files, or one applied with on_mass_change = "
                                                "\"alert\" and not yet acknowledged; else 0")
        self.snapshot_changed_fraction = gauge(
            "snapshot_changed_fraction", "Share of the applied snapshot's files whose content the last shipment "
                                         "judged rewrites (NaN before one is judged)")
        self.snapshot_changed_fraction.set(float("nan"))
        # Per standby target (a primary's shippers), read when scraped: see track_bandwidth.
        self._values = values
        self._bandwidth_limit = Gauge(
            PREFIX + "bandwidth_limit_bytes_per_second", "Rate a primary may ship to this standby target now "
            "(replication.bandwidth_limit / bandwidth_schedule / [replication.targets]): bytes/s, 0 unlimited, "
            "-1 off", [*labels, "target"], registry=registry)
        self._bandwidth_paused = Gauge(
            PREFIX + "bandwidth_paused", "1 while replication.bandwidth_schedule has shipping to this standby "
            "target off (not a failure: it resumes when the window allows), else 0", [*labels, "target"],
            registry=registry)
        # Before the first backup or drill there is no value to report: NaN, never a false "long ago".
        for g in (self.backup_last_success, self.drill_last_success, self.drill_last_result, self.drill_rto,
                  self.drill_rpo):
            g.set(float("nan"))
        self._applied_at: Callable[[], float | None] = lambda: None
        self._lag_now: Callable[[], float | None] = lambda: None
        self.replication_lag.set_function(self._lag)
        self.last_applied.set_function(lambda: self._applied_at() or 0.0)

    def track_applied(self, captured_at: Callable[[], float | None], lag: Callable[[], float | None]) -> None:
        """Where to read the capture time of the newest applied snapshot and the lag now (both None before
        the first). The lag is the agent's, on the primary's clock: never recomputed here from this
        machine's clock."""
        self._applied_at = captured_at
        self._lag_now = lag

    def track_bandwidth(self, target: str, limit: Callable[[], float], paused: Callable[[], float]) -> None:
        """Where to read a standby target's rate in force (bytes/s, 0 unlimited, -1 off) and whether its
        shipping is paused (1/0), when scraped."""
        self._bandwidth_limit.labels(**self._values, target=target).set_function(limit)
        self._bandwidth_paused.labels(**self._values, target=target).set_function(paused)

    def forget_bandwidth(self, target: str) -> None:
        """A target that is no longer one: its series go."""
        for g in (self._bandwidth_limit, self._bandwidth_paused):
            try:
                g.remove(*self._values.values(), target)
            except KeyError:
                pass

    def capture_triggered(self, trigger: str, count: int = 1) -> None:
        """Count a capture by what triggered it (``count=0`` shows a trigger at zero before its first)."""
        self.captures.labels(**self._capture_labels, trigger=trigger).inc(count)

    def track_break_glass(self, count: Callable[[], int]) -> None:
        """Where to read how many protected snapshots were deleted with --break-glass (a persisted count)."""
        self._break_glass = count

    def _lag(self) -> float:
        lag = self._lag_now()
        if lag is None:
            return float("nan")  # nothing applied yet: no lag to speak of, and no false "all good"
        return lag


class _CountFromCallable:
    """A counter whose value is read when scraped (from a count kept outside this process, e.g. a file)."""

    def __init__(self, name: str, doc: str, labels: Mapping[str, str], count: Callable[[], int]) -> None:
        self.name, self.doc, self.labels, self.count = name, doc, dict(labels), count

    def _family(self, value: float | None) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        if value is not None:
            family.add_metric(list(self.labels.values()), value)
        return family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family(None)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield self._family(float(self.count()))


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    pages: Mapping[str, Callable[[], tuple[str, bytes]]]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                ctype, body = CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path in self.pages:
                ctype, body = self.pages[path]()
            else:
                self.send_error(404, "not found: try /metrics or /")
                return
        except Exception as e:  # a broken page must not take the metrics endpoint down
            self.send_error(500, f"{type(e).__name__}: {e}")
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line each
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that resets its connection (a scrape timeout, a health check): not the agent's error,
        # and never a traceback on stderr (socketserver prints one by default).
        logging.getLogger("drsync.metrics").debug("metrics: a request from %s failed", client_address,
                                                  exc_info=True)


def serve(registry: CollectorRegistry, address: str,
          pages: Mapping[str, Callable[[], tuple[str, bytes]]] | None = None) -> ThreadingHTTPServer:
    """Serve /metrics (and ``pages``: path -> (content type, body)) on ``host:port``.

    Returns the server; ``.shutdown()`` stops it.
    """
    host, _, port = address.rpartition(":")
    handler = type("Handler", (_Handler,), {"registry": registry, "pages": dict(pages or {})})
    try:
        server = _Server((host or "127.0.0.1", int(port)), handler)
    except OSError as e:
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise UsageError(f"cannot serve metrics on {address}: {why}; set agent.metrics to a free host:port") from None
    except ValueError as e:
        raise UsageError(f"cannot serve metrics on {address}: {e}; set agent.metrics to a free host:port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="drsync-metrics", daemon=True).start()
    return server


def new_registry() -> CollectorRegistry:
    return CollectorRegistry()
