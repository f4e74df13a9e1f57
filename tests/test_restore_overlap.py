"""A restore never writes into a running agent's data root, whichever way the target overlaps it: the root
itself (tests/test_breaker_s47.py), a directory inside it (new or existing, spelled through a symlink or a
bind mount), or a directory holding it. A standby's agent applies to its whole root and reports what it holds;
a restore into part of it leaves the root other than what the agent reports, and a promotion takes that root."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from drsync.errors import UsageError
from drsync.fsutil import lies_within, local_location
from tests.conftest import run_drsync, tree_state
from tests.group import Group


def test_lies_within_by_path_link_and_bind_mount(tmp_path: Path) -> None:
    top = tmp_path / "root"
    (top / "sub").mkdir(parents=True)
    os.symlink(top / "sub", tmp_path / "link")
    assert lies_within(str(top / "sub" / "not-yet" / "deeper"), str(top))
    assert lies_within(str(tmp_path / "link" / "x"), str(top))
    assert lies_within(f"file://{top}/sub", str(top))
    assert not lies_within(str(tmp_path / "root-sibling"), str(top))
    assert not lies_within(str(tmp_path), str(top)) and lies_within(str(top), str(tmp_path))
    assert lies_within("hdfs://nn:9870/data/x?user=a", "hdfs://nn:9870/data")
    assert not lies_within("hdfs://nn:9870/database", "hdfs://nn:9870/data")
    assert not lies_within("hdfs://other:9870/data/x", "hdfs://nn:9870/data")
    assert not lies_within("hdfs://nn:9870/data", "/data")
    alias = tmp_path / "alias"
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(top), str(alias)], capture_output=True).returncode == 0:
        try:
            assert lies_within(str(alias / "sub" / "new"), str(top)), "a bind mount of the root was not seen"
        finally:
            subprocess.run(["umount", "-l", str(alias)], check=False)


def test_a_restore_overlapping_a_running_standbys_root_is_refused(zk_server, tmp_path: Path) -> None:
    g = Group(tmp_path, zk_server.hosts, f"g-{uuid.uuid4().hex[:12]}", ["east", "west"])
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        snap = g.wait_synced("east", "west", "west to apply production")
        west = g.data["west"]
        os.symlink(west / "catalog", tmp_path / "catalog-link")
        before = tree_state(west)
        targets = {west / "catalog": "lies inside that root", west / "new-dir": "lies inside that root",
                   tmp_path / "catalog-link" / "x": "lies inside that root", tmp_path: "holds that root"}
        for target, where in targets.items():
            for extra in ((), ("--overwrite", "--delete-extra")):
                r = g.drsync("west", "snapshot", "restore", snap, "--target", str(target), *extra)
                assert r.code == 4 and where in r.err and len(r.err.strip().splitlines()) == 1, (target, r)
            r = run_drsync("snapshot", "restore", snap, "--repo", tmp_path / "west-repo", "--target", target)
            assert r.code == 4 and where in r.err, ("--repo only", target, r)
        assert tree_state(west) == before, "a refused restore changed the standby's root"
        assert not (west / "new-dir").exists()
        # Outside the root it goes ahead.
        r = g.drsync("west", "snapshot", "restore", snap, "--target", str(tmp_path / "check"))
        assert r.code == 0, r.err
    finally:
        g.stop_all()


@pytest.mark.parametrize("url,path", [("/a/b", "/a/b"), ("rel/x", "rel/x"), ("file:///a/b", "/a/b"),
                                      ("file:/a/b", "/a/b"), ("file://localhost/a/b", "/a/b"),
                                      ("FILE:///a/b", "/a/b"), ("file://LocalHost/a/b", "/a/b"),
                                      ("file:///a/my%20dir", "/a/my dir"), ("file:///a/%ff", "/a/\udcff"),
                                      ("hdfs://nn:9870/a", None), ("memory://x", None)])
def test_one_reading_of_local_locations(url: str, path: str | None) -> None:
    assert local_location(url) == path


@pytest.mark.parametrize("url", ["file://otherhost/a", "file:relative", "file://", "file:///a?b", "file:///a#b",
                                 "file://localhost"])
def test_a_file_url_naming_no_local_absolute_path_is_refused(url: str) -> None:
    with pytest.raises(UsageError, match="file URL"):
        local_location(url)


def test_a_restore_into_a_bind_mount_of_the_repository_is_refused(tmp_path: Path, mounts) -> None:  # type: ignore[no-untyped-def]
    """The repository (and an agent's state directory) is drsync's own: a restore target inside it is refused
    (exit 2, nothing written) however it is spelled, a bind mount of it included, not only by its path."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src).code == 0
    def content() -> dict:  # type: ignore[type-arg]
        return {k: v for k, v in tree_state(repo).items() if k != "locks"}  # the restore's read lock comes and goes

    before = content()
    mounts.bind(repo, tmp_path / "alias")
    for target in (tmp_path / "alias" / "restored", tmp_path / "alias"):
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", target)
        assert r.code == 2 and "lies inside drsync's own" in r.err, (target, r)
        assert content() == before, f"a restore into {target} changed the repository"


def test_the_host_registry_of_a_service_user_counts_as_that_users(tmp_path: Path) -> None:
    """/run/drsync/agents made by a non-root service (systemd's RuntimeDirectory=drsync, as deploy/systemd has
    it: its /tmp is private) is read, with that user's trust rules; root's is trusted whole; a link is not read."""
    from drsync.agent.registry import system_registry

    mine, theirs = tmp_path / "root-owned", tmp_path / "service-owned"
    mine.mkdir()
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    (tmp_path / "link").symlink_to(theirs)
    assert system_registry(str(mine)) == (str(mine), None if os.getuid() == 0 else os.getuid())
    assert system_registry(str(theirs)) == (str(theirs), 65534)
    assert system_registry(str(tmp_path / "link")) is None
    assert system_registry(str(tmp_path / "absent")) is None
