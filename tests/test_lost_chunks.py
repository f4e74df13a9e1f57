"""A repository that lost chunks gets them back: a standby's lost pack or index file, a rotted chunk.

Before, a standby whose repository lost a pack of an unchanged file refused every commit ("names chunks
in pack(s) that are gone") until an operator rebuilt it, and nothing ever sent those chunks again; a lost
index file went unnoticed by commits and stopped GC for good. Now the standby forgets what it lost
(:mod:`drsync.repository.repair`), the primary asks it about every chunk of the snapshot and sends what
it lacks (:class:`drsync.errors.ChunksLost`), and ``drsync repo repair`` does the same on demand (rotted
chunks, an index file lost, a primary whose capture then reads those files again).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from drsync.errors import IntegrityError
from drsync.repository import chunks, repair
from drsync.repository import format as fmt
from drsync.repository.ids import ids_array
from drsync.repository.packs import IndexRows
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture


def _id(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _rows(entries: list[tuple[int, str]]) -> IndexRows:
    packs: list[str] = []
    for _, p in entries:
        if p not in packs:
            packs.append(p)
    n = len(entries)
    return IndexRows(ids_array([_id(i) for i, _ in entries]),
                     np.array([packs.index(p) for _, p in entries], np.uint32), np.arange(n, dtype=np.uint64),
                     np.ones(n, np.uint32), np.ones(n, np.uint32), np.zeros(n, np.uint8), tuple(packs))


# --- the pure plan -------------------------------------------------------------------------------


def test_rows_to_keep_drops_lost_packs_and_damaged_copies_only() -> None:
    rows = _rows([(1, "a"), (2, "a"), (3, "b"), (4, "b"), (4, "c"), (5, "c")])
    keep = repair.rows_to_keep(rows, {"a"}, {"b": {_id(4)}, "z": {_id(5)}})
    # a's rows go; b's copy of 4 goes, c's copy of 4 stays; a damaged id listed for another pack keeps 5.
    assert keep.tolist() == [False, False, True, False, True, True]
    assert repair.rows_to_keep(rows, set(), {}).all()
    assert not repair.rows_to_keep(rows, {"a", "b", "c"}, {}).any()


# --- a repository, in this process ---------------------------------------------------------------


def _files(root: Path, n: int, seed: int, size: int = 200_000) -> None:
    root.mkdir(exist_ok=True)
    rnd = random.Random(seed)
    for i in range(n):
        (root / f"f{seed}-{i}.bin").write_bytes(rnd.randbytes(size))


def _repo_with_two_snapshots(tmp_path: Path) -> tuple[Path, Path]:
    repo, data = tmp_path / "repo", tmp_path / "data"
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    _files(data, 3, 1)
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    _files(data, 2, 2)
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    return repo, data


def _packs_of(repo: Path, path_prefix: str) -> set[Path]:
    """The pack files holding the chunks of the newest snapshot's files whose names start with the prefix."""
    r = Repository.open(open_storage(str(repo)))
    ids = [c for e in r.load_manifest(r.list_snapshots()[-1]).entries() if e.path.startswith(path_prefix)
           for c in e.chunks]
    return {repo / fmt.pack_name(r.index.get(c).pack_id) for c in ids}


