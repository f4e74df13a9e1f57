"""Breaker (issues 18/20): a standby whose data root holds nothing but a freshly made filesystem's
``lost+found`` (an empty directory) is an empty root, yet promote takes it over a non-empty group without
--promote-empty-root: the emptiness check counts directory entries, not data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.group import Group, wait_for


@pytest.fixture
def grp(tmp_path: Path, zk_server, group: str) -> Iterator[Group]:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    yield g
    g.stop_all()


def test_a_standby_holding_only_lost_and_found_needs_promote_empty_root(grp: Group) -> None:
    g = grp
    g.start("east")
    assert g.promote("east").code == 0
    wait_for(lambda: g.drsync("east", "snapshot", "list", "--json").json(), "east's first snapshot")
    g.kill("east")
    (g.data["west"] / "lost+found").mkdir()  # a new, empty volume mounted as west's data root
    g.start("west")  # never applied anything
    r = g.promote("west", "--force", "--accept-data-loss")
    assert r.code == 4 and "is empty" in r.err and "--promote-empty-root" not in r.err, (r.code, r.err)
    assert g.coord.read_epoch().epoch == 1
