"""Breaker session 60: changed chunks sent as zstd deltas against the chunk they replace (commit 401fb2c,
re-checked on 220806a: deltas against the joined old chunks overlapping each new one).

Each test here either fails today because of a real fault (named in its docstring) or passes and guards
one of the feature's promises.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync, tree_state
from tests.sites import LocalSite, make_site
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture


def _rewrite_in_place(path: Path, at: int, n: int, seed: int = 5) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(random.Random(seed).randbytes(n))


def _limit(p: Pair) -> None:
    """A bandwidth limit in force: the primary sends deltas even on loopback."""
    with open(p.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')


def _once(p: Pair) -> dict:
    r = run_drsync("agent", "--config", p.primary_cfg, "--once", "--json")
    doc = r.json()
    doc["code"] = r.code
    return doc


def _damage_chunk_on_standby(p: Pair, cid: bytes) -> None:
    """Flip bytes of chunk ``cid`` where it lies in the standby's pack (a bad sector there)."""
    standby = Repository.open(open_storage(p.standby_site.url("standby-repo")))
    loc = standby.index.get(cid)
    assert loc is not None
    pack = Path(p.standby_site.url("standby-repo")) / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\xff" * 64)


def _chunk_at(p: Pair, path: str, offset: int) -> bytes:
    """The chunk holding ``offset`` of ``path`` in the snapshot the standby applied (production's copy)."""
    prod = Repository.open(open_storage(p.prod_site.url("primary-repo")))
    standby = Repository.open(open_storage(p.standby_site.url("standby-repo")))
    applied = standby.list_snapshots()[-1]
    row = next(r for r in prod.load_manifest(prod.find_snapshot(applied.id)).entries() if r.path == path)
    starts = np.cumsum([0, *row.chunk_sizes])
    return row.chunks[int(np.searchsorted(starts, offset, side="right")) - 1]


# --- 1. a damaged base and a primary run with --once --------------------------------------------


def test_s60_a_damaged_base_does_not_stop_once_driven_replication(pair: Pair) -> None:  # noqa: F811
    """Was high (replication stuck), fixed. The standby's copy of a base chunk is damaged (a bad sector in
    its pack). A primary driven by ``drsync agent --once`` (cron, the bench, an operator) sent the changed
    chunk as a delta at every run: the 'next try sends whole chunks' flag lived in the process's memory, and
    each --once run is a new process. Now the shipment that meets the rejection sends whole chunks at once,
    in the same run, and says why in a WARNING."""
    big = pair.prod / "tables" / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    _limit(pair)
    pair.start("standby")
    first = _once(pair)
    assert first["code"] == 0, first
    assert pair.in_sync()
    _damage_chunk_on_standby(pair, _chunk_at(pair, "tables/big.bin", 1_500_000))
    _rewrite_in_place(big, 1_500_000, 5000)  # inside the damaged chunk only: the damaged one is not needed
    r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err)
    assert "cannot read" in r.err and "sending whole chunks" in r.err, r.err  # the rejection, said once
    assert pair.in_sync()
    again = _once(pair)
    assert again["code"] == 0 and pair.in_sync(), again


# --- 2. an unreadable base on an HDFS standby: the rejection is not an IntegrityError ----------------------


@pytest.mark.parametrize("deltas", [True, False], ids=["deltas", "whole-control"])
def test_s60_an_unreadable_base_on_an_hdfs_standby_does_not_stop_replication(tmp_path: Path, fake_webhdfs,  # type: ignore[no-untyped-def]
                                                                        deltas: bool) -> None:
    """Was high (replication stuck, also for a long-running primary), fixed. The standby's repository is
    on HDFS and the pack holding a base cannot be read (HDFS answers an IOException: a block whose
    replicas are all corrupt or lost). The standby caught only IntegrityError around its read of the base,
    so the storage's HdfsError went out as gRPC INTERNAL and the primary never switched to whole chunks:
    every retry sent the same delta. Now any failure to read a base is the standby's refusal of that delta
    (INVALID_ARGUMENT), and the primary sends whole chunks at once. The control (no bandwidth limit: no
    deltas, the same unreadable pack) shows that whole chunks never need that pack."""
    from tests.webhdfs import RemoteError

    p = Pair(tmp_path, LocalSite(tmp_path), make_site("hdfs", tmp_path, fake_webhdfs))
    try:
        if deltas:
            _limit(p)
        p.start("standby")
        p.start("primary")
        wait_for(p.in_sync, "the first sync")
        small = p.prod / "catalog" / "small.bin"  # one chunk (under CHUNK_MIN): its own pack on the standby
        small.write_bytes(random.Random(9).randbytes(60_000))
        wait_for(p.in_sync, "the small file to reach the standby")
        p.kill("primary")
        standby = Repository.open(open_storage(p.standby_site.url("standby-repo")))
        loc = standby.index.get(chunks.chunk_id(small.read_bytes()))
        assert loc is not None
        bad = fmt.pack_name(loc.pack_id)

        def unreadable(op: str, path: str) -> None:
            if op == "OPEN" and path.endswith(bad):
                raise RemoteError("IOException", f"Could not obtain block: BP-1:blk_1073 file={path} "
                                                 f"(BlockMissingException: no live nodes contain current block)")

        fake_webhdfs.on_request = unreadable
        p.kill("standby")  # its read-ahead cache of the pack goes with the process
        p.start("standby")
        _rewrite_in_place(small, 20_000, 3000)
        p.start("primary")

        def failures() -> int:
            return (p.tmp / "primary.log").read_text(errors="replace").count("drsync.agent: failed: standby")

        # The first try (a delta) may fail; the retry 2 s later must send whole chunks. Three failed tries in
        # a row (about 15 s of backoff) mean the retries send the delta again.
        wait_for(lambda: p.in_sync() or failures() >= 3, "the standby to follow, or three failed tries")
        log = (p.tmp / "primary.log").read_text(errors="replace")
        assert p.in_sync(), f"{failures()} failed tries in a row: {log[-1500:]}"
    finally:
        fake_webhdfs.on_request = None
        p.stop_all()


