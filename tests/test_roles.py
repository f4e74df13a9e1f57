"""The role rules as pure functions: every branch of decide_role, the lag refusal, candidate ranking."""

from __future__ import annotations

import pytest

from drsync.agent.roles import (
    RANK_DELAY_S,
    FailoverPolicy,
    candidate_rank,
    claimant_live,
    decide_role,
    fencing_ahead,
    format_span,
    promotion_refusal,
    superseded_reason,
)
from drsync.coordination import Epoch, GroupView, PrimaryClaim, SessionState

NOW = 1_800_000_000.0
AUTO = FailoverPolicy(automatic=True, max_lag_s=60, grace_s=2, cooldown_s=300)


def view(epoch: int = 3, by: str = "east", primary: PrimaryClaim | None = None,
         session: SessionState = SessionState.CONNECTED, at: float = NOW - 3600) -> GroupView:
    return GroupView(session, Epoch(epoch, by, at, "manual", 7), primary)


def decide(me: str, v: GroupView, *, acting: bool = False, policy: FailoverPolicy = AUTO, absent: float = 0.0,
           lag: float | None = 5.0, rank: int = 0, epoch_age: float = 3600.0) -> str:
    return decide_role(me, v, acting_primary=acting, policy=policy, primary_absent_s=absent, lag_s=lag,
                       rank=rank, epoch_age_s=epoch_age).action


def test_a_primary_pauses_on_suspended_and_steps_down_on_lost() -> None:
    held = PrimaryClaim("east", "a", 3, NOW, mine=True)
    assert decide("east", view(primary=held, session=SessionState.SUSPENDED), acting=True) == "pause"
    assert decide("east", view(primary=held, session=SessionState.LOST), acting=True) == "step-down"
    assert decide("west", view(session=SessionState.SUSPENDED)) == "standby"
    assert decide("west", view(session=SessionState.LOST)) == "standby"


def test_only_the_agent_the_epoch_names_takes_or_keeps_the_primary_node() -> None:
    assert decide("east", view(primary=PrimaryClaim("east", "a", 3, NOW, mine=True)), acting=True) == "act-primary"
    assert decide("east", view(primary=None)) == "claim"
    # A fenced claim of a lower epoch, or this agent's own node from an earlier session, is replaced.
    assert decide("east", view(primary=PrimaryClaim("west", "b", 2, NOW))) == "claim"
    assert decide("east", view(primary=PrimaryClaim("east", "a", 3, NOW, mine=False))) == "claim"
    # Somebody else holding the node at this epoch is never overridden.
    assert decide("east", view(primary=PrimaryClaim("west", "b", 3, NOW))) == "standby"
    # The epoch names another agent: whoever acts as primary, or holds the node, steps down.
    assert decide("west", view(primary=PrimaryClaim("west", "b", 2, NOW, mine=True))) == "step-down"
    assert decide("west", view(primary=None), acting=True) == "step-down"
    assert decide("west", view(primary=PrimaryClaim("east", "a", 3, NOW))) == "standby"


def test_a_new_group_waits_for_a_promotion() -> None:
    assert decide("east", view(epoch=0, by=""), absent=1e6) == "standby"


def test_manual_failover_never_promotes_by_itself() -> None:
    assert decide("west", view(), policy=FailoverPolicy(automatic=False), absent=1e6) == "standby"


