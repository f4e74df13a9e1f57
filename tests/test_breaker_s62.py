"""Breaker session 62: manifests by reference and by patch (d6b0b9a..7d270fc), the dictionary-less manifest
writer, and ``promote --dry-run`` reading the chunks of a recovery point (f42485b), tried from the outside.

Each test either guards one of the session's promises (it held; said so in its docstring) or pins a fault
this breaker found (named in its docstring as Fn, with its severity; each of those failed on 7d270fc and
was fixed in the same session).
Real agents over real gRPC, real repositories and files; no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import blake3
import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from drsync.repository import format as fmt
from drsync.repository.manifest import SCHEMA, SCHEMA_V1, Manifest, ManifestFile, ManifestWriter
from drsync.repository.manifest_patch import TOMBSTONE, apply_patch, make_patch
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.pb import drsync_pb2 as pb
from drsync.transport.pb import drsync_pb2_grpc as pb_grpc
from tests.conftest import run_drsync, tree_state
from tests.test_agents import Pair, pair, wait_for  # noqa: F401 - pair is a fixture
from tests.test_manifest_reference import _many_files

# --- helpers ------------------------------------------------------------------------------------------


def _limit(p: Pair) -> None:
    """A bandwidth limit in force: the primary takes the link for a limited one (patches, deltas)."""
    with open(p.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')


def _once(p: Pair) -> tuple[dict, str]:
    """One primary cycle (``drsync agent --once --json``): (its one target's figures, its stderr)."""
    r = run_drsync("agent", "--config", p.primary_cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err)
    results = r.json()["results"]
    assert len(results) == 1, results
    return next(iter(results.values())), r.err


def _prod_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.prod_site.url("primary-repo")))


def _standby_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.standby_site.url("standby-repo")))


def _applied(p: Pair) -> str:
    r = run_drsync("status", "--config", p.standby_cfg, "--points", "--json")
    assert r.code == 0, r.err
    return next(x["id"] for x in r.json()["points"] if x["state"] == "applied")


def _escaping_through_a_link(root: Path) -> None:
    """A link that escapes the root only through another link (``deep/up`` -> ``..`` is the root;
    ``esc`` -> ``deep/up/..`` is lexically inside, resolved outside): the capture leaves it out once every
    link is known, rewriting its manifest (capture._without_paths)."""
    (root / "deep").mkdir(exist_ok=True)
    os.symlink("..", root / "deep" / "up")
    os.symlink("deep/up/..", root / "esc")


def _to_v1(v2: bytes) -> bytes:
    """A version-1 manifest (drsync before 2026-12: UTF-8 path and target strings, one mtime_ns column,
    no attribute columns) of the same rows, as that release wrote it."""
    t = Manifest.from_bytes(v2).table
    ns = pc.add(pc.multiply(t.column("mtime_s"), 10**9), pc.cast(t.column("mtime_nsec"), pa.int64()))
    cols = {f.name: ns if f.name == "mtime_ns" else pc.cast(t.column(f.name), f.type) for f in SCHEMA_V1}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols, schema=SCHEMA_V1.with_metadata({"drsync.format": "1"})), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _make_v1(repo: Path, snap: str) -> None:
    """Snapshot ``snap``'s manifest in ``repo`` rewritten as version 1 (its document's hash with it), as a
    repository written by the release before holds it."""
    mp = repo / fmt.manifest_name(snap)
    data = _to_v1(mp.read_bytes())
    mp.write_bytes(data)
    dp = repo / fmt.snapshot_name(snap)
    doc = json.loads(dp.read_bytes())
    doc["manifest_hash"] = blake3.blake3(data).hexdigest()
    dp.write_text(json.dumps(doc))


# --- faults -------------------------------------------------------------------------------------------


