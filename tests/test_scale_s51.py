"""Issue 17, memory at a million files (session 51): what an apply, a capture and ``repo verify`` hold
grows with what changed, not with the tree.

- A restore that only sets modes, owners or extended attributes back (``chmod -R`` undone) keeps those
  files as manifest rows (``Residual.meta_rows``), never as planner objects, and the result is exact.
- drsync closes a pack at :data:`~drsync.repository.format.PACK_MAX_CHUNKS` chunks, so a tree of small
  files is many packs with small entry tables; ``repo verify`` reads a pack of any count a slice of its
  table at a time and still names a damaged chunk past the first slice.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from drsync import engine
from drsync.apply import ApplyResult, ForeignTarget, _plan_from_json, _plan_json, plan_apply
from drsync.dataroot.local import LocalDataRoot
from drsync.repository import format as fmt
from drsync.repository.packs import read_pack_table
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.unchanged import split_unchanged

N = 1200


def _tree(root: Path, n: int = N) -> None:
    for i in range(n):
        d = root / f"d{i // 100:02}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04}").write_bytes(b"small file %d\n" % i)


@pytest.fixture
def snap(tmp_path: Path) -> tuple[Repository, str]:
    _tree(tmp_path / "src")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "src")))
    return repo, info.id


def _restore(repo: Repository, ref: str, target: Path, **kw: object) -> ApplyResult:
    return engine.restore_snapshot(repo, ref, str(target), cluster_id="c", release="1", **kw)[1]  # type: ignore[arg-type]


def _modes(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            s = os.lstat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid)
    return out


def test_a_restore_that_only_sets_modes_back_keeps_them_as_rows_and_is_exact(snap: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    repo, ref = snap
    target = tmp_path / "t"
    _restore(repo, ref, target)
    want = _modes(target)
    assert len(want) == N
    changed = sorted(want)[::2]
    for rel in changed:
        os.chmod(target / rel, 0o600)
        if os.geteuid() == 0:
            os.chown(target / rel, 1234, 4321)
    manifest = repo.load_manifest(repo.find_snapshot(ref), lean=True)
    root = LocalDataRoot(str(target))
    rest = split_unchanged(manifest, root.walk_existing(), compare_owner=root.owners_settable(),
                           compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits)
    assert rest is not None
    # The changed files are settled by the merge as rows to fix; none reaches the planner as an object.
    assert len(rest.meta_rows) == len(changed) and rest.unchanged == N
    planned_files = [e.path for e in manifest.entries_at(rest.rows, light=True) if e.type == "file"]
    assert planned_files == [] and not any(h.type == "file" for h in rest.existing.values())
    result = _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert result.written_files == 0 and result.unchanged_files == N
    assert _modes(target) == want


def test_a_mode_change_with_content_change_is_written_not_only_fixed(snap: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    repo, ref = snap
    target = tmp_path / "t"
    _restore(repo, ref, target)
    want = _modes(target)
    victim = target / "d03" / "f0300"
    before = victim.read_bytes()
    st_ = victim.stat()
    victim.write_bytes(b"X" * len(before))  # same size, time put back: only content and mode differ
    os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    os.chmod(victim, 0o600)
    result = engine.restore_snapshot(repo, ref, str(target), cluster_id="c", release="1", checksum=True,
                                     foreign=ForeignTarget(overwrite=True))[1]
    assert result.written_files == 1 and victim.read_bytes() == before and _modes(target) == want


def test_small_chunks_fill_many_packs_of_bounded_tables_and_verify(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "PACK_MAX_CHUNKS", 100)
    _tree(tmp_path / "src")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "src")))
    packs = list(repo.storage.list(fmt.PACKS_DIR))
    counts = [len(read_pack_table(repo.storage, o.name.rsplit("/", 1)[1][:-5], o.size)) for o in packs]
    assert len(packs) >= N // 100 and max(counts) <= 100 and sum(counts) == N
    report = repo.verify()
    assert not report.problems and not report.damaged_chunks and report.chunks == N
    _restore(repo, info.id, tmp_path / "t")
    assert sorted(p.read_bytes() for p in (tmp_path / "t").rglob("f*")) == sorted(
        p.read_bytes() for p in (tmp_path / "src").rglob("f*"))


def test_verify_reads_a_big_pack_by_slices_and_names_damage_past_the_first(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "src")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "src")))
    [obj] = list(repo.storage.list(fmt.PACKS_DIR))  # one pack of N chunks (written before a cap of 64)
    pack_id = obj.name.rsplit("/", 1)[1][:-5]
    table = read_pack_table(repo.storage, pack_id, obj.size)
    k = len(table) - 3  # in the last slice of 64
    path = os.path.join(str(tmp_path / "repo"), obj.name)
    with open(path, "r+b") as f:
        f.seek(int(table.offset[k]) + int(table.stored_length[k]) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    monkeypatch.setattr(fmt, "PACK_MAX_CHUNKS", 64)
    report = repo.verify()
    assert list(report.damaged_chunks) == [table.ids[k].tobytes().hex()] and report.chunks == N
    assert [d["snapshot"] for d in report.damaged_files] == [info.id]


def _dir_tree(root: Path) -> None:
    for a in range(20):
        for b in range(10):
            (root / f"p{a:02}" / f"q{b}").mkdir(parents=True)
    (root / "p03" / "q4" / "file").write_bytes(b"inside a read-only directory\n")
    (root / "p03" / "q5" / "file").write_bytes(b"another\n")
    for d in ("p03/q4", "p03"):
        os.chmod(root / d, 0o555)


def test_directories_alike_stay_rows_and_one_the_commit_changes_is_opened_and_finished(tmp_path: Path) -> None:
    from tests.test_unchanged_merge import _plans

    _dir_tree(tmp_path / "src")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    ref = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "src"))).id
    target = tmp_path / "t"
    _restore(repo, ref, target)
    manifest = repo.load_manifest(repo.find_snapshot(ref), lean=True)
    root = LocalDataRoot(str(target))
    rest = split_unchanged(manifest, root.walk_existing(), compare_owner=root.owners_settable(),
                           compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits)
    assert rest is not None and len(rest.dir_rows) == 220 and not len(rest.rows) and not rest.existing
    # A file removed from the read-only p03/q4, its directory's mode and time put back: every directory is
    # alike, yet the commit writes into p03/q4 (opened up first) and finishes it and its parent's time.
    d, f = target / "p03" / "q4", target / "p03" / "q4" / "file"
    times = [os.lstat(p).st_mtime_ns for p in (target / "p03", d)]
    os.chmod(d, 0o755)
    f.unlink()
    os.chmod(d, 0o555)
    os.utime(d, ns=(times[1], times[1]))
    whole, merged = _plans(manifest, root)
    assert whole == merged and merged["unlock"] == ["p03", "p03/q4"] and merged["write"] == ["p03/q4/file"]
    assert "p03/q4" in merged["finish"]  # type: ignore[operator]
    _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert f.read_bytes() == b"inside a read-only directory\n"
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o555 and os.lstat(d).st_mtime_ns == times[1]
    assert os.lstat(target / "p03").st_mtime_ns == times[0]
    # A directory whose time alone differs is no longer alike: the planner finishes it.
    os.utime(target / "p07", ns=(1, 1))
    whole, merged = _plans(manifest, root)
    assert whole == merged and merged["finish"] == ["p07"]
    _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert os.lstat(target / "p07").st_mtime_ns == os.lstat(tmp_path / "src" / "p07").st_mtime_ns


def test_directories_only_the_snapshot_has_are_made_from_rows_exactly(tmp_path: Path) -> None:
    _dir_tree(tmp_path / "src")
    os.chmod(tmp_path / "src" / "p05", 0o500)
    (tmp_path / "src" / "p07" / "q1" / "deeper" / "still").mkdir(parents=True)
    os.chmod(tmp_path / "src" / "p07" / "q1", 0o555)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    ref = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "src"))).id
    manifest = repo.load_manifest(repo.find_snapshot(ref), lean=True)
    target = tmp_path / "t"
    target.mkdir()
    root = LocalDataRoot(str(target))
    rest = split_unchanged(manifest, root.walk_existing(), mode_bits=root.mode_bits)
    assert rest is not None and len(rest.made_rows) == 222 and not len(rest.rows)
    _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert _tree_meta(target) == _tree_meta(tmp_path / "src")
    # Part of it removed by hand: the missing directories are made again, the others left alike.
    for d in ("p07", "p05"):
        os.chmod(target / d, 0o755)
    os.chmod(target / "p07" / "q1", 0o755)
    for rel in ("p07/q1", "p05/q3", "p11"):
        for dirpath, dirs, _ in os.walk(target / rel):
            for x in dirs:
                os.chmod(os.path.join(dirpath, x), 0o755)
        shutil.rmtree(target / rel)
    os.chmod(target / "p05", 0o500)
    _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert _tree_meta(target) == _tree_meta(tmp_path / "src")


def _tree_meta(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for x in [*dirs, *files]:
            p = os.path.join(dirpath, x)
            s = os.lstat(p)
            out[os.path.relpath(p, root)] = (s.st_mode, s.st_mtime_ns, s.st_size if not dirs else 0)
    return out


def test_made_directories_and_the_planners_are_made_parents_first_and_journaled_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d, mode in (("x", 0o755), ("x/y", 0o2755), ("a", 0o2755), ("a/b", 0o755), ("a/b/c", 0o700)):
        (src / d).mkdir(parents=True)
        os.chmod(src / d, mode)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    ref = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    manifest = repo.load_manifest(repo.find_snapshot(ref), lean=True)
    (tmp_path / "t").mkdir()
    root = LocalDataRoot(str(tmp_path / "t"))
    # A root that cannot keep setgid bits (as a user may not): those directories go to the planner, the
    # others are rows; the commit makes them in one order, parents first.
    rest = split_unchanged(manifest, root.walk_existing(), mode_bits=0o777)
    assert rest is not None
    plan = plan_apply(manifest.entries_at(rest.rows, light=True), rest.existing, also_touched=rest.new_parents)
    rest.fold(plan, manifest)
    assert [e.path for e in plan.mkdir] == ["a", "a/b", "a/b/c", "x", "x/y"]
    assert sorted(e.path for e in plan.made.deepest_first_with([])) == ["a/b", "a/b/c", "x"]  # type: ignore[union-attr]
    finish = [e.path for e in plan.dirs_to_finish()]
    assert sorted(finish) == ["a", "a/b", "a/b/c", "x", "x/y"] and finish[0] == "a/b/c"
    assert [p.count("/") for p in finish] == sorted((p.count("/") for p in finish), reverse=True)
    doc = json.loads(b"".join(_plan_json(plan, {}, batch=2)))
    assert {"a/b", "a/b/c", "x"} <= set(doc["touched_dirs"])  # what any version's replay finishes
    again, _ = _plan_from_json(doc)
    assert [e.path for e in again.mkdir] == ["a", "a/b", "a/b/c", "x", "x/y"]
    assert [e.path for e in again.dirs_to_finish()] == finish


def test_a_lean_manifest_reads_extended_attributes_from_its_file_and_a_restore_sets_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 300)
    for k, p in enumerate(sorted(src.rglob("f*"))):
        os.setxattr(p, "user.k", b"value %d " % k * 20)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    ref = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    info = repo.find_snapshot(ref)
    whole, lean = repo.load_manifest(info), repo.load_manifest(info, lean=True)
    assert "xattrs" not in lean.table.column_names and "xattrs" in whole.table.column_names
    assert list(lean.entries(light=True)) == list(whole.entries(light=True))
    rows = [250, 3, 77]
    assert lean.entries_at(rows) == whole.entries_at(rows)
    assert lean.values_at(np.array(sorted(rows)), ("path", "xattrs")) == whole.values_at(np.array(sorted(rows)),
                                                                                       ("path", "xattrs"))
    target = tmp_path / "t"
    _restore(repo, ref, target)
    victim = target / "d01" / "f0150"
    assert os.getxattr(victim, "user.k") == b"value 150 " * 20
    os.setxattr(victim, "user.k", b"changed")
    os.setxattr(victim, "user.extra", b"added")
    root = LocalDataRoot(str(target))
    rest = split_unchanged(lean, root.walk_existing(), compare_owner=root.owners_settable(),
                           compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits)
    assert rest is not None and len(rest.meta_rows) == 1
    _restore(repo, ref, target, foreign=ForeignTarget(overwrite=True))
    assert os.getxattr(victim, "user.k") == b"value 150 " * 20 and os.listxattr(victim) == ["user.k"]


def test_a_link_made_while_the_capture_walks_keeps_the_stable_names_linked(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaker s51: ``d00/a`` and ``d39/c`` are one file before and after; ``d35/new`` is linked to it while
    the walk is at ``d10``. The group waits for as many names as the most links any was seen with, so the
    three restore as one file (an early cut let ``d39/c`` go as a file of its own)."""
    from drsync import native_walk
    from drsync.tree import _Lister

    src = tmp_path / "src"
    for d in range(40):
        (src / f"d{d:02}").mkdir(parents=True)
        for i in range(30):
            (src / f"d{d:02}" / f"f{i:02}").write_bytes(b"%d %d\n" % (d, i))
    (src / "d00" / "a").write_bytes(b"linked\n")
    os.link(src / "d00" / "a", src / "d39" / "c")
    done = []

    def hooked(original):  # type: ignore[no-untyped-def]
        def listing(self, rel_dir, *args, **kw):  # type: ignore[no-untyped-def]
            if rel_dir == b"d10" and not done:
                os.link(src / "d00" / "a", src / "d35" / "new")
                done.append(1)
            return original(self, rel_dir, *args, **kw)
        return listing

    monkeypatch.setattr(native_walk._NativeLister, "listing", hooked(native_walk._NativeLister.listing))
    monkeypatch.setattr(_Lister, "items", hooked(_Lister.items))
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    ref = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    assert done
    links = {e.path: e.hardlink for e in repo.load_manifest(repo.find_snapshot(ref)).entries() if e.hardlink}
    assert links == {"d35/new": "d00/a", "d39/c": "d00/a"}
    _restore(repo, ref, tmp_path / "t")
    ino = {os.lstat(tmp_path / "t" / p).st_ino for p in ("d00/a", "d35/new", "d39/c")}
    assert len(ino) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")
