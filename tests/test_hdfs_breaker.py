"""Hostile checks of drsync on a real HDFS (tests/hadoop) and of scripts/hadoop-cluster.

Every test here failed when it was written; each says what an operator would do, what should
happen and what happened. Trees are compared with Hadoop's own view (``admin tree``: its client's
listing and SHA-256 of every file), never with drsync's reader. Files with names drsync's own
client cannot address are made with plain WebHDFS requests (percent-encoded paths).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.conftest import run_drsync
from tests.group import wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "hadoop-cluster"
MS_2001 = 978_307_201_123  # 2001-01-01T00:00:01.123Z
MS_2002 = 1_012_608_002_456


# --- helpers --------------------------------------------------------------------------------


def _ok(r: Any) -> Any:
    assert r.code == 0, f"drsync failed (exit {r.code}): {r.err.strip()}"
    return r


def _repo(tmp_path: Path, name: str = "repo") -> str:
    url = str(tmp_path / name)
    _ok(run_drsync("init", "--repo", url, "--cluster-id", "east", "--release", "1"))
    return url


def _snap(repo: str, source: str | Path, name: str | None = None) -> dict[str, Any]:
    args = ["snapshot", "create", "--repo", repo, "--source", str(source), "--json"]
    if name:
        args += ["--name", name]
    return _ok(run_drsync(*args)).json()  # type: ignore[no-any-return]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _active(h: Any) -> str:
    return str(h.cluster.state()["webhdfs"][0])


def _raw(h: Any, method: str, path: str, **params: Any) -> requests.Response:
    """One WebHDFS call to the active namenode as ``drsync``, the path percent-encoded byte for byte."""
    r = requests.request(method, f"http://{_active(h)}/webhdfs/v1{quote(path, safe='/')}",
                         params={"user.name": "drsync", **params}, allow_redirects=False, timeout=60)
    return r


def _raw_file(h: Any, path: str, data: bytes, mtime_ms: int | None = None) -> None:
    """A file made without drsync's client: written under a plain name, then renamed to ``path``
    (a namenode's CREATE redirect rewrites some names; RENAME takes them as they are)."""
    tmp = f"{h.test_dir}/.raw-{_sha(path.encode())[:12]}"
    assert _raw(h, "PUT", path.rsplit("/", 1)[0], op="MKDIRS").ok
    r = _raw(h, "PUT", tmp, op="CREATE", overwrite="true")
    assert r.status_code == 307, r.text
    requests.put(r.headers["Location"], data=data, timeout=60).raise_for_status()
    r = _raw(h, "PUT", tmp, op="RENAME", destination=path)
    assert r.ok and r.json()["boolean"], r.text
    if mtime_ms is not None:
        assert _raw(h, "PUT", path, op="SETTIMES", modificationtime=str(mtime_ms)).ok


def _tree(h: Any, path: str) -> dict[str, dict[str, Any]]:
    return {p: e for p, e in h.tree(path).items() if not p.startswith(".drsync")}


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- names ------------------------------------------------------------------------------------


def test_a_file_named_LATEST_is_captured_with_its_own_content(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """HdfsCLI expands ``#LATEST`` in every path it is given (its "latest file" marker). drsync hands it
    HDFS paths unescaped, so a capture of a file named ``#LATEST`` reads the newest file of its
    directory instead. Seen: the snapshot holds ``newer``'s bytes under ``#LATEST``, no warning."""
    data = f"{webhdfs.test_dir}/data"
    webhdfs.mkdirs(data)
    _raw_file(webhdfs, f"{data}/#LATEST", b"my own bytes", MS_2001)
    _raw_file(webhdfs, f"{data}/newer", b"a newer file", MS_2002)
    assert {p: e["sha256"] for p, e in _tree(webhdfs, data).items()} == {
        "#LATEST": _sha(b"my own bytes"), "newer": _sha(b"a newer file")}
    repo = _repo(tmp_path)
    _snap(repo, webhdfs.url(data))
    _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tmp_path / "back"))
    assert _local_files(tmp_path / "back") == {"#LATEST": b"my own bytes", "newer": b"a newer file"}