def test_s62_a_capture_that_left_out_an_escaping_link_rebuilds_from_its_patch(tmp_path: Path) -> None:
    """F1 (medium, fixed). A tree holding a link that escapes the root through another link (left out by the capture,
    which then rewrites its manifest with ``capture._without_paths``) gets a manifest that no patch rebuilds:
    not even the empty patch of that manifest against itself gives its bytes back. The rewrite passes the
    schema read back from Parquet (``ManifestFile.schema``: list items named "element") to ManifestWriter,
    where every other writer (and ``apply_patch``) uses :data:`SCHEMA` ("item"), so the ARROW:schema footer
    differs. Over a far or limited link each such cycle sends a patch, is refused (ABORTED), sends the bytes,
    and turns patches off for the primary's process (with ``--once`` it pays patch plus bytes every cycle).
    The same goes for a capture with stale rows (``Manifest(table).to_spool()`` of a table read back).
    Expected: the manifest is rebuilt byte for byte from a patch, as any other capture's."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    (data / "catalog").mkdir(parents=True)
    for i in range(20):
        (data / "catalog" / f"f{i:02}.txt").write_text(f"file {i}\n" * 50)
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    _escaping_through_a_link(data)
    (data / "catalog" / "f03.txt").write_text("changed\n")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    r = Repository.open(open_storage(str(repo)))
    first, second = r.list_snapshots()
    assert b"esc" not in Manifest.from_bytes(r.manifest_bytes(second)).table.column("path").to_pylist()
    base, new = ManifestFile(r.manifest_spool(first)), ManifestFile(r.manifest_spool(second))
    patch, rows = make_patch(base, new)
    assert rows >= 1
    assert apply_patch(base, ManifestFile(patch)).hexdigest() == second.manifest_hash, \
        "the manifest of the capture that left out an escaping link is not rebuilt from its patch"


def test_s62_a_limited_link_sends_a_patch_for_a_tree_with_an_escaping_link(pair: Pair) -> None:  # noqa: F811
    """F1 (medium, fixed), as an operator sees it: a bandwidth limit in force, the production tree holds a link that
    escapes through another link (reported, left out). The second cycle changed one file: its commit sends a
    patch, the standby rebuilds another manifest (ABORTED: "the sender writes manifests otherwise"), the bytes
    go after the patch and the primary sends manifests whole to that standby from then on. Expected:
    ``manifest_sent`` "patch", no refusal."""
    _many_files(pair.prod, 2000)  # a manifest a few changed rows are a small part of
    _escaping_through_a_link(pair.prod)
    _limit(pair)
    pair.start("standby")
    first, _ = _once(pair)
    assert first["manifest_sent"] == "bytes", first  # nothing applied there yet
    (pair.prod / "catalog" / "f003.txt").write_text("changed")
    second, err = _once(pair)
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _applied(pair) == newest.id, "the standby to apply the second snapshot")
    assert "was sent whole" not in err, err[-1500:]
    assert second["manifest_sent"] == "patch", second


def test_s62_a_refused_reference_does_not_turn_patches_off(pair: Pair) -> None:  # noqa: F811
    """F2 (low, fixed). Over a limited link, an unchanged capture's commit names the manifest the standby applied;
    that standby's copy is damaged, so it answers ABORTED and is sent the bytes, as promised. But the shipper
    computed ``patch_of`` too (the link is limited), and takes any refusal with ``patch_of`` set for a refused
    patch: "(and is to standby from now on)", ``whole_manifests`` set, so every later changed cycle of that
    process sends its manifest whole although no patch was ever refused (a rotted copy of one old manifest
    costs the WAN link 73 bytes a file a cycle until the agent restarts). Expected: a refused reference sends
    the bytes of that commit only; patches stay on."""
    _limit(pair)
    pair.start("standby")
    _once(pair)
    applied = _applied(pair)
    path = Path(pair.standby_site.url("standby-repo")) / fmt.manifest_name(applied)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    res, err = _once(pair)  # nothing changed: by reference, refused, the bytes sent
    assert res["manifest_sent"] == "bytes" and "was sent whole" in err, (res, err[-1500:])
    assert "from now on" not in err, f"a refused reference turned manifest patches off: {err[-1500:]}"


# --- promises that held -------------------------------------------------------------------------------


def test_s62_a_version_1_applied_manifest_is_patched_and_named(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (3 and 4). The pair was upgraded in place: the snapshot the standby applied has a
    version-1 manifest on both sides (written by the release before). Over a limited link, the first changed
    cycle of the new release sends a patch of that version-1 manifest; the standby merges it into its own
    copy and rebuilds the new manifest byte for byte; the next, unchanged cycle names its manifest. Both
    repositories verify, the roots match."""
    _many_files(pair.prod, 2000)  # a manifest a few changed rows are a small part of
    _limit(pair)
    pair.start("standby")
    _once(pair)
    applied = _applied(pair)
    pair.stop_all()
    _make_v1(Path(pair.prod_site.url("primary-repo")), applied)
    _make_v1(Path(pair.standby_site.url("standby-repo")), applied)
    assert ManifestFile(_standby_repo(pair).manifest_spool(_standby_repo(pair).find_snapshot(applied))).is_v1
    pair.start("standby")
    (pair.prod / "catalog" / "f002.txt").write_text("after the upgrade")
    (pair.prod / "catalog" / "f004.txt").unlink()
    res, err = _once(pair)
    assert res["manifest_sent"] == "patch" and "was sent whole" not in err, (res, err[-1500:])
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _applied(pair) == newest.id, "the standby to apply the patched snapshot")
    res, err = _once(pair)
    assert res["manifest_sent"] == "reference" and res["manifest_bytes"] == 0, res
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _applied(pair) == newest.id, "the standby to apply the named snapshot")
    assert pair.in_sync()
    pair.stop_all()
    for cfg in (pair.primary_cfg, pair.standby_cfg):
        v = run_drsync("repo", "verify", "--config", cfg)
        assert v.code == 0, v.err[-1500:]


