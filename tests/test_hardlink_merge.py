"""Hard-link groups in the apply's first pass (:mod:`drsync.unchanged`): a group the target holds linked
alike, or one only the snapshot has, is settled by the merge as rows (a restore of a million hard-linked
files makes no object per file); any other group reaches the planner whole. The plan is the one from both
sides whole, on random trees of groups spanning windows and directories, damaged in every way a link can
be; and a real restore leaves the groups linked exactly."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync import engine, native_walk
from drsync.apply import apply_manifest
from drsync.dataroot.local import LocalDataRoot
from drsync.repository.manifest import Manifest
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.tree import EntryColumns, LocalEntry
from drsync.unchanged import Residual, split_unchanged
from tests.test_unchanged_merge import _plans, merged_with_peak

MiB = 1 << 20
T0 = 1_600_000_000


def _linked_tree(rnd: random.Random, root: Path) -> list[list[Path]]:
    """Directories of plain files and hard-link groups of 2 to 4 names spread over them (a group's first
    name sorts anywhere among its others); returns the groups."""
    dirs = [root / d for d in ("a", "a-b", "a/x", "b", "z", "z/\udcff")]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i in range(rnd.randrange(3, 12)):
        (rnd.choice(dirs) / f"plain{i}").write_bytes(rnd.randbytes(rnd.choice([0, 7, 300])))
    groups = []
    for g in range(rnd.randrange(2, 9)):
        first = rnd.choice(dirs) / f"g{g}"
        first.write_bytes(rnd.randbytes(rnd.choice([0, 11, 500])))
        os.chmod(first, rnd.choice([0o644, 0o600, 0o755]))
        names = [first]
        for k in range(rnd.randrange(1, 4)):
            other = rnd.choice(dirs) / f"g{g}.{k}"
            os.link(first, other)
            names.append(other)
        groups.append(names)
    for d, _, files in os.walk(root):
        for n in files:
            os.utime(os.path.join(d, n), ns=(T0 * 10**9, T0 * 10**9))
    return groups


def _damage_links(rnd: random.Random, groups: list[list[Path]], outside: Path) -> list[str]:
    """One kind of damage to a random group (or none): what was done, for the failure message."""
    names = groups
    done = []
    for g in rnd.sample(names, min(len(names), rnd.randrange(0, 5))):
        p = rnd.choice(g)
        k = rnd.randrange(11)
        if not p.exists():
            continue
        if k == 0:  # a link broken into a copy
            data = p.read_bytes()
            p.unlink()
            p.write_bytes(data)
            os.utime(p, ns=(T0 * 10**9, T0 * 10**9))
        elif k == 1:  # a name of the group removed
            p.unlink()
        elif k == 2:  # the group's inode chmodded (every name's mode changes)
            os.chmod(p, 0o640)
        elif k == 3:  # another link inside the target that the snapshot does not have in the group
            os.link(p, p.parent / (p.name + ".extra"))
        elif k == 4:  # a link from outside the target
            os.link(p, outside / f"{rnd.random()}")
        elif k == 5:  # the content changed in place, the time put back
            with open(p, "r+b") as f:
                f.write(b"X")
            os.utime(p, ns=(T0 * 10**9, T0 * 10**9))
        elif k == 6:  # a name of the group became a directory
            p.unlink()
            p.mkdir()
        elif k == 7:  # two groups' names swapped to the other's inode
            q = rnd.choice(rnd.choice(names))
            if q.exists() and q != p and q.is_file():
                p.unlink()
                os.link(q, p)
        elif k == 8:  # the time moved
            os.utime(p, ns=(T0 * 10**9 + 5 * 10**9, T0 * 10**9 + 5 * 10**9))
        elif k == 9:
            os.chown(p, 1, 1)
        elif k == 10:  # the last names of two groups swapped: each inode still linked as often as a group has names
            other = rnd.choice(names)
            q = other[-1]
            if other is not g and len(other) == len(g) and q.exists() and g[-1].exists() \
                    and q.is_file() and g[-1].is_file():
                tmp = q.parent / "swap.tmp"
                os.link(q, tmp)
                q.unlink()
                os.link(g[-1], q)
                g[-1].unlink()
                os.link(tmp, g[-1])
                tmp.unlink()
        done.append(f"{k}:{p.name}")
    return done


@pytest.mark.parametrize("seed", range(8))
def test_the_merged_plan_is_the_whole_plan_with_hard_link_groups(tmp_path: Path, seed: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 3 rows (groups span many), random groups, random damage to them: the plan from the
    merge's residue is the plan from both sides whole, by either listing, with and without --checksum;
    onto a copy of the tree every group is settled by the merge, and into an empty target every group is
    written as rows."""
    import drsync.unchanged

    monkeypatch.setattr(drsync.unchanged, "_BATCH", 3)
    # groups decided as soon as all their files were seen, a few rows at a time, or all at the end
    monkeypatch.setattr(drsync.unchanged, "_SETTLE_ROWS", (1, 4, 1 << 20)[seed % 3])
    rnd = random.Random(seed)
    outside = tmp_path / "outside"
    outside.mkdir()
    for trial in range(4):
        src = tmp_path / f"src{trial}"
        groups = _linked_tree(rnd, src)
        repo = Repository.init(LocalStorage(str(tmp_path / f"repo{trial}")), cluster_id="c", release="1")
        manifest = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src))))
        members = sum(len(g) for g in groups)
        root = LocalDataRoot(str(src))
        # the tree as captured: every group settled in the merge, none reaches the planner
        rest = split_unchanged(manifest, root.walk_existing(), compare_owner=True, compare_xattrs=True,
                               mode_bits=root.mode_bits)
        assert rest is not None and not rest.existing and rest.unchanged == members + (
            sum(1 for e in manifest.entries(light=True) if e.type == "file") - members)
        # an empty target: every group written as rows (first files new, the others linked)
        empty = LocalDataRoot(str(tmp_path / f"empty{trial}"))
        os.mkdir(empty.root)
        rest = split_unchanged(manifest, empty.walk_existing(), mode_bits=empty.mode_bits)
        assert rest is not None and len(rest.link_rows) == members - len(groups) and not rest.existing
        whole, merged = _plans(manifest, empty)
        assert whole == merged, (seed, trial, "empty")
        done = _damage_links(rnd, groups, outside)
        for native in (True, False):
            monkeypatch.setattr(native_walk, "available", lambda native=native: native)
            whole, merged = _plans(manifest, root)
            assert whole == merged, (seed, trial, native, done)
            whole, merged = _plans(manifest, root, checksum=True)
            assert whole == merged, (seed, trial, native, done, "checksum")
            whole, merged = _plans(manifest, root, exclude=("a/x/*",), changed={"b/g0"})
            assert whole == merged, (seed, trial, native, done, "exclude")


