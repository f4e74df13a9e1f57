"""HDFS: URLs, the WebHDFS protocol as the spec has it, the error model, consistent capture, faults.

Everything runs against tests/webhdfs.py (two namenodes, the first a standby,
and a datanode); tests/test_hdfs_real.py runs the storage-independent tests
against a real namenode when one is named.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from drsync.capture import capture
from drsync.dataroot.hdfs import HdfsDataRoot
from drsync.errors import UsageError
from drsync.repository.repo import Repository
from drsync.storage.hdfs import HdfsFs, HdfsPermissionDenied, HdfsUnavailable, parse_hdfs_url
from drsync.storage.memory import MemoryStorage
from tests.conftest import run_drsync
from tests.sites import HdfsSite, LocalSite, make_site, same_tree

# --- URLs ------------------------------------------------------------------------------------


def test_url_parsing() -> None:
    loc = parse_hdfs_url("hdfs://nn1:9870,nn2.example:9870/cluster/data/?user=etl")
    assert loc.namenodes == ("http://nn1:9870", "http://nn2.example:9870")
    assert loc.path == "/cluster/data" and loc.user == "etl"
    assert loc.url == "hdfs://nn1:9870,nn2.example:9870/cluster/data?user=etl"
    assert parse_hdfs_url("swebhdfs://nn:9871/x").namenodes == ("https://nn:9871",)
    assert parse_hdfs_url("hdfs://nn:9870").path == "/"


@pytest.mark.parametrize(("url", "says"), [
    ("hdfs://namenode/data", "is not host:port"),
    ("hdfs:///data", "no namenode"),
    ("hdfs://nn:99999/data", "is not host:port"),
    ("hdfs://nn:9870/a/../b", "may not contain '..'"),
    ("hdfs://nn:9870/data?usr=x", "unknown parameter(s) usr"),
    ("hdfs://nn:9870/data?auth=magic", "auth=magic is not known"),
])
def test_bad_urls_are_usage_errors(url: str, says: str) -> None:
    with pytest.raises(UsageError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_hdfs_url(url)


def test_cli_names_a_bad_hdfs_url_in_one_line(tmp_path: Path) -> None:
    r = run_drsync("init", "--repo", "hdfs://namenode/repo", "--cluster-id", "e", "--release", "1")
    assert r.code == 2 and "is not host:port" in r.err and r.err.count("\n") == 1


# --- the server follows the spec where clients can tell --------------------------------------


def test_webhdfs_server_speaks_the_rest_protocol(webhdfs) -> None:  # type: ignore[no-untyped-def]
    nn = webhdfs.namenode_urls[1]
    base = f"{nn}/webhdfs/v1{webhdfs.test_dir}"
    # CREATE is two steps: a 307 from the namenode to a datanode, then the data to the datanode.
    r = requests.put(f"{base}/f.txt?op=CREATE&user.name=drsync", allow_redirects=False, timeout=10)
    assert r.status_code == 307 and r.headers["Location"].startswith(webhdfs.datanode_url)
    assert requests.put(r.headers["Location"], data=b"hello", timeout=10).status_code == 201
    r = requests.get(f"{base}/f.txt?op=OPEN&user.name=drsync&offset=1&length=3", timeout=10)
    assert r.content == b"ell" and r.history and r.history[0].status_code == 307
    # Errors are RemoteException documents with the Java class names.
    r = requests.get(f"{base}/missing?op=GETFILESTATUS", timeout=10)
    assert r.status_code == 404
    assert r.json()["RemoteException"]["javaClassName"] == "java.io.FileNotFoundException"
    # A standby namenode refuses everything with StandbyException.
    r = requests.get(f"{webhdfs.namenode_urls[0]}/webhdfs/v1/?op=GETFILESTATUS", timeout=10)
    assert r.status_code == 403 and r.json()["RemoteException"]["exception"] == "StandbyException"
    # LISTSTATUS_BATCH pages with startafter and remainingEntries.
    for i in range(5):
        requests.put(requests.put(f"{base}/d/{i}?op=CREATE&user.name=drsync", allow_redirects=False,
                                  timeout=10).headers["Location"], data=b"x", timeout=10)
    webhdfs.list_limit = 2
    page = requests.get(f"{base}/d?op=LISTSTATUS_BATCH&startafter=1", timeout=10).json()["DirectoryListing"]
    assert [s["pathSuffix"] for s in page["partialListing"]["FileStatuses"]["FileStatus"]] == ["2", "3"]
    assert page["remainingEntries"] == 1
    # RENAME answers false rather than replacing an existing file.
    r = requests.put(f"{base}/f.txt?op=RENAME&destination={webhdfs.test_dir}/d/0&user.name=drsync", timeout=10)
    assert r.json() == {"boolean": False}


def test_listing_pages_through_large_directories(webhdfs) -> None:  # type: ignore[no-untyped-def]
    fs = HdfsFs(parse_hdfs_url(webhdfs.url(webhdfs.test_dir)))
    for i in range(7):
        fs.write(f"{webhdfs.test_dir}/many/{i:02}", b"x")
    webhdfs.list_limit = 3
    before = len(webhdfs.requests)
    assert [s["pathSuffix"] for s in fs.list_dir(f"{webhdfs.test_dir}/many")] == [f"{i:02}" for i in range(7)]
    assert [op for op, _ in webhdfs.requests[before:]].count("LISTSTATUS_BATCH") == 3


# --- the error model -------------------------------------------------------------------------


def test_permission_denied_is_one_clear_line_and_changes_nothing(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = LocalSite(tmp_path)
    local.make_tree("data")
    repo = str(tmp_path / "repo")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "e", "--release", "1").code == 0
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("locked", "keep.txt", b"theirs")
    webhdfs.chmod(site.path("locked"), 0o555, owner="hdfs")
    before = site.state("locked")
    r = run_drsync("snapshot", "restore", "--delete-extra", snap, "--repo", repo, "--target", site.url("locked"))
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "HDFS permission denied" in r.err and "as drsync" in r.err and "grant that user access" in r.err
    assert site.state("locked") == before


def test_quota_exceeded_mid_write_leaves_nothing_half_written(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = LocalSite(tmp_path)
    local.make_tree("data")  # two 3 MiB files among small ones
    repo = str(tmp_path / "repo")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "e", "--release", "1").code == 0
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("standby", "old.txt", b"the last good state")
    webhdfs.set_quota(site.path("standby"), 4 << 20)  # the first big file fits, the second does not
    before = site.state("standby")
    r = run_drsync("snapshot", "restore", "--delete-extra", snap, "--repo", repo, "--target", site.url("standby"))
    assert r.code == 1 and "HDFS quota exceeded" in r.err and "setSpaceQuota" in r.err, r.err
    assert site.state("standby") == before
    assert not any(p.startswith(".drsync-staging") for p in site.paths("standby"))
    # The same through the repository: a pack that does not fit is never published.
    hrepo = site.url("repo")
    assert run_drsync("init", "--repo", hrepo, "--cluster-id", "e", "--release", "1").code == 0
    webhdfs.set_quota(site.path("repo"), 1 << 20)
    r = run_drsync("snapshot", "create", "--repo", hrepo, "--source", tmp_path / "data")
    assert r.code == 1 and "HDFS quota exceeded" in r.err
    assert not any(".tmp-" in p or p.endswith(".pack") for p in site.paths("repo"))
    assert run_drsync("snapshot", "list", "--repo", hrepo, "--json").json() == []
    # Space comes back: everything works again.
    webhdfs.set_quota(site.path("standby"), -1)
    assert run_drsync("snapshot", "restore", "--delete-extra",
                      snap, "--repo", repo, "--target", site.url("standby")).code == 0
    assert same_tree(local, "data", site, "standby")


def test_safe_mode_is_waited_out_then_reported(webhdfs) -> None:  # type: ignore[no-untyped-def]
    fs = HdfsFs(parse_hdfs_url(webhdfs.url(webhdfs.test_dir)), retry_s=20)
    webhdfs.safe_mode = True
    timer = threading.Timer(0.8, lambda: setattr(webhdfs, "safe_mode", False))
    timer.start()
    fs.write(f"{webhdfs.test_dir}/after-safe-mode", b"x")  # retried until the namenode left safe mode
    timer.join()
    assert fs.read(f"{webhdfs.test_dir}/after-safe-mode") == b"x"
    webhdfs.safe_mode = True
    quick = HdfsFs(parse_hdfs_url(webhdfs.url(webhdfs.test_dir)), retry_s=0.5)
    with pytest.raises(HdfsUnavailable, match="safe mode"):
        quick.mkdirs(f"{webhdfs.test_dir}/never")
    assert quick.read(f"{webhdfs.test_dir}/after-safe-mode") == b"x"  # reads are fine in safe mode


def test_no_active_namenode_is_reported(webhdfs) -> None:  # type: ignore[no-untyped-def]
    webhdfs.active = 5  # both namenodes standby
    fs = HdfsFs(parse_hdfs_url(webhdfs.url(webhdfs.test_dir)), retry_s=0.5)
    with pytest.raises(HdfsUnavailable, match="all answered as standby"):
        fs.status(webhdfs.test_dir)


def test_delegation_token_authentication(webhdfs, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    webhdfs.require_token = True
    webhdfs.tokens["good-token"] = "drsync"
    url = webhdfs.url(webhdfs.test_dir, user=None)
    with pytest.raises(HdfsPermissionDenied, match="authentication failed"):
        HdfsFs(parse_hdfs_url(url), retry_s=0).status(webhdfs.test_dir)
    monkeypatch.setenv("DRSYNC_HDFS_TOKEN", "good-token")
    fs = HdfsFs(parse_hdfs_url(url), retry_s=0)
    fs.write(f"{webhdfs.test_dir}/by-token", b"x")
    assert fs.status(f"{webhdfs.test_dir}/by-token")["owner"] == "drsync"
    monkeypatch.setenv("DRSYNC_HDFS_TOKEN", "expired")
    r = run_drsync("init", "--repo", webhdfs.url(webhdfs.test_dir + "/r", user=None), "--cluster-id", "e",
                   "--release", "1", env={"DRSYNC_HDFS_TOKEN": "expired", "DRSYNC_HDFS_RETRY_S": "0"})
    assert r.code == 1 and "authentication failed" in r.err and "expired" not in r.err.split("(")[0]


# --- consistent capture with HDFS snapshots --------------------------------------------------


def _repo() -> Repository:
    return Repository.init(MemoryStorage(), cluster_id="e", release="1")


def _capture(root: HdfsDataRoot, repo: Repository, parent=None, parent_at=None, at=None):  # type: ignore[no-untyped-def]
    w = repo.chunk_writer()
    result = capture(root, w, parent=parent, parent_captured_at=parent_at, captured_at=at)
    w.flush()
    return result


def test_capture_reads_a_frozen_snapshot_while_the_cluster_writes(webhdfs) -> None:  # type: ignore[no-untyped-def]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a.txt", b"before")
    site.write("data", "b.txt", b"before")
    webhdfs.allow_snapshot(site.path("data"))
    fs = HdfsFs(parse_hdfs_url(site.url("")))

    def writer_during_capture(op: str, path: str) -> None:
        if op == "OPEN" and "/.snapshot/" in path:
            webhdfs.on_request = None
            # Done before this OPEN is answered (the hook runs outside the namespace lock; the write is
            # served by another server thread): the live file changes in the middle of the capture.
            fs.write(f"{site.path('data')}/b.txt", b"written during the capture", overwrite=True)

    webhdfs.on_request = writer_during_capture
    root = HdfsDataRoot(site.url("data"))
    result = _capture(root, _repo(), at=time.time())
    sizes = dict(zip(result.manifest.pycolumn("path"),
                     result.manifest.table.column("size").to_pylist(), strict=True))
    assert sizes == {"a.txt": 6, "b.txt": 6}, "the capture saw the snapshot, not the live tree"
    assert len(result.warnings) == 0 and result.warnings.lines() == []
    assert site.state("data")["b.txt"][3] != site.state("data")["a.txt"][3]  # the live file did change


def test_snapshot_diff_walks_only_what_changed_and_equals_a_full_walk(webhdfs) -> None:  # type: ignore[no-untyped-def]
    import random

    rnd = random.Random(7)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    for d in range(6):
        for f in range(5):
            site.write("data", f"d{d}/sub/f{f}", rnd.randbytes(50))
    webhdfs.allow_snapshot(site.path("data"))
    root = HdfsDataRoot(site.url("data"))
    repo = _repo()
    at = time.time() - 30  # older than the racy window, so unchanged files are reused
    result = _capture(root, repo, at=at)
    assert [n.rsplit("-", 2)[0] for n in webhdfs.snapshots(site.path("data"))] == [f"drsync-{int(at * 1000)}"]
    fs = HdfsFs(parse_hdfs_url(site.url("")))
    for step in range(4):
        # Change a few things of every kind.
        site.write("data", f"d{step}/sub/f{step}", rnd.randbytes(60))
        site.write("data", f"d{step}/new-{step}/deep/file", b"created")
        site.remove("data", f"d{5 - step}/sub/f4")
        fs.rename(f"{site.path('data')}/d{step}/sub/f1", f"{site.path('data')}/d{step}/moved-{step}")
        site.chmod("data", f"d{step}/sub/f2", 0o600)
        parent, parent_at, at = result.manifest, at, at + 1
        before = len(webhdfs.requests)
        result = _capture(root, repo, parent, parent_at, at)
        listed = [p for op, p in webhdfs.requests[before:] if op == "LISTSTATUS_BATCH" and "/.snapshot/" in p]
        assert any(op == "GETSNAPSHOTDIFF" for op, _ in webhdfs.requests[before:])
        assert len(listed) < 13, f"step {step}: the diff should spare the unchanged directories ({listed})"
        # The same state captured by walking everything gives the same manifest.
        webhdfs.snapshot_diff = False
        full = _capture(HdfsDataRoot(site.url("data")), _repo(), at=at + 0.5)
        webhdfs.snapshot_diff = True
        cols = ["path", "type", "mode", "size", "mtime_s", "mtime_nsec", "content"]
        assert result.manifest.table.select(cols).equals(full.manifest.table.select(cols)), f"step {step}"
        assert [n.rsplit("-", 2)[0] for n in webhdfs.snapshots(site.path("data"))] == [f"drsync-{int(at * 1000)}"]


def test_unsnapshottable_root_falls_back_and_says_so_once(webhdfs, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("plain", "a.txt", b"x")
    root = HdfsDataRoot(site.url("plain"))
    with caplog.at_level(logging.WARNING, logger="drsync.hdfs"):
        first = _capture(root, _repo(), at=time.time())
        _capture(root, _repo(), at=time.time())
    said = [r for r in caplog.records if "is not snapshottable" in r.getMessage()]
    assert len(said) == 1 and "hdfs dfsadmin -allowSnapshot" in said[0].getMessage()
    assert first.manifest.pycolumn("path") == ["a.txt"]


def test_leftover_snapshots_of_crashed_captures_are_removed(webhdfs) -> None:  # type: ignore[no-untyped-def]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a.txt", b"x")
    webhdfs.allow_snapshot(site.path("data"))
    fs = HdfsFs(parse_hdfs_url(site.url("")))
    import os
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace("-", "_")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    now = int(time.time() * 1000)
    fs.create_snapshot(site.path("data"), f"drsync-{now - 7_200_000}-otherhost-1")  # two hours ago, elsewhere
    fs.create_snapshot(site.path("data"), f"drsync-{now - 5_000}-{host}-{gone}")  # killed a moment ago, here
    fs.create_snapshot(site.path("data"), f"drsync-{now - 4_000}-{host}-{os.getpid()}")  # still capturing
    fs.create_snapshot(site.path("data"), "operators-own")
    at = time.time()
    _capture(HdfsDataRoot(site.url("data")), _repo(), at=at)
    left = webhdfs.snapshots(site.path("data"))
    assert f"drsync-{now - 4_000}-{host}-{os.getpid()}" in left and "operators-own" in left
    assert [n for n in left if n.startswith(f"drsync-{int(at * 1000)}-")], left
    assert len(left) == 3, left


# --- faults during replication ---------------------------------------------------------------


def test_namenode_failover_during_a_shipment(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The active namenode changes several times while a snapshot ships onto an HDFS standby."""
    from tests.test_agents import Pair, wait_for

    pair = Pair(tmp_path, LocalSite(tmp_path), make_site("hdfs", tmp_path, webhdfs))
    flips = []

    def flip(op: str, path: str) -> None:
        if op in ("CREATE", "RENAME") and len(webhdfs.requests) % 7 == 0:
            webhdfs.active = 1 - webhdfs.active
            flips.append(op)

    try:
        pair.start("standby")
        webhdfs.on_request = flip
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to match production across namenode failovers", timeout=120)
        assert len(flips) >= 3
        webhdfs.on_request = None
        pair.kill("primary", signal.SIGTERM)  # nothing ships while the root is compared
        pair.kill("standby")
        pair.start("standby")
        pair.assert_root_is_applied_snapshot("after-failovers")
    finally:
        webhdfs.on_request = None
        pair.stop_all()


