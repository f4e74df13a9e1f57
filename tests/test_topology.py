"""Who ships to whom (drsync.agent.topology): fan-out, cascades, and the fallbacks when a chain breaks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from drsync.agent.topology import feeders, targets_of


def agents(**spec: tuple[str, str]) -> dict[str, dict[str, Any]]:
    """name=(role, upstream) -> records as agents publish them in ZooKeeper."""
    return {n: {"role": role, "address": f"{n}:7420", **({"upstream": up} if up else {})}
            for n, (role, up) in spec.items()}


def test_fan_out_the_primary_feeds_every_standby_that_follows_nobody() -> None:
    a = agents(east=("primary", ""), west=("standby", ""), north=("standby", ""))
    assert feeders("east", a) == {"west": "east", "north": "east"}
    assert targets_of("east", "east", a) == {"north:7420": "north", "west:7420": "west"}
    assert targets_of("west", "east", a) == {}


def test_a_cascade_the_far_standby_is_fed_by_its_upstream_and_the_primary_ships_once() -> None:
    a = agents(east=("primary", ""), near=("standby", ""), far=("standby", "near"), farther=("standby", "far"))
    assert feeders("east", a) == {"near": "east", "far": "near", "farther": "far"}
    assert targets_of("east", "east", a) == {"near:7420": "near"}
    assert targets_of("near", "east", a) == {"far:7420": "far"}
    assert targets_of("far", "east", a) == {"farther:7420": "farther"}


def test_an_upstream_that_is_down_or_not_a_standby_falls_back_to_the_primary() -> None:
    down = agents(east=("primary", ""), far=("standby", "near"))  # near has no live registration
    assert feeders("east", down) == {"far": "east"}
    ex = agents(east=("primary", ""), near=("ex-primary", ""), far=("standby", "near"))
    assert feeders("east", ex) == {"far": "east"}
    # A chain broken further up: far follows mid, mid follows a dead agent: mid is fed by the primary, far by mid.
    chain = agents(east=("primary", ""), mid=("standby", "gone"), far=("standby", "mid"))
    assert feeders("east", chain) == {"mid": "east", "far": "mid"}


def test_loops_and_self_references_fall_back_to_the_primary() -> None:
    a = agents(east=("primary", ""), a=("standby", "b"), b=("standby", "a"), c=("standby", "c"))
    assert feeders("east", a) == {"a": "east", "b": "east", "c": "east"}
    tail = agents(east=("primary", ""), a=("standby", "b"), b=("standby", "a"), d=("standby", "a"))
    assert feeders("east", tail)["d"] == "a"  # a is on the loop, so the primary feeds it; d follows a


def test_an_upstream_naming_the_primary_or_the_promoted_middle_is_the_primary() -> None:
    a = agents(east=("primary", ""), far=("standby", "east"))
    assert feeders("east", a) == {"far": "east"}
    # The middle of a cascade promoted: the far standby follows it, now as the primary, without a change.
    promoted = agents(near=("primary", ""), far=("standby", "near"), east=("standby", ""))
    assert feeders("near", promoted) == {"far": "near", "east": "near"}


def test_without_a_primary_a_relay_still_feeds_its_followers() -> None:
    a = agents(near=("standby", ""), far=("standby", "near"))
    assert feeders("", a) == {"near": "", "far": "near"}
    assert targets_of("near", "", a) == {"far:7420": "far"}


def test_records_without_an_address_are_not_targets() -> None:
    a = agents(east=("primary", ""), west=("standby", ""))
    del a["west"]["address"]
    assert targets_of("east", "east", a) == {}


# --- a cascaded standby's admission (a real receiver; ZooKeeper's epoch read injected) ---------------------


def test_a_cascaded_standby_admits_its_upstream_at_the_groups_epoch_only(tmp_path: Path) -> None:
    from drsync.agent.standby import StandbyReceiver
    from drsync.agent.state import StateStore
    from drsync.errors import FencedError
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage
    from drsync.transport import Caller

    repo = Repository.init(LocalStorage(tmp_path / "repo", create=True), cluster_id="c", release="1")
    (tmp_path / "data").mkdir()
    rx = StandbyReceiver(repo, str(tmp_path / "data"), StateStore(str(tmp_path / "state")), agent="far")
    rx.group_epoch = lambda: (2, "east")  # ZooKeeper: epoch 2 names east
    rx.upstream = "near"
    rx.admit(Caller("east", 2, time.time(), time.time()))  # the primary
    rx.admit(Caller("near", 2, time.time(), time.time()))  # its upstream, relaying epoch 2
    with pytest.raises(FencedError, match="relays a snapshot produced at epoch 1, lower than epoch 2"):
        rx.admit(Caller("near", 1, time.time(), time.time()))  # what a fenced primary produced
    with pytest.raises(FencedError, match="only that agent .or near"):
        rx.admit(Caller("west", 2, time.time(), time.time()))  # another standby is no upstream of far
    rx.upstream = ""
    with pytest.raises(FencedError):
        rx.admit(Caller("near", 2, time.time(), time.time()))  # without a cascade only the primary ships
