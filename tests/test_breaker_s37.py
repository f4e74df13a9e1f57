"""Breaker session 37: the capture's C listing (drsync/_listdir.c, drsync/native_walk.py, e856504).

The failing tests each show one defect: a walk thread that outlives the capture it served, a walk that
turns quadratic (or twice slower than the Python listing it replaces), scans that differ from the Python
listing's, memory misuse in the extension, and roots that cannot be read (or vanish) giving a silent empty
snapshot. The passing tests record the promises that held under attack.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drsync import capture, engine, tree
from drsync.errors import OperationFailed
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage
from drsync.tree import scan_tree
from tests.conftest import init_repo_at, run_drsync

NS = 1_000_000_000
PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def walk_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "drsync-walk"]


def new_walk_threads(before: set[threading.Thread], timeout: float = 60.0) -> list[threading.Thread]:
    """The walk threads started since ``before`` still alive once garbage is collected and they were given
    ``timeout`` (in all, generous for a busy machine: a thread that ends returns at once) to end."""
    gc.collect()
    deadline = time.monotonic() + timeout
    for t in walk_threads():
        if t not in before:
            t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in walk_threads() if t not in before and t.is_alive()]


def scanned(root: Path | str, *, native: bool, exclude: frozenset[str] = frozenset()) -> tuple:
    scan = scan_tree(str(root), exclude, native=native)
    table = scan.table()
    return table, scan.warnings.lines(), scan.unreadable, scan.unlisted, scan.devices


def assert_alike(root: Path | str, exclude: frozenset[str] = frozenset()) -> None:
    py = scanned(root, native=False, exclude=exclude)
    c = scanned(root, native=True, exclude=exclude)
    assert c[0].equals(py[0])
    assert sorted(c[1]) == sorted(py[1])
    assert sorted(c[2]) == sorted(py[2]) and c[3:] == py[3:]


@pytest.fixture
def repo() -> Repository:
    return Repository.init(MemoryStorage(), cluster_id="c", release="1")


def flat_files(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            os.close(os.open(f"{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


# --- 3. threads: a walk thread must end with the capture that started it -----------------------------------


def test_a_capture_that_fails_mid_walk_leaves_no_walk_thread(repo: Repository, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the first window (a repository write failing, say: an agent catches it and captures
    again next cycle) leaves the walk thread blocked forever in ``ahead.put``: nothing closes the scan's
    walk (TreeScan.windows is abandoned, not its source), and the thread's ``produce`` closure holds
    ``scan`` (native_walk.py:253 reads ``scan.root`` inside it), so even garbage collection cannot reach
    the generator's ``finally``. Each failed capture leaks a thread with up to 3 batches and its listings.
    Small batches and windows stand in for a tree of more than ~115,000 entries."""
    monkeypatch.setattr(tree, "_BATCH_ROWS", 100)
    monkeypatch.setattr(capture, "_WINDOW", 100)
    flat_files(tmp_path / "data", 2000)

    def failing_window(*args: object, **kwargs: object) -> None:
        raise OperationFailed("repository write failed: No space left on device")

    monkeypatch.setattr(capture, "_window", failing_window)
    before = set(walk_threads())
    for _ in range(3):
        with pytest.raises(OperationFailed):
            engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "data")))
    leaked = new_walk_threads(before)
    assert not leaked, f"{len(leaked)} drsync-walk threads outlive their failed captures"


def test_windows_abandoned_early_leave_no_walk_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that stops taking windows (closes the windows generator, drops the scan) leaves the walk
    thread blocked in ``ahead.put`` for the life of the process (the thread holds the scan that holds the
    walk generator: native_walk.py:251-260)."""
    monkeypatch.setattr(tree, "_BATCH_ROWS", 100)
    flat_files(tmp_path / "data", 2000)
    before = set(walk_threads())
    scan = scan_tree(str(tmp_path / "data"), native=True)
    windows = scan.windows(100)
    next(windows)
    windows.close()
    del windows, scan
    assert not new_walk_threads(before)


def test_closing_the_walk_ends_its_thread_and_many_scans_leak_no_descriptor(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: the walk's own close stops the thread; 100 scans (whole, and stopped early through
    ``scan.source.close()``) leave no descriptor open."""
    monkeypatch.setattr(tree, "_BATCH_ROWS", 50)
    flat_files(tmp_path / "data" / "a", 1000)
    (tmp_path / "data" / "b").mkdir()
    before_fds = len(os.listdir("/proc/self/fd"))
    before = set(walk_threads())
    for _ in range(50):
        scan_tree(str(tmp_path / "data"), native=True).table()
        scan = scan_tree(str(tmp_path / "data"), native=True)
        w = scan.windows(10)
        next(w)
        assert scan.source is not None
        scan.source.close()
        w.close()
    assert not new_walk_threads(before)
    assert len(os.listdir("/proc/self/fd")) == before_fds