def test_restoring_a_file_named_LATEST_removes_no_other_file(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The commit deletes the old version of each written file by path before renaming the new one in;
    for ``d/#LATEST`` HdfsCLI turns that DELETE into one of the newest file in ``d``. Seen: ``keep``,
    which the snapshot has and the restore reported unchanged, is gone from HDFS (exit 0), or the
    restore fails with "Cannot expand #LATEST" when ``d`` is empty."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "keep").write_bytes(b"keep me")
    repo = _repo(tmp_path)
    _snap(repo, src, "v1")
    (src / "d" / "#LATEST").write_bytes(b"latest")
    _snap(repo, src, "v2")
    target = f"{webhdfs.test_dir}/target"
    _ok(run_drsync("snapshot", "restore", "v1", "--repo", repo, "--target", webhdfs.url(target)))
    r = run_drsync("snapshot", "restore", "v2", "--repo", repo, "--target", webhdfs.url(target))
    files = {p: e.get("sha256") for p, e in _tree(webhdfs, target).items() if e["type"] == "file"}
    assert r.code == 0, r.err
    assert files == {"d/keep": _sha(b"keep me"), "d/#LATEST": _sha(b"latest")}, \
        f"files on HDFS after the restore: {sorted(files)}; drsync said: {r.out.strip()}"


def test_a_decomposed_unicode_name_is_captured_with_its_own_content(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``e`` + U+0301 and ``é`` (U+00E9) are two names to HDFS. The namenode's OPEN redirect names the
    file NFC-normalised, so the datanode serves the other one. Seen: the snapshot holds "composed"
    for both names (and a warning naming "é" as changed while read)."""
    data = f"{webhdfs.test_dir}/data"
    webhdfs.mkdirs(data)
    _raw_file(webhdfs, f"{data}/\u00e9", b"composed", MS_2001)
    _raw_file(webhdfs, f"{data}/e\u0301", b"decomposed!", MS_2001)
    assert len(_tree(webhdfs, data)) == 2
    repo = _repo(tmp_path)
    _snap(repo, webhdfs.url(data))
    _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tmp_path / "back"))
    assert _local_files(tmp_path / "back") == {"\u00e9": b"composed", "e\u0301": b"decomposed!"}


def test_a_decomposed_unicode_name_is_never_dropped_from_a_capture(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same redirect with no NFC twin: the datanode answers FileNotFoundException, and the capture
    counts the file as vanished, leaving it out without a word, though it is there. On a standby that
    is a deletion (README: "a read error never becomes a deletion on a standby")."""
    data = f"{webhdfs.test_dir}/data"
    webhdfs.mkdirs(data)
    _raw_file(webhdfs, f"{data}/caf" + "e\u0301", b"menu", MS_2001)
    _raw_file(webhdfs, f"{data}/other", b"other", MS_2001)
    repo = _repo(tmp_path)
    doc = _snap(repo, webhdfs.url(data))
    assert doc["files"] == 2, f"captured {doc['files']} of 2 files; warnings: {doc['warnings']}"


def test_listing_pages_across_non_ascii_and_ascii_names(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A namenode orders names by their UTF-8 bytes taken as *signed* Java bytes: every non-ASCII name
    comes before every ASCII one. drsync checks that each LISTSTATUS_BATCH page that is not the last
    ends after the previous one by Python's string order, so such a page ending in an ASCII name
    after one ending in a non-ASCII name is taken for a broken namenode. Seen (the session cluster
    pages every 25 names): "HDFS listing of .../big does not advance past 'é24'; the namenode's
    LISTSTATUS_BATCH answer is broken" — every capture of the directory and every restore onto it
    fails; with the default dfs.ls.limit, any directory of 1000+ non-ASCII names and 1000+ more."""
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    names = [f"\u00e9{i:02}" for i in range(26)] + [f"a{i:02}" for i in range(30)]
    for n in names:
        (src / "big" / n).write_bytes(n.encode())
    repo = _repo(tmp_path)
    _snap(repo, src)
    target = f"{webhdfs.test_dir}/target"
    _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", webhdfs.url(target)))
    assert len(_tree(webhdfs, f"{target}/big")) == len(names)
    again = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", webhdfs.url(target))
    captured = run_drsync("snapshot", "create", "--repo", repo, "--source", webhdfs.url(target), "--json")
    assert (again.code, again.err) == (0, ""), again.err
    assert captured.code == 0 and captured.json()["files"] == len(names), captured.err


def test_a_name_hdfs_cannot_hold_leaves_the_target_as_it_was(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """HDFS refuses ':' in names (and a directory named ``.snapshot``: "HadoopIllegalArgumentException:
    ".snapshot" is a reserved name", at the commit's MKDIRS). A local snapshot with such a name
    restored onto HDFS should fail before anything changes ("whole and verified, or unchanged with
    an error") or leave the name out with a warning. Seen: exit 1 at the commit (InvalidPathException
    on the RENAME), ``x`` already in place, ``.drsync-staging`` with a journal left behind; every
    rerun fails the same way."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"x")
    (src / "a:b").write_bytes(b"colon")
    repo = _repo(tmp_path)
    _snap(repo, src)
    target = f"{webhdfs.test_dir}/target"
    webhdfs.mkdirs(target)
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", webhdfs.url(target))
    left = sorted(webhdfs.tree(target))
    if r.code == 0:
        assert "a:b" in r.out + r.err, "the name HDFS cannot hold was left out without a word"
    else:
        assert left == [], f"a failed restore (exit {r.code}: {r.err.strip()}) changed the target: {left}"


# --- permissions ------------------------------------------------------------------------------


def test_a_read_only_directory_made_writable_by_the_next_snapshot(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Snapshot v1 has ``d`` at 0o555, v2 the same ``d`` at 0o755 (an operator opened it up). Restoring
    v1 then v2 onto HDFS: the commit sets ``d``'s times before its mode, and SETTIMES needs WRITE on
    ``d`` — it only opens up directories whose *new* mode lacks rwx. Seen: "HDFS permission denied:
    cannot set times of .../d as drsync (... access=WRITE, inode=".../d":drsync:supergroup:dr-xr-xr-x)",
    exit 1, and every rerun replays the journal into the same error (the target stays half applied)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f")
    os.utime(src / "d" / "f", ns=(MS_2001 * 10**6, MS_2001 * 10**6))
    (src / "d").chmod(0o555)
    os.utime(src / "d", ns=(MS_2002 * 10**6, MS_2002 * 10**6))
    repo = _repo(tmp_path)
    _snap(repo, src, "v1")
    (src / "d").chmod(0o755)
    _snap(repo, src, "v2")
    target = f"{webhdfs.test_dir}/target"
    _ok(run_drsync("snapshot", "restore", "v1", "--repo", repo, "--target", webhdfs.url(target)))
    assert _tree(webhdfs, target)["d"]["mode"] == 0o555
    # v2 sets d's mode back: a kept target (not the cluster's data root) needs --overwrite for that (s58).
    r = run_drsync("snapshot", "restore", "v2", "--repo", repo, "--target", webhdfs.url(target), "--overwrite")
    assert r.code == 0, r.err
    d = _tree(webhdfs, target)["d"]
    assert (d["mode"], d["mtime_ms"]) == (0o755, MS_2002)


# --- failover and safe mode while a file streams -----------------------------------------------


class _Interrupting:
    """The repository as the restore reads it, doing ``act`` once, while the file's chunks stream."""

    def __init__(self, repo: Any, act: Any, at: int = 3) -> None:
        self.repo, self.act, self.at, self.reads = repo, act, at, 0

    def has_chunk(self, cid: bytes) -> bool:
        return bool(self.repo.has_chunk(cid))

    def read_chunk(self, cid: bytes) -> bytes:
        self.reads += 1
        if self.reads == self.at:
            self.act()
        return bytes(self.repo.read_chunk(cid))


def _big_snapshot(tmp_path: Path) -> tuple[Any, Any, bytes]:
    from drsync.engine import open_repository

    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(7).randbytes(6 << 20)  # ~24 chunks, six 1 MiB blocks
    (src / "big").write_bytes(data)
    url = _repo(tmp_path)
    _snap(url, src)
    repo = open_repository(url)
    return repo, repo.load_manifest(repo.find_snapshot("latest")), data


def test_a_failover_while_a_big_file_streams_does_not_fail_the_restore(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``haadmin -failover`` in the middle of a restore, while a 6 MiB file streams to the datanode
    (deploy/hdfs/README.md: "a failover during a shipment is retried"). The datanode's client then
    asks the old active namenode for its next block and gets StandbyException; the streamed CREATE is
    never retried. Seen: "no active HDFS namenode among ... (all answered as standby) to write
    .../.drsync-staging/0" — though the other namenode was active all along."""
    from drsync.apply import apply_manifest

    repo, manifest, data = _big_snapshot(tmp_path)
    target = f"{webhdfs.test_dir}/target"
    apply_manifest(manifest, _Interrupting(repo, webhdfs.failover), webhdfs.url(target), workers=1)
    assert {p: e.get("sha256") for p, e in _tree(webhdfs, target).items()} == {"big": _sha(data)}


def test_safe_mode_while_a_big_file_streams_is_waited_out(webhdfs, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Safe mode entered while a file streams, left again once drsync has said it retries (every
    retried call logs "retrying in"). A namenode in safe mode still redirects CREATE; the datanode
    then refuses with SafeModeException, and the streamed write is not retried as other calls are.
    Seen: "HDFS namenode is in safe mode, cannot write .../.drsync-staging/0" at once (also for the
    journal: a real restore during a 3 s safe mode failed this way)."""
    from drsync.apply import apply_manifest

    caplog.set_level(logging.INFO, logger="drsync.hdfs")
    repo, manifest, data = _big_snapshot(tmp_path)
    target = f"{webhdfs.test_dir}/target"
    entered, over = threading.Event(), threading.Event()

    def enter() -> None:
        webhdfs.safe_mode(True)
        entered.set()

    def leave_when_drsync_waits() -> None:
        entered.wait()
        wait_for(lambda: over.is_set() or any("retrying in" in r.getMessage() for r in caplog.records),
                 "drsync retrying in safe mode (or giving up)")
        webhdfs.safe_mode(False)

    helper = threading.Thread(target=leave_when_drsync_waits, daemon=True)
    helper.start()
    try:
        apply_manifest(manifest, _Interrupting(repo, enter), webhdfs.url(target), workers=1)
    finally:
        over.set()
        entered.set()
        helper.join()
    assert {p: e.get("sha256") for p, e in _tree(webhdfs, target).items()} == {"big": _sha(data)}


# --- scripts/hadoop-cluster ---------------------------------------------------------------------


def _hc(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_stop_leaves_a_process_alone_that_is_not_the_cluster(tmp_path: Path) -> None:
    """``stop DIR`` signals the PID in DIR/cluster.json without checking that it is still the cluster's
    JVM. After the JVM died (kill -9, OOM, a reboot) the PID can belong to anything. Seen: an
    unrelated process (here a ``sleep``) is killed and ``stop`` exits 0; ``start DIR`` refuses with
    "a mini cluster already runs from DIR (pid ...)" as long as that process lives."""
    # Not our child (so that nothing here keeps it as a zombie): a shell starts it and exits.
    pid = int(subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True,
                             text=True, check=True).stdout)
    try:
        d = tmp_path / "hc"
        d.mkdir()
        (d / "cluster.json").write_text(json.dumps({"webhdfs": [], "pid": pid, "control": "http://127.0.0.1:9"}))
        _hc("stop", str(d), timeout=120)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        assert state not in ("gone", "Z", "X"), "hadoop-cluster stop killed a process that was not its cluster"
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_start_on_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    """Seen: a Python traceback ending in FileExistsError."""
    f = tmp_path / "not-a-dir"
    f.write_text("")
    r = _hc("start", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_start_with_a_bad_datanode_count_is_a_one_line_error(tmp_path: Path) -> None:
    """``--datanodes -1``. Seen: fifteen lines of a Java stack trace (from cluster.log)."""
    r = _hc("start", str(tmp_path / "hc"), "--datanodes", "-1")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_script_runs_with_the_machines_python() -> None:
    """The README and deploy/hdfs/README.md run ``scripts/hadoop-cluster`` directly; its shebang is
    ``/usr/bin/env python3``, which in a plain shell on Debian is /usr/bin/python3, without the
    ``requests`` package of .venv. Seen: "ModuleNotFoundError: No module named 'requests'" (a
    traceback) for every command, even ``stop`` of a directory with no cluster."""
    if not Path("/usr/bin/python3").exists():
        pytest.fail("no /usr/bin/python3 here to stand for a fresh Debian shell")
    r = subprocess.run([str(SCRIPT), "stop", "/nonexistent-dir"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")})
    assert "Traceback" not in r.stderr and "no cluster runs" in r.stderr, r.stderr


def test_admin_errors_are_one_line(hdfs_cluster, webhdfs) -> None:  # type: ignore[no-untyped-def]
    """``admin DIR snapshots PATH`` of a directory that is not snapshottable. Seen: the namenode's
    RemoteException with its whole server-side stack trace (20 lines), without a final newline."""
    r = _hc("admin", str(hdfs_cluster.dir), "snapshots", webhdfs.test_dir)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.endswith("\n"), r.stderr


def test_admin_restart_of_a_datanode_that_does_not_exist_fails(hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """``admin DIR datanode restart 5`` on a cluster with one datanode. Seen: exit 0 and the state."""
    r = _hc("admin", str(hdfs_cluster.dir), "datanode", "restart", "5")
    assert r.returncode != 0, r.stdout


@pytest.fixture(scope="module")
def spare_ha(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """An HA pair of this module's own, for namenode stops and restarts the session's cluster must not see."""
    from tests.hadoop import cluster as hc

    c = hc.start(tmp_path_factory.mktemp("spare-ha"), ha=True, lean=True)
    su = f"hdfs://{','.join(c.webhdfs)}/?user={c.info['superuser']}"
    from drsync.storage.hdfs import HdfsFs, parse_hdfs_url

    fs = HdfsFs(parse_hdfs_url(su), retry_s=30)
    fs.mkdirs("/t")
    fs.set_permission("/t", 0o1777)
    yield c
    c.stop()


def test_admin_namenode_stop_succeeds_and_state_shows_it_down(spare_ha) -> None:  # type: ignore[no-untyped-def]
    """``admin DIR namenode stop 1`` (the standby). Seen: exit 1 with "java.lang.NullPointerException:
    Cannot invoke ...NameNode.getHttpAddress() because ...getNameNode(int) is null" — the namenode is
    stopped, but the answer (and every later ``admin DIR state``) fails on the stopped namenode."""
    try:
        stopped = _hc("admin", str(spare_ha.dir), "namenode", "stop", "1")
        state = _hc("admin", str(spare_ha.dir), "state")
        assert stopped.returncode == 0, stopped.stderr
        assert state.returncode == 0, state.stderr
        assert [nn["state"] for nn in json.loads(state.stdout)["namenodes"]] == ["active", "down"]
    finally:
        spare_ha.run("namenode", "restart", "1", check=False)


def test_a_restarted_namenode_takes_writes_once_active(spare_ha, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``admin DIR namenode stop 1``, ``namenode restart 1``, ``haadmin -failover nn1 nn2``, then a
    restore onto the cluster. The restarted namenode redirects CREATE with
    ``namenoderpcaddress=minidfs-ns``, a nameservice the datanode does not know. Seen: "HDFS could
    not write .../.drsync-staging/0: IllegalArgumentException: java.net.UnknownHostException:
    minidfs-ns" — no file can be written through WebHDFS any more."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    repo = _repo(tmp_path)
    _snap(repo, src)
    spare_ha.run("namenode", "stop", "1", check=False)
    assert spare_ha.run("namenode", "restart", "1")["rc"] == 0
    spare_ha.haadmin("-failover", "nn1", "nn2")
    try:
        hosts = ",".join(spare_ha.state()["webhdfs"])
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target",
                       f"hdfs://{hosts}/t/{tmp_path.name}?user=drsync")
        assert r.code == 0, r.err
    finally:
        spare_ha.haadmin("-failover", "nn2", "nn1", check=False)


def test_a_single_namenode_without_datanodes_is_not_down(tmp_path: Path) -> None:
    """``start DIR --datanodes 0`` (no HA). The namenode answers, yet cluster.json and ``admin state``
    call it "down" (MiniDFSCluster.isNameNodeUp wants capacity), so anything that looks for the
    active namenode in ``state`` finds none."""
    d = tmp_path / "hc"
    started = _hc("start", str(d), "--datanodes", "0")
    try:
        assert started.returncode == 0, started.stderr
        info = json.loads((d / "cluster.json").read_text())
        r = requests.get(f"http://{info['webhdfs'][0]}/webhdfs/v1/?op=GETFILESTATUS&user.name=x", timeout=30)
        assert r.ok
        assert [nn["state"] for nn in info["namenodes"]] == ["active"]
    finally:
        _hc("stop", str(d))



def test_a_hash_in_the_target_path_never_lands_elsewhere(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``--target hdfs://nn1,nn2/.../data#2?user=drsync``: HDFS names may hold '#', and drsync takes the
    URL path as it is written (``%23`` would be a literal ``%23``). urlsplit makes ``#2?user=drsync``
    a fragment, which drsync ignores: the restore goes to ``.../data`` as the default user, and says it
    restored to ``.../data#2``. Seen: with --delete-extra, ``data/precious`` — a different directory —
    is deleted, exit 0."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    repo = _repo(tmp_path)
    _snap(repo, src)
    _raw_file(webhdfs, f"{webhdfs.test_dir}/data/precious", b"not yours")
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--delete-extra",
                   "--target", webhdfs.url(f"{webhdfs.test_dir}/data#2"))
    assert "precious" in _tree(webhdfs, f"{webhdfs.test_dir}/data"), \
        f"a restore to .../data#2 (exit {r.code}: {(r.out + r.err).strip()}) removed .../data/precious"


@pytest.mark.parametrize("later", [
    pytest.param("", marks=pytest.mark.xfail(strict=True, reason="known limit: a namenode's snapshot diff leaves "
                                             "out SETTIMES, so a capture that diffs sees a time-only change only "
                                             "at its next whole walk (at least hourly: the +3601s case)")),
    "+3601s"])
def test_an_incremental_capture_sees_a_changed_modification_time(webhdfs, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 later: str) -> None:
    """On a snapshottable root the next capture lists only what GETSNAPSHOTDIFF reports; a namenode
    does not report SETTIMES (``hdfs dfs -touch -m -t``, DistCp ``-pt``, drsync's own applies) in a
    snapshot diff, for files or directories. Seen: after SETTIMES on ``p/q/f`` and ``p/q`` the new
    snapshot keeps their old modification times, and keeps them until something else in ``p/q``
    changes (README: a snapshot holds "any modification time"). A capture an hour after the last
    (``later``: its clock an hour ahead, libfaketime) walks the whole tree and holds the new times."""
    from tests.test_snapshot_order import drsync_with_clock

    data = f"{webhdfs.test_dir}/data"
    _raw_file(webhdfs, f"{data}/p/q/f", b"f", MS_2002)
    _raw_file(webhdfs, f"{data}/p/g", b"g", MS_2002)
    webhdfs.allow_snapshot(data)
    repo = _repo(tmp_path)
    _snap(repo, webhdfs.url(data))
    assert _raw(webhdfs, "PUT", f"{data}/p/q/f", op="SETTIMES", modificationtime=str(MS_2001)).ok
    assert _raw(webhdfs, "PUT", f"{data}/p/q", op="SETTIMES", modificationtime=str(MS_2001)).ok
    args = ("snapshot", "create", "--repo", repo, "--source", webhdfs.url(data), "--json")
    _ok(drsync_with_clock(later, *args) if later else run_drsync(*args))
    _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tmp_path / "back"))
    hadoop = {p: e["mtime_ms"] for p, e in _tree(webhdfs, data).items()}
    back = {p: (tmp_path / "back" / p).stat().st_mtime_ns // 10**6 for p in hadoop}
    assert back == hadoop


def test_a_url_at_a_server_that_is_not_webhdfs_is_named_as_such(tmp_path: Path) -> None:
    """A wrong port (the RPC port, a proxy, another web service) is a common slip. drsync has a message
    for it ("check that ... are WebHDFS endpoints"). Seen: ``snapshot create`` says "data root ...
    does not exist" (a 404 taken for a missing path), and ``snapshot restore`` prints the server's
    HTML page as a Python bytes literal."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"hdfs://127.0.0.1:{server.server_address[1]}/cluster/data?user=drsync"
        repo = _repo(tmp_path)
        src = tmp_path / "src"
        src.mkdir()
        (src / "a").write_bytes(b"a")
        _snap(repo, src)
        for r in (run_drsync("snapshot", "create", "--repo", repo, "--source", url),
                  run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", url)):
            assert r.code != 0 and "WebHDFS" in r.err and "<html" not in r.err.lower(), r.err
    finally:
        server.shutdown()
        server.server_close()


def test_modes_hdfs_cannot_hold_are_reported_once_not_reapplied_forever(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A local snapshot with a setuid file (0o4755) and a setgid directory (0o2775) restored onto HDFS,
    which keeps only the sticky bit. Seen: no warning that the bits were dropped, and every later
    restore of the same snapshot sets the file's permission and the directory's times and permission
    again (the plan compares 0o4755 with HDFS's 0o755 and never converges): on a standby, two
    namenode writes per such path on every cycle."""
    src = tmp_path / "src"
    (src / "g").mkdir(parents=True)
    (src / "suid").write_bytes(b"x")
    (src / "suid").chmod(0o4755)
    (src / "g" / "f").write_bytes(b"y")
    (src / "g").chmod(0o2775)
    repo = _repo(tmp_path)
    _snap(repo, src)
    target = f"{webhdfs.test_dir}/target"
    first = _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", webhdfs.url(target), "--json"))
    mark = webhdfs.audit_mark()
    _ok(run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", webhdfs.url(target)))
    changes = [op for op in webhdfs.ops_since(mark, target) if ".drsync-staging" not in op[1]
               and op[0] in ("setPermission", "setTimes", "rename", "create", "delete", "mkdirs")]
    assert first.json()["warnings"] or not changes, \
        f"modes silently dropped, and a restore of an unchanged target changed: {changes}"
