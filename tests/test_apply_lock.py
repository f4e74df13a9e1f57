"""One apply at a time onto a target (safety rule 2): a second restore onto a target another is writing to,
or onto a directory inside or around it, through another spelling, a symlink, a bind mount or another lock
directory, is refused at once with the other's pid, and changes nothing; the first completes exactly.

The first restore is a real process held still at the ``apply-staged`` pause point (drsync.faults: its
files staged and flushed, no journal yet), as a restore of a huge snapshot would be; the others run
while it is held. Before the lock, the second emptied the first's staging area and the first failed,
leaving a target that matched neither snapshot (breaker s51).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.errors import OperationFailed
from drsync.flocks import ApplyBusy, ApplyLock, unline
from tests.conftest import init_repo_at, make_tree, run_drsync, snapshot_json, tree_state, write_files
from tests.group import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Held:
    """A restore process held at ``apply-staged``: started, and waited for until it is there."""

    def __init__(self, tmp: Path, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
        self.gates = tmp / f"gates-{len(list(tmp.glob('gates-*')))}"
        self.gates.mkdir()
        (self.gates / "apply-staged").write_text("")
        self.proc = subprocess.Popen([sys.executable, "-m", "drsync", *map(str, args)], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {}), "DRSYNC_FAULT_PAUSE": str(self.gates)})
        wait_for(lambda: (self.gates / "apply-staged.reached").exists() or self.proc.poll() is not None,
                 "the first restore to stage its files")
        assert self.proc.poll() is None, self.proc.communicate()

    def finish(self) -> tuple[int, str]:
        (self.gates / "apply-staged").unlink()
        _, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A repository with two snapshots of one tree: (repository, first id, second id)."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    init_repo_at(repo, "east", "6.2.1")
    make_tree(src, files=20, big=1)
    first = snapshot_json(repo, src)["id"]
    write_files(src, {"catalog/f000.txt": "the second version\n", "new/only-in-second.txt": "new\n"})
    (src / "catalog" / "f001.txt").unlink()
    second = snapshot_json(repo, src)["id"]
    yield repo, first, second


def _restore(repo: Path, snap: str, target: Path | str, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target, "--overwrite",
                      "--delete-extra", *extra, env=env)


def _expected(tmp: Path, repo: Path, snap: str) -> dict[str, tuple]:
    ref = tmp / f"ref-{snap}"
    if not ref.exists():
        assert _restore(repo, snap, ref).code == 0
    return tree_state(ref)


def test_a_second_restore_onto_a_target_being_restored_is_refused_and_the_first_completes(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    want = _expected(tmp_path, repo, second)
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    try:
        staged_before = sorted(p.name for p in (target / ".drsync-staging").rglob("*"))
        assert staged_before, "the first restore stages into the target"
        # the same target, spelled three ways: as given, with a trailing "/.", through a symlink
        link = tmp_path / "link-to-target"
        link.symlink_to(target)
        for spelled in (target, f"{target}/.", link):
            r = _restore(repo, first, spelled)
            assert r.code == 1, (spelled, r.code, r.err)
            assert f"pid {held.proc.pid}" in r.err and "another drsync apply" in r.err, r.err
            assert "nothing was changed" in r.err and "Traceback" not in r.err
            assert len(r.err.strip().splitlines()) == 1, r.err
        # nothing of the first's staging area was touched
        assert sorted(p.name for p in (target / ".drsync-staging").rglob("*")) == staged_before
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == want
    assert not (target / ".drsync-staging").exists()
    # the lock is gone with the apply: the next restore goes ahead
    assert _restore(repo, first, target).code == 0
    assert tree_state(target) == _expected(tmp_path, repo, first)


def test_restores_inside_or_around_a_target_being_restored_are_refused_and_others_go_ahead(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    outer = tmp_path / "outer"
    target = outer / "target"
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target)
    try:
        for other, word in ((target / "catalog", "lies inside"), (target / "not-yet" / "deeper", "lies inside"),
                            (outer, "holds"), (tmp_path, "holds")):
            r = _restore(repo, first, other)
            assert r.code == 1, (other, r.err)
            assert word in r.err and f"pid {held.proc.pid}" in r.err, r.err
        assert not (target / "not-yet").exists() and sorted(os.listdir(outer)) == ["target"]
        # a sibling is another target: it goes ahead while the first is held
        sibling = tmp_path / "sibling"
        assert _restore(repo, first, sibling).code == 0
        assert tree_state(sibling) == _expected(tmp_path, repo, first)
        # a dry run is not refused: it says another apply is writing there
        dry = _restore(repo, first, target, "--dry-run", "--json")
        assert dry.code == 0, dry.err
        assert any("another drsync apply" in w and str(held.proc.pid) in w for w in dry.json()["warnings"]), dry.out
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_another_lock_directory_or_a_backup_restore_is_refused_by_the_directory_itself(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    """A restore whose host lock directory is another (a container, a systemd unit's own /run/lock, another
    DRSYNC_LOCK_DIR) still finds the target directory flocked; so does a backup restore (every apply path)."""
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    backup = tmp_path / "backup"
    assert run_drsync("backup", "create", "--snapshot", first, "--repo", repo, "--dest", backup).code == 0
    backups = [p for p in backup.iterdir() if p.is_dir()]
    assert len(backups) == 1
    elsewhere = tmp_path / "other-lock-dir"
    elsewhere.mkdir()
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    try:
        r = _restore(repo, first, target, env={"DRSYNC_LOCK_DIR": str(elsewhere)})
        assert r.code == 1 and f"pid {held.proc.pid}" in r.err and "holds" in r.err, r.err
        r = run_drsync("backup", "restore", backups[0], "--target", target, "--overwrite", "--delete-extra")
        assert r.code == 1 and f"pid {held.proc.pid}" in r.err and "another drsync apply" in r.err, r.err
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_a_restore_killed_while_it_holds_the_lock_leaves_no_lock_and_the_next_completes_it(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    repo, first, second = two
    target = tmp_path / "target"
    assert _restore(repo, first, target).code == 0
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target, "--overwrite",
                "--delete-extra")
    held.kill()
    assert held.proc.returncode == -signal.SIGKILL
    r = _restore(repo, second, target)
    assert r.code == 0, r.err
    assert tree_state(target) == _expected(tmp_path, repo, second)


def test_an_agent_is_not_started_on_a_root_a_restore_is_writing_to(tmp_path: Path,
                                                                   two: tuple[Path, str, str]) -> None:
    """The agent's data-root lock and the apply's directory flock are one flock: whichever comes second is
    refused, naming the other's pid."""
    from drsync.agent.locks import HostLock

    repo, first, _second = two
    target = tmp_path / "target"
    held = Held(tmp_path, "snapshot", "restore", first, "--repo", repo, "--target", target)
    try:
        with pytest.raises(OperationFailed, match=f"another drsync apply .*pid {held.proc.pid}.* is writing to"):
            HostLock("data root", str(target), str(tmp_path / "state"))
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    lock = HostLock("data root", str(target), str(tmp_path / "state"))
    try:
        r = run_drsync("snapshot", "restore", first, "--repo", repo, "--target", target, "--overwrite")
        assert r.code == 1 and f"pid {os.getpid()}" in r.err, r.err
    finally:
        lock.release()


