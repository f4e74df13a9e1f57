"""Restore and apply in hostile and odd targets (safety rules 2 and 5).

Each test builds the target the way real clusters leave it (symlinks anywhere, types
that differ from the snapshot, unreadable directories, drsync's own files inside it,
mount points, reserved names) and checks that the result is exactly the snapshot, or
a one-line refusal with the target left as it was, and that nothing outside the target
changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from drsync.apply import OTHER, plan_apply
from drsync.errors import IntegrityError
from drsync.repository.link_walk import escaping_links
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_check import validate
from drsync.tree import LocalEntry, scan_tree
from tests.conftest import SLOW, age_tree, init_repo_at, run_drsync, tree_state
from tests.users import NOBODY, pair_configs, run_as_nobody, serves, start_agent


def full_state(path: Path) -> dict[str, tuple]:
    """tree_state plus the top directory's own mode and mtime."""
    s = path.lstat()
    return {".": (s.st_mode & 0o7777, s.st_mtime_ns), **tree_state(path)}


def snapshot_of(tmp_path: Path, src: Path, name: str = "repo") -> tuple[str, str]:
    repo = str(tmp_path / name)
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    return repo, r.json()["id"]


def restore(repo: str, snap: str, target: Path, *extra: str) -> tuple[int, str]:
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", target, *extra)
    return r.code, r.err


def no_staging_left(target: Path) -> bool:
    return not any(p.name == ".drsync-staging" for p in target.rglob("*"))


# --- 1. nothing lands outside the target ----------------------------------------------


def make_outside(base: Path) -> Path:
    out = base / "outside"
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "victim").write_bytes(b"precious\n")
    (out / "sub" / "victim2").write_bytes(b"also precious\n")
    (out / "conf.txt").write_bytes(b"outside conf\n")
    os.chmod(out / "sub", 0o751)
    age_tree(out, 1000)
    return out


def hostile_snapshot_tree(src: Path) -> None:
    """What the snapshot holds where the target has hostile links."""
    for d in ("conf", "rel", "chain", "up", "keep/e", "abs-file-dir", "staged", "deep/x/y"):
        (src / d).mkdir(parents=True, exist_ok=True)
        (src / d / "conf.txt").write_bytes(f"inside {d}\n".encode())
    (src / "victim").write_bytes(b"the snapshot's victim\n")
    (src / "linkfile").write_bytes(b"was a link to a file outside\n")
    (src / "deep" / "x" / "y" / "sub").mkdir()
    (src / "deep" / "x" / "y" / "sub" / "victim2").write_bytes(b"deep file\n")
    os.symlink("conf/conf.txt", src / "good-link")
    age_tree(src)


def test_hostile_symlinks_in_the_target_are_replaced_never_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    hostile_snapshot_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    (target / "deep" / "x").mkdir(parents=True)
    os.symlink(str(outside), target / "conf")                       # absolute
    os.symlink("../outside", target / "rel")                        # relative
    os.symlink("chain2", target / "chain")                          # a chain: chain -> chain2 -> outside
    os.symlink("../outside/sub", target / "chain2")
    os.symlink("..", target / "up")                                 # to a parent
    os.symlink(str(outside), target / "keep" / "e")                  # at depth, inside a kept directory
    os.symlink(str(outside / "victim"), target / "victim")          # a file in the snapshot
    os.symlink(str(outside / "sub" / "victim2"), target / "linkfile")
    os.symlink(str(outside), target / "abs-file-dir")
    os.symlink("../../../outside/sub", target / "deep" / "x" / "y")  # the middle of a deep path
    os.symlink(str(outside), target / ".drsync-staging")            # drsync's own staging name
    os.symlink(str(outside / "conf.txt"), target / "good-link")      # a link the snapshot retargets
    before_outside = full_state(outside)
    before_base = sorted(p.name for p in tmp_path.iterdir())

    code, err = restore(repo, snap, target)

    assert code == 0, err
    assert full_state(outside) == before_outside, "something was written outside the target"
    assert sorted(p.name for p in tmp_path.iterdir()) == before_base
    assert tree_state(target) == tree_state(src)
    assert not os.path.lexists(target / ".drsync-staging")