def test_more_than_twenty_warnings_in_a_directory_keep_the_same_sample(tmp_path: Path) -> None:
    """A snapshot keeps the first 20 warnings (WarningLog). The Python listing warns in readdir order,
    interleaving kinds; the C listing's come sorted and grouped by kind (reserved, unexaminable, special,
    then escaping links: _listdir.c:330-356, native_walk.py:201-223). Past 20, the two keep different
    warnings: here the C sample never names an escaping link."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(25):
        os.mkfifo(root / f"f{i:02d}")
        (root / f"l{i:02d}").symlink_to(f"/etc/x{i}")
    py = scanned(root, native=False)[1]
    c = scanned(root, native=True)[1]
    assert c == py  # the same sample, in the same order


def test_an_excluded_path_with_the_reserved_name_warns_alike(tmp_path: Path) -> None:
    """An exclusion named ``.drsync-staging`` below the root: Python checks the reserved name first and
    warns (tree.py:370); C drops excluded names before it looks at reserved ones (_listdir.c:273-296), so
    the warning is missing. (Found by a differential fuzz; only this case differed in 600 random trees.)"""
    root = tmp_path / "data"
    (root / "sub" / ".drsync-staging").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"f")
    assert_alike(root, exclude=frozenset({"sub/.drsync-staging"}))


def test_a_hostile_tree_scans_alike(tmp_path: Path) -> None:
    """Held: devices, sockets, fifos, 4,095-byte link targets, links to the root and to the reserved name,
    hard links, sparse files, pre-1970 and post-2262 times, setuid modes, reserved names at depth, an
    excluded repository at depth, a data root named through a symlink, by a relative path."""
    root = tmp_path / "data"
    (root / "a" / "b").mkdir(parents=True)
    os.mknod(root / "chr", 0o600 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "blk", 0o600 | 0o060000, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    os.mkfifo(root / "a" / "fifo")
    (root / "maxlink").symlink_to("x" * 4095)
    (root / "maxlink-in").symlink_to("a/" * 2047 + "b")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "upup").symlink_to("../..")
    (root / "a" / "to-staging").symlink_to(".drsync-staging")
    (root / "a" / "b" / ".drsync-staging").mkdir()
    (root / "a" / "b" / ".drsync-staging" / "x").write_bytes(b"x")
    (root / "f").write_bytes(b"f")
    os.link(root / "f", root / "a" / "hard")
    with open(root / "sparse", "wb") as f:
        f.truncate(1 << 32)
    os.utime(root / "f", ns=(0, -5 * NS - 1))
    (root / "late").write_bytes(b"l")
    os.utime(root / "late", ns=(0, 20_000_000_000 * NS + 7))
    os.chmod(root / "a" / "hard", 0o7755)
    (root / "a" / "repo" / "packs").mkdir(parents=True)
    (root / "a" / "repo" / "packs" / "p").write_bytes(b"p")
    (root / "a-b").write_bytes(b"")
    (root / "a.b").mkdir()
    (root / "\udcff\n").write_bytes(b"")
    assert_alike(root, exclude=frozenset({"a/repo"}))
    (tmp_path / "link").symlink_to(root)
    assert_alike(tmp_path / "link", exclude=frozenset({"a/repo"}))
    monkey_cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert_alike("data")
    finally:
        os.chdir(monkey_cwd)


# --- 2. nothing outside the root, under a race ----------------------------------------------------------------


def test_directories_swapped_for_links_while_walked_never_leak_outside(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: a thread swaps ``x`` and ``x/sub`` for links to a directory outside (which holds ``sub`` and
    ``SECRET``) and back, as fast as it can, while scans run; no scan holds a path or an inode from
    outside."""
    monkeypatch.setattr(tree, "_BATCH_ROWS", 3)
    outside = tmp_path / "outside"
    (outside / "sub" / "deeper").mkdir(parents=True)
    (outside / "SECRET").write_bytes(b"s")
    (outside / "sub" / "deeper" / "SECRET2").write_bytes(b"s")
    secret = {os.stat(p).st_ino for p in (outside / "SECRET", outside / "sub" / "deeper" / "SECRET2",
                                             outside / "sub", outside / "sub" / "deeper")}
    root = tmp_path / "data"
    for i in range(20):
        (root / "x" / "sub" / "deeper" / f"d{i}").mkdir(parents=True)
        (root / "x" / "sub" / "deeper" / f"d{i}" / "f").write_bytes(b"f")
    stop = threading.Event()

    def attacker() -> None:
        x = str(root / "x")
        while not stop.is_set():
            os.rename(f"{x}/sub", f"{x}/sub.real")
            os.symlink(outside / "sub", f"{x}/sub")
            os.unlink(f"{x}/sub")
            os.rename(f"{x}/sub.real", f"{x}/sub")
            os.rename(x, f"{x}.real")
            os.symlink(outside, x)
            os.unlink(x)
            os.rename(f"{x}.real", x)

    t = threading.Thread(target=attacker)
    t.start()
    try:
        for _ in range(150):
            table = scan_tree(str(root), native=True).table()
            assert not any(b"SECRET" in p for p in table.column("path").to_pylist())
            assert not secret & set(table.column("inode").to_pylist())
    finally:
        stop.set()
        t.join()


