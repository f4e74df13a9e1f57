"""A lean manifest answers as the whole one does (issue 17).

A restore holds its snapshot's manifest without the chunk lists and digests (``Manifest.lean``, about
90 MiB instead of 161 at 1,000,000 files) and reads them from the manifest's checked bytes for the rows
it writes. Every question an apply asks must get the same answer from both: entries (light and full, in
any row order, across row groups and from several threads), columns, chunk ids, external rows; and an
apply from either leaves the same tree, byte for byte, for a new target, a delta, ``--checksum`` and
excludes, on a tree with the names, links, attributes and holes real clusters have.
"""

from __future__ import annotations

import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa
import pytest

import drsync.repository.manifest as manifest_mod
from drsync.apply import apply_manifest
from drsync.errors import IntegrityError
from drsync.repository.manifest import LEAN_LEFT_OUT, Manifest, ManifestFile, column_groups
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo_at, run_drsync
from tests.test_capture_any_tree import exact_state, odd_tree


def _random(seed: int) -> Manifest:
    rnd = random.Random(seed)
    pool = [blake3.blake3(bytes([i])).digest() for i in range(9)] + [b"\0" * 32]
    cols: dict[str, list] = {k: [] for k in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns",
                                              "inode", "target", "content", "chunks", "chunk_sizes", "xattrs",
                                              "hardlink", "sparse", "stale")}
    first_file = None
    for i in range(rnd.randrange(1, 120)):
        odd = "\udcff" if rnd.random() < 0.1 else ""  # an undecodable byte
        path = f"d{rnd.randrange(4)}/{odd}f{i:03}"
        r = rnd.random()
        ids = [rnd.choice(pool) for _ in range(rnd.randrange(0, 4))]
        kind, target, chunks, sizes, size, content, link = "file", None, ids, [7] * len(ids), 7 * len(ids), None, None
        if r < 0.1:
            kind, chunks, sizes, size = "dir", [], [], 0
        elif r < 0.2:
            kind, target, chunks, sizes, size = "symlink", f"t{i}", [], [], 0
        elif r < 0.3:  # external (DistCp): no ids, one size
            chunks, sizes, size, content = [], [100], 100, blake3.blake3(os.fsencode(path)).digest()
        elif r < 0.4 and first_file is not None:
            link = first_file
        if kind == "file" and content is None:
            content = blake3.blake3(b"".join(chunks)).digest()
            first_file = first_file or path
        for k, v in (("path", path), ("type", kind), ("mode", rnd.choice([0o644, 0o600, 0o755])), ("uid", i),
                     ("gid", i % 3), ("size", size), ("mtime_ns", rnd.randrange(-10**18, 10**19)),
                     ("ctime_ns", i), ("inode", 1000 + i), ("target", target), ("content", content),
                     ("chunks", chunks), ("chunk_sizes", sizes),
                     ("xattrs", b"\0\x04\0\0\0\x01user" + b"x" if rnd.random() < 0.2 else None),
                     ("hardlink", link), ("sparse", rnd.random() < 0.1), ("stale", rnd.random() < 0.05)):
            cols[k].append(v)
    return Manifest.from_columns(cols)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group", [1, 3, 7, 65536])
