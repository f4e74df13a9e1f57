"""A standby's apply judges what it would remove on the root itself (safety rule 8: "more than
replication.max_delete_fraction of the standby's files waits for an operator"): files the root holds that the
snapshot it is known to hold does not have (a wrong volume mounted there, files written by something else) are
counted on the root, not from snapshots. Removing files the known snapshot has stays the deletion guard's
(renames allowed for), so a large rename is never held by this check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drsync.apply import RootRemovalHeld, apply_manifest
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo_at, run_drsync, tree_state


def _snapshots(tmp_path: Path, trees: list[dict[str, str]]) -> tuple[Repository, list[str]]:
    repo_url = str(tmp_path / "repo")
    init_repo_at(repo_url, "c", "1")
    src = tmp_path / "src"
    ids = []
    for files in trees:
        if src.exists():
            for p in sorted(src.rglob("*"), reverse=True):
                p.unlink() if not p.is_dir() else p.rmdir()
        src.mkdir(exist_ok=True)
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        r = run_drsync("snapshot", "create", "--repo", repo_url, "--source", src, "--json")
        assert r.code == 0, r.err
        ids.append(r.json()["id"])
    return Repository.open(LocalStorage(repo_url)), ids


def _apply(repo: Repository, snap: str, target: Path, base: str | None, fraction: float | None) -> None:
    manifest = repo.load_manifest(repo.find_snapshot(snap))
    known = repo.load_manifest(repo.find_snapshot(base)) if base else None
    journal = target.parent / "state" / "apply.journal"
    journal.parent.mkdir(exist_ok=True)
    apply_manifest(manifest, repo, str(target), journal=str(journal), base=known, max_remove_fraction=fraction)


def test_foreign_files_over_the_fraction_are_held_and_nothing_changes(tmp_path: Path) -> None:
    tree = {f"t/f{i}": f"{i}\n" for i in range(10)}
    repo, (s1, s2) = _snapshots(tmp_path, [tree, {**tree, "t/new": "n\n"}])
    target = tmp_path / "standby"
    _apply(repo, s1, target, None, 0.5)
    # Another volume mounted over part of the root: 30 files drsync never wrote there.
    for i in range(30):
        (target / "otherdb" / f"x{i}").parent.mkdir(exist_ok=True)
        (target / "otherdb" / f"x{i}").write_text("foreign\n")
    before = tree_state(target)
    with pytest.raises(RootRemovalHeld) as e:
        _apply(repo, s2, target, s1, 0.5)
    assert (e.value.removed, e.value.files) == (30, 40) and "not in the snapshot it is known to hold" in str(e.value)
    assert tree_state(target) == before, "a held apply changed the root"
    # Without the limit (an operator's confirmation) it is applied.
    _apply(repo, s2, target, s1, None)
    assert not (target / "otherdb").exists() and (target / "t" / "new").exists()


def test_a_few_foreign_files_are_removed_as_a_mirror_does(tmp_path: Path) -> None:
    tree = {f"t/f{i}": f"{i}\n" for i in range(10)}
    repo, (s1, s2) = _snapshots(tmp_path, [tree, {**tree, "t/new": "n\n"}])
    target = tmp_path / "standby"
    _apply(repo, s1, target, None, 0.5)
    (target / "stray").write_text("left by hand\n")
    _apply(repo, s2, target, s1, 0.5)
    assert not (target / "stray").exists()


def test_removing_files_the_known_snapshot_has_is_left_to_the_deletion_guard(tmp_path: Path) -> None:
    """A rename of most of the tree (the deletion guard sees it as a rename and lets it through) removes
    most paths of the root; none of them is foreign, so this check holds nothing."""
    tree = {f"old/f{i}": f"content {i}\n" for i in range(10)}
    renamed = {f"new/f{i}": f"content {i}\n" for i in range(10)}
    repo, (s1, s2) = _snapshots(tmp_path, [tree, renamed])
    target = tmp_path / "standby"
    _apply(repo, s1, target, None, 0.5)
    _apply(repo, s2, target, s1, 0.5)
    assert sorted(os.listdir(target / "new")) == sorted(f"f{i}" for i in range(10))
    assert not (target / "old").exists()


def test_config_check_flags_a_backup_destination_inside_the_repository(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                   f'[agent]\nlisten = "127.0.0.1:1"\nmetrics = ""\n'
                   f'[backups]\ndestination = "{tmp_path / "repo" / "backups"}"\n')
    init_repo_at(str(tmp_path / "repo"), "x", "1")
    r = run_drsync("config", "check", "--config", cfg, "--json")
    checks = {c["name"]: c for c in r.json()["checks"]} if r.out.strip().startswith("{") else {}
    assert "backups" in checks and not checks["backups"]["ok"], (r.out, r.err)
    assert "lies inside the repository" in checks["backups"]["detail"]


def test_a_standby_apply_leaves_what_no_snapshot_carries_where_the_snapshot_has_nothing() -> None:
    """Fifos, sockets, devices and links leading outside the root are never captured: removed from a
    standby's root (an ex-primary rejoining), they could never be restored. Where the snapshot has something
    at that path, it replaces them as before; restores (keep_uncarried False) remove them as documented."""
    from drsync.apply import OTHER, plan_apply
    from drsync.repository.manifest import Entry
    from drsync.tree import LocalEntry

    def have(path: str, kind: str, target: str | None = None) -> LocalEntry:
        return LocalEntry(path, kind, 0o644, 0, 0, 0, 0, target)

    existing = {"pipe": have("pipe", OTHER), "shared": have("shared", "symlink", "/srv/shared"),
                "up": have("up", "symlink", "../.."), "inside": have("inside", "symlink", "f"),
                "f": have("f", "file"), "taken": have("taken", OTHER)}
    wanted = [Entry("taken", "file", 0o644, 0, 0, 1, 0, None, [b"\0" * 32], [1])]
    assert sorted(plan_apply(wanted, existing, keep_uncarried=True).remove) == ["f", "inside", "taken"]
    assert sorted(plan_apply(wanted, existing).remove) == ["f", "inside", "pipe", "shared", "taken", "up"]
