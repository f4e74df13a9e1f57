"""Breaker s49c: the reserved `.drsync-staging`, own-root rollback by version, and captures racing renames.

A fresh helper attacked this session's fixes (tests/test_breaker_s49r.py); every test here failed on e59dc20.
Real files, real processes (strace injects the kill at a chosen system call), real agents.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, age_tree, init_repo_at, run_drsync, tree_state, write_files

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, chown)")
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def source_repo(base: Path, files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A tree ``base/src`` (``files``, or a few of its own) captured as snapshot s1 of a repository of its own,
    ``base/repo``: (tree, repository)."""
    src = base / "src"
    write_files(src, files or {"a/f1": "one\n", "b/f2": "two\n", "vol/v1": "vee\n"})
    age_tree(src)
    repo = base / "repo"
    init_repo_at(repo, "east", "6.2.1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1")
    assert r.code == 0, r.err
    return src, repo


def _plant(path: Path, kind: str) -> None:
    if kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        os.symlink("/etc/hostname", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        raise AssertionError(kind)


# --- promise 1: a `.drsync-staging` drsync did not make ------------------------------------------------

@pytest.mark.parametrize("mark", ["restore.json", "journal.json"])
@pytest.mark.parametrize("kind", ["dir", "symlink", "fifo"])
def test_a_mark_name_that_is_no_record_does_not_make_the_users_staging_drsyncs(tmp_path: Path, mark: str,
                                                                               kind: str) -> None:
    """A user's `.drsync-staging` holding data and something *named* restore.json/journal.json that is not a
    record drsync writes (a directory, a link, a fifo) is still the user's: refused with exit 4, also with
    --dry-run, and nothing changed. Observed: dry run exit 0; the restore deletes the user's file (exit 0, or
    exit 1 'restore.json: Is a directory' after deleting it)."""
    _src, repo = source_repo(tmp_path)
    target = tmp_path / "target"
    (target / ".drsync-staging").mkdir(parents=True)
    (target / ".drsync-staging" / "user.db").write_text("precious\n")
    _plant(target / ".drsync-staging" / mark, kind)
    dry = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target, "--dry-run", timeout=60)
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target, timeout=60)
    assert (target / ".drsync-staging" / "user.db").exists(), (
        f"the restore deleted the user's .drsync-staging/user.db (restore exit {r.code}: {r.err.strip()})")
    assert dry.code == 4 and r.code == 4, (dry, r)
    assert len(r.err.strip().splitlines()) == 1, r.err


def test_a_backup_restore_does_not_delete_a_users_staging_with_a_restore_json_directory(tmp_path: Path) -> None:
    """Same through `backup restore`. Observed: exit 1 'restore.json: Is a directory', user.db already gone."""
    _src, repo = source_repo(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk")
    assert r.code == 0, r.err
    backup = next((tmp_path / "bk").iterdir())
    target = tmp_path / "target"
    (target / ".drsync-staging" / "restore.json").mkdir(parents=True)
    (target / ".drsync-staging" / "user.db").write_text("precious\n")
    r = run_drsync("backup", "restore", backup, "--target", target, timeout=60)
    assert (target / ".drsync-staging" / "user.db").exists(), f"user.db deleted (exit {r.code}: {r.err.strip()})"
    assert r.code == 4, r


def test_an_empty_json_journal_in_a_users_staging_is_one_clear_line_not_an_internal_error(tmp_path: Path) -> None:
    """`.drsync-staging/journal.json` holding `{}`: bad input gets one clear line and changes nothing.
    Observed: 'drsync: internal error: KeyError: 'write'' (exit 1), and the dry run said exit 0."""
    _src, repo = source_repo(tmp_path)
    target = tmp_path / "target"
    write_files(target, {".drsync-staging/journal.json": "{}\n", ".drsync-staging/user.db": "precious\n"})
    dry = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target, "--dry-run", timeout=60)
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target, timeout=60)
    assert "internal error" not in r.err and "internal error" not in dry.err, (dry.err, r.err)
    assert r.code in (3, 4) and dry.code == r.code, (dry, r)
    assert (target / ".drsync-staging" / "user.db").exists()
    assert not (target / "a").exists()


