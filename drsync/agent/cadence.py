"""When the primary captures next: the pure decision behind ``replication.mode``. No I/O, no clock.

* ``interval``: one capture every ``replication.interval``.
* ``continuous``, watching the data root for changes (a local root, :mod:`drsync.agent.watcher`): a change
  makes a capture due ``settle`` after the *first* change not yet captured (a burst becomes one
  snapshot), but never sooner than ``min_interval`` after the previous capture started; a root that never
  goes quiet thus still gets a capture every ``min_interval``. Without changes, one capture every
  ``interval`` all the same (a heartbeat: lag stays bounded, and an event the kernel lost is covered).
* ``continuous`` without notification (an HDFS root, or a watch that failed): a capture every
  ``min_interval`` (polling; cheap when little changed).

After a failed capture the caller's backoff (``retry_at``) decides, whatever changed meanwhile.
Times are the caller's monotonic clock, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from drsync.config import Config

# Why a capture was taken (the ``trigger`` label of drsync_captures_total).
FIRST = "first"  # no capture yet since this agent became primary
REQUEST = "request"  # asked for: a new standby, a switchover, an operator
INTERVAL = "interval"  # mode "interval": the interval elapsed
CHANGE = "change"  # the data root changed (notification)
HEARTBEAT = "heartbeat"  # continuous: nothing changed for a whole interval
POLL = "poll"  # continuous without notification: min_interval elapsed
RETRY = "retry"  # the previous capture failed; its backoff elapsed
TRIGGERS = (FIRST, REQUEST, INTERVAL, CHANGE, HEARTBEAT, POLL, RETRY)


@dataclass(frozen=True)
class Cadence:
    """The capture settings of ``[replication]`` (seconds)."""

    mode: str = "interval"  # "interval" | "continuous"
    interval: float = 300.0  # interval mode: between captures; continuous: the longest time between them
    min_interval: float = 1.0  # continuous: the shortest time between two capture starts
    settle: float = 0.2  # continuous: from the first change to its capture (a burst becomes one snapshot)

    @classmethod
    def of(cls, cfg: Config) -> Cadence:
        r = cfg.replication
        return cls(r.mode, r.interval, min(r.min_interval, r.interval), r.settle)

    @property
    def continuous(self) -> bool:
        return self.mode == "continuous"


@dataclass(frozen=True)
class Next:
    """The next capture: due in ``wait_s`` seconds (0: now), and why."""

    wait_s: float
    trigger: str

    @property
    def due(self) -> bool:
        return self.wait_s <= 0


def next_capture(c: Cadence, *, now: float, last_start: float | None, first_change: float | None = None,
                 watching: bool = False, retry_at: float | None = None, requested: bool = False) -> Next:
    """When to capture next.

    ``last_start``: when the previous capture started (None: none yet); ``first_change``: when the first
    change not yet captured was seen (None: none seen); ``watching``: changes are notified (else a
    continuous cadence polls every ``min_interval``); ``retry_at``: the previous capture failed and its
    backoff ends then; ``requested``: a capture was asked for (a new standby, a switchover)."""
    if requested:
        return Next(0.0, REQUEST)
    if last_start is None:
        return Next(0.0, FIRST)
    if retry_at is not None:
        return Next(max(0.0, retry_at - now), RETRY)
    heartbeat = last_start + c.interval
    if not c.continuous:
        return Next(max(0.0, heartbeat - now), INTERVAL)
    floor = last_start + min(c.min_interval, c.interval)
    if not watching:
        return Next(max(0.0, floor - now), POLL)
    if first_change is not None:
        at = max(first_change + c.settle, floor)
        if at < heartbeat:
            return Next(max(0.0, at - now), CHANGE)
    return Next(max(0.0, heartbeat - now), HEARTBEAT)
