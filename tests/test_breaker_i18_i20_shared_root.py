"""Breaker (issues 18/20): two agents never share a data root on one host -- not even part of one.

An agent whose data root lies inside another agent's data root (or holds it) shares that agent's files: as a
standby it would apply its primary's tree over part of production. The check for a shared data root only
compares the paths for equality (a symlink or a ``..`` spelling is caught), so a nested one starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SLOW, tree_state
from tests.group import Group, wait_for
from tests.test_operator_mistakes import copy_config


@pytest.fixture
def grp(tmp_path: Path, zk_server, group: str) -> Iterator[Group]:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    yield g
    g.stop_all()


@pytest.mark.parametrize("where", ["inside", "around"])
def test_an_agent_whose_data_root_nests_with_anothers_is_refused(grp: Group, tmp_path: Path, where: str) -> None:
    g = grp
    g.start("east")
    before = tree_state(g.data["east"])
    cfg = copy_config(g, "east", tmp_path)
    root = g.data["east"] / "catalog" if where == "inside" else tmp_path
    cfg.write_text(cfg.read_text().replace('name = "east"', 'name = "other"').replace(
        f'data = "{tmp_path / "copy-data"}"', f'data = "{root}"'))
    with open(tmp_path / "other.log", "wb") as log:
        other = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=log,
                                 stderr=log)
    try:
        # Either it exits (refused) or it registers in the group (started, sharing east's files).
        wait_for(lambda: other.poll() is not None or "other" in g.coord.agents(), "the second agent to start or exit")
        err = (tmp_path / "other.log").read_text(errors="replace")
        assert other.poll() not in (None, 0), f"an agent with data root {root} started beside east ({g.data['east']})"
        assert "two agents must never share a data root or repository" in err, err
    finally:
        if other.poll() is None:
            other.terminate()
            other.wait(timeout=60 * SLOW)
    assert tree_state(g.data["east"]) == before
