"""Breaker session 60b: delta chunks (401fb2c, 220806a, bed5599) beyond the cases of breaker s60:
cascades, fan-out, apply_delay, the immediate whole-chunk retry, expired bases, the plan's cap.

Each test either guards one of the feature's promises or pins a fault this breaker found (named in its
docstring, fixed in the same session: each failed before its fix).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import init_repo, make_tree, run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.zk import free_port


def _rewrite_in_place(path: Path, at: int, n: int, seed: int = 5) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(random.Random(seed).randbytes(n))


def _limit(cfg: Path, rate: str = "1GiB/s") -> None:
    with open(cfg, "a") as f:
        f.write(f'bandwidth_limit = "{rate}"\n')


def _once(cfg: Path) -> dict:
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    doc = r.json() if r.out.strip() else {}
    doc["code"], doc["err"] = r.code, r.err
    return doc


def _chunk_size(p: Pair, path: str, offset: int) -> int:
    """The raw size of the chunk holding ``offset`` of ``path`` in production's newest snapshot."""
    prod = Repository.open(open_storage(p.prod_site.url("primary-repo")))
    row = next(r for r in prod.load_manifest(prod.list_snapshots()[-1]).entries() if r.path == path)
    ends = np.cumsum(row.chunk_sizes)
    return int(row.chunk_sizes[int(np.searchsorted(ends, offset, side="right"))])


def _figures(doc: dict) -> dict:
    """The one target's figures of a --once --json run."""
    results = doc.get("results") or {}
    assert len(results) == 1, doc
    return next(iter(results.values()))


class Chain:
    """Agents with fixed roles, each a process: ``prod`` (primary) ships to the names in ``feeds[prod]``; a
    standby listing ``feeds[name]`` relays what it applied to them (docs/topologies.md)."""

    def __init__(self, tmp: Path, feeds: dict[str, list[str]], extra: dict[str, str] | None = None) -> None:
        self.tmp, self.feeds = tmp, feeds
        names = {"prod", *feeds, *(t for ts in feeds.values() for t in ts)}
        self.addr = {n: f"127.0.0.1:{free_port()}" for n in names}
        self.procs: dict[str, subprocess.Popen] = {}
        make_tree(tmp / "prod-data", files=20, big=2)
        self.cfg: dict[str, Path] = {}
        for name in sorted(names):
            if name != "prod":
                (tmp / f"{name}-data").mkdir()
            cfg = self.cfg[name] = tmp / f"{name}.toml"
            role = "primary" if name == "prod" else "standby"
            targets = ", ".join(f'"{self.addr[t]}"' for t in feeds.get(name, []))
            cfg.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{tmp / (name + "-data")}"\n'
                           f'repository = "{tmp / (name + "-repo")}"\n[agent]\nname = "{name}"\n'
                           f'role = "{role}"\nlisten = "{self.addr[name]}"\nmetrics = ""\n'
                           f'[replication]\ninterval = "1s"\n' + (f"standbys = [{targets}]\n" if targets else "")
                           + (extra or {}).get(name, ""))
            init_repo(cfg)

    def start(self, name: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config",
                                                 str(self.cfg[name])], stdout=log, stderr=log)

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(timeout=120)
        self.procs.clear()

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def same(self, name: str) -> bool:
        return tree_state(self.tmp / f"{name}-data") == tree_state(self.tmp / "prod-data")

    def shipped(self, sender: str, target: str) -> list[tuple[int, int, str]]:
        """(chunks sent, chunks, bytes in words) of every shipment ``sender`` logged as applied by ``target``."""
        pat = re.compile(rf"to {re.escape(self.addr[target])}: applied \((\d+)/(\d+) chunks sent, ([\d.]+ \w+) in")
        return [(int(a), int(b), c) for a, b, c in pat.findall(self.log(sender))]


def _small(words: str) -> bool:
    """A shipment of a few KiB: a delta of a 1 MiB-ish chunk with 3,000 bytes changed (a whole chunk of random
    bytes is at least 64 KiB)."""
    n, unit = words.split()
    return unit in ("B", "bytes") or (unit == "KiB" and float(n) < 32)


