"""The C listing (drsync._listdir through drsync.native_walk) scans exactly as the pure-Python one does.

Every capture of a local tree goes through the C listing where it is built; the Python
listing is what runs where it is not. Both must give the same rows in the same order (the
manifest's: path bytes, a directory's contents under ``name + "/"``), the same warnings and
the same unreadable and unlisted paths, on hostile trees: names that are not UTF-8 or hold
newlines, the orderings where ``a-b`` and ``a.b`` fall between ``a`` and ``a/x``, links in
and out of the root, special files, drsync's reserved name, excluded paths, paths longer
than PATH_MAX, times outside int64 nanoseconds, entries that cannot be examined and a
directory swapped for a link to elsewhere in the middle of the walk.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from drsync import native_walk, tree
from drsync.tree import scan_tree

NS = 1_000_000_000


@pytest.fixture(autouse=True, params=["in-turn", "ahead"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: directories listed in turn, and every directory read ahead of the walk on the
    prefetch threads (native_walk.ReadAhead), whatever its size (by default only mid-sized ones are)."""
    monkeypatch.setattr(native_walk, "PREFETCH_DIR_BYTES", (0, 1 << 62) if request.param == "ahead" else (1, 0))
    return str(request.param)


def scanned(root: Path | str, *, native: bool, exclude: frozenset[str] = frozenset()) -> tuple:
    """Everything a scan reports: its table and what it could not capture."""
    scan = scan_tree(str(root), exclude, native=native)
    table = scan.table()
    return (table, scan.warnings.lines(), scan.unreadable, scan.unlisted, scan.devices)


def assert_alike(root: Path | str, exclude: frozenset[str] = frozenset()) -> pa.Table:
    py = scanned(root, native=False, exclude=exclude)
    c = scanned(root, native=True, exclude=exclude)
    assert c[0].schema == py[0].schema
    assert c[0].column("path").to_pylist() == py[0].column("path").to_pylist()
    for name in py[0].column_names:
        assert c[0].column(name).to_pylist() == py[0].column(name).to_pylist(), name
    assert c[1] == py[1]  # the same warnings, in readdir's order within a directory
    assert sorted(c[2]) == sorted(py[2]) and c[3:] == py[3:]
    paths = c[0].column("path").to_pylist()
    assert paths == sorted(paths)  # the manifest's order
    return c[0]


def test_the_c_listing_is_built() -> None:
    """make test builds it (pip install -e): a failed build would silently fall back to Python."""
    assert native_walk.available()


