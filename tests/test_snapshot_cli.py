"""Snapshots through the real CLI: JSON contracts, exact restores, refusals and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import click
import pyarrow as pa
import pytest

from drsync.repository import format as fmt
from drsync.repository.manifest import Manifest
from drsync.storage.local import LocalStorage
from tests.conftest import age_tree, make_tree, tree_state
from tests.sites import make_site, same_tree


def write_config(tmp_path: Path, *, cluster_id: str = "east", release: str = "6.2.1", extra: str = "",
                 name: str = "drsync.toml") -> Path:
    p = tmp_path / name
    p.write_text(f'[cluster]\nid = "{cluster_id}"\nrelease = "{release}"\ndata = "data"\n'
                 f'repository = "repo"\n{extra}')
    return p


def snapshot(drsync, repo: str, data: Path, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    r = drsync("snapshot", "create", "--repo", repo, "--source", data, "--json", *extra)
    assert r.code == 0, r.err
    return r.json()


def test_create_list_show_diff_json(drsync, repo_url: str, tree: Path) -> None:  # type: ignore[no-untyped-def]
    first = snapshot(drsync, repo_url, tree, "--name", "nightly", "--reason", "before upgrade")
    assert {"id", "name", "files", "bytes", "new_bytes", "duration_s"} <= set(first)
    assert first["name"] == "nightly" and first["files"] == 35
    assert first["bytes"] == sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    assert first["new_bytes"] > 0
    (tree / "catalog" / "f005.txt").write_text("edited")
    (tree / "catalog" / "added.txt").write_text("new file")
    (tree / "catalog" / "f006.txt").unlink()
    second = snapshot(drsync, repo_url, tree)
    listed = drsync("snapshot", "list", "--repo", repo_url, "--json").json()
    assert [s["id"] for s in listed] == [first["id"], second["id"]]
    assert listed[0]["reason"] == "before upgrade" and listed[0]["cluster_id"] == "east"
    shown = drsync("snapshot", "show", "nightly", "--repo", repo_url, "--json", "--files").json()
    assert shown["id"] == first["id"]
    paths = {e["path"]: e for e in shown["entries"]}
    assert paths["tables/link-to-f000"]["target"] == "../catalog/f000.txt"
    assert paths["catalog/secret.txt"]["mode"] == oct(0o600)
    d = drsync("snapshot", "diff", first["id"], second["id"], "--repo", repo_url, "--json").json()
    assert d["added"] == ["catalog/added.txt"]
    assert d["removed"] == ["catalog/f006.txt"]
    assert "catalog/f005.txt" in d["changed"]
    human = drsync("snapshot", "diff", "nightly", "latest", "--repo", repo_url)
    assert "+ catalog/added.txt" in human.out and "1 added, 1 removed" in human.out


def test_restore_is_exact_and_a_delta(drsync, repo_url: str, tree: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    age_tree(tree)
    snap = snapshot(drsync, repo_url, tree)
    expected = tree_state(tree)
    out = tmp_path / "out"
    r = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--json")
    assert r.code == 0, r.err
    assert tree_state(out) == expected  # contents, modes, mtimes, empty dirs, links
    # Unchanged files are left alone: a second restore writes nothing.
    inode = (out / "catalog" / "f010.txt").stat().st_ino
    again = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--json").json()
    assert again["written_files"] == 0 and again["unchanged_files"] == 35
    assert (out / "catalog" / "f010.txt").stat().st_ino == inode
    # Damage the target in every way; restore puts back exactly the snapshot.
    (out / "catalog" / "f011.txt").write_text("scribbled")
    (out / "catalog" / "extra.txt").write_text("not in the snapshot")
    (out / "stray" / "deep").mkdir(parents=True)
    (out / "stray" / "deep" / "x").write_text("x")
    (out / "empty" / "deeper").rmdir()
    (out / "catalog" / "run.sh").chmod(0o600)
    (out / "tables" / "link-to-f000").unlink()
    (out / "tables" / "link-to-f000").write_text("was a link")
    damaged = tree_state(out)
    # The target is not this cluster's data root: overwriting what it holds needs --overwrite (f011.txt, and
    # the file where the snapshot has a link), removing what the snapshot lacks --delete-extra.
    for flags, needed, named in (((), "--overwrite --delete-extra", ("2 existing path(s)", "2 path(s) the")),
                                 (("--delete-extra",), "--overwrite", ("2 existing path(s)",)),
                                 (("--overwrite",), "--delete-extra", ("2 path(s) the snapshot does not have",))):
        refused = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, *flags)
        assert refused.code == 4 and f"rerun with {needed} " in refused.err, (flags, refused.err)
        assert all(n in refused.err for n in named) and "nothing was changed" in refused.err, refused.err
        assert len(refused.err.strip().splitlines()) == 1 and tree_state(out) == damaged
        # The dry run applies the same rule: it lists what would change, says it would be refused, exits 4.
        dry = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--dry-run",
                     "--json", *flags)
        assert dry.code == 4 and "would be refused" in dry.err and f"rerun with {needed} " in dry.err, dry.err
        assert dry.json()["refused"] and tree_state(out) == damaged
        if not flags:
            assert all(p in refused.err for p in ("catalog/f011.txt", "tables/link-to-f000", "catalog/extra.txt"))
    # A dry run lists what would happen and changes nothing.
    dry = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--dry-run",
                 "--delete-extra", "--overwrite", "--json")
    assert dry.code == 0 and dry.json()["refused"] is None, dry.err
    planned = dry.json()["planned"]
    # The file where the snapshot has a link is replaced, as the refusal counts it: overwritten, not removed.
    assert sorted(planned["remove"]) == ["catalog/extra.txt", "stray"]
    assert sorted(planned["overwrite"]) == ["catalog/f011.txt", "tables/link-to-f000"]
    assert "catalog/f011.txt" in planned["write"]
    assert tree_state(out) == damaged
    human = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--dry-run")
    words = " ".join(human.out.split())
    assert human.code == 4 and "remove stray" in words and "replace catalog/f011.txt" in words, human.out
    assert "would be refused" in human.err and tree_state(out) == damaged
    fixed = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", out, "--json",
                   "--delete-extra", "--overwrite").json()
    assert tree_state(out) == expected
    # Removed counts what the snapshot lacks, as the dry run lists it (the file replaced by a link is not).
    assert fixed["written_files"] == 1 and fixed["removed"] == len(planned["remove"]) == 2
    assert not (out / ".drsync-staging").exists()


def test_restore_refuses_another_cluster_or_release(drsync, tmp_path: Path, tree: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path)
    assert drsync("init", "--config", cfg).code == 0
    snap = drsync("snapshot", "create", "--config", cfg, "--json").json()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep me")
    before = tree_state(out)
    for kwargs, word in (({"cluster_id": "west"}, "cluster id 'east', this cluster is 'west'"),
                         ({"release": "6.3.0"}, "release '6.2.1', this cluster runs '6.3.0'")):
        other = write_config(tmp_path, name="other.toml", **kwargs)
        r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap["id"], "--config", other, "--target", out)
        assert r.code == 4, r.err
        assert word in r.err and "drsync backup create" in r.err
        assert r.err.count("\n") == 1
        assert tree_state(out) == before


def test_restore_of_corrupt_chunk_exits_3_and_changes_nothing(drsync, repo_url: str, tree: Path,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    snap = snapshot(drsync, repo_url, tree)
    storage = LocalStorage(repo_url)
    pack = max(storage.list(fmt.PACKS_DIR), key=lambda o: o.size)
    raw = bytearray(storage.read(pack.name))
    raw[1000] ^= 0x55
    storage.write(pack.name, bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    (out / "catalog").mkdir()
    (out / "catalog" / "f000.txt").write_text("old")
    before = tree_state(out)
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra", snap["id"], "--repo", repo_url, "--target", out)
    assert r.code == 3, r.err
    assert f"snapshot {snap['id']}: tables/orders/part-" in r.err and "does not match its hash" in r.err
    assert tree_state(out) == before
    v = drsync("repo", "verify", "--repo", repo_url)
    assert v.code == 3 and "tables/orders/part-" in v.err


def _rewrite_manifest(repo: str, snap_id: str, change) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(repo)
    m = Manifest.from_bytes(storage.read(fmt.manifest_name(snap_id)))
    data = change(m)
    storage.write(fmt.manifest_name(snap_id), data)
    import json

    doc = json.loads(storage.read(fmt.snapshot_name(snap_id)))
    doc["manifest_hash"] = blake3.blake3(data).hexdigest()
    storage.write(fmt.snapshot_name(snap_id), json.dumps(doc).encode())


def test_hostile_manifest_paths_are_refused(drsync, repo_url: str, tree: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for victim, evil, word in (("catalog/f000.txt", "../escaped.txt", "unsafe path"),
                               ("catalog/f001.txt", "/tmp/abs.txt", "unsafe path")):
        def change(m: Manifest, victim: str = victim, evil: str = evil) -> bytes:
            paths = m.pycolumn("path")
            paths[paths.index(victim)] = evil
            t = m.table.set_column(0, "path", pa.array([p.encode() for p in paths], pa.binary()))
            return Manifest(t).to_bytes()

        snap = snapshot(drsync, repo_url, tree)
        _rewrite_manifest(repo_url, snap["id"], change)
        out = tmp_path / "out"
        r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap["id"], "--repo", repo_url, "--target", out)
        assert r.code == 3 and word in r.err, r.err
        assert not out.exists() and not (tmp_path / "escaped.txt").exists()

    def link_out(m: Manifest) -> bytes:
        targets = m.pycolumn("target")
        paths = m.pycolumn("path")
        targets[paths.index("tables/link-to-f000")] = "../../../etc/passwd"
        idx = m.table.schema.get_field_index("target")
        new = pa.array([t and t.encode() for t in targets], pa.binary())
        return Manifest(m.table.set_column(idx, "target", new)).to_bytes()

    snap = snapshot(drsync, repo_url, tree)
    _rewrite_manifest(repo_url, snap["id"], link_out)
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
               snap["id"], "--repo", repo_url, "--target", tmp_path / "out2")
    assert r.code == 3 and "points outside the data root" in r.err


def test_truncated_manifest_is_reported(drsync, repo_url: str, tree: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(drsync, repo_url, tree)
    p = Path(repo_url) / "manifests" / f"{snap['id']}.parquet"
    p.write_bytes(p.read_bytes()[:100])
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
               snap["id"], "--repo", repo_url, "--target", tmp_path / "out")
    assert r.code == 3 and "manifest is damaged" in r.err
    assert not (tmp_path / "out").exists()


def test_bad_input_errors(drsync, tmp_path: Path, repo_url: str, tree: Path) -> None:  # type: ignore[no-untyped-def]
    # Missing repository.
    r = drsync("snapshot", "list", "--repo", tmp_path / "nowhere")
    assert r.code == 2 and "no drsync repository at" in r.err and "Traceback" not in r.err
    # Target that is a file.
    snap = snapshot(drsync, repo_url, tree)
    f = tmp_path / "afile"
    f.write_text("x")
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra", snap["id"], "--repo", repo_url, "--target", f)
    assert r.code == 2 and "is not a directory" in r.err and f.read_text() == "x"
    # Target below a file (or a link to one): exit 2, one line naming the file, nothing made.
    (tmp_path / "link-to-file").symlink_to(f)
    for below in (f / "sub", f / "sub" / "deeper", tmp_path / "link-to-file" / "sub"):
        r = drsync("snapshot", "restore", snap["id"], "--repo", repo_url, "--target", below)
        assert r.code == 2 and f"cannot be made: {below.parent if below.name == 'sub' else below.parent.parent} " \
            f"is not a directory" in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
        assert f.read_text() == "x"
    # Unknown config key and wrong type: exit 2, one line naming the key.
    cfg = write_config(tmp_path, extra="[snapshots]\nintervall = '1h'\n")
    r = drsync("snapshot", "list", "--config", cfg)
    assert r.code == 2 and "snapshots.intervall: unknown key" in r.err and r.err.count("\n") == 1
    cfg = write_config(tmp_path, extra="[replication]\ninterval = 5\nstandbys = 3\n")
    r = drsync("snapshot", "list", "--config", cfg)
    assert r.code == 2 and "replication.standbys" in r.err
    # Bad TTL, unknown snapshot, missing data root.
    assert drsync("snapshot", "create", "--repo", repo_url, "--source", tree, "--ttl", "soon").code == 2
    r = drsync("snapshot", "show", "nope", "--repo", repo_url)
    assert r.code == 2 and "no snapshot 'nope'" in r.err
    r = drsync("snapshot", "create", "--repo", repo_url, "--source", tmp_path / "missing")
    assert r.code == 2 and "does not exist" in r.err
    # Usage errors from the parser are exit 2 as well; --debug adds the traceback.
    assert drsync("snapshot", "restore").code == 2
    r = drsync("snapshot", "list", "--repo", tmp_path / "nowhere", "--debug")
    assert "Traceback" in r.err


def test_delete_and_ttl_expiry(drsync, repo_url: str, tree: Path) -> None:  # type: ignore[no-untyped-def]
    keep = snapshot(drsync, repo_url, tree, "--name", "keep")
    gone = snapshot(drsync, repo_url, tree, "--ttl", "0s")
    later = snapshot(drsync, repo_url, tree, "--ttl", "30d")
    listed = drsync("snapshot", "list", "--repo", repo_url)
    assert "expired" in listed.out
    dry = drsync("snapshot", "expire", "--repo", repo_url, "--json", "--dry-run").json()
    assert dry["deleted"] == [gone["id"]]
    assert len(drsync("snapshot", "list", "--repo", repo_url, "--json").json()) == 3
    res = drsync("snapshot", "expire", "--repo", repo_url, "--json").json()
    assert res["deleted"] == [gone["id"]]
    ids = [s["id"] for s in drsync("snapshot", "list", "--repo", repo_url, "--json").json()]
    assert ids == [keep["id"], later["id"]]
    d = drsync("snapshot", "delete", "keep", "--repo", repo_url, "--json")
    assert d.code == 0 and d.json()["deleted"] == [keep["id"]]
    assert drsync("repo", "verify", "--repo", repo_url).code == 0


def test_repository_inside_data_root_is_not_captured(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    (data / "x" / "f").write_text("payload")
    repo = data / ".drsync"
    assert drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    snap = drsync("snapshot", "create", "--repo", repo, "--source", data, "--json").json()
    entries = drsync("snapshot", "show", snap["id"], "--repo", repo, "--json", "--files").json()["entries"]
    assert sorted(e["path"] for e in entries) == ["x", "x/f"]


def test_progress_is_silent_when_stderr_is_not_a_terminal(drsync, repo_url: str, tree: Path) -> None:  # type: ignore[no-untyped-def]
    r = drsync("snapshot", "create", "--repo", repo_url, "--source", tree)
    assert r.code == 0 and r.err == ""


def test_truncated_pack_is_an_integrity_error(drsync, repo_url: str, tree: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snap = snapshot(drsync, repo_url, tree)
    storage = LocalStorage(repo_url)
    pack = max(storage.list(fmt.PACKS_DIR), key=lambda o: o.size)
    full = Path(repo_url) / pack.name
    full.write_bytes(full.read_bytes()[: pack.size // 2])
    v = drsync("repo", "verify", "--repo", repo_url, "--json")
    assert v.code == 3
    report = v.json()
    assert report["ok"] is False and any("trailer" in p or "truncated" in p for p in report["problems"])
    assert {d["snapshot"] for d in report["damaged_files"]} == {snap["id"]}
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
               snap["id"], "--repo", repo_url, "--target", tmp_path / "out")
    assert r.code == 3 and "truncated" in r.err
    assert not (tmp_path / "out").exists()


def test_progress_bar_only_on_a_terminal(repo_url: str, tree: Path) -> None:
    """With stderr on a pseudo-terminal a progress bar is drawn there; stdout stays clean JSON."""
    import json
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "create", "--repo", repo_url,
                             "--source", str(tree), "--json"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:
            break
        if not block:
            break
        drawn += block
    out, _ = proc.communicate()
    os.close(master)
    assert proc.returncode == 0
    assert json.loads(out)["files"] == 35
    assert b"snapshot" in drawn and "━".encode() in drawn  # the bar itself


STORAGE_PAIRS = [("local", "local"), ("hdfs", "hdfs"), ("local", "hdfs"), ("hdfs", "local")]


@pytest.mark.parametrize(("source", "target"), STORAGE_PAIRS, ids=[f"{a}-to-{b}" for a, b in STORAGE_PAIRS])
def test_snapshot_restore_and_delta_on_every_storage(drsync, tmp_path: Path, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                                     source: str, target: str) -> None:
    """Capture a data root on one storage (its repository beside it), restore onto another."""
    cluster = request.getfixturevalue("webhdfs") if "hdfs" in (source, target) else None
    src, dst = make_site(source, tmp_path / "src", cluster), make_site(target, tmp_path / "dst", cluster)
    src.make_tree("data")
    src.age("data")
    repo = src.url("repo")
    assert drsync("init", "--repo", repo, "--cluster-id", "east", "--release", "6.2.1").code == 0
    first = snapshot(drsync, repo, src.url("data"))
    assert first["files"] == 25 and first["new_bytes"] > 0
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
               first["id"], "--repo", repo, "--target", dst.url("out"), "--json")
    assert r.code == 0, r.err
    assert same_tree(src, "data", dst, "out")
    again = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   first["id"], "--repo", repo, "--target", dst.url("out"), "--json").json()
    assert again["written_files"] == 0, "unchanged files must be left alone across storages too"
    # Change the source; the next snapshot reads only what changed and restores as a delta.
    src.write("data", "catalog/f005.txt", b"edited")
    src.write("data", "catalog/new/added.txt", b"new file")
    src.remove("data", "catalog/f006.txt")
    src.chmod("data", "catalog/f007.txt", 0o600)
    second = snapshot(drsync, repo, src.url("data"))
    assert second["read_bytes"] < 10_000 and second["reused_files"] >= first["files"] - 3
    dst.write("out", "catalog/scribble.txt", b"not in the snapshot")
    fixed = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   second["id"], "--repo", repo, "--target", dst.url("out"), "--json").json()
    assert same_tree(src, "data", dst, "out")
    assert fixed["written_files"] == 2 and fixed["removed"] == 2
    assert not any(p.startswith(".drsync-staging") for p in dst.paths("out"))
    assert drsync("repo", "verify", "--repo", repo).code == 0


@pytest.mark.parametrize("target", ["local", "hdfs"])
def test_checksum_restore_finds_changes_hidden_behind_size_and_mtime(drsync, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                     request: pytest.FixtureRequest,
                                                                     target: str) -> None:
    cluster = request.getfixturevalue("webhdfs") if target == "hdfs" else None
    src, dst = make_site("local", tmp_path / "src", None), make_site(target, tmp_path / "dst", cluster)
    src.make_tree("data")
    repo = src.url("repo")
    assert drsync("init", "--repo", repo, "--cluster-id", "east", "--release", "6.2.1").code == 0
    snap = snapshot(drsync, repo, src.url("data"))["id"]
    assert drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                  snap, "--repo", repo, "--target", dst.url("out")).code == 0
    original = tmp_path / "src" / "data" / "catalog" / "f002.txt"
    dst.write("out", "catalog/f002.txt", b"X" * original.stat().st_size)  # same size ...
    dst.set_mtime("out", "catalog/f002.txt", original.stat().st_mtime_ns)  # ... and the same time
    plain = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", dst.url("out"), "--json").json()
    assert plain["written_files"] == 0 and not same_tree(src, "data", dst, "out")
    checked = drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                     snap, "--repo", repo, "--target", dst.url("out"), "--checksum",
                     "--json").json()
    assert checked["written_files"] == 1 and same_tree(src, "data", dst, "out")


def test_a_snapshot_create_loads_only_what_it_runs(tmp_path: Path) -> None:
    """The root group loads a command's module when it runs: a snapshot create (every few minutes on a
    busy root, where its start-up counts against the 1 s target) imports neither the agent, the group's
    commands nor the apply machinery; every listed command still loads, under its own name."""
    make_tree(tmp_path / "src", files=5)
    repo, src = str(tmp_path / "repo"), str(tmp_path / "src")
    code = "\n".join([
        "import json, sys",
        "from drsync.cli import main",
        f"assert main(['init', '--repo', {repo!r}, '--cluster-id', 'c1', '--release', '1']) == 0",
        f"assert main(['snapshot', 'create', '--repo', {repo!r}, '--source', {src!r}]) == 0",
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('drsync', 'grpc', 'kazoo')))))"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "drsync.capture" in loaded and "drsync.cli.snapshot" in loaded
    heavy = [m for m in loaded if m.startswith(("drsync.agent", "drsync.apply", "drsync.cli.agent",
                                                "drsync.cli.group", "drsync.cli.backup", "grpc", "kazoo"))]
    assert heavy == [], heavy
    from drsync.cli import COMMANDS, cli

    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    assert all((c := cli.get_command(ctx, name)) is not None and c.name == name for name in COMMANDS)
    assert cli.get_command(ctx, "no-such-command") is None


def test_counts_read_as_english_and_os_errors_carry_a_hint(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One file is "1 file"; an OS error a command cannot foresee names what to check."""
    import errno

    from drsync.fsutil import describe_os_error

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("x")
    assert drsync("init", "--repo", tmp_path / "repo", "--cluster-id", "c1", "--release", "1").code == 0
    r = drsync("snapshot", "create", "--repo", tmp_path / "repo", "--source", tmp_path / "one")
    assert r.code == 0 and ": 1 file, " in r.out, r.out
    r = drsync("repo", "verify", "--repo", tmp_path / "repo")
    assert r.code == 0 and "1 pack, 1 chunk, 1 snapshot verified" in r.out, r.out
    for code, words in ((errno.ENOTDIR, "is a file where a directory is needed"),
                        (errno.EISDIR, "is a directory where a file is needed"),
                        (errno.ELOOP, "is a symlink"), (errno.ENOSPC, "free some space")):
        line = str(describe_os_error(OSError(code, os.strerror(code), "/x/y"), "the restore"))
        assert line.startswith(f"the restore failed: /x/y: {os.strerror(code)}; ") and words in line, line
    line = str(describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "the operation"))
    assert line.startswith(f"the operation failed: {os.strerror(errno.ENOSPC)}; "), line  # no file: no "::"


