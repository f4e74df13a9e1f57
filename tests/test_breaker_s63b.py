"""Breaker s63b: 07589bf (a walk opens each directory beneath the root, read-ahead holds no descriptor, a failed
read ahead is read again in turn), tried on odd setups and hostile moments of the walk."""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from drsync import engine, fsutil, native_walk
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage
from drsync.tree import scan_tree
from tests.test_breaker_s63 import _with_spare_descriptors, assert_alike, open_fds, scanned
from tests.users import NOBODY, call_as_nobody

pytestmark = pytest.mark.skipif(not native_walk.available(), reason="the C listing is not built")

ALL = (0, 1 << 62)  # every directory read ahead
NONE = (1, 0)  # none
DRSYNC = str(Path(sys.executable).with_name("drsync"))


def ahead(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(native_walk, "PREFETCH_DIR_BYTES", ALL if on else NONE)


def paths_of(rows: list) -> list[bytes]:
    return [r["path"] for r in rows]


def mkfile(path: bytes, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------------------------------
# Odd setups of the root


@pytest.mark.parametrize("read_ahead", [True, False])
def test_root_named_through_a_chain_of_symlinks_lists_everything_alike(tmp_path: Path, read_ahead: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ahead(monkeypatch, read_ahead)
    real = tmp_path / "real"
    for d in ("a/b/c", "a-b", "...", "z/y"):
        (real / d).mkdir(parents=True)
        (real / d / "f").write_bytes(d.encode())
    (tmp_path / "l1").symlink_to(real)
    (tmp_path / "hop").mkdir()
    (tmp_path / "hop" / "l2").symlink_to("../l1")
    fds = open_fds()
    rows = assert_alike(tmp_path / "hop" / "l2")
    paths = paths_of(rows)
    for d in ("a/b/c", "a-b", "...", "z/y"):
        assert d.encode() + b"/f" in paths
    c = scan_tree(str(tmp_path / "hop" / "l2"), native=True)
    c.table()
    assert c.unlisted == [] and c.vanished == [] and c.warnings.lines() == []
    gc.collect()
    assert open_fds() <= fds


@pytest.fixture
def mounted(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``real`` with a tmpfs mounted at ``real/mnt`` and one at ``real/mnt/inner``, and ``bind``: a bind mount
    of ``real`` (the data root itself a mount point)."""
    real, bind = tmp_path / "real", tmp_path / "bind"
    (real / "mnt").mkdir(parents=True)
    (real / "plain").mkdir()
    (real / "plain" / "f").write_bytes(b"p")
    bind.mkdir()
    done: list[Path] = []

    def mount(*args: str) -> None:
        r = subprocess.run(["mount", *args], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.decode().strip()}")
        done.append(Path(args[-1]))

    try:
        mount("-t", "tmpfs", "tmpfs", str(real / "mnt"))
        (real / "mnt" / "inner").mkdir()
        (real / "mnt" / "f").write_bytes(b"on tmpfs")
        mount("-t", "tmpfs", "tmpfs", str(real / "mnt" / "inner"))
        (real / "mnt" / "inner" / "deep").mkdir()
        (real / "mnt" / "inner" / "deep" / "g").write_bytes(b"inner tmpfs")
        mount("--rbind", str(real), str(bind))
        yield real, bind
    finally:
        for p in reversed(done):
            subprocess.run(["umount", "-l", str(p)], capture_output=True)


@pytest.mark.parametrize("read_ahead", [True, False])
def test_nested_mounts_inside_a_bind_mounted_root_are_listed_alike(mounted, read_ahead: bool,  # type: ignore[no-untyped-def]
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ahead(monkeypatch, read_ahead)
    real, bind = mounted
    for root in (real, bind):
        rows = assert_alike(root)
        paths = paths_of(rows)
        assert b"mnt/f" in paths and b"mnt/inner/deep/g" in paths and b"plain/f" in paths
        c = scan_tree(str(root), native=True)
        c.table()
        assert c.unlisted == [] and c.warnings.lines() == []


# --------------------------------------------------------------------------------------------------
# Deep trees: past PATH_MAX (component by component) with an ancestor swapped for a link inside the root


@pytest.mark.parametrize("mode", ["ahead", "in-turn", "python"])
def test_deep_ancestor_swapped_for_link_to_its_new_place_inside_root(tmp_path: Path, mode: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of 160 directories of 40-byte names (6,400 bytes, past PATH_MAX). When the walk comes to depth
    120 (past LONG_PATH: opened component by component), the directory at depth 3 is moved to ``zz/moved``
    (inside the root) and a link to it planted in its place, and a file planted at depth 121 of the moved
    chain. Nothing below depth 120 may be listed under the old path (it is reached only through the link);
    the moved chain is listed at its new place; the depth-120 directory is unlisted, not dropped."""
    ahead(monkeypatch, mode == "ahead")
    root = tmp_path / "data"
    root.mkdir()
    (root / "zz").mkdir()
    rb = os.fsencode(root)
    names = [b"%02d" % i + b"d" * 38 for i in range(160)]
    fd = os.open(rb, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.mkdir(n, dir_fd=fd)
            mkfile_at(fd, b"f-" + n[:2])
            nxt = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    rel = [b"/".join(names[:k + 1]) for k in range(160)]
    swap_at = rel[119]
    real = fsutil.open_walked_dir
    swapped = threading.Event()

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == swap_at and not swapped.is_set():
            swapped.set()
            anc = os.fsdecode(rb + b"/" + rel[2])
            os.rename(anc, root / "zz" / "moved")
            os.symlink(b"../" * 2 + b"zz/moved", anc)
            # plant a file at depth 121 of the moved chain, through descriptors
            d = fsutil.open_beneath(str(root / "zz" / "moved"), os.fsdecode(b"/".join(names[3:121])),
                                    os.O_RDONLY | os.O_DIRECTORY)
            try:
                mkfile_at(d, b"planted")
            finally:
                os.close(d)
        return real(r, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    scan = scan_tree(str(root), native=mode != "python")
    paths = scan.table().column("path").to_pylist()
    assert swapped.is_set()
    old_planted = rel[120] + b"/planted"
    new_planted = b"zz/moved/" + b"/".join(names[3:121]) + b"/planted"
    assert old_planted not in paths
    assert not any(p.startswith(rel[119] + b"/") for p in paths), "listed through the planted link"
    if mode != "ahead":  # read ahead, "zz" was listed (empty) before the move: taken as it was then
        assert new_planted in paths, "the moved chain was not listed at its new place"
    assert os.fsdecode(swap_at) in scan.unlisted
    assert all(p == sorted(paths)[i] for i, p in enumerate(paths))


def mkfile_at(dfd: int, name: bytes, data: bytes = b"x") -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Directories moved inside the root, or swapped for links to inside it, mid-walk: captures with a parent


def _tree(root: Path) -> None:
    for d in ("a", "m", "m/sub", "z"):
        (root / d).mkdir(parents=True)
        for i in range(5):
            (root / d / f"f{i}").write_bytes(f"{d}/{i}".encode())
    (root / "a" / "only-in-a").write_bytes(b"a")
    past = 1_600_000_000
    for p in root.rglob("*"):
        os.utime(p, (past, past))


@pytest.mark.parametrize("how", ["renamed-into-walked-part", "link-to-inside", "ancestor-link-to-inside"])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_directory_moved_or_swapped_inside_the_root_mid_walk_is_never_dropped(
        tmp_path: Path, how: str, read_ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    ahead(monkeypatch, read_ahead)
    root = tmp_path / "data"
    _tree(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    before = {e.path for e in repo.load_manifest(first).entries()}
    real = fsutil.open_walked_dir
    seen: list[str] = []
    target = b"m/sub" if how == "ancestor-link-to-inside" else b"m"

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == target and not seen:
            seen.append(threading.current_thread().name)
            if how == "renamed-into-walked-part":
                os.rename(root / "m", root / "a" / "m-moved")  # "a" was walked already
            elif how == "link-to-inside":
                os.rename(root / "m", tmp_path / "m-aside")
                (root / "m").symlink_to("a")  # a directory inside the root, of other content
            else:
                os.rename(root / "m", root / "z" / "m")  # walked later, under its new name
                (root / "m").symlink_to("z/m")
                (root / "z" / "m" / "sub" / "planted").write_bytes(b"new")
        return real(r, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert seen
    paths = {e.path for e in repo.load_manifest(info).entries()}
    assert "m/only-in-a" not in paths, "listed the link's target under the link's name"
    assert "m/sub/planted" not in paths, "listed through an ancestor swapped for a link"
    if how == "ancestor-link-to-inside" and not read_ahead:  # read ahead, "z" was listed before the move
        assert "z/m/sub/planted" in paths
    assert {p for p in before if p.startswith("m/")} <= paths, "a directory swapped mid-walk was dropped"
    assert info.stale_paths > 0


# --------------------------------------------------------------------------------------------------
# A directory (or an ancestor) made unlistable mid-walk, as a non-root user


@pytest.mark.parametrize("which", ["itself", "ancestor", "itself-0444"])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_made_unlistable_mid_walk_as_nobody_keeps_its_content_stale(open_tmp: Path, which: str,
                                                                    read_ahead: bool) -> None:
    root = open_tmp / "data"
    for d in ("a", "b/c/d", "b/e", "z"):
        (root / d).mkdir(parents=True)
        for i in range(3):
            (root / d / f"f{i}").write_bytes(f"{d}/{i}".encode())
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(root)], check=True)

    def run():  # type: ignore[no-untyped-def]
        native_walk.PREFETCH_DIR_BYTES = ALL if read_ahead else NONE
        repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
        first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
        before = sorted(e.path for e in repo.load_manifest(first).entries())
        real = fsutil.open_walked_dir
        done: list[int] = []

        def hooked(r, rel_dir, abs_dir, examined):  # type: ignore[no-untyped-def]
            if rel_dir == b"b/c/d" and not done:
                done.append(1)
                if which == "ancestor":
                    os.chmod(root / "b" / "c", 0o000)
                elif which == "itself":
                    os.chmod(root / "b" / "c" / "d", 0o000)
                else:
                    os.chmod(root / "b" / "c" / "d", 0o444)  # listable, entries not examinable
            return real(r, rel_dir, abs_dir, examined)

        fsutil.open_walked_dir = hooked
        try:
            info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
        finally:
            fsutil.open_walked_dir = real
        after = sorted(e.path for e in repo.load_manifest(info).entries())
        return before, after, info.stale_paths, list(info.warnings)

    try:
        before, after, stale, warnings = call_as_nobody(run)
    finally:
        for d in ("b/c", "b/c/d"):
            os.chmod(root / d, 0o755)
    assert set(before) <= set(after), (sorted(set(before) - set(after)), warnings)
    assert stale > 0 and warnings


# --------------------------------------------------------------------------------------------------
# Passed-over places (reserved, excluded) holding links, with the read ahead failing and read again


@pytest.mark.parametrize("mode", ["ahead-fails-once", "ahead", "in-turn", "python"])
def test_links_through_passed_over_places_are_left_out_whatever_the_read_path(tmp_path: Path, mode: str,
                                                                              monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    ahead(monkeypatch, mode != "in-turn")
    root = tmp_path / "data"
    (root / "sub" / ".drsync-staging").mkdir(parents=True)
    (root / "sub" / ".drsync-staging" / "l").symlink_to("/etc")
    (root / "sub" / "ex" / "deeper").mkdir(parents=True)
    (root / "sub" / "ex" / "deeper" / "l").symlink_to("/etc")
    (root / "sub" / "plain").write_bytes(b"p")
    (root / "b1").symlink_to("sub/.drsync-staging/l")
    (root / "b2").symlink_to("sub/ex/deeper/l/passwd")
    (root / "b3").symlink_to("sub/ex")  # a directory inside the root: kept (its own target stays inside)
    (root / "ok").symlink_to("sub/plain")
    real = fsutil.open_walked_dir
    failed: list[str] = []

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"sub" and not failed and threading.current_thread().name.startswith("drsync-list"):
            failed.append("x")
            return "cannot be listed (Too many open files)"
        return real(r, rel_dir, abs_dir, examined)

    if mode == "ahead-fails-once":
        monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    scan = scan_tree(str(root), frozenset({"sub/ex"}), native=mode != "python")
    paths = scan.table().column("path").to_pylist()
    if mode == "ahead-fails-once":
        assert failed
    assert b"ok" in paths and b"sub/plain" in paths
    assert scan.unlisted == []
    assert b"b3" in paths
    for b in (b"b1", b"b2"):
        assert b not in paths, (b, paths)


# --------------------------------------------------------------------------------------------------
# Few descriptors: the walk's own read, made while the prefetch threads hold descriptors


def test_retry_in_turn_while_prefetch_holds_a_descriptor_lists_like_python(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two spare descriptors are enough for the Python listing (and for the C walk in turn): it needs the
    root's and the directory's at once. d00's read ahead fails (EMFILE, as when the limit is tight) while a
    prefetch thread holds d01's descriptor (its listing is slow: a large directory, a slow disk). The walk
    reads d00 again only once no read ahead is under way (none holds a descriptor), and lists it, as the
    Python listing does."""
    ahead(monkeypatch, True)
    root = tmp_path / "data"
    for d in range(6):
        (root / f"d{d:02}").mkdir(parents=True)
        (root / f"d{d:02}" / "f").write_bytes(b"f")
    py = _with_spare_descriptors(2, lambda: scanned(root, native=False))
    assert py[3] == []
    real_open, real_read, real_settle = fsutil.open_walked_dir, native_walk._NativeLister.read, \
        native_walk.ReadAhead.settle
    settling = threading.Event()
    lock = threading.Lock()
    in_flight = [0]
    state: dict[str, object] = {}

    def on_prefetch() -> bool:
        return threading.current_thread().name.startswith("drsync-list")

    def read(self, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if on_prefetch():
            with lock:
                in_flight[0] += 1
        try:
            return real_read(self, rel_dir, abs_dir, examined)
        finally:
            if on_prefetch():
                with lock:
                    in_flight[0] -= 1

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"d00" and on_prefetch():
            return "cannot be listed (Too many open files)"
        if rel_dir == b"d00":  # the walk's own read, again
            state["in flight"] = in_flight[0]
        got = real_open(r, rel_dir, abs_dir, examined)
        if rel_dir == b"d01" and on_prefetch():
            settling.wait(30)  # holds its descriptor until the walk waits for the reads under way
        return got

    def settle(self):  # type: ignore[no-untyped-def]
        settling.set()
        real_settle(self)

    monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    monkeypatch.setattr(native_walk._NativeLister, "read", read)
    monkeypatch.setattr(native_walk.ReadAhead, "settle", settle)
    c = _with_spare_descriptors(2, lambda: scanned(root, native=True))
    assert state.get("in flight") == 0, state
    assert c[3] == [], (state, c[1][:3])
    assert c == py


# --------------------------------------------------------------------------------------------------
# The CLI: snapshot an odd tree (root through a link, names of any bytes, past PATH_MAX, a tmpfs inside),
# restore it elsewhere, compare


def _tree_of(path: bytes) -> dict[bytes, tuple]:
    """Every entry below ``path`` (through descriptors: any depth): type, mode, content or link target."""
    out: dict[bytes, tuple] = {}

    def walk(dfd: int, prefix: bytes) -> None:
        for name in sorted(os.listdir(dfd)):
            n = os.fsencode(name)
            s = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            rel = prefix + n
            if stat.S_ISDIR(s.st_mode):
                out[rel] = ("d", stat.S_IMODE(s.st_mode))
                sub = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    walk(sub, rel + b"/")
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(s.st_mode):
                out[rel] = ("l", os.readlink(n, dir_fd=dfd))
            else:
                fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    data = b""
                    while chunk := os.read(fd, 1 << 20):
                        data += chunk
                finally:
                    os.close(fd)
                out[rel] = ("f", stat.S_IMODE(s.st_mode), data)

    top = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(top, b"")
    finally:
        os.close(top)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([DRSYNC, *args], capture_output=True, env=env, timeout=60)


def test_cli_snapshot_and_restore_of_an_odd_tree_round_trips(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    rb = os.fsencode(real)
    for name in (b"\xff\xfe", b"new\nline", b"...", b"..a", b"a-b", b"\xed\xa0\x80", "é".encode()):
        os.mkdir(rb + b"/" + name)
        mkfile(rb + b"/" + name + b"/" + name, name)
    os.symlink(b"../\xff\xfe/\xff\xfe", rb + b"/new\nline/to-odd")
    os.symlink(b"/etc/passwd", rb + b"/out")  # leaves the root: not captured
    # deep: 110 levels of 45-byte names, about 5,000 bytes, past PATH_MAX
    fd = os.open(rb, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(110):
            n = b"%03d" % i + b"q" * 42
            os.mkdir(n, dir_fd=fd)
            nxt = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        mkfile_at(fd, b"bottom", b"the bottom")
    finally:
        os.close(fd)
    (real / "mnt").mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(real / "mnt")], capture_output=True).returncode == 0
    try:
        if mounted:
            (real / "mnt" / "sub").mkdir()
            (real / "mnt" / "sub" / "g").write_bytes(b"on tmpfs")
        (tmp_path / "via").symlink_to(real)
        repo = str(tmp_path / "repo")
        assert _cli("init", "--repo", repo, "--cluster-id", "c", "--release", "1").returncode == 0
        r = _cli("snapshot", "create", "--repo", repo, "--source", str(tmp_path / "via"), "--json")
        assert r.returncode == 0, r.stderr.decode()
        info = json.loads(r.stdout)
        assert info["stale_paths"] == 0 and info["skipped_paths"] == 0, info
        target = tmp_path / "restored"
        r = _cli("snapshot", "restore", info["id"], "--repo", repo, "--target", str(target))
        assert r.returncode == 0, r.stderr.decode()
        want = _tree_of(rb)
        del want[b"out"]
        got = _tree_of(os.fsencode(target))
        assert sorted(got) == sorted(want)
        assert got == want
        if mounted:
            assert got[b"mnt/sub/g"][2] == b"on tmpfs"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(real / "mnt")], capture_output=True)
