"""Hostile tests (s41b): lock refresh by touch (HDFS SETTIMES), listings that leave out what is not an object,
config check bounded per check. Tests named test_s41b_holds_* are controls that pass; the others show a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.badnamenode import BadNamenode
from tests.conftest import make_tree, run_drsync
from tests.group import wait_for
from tests.test_clock_skew import faketime_env

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
# A drsync whose lock refresh runs every 0.2 s (not every 5 minutes), so a refresh happens during a test.
FAST_REFRESH = ("import sys, drsync.repository.lock as L; L.REFRESH_EVERY = 0.2\n"
                "from drsync.cli.entry import main; sys.exit(main(sys.argv[1:]))")


def _init(repo: Path | str) -> None:
    r = run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    assert r.code == 0, r.err


def _popen(*args: str | os.PathLike[str], env: dict[str, str] | None = None, code: str | None = None,
           err_path: Path | None = None) -> subprocess.Popen[str]:
    cmd = [PY, *(["-c", code] if code else ["-m", "drsync"]), *map(str, args)]
    err = open(err_path, "w") if err_path else subprocess.PIPE  # noqa: SIM115
    return subprocess.Popen(cmd, env=env if env is not None else dict(os.environ), stdout=subprocess.PIPE,
                            stderr=err, text=True, cwd=ROOT)


def _stop(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def _snapshot(repo: Path, src: Path) -> None:
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src)
    assert r.code == 0, r.err


# --- 1. lock refresh by touch: HDFS SETTIMES takes the holder's clock ----------------------------------------


def _hdfs_lock_nodes(cluster, repo_path: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Lock file name -> its modification time (ms) on the test namenode."""
    with cluster.lock:
        try:
            locks = cluster._resolve(f"{repo_path}/locks")
        except Exception:
            return {}
        return {n: c.mtime_ms for n, c in locks.children.items() if c.type == "FILE"}


def test_s41b_hdfs_refresh_by_settimes_makes_a_live_lock_stale_when_the_holders_clock_is_behind(
        tmp_path: Path, fake_webhdfs) -> None:  # type: ignore[no-untyped-def]
    """A capture on a host whose clock is 40 minutes behind holds a shared lock on an HDFS repository
    (paused at snapshot-commit: a long upload) and refreshes it. The refresh used to rewrite the lock file,
    so its HDFS modification time was the namenode's clock; now it is SETTIMES with modificationtime =
    the holder's time.time(), so the file's "storage time" is the holder's clock, 40 minutes old at once.
    Any other locker (here 'repo unlock', with a correct clock) judges the live, refreshing lock stale and
    removes it, and the capture fails at its commit ("removed by another process"), although it refreshed
    every time. Now SETTIMES carries the namenode's time (the Date of its answer to a status asked just
    before): a holder that refreshes is never judged stale by the storage's time."""
    repo_path = f"{fake_webhdfs.test_dir}/repo"
    repo = fake_webhdfs.url(repo_path)
    src, gates = tmp_path / "src", tmp_path / "gates"
    gates.mkdir()
    make_tree(src, files=5, big=0)
    _init(repo)
    (gates / "snapshot-commit").write_text("")
    env = {**faketime_env(-40 * 60), "DRSYNC_FAULT_PAUSE": str(gates)}
    err_path = tmp_path / "holder.err"
    holder = _popen("snapshot", "create", "--repo", repo, "--source", src, env=env, code=FAST_REFRESH,
                    err_path=err_path)
    try:
        wait_for(lambda: (gates / "snapshot-commit.reached").exists() or holder.poll() is not None,
                  "the capture to reach its commit")
        assert holder.poll() is None, (holder.communicate(), err_path.read_text())
        # A refresh has touched the file (its time moved): with the holder's own clock, 40 minutes behind,
        # it was stale at once; with the namenode's (the Date of its answers), it is fresh.
        first = _hdfs_lock_nodes(fake_webhdfs, repo_path)
        wait_for(lambda: any(ms != first.get(name) for name, ms in
                              _hdfs_lock_nodes(fake_webhdfs, repo_path).items()),
                  "a refresh (SETTIMES) of the holder's lock", timeout=60)
        before = set(_hdfs_lock_nodes(fake_webhdfs, repo_path))
        r = run_drsync("repo", "unlock", "--repo", repo)
        after = set(_hdfs_lock_nodes(fake_webhdfs, repo_path))
        (gates / "snapshot-commit").unlink()
        holder.communicate(timeout=120)
    finally:
        _stop(holder)
    err = err_path.read_text()
    assert after == before and holder.returncode == 0, (
        f"the live capture's lock (refreshed every 0.2 s) was removed as stale by 'repo unlock' "
        f"({r.out.strip()!r}); the capture exited {holder.returncode}: {err.strip()[-300:]}")


