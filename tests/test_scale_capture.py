"""Capture at scale: windows and row groups change nothing in the manifest, and memory stays bounded.

The capture reads the parent one row group at a time and assembles the manifest one window of
scan rows at a time (drsync.capture). These tests shrink both to a few rows, so that every
boundary case (a parent group spanning windows, a hard-link group split by a window, stale rows
from an unreadable directory) is crossed on a small tree, and compare with one window.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from drsync import capture as cap
from drsync.repository import manifest as mf
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.tree import SCAN_SCHEMA, TreeScan


def _tree(root) -> None:
    for d in range(4):
        sub = root / f"d{d}" / "x"
        sub.mkdir(parents=True)
        for i in range(6):
            (sub / f"f{i}").write_bytes(f"{d}-{i}\n".encode() * (i + 1))
        (root / f"d{d}-sibling").write_text(f"sorts before d{d}/\n")
    os.link(root / "d0" / "x" / "f0", root / "d3" / "x" / "hard")  # a group split by windows
    os.symlink("x/f1", root / "d1" / "link")
    past = 1_600_000_000
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (past, past), follow_symlinks=False)


def _capture(repo: Repository, root, parent=None, parent_at=None):
    w = repo.chunk_writer()
    r = cap.capture(str(root), w, parent=parent, parent_captured_at=parent_at, captured_at=2_000_000_000.0)
    w.flush()
    return r


@pytest.fixture
def repo(tmp_path):
    return Repository.init(open_storage(str(tmp_path / "repo"), create=True), cluster_id="t", release="1")


def _windows(monkeypatch, window: int, row_group: int) -> None:
    """Capture windows of ``window`` scan rows, manifests written in row groups of ``row_group``."""
    monkeypatch.setattr(cap, "_WINDOW", window)
    monkeypatch.setattr(mf, "ROW_GROUP", row_group)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    _tree(r)
    return r


def test_windows_and_row_groups_do_not_change_the_manifest(root, repo, monkeypatch):
    whole = _capture(repo, root)
    _windows(monkeypatch, 3, 4)
    small = _capture(repo, root)
    assert small.manifest.table.equals(whole.manifest.table)
    assert len(mf.ManifestFile(small.stored).starts) > 5  # many row groups were written

    # Against a parent read in groups of 4: unchanged files reuse their rows, changed ones are read.
    (root / "d2" / "x" / "f3").write_bytes(b"rewritten\n")
    os.utime(root / "d2" / "x" / "f3", (1_600_000_000, 1_600_000_000))
    parent = mf.ManifestFile(small.stored)
    again = _capture(repo, root, parent, 1_900_000_000.0)
    files = whole.files
    assert again.files == files and again.reused_files == files - 1
    assert again.read_bytes == len(b"rewritten\n")
    rows = {e.path: e for e in again.manifest.entries()}
    assert rows["d3/x/hard"].hardlink == "d0/x/f0" and rows["d1/link"].target == "x/f1"
    assert rows["d2/x/f3"].size == len(b"rewritten\n")
    paths = again.manifest.table.column("path").to_pylist()
    assert paths == sorted(paths)
    _windows(monkeypatch, 1 << 20, 1 << 20)
    assert _capture(repo, root, mf.ManifestFile(small.stored), 1_900_000_000.0).manifest.table.equals(
        again.manifest.table)


def test_a_local_tree_is_walked_as_the_windows_are_taken(root, repo, monkeypatch):
    """The scan is not held whole: when a window is assembled, the walk has sealed at most that window,
    the next one and a batch beyond what came before it."""
    from drsync import tree

    _windows(monkeypatch, 3, 4)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 2)
    sealed = [0]
    seal_columns = tree.TreeScan.seal_columns

    def counting(self):  # type: ignore[no-untyped-def]
        sealed[0] += len(self.path)
        seal_columns(self)

    monkeypatch.setattr(tree.TreeScan, "seal_columns", counting)
    seen: list[tuple[int, int]] = []
    window = cap._window

    def recording(view, writer, w, *args):  # type: ignore[no-untyped-def]
        seen.append(((seen[-1][0] if seen else 0) + w.num_rows, sealed[0]))
        return window(view, writer, w, *args)

    monkeypatch.setattr(cap, "_window", recording)
    r = _capture(repo, root)
    total = len(r.manifest)
    assert len(seen) == -(-total // 3) and seen[-1][0] == total
    assert all(walked <= end + 3 + 2 for end, walked in seen), seen
    assert seen[0][1] < total


def test_links_escaping_through_links_in_other_windows_are_left_out(tmp_path, repo, monkeypatch):
    """A link that escapes the root only through a link in another window (one windows cannot tell
    until every link is known) is left out of the stored manifest, with a warning, as with one window."""
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    os.symlink("..", root / "d0" / "b")  # inside: d0/.. is the root
    os.symlink("../d0/b/..", root / "d3" / "a")  # looks like "d0", resolves to the root's parent
    os.symlink("../d0/b", root / "d3" / "ok")
    whole = _capture(repo, root)
    _windows(monkeypatch, 2, 3)
    small = _capture(repo, root)
    paths = small.manifest.table.column("path").to_pylist()
    assert b"d3/a" not in paths and b"d3/ok" in paths and b"d0/b" in paths
    assert any("d3/a: symlink" in w and "outside" in w for w in small.warnings)
    assert small.manifest.table.equals(whole.manifest.table)
    validate(small.manifest)


def test_stale_rows_and_a_vanished_leader_across_windows(root, repo, monkeypatch):
    """A file that cannot be read keeps its last version (stale), a directory that cannot be
    listed keeps its subtree, and a hard-link group whose first path vanished names the next."""
    first = _capture(repo, root)
    _windows(monkeypatch, 3, 4)
    from drsync.dataroot.local import LocalFrozenRoot

    orig_scan, orig_open = LocalFrozenRoot.scan, LocalFrozenRoot.open_file

    def scan(self, exclude):
        s = orig_scan(self, exclude)
        s.unlisted.append("d1/x")  # as if d1/x could not be listed: its rows must come from the parent
        t = s.table()
        keep = [not p.startswith(b"d1/x/") for p in t.column("path").to_pylist()]
        s.batches = t.filter(pa.array(keep)).to_batches()
        return s

    def open_file(self, rel):
        if rel == "d2/x/f4":
            raise PermissionError(13, "Permission denied")
        if rel == "d0/x/f0":
            raise FileNotFoundError(2, "vanished after the scan")
        return orig_open(self, rel)

    (root / "d2" / "x" / "f4").write_bytes(b"changed, but unreadable now\n")
    # The hard-link group (d0/x/f0, d3/x/hard) changes; its first path vanishes before it is read.
    (root / "d0" / "x" / "f0").write_bytes(b"both names change\n")
    monkeypatch.setattr(LocalFrozenRoot, "scan", scan)
    monkeypatch.setattr(LocalFrozenRoot, "open_file", open_file)
    r = _capture(repo, root, mf.ManifestFile(first.stored), 1_900_000_000.0)
    rows = {e.path: e for e in r.manifest.entries()}
    before = {e.path: e for e in first.manifest.entries()}
    assert rows["d2/x/f4"].stale and rows["d2/x/f4"].chunks == before["d2/x/f4"].chunks
    assert all(rows[p].stale for p in before if p.startswith("d1/x/"))
    # Vanished between the scan and its read (renamed or removed): its last version is kept, stale (breaker
    # s49r: a rename during the walk is never a deletion); the group's other name, read anew, leads itself.
    assert rows["d0/x/f0"].stale and rows["d0/x/f0"].chunks == before["d0/x/f0"].chunks
    assert rows["d3/x/hard"].hardlink is None and not rows["d3/x/hard"].stale
    assert r.stale == 2 + sum(1 for p in before if p.startswith("d1/x/"))
    validate(r.manifest)
    paths = r.manifest.table.column("path").to_pylist()
    assert paths == sorted(paths)


def test_matching_200000_entries_holds_no_python_object_per_entry():
    """The parent match on 200,000 rows: NumPy and Python allocations (tracemalloc) stay far
    below one Python object per entry (which would be tens of MiB), and Arrow's own peak stays
    within a few copies of the tables. Memory bounds only, no timing."""
    n = 200_000
    paths = pa.array([f"d{i // 1000:04}/f{i % 1000:04}".encode() for i in range(n)], pa.binary())
    ints = pa.array(np.arange(n, dtype=np.int64))
    scan = TreeScan("/nowhere")
    scan.batches = pa.table({
        "path": paths, "type": pa.array(["file"] * n), "mode": pa.array(np.full(n, 0o644, np.uint32)),
        "uid": pa.array(np.zeros(n, np.uint32)), "gid": pa.array(np.zeros(n, np.uint32)), "size": ints,
        "mtime_s": ints, "mtime_nsec": pa.array(np.zeros(n, np.uint32)), "ctime_ns": ints,
        "inode": pa.array(np.arange(n, dtype=np.uint64)), "target": pa.nulls(n, pa.binary()),
        "nlink": pa.array(np.ones(n, np.uint64)), "dev": pa.array(np.zeros(n, np.uint64)), "blocks": ints,
    }, schema=SCAN_SCHEMA).to_batches(max_chunksize=16384)
    scan.sorted = True
    ids = pa.array([i.to_bytes(32, "big") for i in range(n)], pa.binary(32))
    parent = mf.Manifest(pa.table({
        "path": paths, "type": pa.array(["file"] * n), "mode": pa.array(np.full(n, 0o644, np.uint32)),
        "uid": pa.array(np.zeros(n, np.uint32)), "gid": pa.array(np.zeros(n, np.uint32)), "size": ints,
        "mtime_s": ints, "mtime_nsec": pa.array(np.zeros(n, np.uint32)), "ctime_ns": ints,
        "inode": pa.array(np.arange(n, dtype=np.uint64)), "target": pa.nulls(n, pa.binary()), "content": ids,
        "chunks": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), ids),
        "chunk_sizes": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), ints.cast(pa.uint32())),
        "xattrs": pa.nulls(n, pa.binary()), "hardlink": pa.nulls(n, pa.binary()),
        "sparse": pa.array(np.zeros(n, bool)), "stale": pa.array(np.zeros(n, bool)),
    }, schema=mf.SCHEMA))
    data = parent.to_bytes()
    del parent
    tracemalloc.start()
    matcher = cap._Matcher(cap._Parent(mf.ManifestFile(data)), 1_000_000_000.0, external_ok=False)
    reuse = np.concatenate([matcher.match(w)[1] for w in scan.windows(cap._WINDOW)])
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (reuse == np.arange(n)).all()  # every row matched its parent row
    # Two int64 results (3.2 MB) and per-group temporaries; a dict or list of 200,000 objects would
    # cost 20 MB and more.
    assert py_peak < 12 << 20, f"{py_peak / 2**20:.1f} MiB of Python/NumPy memory for {n} entries"
