"""Breaker s56c: the lease of an apply onto an HDFS root (drsync/dataroot/hdfs_lease.py), on the real HDFS.

Another host is a process in a UTS namespace of its own (``unshare -u``) with a host lock directory of its
own, as in tests/test_hdfs_lease.py. Each test asserts what the promise says (one apply at a time writes to
an HDFS root, whichever host it runs on; a stale lease is taken over; nothing of drsync's is left behind)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from drsync.dataroot.hdfs_lease import STALE_S, RootLease, is_lease
from drsync.flocks import ApplyBusy
from drsync.storage.hdfs import HdfsFs, parse_hdfs_url
from tests.conftest import ROOT, init_repo_at, run_drsync
from tests.sites import HdfsSite

OTHER = "drsync-s56c-other"


def _other_host_available() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-u", "sh", "-c", f"hostname {OTHER} && hostname"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == OTHER


needs_other_host = pytest.mark.skipif(not _other_host_available(),
                                      reason="needs root and unshare -u, to run a drsync of another host name")


def _tree(root: Path, tag: str, n: int = 20) -> None:
    (root / "common").mkdir(parents=True, exist_ok=True)
    (root / f"only-{tag}").mkdir(exist_ok=True)
    for i in range(n):
        (root / "common" / f"f{i:03}").write_text(f"{tag} {i}\n" * 50)
        (root / f"only-{tag}" / f"g{i:03}").write_text(f"{tag} only {i}\n")


def _expected(root: Path) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("dir", None) if p.is_dir() else ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _snapshots(tmp: Path) -> tuple[str, str, str]:
    repo = str(tmp / "repo")
    init_repo_at(repo, "e", "1")
    ids = []
    for tag in ("S1", "S2"):
        _tree(tmp / tag, tag)
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp / tag, "--json")
        assert r.code == 0, r.err
        ids.append(r.json()["id"])
    return repo, ids[0], ids[1]


def _state(webhdfs, path: str) -> dict[str, tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    """What HDFS holds below ``path`` (Hadoop's own client), drsync's staging area included."""
    return {rel: (e["type"], e.get("sha256")) for rel, e in webhdfs.tree(path).items()}


def _lease_of(webhdfs, staging: str) -> str:  # type: ignore[no-untyped-def]
    """The path of the one lease in a staging area."""
    [name] = [x["pathSuffix"] for x in webhdfs.fs.list_dir(staging) if is_lease(x["pathSuffix"])]
    return f"{staging}/{name}"


def _other_env(tmp: Path, name: str, **extra: str) -> dict[str, str]:
    d = tmp / f"locks-{name}"
    d.mkdir(exist_ok=True)
    return {**os.environ, "DRSYNC_LOCK_DIR": str(d), **extra}


def _popen_other(tmp: Path, name: str, *args: object, **extra: str) -> subprocess.Popen[str]:
    cmd = ["unshare", "-u", "sh", "-c", f'hostname {name} && exec "$0" "$@"', sys.executable, "-m", "drsync",
           *map(str, args)]
    return subprocess.Popen(cmd, env=_other_env(tmp, name, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _gate(tmp: Path, point: str) -> Path:
    d = tmp / "gates"
    d.mkdir(exist_ok=True)
    (d / point).write_text("")
    return d


def _wait(what: str, cond, proc: subprocess.Popen[str], timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"{what}: the process ended first ({proc.returncode}): {proc.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --- taking over ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["a live process", 0])
def test_a_stale_lease_of_this_host_is_taken_over_even_when_its_pid_now_names_another_process(
        webhdfs, tmp_path: Path, pid: object) -> None:  # type: ignore[no-untyped-def]
    """A lease of this host not renewed for an hour: its apply is gone, whatever now runs under its pid (pids
    are reused, after a reboot above all). Taken over at once on its own host, the README says; from another
    host it is taken over after STALE_S. Now this host refuses it forever (``_gone`` never looks at the age
    when the pid answers a signal: a reused pid, pid 0 or -1)."""
    repo, s1, _ = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target, lease = site.url("r"), site.path("r/.drsync-staging/lease.old")
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        webhdfs.fs.write(lease, json.dumps({"host": socket.gethostname(), "token": "t", "what": "an apply",
                                            "pid": sleeper.pid if pid == "a live process" else pid}).encode())
        webhdfs.admin_fs.set_times(lease, int((time.time() - STALE_S - 3600) * 1e9))
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target)
        assert r.code == 0, r.err
    finally:
        sleeper.communicate(b"")
    assert webhdfs.fs.status(site.path("r/.drsync-staging")) is None


def test_two_hosts_taking_over_one_stale_lease_never_both_hold_it(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A stale lease (its host crashed) and two applies taking it over. B looks at it (its status: stale), and
    its next call, reading the lease's document, is slow; meanwhile A deletes the stale lease and creates its
    own. B then reads A's fresh document, judges it by the stale status it read before, deletes A's lease and
    creates its own: both hold the root. One of them must be refused."""
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    staging, lease = site.path("r/.drsync-staging"), site.path("r/.drsync-staging/lease.dead")
    webhdfs.fs.write(lease, json.dumps({"host": "a-crashed-host", "pid": 1, "what": "x", "token": "dead"}).encode())
    webhdfs.admin_fs.set_times(lease, int((time.time() - STALE_S - 60) * 1e9))
    in_read, go_read, done = threading.Event(), threading.Event(), threading.Event()

    class SlowRead(HdfsFs):
        def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
            in_read.set()
            go_read.wait(60)  # a slow network (or a pause) for this host, for one call
            return super().read(path, offset, length)

    held: list[str] = []

    def apply(fs: HdfsFs, name: str) -> None:
        try:
            with RootLease(fs, staging, site.url("r")).hold(f"apply {name}"):
                held.append(name)
                done.wait(60)
        except ApplyBusy:
            held.append(f"{name} refused")

    b = threading.Thread(target=apply, args=(SlowRead(parse_hdfs_url(site.url("r")), retry_s=30), "B"))
    b.start()
    try:
        assert in_read.wait(60)
        a = threading.Thread(target=apply, args=(HdfsFs(parse_hdfs_url(site.url("r")), retry_s=30), "A"))
        a.start()
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:
            time.sleep(0.05)
        go_read.set()
        while len(held) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        go_read.set()
        done.set()
        b.join()
        a.join()
    assert sorted(held) in (["A", "B refused"], ["A refused", "B"]), held


@needs_other_host
def test_a_holder_that_lost_its_lease_does_not_commit(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Host A's apply (S1 -> S1 plus a directory) stalls after staging for more than STALE_S (a paused VM: its
    renewals stop); host B takes the stale lease over, as it should, and restores S1. A then resumes and
    commits without looking at its lease: it makes its new directory in B's tree and fails on its staged files
    (B emptied the staging area), leaving a mix and its journal. A must notice it no longer holds the root and
    change nothing."""
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    src = tmp_path / "S1"
    _tree(src, "S1")
    s1 = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json").json()["id"]
    want = _expected(src)
    (src / "added").mkdir()
    (src / "added" / "new").write_text("new\n")
    s3 = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json").json()["id"]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target, staging = site.url("r"), site.path("r/.drsync-staging")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    gates = _gate(tmp_path, "apply-staged")
    a = _popen_other(tmp_path, OTHER, "snapshot", "restore", s3, "--repo", repo, "--target", target, "--overwrite",
                     "--delete-extra", DRSYNC_FAULT_PAUSE=str(gates))
    try:
        _wait("A staged", lambda: (gates / "apply-staged.reached").exists(), a)
        os.killpg(a.pid, signal.SIGSTOP)  # nothing of A runs: no renewal
        webhdfs.admin_fs.set_times(_lease_of(webhdfs, staging), int((time.time() - STALE_S - 30) * 1e9))
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target, "--overwrite",
                       "--delete-extra")
        assert r.code == 0, r.err  # B takes the stale lease over
        (gates / "apply-staged").unlink()
        os.killpg(a.pid, signal.SIGCONT)
        _finish(a)
    finally:
        _kill(a)
    assert _state(webhdfs, site.path("r")) == want  # B's restore, whole: nothing of A's, no staging area left


@needs_other_host
def test_another_machine_with_the_same_host_name_does_not_take_a_live_lease_over(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two machines (containers) named alike, each with its own pids and /run/lock: the second does not find
    the first's pid and takes its live lease over at once, and both write the root (A then fails, leaving a
    mix or its journal). A lease names its holder by host name and pid alone."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target = site.url("r")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    gates = _gate(tmp_path, "apply-staged")
    a = _popen_other(tmp_path, "edge", "snapshot", "restore", s2, "--repo", repo, "--target", target, "--overwrite",
                     "--delete-extra", DRSYNC_FAULT_PAUSE=str(gates))
    try:
        _wait("A staged", lambda: (gates / "apply-staged.reached").exists(), a)
        b = subprocess.run(["unshare", "-u", "-p", "-f", "--mount-proc", "sh", "-c", 'hostname edge && exec "$0" "$@"',
                            sys.executable, "-m", "drsync", "snapshot", "restore", s1, "--repo", repo, "--target",
                            target, "--overwrite", "--delete-extra"],
                           env=_other_env(tmp_path, "edge-twin"), capture_output=True, text=True, timeout=300)
        (gates / "apply-staged").unlink()
        code, err = _finish(a)
    finally:
        _kill(a)
    assert b.returncode == 1, b.stderr
    assert code == 0, err
    assert _state(webhdfs, site.path("r")) == _expected(tmp_path / "S2")


# --- nested roots -------------------------------------------------------------------------------------------


@needs_other_host
def test_a_restore_around_another_hosts_root_in_flight_does_not_delete_its_lease(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Host A restores onto /x/inner; host B restores onto /x with --delete-extra. On one host that is refused
    (an apply around another one's target); across hosts B removes inner as an extra, A's lease and staging
    area with it, and A then fails leaving a mix. The lease is never to be deleted as an extra path."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    webhdfs.fs.mkdirs(site.path("x"))
    gates = _gate(tmp_path, "apply-staged")
    a = _popen_other(tmp_path, OTHER, "snapshot", "restore", s2, "--repo", repo, "--target", site.url("x/inner"),
                     DRSYNC_FAULT_PAUSE=str(gates))
    try:
        _wait("A staged", lambda: (gates / "apply-staged.reached").exists(), a)
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", site.url("x"), "--overwrite",
                       "--delete-extra")
        lease_kept = bool(_lease_of(webhdfs, site.path("x/inner/.drsync-staging")))
        (gates / "apply-staged").unlink()
        code, err = _finish(a)
    finally:
        _kill(a)
    assert r.code == 1 and lease_kept, (r.code, r.out, r.err)
    assert code == 0, err
    assert _state(webhdfs, site.path("x/inner")) == _expected(tmp_path / "S2")


@needs_other_host
def test_a_restore_inside_another_hosts_root_in_flight_is_refused(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Host A restores S2 onto /x (S1 there); host B restores onto /x/common meanwhile. B writes into A's
    root (refused on one host) and the root ends as neither snapshot (common/common/... stays)."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", site.url("x")).code == 0
    gates = _gate(tmp_path, "apply-staged")
    a = _popen_other(tmp_path, OTHER, "snapshot", "restore", s2, "--repo", repo, "--target", site.url("x"),
                     "--overwrite", "--delete-extra", DRSYNC_FAULT_PAUSE=str(gates))
    try:
        _wait("A staged", lambda: (gates / "apply-staged.reached").exists(), a)
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", site.url("x/common"), "--overwrite",
                       "--delete-extra")
        (gates / "apply-staged").unlink()
        code, err = _finish(a)
    finally:
        _kill(a)
    assert r.code == 1, (r.code, r.out, r.err)
    assert code == 0, err
    assert _state(webhdfs, site.path("x")) == _expected(tmp_path / "S2")


# --- a lease that is not a file of drsync's ------------------------------------------------------------------


@needs_other_host
def test_a_lease_that_is_a_directory_never_lets_two_hosts_apply_at_once(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``<root>/.drsync-staging/lease`` is a directory: its CREATE fails (exists) and its OPEN says
    FileNotFoundException, which ``_take`` reads as "given back meanwhile" twice and then returns as if it
    held the lease. With --delete-extra both hosts' applies go ahead at once: A's staged files are emptied by
    B, A fails, and the root is neither snapshot."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target = site.url("r")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    webhdfs.fs.mkdirs(site.path("r/.drsync-staging/lease.dir"))  # a lease's name, a directory, long stale
    webhdfs.admin_fs.set_times(site.path("r/.drsync-staging/lease.dir"), int((time.time() - STALE_S - 60) * 1e9))
    gates = _gate(tmp_path, "apply-staged")
    a = _popen_other(tmp_path, OTHER, "snapshot", "restore", s2, "--repo", repo, "--target", target, "--overwrite",
                     "--delete-extra", DRSYNC_FAULT_PAUSE=str(gates))
    try:
        _wait("A staged", lambda: (gates / "apply-staged.reached").exists(), a)
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target, "--overwrite", "--delete-extra")
        (gates / "apply-staged").unlink()
        _finish(a)
    finally:
        _kill(a)
    assert r.code != 0, "B applied while A was applying"
    held = {k: v for k, v in _state(webhdfs, site.path("r")).items() if not k.startswith(".drsync-staging")}
    assert held in (_expected(tmp_path / "S1"), _expected(tmp_path / "S2"))


def test_a_restore_that_says_it_removed_a_foreign_staging_area_leaves_none(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A directory named lease in the staging area: --delete-extra restores, counts the stray staging area as
    removed ("2 removed"), and leaves it there with drsync's own mark and trash in it."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target = site.url("r")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    webhdfs.fs.mkdirs(site.path("r/.drsync-staging/lease"))
    r = run_drsync("snapshot", "restore", s2, "--repo", repo, "--target", target, "--overwrite", "--delete-extra")
    if r.code == 0:  # restored: nothing of drsync's stays (a refusal would leave the stray as it found it)
        assert _state(webhdfs, site.path("r")) == _expected(tmp_path / "S2")


def test_a_lease_being_created_by_another_apply_refuses_with_the_lease_message(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two applies creating the lease at the same instant (seen in 1 of 8 trials of two hosts started
    together): the loser's CREATE meets the winner's file still under construction and the namenode answers
    AlreadyBeingCreatedException, shown raw ("HDFS could not write ... AlreadyBeingCreatedException ...
    DFSClient_NONMAPREDUCE_...") instead of the refusal naming the other apply. Reproduced by holding a
    CREATE of the lease open."""
    repo, s1, s2 = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target, lease = site.url("r"), site.path("r/.drsync-staging/lease.winner")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    step = requests.put(f"{webhdfs.namenode_urls[0]}/webhdfs/v1{lease}",
                        params={"op": "CREATE", "overwrite": "false", "user.name": "drsync"}, allow_redirects=False,
                        timeout=30)
    assert step.status_code == 307, step.text
    body = json.dumps({"host": "drsync-s56c-winner", "pid": 4242, "what": "x", "token": "t"}).encode()
    go = threading.Event()

    def slow_body():  # type: ignore[no-untyped-def]
        yield body[:10]
        go.wait(120)
        yield body[10:]

    upload = threading.Thread(target=lambda: requests.put(step.headers["Location"], data=slow_body(), timeout=180))
    upload.start()
    try:
        deadline = time.monotonic() + 30
        while webhdfs.fs.status(lease) is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = run_drsync("snapshot", "restore", s2, "--repo", repo, "--target", target, "--overwrite", "--delete-extra")
    finally:
        go.set()
        upload.join()
    assert r.code == 1, r.err
    assert "another drsync apply" in r.err and "AlreadyBeingCreatedException" not in r.err, r.err


def test_an_apply_that_cannot_write_its_lease_leaves_no_staging_area(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The lease's CREATE fails (the root's namespace quota has room for the staging directory only): the
    apply fails, exit 1, and leaves the empty .drsync-staging it made for the lease."""
    repo, s1, _ = _snapshots(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target = site.url("r")
    assert run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target).code == 0
    names = len(_state(webhdfs, site.path("r"))) + 1  # and the root itself
    webhdfs.set_name_quota(site.path("r"), names + 1)
    try:
        r = run_drsync("snapshot", "restore", s1, "--repo", repo, "--target", target, "--checksum")
    finally:
        webhdfs.set_name_quota(site.path("r"), -1)
    assert r.code == 1, r.err
    assert webhdfs.fs.status(site.path("r/.drsync-staging")) is None


def test_the_operations_guide_no_longer_says_hdfs_restores_from_two_hosts_are_not_stopped() -> None:
    """README: another host's apply onto an HDFS root is refused. docs/operations.md (section 7) still says
    "On HDFS only the lock file counts, so two hosts restoring onto one HDFS path at once are not stopped (do
    not do that)", and that a restore killed with kill -9 holds nothing (another host waits 5 minutes)."""
    text = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "two hosts restoring onto one HDFS path at once are not stopped" not in text