def made_tree(src: Path) -> Path:
    """A tree of 1 file, 2 directories, 1 symlink and 3 hard links to the file (what a restore makes)."""
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_text("x")
    for i in range(3):
        os.link(src / "d" / "f", src / f"h{i}")
    os.symlink("d/f", src / "s")
    return src


def test_the_restore_summary_counts_what_it_made_besides_files(drsync, repo_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A restore of a backup tree is mostly hard links and directories: the summary counts them (it counted
    only the files written, so half a million hard links restored read as nothing)."""
    src = made_tree(tmp_path / "src")
    assert drsync("snapshot", "create", "--repo", repo_url, "--source", str(src), "--name", "s").code == 0
    r = drsync("snapshot", "restore", "s", "--repo", repo_url, "--target", str(tmp_path / "t"))
    assert r.code == 0, r.err
    assert "1 file written (1 B), 2 directories, 1 symlink, 3 hard links made, 0 unchanged, 0 removed" in r.out
    r = drsync("snapshot", "restore", "s", "--repo", repo_url, "--target", str(tmp_path / "t2"), "--json")
    assert (r.json()["made_dirs"], r.json()["made_symlinks"], r.json()["made_hardlinks"]) == (2, 1, 3)
    r = drsync("snapshot", "restore", "s", "--repo", repo_url, "--target", str(tmp_path / "t"))
    assert r.code == 0 and " made" not in r.out


def test_a_capture_of_the_repository_itself_is_refused(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Breaker s56b: ``--repo X --source X`` (or another spelling of X) captured the repository into itself, its
    packs read while they were written. Refused: exit 2, one line, nothing captured."""
    repo = tmp_path / "r"
    assert drsync("init", "--repo", str(repo), "--cluster-id", "c", "--release", "1").code == 0
    os.symlink(repo, tmp_path / "alias")
    for source in (repo, tmp_path / "alias", f"{tmp_path}/alias/."):
        r = drsync("snapshot", "create", "--repo", str(repo), "--source", str(source))
        assert r.code == 2 and "is the data root itself" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert drsync("snapshot", "list", "--repo", str(repo), "--json").json() == []
