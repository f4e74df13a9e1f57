"""Breaker s39: restores and applies of hostile trees, compared byte for byte and by metadata with a
comparison of our own (not drsync's verify), after the change that builds entries without
``dataclasses.replace``, fills the apply's staged entries from the chunk columns only, skips the
domain walk with no mount point below the root and gives heap pages back between phases.

Every case is a real process (the CLI) on a real filesystem; the snapshots are taken with small
manifest row groups (``ROW_GROUP`` set in the capturing process) so that a restore, which reads its
manifest lean, takes chunk columns from many row groups."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from drsync import fsutil
from tests.conftest import run_drsync
from tests.fsmake import open_deep

ROOT = Path(__file__).resolve().parent.parent
AM_ROOT = os.geteuid() == 0
MiB = 1024 * 1024
KiB = 1024


# --- running the CLI with small manifest row groups ----------------------------------------

_SMALL_GROUPS = ("import sys, drsync.repository.manifest as m; m.ROW_GROUP = int(sys.argv[1]); "
                 "sys.argv = ['drsync', *sys.argv[2:]]; from drsync.cli import run; run()")


def drs(*args: Any, groups: int | None = None, env: dict[str, str] | None = None, timeout: float = 300):  # type: ignore[no-untyped-def]
    """The CLI as a real process; ``groups``: manifests written with row groups of that many rows."""
    if groups is None:
        return run_drsync(*args, env=env, timeout=timeout)
    proc = subprocess.run([sys.executable, "-c", _SMALL_GROUPS, str(groups), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    from tests.conftest import Result
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(r):  # type: ignore[no-untyped-def]
    assert r.code == 0, (r.code, r.out[-2000:], r.err[-4000:])
    return r


def init(repo: Path) -> str:
    ok(drs("init", "--repo", repo, "--cluster-id", "east", "--release", "6.2.1"))
    return str(repo)


def snap(repo: str, src: Path, name: str, groups: int | None = 3) -> str:
    age(src)
    r = ok(drs("snapshot", "create", "--repo", repo, "--source", src, "--name", name, "--json", groups=groups))
    doc = r.json()
    return str(doc.get("id") or doc["snapshot"]["id"])


def restore(repo: str, ref: str, target: Path, *extra: str) -> Any:
    return drs("snapshot", "restore", ref, "--repo", repo, "--target", target, *extra)


# --- trees ---------------------------------------------------------------------------------


def age(root: Path, seconds: int = 30) -> None:
    """Every mtime moved into the past (no 'racy' re-reads), through descriptors (any name, any depth)."""
    for _dp, dirs, files, dfd in os.fwalk(os.fsencode(root), topdown=False):
        for name in files + dirs:
            s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if s.st_mtime_ns > time.time_ns() - 10 * 10**9:
                os.utime(name, ns=(s.st_atime_ns, s.st_mtime_ns - seconds * 10**9), dir_fd=dfd,
                         follow_symlinks=False)
    s = os.stat(root)
    if s.st_mtime_ns > time.time_ns() - 10 * 10**9:
        os.utime(root, ns=(s.st_atime_ns, s.st_mtime_ns - seconds * 10**9))


def acl_blob(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_access value: (tag, perm, id) entries after the version-2 header."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


def _wr(p: Path | bytes, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


def deep_dir(top: Path, depth: int) -> bytes:
    """A directory ``depth`` levels of 200-byte names below ``top`` (beyond PATH_MAX), made through
    descriptors; returns its path relative to ``top`` (bytes)."""
    name = b"d" * 200
    fd = open_deep(top, [name] * depth)
    try:
        for leaf, data in ((b"leaf.bin", b"deep!" * 999), (b"\xff-deep-\n", b"")):
            wfd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640, dir_fd=fd)
            os.write(wfd, data)
            os.close(wfd)
        os.symlink(b"leaf.bin", b"leaf-link", dir_fd=fd)
    finally:
        os.close(fd)
    return b"/".join([name] * depth)


def sparse(p: Path, size: int, runs: list[tuple[int, bytes]]) -> None:
    with open(p, "wb") as f:
        f.truncate(size)
        for at, data in runs:
            f.seek(at)
            f.write(data)


def hostile_tree(root: Path, seed: int = 1) -> None:
    """What a restore must carry, in odd shapes."""
    import random
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    b = os.fsencode(root)
    # names: non-UTF-8, newlines, tabs, a leading dash, spaces, a name sorting around "/"
    odd = [b"caf\xe9", b"new\nline", b"tab\there", b"-dash", b" sp ace ", b"a.b", b"a-", b"a0", b"\x01ctl",
           "snow\u2603".encode()]
    (root / "odd").mkdir()
    for i, n in enumerate(odd):
        _wr(os.path.join(b, b"odd", n), f"odd {i}\n".encode() * (i + 1))
    os.mkdir(os.path.join(b, b"odd", b"dir\xff\nx"))
    _wr(os.path.join(b, b"odd", b"dir\xff\nx", b"in\xfe"), b"inner")
    # a / a.b / a-b ordering around the separator
    for n in ("x", "x.y", "x-y", "x0"):
        (root / "order" / n).mkdir(parents=True, exist_ok=True)
        (root / "order" / n / "f").write_bytes(n.encode())
    # sizes at and around chunk bounds, many chunks, zeros
    sz = root / "sizes"
    sz.mkdir()
    for n, size in (("empty", 0), ("one", 1), ("min", 64 * KiB), ("min-1", 64 * KiB - 1), ("max", MiB),
                    ("max+1", MiB + 1), ("2max", 2 * MiB), ("avg", 256 * KiB)):
        _wr(sz / n, rnd.randbytes(size))
    _wr(sz / "zeros-2max", bytes(2 * MiB))  # two identical chunks in one file
    _wr(sz / "many", rnd.randbytes(9 * MiB + 12345))  # dozens of chunks
    _wr(sz / "many-copy", (sz / "many").read_bytes())  # the same chunks, not a link
    # sparse files: holes at the start, middle, end; all hole
    sp = root / "sparse"
    sp.mkdir()
    sparse(sp / "mid", 8 * MiB, [(0, rnd.randbytes(4096)), (5 * MiB, rnd.randbytes(8192))])
    sparse(sp / "lead", 3 * MiB, [(2 * MiB + 4096, rnd.randbytes(4096))])
    sparse(sp / "tail", 5 * MiB, [(0, rnd.randbytes(12288))])
    sparse(sp / "all-hole", 4 * MiB, [])
    # hard links across directories, a group with an odd name, a linked empty file, a linked sparse file
    hl = root / "hl"
    (hl / "one").mkdir(parents=True)
    (hl / "two" / "three").mkdir(parents=True)
    _wr(hl / "one" / "orig", rnd.randbytes(300 * KiB))
    os.link(hl / "one" / "orig", hl / "two" / "three" / "alias")
    os.link(hl / "one" / "orig", os.path.join(os.fsencode(hl), b"two", b"\xfflink\n"))
    _wr(hl / "one" / "empty", b"")
    os.link(hl / "one" / "empty", hl / "two" / "empty-too")
    os.link(sp / "mid", hl / "sparse-alias")
    # modes: setuid, setgid, sticky, odd bits, a read-only directory with content, an unlistable one
    md = root / "modes"
    md.mkdir()
    for n, m in (("suid", 0o4755), ("sgid", 0o2750), ("none", 0o000), ("wo", 0o222), ("x", 0o111)):
        _wr(md / n, n.encode())
        os.chmod(md / n, m)
    (md / "sticky").mkdir()
    (md / "sticky" / "f").write_bytes(b"s")
    os.chmod(md / "sticky", 0o1777)
    (md / "ro").mkdir()
    (md / "ro" / "inside").write_bytes(b"ro")
    (md / "ro" / "sub").mkdir()
    os.chmod(md / "ro" / "sub", 0o555)
    os.chmod(md / "ro", 0o555)
    (md / "sgid-dir").mkdir()
    os.chmod(md / "sgid-dir", 0o2775)
    # owners
    if AM_ROOT:
        os.chown(md / "suid", 1234, 5678)
        os.chown(md / "sticky", 4321, 99)
        os.lchown(md / "x", 0, 7)
    # xattrs and ACLs
    xa = root / "xattr"
    xa.mkdir()
    _wr(xa / "f", b"x")
    os.setxattr(xa / "f", b"user.plain", b"value")
    os.setxattr(xa / "f", b"user.binary\xff", bytes(range(256)))
    os.setxattr(xa / "f", b"user.empty", b"")
    _wr(xa / "acl", b"acl")
    os.setxattr(xa / "acl", "system.posix_acl_access",
                acl_blob([(1, 6, 0xFFFFFFFF), (2, 4, 1001), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
                          (0x20, 0, 0xFFFFFFFF)]))
    (xa / "dacl").mkdir()
    os.setxattr(xa / "dacl", "system.posix_acl_default",
                acl_blob([(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)]))
    os.setxattr(xa / "dacl", b"user.on-dir", b"d")
    # symlinks: inside, dangling-inside, to a directory, absolute to outside (not carried), with odd bytes
    ln = root / "links"
    ln.mkdir()
    os.symlink("../sizes/one", ln / "rel")
    os.symlink("../hl", ln / "to-dir")
    os.symlink("nothing-here", ln / "dangling")
    os.symlink(os.fsencode("../odd/caf") + b"\xe9", os.path.join(os.fsencode(ln), b"bytes\xfe"))
    os.symlink("/etc/passwd", ln / "outside-abs")
    os.symlink("../../../../../etc", ln / "outside-rel")
    # empty directories, nested
    (root / "empty" / "a" / "b" / "c").mkdir(parents=True)
    # times: before 1970, far future, nanoseconds
    tm = root / "times"
    tm.mkdir()
    for n, t in (("old", -86_400 * 365 * 20 * 10**9 + 7), ("future", 4_102_444_800 * 10**9 + 999_999_999),
                 ("ns", 1_600_000_000_123_456_789)):
        _wr(tm / n, n.encode())
        os.utime(tm / n, ns=(t, t))
    os.utime(ln / "rel", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001), follow_symlinks=False)
    # deep paths beyond PATH_MAX
    (root / "deep").mkdir()
    deep_dir(root / "deep", 24)


# --- comparing trees -----------------------------------------------------------------------

# Not carried by drsync (documented): links leading outside the root.
NOT_CARRIED = {b"links/outside-abs", b"links/outside-rel"}


def _hole_map(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents by SEEK_DATA/SEEK_HOLE, rounded to 4 KiB."""
    return [(d // 4096, (h + 4095) // 4096) for d, h in fsutil.data_ranges(fd, size)]


def tree_meta(root: Path, *, holes: bool = True) -> dict[bytes, tuple]:
    """Everything of a tree a restore must reproduce, by relative path (bytes): type, mode, owners,
    mtime (ns), xattrs, bytes (digest), link target, hard-link group (first path of the group), data
    extents of sparse files. drsync's own files (``.drsync*`` at the top) are left out."""
    out: dict[bytes, tuple] = {}
    groups: dict[tuple[int, int], bytes] = {}
    broot = os.fsencode(root)  # the root itself has no row in a manifest (docs/FORMAT.md): not compared
    for dp, dirs, files, dfd in os.fwalk(broot):
        rel_dir = os.path.relpath(dp, broot)
        rel_dir = b"" if rel_dir == b"." else rel_dir
        if rel_dir == b"":
            dirs[:] = [d for d in dirs if not d.startswith(b".drsync")]
            files = [f for f in files if not f.startswith(b".drsync")]
        dirs.sort()
        for name in sorted(dirs + files):
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rel in NOT_CARRIED:
                continue
            s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            common = (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=dfd), s.st_uid, s.st_gid, s.st_mtime_ns)
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = ("dir", *common, _xattrs(name, dfd))
            elif stat.S_ISREG(s.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    h = hashlib.blake2b()
                    while piece := os.read(fd, MiB):
                        h.update(piece)
                    ext = _hole_map(fd, s.st_size) if holes and s.st_blocks * 512 < s.st_size else None
                finally:
                    os.close(fd)
                group = None
                if s.st_nlink > 1:
                    group = groups.setdefault((s.st_dev, s.st_ino), rel)
                out[rel] = ("file", *common, s.st_size, h.hexdigest(), _xattrs(name, dfd), group, ext)
            else:
                out[rel] = ("other", *common)
    return out


def _xattrs(name: bytes, dfd: int | None) -> tuple:
    path = name if dfd is None else f"/proc/self/fd/{dfd}/".encode() + name
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def diff_trees(a: dict, b: dict) -> list[str]:
    bad = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            bad.append(f"{k!r}: {a.get(k)!r:.300} != {b.get(k)!r:.300}")
    return bad


def assert_same(src: Path, dst: Path, **kw: Any) -> None:
    bad = diff_trees(tree_meta(src, **kw), tree_meta(dst, **kw))
    assert not bad, "\n".join(bad[:40])


# --- fresh, no-change, delta and dry-run restores of a hostile tree -------------------------


def two_snapshots(tmp_path: Path, src: Path) -> tuple[str, str, Any, str, Any]:
    """A repository with snapshot ``one`` of ``src``, then ``two`` after :func:`mutate`: (repo, s1, its tree's
    metadata, s2, its tree's metadata)."""
    repo = init(tmp_path / "repo")
    s1 = snap(repo, src, "one")
    m1 = tree_meta(src)
    mutate(src)
    s2 = snap(repo, src, "two")
    return repo, s1, m1, s2, tree_meta(src)


def test_a_hostile_tree_restores_exactly_fresh_and_again_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hostile_tree(src)
    repo = init(tmp_path / "repo")
    sid = snap(repo, src, "hostile")
    out = tmp_path / "out"
    ok(restore(repo, sid, out))
    assert_same(src, out)
    # a restore of the same snapshot onto its own result changes nothing and lists nothing
    before = tree_meta(out)
    r = ok(restore(repo, sid, out, "--dry-run", "--json"))
    print(r.out)
    ok(restore(repo, sid, out, "--overwrite", "--delete-extra"))
    assert not diff_trees(before, tree_meta(out))


def mutate(root: Path) -> None:
    """The next version of :func:`hostile_tree`: every kind of type change and metadata-only change."""
    import random
    rnd = random.Random(2)
    b = os.fsencode(root)
    # file -> dir, dir -> file, file -> symlink, symlink -> file, symlink -> dir, dir -> symlink
    os.unlink(root / "sizes" / "one")
    (root / "sizes" / "one").mkdir()
    (root / "sizes" / "one" / "now-inside").write_bytes(b"was a file")
    shutil.rmtree(root / "empty" / "a")
    (root / "empty" / "a").write_bytes(b"was a dir tree")
    os.unlink(root / "sizes" / "min")
    os.symlink("max", root / "sizes" / "min")
    os.unlink(root / "links" / "rel")
    (root / "links" / "rel").write_bytes(b"was a link")
    os.unlink(root / "links" / "dangling")
    (root / "links" / "dangling" / "sub").mkdir(parents=True)
    shutil.rmtree(root / "order" / "x")
    os.symlink("x.y", root / "order" / "x")
    # a directory replaced by a link to one of its old children's directory, with hard links leaving
    shutil.rmtree(root / "hl" / "one")
    os.symlink("two/three", root / "hl" / "one")
    # hard links: a group broken (same bytes, separate file), a new group of previously separate files
    alias = root / "hl" / "two" / "three" / "alias"
    data = alias.read_bytes()
    os.unlink(alias)
    _wr(alias, data)
    os.unlink(root / "sizes" / "many-copy")
    os.link(root / "sizes" / "many", root / "sizes" / "many-copy")
    # sparse -> dense, dense -> sparse (same size)
    _wr(root / "sparse" / "tail", rnd.randbytes(5 * MiB))
    sparse(root / "sizes" / "2max", 2 * MiB, [(MiB, rnd.randbytes(4096))])
    # metadata only: mode, owner, xattr, ACL removed, mtime
    os.chmod(root / "modes" / "suid", 0o755)
    if AM_ROOT:
        os.chown(root / "modes" / "sgid", 2222, 3333)
    os.setxattr(root / "xattr" / "f", b"user.plain", b"changed")
    os.removexattr(root / "xattr" / "f", b"user.empty")
    os.removexattr(root / "xattr" / "acl", "system.posix_acl_access")
    os.utime(root / "times" / "ns", ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    # a read-only directory gains and loses a file; a file in an unwritable place changes bytes
    os.chmod(root / "modes" / "ro", 0o755)
    (root / "modes" / "ro" / "inside").unlink()
    (root / "modes" / "ro" / "new").write_bytes(b"new")
    os.chmod(root / "modes" / "ro", 0o555)
    # odd names: one renamed, one rewritten (a different size), one new beside the old
    os.rename(os.path.join(b, b"odd", b"new\nline"), os.path.join(b, b"odd", b"new\nline\n2"))
    _wr(os.path.join(b, b"odd", b"caf\xe9"), b"other bytes")
    _wr(os.path.join(b, b"odd", b"caf\xc3\xa9"), b"utf-8 sibling")
    # deep: the leaf rewritten, a level turned into a file
    deep = os.path.join(b, b"deep", *([b"d" * 200] * 24))
    fd = os.open(os.path.join(b, b"deep"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(23):
            nfd = os.open(b"d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(b"d" * 200 + b"/leaf.bin", os.O_WRONLY | os.O_TRUNC, dir_fd=fd)
        os.write(wfd, b"changed deep")
        os.close(wfd)
        os.mkdir(b"new-deep-dir", dir_fd=fd)
    finally:
        os.close(fd)
    del deep
    # an empty file gets bytes; a file empties
    _wr(root / "sizes" / "empty", b"now something")
    _wr(root / "sizes" / "avg", b"")


def test_type_changes_apply_both_ways_and_delta_restores_equal_fresh_ones(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hostile_tree(src)
    repo, s1, m1, s2, m2 = two_snapshots(tmp_path, src)
    assert diff_trees(m1, m2)

    fresh2 = tmp_path / "fresh2"
    ok(restore(repo, s2, fresh2))
    assert not diff_trees(m2, tree_meta(fresh2)), "\n".join(diff_trees(m2, tree_meta(fresh2))[:40])

    out = tmp_path / "out"
    ok(restore(repo, s1, out))
    assert not diff_trees(m1, tree_meta(out))
    for ref, want in ((s2, m2), (s1, m1), (s2, m2), (s2, m2)):
        ok(restore(repo, ref, out, "--overwrite", "--delete-extra"))
        bad = diff_trees(want, tree_meta(out))
        assert not bad, f"after restoring {ref}:\n" + "\n".join(bad[:40])
        assert not [n for n in os.listdir(out) if n.startswith(".drsync") and n != ".drsync-staging"]


# --- filesystems mounted inside the target ----------------------------------------------------


class Mounts:
    def __init__(self) -> None:
        self.points: list[bytes] = []

    def mount(self, path: bytes) -> None:
        r = subprocess.run([b"mount", b"-t", b"tmpfs", b"-o", b"size=96m", b"tmpfs", path], capture_output=True)
        assert r.returncode == 0, r.stderr
        self.points.append(path)

    def undo(self) -> None:
        for p in reversed(self.points):
            subprocess.run([b"umount", b"-l", p], capture_output=True, check=False)
        self.points.clear()


@pytest.fixture
def mounts():  # type: ignore[no-untyped-def]
    m = Mounts()
    yield m
    m.undo()


# Mount points for the hostile tree: plain, nested, with a newline, a space and a non-UTF-8 byte, and one
# that splits hard-link groups (hl/one/orig and hl/two/...).
MOUNTED = [b"sparse", b"hl/two", b"hl/two/three", b"odd/dir\xff\nx", b"sizes"]


def without_groups(m: dict) -> dict:
    """Hard-link groups left out (a group spanning two filesystems is written as copies, by design)."""
    return {k: (v[:8] + v[9:] if v[0] == "file" else v) for k, v in m.items()}


@pytest.mark.parametrize("points", [
    pytest.param([b"odd/dir\xff\nx", b"sizes", b"deep", b"empty"], id="groups-kept-whole"),
    pytest.param(MOUNTED, id="groups-split"),  # finding 1: false "chunk is not in the repository"
])
def test_a_restore_onto_a_target_with_mount_points_below_it_is_exact_and_stages_on_each(
        tmp_path: Path, mounts: Mounts, points: list[bytes]) -> None:
    src = tmp_path / "src"
    hostile_tree(src)
    _wr(src / "sizes" / "in-mount-a", b"linked on the mount" * 100)
    os.link(src / "sizes" / "in-mount-a", src / "sizes" / "in-mount-b")
    repo, s1, m1, s2, m2 = two_snapshots(tmp_path, src)

    out = tmp_path / "out"
    for p in points:
        os.makedirs(os.path.join(os.fsencode(out), p), exist_ok=True)
        mounts.mount(os.path.join(os.fsencode(out), p))
    devs = {p: os.stat(os.path.join(os.fsencode(out), p)).st_dev for p in points}
    assert len(set(devs.values())) == len(points)

    for ref, want in ((s1, m1), (s2, m2), (s1, m1)):
        r = restore(repo, ref, out, "--overwrite", "--delete-extra", "--json")
        ok(r)
        got = tree_meta(out)
        bad = diff_trees(without_groups(want), without_groups(got))
        assert not bad, f"after restoring {ref}:\n" + "\n".join(bad[:40])
        # still mounted where they were; no staging area left on any filesystem
        for p, dev in devs.items():
            assert os.stat(os.path.join(os.fsencode(out), p)).st_dev == dev
            assert b".drsync-staging" not in os.listdir(os.path.join(os.fsencode(out), p))
        # a group inside one filesystem stays one group
        if ref == s1:
            a, b2 = os.stat(out / "sizes" / "in-mount-a"), os.stat(out / "sizes" / "in-mount-b")
            assert (a.st_dev, a.st_ino) == (b2.st_dev, b2.st_ino)
        # files below each mount point live on it
        for rel, v in got.items():
            dom = max((p for p in points if rel.startswith(p + b"/")), key=len, default=None)
            if v[0] == "file" and dom is not None and len(rel) < 3000:  # (paths beyond PATH_MAX: by walk)
                assert os.stat(os.path.join(os.fsencode(out), rel), follow_symlinks=False).st_dev == devs[dom]


def test_a_hard_link_group_split_by_a_mount_point_restores_when_only_its_copy_and_another_file_are_written(
        tmp_path: Path, mounts: Mounts) -> None:
    """Finding 1. ``b`` is a filesystem mounted in the target, so ``b/g`` (a hard link of ``a/f``) is written as
    a copy. A restore that must write that copy and some other file (here ``c/other``, deleted from the
    target) but not ``a/f`` fails with "chunk ... is not in the repository" (exit 3, an integrity error) although
    the repository holds every chunk: the copies are added to the write list (``check_plan``) after the
    chunk readers were sized and located for it (``PartReaders``)."""
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
    _wr(src / "a" / "f", os.urandom(300_000))
    os.link(src / "a" / "f", src / "b" / "g")
    _wr(src / "c" / "other", os.urandom(1000))
    repo = init(tmp_path / "repo")
    sid = snap(repo, src, "one")
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    mounts.mount(os.fsencode(out / "b"))
    ok(restore(repo, sid, out, "--overwrite"))  # the mount's root directory holds another mode: set back
    (out / "c" / "other").unlink()
    r = restore(repo, sid, out, "--overwrite", "--delete-extra")
    assert r.code == 0, r.err
    assert without_groups(tree_meta(src)) == without_groups(tree_meta(out))
    assert ok(drs("repo", "verify", "--repo", repo))


# --- kill -9 of the standby's apply of a hostile tree with type changes -----------------------


def _crash_job(job: dict) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    import json
    return subprocess.run([sys.executable, "-m", "tests.crashdriver", "run", json.dumps(job)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_killed_apply_of_hostile_type_changes_recovers_to_exactly_one_snapshot(tmp_path: Path) -> None:
    """The standby's apply (whole manifest, a journal in a state directory) killed by SIGKILL at steps around
    its journal's "commit" record, in its commit and in its close; then recovered as the agent does at start
    (``recover_apply``): the target is exactly the old snapshot (killed before the record) or the new one
    (after), metadata included; a real ``drsync snapshot restore`` of the new one then gives the new one."""
    import json
    src = tmp_path / "src"
    hostile_tree(src)
    repo, s1, m1, s2, m2 = two_snapshots(tmp_path, src)
    state = tmp_path / "state"
    state.mkdir()
    journal = str(state / "apply.journal")

    def fresh(name: str) -> Path:
        t = tmp_path / name
        ok(restore(repo, s1, t))
        assert not diff_trees(m1, tree_meta(t))
        return t

    counts = tmp_path / "counts.json"
    t0 = fresh("count")
    r = _crash_job({"op": "apply", "repo": repo, "snapshot": s2, "target": str(t0), "journal": journal,
                    "kill_at": 0, "count_file": str(counts)})
    assert r.returncode == 0, r.stderr
    assert not diff_trees(m2, tree_meta(t0)), "\n".join(diff_trees(m2, tree_meta(t0))[:30])
    c = json.loads(counts.read_text())
    stage, commit, close = c["stage"], c["commit"], c["close"]
    assert commit > 10, c
    problems = []
    for k in sorted({stage, stage + 1, stage + 2, stage + commit // 3, stage + commit // 2, stage + commit,
                     stage + commit + 1, stage + commit + close}):
        t = fresh(f"kill-{k}")
        note = tmp_path / f"note-{k}"
        r = _crash_job({"op": "apply", "repo": repo, "snapshot": s2, "target": str(t), "journal": journal,
                        "kill_at": k, "note_file": str(note)})
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr[-2000:])
        r = _crash_job({"op": "recover", "target": str(t), "journal": journal, "kill_at": 0})
        assert r.returncode == 0, (k, r.stderr[-3000:])
        want = m1 if k <= stage else m2
        bad = diff_trees(want, tree_meta(t))
        left = [n for n in os.listdir(t) if n.startswith(".drsync")]
        if bad or left or os.path.exists(journal):
            problems.append(f"killed at {k} ({note.read_text().strip() if note.exists() else '?'}): "
                            f"{left} journal={os.path.exists(journal)}\n  " + "\n  ".join(bad[:8]))
        ok(restore(repo, s2, t, "--overwrite", "--delete-extra"))
        bad = diff_trees(m2, tree_meta(t))
        if bad:
            problems.append(f"killed at {k}, then restored: " + "\n  ".join(bad[:8]))
        shutil.rmtree(t)
    assert not problems, "\n".join(problems)


def test_dry_run_and_real_restore_agree_on_a_hard_link_copied_across_a_mount_point(tmp_path: Path,
                                                                                 mounts: Mounts) -> None:
    """Finding 2. With ``b`` a filesystem mounted in the target, ``b/g`` (a hard link of ``a/f``) is written as a
    copy. Restoring the same snapshot again (nothing changed) the dry run said it would write 0 files and
    overwrite ``b/g``; the real run then wrote 1 file (the copy, every time): the dry run counts what the run
    writes now (the root's plan check runs before both)."""
    import json
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    _wr(src / "a" / "f", os.urandom(300_000))
    os.link(src / "a" / "f", src / "b" / "g")
    repo = init(tmp_path / "repo")
    sid = snap(repo, src, "one")
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    mounts.mount(os.fsencode(out / "b"))
    ok(restore(repo, sid, out, "--overwrite"))  # the mount's root directory holds another mode: set back
    dry = json.loads(ok(restore(repo, sid, out, "--overwrite", "--delete-extra", "--dry-run", "--json")).out)
    real = json.loads(ok(restore(repo, sid, out, "--overwrite", "--delete-extra", "--json")).out)
    assert without_groups(tree_meta(src)) == without_groups(tree_meta(out))
    assert (dry["written_files"], dry["written_bytes"]) == (real["written_files"], real["written_bytes"]), (dry, real)
    # Was left (s39): the copy was written again by every restore. Now (s58) a name whose group's first file lies
    # on another filesystem, held alike as a file of its own, is the copy, and done.
    assert real["written_files"] == 0 and real["unchanged_files"] == 2, real


def test_a_dry_run_onto_another_snapshots_tree_lists_every_path_whose_type_bytes_or_target_change(
        tmp_path: Path) -> None:
    import json
    src = tmp_path / "src"
    hostile_tree(src)
    repo, s1, m1, s2, m2 = two_snapshots(tmp_path, src)
    out = tmp_path / "out"
    ok(restore(repo, s1, out))
    dry = json.loads(ok(restore(repo, s2, out, "--overwrite", "--delete-extra", "--dry-run", "--json")).out)
    assert not diff_trees(m1, tree_meta(out)), "a dry run changed the target"
    listed = {os.fsencode(p) for ps in dry["planned"].values() for p in ps}

    def covered(p: bytes) -> bool:
        while p:
            if p in listed:
                return True
            p = p.rpartition(b"/")[0]
        return False

    def essence(v: tuple | None) -> tuple | None:  # type: ignore[type-arg]
        if v is None:
            return None
        return {"file": lambda: ("file", v[5], v[6]), "link": lambda: ("link", v[1]),
                "dir": lambda: ("dir",)}[v[0]]()
    changed = [k for k in set(m1) | set(m2) if essence(m1.get(k)) != essence(m2.get(k))]
    assert changed
    missing = sorted(k for k in changed if not covered(k))
    assert not missing, missing
    real = json.loads(ok(restore(repo, s2, out, "--overwrite", "--delete-extra", "--json")).out)
    assert not diff_trees(m2, tree_meta(out))
    assert dry["written_files"] == real["written_files"], (dry, real)


def test_the_standbys_whole_manifest_apply_onto_mount_points_fills_copies_listed_out_of_row_order(
        tmp_path: Path, mounts: Mounts) -> None:
    """The standby's apply (a whole manifest of many record batches) onto a target with mount points that
    split hard-link groups: the copies are appended to the write list after the rest (their rows out of
    order), and each staged file must still get its own row's chunks."""
    src = tmp_path / "src"
    hostile_tree(src)
    repo = init(tmp_path / "repo")
    s1 = snap(repo, src, "one")
    out = tmp_path / "out"
    for p in MOUNTED:
        os.makedirs(os.path.join(os.fsencode(out), p), exist_ok=True)
        mounts.mount(os.path.join(os.fsencode(out), p))
    r = _crash_job({"op": "apply", "repo": repo, "snapshot": s1, "target": str(out),
                    "journal": str(tmp_path / "journal"), "kill_at": 0})
    assert r.returncode == 0, r.stderr[-3000:]
    bad = diff_trees(without_groups(tree_meta(src)), without_groups(tree_meta(out)))
    assert not bad, "\n".join(bad[:30])


def test_give_back_from_many_threads_while_restoring_never_raises_and_changes_nothing(tmp_path: Path) -> None:
    """``allocators.give_back`` called from threads while a restore runs in the same process (and with no
    malloc_trim, as where glibc is absent): no error, the same tree."""
    code = (
        "import sys, threading\n"
        "from drsync import allocators, engine\n"
        "stop = threading.Event()\n"
        "def spin():\n"
        "    while not stop.is_set():\n"
        "        allocators.give_back()\n"
        "ts = [threading.Thread(target=spin) for _ in range(2)]\n"
        "[t.start() for t in ts]\n"
        "repo = engine.open_repository(sys.argv[1])\n"
        "engine.restore_snapshot(repo, 'one', sys.argv[2], cluster_id='east', release='6.2.1')\n"
        "allocators._TRIM = None\n"
        "assert allocators.give_back() is None\n"
        "engine.restore_snapshot(repo, 'one', sys.argv[3], cluster_id='east', release='6.2.1')\n"
        "stop.set(); [t.join() for t in ts]\n")
    src = tmp_path / "src"
    hostile_tree(src)
    repo = init(tmp_path / "repo")
    snap(repo, src, "one")
    r = subprocess.run([sys.executable, "-c", code, repo, str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(src, tmp_path / "a")
    assert_same(src, tmp_path / "b")