def test_the_standby_apply_follows_no_link_either(tmp_path: Path) -> None:
    """The same hostile target under the standby's journaled apply (StandbyReceiver's code path)."""
    from drsync.apply import apply_manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    src = tmp_path / "src"
    hostile_snapshot_tree(src)
    repo_url, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(str(outside), target / "conf")
    os.symlink("..", target / "up")
    os.symlink("../outside/sub", target / "deep")
    before = full_state(outside)
    repo = Repository.open(LocalStorage(repo_url))
    manifest = repo.load_manifest(repo.find_snapshot(snap))
    journal = tmp_path / "state" / "apply.journal"
    journal.parent.mkdir()
    apply_manifest(manifest, repo, str(target), journal=str(journal))
    assert full_state(outside) == before
    assert tree_state(target) == tree_state(src)
    assert not journal.exists()


def test_links_that_escape_through_other_links_are_refused() -> None:
    # d/b -> .. is inside (d/.. is the root); a -> d/b/.. looks like "d" but resolves to the root's parent.
    assert escaping_links({"d/b": "..", "a": "d/b/.."}) == ["a"]
    assert escaping_links({"d/b": "..", "a": "d/b"}) == []
    assert escaping_links({"x": "y/z", "y": "d/b", "d/b": "../..", }) == ["d/b", "x", "y"]
    assert escaping_links({"l1": "l2", "l2": "l1"}) == []  # a loop reaches nothing
    assert escaping_links({"a/l": "../b/m/../..", "b/m": "c"}) == []
    assert escaping_links({"a/l": "../b/m/../..", "b/m": "../c/d"}) == []
    assert escaping_links({"a/l": "../b/m/../../..", "b/m": "../c/d"}) == ["a/l"]
    # Hostile chains cost linear time: each link doubles the previous one's path.
    chain = {"l0": "."} | {f"l{i}": f"l{i - 1}/l{i - 1}" for i in range(1, 200)}
    assert escaping_links(chain) == []
    chain["l0"] = ".."
    assert len(escaping_links(chain)) == 200

    table = Manifest.from_columns({
        "path": ["a", "d", "d/b"], "type": ["symlink", "dir", "symlink"], "mode": [0o777, 0o755, 0o777],
        "uid": [0, 0, 0], "gid": [0, 0, 0], "size": [0, 0, 0], "mtime_ns": [0, 0, 0], "ctime_ns": [0, 0, 0],
        "inode": [1, 2, 3], "target": ["d/b/..", None, ".."], "content": [None, None, None],
        "chunks": [[], [], []], "chunk_sizes": [[], [], []]})
    with pytest.raises(IntegrityError, match="leads outside the data root"):
        validate(table)


def test_capture_leaves_out_links_escaping_through_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    os.symlink("..", src / "d" / "b")
    os.symlink("d/b/..", src / "a")
    os.symlink("d/b", src / "ok")
    scan = scan_tree(str(src))
    paths = scan.values("path")
    assert "a" not in paths and "ok" in paths and "d/b" in paths
    assert any("a: symlink" in w and "outside" in w for w in scan.warnings)
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, tmp_path / "out")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["d", "ok"]


# --- 2. type changes in every direction, at any depth -----------------------------------

KINDS = ("file", "dir", "emptydir", "link-file", "link-dir", "link-dangling", "fifo")


