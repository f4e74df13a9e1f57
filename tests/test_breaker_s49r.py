"""Breaker s49r: real trees reproduced exactly, and nothing of the user's destroyed unasked.

A fresh helper copied real trees of this machine (python's library, /etc, zoneinfo, a git clone, a venv) and
odd ones of its own through snapshots, restores, backups and an agent pair; all came back exact. What it broke:

- F1: rolling the cluster's own data root back left files rewritten in place whose size and mtime had been put
  back (the ransomware pattern of docs/operations.md 13d): "0 written, 3 unchanged".
- F2: `drsync drill run` failed on an intact standby holding a path longer than PATH_MAX.
- F3: a top-level `.drsync-staging` of the user's was left out of a snapshot without a warning.
- F4: a restore emptied a top-level `.drsync-staging` of the user's without --delete-extra (the dry run said
  "remove 0").
- F5: a directory unlistable at its first capture was said to keep "its last captured content".

Real files, the real CLI, real agents over gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import init_repo_at, run_drsync, snapshot_json, write_files
from tests.group import wait_for
from tests.users import pair_configs, serves, start_agent

AGED = 1_700_000_000_000_000_000  # an mtime well before the capture


def _config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n')
    assert run_drsync("init", "--config", cfg).code == 0
    return cfg


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_rolling_the_own_root_back_undoes_rewrites_that_kept_size_and_time(tmp_path: Path, how: str) -> None:
    """F1. Files rewritten with the same size and their old mtime put back (in place, or a new file renamed over
    the old one) are not the version the snapshot captured: `snapshot restore --config` rewrites them, and
    leaves alone what is still the captured version."""
    data = tmp_path / "data"
    data.mkdir()
    originals = {}
    for i in range(4):
        p = data / f"f{i}"
        p.write_bytes(b"original content %d\n" % i)
        os.utime(p, ns=(AGED, AGED))
        originals[p] = p.read_bytes()
    cfg = _config(tmp_path, data)
    assert run_drsync("snapshot", "create", "--config", cfg, "--name", "good").code == 0
    damaged = list(originals)[:3]
    for p in damaged:
        scrambled = bytes(x ^ 0x55 for x in originals[p])
        if how == "in place":
            p.write_bytes(scrambled)
        else:
            (p.parent / (p.name + ".new")).write_bytes(scrambled)
            os.replace(p.parent / (p.name + ".new"), p)
        os.utime(p, ns=(AGED, AGED))
    dry = run_drsync("snapshot", "restore", "good", "--config", cfg, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert sorted(dry.json()["planned"]["write"]) == sorted(p.name for p in damaged), dry.out
    r = run_drsync("snapshot", "restore", "good", "--config", cfg)
    assert r.code == 0, r.err
    left = [p.name for p, b in originals.items() if p.read_bytes() != b]
    assert not left, f"restore said {r.out.strip()!r} but left damaged files: {left}"
    assert "3 files written" in r.out and "1 unchanged" in r.out, r.out


def test_a_restore_elsewhere_keeps_the_quick_check(tmp_path: Path) -> None:
    """Into another directory (not the cluster's root) a file alike in size and time is left as it is, as rsync
    does (--checksum reads it): the stricter check is for the root the snapshot was captured from."""
    data, target = tmp_path / "data", tmp_path / "target"
    write_files(data, {"f": "original\n"})
    os.utime(data / "f", ns=(AGED, AGED))
    init_repo_at(tmp_path / "repo", "c", "1")
    snapshot_json(tmp_path / "repo", data)
    assert run_drsync("snapshot", "restore", "latest", "--repo", tmp_path / "repo", "--target", target).code == 0
    again = run_drsync("snapshot", "restore", "latest", "--repo", tmp_path / "repo", "--target", target)
    assert again.code == 0 and "0 files written" in again.out and "1 unchanged" in again.out, again


def _long_path(root: Path) -> None:
    """18 directories of 255-byte names (about 4,600 bytes, past PATH_MAX) and a file at the bottom."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(18):
        name = b"%02d" % i + b"L" * 253
        os.mkdir(name, dir_fd=fd)
        fd, old = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    f = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"deep leaf\n")
    os.close(f)
    os.close(fd)


