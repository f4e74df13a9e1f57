"""Retention planning, with restic's ``forget`` semantics. Pure functions.

Items are walked newest first. ``last`` keeps the N newest. Each calendar
policy (hourly, daily, weekly, monthly, yearly) keeps the newest item of each
of the N most recent periods that have an item; periods without items do not
count. An item is kept if any policy keeps it; the reasons say which.

"Newest" is by time unless the caller gives the order itself (``in_order``):
snapshots are ordered by their sequence numbers, and their capture times, which
a wrong clock may have put anywhere, only say which period each belongs to. A
period then counts once, where its newest item is met in that order.
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


def plan_retention(items: list[tuple[str, float]], policy: KeepPolicy, *,
                   in_order: bool = False) -> list[RetentionDecision]:
    """Decide, for each (id, unix time), whether the policy keeps it. Newest first in the result.

    With ``in_order`` the items are already oldest to newest (e.g. by sequence number) and
    their times are used only to find their periods; otherwise they are ordered by time.
    """
    ordered = list(items) if in_order else sorted(items, key=lambda x: (x[1], x[0]))
    decisions = [RetentionDecision(i, t) for i, t in reversed(ordered)]
    for n, d in enumerate(decisions):
        if n < policy.last:
            d.keep = True
            d.reasons.append("last")
    for kind in ("hourly", "daily", "weekly", "monthly", "yearly"):
        budget = getattr(policy, kind)
        seen: set[tuple[int, ...]] = set()  # in time order a bucket never comes back: restic's rule
        for d in decisions:
            if budget <= 0:
                break
            b = _bucket(kind, d.time)
            if b not in seen:
                d.keep = True
                d.reasons.append(kind)
                budget -= 1
                seen.add(b)
    return decisions