# --- C review -------------------------------------------------------------------------------------------------


def test_list_dir_keeps_the_names_it_matches_alive(tmp_path: Path) -> None:
    """_listdir.c:133-161: ``load_names`` keeps ``char *`` into each bytes item but drops the sequence
    PySequence_Fast made (``Py_DECREF(fast)``): for anything but a tuple or list (a generator, a map) that
    list was the items' only owner, so the names are freed before the listing compares entries against
    them (use after free, without the GIL). Under PYTHONMALLOC=debug the freed bytes are overwritten and
    the reserved name no longer matches."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "reserved-name-abcdefgh").write_bytes(b"")
    code = ("import os, sys\n"
            "from drsync import _listdir\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "names = (bytes(bytearray(b'reserved-name-abcdefgh')) for _ in range(1))\n"
            "print([e[:2] for e in _listdir.list_dir(fd, b'', names, ())[-1]])\n")
    out = subprocess.run([PY, "-c", code, str(d)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONMALLOC": "debug", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(5, b'reserved-name-abcdefgh')]"  # K_RESERVED


def test_list_dir_frees_its_name_tables_when_a_name_is_not_bytes(tmp_path: Path) -> None:
    """_listdir.c:152-154 returns -1 without freeing the two PyMem tables it allocated, and list_dir
    (241-246) does not free them either: 32 bytes leak per rejected call."""
    import tracemalloc

    from drsync import _listdir

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def refuse(times: int) -> None:
            for _ in range(times):
                try:
                    _listdir.list_dir(fd, b"", [b"a", 1], ())
                except TypeError:
                    continue
                raise AssertionError("a name that is not bytes was accepted")

        refuse(100)  # whatever the first calls allocate once
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            refuse(5000)
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert grown < 10_000, f"{grown} bytes still allocated after 5,000 rejected calls"


# --- 4. restore byte for byte; nothing read again -------------------------------------------------------------


def tree_of(root: Path) -> dict[bytes, tuple]:  # type: ignore[type-arg]
    """Every entry below ``root`` (any depth: through descriptors): type, mode, mtime, content or target."""
    import stat

    out: dict[bytes, tuple] = {}  # type: ignore[type-arg]

    def visit(fd: int, rel: bytes) -> None:
        for name in sorted(os.listdir(fd)):
            s = os.stat(name, dir_fd=fd, follow_symlinks=False)
            path = rel + b"/" + os.fsencode(name) if rel else os.fsencode(name)
            if stat.S_ISDIR(s.st_mode):
                out[path] = ("d", stat.S_IMODE(s.st_mode))
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    visit(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(s.st_mode):
                out[path] = ("l", os.readlink(name, dir_fd=fd))
            else:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                with os.fdopen(f, "rb") as fh:
                    out[path] = ("f", stat.S_IMODE(s.st_mode), s.st_mtime_ns, s.st_nlink, fh.read())

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        visit(top, b"")
    finally:
        os.close(top)
    return out



def test_a_snapshot_restores_byte_for_byte_and_an_unchanged_one_reads_nothing(tmp_path: Path) -> None:
    """Held, through the CLI: hostile names, links, hard links, a sparse file, setuid modes and a path
    past PATH_MAX restore exactly; the next snapshot of the unchanged tree reads 0 bytes. (Times are set
    in the past: a file modified within 2 s of the last capture is re-read by design; note that a file
    dated after now, e.g. 2400, is re-read by every snapshot.)"""
    data = tmp_path / "data"
    data.mkdir()
    rb = os.fsencode(data)
    for name in (b"a", b"a-b", b"a.b", b"\xff\xfe", b"new\nline", b"z" * 255):
        with open(rb + b"/" + name, "wb") as f:
            f.write(name * 100)
    os.mkdir(rb + b"/a.d")
    os.mkdir(rb + b"/a-dir")
    with open(rb + b"/a-dir/x", "wb") as f:
        f.write(os.urandom(200_000))
    os.link(rb + b"/a-dir/x", rb + b"/a.d/hard")
    os.symlink(b"../a-dir/x", rb + b"/a.d/link")
    with open(rb + b"/sparse", "wb") as f:
        f.seek(1 << 24)
        f.write(b"end")
    os.chmod(rb + b"/a.b", 0o4755)
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(22):
        os.mkdir("d" * 200, dir_fd=fd)
        nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    past = int(time.time() - 3600) * NS
    os.write(leaf := os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd), b"deep")
    os.utime(leaf, ns=(past, past))  # os.walk below does not reach past PATH_MAX
    os.close(leaf)
    os.close(fd)
    for dirpath, _dirs, files in os.walk(rb):
        for f in files:
            os.utime(os.path.join(dirpath, f), ns=(past, past), follow_symlinks=False)
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    first = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert first.code == 0, first.err
    second = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert second.code == 0, second.err
    assert second.json()["read_bytes"] == 0 and second.json()["reused_files"] == first.json()["files"]
    out = tmp_path / "out"
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    assert tree_of(out) == tree_of(data)
    assert os.stat(os.fsencode(out) + b"/a-dir/x").st_ino == os.stat(os.fsencode(out) + b"/a.d/hard").st_ino
    assert os.stat(os.fsencode(out) + b"/a.b").st_mode & 0o7777 == 0o4755


# --- 5. errors for humans ----------------------------------------------------------------------------------------


def test_a_missing_root_or_a_file_is_one_line(tmp_path: Path) -> None:
    """Held: exit 2 and one line, no traceback."""
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for src in (tmp_path / "nowhere", tmp_path / "file", tmp_path / "dangling"):
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", src)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r


def test_a_root_that_cannot_be_read_is_an_error_not_an_empty_snapshot(open_tmp: Path) -> None:
    """As nobody, a data root of mode 0700 owned by root: ``snapshot create`` exits 0, "snapshot ... taken:
    0 files", and commits an empty first snapshot (one warning, ".: cannot be listed (Permission denied);
    its last captured content is kept", though there is no last content). Not particular to the C listing:
    both listings mark the root unlisted (native_walk.py:179-183, tree.py:347-352) and nothing refuses a
    capture whose root itself could not be listed."""
    from tests.users import give_to_nobody, preload_everything, run_as_nobody

    repo = open_tmp / "repo"
    init_repo_at(repo, "c", "1")
    give_to_nobody(repo)
    data = open_tmp / "data"
    data.mkdir()
    (data / "f").write_bytes(b"precious")
    data.chmod(0o700)
    preload_everything()
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", data)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (code, err)


def test_a_root_that_vanishes_before_the_walk_is_an_error(repo: Repository, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The root is removed after the capture checked it and before the walk opened it (a volume
    unmounted, a directory renamed): the walk treats the root like any entry removed meanwhile
    (native_walk.py:177-178, tree.py:347-348: "simply not in this scan"), so a first snapshot is committed
    empty with not even a warning."""
    import shutil

    from drsync.dataroot import local

    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"precious")
    scan = local.LocalFrozenRoot.scan

    def vanish_then_scan(self: local.LocalFrozenRoot, exclude: frozenset[str]) -> tree.TreeScan:
        shutil.rmtree(self.root)
        return scan(self, exclude)

    monkeypatch.setattr(local.LocalFrozenRoot, "scan", vanish_then_scan)
    try:
        info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    except OperationFailed:
        return
    pytest.fail(f"an empty snapshot was taken of a vanished root: {info.files} files, warnings {info.warnings}")