# --- 2. listings that leave out what is not an object ---------------------------------------------------------


@pytest.mark.parametrize("target", ["fifo", "dir", "/dev/zero"])
def test_s41b_symlink_in_locks_to_a_fifo_device_or_directory_wedges_the_repository(tmp_path: Path,
                                                                                    target: str) -> None:
    """A fifo under locks/ is ignored (not an object), but a symlink to one is listed (S_ISLNK is kept)
    and its read is refused with IntegrityError, which read_locks does not catch: every locker (snapshot
    create, restore, gc), 'repo verify' (which the message itself advises) and 'repo unlock --all' (the
    documented way to remove a damaged lock) all exit 3, for ever. Same for a symlink to /dev/zero or to a
    directory. Expected: such an entry is ignored like the fifo itself, or treated as an unreadable lock that
    'repo unlock --all' removes; never an error no command can clear."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=3, big=0)
    _init(repo)
    (repo / "locks").mkdir(exist_ok=True)
    if target == "fifo":
        dest = tmp_path / "fifo"
        os.mkfifo(dest)
    elif target == "dir":
        dest = tmp_path / "somedir"
        dest.mkdir()
    else:
        dest = Path(target)
    os.symlink(dest, repo / "locks" / "0123456789abcdef0123456789abcdef.json")
    unlock = run_drsync("repo", "unlock", "--all", "--repo", repo, timeout=120)
    create = run_drsync("snapshot", "create", "--repo", repo, "--source", src, timeout=120,
                        env={"DRSYNC_LOCK_WAIT": "0"})
    verify = run_drsync("repo", "verify", "--repo", repo, timeout=120)
    assert unlock.code == 0 and create.code == 0 and verify.code == 0, (
        f"unlock --all exit {unlock.code} ({unlock.err.strip()}); snapshot create exit {create.code} "
        f"({create.err.strip()}); repo verify exit {verify.code} ({verify.err.strip()})")


def test_s41b_gc_deletes_every_live_pack_when_an_index_file_is_a_fifo(tmp_path: Path) -> None:
    """An index file of a repository became a fifo (a damaged repository; 'repo verify' rightly exits 3).
    The index listing now leaves the fifo out, so 'repo gc' sees every pack as unindexed (an orphan), deletes
    them all and exits 0 ("1 packs deleted"): the only snapshot's data is gone for good, even once the
    index file is restored. Before, the listing named the fifo and GC stopped. Expected: GC refuses (exit 3,
    nothing deleted) when a snapshot references chunks no index row names, or when the index directory holds
    something it cannot read."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=5, big=1)
    _init(repo)
    _snapshot(repo, src)
    (index,) = (repo / "index").iterdir()
    saved = tmp_path / "index.saved"
    index.rename(saved)
    os.mkfifo(index)
    packs_before = sorted(p.name for p in (repo / "packs").rglob("*.pack"))
    gc = run_drsync("repo", "gc", "--repo", repo, timeout=120)
    packs_after = sorted(p.name for p in (repo / "packs").rglob("*.pack"))
    index.unlink()
    saved.rename(index)  # the index file restored: the repository would be whole again
    verify = run_drsync("repo", "verify", "--repo", repo, timeout=120)
    assert packs_after == packs_before and verify.code == 0, (
        f"gc exit {gc.code} ({gc.out.strip()} {gc.err.strip()}); packs {packs_before} -> {packs_after}; "
        f"with the index file restored, repo verify exit {verify.code}: {verify.err.strip()[-200:]}")


