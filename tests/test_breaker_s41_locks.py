"""Hostile tests (s41): lost repository locks, old-format locks, DRSYNC_LOCK_WAIT, config check --timeout
against HDFS endpoints. Tests named test_s41_holds_* are controls that pass; the others show a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drsync.repository import lock as lock_mod
from drsync.repository.lock import RepositoryLock
from drsync.storage.local import LocalStorage
from tests.badnamenode import BadNamenode
from tests.conftest import make_tree, run_drsync
from tests.group import wait_for
from tests.reliability import combinations

PY = sys.executable


def _init(repo: Path) -> None:
    r = run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    assert r.code == 0, r.err


def _popen(*args: str | os.PathLike[str], env: dict[str, str] | None = None, prefix: list[str] | None = None,
           code: str | None = None, err_path: Path | None = None) -> subprocess.Popen[str]:
    cmd = [*(prefix or []), PY, *(["-c", code] if code else ["-m", "drsync"]), *map(str, args)]
    err = open(err_path, "w") if err_path else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=err, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


# --- 1. a lost lock: other commit paths ---------------------------------------------------------------


def test_s41_gc_sweep_whose_exclusive_lock_was_removed_deletes_a_live_captures_packs(tmp_path: Path) -> None:
    """A GC sweep holds the exclusive lock (paused at 'gc', as a long sweep or a frozen VM would be) and its
    lock file is removed ('repo unlock --all', or judged stale). A capture then takes the shared lock and
    writes a full pack (its index not written yet: its post_hook runs). The GC resumes and sweeps anyway:
    it never checks its lock, deletes the capture's unindexed pack as an orphan, and the capture commits a
    snapshot whose pack is gone. Expected: a GC whose lock was lost refuses to sweep (as a capture refuses
    to commit), and the repository stays whole."""
    repo, gates, old, src = tmp_path / "repo", tmp_path / "gates", tmp_path / "old", tmp_path / "src"
    for d in (gates, old, src):
        d.mkdir()
    _init(repo)
    (old / "x.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", old, "--name", "old").code == 0
    assert run_drsync("snapshot", "delete", "--no-prune", "--repo", repo, "old").code == 0  # garbage to sweep
    (src / "big.bin").write_bytes(os.urandom(34 * 1024 * 1024))  # more than one pack (32 MiB)
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {gates}/hook.reached\nwhile [ -e {gates}/hook ]; do sleep 0.02; done\n")
    hook.chmod(0o755)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{src}"\nrepository = "{repo}"\n'
                   f'[snapshots]\npost_hook = "{hook}"\n')
    (gates / "gc").write_text("")
    (gates / "hook").write_text("")
    gc = _popen("repo", "gc", "--repo", repo, env={"DRSYNC_FAULT_PAUSE": str(gates)})
    snap = None
    try:
        wait_for(lambda: (gates / "gc.reached").exists() or gc.poll() is not None, "the GC to reach its sweep")
        assert gc.poll() is None, gc.communicate()
        assert run_drsync("repo", "unlock", "--all", "--repo", repo).code == 0
        snap = _popen("snapshot", "create", "--config", cfg)
        wait_for(lambda: (gates / "hook.reached").exists() or snap.poll() is not None, "the capture's post_hook")
        assert snap.poll() is None, snap.communicate()
        (gates / "gc").unlink()
        gc_out, gc_err = gc.communicate(timeout=300)
        (gates / "hook").unlink()
        snap_out, _ = snap.communicate(timeout=300)
    finally:
        for p in (gc, snap):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    verify = run_drsync("repo", "verify", "--repo", repo)
    assert verify.code == 0, (f"GC exit {gc.returncode} ({gc_out.strip()} {gc_err.strip()}); capture exit "
                              f"{snap.returncode} ({snap_out.strip()}); then repo verify exit {verify.code}: "
                              f"{verify.err.strip()[-300:]}")


def test_s41_transient_error_on_the_locks_dir_marks_a_live_lock_lost(tmp_path: Path) -> None:
    """Nobody touches the lock: the locks directory is unreadable for a moment (here: mode 000 for a drsync
    without CAP_DAC_OVERRIDE; on NFS an ESTALE or EIO does the same). LocalStorage.exists() is
    os.path.exists, which answers False for any error, so the refresh takes its own lock for removed, marks
    it lost for good (even once the directory is back) and the capture refuses to commit, saying another
    process removed a lock file that is still there. Expected: a failed refresh is retried (as the code says
    it is) and the capture commits."""
    repo, gates, src = tmp_path / "repo", tmp_path / "gates", tmp_path / "src"
    gates.mkdir()
    make_tree(src, files=5, big=0)
    _init(repo)
    (gates / "snapshot-commit").write_text("")
    code = ("import sys, drsync.repository.lock as L; L.REFRESH_EVERY = 0.05\n"
            "from drsync.cli.entry import main; sys.exit(main(sys.argv[1:]))")
    err_path = tmp_path / "stderr"
    nocaps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    p = _popen("snapshot", "create", "--repo", repo, "--source", src, env={"DRSYNC_FAULT_PAUSE": str(gates)},
               prefix=nocaps, code=code, err_path=err_path)
    locks = repo / "locks"
    try:
        wait_for(lambda: (gates / "snapshot-commit.reached").exists() or p.poll() is not None, "the commit point")
        assert p.poll() is None, (p.communicate(), err_path.read_text())
        held = os.listdir(locks)
        assert len(held) == 1
        locks.chmod(0o000)
        try:  # a refresh runs and fails while the directory is unreadable: said once, retried
            wait_for(lambda: "could not refresh" in err_path.read_text() or p.poll() is not None,
                     "a refresh to fail while the directory is unreadable", timeout=30)
        finally:
            locks.chmod(0o755)
        wait_for(lambda: "is refreshed again" in err_path.read_text() or p.poll() is not None,
                 "a refresh to work again once the directory is back", timeout=30)
        assert "was removed by another process" not in err_path.read_text()
        assert os.listdir(locks) == held  # the lock file was never removed
        (gates / "snapshot-commit").unlink()
        p.communicate(timeout=120)
    finally:
        locks.chmod(0o755)
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err_path.read_text()
    assert p.returncode == 0, f"exit {p.returncode}; its lock file was there all along; stderr: {err.strip()}"


def test_s41_refresh_writes_back_a_lock_removed_between_its_check_and_its_write(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    """The refresh checked exists() and then rewrote the file (a temp file, fsync, rename): another
    process that removed the lock as stale between the two (a holder resumed after a pause longer than
    30 minutes meets a locker cleaning up) saw it written back, and the holder went on refreshing it
    (lost stayed False). The refresh now only touches the file, which never creates it: the removal is
    made at the last moment before the refresh's own storage call, and the file stays gone, the lock lost."""
    monkeypatch.setattr(lock_mod, "REFRESH_EVERY", 0.01)
    removed = threading.Event()

    class Racing(LocalStorage):
        armed = False

        def touch(self, name: str) -> None:
            if self.armed and name.startswith("locks/"):
                self.armed = False
                os.unlink(self._path(name))  # the other locker removes it now, judging it stale
                removed.set()
            super().touch(name)

    s = Racing(tmp_path / "repo", create=True)
    lock = RepositoryLock(s, exclusive=True).acquire()
    path = Path(s._path(lock.name))
    try:
        s.armed = True
        wait_for(removed.is_set, "the removal")
        wait_for(lambda: path.exists() or lock.lost, "the next refresh")
        assert not path.exists(), f"the removed lock file was written back; lost={lock.lost}"
        assert lock.lost
    finally:
        lock.release()


