"""Symlinks in the apply's first pass (:mod:`drsync.unchanged`): a link the target holds alike (target, time,
owner) is settled by the merge, one only the snapshot has is made from its manifest row (a restore of a
million links makes no object per link); the plan is the one from both sides whole, a standby's too (links
of its own that climb through the settled ones are resolved with them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync import engine
from drsync.apply import apply_manifest, comparison_resolution, plan_apply
from drsync.dataroot.local import LocalDataRoot
from drsync.repository.manifest import Manifest
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.tree import EntryColumns, LocalEntry
from drsync.unchanged import Residual, split_unchanged
from tests.test_unchanged_merge import _plans, _shape, merged_with_peak

MiB = 1 << 20
T0 = 1_600_000_000


def _links_tree(root: Path) -> None:
    """Links of every kind a manifest keeps: relative, dangling, to a directory, climbing with "..",
    undecodable bytes, a long target, one to itself; in directories on both sides of a window's edge."""
    (root / "p" / "q").mkdir(parents=True)
    (root / "p" / "q" / "f").write_bytes(b"f")
    for d in ("a", "a-b", "z"):
        (root / d).mkdir()
        os.symlink("../p/q/f", root / d / "up")
        os.symlink("missing", root / d / "dangling")
        os.symlink(b"\xff\xfe-name", os.fsencode(root / d) + b"/odd")
        os.symlink("./" * 900 + "up", root / d / "long")
    os.symlink("../p/q/r/s", root / "a" / "deeper")  # resolves two levels deeper than it lies
    os.symlink("..", root / "a" / "top")  # the root itself
    os.symlink("self", root / "self")
    for d, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(d, n), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)


@pytest.fixture
def snap(tmp_path: Path) -> tuple[Repository, Manifest, Path]:
    src = tmp_path / "src"
    _links_tree(src)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    return repo, repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))), src


