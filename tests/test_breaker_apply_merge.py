"""Breaker tests for the merged apply plan (restores and the standby's apply at scale).

Each test is a fault found by attacking the promises of restores (snapshot restore, backup restore):
the target equals the snapshot whatever it held, drsync's own files inside the target are left alone,
--dry-run lists what the real run then does, counts are right, hostile manifests are refused or handled
safely. Everything runs the real CLI in a subprocess.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_drsync

# ----------------------------------------------------------------------------------------------- helpers


def drs(*args: object) -> tuple[int, dict | None, str]:
    r = run_drsync(*[os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])
    try:
        doc = json.loads(r.out) if r.out.strip() else None
    except ValueError:
        doc = None
    return r.code, doc, r.err


def tree(root: Path, skip: tuple[str, ...] = (".drsync-staging",)) -> dict[bytes, tuple]:
    """Every path below root: type, mode, size, mtime, content hash, link target, xattrs (own walk)."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dp, dns, fns in os.walk(base):
        rel_dir = os.path.relpath(dp, base)
        if rel_dir == b".":
            dns[:] = [d for d in dns if os.fsdecode(d) not in skip]
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, base)
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISREG(m):
                out[rel] = ("file", stat.S_IMODE(m), st.st_size, st.st_mtime_ns,
                            hashlib.sha256(Path(os.fsdecode(p)).read_bytes()).hexdigest(),
                            tuple(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p))))
            elif stat.S_ISLNK(m):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(m):
                out[rel] = ("dir", stat.S_IMODE(m))
            else:
                out[rel] = ("other", stat.S_IFMT(m))
    return out


def snapshot(tmp: Path, src: Path, cluster: str = "c1", repo: Path | None = None) -> Path:
    repo = repo or tmp / f"repo-{cluster}"
    if not (repo / "config.json").exists():
        code, _, err = drs("init", "--repo", repo, "--cluster-id", cluster, "--release", "1")
        assert code == 0, err
    code, _, err = drs("snapshot", "create", "--repo", repo, "--source", src)
    assert code == 0, err
    return repo


def counts(doc: dict) -> dict:
    return {k: doc[k] for k in ("written_files", "unchanged_files", "removed")}


