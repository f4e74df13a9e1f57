"""Hostile checks of issue 17's promises (breaker session 32).

1. Lean manifests answer as whole ones, and damaged or hostile manifests are refused with an
   IntegrityError (never a raw TypeError/ValueError, never a partial write) by restores, backups and a
   standby's commit.
2. The negotiation plan asks about exactly the chunk ids of ``new`` that ``applied`` does not name, and
   the counts are exact.
3. README quick start on a tree with odd names.

Tests that fail here are bugs found by the session (see the report); the rest are kept as regressions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import drsync.repository.manifest as manifest_mod
from drsync import engine
from drsync.agent.primary import chunk_table, count_chunks, negotiation_plan
from drsync.apply import apply_manifest
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.manifest import LEAN_LEFT_OUT, Manifest, ManifestFile
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo_at, run_drsync, tree_state
from tests.reliability import combinations
from tests.test_capture_any_tree import exact_state, odd_tree

# --- helpers -----------------------------------------------------------------------------------------


def _parquet(t: pa.Table, row_group: int = 3) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, compression="zstd", row_group_size=row_group)
    return sink.getvalue().to_pybytes()


def _replace_manifest(repo: Path, sid: str, data: bytes) -> None:
    """Put ``data`` in place of snapshot ``sid``'s manifest, with a snapshot document vouching for it (what a
    hostile primary ships, or a bug writes)."""
    (repo / fmt.manifest_name(sid)).write_bytes(data)
    doc = repo / f"{fmt.SNAPSHOTS_DIR}{sid}.json"
    d = json.loads(doc.read_bytes())
    d["manifest_hash"] = blake3.blake3(data).hexdigest()
    doc.write_text(json.dumps(d))


def _with_null(t: pa.Table, column: str, path: bytes) -> pa.Table:
    values = t.column(column).to_pylist()
    values[t.column("path").to_pylist().index(path)] = None
    i = t.schema.get_field_index(column)
    return t.set_column(i, t.schema.field(column), pa.array(values, t.schema.field(column).type))


def _two_snapshots(base: Path) -> tuple[Path, Path, str, str]:
    """A repository with two snapshots of a small tree, the first restored onto ``tgt``."""
    src = base / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(b"a" * (10 + i))
    repo = base / "repo"
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    first = r.json()["id"]
    tgt = base / "tgt"
    assert run_drsync("snapshot", "restore", first, "--repo", repo, "--target", tgt).code == 0
    (src / "f2").write_bytes(b"changed!")
    (src / "f6").write_bytes(b"changed too")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    return repo, tgt, first, r.json()["id"]


# --- 1. hostile manifests ---------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "lean"),
                         combinations(["path", "uid", "gid", "mtime_s", "mtime_nsec"], [False, True]))
def test_a_manifest_with_a_null_value_is_refused_as_damaged(tmp_path: Path, column: str, lean: bool) -> None:
    """Promise 1: a hostile manifest (a null where a value must be) is refused with an IntegrityError by a
    restore from a whole or a lean manifest, not a raw TypeError, and the target is not touched.
    (BUG: null path, uid, gid or mtime leak a TypeError out of validate / the apply.)"""
    repo, tgt, _, sid = _two_snapshots(tmp_path)
    rp = Repository.open(LocalStorage(str(repo)))
    t = rp.load_manifest(rp.find_snapshot(sid)).table
    _replace_manifest(repo, sid, _parquet(_with_null(t, column, b"f6")))
    rp = Repository.open(LocalStorage(str(repo)))
    before = tree_state(tgt)
    # Refused by the load itself now (check_values), or else by the apply: never a TypeError.
    with pytest.raises(IntegrityError):
        apply_manifest(rp.load_manifest(rp.find_snapshot(sid), lean=lean), rp, str(tgt), foreign=None)
    assert tree_state(tgt) == before
    with pytest.raises(IntegrityError):
        apply_manifest(rp.load_manifest(rp.find_snapshot(sid), lean=lean), rp, str(tmp_path / "new-target"))
    assert not (tmp_path / "new-target").exists()
    with pytest.raises(IntegrityError):  # validate over the file (repo verify's way) refuses it too
        validate(rp.open_manifest(rp.find_snapshot(sid)), "manifest")


@pytest.mark.parametrize("column", ["path", "uid"])
def test_the_cli_restore_of_a_null_value_manifest_exits_3(tmp_path: Path, column: str) -> None:
    """Promise 1 / README exit codes: a damaged manifest is an integrity error (exit 3, one line), not
    'internal error: TypeError' (exit 1). (BUG: exit 1, internal error.)"""
    repo, tgt, _, sid = _two_snapshots(tmp_path)
    rp = Repository.open(LocalStorage(str(repo)))
    t = rp.load_manifest(rp.find_snapshot(sid)).table
    _replace_manifest(repo, sid, _parquet(_with_null(t, column, b"f6")))
    before = tree_state(tgt)
    r = run_drsync("snapshot", "restore", sid, "--repo", repo, "--target", tgt, "--overwrite")
    assert tree_state(tgt) == before
    assert r.code == 3, r.err
    assert "internal error" not in r.err


@pytest.mark.parametrize("column", ["path", "uid", "mtime_s"])
def test_repo_verify_refuses_a_manifest_that_cannot_restore(tmp_path: Path, column: str) -> None:
    """validate()'s own promise ('a verified repository restores'): repo verify reports a manifest with a
    null path/uid/mtime as damage (exit 3). (BUG: exit 0 for uid/mtime, exit 1 'internal error' for path.)"""
    repo, _, _, sid = _two_snapshots(tmp_path)
    rp = Repository.open(LocalStorage(str(repo)))
    t = rp.load_manifest(rp.find_snapshot(sid)).table
    _replace_manifest(repo, sid, _parquet(_with_null(t, column, b"f6")))
    r = run_drsync("repo", "verify", "--repo", repo)
    assert r.code == 3, (r.code, r.err)


def _corrupt_column(t: pa.Table, column: str, row_group: int = 4) -> bytes:
    """``t`` serialised with the pages of ``column`` in its second-to-last row group damaged (the hash then
    recomputed: damage a hash cannot catch, e.g. from a buggy or hostile writer)."""
    data = bytearray(_parquet(t, row_group))
    md = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata
    cc = md.row_group(md.num_row_groups - 2).column(t.schema.get_field_index(column))
    start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
    for k in range(start + cc.total_compressed_size - 8, start + cc.total_compressed_size):
        data[k] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("column", ["content", "chunks", "ctime_ns", "inode"])
def test_a_damaged_column_is_refused_by_a_lean_restore_as_by_a_whole_one(tmp_path: Path, column: str) -> None:
    """Promise 1: a lean restore refuses a damaged manifest as a whole load does, before writing anything.
    (BUG for ctime_ns and inode: the lean load never reads those columns, so it restores from a manifest the
    whole load, repo verify's reader, refuses as damaged.)"""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02}").write_bytes(bytes([i]) * (100 + i))
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    t = repo.load_manifest(info).table
    _replace_manifest(tmp_path / "repo", info.id, _corrupt_column(t, column))
    rp = Repository.open(LocalStorage(str(tmp_path / "repo")))
    with pytest.raises(IntegrityError):
        rp.load_manifest(rp.find_snapshot(info.id))
    with pytest.raises(IntegrityError):
        m = rp.load_manifest(rp.find_snapshot(info.id), lean=True)
        apply_manifest(m, rp, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_a_manifest_out_of_order_restores_the_same_tree_lean_or_whole(tmp_path: Path, order: str) -> None:
    """Promise 1: paths out of order (drsync never writes them) still restore exactly, lean or whole; a
    duplicate path is refused with IntegrityError by both."""
    src = tmp_path / "src"
    odd_tree(src)
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    t = repo.load_manifest(info).table
    n = t.num_rows
    perm = np.arange(n)[::-1].copy() if order == "reversed" else np.random.default_rng(1).permutation(n)
    _replace_manifest(tmp_path / "repo", info.id, _parquet(t.take(pa.array(perm))))
    rp = Repository.open(LocalStorage(str(tmp_path / "repo")))
    for lean in (False, True):
        out = tmp_path / f"t-{lean}"
        apply_manifest(rp.load_manifest(rp.find_snapshot(info.id), lean=lean), rp, str(out))
        assert exact_state(out) == exact_state(src)
    dup = pa.concat_tables([t, t.slice(n // 2, 1)]).take(pa.array(np.random.default_rng(2).permutation(n + 1)))
    _replace_manifest(tmp_path / "repo", info.id, _parquet(dup))
    rp = Repository.open(LocalStorage(str(tmp_path / "repo")))
    for lean in (False, True):
        with pytest.raises(IntegrityError, match="appears twice"):
            apply_manifest(rp.load_manifest(rp.find_snapshot(info.id), lean=lean), rp, str(tmp_path / "d"))
        assert not (tmp_path / "d").exists()


def _hostile_shipment(tmp_path: Path, change):  # type: ignore[no-untyped-def]
    """A standby that applied a first snapshot; a second snapshot's chunks sent, and its document and
    manifest as ``change(table)`` makes them (the document's hash matching): (committer, doc, manifest bytes,
    position, standby repo, root, src, second snapshot id)."""
    from tests.test_commit_vouched import make_standby

    src, primary, repo, root, c, _ = make_standby(tmp_path, files=12)
    (src / "f03").write_bytes(b"changed" * 50)
    (src / "new").write_bytes(b"n" * 10)
    second = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    data = _parquet(change(primary.load_manifest(second).table))
    doc = json.loads(second.to_bytes())
    doc["manifest_hash"] = blake3.blake3(data).hexdigest()
    with repo.write_session() as s:
        w = s.chunk_writer()
        for cid in repo.missing_chunks(sorted(primary.load_manifest(second).chunk_ids())):
            loc, stored = primary.read_stored(cid)
            w.add_stored(cid, loc.encoding, stored, loc.raw_length)
        w.flush()
    return c, json.dumps(doc).encode(), data, [1, second.seq], repo, root, src, second.id


@pytest.mark.parametrize("column", ["path", "uid", "mtime_s"])
def test_a_standby_refuses_a_hostile_shipment_before_storing_or_touching_its_root(tmp_path: Path,
                                                                                  column: str) -> None:
    """Promise 1 (Committer.commit from a lean manifest): a shipment whose manifest has a null path/uid/mtime
    is refused with IntegrityError; nothing stored, the root unchanged, the standby not left broken.
    (BUG: a TypeError; the snapshot is stored first; with a null uid the root is changed half-way and
    the committer marks itself broken: 'an apply failed half-way'.)"""
    c, doc, data, position, repo, root, _, sid = _hostile_shipment(tmp_path, lambda t: _with_null(t, column, b"f05"))
    before = tree_state(root)
    with pytest.raises(IntegrityError):
        c.commit(doc, data, position)
    assert tree_state(root) == before
    assert not c.broken
    assert sid not in [s.id for s in repo.list_snapshots()]


def test_a_standby_applies_a_shipment_out_of_path_order_exactly(tmp_path: Path) -> None:
    """Promise 1: a shipment whose manifest rows are reversed (valid, never written by drsync) is applied
    from the lean manifest and leaves the root equal to production."""
    c, doc, data, position, _, root, src, _ = _hostile_shipment(
        tmp_path, lambda t: t.take(pa.array(np.arange(t.num_rows)[::-1].copy())))
    c.commit(doc, data, position)
    assert tree_state(root) == tree_state(src)


# --- 2. negotiation plan ----------------------------------------------------------------------------

# Ids chosen to hurt: sharing their first 8 bytes (the search key), ending in NUL bytes, all NUL, all 0xff.
_PREFIX = b"\x01\x02\x03\x04\x05\x06\x07\x08"
_HOSTILE_IDS = ([_PREFIX + bytes([i]) * 24 for i in range(6)]
                + [_PREFIX + b"\x00" * 24, _PREFIX + b"\x00" * 23 + b"\x01"]
                + [b"\x00" * 32, b"\xff" * 32, b"\x00" * 31 + b"\x01", b"\x01" + b"\x00" * 31]
                + [blake3.blake3(bytes([i])).digest()[:28] + b"\x00" * 4 for i in range(6)]
                + [blake3.blake3(bytes([i])).digest() for i in range(6)])


def _size_of(cid: bytes) -> int:
    return 1 + int.from_bytes(blake3.blake3(cid).digest()[:2], "big")


def _tree(rnd: random.Random, n: int) -> dict[str, tuple]:
    """path -> ('dir',) | ('file', [ids]) | ('ext', size) | ('link', target)."""
    tree: dict[str, tuple] = {"d": ("dir",), "d/e": ("dir",), "x": ("dir",)}
    for i in range(n):
        p = rnd.choice(["d", "d/e", "x"]) + f"/f{i:03}"
        r = rnd.random()
        if r < 0.1:
            tree[p] = ("ext", rnd.randrange(1, 1000))
        elif r < 0.15:
            tree[p] = ("link", "f0")
        elif r < 0.2:
            tree[p] = ("file", [])
        else:
            tree[p] = ("file", [rnd.choice(_HOSTILE_IDS) for _ in range(rnd.randrange(1, 5))])
    return tree


def _manifest_of(tree: dict[str, tuple]) -> Manifest:
    cols: dict[str, list] = {k: [] for k in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns",
                                              "inode", "target", "content", "chunks", "chunk_sizes")}
    for i, (p, v) in enumerate(sorted(tree.items())):
        kind, target, chunks, sizes, size, content = "file", None, [], [], 0, None
        if v[0] == "dir":
            kind = "dir"
        elif v[0] == "link":
            kind, target = "symlink", v[1]
        elif v[0] == "ext":
            sizes, size, content = [v[1]], v[1], blake3.blake3(p.encode()).digest()
        else:
            chunks, sizes = list(v[1]), [_size_of(c) for c in v[1]]
            size, content = sum(sizes), blake3.blake3(b"".join(chunks)).digest()
        for k, x in (("path", p), ("type", kind), ("mode", 0o644), ("uid", 0), ("gid", 0), ("size", size),
                     ("mtime_ns", i), ("ctime_ns", i), ("inode", i), ("target", target), ("content", content),
                     ("chunks", chunks), ("chunk_sizes", sizes)):
            cols[k].append(x)
    return Manifest.from_columns(cols)


def _named(tree: dict[str, tuple]) -> set[bytes]:
    return {c for v in tree.values() if v[0] == "file" for c in v[1]}


def _mutate(rnd: random.Random, tree: dict[str, tuple]) -> dict[str, tuple]:
    new = dict(tree)
    files = sorted(p for p, v in tree.items() if v[0] == "file")
    for _ in range(rnd.randrange(0, 6)):
        op = rnd.randrange(5)
        if op == 0 and files:  # move a file
            p = rnd.choice(files)
            if p in new:
                new["x/moved-" + p.replace("/", "_")] = new.pop(p)
        elif op == 1 and files:  # copy a file
            p = rnd.choice(files)
            if p in new:
                new["d/copy-" + p.replace("/", "_")] = new[p]
        elif op == 2:  # edit: a new chunk list from the pool
            p = rnd.choice(files) if files else "d/new"
            new[p] = ("file", [rnd.choice(_HOSTILE_IDS) for _ in range(rnd.randrange(1, 4))])
        elif op == 3:  # a directory replaced by a file
            for q in [q for q in new if q == "d/e" or q.startswith("d/e/")]:
                del new[q]
            new["d/e"] = ("file", [rnd.choice(_HOSTILE_IDS)])
        else:  # a file becomes external, or the reverse
            p = rnd.choice(files) if files else "d/ext"
            new[p] = ("ext", 77) if new.get(p, ("x",))[0] == "file" else ("file", [rnd.choice(_HOSTILE_IDS)])
    return new


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("group", [1, 4, 65536])
def test_the_negotiation_plan_asks_exactly_what_applied_lacks(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                               group: int) -> None:
    """Promise 2: the ids asked about are exactly new's ids that applied names nowhere (sorted, each once),
    and ChunkCount counts new's distinct chunks and raw bytes exactly; for Manifest and ManifestFile inputs
    (and a lean manifest), over many row groups, with ids sharing their first 8 bytes or ending in NULs,
    moves, copies, edits, a directory replaced by a file, external rows and empty manifests."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    rnd = random.Random(seed)
    old = _tree(rnd, rnd.choice([0, 3, 40]))
    new = _mutate(rnd, old) if seed % 4 else {p: v for p, v in old.items() if v[0] != "file"}
    mo, mn = _manifest_of(old), _manifest_of(new)
    want_ask = sorted(_named(new) - _named(old))
    want_count = (len(_named(new)), sum(_size_of(c) for c in _named(new)))
    forms = lambda m: [m, ManifestFile(m.to_bytes()), Manifest.lean(ManifestFile(m.to_bytes()))]  # noqa: E731
    for a in forms(mo):
        for b in forms(mn):
            count, ask = negotiation_plan(b, a)
            assert ask.to_pylist() == want_ask
            assert (count.chunks, count.raw_bytes) == want_count
    count, ask = negotiation_plan(mn, None)
    assert ask.to_pylist() == sorted(_named(new))
    assert (count.chunks, count.raw_bytes) == want_count
    assert (count_chunks(ManifestFile(mn.to_bytes())).chunks, count_chunks(mn).raw_bytes) == want_count
    t = chunk_table(mn)
    assert t.column("chunk").to_pylist() == sorted(_named(new))
    assert t.column("size").to_pylist() == [_size_of(c) for c in sorted(_named(new))]


def test_ids_sharing_their_first_8_bytes_across_row_groups_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 2: thousands of ids with one 8-byte prefix (more than the sorted-query threshold), spread over
    many row groups, in both manifests: asked about exactly the new ones."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 97)
    rng = np.random.default_rng(5)
    ids = [_PREFIX + bytes(r) for r in rng.integers(0, 256, size=(6000, 24), dtype=np.uint8)]
    ids += [i[:28] + b"\x00" * 4 for i in ids[:500]]
    old = {f"d/f{i:05}": ("file", [ids[i], ids[(i * 7) % 3000]]) for i in range(3000)}
    old["d"] = ("dir",)
    new = dict(old)
    for i in range(3000, len(ids)):
        new[f"d/g{i:05}"] = ("file", [ids[i], ids[i % 3000]])
    mo, mn = _manifest_of(old), _manifest_of(new)
    count, ask = negotiation_plan(ManifestFile(mn.to_bytes()), ManifestFile(mo.to_bytes()))
    assert ask.to_pylist() == sorted(_named(new) - _named(old))
    assert count.chunks == len(_named(new))
    assert count.raw_bytes == sum(_size_of(c) for c in _named(new))


def test_ship_result_figures_are_exact_through_a_pause_and_a_resend(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 2: ShipResult.chunks / missing_chunks / shipped_bytes / deduplicated_bytes are exact for a
    first shipment, a delta (a copy, a move, an edit), a shipment paused by the bandwidth schedule
    (ShippingPaused, what was sent stays) and its retry, and one whose chunks the standby already holds."""
    import drsync.agent.primary as primary_mod
    from drsync.agent.primary import ShippingPaused, ship_snapshot
    from drsync.agent.standby import StandbyReceiver
    from drsync.agent.state import StateStore
    from tests.test_snapshot_order import LocalLink

    monkeypatch.setattr(primary_mod, "UPLOAD_MESSAGE_CHUNKS", 3)  # many upload messages
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 5)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i:02}").write_bytes(os.urandom(3000 + i))
    (src / "d" / "same1").write_bytes(b"z" * 5000)
    (src / "d" / "same2").write_bytes(b"z" * 5000)  # deduplicated within the snapshot
    (src / "empty").write_bytes(b"")
    primary = Repository.init(LocalStorage(tmp_path / "p", create=True), cluster_id="east", release="6.2.1")
    standby = Repository.init(LocalStorage(tmp_path / "s", create=True), cluster_id="east", release="6.2.1")
    root = tmp_path / "root"
    root.mkdir()
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="sb")
    link = LocalLink(rx)

    def raw(info, ids=None):  # type: ignore[no-untyped-def]
        t = chunk_table(primary.load_manifest(info))
        return {c: s for c, s in zip(t.column("chunk").to_pylist(), t.column("size").to_pylist(), strict=True)
                if ids is None or c in ids}

    first = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    r = ship_snapshot(primary, first, link, epoch=1, sender="east-1")
    every = raw(first)
    assert (r.chunks, r.missing_chunks, r.deduplicated_bytes) == (len(every), len(every), 0)
    assert r.shipped_bytes == sum(len(primary.read_stored(c)[1]) for c in every)
    assert tree_state(root) == tree_state(src)

    shutil.copy(src / "d" / "f01", src / "d" / "copy")
    os.rename(src / "d" / "f02", src / "moved")
    (src / "d" / "f03").write_bytes(os.urandom(4000))
    for i in range(4):
        (src / f"n{i}").write_bytes(os.urandom(2000))
    second = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    new_ids = set(raw(second)) - set(every)
    assert len(new_ids) == 5
    calls = iter([0.0, 0.0, 0.0, None])  # on for the first messages, then the schedule turns off
    with pytest.raises(ShippingPaused):
        ship_snapshot(primary, second, link, epoch=1, sender="east-1", applied=primary.load_manifest(first),
                      bandwidth_bps=lambda: next(calls, None))
    held = set(new_ids) - set(standby.missing_chunks(sorted(new_ids)))
    assert 0 < len(held) < len(new_ids)
    r = ship_snapshot(primary, second, link, epoch=1, sender="east-1", applied=primary.load_manifest(first))
    all2 = raw(second)
    assert r.chunks == len(all2)
    assert r.missing_chunks == len(new_ids) - len(held)
    sent = new_ids - held
    assert r.shipped_bytes == sum(len(primary.read_stored(c)[1]) for c in sent)
    assert r.deduplicated_bytes == sum(all2.values()) - sum(all2[c] for c in sent)
    assert tree_state(root) == tree_state(src)
    # The standby holds everything already (a third snapshot of the same tree, nothing applied known).
    third = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    r = ship_snapshot(primary, third, link, epoch=1, sender="east-1")
    assert (r.missing_chunks, r.shipped_bytes, r.deduplicated_bytes) == (0, 0, sum(all2.values()))


# --- 3. README quick start ----------------------------------------------------------------------------


def test_readme_quick_start_on_an_odd_tree(tmp_path: Path) -> None:
    """Promise 3: README's 'Using it' commands (init, snapshot create --name --ttl, list, diff nightly
    latest, restore, backup create/verify/restore/prune, repo verify) on a tree with odd names: every
    command exits 0 and both restores are exact."""
    data = tmp_path / "data"
    odd_tree(data)
    repo = tmp_path / ".drsync"
    ok = lambda *a: run_drsync(*a)  # noqa: E731
    assert ok("init", "--repo", repo, "--cluster-id", "analytics-east", "--release", "6.2.1").code == 0
    assert ok("snapshot", "create", "--repo", repo, "--source", data, "--name", "nightly", "--ttl", "7d").code == 0
    nightly = exact_state(data)
    (data / "added\nname\udcfe".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")).write_bytes(b"x")
    assert ok("snapshot", "create", "--repo", repo, "--source", data).code == 0
    assert ok("snapshot", "list", "--repo", repo).code == 0
    r = ok("snapshot", "diff", "nightly", "latest", "--repo", repo)
    assert r.code == 0 and "added\\nname\\xfe" in r.out, r.out
    assert ok("snapshot", "restore", "nightly", "--repo", repo, "--target", tmp_path / "restore" / "nightly").code == 0
    assert exact_state(tmp_path / "restore" / "nightly") == nightly
    assert ok("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "backups",
              "--mode", "full").code == 0
    (b,) = (tmp_path / "backups").iterdir()
    assert ok("backup", "verify", b).code == 0
    assert ok("backup", "restore", b, "--target", tmp_path / "elsewhere").code == 0
    assert exact_state(tmp_path / "elsewhere") == exact_state(data)
    assert ok("backup", "prune", tmp_path / "backups", "--keep-last", "3", "--keep-daily", "7",
              "--keep-weekly", "4").code == 0
    assert ok("repo", "verify", "--repo", repo).code == 0


def test_a_refused_restore_names_odd_paths_as_the_dry_run_does(tmp_path: Path) -> None:
    """README: errors are one line, names shown unambiguously (printable: \\xNN for an undecodable byte, a
    name's own backslash doubled). The refusal of a restore onto a target with changes must name the paths as
    --dry-run lists them. (BUG: the CLI passes the already-printable message through printable() again, so
    'bad\\xffname' reads as a name holding the text '\\xff', and 'back\\\\slash' is quadrupled.)"""
    data = tmp_path / "data"
    data.mkdir()
    (data / os.fsdecode(b"bad\xffname")).write_bytes(b"1")
    (data / "back\\slash").write_bytes(b"2")
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    tgt = tmp_path / "tgt"
    assert run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tgt).code == 0
    (tgt / os.fsdecode(b"bad\xffname")).write_bytes(b"changed")
    (tgt / "back\\slash").write_bytes(b"changed")
    dry = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tgt, "--dry-run")
    assert "replace bad\\xffname" in dry.out and "replace back\\\\slash" in dry.out, dry.out
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tgt)
    assert r.code == 4
    assert "back\\\\slash, bad\\xffname" in r.err, r.err


