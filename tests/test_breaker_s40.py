"""Breaker s40: the small-files change (one thread reads and stages files below SMALL_FILE_BYTES, their
chunks read a run at a time with Repository.read_chunks, openat2 for the capture's opens, packs written
through a 1 MiB buffer), attacked as a hostile user would: multibyte long paths, damaged/missing/truncated
packs, symlink swaps during capture, kills at many moments, a disk that fills up, agent replication.

Every case uses real files and real processes (the CLI) where the CLI can reach the condition; where a
moment inside a capture is needed (a swap, a kill, space freed) the capture runs in its own process with a
hook on ``LocalFrozenRoot.open_file`` (the capture opens files one by one, small ones in path order) or on
the pack writer's drains: deterministic, no sleeps. Trees are compared with our own comparison
(:func:`tests.test_breaker_s39.tree_meta`: bytes, mode, mtime ns, owner, link targets, hard-link groups,
xattrs, holes), never drsync's verify."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drsync import fsutil
from drsync.dataroot import SMALL_FILE_BYTES
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import Result, run_drsync
from tests.fsmake import open_deep, tmpfs
from tests.test_breaker_s39 import (
    AM_ROOT,
    _wr,
    age,
    assert_same,
    diff_trees,
    hostile_tree,
    sparse,
    tree_meta,
)

ROOT = Path(__file__).resolve().parent.parent


def ok(r: Result) -> Result:
    assert r.code == 0, (r.code, r.out[-2000:], r.err[-4000:])
    return r


def init(repo: Path) -> str:
    ok(run_drsync("init", "--repo", repo, "--cluster-id", "east", "--release", "6.2.1"))
    return str(repo)


def snap(repo: str, src: Path, name: str = "") -> dict[str, Any]:
    age(src)
    return ok(run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", name or "s",
                         "--json")).json()


def restore(repo: str, ref: str, target: Path, *extra: str) -> Result:
    return run_drsync("snapshot", "restore", ref, "--repo", repo, "--target", target, *extra)


def exact(root: Path) -> dict:
    """Everything about a tree, drsync's own files too (what "left exactly as it was" means)."""
    out = {}
    for dp, dirs, files, dfd in os.fwalk(os.fsencode(root)):
        for n in sorted(dirs + files):
            s = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            rel = os.path.relpath(os.path.join(dp, n), os.fsencode(root))
            data = None
            if os.path.isfile(os.path.join(dp, n)) and not os.path.islink(os.path.join(dp, n)):
                with open(os.path.join(dp, n), "rb") as f:
                    data = f.read()
            out[rel] = (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns, s.st_ino, s.st_nlink, data)
    return out


# A hook script: the CLI in this process, with a function called as the capture opens each file.
_HOOKED = r"""
import os, sys, json, signal
spec = json.loads(sys.argv[1])
from drsync.dataroot import local
orig = local.LocalFrozenRoot.open_file
opened = []
def open_file(self, rel):
    opened.append(rel)
    if rel == spec.get("trigger"):
        act = spec["action"]
        if act == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif act == "unlink":
            os.unlink(spec["path"])
        elif act == "swap":
            os.rename(spec["dir"], spec["dir"] + ".moved")
            os.symlink(spec["to"], spec["dir"])
    return orig(self, rel)
local.LocalFrozenRoot.open_file = open_file
if spec.get("part_chunks"):
    import drsync.apply_chunks as ac
    ac.PART_CHUNKS = spec["part_chunks"]
if spec.get("kill_at_drain") is not None:
    from drsync.storage import local as st
    drains = [0]
    if hasattr(st.LocalBlobWriter, "_drain"):
        orig_drain = st.LocalBlobWriter._drain
        def _drain(self):
            drains[0] += 1
            if drains[0] == spec["kill_at_drain"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_drain(self)
        st.LocalBlobWriter._drain = _drain
    else:  # before the buffered writer: a kill at the n-th write
        orig_write = st.LocalBlobWriter.write
        def write(self, data):
            drains[0] += 1
            if drains[0] == spec["kill_at_drain"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_write(self, data)
        st.LocalBlobWriter.write = write
sys.argv = ["drsync", *sys.argv[2:]]
from drsync.cli import run
run()
"""


