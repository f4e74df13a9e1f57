"""Retention planning, with restic's ``forget`` semantics. Pure functions.

Items are walked newest first. ``last`` keeps the N newest. Each calendar
policy (hourly, daily, weekly, monthly, yearly) keeps the newest item of each
of the N most recent periods that have an item; periods without items do not
count. An item is kept if any policy keeps it; the reasons say which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from drsync.config import KeepPolicy


@dataclass
class RetentionDecision:
    id: str
    time: float
    keep: bool = False
    reasons: list[str] = field(default_factory=list)


def _bucket(kind: str, t: float) -> tuple[int, ...]:
    d = datetime.fromtimestamp(t, UTC)
    if kind == "hourly":
        return (d.year, d.month, d.day, d.hour)
    if kind == "daily":
        return (d.year, d.month, d.day)
    if kind == "weekly":
        iso = d.isocalendar()
        return (iso.year, iso.week)
    if kind == "monthly":
        return (d.year, d.month)
    if kind == "yearly":
        return (d.year,)
    raise ValueError(kind)


def plan_retention(items: list[tuple[str, float]], policy: KeepPolicy) -> list[RetentionDecision]:
    """Decide, for each (id, unix time), whether the policy keeps it. Newest first in the result."""
    decisions = [RetentionDecision(i, t) for i, t in sorted(items, key=lambda x: (x[1], x[0]), reverse=True)]
    for n, d in enumerate(decisions):
        if n < policy.last:
            d.keep = True
            d.reasons.append("last")
    for kind in ("hourly", "daily", "weekly", "monthly", "yearly"):
        budget = getattr(policy, kind)
        last_bucket: tuple[int, ...] | None = None
        for d in decisions:
            if budget <= 0:
                break
            b = _bucket(kind, d.time)
            if b != last_bucket:
                d.keep = True
                d.reasons.append(kind)
                budget -= 1
                last_bucket = b
    return decisions
