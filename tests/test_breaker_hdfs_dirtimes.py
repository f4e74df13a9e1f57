"""Breaker: HDFS captures never hold a directory time from after their snapshot (commit 844a403).

Each test acts on the live tree between drsync's snapshot creation and its listing (an HdfsFs
subclass hooking create_snapshot), then checks the promise:
  * no directory in the capture has an mtime after the snapshot's own time;
  * a directory whose entries in the capture equal those in the parent manifest has the parent's
    time exactly;
  * everything else (files, sizes, contents, modes, dir set) equals the snapshot as Hadoop lists it.

Observed on the session's Hadoop 3.5 cluster: only CREATE and MKDIRS after the snapshot move a
directory's time under .snapshot/<name>; DELETE, RENAME and SETTIMES after it leave it frozen.

Found (fixed): _parent_dir_times called pc.binary_slice(below, len(prefix)) without a stop; pyarrow
26.0.1 raises "ArrowInvalid: Negative buffer resize" for it whenever the array has an even number of
rows. So any capture in which a directory's time leaked, and the parent manifest held an even number
of entries below that directory (2, 4, ...), failed outright.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from drsync.dataroot.hdfs import SNAPSHOT_PREFIX, HdfsDataRoot
from drsync.repository.manifest import DIR, Manifest
from drsync.storage.hdfs import HdfsFs, parse_hdfs_url
from tests.sites import HdfsSite
from tests.test_hdfs import _captured, _drsync_snapshots, _fs, _hadoop, _no_dir_mtimes, _repo

_COLS = ["path", "type", "mode", "size", "mtime_s", "mtime_nsec", "content"]


class _Hook(HdfsFs):
    """Runs ``act(n)`` right after the n-th drsync snapshot is taken (before it is listed), and
    ``before(n)`` right before it is taken."""

    def __init__(self, url: str, act: Callable[[HdfsFs, int], None],
                 before: Callable[[HdfsFs, int], None] | None = None) -> None:
        super().__init__(parse_hdfs_url(url))
        self.act, self.before, self.n = act, before, 0

    def create_snapshot(self, directory: str, name: str) -> str:
        drsync = name.startswith(SNAPSHOT_PREFIX)
        if drsync and self.before is not None:
            self.before(self, self.n + 1)
        out = super().create_snapshot(directory, name)
        if drsync:
            self.n += 1
            self.act(self, self.n)
        return out


def _dirs(m: Manifest) -> dict[str, tuple[int, frozenset[str]]]:
    """{dir: (mtime_ns, names of children)}, with "" standing for the root's children."""
    ents = list(m.entries())
    kids: dict[str, set[str]] = {e.path: set() for e in ents if e.type == DIR}
    kids[""] = set()
    for e in ents:
        parent, _, name = e.path.rpartition("/")
        kids.setdefault(parent, set()).add(name)
    return {e.path: (e.mtime_ns, frozenset(kids[e.path])) for e in ents if e.type == DIR}


def _check(webhdfs: Any, data: str, repo: Any, result: Any, parent: Manifest | None = None) -> None:
    snaps = _drsync_snapshots(webhdfs, data)
    assert len(snaps) == 1, snaps
    snap = snaps[0]
    taken_ns = _fs(webhdfs).status(f"{data}/.snapshot/{snap}")["modificationTime"] * 1_000_000
    now = _dirs(result.manifest)
    late = {d: t for d, (t, _) in now.items() if t > taken_ns}
    assert not late, f"directory times after the snapshot ({taken_ns}): {late}"
    if parent is not None:
        before = _dirs(parent)
        moved = {d: (before[d][0], t) for d, (t, names) in now.items()
                 if d in before and before[d][1] == names and before[d][0] != t}
        assert not moved, f"same entries as the parent, but another time (parent, now): {moved}"
    got = _no_dir_mtimes(_captured(repo, result.manifest))
    want = _no_dir_mtimes(_hadoop(webhdfs, f"{data}/.snapshot/{snap}"))
    assert got == want


def _setup(webhdfs: Any, files: list[str]) -> tuple[HdfsSite, str]:
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    for f in files:
        site.write("data", f, f.encode())
    data = site.path("data")
    webhdfs.allow_snapshot(data)
    return site, data


