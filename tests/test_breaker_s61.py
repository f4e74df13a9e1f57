"""Breaker session 61: a repository that lost chunks (9b157bb): a standby's self-healing commit, ``drsync repo
repair`` and ``repaired.json``, tried from the outside.

Each test either guards one of the feature's promises (it held) or pins a fault this breaker found (named in
its docstring as Fn; each of those fails on 9b157bb).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.test_lost_chunks import _figures, _once, _standby_repo


def _repo_state(repo: Path) -> dict[str, bytes | str]:
    """Every entry of a repository but its locks: what "changes nothing" compares."""
    out: dict[str, bytes | str] = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo).as_posix()
        if rel.startswith("locks"):
            continue
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else ("dir" if p.is_dir() else "other")
    return out


def _plain_repo(tmp: Path, snapshots: int = 2, files: int = 3) -> tuple[Path, Path]:
    """A repository with ``snapshots`` snapshots, each adding ``files`` files of its own (so each snapshot's
    new chunks sit in their own pack and index file); the files' times are a second older than each capture
    (so a later capture trusts them)."""
    repo, data = tmp / "repo", tmp / "data"
    data.mkdir()
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    rnd = random.Random(4)
    for s in range(snapshots):
        for i in range(files):
            p = data / f"s{s}-{i}.bin"
            p.write_bytes(rnd.randbytes(200_000))
            os.utime(p, (time.time() - 5, time.time() - 5))
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
        assert r.code == 0, r.err
    return repo, data


def _standby_pack_of(p: Pair, data: bytes) -> Path:
    """The standby's pack file holding ``data`` stored as one chunk (under the 1 MiB maximum, random bytes)."""
    from drsync.repository import chunks

    standby = Repository.open(open_storage(str(_standby_repo(p))))
    loc = standby.index.get(chunks.chunk_id(data))
    assert loc is not None
    return _standby_repo(p) / fmt.pack_name(loc.pack_id)


def _newest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: p.stat().st_mtime_ns)


# --- faults ------------------------------------------------------------------------------------------


