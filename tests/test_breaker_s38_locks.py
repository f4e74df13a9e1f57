"""Breaker s38 (locks): hostile cases for the lock-conflict messages and 'drsync repo unlock'.

Each test fails on the fault named in its docstring."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drsync.errors import LockedError
from drsync.repository import format as fmt
from drsync.repository.lock import RepositoryLock, read_locks, remove_locks
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import init_repo_at, make_tree, run_drsync

REPO_ROOT = Path(__file__).resolve().parent.parent

_HOLD = (
    "import sys, time\n"
    "from drsync.storage.local import LocalStorage\n"
    "from drsync.repository.lock import RepositoryLock\n"
    "RepositoryLock(LocalStorage(sys.argv[1]), exclusive=False).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n")


def _repo(tmp_path: Path) -> Path:
    data, repo = tmp_path / "data", tmp_path / "repo"
    make_tree(data, files=2, big=0)
    init_repo_at(repo, "c", "1")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    return repo


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_s38_unlock_from_another_pid_namespace_never_removes_a_live_lock(tmp_path: Path) -> None:
    """Fault: a process in another pid namespace with the same hostname (a container on the host's
    network: Docker --network host, a Kubernetes hostNetwork pod) sharing the repository sees a live
    lock's pid as gone, so 'drsync repo unlock' (and any locker, which deletes stale locks first)
    removes the lock of a live process."""
    repo = _repo(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(repo)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "drsync", "repo",
                            "unlock", "--repo", str(repo)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert holder.poll() is None
        assert [lk.pid for lk in read_locks(LocalStorage(repo))] == [holder.pid], r.stdout + r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_s38_a_fresh_unreadable_lock_gets_advice_that_removes_it(tmp_path: Path) -> None:
    """Fault: a lock file that cannot be parsed blocks every locker with 'if that process is gone run
    drsync repo unlock', but 'drsync repo unlock' removes 0 locks (the file is not stale for 30
    minutes); the advice that works is 'repo unlock --all' (as for an oversized lock file)."""
    repo = _repo(tmp_path)
    (repo / fmt.LOCKS_DIR / "damaged.json").write_text("{ not json")
    r = run_drsync("snapshot", "delete", "latest", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 1 and "unreadable lock file" in r.err
    if "--all" not in r.err:
        assert "drsync repo unlock" in r.err
        run_drsync("repo", "unlock", "--repo", repo)  # what the message says to do
        again = run_drsync("snapshot", "delete", "latest", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
        assert again.code == 0, f"followed the advice of {r.err!r}, still: {again.err!r}"


@pytest.mark.parametrize("created", ["nan", 1e300, -1e20])
def test_s38_a_lock_with_an_odd_time_still_names_its_holder(tmp_path: Path, created: object) -> None:
    """Fault: a lock document whose 'created' is NaN or out of range makes every locker fail with
    'internal error: ValueError/OverflowError' instead of the promised message naming the holder."""
    repo = _repo(tmp_path)
    (repo / fmt.LOCKS_DIR / "odd.json").write_text(json.dumps({
        "host": "db-7", "pid": 4242, "exclusive": True, "command": "drsync repo gc",
        "created": created, "refreshed": time.time()}))
    r = run_drsync("snapshot", "delete", "latest", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 1 and "internal error" not in r.err, r.err
    assert "pid 4242 on db-7" in r.err and r.err.count("\n") == 1


@pytest.mark.parametrize("value", ["abc", "", "30s", "1_0", " 5 ", "1e3", "-1", "\u0665", "9" * 400])
def test_s38_a_bad_lock_wait_is_a_one_line_usage_error(value: str) -> None:
    """Fault: DRSYNC_LOCK_WAIT that is not a number is parsed at import time: every command (even
    --version) dies with a Python traceback and exit 1."""
    r = run_drsync("snapshot", "list", "--repo", "/nonexistent", env={"DRSYNC_LOCK_WAIT": value})
    assert "Traceback" not in r.err, r.err
    assert r.code == 2 and r.err.count("\n") == 1, r.err


def test_s38_a_nan_lock_wait_does_not_spin_forever(tmp_path: Path) -> None:
    """Fault: DRSYNC_LOCK_WAIT=nan makes the deadline NaN: the locker never gives up and retries with
    sleep(0), writing and deleting a durable lock file as fast as it can, forever (a busy loop on the
    repository). It should be refused (exit 2) or give up."""
    repo = _repo(tmp_path)
    (repo / fmt.LOCKS_DIR / "foreign.json").write_text(json.dumps({
        "host": "db-7", "pid": 4242, "exclusive": True, "command": "drsync repo gc",
        "created": time.time(), "refreshed": time.time()}))
    try:
        r = run_drsync("snapshot", "delete", "latest", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "nan"}, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("DRSYNC_LOCK_WAIT=nan: still retrying after 15 s")
    assert r.code in (1, 2) and "Traceback" not in r.err


def test_s38_a_leftover_lock_of_this_process_is_not_said_to_be_released_by_an_operation() -> None:
    """Fault: a lock file of this process that no operation holds any more (its release could not
    delete it: a storage error) is described as 'locked by another operation of this process ... it is
    released when that operation finishes'. No operation will release it; the process knows it holds
    no such lock and could remove it (or say what to do)."""

    class DeleteFailsOnce(MemoryStorage):
        failed = False

        def delete(self, name: str) -> None:
            if not self.failed and name.startswith(fmt.LOCKS_DIR):
                self.failed = True
                raise OSError("the storage went away while deleting")
            super().delete(name)

    s = DeleteFailsOnce()
    first = RepositoryLock(s, exclusive=False).acquire()
    with pytest.raises(OSError):
        first.release()
    assert not first.held and len(read_locks(s)) == 1
    try:
        RepositoryLock(s, exclusive=True).acquire().release()
    except LockedError as e:
        assert "released when that operation finishes" not in str(e), str(e)
    assert remove_locks(s) or not read_locks(s)


def test_s38_this_process_with_another_host_is_another_process() -> None:
    """Holds (control): a lock with this pid and start but another host gets the unlock advice."""
    from drsync.liveness import process_start as _process_start

    s = MemoryStorage()
    s.write(f"{fmt.LOCKS_DIR}x.json", json.dumps({
        "host": socket.gethostname() + ".elsewhere", "pid": os.getpid(), "start": _process_start(os.getpid()),
        "exclusive": True, "command": "x", "created": time.time(), "refreshed": time.time()}).encode())
    with pytest.raises(LockedError, match="drsync repo unlock"):
        RepositoryLock(s, exclusive=False).acquire()