@pytest.mark.parametrize("column", ["path", "uid"])
def test_a_backup_restore_refuses_a_hostile_manifest_with_an_integrity_error(tmp_path: Path, column: str) -> None:
    """Promise 1 (backup.restore_backup holds the manifest lean): a backup whose manifest carries a null path
    or uid (its snapshot document vouching for it) is refused with exit 3, nothing written.
    (BUG: exit 1 'internal error: TypeError'.)"""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"f{i}").write_bytes(b"b" * (i + 1))
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    assert run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "b").code == 0
    (b,) = (tmp_path / "b").iterdir()
    rp = Repository.open(LocalStorage(str(b)))
    (info,) = rp.list_snapshots()
    _replace_manifest(b, info.id, _parquet(_with_null(rp.load_manifest(info).table, column, b"f3")))
    r = run_drsync("backup", "restore", b, "--target", tmp_path / "t")
    assert not (tmp_path / "t").exists() or not os.listdir(tmp_path / "t")
    assert r.code == 3, r.err


@pytest.mark.parametrize("group", [2, 5])
def test_restores_from_a_many_group_lean_manifest_match_the_whole_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      group: int) -> None:
    """Promise 1: with a stored manifest of many row groups (ROW_GROUP 2 or 5; hard links, xattrs, sparse and
    odd names spread over groups), a lean apply equals the whole one: new target, dry run, a delta onto an
    existing target with changes, --checksum, an exclude, and a run with everything alike."""
    from drsync.apply import ForeignTarget

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    src = tmp_path / "src"
    odd_tree(src)
    for i in range(25):
        (src / "many").mkdir(exist_ok=True)
        (src / "many" / f"f{i:02}").write_bytes(bytes([i]) * (i * 501))
    os.link(src / "many" / "f03", src / "z-link-late")
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    whole, lean = repo.load_manifest(info), repo.load_manifest(info, lean=True)
    assert lean.source is not None and lean.source.num_groups > 10
    assert list(lean.entries()) == list(whole.entries())
    a, b = tmp_path / "a", tmp_path / "b"
    assert apply_manifest(whole, repo, str(a), dry_run=True) == apply_manifest(lean, repo, str(b), dry_run=True)
    assert not a.exists() and not b.exists()
    assert apply_manifest(whole, repo, str(a)) == apply_manifest(lean, repo, str(b))
    assert exact_state(a) == exact_state(b) == exact_state(src)
    for t in (a, b):  # the same damage to both targets
        (t / "many" / "f05").write_bytes(b"Q" * (5 * 501))
        os.utime(t / "many" / "f05", ns=((src / "many" / "f05").stat().st_atime_ns,
                                         (src / "many" / "f05").stat().st_mtime_ns))
        (t / "many" / "f07").unlink()
        (t / "extra").write_bytes(b"extra")
    foreign = ForeignTarget(overwrite=True, delete_extra=True)
    ra = apply_manifest(whole, repo, str(a), dry_run=True, checksum=True, foreign=foreign)
    rb = apply_manifest(lean, repo, str(b), dry_run=True, checksum=True, foreign=foreign)
    assert ra == rb and ra.planned
    ra = apply_manifest(whole, repo, str(a), checksum=True, foreign=foreign)
    rb = apply_manifest(lean, repo, str(b), checksum=True, foreign=foreign)
    assert ra == rb and rb.written_files == 2 and rb.removed == 1
    assert exact_state(a) == exact_state(b) == exact_state(src)
    assert apply_manifest(lean, repo, str(b), checksum=True).written_files == 0
    c, d = tmp_path / "c", tmp_path / "d"
    rc = apply_manifest(whole, repo, str(c), exclude=("many",))
    assert rc == apply_manifest(lean, repo, str(d), exclude=("many",))
    assert exact_state(c) == exact_state(d)
    assert not (d / "many").exists()


