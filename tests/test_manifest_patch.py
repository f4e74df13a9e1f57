"""Manifest patches (drsync.repository.manifest_patch): what differs, merged back byte for byte.

Real trees captured by the CLI, changed the ways a cluster changes them (files added, removed, rewritten,
chmod-ed, renamed, a directory replaced by a file and back, symlinks retargeted, the root's own mode), and
the patch between the two snapshots' manifests must rebuild the second exactly (its bytes, its hash), with
the base's rows serialized again. Hostile patches are refused or rebuild something else (the hash tells).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from drsync.errors import IntegrityError
from drsync.repository.manifest import SCHEMA, ManifestFile, ManifestWriter
from drsync.repository.manifest_patch import TOMBSTONE, apply_patch, make_patch
from drsync.repository.repo import Repository
from drsync.repository.spool import Spool
from drsync.storage import open_storage
from tests.conftest import make_tree, run_drsync


def _snap(repo: Path, data: Path) -> None:
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
    assert r.code == 0, r.err


def _files(repo: Path) -> list[ManifestFile]:
    r = Repository.open(open_storage(str(repo)))
    return [ManifestFile(r.manifest_spool(s)) for s in r.list_snapshots()]


def _hashes(repo: Path) -> list[str]:
    return [s.manifest_hash for s in Repository.open(open_storage(str(repo))).list_snapshots()]


def _check_all_pairs(repo: Path) -> list[int]:
    files, hashes = _files(repo), _hashes(repo)
    sizes = []
    for i in range(len(files)):
        for j in range(len(files)):
            patch, rows = make_patch(files[i], files[j])
            sizes.append(rows)
            out = apply_patch(files[i], ManifestFile(patch))
            assert out.hexdigest() == hashes[j], (i, j, rows)
    return sizes


def test_a_patch_rebuilds_every_snapshot_from_every_other(tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    make_tree(data, files=40)
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    _snap(repo, data)
    rnd = random.Random(5)
    (data / "catalog" / "new.txt").write_text("added")
    (data / "catalog" / "f003.txt").unlink()
    (data / "catalog" / "f004.txt").write_bytes(rnd.randbytes(5000))
    os.chmod(data / "catalog" / "f005.txt", 0o600)
    os.rename(data / "catalog" / "f006.txt", data / "catalog" / "zz-renamed.txt")
    (data / "deep" / "er" / "est").mkdir(parents=True)
    (data / "deep" / "er" / "est" / "leaf").write_text("leaf")
    _snap(repo, data)
    # a directory replaced by a file of the same name, a symlink retargeted, the root's mode
    for p in sorted((data / "deep").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (data / "deep").rmdir()
    (data / "deep").write_text("now a file")
    os.symlink("catalog/new.txt", data / "link-a")
    os.chmod(data, 0o750)
    _snap(repo, data)
    (data / "link-a").unlink()
    os.symlink("catalog/zz-renamed.txt", data / "link-a")
    for f in list((data / "catalog").iterdir())[:10]:
        f.unlink()
    _snap(repo, data)
    _snap(repo, data)  # unchanged: an empty patch
    sizes = _check_all_pairs(repo)
    assert 0 in sizes and max(sizes) > 5, sizes


def test_a_patch_of_many_files_is_small_and_exact(tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    rnd = random.Random(9)
    for d in range(30):
        (data / f"d{d:02}").mkdir(parents=True)
        for i in range(400):
            (data / f"d{d:02}" / f"f{i:03}").write_bytes(rnd.randbytes(rnd.randrange(0, 300)))
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    _snap(repo, data)
    for d in (3, 17, 29):
        (data / f"d{d:02}" / "f100").write_bytes(b"changed")
        (data / f"d{d:02}" / "f200").unlink()
        (data / f"d{d:02}" / "g-new").write_bytes(b"new")
    _snap(repo, data)
    files, hashes = _files(repo), _hashes(repo)
    patch, rows = make_patch(files[0], files[1])
    # 3 changed, 3 removed, 3 added, and the 3 directories whose time moved
    assert 9 <= rows <= 12, rows
    assert patch.size * 20 < len(files[1]) * 73, (patch.size, len(files[1]))
    assert apply_patch(files[0], ManifestFile(patch)).hexdigest() == hashes[1]


def _patch_of(rows: list[dict]) -> ManifestFile:
    w = ManifestWriter(SCHEMA)
    w.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    return ManifestFile(w.finish())


def _row(path: bytes, kind: str = "file") -> dict:
    return {"path": path, "type": kind, "mode": 0o644, "uid": 0, "gid": 0, "size": 0, "mtime_s": 0,
            "mtime_nsec": 0, "chunks": [], "chunk_sizes": []}


def test_hostile_patches_are_refused_or_rebuild_another_manifest(tmp_path: Path) -> None:
    data, repo = tmp_path / "data", tmp_path / "repo"
    make_tree(data, files=10)
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    _snap(repo, data)
    base, want = _files(repo)[0], _hashes(repo)[0]
    # out of path order: refused
    with pytest.raises(IntegrityError, match="path order"):
        apply_patch(base, _patch_of([_row(b"zz"), _row(b"aa")]))
    # not Parquet at all: refused by the reader
    with pytest.raises(IntegrityError):
        apply_patch(base, ManifestFile(b"PAR1 not a manifest PAR1"))
    # a tombstone for a path the base lacks, a row that only looks alike: another manifest, and the hash says so
    other = apply_patch(base, _patch_of([_row(b"catalog/f001.txt"), _row(b"nowhere", TOMBSTONE)]))
    assert other.hexdigest() != want
    # the empty patch of the base against itself rebuilds it, root metadata and all
    empty, rows = make_patch(base, base)
    assert rows == 0 and apply_patch(base, ManifestFile(empty)).hexdigest() == want


def _synthetic_table(n: int, changed: bool = False) -> pa.Table:
    """A manifest table of ``n`` one-chunk files (random ids), in chunks of 50,000 rows a column;
    ``changed``: 1 % of the rows with another modification time."""
    rng = np.random.default_rng(1)
    parts = []
    for lo in range(0, n, 50_000):
        k = min(n, lo + 50_000) - lo

        def ids(k: int = k) -> pa.Array:
            return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), k, [None, pa.py_buffer(rng.bytes(32 * k))])

        offsets = pa.array(np.arange(k + 1, dtype=np.int32))
        mtime = np.full(k, 1_700_000_000)
        if changed:
            mtime[:k // 100] += 5
        parts.append(pa.table({
            "path": pa.array([b"d%04d/f%07d" % (i // 1000, i) for i in range(lo, lo + k)], pa.binary()),
            "type": pa.array(["file"] * k), "mode": pa.array(np.full(k, 0o644, np.uint32)),
            "uid": pa.array(np.zeros(k, np.uint32)), "gid": pa.array(np.zeros(k, np.uint32)),
            "size": pa.array(np.full(k, 100)), "mtime_s": pa.array(mtime),
            "mtime_nsec": pa.array(np.zeros(k, np.uint32)), "ctime_ns": pa.array(np.zeros(k, np.int64)),
            "inode": pa.array(np.arange(lo, lo + k, dtype=np.uint64)), "target": pa.nulls(k, pa.binary()),
            "content": ids(), "chunks": pa.ListArray.from_arrays(offsets, ids()),
            "chunk_sizes": pa.ListArray.from_arrays(offsets, pa.array(np.full(k, 100, np.uint32))),
            "xattrs": pa.nulls(k, pa.binary()), "hardlink": pa.nulls(k, pa.binary()),
            "sparse": pa.array(np.zeros(k, bool)), "stale": pa.array(np.zeros(k, bool))}, schema=SCHEMA))
    return pa.concat_tables(parts)


def _synthetic(n: int, changed: bool) -> Spool:
    """:func:`_synthetic_table` written by ManifestWriter, in its pieces."""
    w = ManifestWriter(SCHEMA)
    for piece in _synthetic_table(n, changed).to_batches():
        w.write(pa.Table.from_batches([piece]))
    return w.finish()


_MEMORY_SCRIPT = r'''
import sys
import pyarrow as pa
from drsync.repository.manifest import ManifestFile
from drsync.repository.manifest_patch import apply_patch, make_patch
from tests.test_manifest_patch import _synthetic

a, b = _synthetic(int(sys.argv[1]), False), _synthetic(int(sys.argv[1]), True)
pool = pa.system_memory_pool()  # not used before: its peak is the patch's alone
pa.set_memory_pool(pool)
patch, rows = make_patch(ManifestFile(a), ManifestFile(b))
made = pool.max_memory()
out = apply_patch(ManifestFile(a), ManifestFile(patch))
print(rows, made >> 20, pool.max_memory() >> 20, out.hexdigest() == b.hexdigest())
'''


def test_a_patch_of_300000_rows_holds_a_few_row_groups_not_the_manifest() -> None:
    """Issue 17's memory bound, kept from growing back: making and applying the patch of a 300,000-row
    manifest (1 % changed) allocates at most 40 MiB of Arrow memory at a time (a few row groups of each side;
    the manifest decodes into about 45 MiB), and rebuilds it exactly. Before the fix, each step of the merge
    kept its side's buffers alive through an empty slice: 60-odd MiB here, 320 MiB of process at 1,000,000."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "300000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows, made, applied, exact = r.stdout.split()
    assert int(rows) == 3000 and exact == "True", r.stdout
    assert int(made) <= 40 and int(applied) <= 40, r.stdout


def test_the_same_rows_make_the_same_bytes_however_they_come_split() -> None:
    """What a rebuilt manifest relies on: ManifestWriter writes the same bytes for the same rows given whole,
    in a few pieces or in thousands of small ones (Parquet pages do not follow the pieces), and for a table
    read back from Parquet (its list items named "element")."""
    written = _synthetic(150_000, False)
    stored = ManifestFile(written)
    table = stored.read().table  # read back: "element"
    rnd = random.Random(4)
    for n in (1, 3, 17, 2000):
        cuts = sorted(rnd.sample(range(1, table.num_rows), n - 1)) if n > 1 else []
        w = ManifestWriter(stored.schema)
        for a, b in zip([0, *cuts], [*cuts, table.num_rows], strict=True):
            w.write(table.slice(a, b - a))
        assert w.finish().hexdigest() == written.hexdigest(), n
