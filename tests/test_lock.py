"""Repository locks: writers exclude each other, crashed holders never wedge a repository."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drsync.errors import LockedError
from drsync.repository import format as fmt
from drsync.repository.lock import STALE_AFTER, RepositoryLock, read_locks, remove_locks
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import init_repo_at, make_tree, run_drsync
from tests.group import wait_for


def test_shared_locks_coexist_exclusive_excludes() -> None:
    s = MemoryStorage()
    with RepositoryLock(s, exclusive=False), RepositoryLock(s, exclusive=False):
        assert len(read_locks(s)) == 2
        with pytest.raises(LockedError, match="shared lock by pid"):
            RepositoryLock(s, exclusive=True).acquire()
    with RepositoryLock(s, exclusive=True), pytest.raises(LockedError, match="exclusive lock by pid"):
        RepositoryLock(s, exclusive=False).acquire()
    assert read_locks(s) == []


def test_a_conflict_with_this_process_itself_does_not_advise_unlock() -> None:
    """An agent's retention meets the shared lock of its own shipment: the message said 'if that
    process is gone run drsync repo unlock' about the very process printing it. It now says the
    lock is this process's own; another live process's lock still gets the unlock advice."""
    s = MemoryStorage()
    with RepositoryLock(s, exclusive=False), pytest.raises(LockedError) as own:
        RepositoryLock(s, exclusive=True).acquire()
    assert "locked by another operation of this process" in str(own.value)
    assert "repo unlock" not in str(own.value)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _foreign_lock(s, host=socket.gethostname(), pid=other.pid, refreshed=time.time())
        with pytest.raises(LockedError) as foreign:
            RepositoryLock(s, exclusive=False).acquire()
        assert "is locked" in str(foreign.value) and "drsync repo unlock" in str(foreign.value)
    finally:
        other.kill()
        other.wait()


def _foreign_lock(s: MemoryStorage, *, host: str, pid: int, refreshed: float) -> None:
    s.write(f"{fmt.LOCKS_DIR}other.json", json.dumps({
        "host": host, "pid": pid, "exclusive": True, "command": "drsync snapshot delete",
        "created": refreshed, "refreshed": refreshed}).encode())


def test_lock_of_dead_local_process_is_stale_and_removed() -> None:
    s = MemoryStorage()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lock(s, host=socket.gethostname(), pid=dead.pid, refreshed=time.time())
    with RepositoryLock(s, exclusive=True):
        assert [lk.pid for lk in read_locks(s)] != [dead.pid]


def test_fresh_foreign_lock_blocks_old_one_does_not() -> None:
    s = MemoryStorage()
    _foreign_lock(s, host="elsewhere", pid=1, refreshed=time.time())
    with pytest.raises(LockedError, match=r"on elsewhere.*drsync repo unlock"):
        RepositoryLock(s, exclusive=False).acquire()
    old = time.time() - STALE_AFTER - 60
    _foreign_lock(s, host="elsewhere", pid=1, refreshed=old)
    with pytest.raises(LockedError, match="on elsewhere"):  # its file was written just now: not stale
        RepositoryLock(s, exclusive=False).acquire()
    name = f"{fmt.LOCKS_DIR}other.json"
    s._blobs[name] = (s._blobs[name][0], old)  # the file too is untouched for 31 minutes
    with RepositoryLock(s, exclusive=False):
        pass


def test_lock_wait_succeeds_once_holder_leaves() -> None:
    s = MemoryStorage()
    holder = RepositoryLock(s, exclusive=True).acquire()
    import threading

    threading.Timer(0.3, holder.release).start()
    with RepositoryLock(s, exclusive=True, wait_s=10):
        pass


def test_unlock_all_removes_live_locks() -> None:
    s = MemoryStorage()
    RepositoryLock(s, exclusive=True).acquire()
    assert remove_locks(s) == []  # our own live lock is not stale
    assert len(remove_locks(s, all_locks=True)) == 1


def test_concurrent_cli_writers_are_serialised(tmp_path: Path) -> None:
    """A held exclusive lock makes a concurrent delete fail cleanly (exit 1, one line)."""
    data = tmp_path / "data"
    make_tree(data, files=3, big=1)
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    storage = LocalStorage(repo)
    # A foreign host's fresh exclusive lock: drsync must not wait forever nor break it.
    storage.write(f"{fmt.LOCKS_DIR}foreign.json", json.dumps({
        "host": "db-7", "pid": 4242, "exclusive": True, "command": "drsync repo gc",
        "created": time.time(), "refreshed": time.time()}).encode())
    r = run_drsync("snapshot", "delete", "latest", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 1
    assert r.err.count("\n") == 1 and "locked: exclusive lock by pid 4242 on db-7" in r.err
    assert len(run_drsync("snapshot", "list", "--repo", repo, "--json").json()) == 1
    assert run_drsync("repo", "unlock", "--repo", repo, "--all").code == 0
    assert run_drsync("snapshot", "delete", "latest", "--repo", repo).code == 0


def test_a_lock_whose_check_fails_leaves_no_lock_file_behind(tmp_path: Path) -> None:
    """The lock file is written before the other holders are read: when reading them fails (a lock
    file deleted while listed, a storage error), the new file must go, or it would name this live
    process and block every other locker (the primary that stopped replicating for 30 minutes)."""
    from drsync.repository.lock import RepositoryLock
    from drsync.storage.memory import MemoryStorage

    class ListFailsAfterWrite(MemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self.lists = 0

        def list(self, prefix: str = ""):  # type: ignore[no-untyped-def]
            self.lists += 1
            if self.lists == 2:  # the check after this locker wrote its own file
                raise OSError("the storage went away while listing")
            return super().list(prefix)

    storage = ListFailsAfterWrite()
    with pytest.raises(OSError, match="went away"):
        RepositoryLock(storage, exclusive=True).acquire()
    assert storage.list(fmt.LOCKS_DIR) == []
    RepositoryLock(storage, exclusive=True, wait_s=0).acquire().release()


def test_listing_skips_a_file_deleted_while_listed(tmp_path: Path) -> None:

    from drsync.storage.local import LocalStorage

    storage = LocalStorage(str(tmp_path))
    for i in range(50):
        storage.write(f"locks/{i:02d}.json", b"{}")
    # Another process deletes files while this one lists: every listing still succeeds.
    import threading

    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            storage.write(f"locks/x{n % 7}.json", b"{}")
            storage.delete(f"locks/x{(n + 3) % 7}.json")

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(300):
            names = [o.name for o in storage.list("locks/")]
            assert "locks/00.json" in names
    finally:
        stop.set()
        t.join()


def test_host_locks_follow_the_directory_across_lock_dirs_and_remove_their_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20 audit: the lock file's directory is not shared by every agent (PrivateTmp, containers, another
    DRSYNC_LOCK_DIR); the flock on the data root directory itself is. A released lock's file is removed, and
    the location can be locked again at once; a bind-mount-like second path (a symlink here) is the same lock."""
    from drsync.agent.locks import HostLock
    from drsync.errors import OperationFailed

    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "alias").symlink_to(root)
    one, two = tmp_path / "locks-one", tmp_path / "locks-two"
    one.mkdir()
    two.mkdir()
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(one))
    (one / "drsync-0123456789abcdef0123.lock").write_text("4242\n/old/state\nrepository\n/old/repo\n")  # stale
    first = HostLock("data root", str(root), str(tmp_path / "state-one"))
    assert len(list(one.glob("drsync-*.lock"))) == 1  # its own; the stale file of a stopped agent is gone
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(two))
    with pytest.raises(OperationFailed) as refused:
        HostLock("data root", str(tmp_path / "alias"), str(tmp_path / "state-two"))
    assert f"already serves data root {root}" in str(refused.value) and "\n" not in str(refused.value)
    assert not list(two.glob("drsync-*.lock"))  # the refused one removed the file it had created
    first.release()
    assert not list(one.glob("drsync-*.lock"))  # released: its file is gone
    again = HostLock("data root", str(root), str(tmp_path / "state-two"))
    assert len(list(two.glob("drsync-*.lock"))) == 1
    again.release()
    assert not list(two.glob("drsync-*.lock"))