def test_lean_single_value_and_column_reads_answer_as_the_whole_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 1 ('every method answers exactly as the whole manifest would'): pycolumn_at of a left-out
    column, columns_at/entries_at with numpy rows, repeats and reverse order across groups, pycolumn of every
    column, and manifest_counts / chunks_in_order. (pycolumn_at('content'|'chunks'|'inode') on a lean manifest
    raises KeyError: BUG if it fails.)"""
    from drsync.repository.manifest import chunks_in_order, manifest_counts
    from tests.test_lean_manifest import _random

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 4)
    whole = _random(3)
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    n = len(whole)
    rows = np.concatenate([np.arange(n)[::-1], np.arange(n), np.zeros(5, np.int64)])
    assert lean.entries_at(rows) == whole.entries_at(rows)
    left = list(LEAN_LEFT_OUT)
    assert lean.columns_at(rows, left).to_pylist() == whole.columns_at(rows, left).to_pylist()
    for name in manifest_mod.SCHEMA.names:
        if name not in ("mtime_s", "mtime_nsec"):
            assert lean.pycolumn(name) == whole.pycolumn(name), name
    assert manifest_counts(lean) == manifest_counts(whole)
    assert (chunks_in_order(lean) == chunks_in_order(whole)).all()
    for name in ("path", "size", "content", "chunks", "inode", "ctime_ns"):
        assert [lean.pycolumn_at(name, r) for r in (0, n - 1)] == [whole.pycolumn_at(name, r) for r in (0, n - 1)], name


def test_a_version_1_manifest_held_lean_answers_as_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 1: a version-1 manifest of many row groups, held lean, gives the same entries, columns and
    chunk ids as held whole."""
    from tests.test_capture_any_tree import v1_bytes

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    n = 20
    ids = [blake3.blake3(bytes([i])).digest() for i in range(n)]
    whole_v2 = Manifest.from_columns({
        "path": ["d"] + [f"d/f{i:02}" for i in range(n)], "type": ["dir"] + ["file"] * n, "mode": [0o755] + [0o644] * n,
        "uid": [0] * (n + 1), "gid": [0] * (n + 1), "size": [0] + [10] * n, "mtime_ns": list(range(n + 1)),
        "ctime_ns": list(range(n + 1)), "inode": list(range(n + 1)), "target": [None] * (n + 1),
        "content": [None] + [blake3.blake3(c).digest() for c in ids], "chunks": [[]] + [[c] for c in ids],
        "chunk_sizes": [[]] + [[10]] * n})
    data = v1_bytes(whole_v2, row_group=3)
    whole = Manifest.from_bytes(data)
    lean = Manifest.lean(ManifestFile(data))
    assert lean.source is not None and lean.source.num_groups > 3
    assert list(lean.entries()) == list(whole.entries())
    rows = list(range(n, -1, -1)) * 2
    assert lean.entries_at(rows) == whole.entries_at(rows)
    for name in ("ctime_ns", "inode", "content", "chunks"):
        assert lean.pycolumn(name) == whole.pycolumn(name)
    assert lean.chunk_ids() == whole.chunk_ids()


