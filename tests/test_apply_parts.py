"""An apply checks and locates the chunks it writes a part at a time (issue 17, drsync.apply_chunks).

At 1,000,000 chunks the locations of every chunk a first sync writes cost 61 MiB beside the manifest;
in parts of :data:`PART_CHUNKS` chunks only the part being staged is located. These tests shrink the
parts to a few chunks, so that a small odd tree crosses many parts, and check what must not change:
the tree an apply leaves (new target, delta, standby), that a missing chunk in any part is refused
before anything on the target changes, naming its file, and that only the parts at hand are held.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from drsync import apply_chunks
from drsync.apply import apply_manifest
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.packs import index_bytes, read_index_file
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import init_repo_at
from tests.test_capture_any_tree import exact_state, odd_tree
from tests.test_lean_manifest import _snapshot


def test_parts_cover_every_file_once_and_reach_their_budget() -> None:
    """Pure: consecutive, covering, each part but the last reaches the budget only with its last file."""
    rnd = np.random.default_rng(5)
    for _ in range(400):
        n = int(rnd.integers(0, 60))
        sizes = rnd.choice([0, 1, 500, fmt.CHUNK_AVG - 1, fmt.CHUNK_AVG, 3 * fmt.CHUNK_AVG + 7, 40 * fmt.CHUNK_AVG],
                           size=n).astype(np.int64)
        budget = int(rnd.integers(1, 12))
        bounds = apply_chunks.bounds_of(sizes, budget)
        est = np.where(sizes > 0, sizes // fmt.CHUNK_AVG + 1, 0)
        assert bounds[0] == 0 and bounds[-1] == n and (n == 0 or all(a < b for a, b in itertools.pairwise(bounds)))
        for a, b in itertools.pairwise(bounds[:-1]):
            assert est[a:b].sum() >= budget > est[a:b - 1].sum()


def _tree(root: Path, seed: int) -> None:
    odd_tree(root)
    rnd = random.Random(seed)
    many = root / "many"
    many.mkdir()
    for i in range(60):
        (many / f"f{i:02}").write_bytes(rnd.randbytes(rnd.randrange(1, 3000)))


class _Spy:
    """Counts the readers located and the most held at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.located = 0
        self.most_held = 0
        locate, cover = apply_chunks.PartReaders._locate, apply_chunks.PartReaders.cover

        def counting_locate(parts: apply_chunks.PartReaders, k: int):  # type: ignore[no-untyped-def]
            self.located += 1
            return locate(parts, k)

        def counting_cover(parts: apply_chunks.PartReaders, lo: int, hi: int) -> None:
            cover(parts, lo, hi)
            self.most_held = max(self.most_held, len(parts.readers))

        monkeypatch.setattr(apply_chunks.PartReaders, "_locate", counting_locate)
        monkeypatch.setattr(apply_chunks.PartReaders, "cover", counting_cover)


def test_applies_in_parts_leave_the_same_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new target, a delta onto a changed copy, and an apply onto an empty directory, with parts of 4
    chunks: the exact tree of the source each time; many parts were located, at most two held at once."""
    src = tmp_path / "src"
    _tree(src, 1)
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    rp, whole, lean = _snapshot(repo, src)
    monkeypatch.setattr(apply_chunks, "PART_CHUNKS", 4)
    spy = _Spy(monkeypatch)
    new = tmp_path / "new"
    apply_manifest(lean, rp, str(new))
    assert exact_state(new) == exact_state(src)
    assert spy.located > 10 and spy.most_held <= 2, (spy.located, spy.most_held)

    empty = tmp_path / "empty"
    empty.mkdir()
    apply_manifest(lean, Repository.open(LocalStorage(repo)), str(empty))  # not fresh: checked, then located
    assert exact_state(empty) == exact_state(src)

    for i in range(0, 60, 3):
        (new / "many" / f"f{i:02}").write_bytes(b"changed" * i)
    (new / "many" / "f01").unlink()
    (new / "many" / "f01").mkdir()
    spy.located = 0
    apply_manifest(whole, Repository.open(LocalStorage(repo)), str(new))
    assert exact_state(new) == exact_state(src)
    assert spy.located >= 4


def _drop_from_index(repo: Path, chunk_id: bytes) -> None:
    """Rewrite the repository's index files without ``chunk_id`` (its pack stays)."""
    for f in (repo / "index").rglob("*"):
        if f.is_file():
            rows = read_index_file(f.read_bytes(), f.name)
            keep = np.flatnonzero(rows.ids != np.frombuffer(chunk_id, "S32")[0])
            if len(keep) < len(rows):
                f.write_bytes(index_bytes(rows.take(keep)))


@pytest.mark.parametrize("fresh", [True, False])
def test_a_chunk_missing_from_the_last_part_is_refused_before_the_target_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: bool) -> None:
    """The last file's chunk is gone from the index: refused up front, naming the file, whichever part it is
    in; a new target is not made, an existing one is left exactly as it was, with no staging area."""
    src = tmp_path / "src"
    _tree(src, 2)
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    _, whole, lean = _snapshot(repo, src)
    last = whole.entries_at([max(i for i, e in enumerate(whole.entries()) if e.chunks)])[0]
    _drop_from_index(repo, last.chunks[-1])
    monkeypatch.setattr(apply_chunks, "PART_CHUNKS", 3)
    target = tmp_path / "t"
    if not fresh:
        target.mkdir()
        (target / "keep").write_bytes(b"mine")
        before, mtime = exact_state(target), target.stat().st_mtime_ns
    with pytest.raises(IntegrityError, match=rf"{last.path}: chunk [0-9a-f]+ is missing.*nothing was changed"):
        apply_manifest(lean, Repository.open(LocalStorage(repo)), str(target))
    if fresh:
        assert not target.exists()
    else:
        assert exact_state(target) == before and target.stat().st_mtime_ns == mtime
        assert not (target / ".drsync-staging").exists()


def test_the_standby_applies_in_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipment's first sync and a change, with parts of 2 chunks: production's tree on the standby."""
    from tests.test_lean_manifest import test_the_standby_applies_a_shipment_from_a_lean_manifest as shipment

    monkeypatch.setattr(apply_chunks, "PART_CHUNKS", 2)
    spy = _Spy(monkeypatch)
    shipment(tmp_path, monkeypatch)
    assert spy.located > 4 and spy.most_held <= 2