def make_kind(root: Path, name: str, kind: str, seed: str) -> None:
    p = root / name
    up = "../" * name.count("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        p.write_bytes(f"file {seed}\n".encode() * 3)
    elif kind == "dir":
        (p / "child" / "grandchild").mkdir(parents=True)
        (p / "child" / "f").write_bytes(f"child of {seed}\n".encode())
        (p / "g").write_bytes(b"g\n")
        os.symlink("child/f", p / "inner-link")
        os.chmod(p / "child", 0o750)
    elif kind == "emptydir":
        p.mkdir()
    elif kind == "link-file":
        os.symlink(up + "anchor-file", p)
    elif kind == "link-dir":
        os.symlink(up + "anchor-dir", p)
    elif kind == "link-dangling":
        os.symlink("nowhere", p)
    elif kind == "fifo":
        os.mkfifo(p)


def type_change_trees(base: Path, depth_prefix: str) -> tuple[Path, Path]:
    src, target = base / "src", base / "target"
    for root in (src, target):
        (root / "anchor-dir").mkdir(parents=True, exist_ok=True)
        (root / "anchor-dir" / "x").write_bytes(b"x")
        (root / "anchor-file").write_bytes(b"anchor")
    for a in KINDS:
        for b in KINDS:
            if a == b or b == "fifo":
                continue
            name = f"{depth_prefix}{a}--to--{b}"
            make_kind(target, name, a, f"old {name}")
            make_kind(src, name, b, f"new {name}")
    age_tree(src)
    return src, target


@pytest.mark.parametrize("depth", ["", "a/b/"], ids=["top", "depth-2"])
def test_every_type_change_restores_exactly(tmp_path: Path, depth: str) -> None:
    src, target = type_change_trees(tmp_path, depth)
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)
    assert no_staging_left(target)
    # And back again: the old tree's types from the new ones (the fifo cannot be captured).
    for p in target.rglob("*"):
        if p.is_fifo():
            p.unlink()
    code, err = restore(repo, snap, target)
    assert code == 0 and tree_state(target) == tree_state(src)


def test_plan_replaces_special_files_and_links_it_cannot_follow() -> None:
    from drsync.repository.manifest import Entry

    def have(path: str, typ: str, target: str | None = None) -> LocalEntry:
        return LocalEntry(path, typ, 0o755, 0, 0, 0, 0, target)

    wanted = [Entry("conf", "dir", 0o755, 0, 0, 0, 0, None, [], []),
              Entry("conf/x", "file", 0o644, 0, 0, 1, 0, None, [b"\0" * 32], [1]),
              Entry("pipe", "file", 0o644, 0, 0, 1, 0, None, [b"\0" * 32], [1])]
    existing = {"conf": have("conf", "symlink", "/etc"), "pipe": have("pipe", OTHER)}
    plan = plan_apply(wanted, existing)
    assert sorted(plan.remove) == ["conf", "pipe"]
    assert [e.path for e in plan.mkdir] == ["conf"]
    assert sorted(e.path for e in plan.write) == ["conf/x", "pipe"]


# --- 4. permissions -----------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run drsync as another user")
def test_permission_problems_are_one_line_errors_or_worked_around(open_tmp: Path) -> None:
    tmp_path = open_tmp
    src = tmp_path / "src"
    (src / "locked" / "inner").mkdir(parents=True)
    (src / "locked" / "inner" / "f").write_bytes(b"new content\n")
    (src / "unreadable").write_bytes(b"new version of an unreadable file\n")
    (src / "plain").write_bytes(b"plain\n")
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", repo], check=True)  # restores take a shared lock
    # The user's own target: a mode-000 directory and an unreadable file are worked around.
    target = tmp_path / "mine"
    (target / "locked" / "inner").mkdir(parents=True)
    (target / "locked" / "inner" / "old").write_bytes(b"old\n")
    (target / "unreadable").write_bytes(b"old\n")
    os.chmod(target / "unreadable", 0)
    os.chmod(target / "locked" / "inner", 0)
    os.chmod(target / "locked", 0)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", target], check=True)
    code, err = run_as_nobody("snapshot", "restore", "--overwrite", "--delete-extra",
                              snap, "--repo", repo, "--target", target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)
    # A directory of another user that this one cannot list: one line naming it, nothing changed.
    other = tmp_path / "theirs"
    (other / "private").mkdir(parents=True)
    (other / "private" / "keep").write_bytes(b"not yours\n")
    (other / "plain").write_bytes(b"old plain\n")
    subprocess.run(["chown", f"{NOBODY}:{NOBODY}", other, other / "plain"], check=True)
    os.chmod(other / "private", 0o700)  # owned by root
    before = full_state(other)
    code, err = run_as_nobody("snapshot", "restore", "--overwrite", "--delete-extra",
                              snap, "--repo", repo, "--target", other)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "private" in err and "permission" in err
    assert "internal error" not in err and "Traceback" not in err
    assert full_state(other) == before