def test_agent_status_json_on_hdfs(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An agent on HDFS needs a local state directory; without one it says so."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a", b"x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "e"\nrelease = "1"\ndata = "{site.url("data")}"\n'
                   f'repository = "{site.url("repo")}"\n[agent]\nrole = "primary"\n')
    assert run_drsync("init", "--config", cfg).code == 0
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 2 and "set agent.state_dir to a local directory" in r.err
    check = run_drsync("config", "check", "--config", cfg, "--json")
    doc = json.loads(check.out)
    assert any(c["name"] == "data root" and c["ok"] for c in doc["checks"]), doc


def test_drill_on_an_hdfs_standby_compares_its_root(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_agents import Pair, wait_for

    pair = Pair(tmp_path, LocalSite(tmp_path), make_site("hdfs", tmp_path, webhdfs))
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the HDFS standby to match production")
        pair.kill("primary", 15)  # nothing moves while the standby's root is examined
        r = run_drsync("drill", "run", "--config", pair.standby_cfg, "--json")
        assert r.code == 0, r.err
        steps = {s["name"]: s for s in json.loads(r.out)["steps"]}
        assert steps["restore"]["passed"] and steps["restore"]["figures"]["root_compared"] is True
        # Someone writes to the standby's root by hand: the drill names the file.
        pair.standby_site.write("standby-data", "catalog/f002.txt", b"edited on the standby")
        r = run_drsync("drill", "run", "--config", pair.standby_cfg, "--json")
        assert r.code == 1
        restore = {s["name"]: s for s in json.loads(r.out)["steps"]}["restore"]
        assert restore["passed"] is False and "catalog/f002.txt" in restore["detail"]
    finally:
        pair.stop_all()


def test_pack_reads_come_from_read_ahead_windows(webhdfs) -> None:  # type: ignore[no-untyped-def]
    import random

    from drsync.storage import ObjectMissing
    from drsync.storage.hdfs import HdfsStorage

    rnd = random.Random(3)
    store = HdfsStorage(webhdfs.url(f"{webhdfs.test_dir}/repo"), create=True)
    data = rnd.randbytes(10 << 20)
    store.write("packs/ab/p.pack", data)
    ranges = [(o, rnd.randrange(1, 300_000)) for o in sorted(rnd.randrange(0, len(data)) for _ in range(200))]
    ranges += [((4 << 20) - 10, 20), (len(data) - 5, 5), (len(data) - 5, 50)]
    before = len(webhdfs.requests)
    for offset, length in ranges:
        assert store.read_range("packs/ab/p.pack", offset, length) == data[offset:offset + length]
    opens = [p for op, p in webhdfs.requests[before:] if op == "OPEN"]
    assert len(opens) <= 10, f"{len(opens)} OPENs for {len(ranges)} chunk reads in pack order"
    store.delete("packs/ab/p.pack")
    with pytest.raises(ObjectMissing):
        store.read_range("packs/ab/p.pack", 0, 10)


def test_kerberos_without_its_package_is_a_usage_error() -> None:
    import importlib.util

    if importlib.util.find_spec("requests_kerberos") is not None:
        pytest.skip("requests-kerberos is installed here; this checks the message given without it")
    r = run_drsync("init", "--repo", "hdfs://127.0.0.1:9/x?auth=kerberos", "--cluster-id", "e", "--release", "1")
    assert r.code == 2 and "pip install 'hdfs[kerberos]'" in r.err and r.err.count("\n") == 1


def test_a_small_change_applied_onto_hdfs_touches_only_its_directory(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = LocalSite(tmp_path)
    for d in range(40):
        local.write("data", f"d{d:02}/f", b"x" * d)
    local.age("data")
    repo = str(tmp_path / "repo")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "e", "--release", "1").code == 0
    site = HdfsSite(webhdfs, webhdfs.test_dir)

    def restore_counting() -> int:
        snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()
        before = len(webhdfs.requests)
        assert run_drsync("snapshot", "restore", "--delete-extra",
                          snap["id"], "--repo", repo, "--target", site.url("sb")).code == 0
        assert same_tree(local, "data", site, "sb")
        return sum(1 for op, _ in webhdfs.requests[before:] if op in ("SETTIMES", "SETPERMISSION"))

    first = restore_counting()
    assert first >= 2 * 40  # every directory and file gets its mode and time
    local.write("data", "d07/f", b"changed")
    assert restore_counting() <= 4  # the file, and its one directory