def test_automatic_failover_waits_for_the_grace_and_respects_lag_and_cooldown() -> None:
    assert decide("west", view(), absent=1.0) == "standby"
    assert decide("west", view(), absent=2.0) == "promote-self"
    # A standby further behind gives each better-placed live one RANK_DELAY_S to take over first.
    assert decide("west", view(), absent=2.0 + RANK_DELAY_S - 0.5, rank=1) == "standby"
    assert decide("west", view(), absent=2.0 + RANK_DELAY_S, rank=1) == "promote-self"
    assert decide("west", view(), absent=2.0 + RANK_DELAY_S, rank=2) == "standby"
    assert decide("west", view(), absent=60, lag=61) == "standby"
    assert decide("west", view(), absent=60, lag=None) == "standby"
    assert decide("west", view(), absent=60, epoch_age=10) == "standby"  # epoch seen 10 s ago: cooldown
    assert decide("west", view(), absent=60, epoch_age=0) == "standby"  # seen just now (or unknown): cooldown
    assert decide("west", view(), absent=60, epoch_age=300) == "promote-self"
    # The epoch node's own time (written on the promoting agent's clock) does not count, whatever it says.
    assert decide("west", view(at=NOW + 86400), absent=60, epoch_age=3600) == "promote-self"
    assert decide("west", view(at=0.0), absent=60, epoch_age=10) == "standby"
    assert decide("west", view(primary=PrimaryClaim("east", "a", 3, NOW)), absent=60) == "standby"
    reason = decide_role("west", view(), acting_primary=False, policy=AUTO, primary_absent_s=60, lag_s=90,
                         rank=0, epoch_age_s=3600).reason
    assert "lag 90s exceeds max_lag_on_failover 60s" in reason and "--accept-data-loss" in reason
    # A held standby is refused too, and told the choices that keep the hold's point (not to accept loss).
    held = decide_role("west", view(), acting_primary=False, policy=AUTO, primary_absent_s=60, lag_s=90,
                       rank=0, epoch_age_s=3600, held=True)
    assert held.action == "standby" and "applies are held" in held.reason
    assert "--delayed-state" in held.reason and "--to-snapshot" in held.reason and "--accept" not in held.reason


def test_promotion_refusal_names_the_lag_and_what_would_be_lost() -> None:
    msg = promotion_refusal(lag_s=1250, applied_captured_at=NOW - 1250, max_lag_s=900, accept_data_loss=False,
                            first_promotion=False)
    assert msg is not None and "lag is 20m50s" in msg and "15m00s" in msg and "--accept-data-loss" in msg
    assert promotion_refusal(lag_s=1250, applied_captured_at=0, max_lag_s=900, accept_data_loss=True,
                             first_promotion=False) is None
    assert promotion_refusal(lag_s=10, applied_captured_at=0, max_lag_s=900, accept_data_loss=False,
                             first_promotion=False) is None
    never = promotion_refusal(lag_s=None, applied_captured_at=0, max_lag_s=900, accept_data_loss=False,
                              first_promotion=False)
    assert never is not None and "never applied" in never
    assert promotion_refusal(lag_s=None, applied_captured_at=0, max_lag_s=900, accept_data_loss=False,
                             first_promotion=True) is None
    # promote --delayed-state judges the received lag, and says so: what was received and not applied is
    # kept in the repository, only what the standby never received is lost.
    received = promotion_refusal(lag_s=1250, applied_captured_at=NOW - 1250, max_lag_s=900,
                                 accept_data_loss=False, first_promotion=False, received=True)
    assert received is not None and received.startswith("received lag is 20m50s")
    assert "newest snapshot this standby received was captured 20m50s ago" in received


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (7260, "2h01m")])
def test_format_span(seconds: float, text: str) -> None:
    assert format_span(seconds) == text


def test_candidate_rank_prefers_the_furthest_applied_position() -> None:
    agents = {"east": {"role": "primary", "applied_position": None},
              "west": {"role": "standby", "applied_position": [3, 40]},
              "north": {"role": "standby", "applied_position": [3, 41]},
              "south": {"role": "standby"}}
    assert [candidate_rank(n, agents) for n in ("north", "west", "south")] == [0, 1, 2]


