"""Retention follows restic's `forget` rules; pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from drsync.config import KeepPolicy
from drsync.engine import plan_expiry
from drsync.repository.snapshots import SnapshotInfo
from drsync.retention import plan_retention

T0 = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)


def items(*offsets_h: float) -> list[tuple[str, float]]:
    return [(f"s{i}", (T0 - timedelta(hours=h)).timestamp()) for i, h in enumerate(offsets_h)]


def kept(decisions) -> set[str]:  # type: ignore[no-untyped-def]
    return {d.id for d in decisions if d.keep}


def test_keep_last_keeps_the_newest() -> None:
    d = plan_retention(items(0, 1, 2, 3, 4), KeepPolicy(last=2))
    assert kept(d) == {"s0", "s1"}
    assert [x.id for x in d] == ["s0", "s1", "s2", "s3", "s4"]  # newest first


def test_daily_keeps_newest_of_each_day_and_skips_empty_days() -> None:
    # Two per day for days 0, 1 and 3 (day 2 has none): keep-daily 3 reaches back to day 3.
    d = plan_retention(items(0, 2, 24, 26, 72, 74), KeepPolicy(daily=3))
    assert kept(d) == {"s0", "s2", "s4"}


def test_policies_combine_and_report_reasons() -> None:
    d = plan_retention(items(0, 1, 24 * 8, 24 * 40), KeepPolicy(last=1, weekly=2, monthly=3))
    by_id = {x.id: x for x in d}
    assert by_id["s0"].reasons == ["last", "weekly", "monthly"]
    assert by_id["s1"].keep is False
    assert "weekly" in by_id["s2"].reasons
    assert "monthly" in by_id["s3"].reasons


def test_empty_policy_keeps_nothing() -> None:
    assert kept(plan_retention(items(0, 1), KeepPolicy())) == set()


def test_hourly_and_yearly_buckets() -> None:
    d = plan_retention(items(0, 0.2, 1, 1.5, 2), KeepPolicy(hourly=2))
    assert kept(d) == {"s0", "s2"}
    d = plan_retention(items(0, 24 * 400), KeepPolicy(yearly=5))
    assert kept(d) == {"s0", "s1"}


def _snap(sid: str, hours_ago: float, kind: str, ttl_s: float | None = None) -> SnapshotInfo:
    return SnapshotInfo(id=sid, captured_at=(T0 - timedelta(hours=hours_ago)).timestamp(), cluster_id="c",
                        release="1", manifest_hash="x", kind=kind, ttl_s=ttl_s)


def test_expiry_uses_ttl_for_all_and_policy_for_periodic_only() -> None:
    snaps = [
        _snap("manual-old", 500, "manual"),                      # no TTL: lives until deleted
        _snap("manual-ttl", 50, "manual", ttl_s=3600),            # TTL passed
        _snap("manual-fresh", 1, "manual", ttl_s=7 * 86400),      # TTL not passed
        _snap("p1", 0, "periodic"), _snap("p2", 1, "periodic"), _snap("p3", 2, "periodic"),
    ]
    doomed = {s.id for s in plan_expiry(snaps, KeepPolicy(last=2), now=T0.timestamp())}
    assert doomed == {"manual-ttl", "p3"}
