"""Breaker session 61b: a repository that lost chunks (9b157bb..6d928d8), tried further from the outside:
fan-out and cascades, small files, delta bases, drills and promotions on a damaged standby, read errors
during ``repo repair``, and memory at 1,000,000 chunks.

Each test either guards one of the feature's promises (it held) or pins a fault this breaker found (named in
its docstring as Fn; each of those fails on 6d928d8).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import init_repo, make_tree, run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.test_breaker_s61 import _plain_repo, _repo_state
from tests.test_lost_chunks import _once, _standby_repo
from tests.zk import free_port


def _loc(repo: Path, cid: bytes):  # type: ignore[no-untyped-def]
    loc = Repository.open(open_storage(str(repo))).index.get(cid)
    assert loc is not None
    return loc


def _rot(repo: Path, cid: bytes) -> Path:
    """Flip bytes in the middle of chunk ``cid`` where ``repo`` stores it (a bad sector); its pack."""
    loc = _loc(repo, cid)
    pack = repo / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\x00\xff" * 8)
    return pack


def _agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=out,
                                stderr=out)


def _fixed_config(tmp: Path, name: str, role: str, addr: str, extra: str = "") -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{tmp / (name + "-data")}"\n'
                   f'repository = "{tmp / (name + "-repo")}"\n[agent]\nname = "{name}"\nrole = "{role}"\n'
                   f'listen = "{addr}"\nmetrics = ""\n{extra}')
    init_repo(cfg)
    return cfg


# --- faults ------------------------------------------------------------------------------------------


def test_s61b_a_damaged_delta_base_is_forgotten_and_sent_again(pair: Pair) -> None:  # noqa: F811
    """F1 (medium). Over a limited link (deltas on), the standby's copy of the base of a delta is rotted, and
    an unchanged file names that chunk too. The standby rejects the delta ("a delta against chunks this
    standby cannot read"), the primary sends the changed chunk whole, but the standby keeps the chunk it has
    just found damaged in its index: no repaired.json, every later commit trusts it, and ``repo verify``
    fails for good (each new snapshot names it) although the standby heals by itself when an apply reads
    such a chunk. Expected: the standby forgets the damaged base (and the rest of that pack's damage) as an
    apply's read does, so a following shipment brings it back."""
    from tests.test_breaker_s60 import _chunk_at, _limit, _rewrite_in_place

    big = pair.prod / "tables" / "big.bin"
    big.write_bytes(random.Random(11).randbytes(3 << 20))
    (pair.prod / "tables" / "twin.bin").write_bytes(big.read_bytes())  # the base is named by an unchanged file
    _limit(pair)
    pair.start("standby")
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    _rot(_standby_repo(pair), _chunk_at(pair, "tables/big.bin", 1_500_000))
    _rewrite_in_place(big, 1_500_000, 100)
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and pair.in_sync(), doc
    assert "could not use a delta" in doc["err"], doc["err"]
    for i in range(2):
        (pair.prod / "catalog" / "f003.txt").write_bytes(b"a change elsewhere %d" % i)
        assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    verify = run_drsync("repo", "verify", "--config", pair.standby_cfg)
    assert verify.code == 0, f"the standby still holds the damaged base: {verify.err[-600:]}"


def test_s61b_repair_does_not_forget_a_pack_whose_directory_is_not_mounted(tmp_path: Path) -> None:
    """F2 (low). ``packs/<xx>`` is a link to another disk that is not mounted now (a dangling symlink; a
    pack path that is a directory does the same): the packs under it are listed as gone and ``repo repair``
    forgets their chunks (exit 0). Only "every pack gone" is taken for an unmounted storage; one of two
    disks missing is a read error, not a loss, and once it is back those packs are garbage for the next GC
    (history of files production deleted is lost). A direct read error (EIO, EACCES) is refused (exit 1,
    see the held case below). Expected: refused, nothing changed (or at least not forgotten by default)."""
    repo, _ = _plain_repo(tmp_path, snapshots=3)
    sub = sorted((repo / "packs").iterdir())[0]
    moved = tmp_path / "disk2" / sub.name
    moved.parent.mkdir()
    sub.rename(moved)
    sub.symlink_to(tmp_path / "unmounted" / sub.name)  # dangling: the disk is not mounted
    before = _repo_state(repo)
    r = run_drsync("repo", "repair", "--repo", repo, "--json")
    assert r.code != 0 or r.json()["forgotten_chunks"] == 0, r.out
    assert _repo_state(repo) == before


def _group_with_damaged_old_point(tmp_path: Path, zk_server, group: str):  # type: ignore[no-untyped-def]
    """east (primary) and west; part-0.bin rewritten at its start after the first snapshot, so the first
    chunk of its old version is named only by west's first snapshot; east killed; that chunk rotted in
    west's repository. Returns (group, first snapshot id)."""
    from tests.group import Group

    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], extra="", replication="")
    for n in g.names:
        g.start(n)
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")
    with open(g.data["east"] / "tables" / "orders" / "part-0.bin", "r+b") as f:
        f.seek(100)
        f.write(random.Random(2).randbytes(5000))
    wait_for(lambda: g.in_sync("east", "west"), "west to follow")
    g.kill("east")
    repo = Repository.open(open_storage(str(tmp_path / "west-repo")))
    first = repo.list_snapshots()[0]
    row = next(e for e in repo.load_manifest(first).entries() if e.path == "tables/orders/part-0.bin")
    _rot(tmp_path / "west-repo", row.chunks[0])
    return g, first.id