def test_candidate_rank_ignores_capture_times_from_skewed_clocks() -> None:
    # west applied the newer snapshot; north's capture time looks newer only because the clock that
    # stamped it (an earlier primary's) ran 10 minutes fast.
    agents = {"west": {"role": "standby", "applied_position": [3, 41], "applied_captured_at": NOW},
              "north": {"role": "standby", "applied_position": [3, 40], "applied_captured_at": NOW + 600}}
    assert candidate_rank("west", agents) == 0 and candidate_rank("north", agents) == 1
    # A later epoch beats any sequence number of an earlier one (a new primary numbers its own repository).
    agents = {"west": {"role": "standby", "applied_position": [4, 2]},
              "north": {"role": "standby", "applied_position": [3, 900]}}
    assert candidate_rank("west", agents) == 0 and candidate_rank("north", agents) == 1
    # Ties (and nothing applied) go by name; a malformed position counts as nothing applied.
    agents = {"b": {"role": "standby", "applied_position": [3, 5]}, "a": {"role": "standby",
                                                                          "applied_position": [3, 5]},
              "c": {"role": "standby", "applied_position": "3/5"}}
    assert [candidate_rank(n, agents) for n in ("a", "b", "c")] == [0, 1, 2]


def test_a_maintenance_marker_stops_automatic_promotion_but_not_the_named_agent() -> None:
    import dataclasses

    marked = dataclasses.replace(view(), maintenance={"agent": "east", "since": NOW - 60, "reason": "agent stopped"})
    # Everything else says "promote": the primary has been gone long enough, lag within the limit.
    assert decide("west", view(), absent=60) == "promote-self"
    d = decide_role("west", marked, acting_primary=False, policy=AUTO, primary_absent_s=60, lag_s=5.0, rank=0,
                    epoch_age_s=3600)
    assert d.action == "standby" and "stopped on purpose" in d.reason and "east" in d.reason
    # The agent the epoch names takes its claim back when it returns.
    assert decide("east", marked) == "claim"


def test_an_epoch_that_records_another_agent_id_names_another_agent() -> None:
    """Issue 20: a copy of east's config with a fresh state directory (another agent id) claimed epoch 1 by
    the name alone. The epoch records the promoted agent's id; only that identity claims it."""
    def with_id(agent_id: str, primary: PrimaryClaim | None = None) -> GroupView:
        return GroupView(SessionState.CONNECTED, Epoch(3, "east", NOW - 3600, "manual", 7, agent_id), primary)

    def decision(v: GroupView, my_id: str, acting: bool = False) -> str:
        return decide_role("east", v, agent_id=my_id, acting_primary=acting, policy=AUTO, primary_absent_s=1e6,
                           lag_s=5.0, rank=0, epoch_age_s=3600.0).action

    assert decision(with_id("real"), "real") == "claim"
    assert decision(with_id("real"), "copy") == "standby"
    assert "agent id real, not this agent (agent id copy)" in decide_role(
        "east", with_id("real"), agent_id="copy", acting_primary=False, policy=AUTO, primary_absent_s=1e6,
        lag_s=5.0, rank=0, epoch_age_s=3600.0).reason
    # Acting as primary (or holding the node) under another identity: step down.
    assert decision(with_id("real"), "copy", acting=True) == "step-down"
    assert decision(with_id("real", PrimaryClaim("east", "a", 3, NOW, mine=True)), "copy") == "step-down"
    assert decision(with_id("real", PrimaryClaim("east", "a", 3, NOW, mine=True)), "real", acting=True) == \
        "act-primary"
    # An epoch written before agent ids were recorded names the agent by its name alone.
    assert decision(with_id(""), "copy") == "claim"