@pytest.mark.parametrize("change", ["mode", "hardlink"])
def test_an_owner_restores_metadata_and_links_below_a_directory_it_may_not_search(open_tmp: Path,
                                                                                  change: str) -> None:
    """Breaker s51: as the tree's owner (not root), a file's mode or a missing hard-link name below a
    0000 directory. The commit passes through that directory without changing it: it is opened up first
    and set back after (the rerun failed the same way for good before)."""
    from tests.users import give_to_nobody, preload_everything, run_as_nobody

    preload_everything()
    src, repo, target = open_tmp / "src", open_tmp / "repo", open_tmp / "t"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(b"in a directory no one may search\n")
    os.link(src / "a" / "b" / "f", src / "g")
    give_to_nobody(open_tmp)
    os.chmod(src / "a" / "b", 0)
    os.chmod(src / "a", 0o500)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    engine.create_snapshot(Repository.open(LocalStorage(str(repo))), engine.SnapshotRequest(str(src), name="one"))
    give_to_nobody(repo)  # captured by root (only root reads below a/b), restored by the owner
    assert run_as_nobody("snapshot", "restore", "one", "--repo", repo, "--target", target)[0] == 0
    want = _modes_deep(target)
    os.chmod(target / "a" / "b" / "f", 0o600) if change == "mode" else os.unlink(target / "g")
    for _ in range(2):
        code, err = run_as_nobody("snapshot", "restore", "one", "--repo", repo, "--target", target, "--debug",
                                  "--overwrite")
        assert code == 0, err
        assert _modes_deep(target) == want and not (target / ".drsync-staging").exists()
    assert os.lstat(target / "g").st_ino == os.lstat(target / "a" / "b" / "f").st_ino