def _rogue(p: Pair) -> tuple[grpc.Channel, pb_grpc.ReplicationStub, int]:
    channel = grpc.insecure_channel(p.standby_addr)
    stub = pb_grpc.ReplicationStub(channel)
    return channel, stub, int(stub.Hello(pb.HelloRequest(sender="primary", epoch=0)).epoch)


def _patch_of_rows(rows: list[dict], metadata: dict | None = None) -> bytes:
    w = ManifestWriter(SCHEMA.with_metadata(metadata) if metadata else SCHEMA)
    w.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    return w.finish().getvalue()


def _row(path: bytes, kind: str = "file") -> dict:
    return {"path": path, "type": kind, "mode": 0o644, "uid": 0, "gid": 0, "size": 0, "mtime_s": 0,
            "mtime_nsec": 0, "chunks": [], "chunk_sizes": []}


def test_s62_rogue_patches_never_commit_a_manifest_the_document_does_not_name(pair: Pair) -> None:  # noqa: F811
    """Guards a promise (3, safety). A rogue sender with the right epoch commits the document of a real
    snapshot the standby lacks with hand-made patches of the applied manifest: a tombstone for the root path
    "" and for every path, duplicate paths, a row of type "-" with fields, a patch naming a snapshot the
    standby never had, and a correct patch taken against another snapshot than the one named. Each is
    refused (ABORTED or INVALID_ARGUMENT), nothing is committed, the root stays the applied snapshot."""
    pair.start("standby")
    _once(pair)
    applied = _applied(pair)
    prod = _prod_repo(pair)
    (pair.prod / "catalog" / "rogue-target.txt").write_text("a tree the standby has not seen")
    assert run_drsync("snapshot", "create", "--config", pair.primary_cfg).code == 0
    other = prod.list_snapshots()[-1]
    doc = prod.find_snapshot(other.id).to_bytes()
    base = ManifestFile(prod.manifest_spool(prod.find_snapshot(applied)))
    meta = base.schema.metadata
    paths = sorted(base.read().table.column("path").to_pylist())
    hostile = {
        "tombstone for the root": _patch_of_rows([_row(b"", TOMBSTONE)], meta),
        "tombstone for every path": _patch_of_rows([_row(p, TOMBSTONE) for p in paths], meta),
        "duplicate paths": _patch_of_rows([_row(b"catalog/x"), _row(b"catalog/x")], meta),
        "a live tombstone": _patch_of_rows([{**_row(b"catalog/f001.txt", TOMBSTONE), "size": 5}], meta),
    }
    channel, stub, epoch = _rogue(pair)
    try:
        for what, patch in hostile.items():
            try:
                stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, patch_of=applied,
                                                manifest=patch)]))
                raise AssertionError(f"{what}: committed")
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT), (what, e.details())
        good, _ = make_patch(base, ManifestFile(prod.manifest_spool(other)))
        for named in ("nosuchsnapshot", ""):
            try:
                stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, patch_of=named,
                                                manifest=good.getvalue())]))
                raise AssertionError(f"patch_of {named!r}: committed")
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT), e.details()
    finally:
        channel.close()
    assert _applied(pair) == applied
    assert not _standby_repo(pair).storage.exists(fmt.snapshot_name(other.id))
    pair.assert_root_is_applied_snapshot("after rogue patches")


