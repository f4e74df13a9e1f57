"""A file of several names (hard links) is read once per capture (drsync.read_once), and what each name
gets is still exactly its file (breaker s57b: a first capture read a 64 MiB file once per name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drsync import capture as cap
from drsync.read_once import SharedInodes
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import init_repo_at, snapshot_json, tree_state

BIG = 3 << 20
SMALL = 10_000
FILLER = 20_000  # more entries than a capture window (16,384) between the big file's names


def _tree(src: Path) -> None:
    (src / "a").mkdir(parents=True)
    (src / "a" / "big").write_bytes(os.urandom(BIG))
    (src / "a" / "small").write_bytes(os.urandom(SMALL))
    for n in range(5):  # the small file's names, all in one window
        os.link(src / "a" / "small", src / "a" / f"small-{n}")
    for n in range(3):
        os.link(src / "a" / "big", src / "a" / f"big-{n}")
    (src / "m").mkdir()
    for n in range(FILLER):
        (src / "m" / f"{n:05}").touch()
    (src / "z").mkdir()
    for n in range(4):  # the big file's names in a later window
        os.link(src / "a" / "big", src / "z" / f"big-{n}")


def test_a_file_of_many_names_is_read_once_per_capture_and_restored_whole(tmp_path: Path, drsync) -> None:  # type: ignore[no-untyped-def]
    src, repo, out = tmp_path / "src", tmp_path / "repo", tmp_path / "out"
    _tree(src)
    init_repo_at(repo, "east", "1")
    snap = snapshot_json(repo, src)
    assert snap["read_bytes"] == BIG + SMALL, snap  # was 8 x BIG + 6 x SMALL
    assert snap["files"] == 8 + 6 + FILLER
    assert drsync("snapshot", "restore", snap["id"], "--repo", repo, "--target", out).code == 0
    assert tree_state(out) == tree_state(src)
    big = (src / "a" / "big").read_bytes()
    names = [out / "a" / "big", *(out / "a" / f"big-{n}" for n in range(3)),
             *(out / "z" / f"big-{n}" for n in range(4))]
    assert {p.stat().st_ino for p in names} == {names[0].stat().st_ino}
    assert all(p.read_bytes() == big for p in names[::3])


def test_a_name_changed_since_the_read_is_read_itself(tmp_path: Path) -> None:
    """A held read stands only for a name seen at the version read; another version (the file rewritten
    between the windows: size, time or status-change time moved) gets nothing, and is read."""
    shared: SharedInodes[str] = SharedInodes(keep_bytes=1 << 20)
    v = (2 << 20, 10, 20, 7)
    shared.keep((1, 7), v, "read at v", names_left=2)
    assert shared.take((1, 7), (2 << 20, 10, 21, 7)) is None  # ctime moved: rewritten in place
    assert shared.take((2, 7), v) is None  # the same inode number on another device: another file
    assert shared.take((1, 7), v) == "read at v"
    assert shared.take((1, 7), v) == "read at v"
    assert shared.take((1, 7), v) is None and len(shared) == 0  # as many names as it had links: let go
    shared.keep((1, 8), (1 << 19, 10, 20, 8), "small", names_left=5)
    assert len(shared) == 0  # a small file is read again rather than held across windows


def _names_in_one_window(root: Path, n: int = 5) -> None:
    root.mkdir()
    (root / "a").write_bytes(b"first version\n")
    for k in range(1, n):
        os.link(root / "a", root / f"n{k}")


@pytest.mark.parametrize("fault", ["changed-since-the-scan", "changed-while-read"])
def test_a_file_of_many_names_that_changes_is_read_once_a_window_as_one_group(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                             fault: str) -> None:
    """Breaker s58: a 64 MiB file of 200 names written to during the capture was read once per name (13 GB),
    and its names captured apart. Now the first name's read, of a version newer than the scan saw or one
    that changed while read (its problem said once), stands for every name of the window: read once, one
    group, every name with the bytes read."""
    root = tmp_path / "root"
    _names_in_one_window(root)
    read_one = cap._read_one
    done: list[str] = []

    def changing(view, rel, writer, attempts, progress):  # type: ignore[no-untyped-def]
        if not done and fault == "changed-since-the-scan":
            (root / "a").write_bytes(b"the second version, longer\n")  # the same inode, every name
        got = read_one(view, rel, writer, attempts, progress)
        done.append(rel)
        if isinstance(got, cap._ReadFile) and fault == "changed-while-read":
            # Stands in for a file written to through every attempt (a race the test cannot time).
            got.problem = f"changed while being read ({attempts + 1} attempts); captured as last read"
        return got

    monkeypatch.setattr(cap, "_read_one", changing)
    repo = Repository.init(open_storage(str(tmp_path / "repo"), create=True), cluster_id="t", release="1")
    w = repo.chunk_writer()
    r = cap.capture(str(root), w, captured_at=2_000_000_000.0)
    w.flush()
    validate(r.manifest, "the captured manifest")
    assert done == ["a"]
    rows = {e.path: e for e in r.manifest.entries()}
    want = (root / "a").read_bytes()
    assert {b"".join(repo.read_chunk(c) for c in e.chunks) for e in rows.values()} == {want}
    assert all(rows[f"n{k}"].hardlink == "a" for k in range(1, 5))
    assert sum("changed while being read" in x for x in r.warnings) == (fault == "changed-while-read")
