"""The primary's capture schedule: :mod:`drsync.agent.cadence` decides, this keeps its state.

One :class:`CaptureSchedule` per agent, driven by the agent's loop (one thread): :meth:`next` says when
the next capture is due and why, :meth:`started` / :meth:`finished` record a capture. With
``replication.mode = "continuous"`` on a local data root it runs a :class:`~drsync.agent.watcher.RootWatcher`
while the agent acts as primary (a standby's root is written by applies: nothing to watch). When the
watch cannot be set up or stops being trustworthy (the kernel's queue overflowed, the watch limit was
reached, the root was replaced), the schedule falls back to a capture every ``min_interval`` and says so
once, in one warning naming the cause and the sysctl to raise; ``drsync_change_watch`` turns 0. Every
``WATCH_RETRY_S`` it tries to watch again (one INFO line when it works; the warning again only for
another cause).
HDFS has no notification: a continuous agent captures every ``min_interval`` there (snapshot-diff
captures, cheap when little changed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from drsync.agent.cadence import CHANGE, HEARTBEAT, INTERVAL, POLL, Cadence, Next, next_capture
from drsync.config import Config
from drsync.fsutil import is_local_location, local_or_none
from drsync.metrics import AgentMetrics

log = logging.getLogger("drsync.agent")

# After a failed capture the next one waits this long, doubling up to the cap (never beyond the interval).
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# After a fallback the watch is set up again this often (an operator raised the watch limit, the root was
# mounted again): notification comes back without an agent restart.
WATCH_RETRY_S = 300.0


def is_local(data: str) -> bool:
    """Whether a data root is a local directory (a path or file:// URL), where changes can be watched."""
    return is_local_location(data)


class CaptureSchedule:
    def __init__(self, cfg: Config, *, data_root: str, exclude: Iterable[str], metrics: AgentMetrics,
                 wake: Callable[[], None], name: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.cadence = Cadence.of(cfg)
        self.data_root = data_root
        self.exclude = tuple(p for p in map(local_or_none, exclude) if p)
        self.metrics = metrics
        self.wake = wake
        self.name = name or cfg.agent.name
        self.clock = clock
        self.watchable = self.cadence.continuous and is_local(data_root)
        self.watcher: Any = None  # a RootWatcher while acting as primary in continuous mode on a local root
        self.fallback = ""  # why notification was given up (continuous mode polls every min_interval then)
        self._warned = ""  # the cause last warned of (a retry failing the same way is not said again)
        self._retry_watch_at = 0.0
        self.last_start: float | None = None
        self.retry_at: float | None = None
        self.backoff_s = BACKOFF_FIRST_S
        self.requested = False
        self._coverage_checked: float | None = None
        metrics.change_watch.set(float("nan") if not self.cadence.continuous else 0)
        for trigger in (CHANGE, HEARTBEAT, POLL) if self.cadence.continuous else (INTERVAL,):
            metrics.capture_triggered(trigger, 0)

    # --- the watcher follows the role -----------------------------------------------------------------

    def set_active(self, primary: bool) -> None:
        """Watch the root while acting as primary (continuous mode, local root); stop watching otherwise.
        A new primary starts with a capture at once."""
        if not primary:
            self.last_start = None
            self.retry_at = None
            self._stop_watcher()
            return
        if self.watchable and self.watcher is None and (not self.fallback or self.clock() >= self._retry_watch_at):
            self._start_watcher()

    def _start_watcher(self) -> None:
        from drsync.agent.watcher import RootWatcher, WatchError

        w = RootWatcher(self.data_root, exclude=self.exclude, on_change=self.wake)
        try:
            w.start()
        except WatchError as e:
            self._fall_back(str(e))
            return
        self.watcher = w
        problem = w.coverage_problem()
        self._coverage_checked = self.clock()
        if problem:
            self._fall_back(problem)
            return
        self.metrics.change_watch.set(1)
        if self.fallback:
            log.info("agent %s: continuous replication: notification works again (%s no longer holds)", self.name,
                     self.fallback)
            self.fallback = self._warned = ""
            self.requested = True  # what changed while polling is covered by a capture now
            return
        log.info("agent %s: continuous replication: watching data root %s for changes (a capture at most every "
                 "%gs, at least every %gs)", self.name, self.data_root, self.cadence.min_interval,
                 self.cadence.interval)

    def _stop_watcher(self) -> None:
        w, self.watcher = self.watcher, None
        if w is not None:
            w.stop()
        if self.cadence.continuous:
            self.metrics.change_watch.set(0)

    def _fall_back(self, cause: str) -> None:
        self._stop_watcher()
        self.fallback = cause
        self._retry_watch_at = self.clock() + WATCH_RETRY_S
        if cause == self._warned:
            log.debug("agent %s: continuous replication: still no notification: %s", self.name, cause)
            return
        self._warned = cause
        log.warning("agent %s: continuous replication falls back to a capture every %gs "
                    "(replication.min_interval): %s", self.name, self.cadence.min_interval, cause)

    # --- the decision -------------------------------------------------------------------------

    def request(self) -> None:
        """Capture at the next pass (a new standby, a switchover, an operator)."""
        self.requested = True

    def next(self) -> Next:
        """When the next capture is due (as primary), and why."""
        w = self.watcher
        if w is not None:
            problem = w.problem()
            if problem:
                self._fall_back(problem)
                w = None
        return next_capture(self.cadence, now=self.clock(), last_start=self.last_start,
                            first_change=w.first_change if w is not None else None, watching=w is not None,
                            retry_at=self.retry_at, requested=self.requested)

    def started(self, nxt: Next) -> None:
        """A capture starts now: it covers every change seen so far."""
        now = self.clock()
        w = self.watcher
        if w is not None:
            w.take()
            if nxt.trigger == HEARTBEAT and self._coverage_checked is not None and \
                    now - self._coverage_checked >= self.cadence.interval:
                # Once per heartbeat, the whole tree (watchdog skips a directory it cannot watch silently).
                self._coverage_checked = now
                problem = w.coverage_problem()
            else:  # at every capture, the directories created since the last one: the watch limit may stop them
                problem = w.new_dirs_problem()
            if problem:
                self._fall_back(problem)
        self.requested = False
        self.last_start = now
        self.metrics.capture_triggered(nxt.trigger)

    def finished(self, ok: bool) -> None:
        if ok:
            self.retry_at, self.backoff_s = None, BACKOFF_FIRST_S
            return
        self.retry_at = self.clock() + min(self.backoff_s, self.cadence.interval)
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)

    # --- what the status page shows -------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        c = self.cadence
        doc: dict[str, Any] = {"mode": c.mode, "interval_s": c.interval}
        if not c.continuous:
            doc["captures"] = f"every {c.interval:g}s"
            return doc
        doc |= {"min_interval_s": c.min_interval, "settle_s": c.settle,
                "watching": self.watcher is not None, "fallback": self.fallback or None}
        if self.watcher is not None:
            doc["captures"] = (f"on change (inotify), at most every {c.min_interval:g}s, at least every "
                               f"{c.interval:g}s")
        elif self.fallback:
            doc["captures"] = f"every {c.min_interval:g}s (notification given up: {self.fallback})"
        elif self.watchable:
            doc["captures"] = "on change, once this agent acts as primary"
        else:
            doc["captures"] = f"every {c.min_interval:g}s (polling: no change notification on {self.data_root})"
        return doc

