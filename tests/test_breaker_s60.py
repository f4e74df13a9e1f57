"""Breaker session 60: changed chunks sent as zstd deltas against the chunk they replace (commit 401fb2c).

Each test here either fails today because of a real fault (named in its docstring) or passes and guards
one of the feature's promises.
"""

from __future__ import annotations

import json
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


# --- 1. a damaged base stops a primary run with --once for good --------------------------------------------


def test_s60_damaged_base_stops_once_driven_replication_for_good(pair: Pair) -> None:  # noqa: F811
    """FAILS today (high: replication stuck). The standby's copy of a base chunk is damaged (a bad sector in
    its pack, as in test_delta_chunks' own damaged-base test). A primary driven by ``drsync agent --once``
    (cron, the bench, an operator) sends the changed chunk as a delta at every run: ``Shipper.whole_chunks``
    (the 'next try sends whole chunks' flag) lives in the process's memory, and each --once run is a new
    process whose flag starts False. Every run is rejected with the standby's own message 'the primary sends
    whole chunks at its next try', which never happens: the standby never follows production again, although
    a shipment of whole chunks (which does not need the damaged base at all) would succeed at once.
    Expected (promise 5): a damaged base never stops replication for good; the second run sends whole
    chunks (e.g. the rejection remembered in the agent's state directory, or the delta retried whole within
    the same run)."""
    big = pair.prod / "tables" / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    _limit(pair)
    pair.start("standby")
    first = _once(pair)
    assert first["code"] == 0, first
    assert pair.in_sync()
    _damage_chunk_on_standby(pair, _chunk_at(pair, "tables/big.bin", 1_500_000))
    _rewrite_in_place(big, 1_500_000, 5000)  # inside the damaged chunk only: the damaged one is not needed
    outcomes = [_once(pair) for _ in range(3)]
    assert "cannot read" in json.dumps(outcomes[0]), outcomes[0]  # the first run's delta is rejected: fair
    assert pair.in_sync(), (
        "three `drsync agent --once` runs after a delta rejected for a damaged base; the standby never "
        f"followed: {[o['shipped'] for o in outcomes]}")


# --- 2. an unreadable base on an HDFS standby: the rejection is not an IntegrityError ----------------------


def test_s60_unreadable_base_on_hdfs_standby_stops_replication_for_good(tmp_path: Path,
                                                                        fake_webhdfs) -> None:  # type: ignore[no-untyped-def]
    """FAILS today (high: replication stuck, also for a long-running primary). The standby's repository is
    on HDFS and the pack holding a base cannot be read (HDFS answers an IOException: a block whose
    replicas are all corrupt or lost). The standby's ``ChunkIntake._undelta`` catches only IntegrityError
    around its read of the base, so the storage's HdfsError (an OperationFailed) goes out as gRPC INTERNAL;
    the primary translates that to OperationFailed, and ``Shipper.ship`` sets ``whole_chunks`` only for an
    IntegrityError. Every retry, for ever, sends the same delta against the same unreadable base, while a
    shipment of whole chunks would not read that pack at all (the rewritten file is one chunk; its old chunk
    is referenced by no newer snapshot). Expected (promises 1 and 5): whatever the standby's failure to use
    a base, the next try sends whole chunks."""
    from tests.webhdfs import RemoteError

    p = Pair(tmp_path, LocalSite(tmp_path), make_site("hdfs", tmp_path, fake_webhdfs))
    try:
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
        wait_for(p.in_sync, "the standby to follow with whole chunks after the rejected delta", timeout=90)
    finally:
        fake_webhdfs.on_request = None
        p.stop_all()