def test_the_apply_lock_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ApplyLock itself: one holder per location, overlaps refused both ways, a released lock leaves no file;
    this process's own flocks are not in its way (an agent's drill restoring into its state directory inside
    its data root), and an agent's own apply (directory=False) takes no directory flock beside its own."""
    from drsync.agent.locks import DirectoryLock

    locks = tmp_path / "locks"
    locks.mkdir()
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(locks))
    a = tmp_path / "a"
    a.mkdir()
    with ApplyLock(str(a), "snapshot one") as held:  # (other processes' overlaps: the tests above)
        assert held.held_target and os.listdir(locks)
        with pytest.raises(ApplyBusy, match="snapshot one"):
            ApplyLock(str(a), "snapshot two")  # one location, one lock file, whoever holds it
    assert os.listdir(locks) == []
    root = DirectoryLock("data root", str(a))
    try:
        (a / "state").mkdir()
        with ApplyLock(str(a / "state" / "drill"), "a drill"):
            pass
        with ApplyLock(str(a), "the agent's apply", directory=False) as own:
            own.hold_directory()  # what an apply that made its target does: nothing, the agent holds it
            assert not own.dir_fds
    finally:
        root.release()
    # names no UTF-8 decoder accepts, or with a newline, are written and read back whole
    for name in (b"odd-\xff-name", b"odd\nx"):
        odd = tmp_path / os.fsdecode(name)
        odd.mkdir()
        with ApplyLock(str(odd), "snapshot four") as held:
            shown = Path(held.path).read_bytes().split(b"\n")[2]
            assert unline(shown.decode("utf-8", "surrogateescape")) == str(odd)
        shutil.rmtree(odd)
    # HDFS targets: by path on one authority (the lock file alone, no directory flock)
    with ApplyLock("hdfs://nn1:9870/warehouse/t?user=etl", "snapshot six") as held:
        assert not held.dir_fds