def hooked(spec: dict, *args: Any) -> Result:
    proc = subprocess.run([sys.executable, "-c", _HOOKED, json.dumps(spec), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def small_tree(root: Path, seed: int, n: int = 1200) -> None:
    """Many small files (dedup, empties, the 256 KiB edges, small sparse ones) with large ones in between."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    same = rnd.randbytes(3000)
    for i in range(n):
        d = root / f"s{i % 13:02}"
        d.mkdir(exist_ok=True)
        p = d / f"f{i:05}"
        kind = i % 10
        if kind == 0:
            _wr(p, same)  # dedup across many files
        elif kind == 1:
            _wr(p, b"")
        elif kind == 2 and i % 100 == 2:
            _wr(p, rnd.randbytes(SMALL_FILE_BYTES - 1))
        elif kind == 3 and i % 100 == 3:
            _wr(p, rnd.randbytes(SMALL_FILE_BYTES))
        elif kind == 4 and i % 200 == 4:
            sparse(p, SMALL_FILE_BYTES - 4096, [(SMALL_FILE_BYTES - 8192, rnd.randbytes(4096))])
        elif kind == 5 and i % 300 == 5:
            _wr(p, rnd.randbytes(SMALL_FILE_BYTES + 1 + i))  # a large file among the small ones
        else:
            _wr(p, rnd.randbytes(rnd.choice([1, 17, 512, 4095, 4096, 9000, 40_000])))
        if i % 97 == 0:
            os.setxattr(p, b"user.s40", str(i).encode())
        if i % 131 == 0:
            os.chmod(p, 0o4755)
        if i % 151 == 0 and AM_ROOT:
            os.chown(p, 1000 + i, 2000 + i)
    # hard links: a small group and a large group, across directories
    os.link(root / "s00" / "f00013", root / "s05" / "link-small")
    big = root / "s05" / "f00005"
    assert big.stat().st_size > SMALL_FILE_BYTES
    os.link(big, root / "s07" / "link-large")
    # names: newline, non-UTF-8
    _wr(os.path.join(os.fsencode(root), b"s00", b"nl\nname\xff"), b"odd")


def no_staging(target: Path) -> list[str]:
    return [n for n in os.listdir(target) if n.startswith(".drsync")] if target.exists() else []


# --- 1/2. openat2: multibyte paths longer than PATH_MAX in bytes, but not in characters ---------


def _mb_deep(top: Path, depth: int, comp: str) -> str:
    fd = open_deep(top, [comp] * depth)
    try:
        w = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, dir_fd=fd)
        os.write(w, b"a leaf deep below multibyte names\n")
        os.close(w)
    finally:
        os.close(fd)
    return "/".join([comp] * depth) + "/leaf.txt"


def test_open_beneath_opens_a_multibyte_path_longer_than_path_max_in_bytes(tmp_path: Path) -> None:
    """18 components of 120 'é' (240 bytes each): 2,186 characters (below LONG_PATH) but 4,346 bytes, past
    PATH_MAX. The component-by-component walk opens it; openat2 cannot (ENAMETOOLONG) and is not
    retried that way."""
    rel = _mb_deep(tmp_path, 18, "\u00e9" * 120)
    assert len(rel) <= fsutil.LONG_PATH < 4096 < len(os.fsencode(rel))
    fd = fsutil.open_beneath(str(tmp_path), rel)
    try:
        assert os.read(fd, 100) == b"a leaf deep below multibyte names\n"
    finally:
        os.close(fd)


def _captured_whole_and_restored(tmp_path: Path, src: Path, files: int) -> None:
    """A snapshot of ``src`` holds its ``files`` files with no warning, and restores to the same tree."""
    repo = init(tmp_path / "repo")
    doc = snap(repo, src)
    assert doc["warnings"] == [], doc["warnings"]
    assert doc["files"] == files
    target = tmp_path / "t"
    ok(restore(repo, "latest", target))
    assert_same(src, target)


def test_a_capture_keeps_a_directory_whose_multibyte_path_passes_path_max(tmp_path: Path) -> None:
    """A newcomer's tree with French/CJK names nested deep: the snapshot must hold the file and restore it
    (the README: 'paths deeper than PATH_MAX')."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "top.txt").write_bytes(b"top")
    _mb_deep(src, 18, "\u00e9" * 120)
    _mb_deep(src, 6, "\u6f22" * 80)  # CJK: 240 bytes a component, a short path: fine either way
    _captured_whole_and_restored(tmp_path, src, files=3)


def test_a_capture_reads_a_file_whose_multibyte_path_passes_path_max(tmp_path: Path) -> None:
    """The directory's path is below PATH_MAX (listed fine) but the file's relative path is not: 16
    components of 80 '漢' (3,840 bytes, 1,295 characters) and a 240-byte name."""
    src = tmp_path / "src"
    src.mkdir()
    comp = "\u6f22" * 80
    rel_dir = _mb_deep(src, 16, comp).rsplit("/", 1)[0]
    name = "\u00e9" * 125
    assert len(os.fsencode(rel_dir + "/" + name)) > 4096 and len(rel_dir + "/" + name) < fsutil.LONG_PATH
    fd = open_deep(src, rel_dir.split("/"))
    w = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
    os.write(w, b"long name, long path")
    os.close(w)
    os.setxattr(f"/proc/self/fd/{fd}/{name}", b"user.k", b"v")
    os.close(fd)
    _captured_whole_and_restored(tmp_path, src, files=2)


def test_open_beneath_answers_the_same_with_and_without_openat2(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Links on the way and at the end, a file on the way, a missing leaf, non-UTF-8 and newline names, a
    path with a trailing slash: the same errno (or the same file) with openat2 as component by component."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    b = os.fsencode(root)
    _wr(os.path.join(b, b"d", b"\xff\nodd"), b"odd")
    (root / "d" / "f").write_bytes(b"f")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "secret").write_bytes(b"secret")
    (root / "abs").symlink_to(tmp_path / "out")
    (root / "rel").symlink_to("../out")
    (root / "d" / "self").symlink_to(".")
    (root / "d" / "tof").symlink_to("f")
    cases = ["d/f", os.fsdecode(b"d/\xff\nodd"), "abs/secret", "rel/secret", "d/self/f", "d/tof", "d/f/x",
             "d/missing", "missing/x", "abs", "d/", "d//f"]

    def answers() -> list[Any]:
        out = []
        for rel in cases:
            try:
                fd = fsutil.open_beneath(str(root), rel, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                out.append(("err", e.errno))
                continue
            try:
                st = os.fstat(fd)
                out.append(("ok", st.st_ino, os.read(fd, 100) if os.path.isfile(f"/proc/self/fd/{fd}") else None))
            finally:
                os.close(fd)
        return out

    if getattr(fsutil, "_openat2", None) is None:
        pytest.skip("drsync._listdir has no open_beneath here")
    def same(a: list[Any]) -> list[Any]:  # ELOOP and ENOTDIR are one answer (the docstring allows both)
        return [("err", "link") if x[0] == "err" and x[1] in (errno.ELOOP, errno.ENOTDIR) else x for x in a]

    native = answers()
    monkeypatch.setattr(fsutil, "_openat2", None)
    walked = answers()
    assert same(native) == same(walked), list(zip(cases, native, walked, strict=True))
    for rel, got in zip(cases, native, strict=True):
        if "secret" in rel:
            assert got[0] == "err" and got[1] in (errno.ELOOP, errno.ENOTDIR), (rel, got)


# --- 1. capture of hostile trees: many small files, exact restores ---------------------------


def test_a_hostile_tree_with_many_small_files_restores_exactly_fresh_and_delta(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hostile_tree(src, seed=40)
    small_tree(src / "many", 40)
    repo = init(tmp_path / "repo")
    doc = snap(repo, src, "one")
    m1 = tree_meta(src)
    fresh = tmp_path / "fresh"
    ok(restore(repo, "one", fresh))
    assert not diff_trees(m1, tree_meta(fresh)), diff_trees(m1, tree_meta(fresh))[:20]
    assert doc["files"] > 1200
    # Delta onto a changed copy: type changes both ways, small<->large, bytes, modes, xattrs, links.
    rnd = random.Random(4)
    many = fresh / "many"
    for i, p in enumerate(sorted((many / "s03").iterdir())):
        if i % 5 == 0:
            p.write_bytes(rnd.randbytes(rnd.choice([0, 10, SMALL_FILE_BYTES, SMALL_FILE_BYTES + 7])))
        elif i % 5 == 1:
            p.unlink()
            p.mkdir()
            (p / "inner").write_bytes(b"x")
        elif i % 5 == 2:
            p.unlink()
            p.symlink_to("../s04")
        elif i % 5 == 3:
            os.chmod(p, 0o600)
    shutil.rmtree(many / "s04")
    (many / "s04").write_bytes(b"a file where a directory was")
    (many / "s09").rename(tmp_path / "s09-away")
    (many / "s09").symlink_to(tmp_path / "s09-away")
    (fresh / "extra").write_bytes(b"not in the snapshot")
    dry = ok(restore(repo, "one", fresh, "--overwrite", "--delete-extra", "--dry-run", "--json")).json()
    ok(restore(repo, "one", fresh, "--overwrite", "--delete-extra"))
    assert not diff_trees(m1, tree_meta(fresh)), diff_trees(m1, tree_meta(fresh))[:20]
    assert no_staging(fresh) == []
    # The dry run listed what the real run had to do (at least the changed paths).
    listed = json.dumps(dry)
    for p in ("many/s04", "extra"):
        assert p in listed, (p, listed[:2000])


def test_a_snapshot_of_only_small_files_in_thousands_restores_exactly_and_twice_changes_nothing(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    rnd = random.Random(11)
    for i in range(3000):
        d = src / f"d{i % 31:02}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        _wr(d / f"{i:05}", rnd.randbytes(rnd.randrange(0, 6000)) if i % 3 else b"dup" * 300)
    repo = init(tmp_path / "repo")
    snap(repo, src)
    t = tmp_path / "t"
    ok(restore(repo, "latest", t))
    assert_same(src, t)
    before = exact(t)
    again = ok(restore(repo, "latest", t, "--json")).json()
    assert exact(t) == before, again


# --- 3. damage: a flipped byte, a truncated or missing pack ----------------------------------


@pytest.fixture
def damaged_setup(tmp_path: Path) -> dict[str, Any]:
    src = tmp_path / "src"
    small_tree(src, 7, n=600)
    repo = init(tmp_path / "repo")
    snap(repo, src)
    rp = Repository.open(LocalStorage(repo))
    man = list(rp.load_manifest(rp.list_snapshots()[-1]).entries())
    # A file the delta target below has changed (every other file of s02), in the middle of its run.
    changed = {f"s02/{p.name}" for p in sorted((src / "s02").iterdir())[::2]}
    files = [e for e in man if e.type == "file" and 1000 < e.size < SMALL_FILE_BYTES and e.chunks
             and e.path in changed and not e.path.endswith("0")]
    victim = files[len(files) // 2]
    return {"src": src, "repo": repo, "victim": victim.path, "loc": rp.index.get(victim.chunks[0]),
            "tmp": tmp_path}


def _target_with_content(tmp: Path, src: Path) -> Path:
    """A target that holds an older, changed copy (so a delta restore would write many small files)."""
    t = tmp / "target"
    shutil.copytree(src, t, symlinks=True)
    rnd = random.Random(3)
    for p in sorted((t / "s02").iterdir())[::2]:
        p.write_bytes(rnd.randbytes(100))
    for p in sorted((t / "s06").iterdir())[::3]:
        p.unlink()
    return t


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
@pytest.mark.parametrize("onto", ["new", "delta"])
def test_damaged_missing_or_truncated_pack_fails_the_restore_naming_a_file_and_changes_nothing(
        damaged_setup: dict[str, Any], how: str, onto: str) -> None:
    s = damaged_setup
    loc = s["loc"]
    pack = Path(s["repo"]) / fmt.pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    if how == "flip":
        data[loc.offset + loc.stored_length // 2] ^= 0x10
        pack.write_bytes(bytes(data))
    elif how == "truncate":
        pack.write_bytes(bytes(data[:loc.offset + loc.stored_length // 2]))
    else:
        pack.unlink()
    if onto == "new":
        target = s["tmp"] / "new-target"
        before = None
    else:
        target = _target_with_content(s["tmp"], s["src"])
        before = exact(target)
    r = restore(s["repo"], "latest", target, "--overwrite", "--delete-extra")
    assert r.code == 3, (r.code, r.err[-2000:])
    err = r.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.err, r.err[-2000:]
    if how == "flip":
        assert s["victim"] in err[0], (s["victim"], err[0])
    else:
        # the error names a file of the snapshot (whichever reached the pack first)
        assert any(part.startswith("s") and "/f" in part for part in err[0].split()), err[0]
    if before is None:
        assert not target.exists() or os.listdir(target) == [], os.listdir(target)
    else:
        assert exact(target) == before
        assert no_staging(target) == []


@pytest.mark.parametrize("onto", ["new", "delta"])
def test_restores_in_many_parts_with_small_and_large_files_alternating_are_exact(tmp_path: Path,
                                                                                 onto: str) -> None:
    """The write list cut into parts of about 40 chunks (PART_CHUNKS lowered in the restoring process):
    hundreds of parts, small and large files alternating in path order, batches of both kinds at once."""
    src = tmp_path / "src"
    rnd = random.Random(12)
    for i in range(900):
        d = src / f"d{i // 60:02}"
        d.mkdir(parents=True, exist_ok=True)
        big = i % 9 == 4
        _wr(d / f"{i:04}", rnd.randbytes(SMALL_FILE_BYTES + rnd.randrange(0, 400_000)) if big
            else rnd.randbytes(rnd.randrange(0, 9000)))
    repo = init(tmp_path / "repo")
    snap(repo, src)
    t = tmp_path / "t"
    if onto == "delta":
        shutil.copytree(src, t)
        for p in sorted(t.rglob("*"))[::4]:
            if p.is_file():
                p.write_bytes(rnd.randbytes(rnd.choice([0, 50, SMALL_FILE_BYTES + 3])))
        (t / "d03").rename(t / "d03-gone")
    r = hooked({"part_chunks": 40}, "snapshot", "restore", "latest", "--repo", repo, "--target", t,
               "--overwrite", "--delete-extra")
    assert r.code == 0, r.err[-3000:]
    assert_same(src, t)
    assert no_staging(t) == []


# --- 1. symlink swaps while the capture reads ---------------------------------------------------


@pytest.mark.parametrize("swap_dir", ["b", "b/c"])
def test_a_directory_swapped_for_a_link_to_outside_during_capture_is_never_read_through(
        tmp_path: Path, swap_dir: str) -> None:
    """The capture opens a/… first (small files, path order, one thread); at that moment b (or b/c) becomes a
    symlink to a directory outside the root holding files of the same names. Nothing outside may enter
    the snapshot: those paths keep their last captured version (here: the first snapshot's)."""
    src = tmp_path / "src"
    out = tmp_path / "outside"
    for d in (src / "a", src / "b" / "c", out / "c", out):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(50):
        _wr(src / "a" / f"x{i:02}", b"a" * (i + 1))
        _wr(src / "b" / f"y{i:02}", b"inside-b %d" % i)
        _wr(src / "b" / "c" / f"z{i:02}", b"inside-c %d" % i)
        _wr(out / f"y{i:02}", b"OUTSIDE SECRET %d" % i)
        _wr(out / "c" / f"z{i:02}", b"OUTSIDE SECRET %d" % i)
    _wr(src / "b" / "big", os.urandom(SMALL_FILE_BYTES * 2))
    _wr(out / "big", b"OUTSIDE SECRET big" * 40000)
    repo = init(tmp_path / "repo")
    snap(repo, src, "one")
    # Change every file so that the second capture reads them all again.
    for p in sorted(src.rglob("*")):
        if p.is_file():
            p.write_bytes(p.read_bytes() + b"+")
    age(src)
    expected = tree_meta(src)
    target_dir = str(out if swap_dir == "b" else out / "c")
    r = hooked({"trigger": "a/x00", "action": "swap", "dir": str(src / swap_dir), "to": target_dir},
               "snapshot", "create", "--repo", repo, "--source", src, "--name", "two", "--json")
    assert r.code == 0, r.err[-3000:]
    t = tmp_path / "t"
    ok(restore(repo, "two", t))
    got = tree_meta(t)
    for rel, meta in got.items():
        if meta[0] == "file":
            with open(os.path.join(os.fsencode(t), rel), "rb") as f:
                assert b"OUTSIDE" not in f.read(), rel
    # Files under the swapped directory are either as captured before the swap began (first snapshot)
    # or the ones read before it: never anything else.
    for rel in [k for k in expected if k.startswith(b"a/")]:
        assert got[rel] == expected[rel], rel


# --- 4. kill -9 at many moments, and a disk that fills up ----------------------------------------


def test_a_capture_killed_at_many_moments_leaves_a_verified_repository_whose_snapshots_restore(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    small_tree(src, 21, n=500)
    repo = init(tmp_path / "repo")
    snap(repo, src, "base")
    base = tree_meta(src)
    rnd = random.Random(2)
    changed = []
    for p in sorted(src.rglob("f*"))[::3]:
        if p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1:
            p.write_bytes(rnd.randbytes(rnd.randrange(0, 70_000)))
            changed.append(str(p.relative_to(src)))
    age(src)
    files = sorted(changed)  # what the capture reads again (in path order, small ones)
    moments: list[dict] = [{"trigger": files[k], "action": "kill"}
                           for k in (0, 37, len(files) // 2, len(files) - 2, len(files) - 1)]
    moments += [{"kill_at_drain": k} for k in (1, 2, 3, 5, 8)]
    for spec in moments:
        r = hooked(spec, "snapshot", "create", "--repo", repo, "--source", src, "--name", "killed")
        assert r.code == -signal.SIGKILL, (spec, r.code, r.err[-1500:])
        v = run_drsync("repo", "verify", "--repo", repo)
        assert v.code == 0, (spec, v.out[-2000:], v.err[-2000:])
    names = [s["name"] for s in ok(run_drsync("snapshot", "list", "--repo", repo, "--json")).json()]
    assert names == ["base"], names
    t = tmp_path / "t"
    ok(restore(repo, "base", t))
    assert not diff_trees(base, tree_meta(t))
    # A capture after all that completes and restores exactly.
    after = tree_meta(src)
    ok(run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "after"))
    t2 = tmp_path / "t2"
    ok(restore(repo, "after", t2))
    assert not diff_trees(after, tree_meta(t2))
    ok(run_drsync("repo", "verify", "--repo", repo))


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not AM_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        yield mnt


def _fill(mnt: Path, leave: int) -> Path:
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return ballast


def test_a_full_disk_fails_the_capture_in_one_line_and_leaves_the_repository_good(
        tmp_path: Path, small_tmpfs: Path) -> None:
    src = tmp_path / "src"
    small_tree(src, 5, n=400)
    repo = init(small_tmpfs / "repo")
    first = tmp_path / "first"
    (first / "x").mkdir(parents=True)
    (first / "x" / "a").write_bytes(b"first")
    snap(repo, first, "first")
    _fill(small_tmpfs, 1_500_000)
    age(src)
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "full")
    assert r.code == 1, (r.code, r.err[-2000:])
    assert len(r.err.strip().splitlines()) == 1 and "No space left" in r.err and "Traceback" not in r.err, r.err
    ok(run_drsync("repo", "verify", "--repo", repo))
    t = tmp_path / "t"
    ok(restore(repo, "first", t))
    assert_same(first, t)


def test_a_disk_that_fills_up_and_then_frees_space_during_a_capture_never_commits_damaged_chunks(
        tmp_path: Path, small_tmpfs: Path) -> None:
    """The repository's disk is full when the capture starts writing (another process's file fills it),
    and that process frees its space while the capture goes on (here: as the capture opens f250). The
    committed snapshot must restore exactly what it lists (files that could not be stored may be left out,
    with a warning), and repo verify must accept the repository."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(7)
    for i in range(300):
        _wr(src / f"f{i:03}", rnd.randbytes(20_000))
    age(src)
    repo = init(small_tmpfs / "repo")
    ballast = _fill(small_tmpfs, 1_500_000)
    r = hooked({"trigger": "f250", "action": "unlink", "path": str(ballast)},
               "snapshot", "create", "--repo", repo, "--source", src, "--name", "s", "--json")
    if r.code != 0:
        # Failing the capture is a correct answer too: in one line, and nothing damaged left behind.
        assert len(r.err.strip().splitlines()) == 1, r.err[-2000:]
        ok(run_drsync("repo", "verify", "--repo", repo))
        return
    v = run_drsync("repo", "verify", "--repo", repo)
    assert v.code == 0, (v.code, v.out[-1500:], v.err[-1500:])
    t = tmp_path / "t"
    rr = restore(repo, "latest", t)
    assert rr.code == 0, rr.err[-1500:]
    for p in t.iterdir():
        assert p.read_bytes() == (src / p.name).read_bytes(), p.name


# --- 5. agent to agent: a small-file tree ----------------------------------------------------------


def test_agent_replication_of_a_small_file_tree_gives_the_standby_an_identical_tree(tmp_path: Path) -> None:
    from tests.test_agents import Pair
    pair = Pair(tmp_path)
    try:
        small_tree(pair.prod / "many", 33, n=1500)
        hostile_tree(pair.prod, seed=3)
        age(pair.prod)
        pair.start("standby")
        r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
        assert r.code == 0, r.err[-3000:]
        ok_meta = tree_meta(pair.prod)
        pair.kill("standby", signal.SIGTERM)
        bad = diff_trees(ok_meta, tree_meta(pair.standby_data))
        assert not bad, "\n".join(bad[:30])
        # A change of many small files (and types) goes across as well.
        rnd = random.Random(8)
        for p in sorted((pair.prod / "many" / "s05").iterdir())[::2]:
            if p.is_file() and not p.is_symlink():
                p.write_bytes(rnd.randbytes(rnd.randrange(0, 3000)))
        shutil.rmtree(pair.prod / "many" / "s06")
        (pair.prod / "many" / "s06").write_bytes(b"now a file")
        age(pair.prod)
        pair.start("standby")
        r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
        assert r.code == 0, r.err[-3000:]
        pair.kill("standby", signal.SIGTERM)
        bad = diff_trees(tree_meta(pair.prod), tree_meta(pair.standby_data))
        assert not bad, "\n".join(bad[:30])
    finally:
        pair.stop_all()


def test_a_backup_of_small_files_restores_exactly_and_a_flipped_byte_fails_it_naming_the_file(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    small_tree(src, 17, n=500)
    repo = init(tmp_path / "repo")
    snap(repo, src)
    doc = ok(run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "b",
                        "--json")).json()
    b = Path(doc["path"])
    t = tmp_path / "t"
    ok(run_drsync("backup", "restore", b, "--target", t))
    assert_same(src, t)
    rp = Repository.open(LocalStorage(str(b)))
    man = list(rp.load_manifest(rp.list_snapshots()[-1]).entries())
    files = [e for e in man if e.type == "file" and 1000 < e.size < SMALL_FILE_BYTES and e.chunks
             and not e.path.endswith("0")]
    victim = files[len(files) // 3]
    loc = rp.index.get(victim.chunks[0])
    pack = b / fmt.pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.offset + 1] ^= 0x80
    pack.write_bytes(bytes(data))
    t2 = tmp_path / "t2"
    t2.mkdir()
    (t2 / "mine").write_bytes(b"keep")
    before = exact(t2)
    r = run_drsync("backup", "restore", b, "--target", t2, "--delete-extra")
    assert r.code == 3 and victim.path in r.err and len(r.err.strip().splitlines()) == 1, r.err[-2000:]
    assert exact(t2) == before
