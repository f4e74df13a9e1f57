"""The clock-offset estimator and the one lag function (drsync.agent.clock), without processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from drsync.agent.clock import WINDOW_S, ClockOffset, lag_s
from drsync.agent.state import AgentState, StateStore

T = 1_800_000_000.0


def test_lag_is_read_on_the_primarys_clock() -> None:
    # The primary's clock is 600 s ahead of this machine's: its snapshot captured at T + 600 (its clock)
    # was captured when this machine's clock said T; 5 s later here the lag is 5 s, not 5 - 600.
    assert lag_s(T + 600, 600.0, now=T + 5) == pytest.approx(5.0)
    assert lag_s(T - 600, -600.0, now=T + 5) == pytest.approx(5.0)
    assert lag_s(T, 0.0, now=T + 5) == pytest.approx(5.0)
    assert lag_s(0.0, 600.0, now=T) is None  # nothing applied
    assert lag_s(T + 10, 0.0, now=T) == 0.0  # never negative


def test_the_sample_with_the_smallest_delay_wins() -> None:
    c = ClockOffset()
    assert not c.known and c.offset_s == 0.0
    offset = 600.0  # primary clock - local clock
    # Each request: sent at primary time p, arrives after `delay` seconds: local = p - offset + delay.
    for i, delay in enumerate([0.30, 0.05, 2.0, 0.002, 0.8]):
        p = T + i
        c.add(p, p - offset + delay, source="east", at=100.0 + i)
    assert c.known and c.offset_s == pytest.approx(offset - 0.002)
    assert c.offset_s <= offset  # a delay only ever makes a sample look further behind


def test_old_samples_age_out_so_a_clock_step_is_followed() -> None:
    c = ClockOffset()
    c.add(T, T - 600 + 0.001, source="east", at=0.0)
    assert c.offset_s == pytest.approx(600, abs=0.01)
    # The primary's clock is stepped back to the truth: the old, larger sample still wins within the window...
    c.add(T + 10, T + 10 + 0.01, source="east", at=10.0)
    assert c.offset_s == pytest.approx(600, abs=0.01)
    # ...and no longer once it is older than the window, counted back from the newest sample.
    c.add(T + WINDOW_S + 1, T + WINDOW_S + 1 + 0.01, source="east", at=WINDOW_S + 1)
    assert c.offset_s == pytest.approx(-0.01, abs=0.001)


def test_without_new_samples_the_estimate_stays() -> None:
    """The primary gone: nothing ages the last estimate out; lag keeps counting on the local clock."""
    c = ClockOffset()
    c.add(T, T + 600 + 0.01, source="east", at=0.0)
    assert c.offset_s == pytest.approx(-600.01)
    assert lag_s(T - 5, c.offset_s, now=T + 600 + 3600) == pytest.approx(3605.0, abs=0.02)


def test_a_new_primary_starts_a_new_estimate_and_a_restored_one_holds_until_then() -> None:
    c = ClockOffset(42.0, "east")
    assert c.offset_s == 42.0 and not c.known  # restored from the state file
    c.add(T, T - 42.0 + 0.01, source="east", at=1.0)
    assert c.offset_s == pytest.approx(41.99)
    c.add(T + 1, T + 1 + 300 + 0.01, source="west", at=2.0)  # failover to a machine 300 s behind
    assert c.source == "west" and c.offset_s == pytest.approx(-300.01)
    c.add(0.0, T, source="west", at=3.0)  # a request without a clock (older sender) is not a sample
    assert c.offset_s == pytest.approx(-300.01)


def test_the_state_file_keeps_the_offset_for_the_command_line(tmp_path: Path) -> None:
    sf = StateStore(str(tmp_path))
    sf.update(applied_snapshot="s1", applied_captured_at=T + 600, clock_offset_s=600.0, clock_source="east",
              applied_position=(3, 17), epoch_seen=3, epoch_seen_at=T)
    st = StateStore(str(tmp_path)).current  # read back from disk
    assert (st.clock_offset_s, st.clock_source, st.applied_position, st.epoch_seen, st.epoch_seen_at) == \
        (600.0, "east", (3, 17), 3, T)
    assert st.lag_s(now=T + 7) == pytest.approx(7.0)
    assert AgentState().lag_s(now=T) is None


def test_a_restarted_primary_whose_clock_stepped_back_is_followed_at_once() -> None:
    """The same primary, restarted with its clock 190 s behind: its old process's samples must not keep
    the estimate (and so the lag) 190 s too high for a whole window."""
    c = ClockOffset()
    c.add(1000.0, 1000.0, source="east", instance="a", at=0.0)
    assert c.offset_s == 0.0
    c.add(810.0 + 5, 1005.0, source="east", instance="b", at=5.0)  # restarted, clock now 190 s behind
    assert abs(c.offset_s - (-190.0)) < 1e-9
    # Within one process, the best (least delayed) sample of the window still wins.
    c.add(814.0, 1005.0, source="east", instance="b", at=6.0)
    assert abs(c.offset_s - (-190.0)) < 1e-9