# --- breaker s52: its cases ----------------------------------------------------------------------------


def test_an_agents_own_apply_onto_its_existing_root_is_not_refused_by_its_own_lock(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    """The agent flocks its data root for its lifetime; its applies (root_held) onto that root, existing
    before the agent started (every restart), took the directory's flock again and refused themselves."""
    from drsync.agent.locks import HostLock
    from drsync.apply import apply_manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    repo_path, first, second = two
    root = tmp_path / "standby-root"
    root.mkdir()
    repo = Repository.open(LocalStorage(str(repo_path)))
    lock = HostLock("data root", str(root), str(tmp_path / "state"))
    try:
        for snap in (first, second):
            manifest = repo.load_manifest(repo.find_snapshot(snap))
            apply_manifest(manifest, repo, str(root), journal=str(tmp_path / "journal"), root_held=True)
        assert tree_state(root) == _expected(tmp_path, repo_path, second)
    finally:
        lock.release()


def _as_nobody(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_link_planted_at_the_lock_name_is_refused_and_what_it_names_is_untouched(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    import hashlib

    repo, first, _ = two
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o1777)
    locks.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "target"
    name = f"drsync-apply-0-{hashlib.sha256(str(target).encode()).hexdigest()[:20]}.lock"
    os.symlink(victim, locks / name)
    r = _restore(repo, first, target, env={"DRSYNC_LOCK_DIR": str(locks)})
    assert r.code == 1 and "is not a regular file" in r.err and str(locks / name) in r.err, r.err
    assert victim.read_text() == "precious\n" and not target.exists()
    os.unlink(locks / name)
    os.mkfifo(locks / name)  # a fifo there neither hangs the restore nor is written
    r = _restore(repo, first, target, env={"DRSYNC_LOCK_DIR": str(locks)})
    assert r.code == 1 and "is not a regular file" in r.err, r.err


def test_another_users_forged_lock_does_not_stop_roots_restores(tmp_path: Path, open_tmp: Path,
                                                                two: tuple[Path, str, str]) -> None:
    """Any user can write a lock file claiming "/" and flock it; only this user's and root's lock files and
    flocks are in the way (another user's flock on a directory it can read is not either)."""
    repo, first, _ = two
    locks = open_tmp / "locks"
    locks.mkdir()
    locks.chmod(0o1777)
    target = open_tmp / "target"
    target.mkdir()
    target.chmod(0o755)
    forged = locks / "drsync-apply-65534-x.lock"
    holder = _as_nobody(
        "import fcntl, os, sys\n"
        f"fd = os.open({str(forged)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'1\\nsnapshot 0000000000000000\\n/\\n')\n"
        f"d = os.open({str(target)!r}, os.O_RDONLY)\n"
        "fcntl.flock(d, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = _restore(repo, first, target, env={"DRSYNC_LOCK_DIR": str(locks)})
        assert r.code == 0, r.err
    finally:
        holder.communicate(input="")
    assert tree_state(target) == _expected(tmp_path, repo, first)


@pytest.mark.parametrize("where", ["parent", "inside"])
def test_an_agent_is_not_started_inside_or_around_a_restore(tmp_path: Path, two: tuple[Path, str, str],
                                                           where: str) -> None:
    from drsync.agent.locks import HostLock

    repo, first, _ = two
    data = tmp_path / "outer" / "data"
    data.mkdir(parents=True)
    restored = data.parent if where == "parent" else data / "common"
    lockdir = tmp_path / "private-locks"  # the agent's lock directory is another: the directory flocks decide
    lockdir.mkdir()
    held = Held(tmp_path, "snapshot", "restore", first, "--repo", repo, "--target", restored, "--overwrite",
                "--delete-extra", env={"DRSYNC_LOCK_DIR": str(lockdir)})
    try:
        with pytest.raises(OperationFailed, match=f"pid {held.proc.pid}"):
            HostLock("data root", str(data), str(tmp_path / "state"))
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()


@pytest.mark.parametrize("second", ["inside", "parent"])
def test_overlapping_restores_with_other_lock_directories_are_refused(tmp_path: Path, two: tuple[Path, str, str],
                                                                      second: str) -> None:
    repo, first, other = two
    t = tmp_path / "t"
    assert _restore(repo, first, t).code == 0
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    l1.mkdir()
    l2.mkdir()
    a_target, b_target = (t, t / "newsub") if second == "inside" else (t / "common", t)
    held = Held(tmp_path, "snapshot", "restore", first, "--repo", repo, "--target", a_target, "--overwrite",
                "--delete-extra", env={"DRSYNC_LOCK_DIR": str(l1)})
    try:
        r = _restore(repo, other, b_target, env={"DRSYNC_LOCK_DIR": str(l2)})
        assert r.code == 1 and f"pid {held.proc.pid}" in r.err and "nothing was changed" in r.err, r.err
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()
    assert not (t / "newsub").exists()


def test_a_full_lock_directory_is_named_and_leaves_no_lock_held(tmp_path: Path, mounts,  # type: ignore[no-untyped-def]
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    locks = tmp_path / "locks"
    mounts.tmpfs(locks)
    monkeypatch.setenv("DRSYNC_LOCK_DIR", str(locks))
    filler = locks / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
    target = tmp_path / "target"
    with pytest.raises(OperationFailed, match=f"cannot write the host lock {locks}/drsync-apply-.*free space"):
        ApplyLock(str(target), "snapshot one")
    filler.unlink()
    with ApplyLock(str(target), "snapshot one"):  # not refused by a lock this process kept
        pass


def test_a_text_dry_run_says_another_apply_is_writing(tmp_path: Path, two: tuple[Path, str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo, first, second = two
    target = tmp_path / "target"
    held = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", target)
    try:
        r = _restore(repo, first, target, "--dry-run")
        assert r.code == 0 and "note: another drsync apply" in r.out and str(held.proc.pid) in r.out, r.out
        # a look takes no lock: it never stands in the way of a real restore starting at that moment
        import fcntl

        def no_flock(*a: object) -> None:
            raise AssertionError("a dry run took a flock")

        monkeypatch.setattr(fcntl, "flock", no_flock)
        assert ApplyLock.probe(str(target)) is not None and ApplyLock.probe(str(tmp_path / "elsewhere")) is None
        monkeypatch.undo()
        code, err = held.finish()
        assert code == 0, err
    finally:
        held.kill()


def test_a_dry_run_reads_the_directory_flocks_it_would_meet(tmp_path: Path) -> None:
    """ApplyLock.probe from /proc/locks alone: another process's exclusive flock on the target or on a directory
    above it is named; a shared one above (an apply beside this target) is not."""
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    code = ("import fcntl, os, sys\n"
            f"fd = os.open({str(top)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, getattr(fcntl, sys.argv[1]))\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n")
    for how, below, at in (("LOCK_EX", True, True), ("LOCK_SH", False, True)):
        holder = subprocess.Popen([sys.executable, "-c", code, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            inside, onto = ApplyLock.probe(str(top / "sub")), ApplyLock.probe(str(top))
            assert (inside is not None) == below and (onto is not None) == at, (how, inside, onto)
            assert onto is not None and f"pid {holder.pid}" in onto
            if inside is not None:
                assert "(a directory above the target)" in inside
        finally:
            holder.communicate(input="")


# --- leftover lock files (s65): an apply killed while it held its lock leaves the file behind ----------------

def test_leftover_lock_files_of_killed_applies_are_cleared_by_the_next_apply_and_held_ones_still_refuse(
        tmp_path: Path, two: tuple[Path, str, str]) -> None:
    """A restore killed with SIGKILL leaves its lock file (unheld); every later apply looked through all of
    them, so on a host where applies were killed over months each look cost more (4,000 leftovers: 70 ms of
    a 200 ms standby commit). The next apply that takes its own lock removes them; a dry run only looks; a
    lock still held keeps its file and still refuses an overlapping restore; another user's file stays."""
    repo, first, second = two
    locks = tmp_path / "locks"
    locks.mkdir()
    env = {"DRSYNC_LOCK_DIR": str(locks)}
    left: list[str] = []
    for name in ("t1", "t2"):
        held = Held(tmp_path, "snapshot", "restore", first, "--repo", repo, "--target", tmp_path / name, env=env)
        mine = set(os.listdir(locks)) - set(left)
        held.kill()
        assert len(mine) == 1 and set(os.listdir(locks)) == mine, "the second restore cleared the first's leftover"
        left = sorted(mine)
    # another user's leftover (anyone can write one in a shared lock directory): not this user's to remove
    theirs = locks / f"{ApplyLock.PREFIX}4242-0123456789abcdef0123.lock"
    theirs.write_text(f"1\nforged\n{tmp_path / 'x'}\n")
    os.chown(theirs, 4242, 4242)
    # a dry run looks and leaves them
    r = _restore(repo, first, tmp_path / "t3", "--dry-run", env=env)
    assert r.code == 0, r.err
    assert sorted(os.listdir(locks)) == sorted([*left, theirs.name])
    # a restore taking its lock elsewhere clears this user's leftover, and holds its own file
    running = Held(tmp_path, "snapshot", "restore", second, "--repo", repo, "--target", tmp_path / "busy", env=env)
    try:
        running_lock = set(os.listdir(locks)) - {theirs.name}
        assert len(running_lock) == 1 and not running_lock & set(left)
        r = _restore(repo, first, tmp_path / "t2", env=env)  # where a killed restore left its lock: goes ahead
        assert r.code == 0, r.err
        assert tree_state(tmp_path / "t2") == _expected(tmp_path, repo, first)
        assert set(os.listdir(locks)) == {*running_lock, theirs.name}  # the held lock's file kept
        r = _restore(repo, first, tmp_path / "busy" / "inside", env=env)
        assert r.code != 0 and f"pid {running.proc.pid}" in r.err, r.err
        code, err = running.finish()
        assert code == 0, err
    finally:
        running.kill()
    assert os.listdir(locks) == [theirs.name]


def test_an_apply_whose_lock_file_is_cleared_while_it_opens_it_takes_its_lock_on_a_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race with a look clearing a leftover: the file an apply opened is flocked and unlinked by the look
    before the apply's own flock. The apply, refused on that file, sees it unlinked and takes its lock on a
    new file, instead of being refused by a lock nobody holds any more. The interleaving is made by a wrapper
    around flock (the real race is microseconds wide); the flocks and the unlink are real."""
    import fcntl

    from drsync import flocks

    path = str(tmp_path / "drsync-apply-x.lock")
    Path(path).write_text("1\nkilled restore\n/t\n")
    real = fcntl.flock
    clearer: list[int] = []

    def racing(fd: int, how: int) -> None:
        if not clearer:  # the look clears the leftover between the apply's open and its flock
            clearer.append(os.open(path, os.O_RDONLY))
            real(clearer[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        real(fd, how)

    monkeypatch.setattr(flocks.fcntl, "flock", racing)
    fd = flocks.exclusive_lock(path, 0o644, "2\nthis apply\n/t\n", lambda held: f"held by {held[0]}")
    try:
        assert os.fstat(fd).st_ino == os.stat(path).st_ino  # the lock is on the file the name now holds
        assert Path(path).read_text() == "2\nthis apply\n/t\n"
    finally:
        os.close(clearer[0])
        flocks.release_lock_file(fd, path)
    assert not os.path.exists(path)