# --- 2. locks that can never be removed --------------------------------------------------------------


def test_s41_unlock_all_cannot_remove_a_lock_file_named_with_a_backslash(tmp_path: Path) -> None:
    """A stray file 'locks/a\\b.json' (a legal POSIX name: copied in, a tool's temp file) blocked as an
    unreadable lock, and drsync said to remove it with 'repo unlock --all'; that command failed with an
    internal error (ValueError: invalid storage name), as did every locker once it was 30 minutes old.
    A name the storage cannot address is not listed now: ignored, exit 0."""
    repo = tmp_path / "repo"
    _init(repo)
    (repo / "locks").mkdir(exist_ok=True)
    stray = repo / "locks" / "a\\b.json"
    stray.write_bytes(b"")
    make_tree(tmp_path / "src")
    r = run_drsync("repo", "unlock", "--all", "--repo", repo)
    assert r.code == 0, (r.code, r.err.strip())
    # No read could address it, so it is no lock: ignored (left where it is), never blocking.
    ok = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "src", env={"DRSYNC_LOCK_WAIT": "0"})
    assert ok.code == 0, ok.err


def test_s41_unlock_all_hangs_on_a_fifo_in_the_locks_directory(tmp_path: Path) -> None:
    """A fifo under locks/ is listed as a lock file and opened for reading, which blocks until a writer
    opens it: 'repo unlock --all' (and every locker: snapshot create, gc, restore) hangs forever.
    A file that is not a regular file is not listed now (and a read of one is refused, never blocks)."""
    repo = tmp_path / "repo"
    _init(repo)
    (repo / "locks").mkdir(exist_ok=True)
    fifo = repo / "locks" / "x.json"
    os.mkfifo(fifo)
    try:
        r = run_drsync("repo", "unlock", "--all", "--repo", repo, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("'drsync repo unlock --all' still ran after 60 s: it blocks opening the fifo locks/x.json")
    assert r.code == 0, r.err
    # Not a file: no lock, ignored by every locker (left where it is).
    make_tree(tmp_path / "src")
    try:
        ok = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "src", timeout=120,
                        env={"DRSYNC_LOCK_WAIT": "0"})
    except subprocess.TimeoutExpired:
        pytest.fail("'drsync snapshot create' blocked on the fifo locks/x.json")
    assert ok.code == 0, ok.err


