"""HDFS: URLs, the WebHDFS protocol, the error model, consistent capture, faults.

Everything runs against the session's real HDFS (Hadoop 3.5's MiniDFSCluster: an HA pair of
namenodes, a datanode, 1 MiB blocks, 25 entries per listing page; tests/realhdfs.py), and what a
client really asked is read from the namenodes' audit log. A few tests use the WebHDFS test server
(tests/webhdfs.py, the ``fake_webhdfs`` fixture) for a fault the real cluster cannot produce; each
says why in its docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from drsync.capture import capture
from drsync.dataroot.hdfs import SNAPSHOT_PREFIX, HdfsDataRoot, HdfsFrozenRoot
from drsync.errors import UsageError
from drsync.repository.manifest import FILE, Manifest
from drsync.repository.repo import Repository
from drsync.storage.hdfs import HdfsFs, HdfsPermissionDenied, HdfsUnavailable, parse_hdfs_url
from drsync.storage.memory import MemoryStorage
from tests.conftest import SLOW, init_repo, init_repo_at, run_drsync
from tests.group import wait_for
from tests.sites import HdfsSite, LocalSite, make_site, same_tree

MiB = 1 << 20


def _fs(cluster: Any, retry_s: float = 30) -> HdfsFs:
    return HdfsFs(parse_hdfs_url(cluster.url(cluster.test_dir)), retry_s=retry_s)


def _repo() -> Repository:
    return Repository.init(MemoryStorage(), cluster_id="e", release="1")


def _capture(root: HdfsDataRoot, repo: Repository, parent=None, parent_at=None, at=None):  # type: ignore[no-untyped-def]
    w = repo.chunk_writer()
    result = capture(root, w, parent=parent, parent_captured_at=parent_at, captured_at=at)
    w.flush()
    return result


def _captured(repo: Repository, manifest: Manifest) -> dict[str, tuple[Any, ...]]:
    """What a capture holds, in the form of :func:`_hadoop`: type, mode, mtime (ms), and for files
    the length and SHA-256 of the bytes stored in the repository."""
    out: dict[str, tuple[Any, ...]] = {}
    for e in manifest.entries():
        if e.type == FILE:
            data = b"".join(repo.read_chunk(c) for c in e.chunks)
            assert len(data) == e.size, e.path
            out[e.path] = ("file", e.mode, e.mtime_ns // 1_000_000, len(data), hashlib.sha256(data).hexdigest())
        else:
            out[e.path] = (e.type, e.mode, e.mtime_ns // 1_000_000, None, None)
    return out


def _hadoop(webhdfs: Any, path: str) -> dict[str, tuple[Any, ...]]:
    """The tree below ``path`` as Hadoop's own client lists and reads it."""
    return {p: (e["type"], e["mode"], e["mtime_ms"], e.get("length"), e.get("sha256"))
            for p, e in webhdfs.tree(path).items()}