def files_of(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------- drsync's own files inside the target (promise 1)


def _cluster_with_repo_inside(tmp: Path) -> tuple[Path, Path, Path]:
    """Cluster 'ca' whose repository lives inside its data root (data/.drsync), and its config."""
    data = tmp / "A"
    (data / "tables").mkdir(parents=True)
    (data / "tables" / "x").write_text("cluster A's data\n")
    repo = data / ".drsync"
    snapshot(tmp, data, "ca", repo=repo)
    cfg = tmp / "ca.toml"
    cfg.write_text(f'[cluster]\nid = "ca"\nrelease = "1"\ndata = "{data}"\nrepository = "{repo}"\n')
    assert (repo / "config.json").exists()
    return data, repo, cfg


def _backup_of(tmp: Path, src: Path, cluster: str) -> Path:
    repo = snapshot(tmp, src, cluster)
    dest = tmp / f"backups-{cluster}"
    code, _, err = drs("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", dest)
    assert code == 0, err
    (bk,) = [p for p in dest.iterdir() if p.is_dir()]
    return bk


def test_backup_restore_onto_data_root_keeps_the_repository_inside_it(tmp_path: Path) -> None:
    """A backup (of any cluster) restored onto this cluster's data root, with --config naming that root and its
    repository inside it, must leave the repository alone. It is removed as an 'extra' path instead."""
    data, repo, cfg = _cluster_with_repo_inside(tmp_path)
    before = files_of(repo)
    other = tmp_path / "C"
    (other / "tables").mkdir(parents=True)
    (other / "tables" / "x").write_text("cluster C's data\n")
    bk = _backup_of(tmp_path, other, "cc")

    code, doc, err = drs("backup", "restore", bk, "--config", cfg, "--target", data, "--json")
    assert (data / "tables" / "x").read_text() == "cluster C's data\n" or code != 0
    assert repo.is_dir(), f"the cluster's repository inside the data root was removed (exit {code}, {doc}, {err})"
    assert files_of(repo) == before


def test_backup_restore_with_explicit_flags_keeps_a_repository_inside_the_target(tmp_path: Path) -> None:
    """Same with a foreign target and --overwrite --delete-extra: the repository at <target>/.drsync is a drsync
    repository inside the target and must be 'neither written nor removed' (docs/FORMAT.md)."""
    data, repo, _ = _cluster_with_repo_inside(tmp_path)
    before = files_of(repo)
    other = tmp_path / "C"
    (other / "tables").mkdir(parents=True)
    (other / "tables" / "x").write_text("cluster C's data\n")
    bk = _backup_of(tmp_path, other, "cc")

    code, doc, err = drs("backup", "restore", bk, "--target", data, "--json", "--overwrite", "--delete-extra")
    assert repo.is_dir(), f"repository removed (exit {code}, {doc}, {err})"
    assert files_of(repo) == before


def test_backup_restore_does_not_write_into_a_repository_inside_the_target(tmp_path: Path) -> None:
    """A backup whose tree has paths under .drsync/ (a config.json, a snapshot document, new files) restored onto a
    data root holding this cluster's repository there: the repository must be neither written nor removed
    (or the restore refused). Instead its config.json is replaced, its packs, index and manifests removed and
    a forged snapshot document planted."""
    data, repo, cfg = _cluster_with_repo_inside(tmp_path)
    before = files_of(repo)
    other = tmp_path / "B"
    (other / ".drsync" / "snapshots").mkdir(parents=True)
    (other / ".drsync" / "config.json").write_text('{"evil": 1}\n')
    (other / ".drsync" / "snapshots" / "fake.json").write_text("{}\n")
    (other / ".drsync" / "newfile").write_text("n\n")
    (other / "tables").mkdir()
    (other / "tables" / "x").write_text("cluster B's data\n")
    bk = _backup_of(tmp_path, other, "cb")

    code, doc, err = drs("backup", "restore", bk, "--config", cfg, "--target", data, "--json")
    assert files_of(repo) == before, f"repository inside the target changed (exit {code}, {doc}, {err})"


# -------------------------------------------------------------------- --dry-run vs the real run (promise 2, 4)


def test_dry_run_lists_removals_under_a_directory_replaced_by_a_file(tmp_path: Path) -> None:
    """Target has a directory f/ (with files) where the snapshot has a file f. The real run removes what is
    under f/ and reports removed=2; --dry-run lists no removal and says removed=0."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_text("x\n")
    (src / "d" / "g").write_text("y\n")
    repo = snapshot(tmp_path, src)
    t = tmp_path / "t"
    (t / "f" / "sub").mkdir(parents=True)
    (t / "f" / "sub" / "a").write_text("1\n")
    (t / "f" / "b").write_text("2\n")

    args = ("snapshot", "restore", "latest", "--repo", repo, "--target", t, "--json", "--overwrite", "--delete-extra")
    code, dry, err = drs(*args, "--dry-run")
    assert code == 0, err
    code, real, err = drs(*args)
    assert code == 0, err
    assert tree(t) == tree(src)
    assert counts(dry) == counts(real), (dry["planned"], real)
    assert len(dry["planned"]["remove"]) >= real["removed"], dry["planned"]


def test_dry_run_lists_hard_links_made_with_new_files(tmp_path: Path) -> None:
    """A restore that writes a new file and hard-links two more paths to it: --dry-run's planned.link is empty
    and the two links appear nowhere in planned, yet the real run makes them."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "one").write_text("one\n")
    os.link(src / "d" / "one", src / "d" / "two")
    os.link(src / "d" / "one", src / "three")
    repo = snapshot(tmp_path, src)
    t = tmp_path / "t"
    code, dry, err = drs("snapshot", "restore", "latest", "--repo", repo, "--target", t, "--json", "--dry-run")
    assert code == 0, err
    code, _, err = drs("snapshot", "restore", "latest", "--repo", repo, "--target", t, "--json")
    assert code == 0, err
    assert os.stat(t / "three").st_nlink == 3
    listed = {p for v in dry["planned"].values() for p in v}
    assert {"d/two", "three"} <= listed, dry["planned"]


def _two_versions(tmp: Path) -> tuple[Path, Path, Path]:
    v1, v2 = tmp / "v1", tmp / "v2"
    for v, tag in ((v1, b"1"), (v2, b"2")):
        for d in range(10):
            (v / f"d{d}").mkdir(parents=True)
            for i in range(150):
                if tag == b"2" and i % 5 == 0:
                    continue  # v2 lacks every fifth file
                p = v / f"d{d}" / f"f{i:03}"
                mine = tag if i % 3 == 0 else b"1"
                p.write_bytes(b"%s-%d-%d " % (mine, d, i) * 40)
                os.utime(p, ns=(0, 10**18 + d * 1000 + i + int(mine) * 7))
    repo = tmp / "repo"
    drs("init", "--repo", repo, "--cluster-id", "k", "--release", "1")
    for v in (v1, v2):
        code, _, err = drs("snapshot", "create", "--repo", repo, "--source", v, "--name", v.name)
        assert code == 0, err
    return v1, v2, repo


def _interrupt_after_journal(repo: Path, snap: str, t: Path) -> None:
    env = {**os.environ}
    p = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "restore", snap, "--repo", str(repo),
                          "--target", str(t), "--json", "--overwrite", "--delete-extra"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    journal = t / ".drsync-staging" / "journal.json"
    deadline = time.time() + 120
    while not journal.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if not journal.exists():
        pytest.skip("could not interrupt the restore after its journal was written")


@pytest.mark.parametrize("second", ["v1", "v2"])
def test_dry_run_after_an_interrupted_restore_matches_the_real_run(tmp_path: Path, second: str) -> None:
    """A restore of v2 is killed after its journal is written. --dry-run of the next restore (v1 or v2) plans
    against the half-committed target, but the real run first completes the interrupted apply: the counts
    differed wildly and nothing said so (e.g. dry-run v2: written 507, removed 220; real v2: written 0,
    removed 0). A dry run cannot complete the journal (it changes nothing), so it now says that an
    interrupted apply is pending and that the real run completes it first; once it is completed, the dry
    run and the real run agree. The final tree is right."""
    v1, v2, repo = _two_versions(tmp_path)
    t = tmp_path / "t"
    code, _, err = drs("snapshot", "restore", "v1", "--repo", repo, "--target", t)
    assert code == 0, err
    _interrupt_after_journal(repo, "v2", t)
    args = ("snapshot", "restore", second, "--repo", repo, "--target", t, "--json", "--overwrite", "--delete-extra")
    code, dry, err = drs(*args, "--dry-run")
    assert code == 0, err
    assert any("interrupted apply" in w for w in dry["warnings"]), dry["warnings"]
    code, real, err = drs(*args)
    assert code == 0, err
    assert tree(t) == tree(v1 if second == "v1" else v2)
    # Completed: a dry run of the other version now says what its real run then does.
    other = ("v2" if second == "v1" else "v1",)
    args = ("snapshot", "restore", *other, "--repo", repo, "--target", t, "--json", "--overwrite", "--delete-extra")
    code, dry, err = drs(*args, "--dry-run")
    assert code == 0 and not any("interrupted" in w for w in dry["warnings"]), err
    code, real, err = drs(*args)
    assert code == 0, err
    assert counts(dry) == counts(real)


# ------------------------------------------------------------------------------ hostile manifests (promise 5)


def _edit_manifest(repo: Path, edit) -> None:
    import blake3
    import pyarrow as pa
    import pyarrow.parquet as pq

    (mf,) = glob.glob(str(repo / "manifests" / "*.parquet"))
    table = pq.read_table(mf)
    rows = edit([dict(r) for r in table.to_pylist()])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), mf)
    (sj,) = glob.glob(str(repo / "snapshots" / "*.json"))
    st = os.stat(sj)
    doc = json.loads(Path(sj).read_text())
    doc["manifest_hash"] = blake3.blake3(Path(mf).read_bytes()).hexdigest()
    Path(sj).write_text(json.dumps(doc))
    os.utime(sj, ns=(st.st_atime_ns, st.st_mtime_ns))