def test_s60b_a_relay_sends_deltas_to_its_far_standby_and_far_follows(tmp_path: Path) -> None:
    """Guards a promise: in a cascade (prod -> near -> far) with a bandwidth limit on both legs, near relays
    a chunk rewritten in place as a delta against the bytes far applied, and far's root and repository
    follow exactly."""
    c = Chain(tmp_path, {"prod": ["near"], "near": ["far"]},
              {"prod": 'bandwidth_limit = "1GiB/s"\n', "near": 'bandwidth_limit = "1GiB/s"\n'})
    try:
        for n in ("far", "near", "prod"):
            c.start(n)
        wait_for(lambda: c.same("far"), "far to receive production's tree through near", timeout=120)
        # A shipment is logged once the standby's reply is back, which may be a moment after its root matches.
        wait_for(lambda: c.shipped("near", "far") and c.shipped("prod", "near"), "the first sync logged")
        before, before_prod = len(c.shipped("near", "far")), len(c.shipped("prod", "near"))
        _rewrite_in_place(tmp_path / "prod-data" / "tables" / "orders" / "part-1.bin", 1_500_000, 3000)
        wait_for(lambda: c.same("near") and c.same("far"), "the rewrite to reach far", timeout=120)
        wait_for(lambda: any(s[0] for s in c.shipped("near", "far")[before:]), "near's relay of it logged")
        relayed = [s for s in c.shipped("near", "far")[before:] if s[0]]
        assert relayed and all(_small(s[2]) for s in relayed), relayed
        direct = [s for s in c.shipped("prod", "near")[before_prod:] if s[0]]
        assert direct and all(_small(s[2]) for s in direct), direct
        assert "cannot read" not in c.log("prod") + c.log("near") + c.log("far")
    finally:
        c.stop_all()
    assert run_drsync("repo", "verify", "--config", c.cfg["far"]).code == 0


def test_s60b_fan_out_one_standby_takes_deltas_the_other_whole_chunks(tmp_path: Path) -> None:
    """Guards a promise: one primary, two standbys; only ``a`` has a bandwidth limit (its own
    ``[replication.targets]``), so only ``a`` is sent deltas (loopback, no limit: ``b`` gets whole chunks),
    and both follow the same rewrite exactly, run after run (each shipper decides alone)."""
    c = Chain(tmp_path, {"prod": ["a", "b"]})
    with open(c.cfg["prod"], "a") as f:
        f.write(f'[replication.targets."{c.addr["a"]}"]\nbandwidth_limit = "1GiB/s"\n')
    try:
        for n in ("a", "b"):
            c.start(n)
        for n in ("a", "b"):
            link = GrpcStandbyLink(c.addr[n])
            wait_for(link.health, f"{n} to serve")
            link.close()
        first = _once(c.cfg["prod"])
        assert first["code"] == 0 and c.same("a") and c.same("b"), first
        big = tmp_path / "prod-data" / "tables" / "orders" / "part-0.bin"
        for i in range(3):
            _rewrite_in_place(big, 300_000 + i * 900_000, 3000, seed=i)
            doc = _once(c.cfg["prod"])
            assert doc["code"] == 0 and c.same("a") and c.same("b"), doc
            fa, fb = doc["results"][c.addr["a"]], doc["results"][c.addr["b"]]
            assert fa["delta_chunks"] >= 1 and fa["shipped_bytes"] < 32 * 1024, fa
            # Whole chunks to the unlimited one, unless this busy host made its loopback look far (a 10 ms round
            # trip: the far-link rule sends deltas there too).
            assert (fb["delta_chunks"] == 0 and fb["shipped_bytes"] >= 64 * 1024) or fb["delta_chunks"] >= 1, fb
    finally:
        c.stop_all()
    for n in ("a", "b"):
        assert run_drsync("repo", "verify", "--config", c.cfg[n]).code == 0