def _has_leaf(root: Path) -> bool:
    try:
        fd = os.open(root / "long", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for i in range(18):
            fd, old = os.open(b"%02d" % i + b"L" * 253, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        return os.stat(b"leaf", dir_fd=fd).st_size == 10
    except OSError:
        return False
    finally:
        os.close(fd)


def test_a_drill_compares_a_path_longer_than_path_max(tmp_path: Path) -> None:
    """F2. A standby holding a path past PATH_MAX (which snapshots carry) passes a full drill; one of its files
    changed by hand fails it."""
    prod, sb = tmp_path / "prod", tmp_path / "sb"
    prod.mkdir()
    sb.mkdir()
    (prod / "plain").write_text("plain file\n")
    _long_path(prod / "long")
    scfg, pcfg = pair_configs(tmp_path, prod, sb)
    standby = start_agent(scfg, tmp_path / "standby.log")
    try:
        wait_for(lambda: serves(scfg) or standby.poll() is not None, "the standby to serve")
        assert run_drsync("agent", "--config", pcfg, "--once").code == 0
        wait_for(lambda: _has_leaf(sb) and (sb / "plain").exists(), "the long path to be applied")
        drill = run_drsync("drill", "run", "--config", scfg, "--full", "--json")
        assert drill.code == 0, (drill.out[-800:], drill.err[-800:])
        before = os.stat(sb / "plain")
        (sb / "plain").write_text("plain fila\n")  # same size and time: only the bytes tell
        os.utime(sb / "plain", ns=(before.st_atime_ns, before.st_mtime_ns))
        drill = run_drsync("drill", "run", "--config", scfg, "--full")
        assert drill.code != 0 and "plain: content differs" in drill.out + drill.err, drill
    finally:
        standby.terminate()
        standby.wait(timeout=60)


def test_a_capture_says_it_leaves_out_a_top_level_staging_name_of_the_users(tmp_path: Path) -> None:
    """F3. `.drsync-staging` at the top of the root holding the user's files is left out, as at any depth (the
    name is reserved), and the capture says so."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    write_files(data, {".drsync-staging/user.db": "user data\n", "other": "x\n"})
    init_repo_at(repo, "c", "1")
    doc = snapshot_json(repo, data)
    assert any(".drsync-staging: the name is reserved for drsync's staging area; not captured" in w
               for w in doc["warnings"]), doc["warnings"]


@pytest.mark.parametrize("kind", ["snapshot", "backup"])
@pytest.mark.parametrize("what", ["directory", "file"])
def test_a_restore_does_not_empty_a_staging_name_of_the_users_unasked(tmp_path: Path, kind: str,
                                                                       what: str) -> None:
    """F4. A target holding `.drsync-staging` that drsync did not make (no apply record or journal in it):
    without --delete-extra the restore and its dry run are refused (exit 4, naming it, nothing changed); with
    it, the dry run lists it under what goes and the restore removes it, as it does other extras."""
    data, repo, target = tmp_path / "data", tmp_path / "repo", tmp_path / "target"
    write_files(data, {"f": "snapshot file\n"})
    init_repo_at(repo, "c", "1")
    snapshot_json(repo, data)
    precious = target / ".drsync-staging" / "sub" / "important.db" if what == "directory" else \
        target / ".drsync-staging"
    precious.parent.mkdir(parents=True, exist_ok=True)
    precious.write_text("precious user data\n")
    if kind == "snapshot":
        args: list[str | Path] = ["snapshot", "restore", "latest", "--repo", repo, "--target", target]
    else:
        assert run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "bk",
                          ).code == 0
        (backup,) = list((tmp_path / "bk").iterdir())
        args = ["backup", "restore", backup, "--target", target]
    for extra in (["--dry-run"], []):
        r = run_drsync(*args, *extra)
        assert r.code == 4 and ".drsync-staging holds what drsync did not put there" in r.err, (extra, r)
        assert len(r.err.strip().splitlines()) == 1 and precious.read_text() == "precious user data\n"
    dry = run_drsync(*args, "--delete-extra", "--dry-run", "--json")
    assert dry.code == 0 and ".drsync-staging" in dry.json()["planned"]["remove"], dry
    assert precious.exists()
    r = run_drsync(*args, "--delete-extra")
    assert r.code == 0 and not (target / ".drsync-staging").exists() and (target / "f").exists(), r


def test_a_staging_area_a_killed_restore_left_is_taken_up_again(tmp_path: Path) -> None:
    """drsync's own staging area (its record inside, or only the temporary file of the record being written
    when it was killed) is not the user's: the next restore takes it up without --delete-extra."""
    data, repo, target = tmp_path / "data", tmp_path / "repo", tmp_path / "target"
    write_files(data, {"f": "snapshot file\n"})
    init_repo_at(repo, "c", "1")
    snapshot_json(repo, data)
    for left in ("restore.json", "restore.json.0123456789ab"):
        write_files(target, {f".drsync-staging/{left}": "{}", ".drsync-staging/7": "a staged file"})
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", target)
        assert r.code == 0 and not (target / ".drsync-staging").exists(), (left, r)
        assert (target / "f").read_text() == "snapshot file\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs drsync as uid 65534, which needs root")
