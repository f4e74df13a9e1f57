"""The apply's first pass: one sorted merge of the manifest with the target's walk drops the plain files
both hold alike (:mod:`drsync.unchanged`), and the planner then decides exactly what it would have
decided with both sides whole, on trees made to catch a merge out of step (names that sort around
``/``, undecodable bytes, hard links, type changes, paths only one side has)."""

from __future__ import annotations

import os
import random
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from drsync import engine, native_walk
from drsync.apply import _planned, _with_chunks, comparison_resolution, plan_apply
from drsync.dataroot.local import LocalDataRoot, scan_target, walk_target, walk_target_columns
from drsync.pathglob import compile_globs
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_diff import content_changed
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.tree import EntryColumns, LocalEntry
from drsync.unchanged import Residual, WriteList, split_unchanged
from tests.conftest import run_drsync

MiB = 1 << 20
T0 = 1_600_000_000


def _odd_tree(root: Path) -> None:
    """Names whose byte order differs from a plain depth-first walk: ``a`` (a directory), ``a-b``, ``a.b``,
    ``a0`` and ``a/x`` sort as ``a``, ``a-b``, ``a.b``, ``a/x``, ``a0``; an undecodable name; hard links,
    symlinks, an empty file, a deep path, odd modes."""
    root.mkdir()
    (root / "a").mkdir()
    (root / "a" / "x").write_bytes(b"x" * 10)
    (root / "a" / "y").mkdir()
    (root / "a" / "y" / "z").write_bytes(b"z")
    for name in ("a-b", "a.b", "a0", "a ", "A", "\u00e9t\u00e9", "e\u0301t\u0065\u0301"):
        (root / name).write_bytes(name.encode())
    os.mkdir(os.path.join(os.fsencode(root), b"raw\xff"))
    with open(os.path.join(os.fsencode(root), b"raw\xff", b"f\xfe"), "wb") as f:
        f.write(b"raw")
    (root / "empty").write_bytes(b"")
    (root / "lead").write_bytes(b"linked")
    os.link(root / "lead", root / "a" / "member")
    os.symlink("a/x", root / "ln")
    deep = root / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    for i in range(30):
        (deep / f"f{i:02}").write_bytes(b"%d" % i)
    (root / "ro").write_bytes(b"ro")
    os.chmod(root / "ro", 0o400)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)


def _damage(t: Path) -> None:
    """Every kind of difference the planner knows, some of them at names that sort around others."""
    os.utime(t / "a-b", ns=(T0 * 10**9, (T0 + 5) * 10**9))  # time differs
    (t / "a.b").write_bytes(b"longer content")  # size differs
    os.chmod(t / "a0", 0o600)  # mode differs: fixed in place
    (t / "a" / "x").unlink()
    (t / "a" / "x").mkdir()  # a file became a directory
    shutil.rmtree(t / "a" / "y")
    (t / "a" / "y").write_bytes(b"y")  # a directory became a file
    (t / "a" / "member").unlink()
    shutil.copy2(t / "lead", t / "a" / "member")  # a hard link broken into a copy
    (t / "a.c").write_bytes(b"extra")  # only the target has it, between snapshot names
    (t / "a" / "zz").write_bytes(b"extra")
    os.link(t / "d1" / "d2" / "d3" / "f03", t / "stray")  # a file linked to a path the snapshot lacks
    os.unlink(t / "ln")
    os.symlink("a-b", t / "ln")  # a link pointing elsewhere
    (t / "d1" / "d2" / "d3" / "f07").unlink()  # missing, in a directory the owner may not write: opened up
    os.chmod(t / "d1" / "d2" / "d3", 0o555)
    os.mkfifo(t / "fifo")  # a special file
    (t / "A").write_bytes(b"B")  # same size and time, other bytes: only a checksum finds it
    os.utime(t / "A", ns=(T0 * 10**9, T0 * 10**9))