def test_alike_links_are_settled_and_new_ones_are_rows(snap: tuple, tmp_path: Path,  # type: ignore[type-arg]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import drsync.unchanged

    monkeypatch.setattr(drsync.unchanged, "_BATCH", 3)
    repo, manifest, src = snap
    links = sum(1 for e in manifest.entries(light=True) if e.type == "symlink")
    root = LocalDataRoot(str(src))
    rest = split_unchanged(manifest, root.walk_existing(), compare_owner=True)
    assert rest is not None and len(rest.alike_link_rows) == links and not rest.existing
    assert _plans(manifest, root)[0] == _plans(manifest, root)[1]
    target = tmp_path / "t"
    target.mkdir()
    empty = LocalDataRoot(str(target))
    rest = split_unchanged(manifest, empty.walk_existing())
    assert rest is not None and len(rest.symlink_rows) == links
    whole, merged = _plans(manifest, empty)
    assert whole == merged and len(whole["link"]) == links  # type: ignore[arg-type]
    # really made, then left alone; a link changed in each way is made again
    res = apply_manifest(manifest, repo, str(target))
    assert res.written_files == 1
    made = {os.path.relpath(os.path.join(d, n), target): os.readlink(os.path.join(d, n))
            for d, dirs, files in os.walk(target) for n in dirs + files if os.path.islink(os.path.join(d, n))}
    assert made == {os.path.relpath(os.path.join(d, n), src): os.readlink(os.path.join(d, n))
                    for d, dirs, files in os.walk(src) for n in dirs + files if os.path.islink(os.path.join(d, n))}
    os.unlink(target / "a" / "up")
    os.symlink("elsewhere", target / "a" / "up")  # another target
    os.utime(target / "z" / "dangling", ns=(T0 * 10**9 + 10**9,) * 2, follow_symlinks=False)  # another time
    os.lchown(target / "a-b" / "odd", 1, 1)  # another owner
    os.unlink(target / "self")
    os.mkdir(target / "self")  # another type
    whole, merged = _plans(manifest, empty)
    assert whole == merged
    assert sorted(whole["link"]) == ["a-b/odd", "a/up", "self", "z/dangling"]  # type: ignore[arg-type]
    apply_manifest(manifest, repo, str(target))
    assert os.readlink(target / "a" / "up") == "../p/q/f" and os.lstat(target / "a-b" / "odd").st_uid == 0
    assert os.lstat(target / "z" / "dangling").st_mtime_ns == T0 * 10**9 and os.path.islink(target / "self")


def test_a_standbys_own_link_climbing_through_a_settled_one_is_judged_with_it(snap: tuple) -> None:  # type: ignore[type-arg]
    """keep_uncarried: the standby keeps links of its own that lead outside the root. Through the settled links
    a/deeper (-> ../p/q/r/s) and a/top (-> ..), ``inside -> a/deeper/../../../x`` stays inside and
    ``outside -> a/top/../x`` leads outside; judged without them (by their names alone) it is the other way
    round. The whole plan removes the first and keeps the second; so does the merged one."""
    _, manifest, src = snap
    os.symlink("a/deeper/../../../x", src / "inside")
    os.symlink("a/top/../x", src / "outside")
    root = LocalDataRoot(str(src))
    res = comparison_resolution(manifest, root)
    whole = plan_apply(list(manifest.entries(light=True)), root.existing(), mtime_resolution_ns=res,
                       keep_uncarried=True, compare_owner=True)
    rest = split_unchanged(manifest, root.walk_existing(), resolution_ns=res, compare_owner=True)
    assert rest is not None and "a/deeper" not in rest.existing and "a/top" not in rest.existing
    merged = plan_apply(manifest.entries_at(rest.rows, light=True), rest.existing, mtime_resolution_ns=res,
                        keep_uncarried=True, compare_owner=True, also_touched=rest.new_parents,
                        also_links=lambda: rest.alike_links(manifest))
    rest.fold(merged, manifest)
    assert _shape(whole) == _shape(merged) and "inside" in whole.remove and "outside" not in whole.remove


def _links(n: int) -> tuple[Manifest, Iterator[EntryColumns]]:
    paths = sorted(f"d{i // 1000:04}/l{i % 1000:04}" for i in range(n))
    mt = T0 * 10**9
    m = Manifest.from_columns({"path": paths, "type": ["symlink"] * n, "mode": [0o777] * n, "uid": [0] * n,
                               "gid": [0] * n, "size": [0] * n, "mtime_ns": [mt] * n,
                               "target": [f"../x/{p[-5:]}" for p in paths], "ctime_ns": [1] * n,
                               "inode": [0] * n, "content": [None] * n, "chunks": [[] for _ in range(n)],
                               "chunk_sizes": [[] for _ in range(n)]})

    def walk() -> Iterator[EntryColumns]:
        for d in range(0, n, 1000):
            yield EntryColumns.of_entries([LocalEntry(paths[i], "symlink", 0o777, 0, 0, 0, mt, f"../x/{paths[i][-5:]}",
                                                      i + 1, None, 1) for i in range(d, min(n, d + 1000))])
    return m, walk()


def test_merging_200000_links_holds_rows_not_objects() -> None:
    for held in (True, False):
        m, walk = _links(200_000)
        rest, peak = merged_with_peak(m, walk if held else iter(()))
        assert isinstance(rest, Residual) and len(rest.rows) == 0 and not rest.existing
        assert len(rest.alike_link_rows if held else rest.symlink_rows) == 200_000
        assert peak < 60 * MiB, f"merge peak {peak / MiB:.1f} MiB for 200,000 links (held: {held})"


def test_links_that_never_climb_are_judged_without_resolving_them() -> None:
    """escaping_links answers at once when no target climbs and none is empty or absolute (what a capture or a
    restore of a tree of ordinary links pays: nothing per link); on random sets of links it answers as the
    full resolution does (forced by one more link that climbs but goes nowhere else)."""
    import random

    import pyarrow as pa

    from drsync.repository.link_walk import escaping_links, may_escape

    rnd = random.Random(5)
    names = ["a", "b", "a/c", "d", "d/e", "f"]
    for _ in range(400):
        links = {n: rnd.choice(["a", "b/x", "d/e/y", "c", "/etc", "", "a/c", "f/g", "d"])
                 for n in rnd.sample(names, rnd.randrange(1, len(names)))}
        forced = escaping_links({**links, "zz/q": "../zz"})
        assert escaping_links(links) == [p for p in forced if p != "zz/q"], links
        assert may_escape(pa.array(list(links.values()), pa.string())) == any(
            not t or t.startswith("/") or ".." in t.split("/") for t in links.values())
    assert escaping_links({"a": "/etc", "b": "a/passwd", "c": "d"}) == ["a", "b"]


def _many_links(root: Path, n: int, climbing_last: bool) -> None:
    """``n`` symlinks of 40-byte targets in directories of 1,000, each resolving to a file beside it; with
    ``climbing_last``, the tree's last link leaves the root through the ones before it."""
    for d in range(n // 1000):
        sub = root / f"d{d:03}"
        sub.mkdir(parents=True)
        (sub / "target").write_bytes(b"t\n")
        for i in range(1000):
            os.symlink("./" * 17 + "target", sub / f"s{i:04}")
    if climbing_last:
        os.symlink("..", root / f"d{n // 1000 - 1:03}" / "up")
        os.symlink(f"d{n // 1000 - 1:03}/up/..", root / "zz")  # d/up -> .. makes it leave the root


def test_a_capture_of_ordinary_links_holds_nothing_per_link(tmp_path: Path) -> None:
    """60,000 links that never climb: the capture walks them window by window and holds no record of them
    (it held a dict of every link: 24 MiB traced here before, 14 now; 200 MiB at a million); one climbing
    link at the end of the walk still has every link read back and resolved, and the link escaping through
    another is left out with its warning."""
    import tracemalloc

    peaks = {}
    for climbing in (False, True):
        root = tmp_path / f"src{climbing}"
        _many_links(root, 60_000, climbing)
        repo = Repository.init(LocalStorage(str(tmp_path / f"repo{climbing}")), cluster_id="c", release="1")
        tracemalloc.start()
        try:
            info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
            peaks[climbing] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        paths = set(repo.load_manifest(info).pycolumn("path"))
        assert len([p for p in paths if "/s" in p]) == 60_000
        if climbing:
            assert "zz" not in paths and "d059/up" in paths
            assert any("zz: symlink" in w and "outside" in w for w in info.warnings)
    assert peaks[False] < 19 * MiB, f"capture of 60,000 links traced {peaks[False] / MiB:.1f} MiB"
