"""Temporary files of writes that never finished (breaker s66): a process killed between writing a pack, an
index file, a manifest (or a manifest's link) or a snapshot document and renaming it into place leaves
``.tmp-*``, never listed as an object. GC removes them when it sweeps (under the exclusive lock no write is
under way), and leaves every object and the temporary files of other folders alone."""

from __future__ import annotations

import os
from pathlib import Path

from drsync import engine
from drsync.repository import format as fmt
from tests.test_snapshot_order import new_repo, snap


def _tree(root: Path, generation: int) -> None:
    root.mkdir(exist_ok=True)
    for i in range(50):
        (root / f"f{i:02}.txt").write_text(f"file {i}, generation {generation if i % 5 == 0 else 0}\n" * 20)


def test_gc_sweeps_the_temporary_files_of_unfinished_writes_with_its_garbage(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    first = snap(repo, tmp_path / "data")
    _tree(tmp_path / "data", 1)
    second = snap(repo, tmp_path / "data")
    manifest = tmp_path / "repo" / fmt.manifest_name(second.id)
    left = [tmp_path / "repo" / d.rstrip("/") / f".tmp-0123456789ab-left{i}"
            for i, d in enumerate((fmt.PACKS_DIR, fmt.INDEX_DIR, fmt.SNAPSHOTS_DIR))]
    for p in left:
        p.write_bytes(b"half written")
    linked = manifest.with_name(".tmp-ba9876543210-" + manifest.name)
    os.link(manifest, linked)  # an interrupted link: the manifest's inode pinned by a temporary name
    other = tmp_path / "repo" / "locks" / ".tmp-0123456789ab-lock"  # a lock being taken: not GC's to remove
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(b"")
    engine.delete_snapshots(repo, [first.id], prune=False)  # garbage: the sweep runs
    engine.gc_repository(repo)
    assert not [p for p in [*left, linked] if p.exists()]
    assert other.exists() and manifest.exists() and os.stat(manifest).st_nlink == 1
    assert engine.verify_repository(repo).ok
    assert [s.id for s in repo.list_snapshots()] == [second.id]


def test_gc_with_nothing_to_delete_leaves_temporary_files_and_takes_no_exclusive_lock(tmp_path: Path) -> None:
    """A temporary file alone starts no sweep (it would wait for the exclusive lock behind every standby
    session): it may be a write under way."""
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 0)
    snap(repo, tmp_path / "data")
    writing = tmp_path / "repo" / "packs" / ".tmp-0123456789ab-under-way"
    writing.write_bytes(b"being written")
    with repo.lock(exclusive=False, wait_s=0):  # a writer's shared lock: an exclusive one would be refused
        engine.gc_repository(repo, lock_wait_s=0)
    assert writing.exists()