def test_a_hostile_tree_scans_alike(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    rb = os.fsencode(root)
    for name in [b"a", b"a-b", b"a.b", b"a0", b"A", b"\xff\xfe", b"new\nline", "é".encode(), b"\x01", b"z" * 255]:
        (Path(os.fsdecode(rb + b"/" + name))).write_bytes(name)
    os.mkdir(rb + b"/a-c")
    os.mkdir(rb + b"/a.d")
    os.mkdir(rb + b"/dir")
    os.mkdir(rb + b"/dir/a")
    os.mkdir(rb + b"/dir/a-")
    os.mkdir(rb + b"/dir/a-/x")
    os.mkdir(rb + b"/dir/\xff")
    for d in (b"dir/a", b"dir/a-", b"dir/a-/x", b"dir/\xff", b"a-c"):
        for f in (b"f", b"f-", b"f.", b"g"):
            (Path(os.fsdecode(rb + b"/" + d + b"/" + f))).write_bytes(d + f)
    os.mkdir(rb + b"/empty")
    (root / "dir" / "inside").symlink_to("a/f")
    (root / "dir" / "dangling").symlink_to("nowhere")
    (root / "dir" / "up-and-out").symlink_to("../../outside")
    (root / "abs").symlink_to("/etc/passwd")
    (root / "loop").symlink_to("loop")
    os.link(root / "a", root / "dir" / "hardlink-of-a")
    os.mkfifo(root / "dir" / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    (root / ".drsync-staging").mkdir()
    (root / "dir" / ".drsync-staging").write_bytes(b"reserved at any depth")
    os.mkdir(rb + b"/excluded-dir")
    (root / "excluded-dir" / "f").write_bytes(b"x")
    (root / "dir" / "excluded-file").write_bytes(b"x")
    old = root / "dir" / "old"
    old.write_bytes(b"1900")
    os.utime(old, ns=(0, -2_208_988_800 * NS + 5))
    late = root / "dir" / "late"
    late.write_bytes(b"2400")
    os.utime(late, ns=(0, 13_569_465_600 * NS + 123_456_789))
    sparse = root / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)
    os.chmod(root / "a0", 0o4751)
    t = assert_alike(root, exclude=frozenset({"excluded-dir", "dir/excluded-file"}))
    paths = set(t.column("path").to_pylist())
    assert b"dir/inside" in paths and b"dir/up-and-out" not in paths and b"abs" not in paths
    assert not any(b"excluded" in p or b".drsync-staging" in p or b"fifo" in p for p in paths)


def test_paths_longer_than_path_max_scan_alike(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(24):  # 24 x 201 bytes: past PATH_MAX (4096)
            os.mkdir("d" * 200, dir_fd=fd)
            nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        for name in ("f", "g-", "sub"):
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    t = assert_alike(root)
    assert max(len(p) for p in t.column("path").to_pylist()) > 4096


@pytest.mark.parametrize("swap", ["link", "dir"])
def test_a_directory_swapped_during_the_walk_is_never_listed(tmp_path: Path, swap: str, reading: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk lists ``a`` (1,000 files) and yields; meanwhile ``b`` becomes a link to a directory outside
    the root, or another directory. ``b`` must not be listed: it is unlisted (kept at its last capture).
    Batches of 100 rows: the C listing's walk runs at most 3 batches ahead of the window taken, so it has
    not reached ``b`` when the first window is taken. Read ahead (the C listing's prefetch), ``b`` may have
    been listed before the swap: then it is taken as it was, its own file, never what took its place."""
    monkeypatch.setattr(tree, "_BATCH_ROWS", 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not in the data root")
    for native in (False, True):
        root = tmp_path / f"data-{native}"
        (root / "a").mkdir(parents=True)
        for i in range(1000):
            (root / "a" / f"{i:04d}").touch()
        (root / "b").mkdir()
        (root / "b" / "f").write_bytes(b"b")
        scan = scan_tree(str(root), native=native)
        windows = scan.windows(100)
        first = next(windows)
        assert first.num_rows == 100
        os.rename(root / "b", root / "b-gone")
        if swap == "link":
            (root / "b").symlink_to(outside)
        else:  # another directory in its place: its (device, inode) is not the one the listing saw
            (root / "b").mkdir()
            (root / "b" / "planted").write_bytes(b"not what was listed")
        rest = list(windows)
        paths = [p for w in (first, *rest) for p in w.column("path").to_pylist()]
        assert all(w.num_rows <= 100 for w in rest)
        assert not any(p in (b"b/planted", b"b/secret") for p in paths), native
        if native and reading == "ahead" and scan.unlisted == []:  # b was read ahead before the swap: as it was
            assert len(paths) == 1003 and b"b/f" in paths, paths[-3:]
            continue
        # Read in turn, or read ahead only after the swap (the read-ahead threads run as they get the CPU).
        assert len(paths) == 1002 and not any(p.startswith(b"b/") for p in paths), native
        assert scan.unlisted == ["b"], native
        assert any("b: replaced" in w for w in scan.warnings.lines()), scan.warnings.lines()


def test_entries_that_cannot_be_examined_are_reported_alike(open_tmp: Path) -> None:
    """As nobody, a directory of mode 0o444 can be listed but its entries not examined."""
    from tests.users import NOBODY, give_to_nobody

    root = open_tmp / "data"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"f")
    (root / "d" / "sub" / "g").write_bytes(b"g")
    (root / "plain").write_bytes(b"p")
    give_to_nobody(root)
    os.chmod(root / "d", 0o444)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            py = scanned(root, native=False)
            c = scanned(root, native=True)
            alike = c[0].equals(py[0]) and c[1] == py[1] and c[3:] == py[3:]
            ok = 0 if alike and sorted(c[2]) == sorted(py[2]) == ["d/f", "d/sub"] else 2
        finally:
            os.write(w, bytes([ok]))
            os._exit(0)
    os.close(w)
    code = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert code == b"\x00", "the C and Python listings differ on entries that cannot be examined"


_NAMES = hs.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                   and b not in (b".", b".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=hs.lists(hs.tuples(hs.lists(_NAMES, min_size=1, max_size=4), hs.sampled_from(["file", "dir", "link"])),
                     max_size=30))
def test_any_tree_scans_alike(tmp_path_factory: pytest.TempPathFactory, tree: list) -> None:
    root = tmp_path_factory.mktemp("any")
    rb = os.fsencode(root)
    for parts, kind in tree:
        parent = rb
        for p in parts[:-1]:
            parent = parent + b"/" + p
            if not os.path.isdir(parent):
                if os.path.lexists(parent):
                    break
                os.mkdir(parent)
        else:
            path = parent + b"/" + parts[-1]
            if os.path.lexists(path):
                continue
            if kind == "file":
                with open(path, "wb") as f:
                    f.write(path)
            elif kind == "dir":
                os.mkdir(path)
            else:
                os.symlink(parts[0], path)
    assert_alike(root)


def _target_walk(root: Path, *, native: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    """The target walk's entries; its columns (what an apply's merge reads) must hold the same, in order."""
    from drsync.dataroot.local import walk_target, walk_target_columns

    with monkeypatch.context() as m:
        m.setattr(native_walk, "available", lambda: native)
        walked = [dataclasses.astuple(e) for e in walk_target(str(root), {""})]
        runs = list(walk_target_columns(str(root), {""}))
    assert [dataclasses.astuple(r.entry(i)) for r in runs for i in range(len(r))] == walked
    return walked


def test_an_apply_target_walks_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An apply's walk of its target (every entry, special files as "other", extended attributes read
    where there are some, drsync's staging area at the top left out) is the same through either listing."""
    root = tmp_path / "target"
    root.mkdir()
    rb = os.fsencode(root)
    for name in (b"a", b"a-b", b"a.b", b"\xff\xfe", b"new\nline"):
        with open(rb + b"/" + name, "wb") as f:
            f.write(name)
    os.mkdir(rb + b"/a-c")
    os.mkdir(rb + b"/d")
    (root / "d" / "f").write_bytes(b"f")
    os.setxattr(root / "d" / "f", "user.color", b"blue")
    os.setxattr(root / "d", "user.dir", b"yes")
    os.setxattr(root / "a", "user.empty", b"")
    (root / "d" / "link").symlink_to("../outside")
    os.mkfifo(root / "d" / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    (root / ".drsync-staging").mkdir()
    (root / ".drsync-staging" / "partial").write_bytes(b"staged")
    (root / "d" / ".drsync-staging").write_bytes(b"not the top: an entry like any other")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(17):  # 17 x 201 bytes: past LONG_PATH and PATH_MAX, extended attributes read by descriptor
            os.mkdir("e" * 200, dir_fd=fd)
            nxt = os.open("e" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("deep", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        os.setxattr(f"/proc/self/fd/{fd}", "user.deep", b"1")
    finally:
        os.close(fd)
    c = _target_walk(root, native=True, monkeypatch=monkeypatch)
    py = _target_walk(root, native=False, monkeypatch=monkeypatch)
    assert c == py
    by_path = {e[0]: e for e in c}
    assert by_path["d/f"][9] and by_path["d"][9] and by_path["a"][9]  # xattrs found
    assert by_path["d/fifo"][1] == "other" and by_path["sock"][1] == "other"
    assert not any(p.startswith(".drsync-staging") for p in by_path) and "d/.drsync-staging" in by_path
    deep = [e for p, e in by_path.items() if p.endswith("/deep")]
    assert deep and deep[0][9] is None and any(e[9] for p, e in by_path.items() if len(p) > 3000)


def test_mid_sized_directories_are_read_ahead_and_scan_alike(tmp_path: Path, reading: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default sizes (not the fixture's): a tree of directories of 600 files (a few directory blocks
    each), nested two deep, is listed by the prefetch threads and scans as the Python listing does."""
    monkeypatch.undo()
    root = tmp_path / "data"
    for d in range(6):
        for sub in ("", "/inner"):
            p = root / f"d{d}{sub}"
            p.mkdir(parents=True)
            for i in range(600):
                (p / f"file-with-a-longer-name-{i:04d}").write_bytes(b"%d" % i)
    blocks = os.stat(root / "d0").st_blocks * 512
    taken: list[bool] = []
    real = native_walk.ReadAhead.take

    def take(self: native_walk.ReadAhead, rel: bytes) -> native_walk._Read | None:
        got = real(self, rel)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(native_walk.ReadAhead, "take", take)
    assert_alike(root)
    lo, hi = native_walk.PREFETCH_DIR_BYTES
    if lo <= blocks <= hi:  # a filesystem that gives directories blocks (tmpfs gives none)
        assert any(taken), taken


def test_a_walk_left_early_closes_what_it_read_ahead(tmp_path: Path, reading: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that stops taking the scan (a failure, a window too large) leaves no descriptor open: the
    directories read ahead and not taken are closed with the walk (which is batches of 10 rows: it has
    40 directories to go when it is left)."""
    import gc
    import threading

    monkeypatch.setattr(tree, "_BATCH_ROWS", 10)
    root = tmp_path / "data"
    for d in range(40):
        (root / f"d{d:02}").mkdir(parents=True)
        for i in range(30):
            (root / f"d{d:02}" / f"f{i}").touch()

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()  # scans other tests left unfinished
    before, threads = open_fds(), set(threading.enumerate())
    scan = scan_tree(str(root), native=True)
    windows = scan.windows(10)
    next(windows)
    started = set(threading.enumerate()) - threads
    assert any(t.name.startswith("drsync-list") for t in started) == (reading == "ahead")
    del windows, scan  # dropped unfinished, as a failed capture drops it: the walk is closed when collected
    gc.collect()
    for t in started:  # the walk's thread ends as it sees the stop, the prefetch threads with it
        t.join(timeout=30)
        assert not t.is_alive(), t.name
    assert open_fds() == before