# --- 4. config check --timeout against HDFS --------------------------------------------------------


def _hdfs_config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "webhdfs://127.0.0.1:{port}/data"\n'
                   f'repository = "hdfs://127.0.0.1:{port}/repo"\n[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    return cfg


def test_s41_config_check_hangs_on_a_namenode_that_trickles_its_answer(tmp_path: Path) -> None:
    """A namenode (or a proxy before it) that answers slowly, a byte at a time: each read is within the
    socket timeout, so --timeout never ends the request. 'config check --timeout 1' with 13 checks should be
    over in seconds; it runs for as long as the namenode keeps trickling (forever here; 249 s for a 270-byte
    answer at 2 bytes/s). Expected: bounded by --timeout for the data root and repository checks too."""
    nn = BadNamenode("trickle")
    try:
        try:
            r = run_drsync("config", "check", "--config", _hdfs_config(tmp_path, nn.port), "--timeout", "1",
                           timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("'drsync config check --timeout 1' was still running after 90 s (a trickling namenode)")
    finally:
        nn.close()
    assert r.code == 1, r.err


def test_s41_holds_config_check_bounded_by_timeout_for_a_black_holed_namenode(tmp_path: Path) -> None:
    nn = BadNamenode("blackhole")
    try:
        r = run_drsync("config", "check", "--config", _hdfs_config(tmp_path, nn.port), "--timeout", "1",
                       "--json", timeout=120)
    finally:
        nn.close()
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and r.err.count("\n") == 1, r.err
    doc = r.json()
    checks = doc["checks"] if isinstance(doc, dict) else doc
    failed = {c["name"] for c in checks if not c["ok"] and not c.get("warn")}
    assert {"data root", "repository"} <= failed, checks


def test_s41_holds_config_check_unreachable_namenode_one_line_per_check(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    r = run_drsync("config", "check", "--config", _hdfs_config(tmp_path, port), "--timeout", "1", timeout=120)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    rows = [line for line in r.out.splitlines() if line.startswith(("data root ", "repository "))]
    assert len(rows) == 2 and all(" FAIL " in row for row in rows), r.out


# --- 3. DRSYNC_LOCK_WAIT ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "command"), combinations(
    ["1_0", " 5 ", "1e3", "-1", "nan", "inf", "\uff15", "\u0663", "0x10", "+5", "5.", "", "5\n", "9" * 400],
    [("repo", "unlock", "--repo", "/nonexistent"), ("snapshot", "list"), ("config", "check", "--config",
                                                                          "/nonexistent.toml"), ("status",)]))
