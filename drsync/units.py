"""How drsync shows sizes and times to operators: binary units, ISO 8601 times with their zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# A number under a key like these is a Unix time (seconds), shown in JSON as ISO 8601 plus <key>_unix
# (as are ``at`` and ``*_at``): protected_until, paused_until, primary_since, last_seen, an agent's heartbeat.
_TIME_KEYS = ("since", "last_seen", "until", "heartbeat", "before")
_PLAUSIBLE_UNIX_S = 1e8  # 1973: anything smaller under such a key is a count or a duration, left alone


def human_size(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def count(n: int, noun: str) -> str:
    """A count with its noun, singular for one: ``1 file``, ``0 files``, ``12 chunks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def iso_time(ts: float) -> str:
    """A Unix time as ISO 8601 in UTC with milliseconds: ``2026-12-01T09:01:23.353Z``. A time no date
    can show (beyond years 1 to 9999, or not a number) is shown as the number itself, never an error."""
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return repr(ts)


def parse_iso(value: str) -> float:
    """An ISO 8601 time (``2026-12-01T09:01:23.353Z``, any zone; none: this host's) as Unix seconds.

    Raises ValueError for anything else, and for a time outside years 1 to 9999 once taken to UTC
    (``0001-01-01T00:00:00+01:00``), which no date could show again."""
    if not isinstance(value, str):
        raise ValueError(f"time {value!r} is not an ISO 8601 string")
    ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    try:
        datetime.fromtimestamp(ts, UTC)
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"time {value!r} is out of range (years 1 to 9999 in UTC)") from None
    return ts


def with_iso_times(doc: Any) -> Any:
    """A JSON document with one time format: every Unix time under the key ``at`` or a key ending in
    ``_at`` (or ``since``, ``last_seen``, ``until``, ``heartbeat``, ``before``) becomes ISO 8601 with its
    zone, and the number moves to ``<key>_unix``; an ISO time there is rewritten the same way (UTC,
    milliseconds, ``Z``) with its ``<key>_unix`` twin; a time of 0 (never set) becomes null."""
    if isinstance(doc, list):
        return [with_iso_times(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out: dict[Any, Any] = {}
    for k, v in doc.items():
        timed = isinstance(k, str) and (k == "at" or k.endswith("_at") or k.endswith(_TIME_KEYS)) and \
            not k.endswith("_unix")
        if timed and isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            out[k] = None  # never set: no time, not 1970
            out.setdefault(f"{k}_unix", None)
        elif timed and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= _PLAUSIBLE_UNIX_S:
            out[k] = iso_time(float(v))
            out.setdefault(f"{k}_unix", v)
        elif timed and isinstance(v, str) and (unix := _parse_iso(v)) is not None:
            out[k] = iso_time(unix)
            out.setdefault(f"{k}_unix", unix)
        else:
            out[k] = with_iso_times(v)
    return out


def _parse_iso(value: str) -> float | None:
    try:
        zoned = datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
        return parse_iso(value) if zoned else None
    except ValueError:
        return None