def _two(webhdfs: Any, files: list[str], act: Callable[[HdfsFs, int], None], *,
         between: Callable[[HdfsSite, HdfsFs], None] | None = None, exclude: frozenset[str] = frozenset(),
         hook_first: bool = False) -> tuple[Any, Any]:
    """A plain first capture (or hooked), optional changes, then a second capture hooked with ``act``."""
    site, data = _setup(webhdfs, files)
    repo = _repo()
    at = time.time()
    fs1 = _Hook(site.url("data"), act) if hook_first else None
    first = _cap(HdfsDataRoot(site.url("data"), fs=fs1), repo, at=at, exclude=exclude)
    _check(webhdfs, data, repo, first)
    if between is not None:
        between(site, _fs(webhdfs))
    fs = _Hook(site.url("data"), act, None)
    fs.n = 1 if hook_first else 0
    second = _cap(HdfsDataRoot(site.url("data"), fs=fs), repo, first.manifest, at, at + 1, exclude=exclude)
    _check(webhdfs, data, repo, second, first.manifest)
    return first, second


def _cap(root: HdfsDataRoot, repo: Any, parent: Any = None, parent_at: Any = None, at: Any = None, *,
         exclude: frozenset[str] = frozenset()) -> Any:
    from drsync.capture import capture
    w = repo.chunk_writer()
    result = capture(root, w, parent=parent, parent_captured_at=parent_at, captured_at=at, exclude=exclude)
    w.flush()
    return result


def _p(webhdfs: Any, rel: str) -> str:
    return f"{webhdfs.test_dir}/data/{rel}"


# --- single kinds of change after the snapshot ------------------------------------------------

def test_mkdir_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["sub/f", "other/g"], lambda fs, n: fs.mkdirs(_p(webhdfs, f"sub/newdir{n}")))


def test_mkdir_after_the_snapshot_first_capture(webhdfs) -> None:  # type: ignore[no-untyped-def]
    site, data = _setup(webhdfs, ["sub/f", "a/b/c/f"])
    repo = _repo()

    def act(fs: HdfsFs, n: int) -> None:
        fs.mkdirs(_p(webhdfs, "sub/newdir"))
        fs.mkdirs(_p(webhdfs, "a/b/c/newdir"))
        fs.write(_p(webhdfs, "a/late"), b"x")
    first = _cap(HdfsDataRoot(site.url("data"), fs=_Hook(site.url("data"), act)), repo, at=time.time())
    _check(webhdfs, data, repo, first)


def test_delete_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["sub/f", "sub/g", "other/h"], lambda fs, n: fs.delete(_p(webhdfs, "sub/g")))


def test_delete_a_directory_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["sub/inner/f", "sub/g"], lambda fs, n: fs.delete(_p(webhdfs, "sub/inner"), recursive=True))


def test_rename_within_a_directory_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["sub/f", "sub/g"], lambda fs, n: fs.rename(_p(webhdfs, "sub/f"), _p(webhdfs, "sub/f-renamed")))


def test_rename_across_directories_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["src/f", "src/keep", "dst/g"],
         lambda fs, n: fs.rename(_p(webhdfs, "src/f"), _p(webhdfs, "dst/f-moved")))


def test_rename_a_directory_out_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    _two(webhdfs, ["a/b/inner/f", "a/keep", "z/g"],
         lambda fs, n: fs.rename(_p(webhdfs, "a/b/inner"), _p(webhdfs, "z/inner-moved")))


def test_rename_the_changed_directory_itself_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    def act(fs: HdfsFs, n: int) -> None:
        fs.write(_p(webhdfs, "p/sub/late"), b"x")
        fs.rename(_p(webhdfs, "p/sub"), _p(webhdfs, "q/sub-moved"))
    _two(webhdfs, ["p/sub/f", "q/g"], act)


def test_nested_changes_several_levels_deep(webhdfs) -> None:  # type: ignore[no-untyped-def]
    def act(fs: HdfsFs, n: int) -> None:
        for d in ("a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e"):
            fs.write(_p(webhdfs, f"{d}/late{n}"), b"late")
    _two(webhdfs, ["a/b/c/d/e/f", "a/x"], act)


