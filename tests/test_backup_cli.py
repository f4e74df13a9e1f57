"""Portable backups through the real CLI: modes, verification, interruption, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_tree, run_drsync, tree_state
from tests.sites import make_site, same_tree


def config(tmp_path: Path, *, cluster_id: str = "east", extra: str = "") -> Path:
    p = tmp_path / f"{cluster_id}.toml"
    p.write_text(f'[cluster]\nid = "{cluster_id}"\nrelease = "6.2.1"\ndata = "data"\n'
                 f'repository = "repo-{cluster_id}"\n[backups]\ndestination = "backups"\n'
                 f'light_exclude = ["tables/**"]\n{extra}')
    return p


def setup(drsync, tmp_path: Path) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    make_tree(tmp_path / "data")
    cfg = config(tmp_path)
    assert drsync("init", "--config", cfg).code == 0
    snap = drsync("snapshot", "create", "--config", cfg, "--json")
    assert snap.code == 0, snap.err
    return cfg, snap.json()["id"]


def create(drsync, cfg: Path, snap: str, mode: str = "full") -> dict:  # type: ignore[no-untyped-def]
    r = drsync("backup", "create", "--config", cfg, "--snapshot", snap, "--mode", mode, "--json")
    assert r.code == 0, r.err
    return r.json()


def test_full_backup_restores_anywhere(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    b = create(drsync, cfg, snap)
    assert b["mode"] == "full" and b["snapshot"]["id"] == snap and b["files"] == 35
    path = Path(b["path"])
    assert {p.name for p in path.iterdir()} >= {"backup.json", "CHECKSUMS.b3", "manifests", "packs", "index"}
    # Portable: restored with nothing but the backup directory, onto another data root.
    r = drsync("backup", "restore", path, "--target", tmp_path / "elsewhere", "--json")
    assert r.code == 0, r.err
    assert tree_state(tmp_path / "elsewhere") == tree_state(tmp_path / "data")
    v = drsync("backup", "verify", path, "--json")
    assert v.code == 0 and v.json()["ok"] is True


def test_backup_restore_onto_a_directory_holding_other_files_changes_nothing_without_the_flags(
        drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: `backup restore DIR --target T` onto a directory with other files removed them ("1
    removed") without a word, and overwrote a file of the same name. A target that is not this cluster's
    data root keeps what it holds unless --overwrite (files there that differ) and --delete-extra (files the
    backup lacks) say otherwise: exit 4, nothing changed; --dry-run lists what would change and exits 4 too."""
    cfg, snap = setup(drsync, tmp_path)
    path = create(drsync, cfg, snap)["path"]
    target = tmp_path / "shared"
    (target / "catalog").mkdir(parents=True)
    (target / "unrelated.txt").write_text("somebody else's file\n")
    (target / "catalog" / "f000.txt").write_text("same name, other content\n")
    before = tree_state(target)
    r = drsync("backup", "restore", path, "--target", target)
    assert r.code == 4 and len(r.err.strip().splitlines()) == 1, (r.code, r.err)
    assert "catalog/f000.txt" in r.err and "unrelated.txt" in r.err and "rerun with --overwrite --delete-extra" \
        in r.err and "nothing was changed" in r.err, r.err
    assert tree_state(target) == before
    dry = drsync("backup", "restore", path, "--target", target, "--dry-run", "--json")
    assert dry.code == 4 and "would be refused" in dry.err and tree_state(target) == before, dry.err
    planned = dry.json()["planned"]
    assert planned["remove"] == ["unrelated.txt"] and planned["overwrite"] == ["catalog/f000.txt"]
    # Only overwriting allowed: the unrelated file still stops it; only removing allowed: the same-name file.
    assert drsync("backup", "restore", path, "--target", target, "--overwrite").code == 4
    assert drsync("backup", "restore", path, "--target", target, "--delete-extra").code == 4
    assert tree_state(target) == before
    # Both allowed: the target becomes the backup.
    ok = drsync("backup", "restore", path, "--target", target, "--overwrite", "--delete-extra", "--json")
    assert ok.code == 0 and ok.json()["removed"] == 1, ok.err
    assert tree_state(target) == tree_state(tmp_path / "data")
    # Onto this cluster's own data root (--config) a restore may change what is there, as before.
    (tmp_path / "data" / "catalog" / "f000.txt").write_text("damaged\n")
    own = drsync("backup", "restore", path, "--target", tmp_path / "data", "--config", cfg)
    assert own.code == 0, own.err
    assert tree_state(tmp_path / "data") == tree_state(target)


