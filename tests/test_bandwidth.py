"""Bandwidth by time of day and per standby target: parsing, rate_at / next_change, pacing, the wiring.

Pure where it can be (drsync.bandwidth, the Pacer with an injected clock); the configuration through the
real command line; the per-target wiring through a real Replication and its metrics registry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from drsync.agent.primary import Pacer, pacing_delay
from drsync.bandwidth import Schedule, Window, constant, next_change, parse_schedule, rate_at
from drsync.config import config_from_dict
from drsync.errors import ConfigError
from drsync.units import iso_time
from tests.conftest import run_drsync

KEY = "replication.bandwidth_schedule"
MiB = 1024 * 1024
CLUSTER = {"id": "c", "release": "1", "data": "/d", "repository": "/r"}


def day(h: int, m: int = 0, s: int = 0, *, d: int = 5) -> datetime:
    """A naive wall-clock time (no zone, so no daylight saving anywhere near it)."""
    return datetime(2026, 1, d, h, m, s)


# --- parsing ---------------------------------------------------------------------------------------------


def test_the_string_form_parses_windows_rates_off_and_unlimited() -> None:
    s = parse_schedule("08:00-18:00 20MiB/s, 18:00-08:00 off", KEY)
    assert s.windows == (Window(8 * 60, 18 * 60, 20 * MiB), Window(18 * 60, 8 * 60, None)) and s.tz == ""
    s = parse_schedule(" 01:00 - 05:30 unlimited ,09:00-17:00 5 MB/s,17:00-24:00 1000 ", KEY)
    assert [(w.start, w.end, w.rate) for w in s.windows] == [(60, 330, 0.0), (540, 1020, 5e6), (1020, 1440, 1000.0)]
    assert parse_schedule("", KEY) == Schedule()  # no windows: bandwidth_limit at every time of day
    assert str(parse_schedule("18:00-08:00 off, 08:00-18:00 20MiB/s", KEY)) == "08:00-18:00 20MiB/s, 18:00-08:00 off"


def test_the_array_of_tables_form_parses_like_the_string() -> None:
    tables = [{"from": "08:00", "to": "18:00", "rate": "20MiB/s"}, {"from": "18:00", "to": "08:00", "rate": "off"}]
    assert parse_schedule(tables, KEY) == parse_schedule("08:00-18:00 20MiB/s, 18:00-08:00 off", KEY)
    assert parse_schedule([{"from": "00:00", "to": "24:00", "rate": "unlimited"}], KEY).windows == \
        (Window(0, 1440, 0.0),)
    # A window's 0 is ambiguous ("nothing", or unlimited as bandwidth_limit = 0 means): refused, naming the words.
    for zero in (0, "0", "0MiB/s", "0.5B/s"):
        with pytest.raises(ConfigError, match="write 'off' .no shipping.*'unlimited'"):
            parse_schedule([{"from": "00:00", "to": "24:00", "rate": zero}], KEY)
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_schedule("08:00-18:00 0MiB/s", KEY)


def test_a_time_zone_may_end_the_schedule() -> None:
    assert parse_schedule("08:00-18:00 off UTC", KEY).tz == "UTC"
    assert parse_schedule("08:00-18:00 20MiB/s, 18:00-08:00 off Europe/Paris", KEY).tz == "Europe/Paris"
    assert parse_schedule("08:00-18:00 20 MiB/s", KEY).tz == ""  # a unit is not a zone


@pytest.mark.parametrize(("value", "says"), [
    ("25:00-08:00 off", "'25:00' is not a time of day; write HH:MM"),
    ("08:00-18:60 off", "'18:60' is not a time of day"),
    ("24:00-08:00 off", "'24:00' is not a time of day; write HH:MM from 00:00 to 23:59 (24:00 only as an end)"),
    ("08:00-18:00 fast", "'fast' is not a rate; write e.g. '20MiB/s', 'unlimited' or 'off'"),
    ("08:00-18:00 -5MiB/s", "is not a rate; write e.g. '20MiB/s', 'unlimited' or 'off'"),
    ("08:00-18:00 5 parsecs/s", "is not a rate"),
    ("08:00-18:00 off Mars/Olympus_Mons", "'Mars/Olympus_Mons' is not a time zone; end the schedule with an IANA name"),
    ("08:00-18:00 off, 17:00-19:00 1MiB/s", "windows 08:00-18:00 and 17:00-19:00 overlap"),
    ("22:00-06:00 off, 05:00-07:00 1MiB/s", "windows 22:00-06:00 and 05:00-07:00 overlap"),  # across midnight
    ("08:00-08:00 off", "window 08:00-08:00 is empty"),
    ("08:00-18:00 off,", "an empty window"),
    ("08:00-18:00 off,, 19:00-20:00 1MiB", "an empty window"),
    ("08:00-18:00", "'08:00-18:00' is not a window; write HH:MM-HH:MM RATE"),
    (42, "expected a string like"),
    ([{"from": "08:00", "to": "18:00"}], "missing rate"),
    ([{"from": "08:00", "to": "18:00", "rate": "off", "days": "mon"}], "[0].days: unknown key"),
    ([{"from": 8, "to": "18:00", "rate": "off"}], '[0].from: expected a time of day as a string like "08:00"'),
])
def test_bad_schedules_are_config_errors_that_say_what_to_write(value: object, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_schedule(value, KEY)
    assert str(e.value).startswith(KEY) and says in str(e.value), str(e.value)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


# --- rate_at and next_change -------------------------------------------------------------------------------


def test_rate_at_reads_the_window_of_the_minute_and_the_default_elsewhere() -> None:
    s = Schedule(parse_schedule("08:00-18:00 20MiB/s, 20:00-22:00 off", KEY).windows, default=5 * MiB)
    assert rate_at(s, day(7, 59, 59)) == 5 * MiB  # before the window: bandwidth_limit
    assert rate_at(s, day(8)) == 20 * MiB  # a window starts at its first minute...
    assert rate_at(s, day(17, 59, 59)) == 20 * MiB
    assert rate_at(s, day(18)) == 5 * MiB  # ... and ends before its last
    assert rate_at(s, day(21, 30)) is None  # off
    assert rate_at(Schedule(), day(12)) == 0.0  # unlimited


def test_a_window_across_midnight_covers_both_evenings_and_mornings() -> None:
    s = parse_schedule("22:00-06:00 off", KEY)
    assert [rate_at(s, day(h)) for h in (21, 22, 23, 0, 5)] == [0.0, None, None, None, None]
    assert rate_at(s, day(6)) == 0.0
    assert next_change(s, day(23, 30)) == day(6, d=6)  # tomorrow morning
    assert next_change(s, day(3)) == day(6)
    assert next_change(s, day(12)) == day(22)
    assert next_change(s, day(22)) == day(6, d=6)


def test_next_change_skips_boundaries_where_the_rate_stays_the_same() -> None:
    s = Schedule(parse_schedule("08:00-12:00 1MiB/s, 12:00-18:00 1MiB/s, 18:00-19:00 unlimited", KEY).windows,
                 default=0.0)
    assert next_change(s, day(9)) == day(18)  # 12:00 changes nothing; 18:00 gives unlimited = the default
    assert next_change(s, day(18, 30)) == day(8, d=6)  # 19:00 changes nothing either
    assert next_change(s, day(8)) == day(18)  # at a boundary: the next one, never now


def test_next_change_of_a_constant_schedule_is_a_day_later() -> None:
    always_off = parse_schedule("00:00-24:00 off", KEY)
    assert constant(always_off) and rate_at(always_off, day(3)) is None
    assert next_change(always_off, day(3)) == day(3, d=6)
    assert constant(Schedule()) and not constant(parse_schedule("01:00-02:00 off", KEY))


def test_aware_times_are_read_on_the_schedule_s_clock_without_daylight_saving_surprises() -> None:
    utc = parse_schedule("08:00-18:00 off UTC", KEY)
    paris = timezone(timedelta(hours=1))
    at = datetime(2026, 1, 5, 8, 30, tzinfo=paris)  # 07:30 UTC: not yet
    assert rate_at(utc, at) == 0.0
    nxt = next_change(utc, at)
    assert nxt == datetime(2026, 1, 5, 8, 0, tzinfo=UTC) and nxt.utcoffset() == timedelta(0)
    # A zone with daylight saving: the windows follow its wall clock on the day of the change.
    s = parse_schedule("01:00-03:00 off Europe/Paris", KEY)
    spring = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # 01:30 CET, in the window
    assert rate_at(s, spring) is None
    assert next_change(s, spring) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert rate_at(s, datetime(2026, 3, 29, 1, 0, tzinfo=UTC)) == 0.0
    # A boundary the change skips (02:00 does not exist that night) is the moment just after the skip.
    gap = parse_schedule("02:00-02:30 off, 02:30-03:00 1MiB/s Europe/Paris", KEY)
    nxt = next_change(gap, datetime(2026, 3, 29, 0, 30, tzinfo=UTC))
    assert nxt == datetime(2026, 3, 29, 1, 0, tzinfo=UTC) and nxt.tzinfo == ZoneInfo("Europe/Paris")
    assert nxt > datetime(2026, 3, 29, 0, 30, tzinfo=UTC)


# --- configuration ------------------------------------------------------------------------------------------


def test_targets_override_the_global_keys_by_agent_name_first_then_by_address() -> None:
    cfg = config_from_dict({"cluster": CLUSTER, "replication": {
        "bandwidth_limit": "10MiB/s", "bandwidth_schedule": "08:00-18:00 off",
        "targets": {"west": {"bandwidth_limit": "1MiB/s"},
                    "10.0.0.2:7420": {"bandwidth_schedule": "", "bandwidth_limit": 0},
                    "10.0.0.3:7420": {"bandwidth_schedule": [{"from": "00:00", "to": "24:00", "rate": "off"}]}}}})
    r = cfg.replication
    west = r.bandwidth_for("west", "10.0.0.2:7420")  # the name wins over the address
    assert rate_at(west, day(9)) is None and rate_at(west, day(19)) == MiB  # global schedule, its own limit
    by_address = r.bandwidth_for("", "10.0.0.2:7420")  # fixed roles: known by address only
    assert rate_at(by_address, day(9)) == 0.0 and rate_at(by_address, day(19)) == 0.0
    assert rate_at(r.bandwidth_for("north", "10.0.0.3:7420"), day(19)) is None
    other = r.bandwidth_for("east", "10.0.0.9:7420")  # no table: the global keys
    assert rate_at(other, day(9)) is None and rate_at(other, day(19)) == 10 * MiB


@pytest.mark.parametrize(("replication", "says"), [
    ({"bandwidth_schedule": "08:00-18:00 off, 25:00-26:00 1MiB"},
     "replication.bandwidth_schedule: '25:00' is not a time of day"),
    ({"targets": {"west": {"bandwidth_schedule": "08:00-18:00 slow"}}},
     "replication.targets.\"west\".bandwidth_schedule: 'slow' is not a rate"),
    ({"targets": {"west": {"bandwidth_limit": "fast"}}},
     "replication.targets.\"west\".bandwidth_limit: 'fast' is not a rate"),
    ({"targets": {"west": {"bandwidth": "1MiB/s"}}},
     "replication.targets.\"west\".bandwidth: unknown key; allowed in [replication.targets.\"west\"]: "
     "bandwidth_limit, bandwidth_schedule"),
    ({"targets": {"west": "1MiB/s"}}, "replication.targets.\"west\": expected a table"),
    ({"targets": ["west"]}, "replication.targets: expected tables like"),
])
def test_config_errors_name_the_exact_key(tmp_path: Path, replication: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"cluster": CLUSTER, "replication": replication})
    assert str(e.value).startswith(says), str(e.value)


def test_the_command_line_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "drsync.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path / "r"}"\n'
                   '[replication.targets."standby-2"]\nbandwidth_schedule = "08:00-18:00 off, 17:00-19:00 off"\n')
    r = run_drsync("snapshot", "list", "--config", cfg)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert 'replication.targets."standby-2".bandwidth_schedule: windows 08:00-18:00 and 17:00-19:00 overlap' in r.err
    checked = run_drsync("config", "check", "--config", cfg)
    assert checked.code != 0 and "replication.targets.\"standby-2\".bandwidth_schedule" in checked.out + checked.err


# --- pacing -----------------------------------------------------------------------------------------------


class Clock:
    """An injected monotonic clock: sleeping moves it on."""

    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def test_pacing_delay_is_pure_and_unlimited_never_waits() -> None:
    assert pacing_delay(10 * MiB, 0, 0.0) == 0.0
    assert pacing_delay(10 * MiB, 5 * MiB, 0.5) == 1.5
    assert pacing_delay(10 * MiB, 5 * MiB, 9.0) == 0.0


def test_the_pacer_keeps_the_rate_in_force_at_each_message() -> None:
    clock, rate = Clock(), [1 * MiB]
    p = Pacer(lambda: rate[0], clock=clock, sleep=clock.sleep)
    start = clock.t
    for _ in range(4):
        assert p.may_send()
        p.sent_message(MiB)
    assert clock.t - start == pytest.approx(4.0)  # 4 MiB at 1 MiB/s
    assert max(clock.slept) <= 1.0  # it looks at the rate again at least every second
    rate[0] = 4 * MiB  # faster from now on: no credit owed for the slower past
    mark = clock.t
    for _ in range(4):
        p.sent_message(MiB)
    assert clock.t - mark == pytest.approx(0.75)  # the first message after the change is forgiven


def test_after_an_unlimited_burst_a_low_rate_does_not_stall_for_the_bytes_sent_before() -> None:
    clock, rate = Clock(), [0.0]
    p = Pacer(lambda: rate[0], clock=clock, sleep=clock.sleep)
    for _ in range(100):
        p.sent_message(MiB)  # unlimited: 100 MiB without waiting
    assert clock.slept == []
    rate[0] = MiB
    p.sent_message(MiB)
    p.sent_message(MiB)
    assert clock.t - 100.0 == pytest.approx(1.0)  # not 100 s for the burst before the window began


def test_a_rate_turning_off_mid_wait_ends_the_wait_and_stops_the_next_message() -> None:
    clock, rate = Clock(), [1.0]  # one byte per second: a megabyte would wait for days

    def sleep(s: float) -> None:
        clock.sleep(s)
        rate[0] = None  # the window turns off while the upload waits

    p = Pacer(lambda: rate[0], clock=clock, sleep=sleep)
    assert p.may_send()
    p.sent_message(MiB)
    assert clock.slept == [1.0] and not p.may_send()


# --- the wiring: a real Replication, its shippers and metrics -------------------------------------------------


def test_replication_looks_targets_up_by_agent_name_then_address_and_shows_the_rate(tmp_path: Path) -> None:
    from drsync.agent.shipper import Replication
    from drsync.metrics import AgentMetrics, new_registry
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    cfg = config_from_dict({"cluster": {**CLUSTER, "data": str(tmp_path / "d"), "repository": str(tmp_path / "r")},
                            "replication": {"bandwidth_limit": "10MiB/s", "targets": {
                                "west": {"bandwidth_schedule": "09:00-17:00 off"},
                                "10.0.0.2:7420": {"bandwidth_limit": "1MiB/s"}}}})
    repo = Repository.init(open_storage(str(tmp_path / "r")), cluster_id="c", release="1")
    metrics = AgentMetrics(new_registry(), group="g", agent="east")
    clock = [day(10)]
    rep = Replication(cfg, repo, metrics, sender="east", link=lambda t: None,  # type: ignore[arg-type,return-value]
                      epoch=lambda: 1, guard=lambda final: None, exclude_paths=(), on_outcome=lambda o: None,
                      now=lambda: clock[0])
    a, b = "10.0.0.2:7420", "10.0.0.3:7420"
    rep.set_targets([a, b])

    def gauge(name: str, target: str) -> float | None:
        return metrics.registry.get_sample_value(f"drsync_{name}", {"group": "g", "agent": "east", "target": target})

    assert rep.shippers[a].bandwidth.rate() == MiB and rep.shippers[b].bandwidth.rate() == 10 * MiB
    assert gauge("bandwidth_limit_bytes_per_second", a) == MiB and gauge("bandwidth_paused", a) == 0
    rep.target_names.update({a: "west", b: "north"})  # ZooKeeper names them: the name wins
    assert rep.shippers[a].bandwidth.rate() is None and rep.shippers[a].bandwidth.paused()
    assert gauge("bandwidth_limit_bytes_per_second", a) == -1 and gauge("bandwidth_paused", a) == 1
    status = rep.bandwidth_status()
    # One time format in JSON (issue 20): ISO 8601 in UTC with its zone, and the Unix time beside it.
    assert status[a]["paused"] is True and status[a]["paused_until"] == iso_time(day(17).timestamp())
    assert status[a]["paused_until"].endswith("Z") and status[a]["paused_until_unix"] == day(17).timestamp()
    assert status[b] == {"rate": "10MiB/s", "limit_bytes_per_second": 10 * MiB, "paused": False,
                         "paused_until": None, "paused_until_unix": None}
    clock[0] = day(18)
    assert rep.shippers[a].bandwidth.rate() == 10 * MiB  # outside west's window: the global limit
    rep.set_targets([b])  # a target that is no longer one: its series go
    assert gauge("bandwidth_limit_bytes_per_second", a) is None
    assert gauge("bandwidth_limit_bytes_per_second", b) == 10 * MiB
    rep.close()