def test_a_lean_manifest_answers_as_the_whole_one(monkeypatch: pytest.MonkeyPatch, seed: int, group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    whole = _random(seed)
    lean = Manifest.lean(ManifestFile(whole.to_bytes(), "test manifest"))
    assert not set(LEAN_LEFT_OUT) & set(lean.table.column_names)
    assert len(lean) == len(whole)
    assert list(lean.entries()) == list(whole.entries())
    light = list(lean.entries(light=True))
    assert light == list(whole.entries(light=True))
    assert [e.external for e in light] == [e.external for e in whole.entries(light=True)]
    rnd = random.Random(seed)
    rows = [rnd.randrange(len(whole)) for _ in range(3 * len(whole))]  # any order, repeats
    assert lean.entries_at(rows) == whole.entries_at(rows)
    assert [e.row for e in lean.entries_at(rows)] == rows
    assert lean.entries_at(rows, light=True) == whole.entries_at(rows, light=True)
    for names in (["chunks", "content"], ["path", "chunk_sizes"], ["path", "size"]):
        assert lean.columns_at(rows, names).to_pylist() == whole.columns_at(rows, names).to_pylist()
    for name in ("path", "mtime_ns", "chunks", "content", "ctime_ns", "inode", "hardlink"):
        assert lean.pycolumn(name) == whole.pycolumn(name), name
    assert lean.chunk_ids() == whole.chunk_ids()
    assert lean.chunk_id_column().to_pylist() == whole.chunk_id_column().to_pylist()
    assert (lean.chunk_id_set().ids == whole.chunk_id_set().ids).all()
    for cid in list(whole.chunk_ids())[:3]:
        assert lean.paths_naming(cid) == whole.paths_naming(cid)
    assert (lean.external_count(), lean.file_count(), lean.total_bytes()) == \
           (whole.external_count(), whole.file_count(), whole.total_bytes())
    cols = ["path", "chunks", "chunk_sizes"]
    assert pa.concat_tables(column_groups(lean, cols)).to_pylist() == \
           pa.concat_tables(column_groups(whole, cols)).to_pylist()
    with pytest.raises(TypeError):
        lean.to_bytes()
    with pytest.raises(TypeError):
        lean.without(lambda p: False)


def test_threads_filling_entries_across_row_groups_get_their_own_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads, each asking for batches scattered over many row groups (more than the file's cache
    keeps): each gets exactly its rows' chunk lists."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 5)
    whole = _random(11)
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    assert lean.source is not None and lean.source.num_groups > 8
    rnd = np.random.default_rng(3)
    asks = [rnd.integers(0, len(whole), size=40) for _ in range(64)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: lean.entries_at(r), asks))
    assert got == [whole.entries_at(r) for r in asks]


def _snapshot(repo: Path, src: Path) -> tuple[Repository, Manifest, Manifest]:
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    rp = Repository.open(LocalStorage(repo))
    info = rp.find_snapshot(r.json()["id"])
    return rp, rp.load_manifest(info), rp.load_manifest(info, lean=True)