def test_s41b_gc_deletes_every_live_pack_when_an_index_file_has_a_backslash_name(tmp_path: Path) -> None:
    """Same with an index file whose name the storage refuses (a backslash: a copy made by a Windows tool,
    an operator's rename): left out of the listing, so GC deletes the packs only it indexed. Expected: GC
    refuses to delete packs that a snapshot references."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=5, big=1)
    _init(repo)
    _snapshot(repo, src)
    (index,) = (repo / "index").iterdir()
    odd = index.with_name("a\\" + index.name)
    index.rename(odd)
    packs_before = sorted(p.name for p in (repo / "packs").rglob("*.pack"))
    gc = run_drsync("repo", "gc", "--repo", repo, timeout=120)
    packs_after = sorted(p.name for p in (repo / "packs").rglob("*.pack"))
    odd.rename(index)
    verify = run_drsync("repo", "verify", "--repo", repo, timeout=120)
    assert packs_after == packs_before and verify.code == 0, (
        f"gc exit {gc.code} ({gc.out.strip()} {gc.err.strip()}); packs {packs_before} -> {packs_after}; "
        f"with the index file renamed back, repo verify exit {verify.code}: {verify.err.strip()[-200:]}")


# --- holds ---------------------------------------------------------------------------------------------------


def test_s41b_holds_fifo_pack_is_reported_kept_and_refused(tmp_path: Path) -> None:
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=5, big=1)
    _init(repo)
    _snapshot(repo, src)
    (pack,) = (repo / "packs").rglob("*.pack")
    pack.unlink()
    os.mkfifo(pack)
    verify = run_drsync("repo", "verify", "--repo", repo, timeout=120)
    assert verify.code == 3 and "missing" in verify.out + verify.err, verify.err
    gc = run_drsync("repo", "gc", "--repo", repo, timeout=120)
    assert gc.code == 0 and pack.exists(), gc.err
    restore = run_drsync("snapshot", "restore", "--repo", repo, "latest", "--target", tmp_path / "out", timeout=120)
    assert restore.code == 3 and "pipe" in restore.err and "Traceback" not in restore.err, restore.err


def test_s41b_holds_odd_byte_names_in_the_repository(tmp_path: Path) -> None:
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=3, big=0)
    _init(repo)
    _snapshot(repo, src)
    b = os.fsencode(repo)
    for rel in (b"/locks/\xff\xfe.json", b"/locks/a\nb.json", b"/locks/" + b"l" * 250 + b".json"):
        with open(b + rel, "wb") as f:
            f.write(b"garbage")
    os.makedirs(b + b"/packs/zz", exist_ok=True)
    with open(b + b"/packs/zz/\xff.pack", "wb") as f:
        f.write(b"x")
    unlock = run_drsync("repo", "unlock", "--all", "--repo", repo, timeout=120)
    assert unlock.code == 0 and "Traceback" not in unlock.err, unlock.err
    assert os.listdir(repo / "locks") == []
    gc = run_drsync("repo", "gc", "--repo", repo, timeout=120)  # the odd pack is an orphan: removed
    assert gc.code == 0 and not os.path.exists(b + b"/packs/zz/\xff.pack"), gc.err
    assert run_drsync("repo", "verify", "--repo", repo, timeout=120).code == 0


def test_s41b_holds_plain_fifo_and_socket_in_locks_are_ignored(tmp_path: Path) -> None:
    repo, src = tmp_path / "repo", tmp_path / "src"
    make_tree(src, files=3, big=0)
    _init(repo)
    (repo / "locks").mkdir(exist_ok=True)
    os.mkfifo(repo / "locks" / "f.json")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(repo / "locks" / "s.json"))
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, timeout=120,
                       env={"DRSYNC_LOCK_WAIT": "0"})
        assert r.code == 0, r.err
    finally:
        s.close()


def test_s41b_holds_capture_with_fast_refresh_commits_on_local_repository(tmp_path: Path) -> None:
    """Local: the touch is the kernel's time, so a holder with a clock 40 minutes behind is not stale."""
    repo, src, gates = tmp_path / "repo", tmp_path / "src", tmp_path / "gates"
    gates.mkdir()
    make_tree(src, files=3, big=0)
    _init(repo)
    (gates / "snapshot-commit").write_text("")
    # libfaketime fakes the time utimensat(NULL) sets unless FAKE_UTIME=1 (this build, checked by hand): the
    # kernel's (or an NFS server's) time, as for a real holder on a host whose clock is behind.
    env = {**faketime_env(-40 * 60), "FAKE_UTIME": "1", "DRSYNC_FAULT_PAUSE": str(gates)}
    holder = _popen("snapshot", "create", "--repo", repo, "--source", src, env=env, code=FAST_REFRESH)
    try:
        wait_for(lambda: (gates / "snapshot-commit.reached").exists() or holder.poll() is not None, "commit point")
        assert holder.poll() is None, holder.communicate()
        (lock,) = (repo / "locks").iterdir()
        m0 = lock.stat().st_mtime
        wait_for(lambda: lock.stat().st_mtime > m0, "a refresh", timeout=30)
        r = run_drsync("repo", "unlock", "--repo", repo)
        assert r.code == 0 and lock.exists(), r.out
        (gates / "snapshot-commit").unlink()
        _, err = holder.communicate(timeout=120)
    finally:
        _stop(holder)
    assert holder.returncode == 0, err
    assert len(json.loads(run_drsync("snapshot", "list", "--repo", repo, "--json").out)) == 1


