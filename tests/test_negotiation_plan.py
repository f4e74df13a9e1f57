"""What the primary asks a standby about, and the shipment's figures, over a merge (issue 17).

``negotiation_plan`` reads the new and the applied manifests a row group at a time: it asks about the
chunks of the rows whose chunk list differs from the applied one's at the same path, less those the
applied snapshot names anywhere, and counts the distinct chunks without a sorted table of them all.
Each case is checked against a brute-force reference over random tree pairs with moves, copies, edits,
directories turned into files, DistCp's external rows, and ids that share their first 8 bytes (the
search key) or end in NUL bytes.
"""

from __future__ import annotations

import random
import tracemalloc

import blake3
import numpy as np
import pytest

import drsync.repository.manifest as manifest_mod
from drsync.agent.primary import ChunkCount, chunk_table, count_chunks, negotiation_plan
from drsync.repository.manifest import Manifest, ManifestFile

Tree = dict[str, "list[bytes] | str | None"]  # chunk list; "external" (DistCp: one size, no id); None: a directory


def _pool() -> list[bytes]:
    """Ids a hostile tree might hold: random ones, several sharing their first 8 bytes, some ending in NULs."""
    ids = [blake3.blake3(bytes([i])).digest() for i in range(10)]
    shared = b"\x07" * 8
    ids += [shared + blake3.blake3(bytes([100 + i])).digest()[8:] for i in range(4)]
    ids += [blake3.blake3(b"nul").digest()[:28] + b"\0\0\0\0", b"\0" * 32]
    return ids


def _size(cid: bytes) -> int:
    return 1 + cid[9] + 7 * cid[31]  # the same id always has the same raw size


def _manifest(tree: Tree) -> Manifest:
    paths = sorted(tree)
    n = len(paths)
    kinds, chunks, sizes, content, size = [], [], [], [], []
    for p in paths:
        v = tree[p]
        if v is None:
            kinds.append("dir"), chunks.append([]), sizes.append([]), content.append(None), size.append(0)
        elif v == "external":
            kinds.append("file"), chunks.append([]), sizes.append([100]), size.append(100)
            content.append(blake3.blake3(p.encode()).digest())
        else:
            assert isinstance(v, list)
            kinds.append("file"), chunks.append(v), sizes.append([_size(c) for c in v])
            size.append(sum(_size(c) for c in v)), content.append(blake3.blake3(b"".join(v)).digest())
    return Manifest.from_columns({
        "path": paths, "type": kinds, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": size,
        "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": [None] * n,
        "content": content, "chunks": chunks, "chunk_sizes": sizes})