def test_nested_change_below_a_directory_the_diff_walks(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Before the 2nd snapshot a file deep in a/b/c changes (the diff walks a, a/b, a/b/c); after it,
    every level gets a new directory."""
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.delete(_p(webhdfs, "a/b/c/gone"))

    def act(fs: HdfsFs, n: int) -> None:
        for d in ("a", "a/b", "a/b/c", "a/b/c/d"):
            fs.mkdirs(_p(webhdfs, f"{d}/new{n}"))
    _two(webhdfs, ["a/b/c/d/f", "a/b/c/gone", "a/x"], act, between=between)


def test_many_directories_changed_at_once(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """More than a listing page (25) of directories, each changed after the snapshot."""
    files = [f"d{i:02d}/f" for i in range(40)]

    def act(fs: HdfsFs, n: int) -> None:
        for i in range(40):
            if i % 3 == 0:
                fs.write(_p(webhdfs, f"d{i:02d}/late{n}"), b"x")
            elif i % 3 == 1:
                fs.mkdirs(_p(webhdfs, f"d{i:02d}/newdir{n}"))
            else:
                fs.delete(_p(webhdfs, f"d{i:02d}/f"))
    _two(webhdfs, files, act)


def test_names_with_spaces_unicode_and_percent_signs(webhdfs) -> None:  # type: ignore[no-untyped-def]
    names = ["sp ace", "ünï cödé", "per%25cent", "100%", "a+b", "x%2Fy"]

    def act(fs: HdfsFs, n: int) -> None:
        for d in names:
            fs.write(_p(webhdfs, f"{d}/late {n} ü%"), b"x")
    _two(webhdfs, [f"{d}/f ü%41" for d in names], act)


def test_names_with_special_characters_walked_by_the_diff(webhdfs) -> None:  # type: ignore[no-untyped-def]
    names = ["sp ace", "ünï cödé", "per%25cent", "100%"]

    def between(site: HdfsSite, fs: HdfsFs) -> None:
        for d in names:
            fs.write(_p(webhdfs, f"{d}/f ü%41"), b"rewritten before the snapshot", overwrite=True)

    def act(fs: HdfsFs, n: int) -> None:
        for d in names:
            fs.mkdirs(_p(webhdfs, f"{d}/new dir {n} %"))
    _two(webhdfs, [f"{d}/f ü%41" for d in names], act, between=between)


# --- reused from the parent vs walked ---------------------------------------------------------

def test_reused_directory_changed_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Nothing changes between the captures (every directory is reused from the parent by the diff);
    after the snapshot: a file, a dir, a delete, in different directories and depths."""
    def act(fs: HdfsFs, n: int) -> None:
        fs.write(_p(webhdfs, f"r1/late{n}"), b"x")
        fs.mkdirs(_p(webhdfs, f"r2/deep/newdir{n}"))
        fs.delete(_p(webhdfs, "r3/deep/deeper/f"))
    _two(webhdfs, ["r1/f", "r2/deep/f", "r3/deep/deeper/f", "r3/deep/deeper/g"], act)


def test_walked_directory_with_the_same_entries_changed_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """A file in ``sub`` is rewritten before the snapshot (the diff names sub: it is walked, entries
    the same), and a file created there after: the parent's time holds."""
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.write(_p(webhdfs, "sub/f"), b"rewritten", overwrite=True)
    _, _second = _two(webhdfs, ["sub/f", "sub/g"], lambda fs, n: fs.write(_p(webhdfs, f"sub/late{n}"), b"x"),
                     between=between)


def test_directory_deleted_and_recreated_with_the_same_children(webhdfs) -> None:  # type: ignore[no-untyped-def]
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.delete(_p(webhdfs, "sub"), recursive=True)
        fs.write(_p(webhdfs, "sub/f"), b"sub/f")
        fs.write(_p(webhdfs, "sub/g"), b"sub/g")
    _two(webhdfs, ["sub/f", "sub/g"], lambda fs, n: fs.write(_p(webhdfs, f"sub/late{n}"), b"x"), between=between)


def test_entries_changed_before_and_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Before: sub/g deleted; after: sub/g created again (so live entries = parent entries)."""
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.delete(_p(webhdfs, "sub/g"))
        fs.mkdirs(_p(webhdfs, "other/new"))
    _two(webhdfs, ["sub/f", "sub/g", "other/h"], lambda fs, n: fs.write(_p(webhdfs, "sub/g"), b"back"),
         between=between)


def test_added_and_removed_before_then_changed_after(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Before: a file created and deleted in sub (same entries as the parent); after: a file created."""
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.write(_p(webhdfs, "sub/tmp"), b"tmp")
        fs.delete(_p(webhdfs, "sub/tmp"))
    _two(webhdfs, ["sub/f"], lambda fs, n: fs.write(_p(webhdfs, f"sub/late{n}"), b"x"), between=between)


def test_excluded_paths(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """An excluded file and an excluded directory in sub; after the snapshot, changes in sub and in
    the excluded directory."""
    def act(fs: HdfsFs, n: int) -> None:
        fs.write(_p(webhdfs, f"sub/late{n}"), b"x")
        fs.write(_p(webhdfs, f"sub/skipdir/late{n}"), b"x")
        fs.delete(_p(webhdfs, "sub/skipfile"))
    site, data = _setup(webhdfs, ["sub/f", "sub/skipfile", "sub/skipdir/f"])
    repo = _repo()
    at = time.time()
    exclude = frozenset({"sub/skipfile", "sub/skipdir"})
    first = _cap(HdfsDataRoot(site.url("data")), repo, at=at, exclude=exclude)
    second = _cap(HdfsDataRoot(site.url("data"), fs=_Hook(site.url("data"), act)), repo, first.manifest, at,
                  at + 1, exclude=exclude)
    [snap] = _drsync_snapshots(webhdfs, data)
    taken_ns = _fs(webhdfs).status(f"{data}/.snapshot/{snap}")["modificationTime"] * 1_000_000
    d1, d2 = _dirs(first.manifest), _dirs(second.manifest)
    assert d2["sub"][1] == d1["sub"][1] == {"f"}
    assert d2["sub"][0] == d1["sub"][0] <= taken_ns


# --- setTimes after the snapshot -----------------------------------------------------------------

def test_settimes_on_a_directory_after_the_snapshot_into_the_future(webhdfs) -> None:  # type: ignore[no-untyped-def]
    future = int((time.time() + 3600) * 1e9)
    _two(webhdfs, ["sub/f"], lambda fs, n: fs.set_times(_p(webhdfs, "sub"), future))


def test_settimes_on_a_directory_after_the_snapshot_into_the_past(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Like DistCp -pt or touch -m -d: a directory's time set back after the snapshot."""
    past = int((time.time() - 86400) * 1e9)
    _two(webhdfs, ["sub/f"], lambda fs, n: fs.set_times(_p(webhdfs, "sub"), past))


def test_create_then_settimes_back_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """After the snapshot: a file created in sub, then sub's time set back to 1 s before its old time
    (what a copy tool preserving times does)."""
    def act(fs: HdfsFs, n: int) -> None:
        old = fs.status(_p(webhdfs, "sub"))["modificationTime"]
        fs.write(_p(webhdfs, f"sub/late{n}"), b"x")
        fs.set_times(_p(webhdfs, "sub"), (old - 1000) * 1_000_000)
    _two(webhdfs, ["sub/f"], act)


def test_settimes_on_a_file_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Files' attributes in the capture equal the snapshot's (file mtimes included)."""
    past = int((time.time() - 86400) * 1e9)
    first, second = _two(webhdfs, ["sub/f"], lambda fs, n: fs.set_times(_p(webhdfs, "sub/f"), past))
    f1 = next(e for e in first.manifest.entries() if e.path == "sub/f")
    f2 = next(e for e in second.manifest.entries() if e.path == "sub/f")
    assert f1.mtime_ns == f2.mtime_ns


def test_append_to_a_file_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    first, second = _two(webhdfs, ["sub/f"], lambda fs, n: webhdfs.append(_p(webhdfs, "sub/f"), b"appended"))
    f1 = next(e for e in first.manifest.entries() if e.path == "sub/f")
    f2 = next(e for e in second.manifest.entries() if e.path == "sub/f")
    assert (f1.size, f1.mtime_ns) == (f2.size, f2.mtime_ns)


# --- the root and stability ----------------------------------------------------------------

def test_changes_at_the_root_after_the_snapshot(webhdfs) -> None:  # type: ignore[no-untyped-def]
    def act(fs: HdfsFs, n: int) -> None:
        fs.write(_p(webhdfs, f"late{n}"), b"x")
        fs.mkdirs(_p(webhdfs, f"newdir{n}"))
        fs.delete(_p(webhdfs, f"top{n}"))
    _first, second = _two(webhdfs, ["top1", "top2", "sub/f"], act, hook_first=True)
    assert "top2" in [e.path for e in second.manifest.entries()]
    assert "late2" not in [e.path for e in second.manifest.entries()]


def test_an_unchanged_tree_captured_again_gives_the_same_manifest(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """Every change happens after a snapshot and is undone before the next one: all three captures
    hold the same tree, so the same manifest."""
    dirs = ["a", "a/b", "a/b/c", "sp ace %", "d1", "d2"]
    site, data = _setup(webhdfs, [f"{d}/f" for d in dirs] + ["d2/gone"])

    def act(fs: HdfsFs, n: int) -> None:
        for d in dirs:
            fs.write(_p(webhdfs, f"{d}/late"), b"x")
            fs.mkdirs(_p(webhdfs, f"{d}/latedir"))
        fs.rename(_p(webhdfs, "d2/gone"), _p(webhdfs, "d1/moved"))

    def undo(fs: HdfsFs, n: int) -> None:
        if n == 1:
            return
        for d in dirs:
            fs.delete(_p(webhdfs, f"{d}/late"))
            fs.delete(_p(webhdfs, f"{d}/latedir"))
        fs.rename(_p(webhdfs, "d1/moved"), _p(webhdfs, "d2/gone"))
    fs = _Hook(site.url("data"), act, undo)
    repo = _repo()
    at = time.time()
    results = []
    parent = None
    for i in range(3):
        r = _cap(HdfsDataRoot(site.url("data"), fs=fs), repo, parent, at + i - 1 if parent else None, at + i)
        _check(webhdfs, data, repo, r, parent)
        results.append(r)
        parent = r.manifest
    t0 = results[0].manifest.table.select(_COLS)
    for r in results[1:]:
        assert r.manifest.table.select(_COLS).equals(t0), (_dirs(results[0].manifest), _dirs(r.manifest))


# --- how many entries the changed directory has ------------------------------------------------

def test_the_existing_case_with_two_files_in_the_directory(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """test_a_directory_changed_after_the_snapshot_keeps_its_time_from_before, with ``sub`` holding two
    files instead of one (any even number of entries below a directory whose time leaked)."""
    _two(webhdfs, ["sub/done", "sub/done2"], lambda fs, n: fs.write(_p(webhdfs, f"sub/late.{n}"), b"x"))


def test_a_changed_directory_listed_over_several_pages(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """31 entries (two listing pages of 25) in a directory changed after the snapshot; walked (a file
    in it rewritten before the snapshot)."""
    def between(site: HdfsSite, fs: HdfsFs) -> None:
        fs.write(_p(webhdfs, "big/f07"), b"rewritten", overwrite=True)
    _two(webhdfs, [f"big/f{i:02d}" for i in range(31)], lambda fs, n: fs.mkdirs(_p(webhdfs, f"big/new{n}")),
         between=between)


def test_a_whole_walk_with_a_parent(webhdfs) -> None:  # type: ignore[no-untyped-def]
    """The second capture is over FULL_WALK_EVERY_MS after the first: a whole walk (no diff base), with
    the parent for the times."""
    from drsync.dataroot.hdfs import FULL_WALK_EVERY_MS
    site, data = _setup(webhdfs, ["sub/f", "a/b/f"])
    repo = _repo()
    at = time.time() - 2 * FULL_WALK_EVERY_MS / 1000
    first = _cap(HdfsDataRoot(site.url("data")), repo, at=at)

    def act(fs: HdfsFs, n: int) -> None:
        fs.write(_p(webhdfs, "sub/late"), b"x")
        fs.mkdirs(_p(webhdfs, "a/b/newdir"))
    second = _cap(HdfsDataRoot(site.url("data"), fs=_Hook(site.url("data"), act)), repo, first.manifest, at,
                  time.time())
    _check(webhdfs, data, repo, second, first.manifest)