def test_an_apply_from_a_lean_manifest_leaves_the_same_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    odd_tree(src)
    for i in range(40):  # more files than a row group of the test's manifests
        (src / "many").mkdir(exist_ok=True)
        (src / "many" / f"f{i:02}").write_bytes(bytes([i]) * (i * 997))
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    rp, whole, lean = _snapshot(repo, src)
    assert lean.source is not None
    want = exact_state(src)
    a, b = tmp_path / "from-whole", tmp_path / "from-lean"
    ra = apply_manifest(whole, rp, str(a))
    rb = apply_manifest(lean, rp, str(b))
    assert ra == rb
    assert exact_state(b) == exact_state(a) == want
    # A delta onto what the first restore left, and --checksum over a file whose size and time were kept.
    (src / "many" / "f03").write_bytes(b"X" * (3 * 997))
    st = (src / "many" / "f04").stat()
    shutil.rmtree(src / "links")
    (src / "new").mkdir()
    (src / "new" / "file").write_bytes(b"new\n")
    _, whole2, lean2 = _snapshot(repo, src)
    ra = apply_manifest(whole2, rp, str(a))
    rb = apply_manifest(lean2, rp, str(b))
    assert ra == rb and rb.written_files >= 2
    assert exact_state(b) == exact_state(a) == exact_state(src)
    (b / "many" / "f04").write_bytes(b"Y" * st.st_size)
    os.utime(b / "many" / "f04", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert apply_manifest(lean2, rp, str(b)).written_files == 0  # size and time alike: left
    assert apply_manifest(lean2, rp, str(b), checksum=True).written_files == 1
    assert exact_state(b) == exact_state(src)
    # Excluding a directory, onto a new target.
    c = tmp_path / "excluded"
    apply_manifest(lean2, rp, str(c), exclude=("many",))
    assert not (c / "many").exists() and exact_state(c) == {k: v for k, v in exact_state(src).items()
                                                             if not k.startswith(b"many")}


def test_a_restore_of_a_missing_chunk_names_its_file_from_a_lean_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02}").write_bytes(bytes([i]) * 5000)
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    rp, _, lean = _snapshot(repo, src)
    for pack in (repo / "packs").rglob("*"):
        if pack.is_file():
            pack.unlink()
    rp.reload_index()
    for index in (repo / "index").rglob("*"):
        index.unlink()
    with pytest.raises(IntegrityError, match=r"f\d\d: chunk [0-9a-f]+ is missing"):
        apply_manifest(lean, Repository.open(LocalStorage(repo)), str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_a_lean_manifest_holds_about_half_the_table() -> None:
    n = 20_000
    ids = np.random.default_rng(1).integers(0, 256, size=(n, 32), dtype=np.uint8)
    whole = Manifest.from_columns({
        "path": [f"d{i // 1000:03}/f{i:05}" for i in range(n)], "type": ["file"] * n, "mode": [0o644] * n,
        "uid": [0] * n, "gid": [0] * n, "size": [1000] * n, "mtime_ns": list(range(n)), "ctime_ns": [0] * n,
        "inode": list(range(n)), "target": [None] * n, "content": [bytes(r) for r in ids[::-1]],
        "chunks": [[bytes(r)] for r in ids], "chunk_sizes": [[1000]] * n})
    lean = Manifest.lean(ManifestFile(whole.to_bytes()))
    assert lean.table.nbytes < 0.6 * whole.table.nbytes, (lean.table.nbytes, whole.table.nbytes)


def test_the_standby_applies_a_shipment_from_a_lean_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipment's commit holds the manifest lean (its chunk lists stay in the spool's file) through the
    guards and the apply, and the root ends up equal to production: a first sync, then a change."""
    from drsync import engine
    from drsync.agent import committer as committer_mod
    from tests.conftest import tree_state
    from tests.test_commit_vouched import _ship, make_standby

    held: list[tuple[bool, bool]] = []
    real = committer_mod.apply_manifest

    def recording(manifest, *a, **k):  # type: ignore[no-untyped-def]
        held.append((manifest.source is not None, "chunks" in manifest.table.column_names))
        return real(manifest, *a, **k)

    monkeypatch.setattr(committer_mod, "apply_manifest", recording)
    src, primary, repo, root, c, _ = make_standby(tmp_path)
    assert held == [(True, False)]
    (src / "f03").write_bytes(b"changed " * 300)
    (src / "f04").unlink()
    (src / "sub").mkdir()
    (src / "sub" / "new").write_bytes(b"new " * 100)
    second = engine.create_snapshot(primary, engine.SnapshotRequest(str(src), kind="cycle"))
    _ship(primary, second, repo, c)
    assert held == [(True, False), (True, False)]
    assert tree_state(root) == tree_state(src)


@pytest.mark.parametrize("column", ["mtime_ns", "path", "uid"])
def test_a_version_1_manifest_with_a_null_value_is_damage_whole_or_lean(column: str) -> None:
    """A version-1 manifest is upgraded as it is read, which reads its values: a null where every row holds
    one is refused as damage (IntegrityError) first, by a whole load, a lean one and validate alike."""
    import pyarrow.parquet as pq

    from drsync.repository.manifest_check import validate
    from tests.test_capture_any_tree import v1_bytes

    n = 20
    plain = Manifest.from_columns({
        "path": [f"f{i:02}" for i in range(n)], "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n,
        "gid": [0] * n, "size": [7] * n, "mtime_ns": list(range(n)), "ctime_ns": [0] * n, "inode": list(range(n)),
        "target": [None] * n, "content": [blake3.blake3(bytes([i])).digest() for i in range(n)],
        "chunks": [[blake3.blake3(bytes([i])).digest()] for i in range(n)], "chunk_sizes": [[7]] * n})
    t = pq.read_table(pa.BufferReader(v1_bytes(plain, row_group=4)))
    at = t.schema.get_field_index(column)
    values = t.column(column).to_pylist()
    values[len(values) // 2] = None
    t = t.set_column(at, t.schema.field(column), pa.array(values, t.schema.field(column).type))
    buf = pa.BufferOutputStream()
    pq.write_table(t, buf, row_group_size=4)
    data = buf.getvalue().to_pybytes()
    with pytest.raises(IntegrityError, match="null"):
        Manifest.from_bytes(data)
    with pytest.raises(IntegrityError, match="null"):
        Manifest.lean(ManifestFile(data))
    with pytest.raises(IntegrityError, match="null"):
        validate(ManifestFile(data))