def test_root_restores_into_mode_000_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "f").write_bytes(b"new\n")
    os.chmod(src / "locked", 0o500)
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    target = tmp_path / "target"
    (target / "locked").mkdir(parents=True)
    (target / "locked" / "f").write_bytes(b"old\n")
    (target / "locked" / "extra").write_bytes(b"extra\n")
    os.chmod(target / "locked" / "f", 0)
    os.chmod(target / "locked", 0)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)


# --- 5. drsync's own files inside the target -----------------------------------------------


def test_a_repository_inside_the_target_survives_restore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "tables").mkdir(parents=True)
    (data / "tables" / "t1").write_bytes(b"one\n")
    repo = str(data / ".drsync")
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    (data / "tables" / "t2").write_bytes(b"two\n")
    code, err = restore(repo, snap, data)
    assert code == 0, err
    assert not (data / "tables" / "t2").exists()
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    # A snapshot from elsewhere, restored into a root that holds the repository, keeps it too.
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "y").write_bytes(b"y\n")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", other, "--json")
    code, err = restore(repo, r.json()["id"], data)
    assert code == 0, err
    assert sorted(os.listdir(data)) == [".drsync", "x"]
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


def test_a_backup_restored_into_a_root_that_holds_it_stays_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"f\n")
    repo, snap = snapshot_of(tmp_path, src)
    target = tmp_path / "target"
    target.mkdir()
    dest = target / "backups"
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", snap, "--dest", dest, "--json")
    assert r.code == 0, r.err
    backup_dir = r.json()["path"]
    r = run_drsync("backup", "restore", "--overwrite", "--delete-extra", backup_dir, "--target", target)
    assert r.code == 0, r.err
    assert run_drsync("backup", "verify", backup_dir).code == 0
    assert (target / "a" / "f").read_bytes() == b"f\n"


def test_the_snapshot_cannot_put_a_file_where_the_repository_lives(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "state").write_bytes(b"a file where the standby keeps its repository\n")
    repo_out, snap = snapshot_of(tmp_path, src)
    data = tmp_path / "data"
    (data / "state").mkdir(parents=True)
    from drsync.apply import apply_manifest
    from drsync.errors import UsageError
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    repo = Repository.open(LocalStorage(repo_out))
    inner = data / "state" / "repo"
    shutil.copytree(repo_out, inner)
    before = full_state(data)
    with pytest.raises(UsageError, match="drsync's own files"):
        apply_manifest(repo.load_manifest(repo.find_snapshot(snap)), repo, str(data), protect=(str(inner),))
    assert full_state(data) == before


# --- 6. reserved names ---------------------------------------------------------------------


def test_reserved_names_are_refused_in_manifests_and_skipped_by_capture(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / ".drsync-staging").mkdir(parents=True)
    (src / "a" / ".drsync-staging" / "0").write_bytes(b"looks like a staged file\n")
    (src / "a" / "0").write_bytes(b"real\n")
    scan = scan_tree(str(src))
    assert sorted(scan.values("path")) == ["a", "a/0"]
    assert any("reserved" in w for w in scan.warnings)
    for path in (".drsync-staging", ".drsync-staging/0", "a/.drsync-staging"):
        m = Manifest.from_columns({
            "path": [path], "type": ["dir"], "mode": [0o755], "uid": [0], "gid": [0], "size": [0],
            "mtime_ns": [0], "ctime_ns": [0], "inode": [1], "target": [None], "content": [None],
            "chunks": [[]], "chunk_sizes": [[]]})
        with pytest.raises(IntegrityError, match="reserved"):
            validate(m)


def test_backslashes_and_odd_names_restore(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("back\\slash", "new\nline", " leading space", "-dash", "*star?", "tab\there"):
        (src / name).write_bytes(name.encode())
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, tmp_path / "out")
    assert code == 0, err
    assert tree_state(tmp_path / "out") == tree_state(src)