def test_restores_keep_every_group_linked_exactly(tmp_path: Path) -> None:
    """Real applies: into an empty directory, onto the same tree (nothing written), after damage to every
    group (each one linked as the snapshot has it again, nothing else linked to it)."""
    rnd = random.Random(11)
    src, target, outside = tmp_path / "src", tmp_path / "target", tmp_path / "outside"
    outside.mkdir()
    groups = _linked_tree(rnd, src)
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    manifest = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src))))
    files = sum(1 for e in manifest.entries(light=True) if e.type == "file")

    def check() -> None:
        for g in groups:
            ids = {os.lstat(target / p.relative_to(src)).st_ino for p in g}
            assert len(ids) == 1, g
            st = os.lstat(target / g[0].relative_to(src))
            assert st.st_nlink == len(g) and st.st_mode & 0o7777 == os.lstat(g[0]).st_mode & 0o7777
            assert (target / g[0].relative_to(src)).read_bytes() == g[0].read_bytes()

    res = apply_manifest(manifest, repo, str(target))
    assert res.written_files == files - sum(len(g) - 1 for g in groups)
    check()
    res = apply_manifest(manifest, repo, str(target))
    assert res.written_files == 0 and res.unchanged_files == files
    check()
    for g in groups:
        _damage_links(random.Random(len(g)), [[target / p.relative_to(src) for p in g]], outside)
    shutil.rmtree(outside)
    outside.mkdir()
    apply_manifest(manifest, repo, str(target))
    check()
    res = apply_manifest(manifest, repo, str(target))
    assert res.written_files == 0 and res.unchanged_files == files


