"""A captured manifest never links a row to other bytes than its own (safety rule: a snapshot restores).

A hard-link member row names its group's first file (``hardlink``); a restore links the two and so
refuses a member whose size or content differs from its leader's. Before, a capture could write such
rows, and every restore and standby apply of that snapshot then refused:
- a stale row (a path that exists but could not be read keeps its last version) joined today's
  group of the same inode number, though the file was rewritten since or the number reused;
- two names of one inode read at different moments of a live tree, the file rewritten between.

The whole kind is closed at the two places that name leaders: the window's groups
(``hardlink_groups.LinkGroups``) and the stale rows' (``capture._stale_links``) link a row only to a
leader holding its size, content, mode and owner; and a capture with stale rows is validated as a
restore validates before it is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from drsync import capture as cap
from drsync.hardlink_groups import LinkGroups, holds
from drsync.repository.manifest import DIR, FILE
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository
from drsync.repository.snapshots import WarningLog
from drsync.storage import open_storage
from tests.conftest import run_drsync
from tests.users import give_to_nobody, run_as_nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to act as another user)")


def _stale(rows: list[tuple[str, str | None, int, str, int, bytes | None, int]]) -> pa.Table:
    """Stale rows: (path, hardlink, inode, type, size, content, mode), owner 0:0."""
    cols = list(zip(*rows, strict=True))
    return pa.table({
        "path": pa.array([p.encode() for p in cols[0]], pa.binary()),
        "hardlink": pa.array([h.encode() if h else None for h in cols[1]], pa.binary()),
        "inode": pa.array(cols[2], pa.uint64()), "type": pa.array(cols[3], pa.string()),
        "size": pa.array(cols[4], pa.int64()), "content": pa.array(cols[5], pa.binary()),
        "mode": pa.array(cols[6], pa.uint32()), "uid": pa.array([0] * len(rows), pa.uint32()),
        "gid": pa.array([0] * len(rows), pa.uint32()),
    })


def test_a_stale_row_joins_todays_group_only_when_it_holds_the_leaders_bytes() -> None:
    x, y = b"x" * 32, b"y" * 32
    today = LinkGroups()  # today's groups, each with a name still to come (the stale one)
    assert today.window([b"b5", b"b6", b"b8", b"other-disk", b"z"], np.array([1, 1, 1, 2, 1], np.uint64),
                        np.array([5, 6, 8, 10, 9], np.uint64), np.array([2] * 5), [holds(3, x, 0o644, 0, 0)] * 5,
                        WarningLog()) == [None] * 5
    old = _stale([
        ("a5", None, 5, FILE, 3, x, 0o644),      # unchanged since: joins today's group
        ("a6", None, 6, FILE, 3, y, 0o644),      # rewritten since (or the number reused): stands alone
        ("a7", None, 7, FILE, 4, y, 0o644),      # a stale group of its own: leads it
        ("a7m", "a7", 7, FILE, 4, y, 0o644),     # ... and its member follows it
        ("a7x", "a7", 7, FILE, 4, x, 0o644),     # a member holding other bytes: stands alone
        ("a8", None, 8, FILE, 3, x, 0o600),      # same bytes, another mode: a link would change it
        ("d", None, 5, DIR, 0, None, 0o755),     # a directory is never a link
        ("m1", "z", 9, FILE, 5, y, 0o644),       # today's leader z was rewritten: the stale members
        ("m2", "z", 9, FILE, 5, y, 0o644),       # ... of its old group keep each other
        ("n10", None, 10, FILE, 3, x, 0o644),    # the same inode number and bytes on another device
        ("u5", None, 5, FILE, 3, x, 0o644),      # its device unknown: never joins
    ])
    warnings = WarningLog()
    links = cap._stale_links(old, [1] * 10 + [None], today, warnings)
    assert links == [b"b5", None, None, b"a7", None, None, None, None, b"m1", None, None]
    assert any("a7x" in w and "other bytes" in w for w in warnings)


def _capture(repo: Repository, root: Path, parent=None):  # type: ignore[no-untyped-def]
    w = repo.chunk_writer()
    r = cap.capture(str(root), w, parent=parent, captured_at=2_000_000_000.0)
    w.flush()
    return r


def _bytes_of(repo: Repository, row) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(repo.read_chunk(c) for c in row.chunks)


def _rewritten_after_first_read(tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    """Two names ``a`` and ``b`` of one inode, the file rewritten (longer, the same inode) right after the
    capture's first read: (repository, capture result, the names read in order)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"first version\n")
    os.link(root / "a", root / "b")
    read_one = cap._read_one
    done: list[str] = []

    def rewriting(view, rel, writer, attempts, progress):  # type: ignore[no-untyped-def]
        got = read_one(view, rel, writer, attempts, progress)
        done.append(rel)
        if len(done) == 1:
            (root / "a").write_bytes(b"the second version, longer\n")  # the same inode, both names
        return got

    monkeypatch.setattr(cap, "_read_one", rewriting)
    repo = Repository.init(open_storage(str(tmp_path / "repo"), create=True), cluster_id="t", release="1")
    r = _capture(repo, root)
    validate(r.manifest, "the captured manifest")
    return repo, r, done


