"""The apply at scale: planning works on light entries (no chunk lists), the commit journal is written
in pieces, and memory per planned file stays bounded (a regression to per-file chunk lists or a
whole-plan JSON string fails here)."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from drsync import engine
from drsync.apply import ApplyPlan, FileJournal, _plan_from_json, _plan_json, apply_manifest, plan_apply
from drsync.repository.manifest import Manifest, content_digest
from drsync.repository.repo import Repository
from drsync.storage.memory import MemoryStorage

MiB = 1 << 20


def _manifest(n: int) -> Manifest:
    """``n`` files of one chunk each in directories of 1,000 (plus the directories)."""
    rng = np.random.default_rng(7)
    dirs = [f"d{d:04}" for d in range((n + 999) // 1000)]
    paths = [f"{dirs[i // 1000]}/f{i % 1000:05}.dat" for i in range(n)] + dirs
    files = n
    ids = rng.integers(0, 256, size=(files, 32), dtype=np.uint8)
    sizes = rng.integers(64, 1024, size=files).tolist()
    return Manifest.from_columns({
        "path": paths, "type": ["file"] * files + ["dir"] * len(dirs),
        "mode": [0o644] * files + [0o755] * len(dirs), "uid": [0] * len(paths), "gid": [0] * len(paths),
        "size": sizes + [0] * len(dirs), "mtime_ns": [1_700_000_000_000_000_000 + i for i in range(len(paths))],
        "target": [None] * len(paths), "ctime_ns": [1] * len(paths), "inode": list(range(1, len(paths) + 1)),
        "content": [content_digest([bytes(r)]) for r in ids] + [None] * len(dirs),
        "chunks": [[bytes(r)] for r in ids] + [[] for _ in dirs],
        "chunk_sizes": [[s] for s in sizes] + [[] for _ in dirs]})


def test_light_entries_plan_like_full_ones_and_get_their_chunks_back() -> None:
    m = _manifest(2500)
    full = list(m.entries())
    light = list(m.entries(light=True))
    assert [e.row for e in light] == list(range(len(m)))
    assert all(not e.chunks and e.content is None for e in light)
    assert [e.external for e in light] == [e.external for e in full]
    a, b = plan_apply(full, {}), plan_apply(light, {})
    assert [e.path for e in a.write] == [e.path for e in b.write] and len(a.write) == 2500
    picked = m.entries_at([b.write[7].row, b.write[3].row])
    assert [e.path for e in picked] == [full[b.write[7].row].path, full[b.write[3].row].path]
    assert picked[0].chunks == full[b.write[7].row].chunks and picked[0].chunks
    assert m.paths_naming(full[5].chunks[0]) == [full[5].path]
    # A manifest read a row group at a time is many record batches: rows from several, in any order.
    pieces = Manifest(pa.concat_tables([m.table.slice(0, 700), m.table.slice(700, 1100), m.table.slice(1800)]))
    rows = [2502, 3, 699, 700, 1799, 1800, 5, 2000]
    assert pieces.entries_at(rows) == [full[r] for r in rows]
    assert [e.row for e in pieces.entries_at(rows)] == rows


def test_the_journal_written_in_pieces_reads_back_as_the_plan(tmp_path: Path) -> None:
    entries = list(_manifest(9000).entries(light=True))
    plan = plan_apply(entries, {})
    plan.remove = [f"gone/{i}" for i in range(5000)]
    plan.unlock = ["d0001"]
    staged = {e.path: f"s/{n}" for n, e in enumerate(plan.write)}
    journal = FileJournal(str(tmp_path / "journal"))
    journal.save(_plan_json(plan, staged, batch=1000))
    raw = journal.load()
    assert raw is not None
    doc = json.loads(raw)
    assert doc["phase"] == "commit"
    back, back_staged = _plan_from_json(doc)
    assert back_staged == staged
    for name in ("write", "mkdir", "link", "fix_meta", "dirs", "hardlink"):
        assert [(e.path, e.mode, e.size, e.mtime_ns) for e in getattr(back, name)] == \
               [(e.path, e.mode, e.size, e.mtime_ns) for e in getattr(plan, name)], name
    assert back.remove == plan.remove and back.unlock == plan.unlock
    assert back.touched_dirs == plan.touched_dirs
    empty = json.loads(b"".join(_plan_json(ApplyPlan(), {})))
    assert _plan_from_json(empty)[0].write == [] and empty["staged"] == {}


def test_planning_a_restore_of_200000_files_costs_a_bounded_amount_a_file() -> None:
    """Entries, plan and the journal's text for 200,000 files: Python's allocations (tracemalloc) stay
    under 700 bytes a file (about 570 now; full entries with chunk lists and a whole-plan JSON string took about
    1,770)."""
    n = 200_000
    m = _manifest(n)
    tracemalloc.start()
    try:
        entries = list(m.entries(light=True))
        plan = plan_apply(entries, {})
        staged = {e.path: f"{k}" for k, e in enumerate(plan.write)}
        with open(os.devnull, "wb") as sink:
            for piece in _plan_json(plan, staged):
                sink.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan.write) == n
    assert peak / n < 700, f"{peak / n:.0f} bytes a file, {peak / MiB:.0f} MiB"


def test_restore_with_a_missing_chunk_names_the_file_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_bytes(b"alpha " * 100)
    (data / "b.txt").write_bytes(b"beta " * 100)
    repo = Repository.init(MemoryStorage(), cluster_id="east", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(data)))
    manifest = repo.load_manifest(info)
    lost = next(e for e in manifest.entries() if e.path == "sub/a.txt").chunks[0]

    class Lossy:
        def read_chunk(self, cid: bytes) -> bytes:
            return repo.read_chunk(cid)

        def has_chunk(self, cid: bytes) -> bool:
            return cid != lost and repo.has_chunk(cid)

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    try:
        apply_manifest(manifest, Lossy(), str(target))
    except Exception as e:  # IntegrityError, naming the file
        assert "sub/a.txt" in str(e) and "missing" in str(e), e
    else:
        raise AssertionError("a restore with a missing chunk went ahead")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_a_restore_under_a_held_lock_sees_chunks_another_writer_added(tmp_path: Path) -> None:
    """A drill holds the repository's shared lock while it restores; the agent (another process: here
    another Repository object on the same directory) stores a new snapshot meanwhile. Restoring that
    snapshot through the drill's object finds its chunks (the cached index is looked at again)."""
    from drsync.storage import open_storage

    data = tmp_path / "data"
    data.mkdir()
    (data / "old.txt").write_text("old rows\n")
    store = str(tmp_path / "repo")
    drill = Repository.init(open_storage(store, create=True), cluster_id="east", release="1")
    engine.create_snapshot(drill, engine.SnapshotRequest(str(data)))
    with drill.lock(exclusive=False, wait_s=5):
        assert drill.has_chunk(b"\0" * 32) is False  # the index is loaded under the lock
        (data / "arrived.txt").write_bytes(os.urandom(5000))
        agent = Repository.open(open_storage(store))
        info = engine.create_snapshot(agent, engine.SnapshotRequest(str(data)))
        result = apply_manifest(drill.load_manifest(info), drill, str(tmp_path / "out"))
    assert result.written_files == 2
    assert (tmp_path / "out" / "arrived.txt").read_bytes() == (data / "arrived.txt").read_bytes()