def test_backup_holds_only_the_chunks_its_snapshot_needs(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, first = setup(drsync, tmp_path)
    (tmp_path / "data" / "tables" / "orders" / "part-0.bin").unlink()
    second = drsync("snapshot", "create", "--config", cfg, "--json").json()["id"]
    b1, b2 = create(drsync, cfg, first), create(drsync, cfg, second)
    assert b2["stored_bytes"] < b1["stored_bytes"] - 3_000_000


def test_light_and_dataless_modes(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    light = create(drsync, cfg, snap, "light")
    assert light["excluded"] == ["tables/**"] and light["bytes"] < 100_000
    target = tmp_path / "target"
    (target / "tables" / "orders").mkdir(parents=True)
    (target / "tables" / "orders" / "reloaded.bin").write_bytes(b"bulk data reloaded separately")
    r = drsync("backup", "restore", light["path"], "--target", target)
    assert r.code == 0, r.err
    # Bulk data is neither restored nor removed; everything else matches.
    assert (target / "tables" / "orders" / "reloaded.bin").read_bytes() == b"bulk data reloaded separately"
    assert not (target / "tables" / "orders" / "part-0.bin").exists()
    assert (target / "catalog" / "f007.txt").read_bytes() == (tmp_path / "data/catalog/f007.txt").read_bytes()

    dataless = create(drsync, cfg, snap, "dataless")
    assert dataless["stored_bytes"] == 0
    assert not list((Path(dataless["path"]) / "packs").glob("**/*.pack"))
    r = drsync("backup", "restore", dataless["path"], "--target", tmp_path / "skeleton", "--json")
    assert r.code == 0, r.err
    assert (tmp_path / "skeleton" / "empty" / "deeper").is_dir()
    assert not (tmp_path / "skeleton" / "catalog" / "f000.txt").exists()
    assert drsync("backup", "verify", dataless["path"]).code == 0


def test_verify_names_damage_and_exits_3(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    path = Path(create(drsync, cfg, snap)["path"])
    pack = max(path.glob("packs/*/*.pack"), key=lambda p: p.stat().st_size)
    raw = bytearray(pack.read_bytes())
    raw[5000] ^= 0x01
    pack.write_bytes(bytes(raw))
    r = drsync("backup", "verify", path)
    assert r.code == 3
    assert f"packs/{pack.parent.name}/{pack.name}: checksum mismatch" in r.err
    assert f"snapshot {snap}: tables/orders/part-" in r.err
    j = drsync("backup", "verify", path, "--json")
    assert j.code == 3 and j.json()["ok"] is False
    # Restoring the damaged backup fails with exit 3 and leaves the target alone.
    r = drsync("backup", "restore", path, "--target", tmp_path / "t")
    assert r.code == 3 and "does not match its hash" in r.err
    assert not (tmp_path / "t").exists()


def test_verify_detects_missing_and_edited_metadata(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    path = Path(create(drsync, cfg, snap)["path"])
    meta = json.loads((path / "backup.json").read_text())
    meta["files"] = 1
    (path / "backup.json").write_text(json.dumps(meta))
    next(path.glob("index/*")).unlink()
    r = drsync("backup", "verify", path)
    assert r.code == 3 and "backup.json: checksum mismatch" in r.err and "index/" in r.err


def test_interrupted_creation_leaves_nothing_that_looks_complete(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_tree(tmp_path / "data", big=40)  # ~120 MiB to copy
    cfg = config(tmp_path)
    assert drsync("init", "--config", cfg).code == 0
    snap = drsync("snapshot", "create", "--config", cfg, "--json").json()["id"]
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "backup", "create", "--config", str(cfg),
                             "--snapshot", snap], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backups = tmp_path / "backups"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if backups.exists() and any(p.name.startswith(".partial-") for p in backups.iterdir()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "backup finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = drsync("backup", "list", "--config", cfg, "--json").json()
    assert listed["backups"] == [] and len(listed["incomplete"]) == 1
    pruned = drsync("backup", "prune", "--config", cfg, "--keep-last", "1")
    assert pruned.code == 0
    assert drsync("backup", "list", "--config", cfg, "--json").json()["incomplete"] == []


def test_prune_keeps_what_the_policy_says(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    made = []
    for _ in range(3):
        made.append(create(drsync, cfg, snap)["id"])
        # Backup ids carry the creation second; make the next one distinct.
        deadline = time.monotonic() + 2
        first_second = int(time.time())
        while int(time.time()) == first_second and time.monotonic() < deadline:
            time.sleep(0.01)
    dry = drsync("backup", "prune", "--config", cfg, "--keep-last", "2", "--dry-run", "--json").json()
    assert dry["remove"] == [made[0]]
    assert len(drsync("backup", "list", "--config", cfg, "--json").json()["backups"]) == 3
    r = drsync("backup", "prune", "--config", cfg, "--keep-last", "2", "--json")
    assert r.code == 0 and r.json()["remove"] == [made[0]]
    left = [b["id"] for b in drsync("backup", "list", "--config", cfg, "--json").json()["backups"]]
    assert left == made[1:]
    human = drsync("backup", "list", "--config", cfg)
    assert made[1] in human.out and "full" in human.out


def test_backup_bad_input(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, snap = setup(drsync, tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    r = drsync("backup", "create", "--config", cfg, "--snapshot", snap, "--dest", f)
    assert r.code == 2 and "is a file" in r.err
    r = drsync("backup", "restore", tmp_path / "data", "--target", tmp_path / "t")
    assert r.code == 2 and "not a complete drsync backup" in r.err
    r = drsync("backup", "prune", tmp_path / "backups")
    assert r.code == 2 and "--keep-" in r.err
    r = run_drsync("backup", "create", "--config", cfg, "--snapshot", snap, "--mode", "bogus")
    assert r.code == 2
    assert os.listdir(tmp_path / "backups") if (tmp_path / "backups").exists() else True


STORAGE_PAIRS = [("local", "local"), ("hdfs", "hdfs"), ("hdfs", "local"), ("local", "hdfs")]


@pytest.mark.parametrize(("source", "target"), STORAGE_PAIRS, ids=[f"{a}-to-{b}" for a, b in STORAGE_PAIRS])
def test_backup_pulled_onto_local_disk_restores_onto_any_storage(drsync, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 request: pytest.FixtureRequest,
                                                                 source: str, target: str) -> None:
    cluster = request.getfixturevalue("webhdfs") if "hdfs" in (source, target) else None
    src, dst = make_site(source, tmp_path / "src", cluster), make_site(target, tmp_path / "dst", cluster)
    src.make_tree("data")
    repo = src.url("repo")
    assert drsync("init", "--repo", repo, "--cluster-id", "east", "--release", "6.2.1").code == 0
    snap = drsync("snapshot", "create", "--repo", repo, "--source", src.url("data"), "--json").json()["id"]
    made = drsync("backup", "create", "--repo", repo, "--snapshot", snap, "--dest", tmp_path / "backups", "--json")
    assert made.code == 0, made.err
    path = made.json()["path"]
    assert Path(path).is_dir() and drsync("backup", "verify", path).code == 0
    r = drsync("backup", "restore", path, "--target", dst.url("restored"), "--json")
    assert r.code == 0, r.err
    assert same_tree(src, "data", dst, "restored")


def test_backup_list_and_prune_errors_name_only_what_exists() -> None:
    """Without a directory the error says how to give one, in the command's own terms."""
    for cmd in ("list", "prune"):
        r = run_drsync("backup", cmd)
        assert r.code == 2 and f"drsync backup {cmd} DIR" in r.err and "--dest" not in r.err, r.err
        assert len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["full", "dataless"])
def test_no_command_changes_a_backup_opened_as_a_repository(drsync, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A backup directory is a repository beside backup.json, so every --repo command opens it. `repo gc`
    on a dataless one said it was damaged and to repair it; `snapshot create --repo BACKUP` added a snapshot
    to it and its next verify found it damaged. Every command that would write is refused (exit 2, one line,
    nothing changed); reading, verifying and restoring still work."""
    cfg, snap = setup(drsync, tmp_path)
    path = Path(create(drsync, cfg, snap, mode)["path"])
    before = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    in_it = drsync("snapshot", "list", "--repo", path, "--json").json()
    only = (in_it if isinstance(in_it, list) else in_it["snapshots"])[0]["id"]
    for args in (["repo", "gc"], ["repo", "gc", "--dry-run"], ["snapshot", "create", "--source", tmp_path / "data"],
                 ["snapshot", "delete", only], ["snapshot", "expire"]):
        r = drsync(*args, "--repo", path)
        assert r.code == 2, (args, r.code, r.err)
        assert "is a backup (it holds backup.json)" in r.err and "nothing was changed" in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, (args, r.err)
    after = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    v = drsync("backup", "verify", path, "--json")
    assert v.code == 0 and v.json()["ok"] is True, v.out + v.err
    assert drsync("snapshot", "show", only, "--repo", path).code == 0
    assert drsync("repo", "unlock", "--repo", path).code == 0  # locks/ stays writable: readers take locks