def _pairs(n: int) -> tuple[Manifest, Iterator[EntryColumns]]:
    """``n`` files in hard-linked pairs (``dNNNN/fNNNN`` and ``dNNNN/fNNNN.l``) and the walk of a target
    holding them linked alike."""
    paths = sorted([f"d{i // 500:04}/f{i % 500:04}" for i in range(n // 2)]
                   + [f"d{i // 500:04}/f{i % 500:04}.l" for i in range(n // 2)])
    lead = [None if not p.endswith(".l") else p[:-2] for p in paths]
    mt = T0 * 10**9
    m = Manifest.from_columns({"path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n,
                               "gid": [0] * n, "size": [100] * n, "mtime_ns": [mt] * n, "target": [None] * n,
                               "hardlink": lead, "ctime_ns": [1] * n, "inode": [0] * n, "content": [None] * n,
                               "chunks": [[] for _ in range(n)], "chunk_sizes": [[] for _ in range(n)]})

    def walk() -> Iterator[EntryColumns]:
        for d in range(0, n, 1000):
            yield EntryColumns.of_entries([LocalEntry(paths[i], "file", 0o644, 0, 0, 100, mt, None,
                                                      1 + hash(lead[i] or paths[i]) % (1 << 40), None, 2)
                                           for i in range(d, min(n, d + 1000))])
    return m, walk()


def test_merging_200000_hard_linked_files_holds_rows_not_objects() -> None:
    """100,000 linked pairs: onto a target holding them alike, nothing reaches the planner; into an empty
    target, first files and links as rows. Memory flat in the number of files (about 2 KiB a linked file
    before: an entry and a target entry each)."""
    for held in (True, False):
        m, walk = _pairs(200_000)
        rest, peak = merged_with_peak(m, walk if held else iter(()))
        assert isinstance(rest, Residual) and len(rest.rows) == 0 and not rest.existing
        if held:
            assert rest.unchanged == 200_000
        else:
            assert len(rest.new_rows) == len(rest.link_rows) == 100_000
            assert rest.new_parents == {f"d{i:04}" for i in range(200)}
        assert peak < 60 * MiB, f"merge peak {peak / MiB:.1f} MiB for 200,000 linked files (held: {held})"


def test_groups_are_decided_as_soon_as_all_their_files_were_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """200,000 files in pairs within one directory each: no more than a settling step's rows (and the window
    being merged) are ever set aside, held or new, and the outcome is the one decided at the end."""
    import drsync.unchanged as u

    most: list[int] = []
    settle = u._Merge._settle_links

    def watched(self: u._Merge, *, final: bool = True) -> None:
        most.append(self.links_pending)
        settle(self, final=final)

    monkeypatch.setattr(u._Merge, "_settle_links", watched)
    for held in (True, False):
        most.clear()
        m, walk = _pairs(200_000)
        rest = split_unchanged(m, walk if held else iter(()))
        assert rest is not None and len(rest.rows) == 0 and not rest.existing
        assert (rest.unchanged if held else len(rest.new_rows) + len(rest.link_rows)) == 200_000
        assert len(most) > 2 and max(most) < u._SETTLE_ROWS + 20_000, (held, most)


def test_groups_linked_across_each_other_are_planned_not_settled(tmp_path: Path) -> None:
    """Each inode linked exactly as often as a group has names, but to the wrong names (two groups' second
    names swapped): the link counts match, the inodes do not; both groups are linked again."""
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    for g in "ab":
        (src / f"{g}1").write_bytes(g.encode() * 10)
        os.link(src / f"{g}1", src / f"{g}2")
        for n in (1, 2):
            os.utime(src / f"{g}{n}", ns=(T0 * 10**9, T0 * 10**9))
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    manifest = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src))))
    apply_manifest(manifest, repo, str(target))
    # same sizes and times for both groups' files: only the inodes tell them apart
    (target / "a2").unlink()
    (target / "b2").unlink()
    os.link(target / "b1", target / "a2")
    os.link(target / "a1", target / "b2")
    whole, merged = _plans(manifest, LocalDataRoot(str(target)))
    assert whole == merged and sorted(whole["hardlink"]) == ["a2", "b2"], whole  # type: ignore[arg-type]
    apply_manifest(manifest, repo, str(target))
    assert os.stat(target / "a1").st_ino == os.stat(target / "a2").st_ino != os.stat(target / "b1").st_ino
    assert (target / "a2").read_bytes() == b"a" * 10 and (target / "b2").read_bytes() == b"b" * 10


# --- breaker s52b: its cases ---------------------------------------------------------------------------


def _snap_of(tmp_path: Path, src: Path) -> tuple[Repository, Manifest]:
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    return repo, repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(src))))