def _plans(manifest: Manifest, root: LocalDataRoot, **kw: object) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """The plan from both sides whole, and the plan from the merge's residue."""
    res = comparison_resolution(manifest, root)
    excluded = compile_globs(tuple(kw.pop("exclude", ())))  # type: ignore[arg-type]
    protected = frozenset(kw.pop("protected", frozenset()))  # type: ignore[arg-type]
    changed = frozenset(kw.pop("changed", frozenset()))  # type: ignore[arg-type]
    checksum = bool(kw.pop("checksum", False))
    common = {"same_content": _with_chunks(manifest, root.same_content) if checksum else None,
              "excluded": excluded, "compare_owner": root.owners_settable(), "mtime_resolution_ns": res,
              "protected": protected, "compare_xattrs": root.supports_xattrs, "content_changed": changed}
    whole = plan_apply(list(manifest.entries(light=True)), root.existing(), **common)  # type: ignore[arg-type]
    rest = split_unchanged(manifest, root.walk_existing(), resolution_ns=res, compare_owner=root.owners_settable(),
                           compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits,
                           planned=_planned(excluded, protected, changed), drop_alike=not checksum)
    assert rest is not None
    merged = plan_apply(manifest.entries_at(rest.rows, light=True), rest.existing,  # type: ignore[arg-type]
                        also_touched=rest.new_parents, also_passed=rest.meta_parents, **common)
    rest.fold(merged, manifest)
    return _shape(whole), _shape(merged)


def _shape(plan: object) -> dict[str, object]:
    p = plan  # an ApplyPlan
    return {"write": sorted(e.path for e in p.write), "remove": sorted(p.remove),  # type: ignore[attr-defined]
            "mkdir": sorted(e.path for e in p.mkdir), "link": sorted(e.path for e in p.link),  # type: ignore[attr-defined]
            "fix_meta": sorted(e.path for e in p.fix_meta),  # type: ignore[attr-defined]
            "hardlink": sorted(e.path for e in p.hardlink),  # type: ignore[attr-defined]
            "unchanged": p.unchanged, "finish": sorted(e.path for e in p.dirs_to_finish()),  # type: ignore[attr-defined]
            "unlock": sorted(p.unlock), "replaces": sorted(p.replaces),  # type: ignore[attr-defined]
            "protected_skipped": sorted(p.protected_skipped)}  # type: ignore[attr-defined]


@pytest.fixture
def snapshot(tmp_path: Path) -> tuple[Repository, str, Path]:
    src = tmp_path / "src"
    _odd_tree(src)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    snap = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    return repo, snap, src


def test_the_walk_comes_in_manifest_order_and_holds_what_the_scan_holds(snapshot: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _, _, src = snapshot
    _damage(src)
    walked = list(walk_target(str(src), {""}))
    # The columns the merge reads hold the same entries in the same order, whichever listing made them.
    for native in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native_walk, "available", lambda native=native: native)
            runs = list(walk_target_columns(str(src), {""}))
        assert [r.entry(i) for r in runs for i in range(len(r))] == walked, native
    keys = [os.fsencode(e.path) for e in walked]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert {e.path: e for e in walked} == scan_target(str(src), {""})
    assert b"a" in keys and keys.index(b"a-b") < keys.index(b"a.b") < keys.index(b"a/member") < keys.index(b"a0")