def _trees(seed: int) -> tuple[Tree, Tree]:
    rnd = random.Random(seed)
    pool = _pool()

    def ids() -> list[bytes]:
        return [rnd.choice(pool) for _ in range(rnd.randrange(0, 5))]

    old: Tree = {}
    for i in range(rnd.randrange(1, 100)):
        r = rnd.random()
        old[f"d{rnd.randrange(5)}/f{i:03}"] = None if r < 0.1 else "external" if r < 0.2 else ids()
    new = dict(old)
    for p in rnd.sample(sorted(old), k=len(old) // 2):
        r = rnd.random()
        if r < 0.2:
            del new[p]
        elif r < 0.35:  # a move, to a path sorting elsewhere (another step of the merge)
            new[f"z/{p}"] = new.pop(p)
        elif r < 0.45:  # a copy
            new[f"a/{p}"] = old[p]
        elif r < 0.65:
            new[p] = ids()
        elif r < 0.75:
            new[p] = None if old[p] is not None else ids()  # a file turned into a directory, or back
        elif r < 0.85:
            new[p] = "external"
        else:
            new[f"d{rnd.randrange(5)}/new{p[-3:]}"] = ids()
    return old, new


def _named(tree: Tree) -> set[bytes]:
    return {c for v in tree.values() if isinstance(v, list) for c in v}


CASES = [(seed, group) for seed in range(8) for group in (1, 3, 7, 65536)]


@pytest.mark.parametrize(("seed", "group"), CASES)
def test_the_plan_asks_about_what_the_applied_snapshot_lacks_and_counts_every_chunk_once(
        monkeypatch: pytest.MonkeyPatch, seed: int, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    old, new = _trees(seed)
    held, named = _named(old), _named(new)
    count = ChunkCount(len(named), sum(_size(c) for c in named))
    ma, mb = _manifest(old), _manifest(new)
    fa, fb = ManifestFile(ma.to_bytes()), ManifestFile(mb.to_bytes())
    if group < 10 and len(mb) > 20:
        assert fb.num_groups > 2, "the merge must cross row groups"
    for a, b in ((fa, fb), (ma, fb), (fa, mb), (ma, mb)):
        got, ask = negotiation_plan(b, a)
        assert got == count
        assert ask.to_pylist() == sorted(named - held)
        assert count_chunks(b) == count
    for b in (fb, mb):
        got, ask = negotiation_plan(b, None)
        assert got == count and ask.to_pylist() == sorted(named)
        table = chunk_table(b)
        assert table.column("chunk").to_pylist() == sorted(named)
        assert table.column("size").to_pylist() == [_size(c) for c in sorted(named)]
        assert negotiation_plan(b, b)[1].to_pylist() == []


def test_a_snapshot_naming_no_chunk_asks_nothing() -> None:
    for tree in ({}, {"d": None, "d/e": "external", "d/empty": []}):
        m = _manifest(tree)  # type: ignore[arg-type]
        assert negotiation_plan(m, None)[0] == ChunkCount(0, 0)
        assert len(negotiation_plan(m, None)[1]) == 0
        assert len(negotiation_plan(m, _manifest({"x": [b"\1" * 32]}))[1]) == 0
        assert chunk_table(m).num_rows == 0


def test_a_moved_directory_asks_nothing_and_an_edit_asks_only_its_new_chunk() -> None:
    pool = _pool()
    old: Tree = {f"a/f{i}": [pool[i % len(pool)], pool[(i + 3) % len(pool)]] for i in range(40)}
    moved: Tree = {f"z/f{i}": v for i, v in enumerate(old.values())}
    fa = ManifestFile(_manifest(old).to_bytes())
    assert negotiation_plan(_manifest(moved), fa)[1].to_pylist() == []
    fresh = blake3.blake3(b"fresh").digest()
    edited = {**old, "a/f3": [pool[0], fresh]}
    assert negotiation_plan(_manifest(edited), fa)[1].to_pylist() == [fresh]


def _big(n: int, seed: int, base: np.ndarray | None = None, changed: float = 0.0) -> tuple[Manifest, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(n, 32), dtype=np.uint8) if base is None else base.copy()
    if changed:
        at = rng.choice(n, int(n * changed), replace=False)
        ids[at] = rng.integers(0, 256, size=(len(at), 32), dtype=np.uint8)
    paths = [f"d{i // 1000:04}/f{i % 1000:04}" for i in range(n)]
    sizes = [[1000]] * n
    m = Manifest.from_columns({
        "path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n,
        "size": [1000] * n, "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)),
        "target": [None] * n, "content": [bytes(32)] * n, "chunks": [[bytes(r)] for r in ids], "chunk_sizes": sizes})
    return m, ids


def test_negotiating_a_1_percent_change_of_200000_files_holds_little_a_chunk() -> None:
    """Both manifests read a row group at a time from their files: NumPy's allocations (tracemalloc) stay
    under 64 bytes a chunk of the snapshot (about 40 now: the search keys and the order of the count, and the
    merge's row groups). The previous plan sorted two whole chunk tables and built a set of the applied
    one's: about 140."""
    n = 200_000
    applied, base = _big(n, 1)
    new, _ = _big(n, 2, base, changed=0.01)
    fa, fb = ManifestFile(applied.to_bytes()), ManifestFile(new.to_bytes())
    del applied, new
    tracemalloc.start()
    try:
        count, ask = negotiation_plan(fb, fa)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ask) == n // 100 and count.chunks == n and count.raw_bytes == 1000 * n
    assert peak / n < 64, f"{peak / n:.0f} bytes a chunk"


def test_a_first_sync_of_200000_files_asks_without_a_sorted_copy_of_every_id() -> None:
    """With no applied snapshot every id is asked about; the ids are gathered in order a batch at a time as
    they are sent, not into one sorted copy beside the manifest's pieces: NumPy's peak (tracemalloc) stays
    under 40 bytes a chunk through the plan and every batch (about 25: the search keys and the order; the
    pieces are Arrow's, not traced). A sorted copy of every id would add 32. The batches hold every id
    once, in order."""
    n = 200_000
    new, ids = _big(n, 3)
    fb = ManifestFile(new.to_bytes())
    del new
    tracemalloc.start()
    try:
        count, ask = negotiation_plan(fb, None)
        asked = 0
        last = b""
        for batch in ask.batches(8192):
            assert batch[0] > last and batch == sorted(batch)
            asked += len(batch)
            last = batch[-1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert asked == len(ask) == count.chunks == len({bytes(r) for r in ids})
    assert peak / n < 40, f"{peak / n:.0f} bytes a chunk"


@pytest.mark.parametrize("seed", range(6))
def test_sort_unique_without_a_stable_sort_gives_each_id_once_in_order(seed: int) -> None:
    """``stable=False`` (the count's faster sort) keeps some occurrence of each id, each id once, in byte
    order, with repeats and ids sharing their first 8 bytes (the sort key) among them."""
    from drsync.repository.ids import ID_DTYPE, gather, pieces_key, sort_unique

    rnd = random.Random(seed)
    pool = _pool()
    raw = [rnd.choice(pool) for _ in range(rnd.randrange(2, 400))]
    ids = np.frombuffer(b"".join(raw), ID_DTYPE)
    cut = rnd.randrange(1, len(raw))
    pieces = [ids[:cut].copy(), ids[cut:].copy()]
    for order in (sort_unique(ids, stable=False),
                  sort_unique(None, pieces_key(pieces), take=lambda at: gather(pieces, at), stable=False)):
        got = [ids[i:i + 1].tobytes() for i in order]
        assert got == sorted(set(raw))
