"""Bandwidth by time of day: ``replication.bandwidth_schedule``, parsed and looked up. Pure.

A schedule is a list of windows of wall-clock time of day, each with a rate::

    "08:00-18:00 20MiB/s, 18:00-08:00 off"
    "01:00-05:00 unlimited, 09:00-17:00 5MiB/s UTC"      # optional time zone at the end

or, in TOML, ``[{ from = "08:00", to = "18:00", rate = "20MiB/s" }, ...]``. Times are ``HH:MM``
(``24:00`` is accepted as an end: midnight at the end of the day); a window whose end is not after its
start wraps midnight (``18:00-08:00``). Windows may not overlap. Times are the agent host's local time
unless the schedule ends with a time zone name (``UTC``, ``Europe/Paris``). Times covered by no window
use ``replication.bandwidth_limit`` (:attr:`Schedule.default`).

Rates are bytes per second (floats): ``0`` means unlimited and ``None`` means off (nothing is
shipped). Minutes are the schedule's resolution: a window ``08:00-18:00`` covers 08:00:00 up to, not
including, 18:00:00.

This module sits beside ``drsync.config`` (which parses with it) and imports only ``drsync.errors``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from drsync.errors import ConfigError

MINUTES_PER_DAY = 24 * 60
EXAMPLE = '"08:00-18:00 20MiB/s, 18:00-08:00 off"'

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?(?:/s)?\s*$")
_RATE_UNITS = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_UNIT_RE = re.compile(r"^(B|KB|MB|GB|KiB|MiB|GiB)(/s)?$")
_ZONE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-/]*$")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_WINDOW_RE = re.compile(r"^\s*(\S+?)\s*-\s*(\S+)\s+(.+?)\s*$")
OFF, UNLIMITED = "off", "unlimited"


def parse_rate(value: Any, key: str) -> float:
    """Bytes per second from ``"50MiB/s"``, ``"100MB"`` or a number of bytes per second; 0 means unlimited."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a rate; write e.g. '50MiB/s' or 0 for unlimited")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def _window_rate(value: Any, key: str) -> float | None:
    """A window's rate: bytes per second, 0 for ``unlimited``, None for ``off``."""
    if isinstance(value, str) and value.strip().lower() == OFF:
        return None
    if isinstance(value, str) and value.strip().lower() == UNLIMITED:
        return 0.0
    try:
        rate = parse_rate(value, key)
    except ConfigError:
        raise ConfigError(f"{key}: {value!r} is not a rate; write e.g. '20MiB/s', 'unlimited' or 'off' "
                          f"(a schedule looks like {EXAMPLE})") from None
    if rate < 1:  # 0 reads as "nothing" to some and as unlimited (bandwidth_limit = 0) to others
        raise ConfigError(f"{key}: a window's rate {value!r} is ambiguous or below 1 byte/s; write 'off' (no "
                          f"shipping), 'unlimited', or a rate such as '20MiB/s'")
    return rate