def _hostile_link(tmp: Path, member: bytes, first: bytes) -> tuple[Path, Path]:
    src = tmp / "src"
    src.mkdir()
    for n in ("a", "b", "c"):
        (src / n).write_text(f"content of {n}\n")
    repo = snapshot(tmp, src)

    def edit(rows):
        for r in rows:
            if r["path"] == member:
                r["hardlink"] = first
        return rows

    _edit_manifest(repo, edit)
    return src, repo


@pytest.mark.parametrize("member,first", [(b"c", b"b"), (b"a", b"b")],
                         ids=["member-content-differs-from-group", "link-to-a-later-path"])
def test_hostile_hard_link_row_is_refused_or_restored_as_its_row_says(tmp_path: Path, member: bytes,
                                                                      first: bytes) -> None:
    """A manifest whose row for `member` names `first` as its hard-link group although its own chunks (content)
    differ, or names a path that sorts after it (FORMAT.md: the group's FIRST path in byte order). drsync reads
    it, `repo verify` calls it intact, and a restore silently makes `member` a link to `first`: a target where
    every file was right gets `member` overwritten with another file's bytes."""
    src, repo = _hostile_link(tmp_path, member, first)
    t = tmp_path / "t"
    subprocess.run(["cp", "-a", str(src), str(t)], check=True)  # a target already equal to every row
    code, _, err = drs("snapshot", "restore", "latest", "--repo", repo, "--target", t, "--json", "--overwrite",
                       "--delete-extra")
    assert code in (0, 3), err
    if code == 3:
        return  # refused as damaged: fine
    for n in ("a", "b", "c"):
        assert (t / n).read_text() == f"content of {n}\n", f"{n} does not hold its row's content (exit {code})"
