"""Breaker findings (stop 27): `repo verify` and `backup verify` on a repository or backup whose
index file is damaged (not deleted), and `repo verify` on a repository with one damaged snapshot
document. Real CLI processes, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import init_repo, init_repo_at, run_drsync


def _repo_two_snapshots(tmp_path: Path) -> Path:
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    shared = os.urandom(200_000)
    (src / "a").write_bytes(shared)
    (src / "b").write_bytes(os.urandom(1000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    (src / "c").write_bytes(shared)
    (src / "a").unlink()
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s2").code == 0
    return repo


def test_repo_verify_names_files_when_an_index_file_is_damaged(tmp_path: Path) -> None:
    """Deleting the index file gives a full report (every file per snapshot); truncating it must
    too. Actual: exit 3 with one line 'index file ... is damaged ...; run 'drsync repo verify''
    (the very command that was run), nothing on stdout with --json, no file named."""
    repo = _repo_two_snapshots(tmp_path)
    index = sorted((repo / "index").iterdir())
    assert index
    for f in index:
        os.truncate(f, 20)
    r = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert r.code == 3, (r.code, r.err)
    assert "Traceback" not in r.err
    assert "run 'drsync repo verify'" not in r.err, f"repo verify tells the operator to run itself: {r.err}"
    doc = json.loads(r.out)  # one JSON document on stdout, as with a deleted index file
    assert doc["ok"] is False
    named = {(f["snapshot"], f["path"]) for f in doc["damaged_files"]}
    paths = {p for _, p in named}
    assert {"a", "b", "c"} <= paths or any(index[0].name in p for p in doc["problems"]), doc


def test_backup_verify_json_report_when_an_index_file_is_damaged(tmp_path: Path) -> None:
    """A backup with a truncated index file: verify must give its JSON report (damaged backup files
    named, as for a deleted index file). Actual: no JSON, one line pointing at 'drsync repo verify',
    which fails the same way."""
    repo = _repo_two_snapshots(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s2", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    bk = Path(r.json()["path"])
    for f in (bk / "index").iterdir():
        os.truncate(f, 20)
    v = run_drsync("backup", "verify", bk, "--json")
    assert v.code == 3, (v.code, v.err)
    doc = json.loads(v.out)
    assert doc["ok"] is False
    assert any(d["file"].startswith("index/") for d in doc["damaged_backup_files"]), doc


def test_repo_verify_damaged_snapshot_document_does_not_hide_other_damage(tmp_path: Path) -> None:
    """One damaged snapshot document must be reported as a problem while the rest of the repository
    is still verified (the damaged chunk of s2's file 'c' named). Actual: repo verify stops at the
    document (exit 3, one line, nothing on stdout with --json), no file named."""
    repo = _repo_two_snapshots(tmp_path)
    docs = sorted((repo / "snapshots").glob("*.json"), key=lambda p: json.loads(p.read_text())["seq"])
    os.truncate(docs[0], 5)  # s1's document
    for pack in (repo / "packs").rglob("*.pack"):
        b = bytearray(pack.read_bytes())
        b[100] ^= 1
        pack.write_bytes(bytes(b))
    r = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert r.code == 3, (r.code, r.err)
    assert "Traceback" not in r.err
    doc = json.loads(r.out)
    assert doc["problems"], doc
    assert "c" in {f["path"] for f in doc["damaged_files"]}, doc


def test_light_backup_excluding_first_hard_link_member_restores(tmp_path: Path) -> None:
    """A light backup leaving out bulk/** where bulk/x is hard-linked to keep/x and keep/y (bulk/x
    first in path order): create and verify succeed ("intact"), so restore must give back keep/x and
    keep/y with their bytes (linked to each other). Actual: backup restore exits 3 'keep/x: hard link
    to bulk/x, which is not another file of the snapshot without a link of its own' — a backup that
    verifies as intact and cannot be restored."""
    src, repo = tmp_path / "src", tmp_path / "repo"
    (src / "bulk").mkdir(parents=True)
    (src / "keep").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{src}"\nrepository = "{repo}"\n'
                   f'[backups]\nlight_exclude = ["bulk/**"]\n')
    init_repo(cfg)
    data = os.urandom(100_000)
    (src / "bulk" / "x").write_bytes(data)
    os.link(src / "bulk" / "x", src / "keep" / "x")
    os.link(src / "bulk" / "x", src / "keep" / "y")
    assert run_drsync("snapshot", "create", "--config", cfg, "--name", "s1").code == 0
    r = run_drsync("backup", "create", "--config", cfg, "--snapshot", "s1", "--dest", tmp_path / "bk",
                   "--mode", "light", "--json")
    assert r.code == 0, r.err
    bk = r.json()["path"]
    v = run_drsync("backup", "verify", bk)
    assert v.code == 0, v.err  # verify calls it intact ...
    target = tmp_path / "restored"
    rr = run_drsync("backup", "restore", bk, "--target", target)
    assert rr.code == 0, f"verified-intact light backup does not restore: {rr.err}"  # ... so it must restore
    assert not (target / "bulk" / "x").exists()
    assert (target / "keep" / "x").read_bytes() == data and (target / "keep" / "y").read_bytes() == data
    assert os.stat(target / "keep" / "x").st_ino == os.stat(target / "keep" / "y").st_ino


def _full_backup(tmp_path: Path) -> Path:
    repo = _repo_two_snapshots(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s2", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    return Path(r.json()["path"])


def test_backup_verify_names_truncated_snapshot_document(tmp_path: Path) -> None:
    """Deleting the backup's snapshot document gives the JSON report naming it ('missing'); truncating
    it must too (its checksum in CHECKSUMS.b3 no longer matches). Actual: exit 3 with one line
    'snapshot snapshots/<id>.json is damaged: Expecting ...', nothing on stdout with --json."""
    bk = _full_backup(tmp_path)
    doc_file = next((bk / "snapshots").glob("*.json"))
    os.truncate(doc_file, 10)
    v = run_drsync("backup", "verify", bk, "--json")
    assert v.code == 3, (v.code, v.err)
    doc = json.loads(v.out)
    assert {"file": f"snapshots/{doc_file.name}", "reason": "checksum mismatch"} in doc["damaged_backup_files"], doc


def test_backup_verify_missing_config_is_damage_not_usage_error(tmp_path: Path) -> None:
    """A backup whose config.json was deleted is a damaged backup: exit 3 naming config.json (it is
    listed in CHECKSUMS.b3). Actual: exit 2 'no drsync repository at ...; create one with
    'drsync init'' — a usage error, and advice to init a repository inside the backup."""
    bk = _full_backup(tmp_path)
    (bk / "config.json").unlink()
    v = run_drsync("backup", "verify", bk, "--json")
    assert "drsync init" not in v.err, v.err
    assert v.code == 3, (v.code, v.err)
    assert any(d["file"] == "config.json" for d in json.loads(v.out)["damaged_backup_files"])


def test_snapshot_diff_text_lines_are_distinct_for_distinct_paths(tmp_path: Path) -> None:
    """The text form of 'snapshot diff' shows non-UTF-8 bytes as \\xNN (docs/FORMAT.md) but does not
    escape a literal backslash, so the file named 'lit' + byte 0xff and the file named 'lit\\xff'
    (backslash, x, f, f) print as the same line; likewise a real newline and a literal '\\n'. Two
    added paths must give two different lines. Actual: '+ lit\\xff' twice, '+ nl\\nM' twice."""
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    (src / "keep").write_bytes(b"k")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    root = os.fsencode(src)
    for name in (b"lit\xff", b"lit\\xff", b"nl\nM", b"nl\\nM"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"q")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s2").code == 0
    j = run_drsync("snapshot", "diff", "s1", "s2", "--repo", repo, "--json")
    assert j.code == 0 and len(j.json()["added"]) == 4  # JSON tells them apart
    r = run_drsync("snapshot", "diff", "s1", "s2", "--repo", repo)
    assert r.code == 0, r.err
    lines = [line for line in r.out.splitlines() if line.startswith("+ ")]
    assert len(lines) == 4 and len(set(lines)) == 4, lines


def _light_backup(tmp_path: Path, globs: str, build) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir(parents=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{src}"\nrepository = "{repo}"\n'
                   f'[backups]\nlight_exclude = {globs}\n')
    init_repo(cfg)
    build(src)
    assert run_drsync("snapshot", "create", "--config", cfg, "--name", "s1").code == 0
    r = run_drsync("backup", "create", "--config", cfg, "--snapshot", "s1", "--dest", tmp_path / "bk",
                   "--mode", "light", "--json")
    assert r.code == 0, r.err
    return src, r.json()["path"]


def test_light_backup_excluding_a_directory_glob_restores(tmp_path: Path) -> None:
    """light_exclude = ["bulk"] (a directory with a subdirectory): create and verify succeed
    ("intact"), so restore must give back the rest of the tree (keep/x). Actual: backup restore
    exits 3 'bulk/deep has no parent directory entry 'bulk'' and restores nothing; the same with
    ["bulk/*"] ('bulk/deep/y.dat has no parent directory entry 'bulk/deep'')."""
    def build(src: Path) -> None:
        (src / "bulk" / "deep").mkdir(parents=True)
        (src / "bulk" / "deep" / "y").write_bytes(b"bulk data")
        (src / "keep").mkdir()
        (src / "keep" / "x").write_bytes(b"keep me")

    for i, globs in enumerate(('["bulk"]', '["bulk/*"]')):
        _src, bk = _light_backup(tmp_path / str(i), globs, build)
        v = run_drsync("backup", "verify", bk)
        assert v.code == 0, v.err  # verify calls it intact ...
        target = tmp_path / str(i) / "restored"
        rr = run_drsync("backup", "restore", bk, "--target", target)
        assert rr.code == 0, f"{globs}: verified-intact light backup does not restore: {rr.err}"  # ... so it must
        assert (target / "keep" / "x").read_bytes() == b"keep me"


def test_repo_verify_catches_index_that_disagrees_with_packs(tmp_path: Path) -> None:
    """docs/FORMAT.md: 'the index can be rebuilt from the packs alone, and repo verify checks that the
    two agree'. An index file whose two entries have their offsets swapped (a valid Parquet file):
    restore and backup create fail with 'chunk ... does not match its hash', so repo verify must
    report it (exit 3, files a and b named). Actual: repo verify exit 0, ok, nothing named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    (src / "a").write_bytes(os.urandom(5000))
    (src / "b").write_bytes(os.urandom(5000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    (index,) = list((repo / "index").iterdir())
    t = pq.read_table(index)
    rows = t.to_pylist()
    assert len(rows) == 2
    rows[0]["offset"], rows[1]["offset"] = rows[1]["offset"], rows[0]["offset"]
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), index)
    # The repository is now unusable:
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", tmp_path / "t")
    assert r.code == 3 and "does not match its hash" in r.err, (r.code, r.err)
    # ... and verify must say so.
    v = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert v.code == 3, f"repo verify passes a repository that cannot be restored: {v.code} {v.out}"
    assert {f["path"] for f in v.json()["damaged_files"]} == {"a", "b"}, v.out


def test_backup_verify_catches_index_that_disagrees_with_packs(tmp_path: Path) -> None:
    """A backup whose index (as its own writer could have produced it: CHECKSUMS.b3 agrees with it)
    gives the two chunks each other's offsets: 'backup verify' must not call it intact, since
    'backup restore' then fails. Actual: 'is intact (2 chunks verified)', exit 0; restore exit 3.
    (Relevant to the new export writer that flushes index files itself: verify would not notice
    wrong offsets it wrote.)"""
    import blake3
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    src = tmp_path / "src"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    (src / "a").write_bytes(os.urandom(5000))
    (src / "b").write_bytes(os.urandom(5000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    bk = Path(r.json()["path"])
    (index,) = list((bk / "index").iterdir())
    t = pq.read_table(index)
    rows = t.to_pylist()
    rows[0]["offset"], rows[1]["offset"] = rows[1]["offset"], rows[0]["offset"]
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), index)
    rel = f"index/{index.name}"
    digest = blake3.blake3(index.read_bytes()).hexdigest()
    sums = bk / "CHECKSUMS.b3"
    sums.write_text("".join(f"{digest}  {rel}\n" if line.endswith("  " + rel) else line + "\n"
                            for line in sums.read_text().splitlines()))
    rr = run_drsync("backup", "restore", bk, "--target", tmp_path / "t")
    assert rr.code == 3 and "does not match its hash" in rr.err, (rr.code, rr.err)
    v = run_drsync("backup", "verify", bk)
    assert v.code == 3, f"backup verify calls an unrestorable backup intact: {v.out}"


def test_automatic_failover_behind_standby_does_not_preempt_fencing_up_to_date_one(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """README: 'the most up-to-date standby within the lag limit runs fence_command and, when it
    succeeded, promotes itself'; fence_timeout is 60s. Three agents, automatic failover; north is held
    back (SIGSTOP) while production writes newfile.txt, which west applies; the primary is killed -9.
    West, live and most up to date, starts fencing; its fence takes 20s (a slow fencing device, well
    within fence_timeout). Expected: west becomes primary at epoch 2, with newfile.txt. Actual: after
    ~10s north, which lacks newfile.txt, promotes itself ('primary gone for 11.1s, lag 14.3s') and
    west logs 'automatic failover abandoned: the group changed while fencing' — the behind standby
    wins and the write is lost."""
    import signal

    from tests.group import wait_for
    from tests.test_failover import bootstrap

    fence = ('fence_timeout = "120s"\nfence_command = "[ \\"$DRSYNC_AGENT\\" != west ] || sleep 20"\n')
    g = make_group(["east", "west", "north"], session_timeout="2s", failover="automatic",
                   extra='failover_cooldown = "0s"\n' + fence)
    bootstrap(g)
    wait_for(lambda: all(g.record(n).get("role") == "standby" and g.record(n).get("applied_snapshot")
                         for n in ("west", "north")), "both standbys caught up")
    g.procs["north"].send_signal(signal.SIGSTOP)
    (g.data["east"] / "newfile.txt").write_text("written on production before the crash\n")
    wait_for(lambda: (g.data["west"] / "newfile.txt").exists() and g.in_sync("east", "west"), "west to apply it")
    wait_for(lambda: g.record("west").get("applied_snapshot") != g.record("north").get("applied_snapshot"),
             "west to report the newer snapshot")
    g.kill("east")
    g.procs["north"].send_signal(signal.SIGCONT)
    wait_for(lambda: (g.primary() or ("", 0))[1] >= 2, "a new primary", timeout=60)
    new = g.primary()
    assert not (g.data["north"] / "newfile.txt").exists() or new == ("west", 2)
    assert new == ("west", 2), (f"{new} promoted while west (most up to date) was fencing; west's log: "
                                f"{[ln for ln in g.log('west').splitlines() if 'failover' in ln][-2:]}")
    assert (g.data["west"] / "newfile.txt").exists()