def test_s41_holds_lock_wait_refuses_what_is_not_plain_decimal(value: str, command: tuple[str, ...]) -> None:
    r = run_drsync(*command, env={"DRSYNC_LOCK_WAIT": value})
    assert r.code == 2 and "DRSYNC_LOCK_WAIT" in r.err and r.err.count("\n") == 1, (r.code, r.err)
    assert "Traceback" not in r.err


# --- holds: lost locks and old-format locks ------------------------------------------------------------


def test_s41_holds_capture_refuses_to_commit_after_unlock_all(tmp_path: Path) -> None:
    repo, gates, src = tmp_path / "repo", tmp_path / "gates", tmp_path / "src"
    gates.mkdir()
    make_tree(src, files=5, big=1)
    _init(repo)
    (gates / "snapshot-commit").write_text("")
    p = _popen("snapshot", "create", "--repo", repo, "--source", src, env={"DRSYNC_FAULT_PAUSE": str(gates)})
    try:
        wait_for(lambda: (gates / "snapshot-commit.reached").exists() or p.poll() is not None, "the commit point")
        assert p.poll() is None, p.communicate()
        assert run_drsync("repo", "unlock", "--all", "--repo", repo).code == 0
        (gates / "snapshot-commit").unlink()
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1 and err.count("\n") == 1 and "removed by another process" in err, err
    assert json.loads(run_drsync("snapshot", "list", "--repo", repo, "--json").out) == []
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    assert os.listdir(repo / "locks") == []  # nothing written back


def test_s41_holds_repeated_acquire_release_of_one_lock_object(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock_mod, "REFRESH_EVERY", 0.01)
    s = LocalStorage(tmp_path / "repo", create=True)
    lock = RepositoryLock(s, exclusive=True)
    for _ in range(5):
        lock.acquire()
        name = lock.name
        wait_for(lambda n=name: json.loads(Path(s._path(n)).read_text())["refreshed"] > lock._created, "a refresh")
        lock.verify()
        assert not lock.lost
        lock.release()
        assert not Path(s._path(name)).exists()
    assert os.listdir(tmp_path / "repo" / "locks") == []


def _old_lock(repo: Path, pid: int) -> Path:
    (repo / "locks").mkdir(exist_ok=True)
    path = repo / "locks" / "0123456789abcdef0123456789abcdef.json"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "exclusive": True, "command": "drsync gc",
                                "created": time.time(), "refreshed": time.time()}))  # no start, no pidns
    return path


def test_s41_holds_old_format_lock_survives_unlock_from_a_container(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _init(repo)
    holder = subprocess.Popen(["sleep", "600"])
    try:
        path = _old_lock(repo, holder.pid)
        for pid in (1, 2, 3, holder.pid):  # also a pid the container's own processes have
            path.write_text(path.read_text().replace(f'"pid": {json.loads(path.read_text())["pid"]}',
                                                     f'"pid": {pid}'))
            r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", PY, "-m", "drsync", "repo", "unlock",
                                "--repo", str(repo)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert path.exists(), f"pid {pid}: removed from a container: {r.stdout}"
        r2 = run_drsync("repo", "unlock", "--repo", repo)  # the host: the holder lives
        assert r2.code == 0 and path.exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_drsync("repo", "unlock", "--repo", repo).code == 0  # the host: now gone
    assert not path.exists()