def test_two_groups_of_equal_bytes_linked_into_one_inode_are_parted(tmp_path: Path) -> None:
    """Groups {a/1, a/2} and {b/1, b/2} hold the same bytes and time; in the target b/1 was linked to a/1's
    inode. The planner took b/1 as its group's unchanged first file (no link leads outside the target) and
    linked b/2 to it: all four names one inode. A first file whose inode a name of another group shares is
    written anew."""
    src, target = tmp_path / "src", tmp_path / "target"
    for g in "ab":
        (src / g).mkdir(parents=True)
        (src / g / "1").write_bytes(b"same\n")
        os.link(src / g / "1", src / g / "2")
        os.utime(src / g / "1", ns=(T0 * 10**9, T0 * 10**9))
    repo, manifest = _snap_of(tmp_path, src)
    apply_manifest(manifest, repo, str(target))
    (target / "b" / "1").unlink()
    os.link(target / "a" / "1", target / "b" / "1")
    whole, merged = _plans(manifest, LocalDataRoot(str(target)))
    assert whole == merged
    apply_manifest(manifest, repo, str(target))
    ino = {p: os.stat(target / p).st_ino for p in ("a/1", "a/2", "b/1", "b/2")}
    assert ino["a/1"] == ino["a/2"] != ino["b/1"] == ino["b/2"]
    assert os.stat(target / "a" / "1").st_nlink == os.stat(target / "b" / "1").st_nlink == 2


def test_a_symlink_sharing_its_inode_with_a_name_outside_is_made_anew(tmp_path: Path) -> None:
    """``ln`` of a symlink links the link itself: setting the target's link time and owner in place changed
    the name outside the target too. A link with more than one name is made anew; the outside one keeps
    its time and owner."""
    src, target, outside = tmp_path / "src", tmp_path / "target", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    (src / "f").write_bytes(b"x")
    os.symlink("f", src / "s")
    os.utime(src / "s", ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)
    repo, manifest = _snap_of(tmp_path, src)
    apply_manifest(manifest, repo, str(target))
    os.link(target / "s", outside / "o", follow_symlinks=False)
    os.utime(outside / "o", ns=(T0 * 10**9 + 7 * 10**9,) * 2, follow_symlinks=False)
    os.lchown(outside / "o", 4242, 4242)
    before = os.lstat(outside / "o")
    apply_manifest(manifest, repo, str(target))
    after = os.lstat(outside / "o")
    assert (after.st_mtime_ns, after.st_uid, after.st_gid) == (before.st_mtime_ns, 4242, 4242)
    s = os.lstat(target / "s")
    assert s.st_mtime_ns == T0 * 10**9 and s.st_uid == 0 and s.st_ino != after.st_ino


def test_two_symlinks_made_one_inode_are_parted(tmp_path: Path) -> None:
    """s1 and s2 point alike but at other times in the snapshot; in the target s2 was made a second name of
    s1's inode. Each restore set one name's time in place and so broke the other's."""
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    for name, t in (("s1", T0), ("s2", T0 + 99)):
        os.symlink("nowhere", src / name)
        os.utime(src / name, ns=(t * 10**9, t * 10**9), follow_symlinks=False)
    repo, manifest = _snap_of(tmp_path, src)
    apply_manifest(manifest, repo, str(target))
    (target / "s2").unlink()
    os.link(target / "s1", target / "s2", follow_symlinks=False)
    apply_manifest(manifest, repo, str(target))
    s1, s2 = os.lstat(target / "s1"), os.lstat(target / "s2")
    assert (s1.st_mtime_ns, s2.st_mtime_ns) == (T0 * 10**9, (T0 + 99) * 10**9) and s1.st_ino != s2.st_ino


def test_one_inode_number_on_two_filesystems_is_not_a_link() -> None:
    """breaker s52b: a group spanning two filesystems mounted in the target is restored as copies; tmpfs
    numbers inodes per filesystem, so the copy can carry its first file's number. Taken as linked, a damaged
    copy was never written again (even with --checksum). Names of one inode have more than one link."""
    from drsync.apply import plan_apply
    from drsync.repository.manifest import Entry

    lead = Entry("m0/f", "file", 0o644, 0, 0, 5, T0 * 10**9, None, [], [])
    member = Entry("m1/f", "file", 0o644, 0, 0, 5, T0 * 10**9, None, [], [], hardlink="m0/f")
    have = {"m0/f": LocalEntry("m0/f", "file", 0o644, 0, 0, 5, T0 * 10**9, None, 7, None, 1),
            "m1/f": LocalEntry("m1/f", "file", 0o644, 0, 0, 5, T0 * 10**9 + 1, None, 7, None, 1)}
    plan = plan_apply([lead, member], have)
    assert [e.path for e in plan.hardlink] == ["m1/f"] and plan.unchanged == 1
    linked = {p: LocalEntry(p, "file", 0o644, 0, 0, 5, T0 * 10**9, None, 7, None, 2) for p in have}
    assert plan_apply([lead, member], linked).unchanged == 2