# --- 3. config check against odd endpoints and paths ----------------------------------------------------------


def _config(tmp_path: Path, data: str, repository: str) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{repository}"\n'
                   f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    return cfg


def _check_rows(out: str) -> dict[str, str]:
    return {name: line for line in out.splitlines()
            for name in ("data root", "repository") if line.startswith(name + " ")}


def test_s41b_config_check_calls_a_data_root_on_a_failing_namenode_missing(tmp_path: Path) -> None:
    """A namenode answers the data root's GETFILESTATUS with 500 RemoteException IOException (a disk failed):
    config check says "data root hdfs://.../data does not exist" (status(strict=False) turns every error
    answer into None), sending the operator to create a directory that exists. The repository check on the
    same namenode reports the IOException rightly. Expected: the data root row names the namenode's error."""
    r = _check_against(tmp_path, "ioerror")
    rows = _check_rows(r.out)
    assert r.code == 1 and " FAIL " in rows.get("data root", ""), r.out
    assert "does not exist" not in rows["data root"] and "IOException" in rows["data root"], rows["data root"]


def _check_against(tmp_path: Path, mode: str):  # type: ignore[no-untyped-def]
    """``config check --timeout 1`` with data root and repository on a namenode answering in ``mode``."""
    nn = BadNamenode(mode)
    try:
        return run_drsync("config", "check", "--config", _config(tmp_path, f"webhdfs://127.0.0.1:{nn.port}/data",
                                                                f"hdfs://127.0.0.1:{nn.port}/repo"),
                          "--timeout", "1", timeout=120)
    finally:
        nn.close()


@pytest.mark.parametrize("mode", ["redirect", "garbage", "endless"])
def test_s41b_holds_config_check_odd_namenodes_bounded_one_line_each(tmp_path: Path, mode: str) -> None:
    r = _check_against(tmp_path, mode)
    assert r.code == 1 and "Traceback" not in r.err and r.err.count("\n") == 1, r.err
    rows = _check_rows(r.out)
    assert set(rows) == {"data root", "repository"} and all(" FAIL " in v for v in rows.values()), r.out


def test_s41b_holds_config_check_fifo_and_device_paths(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    repo = tmp_path / "repo"
    repo.mkdir()
    os.mkfifo(repo / "config.json")
    src = tmp_path / "src"
    make_tree(src, files=2, big=0)
    for data, repository in ((str(fifo), str(repo)), ("/dev/null", "/dev/zero"), (str(src), str(fifo))):
        r = run_drsync("config", "check", "--config", _config(tmp_path, data, repository), "--timeout", "1",
                       timeout=120)
        assert r.code == 1 and "Traceback" not in r.err and r.err.count("\n") == 1, (data, repository, r.err)
        assert " FAIL " in _check_rows(r.out)["repository"], r.out
