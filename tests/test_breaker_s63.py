"""Breaker s63: the walks' read-ahead of mid-sized directories (capture and apply target) and the
vectorised capture window (eaa38df, efd4600), tried on hostile trees and conditions."""

from __future__ import annotations

import dataclasses
import gc
import os
import resource
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from drsync import capture, engine, fsutil, native_walk, tree
from drsync.repository import manifest as manifest_mod
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage
from drsync.tree import scan_tree
from tests.users import NOBODY, call_as_nobody

pytestmark = pytest.mark.skipif(not native_walk.available(), reason="the C listing is not built")

ALL = (0, 1 << 62)  # every directory read ahead
NONE = (1, 0)  # none


def ahead(monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, int] = ALL) -> None:
    monkeypatch.setattr(native_walk, "PREFETCH_DIR_BYTES", sizes)


def scanned(root: Path | str, *, native: bool, exclude: frozenset[str] = frozenset()) -> tuple:
    scan = scan_tree(str(root), exclude, native=native)
    table = scan.table()
    return (table.to_pylist(), scan.warnings.lines(), sorted(scan.unreadable), sorted(scan.unlisted),
            scan.devices, sorted(scan.vanished))


def assert_alike(root: Path | str, exclude: frozenset[str] = frozenset()) -> list:
    py = scanned(root, native=False, exclude=exclude)
    c = scanned(root, native=True, exclude=exclude)
    assert [r["path"] for r in c[0]] == [r["path"] for r in py[0]]
    assert c == py
    return c[0]