def test_a_holder_whose_lock_was_removed_does_not_commit_over_a_gc(tmp_path: Path) -> None:
    """Fault: a snapshot create paused past STALE_AFTER (SIGSTOP, a frozen VM, a clock ahead) has its
    shared lock removed as stale; a GC then takes the exclusive lock and sweeps the packs the paused
    capture wrote but no snapshot named. Resumed, the capture committed a snapshot whose chunks were
    gone (it does not re-check them: its lock was to keep them). It now finds its lock gone and
    refuses: one line, exit 1, nothing committed; the repository verifies clean."""
    src, repo, gates = tmp_path / "src", tmp_path / "repo", tmp_path / "gates"
    make_tree(src)
    gates.mkdir()
    init_repo_at(repo, "c", "1")
    (gates / "snapshot-commit").write_text("")
    env = {**__import__("os").environ, "DRSYNC_FAULT_PAUSE": str(gates)}
    paused = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "create", "--repo", str(repo),
                               "--source", str(src)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: (gates / "snapshot-commit.reached").exists() or paused.poll() is not None,
                  "the capture to reach its commit")
        assert paused.poll() is None, paused.communicate()
        # What another locker does with a lock it judges stale (here: the operator's --all).
        assert run_drsync("repo", "unlock", "--all", "--repo", repo).code == 0
        gc = run_drsync("repo", "gc", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
        assert gc.code == 0, gc.err
        (gates / "snapshot-commit").unlink()
        out, err = paused.communicate(timeout=120)
    finally:
        if paused.poll() is None:
            paused.kill()
    assert paused.returncode == 1, (out, err)
    assert "lock of this operation was removed by another process" in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    listed = run_drsync("snapshot", "list", "--repo", repo, "--json")
    assert listed.code == 0 and json.loads(listed.out) == [], listed.out
    verify = run_drsync("repo", "verify", "--repo", repo)
    assert verify.code == 0, verify.out + verify.err


def test_a_refresh_never_writes_back_a_lock_another_process_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: the holder's refresh rewrote its lock file after another process had removed it as
    stale, so two conflicting holders each saw a valid lock. The refresh now marks the lock lost,
    writes nothing, and verify() refuses."""
    import drsync.repository.lock as lock_mod

    monkeypatch.setattr(lock_mod, "REFRESH_EVERY", 0.01)
    s = MemoryStorage()
    lock = RepositoryLock(s, exclusive=False).acquire()
    try:
        lock.verify()  # held: nothing to say
        s.delete(lock.name)
        wait_for(lambda: lock.lost, "the refresh to notice")
        assert not s.exists(lock.name)
        with RepositoryLock(s, exclusive=True):  # the other process's lock: taken, not contested
            assert [x.exclusive for x in read_locks(s)] == [True]
        with pytest.raises(LockedError, match="removed by another process"):
            lock.verify()
    finally:
        lock.release()
    assert read_locks(s) == []


def test_a_root_nested_in_another_agents_root_through_a_bind_mount_is_refused(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                             mounts) -> None:
    """Two agents never serve nested locations: a standby root inside production's, spelled through a bind
    mount of production's root, would have its apply write over part of production. It is refused the same
    as the plain path (both ways round), and a sibling that only shares a prefix is not."""
    from drsync.agent.locks import HostLock
    from drsync.errors import OperationFailed

    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(tmp_path))
    prod = tmp_path / "prod"
    (prod / "part").mkdir(parents=True)
    mounts.bind(prod, tmp_path / "alias")
    first = HostLock("data root", str(prod), str(tmp_path / "state-one"))
    try:
        for inner in (tmp_path / "alias" / "part", tmp_path / "alias" / "part" / "not-yet"):
            with pytest.raises(OperationFailed) as refused:
                HostLock("data root", str(inner), str(tmp_path / "state-two"))
            assert "lies inside data root" in str(refused.value), refused.value
        HostLock("data root", str(tmp_path / "prod-sibling"), str(tmp_path / "state-two")).release()
    finally:
        first.release()
    inner_lock = HostLock("data root", str(prod / "part"), str(tmp_path / "state-one"))
    try:
        with pytest.raises(OperationFailed) as refused:
            HostLock("data root", str(tmp_path / "alias"), str(tmp_path / "state-two"))
        assert "lies around data root" in str(refused.value), refused.value
    finally:
        inner_lock.release()