def test_many_threads_reading_left_out_columns_of_a_lean_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 1 (from several threads at once): 8 threads asking columns_at of every left-out column and
    entries_at over 30+ groups, rows in random order with repeats, get what the whole manifest gives."""
    from tests.test_lean_manifest import _random

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 2)
    whole = _random(7)
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    rng = np.random.default_rng(9)
    asks = [rng.integers(0, len(whole), size=int(rng.integers(1, 60))) for _ in range(200)]

    def ask(i: int):  # type: ignore[no-untyped-def]
        r = asks[i]
        if i % 2:
            return lean.columns_at(r, ["inode", "chunks", "ctime_ns", "path"]).to_pylist()
        return lean.entries_at(r)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(len(asks))))
    want = [whole.columns_at(r, ["inode", "chunks", "ctime_ns", "path"]).to_pylist() if i % 2 else whole.entries_at(r)
            for i, r in enumerate(asks)]
    assert got == want


@pytest.mark.parametrize("seed", range(10))
def test_diffs_and_guards_over_lean_manifests_answer_as_over_whole_ones(monkeypatch: pytest.MonkeyPatch,
                                                                        seed: int) -> None:
    """Promise 1: manifest_diff.diff / content_changed / chunks_beyond and guard.removed_files / changed_files
    answer the same for whole, ManifestFile and lean inputs (many row groups; one side out of path order
    for some seeds, which takes the whole-table fallback)."""
    from drsync.guard import changed_files, removed_files
    from drsync.repository.manifest_diff import chunks_beyond, content_changed, diff

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    rnd = random.Random(seed)
    old = _tree(rnd, 30)
    new = _mutate(rnd, old)
    mo, mn = _manifest_of(old), _manifest_of(new)
    if seed % 3 == 0:  # new out of path order
        mn = Manifest(mn.table.take(pa.array(np.arange(len(mn))[::-1].copy())))
    want = (diff(mo, mn).as_dict(), content_changed(mo, mn), sorted(chunks_beyond(mo, mn).to_pylist()),
            removed_files(mo, mn), changed_files(mo, mn))
    forms = lambda m: [ManifestFile(m.to_bytes()), Manifest.lean(ManifestFile(m.to_bytes()))]  # noqa: E731
    for a in forms(mo):
        for b in forms(mn):
            got = (diff(a, b).as_dict(), content_changed(a, b), sorted(chunks_beyond(a, b).to_pylist()),
                   removed_files(a, b), changed_files(a, b))
            assert got == want


def _six_files(tmp_path: Path) -> tuple[Repository, SnapshotInfo]:
    """A repository with one snapshot of six small random files."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(100 + i))
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    return repo, engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))