def test_the_merged_plan_is_the_whole_plan_on_an_odd_damaged_tree(snapshot: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    repo, snap, _ = snapshot
    manifest = repo.load_manifest(snap)
    target = tmp_path / "t"
    r = run_drsync("snapshot", "restore", snap.id, "--repo", tmp_path / "repo", "--target", target)
    assert r.code == 0, r.err
    root = LocalDataRoot(str(target))
    whole, merged = _plans(manifest, root)
    assert whole == merged and whole["write"] == [] and whole["unchanged"] == len(
        [1 for e in manifest.entries(light=True) if e.type == "file"])
    _damage(target)
    whole, merged = _plans(manifest, root)
    assert whole == merged
    assert {"a-b", "a.b", "a/x", "d1/d2/d3/f07"} <= set(whole["write"])  # type: ignore[operator]
    assert {"a.c", "a/x", "a/y", "a/zz", "fifo", "stray"} <= set(whole["remove"])  # type: ignore[operator]
    assert "a/y" in whole["mkdir"] and "ln" in whole["link"]  # type: ignore[operator]
    assert "a0" in whole["fix_meta"] and "lead" in whole["hardlink"]  # type: ignore[operator]
    assert whole["unlock"] == ["d1/d2/d3"] and "d1/d2/d3" in whole["finish"]  # type: ignore[operator]
    # Excluded, protected and known-changed paths reach the planner whatever they compare like.
    kw = {"exclude": ("d1/d2/d3/f1*",), "protected": {"d1/d2"}, "changed": {"a0", "empty"}}
    whole, merged = _plans(manifest, root, **kw)
    assert whole == merged and "empty" in whole["write"]  # type: ignore[operator]
    assert "A" not in whole["write"]  # type: ignore[operator]
    # --checksum reads the files both hold alike: the merge keeps them for the planner.
    whole, merged = _plans(manifest, root, checksum=True)
    assert whole == merged and "A" in whole["write"]  # type: ignore[operator]
    base = repo.load_manifest(snap)
    assert content_changed(base, manifest) == frozenset()


def test_a_manifest_out_of_path_order_is_planned_whole(snapshot: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    repo, snap, src = snapshot
    m = repo.load_manifest(snap)
    n = len(m)
    shuffled = Manifest(pa.concat_tables([m.table.slice(n // 2), m.table.slice(0, n // 2)]))
    assert split_unchanged(shuffled, walk_target_columns(str(src), {""})) is None
    # The whole apply still works on it (planned whole) and leaves an equal tree.
    target = tmp_path / "t"
    shutil.copytree(src, target, symlinks=True)
    from drsync.apply import apply_manifest

    res = apply_manifest(shuffled, repo, str(target))
    files = sum(1 for e in m.entries(light=True) if e.type == "file")
    # The copy broke the hard link: its member is linked again, everything else left alone.
    assert res.written_files == 0 and res.unchanged_files == files - 1
    assert os.stat(target / "lead").st_ino == os.stat(target / "a" / "member").st_ino


def _synthetic(n: int) -> tuple[Manifest, Iterator[EntryColumns]]:
    paths = sorted(f"d{i // 1000:04}/f{i % 1000:04}" for i in range(n))
    mt = [T0 * 10**9 + i for i in range(n)]
    m = Manifest.from_columns({"path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n,
                               "gid": [0] * n, "size": [100] * n, "mtime_ns": mt, "target": [None] * n,
                               "ctime_ns": [1] * n, "inode": list(range(n)), "content": [None] * n,
                               "chunks": [[] for _ in range(n)], "chunk_sizes": [[] for _ in range(n)]})

    def walk() -> Iterator[EntryColumns]:  # one run a directory, as the walk of a real tree gives them
        for d in range(0, n, 1000):
            yield EntryColumns.of_entries([LocalEntry(paths[i], "file", 0o644, 0, 0, 100, mt[i], None, i + 1, None, 1)
                                           for i in range(d, min(n, d + 1000))])
    return m, walk()


def test_the_write_list_walks_slices_and_sums_like_a_list(snapshot: tuple) -> None:  # type: ignore[type-arg]
    repo, snap, _ = snapshot
    m = repo.load_manifest(snap)
    files = [e for e in m.entries(light=True) if e.type == "file"]
    head, rows = files[:3], [e.row for e in files[3:]]
    w = WriteList(list(head), m, np.asarray(rows, dtype=np.int64))
    assert len(w) == len(files) and [e.path for e in w] == [e.path for e in files]
    assert [e.path for e in w[2:7]] == [e.path for e in files[2:7]] and w[-1].path == files[-1].path
    assert [e.path for e in w[::5]] == [e.path for e in files[::5]]
    assert w.total_size() == sum(e.size for e in files)
    w.append(files[0])
    assert len(w) == len(files) + 1 and w[3].path == files[0].path


def merged_with_peak(m: Manifest, walk: Iterator[EntryColumns]) -> tuple[Residual | None, int]:
    """:func:`split_unchanged` of ``m`` and ``walk``, and the peak of Python allocations during it (bytes)."""
    tracemalloc.start()
    try:
        rest = split_unchanged(m, walk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rest, peak


def test_merging_200000_unchanged_files_holds_none_of_them() -> None:
    """Memory stays flat in the number of unchanged files: the merge holds one record batch of the
    manifest and what it keeps (nothing here), never an object per file (about 1 KiB a file before)."""
    m, walk = _synthetic(200_000)
    rest, peak = merged_with_peak(m, walk)
    assert isinstance(rest, Residual) and rest.unchanged == 200_000 and len(rest.rows) == 0 and not rest.existing
    assert peak < 40 * MiB, f"merge peak {peak / MiB:.1f} MiB for 200,000 unchanged files"


def test_merging_200000_new_files_holds_rows_not_objects() -> None:
    """Into an empty target every file is new: kept as 8-byte rows (and their parents), not entries."""
    m, _ = _synthetic(200_000)
    rest, peak = merged_with_peak(m, iter(()))
    assert isinstance(rest, Residual) and len(rest.new_rows) == 200_000 and len(rest.rows) == 0 and rest.unchanged == 0
    assert rest.new_parents == {f"d{i:04}" for i in range(200)}
    assert peak < 40 * MiB, f"merge peak {peak / MiB:.1f} MiB for 200,000 new files"


def test_a_write_lists_bytes_add_up_its_rows_sizes_across_column_chunks() -> None:
    """What a restore reports and shows progress against: the sizes of its rows summed a column chunk
    at a time (no joined copy), the planner's own entries added, any rows in any order."""
    import random

    from tests.test_guard_merge import _chunked

    rnd = random.Random(2)
    parts = [_chunked({f"{k}/f{i:02}": [bytes([i]) * 32] * rnd.randrange(0, 4) for i in range(rnd.randrange(1, 9))})
             for k in range(5)]
    table = pa.concat_tables([p.table for p in parts])
    manifest = Manifest(table)
    assert table.column("size").num_chunks == 5
    sizes = table.column("size").to_pylist()
    for _ in range(50):
        rows = np.array(rnd.sample(range(len(sizes)), rnd.randrange(0, len(sizes) + 1)), np.int64)
        head = list(manifest.entries_at(np.array(rows[:2], np.int64), light=True))
        listed = WriteList(head, manifest, rows)
        assert listed.total_size() == sum(sizes[int(r)] for r in rows) + sum(e.size for e in head)


def test_read_ahead_keeps_order_raises_in_the_caller_and_closes_the_walk_before_returning() -> None:
    from drsync.tree import read_ahead

    assert list(read_ahead(iter(range(10)), batch=3, depth=1)) == list(range(10))
    assert list(read_ahead(iter(()), batch=3)) == []

    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("the disk went away")

    got: list[int] = []
    with pytest.raises(OSError, match="the disk went away"):
        for x in read_ahead(failing(), batch=1):
            got.append(x)
    assert got == [1, 2]  # what came before the failure reached the caller first

    closed_in: list[str] = []

    def endless() -> Iterator[int]:
        import threading

        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:  # as walk_target sets back the directories it opened up
            closed_in.append(threading.current_thread().name)

    it = read_ahead(endless(), batch=4, depth=2, name="ahead-under-test")
    assert [next(it) for _ in range(9)] == list(range(9))
    it.close()
    assert closed_in == ["ahead-under-test"]  # closed, in the walking thread, before close() returned


def _random_tree(rnd: random.Random, root: bytes, depth: int = 0) -> None:
    for _ in range(rnd.randrange(0, 7)):
        p = root + b"/" + rnd.choice([b"a", b"a-b", b"a.b", b"a0", b"b", b"\xff", b"z", b"x.y"])
        if os.path.lexists(p):
            continue
        k = rnd.random()
        if k < 0.55:
            with open(p, "wb") as f:
                f.write(rnd.randbytes(rnd.choice([0, 1, 5, 100])))
            os.chmod(p, rnd.choice([0o644, 0o600, 0o755, 0o4755]))
        elif k < 0.8 and depth < 4:
            os.mkdir(p)
            _random_tree(rnd, p, depth + 1)
        else:
            os.symlink(rnd.choice([b"a", b"b/c", b"a.b"]), p)


def _random_damage(rnd: random.Random, root: bytes) -> None:
    """Differences of every kind at random places: times (one past 2262, whose nanoseconds pass int64),
    modes, owners, sizes, extended attributes, deletions, type changes, special files, new names, links."""
    entries = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]
    for p in rnd.sample(entries, min(len(entries), rnd.randrange(0, 7))):
        if not os.path.lexists(p):
            continue
        plain = os.path.isfile(p) and not os.path.islink(p)
        is_dir = os.path.isdir(p) and not os.path.islink(p)
        k = rnd.randrange(9)
        if k == 0 and plain:
            os.utime(p, ns=(1, rnd.choice([1, 10**9, 253402300800 * 10**9])), follow_symlinks=False)
        elif k == 1 and plain:
            os.chmod(p, rnd.choice([0o600, 0o700, 0o2755]))
        elif k == 2 and not os.path.islink(p):
            os.chown(p, rnd.choice([0, 1, 1000]), rnd.choice([0, 1000]))
        elif k == 3 and plain:
            st = os.stat(p)
            with open(p, "ab") as f:
                f.write(b"x")
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif k in (4, 5):
            shutil.rmtree(p) if is_dir else os.unlink(p)
            if k == 5:
                os.mkfifo(p) if rnd.random() < 0.5 else os.mkdir(p)
        elif k == 6 and is_dir:
            with open(p + b"/new", "wb") as f:
                f.write(b"new")
        elif k == 7 and plain:
            os.setxattr(p, b"user.k", rnd.randbytes(3), follow_symlinks=False)
        elif k == 8 and plain and not os.path.lexists(p + b".n"):
            os.link(p, p + b".n")


@pytest.mark.parametrize("seed", range(6))
def test_the_merged_plan_is_the_whole_plan_on_random_trees(tmp_path: Path, seed: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge cuts both sides into windows ending at the same path and matches each window's paths by
    hash: with windows of a few rows (every edge case at a window's end), on random trees with random
    damage, the plan from its residue is the plan from both sides whole, by either listing."""
    import drsync.unchanged

    monkeypatch.setattr(drsync.unchanged, "_BATCH", 3)
    rnd = random.Random(seed)
    for trial in range(5):
        src = os.fsencode(tmp_path / f"src{trial}")
        os.mkdir(src)
        _random_tree(rnd, src)
        repo = Repository.init(LocalStorage(str(tmp_path / f"repo{trial}")), cluster_id="c", release="1")
        manifest = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(os.fsdecode(src))))
        _random_damage(rnd, src)
        root = LocalDataRoot(os.fsdecode(src))
        for native in (True, False):
            monkeypatch.setattr(native_walk, "available", lambda native=native: native)
            whole, merged = _plans(manifest, root)
            assert whole == merged, (seed, trial, native)
            whole, merged = _plans(manifest, root, checksum=True)
            assert whole == merged, (seed, trial, native, "checksum")


def test_a_write_list_is_journaled_as_its_entries_would_be(tmp_path: Path) -> None:
    """The commit journal takes a write list's manifest rows from their columns, without an entry each:
    byte for byte what the same entries give, with every kind of value a row can hold (undecodable names,
    extended attributes, hard links, a sparse file, a time past 2262)."""
    from drsync.apply import _plan_json

    src = tmp_path / "src"
    _odd_tree(src)
    os.setxattr(src / "a-b", b"user.note", b"\x00\xff", follow_symlinks=False)
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data")
    os.utime(src / "a0", ns=(1, 253402300800 * 10**9 + 7))
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    m = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src))))
    files = [e for e in m.entries(light=True) if e.type == "file"]
    assert any(e.xattrs for e in files) and any(e.hardlink for e in files) and any(e.sparse for e in files)
    written = WriteList(list(files[:2]), m, np.asarray([e.row for e in files[2:]], dtype=np.int64))
    staged = {e.path: f"s{n}" for n, e in enumerate(files)}

    def journal(write: object, batch: int) -> bytes:
        from drsync.apply import ApplyPlan

        return b"".join(_plan_json(ApplyPlan(write=write, remove=["x"]), staged, batch=batch))  # type: ignore[arg-type]

    for batch in (1, 3, 4096):
        assert journal(written, batch) == journal(list(written), batch)
    assert journal(WriteList([], m, np.zeros(0, np.int64)), 2) == journal([], 2)