def test_s60b_a_delayed_standby_takes_deltas_against_what_it_applied_and_applies_them_later(pair: Pair) -> None:  # noqa: F811
    """Guards a promise: a standby with ``replication.apply_delay`` stores shipments but applies the first
    only; its Hello's applied snapshot stays the first. Two more rewrites of the same chunk go as deltas
    against the bytes of that applied snapshot (which it holds), both stored and verified; restored from
    the standby's repository, the newest is production's tree."""
    with open(pair.standby_cfg, "a") as f:
        f.write('[replication]\napply_delay = "1h"\n')
    with open(pair.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    applied = pair.tmp / "applied-state"
    big = pair.prod / "tables" / "orders" / "part-0.bin"
    state = tree_state(pair.standby_data)
    for i in range(2):
        _rewrite_in_place(big, 1_500_000 + i * 1000, 3000, seed=i)
        doc = _once(pair.primary_cfg)
        assert doc["code"] == 0, doc
        fig = _figures(doc)
        assert fig["delta_chunks"] >= 1 and fig["shipped_bytes"] < 32 * 1024, doc
        assert "apply_delay" in next(iter(doc["shipped"].values())), doc
    assert tree_state(pair.standby_data) == state  # nothing applied yet
    newest = run_drsync("snapshot", "list", "--config", pair.standby_cfg, "--json").json()[-1]["id"]
    r = run_drsync("snapshot", "restore", newest, "--config", pair.standby_cfg, "--target", applied)
    assert r.code == 0, r.err
    assert tree_state(applied) == tree_state(pair.prod)
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0


def test_s60b_a_refusal_that_is_no_delta_rejection_does_not_turn_deltas_off(pair: Pair) -> None:  # noqa: F811
    """Was low, fixed (a WAN link lost deltas for the rest of the process, a misleading WARNING, the
    shipment sent twice at once): the shipper took any IntegrityError of a delta shipment for the
    standby's rejection of a delta: here the standby's commit check refuses because a pack of an unchanged
    file is gone ("names chunks in pack(s) that are gone"), nothing to do with deltas. The primary logs
    "... sending whole chunks to X from now on", ships the whole snapshot again at once (same refusal),
    and, once an operator has put the pack back, sent whole chunks for the rest of its process: the next
    3,000-byte rewrite cost a whole chunk on the far link. Now only the standby's own rejection of a delta
    (DeltaRejected, gRPC DATA_LOSS) turns deltas off."""
    with open(pair.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first sync")
    lonely = pair.prod / "catalog" / "lonely.bin"  # its own shipment: its own pack on the standby
    lonely.write_bytes(random.Random(7).randbytes(70_000))
    wait_for(pair.in_sync, "the new file to reach the standby")
    standby = Repository.open(open_storage(pair.standby_site.url("standby-repo")))
    loc = standby.index.get(chunks.chunk_id(lonely.read_bytes()))
    assert loc is not None
    pack = Path(pair.standby_site.url("standby-repo")) / fmt.pack_name(loc.pack_id)
    kept = pair.tmp / "kept.pack"
    kept.write_bytes(pack.read_bytes())
    pack.unlink()  # lost on the standby (a bad disk, a wrong cleanup)
    log = pair.tmp / "primary.log"
    big = pair.prod / "tables" / "orders" / "part-0.bin"
    _rewrite_in_place(big, 1_500_000, 3000, seed=1)
    wait_for(lambda: "names chunks in pack(s) that are gone" in log.read_text(errors="replace"),
             "the standby's commit check to refuse")
    # Since s61 the standby forgets the lost pack and the primary sends its chunk again by itself (before,
    # an operator put the pack back here). The roots may match before the repository holds the chunk again.
    cid = chunks.chunk_id(lonely.read_bytes())
    wait_for(lambda: pair.in_sync() and not standby.storage.exists(fmt.REPAIRED_NAME)
             and Repository.open(open_storage(pair.standby_site.url("standby-repo"))).missing_chunks([cid]) == [],
             "the standby to follow and hold the lost chunk again")
    pat = re.compile(r": applied \((\d+)/\d+ chunks sent, ([\d.]+ \w+) in")

    def sent_after_refusal() -> list[tuple[str, str]]:
        text = log.read_text(errors="replace")
        return [m for m in pat.findall(text[text.index("names chunks in pack(s) that are gone"):]) if m[0] != "0"]

    # The primary logs a shipment after the standby applied it: the roots may match before that line is there.
    wait_for(sent_after_refusal, "the refused shipment, sent again, logged")
    text = log.read_text(errors="replace")
    assert "sending whole chunks" not in text, [line for line in text.splitlines() if "whole chunks" in line]
    # The next small rewrite still goes as a delta (a few KiB, not a chunk of random bytes). Its own line, not
    # the one before (lonely.bin sent again whole with the first rewrite's delta: 2 chunks, ~71 KiB).
    before = len(sent_after_refusal())
    _rewrite_in_place(big, 2_500_000, 3000, seed=2)
    wait_for(pair.in_sync, "the next rewrite")
    wait_for(lambda: len(sent_after_refusal()) > before, "the rewrite's shipment logged")
    text = log.read_text(errors="replace")
    last = sent_after_refusal()[before]
    assert _small(last[1]), (last, [line for line in text.splitlines() if "WARNING" in line or "applied (" in line])


@pytest.mark.parametrize("damaged", ["tables/orders/part-0.bin", "tables/orders/part-1.bin"])
def test_s60b_the_whole_chunk_retry_reports_what_the_first_try_sent(pair: Pair, damaged: str) -> None:  # noqa: F811
    """Was low (figures and drsync_shipped_bytes_total under-counted), fixed. Two files rewritten in place;
    the standby's copy of one file's base is damaged. When the upload reaches the other file's chunk first,
    the first try sends it as a delta (stored there) and is refused at the damaged one; the retry sends only
    that one, whole. The run's figures reported only the retry: ``missing_chunks`` 1 and ``delta_chunks`` 0.
    Now they count what crossed the link in both tries (a chunk whose message was refused and sent again
    counts twice: its bytes crossed twice)."""
    from tests.test_breaker_s60 import _chunk_at, _damage_chunk_on_standby

    with open(pair.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    a = pair.prod / "tables" / "orders" / "part-0.bin"
    b = pair.prod / "tables" / "orders" / "part-1.bin"
    _damage_chunk_on_standby(pair, _chunk_at(pair, damaged, 1_500_000))
    _rewrite_in_place(a, 1_500_000, 3000, seed=1)
    _rewrite_in_place(b, 1_500_000, 3000, seed=2)
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
    assert "sending whole chunks" in doc["err"], doc["err"]
    fig = _figures(doc)
    # Whichever chunk the upload reaches first (pack order): both changed chunks went over the link in this
    # run, at least one of them as a delta, and the damaged one whole again.
    assert fig["missing_chunks"] >= 2 and fig["delta_chunks"] >= 1, fig
    whole = _chunk_size(pair, damaged, 1_500_000)
    assert fig["shipped_bytes"] > whole, (fig, whole)