@dataclass(frozen=True)
class Window:
    """One window: from ``start`` up to ``end`` (minutes after midnight; ``end <= start`` wraps midnight)."""

    start: int  # 0 .. 1439
    end: int  # 1 .. 1440
    rate: float | None  # bytes/s; 0 = unlimited; None = off

    def covers(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def spans(self) -> list[tuple[int, int]]:
        """The half-open minute ranges of one day it covers (two when it wraps midnight)."""
        if self.start < self.end:
            return [(self.start, self.end)]
        return [(self.start, MINUTES_PER_DAY)] + ([(0, self.end)] if self.end else [])

    def __str__(self) -> str:
        return f"{hhmm(self.start)}-{hhmm(self.end)} {describe_rate(self.rate)}"


@dataclass(frozen=True)
class Schedule:
    """Windows of time of day with their rates; ``default`` (bytes/s, 0 unlimited, None off) elsewhere.

    ``tz``: an IANA time zone name the windows are read in; empty: the agent host's local time.
    """

    windows: tuple[Window, ...] = ()
    default: float | None = 0.0
    tz: str = ""

    def __str__(self) -> str:
        return ", ".join(map(str, self.windows)) + (f" {self.tz}" if self.tz else "")


def hhmm(minute: int) -> str:
    return f"{minute // 60:02}:{minute % 60:02}"


def describe_rate(rate: float | None) -> str:
    """A rate in words, as a schedule writes it: ``off``, ``unlimited``, ``20MiB/s``."""
    if rate is None:
        return OFF
    if rate == 0:
        return UNLIMITED
    for unit in ("GiB", "MiB", "KiB"):
        n = rate / _RATE_UNITS[unit]
        if n >= 1 and n == round(n, 2):
            return f"{n:g}{unit}/s"
    return f"{rate:g}B/s"


def _minute(text: str, key: str, *, end: bool) -> int:
    m = _TIME_RE.match(text.strip())
    hours, minutes = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    if not m or minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ConfigError(f"{key}: {text.strip()!r} is not a time of day; write HH:MM from 00:00 to 23:59 "
                          f"(24:00 only as an end), e.g. {EXAMPLE}")
    return hours * 60 + minutes


def _window(start: str, end: str, rate: Any, key: str) -> Window:
    w = Window(_minute(start, key, end=False), _minute(end, key, end=True), _window_rate(rate, key))
    if w.start == w.end:
        raise ConfigError(f"{key}: window {start.strip()}-{end.strip()} is empty (it starts where it ends); "
                          f"write 00:00-24:00 for the whole day, or leave the window out")
    return w


def _is_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _has_rate(item: str) -> bool:
    """Whether a window's text ends with a valid rate."""
    m = _WINDOW_RE.match(item)
    try:
        return m is not None and _window_rate(m.group(3), "") != -1
    except ConfigError:
        return False


def _split_zone(text: str, key: str) -> tuple[str, str]:
    """The schedule text without a trailing time zone name, and that name ("" when none)."""
    head, _, last = text.rstrip().rpartition(" ")
    if not head or last.lower() in (OFF, UNLIMITED) or _UNIT_RE.match(last) or not _ZONE_RE.match(last) or \
            last.endswith("/s"):
        return text, ""
    if _is_zone(last):
        return head, last
    if _has_rate(head.rsplit(",", 1)[-1]):  # "08:00-18:00 off Mars/Olympus": a window, then no zone
        raise ConfigError(f"{key}: {last!r} is not a time zone; end the schedule with an IANA name such as UTC "
                          f"or Europe/Paris, or with nothing for the agent host's local time")
    return text, ""  # part of a window: its parsing says what is wrong


def parse_schedule(value: Any, key: str) -> Schedule:
    """A :class:`Schedule` from the string or the TOML array of tables form (ConfigError naming ``key``)."""
    if isinstance(value, str):
        text, tz = _split_zone(value, key)
        windows = []
        if text.strip():
            for item in text.split(","):
                if not item.strip():
                    raise ConfigError(f"{key}: an empty window (two commas in a row, or one at an end); write "
                                      f"HH:MM-HH:MM RATE between commas, e.g. {EXAMPLE}")
                m = _WINDOW_RE.match(item)
                if not m:
                    raise ConfigError(f"{key}: {item.strip()!r} is not a window; write HH:MM-HH:MM RATE, "
                                      f"separated by commas, e.g. {EXAMPLE}")
                windows.append(_window(m.group(1), m.group(2), m.group(3), key))
    elif isinstance(value, list) and all(isinstance(x, Mapping) for x in value):
        tz = ""
        windows = [_window_table(x, f"{key}[{i}]") for i, x in enumerate(value)]
    else:
        raise ConfigError(f"{key}: expected a string like {EXAMPLE} or a list of tables like "
                          f'[{{ from = "08:00", to = "18:00", rate = "20MiB/s" }}], got {value!r}')
    _check_overlaps(windows, key)
    return Schedule(tuple(sorted(windows, key=lambda w: w.start)), tz=tz)


def _window_table(table: Mapping[str, Any], key: str) -> Window:
    allowed = ("from", "to", "rate")
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key; a window has {', '.join(allowed)}")
    missing = [k for k in allowed if k not in table]
    if missing:
        raise ConfigError(f"{key}: missing {', '.join(missing)}; write "
                          f'{{ from = "08:00", to = "18:00", rate = "20MiB/s" }}')
    for k in ("from", "to"):
        if not isinstance(table[k], str):
            raise ConfigError(f"{key}.{k}: expected a time of day as a string like \"08:00\", got {table[k]!r}")
    return _window(table["from"], table["to"], table["rate"], key)


def _check_overlaps(windows: list[Window], key: str) -> None:
    for i, a in enumerate(windows):
        for b in windows[i + 1:]:
            if any(s1 < e2 and s2 < e1 for s1, e1 in a.spans() for s2, e2 in b.spans()):
                raise ConfigError(f"{key}: windows {hhmm(a.start)}-{hhmm(a.end)} and {hhmm(b.start)}-"
                                  f"{hhmm(b.end)} overlap; give each time of day one window at most")


# --- lookups -------------------------------------------------------------------------------------


def _zone_of(schedule: Schedule) -> tzinfo | None:
    return ZoneInfo(schedule.tz) if schedule.tz else None


def _wall(schedule: Schedule, when: datetime) -> datetime:
    """``when`` as a naive wall-clock time in the schedule's zone (a naive ``when`` already is one)."""
    if when.tzinfo is None:
        return when
    return when.astimezone(_zone_of(schedule)).replace(tzinfo=None)


def _rate_at_minute(schedule: Schedule, minute: int) -> float | None:
    for w in schedule.windows:
        if w.covers(minute):
            return w.rate
    return schedule.default


def rate_at(schedule: Schedule, when: datetime) -> float | None:
    """The rate in force at ``when``: bytes per second, 0 for unlimited, None for off.

    ``when`` is read on the schedule's wall clock: an aware datetime is converted to the schedule's
    zone (the host's local zone when it names none); a naive one is taken as that wall-clock time.
    """
    wall = _wall(schedule, when)
    return _rate_at_minute(schedule, wall.hour * 60 + wall.minute)


def next_change(schedule: Schedule, when: datetime) -> datetime:
    """The first moment after ``when`` at which :func:`rate_at` gives another rate.

    Naive in, naive out (wall-clock time); aware in, aware out (in the schedule's zone, or the host's
    local zone). When the rate never changes, one day after ``when``: callers look again then. Across
    a daylight-saving change a boundary is the wall-clock time it names (a time the change skips maps
    to the moment just after the skip); callers that wait for it should look again at least every
    minute or so rather than trust one long sleep.
    """
    wall = _wall(schedule, when)
    now_rate = _rate_at_minute(schedule, wall.hour * 60 + wall.minute)
    midnight = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    bounds = sorted({w.start for w in schedule.windows} | {w.end % MINUTES_PER_DAY for w in schedule.windows})
    for day in (0, 1):
        for b in bounds:
            at = midnight + timedelta(days=day, minutes=b)
            if at > wall and _rate_at_minute(schedule, b) != now_rate:
                return _from_wall(schedule, at, when)
    return when + timedelta(days=1)


def _from_wall(schedule: Schedule, wall: datetime, like: datetime) -> datetime:
    if like.tzinfo is None:
        return wall
    zone = _zone_of(schedule)
    if zone is None:
        return wall.astimezone()  # a naive time taken as the host's local time, its daylight saving included
    return wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)  # a skipped time: just after


def constant(schedule: Schedule) -> bool:
    """Whether the rate is the same at every time of day."""
    starts = {0} | {w.start for w in schedule.windows} | {w.end % MINUTES_PER_DAY for w in schedule.windows}
    return len({_rate_at_minute(schedule, m) for m in starts}) == 1
