"""Breaking issue 16's promise that drsync's HDFS snapshots on production never leak, with
``replication.engine = "distcp"`` (deploy/hdfs/README.md, "Two engines" and "How capture and
apply behave on HDFS"). Real agents and commands against the session's real HDFS mini cluster."""

from __future__ import annotations

import re
from pathlib import Path

from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync
from tests.sites import make_site
from tests.test_agents import Pair, wait_for
from tests.test_distcp_breaker import _configure, _engine_lines


def _drsync_snapshots(webhdfs, root: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(s for s in webhdfs.snapshots(root) if s.startswith("drsync-"))


def test_snapshot_delete_on_production_removes_its_hdfs_snapshot(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    prod = make_site("hdfs", tmp_path, webhdfs)
    standby = make_site("hdfs", tmp_path, webhdfs)
    pair = Pair(tmp_path, prod, standby)
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    webhdfs.allow_snapshot(standby.path("standby-data"))
    lines = _engine_lines(hdfs_cluster)
    _configure(pair, lines, lines)
    root = prod.path("prod-data")
    ids = []
    for i in range(4):
        prod.write("prod-data", f"catalog/n{i}.txt", b"x" * (100 + i))
        r = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json")
        assert r.code == 0, r.err
        ids.append(r.out)
    print("after 4 creates", _drsync_snapshots(webhdfs, root))
    repo = Repository.open(open_storage(prod.url("primary-repo")))
    snaps = repo.list_snapshots()
    print([ (s.id, s.content_snapshot) for s in snaps])
    left = snaps[1:]
    r = run_drsync("snapshot", "delete", snaps[0].id, "--config", pair.primary_cfg)
    print("delete first", r.code, r.out, r.err)
    print("after delete first", _drsync_snapshots(webhdfs, root))
    for s in left:
        r = run_drsync("snapshot", "delete", s.id, "--config", pair.primary_cfg)
        print("delete", r.code, r.out, r.err)
    print("after delete all", _drsync_snapshots(webhdfs, root))
    assert len(_drsync_snapshots(webhdfs, root)) <= 1


def test_production_keeps_no_backlog_of_hdfs_snapshots_while_its_standby_is_down(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    prod = make_site("hdfs", tmp_path, webhdfs)
    standby = make_site("hdfs", tmp_path, webhdfs)
    pair = Pair(tmp_path, prod, standby)
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    webhdfs.allow_snapshot(standby.path("standby-data"))
    lines = _engine_lines(hdfs_cluster)
    _configure(pair, lines, lines)
    root = prod.path("prod-data")
    pair.start("primary")  # its standby never answers
    repo_url = prod.url("primary-repo")
    try:
        n = [0]

        def many() -> bool:
            n[0] += 1
            prod.write("prod-data", f"catalog/change{n[0]}.txt", b"y" * n[0])
            return len(Repository.open(open_storage(repo_url)).list_snapshots()) >= 15 or \
                len(_drsync_snapshots(webhdfs, root)) >= 8
        wait_for(many, "six captures", timeout=180)
        print("repo", len(Repository.open(open_storage(repo_url)).list_snapshots()))
        print("hdfs", _drsync_snapshots(webhdfs, root))
        print((tmp_path / "primary.log").read_text()[-3000:])
        assert len(_drsync_snapshots(webhdfs, root)) <= 2
    finally:
        pair.stop_all()


def test_standby_history_snapshots_go_with_a_deleted_snapshot_and_drills_leave_none(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    prod = make_site("hdfs", tmp_path, webhdfs)
    standby = make_site("hdfs", tmp_path, webhdfs)
    pair = Pair(tmp_path, prod, standby)
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    webhdfs.allow_snapshot(standby.path("standby-data"))
    lines = _engine_lines(hdfs_cluster)
    _configure(pair, lines, lines)
    sroot = standby.path("standby-data")
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "first sync", timeout=120)
        prod.write("prod-data", "catalog/second.txt", b"second\n" * 10)
        wait_for(pair.in_sync, "second sync", timeout=120)
        pair.stop_all()
        print("standby snaps", webhdfs.snapshots(sroot))
        print("prod snaps", webhdfs.snapshots(prod.path("prod-data")))
        srepo = Repository.open(open_storage(standby.url("standby-repo")))
        ids = [s.id for s in srepo.list_snapshots()]
        print("standby repo", ids)
        for full in ((), ("--full",)):
            r = run_drsync("drill", "run", "--config", pair.standby_cfg, *full)
            print("drill", full, r.code, r.out[-500:], r.err[-500:])
        r = run_drsync("drill", "run", "--config", pair.standby_cfg, "--to-snapshot", ids[0])
        print("drill to", r.code, r.out[-500:], r.err[-500:])
        print("standby snaps after drills", webhdfs.snapshots(sroot))
        r = run_drsync("snapshot", "delete", ids[0], "--config", pair.standby_cfg, "--break-glass")
        print("delete", r.code, r.out, r.err)
        snaps = webhdfs.snapshots(sroot)
        print("standby snaps after delete", snaps)
        left = {s.id for s in Repository.open(open_storage(standby.url("standby-repo"))).list_snapshots()}
        assert all(s[len("drsync-snap-"):] in left for s in snaps if s.startswith("drsync-snap-")), snaps
        assert not [s for s in snaps if not s.startswith("drsync-snap-")], snaps
        print(webhdfs.snapshots(prod.path("prod-data")))
    finally:
        pair.stop_all()