def _modes_deep(root: Path) -> dict[str, tuple[int, int]]:
    """Mode and mtime of every path below ``root`` (read as root, whatever the modes)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for x in [*dirs, *files]:
            s = os.lstat(os.path.join(dirpath, x))
            out[os.path.relpath(os.path.join(dirpath, x), root)] = (s.st_mode, s.st_mtime_ns)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount and to act as nobody")
def test_an_owner_restores_onto_a_mount_point_the_snapshot_has_read_only(open_tmp: Path) -> None:
    """Breaker s51: the staging area of a filesystem mounted in the target lies in its top directory, which
    the snapshot has 0555: the owner's restore opens it up to make and remove that area, and sets it back
    (it failed at the removal, then at every later restore, leaving staging areas in the target)."""
    import subprocess

    from tests.users import give_to_nobody, preload_everything, run_as_nobody

    preload_everything()
    src, repo, target = open_tmp / "src", open_tmp / "repo", open_tmp / "t"
    (src / "m").mkdir(parents=True)
    (src / "m" / "f").write_bytes(b"on the mounted filesystem\n")
    (target / "m").mkdir(parents=True)
    give_to_nobody(open_tmp)
    os.chmod(src / "m", 0o555)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "one")[0] == 0
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,uid=65534,gid=65534", "tmpfs", str(target / "m")],
                   check=True)
    try:
        for _ in range(2):
            code, err = run_as_nobody("snapshot", "restore", "one", "--repo", repo, "--target", target,
                                      "--overwrite")
            assert code == 0, err
            assert (target / "m" / "f").read_bytes() == b"on the mounted filesystem\n"
            assert stat.S_IMODE(os.lstat(target / "m").st_mode) == 0o555
            assert os.lstat(target / "m").st_mtime_ns == os.lstat(src / "m").st_mtime_ns
            assert not (target / "m" / ".drsync-staging").exists() and not (target / ".drsync-staging").exists()
    finally:
        subprocess.run(["umount", "-l", str(target / "m")], check=False)
