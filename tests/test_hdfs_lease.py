"""One apply at a time onto an HDFS root from any host (drsync.dataroot.hdfs_lease), on the real HDFS.

The host lock of an apply covers one host; an HDFS root is reached from many. Another host is a real
process in a UTS namespace of its own (``unshare -u``) with another host name and a host lock directory of
its own: the lease tells hosts apart by name, and a process of another host cannot be looked up, only
waited out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drsync.dataroot.hdfs_lease import STALE_S, _identity, _start_of, is_lease
from drsync.storage.hdfs import HdfsError
from tests.conftest import init_repo_at, make_tree, run_drsync, tree_state
from tests.sites import HdfsSite

_OTHER = "drsync-other-host"


def _other_host_available() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-u", "sh", "-c", f"hostname {_OTHER} && hostname"], capture_output=True,
                       text=True)
    return r.returncode == 0 and r.stdout.strip() == _OTHER


def _snapshot(tmp_path: Path) -> tuple[str, str, Path]:
    data = tmp_path / "data"
    make_tree(data, files=12, big=1)
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "e", "1")
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json").json()["id"]
    return repo, snap, data


def _leases(webhdfs, staging: str) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    """Every lease in a staging area whose document is written whole (a CREATE makes the file before its
    bytes), by path."""
    out = {}
    try:
        names = [s["pathSuffix"] for s in webhdfs.fs.list_dir(staging) if is_lease(s["pathSuffix"])]
    except HdfsError:
        return {}
    for n in names:
        try:
            out[f"{staging}/{n}"] = json.loads(webhdfs.fs.read(f"{staging}/{n}"))
        except (ValueError, HdfsError):
            continue
    return out


def _wait_for(what: str, cond, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    """Until ``cond()`` holds (polled: a condition, not a sleep standing in for one), or the process ended."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"{what}: the process ended first ({proc.returncode})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_an_apply_from_another_host_is_refused_until_the_lease_is_gone_or_stale(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Host B's restore onto an HDFS root that host A is restoring to is refused (exit 1, nothing changed,
    A named), and its dry run says why. A killed mid-apply leaves its lease: B still waits, since A's host
    cannot be asked; once the lease is not renewed for STALE_S, B takes it over and finishes the tree."""
    if not _other_host_available():
        pytest.skip("needs root and unshare -u, to run a drsync of another host name")
    repo, snap, data = _snapshot(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target, staging = site.url("restored"), site.path("restored/.drsync-staging")
    (tmp_path / "other-host-locks").mkdir()  # another host has a host lock directory of its own
    env = {**os.environ, "DRSYNC_FAULT_APPLY_DELAY_S": "600",  # A waits after staging, until it is killed
           "DRSYNC_LOCK_DIR": str(tmp_path / "other-host-locks")}
    a = subprocess.Popen(["unshare", "-u", "sh", "-c", f'hostname {_OTHER} && exec "$0" "$@"', sys.executable,
                          "-m", "drsync", "snapshot", "restore", snap, "--repo", repo, "--target", target],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for("A's lease", lambda: bool(_leases(webhdfs, staging)), a)
        held = _leases(webhdfs, staging)
        [(lease, doc)] = held.items()
        assert (doc["host"], doc["pid"]) == (_OTHER, a.pid)
        r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
        assert r.code == 1, (r.code, r.out, r.err)
        assert f"pid {a.pid} on host {_OTHER}" in r.err and "nothing was changed" in r.err
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
        # B changed nothing: A's lease is A's, and nothing but A's staging area is in the target yet
        assert _leases(webhdfs, staging) == held
        assert [p for p in webhdfs.tree(site.path("restored")) if not p.startswith(".drsync-staging")] == []
        r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target, "--dry-run")
        assert f"on host {_OTHER}" in r.out + r.err
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
    assert r.code == 1 and f"on host {_OTHER}" in r.err, (r.code, r.err)  # killed: its host cannot tell
    webhdfs.admin_fs.set_times(lease, int((time.time() - STALE_S - 60) * 1e9))  # as if not renewed since
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
    assert r.code == 0, r.err
    restored = {rel: (e["type"], e.get("sha256")) for rel, e in webhdfs.tree(site.path("restored")).items()}
    assert restored == {rel: (v[0], hashlib.sha256(v[3]).hexdigest() if v[0] == "file" else None)
                        for rel, v in tree_state(data).items() if v[0] not in ("link", "root")}  # HDFS holds no links


def test_a_lease_left_by_a_process_of_this_host_that_is_gone_is_taken_over(webhdfs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A lease of a process of this host (same name, boot and pid namespace) that no longer runs (killed) is
    taken over at once; one of a running process is not, nor one naming this host's name from another boot
    (a same-named machine: it waits out the age). The lease goes when the apply ends, with the staging
    directory."""
    repo, snap, _ = _snapshot(tmp_path)
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    target, staging = site.url("restored"), site.path("restored/.drsync-staging")
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    doc = {**_identity(), "pid": sleeper.pid, "start": _start_of(sleeper.pid), "what": "a test"}
    try:
        webhdfs.fs.write(f"{staging}/lease.sleeper", json.dumps(doc).encode())
        webhdfs.fs.write(f"{staging}/lease.twin", json.dumps({**doc, "boot": "another-boot", "pid": 1}).encode())
        r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
        assert r.code == 1 and f"on host {socket.gethostname()}" in r.err, (r.code, r.err)
    finally:
        sleeper.communicate(b"")
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
    assert r.code == 1 and "pid 1 on host" in r.err, (r.code, r.err)  # the twin: not this boot, still fresh
    webhdfs.fs.delete(f"{staging}/lease.twin")
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
    assert r.code == 0, r.err
    assert webhdfs.fs.status(staging) is None