def test_a_directory_unlistable_at_its_first_capture_is_not_said_to_be_kept(open_tmp: Path) -> None:
    """F5. A directory no earlier snapshot has, which cannot be listed: the capture says nothing below it is
    captured, not that its last captured content is kept."""
    data, repo = open_tmp / "data", open_tmp / "repo"
    write_files(data, {"newlocked/z": "z\n", "ok": "ok\n"})
    subprocess.run(["chown", "-R", "65534:65534", str(open_tmp)], check=True)
    (data / "newlocked").chmod(0)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "drsync"]
    env = {**os.environ, "HOME": str(open_tmp)}
    try:
        assert subprocess.run([*as_nobody, "init", "--repo", str(repo), "--cluster-id", "c", "--release", "1"],
                              env=env, capture_output=True).returncode == 0
        r = subprocess.run([*as_nobody, "snapshot", "create", "--repo", str(repo), "--source", str(data), "--json"],
                           env=env, capture_output=True, text=True)
    finally:
        (data / "newlocked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    warnings = [w for w in json.loads(r.stdout)["warnings"] if w.startswith("newlocked")]
    assert any("no earlier snapshot has anything below it: nothing below it is captured" in w for w in warnings), \
        warnings


# --- a rename during the walk is never a deletion ------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_a_directory_renamed_while_the_walk_reaches_it_is_kept_stale(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                    native: bool) -> None:
    """A directory renamed between its parent's listing and its own (a real rename, made at that moment): its
    files are missing from this walk under either name. The snapshot keeps what the last one had below the old
    name (stale, said in a warning) instead of dropping it, which a standby would apply as a deletion."""
    from drsync import engine, fsutil, native_walk
    from drsync.repository.manifest import Manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    data = tmp_path / "data"
    write_files(data, {"d/a": "a\n", "d/b": "b\n", "f": "f\n"})
    init_repo_at(tmp_path / "repo", "c", "1")
    repo = Repository.open(LocalStorage(str(tmp_path / "repo")))
    engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    if not native:
        monkeypatch.setattr(native_walk, "available", lambda: False)  # the pure-Python listing
    real = fsutil.open_walked_dir

    def renamed_first(root: str, rel_dir: bytes, abs_dir: bytes, examined):  # type: ignore[no-untyped-def]
        if rel_dir == b"d":
            os.rename(data / "d", data / "e")  # after "d" was listed: "e" is in no listing of this walk
        return real(root, rel_dir, abs_dir, examined)

    monkeypatch.setattr(fsutil, "open_walked_dir", renamed_first)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    paths = {e.path for e in Manifest.from_bytes(repo.load_manifest(info).to_bytes(), "m").entries()}
    assert {"d/a", "d/b", "f"} <= paths, paths
    assert any("d: vanished while the snapshot was taken" in w for w in info.warnings), info.warnings


def test_a_file_renamed_before_it_is_read_is_kept_stale(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A changed file renamed after the listing and before its read: its last captured version is kept (stale,
    said in a warning), not dropped; a new file that vanishes the same way is left out quietly."""
    from drsync import capture, engine
    from drsync.repository.manifest import Manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    data = tmp_path / "data"
    write_files(data, {"f": "version 1\n", "g": "g\n"})
    init_repo_at(tmp_path / "repo", "c", "1")
    repo = Repository.open(LocalStorage(str(tmp_path / "repo")))
    engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    (data / "f").write_text("version 2\n")  # changed: it is read, not reused
    (data / "new").write_text("new\n")
    real = capture._read_one

    def renamed_first(view, path, *args):  # type: ignore[no-untyped-def]
        if path in ("f", "new"):
            os.rename(data / path, data / f"{path}.moved")
        return real(view, path, *args)

    monkeypatch.setattr(capture, "_read_one", renamed_first)
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    entries = {e.path: e for e in Manifest.from_bytes(repo.load_manifest(info).to_bytes(), "m").entries()}
    assert "f" in entries and entries["f"].stale and "new" not in entries, sorted(entries)
    assert any(w.startswith("f: vanished while the snapshot was taken") for w in info.warnings), info.warnings
    assert not any(w.startswith("new:") for w in info.warnings), info.warnings