def _no_dir_mtimes(tree: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {p: ((*v[:2], None, *v[3:]) if v[0] == "dir" else v) for p, v in tree.items()}


def _drsync_snapshots(webhdfs: Any, path: str) -> list[str]:
    return [n for n in webhdfs.snapshots(path) if n.startswith(SNAPSHOT_PREFIX)]


def _tag(name: str) -> str:
    """``drsync-<ms>`` of a drsync snapshot name (without host and pid)."""
    return name.rsplit("-", 2)[0]


def _listed_dirs(webhdfs: Any, mark: int, snapshot_root: str) -> list[str]:
    """Directories below ``snapshot_root`` listed since ``mark`` (one entry per page), relative."""
    return [src[len(snapshot_root):].strip("/") for cmd, src in webhdfs.ops_since(mark, under=snapshot_root)
            if cmd == "listStatus"]


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


def test_kerberos_without_its_package_is_a_usage_error() -> None:
    import importlib.util

    if importlib.util.find_spec("requests_kerberos") is not None:
        pytest.skip("requests-kerberos is installed here; this checks the message given without it")
    r = run_drsync("init", "--repo", "hdfs://127.0.0.1:9/x?auth=kerberos", "--cluster-id", "e", "--release", "1")
    assert r.code == 2 and "pip install 'hdfs[kerberos]'" in r.err and r.err.count("\n") == 1


# --- the protocol: the test server answers as a real namenode does --------------------------


def _speak_webhdfs(active: str, standby: str, d: str) -> dict[str, Any]:
    """The same raw WebHDFS requests, sent to either server: what a client can tell of the answers."""
    user = "user.name=drsync"

    def error(r: requests.Response) -> tuple[int, str, str]:
        x = r.json()["RemoteException"]
        return r.status_code, x["exception"], x["javaClassName"]

    def create(url: str, data: bytes) -> tuple[int, requests.Response]:
        r = requests.put(f"{url}?op=CREATE&{user}", allow_redirects=False, timeout=30)
        return r.status_code, requests.put(r.headers["Location"], data=data, timeout=30)

    def page(query: str) -> tuple[list[str], int]:
        doc = requests.get(f"{active}/webhdfs/v1{d}/d?op=LISTSTATUS_BATCH&{query}&{user}",
                           timeout=30).json()["DirectoryListing"]
        return [s["pathSuffix"] for s in doc["partialListing"]["FileStatuses"]["FileStatus"]], doc["remainingEntries"]

    seen: dict[str, Any] = {}
    # A standby refuses namespace calls; CREATE it redirects all the same, and the datanode refuses.
    seen["standby GETFILESTATUS"] = error(requests.get(f"{standby}/webhdfs/v1{d}?op=GETFILESTATUS&{user}",
                                                       timeout=30))
    status, r = create(f"{standby}/webhdfs/v1{d}/g", b"x")
    seen["standby CREATE"] = (status, error(r))
    # CREATE and OPEN are two steps: a 307 from the namenode to a datanode.
    status, r = create(f"{active}/webhdfs/v1{d}/f.txt", b"hello")
    seen["CREATE"] = (status, r.status_code)
    create(f"{active}/webhdfs/v1{d}/e.txt", b"another")
    r = requests.get(f"{active}/webhdfs/v1{d}/f.txt?op=OPEN&offset=1&length=3&{user}", timeout=30)
    seen["OPEN"] = (r.content, [h.status_code for h in r.history])
    seen["missing"] = error(requests.get(f"{active}/webhdfs/v1{d}/missing?op=GETFILESTATUS&{user}", timeout=30))
    seen["unknown op"] = error(requests.get(f"{active}/webhdfs/v1{d}?op=NOSUCHOP&{user}", timeout=30))
    # LISTSTATUS_BATCH pages after ``startafter`` (lower case only) and counts what remains.
    for i in range(30):
        requests.put(f"{active}/webhdfs/v1{d}/d/{i:02}?op=MKDIRS&{user}", timeout=30).raise_for_status()
    seen["startafter"] = page("startafter=01")
    seen["startAfter"] = page("startAfter=01")
    seen["last page"] = page("startafter=26")
    # RENAME answers false rather than replacing a file, or when there is nothing to rename.
    def rename(src: str, dst: str) -> Any:
        return requests.put(f"{active}/webhdfs/v1{d}/{src}?op=RENAME&destination={d}/{dst}&{user}", timeout=30).json()

    seen["RENAME onto a file"] = rename("f.txt", "e.txt")
    seen["RENAME of nothing"] = rename("nothing", "x")
    seen["RENAME onto a directory"] = (rename("f.txt", "d/00"),  # moves it into the directory
                                       requests.get(f"{active}/webhdfs/v1{d}/d/00/f.txt?op=GETFILESTATUS&{user}",
                                                    timeout=30).json()["FileStatus"]["length"])
    return seen


def test_the_test_server_answers_like_a_real_namenode(webhdfs, fake_webhdfs) -> None:  # type: ignore[no-untyped-def]
    """The same requests to the real cluster and to tests/webhdfs.py, on each point the test server
    models for the tests that still need it (and that drsync's client relies on)."""
    fake_webhdfs.list_limit = 25  # the real cluster's dfs.ls.limit
    fake_active = fake_webhdfs.namenode_urls[fake_webhdfs.active]
    fake_standby = fake_webhdfs.namenode_urls[1 - fake_webhdfs.active]
    active, standby = webhdfs.namenode_urls
    real = _speak_webhdfs(active, standby, webhdfs.test_dir)
    fake = _speak_webhdfs(fake_active, fake_standby, fake_webhdfs.test_dir)
    standby_exc = (403, "StandbyException", "org.apache.hadoop.ipc.StandbyException")
    assert real == {
        "standby GETFILESTATUS": standby_exc,
        "standby CREATE": (307, standby_exc),
        "CREATE": (307, 201),
        "OPEN": (b"ell", [307]),
        "missing": (404, "FileNotFoundException", "java.io.FileNotFoundException"),
        "unknown op": (400, "IllegalArgumentException", "java.lang.IllegalArgumentException"),
        "startafter": ([f"{i:02}" for i in range(2, 27)], 3),
        "startAfter": ([f"{i:02}" for i in range(25)], 5),  # Hadoop 3.5 ignores the spelling of its docs
        "last page": (["27", "28", "29"], 0),
        "RENAME onto a file": {"boolean": False},
        "RENAME of nothing": {"boolean": False},
        "RENAME onto a directory": ({"boolean": True}, 5),
    }
    assert fake == real


def test_listing_pages_through_large_directories(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """60 entries, 25 a page (dfs.ls.limit): three LISTSTATUS_BATCH calls, the listing whole and sorted."""
    fs = _fs(webhdfs)
    d = f"{webhdfs.test_dir}/many"
    names = [f"{i:03}" for i in range(60)]
    for name in random.Random(2).sample(names, len(names)):
        fs.mkdirs(f"{d}/{name}")
    mark = webhdfs.audit_mark()
    assert [s["pathSuffix"] for s in fs.list_dir(d)] == names
    assert webhdfs.ops_since(mark, under=d) == [("listStatus", d)] * 3


# --- the error model -------------------------------------------------------------------------


def _local_snapshot(tmp_path: Path) -> tuple[str, str]:
    """A repository at ``tmp_path/repo`` holding one snapshot of a local tree: (repository, snapshot id)."""
    LocalSite(tmp_path).make_tree("data")
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    return repo, run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()["id"]


def test_permission_denied_is_one_clear_line_and_changes_nothing(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo, snap = _local_snapshot(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("locked", "keep.txt", b"theirs")
    webhdfs.chmod(site.path("locked"), 0o555, owner="hdfs")
    before = _hadoop(webhdfs, site.path("locked"))
    mark = webhdfs.audit_mark()
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", site.url("locked"))
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "HDFS permission denied" in r.err and "as drsync" in r.err and "grant that user access" in r.err
    assert _hadoop(webhdfs, site.path("locked")) == before
    refused = [e["cmd"] for e in webhdfs.events_since(mark, under=site.path("locked")) if not e["ok"]]
    assert refused, "the namenode itself refused drsync"


def test_a_target_below_a_file_is_one_line_and_changes_nothing(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo, snap = _local_snapshot(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("below-file", "plain.txt", b"a file, not a directory")
    before = site.state("below-file")
    for below in ("below-file/plain.txt/sub", "below-file/plain.txt/sub/deeper"):
        r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", site.url(below))
        assert r.code == 2 and r.err.count("\n") == 1, r.err
        assert f"{site.path('below-file/plain.txt')} is not a directory; name a target below a directory" in r.err
    assert site.state("below-file") == before


def test_space_quota_exceeded_mid_write_leaves_nothing_half_written(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A space quota (dfsadmin -setSpaceQuota): HDFS charges a file being written a whole block
    (1 MiB here) times the replication (1) for each block it opens."""
    local = LocalSite(tmp_path)
    local.make_tree("data")  # two 3 MiB files among small ones
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("standby", "old.txt", b"the last good state")
    webhdfs.set_quota(site.path("standby"), 4 * MiB)  # the first big file fits, the second does not
    before = _hadoop(webhdfs, site.path("standby"))
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", site.url("standby"))
    assert r.code == 1 and "HDFS quota exceeded" in r.err and "setSpaceQuota" in r.err, r.err
    assert _hadoop(webhdfs, site.path("standby")) == before  # nothing half written, not even the staging area
    # The same through the repository: a pack that does not fit is never published.
    hrepo = site.url("repo")
    init_repo_at(hrepo, "e", "1")
    webhdfs.set_quota(site.path("repo"), 1 * MiB)
    r = run_drsync("snapshot", "create", "--repo", hrepo, "--source", tmp_path / "data")
    assert r.code == 1 and "HDFS quota exceeded" in r.err
    assert not any(".tmp-" in p or p.endswith(".pack") for p in webhdfs.tree(site.path("repo")))
    assert run_drsync("snapshot", "list", "--repo", hrepo, "--json").json() == []
    # Space comes back: everything works again.
    webhdfs.set_quota(site.path("standby"), -1)
    assert run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                      snap, "--repo", repo, "--target", site.url("standby")).code == 0
    assert same_tree(local, "data", site, "standby")


def test_name_quota_exceeded_is_reported_and_changes_nothing(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A namespace quota (dfsadmin -setQuota): NSQuotaExceededException when the directory would hold
    more files and directories than allowed."""
    local = LocalSite(tmp_path)
    for i in range(12):
        local.write("data", f"d/f{i:02}", b"x" * i)
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("standby", "old.txt", b"the last good state")
    webhdfs.set_name_quota(site.path("standby"), 8)
    before = _hadoop(webhdfs, site.path("standby"))
    mark = webhdfs.audit_mark()
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", site.url("standby"))
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    assert "HDFS quota exceeded" in r.err and "-setQuota" in r.err and "setSpaceQuota" not in r.err, r.err
    # staging began (a namenode does not audit a quota refusal: the refusal is the line above)
    assert any(e["cmd"] == "create" for e in webhdfs.events_since(mark, under=site.path("standby/.drsync-staging")))
    assert _hadoop(webhdfs, site.path("standby")) == before
    webhdfs.set_name_quota(site.path("standby"), -1)
    assert run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                      snap, "--repo", repo, "--target", site.url("standby")).code == 0
    assert same_tree(local, "data", site, "standby")


def test_safe_mode_is_waited_out_then_reported(webhdfs, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """dfsadmin -safemode enter: writes wait until the namenode leaves it (within the retry window),
    then fail with a line that says so; reads go on."""
    path = f"{webhdfs.test_dir}/after-safe-mode"
    retried = threading.Event()

    class Retries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "safe mode" in record.getMessage() and "retrying" in record.getMessage():
                retried.set()

    seen = Retries()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            _fs(webhdfs, retry_s=60 * SLOW).write(path, b"x")
        except BaseException as e:
            errors.append(e)

    webhdfs.safe_mode(True)
    logging.getLogger("drsync.hdfs").addHandler(seen)
    try:
        with caplog.at_level(logging.INFO, logger="drsync.hdfs"):
            writer = threading.Thread(target=write)
            writer.start()
            assert retried.wait(30 * SLOW), "drsync did not retry in safe mode"
            left = webhdfs.audit_mark()  # (a namenode does not audit what safe mode refuses)
            webhdfs.safe_mode(False)
            writer.join(60 * SLOW)
    finally:
        logging.getLogger("drsync.hdfs").removeHandler(seen)
    assert not writer.is_alive() and not errors, errors
    assert ("create", path) in webhdfs.ops_since(left, under=path)  # created once out of safe mode
    assert webhdfs.tree(webhdfs.test_dir)["after-safe-mode"]["sha256"] == hashlib.sha256(b"x").hexdigest()
    webhdfs.safe_mode(True)
    quick = _fs(webhdfs, retry_s=0.5)
    with pytest.raises(HdfsUnavailable, match="safe mode"):
        quick.mkdirs(f"{webhdfs.test_dir}/never")
    with pytest.raises(HdfsUnavailable, match="safe mode"):
        quick.write(f"{webhdfs.test_dir}/never.txt", b"x")
    assert quick.read(path) == b"x"  # reads are fine in safe mode


def test_no_active_namenode_is_reported(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """haadmin -transitionToStandby on both namenodes: every call is refused, and drsync says so."""
    fs = _fs(webhdfs, retry_s=0.5)
    fs.write(f"{webhdfs.test_dir}/a", b"x")
    webhdfs.all_standby()
    assert webhdfs.active_index() is None
    with pytest.raises(HdfsUnavailable, match="all answered as standby"):
        fs.status(webhdfs.test_dir)
    with pytest.raises(HdfsUnavailable, match="all answered as standby"):
        fs.read(f"{webhdfs.test_dir}/a")
    with pytest.raises(HdfsUnavailable, match="all answered as standby"):
        _fs(webhdfs, retry_s=0.5).write(f"{webhdfs.test_dir}/b", b"x")


def test_delegation_token_authentication(fake_webhdfs, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """On the test server: the real cluster runs simple authentication (no Kerberos), and its WebHDFS
    then ignores ``delegation=`` altogether: a request with a real token, a made-up one or none at all
    acts as the anonymous ``dr.who`` (see the next test). So neither a refused token nor the token's
    user can be seen on it; that needs a Kerberos-secured cluster."""
    webhdfs = fake_webhdfs
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


def test_a_token_is_ignored_by_a_cluster_without_security(webhdfs, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """What a real namenode with simple authentication does with a delegation token (a real one, from
    the namenode): nothing. drsync's calls act as ``dr.who``, and the refusal names that user."""
    monkeypatch.setenv("DRSYNC_HDFS_TOKEN", webhdfs.token("drsync"))
    fs = HdfsFs(parse_hdfs_url(webhdfs.url(webhdfs.test_dir, user=None)), retry_s=0)
    mark = webhdfs.audit_mark()
    assert fs.status(webhdfs.test_dir)["owner"] == "drsync"  # reading is open to anyone here
    with pytest.raises(HdfsPermissionDenied, match="user=dr.who"):
        fs.write(f"{webhdfs.test_dir}/by-token", b"x")
    assert {e["user"].split()[0] for e in webhdfs.events_since(mark)} == {"dr.who"}


# --- consistent capture with HDFS snapshots --------------------------------------------------


def test_capture_reads_a_frozen_snapshot_while_the_cluster_writes(webhdfs, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A writer changes the live tree all through a capture (overwrites, appends to a closed
    multi-block file, creates, renames across directories, deletes, mode changes); the capture holds
    exactly the snapshot as Hadoop lists and reads it under ``<root>/.snapshot/<name>``."""
    rnd = random.Random(5)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    fs = _fs(webhdfs)
    for d in range(4):
        for f in range(5):
            fs.write(f"{data}/d{d}/f{f}", rnd.randbytes(2000))
    w = fs.writer(f"{data}/big.bin")
    for _ in range(3):
        w.write(rnd.randbytes(MiB))  # three blocks and part of a fourth
    w.write(rnd.randbytes(12345))  # (a file of whole blocks is asked whether it is open: not kept as a base)
    w.close()
    webhdfs.allow_snapshot(data)
    mark = webhdfs.audit_mark()
    stop, changed = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def writer() -> None:
        wrnd = random.Random(6)
        try:
            wait_for(lambda: ("createSnapshot", data) in webhdfs.ops_since(mark, under=data), "the capture's snapshot")
            while not stop.is_set():
                i = rounds[0]
                d = f"{data}/d{i % 4}"
                fs.write(f"{d}/f{i % 5}", wrnd.randbytes(3000), overwrite=True)
                fs.set_permission(f"{d}/f{i % 5}", 0o600)
                webhdfs.append(f"{data}/big.bin", wrnd.randbytes(100_000))
                fs.write(f"{d}/new-{i}", b"new")
                assert fs.rename(f"{d}/new-{i}", f"{data}/d{(i + 1) % 4}/moved-{i}")
                if i < 4:
                    fs.delete(f"{d}/f4")
                rounds[0] += 1
                if rounds[0] == 4:
                    changed.set()
        except BaseException as e:
            errors.append(e)
            changed.set()

    open_file = HdfsFrozenRoot.open_file

    def after_changes(self, rel):  # type: ignore[no-untyped-def]
        # No file is read before the live tree has changed under the snapshot.
        assert changed.wait(60 * SLOW), "the writer did not get going"
        return open_file(self, rel)

    monkeypatch.setattr(HdfsFrozenRoot, "open_file", after_changes)
    repo = _repo()
    at = time.time()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = _capture(HdfsDataRoot(site.url("data")), repo, at=at)
        at_end = rounds[0]
    finally:
        stop.set()
        thread.join(60 * SLOW)
    assert not errors, errors
    assert at_end >= 4
    [snap] = _drsync_snapshots(webhdfs, data)  # kept as the next capture's base
    assert _tag(snap) == f"drsync-{int(at * 1000)}"
    frozen = _hadoop(webhdfs, f"{data}/.snapshot/{snap}")
    captured = _captured(repo, result.manifest)
    # Directory mtimes aside: in a real snapshot, a directory's modification time is not frozen by
    # the first child added to it after the snapshot (create, mkdir, rename into it), which moves it
    # to that time in the snapshot too. drsync never captures a directory time from after the snapshot.
    assert _no_dir_mtimes(captured) == _no_dir_mtimes(frozen)
    taken = _fs(webhdfs).status(f"{data}/.snapshot/{snap}")["modificationTime"]
    assert all(v[2] <= taken for v in captured.values() if v[0] == "dir"), (taken, captured)
    assert result.warnings.lines() == []
    live = _hadoop(webhdfs, data)
    assert live["big.bin"][3] >= frozen["big.bin"][3] + 4 * 100_000  # appended to after the snapshot
    assert frozen["big.bin"][3] == 3 * MiB + 12345 and "d0/f4" in frozen and "d1/moved-0" not in frozen
    assert "d0/f4" in live and live["d0/f4"] != frozen["d0/f4"] and "d1/moved-0" in live


def _change_everything(site: HdfsSite, fs: HdfsFs, rnd: random.Random, step: int) -> set[str]:
    """One step of changes of every kind below ``data``; returns the directories they touch."""
    data = site.path("data")
    site.write("data", f"d{step}/sub/f{step}", rnd.randbytes(60))
    site.write("data", f"d{step}/new-{step}/deep/file", b"created")
    site.remove("data", f"d{5 - step}/sub/f4")
    assert fs.rename(f"{data}/d{step}/sub/f1", f"{data}/d{step}/moved-{step}")
    site.chmod("data", f"d{step}/sub/f2", 0o600)
    return {"", f"d{step}", f"d{step}/sub", f"d{step}/new-{step}", f"d{step}/new-{step}/deep", f"d{5 - step}",
            f"d{5 - step}/sub"}


def _full_walk(webhdfs: Any, site: HdfsSite, at: float) -> Manifest:
    """The same root captured from a snapshot of its own by walking every directory (no parent),
    its snapshot removed afterwards so that it is no one's base."""
    full = _capture(HdfsDataRoot(site.url("data")), _repo(), at=at)
    for n in _drsync_snapshots(webhdfs, site.path("data")):
        if _tag(n) == f"drsync-{int(at * 1000)}":
            _fs(webhdfs).delete_snapshot(site.path("data"), n)
    return full.manifest


_COLS = ["path", "type", "mode", "size", "mtime_s", "mtime_nsec", "content"]


def test_snapshot_diff_walks_only_what_changed_and_equals_a_full_walk(webhdfs) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(7)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    for d in range(6):
        for f in range(5):
            site.write("data", f"d{d}/sub/f{f}", rnd.randbytes(50))
    webhdfs.allow_snapshot(data)
    root = HdfsDataRoot(site.url("data"))
    repo = _repo()
    at = time.time()
    result = _capture(root, repo, at=at)
    assert [_tag(n) for n in _drsync_snapshots(webhdfs, data)] == [f"drsync-{int(at * 1000)}"]
    fs = _fs(webhdfs)
    for step in range(4):
        touched = _change_everything(site, fs, rnd, step)
        [base] = _drsync_snapshots(webhdfs, data)
        parent, parent_at, at = result.manifest, at, at + 1
        mark = webhdfs.audit_mark()
        result = _capture(root, repo, parent, parent_at, at)
        [snap] = _drsync_snapshots(webhdfs, data)  # the new base; the one it replaces is gone
        assert _tag(snap) == f"drsync-{int(at * 1000)}"
        ops = webhdfs.ops_since(mark, under=data)
        assert ("computeSnapshotDiff", f"{data}/.snapshot/{base}") in ops
        listed = _listed_dirs(webhdfs, mark, f"{data}/.snapshot/{snap}")
        assert sorted(listed) == sorted(touched), f"step {step}: only the directories the changes touch"
        assert _captured(repo, result.manifest) == _hadoop(webhdfs, f"{data}/.snapshot/{snap}")
        # The same state captured by walking everything gives the same manifest.
        full = _full_walk(webhdfs, site, at + 0.5)
        assert result.manifest.table.select(_COLS).equals(full.table.select(_COLS)), f"step {step}"


def test_renames_across_directories_between_two_captures(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Files and a whole directory moved to other directories: a real namenode reports each as one
    RENAME with both paths; the capture from the diff lists the directories on both sides, and
    equals a full walk."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    for d in ("a/x", "b/y", "c/z/deeper", "u0/s", "u1/s", "u2/s"):
        site.write("data", f"{d}/file", d.encode())
    site.write("data", "a/x/f1", b"one")
    site.write("data", "a/x/f2", b"two")
    webhdfs.allow_snapshot(data)
    fs = _fs(webhdfs)
    repo = _repo()
    at = time.time()
    first = _capture(HdfsDataRoot(site.url("data")), repo, at=at)
    [base] = _drsync_snapshots(webhdfs, data)
    assert fs.rename(f"{data}/a/x/f1", f"{data}/b/y/f1-moved")  # a file, across directories
    assert fs.rename(f"{data}/c/z", f"{data}/b/y/z-moved")  # a directory with its subtree
    assert fs.rename(f"{data}/a/x/f2", f"{data}/c/f2")  # up a level
    fs.create_snapshot(data, "probe")
    renames = sorted((d["sourcePath"], d["targetPath"]) for d in fs.snapshot_diff(data, base, "probe") or []
                     if d["type"] == "RENAME")
    fs.delete_snapshot(data, "probe")
    assert renames == [("a/x/f1", "b/y/f1-moved"), ("a/x/f2", "c/f2"), ("c/z", "b/y/z-moved")]
    mark = webhdfs.audit_mark()
    second = _capture(HdfsDataRoot(site.url("data")), repo, first.manifest, at, at + 1)
    [snap] = _drsync_snapshots(webhdfs, data)
    listed = set(_listed_dirs(webhdfs, mark, f"{data}/.snapshot/{snap}"))
    assert listed == {"", "a", "a/x", "b", "b/y", "b/y/z-moved", "b/y/z-moved/deeper", "c"}, listed
    captured = _captured(repo, second.manifest)
    assert captured == _hadoop(webhdfs, f"{data}/.snapshot/{snap}")
    assert "b/y/z-moved/deeper/file" in captured and "c/z/deeper/file" not in captured
    full = _full_walk(webhdfs, site, at + 1.5)
    assert second.manifest.table.select(_COLS).equals(full.table.select(_COLS))


def test_without_getsnapshotdiff_every_capture_walks_and_keeps_no_snapshot(fake_webhdfs) -> None:  # type: ignore[no-untyped-def]
    """On the test server: a namenode without GETSNAPSHOTDIFF (before Hadoop 3.0) cannot be made of
    the real 3.5 cluster. Each capture walks the whole snapshot and removes it: none is kept as a base."""
    webhdfs = fake_webhdfs
    webhdfs.snapshot_diff = False
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    for d in range(3):
        site.write("data", f"d{d}/sub/f", b"x")
    webhdfs.allow_snapshot(site.path("data"))
    root = HdfsDataRoot(site.url("data"))
    repo = _repo()
    at = time.time()
    first = _capture(root, repo, at=at)
    assert webhdfs.snapshots(site.path("data")) == []
    site.write("data", "d1/sub/f", b"changed")
    before = len(webhdfs.requests)
    second = _capture(root, repo, first.manifest, at, at + 1)
    listed = [p for op, p in webhdfs.requests[before:] if op == "LISTSTATUS_BATCH" and "/.snapshot/" in p]
    assert len(listed) == 7  # the root, three directories and their subdirectories: everything
    assert webhdfs.snapshots(site.path("data")) == []
    sizes = dict(zip(second.manifest.pycolumn("path"), second.manifest.table.column("size").to_pylist(), strict=True))
    assert sizes["d1/sub/f"] == 7


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
    import os
    import socket
    import subprocess
    import sys

    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a.txt", b"x")
    webhdfs.allow_snapshot(site.path("data"))
    fs = _fs(webhdfs)
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


# --- files open for write while captured -----------------------------------------------------
# HDFS's default dfs.namenode.snapshot.capture.openfiles=false: a snapshot does not freeze a file
# that is open for write. Under <root>/.snapshot/<name> such a file lists the blocks completed so
# far (not the last one being written), and that length grows as the writer completes blocks and
# when it closes the file; GETSNAPSHOTDIFF reports none of it.


def _open_file(fs: HdfsFs, path: str, payload: bytes, sent: int):  # type: ignore[no-untyped-def]
    """A file being written (not closed): ``sent`` bytes handed to the datanode, and the namenode
    lists its completed blocks."""
    w = fs.writer(path)
    for k in range(0, sent, MiB // 2):
        w.write(payload[k:min(sent, k + MiB // 2)])
    wait_for(lambda: (fs.status(path) or {}).get("length") == sent // MiB * MiB, f"{path}'s completed blocks")
    return w


def _write_on(w, payload: bytes, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
    for k in range(start, end, MiB // 2):
        w.write(payload[k:min(end, k + MiB // 2)])


def test_a_file_open_for_write_is_captured_as_far_as_the_snapshot_lists_it(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """The writer completes another block between drsync's look at the open file and its read: the
    capture holds what the snapshot listed (one block), neither the block completed later nor the
    bytes still in flight, and it neither fails nor warns."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    fs = _fs(webhdfs)
    site.write("data", "sub/done", b"a closed file")
    payload = random.Random(8).randbytes(3 * MiB)
    w = _open_file(fs, f"{data}/sub/open.bin", payload, 3 * MiB // 2)
    webhdfs.allow_snapshot(data)
    grown: list[str] = []

    class WriterCompletesABlock(HdfsFs):
        def open(self, path: str, offset: int = 0, length: int | None = None):  # type: ignore[no-untyped-def]
            if path.endswith("/open.bin") and not grown:
                grown.append(path)  # looked at (1 MiB listed), not yet read
                _write_on(w, payload, 3 * MiB // 2, 5 * MiB // 2)
                wait_for(lambda: self.status(path)["length"] == 2 * MiB, "the snapshot to list the second block")
            return super().open(path, offset, length)

    repo = _repo()
    at = time.time()
    try:
        result = _capture(HdfsDataRoot(site.url("data"), fs=WriterCompletesABlock(parse_hdfs_url(site.url("data")))),
                          repo, at=at)
        assert grown, "the capture read the open file"
        # The snapshot listed the second block once it completed (waited for above: not frozen), so it
        # must not become the next diff base.
        assert _drsync_snapshots(webhdfs, data) == []
    finally:
        _write_on(w, payload, 5 * MiB // 2, 3 * MiB)
        w.close()
    got = _captured(repo, result.manifest)
    assert got["sub/open.bin"][3:] == (MiB, hashlib.sha256(payload[:MiB]).hexdigest())
    assert got["sub/done"][3] == len(b"a closed file")
    assert result.warnings.lines() == []


def test_a_file_captured_open_is_captured_whole_once_closed(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """A file open for write since a while (its modification time is when it was opened, HDFS moves
    it at close) is captured with the blocks it had; then it is written on and closed. The next
    capture must hold the whole closed file. The namenode's GETSNAPSHOTDIFF between the two
    snapshots is empty (the open file was not frozen in the base snapshot, so no change of it is
    recorded): a diff from that base would keep the first block for good. drsync finds the file
    open (GET_BLOCK_LOCATIONS of the live file) and does not keep that snapshot as a base."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    fs = _fs(webhdfs)
    site.write("data", "sub/done", b"a closed file")
    payload = random.Random(9).randbytes(3 * MiB)
    w = _open_file(fs, f"{data}/sub/open.bin", payload, 3 * MiB // 2)
    try:
        fs.set_times(f"{data}/sub/open.bin", int((time.time() - 600) * 1e9))  # opened ten minutes ago
        webhdfs.allow_snapshot(data)
        repo = _repo()
        at = time.time()
        first = _capture(HdfsDataRoot(site.url("data")), repo, at=at)
        assert _captured(repo, first.manifest)["sub/open.bin"][3] == MiB
        assert _drsync_snapshots(webhdfs, data) == [], "a snapshot with an open file was kept as a diff base"
        fs.create_snapshot(data, "probe-open")
        _write_on(w, payload, 3 * MiB // 2, 3 * MiB)
    finally:
        w.close()
    fs.create_snapshot(data, "probe-closed")
    # The real namenode's report between a snapshot taken while the file was open and one after its
    # close: nothing changed. A diff from such a base would keep the short file.
    assert fs.snapshot_diff(data, "probe-open", "probe-closed") == []
    fs.delete_snapshot(data, "probe-open")
    fs.delete_snapshot(data, "probe-closed")
    second = _capture(HdfsDataRoot(site.url("data")), repo, first.manifest, at, at + 1)
    [snap] = _drsync_snapshots(webhdfs, data)
    assert webhdfs.tree(data)["sub/open.bin"]["length"] == 3 * MiB
    assert _captured(repo, second.manifest) == _hadoop(webhdfs, f"{data}/.snapshot/{snap}")


# --- directory times in a snapshot -----------------------------------------------------------
# A real namenode (Hadoop 3.5) does not freeze a directory's modification time in a snapshot: a file
# created in the directory after the snapshot moves the time listed under .snapshot/<name> too, while
# the file itself is not listed there. Seen in CI: a capture listing between the two shipped a
# directory time from after its snapshot, and the standby applied it.


class _CreatesAfterSnapshot(HdfsFs):
    """Creates ``path`` in the live tree right after each drsync snapshot is taken, before it is listed."""

    def __init__(self, url: str, path: str) -> None:
        super().__init__(parse_hdfs_url(url))
        self.late, self.created = path, 0

    def create_snapshot(self, directory: str, name: str) -> str:
        out = super().create_snapshot(directory, name)
        if name.startswith(SNAPSHOT_PREFIX):
            self.created += 1
            self.write(f"{self.late}.{self.created}", b"written after the snapshot")
        return out


def _dir_mtime(manifest: Manifest, path: str) -> int:
    [e] = [e for e in manifest.entries() if e.path == path]
    return e.mtime_ns


def test_a_directory_changed_after_the_snapshot_keeps_its_time_from_before(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """The second capture lists ``sub`` after a file was created there behind its snapshot: it must
    hold ``sub`` exactly as the first capture did (same children, so the same time), not the live time,
    and not the late file; the capture after that holds both the file and ``sub``'s new time."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    site.write("data", "sub/done", b"a closed file")
    webhdfs.allow_snapshot(data)
    repo = _repo()
    at = time.time()
    first = _capture(HdfsDataRoot(site.url("data")), repo, at=at)
    fs = _CreatesAfterSnapshot(site.url("data"), f"{data}/sub/late")
    second = _capture(HdfsDataRoot(site.url("data"), fs=fs), repo, first.manifest, at, at + 1)
    assert fs.created == 1
    assert "sub/late.1" not in [e.path for e in second.manifest.entries()]
    live = _fs(webhdfs).status(f"{data}/sub")["modificationTime"] * 1_000_000
    assert _dir_mtime(second.manifest, "sub") == _dir_mtime(first.manifest, "sub") < live
    third = _capture(HdfsDataRoot(site.url("data")), repo, second.manifest, at + 1, at + 2)
    assert "sub/late.1" in [e.path for e in third.manifest.entries()]
    assert _dir_mtime(third.manifest, "sub") == live


def test_a_directory_changed_before_and_after_the_snapshot_gets_no_time_from_after_it(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """No capture before (nothing to take the time from), or a child added before the snapshot as
    well as one after: the directory's time is at most the snapshot's, never the later live one."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    data = site.path("data")
    site.write("data", "sub/done", b"a closed file")
    webhdfs.allow_snapshot(data)
    repo = _repo()
    fs = _CreatesAfterSnapshot(site.url("data"), f"{data}/sub/late")
    at = time.time()
    first = _capture(HdfsDataRoot(site.url("data"), fs=fs), repo, at=at)
    [snap] = _drsync_snapshots(webhdfs, data)
    taken = _fs(webhdfs).status(f"{data}/.snapshot/{snap}")["modificationTime"] * 1_000_000
    assert [e.path for e in first.manifest.entries()] == ["sub", "sub/done"]
    live = _fs(webhdfs).status(f"{data}/sub")["modificationTime"] * 1_000_000
    assert _dir_mtime(first.manifest, "sub") <= taken < live
    site.write("data", "sub/before", b"written before the next snapshot")
    second = _capture(HdfsDataRoot(site.url("data"), fs=fs), repo, first.manifest, at, at + 1)
    [snap] = _drsync_snapshots(webhdfs, data)
    taken = _fs(webhdfs).status(f"{data}/.snapshot/{snap}")["modificationTime"] * 1_000_000
    paths = [e.path for e in second.manifest.entries()]
    assert "sub/before" in paths and "sub/late.2" not in paths
    assert _dir_mtime(first.manifest, "sub") < _dir_mtime(second.manifest, "sub") <= taken


# --- faults during replication ---------------------------------------------------------------


class _Flipper:
    """Fails the active namenode over (haadmin -failover) each time the namenodes' audit log shows
    ``every`` more creates and renames below the test directory, ``times`` times."""

    def __init__(self, webhdfs: Any, every: int, times: int) -> None:
        self.webhdfs, self.every, self.times = webhdfs, every, times
        self.flips = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failover")
        self._thread.start()

    def _run(self) -> None:
        try:
            mark = self.webhdfs.audit_mark()
            while self.flips < self.times and not self._stop.is_set():
                writes = [c for c, _ in self.webhdfs.ops_since(mark) if c in ("create", "rename")]
                if len(writes) >= self.every:
                    self.webhdfs.failover()
                    self.flips += 1
                    mark = self.webhdfs.audit_mark()
                else:
                    self._stop.wait(0.05)  # polling the audit log
        except BaseException as e:
            self.errors.append(e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60 * SLOW)
        assert not self.errors, self.errors


def test_namenode_failover_during_a_shipment(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The active namenode changes three times (haadmin -failover) while snapshots ship onto an HDFS
    standby (repository and data root on HDFS), each time after some more of the shipment's writes:
    the standby ends complete and correct.

    A real failover fails a WebHDFS write that streams across it (the datanode's own client talks to
    the namenode that redirected it, which is now a standby), and with it that apply; the primary
    ships again on its next cycle."""
    from tests.test_agents import Pair

    pair = Pair(tmp_path, LocalSite(tmp_path), make_site("hdfs", tmp_path, webhdfs))
    flipper = None
    try:
        pair.start("standby")
        flipper = _Flipper(webhdfs, every=8, times=3)
        pair.start("primary")
        rounds = 0
        while True:
            wait_for(pair.in_sync, "the standby to match production across namenode failovers", timeout=120)
            if flipper.flips == 3 or rounds == 5:
                break
            rounds += 1  # shipped before three failovers: more to ship
            pair.prod_site.write("prod-data", f"more/{rounds}.txt", f"round {rounds}".encode() * 1000)
        flipper.stop()
        assert flipper.flips == 3, flipper.flips
        pair.kill("primary", signal.SIGTERM)  # nothing ships while the root is compared
        pair.kill("standby")
        pair.start("standby")
        pair.assert_root_is_applied_snapshot("after-failovers")
        assert same_tree(pair.prod_site, "prod-data", pair.standby_site, "standby-data")
    finally:
        if flipper is not None:
            flipper.stop()
        pair.stop_all()


def test_a_blob_written_across_a_namenode_failover_is_written_whole(webhdfs, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """haadmin -failover while the datanode receives a repository blob (between its two halves): the
    datanode's own client can no longer complete the file, its namenode being a standby now. drsync
    writes again through the new active namenode, which finds the half-written temp file still open
    under the first attempt's lease (AlreadyBeingCreatedException). The blob ends whole all the same,
    and no temp file is left."""
    from drsync.storage.hdfs import HdfsStorage

    store = HdfsStorage(webhdfs.url(f"{webhdfs.test_dir}/repo"), create=True)
    blob = random.Random(4).randbytes(3 * MiB)
    flipped: list[int | None] = []
    send = store.fs.client._session.request

    def request(method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        if method == "PUT" and "op=CREATE" in str(url) and "namenoderpcaddress=" in str(url) and not flipped:
            body = kwargs["data"]

            def halves():  # type: ignore[no-untyped-def]
                yield body[:len(body) // 2]
                webhdfs.failover()  # the first blocks are written, the last ones not yet allocated
                flipped.append(webhdfs.active_index())
                yield body[len(body) // 2:]

            kwargs["data"] = halves()
        return send(method, url, *args, **kwargs)

    monkeypatch.setattr(store.fs.client._session, "request", request)
    before = webhdfs.active_index()
    store.write("snapshots/blob.json", blob)
    assert flipped and flipped[0] != before
    tree = webhdfs.tree(f"{webhdfs.test_dir}/repo")
    assert tree["snapshots/blob.json"]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert not [p for p in tree if ".tmp-" in p], tree


def test_agent_status_json_on_hdfs(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An agent on HDFS needs a local state directory; without one it says so."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a", b"x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "e"\nrelease = "1"\ndata = "{site.url("data")}"\n'
                   f'repository = "{site.url("repo")}"\n[agent]\nrole = "primary"\n')
    init_repo(cfg)
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 2 and "set agent.state_dir to a local directory" in r.err
    check = run_drsync("config", "check", "--config", cfg, "--json")
    doc = json.loads(check.out)
    assert any(c["name"] == "data root" and c["ok"] for c in doc["checks"]), doc


def test_drill_on_an_hdfs_standby_compares_its_root(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_agents import Pair

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
    """Chunk reads in pack order: a few OPENs of 4 MiB windows, not one per chunk. Each WebHDFS read is
    two ``open`` events in the namenode's audit log (the namenode's redirect, then the datanode's own
    client), so at most 10 reads are at most 20 events."""
    from drsync.storage import ObjectMissing
    from drsync.storage.hdfs import HdfsStorage

    rnd = random.Random(3)
    store = HdfsStorage(webhdfs.url(f"{webhdfs.test_dir}/repo"), create=True)
    data = rnd.randbytes(10 * MiB)
    store.write("packs/ab/p.pack", data)
    ranges = [(o, rnd.randrange(1, 300_000)) for o in sorted(rnd.randrange(0, len(data)) for _ in range(200))]
    ranges += [(4 * MiB - 10, 20), (len(data) - 5, 5), (len(data) - 5, 50)]
    mark = webhdfs.audit_mark()
    for offset, length in ranges:
        assert store.read_range("packs/ab/p.pack", offset, length) == data[offset:offset + length]
    opens = [src for cmd, src in webhdfs.ops_since(mark) if cmd == "open"]
    assert opens and set(opens) == {f"{webhdfs.test_dir}/repo/packs/ab/p.pack"}
    assert len(opens) <= 2 * 10, f"{len(opens) // 2} reads for {len(ranges)} chunk reads in pack order"
    store.delete("packs/ab/p.pack")
    with pytest.raises(ObjectMissing):
        store.read_range("packs/ab/p.pack", 0, 10)


def test_a_small_change_applied_onto_hdfs_touches_only_its_directory(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = LocalSite(tmp_path)
    for d in range(40):
        local.write("data", f"d{d:02}/f", b"x" * d)
    local.age("data")
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    site = HdfsSite(webhdfs, webhdfs.test_dir)

    def restore_counting() -> list[tuple[str, str]]:
        snap = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--json").json()
        mark = webhdfs.audit_mark()
        assert run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                          snap["id"], "--repo", repo, "--target", site.url("sb")).code == 0
        assert same_tree(local, "data", site, "sb")
        return [(cmd, src) for cmd, src in webhdfs.ops_since(mark, under=site.path("sb"))
                if cmd in ("setTimes", "setPermission")]

    first = restore_counting()
    assert len(first) >= 2 * 40  # every directory and file gets its mode and time
    local.write("data", "d07/f", b"changed")
    second = restore_counting()
    # The root itself gets its own mode and time once, last (its staging area moved its time).
    root_ops = [(cmd, src) for cmd, src in second if src.rstrip("/") == site.path("sb").rstrip("/")]
    assert sorted(cmd for cmd, _ in root_ops) == ["setPermission", "setTimes"], second
    below = [op for op in second if op not in root_ops]
    assert len(below) <= 4, second  # the file, and its one directory
    tops = {src.removeprefix(site.path("sb")).strip("/").split("/")[0] for _, src in below}
    assert tops <= {"d07", ".drsync-staging"}, second  # the file staged, then in place


def test_a_write_after_the_client_moved_back_to_the_standby_asks_the_active_namenode(  # type: ignore[no-untyped-def]
        fake_webhdfs) -> None:
    """A CI run failed test_breaker_s41b (3 times in 8 on its own): a capture's pack write died with "no active HDFS
    namenode ... (all answered as standby)". The hdfs package moves its list of namenodes on by itself when a call
    to the active one fails (another thread's), so the standby could be asked first again while drsync still
    trusted the first one as active: a CREATE went to the standby, which redirects all the same, and the datanode
    refused the body. The trust now holds only while the namenode it was given to is the one asked first. (The
    test server: a real standby redirects CREATE too, but the package's move cannot be had on demand.)"""
    fs = _fs(fake_webhdfs)
    fs.write(f"{fake_webhdfs.test_dir}/a", b"one")  # the active namenode found, and trusted
    standby = fake_webhdfs.namenode_urls[1 - fake_webhdfs.active]
    assert fs.client._urls[0] != standby
    fs.client._urls.rotate(-1)  # what the package does by itself after a failed call to the active one
    assert fs.client._urls[0] == standby
    w = fs.writer(f"{fake_webhdfs.test_dir}/b")  # streamed, as a pack is: its body cannot be sent again
    w.write(b"two")
    w.close()
    assert fs.read(f"{fake_webhdfs.test_dir}/b") == b"two"