@needs_root
@needs_strace
def test_drsyncs_leftover_at_the_top_does_not_hide_a_foreign_staging_in_a_mounted_filesystem(tmp_path: Path) -> None:
    """A restore killed -9 leaves drsync's staging area at the top of the target; the user then has a
    `.drsync-staging` with data at the top of a filesystem mounted inside the target. The next restore takes
    up drsync's leftover, but must still refuse the mount's (exit 4, dry run too) without --delete-extra.
    Observed: dry run exit 0 and the restore silently deletes vol/.drsync-staging/user.db."""
    src, repo = source_repo(tmp_path)
    target = tmp_path / "target"
    (target / "vol").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target / "vol")], check=True)
    try:
        # The mount's root directory as the snapshot has it (another mode would be refused without --overwrite).
        os.chmod(target / "vol", stat.S_IMODE((src / "vol").stat().st_mode))
        # drsync's own leftover: the restore killed at its first rename (the apply record being written)
        p = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat,renameat2,rename",
                            "-e", "inject=renameat,renameat2,rename:signal=SIGKILL:when=1",
                            sys.executable, "-m", "drsync", "snapshot", "restore", "s1", "--repo", str(repo),
                            "--target", str(target)], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode in (-9, 137), p
        assert (target / ".drsync-staging").is_dir()
        (target / "vol" / ".drsync-staging").mkdir()
        (target / "vol" / ".drsync-staging" / "user.db").write_text("precious\n")
        dry = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target, "--dry-run")
        r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", target)
        assert (target / "vol" / ".drsync-staging" / "user.db").exists(), (
            f"the user's vol/.drsync-staging/user.db was deleted (dry run exit {dry.code}, restore exit {r.code})")
        assert dry.code == 4 and r.code == 4, (dry, r)
    finally:
        subprocess.run(["umount", str(target / "vol")], check=False)


def _standby_pair(base: Path):  # type: ignore[no-untyped-def]
    from tests.users import pair_configs

    prod, sb = base / "prod", base / "sb"
    write_files(prod, {"a/f1": "one\n", "b/f2": "two\n"})
    sb.mkdir()
    scfg, pcfg = pair_configs(base, prod, sb)
    return prod, sb, scfg, pcfg


def _stop(agent: subprocess.Popen) -> None:  # type: ignore[type-arg]
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(60)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def test_a_standby_agent_starting_does_not_delete_a_foreign_staging_in_its_root(tmp_path: Path) -> None:
    """docs/operations.md: a standby's root with a `.drsync-staging` drsync did not make is refused, nothing
    changed. Observed: the agent's start-up recovery (recover_apply -> drop_staging) deletes it silently,
    before any shipment, and the next shipment applies as if nothing were there."""
    from tests.group import wait_for
    from tests.users import serves, start_agent

    _prod, sb, scfg, _pcfg = _standby_pair(tmp_path)
    write_files(sb, {".drsync-staging/user.db": "precious\n"})
    agent = start_agent(scfg, tmp_path / "standby.log")
    try:
        wait_for(lambda: serves(scfg), "the standby serves")
        assert (sb / ".drsync-staging" / "user.db").exists(), "the standby's start deleted the user's file"
    finally:
        _stop(agent)


def test_a_standby_refusing_a_foreign_staging_leaves_it_and_recovers_once_it_is_moved(tmp_path: Path) -> None:
    """A foreign `.drsync-staging` appearing in a standby's root: the shipment is refused (WARNING, 'nothing
    was changed'), the user's data stays, and once the operator moves it away the next shipment applies.
    Observed: the refusal is logged, and then the agent's recovery after the failed apply deletes it."""
    from tests.group import wait_for
    from tests.users import serves, start_agent

    prod, sb, scfg, pcfg = _standby_pair(tmp_path)
    log = tmp_path / "standby.log"
    agent = start_agent(scfg, log)
    try:
        wait_for(lambda: serves(scfg), "the standby serves")
        assert run_drsync("agent", "--once", "--config", pcfg).code == 0
        write_files(sb, {".drsync-staging/sub/user.db": "precious\n"})
        write_files(prod, {"a/f1": "changed\n"})
        r = run_drsync("agent", "--once", "--config", pcfg)
        assert r.code != 0 and "holds what drsync did not put there" in r.err, r
        wait_for(lambda: "WARNING" in log.read_text() and "did not put there" in log.read_text(), "the warning")
        assert (sb / ".drsync-staging" / "sub" / "user.db").exists(), (
            "the standby said 'nothing was changed' but deleted the user's .drsync-staging/sub/user.db")
        shutil.move(str(sb / ".drsync-staging"), str(tmp_path / "moved-away"))
        r = run_drsync("agent", "--once", "--config", pcfg)
        assert r.code == 0, r.err
        assert (sb / "a" / "f1").read_text() == "changed\n"
    finally:
        _stop(agent)


# --- promise 2: rolling the own data root back takes a file as unchanged only as the captured version ------


