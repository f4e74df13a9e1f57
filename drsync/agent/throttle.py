"""What one standby target may use of the network now: its bandwidth limit and schedule.

A :class:`TargetBandwidth` reads the schedule in force for its target (``replication.bandwidth_limit``
and ``bandwidth_schedule``, or the target's own in ``[replication.targets."<name or address>"]``) at
every call, on the agent host's clock (``now``, injectable), and logs once when shipping to the target
pauses (the rate turned ``off``) and once when it resumes. Rates are bytes per second: 0 unlimited,
None off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from drsync.bandwidth import Schedule, constant, describe_rate, next_change, rate_at
from drsync.units import iso_time

log = logging.getLogger("drsync.agent")

# A paused shipper looks at the schedule again at least this often (seconds): a clock set forward or
# back, or a daylight-saving change, never keeps it waiting for a moment that is no longer coming.
RECHECK_S = 60.0


def local_now() -> datetime:
    """Now, aware, in the agent host's local time zone."""
    return datetime.now().astimezone()


class TargetBandwidth:
    """The rate in force for one standby target, read live from its schedule."""

    def __init__(self, target: str, schedule: Callable[[], Schedule], *,
                 now: Callable[[], datetime] = local_now, label: Callable[[], str] | None = None) -> None:
        self.target = target
        self._schedule = schedule
        self._now = now
        self._label = label or (lambda: target)
        self._lock = threading.Lock()
        self._paused_until: datetime | None = None  # while off: when the rate changes next
        self._paused = False

    @classmethod
    def fixed(cls, target: str, rate_bps: float) -> TargetBandwidth:
        """A target with one rate at every time of day (bytes/s, 0 unlimited)."""
        schedule = Schedule(default=rate_bps)
        return cls(target, lambda: schedule)

    def rate(self) -> float | None:
        """The rate in force now (bytes/s; 0 unlimited; None off). Logs a pause and a resume once each."""
        schedule, now = self._schedule(), self._now()
        rate = rate_at(schedule, now)
        with self._lock:
            was, self._paused = self._paused, rate is None
            if rate is None:
                self._paused_until = None if constant(schedule) else next_change(schedule, now)
            else:
                self._paused_until = None
            until = self._paused_until
        if rate is None and not was:
            log.warning("shipping to %s paused by replication.bandwidth_schedule %s", self._label(),
                        f"until {_clock_time(until, now)}" if until is not None else "(off at every time of day)")
        elif rate is not None and was:
            log.info("shipping to %s resumed: replication.bandwidth_schedule allows %s", self._label(),
                     describe_rate(rate))
        return rate

    def paused(self) -> bool:
        """Whether shipping to this target is off now."""
        return self.rate() is None

    def resume_in_s(self) -> float | None:
        """While off: seconds to wait before looking again (until the next change, at most RECHECK_S);
        None when shipping is allowed now."""
        if self.rate() is not None:
            return None
        with self._lock:
            until = self._paused_until
        if until is None:
            return RECHECK_S
        return max(0.05, min(RECHECK_S, (until - self._now()).total_seconds()))

    def pause_words(self) -> str:
        """Why nothing ships now, in words for a log line or an outcome."""
        with self._lock:
            until = self._paused_until
        return "paused by replication.bandwidth_schedule" + (
            f" until {_clock_time(until, self._now())}" if until is not None else " (off at every time of day)")

    # --- for metrics and the status page ---------------------------------------------------------

    def limit_gauge(self) -> float:
        """The rate in force for a gauge: bytes/s, 0 unlimited, -1 off."""
        rate = self.rate()
        return -1.0 if rate is None else rate

    def paused_gauge(self) -> float:
        return 1.0 if self.rate() is None else 0.0

    def as_dict(self) -> dict[str, Any]:
        rate = self.rate()
        with self._lock:
            until = self._paused_until
        return {"rate": describe_rate(rate), "limit_bytes_per_second": -1 if rate is None else rate,
                "paused": rate is None, "paused_until": iso_time(until.timestamp()) if until is not None else None,
                "paused_until_unix": round(until.timestamp(), 3) if until is not None else None}


def _clock_time(at: datetime, now: datetime) -> str:
    """``18:00``, or ``Tue 18:00`` when not within the next day, with its zone when it has one."""
    text = at.strftime("%H:%M" if (at - now).total_seconds() < 86400 - 60 else "%a %H:%M")
    zone = at.tzname() if at.tzinfo is not None else None
    return f"{text} {zone}" if zone else text
