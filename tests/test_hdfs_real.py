"""A restore onto the real HDFS, read back by Hadoop's own client (the session's mini cluster).

The storage-independent tests run on the real cluster through the ``webhdfs`` fixture already
(tests/test_storage_conformance.py, the HDFS pairs of tests/test_snapshot_cli.py and
tests/test_backup_cli.py), and tests/test_hdfs.py covers capture, faults and the error model there.
What this adds: the restored tree as Hadoop lists and reads it rather than as drsync's own walk
sees it, with modes the namenode's umask (022, applied at CREATE and MKDIRS) would cut.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.conftest import init_repo_at, make_tree, run_drsync, tree_state
from tests.sites import HdfsSite


def test_a_restore_onto_hdfs_is_what_hadoop_reads(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    make_tree(data, files=10, big=1)
    for rel, mode in (("catalog/shared.txt", 0o666), ("catalog/tool", 0o777), ("catalog/group.txt", 0o664)):
        (data / rel).write_bytes(rel.encode() * 100)
        (data / rel).chmod(mode)
    (data / "open").mkdir()
    (data / "open" / "inside").write_bytes(b"x")
    for rel, mode in (("open", 0o777), ("tables", 0o775)):
        (data / rel).chmod(mode)
    os.utime(data / "open", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", site.url("restored"))
    assert r.code == 0, r.err
    expected = {}
    for rel, v in tree_state(data).items():
        if v[0] == "dir":
            expected[rel] = ("dir", v[1], v[2] // 1_000_000, None, None)
        elif v[0] == "file":
            expected[rel] = ("file", v[1], v[2] // 1_000_000, len(v[3]), hashlib.sha256(v[3]).hexdigest())
        # symlinks: HDFS has them disabled; drsync skips them with a warning
    hadoop = {p: (e["type"], e["mode"], e["mtime_ms"], e.get("length"), e.get("sha256"))
              for p, e in webhdfs.tree(site.path("restored")).items()}
    assert hadoop == expected
    assert hadoop["catalog/shared.txt"][1] == 0o666 and hadoop["open"][1] == 0o777  # past the umask