def captured_then_tampered(base: Path, prepare: Callable[[Path], None] | None = None,
                           ) -> tuple[Path, Path, dict]:  # type: ignore[type-arg]
    """A root ``base/data`` (``prepare`` may add to it) captured as snapshot s1 of config ``base/c.toml``, then
    its file ``victim`` rewritten in place with its size and times put back (ransomware's way): (root, config,
    the root's state as captured)."""
    src = base / "data"
    write_files(src, {"victim": "victim data " * 50, "other": "other\n"})
    if prepare is not None:
        prepare(src)
    age_tree(src)
    init_repo_at(base / "repo", "east", "6.2.1")
    cfg = base / "c.toml"
    cfg.write_text(f'[cluster]\nid="east"\nrelease="6.2.1"\ndata="{src}"\nrepository="{base / "repo"}"\n')
    r = run_drsync("snapshot", "create", "--config", cfg, "--name", "s1")
    assert r.code == 0, r.err
    want = tree_state(src)
    s = os.lstat(src / "victim")
    with open(src / "victim", "r+b") as f:
        f.write(b"ENCRYPTED")
    os.utime(src / "victim", ns=(s.st_atime_ns, s.st_mtime_ns))
    return src, cfg, want


@pytest.mark.parametrize("also", ["chmod", "chown", "xattr", "hardlink"])
def test_rollback_rewrites_a_file_tampered_in_place_whose_metadata_also_changed(tmp_path: Path, also: str) -> None:
    """`snapshot restore s1 --config C` (C's data is the captured root): a file rewritten in place with its size
    and mtime put back is content-checked and rewritten. Observed: when the file's mode, owner or xattrs also
    changed, or it has a second hard link, size+mtime decide and the ransomware's bytes stay (exit 0,
    'N unchanged'); only --checksum restores it."""
    if also == "chown" and os.geteuid() != 0:
        pytest.skip("needs root")

    def prepare(src: Path) -> None:
        if also == "hardlink":
            os.link(src / "victim", src / "victim-link")
        if also == "xattr":
            os.setxattr(src / "victim", "user.k", b"v1")

    src, cfg, want = captured_then_tampered(tmp_path, prepare)
    if also == "chmod":
        os.chmod(src / "victim", 0o600)
    elif also == "chown":
        os.chown(src / "victim", 1234, 1234)
    elif also == "xattr":
        os.setxattr(src / "victim", "user.k", b"v2")
    r = run_drsync("snapshot", "restore", "s1", "--config", cfg)
    assert r.code == 0, r.err
    assert (src / "victim").read_bytes().startswith(b"victim data"), (
        f"the tampered bytes survived the rollback ({r.out.strip()})")
    assert tree_state(src) == want
    if also == "hardlink":
        assert os.lstat(src / "victim").st_ino == os.lstat(src / "victim-link").st_ino


# --- promise 3: a directory renamed away and back during a capture ------------------------------------


def test_a_directory_renamed_back_between_the_listing_and_its_walk_keeps_its_files(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                                   monkeypatch) -> None:
    """`zz/` (in the last snapshot) was renamed to `zz.mv`; the capture lists the root (`zz.mv`, no `zz`), and
    before the walk opens `zz.mv` it is renamed back (a real rename at that moment). The files existed
    throughout: the snapshot holds the last captured `zz/*`, stale, with a warning naming both names; before,
    they were missing and `zz.mv` was an empty directory (a standby would delete `zz/`)."""
    from drsync import engine, fsutil
    from drsync.repository.manifest import Manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    src = tmp_path / "data"
    write_files(src, {**{f"zz/keep{i}": f"precious {i}\n" for i in range(20)}, "a/x": "x\n"})
    init_repo_at(tmp_path / "repo", "east", "6.2.1")
    repo = Repository.open(LocalStorage(str(tmp_path / "repo")))
    engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    os.rename(src / "zz", src / "zz.mv")
    real = fsutil.open_walked_dir

    def renamed_back_first(root: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"zz.mv" and (src / "zz.mv").exists():
            os.rename(src / "zz.mv", src / "zz")
        return real(root, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", renamed_back_first)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    entries = {e.path: e for e in Manifest.from_bytes(repo.load_manifest(info).to_bytes(), "m").entries()}
    kept = [p for p in entries if p.startswith("zz/keep")]
    assert len(kept) == 20 and all(entries[p].stale for p in kept), sorted(entries)
    assert any("zz.mv: vanished while the snapshot was taken" in w and "(as zz)" in w for w in info.warnings), \
        info.warnings