# --- 7. mount points inside the target -------------------------------------------------------


@pytest.fixture
def mounted(tmp_path: Path):  # type: ignore[no-untyped-def]
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target / "sub")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield target
    subprocess.run(["umount", "-l", str(target / "sub")], check=False)


def test_a_mount_point_inside_the_target_is_written_in_place(tmp_path: Path, mounted: Path) -> None:
    target = mounted
    (target / "sub" / "old").write_bytes(b"old\n")
    (target / "sub" / "changed").write_bytes(b"before\n")
    src = tmp_path / "src"
    (src / "sub" / "nested").mkdir(parents=True)
    (src / "sub" / "changed").write_bytes(b"after\n")
    (src / "sub" / "nested" / "new").write_bytes(b"new\n")
    (src / "top").write_bytes(b"top\n")
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)
    assert os.stat(target / "sub").st_dev != os.stat(target).st_dev  # still the mount
    assert not os.path.lexists(target / "sub" / ".drsync-staging")


def test_a_mount_point_the_snapshot_would_replace_is_refused(tmp_path: Path, mounted: Path) -> None:
    target = mounted
    (target / "sub" / "kept").write_bytes(b"kept\n")
    (target / "other").write_bytes(b"other\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "sub").write_bytes(b"a file where the target has a mount point\n")
    repo, snap = snapshot_of(tmp_path, src)
    before = full_state(target)
    code, err = restore(repo, snap, target)
    assert code == 2, err
    assert "mounted" in err and len(err.strip().splitlines()) == 1
    assert full_state(target) == before


def test_agents_whose_repository_and_state_live_inside_their_data_roots(tmp_path: Path) -> None:
    """The standby's first apply keeps its repository, its state and its journal; production's
    snapshots leave its own out; config check says what is nested where."""
    from tests.conftest import make_tree
    from tests.group import wait_for as wait_until

    prod, standby = tmp_path / "prod", tmp_path / "standby"
    make_tree(prod, files=5, big=1)
    (standby / "stale").mkdir(parents=True)
    (standby / "stale" / "f").write_bytes(b"the standby's old content\n")
    scfg, pcfg = pair_configs(tmp_path, prod, standby, nested=True)
    (prod / "var").mkdir(exist_ok=True)
    check = run_drsync("config", "check", "--config", scfg, "--json")
    nesting = [c["detail"] for c in check.json()["checks"] if c["name"] == "nesting"]
    assert any("repository" in d and "inside the data root at .drsync" in d for d in nesting), nesting
    assert any("state directory" in d and "var/drsync-state" in d for d in nesting), nesting
    proc = start_agent(scfg, tmp_path / "standby.log")
    try:
        wait_until(lambda: serves(scfg), "the standby to serve")
        r = run_drsync("agent", "--config", pcfg, "--once", "--json")
        assert r.code == 0, r.out + r.err
        state = json.loads((standby / "var" / "drsync-state" / "state.json").read_bytes())
        assert state["applied_snapshot"]
        assert run_drsync("repo", "verify", "--config", scfg).code == 0
        assert not (standby / "stale").exists()
        # Production's snapshot holds neither its repository nor its state.
        from drsync.repository.repo import Repository
        from drsync.storage.local import LocalStorage

        prod_repo = Repository.open(LocalStorage(str(prod / ".drsync")))
        manifest = prod_repo.load_manifest(prod_repo.find_snapshot(state["applied_snapshot"]))
        paths = manifest.pycolumn("path")
        assert "var" in paths and "catalog" in paths
        assert not any(p.startswith((".drsync", "var/drsync-state")) for p in paths)
        assert sorted(os.listdir(standby / "var")) == ["drsync-state"]
        assert {k: v for k, v in tree_state(standby).items() if not k.startswith("var")} == \
            {k: v for k, v in tree_state(prod).items() if not k.startswith("var")}
    finally:
        proc.terminate()
        proc.wait(timeout=30 * SLOW)