@pytest.mark.parametrize("lean", [False, True])
def test_a_null_chunk_list_never_restores_as_an_empty_file(tmp_path: Path, lean: bool) -> None:
    """Promise 1 (damaged manifests refused; a restore leaves exactly the manifest's tree): a file row whose
    ``chunks`` list is null but whose ``chunk_sizes`` is [size] passes validation as if it were a DistCp
    'external' row, yet external_mask (null -> not external) does not count it, so no DistCp stager is asked
    for and the restore 'succeeds' writing a 0-byte file where the manifest says 103 bytes.
    (BUG: expected an IntegrityError, or the file's bytes; got a silent empty file.)"""
    repo, info = _six_files(tmp_path)
    t = _with_null(repo.load_manifest(info).table, "chunks", b"f3")
    _replace_manifest(tmp_path / "repo", info.id, _parquet(t))
    rp = Repository.open(LocalStorage(str(tmp_path / "repo")))
    m = rp.load_manifest(rp.find_snapshot(info.id), lean=lean)
    out = tmp_path / "t"
    try:
        apply_manifest(m, rp, str(out))
    except IntegrityError:
        assert not out.exists()
        return
    assert (out / "f3").stat().st_size == 103


def test_a_standby_applies_odd_shipments_of_many_row_groups_exactly(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Promise 1 (Committer.commit holds the shipment lean): with manifests of many row groups (ROW_GROUP 3),
    shipments adding an odd tree (undecodable names, newlines, hard links, symlinks, xattrs, sparse and empty
    files), then changing and removing parts of it, then one with the same tree as the applied snapshot, each
    leave the standby's root exactly equal to production."""
    from tests.test_commit_vouched import _ship, make_standby

    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 3)
    src, primary, repo, root, c, _ = make_standby(tmp_path, files=10)
    odd_tree(src / "odd")
    snap = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _ship(primary, snap, repo, c)
    assert exact_state(root) == exact_state(src)
    shutil.rmtree(src / "odd" / "deep")
    (src / "f02").write_bytes(b"")
    for p in list((src / "odd").iterdir())[:3]:
        if p.is_file() and not p.is_symlink():
            p.write_bytes(b"rewritten " * 7)
    snap = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _ship(primary, snap, repo, c)
    assert exact_state(root) == exact_state(src)
    snap = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _, result = c.commit(snap.to_bytes(), primary.manifest_bytes(snap), [1, snap.seq])
    assert result.written_files == 0
    assert exact_state(root) == exact_state(src)