@pytest.mark.parametrize("how", ["missing", "truncated", "another manifest", "a directory"])
def test_s62_a_named_manifest_gone_or_replaced_on_the_standby_is_sent_whole(pair: Pair, how: str) -> None:  # noqa: F811
    """Guards a promise (2). The manifest file of the snapshot the standby applied is gone, truncated, replaced
    by another snapshot's valid manifest, or a directory: an unchanged cycle names it, the standby answers
    ABORTED, the primary sends the bytes in the same cycle (WARNING "... was sent whole"), and the snapshot is
    applied with an intact manifest."""
    pair.start("standby")
    _once(pair)
    (pair.prod / "catalog" / "f001.txt").write_text("a second tree")
    _once(pair)
    standby = _standby_repo(pair)
    older, applied = [s.id for s in standby.list_snapshots()][-2:]
    assert _applied(pair) == applied
    root = Path(pair.standby_site.url("standby-repo"))
    path = root / fmt.manifest_name(applied)
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    elif how == "another manifest":
        path.write_bytes((root / fmt.manifest_name(older)).read_bytes())
    else:
        path.unlink()
        path.mkdir()
    res, err = _once(pair)  # nothing changed since: by reference
    assert res["manifest_sent"] == "bytes" and "was sent whole" in err, (res, err[-1500:])
    newest = _prod_repo(pair).list_snapshots()[-1]
    wait_for(lambda: _applied(pair) == newest.id, "the standby to apply the snapshot sent with its bytes")
    s = _standby_repo(pair)
    s.manifest_spool(s.find_snapshot(newest.id)).close()  # checked against its hash
    assert pair.in_sync()


def _rot_chunk(repo_dir: Path, cid: bytes) -> None:
    """Flip bytes in the middle of chunk ``cid`` where ``repo_dir`` stores it (a bad sector)."""
    loc = Repository.open(open_storage(str(repo_dir))).index.get(cid)
    assert loc is not None
    pack = repo_dir / fmt.pack_name(loc.pack_id)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_length // 2)
        f.write(b"\x00\xff" * 8)


def _delayed_with_damaged_received_point(make_group, max_lag: str):  # type: ignore[no-untyped-def]
    """east primary, west its standby with apply_delay 1h; a new file reaches west's repository (pending, not
    applied), east is killed, and that file's chunk is rotted in west's repository. Returns (group, the
    received snapshot)."""
    from tests.test_pointintime import KEEP_ALL, _received_holding, _synced

    g = _synced(make_group, extra=f'max_lag_on_failover = "{max_lag}"\n' + KEEP_ALL,
                replication='apply_delay = "1h"')
    (g.data["east"] / "catalog" / "late.txt").write_bytes(os.urandom(200_000))
    received = _wait_value(lambda: _received_holding(g, "west", "catalog/late.txt"), "west to receive late.txt")
    g.kill("east", signal.SIGKILL)
    repo_dir = g.tmp / "west-repo"
    repo = Repository.open(open_storage(str(repo_dir)))
    info = repo.find_snapshot(received)
    row = next(e for e in repo.load_manifest(info).entries() if e.path == "catalog/late.txt")
    _rot_chunk(repo_dir, row.chunks[0])
    return g, info


def _wait_value(cond, what: str):  # type: ignore[no-untyped-def]
    from tests.group import wait_for as group_wait_for
    return group_wait_for(cond, what, 60, step=0.1)