def test_nobody_promotes_over_a_live_agent_the_epoch_names() -> None:
    """A promotion in progress (or a primary back after a lost session) has an epoch naming it and a live
    registration but no primary node yet: a standby further behind must wait for it however long it takes
    (the CI failure: north, behind west, promoted itself at epoch 3 while west was taking epoch 2)."""
    promoted = view(epoch=4, by="west")
    live = {"west": {"role": "standby", "agent_id": "w1"}, "north": {"role": "standby"}}
    assert claimant_live("north", Epoch(4, "west", NOW, "manual", 7, agent_id="w1"), live)
    assert not claimant_live("north", Epoch(4, "west", NOW, "manual", 7, agent_id="other"), live)
    assert not claimant_live("north", Epoch(4, "west", NOW, "manual", 7), {"north": {}})  # west's session ended
    assert not claimant_live("west", Epoch(4, "west", NOW, "manual", 7), live)  # itself: it claims, not waits
    d = decide_role("north", promoted, acting_primary=False, policy=AUTO, primary_absent_s=1e6, lag_s=1.0, rank=0,
                    epoch_age_s=1e6, claimant_live=True)
    assert d.action == "standby" and "agent west" in d.reason and "live" in d.reason, d
    assert decide_role("north", promoted, acting_primary=False, policy=AUTO, primary_absent_s=1e6, lag_s=1.0,
                       rank=0, epoch_age_s=1e6, claimant_live=False).action == "promote-self"
    # The named agent itself still claims.
    assert decide_role("west", promoted, acting_primary=False, policy=AUTO, primary_absent_s=1e6, lag_s=1.0,
                       rank=0, epoch_age_s=1e6, claimant_live=False).action == "claim"


def test_a_standby_waits_for_a_better_placed_one_that_is_fencing() -> None:
    """The breaker's case: west (ahead) runs a 20 s fence command; north (behind) must not promote itself
    after its 10 s rank delay while west's record says it is fencing at this epoch."""
    agents = {"west": {"role": "standby", "applied_position": [1, 9], "takeover": {"state": "fencing", "epoch": 3}},
              "north": {"role": "standby", "applied_position": [1, 7]}}
    assert fencing_ahead("north", 3, agents) == "west"
    assert fencing_ahead("north", 4, agents) == ""  # fencing at an older epoch: stale
    assert fencing_ahead("west", 3, agents) == ""  # itself
    behind = {**agents, "west": {**agents["west"], "applied_position": [1, 5]}}
    assert fencing_ahead("north", 3, behind) == ""  # a fencer behind this agent is not waited for
    failed = {**agents, "west": {**agents["west"], "takeover": {"state": "fence-failed", "epoch": 3}}}
    assert fencing_ahead("north", 3, failed) == ""
    d = decide_role("north", view(), acting_primary=False, policy=AUTO, primary_absent_s=1e6, lag_s=1.0, rank=1,
                    epoch_age_s=1e6, fencing_ahead="west")
    assert d.action == "standby" and "standby west" in d.reason and "fencing" in d.reason, d


def test_a_former_primary_replaced_since_is_never_a_candidate() -> None:
    """A former primary a later epoch replaced, not rejoined since: its root holds none of the later
    primary's changes, whatever the lag of the snapshot it applied before it was primary says."""
    why = superseded_reason(last_role="primary", primary_epoch=2, epoch=3)
    assert why == "was primary at epoch 2, epoch 3 replaced it, and it has not rejoined since"
    d = decide_role("west", view(epoch=3), acting_primary=False, policy=AUTO, primary_absent_s=60, lag_s=1.0,
                    rank=0, epoch_age_s=3600, superseded=why)
    assert d.action == "standby" and why in d.reason and "not eligible" in d.reason
    assert decide_role("west", view(epoch=3), acting_primary=False, policy=AUTO, primary_absent_s=60, lag_s=1.0,
                       rank=0, epoch_age_s=3600).action == "promote-self"
    # Not superseded: rejoined (last role standby), never primary, or primary at the current epoch (its claim).
    assert superseded_reason(last_role="standby", primary_epoch=2, epoch=3) == ""
    assert superseded_reason(last_role="", primary_epoch=0, epoch=3) == ""
    assert superseded_reason(last_role="primary", primary_epoch=3, epoch=3) == ""
    # The epoch that names it is still its own to claim back.
    assert decide_role("east", view(epoch=3, by="east"), acting_primary=False, policy=AUTO, primary_absent_s=60,
                       lag_s=None, rank=0, epoch_age_s=3600,
                       superseded=superseded_reason(last_role="primary", primary_epoch=3, epoch=3)).action == "claim"