def mid_sized(path: Path, n: int = 600, stem: str = "file-with-a-longer-name") -> None:
    """A directory of ``n`` files: 600 long names are about 40 KiB of directory blocks on ext4."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"{stem}-{i:04d}").write_bytes(b"%d" % i)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


# --------------------------------------------------------------------------------------------------
# Equivalence with the pure-Python listing on odd trees, every directory read ahead


def test_thousands_of_sibling_directories_read_ahead_scan_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    ahead(monkeypatch)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 97)
    root = tmp_path / "data"
    root.mkdir()
    rb = os.fsencode(root)
    for i in range(1500):
        d = rb + b"/%04d" % i
        os.mkdir(d)
        for j in range(i % 4):
            with open(d + b"/f%d" % j, "wb") as f:
                f.write(b"x" * j)
    # names sorting around "/", non-UTF-8, a newline, the reserved name and excluded names inside dirs
    for name in (b"a", b"a-b", b"a.b", b"a\x00"[:1] + b"0", b"\xff\xfe", b"new\nline", b"a\x7f"):
        os.mkdir(rb + b"/" + name)
        for sub in (b"x", b"\xc3\x28", b".drsync-staging", b"skip"):
            os.mkdir(rb + b"/" + name + b"/" + sub)
            with open(rb + b"/" + name + b"/" + sub + b"/f", "wb") as f:
                f.write(sub)
        os.symlink(b"../a/x", rb + b"/" + name + b"/link-in")
        os.symlink(b"/etc", rb + b"/" + name + b"/link-out")
    os.mkfifo(root / "a" / "fifo")
    exclude = frozenset({"a/skip", "a.b/skip", "0100"})
    rows = assert_alike(root, exclude)
    paths = [r["path"] for r in rows]
    assert b"a/skip/f" not in paths and b"0100" not in paths and b"a-b/skip/f" in paths
    assert not any(p.endswith(b"link-out") for p in paths)


def test_deep_nesting_with_siblings_at_every_level_scans_alike(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ahead(monkeypatch)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 50)
    root = tmp_path / "data"
    d = root
    for level in range(60):
        for s in ("a", "b-", "b.", "c"):
            (d / s).mkdir(parents=True)
            for i in range(level % 5):
                (d / s / f"f{i}").write_bytes(b"%d" % i)
        (d / "b").mkdir()
        (d / "b0").write_bytes(b"after b/")
        d = d / "b"
    assert_alike(root)


def test_real_mid_sized_directories_nested_at_every_level_scan_alike(tmp_path: Path) -> None:
    """Default sizes: mid-sized directories at each of several levels, beside small and larger ones."""
    root = tmp_path / "data"
    d = root
    for _level in range(4):
        for s in range(3):
            mid_sized(d / f"m{s}", 450 + 50 * s)
        (d / "small").mkdir(parents=True)
        (d / "small" / "f").write_bytes(b"s")
        d = d / "m1"
    blocks = os.stat(root / "m0").st_blocks * 512
    rows = assert_alike(root)
    assert len(rows) > 5000
    if not native_walk.worth_reading_ahead(blocks):
        pytest.skip(f"directories of {blocks} bytes here: not mid-sized")


# --------------------------------------------------------------------------------------------------
# Few descriptors to spare: the read-ahead holds up to PREFETCH_AHEAD open descriptors


def _with_spare_descriptors(spare: int, fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` with only ``spare`` descriptors free below RLIMIT_NOFILE."""
    gc.collect()
    limit = max(open_fds()) + 1 + 64
    fill = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        while True:
            fd = os.open("/dev/null", os.O_RDONLY)
            if fd >= limit - spare:
                os.close(fd)
                break
            fill.append(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            return fn()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        for fd in fill:
            os.close(fd)


@pytest.fixture
def mid_tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for d in range(12):
        mid_sized(root / f"d{d:02}")
    if not native_walk.worth_reading_ahead(os.stat(root / "d00").st_blocks * 512):
        pytest.skip("directories of 600 long names are not mid-sized on this filesystem")
    return root


def test_few_spare_descriptors_in_turn_lists_everything(mid_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: listed in turn (no read-ahead), 3 spare descriptors are plenty, as for the Python listing."""
    ahead(monkeypatch, NONE)
    py = _with_spare_descriptors(3, lambda: scanned(mid_tree, native=False))
    c = _with_spare_descriptors(3, lambda: scanned(mid_tree, native=True))
    assert py[3] == [] and c == py


def test_few_spare_descriptors_read_ahead_lists_like_python(mid_tree: Path) -> None:
    py = _with_spare_descriptors(3, lambda: scanned(mid_tree, native=False))
    c = _with_spare_descriptors(3, lambda: scanned(mid_tree, native=True))
    assert py[3] == []
    assert c[3] == [], c[1][:3]
    assert c == py


# --------------------------------------------------------------------------------------------------
# Swaps while the walk runs


@pytest.mark.parametrize("mode", ["ahead", "in-turn", "python"])
def test_an_ancestor_swapped_for_a_link_never_lists_outside_content(tmp_path: Path, mode: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """While ``a/b`` is walked, ``a`` is moved out of the data root and a link to it planted in its place,
    and a file planted in the moved ``a/b/c``. ``a/b/c`` is the very directory its parent's listing saw
    (same device and inode), but reached through the link it is outside the root: never listed."""
    ahead(monkeypatch, ALL if mode == "ahead" else NONE)
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "own").write_bytes(b"own")
    (root / "a" / "b" / "f").write_bytes(b"f")
    real = fsutil.open_walked_dir
    swapped = threading.Event()

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"a/b/c" and not swapped.is_set():
            swapped.set()
            os.rename(root / "a", outside / "a")
            (root / "a").symlink_to(outside / "a")
            (outside / "a" / "b" / "c" / "planted").write_bytes(b"outside the root")
        return real(r, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    scan = scan_tree(str(root), native=mode != "python")
    paths = scan.table().column("path").to_pylist()
    assert swapped.is_set()
    assert b"a/b/c/planted" not in paths, (paths, scan.unlisted)


@pytest.mark.parametrize("how", ["removed", "file", "link", "other-dir"])
def test_a_directory_swapped_before_its_read_ahead_is_kept_stale(tmp_path: Path, how: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture twice; in the second, a mid-sized directory is swapped just before it is read (on a prefetch
    thread). Its files are kept at their last capture (stale), nothing planted appears."""
    ahead(monkeypatch)
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    for d in ("a", "m", "z"):
        mid_sized(root / d, 50)
    past = 1_600_000_000
    for p in root.rglob("*"):
        os.utime(p, (past, past))
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    real = fsutil.open_walked_dir
    seen: list[str] = []

    def hooked(r: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"m" and not seen:
            seen.append(threading.current_thread().name)
            os.rename(root / "m", tmp_path / "m-gone")
            if how == "file":
                (root / "m").write_bytes(b"now a file")
            elif how == "link":
                (root / "m").symlink_to(outside)
            elif how == "other-dir":
                (root / "m").mkdir()
                (root / "m" / "planted").write_bytes(b"planted")
        return real(r, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", hooked)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert seen and seen[0].startswith("drsync-list"), seen
    paths = {e.path for e in repo.load_manifest(info).entries()}
    assert not any(p.endswith(("planted", "secret")) for p in paths)
    before = {e.path for e in repo.load_manifest(first).entries()}
    assert {p for p in before if p.startswith("m/")} <= paths, "a directory swapped mid-walk was dropped"
    assert info.stale_paths > 0


# --------------------------------------------------------------------------------------------------
# Bounds: held listings, descriptors and threads


def test_at_most_four_listings_held_and_large_directories_never_read_ahead(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-sized (about 40 KiB) and "large" directories (made large by a lower bound of 64 KiB) side by side
    and nested: no large one is read ahead, and never more than PREFETCH_AHEAD listings held (open
    descriptors beyond the walk's own bounded the same way)."""
    ahead(monkeypatch, (16 << 10, 64 << 10))
    monkeypatch.setattr(tree, "_BATCH_ROWS", 200)
    root = tmp_path / "data"
    for i in range(8):
        mid_sized(root / f"mid{i}")
        mid_sized(root / f"mid{i}" / "inner", 500)
    for i in range(3):
        mid_sized(root / f"huge{i}", 2500)
    if os.stat(root / "huge0").st_blocks * 512 <= (64 << 10) or not native_walk.worth_reading_ahead(
            os.stat(root / "mid0").st_blocks * 512):
        pytest.skip("directory sizes on this filesystem do not fit the bounds")
    held: list[int] = []
    submitted: list[bytes] = []
    fds: list[int] = []
    base = len(open_fds())
    real_submit, real_take = native_walk.ReadAhead.submit, native_walk.ReadAhead.take

    def submit(self, key, read, *args):  # type: ignore[no-untyped-def]
        submitted.append(key)
        real_submit(self, key, read, *args)
        held.append(len(self.ahead))
        fds.append(len(open_fds()) - base)

    def take(self, key):  # type: ignore[no-untyped-def]
        held.append(len(self.ahead))
        return real_take(self, key)

    monkeypatch.setattr(native_walk.ReadAhead, "submit", submit)
    monkeypatch.setattr(native_walk.ReadAhead, "take", take)
    assert_alike(root)
    assert submitted and max(held) <= native_walk.PREFETCH_AHEAD
    assert not any(k.startswith(b"huge") for k in submitted), submitted
    assert max(fds) <= native_walk.PREFETCH_AHEAD + native_walk.PREFETCH_THREADS + 6


def _failing_at_third_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Repository, list]:
    """A tree of 40 directories read ahead, windows of 50 rows, and a capture that fails at its third window:
    (root, repository, the windows' calls)."""
    ahead(monkeypatch)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 50)
    monkeypatch.setattr(capture, "_WINDOW", 50)
    root = tmp_path / "data"
    for d in range(40):
        mid_sized(root / f"d{d:02}", 40)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    real = capture._window
    calls = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(capture, "_window", failing)
    return root, repo, calls


def test_a_failed_capture_leaves_no_descriptor_or_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture failing at its third window (the walk well ahead, listings read ahead and not taken): once
    the failure is handled, no directory descriptor and no walk or prefetch thread is left."""
    root, repo, calls = _failing_at_third_window(tmp_path, monkeypatch)
    gc.collect()
    threads = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="injected"):
        engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert len(calls) >= 3
    gc.collect()
    for t in set(threading.enumerate()) - threads:
        if t.name.startswith(("drsync-walk", "drsync-list")):
            t.join(timeout=30)
            assert not t.is_alive(), t.name
    dirs = [os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [d for d in dirs if d.startswith(str(root))], dirs


def test_a_failed_capture_whose_error_is_kept_leaves_no_descriptor(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same failure, its exception (and traceback) kept a while (an agent's last error, a log
    record): the directories read ahead must not stay open for as long as the error is held."""
    root, repo, _ = _failing_at_third_window(tmp_path, monkeypatch)
    kept: list[BaseException] = []
    try:
        engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    except RuntimeError as e:
        kept.append(e)
    assert kept
    gc.collect()

    def held() -> list[str]:
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() if os.path.exists(f"/proc/self/fd/{fd}")]
        return [d for d in fds if d.startswith(str(root))]

    still = held()  # a read ahead closes its descriptor as it ends: none is held by what waits to be taken
    kept.clear()
    gc.collect()
    assert not still, still


# --------------------------------------------------------------------------------------------------
# Reuse of unchanged rows (the vectorised window, slices of the parent's groups)


@pytest.mark.parametrize("small_groups", [False, True])
def test_reuse_exact_with_read_ahead_and_small_groups(tmp_path: Path, small_groups: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No-change capture reuses every file; a partly changed tree exactly the unchanged ones; a file rewritten
    in place with the same size and mtime (ctime moved) or replaced by another inode is read again. With
    small parent row groups and windows, so windows straddle groups and groups hold directories' runs."""
    ahead(monkeypatch)
    if small_groups:
        monkeypatch.setattr(manifest_mod, "ROW_GROUP", 700)
        monkeypatch.setattr(capture, "_WINDOW", 333)
        monkeypatch.setattr(tree, "_BATCH_ROWS", 111)
    root = tmp_path / "data"
    for d in range(6):
        mid_sized(root / f"d{d}", 400)
        (root / f"d{d}" / "sub").mkdir()
        (root / f"d{d}" / "sub" / "x").write_bytes(b"x")
    (root / "lnk").symlink_to("d0")
    past = 1_600_000_000
    for p in root.rglob("*"):
        os.utime(p, (past, past), follow_symlinks=False)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    files = first.files
    again = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert again.reused_files == files and again.read_bytes == 0
    # in place, same size and mtime: ctime moves
    inplace = root / "d2" / "file-with-a-longer-name-0100"
    old = inplace.read_bytes()
    inplace.write_bytes(b"Z" * len(old))
    os.utime(inplace, (past, past))
    # another inode, same size and mtime
    swapped = root / "d4" / "file-with-a-longer-name-0399"
    old2 = swapped.read_bytes()
    tmp = root / "d4" / "new"
    tmp.write_bytes(b"Q" * len(old2))
    os.utime(tmp, (past, past))
    os.rename(tmp, swapped)
    os.utime(root / "d4", (past, past))
    third = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert third.files == files
    assert third.reused_files == files - 2, (third.reused_files, files)
    table = repo.load_manifest(third).table
    inode = dict(zip(table.column("path").to_pylist(), table.column("inode").to_pylist(), strict=True))
    ip, sp = str(inplace.relative_to(root)), str(swapped.relative_to(root))
    key = (lambda p: p) if isinstance(next(iter(inode)), str) else os.fsencode
    assert inode[key(ip)] == inplace.stat().st_ino and inode[key(sp)] == swapped.stat().st_ino
    by_path = {e.path: e for e in repo.load_manifest(third).entries()}
    first_rows = {e.path: e for e in repo.load_manifest(first).entries()}
    for path, e in by_path.items():
        if e.type == "file" and path not in (ip, sp):
            assert e.chunks == first_rows[path].chunks, path
    assert by_path[ip].chunks != first_rows[ip].chunks and by_path[sp].chunks != first_rows[sp].chunks
    restored = tmp_path / "restored"
    engine.restore_snapshot(repo, third.id, str(restored), cluster_id="c", release="1")
    assert (restored / ip).read_bytes() == b"Z" * len(old)
    assert (restored / sp).read_bytes() == b"Q" * len(old2)
    assert (restored / "d5" / "file-with-a-longer-name-0007").read_bytes() == b"7"


# --------------------------------------------------------------------------------------------------
# The apply's target walk


def _target_entries(root: Path, tops: set[str]) -> tuple[list, list]:
    from drsync.dataroot.local import walk_target, walk_target_columns

    walked = [dataclasses.astuple(e) for e in walk_target(str(root), tops)]
    runs = list(walk_target_columns(str(root), tops))
    return walked, [dataclasses.astuple(r.entry(i)) for r in runs for i in range(len(r))]


def _hostile_target(root: Path) -> None:
    for d in range(10):
        mid_sized(root / f"d{d}", 30)
    (root / "d1" / "inner").mkdir()
    (root / "d1" / "inner" / "f").write_bytes(b"f")
    os.mkfifo(root / "d2" / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "d3" / "sock"))
    (root / "d4" / "to-d5").symlink_to("../d5")
    (root / "ldir").symlink_to("d6")
    (root / "lout").symlink_to("/etc")
    (root / "d7" / ".drsync-staging").mkdir()
    (root / "d7" / ".drsync-staging" / "partial").write_bytes(b"p")
    (root / ".drsync-staging").mkdir()
    (root / ".drsync-staging" / "partial").write_bytes(b"p")
    os.setxattr(root / "d8", "user.k", b"v")
    os.setxattr(root / "d8" / "file-with-a-longer-name-0001", "user.k", b"w")
    rb = os.fsencode(root)
    os.mkdir(rb + b"/\xff-dir")
    with open(rb + b"/\xff-dir/\xfe", "wb") as f:
        f.write(b"x")


def test_target_walk_read_ahead_walks_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "target"
    _hostile_target(root)
    ahead(monkeypatch, NONE)
    base = _target_entries(root, {"", "d7"})
    ahead(monkeypatch)
    submitted: list[str] = []
    real_submit = native_walk.ReadAhead.submit

    def submit(self, key, read, *args):  # type: ignore[no-untyped-def]
        submitted.append(key)
        real_submit(self, key, read, *args)

    monkeypatch.setattr(native_walk.ReadAhead, "submit", submit)
    got = _target_entries(root, {"", "d7"})
    assert got[0] == got[1] == base[0] == base[1]
    assert submitted
    paths = [e[0] for e in got[1]]
    assert not any(p.startswith(("ldir/", "lout/", "d7/.drsync-staging", ".drsync-staging")) for p in paths)
    assert "d2/fifo" in paths and "d1/inner/f" in paths


def test_target_walk_read_ahead_never_lists_a_directory_swapped_for_a_link(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of the target replaced by a link to outside between its parent's listing and its read
    ahead: the read-ahead never lists through the link."""
    from drsync.dataroot import local

    ahead(monkeypatch)
    root = tmp_path / "target"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    for d in range(6):
        mid_sized(root / f"d{d}", 20)
    real = local._read_target
    done: list[str] = []

    def hooked(r: str, rel_dir: str, tops: set[str], me: int):  # type: ignore[no-untyped-def]
        if rel_dir == "d3" and not done:
            done.append(rel_dir)
            os.rename(root / "d3", tmp_path / "d3-gone")
            (root / "d3").symlink_to(outside)
        return real(r, rel_dir, tops, me)

    monkeypatch.setattr(local, "_read_target", hooked)
    from drsync.dataroot.beneath import EscapeRefused

    try:
        runs = list(local.walk_target_columns(str(root), {""}))
    except EscapeRefused:  # the walk refuses what became a link: no plan made on it
        runs = None
    assert done
    if runs is not None:
        paths = [r.entry(i).path for r in runs for i in range(len(r))]
        assert "d3/secret" not in paths




def test_target_walk_as_owner_opens_up_unreadable_directories_and_sets_them_back(
        open_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = open_tmp
    """As a non-root owner: directories of the target that are this user's but unreadable (000, 300, 100)
    among mid-sized ones, read ahead: the walk is the same as listed in turn, and every mode is set back."""
    root = tmp_path / "target"
    _hostile_target(root)
    for d in range(3):
        (root / f"d{d}" / "locked").mkdir()
        (root / f"d{d}" / "locked" / "f").write_bytes(b"l")
    os.chmod(tmp_path, 0o755)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(root)], check=True)
    modes = {"d5": 0o000, "d6": 0o300, "d7": 0o100, "d0/locked": 0o000, "d1/locked": 0o500}
    for rel, mode in modes.items():
        os.chmod(root / rel, mode)
    before = {str(p): stat.S_IMODE(os.lstat(p).st_mode) for p in root.rglob("*")}

    def walk(sizes: tuple[int, int]):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            native_walk.PREFETCH_DIR_BYTES = sizes
            return _target_entries(root, {""})
        return run

    base = call_as_nobody(walk(NONE))
    got = call_as_nobody(walk(ALL))
    assert base[0] == base[1]
    assert got[0] == got[1] == base[0]
    after = {str(p): stat.S_IMODE(os.lstat(p).st_mode) for p in root.rglob("*")
             if ".drsync-staging/restore.json" not in str(p)}  # the walk's record of what it opened up
    assert after == before
    assert "d5/file-with-a-longer-name-0001" in [e[0] for e in got[0]]


def test_capture_as_non_root_of_unreadable_directories_scans_alike(open_tmp: Path) -> None:
    tmp_path = open_tmp
    """As nobody: directories it cannot list (root's, 0700) and entries it cannot examine among mid-sized
    ones read ahead: the same rows, warnings and unlisted paths as the Python listing."""
    root = tmp_path / "data"
    for d in range(8):
        mid_sized(root / f"d{d}", 60)
    (root / "d3" / "deep").mkdir()
    (root / "d3" / "deep" / "f").write_bytes(b"f")
    os.chmod(tmp_path, 0o755)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(root)], check=True)
    os.chown(root / "d2", 0, 0)
    os.chmod(root / "d2", 0o700)
    os.chown(root / "d3" / "deep", 0, 0)
    os.chmod(root / "d3" / "deep", 0o700)
    os.chown(root / "d4", 0, 0)
    os.chmod(root / "d4", 0o744)  # listable, entries not examinable

    def scan(native: bool, sizes: tuple[int, int]):  # type: ignore[no-untyped-def]
        def run():  # type: ignore[no-untyped-def]
            native_walk.PREFETCH_DIR_BYTES = sizes
            return scanned(root, native=native)
        return run

    py = call_as_nobody(scan(False, NONE))
    c = call_as_nobody(scan(True, ALL))
    assert sorted(py[3]) == ["d2", "d3/deep"]
    assert c == py


# --------------------------------------------------------------------------------------------------
# Threads racing the walk


def test_a_renaming_thread_racing_the_read_ahead_never_plants_outside_content(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread keeps swapping directories of the tree for links to an outside directory (and back) while
    captures walk it with every directory read ahead: no outside name ever appears, every row is under a
    directory that exists in the tree, and the rows are in the manifest's order."""
    ahead(monkeypatch)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 64)
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    for i in range(50):
        (outside / f"o{i}").mkdir(parents=True)
        (outside / f"o{i}" / "SECRET").write_bytes(b"s")
    (outside / "SECRET").write_bytes(b"s")
    for d in range(30):
        mid_sized(root / f"d{d:02}", 40)
        (root / f"d{d:02}" / "sub").mkdir()
        (root / f"d{d:02}" / "sub" / "f").write_bytes(b"f")
    stop = threading.Event()
    swaps = [0]

    def racer() -> None:
        i = 0
        while not stop.is_set():
            d = root / f"d{i % 30:02}"
            aside = tmp_path / f"aside{i % 30:02}"
            try:
                os.rename(d, aside)
                d.symlink_to(outside)
                os.unlink(d)
                os.rename(aside, d)
                sub = root / f"d{(i * 7) % 30:02}" / "sub"
                os.rename(sub, tmp_path / "sub-aside")
                sub.symlink_to(outside / f"o{i % 50}")
                os.unlink(sub)
                os.rename(tmp_path / "sub-aside", sub)
            except OSError:
                pass
            swaps[0] += 1
            i += 1

    t = threading.Thread(target=racer)
    t.start()
    try:
        for _ in range(15):
            scan = scan_tree(str(root), native=True)
            paths = scan.table().column("path").to_pylist()
            assert not any(b"SECRET" in p for p in paths), [p for p in paths if b"SECRET" in p][:5]
            assert paths == sorted(paths)
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 15