def test_repair_forgets_a_lost_pack_and_a_capture_reads_those_files_again(tmp_path: Path) -> None:
    repo, data = _repo_with_two_snapshots(tmp_path)
    lost = _packs_of(repo, "f2-")
    assert lost and not lost & _packs_of(repo, "f1-")
    for p in lost:
        p.unlink()
    assert run_drsync("repo", "verify", "--repo", repo).code == 3
    index_before = sorted(p.name for p in (repo / "index").iterdir())
    dry = run_drsync("repo", "repair", "--repo", repo, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    doc = dry.json()
    assert doc["dry_run"] and doc["forgotten_chunks"] >= 2 and len(doc["incomplete_snapshots"]) == 1
    assert sorted(p.name for p in (repo / "index").iterdir()) == index_before  # a dry run changes nothing
    assert not (repo / fmt.REPAIRED_NAME).exists()
    r = run_drsync("repo", "repair", "--repo", repo, "--json")
    assert r.code == 0, r.err
    done = r.json()
    assert not done["dry_run"] and done["lost_packs"] == sorted(p.stem for p in lost)
    marker = json.loads((repo / fmt.REPAIRED_NAME).read_text())
    assert marker["snapshots"] == done["incomplete_snapshots"]
    rp = Repository.open(open_storage(str(repo)))
    f2 = [c for e in rp.load_manifest(rp.list_snapshots()[-1]).entries() if e.path.startswith("f2-")
          for c in e.chunks]
    assert rp.missing_chunks(f2) == f2  # the repository now says it lacks them
    # A capture with nothing changed reads the files naming forgotten chunks again (not the others).
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert snap.code == 0, snap.err
    assert snap.json()["new_bytes"] >= 2 * 200_000 * 0.9
    assert not (repo / fmt.REPAIRED_NAME).exists()
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    out = tmp_path / "out"
    assert run_drsync("snapshot", "restore", snap.json()["id"], "--repo", repo, "--target", out).code == 0
    assert tree_state(out) == tree_state(data)


def test_repair_refuses_when_every_pack_is_gone(tmp_path: Path) -> None:
    """An unmounted or emptied packs/ is not a reason to forget a whole history (nothing changes)."""
    repo, _ = _repo_with_two_snapshots(tmp_path)
    for p in list((repo / "packs").rglob("*.pack")):
        p.unlink()
    index_before = sorted(p.name for p in (repo / "index").iterdir())
    r = run_drsync("repo", "repair", "--repo", repo)
    assert r.code == 3, r
    assert "every pack" in r.err and "mounted" in r.err and "Traceback" not in r.err
    assert sorted(p.name for p in (repo / "index").iterdir()) == index_before
    assert not (repo / fmt.REPAIRED_NAME).exists()


def test_repair_indexes_again_the_packs_of_a_lost_index_file(tmp_path: Path) -> None:
    repo, _ = _repo_with_two_snapshots(tmp_path)
    files = sorted((repo / "index").iterdir())
    assert len(files) >= 2
    files[-1].unlink()  # lost: its packs look like garbage, the snapshots naming them are incomplete
    assert run_drsync("repo", "verify", "--repo", repo).code == 3
    r = run_drsync("repo", "repair", "--repo", repo, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["reindexed_chunks"] >= 1 and doc["forgotten_chunks"] == 0 and doc["incomplete_snapshots"] == []
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    assert run_drsync("repo", "gc", "--repo", repo).code == 0  # GC no longer refuses, deletes nothing needed
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


def test_repair_forgets_a_rotted_chunk_and_keeps_the_rest_of_its_pack(tmp_path: Path) -> None:
    repo, data = _repo_with_two_snapshots(tmp_path)
    r = Repository.open(open_storage(str(repo)))
    entries = r.load_manifest(r.list_snapshots()[-1]).entries()
    victim = next(e for e in entries if e.path.startswith("f1-"))
    loc = r.index.get(victim.chunks[0])
    pack = repo / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\xff" * 32)
    rp = run_drsync("repo", "repair", "--repo", repo, "--json")
    assert rp.code == 0, rp.err
    doc = rp.json()
    assert doc["damaged_chunks"] == 1 and doc["lost_packs"] == [] and doc["forgotten_chunks"] == 1
    assert pack.exists()
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert snap.code == 0 and 0 < snap.json()["new_bytes"] <= 250_000, snap
    out = tmp_path / "out"
    assert run_drsync("snapshot", "restore", snap.json()["id"], "--repo", repo, "--target", out).code == 0
    assert tree_state(out) == tree_state(data)


def test_a_damaged_repaired_json_still_makes_every_chunk_checked(tmp_path: Path) -> None:
    repo, _ = _repo_with_two_snapshots(tmp_path)
    r = Repository.open(open_storage(str(repo)))
    assert repair.repaired_snapshots(r) == []
    for junk in (b"", b"[]", b'{"snapshots": 3}', b"\xff\xfe", b'{"snapshots": []}', b"x" * 70_000):
        (repo / fmt.REPAIRED_NAME).write_bytes(junk)
        assert repair.repaired_snapshots(r) == ["?"], junk


def test_forget_raises_on_an_unreadable_index_file(tmp_path: Path) -> None:
    repo, _ = _repo_with_two_snapshots(tmp_path)
    victim = sorted((repo / "index").iterdir())[0]
    victim.write_bytes(b"PAR1 not really")
    r = Repository.open(open_storage(str(repo)))
    with r.lock(exclusive=True) as lock, pytest.raises(IntegrityError):
        repair.forget(r, lock)
    assert victim.read_bytes() == b"PAR1 not really"


# --- a standby agent and its primary (real gRPC, real files) --------------------------------------


def _once(cfg: Path) -> dict:
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    doc = r.json() if r.out.strip() else {}
    doc["code"], doc["err"] = r.code, r.err
    return doc


def _figures(doc: dict) -> dict:
    results = doc.get("results") or {}
    assert len(results) == 1, doc
    return next(iter(results.values()))


def _standby_repo(p: Pair) -> Path:
    return Path(p.standby_site.url("standby-repo"))


@pytest.mark.parametrize("pair", ["local", "to-hdfs"], indirect=True)
def test_a_standby_that_lost_a_pack_of_an_unchanged_file_gets_it_back(pair: Pair) -> None:  # noqa: F811
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    lonely = pair.prod / "catalog" / "lonely.bin"  # its own shipment: its own pack on the standby
    lonely.write_bytes(random.Random(7).randbytes(70_000))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    loc = standby.index.get(chunks.chunk_id(lonely.read_bytes()))
    assert loc is not None
    standby.storage.delete(fmt.pack_name(loc.pack_id))  # lost on the standby (a bad disk, a wrong clean-up)
    assert not standby.storage.exists(fmt.pack_name(loc.pack_id))
    (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change elsewhere")
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0, doc
    assert "asking" in doc["err"] and "every chunk" in doc["err"], doc["err"]
    fig = _figures(doc)
    assert fig["missing_chunks"] >= 2, fig  # the lost chunk came back beside the changed file's
    assert pair.in_sync()
    verify = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert verify.code == 0, verify.out + verify.err
    assert not standby.storage.exists(fmt.REPAIRED_NAME)
    # The next cycles are ordinary again: nothing more is sent for the file.
    (pair.prod / "catalog" / "f004.txt").write_bytes(b"and another")
    fig = _figures(_once(pair.primary_cfg))
    assert fig["missing_chunks"] <= 1, fig


def test_a_standby_that_lost_a_pack_gets_it_back_in_an_unchanged_cycle(pair: Pair) -> None:  # noqa: F811
    """An unchanged capture names the standby's manifest and asks about no chunk (the applied manifest is not
    even read); when the standby lost a pack meanwhile, its commit refuses, and the retry asks about every chunk
    and sends the lost ones, the manifest still named."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    lonely = pair.prod / "catalog" / "lonely.bin"  # its own shipment: its own pack on the standby (not the only one)
    lonely.write_bytes(random.Random(8).randbytes(70_000))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    unchanged = _figures(_once(pair.primary_cfg))
    assert unchanged["manifest_sent"] == "reference" and unchanged["missing_chunks"] == 0, unchanged
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    loc = standby.index.get(chunks.chunk_id(lonely.read_bytes()))
    assert loc is not None
    standby.storage.delete(fmt.pack_name(loc.pack_id))
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0, doc["err"]
    assert "asking" in doc["err"] and "every chunk" in doc["err"], doc["err"]
    fig = _figures(doc)
    assert fig["manifest_sent"] == "reference" and fig["missing_chunks"] >= 1, fig
    assert pair.in_sync()
    verify = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert verify.code == 0, verify.out + verify.err
    fig = _figures(_once(pair.primary_cfg))
    assert fig["manifest_sent"] == "reference" and fig["missing_chunks"] == 0, fig


def test_a_running_standby_that_lost_an_index_file_is_repaired_and_followed(pair: Pair) -> None:  # noqa: F811
    """An index file lost on the standby: commits did not notice (they trust stored snapshots), so the
    repository stayed incomplete. After ``drsync repo repair`` (run while the standby agent runs) the
    standby checks every chunk of the next commit, and the primary sends what it lacks."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    for i in range(3):
        (pair.prod / "catalog" / f"more-{i}.bin").write_bytes(os.urandom(120_000))
        assert _once(pair.primary_cfg)["code"] == 0
    index = sorted((_standby_repo(pair) / "index").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    index[-1].unlink()
    verify = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert verify.code == 3
    # Its packs are still there (re-indexed): nothing needs sending for them.
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg, "--json")
    assert r.code == 0, r.err
    assert r.json()["reindexed_chunks"] >= 1
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0
    (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()


def test_repair_of_a_rotted_chunk_on_a_standby_brings_it_back_at_the_next_cycle(pair: Pair) -> None:  # noqa: F811
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    standby = Repository.open(open_storage(str(_standby_repo(pair))))
    row = next(e for e in standby.load_manifest(standby.list_snapshots()[-1]).entries()
               if e.path == "tables/orders/part-0.bin")
    loc = standby.index.get(row.chunks[0])
    pack = _standby_repo(pair) / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\x00\xff" * 16)
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 3
    r = run_drsync("repo", "repair", "--config", pair.standby_cfg, "--json")
    assert r.code == 0 and r.json()["damaged_chunks"] == 1, r
    assert (_standby_repo(pair) / fmt.REPAIRED_NAME).exists()
    (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change elsewhere")
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
    assert _figures(doc)["missing_chunks"] >= 2
    assert not (_standby_repo(pair) / fmt.REPAIRED_NAME).exists()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0


def test_a_lost_pack_only_older_snapshots_name_is_forgotten_not_checked_at_every_commit(pair: Pair) -> None:  # noqa: F811
    """A pack lost on the standby that the shipped snapshot does not need (its file was deleted on
    production): the commit passes, and the standby forgets the pack, so later commits take their usual
    path (before, every commit checked every chunk while the index named a pack that is gone)."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0
    gone = pair.prod / "catalog" / "gone.bin"
    gone.write_bytes(random.Random(11).randbytes(70_000))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    loc = standby.index.get(chunks.chunk_id(gone.read_bytes()))
    assert loc is not None
    gone.unlink()
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    standby.storage.delete(fmt.pack_name(loc.pack_id))
    assert standby.lost_packs() == {loc.pack_id}
    (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change")
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
    assert standby.lost_packs() == set()
    (pair.prod / "catalog" / "f004.txt").write_bytes(b"another change")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    assert not standby.storage.exists(fmt.REPAIRED_NAME)  # the next commit checked every chunk and passed
    # The deleted file's chunk is not held any more (nobody sends it back: production no longer has it).
    cid = chunks.chunk_id(random.Random(11).randbytes(70_000))
    assert Repository.open(open_storage(pair.standby_site.url("standby-repo"))).missing_chunks([cid]) == [cid]


def test_a_delayed_standby_whose_apply_meets_a_damaged_chunk_gets_it_back(pair: Pair) -> None:  # noqa: F811
    """``replication.apply_delay``: the apply that reads a damaged chunk of the standby's own repository runs
    later, in the agent's loop, not in a commit the primary waits for. It forgets the damaged chunks of that
    pack, so the next shipment's commit checks every chunk, the primary sends them, and a later delayed
    apply brings the root to production's state."""
    with open(pair.standby_cfg, "a") as f:
        f.write('[replication]\napply_delay = "1s"\n')
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0
    wait_for(pair.in_sync, "the first delayed apply")
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    row = next(e for e in standby.load_manifest(standby.list_snapshots()[-1]).entries()
               if e.path == "tables/orders/part-0.bin")
    loc = standby.index.get(row.chunks[0])
    pack = _standby_repo(pair) / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    os.truncate(pack, loc.offset + loc.stored_length // 2)
    with open(pair.prod / "tables" / "orders" / "part-0.bin", "r+b") as f:  # the rest of the file is reused
        f.seek(1_500_000)
        f.write(random.Random(3).randbytes(3000))
    assert _once(pair.primary_cfg)["code"] == 0  # stored, applied later
    log = pair.tmp / "standby.log"
    wait_for(lambda: "could not be applied" in log.read_text(errors="replace"), "the delayed apply to fail")
    wait_for(lambda: standby.storage.exists(fmt.REPAIRED_NAME), "the standby to forget the damaged chunks")
    (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change elsewhere")
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and "every chunk" in doc["err"], doc
    wait_for(pair.in_sync, "the next delayed apply")


def test_a_primary_whose_own_pack_is_damaged_says_repo_repair_and_that_mends_it(pair: Pair) -> None:  # noqa: F811
    """The primary reads a chunk it must send from its own repository and finds it damaged (a truncated
    pack): the shipment fails naming ``drsync repo repair``; after it, the next cycle's capture reads those
    files again and the standby follows."""
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    fresh = pair.prod / "catalog" / "fresh.bin"
    fresh.write_bytes(random.Random(5).randbytes(90_000))
    os.utime(fresh, (1_600_000_000, 1_600_000_000))  # not racy: the next capture trusts its row
    prod = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    # Captured but not yet shipped: a snapshot taken by hand, then its pack cut short.
    assert run_drsync("snapshot", "create", "--config", pair.primary_cfg).code == 0
    prod.reload_index()
    loc = prod.index.get(chunks.chunk_id(fresh.read_bytes()))
    pack = Path(pair.prod_site.url("primary-repo")) / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    os.truncate(pack, loc.offset + loc.stored_length // 2)
    doc = _once(pair.primary_cfg)
    assert doc["code"] != 0 and "drsync repo repair" in doc["err"] and "Traceback" not in doc["err"], doc
    assert run_drsync("repo", "repair", "--config", pair.primary_cfg).code == 0
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