def test_s61_a_standby_that_lost_a_pack_with_its_index_file_gets_it_back_after_repo_repair(pair: Pair) -> None:  # noqa: F811
    """F2 (high). A standby lost one shipment's pack and the index file naming it (both on the disk that
    died). Its snapshots name a chunk of a file production still has. docs/operations.md §11 says: run
    ``drsync repo repair`` for a lost index file, the next shipment checks every chunk and the primary sends
    back what the snapshot needs. On 9b157bb the repair says "nothing lost, nothing to forget", writes no
    repaired.json (it only marks snapshots when it drops rows now), the standby keeps committing snapshots
    that name a chunk it does not hold, and ``repo verify`` on the standby fails for good."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    lonely = pair.prod / "catalog" / "lonely.bin"
    lonely.write_bytes(random.Random(7).randbytes(70_000))
    index_before = set(os.listdir(_standby_repo(pair) / "index"))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    new_index = set(os.listdir(_standby_repo(pair) / "index")) - index_before
    assert len(new_index) == 1
    _standby_pack_of(pair, lonely.read_bytes()).unlink()
    (_standby_repo(pair) / "index" / new_index.pop()).unlink()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 3
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg, "--json")
    assert r.code == 0, r.err
    for i in range(2):
        (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change elsewhere %d" % i)
        doc = _once(pair.primary_cfg)
        assert doc["code"] == 0, doc
    assert pair.in_sync()
    verify = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert verify.code == 0, f"the standby still lacks lonely.bin's chunk: {verify.out[-600:]}{verify.err[-600:]}"


def test_s61_repair_keeps_naming_the_snapshots_a_repair_left_incomplete(tmp_path: Path) -> None:
    """F1 (medium). ``repo repair`` forgot a lost pack whose file production deleted: snapshot 2 stays
    incomplete (verify exits 3 naming it; GC refuses). Run again (or after a standby healed itself), the
    repair reports "nothing lost, nothing to forget (0 other problems ...)" and ``incomplete_snapshots: []``
    while verify still finds that snapshot incomplete: the report that should tell the operator which
    snapshots to restore or delete names none once the chunks were forgotten."""
    repo, data = _plain_repo(tmp_path)
    newest_pack = _newest(list((repo / "packs").rglob("*.pack")))
    newest_pack.unlink()
    for p in data.glob("s1-*"):
        p.unlink()  # production no longer has those files: nobody sends their chunks back
    first = run_drsync("repo", "repair", "--repo", repo, "--json")
    assert first.code == 0, first.err
    incomplete = first.json()["incomplete_snapshots"]
    assert len(incomplete) == 1
    assert run_drsync("repo", "verify", "--repo", repo).code == 3
    again = run_drsync("repo", "repair", "--repo", repo, "--dry-run", "--json")
    assert again.code == 0, again.err
    assert again.json()["incomplete_snapshots"] == incomplete, again.out


def test_s61_a_standby_with_a_truncated_pack_is_told_to_run_repo_repair(pair: Pair) -> None:  # noqa: F811
    """F3 (medium). A pack truncated (not deleted) on the standby: every shipment whose changed file reuses a
    chunk of it is refused ("pack … is truncated; nothing was changed"), forever, with no word of what to do.
    The standby does not heal by itself (only a deleted pack does); the refusal must at least name
    ``drsync repo repair``, which does fix it (checked after)."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    (pair.prod / "catalog" / "lonely.bin").write_bytes(random.Random(7).randbytes(70_000))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    standby = Repository.open(open_storage(str(_standby_repo(pair))))
    row = next(e for e in standby.load_manifest(standby.list_snapshots()[-1]).entries()
               if e.path == "tables/orders/part-0.bin")
    pack = _standby_repo(pair) / fmt.pack_name(standby.index.get(row.chunks[0]).pack_id)
    pack.chmod(0o644)
    os.truncate(pack, pack.stat().st_size // 2)
    with open(pair.prod / "tables" / "orders" / "part-0.bin", "r+b") as f:  # a partial rewrite: the rest reused
        f.seek(1_500_000)
        f.write(random.Random(3).randbytes(3000))
    # Fixed beyond the hint: the apply's read of a damaged chunk makes the standby forget every damaged chunk
    # of that pack and refuse with ChunksLost; the primary at once sends what it lacks.
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
    assert "is damaged; it forgets it" in doc["err"], doc["err"]
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc


def test_s61_a_repaired_json_that_is_a_directory_is_named_where_the_error_points(tmp_path: Path) -> None:
    """F4 (low). ``repaired.json`` that is a directory (or a fifo) stops every capture and every standby
    commit (exit 3: "the repository is damaged; run 'drsync repo verify' and restore it from a backup or the
    standby"). But ``repo verify`` says "intact" (exit 0) and ``repo repair`` "nothing lost": the operator
    is sent to tools that see nothing, and told to restore a whole repository over one stray entry. Either
    the error says to remove it, or verify reports it."""
    repo, data = _plain_repo(tmp_path, snapshots=1)
    (repo / fmt.REPAIRED_NAME).mkdir()
    # Fixed: a capture goes on (every file naming a chunk the repository lacks is read again) and says on
    # stderr to remove the entry; verify reports it (exit 3, named); repair lists it too.
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
    assert snap.code == 0 and "Traceback" not in snap.err, snap
    assert fmt.REPAIRED_NAME in snap.err and "remove it" in snap.err, snap.err
    verify = run_drsync("repo", "verify", "--repo", repo)
    assert verify.code == 3 and fmt.REPAIRED_NAME in verify.out + verify.err and "remove it" in verify.err, verify
    rep = run_drsync("repo", "repair", "--repo", repo)
    assert rep.code == 0 and fmt.REPAIRED_NAME in rep.out, rep
    (repo / fmt.REPAIRED_NAME).rmdir()
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


def _as_nobody(*args: str | Path, home: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "drsync",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": str(home)})


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_s61_a_capture_does_not_claim_to_keep_an_unreadable_file_whose_chunks_were_forgotten(open_tmp: Path) -> None:
    """F5 (medium). On a primary, a pack is lost and ``repo repair`` forgets its chunks; one file of it is
    now unreadable (chmod 000, capture as a non-root user). The next ``snapshot create`` exits 0 and warns
    "secret.bin: cannot be read (Permission denied); its last captured version is kept", but that version's
    bytes are gone: the new snapshot names chunks the repository does not hold (verify exits 3). The warning
    must not say it is kept: it must say its content is lost (restore it from the standby or a backup)."""
    base = open_tmp
    data, repo = base / "data", base / "repo"
    data.mkdir()
    rnd = random.Random(9)
    for name in ("a.bin", "secret.bin"):
        (data / name).write_bytes(rnd.randbytes(200_000))
        os.utime(data / name, (time.time() - 5, time.time() - 5))
    subprocess.run(["chown", "-R", "65534:65534", str(base)], check=True)
    assert _as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1", home=base).returncode == 0
    assert _as_nobody("snapshot", "create", "--repo", repo, "--source", data, home=base).returncode == 0
    other = data / "other.bin"
    other.write_bytes(rnd.randbytes(100_000))
    os.chown(other, 65534, 65534)
    os.utime(other, (time.time() - 5, time.time() - 5))
    assert _as_nobody("snapshot", "create", "--repo", repo, "--source", data, home=base).returncode == 0
    oldest = min((repo / "packs").rglob("*.pack"), key=lambda p: p.stat().st_mtime_ns)
    oldest.unlink()  # a.bin's and secret.bin's chunks
    assert _as_nobody("repo", "repair", "--repo", repo, home=base).returncode == 0
    (data / "secret.bin").chmod(0)
    try:
        snap = _as_nobody("snapshot", "create", "--repo", repo, "--source", data, home=base)
    finally:
        (data / "secret.bin").chmod(0o644)
    said = [line for line in (snap.stdout + snap.stderr).splitlines() if "secret.bin" in line]
    assert said, snap
    assert not any("last captured version is kept" in line for line in said), said


# --- promises that held ------------------------------------------------------------------------------


def test_s61_several_lost_packs_heal_in_one_shipment_beside_a_deleted_and_a_changed_file(pair: Pair) -> None:  # noqa: F811
    """Held: four packs lost on the standby at once (an unchanged file's, a file production deletes now, a
    file production rewrites now, a file only older snapshots name). One shipment is refused, the standby
    forgets them and the same shipment sends what the new snapshot needs; the root matches production and
    the standby's newest snapshot restores to production's tree."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    names = ["keep.bin", "gone.bin", "change.bin", "old.bin"]
    blobs = [random.Random(i).randbytes(90_000) for i in range(len(names))]
    for name, blob in zip(names, blobs, strict=True):
        (pair.prod / "catalog" / name).write_bytes(blob)
        assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    (pair.prod / "catalog" / "old.bin").write_bytes(b"rewritten small")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    lost = {_standby_pack_of(pair, b) for b in blobs}
    assert len(lost) == 4
    for p in lost:
        p.unlink()
    (pair.prod / "catalog" / "gone.bin").unlink()
    (pair.prod / "catalog" / "change.bin").write_bytes(random.Random(9).randbytes(90_000))
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and "every chunk" in doc["err"], doc
    assert pair.in_sync()
    out = pair.tmp / "restored"
    r = run_drsync("snapshot", "restore", "latest", "--config", pair.standby_cfg, "--target", out)
    assert r.code == 0, r.err
    assert {k: v for k, v in tree_state(out).items() if k != "."} == \
        {k: v for k, v in tree_state(pair.prod).items() if k != "."}
    assert not (_standby_repo(pair) / fmt.REPAIRED_NAME).exists()
    assert _figures(_once(pair.primary_cfg))["missing_chunks"] == 0


def test_s61_repair_refuses_a_packs_file_and_a_garbage_index_and_changes_nothing(tmp_path: Path) -> None:
    """Held: ``packs`` replaced by a file, missing, or empty (every pack gone), and an index file replaced
    by garbage: exit 3, one line without a traceback, nothing changed (``--dry-run`` too)."""
    repo, _ = _plain_repo(tmp_path)
    packs = repo / "packs"
    packs.rename(tmp_path / "packs.bak")
    cases = [("a file", lambda: (repo / "packs").write_text("x")), ("missing", lambda: (repo / "packs").unlink()),
             ("empty", lambda: (repo / "packs").mkdir())]
    for what, make in cases:
        make()
        before = _repo_state(repo)
        for extra in (["--dry-run"], []):
            r = run_drsync("repo", "repair", "--repo", repo, *extra)
            assert r.code == 3, (what, r)
            assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, (what, r.err)
            assert "mounted" in r.err, r.err
        assert _repo_state(repo) == before, what
    (repo / "packs").rmdir()
    (tmp_path / "packs.bak").rename(packs)
    victim = sorted((repo / "index").iterdir())[0]
    victim.write_bytes(b"PAR1 garbage")
    before = _repo_state(repo)
    r = run_drsync("repo", "repair", "--repo", repo)
    assert r.code == 3 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r
    assert _repo_state(repo) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to kill at a system call")
@pytest.mark.parametrize("call,nth", [("rename", 1), ("rename", 2), ("unlink", 4), ("unlink", 5), ("unlink", 6)])
def test_s61_repair_killed_at_its_writes_and_deletes_then_repaired_again(tmp_path: Path, call: str, nth: int) -> None:
    """Held: ``repo repair`` killed -9 at its index write (rename 1), its repaired.json (rename 2) and each
    deletion of an old index file (unlink 4-6; 1-3 are its lock's): a second repair, a capture, GC and
    verify leave a whole repository whose newest snapshot restores to the data root."""
    repo, data = _plain_repo(tmp_path, snapshots=4)
    packs = sorted((repo / "packs").rglob("*.pack"), key=lambda p: p.stat().st_mtime_ns)
    packs[1].unlink()
    _newest(list((repo / "index").iterdir())).unlink()
    killed = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={call}",
                             "-e", f"inject={call}:signal=KILL:when={nth}",
                             sys.executable, "-m", "drsync", "repo", "repair", "--repo", str(repo)],
                            capture_output=True, text=True)
    assert killed.returncode != 0, killed
    again = run_drsync("repo", "repair", "--repo", repo)
    assert again.code == 0, again.err
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert snap.code == 0, snap.err
    assert not (repo / fmt.REPAIRED_NAME).exists()
    assert run_drsync("repo", "gc", "--repo", repo).code == 0
    verify = run_drsync("repo", "verify", "--repo", repo)
    assert verify.code == 0, verify.out + verify.err
    out = tmp_path / "out"
    assert run_drsync("snapshot", "restore", snap.json()["id"], "--repo", repo, "--target", out).code == 0
    assert {k: v for k, v in tree_state(out).items() if k != "."} == \
        {k: v for k, v in tree_state(data).items() if k != "."}


def test_s61_repair_beside_a_running_pair_that_ships_and_loses_packs(pair: Pair) -> None:  # noqa: F811
    """Held: a running primary agent (interval 1 s) and standby; production changes, standby packs are lost
    and ``repo repair`` runs on the standby meanwhile. Every repair exits 0; once production is quiet the
    standby matches it and its repository verifies."""
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    rnd = random.Random(3)
    for step in range(6):
        for _ in range(2):
            size = rnd.randrange(1000, 120_000)
            (pair.prod / "catalog" / f"w{rnd.randrange(4)}.bin").write_bytes(rnd.randbytes(size))
        time.sleep(0.5 + rnd.random())
        if step % 2 == 0:
            packs = sorted((_standby_repo(pair) / "packs").rglob("*.pack"))
            if len(packs) > 1:
                try:
                    rnd.choice(packs).unlink()
                except FileNotFoundError:
                    pass
        else:
            r = run_drsync("repo", "repair", "--config", pair.standby_cfg, "--json")
            assert r.code == 0, r.err
    pair.kill("primary", signal.SIGTERM)
    (pair.prod / "catalog" / "final.txt").write_text("final")
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0, doc
    if run_drsync("repo", "verify", "--config", pair.standby_cfg).code != 0:
        # a pack lost after the last shipment's check, or of a file production replaced: a repair and a
        # shipment bring back what production still names
        assert run_drsync("repo", "repair", "--config", pair.standby_cfg).code == 0
        (pair.prod / "catalog" / "final.txt").write_text("final 2")
        assert _once(pair.primary_cfg)["code"] == 0
    assert pair.in_sync()
    assert run_drsync("repo", "verify", "--config", pair.primary_cfg).code == 0
    out = pair.tmp / "restored"
    assert run_drsync("snapshot", "restore", "latest", "--config", pair.standby_cfg, "--target", out).code == 0
    assert {k: v for k, v in tree_state(out).items() if k != "."} == \
        {k: v for k, v in tree_state(pair.prod).items() if k != "."}
