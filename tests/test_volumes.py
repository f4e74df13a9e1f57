"""Filesystems mounted inside a data root (safety rule 8: "a data root that is empty or unmounted where the last
snapshot was not never becomes a deletion on the standby", for every volume of the tree, not only the top one).

A volume below the root that is unmounted, or replaced by an empty one, keeps its files' last captured version
(stale) with a warning naming it, however small it is next to ``max_delete_fraction``; files written into the
bare mount point are not captured; ``--allow-empty`` takes the tree as it is. Real tmpfs mounts, real captures,
a real agent pair."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import pytest

from drsync import engine, volumes
from drsync.errors import IntegrityError
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo_at, run_drsync, write_files
from tests.group import Group, wait_for
from tests.mounts import Mounts

# --- the pure judgement ------------------------------------------------------------------------------------


def test_left_out_names_recorded_volumes_with_files_that_are_not_mounted_and_still_directories() -> None:
    recorded = {"a": 3, "b": 0, "c": 7, "d": 2}
    dirs = {"a", "b", "c"}
    assert volumes.left_out(recorded, ["c"], dirs.__contains__) == {"a"}  # b held nothing, c is mounted, d is gone


def test_judge_keeps_gone_and_emptied_volumes_and_records_the_rest() -> None:
    asked: list[str] = []

    def below(rel: str) -> int:
        asked.append(rel)
        return {"new-empty": 4, "fresh": 0}[rel]

    v = volumes.judge({"gone": 5, "emptied": 9, "fine": 2, "grew": 0},
                      {"emptied": 0, "fine": 3, "grew": 8, "new-empty": 0, "fresh": 0}, {"gone"}, below)
    assert set(v.keep) == {"gone", "emptied", "new-empty"}
    assert v.record == {"gone": 5, "emptied": 9, "fine": 3, "grew": 8, "new-empty": 4, "fresh": 0}
    assert sorted(asked) == ["fresh", "new-empty"], "the parent is read only for volumes it did not record"
    assert all("--allow-empty" in why and "\n" not in why for why in v.keep.values())


@pytest.mark.parametrize("rel", ["", "/abs", "..", "../up", "a/../b", "a//b", "./a", "a/", "a\x00b", 5, None])
def test_a_recorded_mount_point_must_be_a_normalised_relative_path(rel: object) -> None:
    assert not volumes.valid_mount_point(rel)


@pytest.mark.parametrize("bad", [{"../x": 1}, {"/etc": 1}, {"a": -1}, {"a": True}, {"a": 1.5}, ["a"], {"": 2}])
def test_a_snapshot_document_with_hostile_volumes_is_damaged(bad: object) -> None:
    info = SnapshotInfo(id="0123456789abcdef", captured_at=1.0, cluster_id="c", release="1", manifest_hash="x")
    doc = json.loads(info.to_bytes())
    doc["volumes"] = bad
    with pytest.raises(IntegrityError, match="volumes"):
        SnapshotInfo.from_bytes(json.dumps(doc).encode(), "snapshot 0123456789abcdef")


def test_a_document_without_volumes_has_no_key_and_one_with_them_round_trips() -> None:
    info = SnapshotInfo(id="0123456789abcdef", captured_at=1.0, cluster_id="c", release="1", manifest_hash="x")
    assert "volumes" not in json.loads(info.to_bytes())
    info = dataclasses.replace(info, volumes={"disk1": 12, "deep/disk2": 0})
    assert SnapshotInfo.from_bytes(info.to_bytes(), "doc").volumes == {"disk1": 12, "deep/disk2": 0}


# --- real mounts -------------------------------------------------------------------------------------------


def _repo(tmp_path: Path) -> Repository:
    init_repo_at(tmp_path / "repo", "c", "1")
    return Repository.open(LocalStorage(str(tmp_path / "repo")))


def _snap(repo: Repository, root: Path, allow_empty: bool = False) -> SnapshotInfo:
    return engine.create_snapshot(repo, engine.SnapshotRequest(data_root=str(root), allow_empty=allow_empty))


def _paths(repo: Repository, info: SnapshotInfo) -> dict[str, bool]:
    """Path -> stale, for every file of a snapshot."""
    t = repo.load_manifest(info).table
    return {os.fsdecode(p): bool(s) for p, s, k in zip(t.column("path").to_pylist(), t.column("stale").to_pylist(),
                                                        t.column("type").to_pylist(), strict=True) if k == "file"}


VOLUME = {f"f{i}": f"volume {i}\n" for i in range(5)}


def _unmounted_after_a_snapshot(tmp_path: Path, mounts: Mounts) -> tuple[Path, Repository, SnapshotInfo]:
    """A root of 40 files with VOLUME mounted at vol, one snapshot of it, then vol unmounted."""
    root = tmp_path / "root"
    write_files(root, {f"top/t{i}": f"{i}\n" for i in range(40)})
    mounts.tmpfs(root / "vol", VOLUME)
    repo = _repo(tmp_path)
    first = _snap(repo, root)
    mounts.umount(root / "vol")
    return root, repo, first


def test_an_unmounted_volume_keeps_its_files_until_it_comes_back(tmp_path: Path, mounts: Mounts) -> None:
    root, repo, first = _unmounted_after_a_snapshot(tmp_path, mounts)
    assert first.volumes == {"vol": 5} and first.files == 45
    (root / "vol" / "written-while-unmounted").write_text("on the root's filesystem\n")
    for _ in range(2):  # and again: the record is carried, so it stays kept
        kept = _snap(repo, root)
        files = _paths(repo, kept)
        assert all(files[f"vol/{n}"] for n in VOLUME), "the volume's files were not kept stale"
        assert "vol/written-while-unmounted" not in files, "a file in the bare mount point was captured"
        assert kept.files == 45 and kept.volumes == {"vol": 5}
        assert any(w.startswith("vol: a filesystem holding 5 file(s)") for w in kept.warnings), kept.warnings
    # A restore of the kept snapshot has the volume's files as they were.
    out = tmp_path / "restored"
    engine.restore_snapshot(repo, kept.id, str(out), cluster_id="c", release="1")
    assert {p.name: p.read_text() for p in (out / "vol").iterdir()} == VOLUME
    # The volume is mounted again (with a change): captured as usual, nothing stale.
    (root / "vol" / "written-while-unmounted").unlink()
    mounts.tmpfs(root / "vol", {**VOLUME, "f5": "new\n"})
    back = _snap(repo, root)
    assert back.volumes == {"vol": 6} and not back.warnings and not any(_paths(repo, back).values())


def test_an_empty_or_wrong_volume_mounted_in_its_place_keeps_the_files(tmp_path: Path, mounts: Mounts) -> None:
    root = tmp_path / "root"
    write_files(root, {f"top/t{i}": f"{i}\n" for i in range(40)})
    mounts.tmpfs(root / "data" / "disk1", VOLUME)
    repo = _repo(tmp_path)
    _snap(repo, root)
    mounts.umount(root / "data" / "disk1")
    mounts.tmpfs(root / "data" / "disk1")  # a fresh filesystem: an empty lost+found, no files
    (root / "data" / "disk1" / "lost+found").mkdir()
    kept = _snap(repo, root)
    files = _paths(repo, kept)
    assert all(files[f"data/disk1/{n}"] for n in VOLUME)
    assert any("data/disk1: the filesystem mounted here holds no files, but the last snapshot had 5" in w
               for w in kept.warnings), kept.warnings


def test_an_empty_volume_mounted_over_a_populated_directory_the_parent_did_not_record(tmp_path: Path,
                                                                                     mounts: Mounts) -> None:
    """The first capture after an upgrade (or a volume mounted over files that were on the root's filesystem):
    the parent snapshot records no volume there, so its files below the mount point are counted."""
    root = tmp_path / "root"
    write_files(root, {**{f"top/t{i}": f"{i}\n" for i in range(40)}, **{f"vol/{k}": v for k, v in VOLUME.items()}})
    repo = _repo(tmp_path)
    first = _snap(repo, root)
    assert first.volumes == {}
    mounts.tmpfs(root / "vol")  # hides the five files
    kept = _snap(repo, root)
    assert all(_paths(repo, kept)[f"vol/{n}"] for n in VOLUME) and kept.volumes == {"vol": 5}


def test_allow_empty_takes_the_tree_as_it_is_and_the_warning_ends(tmp_path: Path, mounts: Mounts) -> None:
    root, repo, _ = _unmounted_after_a_snapshot(tmp_path, mounts)
    r = run_drsync("snapshot", "create", "--repo", tmp_path / "repo", "--source", root, "--json")
    assert r.code == 0 and "vol: a filesystem holding 5 file(s)" in r.out, r.err
    assert r.json()["volumes"] == {"vol": 5}
    r = run_drsync("snapshot", "create", "--repo", tmp_path / "repo", "--source", root)
    assert r.code == 0 and "warning: vol: a filesystem holding 5 file(s)" in r.out, (r.out, r.err)
    r = run_drsync("snapshot", "create", "--repo", tmp_path / "repo", "--source", root, "--allow-empty", "--json")
    assert r.code == 0, r.err
    assert r.json()["files"] == 40 and not r.json()["warnings"]
    after = _snap(repo, root)
    assert after.files == 40 and not after.warnings and after.volumes == {}


def test_a_removed_mount_point_is_a_removal(tmp_path: Path, mounts: Mounts) -> None:
    """Unmounted and its directory removed: an operator retired it. The deletion guard still weighs it."""
    root, repo, _ = _unmounted_after_a_snapshot(tmp_path, mounts)
    (root / "vol").rmdir()
    after = _snap(repo, root)
    assert after.files == 40 and not any(p.startswith("vol") for p in _paths(repo, after))


def test_a_volume_under_a_left_out_path_is_not_judged(tmp_path: Path, mounts: Mounts) -> None:
    """A repository kept inside the data root on a volume of its own is drsync's, not the cluster's."""
    root = tmp_path / "root"
    write_files(root, {f"top/t{i}": f"{i}\n" for i in range(10)})
    mounts.tmpfs(root / "own" / "repo")
    init_repo_at(root / "own" / "repo", "c", "1")
    repo = Repository.open(LocalStorage(str(root / "own" / "repo")))
    info = _snap(repo, root)
    assert info.volumes == {} and info.files == 10


# --- a real agent pair ---------------------------------------------------------------------------------------


def test_a_standby_keeps_a_volume_production_unmounted(zk_server, tmp_path: Path, mounts: Mounts) -> None:
    """Production's nested volume (3 files of 24: far under max_delete_fraction) is unmounted while the agents
    run; the standby keeps the files and applies what else changed; remounted, the two roots are equal again."""
    g = Group(tmp_path, zk_server.hosts, f"g-{uuid.uuid4().hex[:12]}", ["east", "west"])
    vol = g.data["east"] / "vol"
    mounts.tmpfs(vol, {"a": "1\n", "b": "2\n", "c": "3\n"})
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        g.wait_synced("east", "west", "west to apply production with its volume")
        mounts.umount(vol)
        (g.data["east"] / "marker").write_text("after the unmount\n")
        west = g.data["west"]
        wait_for(lambda: (west / "marker").exists(), "west to apply the snapshot taken with the volume unmounted")
        assert sorted(os.listdir(west / "vol")) == ["a", "b", "c"], "the standby deleted the unmounted volume's files"
        wait_for(lambda: "vol: a filesystem holding 3 file(s)" in g.log("east"), "the primary to log the volume")
        mounts.tmpfs(vol, {"a": "1\n", "b": "2\n", "c": "changed\n"})
        wait_for(lambda: (west / "vol" / "c").read_text() == "changed\n", "west to apply the remounted volume")
        # c's new bytes show before that apply has set every other time (a and b came back with new ones)
        g.wait_synced("east", "west", "west to equal production with its volume remounted")
    finally:
        g.stop_all()


def test_a_retired_nested_volume_does_not_make_its_outer_volume_look_empty() -> None:
    v = volumes.judge({"vol": 4, "vol/inner": 4}, {"vol": 0}, set(), lambda rel: 0, retired={"vol/inner"})
    assert v.keep == {} and v.record == {"vol": 0}
    assert volumes.removed({"vol": 4, "vol/inner": 4}, ["vol"], lambda rel: rel == "vol") == {"vol/inner"}


def test_a_count_too_long_to_read_is_damage_in_drsyncs_words() -> None:
    """An integer of more digits than Python reads (a damaged or hostile document) is damage of the
    document, said in drsync's words (Python's own error advises sys.set_int_max_str_digits)."""
    info = SnapshotInfo(id="0123456789abcdef", captured_at=1.0, cluster_id="c", release="1", manifest_hash="x")
    text = info.to_bytes().decode().rstrip().rstrip("}") + ', "volumes": {"disk1": ' + "9" * 5000 + "}}"
    with pytest.raises(IntegrityError) as damaged:
        SnapshotInfo.from_bytes(text.encode(), "snapshot 0123456789abcdef")
    assert "5000 digits" in str(damaged.value) and "sys." not in str(damaged.value), damaged.value
