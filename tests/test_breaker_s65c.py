"""Breaker s65c: capture warming (drsync.warming, LocalFrozenRoot.warm) attacked with real files and real
``drsync snapshot create/restore`` processes on a cold page cache; and the 0.25 s flock grace of
``flocks.exclusive_lock`` against two real overlapping restores."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tree_state
from tests.group import wait_for

ROOT = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace")


def _env(tmp: Path) -> dict[str, str]:
    locks = tmp / "locks"
    locks.mkdir(exist_ok=True)
    return {**os.environ, "DRSYNC_LOCK_DIR": str(locks)}


def _cli(*args: object, env: dict[str, str], prefix: list[str] | None = None, user: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [*(prefix or []), sys.executable, "-m", "drsync", *map(str, args)]
    if user:
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _content(name: str, size: int) -> bytes:
    head = f"IN:{name}:".encode()
    return (head * (size // len(head) + 1))[:size]


def _cold_tree(root: Path, dirs: int, files: int, size: int = 600) -> None:
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(files):
            p = sub / f"f{i}"
            p.write_bytes(_content(f"d{d}/f{i}", size))
    evict_all(root)


def evict_all(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                try:
                    _evict(p)
                except OSError:
                    pass


def _repo(tmp: Path, env: dict[str, str], user: str | None = None) -> Path:
    repo = tmp / "repo"
    r = _cli("init", "--repo", repo, "--cluster-id", "c", "--release", "1", env=env, user=user)
    assert r.returncode == 0, r.stderr
    return repo


def _create(repo: Path, src: Path, env: dict[str, str], **kw: object) -> tuple[subprocess.CompletedProcess[str], dict]:
    r = _cli("snapshot", "create", "--repo", repo, "--source", src, "--json", env=env, **kw)  # type: ignore[arg-type]
    out = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
    return r, out


def _restore(repo: Path, sid: str, target: Path, env: dict[str, str]) -> None:
    r = _cli("snapshot", "restore", sid, "--repo", repo, "--target", target, env=env)
    assert r.returncode == 0, r.stderr


def _warm_tids(trace: Path) -> set[str]:
    return {line.split()[0] for line in trace.read_text(errors="replace").splitlines()
            if "POSIX_FADV_WILLNEED" in line or "RWF_NOWAIT" in line}


# 1. A cold capture: warming really runs, only beneath the root, and the snapshot is the tree.

@pytest.mark.skipif(STRACE is None, reason="strace needed")
def test_cold_capture_warms_beneath_the_root_only_and_the_snapshot_is_the_tree(tmp_path: Path) -> None:
    env = _env(tmp_path)
    src = tmp_path / "src"
    _cold_tree(src, 4, 400)
    repo = _repo(tmp_path, env)
    trace = tmp_path / "trace"
    r, out = _create(repo, src, env, prefix=[STRACE, "-f", "-qq", "-y", "-o", str(trace),
                                             "-e", "trace=openat,openat2,preadv2,fadvise64,open"])
    assert r.returncode == 0, r.stderr
    tids = _warm_tids(trace)
    assert tids, "no warming seen on a cold tree"
    lines = [ln for ln in trace.read_text(errors="replace").splitlines() if ln.split()[0] in tids]
    opens = [ln for ln in lines if " openat" in ln or " open(" in ln]
    assert opens
    for ln in opens:
        quoted = re.search(r'open(?:at2?)?\((?:[^,]*, )?"([^"]*)"', ln)
        if quoted and quoted.group(1).startswith("/"):
            assert quoted.group(1) == str(src), ln  # the root itself, the anchor of the openat2 that follows
        elif quoted:
            # every other open of the warming thread is an openat2 beneath the root, resolving no link
            assert "openat2(" in ln and "RESOLVE_BENEATH" in ln and "RESOLVE_NO_SYMLINKS" in ln, ln
            assert "O_NONBLOCK" in ln, ln
        got = re.search(r"= (\d+)<(.*)>$", ln)
        if got:
            assert got.group(2) == str(src) or got.group(2).startswith(str(src) + "/"), ln
    target = tmp_path / "restored"
    _restore(repo, out["id"], target, env)
    assert tree_state(target) == tree_state(src)


# 2. Races while warming runs: dirs renamed and swapped for links (outside, to a fifo dir), files replaced
# by fifos, a dir made 000, files deleted. The capture ends, records nothing from outside, opens nothing there.

def _racer(src: Path, outside: Path, fifo_dir: Path, stop: threading.Event, rounds: list[int]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        for d, target in (("d1", outside), ("d2", fifo_dir)):
            real, moved = src / d, src / f"{d}.moved"
            try:
                if real.is_symlink():
                    real.unlink()
                    moved.rename(real)
                else:
                    real.rename(moved)
                    real.symlink_to(target)
            except OSError:
                pass
        f = src / "d3" / f"f{n % 300}"
        try:
            f.unlink()
            os.mkfifo(f)
        except OSError:
            pass
        try:
            (src / "d4" / f"f{n % 300}").unlink()
        except OSError:
            pass
        try:
            (src / "d5").chmod(0o000 if n % 2 else 0o755)
        except OSError:
            pass
        rounds[0] = n


@pytest.mark.skipif(STRACE is None, reason="strace needed")
def test_races_during_a_cold_capture_never_reach_outside_never_hang_and_record_only_the_tree(tmp_path: Path) -> None:
    env = _env(tmp_path)
    src = tmp_path / "src"
    _cold_tree(src, 6, 300)
    outside, fifo_dir = tmp_path / "outside", tmp_path / "fifos"
    outside.mkdir()
    fifo_dir.mkdir()
    for i in range(300):
        (outside / f"f{i}").write_bytes(b"OUTSIDE-SECRET" * 10)
        os.mkfifo(fifo_dir / f"f{i}")
    repo = _repo(tmp_path, env)
    trace = tmp_path / "trace"
    stop, rounds = threading.Event(), [0]
    racer = threading.Thread(target=_racer, args=(src, outside, fifo_dir, stop, rounds))
    racer.start()
    try:
        wait_for(lambda: rounds[0] > 3, "the racer running")
        r, out = _create(repo, src, env, timeout=90, prefix=[
            STRACE, "-f", "-qq", "-y", "-o", str(trace), "-e", "trace=openat,openat2,open,preadv2,fadvise64"])
    finally:
        stop.set()
        racer.join()
        (src / "d5").chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr  # and no hang: the capture's own timeout above fails the test
    text = trace.read_text(errors="replace")
    assert _warm_tids(trace), "warming never ran"
    # nothing beneath the outside dirs was ever opened by the capture (any thread)
    assert str(outside) + "/" not in text
    assert not re.search(re.escape(str(fifo_dir)) + r"/f\d+", text)
    target = tmp_path / "restored"
    _restore(repo, out["id"], target, env)
    for dirpath, _dirs, names in os.walk(target):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                assert b"OUTSIDE" not in data, p
                assert data.startswith(b"IN:"), p


# 3. A non-root user over a tree with unreadable files and dirs: warming's EACCES is silent.

def test_a_capture_as_nobody_over_unreadable_files_succeeds_and_records_what_it_can(open_tmp: Path) -> None:
    base = open_tmp / "nobody"
    base.mkdir(mode=0o755)
    try:
        env = _env(base)
        os.chown(base, 65534, 65534)
        os.chown(base / "locks", 65534, 65534)
        src = base / "src"
        _cold_tree(src, 3, 600)
        for i in range(0, 600, 3):
            (src / "d0" / f"f{i}").chmod(0o000)
        (src / "d1").chmod(0o000)
        for dirpath, dirs, names in os.walk(src):
            for n in dirs + names:
                os.chown(Path(dirpath) / n, 0, 0, follow_symlinks=False)
        repo = _repo(base, env, user="65534")
        r, out = _create(repo, src, env, user="65534")
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        target = base / "restored"
        r2 = _cli("snapshot", "restore", out["id"], "--repo", repo, "--target", target, env=env)
        assert r2.returncode == 0, r2.stderr
        for i in range(600):
            got = target / "d2" / f"f{i}"
            assert got.read_bytes() == _content(f"d2/f{i}", 600)
            if i % 3:
                assert (target / "d0" / f"f{i}").read_bytes() == _content(f"d0/f{i}", 600)
    finally:
        (base / "src" / "d1").chmod(0o755) if (base / "src" / "d1").exists() else None
        shutil.rmtree(base)


# 4. Thousands of tiny files in one dir, a deep tree, odd names: the snapshot is exactly the tree.

def test_many_tiny_files_a_deep_tree_and_odd_names_cold_restore_exactly(tmp_path: Path) -> None:
    env = _env(tmp_path)
    src = tmp_path / "src"
    flat = src / "flat"
    flat.mkdir(parents=True)
    for i in range(3000):
        (flat / f"t{i}").write_bytes(_content(f"t{i}", 1 + i % 200))
    deep = src
    for lvl in range(60):
        deep = deep / f"l{lvl}"
    deep.mkdir(parents=True)
    for i in range(300):
        (deep / f"x{i}").write_bytes(_content(f"x{i}", 300))
    odd = os.fsencode(src / "odd")
    os.mkdir(odd)
    for i in range(300):
        for nm in (b"nl\n%d" % i, b"bad\xff\xfe%d" % i, b"..%d" % i, b" sp %d " % i):
            with open(os.path.join(odd, nm), "wb") as f:
                f.write(b"IN:" + nm)
    evict_all(src)
    repo = _repo(tmp_path, env)
    r, out = _create(repo, src, env)
    assert r.returncode == 0, r.stderr
    target = tmp_path / "restored"
    _restore(repo, out["id"], target, env)
    assert tree_state(target) == tree_state(src)


# 5. Descriptors during a long cold capture stay few; a capture killed mid-way is re-run to the same tree.

def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def test_fd_count_stays_bounded_during_a_long_cold_capture_and_a_killed_one_reruns(tmp_path: Path) -> None:
    env = _env(tmp_path)
    src = tmp_path / "src"
    _cold_tree(src, 10, 800, size=2000)
    repo = _repo(tmp_path, env)
    # killed mid-way (once it is reading beneath the source), then re-run
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "create", "--repo", str(repo),
                             "--source", str(src), "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def reading() -> bool:
        try:
            return any(os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(str(src) + "/d")
                       for fd in os.listdir(f"/proc/{proc.pid}/fd"))
        except OSError:
            return False

    wait_for(lambda: reading() or proc.poll() is not None, "the capture reading files", step=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    evict_all(src)
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "create", "--repo", str(repo),
                             "--source", str(src), "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _fds(proc.pid))
        time.sleep(0.01)  # sampling period of a measurement, not a wait for a condition
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert peak < 80, peak
    target = tmp_path / "restored"
    _restore(repo, json.loads(out)["id"], target, env)
    assert tree_state(target) == tree_state(src)


# 6. flocks: two overlapping restores — the second is refused promptly, never let in while the first holds it.

def test_a_second_restore_is_refused_promptly_while_a_first_holds_the_lock(tmp_path: Path) -> None:
    env = _env(tmp_path)
    src = tmp_path / "src"
    _cold_tree(src, 4, 300)
    (src / "big").write_bytes(os.urandom(64 << 20))
    repo = _repo(tmp_path, env)
    r, out = _create(repo, src, env)
    assert r.returncode == 0, r.stderr
    target = tmp_path / "restored"
    locks = Path(env["DRSYNC_LOCK_DIR"])
    first = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "restore", out["id"], "--repo", str(repo),
                              "--target", str(target)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

    def holding() -> bool:
        held = Path("/proc/locks").read_text()
        for p in locks.iterdir():
            try:
                ino = p.stat().st_ino
            except OSError:
                continue
            if re.search(rf"FLOCK .* {first.pid} \S+:{ino} ", held):
                return True
        return False

    try:
        wait_for(lambda: holding() or first.poll() is not None, "the first restore holding its lock", step=0.002)
        assert first.poll() is None, "the first restore ended before it was seen holding its lock"
        os.kill(first.pid, signal.SIGSTOP)
        try:
            tries = []
            for _ in range(3):
                second = _cli("snapshot", "restore", out["id"], "--repo", repo, "--target", target, env=env,
                              timeout=60)
                tries.append((second.returncode, second.stderr))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    # Refused while the first is stopped: a second restore waiting for the lock would never end (timeout above).
    for rc, stderr in tries:
        assert rc != 0, "a second restore was let in while the first held the lock"
        assert "Traceback" not in stderr
    assert first.returncode == 0, err
    assert tree_state(target) == tree_state(src)