def test_s61b_a_failed_promote_to_a_damaged_point_leaves_no_hold(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """F3 (medium). ``drsync promote --to-snapshot ID`` on a standby whose copy of that snapshot has a rotted
    chunk: exit 1, "not promoted: applying snapshot … first failed: … nothing was changed". But the agent
    saved an operator hold before the apply and keeps it: when its primary comes back, the standby stores
    shipments and applies none ("standby west holds applies (drsync apply --hold since …)", a WARNING at each
    cycle, a hold the operator never asked for) and ``repo gc`` refuses ("applies are held"). Expected:
    nothing changed means no hold; the next shipment is applied."""
    g, first = _group_with_damaged_old_point(tmp_path, zk_server, group)
    try:
        before = tree_state(g.data["west"])
        wait_for(lambda: g.primary() is None, "east's ZooKeeper session to expire")
        pr = g.drsync("west", "promote", "--to-snapshot", first, "--force", "--accept-data-loss", "--no-fence")
        assert pr.code == 1 and "nothing was changed" in pr.err, pr
        assert tree_state(g.data["west"]) == before
        g.start("east")
        assert g.promote("east", "--force").code == 0
        (g.data["east"] / "catalog" / "after.txt").write_text("after the failed promotion")
        wait_for(lambda: g.in_sync("east", "west"), "west to apply the next shipment")
    finally:
        g.stop_all()


def test_s61b_promote_dry_run_to_a_damaged_point_says_it_would_fail(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """F4 (low, fixed in s62). ``promote --dry-run`` promises "run every check … exit code as the promotion would end".
    For ``--to-snapshot`` at a point whose chunk is rotted in the standby's repository it says "ok point
    applies snapshot …" and exits 0; the promotion itself then exits 1 (the apply reads the damaged
    chunk). Expected: the dry run checks the point's chunks (as ``drill run --to-snapshot`` does) and exits
    as the promotion would."""
    g, first = _group_with_damaged_old_point(tmp_path, zk_server, group)
    try:
        wait_for(lambda: g.primary() is None, "east's ZooKeeper session to expire")
        before = tree_state(g.data["west"])
        dry = g.drsync("west", "promote", "--to-snapshot", first, "--force", "--accept-data-loss", "--no-fence",
                       "--dry-run")
        assert "drsync repo repair" in dry.out + dry.err, (dry.out, dry.err)
        assert tree_state(g.data["west"]) == before
        real = g.drsync("west", "promote", "--to-snapshot", first, "--force", "--accept-data-loss", "--no-fence")
        assert dry.code == real.code, (dry.out, real.err)
    finally:
        g.stop_all()


def _million_chunk_repo(base: Path, n: int = 1_000_000, per: int = 10_000) -> Path:
    """A real repository (one small snapshot) plus ``n`` tiny real chunks in packs of ``per``, each pack with
    its own index file; the 7th pack deleted."""
    from drsync.repository.ids import ids_array
    from drsync.repository.packs import IndexRows, PackWriter, write_index

    repo, data = base / "repo", base / "data"
    data.mkdir(parents=True)
    for i in range(5):
        (data / f"f{i}").write_bytes(os.urandom(150_000))
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    st = open_storage(str(repo))
    doomed = ""
    for p in range(n // per):
        w = PackWriter(st)
        ids, offs, sl, rl, en = [], [], [], [], []
        for k in range(per):
            raw = (p * per + k).to_bytes(8, "big") + b"synthetic"
            enc, stored = chunks.encode(raw)
            e = w.add(chunks.chunk_id(raw), enc, stored, len(raw))
            ids.append(chunks.chunk_id(raw))
            offs.append(e.offset)
            sl.append(len(stored))
            rl.append(len(raw))
            en.append(enc)
        w.finish(durable=False)
        write_index(st, f"{fmt.INDEX_DIR}{os.urandom(16).hex()}.parquet",
                    IndexRows(ids_array(ids), np.zeros(per, np.uint32), np.array(offs, np.uint64),
                              np.array(sl, np.uint32), np.array(rl, np.uint32), np.array(en, np.uint8), (w.pack_id,)),
                    durable=False)
        if p == 6:
            doomed = w.name
    (repo / doomed).unlink()
    return repo


@pytest.mark.skipif(os.environ.get("DRSYNC_RELIABILITY") != "full", reason="builds 1,000,000 chunks (~1 min)")
def test_s61b_repair_stays_under_300_mib_at_a_million_chunks(tmp_path: Path) -> None:
    """F5 (medium). README: 300 MiB at 1,000,000 chunks. ``repo repair`` (and ``--dry-run``) of a repository
    of 1,000,000 chunks that lost one pack of 10,000 peaks at about 303-307 MiB (``repo verify`` of the same
    repository: about 218 MiB); the standby's own forgetting (the same ``repair.forget`` in a process that
    holds the agent's imports and its loaded index) at about 349 MiB."""
    repo = _million_chunk_repo(tmp_path)
    peaks = {}
    for extra in (["--dry-run"], []):
        r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "drsync", "repo", "repair",
                            "--repo", str(repo), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        peaks[" ".join(extra) or "repair"] = int(r.stderr.strip().splitlines()[-1]) / 1024
    assert max(peaks.values()) <= 300, peaks


@pytest.mark.skipif(os.environ.get("DRSYNC_RELIABILITY") != "full", reason="builds 1,000,000 chunks (~1 min)")
def test_s61b_a_standby_forgets_a_lost_pack_under_300_mib_at_a_million_chunks(tmp_path: Path) -> None:
    """F5 (medium), the standby's path: what :meth:`Committer.forget_lost` runs, in a process with the
    agent's modules imported and its index loaded (as a standby's is after a commit)."""
    repo = _million_chunk_repo(tmp_path)
    script = ("import sys, resource\nimport drsync.agent.standby\nfrom drsync.repository.repo import Repository\n"
              "from drsync.repository import repair\nfrom drsync.storage import open_storage\n"
              "r = Repository.open(open_storage(sys.argv[1]))\nr.index.get(b'\\0' * 32)\n"
              "with r.lock(exclusive=True, wait_s=5) as lock:\n    rep = repair.forget(r, lock)\n"
              "assert rep.forgotten_chunks == 10000\nr.index.get(b'\\0' * 32)\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    r = subprocess.run([sys.executable, "-c", script, str(repo)], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) <= 300, r.stdout


# --- promises that held ------------------------------------------------------------------------------


def test_s61b_fan_out_only_the_standby_that_lost_a_pack_is_sent_it_again(tmp_path: Path) -> None:
    """Held: one primary, two standbys; only b lost the pack of an unchanged file. One shipment: b is asked
    about every chunk and gets it back (2 chunks sent), the other gets only the change; both match
    production and verify."""
    p = Pair(tmp_path)
    try:
        b_addr = f"127.0.0.1:{free_port()}"
        (tmp_path / "b-data").mkdir()
        b_cfg = _fixed_config(tmp_path, "b", "standby", b_addr)
        p.primary_cfg.write_text(p.primary_cfg.read_text().replace(
            f'standbys = ["{p.standby_addr}"]', f'standbys = ["{p.standby_addr}", "{b_addr}"]'))
        p.start("standby")
        p.procs["b"] = _agent(b_cfg, tmp_path / "b.log")
        wait_for(lambda: _once(p.primary_cfg)["code"] == 0, "both standbys to take the first shipment")
        assert p.in_sync() and tree_state(tmp_path / "b-data") == tree_state(p.prod)
        lonely = p.prod / "catalog" / "lonely.bin"
        lonely.write_bytes(random.Random(7).randbytes(70_000))
        assert _once(p.primary_cfg)["code"] == 0
        b_repo = tmp_path / "b-repo"
        (b_repo / fmt.pack_name(_loc(b_repo, chunks.chunk_id(lonely.read_bytes())).pack_id)).unlink()
        (p.prod / "catalog" / "f003.txt").write_bytes(b"change")
        doc = _once(p.primary_cfg)
        assert doc["code"] == 0, doc
        assert doc["results"][b_addr]["missing_chunks"] == 2 and doc["results"][p.standby_addr]["missing_chunks"] == 1
        assert f"asking {b_addr} about every chunk" in doc["err"] and p.standby_addr not in doc["err"]
        assert p.in_sync() and tree_state(tmp_path / "b-data") == tree_state(p.prod)
        for cfg in (b_cfg, p.standby_cfg):
            assert run_drsync("repo", "verify", "--config", cfg).code == 0
    finally:
        p.stop_all()


def test_s61b_a_cascade_heals_the_middle_and_the_far_standby(tmp_path: Path) -> None:
    """Held: prod -> near -> far (fixed roles, near relays). Both near and far lost the pack of an unchanged
    file. The next shipment: prod asks near about every chunk and resends; near, once applied, relays and
    asks far about every chunk and resends from its own (healed) repository. All three match; both verify."""
    addr = {n: f"127.0.0.1:{free_port()}" for n in ("prod", "near", "far")}
    nxt = {"prod": "near", "near": "far"}
    make_tree(tmp_path / "prod-data", files=20, big=1)
    procs, cfgs = {}, {}
    try:
        for name in ("far", "near", "prod"):
            if name != "prod":
                (tmp_path / f"{name}-data").mkdir()
            extra = '[replication]\ninterval = "1s"\n' + (f'standbys = ["{addr[nxt[name]]}"]\n' if name in nxt else "")
            cfgs[name] = _fixed_config(tmp_path, name, "primary" if name == "prod" else "standby", addr[name], extra)
            if name != "prod":
                procs[name] = _agent(cfgs[name], tmp_path / f"{name}.log")
        prod = tmp_path / "prod-data"

        def synced() -> bool:
            return all(tree_state(tmp_path / f"{n}-data") == tree_state(prod) for n in ("near", "far"))

        wait_for(lambda: _once(cfgs["prod"])["code"] == 0, "near to take the first shipment")
        wait_for(synced, "far to follow through near")
        lonely = prod / "catalog" / "lonely.bin"
        lonely.write_bytes(random.Random(7).randbytes(70_000))
        assert _once(cfgs["prod"])["code"] == 0
        wait_for(synced, "the lonely file to reach far")
        for who in ("near", "far"):
            r = tmp_path / f"{who}-repo"
            (r / fmt.pack_name(_loc(r, chunks.chunk_id(lonely.read_bytes())).pack_id)).unlink()
        (prod / "catalog" / "f003.txt").write_bytes(b"change")
        doc = _once(cfgs["prod"])
        assert doc["code"] == 0 and "every chunk" in doc["err"], doc
        wait_for(synced, "far to heal through near")
        wait_for(lambda: "standby far holds every chunk" in (tmp_path / "far.log").read_text(), "far's heal")
        for who in ("near", "far"):
            assert run_drsync("repo", "verify", "--config", cfgs[who]).code == 0, who
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=60)


def test_s61b_rotted_small_files_copied_on_production_heal_in_one_shipment(pair: Pair) -> None:  # noqa: F811
    """Held: 300 small files share one pack on the standby; three of their chunks are rotted. Production
    copies a third of them to new names (the standby's apply reads its own chunks for the copies). The
    shipment is refused for the first damaged chunk, the standby forgets every damaged chunk of that pack,
    and the same shipment sends them: the root matches and the repository verifies."""
    pair.start("standby")
    d = pair.prod / "small"
    d.mkdir()
    rnd = random.Random(5)
    for i in range(300):
        (d / f"s{i:03d}.txt").write_bytes(rnd.randbytes(rnd.randrange(100, 5000)))
    assert _once(pair.primary_cfg)["code"] == 0 and pair.in_sync()
    packs = {_rot(_standby_repo(pair), chunks.chunk_id((d / f"s{i:03d}.txt").read_bytes())) for i in (10, 151, 299)}
    assert len(packs) == 1
    (pair.prod / "copy").mkdir()
    for i in range(0, 300, 3):
        (pair.prod / "copy" / f"c{i:03d}.txt").write_bytes((d / f"s{i:03d}.txt").read_bytes())
    (pair.prod / "copy" / "c010.txt").write_bytes((d / "s010.txt").read_bytes())
    doc = _once(pair.primary_cfg)
    assert doc["code"] == 0 and "is damaged; it forgets it" in doc["err"], doc
    assert pair.in_sync()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0  # s151 (not copied) came back too


@pytest.mark.skipif(subprocess.run(["which", "strace"], capture_output=True).returncode != 0, reason="strace")
@pytest.mark.parametrize("inject", ["openat:error=EIO", "openat:error=EACCES", "pread64:error=EIO",
                                    "newfstatat:error=EIO"])
def test_s61b_a_read_error_on_a_pack_is_not_a_loss_for_repair(tmp_path: Path, inject: str) -> None:
    """Held: an I/O or permission error reading one pack makes ``repo repair`` fail (exit 1, one line naming
    the error), forgetting nothing."""
    repo, _ = _plain_repo(tmp_path)
    pack = sorted((repo / "packs").rglob("*.pack"))[0]
    before = _repo_state(repo)
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(pack), "-e", f"inject={inject}",
                        sys.executable, "-m", "drsync", "repo", "repair", "--repo", str(repo)],
                       capture_output=True, text=True)
    err = [line for line in r.stderr.splitlines() if not line.startswith("strace:")]
    assert r.returncode == 1 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert _repo_state(repo) == before


def test_s61b_a_failed_drill_names_repo_repair_and_following_it_heals(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Held: a chunk nothing applies reads is rotted on the standby; ``drill run --full`` fails at verify
    naming ``drsync repo repair``; running it while the primary keeps shipping brings the chunk back, and
    the next drill passes."""
    from tests.group import Group

    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], extra="", replication="")
    try:
        for n in g.names:
            g.start(n)
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")
        repo = Repository.open(open_storage(str(tmp_path / "west-repo")))
        row = next(e for e in repo.load_manifest(repo.list_snapshots()[-1]).entries()
                   if e.path == "tables/orders/part-0.bin")
        _rot(tmp_path / "west-repo", row.chunks[-1])
        drill = g.drsync("west", "drill", "run", "--full")
        assert drill.code == 1 and "drsync repo repair" in drill.err, drill
        assert g.drsync("west", "repo", "repair").code == 0
        (g.data["east"] / "catalog" / "f003.txt").write_text("nudge")
        wait_for(lambda: not (tmp_path / "west-repo" / fmt.REPAIRED_NAME).exists(), "west to heal")
        assert g.drsync("west", "drill", "run", "--full").code == 0
    finally:
        g.stop_all()
