"""Breaker (session 42): manifest validation, no-change restores, read-only backups, crash journals.

Each test states the promise it attacks; those that fail show a bug."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from drsync.errors import IntegrityError
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_check import validate
from tests.conftest import run_drsync
from tests.fsmake import open_deep
from tests.group import free_port, wait_for
from tests.test_manifest import _raw_manifest, build

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------------------


def tree_state(root: Path) -> dict:
    """Every path below ``root`` (bytes) with what a restore must reproduce: type, mode, owner, content, mtime
    (files), link target, user.* xattrs; plus the hard-link groups. fd-relative, so paths past PATH_MAX work."""
    out: dict = {}
    groups: dict[int, list[bytes]] = {}

    def walk(dfd: int, rel: bytes) -> None:
        for name in sorted(os.listdir(dfd)):
            name = os.fsencode(name)
            p = rel + name
            st = os.lstat(name, dir_fd=dfd)
            e: dict = {"fmt": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                       "gid": st.st_gid}
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(name, dir_fd=dfd)
                out[p] = e
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            try:
                e["xattrs"] = {k: os.getxattr(fd, k) for k in os.listxattr(fd) if k.startswith("user.")}
                if stat.S_ISREG(st.st_mode):
                    e["mtime"] = st.st_mtime_ns
                    with os.fdopen(os.dup(fd), "rb") as f:
                        e["sha"] = hashlib.sha256(f.read()).hexdigest()
                    if st.st_nlink > 1:
                        groups.setdefault(st.st_ino, []).append(p)
                out[p] = e
                if stat.S_ISDIR(st.st_mode):
                    walk(fd, p + b"/")
            finally:
                os.close(fd)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(top, b"")
    finally:
        os.close(top)
    out[b"<hard links>"] = sorted(sorted(g) for g in groups.values())
    return out


def differences(a: dict, b: dict) -> list:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def inodes(root: Path) -> dict[bytes, tuple[int, int]]:
    """(inode, ctime) of every regular file: what a restore that leaves a file alone does not change."""
    out = {}
    for dp, _dns, fns in os.walk(os.fsencode(root)):
        for n in fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, os.fsencode(root))] = (st.st_ino, st.st_ctime_ns)
    return out


def ok(*args: object) -> str:
    r = run_drsync(*args)
    assert r.code == 0, (args, r.code, r.out, r.err)
    return r.out


def make_source(src: Path) -> None:
    """Names that sort around '/', undecodable names, links, hard links, xattrs, odd times and owners."""
    src.mkdir()
    for n in ("a", "a-b", "a.b", "a0"):
        (src / n).write_bytes(n.encode() * 3)
    (src / "a_d").mkdir()
    (src / "a_d" / "x").write_bytes(b"xx")
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"fff")
    (src / "e").mkdir()
    (src / "ro").mkdir()
    (src / "ro" / "in").write_bytes(b"in")
    os.symlink("a", src / "l")
    (src / "h1").write_bytes(b"hard")
    os.link(src / "h1", src / "h2")
    (src / "xa").write_bytes(b"xattr")
    os.setxattr(src / "xa", "user.k", b"v1")
    raw = os.fsencode(src)
    os.mkdir(raw + b"/\xff\xfe")
    with open(raw + b"/\xff\xfe/u", "wb") as f:
        f.write(b"u")
    (src / "old").write_bytes(b"old")
    os.utime(src / "old", ns=(0, -5_000_000_000_123))  # 1811
    (src / "fut").write_bytes(b"fut")
    os.utime(src / "fut", ns=(0, 10_500_000_000 * 10**9 + 7))  # year 2300+
    (src / "ns").write_bytes(b"nsns")
    os.utime(src / "ns", ns=(0, 1_600_000_000_123_456_789))
    (src / "own").write_bytes(b"own")
    os.chown(src / "own", 1234, 5678)
    (src / "m").write_bytes(b"mode")
    os.chmod(src / "m", 0o640)
    big = src / "big"
    big.mkdir()
    for i in range(2000):
        (big / f"f{i:05}").write_bytes(b"%d" % i)
    os.chmod(src / "ro", 0o555)


def one_of_each_difference(t: Path, outside: Path) -> set[bytes]:
    """Change ``t`` (a fresh restore) in one attribute per path; returns the paths changed."""
    st = os.stat(t / "ns")
    os.utime(t / "ns", ns=(st.st_atime_ns, st.st_mtime_ns + 1))          # a nanosecond
    os.utime(t / "old", ns=(0, -5_000_000_000_124))                         # before 1970
    os.utime(t / "fut", ns=(0, 10_500_000_000 * 10**9 + 8))                 # after 2262
    os.chmod(t / "m", 0o600)                                                # mode only
    os.chown(t / "own", 1235, 5678)                                         # owner only
    os.setxattr(t / "xa", "user.k", b"v2")                                  # xattr value only
    os.setxattr(t / "a0", "user.new", b"n")                                 # an xattr added
    os.unlink(t / "a-b")
    os.mkdir(t / "a-b")                                                     # file -> dir
    shutil.rmtree(t / "e")
    (t / "e").write_bytes(b"")                                              # empty dir -> file
    os.unlink(t / "a.b")
    os.symlink("a", t / "a.b")                                              # file -> symlink
    os.unlink(t / "l")
    os.symlink("a0", t / "l")                                               # symlink target
    data = (t / "h2").read_bytes()
    os.unlink(t / "h2")
    (t / "h2").write_bytes(data)                                            # hard link broken
    os.utime(t / "h2", ns=(0, os.stat(t / "h1").st_mtime_ns))
    os.link(t / "m", t / "newlink")                                         # hard link added (an extra)
    shutil.rmtree(t / "d")
    outside.mkdir()
    os.symlink(outside, t / "d")                                            # dir -> link leading out
    os.chmod(t / "ro", 0o755)
    (t / "ro" / "in").write_bytes(b"IN")                                    # inside a read-only dir
    os.chmod(t / "ro", 0o555)
    with open(os.fsencode(t) + b"/\xff\xfe/u", "wb") as f:
        f.write(b"U")                                                       # undecodable dir
    with open(os.fsencode(t) + b"/\xff\xfe/\x80", "wb") as f:
        f.write(b"extra")                                                   # undecodable extra
    os.chmod(t / "big" / "f01000", 0o600)
    os.mkfifo(t / "big" / "f01999.fifo")                                    # an extra fifo
    (t / "big" / "f00000").write_bytes(b"zz")                               # content and size
    return {b"ns", b"old", b"fut", b"m", b"own", b"xa", b"a0", b"h2", b"newlink", b"ro/in", b"\xff\xfe/u",
            b"big/f01000", b"big/f00000", b"h1", b"a-b", b"a.b", b"e", b"\xff\xfe/\x80"}


# --- 2. restores leave alone exactly the files that already match -----------------------------------------


@pytest.fixture(scope="module")
def snapshot_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path, dict]:
    base = tmp_path_factory.mktemp("restore")
    make_source(base / "src")
    repo = base / "repo"
    ok("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    ok("snapshot", "create", "--repo", repo, "--source", base / "src")
    sid = json.loads(ok("snapshot", "list", "--repo", repo, "--json"))[0]["id"]
    ref = base / "ref"
    ok("snapshot", "restore", sid, "--repo", repo, "--target", ref)
    want = tree_state(ref)
    assert differences(tree_state(base / "src"), want) == []  # the fresh restore is the source
    backup = base / "backups"
    ok("backup", "create", "--repo", repo, "--snapshot", sid, "--dest", backup, "--mode", "full")
    return repo, sid, next(backup.iterdir()), want


@pytest.mark.parametrize("how", ["snapshot", "backup"])
def test_a_restore_over_a_target_differing_in_one_attribute_per_path_ends_equal_and_touches_nothing_else(
        snapshot_repo: tuple[Path, str, Path, dict], tmp_path: Path, how: str) -> None:
    repo, sid, backup, want = snapshot_repo
    t = tmp_path / "t"
    ok("snapshot", "restore", sid, "--repo", repo, "--target", t)
    changed = one_of_each_difference(t, tmp_path / "outside")
    before = inodes(t)
    if how == "snapshot":
        ok("snapshot", "restore", sid, "--repo", repo, "--target", t, "--overwrite", "--delete-extra")
    else:
        ok("backup", "restore", backup, "--target", t, "--overwrite", "--delete-extra")
    assert differences(want, tree_state(t)) == []
    assert list((tmp_path / "outside").iterdir()) == []  # nothing written through the link
    after = inodes(t)
    touched = sorted(p for p in before if p not in changed and after.get(p) != before[p])
    assert touched == []


def test_a_path_longer_than_path_max_is_restored_in_place(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = [b"d%02d" % i + b"x" * 200 for i in range(25)]  # 5,000+ bytes deep

    def leaf_dir(root: Path) -> int:
        return open_deep(root, names)

    fd = leaf_dir(src)
    w = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(w, b"deep")
    os.close(w)
    os.close(fd)
    repo = tmp_path / "repo"
    ok("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    ok("snapshot", "create", "--repo", repo, "--source", src)
    t = tmp_path / "t"
    ok("snapshot", "restore", "latest", "--repo", repo, "--target", t)
    fd = leaf_dir(t)
    w = os.open("leaf", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
    os.write(w, b"DEEP!")
    os.close(w)
    os.chmod("leaf", 0o600, dir_fd=fd)
    os.close(fd)
    ok("snapshot", "restore", "latest", "--repo", repo, "--target", t, "--overwrite", "--delete-extra")
    assert differences(tree_state(src), tree_state(t)) == []


# --- 3. a backup directory is never changed through --repo (or a config naming it) --------------------------


def backup_files(b: Path) -> dict[str, str]:
    """Every path of a backup but what is under locks/ (readers take locks), with its content's hash."""
    out = {}
    for p in sorted(b.rglob("*")):
        rel = str(p.relative_to(b))
        if rel == "locks" or rel.startswith("locks/"):
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello\n")
    (src / "d").mkdir()
    (src / "d" / "b").write_bytes(b"x\n")
    repo = tmp_path / "repo"
    ok("init", "--repo", repo, "--cluster-id", "c1", "--release", "1")
    ok("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1")
    ok("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "bk", "--mode", "full")
    return next((tmp_path / "bk").iterdir())


def standby_config(tmp_path: Path, repository: Path, *, role: str = "standby") -> Path:
    data = tmp_path / "sbdata"
    data.mkdir(exist_ok=True)
    cfg = tmp_path / f"{role}.toml"
    cfg.write_text(f'[cluster]\nid = "c1"\nrelease = "1"\ndata = "{data}"\nrepository = "{repository}"\n'
                   f'[agent]\nname = "sb"\nrole = "{role}"\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'metrics = "127.0.0.1:{free_port()}"\n')
    return cfg


@pytest.mark.parametrize("variant", ["plain", "slash", "dot", "symlink", "relative", "file-url", "config"])
def test_writes_through_any_spelling_of_a_backup_are_refused(backup_dir: Path, tmp_path: Path,
                                                             variant: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(backup_dir)
    spelled = {"plain": str(backup_dir), "slash": f"{backup_dir}/", "dot": f"{backup_dir}/.", "symlink": str(link),
               "relative": os.path.relpath(backup_dir, tmp_path), "file-url": f"file://{backup_dir}",
               "config": ""}[variant]
    where = ["--config", standby_config(tmp_path, backup_dir)] if variant == "config" else ["--repo", spelled]
    before = backup_files(backup_dir)
    for cmd in (["snapshot", "create", "--source", tmp_path / "src", "--allow-empty"], ["snapshot", "delete", "latest"],
                ["snapshot", "delete", "latest", "--break-glass"], ["snapshot", "expire"], ["repo", "gc"],
                ["repo", "gc", "--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "drsync", *map(str, cmd), *map(str, where)], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 2, (cmd, r.returncode, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
    assert backup_files(backup_dir) == before
    ok("backup", "verify", backup_dir)


def test_an_agent_whose_repository_is_a_backup_is_refused_and_writes_nothing_into_it(backup_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """A standby agent configured with a backup as its repository (state_dir left to its default, which is
    <repository>/agent) must be refused (exit 2, one line) before it writes anything into the backup.
    Found: it starts, serves, and writes agent/state.json and agent/agent.pid into the backup, so that
    'backup verify' fails (exit 3, 'not listed in the checksum file')."""
    cfg = standby_config(tmp_path, backup_dir)
    before = backup_files(backup_dir)
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=log, stderr=log)
    try:
        wait_for(lambda: proc.poll() is not None or (backup_dir / "agent" / "state.json").exists(),
                 "the agent to exit or to write its state")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    written = sorted(set(backup_files(backup_dir)) - set(before))
    verify = run_drsync("backup", "verify", backup_dir)
    assert (proc.returncode, written, verify.code) == (2, [], 0), (tmp_path / "agent.log").read_text()[-2000:]


def test_drill_and_status_with_a_backup_as_repository_write_nothing_into_it(backup_dir: Path,
                                                                            tmp_path: Path) -> None:
    """Found: 'drsync drill run --config F' (F's repository a backup) writes agent/drills/drill-00000001.json
    into the backup ('backup verify' then exit 3) and 'drsync status --config F' creates agent/ in it."""
    cfg = standby_config(tmp_path, backup_dir)
    before = backup_files(backup_dir)
    run_drsync("status", "--config", cfg)
    after_status = sorted(set(backup_files(backup_dir)) - set(before))
    run_drsync("drill", "run", "--config", cfg)
    after_drill = sorted(set(backup_files(backup_dir)) - set(before))
    verify = run_drsync("backup", "verify", backup_dir)
    assert (after_status, after_drill, verify.code) == ([], [], 0), verify.out + verify.err


def test_reading_commands_work_on_a_backup_and_change_nothing(backup_dir: Path, tmp_path: Path) -> None:
    before = backup_files(backup_dir)
    for cmd in (["snapshot", "list"], ["snapshot", "show", "latest", "--files"], ["snapshot", "diff", "s1", "latest"],
                ["repo", "verify"], ["snapshot", "expire", "--dry-run"], ["repo", "unlock"]):
        ok(*cmd, "--repo", backup_dir)
    ok("backup", "verify", backup_dir)
    ok("backup", "restore", backup_dir, "--target", tmp_path / "restored")
    ok("snapshot", "restore", "latest", "--repo", backup_dir, "--target", tmp_path / "restored2")
    assert (tmp_path / "restored" / "a").read_bytes() == (tmp_path / "restored2" / "a").read_bytes() == b"hello\n"
    assert backup_files(backup_dir) == before
    ok("backup", "verify", backup_dir)


# --- 1. manifest validation --------------------------------------------------------------------------------


@pytest.fixture
def tiny_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    import drsync.repository.manifest as mf
    import drsync.repository.manifest_check as mc

    monkeypatch.setattr(mc, "_SLICE_ROWS", 2)
    monkeypatch.setattr(mf, "ROW_GROUP", 4)


FAULTS = {  # (a suffix for the path, more columns, what the error says)
    "dotdot": ("/..", {}, "unsafe path"),
    "reserved": ("/.drsync-staging", {}, "reserved"),
    "long": ("/" + "n" * 256, {}, "longer than 255"),
    "undecodable dotdot": ("\udcff/..", {}, "unsafe path"),
    "mode": ("", {"mode": 0o10000}, "not a permission mode"),
    "fifo": ("", {"type": "fifo"}, "unknown entry type"),
    "sum": ("", {"size": 9, "chunk_sizes": [4]}, "chunks add up to 4"),
    "link out": ("", {"type": "symlink", "target": "../../e"}, "points outside"),
    "dir link": ("", {"type": "dir", "hardlink": "x/a7"}, "cannot be a hard link"),
}


@pytest.mark.usefixtures("tiny_slices")
@pytest.mark.parametrize("at", range(1, 8))
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_first_of_two_faults_is_named_wherever_the_slices_cut(at: int, fault: str) -> None:
    """Slices of 2 rows, row groups of 4: a fault at any row, with a later fault of another kind after it
    (x/z's mode), is the one named, from a table and from stored bytes."""
    from drsync.repository.manifest import ManifestFile

    suffix, more, message = FAULTS[fault]
    rows = [{"path": "x", "type": "dir"}] + [{"path": f"x/a{i}"} for i in range(8)]
    rows[at] = {**rows[at], **more, "path": rows[at]["path"] + suffix}
    m = build([*rows, {"path": "x/z", "mode": 0o17777}])
    for what in (m, ManifestFile(m.to_bytes())):
        with pytest.raises(IntegrityError, match=message):
            validate(what)


@pytest.mark.usefixtures("tiny_slices")
def test_a_duplicate_in_an_unordered_manifest_is_named_before_a_later_fault() -> None:
    """'naming the FIRST fault in row order': in a manifest out of path order (hostile), row 3 repeats row 2's
    path and row 5 has a bad mode. Found: the bad mode of the later row is named (duplicates of an unordered
    manifest are only looked for after every row check). Not new today: the row-by-row version did the same."""
    rows = [{"path": "b"}, {"path": "a"}, {"path": "c"}, {"path": "a"}, {"path": "z", "mode": 0o17777}]
    with pytest.raises(IntegrityError, match="a appears twice"):
        validate(_raw_manifest(rows))


def test_a_manifest_with_a_string_path_column_is_judged_not_crashed_on() -> None:
    """suspect_paths and validate's docstrings take 'binary or string' path columns. Found: a Manifest whose path
    column is string-typed makes validate raise TypeError (from the path decoding), not IntegrityError, even for
    a manifest holding '..'. Reachable only through the Python API (stored v1 manifests are upgraded to binary)."""
    t = build([{"path": "d", "type": "dir"}, {"path": "d/f"}, {"path": "d/../x"}]).table
    paths = pa.array([p.decode() for p in t.column("path").to_pylist()], pa.string())
    with pytest.raises(IntegrityError, match="unsafe path"):
        validate(Manifest(t.set_column(0, pa.field("path", pa.string()), paths)))


# --- 6. the apply's crash journal ---------------------------------------------------------------------------


def test_a_restore_killed_at_any_step_is_finished_by_the_next_one(tmp_path: Path) -> None:
    """Odd names (newline, tab, undecodable), xattrs, hard links, a sparse file: kill -9 before several of the
    apply's mutating steps (tests/crashdriver.py); the next CLI restore ends with the target equal to the
    snapshot."""
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src)
    os.mkdir(raw + b"/odd\n\xff dir")
    with open(raw + b"/odd\n\xff dir/f\tx", "wb") as f:
        f.write(b"odd")
    (src / "h1").write_bytes(b"hard")
    os.link(src / "h1", src / "h2")
    (src / "xa").write_bytes(b"xattr")
    os.setxattr(src / "xa", "user.k", b"v1")
    with open(src / "sp", "wb") as f:
        f.seek(5_000_000)
        f.write(b"end")
    (src / "chg").write_bytes(b"one")
    repo = tmp_path / "repo"
    ok("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    ok("snapshot", "create", "--repo", repo, "--source", src)
    sid = json.loads(ok("snapshot", "list", "--repo", repo, "--json"))[0]["id"]
    old = tmp_path / "old"
    subprocess.run(["cp", "-a", "--sparse=always", src, old], check=True)
    (old / "chg").write_bytes(b"two!")
    os.unlink(old / "h2")
    (old / "h2").write_bytes(b"HARD")
    os.removexattr(old / "xa", "user.k")
    (old / "extra").write_bytes(b"x")
    want = tree_state(src)
    t = tmp_path / "t"
    for kill_at in (1, 4, 8, 12, 16, 20):
        shutil.rmtree(t, ignore_errors=True)
        subprocess.run(["cp", "-a", "--sparse=always", old, t], check=True)
        job = {"op": "apply", "target": str(t), "journal": None, "kill_at": kill_at, "count_file": None,
               "repo": str(repo), "snapshot": sid}
        subprocess.run([sys.executable, "-m", "tests.crashdriver", "run", json.dumps(job)], cwd=ROOT,
                       capture_output=True, check=False)
        ok("snapshot", "restore", sid, "--repo", repo, "--target", t, "--overwrite", "--delete-extra")
        assert differences(want, tree_state(t)) == [], kill_at
        assert os.stat(t / "sp").st_blocks * 512 < 1_000_000  # the hole kept