# --- 3. guard: the standby's root matches production after delta shipments of awkward changes ---------------


def test_s60_guard_awkward_rewrites_shipped_as_deltas_leave_the_standby_identical(pair: Pair) -> None:  # noqa: F811
    """PASSES (guards promises 3 and 4). Three `--once` cycles with a bandwidth limit (deltas on loopback):
    files grown and shrunk after an in-place edit, truncated to 0, turned into a directory and a symlink, a
    hard-linked file edited through either name, a file edited then renamed, a sparse file, a file of all
    zero bytes edited at a few places, a file of one block repeated (the same chunk several times in it)
    edited and rebuilt, two files trading a region (a chunk of one becoming the other's), a front insertion
    that moves every boundary, a mode change. After each: the roots are identical (content, modes, times),
    deltas were sent where a rewrite in place allows them, and `repo verify` passes on the standby."""
    rnd = random.Random(7)
    d = pair.prod / "awkward"
    d.mkdir()
    blk = rnd.randbytes(1 << 20)
    files = {"grow": rnd.randbytes(3 << 20), "shrink": rnd.randbytes(3 << 20), "zero": rnd.randbytes(2 << 20),
             "todir": rnd.randbytes(2 << 20), "tolink": rnd.randbytes(2 << 20), "hl": rnd.randbytes(3 << 20),
             "ren": rnd.randbytes(3 << 20), "same": b"\0" * (4 << 20), "rep": blk * 4,
             "x1": rnd.randbytes(2 << 20), "x2": rnd.randbytes(2 << 20)}
    for k, v in files.items():
        (d / k).write_bytes(v)
    os.link(d / "hl", d / "hl2")
    with open(d / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(rnd.randbytes(100_000))
    _limit(pair)
    pair.start("standby")
    deltas = []

    def cycle(label: str) -> None:
        doc = _once(pair)
        assert doc["code"] == 0, (label, doc)
        deltas.append(next(iter(doc["results"].values()))["delta_chunks"])
        a, b = tree_state(pair.prod), tree_state(pair.standby_data)
        assert a == b, (label, [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)])

    cycle("first")
    _rewrite_in_place(d / "grow", 1_000_000, 5000)
    with open(d / "grow", "ab") as f:
        f.write(rnd.randbytes(500_000))
    _rewrite_in_place(d / "shrink", 500_000, 5000)
    os.truncate(d / "shrink", 2_000_000)
    os.truncate(d / "zero", 0)
    (d / "todir").unlink()
    (d / "todir").mkdir()
    (d / "todir" / "f").write_bytes(b"now a directory")
    (d / "tolink").unlink()
    os.symlink("grow", d / "tolink")
    _rewrite_in_place(d / "hl", 1_500_000, 3000)
    _rewrite_in_place(d / "ren", 1_500_000, 3000)
    os.rename(d / "ren", d / "ren2")
    _rewrite_in_place(d / "same", 2_000_000, 10)
    _rewrite_in_place(d / "rep", 1_500_000, 4000)
    with open(d / "sparse", "r+b") as f:
        f.seek(2 << 20)
        f.write(rnd.randbytes(5000))
    x1, x2 = (d / "x1").read_bytes(), (d / "x2").read_bytes()
    (d / "x1").write_bytes(x2[: 1 << 20] + x1[1 << 20:])
    os.chmod(d / "grow", 0o600)
    cycle("second")
    (d / "grow").write_bytes(b"hello" + (d / "grow").read_bytes())
    _rewrite_in_place(d / "same", 100, 10)
    _rewrite_in_place(d / "same", 3_000_000, 10)
    _rewrite_in_place(d / "hl2", 100_000, 3000)
    (d / "rep").write_bytes(blk * 2 + rnd.randbytes(4000) + blk * 2)
    cycle("third")
    assert deltas[0] == 0 and deltas[1] > 0 and deltas[2] > 0, deltas
    r = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
