"""Diff-base snapshots on HDFS never pile up: on a real namenode, and through a gateway that cannot list them.

drsync keeps one HDFS snapshot of a data root between captures (the base the next GETSNAPSHOTDIFF
starts from) and removes leftovers of crashed captures. Both rest on finding its snapshots again.
A real namenode lists ``<root>/.snapshot`` (checked here with Hadoop's own client, not drsync's);
a gateway that hides the folder and lacks GETSNAPSHOTLIST gets no kept snapshots at all (the test
server stands in for such a gateway: the mini cluster has no such front end).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from drsync.capture import capture
from drsync.dataroot.hdfs import SNAPSHOT_PREFIX, HdfsDataRoot
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage
from tests.sites import HdfsSite


def _captures(site: HdfsSite, n: int) -> list[Any]:
    """``n`` captures in a row, each diffing against the one before (as the agent's cycle does)."""
    repo = Repository.init(MemoryStorage(), cluster_id="e", release="1")
    root = HdfsDataRoot(site.url("data"))
    out: list[Any] = []
    parent = parent_at = None
    for i in range(n):
        site.write("data", f"f{i}.txt", f"version {i}".encode())
        at = time.time()
        w = repo.chunk_writer()
        result = capture(root, w, parent=parent, parent_captured_at=parent_at, captured_at=at)
        w.flush()
        out.append(result)
        parent, parent_at = result.manifest, at
    return out


def test_a_real_namenode_keeps_exactly_one_diff_base(webhdfs) -> None:  # type: ignore[no-untyped-def]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a.txt", b"x")
    webhdfs.allow_snapshot(site.path("data"))
    results = _captures(site, 4)
    assert [r.manifest.pycolumn("path") for r in results][-1] == ["a.txt", "f0.txt", "f1.txt", "f2.txt", "f3.txt"]
    ours = [n for n in webhdfs.snapshots(site.path("data")) if n.startswith(SNAPSHOT_PREFIX)]
    assert len(ours) == 1, f"drsync left {ours} on a real namenode; it keeps one diff base"


def test_unlistable_snapshots_are_never_kept(fake_webhdfs, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A gateway that refuses LISTSTATUS of ``<root>/.snapshot`` and knows no GETSNAPSHOTLIST: every
    capture still works (whole walks) and removes its own snapshot, and says why once."""
    fake_webhdfs.list_snapshot_dir = False
    try:
        site = HdfsSite(fake_webhdfs, fake_webhdfs.test_dir)
        site.write("data", "a.txt", b"x")
        fake_webhdfs.allow_snapshot(site.path("data"))
        with caplog.at_level(logging.WARNING, logger="drsync"):
            results = _captures(site, 3)
        assert results[-1].manifest.pycolumn("path") == ["a.txt", "f0.txt", "f1.txt", "f2.txt"]
        assert fake_webhdfs.snapshots(site.path("data")) == [], "snapshots pile up where they cannot be listed"
        said = [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        fake_webhdfs.list_snapshot_dir = True