def test_a_file_rewritten_between_the_reads_of_two_of_its_names_is_captured_as_read(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Two names of one inode in two scan windows (a small file: not held from one window for the next, see
    drsync.read_once); after the first is read (on a live tree, in any order of the pool's threads) the file
    is rewritten. Each row says what was read under its name, the later one is not linked to the other bytes,
    a warning says so, and the manifest passes a restore's validation."""
    monkeypatch.setattr(cap, "_WINDOW", 1)
    repo, r, done = _rewritten_after_first_read(tmp_path, monkeypatch)
    rows = {e.path: e for e in r.manifest.entries()}
    first, second = done
    assert _bytes_of(repo, rows[first]) == b"first version\n"
    assert _bytes_of(repo, rows[second]) == b"the second version, longer\n"
    assert rows["a"].hardlink is None and rows["b"].hardlink is None
    assert any("rewritten while read" in w for w in r.warnings)


def test_names_of_one_inode_in_one_window_are_read_once_and_link(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two names of one inode in one scan window: the first name's read stands for the second, seen by the scan
    at the version read, even when the file is rewritten after that read: both rows hold the version read, as
    one group (a capture of a live tree holds each file as it was when read)."""
    repo, r, done = _rewritten_after_first_read(tmp_path, monkeypatch)
    rows = {e.path: e for e in r.manifest.entries()}
    assert done == ["a"]
    assert _bytes_of(repo, rows["a"]) == _bytes_of(repo, rows["b"]) == b"first version\n"
    assert rows["b"].hardlink == "a" and r.read_bytes == len(b"first version\n")


def test_names_of_an_unchanged_inode_read_apart_still_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a").write_bytes(b"one inode\n")
    os.link(root / "x" / "a", root / "z")
    repo = Repository.init(open_storage(str(tmp_path / "repo"), create=True), cluster_id="t", release="1")
    rows = {e.path: e for e in _capture(repo, root).manifest.entries()}
    assert rows["z"].hardlink == "x/a" and rows["x/a"].hardlink is None


@needs_root
@pytest.mark.parametrize("locked_name", ["a", "z"], ids=["leader-locked", "member-locked"])
@pytest.mark.parametrize("rewritten", [True, False], ids=["rewritten", "unchanged"])
def test_a_hard_link_in_an_unlistable_directory_restores(open_tmp: Path, locked_name: str, rewritten: bool) -> None:
    """One inode under two names, one of them in a directory that becomes unlistable; the file is then
    rewritten (through the readable name) or left alone. The second snapshot keeps the locked name stale:
    it restores with its last captured bytes, the readable name with today's, linked only when they are
    the same file still."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "locked").mkdir(parents=True)
    (src / "open").mkdir()
    locked, readable = src / "locked" / locked_name, src / "open" / "m"
    if locked_name == "a":  # "locked/a" < "open/m": the locked name leads in path order
        locked.write_bytes(b"version one\n")
        os.link(locked, readable)
    else:
        locked = src / "zlocked" / "z"
        locked.parent.mkdir()
        readable.write_bytes(b"version one\n")
        os.link(readable, locked)
    give_to_nobody(base)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)[0] == 0
    if rewritten:
        with open(readable, "r+b") as f:  # the inode both names hold
            f.write(b"VERSION TWO, longer\n")
    os.chown(locked.parent, 0, 0)
    os.chmod(locked.parent, 0o700)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    shown = run_drsync("snapshot", "show", "two", "--repo", repo)
    assert "stale_paths  1 (could not be read" in shown.out, shown.out
    out = base / "out"
    r = run_drsync("snapshot", "restore", "two", "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    rel_locked, rel_open = locked.relative_to(src), readable.relative_to(src)
    assert (out / rel_locked).read_bytes() == b"version one\n"
    today = b"VERSION TWO, longer\n" if rewritten else b"version one\n"
    assert (out / rel_open).read_bytes() == today
    same_inode = os.stat(out / rel_locked).st_ino == os.stat(out / rel_open).st_ino
    assert same_inode == (not rewritten)