def test_a_standby_refuses_a_shipment_whose_inode_column_is_damaged(tmp_path: Path) -> None:
    """Promise 1: a shipment whose manifest decodes only partly (the ``inode`` pages of one row group damaged,
    its hash vouching for it) is refused as a whole load refuses it; nothing stored.
    (BUG: the lean commit never reads ``inode``/``ctime_ns``: it stores and applies a manifest that every whole
    load, repo verify's included, then finds damaged.)"""
    c, doc, data, position, repo, _, _, sid = _hostile_shipment(tmp_path, lambda t: t)
    data = _corrupt_column(Manifest.from_bytes(data).table, "inode", row_group=3)
    d = json.loads(doc)
    d["manifest_hash"] = blake3.blake3(data).hexdigest()
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(data)
    with pytest.raises(IntegrityError):
        c.commit(json.dumps(d).encode(), data, position)
    assert sid not in [s.id for s in repo.list_snapshots()]


def test_manifests_of_wrong_layout_or_truncated_are_refused_lean_or_whole(tmp_path: Path) -> None:
    """Promise 1: wrong column types, no format metadata, an extra column, a truncated file and garbage are
    refused with IntegrityError by whole and lean loads and by the negotiation plan, nothing written."""
    import pyarrow.compute as pc

    repo, info = _six_files(tmp_path)
    t = repo.load_manifest(info).table
    good = _parquet(t)
    bad = [_parquet(t.set_column(3, pa.field("uid", pa.int64()), pc.cast(t.column("uid"), pa.int64()))),
           _parquet(t.set_column(12, pa.field("chunks", pa.list_(pa.binary())),
                                 pc.cast(t.column("chunks"), pa.list_(pa.binary())))),
           _parquet(t.replace_schema_metadata(None)), _parquet(t.append_column("x", pa.array([1] * t.num_rows))),
           good[:len(good) // 2], good[:-10], b"PAR1" + b"\x17" * 500 + b"PAR1"]
    for data in bad:
        _replace_manifest(tmp_path / "repo", info.id, data)
        rp = Repository.open(LocalStorage(str(tmp_path / "repo")))
        for lean in (False, True):
            with pytest.raises(IntegrityError):
                apply_manifest(rp.load_manifest(rp.find_snapshot(info.id), lean=lean), rp, str(tmp_path / "t"))
            assert not (tmp_path / "t").exists()
        with pytest.raises(IntegrityError):
            negotiation_plan(ManifestFile(data), None)