def test_s62_dry_run_apply_received_at_a_damaged_point_exits_as_the_promotion(make_group) -> None:  # type: ignore[no-untyped-def]
    """Guards a promise (1). ``promote --apply-received --dry-run`` on a delayed standby whose newest received
    snapshot has a rotted chunk (in a file the root lacks): the dry run reads it and fails (exit 1, naming
    drsync repo repair), as the real promotion then does (exit 1, nothing changed); the dry run changes
    nothing (root, repository, the group's epoch)."""
    g, _ = _delayed_with_damaged_received_point(make_group, "1h")
    try:
        root, repo = tree_state(g.data["west"]), _repo_files(g.tmp / "west-repo")
        dry = g.promote("west", "--apply-received", "--force", "--no-fence", "--dry-run")
        assert dry.code == 1 and "drsync repo repair" in dry.out + dry.err, (dry.out, dry.err)
        assert tree_state(g.data["west"]) == root and _repo_files(g.tmp / "west-repo") == repo
        assert g.connected().read_epoch().epoch == 1
        real = g.promote("west", "--apply-received", "--force", "--no-fence")
        assert real.code == dry.code, (real.out, real.err)
        assert tree_state(g.data["west"]) == root
    finally:
        g.stop_all()


def _repo_files(repo_dir: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(repo_dir.rglob("*")):
        rel = p.relative_to(repo_dir).as_posix()
        if p.is_file() and not rel.startswith(("agent/", "locks/")):
            out[rel] = blake3.blake3(p.read_bytes()).digest()
    return out


def test_s62_dry_run_at_a_damaged_point_exits_as_a_promotion_refused_for_lag(make_group) -> None:  # type: ignore[no-untyped-def]
    """F3 (low, fixed). ``promote --dry-run`` "exits as the promotion would (0, 1 or 4)". A delayed standby's newest
    received snapshot has a rotted chunk, and its lag is over max_lag_on_failover (no --accept-data-loss):
    the real ``promote --apply-received`` is refused for the lag (exit 4, nothing changed: its point check
    only looks for the chunks, and the lag check fails next), but the dry run, which reads the bytes inside
    the point check, fails that check first and exits 1. Expected: the dry run exits 4 as the promotion
    does (and may still report the damaged point among its checks)."""
    g, received = _delayed_with_damaged_received_point(make_group, "2s")
    try:
        _wait_value(lambda: time.time() - received.captured_at > 4, "the received snapshot's lag to pass 2s")
        dry = g.promote("west", "--apply-received", "--force", "--no-fence", "--dry-run")
        real = g.promote("west", "--apply-received", "--force", "--no-fence")
        assert real.code == 4 and "max_lag_on_failover" in real.err, (real.out, real.err)
        assert dry.code == real.code, (dry.out, real.err)
    finally:
        g.stop_all()


_TO_SPOOL_SCRIPT = r'''
import sys
import pyarrow as pa
from drsync.repository.manifest import Manifest
from tests.test_manifest_patch import _synthetic_table

m = Manifest(_synthetic_table(int(sys.argv[1])))  # a table of several chunks a column, as one read back is
pool = pa.system_memory_pool()  # not used before: its peak is the write's alone
pa.set_memory_pool(pool)
m.to_spool().close()
print(m.table.nbytes >> 20, pool.max_memory() >> 20)
'''


def test_s62_serializing_a_loaded_manifest_does_not_copy_it_whole() -> None:
    """F4 (medium, fixed). 7d270fc makes ManifestWriter combine its pending rows into one chunk a column before each
    write; a caller that hands it a whole table (``Manifest.to_spool``: a light backup's filtered manifest,
    ``backup create --mode light``; a capture's manifest merged with stale rows) now has that whole table
    copied at once (``pa.concat_tables(pending).combine_chunks()`` of every row), not a row group at a time:
    a 300,000-row manifest of 46 MiB allocates 60 MiB of Arrow memory to serialize, where the writer before
    passed zero-copy slices (no copy of the table). At 1,000,000 files (a table of about 160 MiB, held beside
    its copy) that is past the 300 MiB memory target. Expected: at most a couple of row groups copied at a
    time (25 MiB here)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _TO_SPOOL_SCRIPT, "300000"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    table, peak = map(int, r.stdout.split())
    assert table >= 40, r.stdout
    assert peak <= 25, f"serializing a {table} MiB manifest allocated {peak} MiB (the whole table copied)"
