"""drsync.repository.link_leaders: hard-link groups by their leader's row, against a dict of the names.

Every row's group (the one it leads, the one its ``hardlink`` names) and every group's size must be the
dict's, whatever the hashes: a run with a hash of four values makes every lookup meet other paths of the
same hash first, which must never join two groups."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from drsync.repository import link_leaders
from drsync.repository.link_leaders import LinkLeaders


def _columns(rnd: random.Random, n: int, chunks: int) -> tuple[pa.ChunkedArray, pa.ChunkedArray, list]:
    names = sorted({bytes(rnd.choice(b"ab/\xff\x00") for _ in range(rnd.randint(1, 12))) for _ in range(n)})
    links: list[bytes | None] = [None] * len(names)
    leaders = rnd.sample(range(len(names)), max(1, len(names) // 5))
    for row in range(len(names)):
        if row not in leaders and rnd.random() < 0.6:
            links[row] = names[rnd.choice(leaders)]
    cuts = sorted(rnd.sample(range(1, len(names)), min(chunks, len(names) - 1))) if len(names) > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, len(names)], strict=True))
    paths = pa.chunked_array([pa.array(names[a:b], pa.binary()) for a, b in bounds], pa.binary())
    hard = pa.chunked_array([pa.array(links[a:b], pa.binary()) for a, b in bounds], pa.binary())
    return paths, hard, links


def _reference(names: list[bytes], links: list[bytes | None]) -> tuple[dict[int, int], dict[int, int]]:
    """(leader row -> group size, row -> the leader row of its group) by dicts of names."""
    row_of = {p: i for i, p in enumerate(names)}
    size: dict[int, int] = {}
    member: dict[int, int] = {}
    for i, h in enumerate(links):
        if h is not None:
            lead = row_of[h]
            size[lead] = size.get(lead, 1) + 1
            member[i] = lead
    return size, member


@pytest.mark.parametrize("collide", [False, True], ids=["python-hash", "four-hashes"])
@pytest.mark.parametrize("seed", range(60))
def test_groups_are_the_dicts_whatever_the_hashes(monkeypatch: pytest.MonkeyPatch, seed: int, collide: bool) -> None:
    if collide:
        real = link_leaders.hashes_of
        monkeypatch.setattr(link_leaders, "hashes_of", lambda values: real(values) % 4)
    rnd = random.Random(seed)
    paths, hard, links = _columns(rnd, rnd.randint(1, 400), rnd.randint(1, 6))
    names = [p for c in paths.chunks for p in c.to_pylist()]
    size, member = _reference(names, links)
    got = LinkLeaders(paths, hard.chunks)
    assert got.rows.tolist() == sorted(size) and got.size.tolist() == [size[r] for r in sorted(size)]
    group_of_leader = {r: g for g, r in enumerate(got.rows.tolist())}
    rows = np.arange(len(names))
    assert got.group_of_rows(rows).tolist() == [group_of_leader.get(r, -1) for r in rows.tolist()]
    for chunk_start in range(0, len(names), 37):  # asked a slice at a time, as the merge asks
        part = pa.array(links[chunk_start:chunk_start + 37], pa.binary())
        want = [group_of_leader[member[chunk_start + k]] if h is not None else -1
                for k, h in enumerate(links[chunk_start:chunk_start + 37])]
        assert got.group_of_names(part).tolist() == want
    assert got.group_of_names(pa.array([b"not/a/path", None], pa.binary())).tolist() == [-1, -1]


def test_no_hard_links_build_nothing() -> None:
    paths = pa.chunked_array([pa.array([b"a", b"b"], pa.binary())])
    got = LinkLeaders(paths, [pa.nulls(2, pa.binary())])
    assert len(got) == 0 and got.group_of_rows(np.arange(2)).tolist() == [-1, -1]
    assert got.group_of_names(pa.array([b"a", None], pa.binary())).tolist() == [-1, -1]


def test_100000_groups_of_long_names_hold_a_few_bytes_a_row() -> None:
    """Two hard-linked days of 100,000 files with 63-byte names: what is held is NumPy columns (32
    bytes a group), not the names (the value_counts it replaces held 33 MiB at 500,000 groups, and
    100 MiB while counting)."""
    n = 100_000
    day0 = [f"daily.0/home/user{i % 50:03}/projects/data-{i // 1000:04}/report_{i:05}_final.csv".encode()
            for i in range(n)]
    names = sorted(day0 + [b"daily.1" + p[7:] for p in day0])
    links = [None if p.startswith(b"daily.0") else b"daily.0" + p[7:] for p in names]
    got = LinkLeaders(pa.chunked_array([pa.array(names, pa.binary())]), [pa.array(links)])
    assert len(got) == n and set(got.size.tolist()) == {2}
    held = got.rows.nbytes + got.size.nbytes + got._sorted.nbytes + got._order.nbytes
    assert held <= 32 * n
    assert (got.group_of_names(pa.array(links[-5:], pa.binary())) >= 0).all()


def test_a_lean_manifest_leaves_the_hard_links_in_its_file_and_still_gives_them(tmp_path) -> None:
    """The names hard links give (36 MiB in a lean table of two hard-linked days of 500,000 files) are read
    from the manifest's file with the rows that ask: entries, entries at rows and values at rows give what
    the whole manifest gives."""
    import os

    from drsync import engine
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    src = tmp_path / "src"
    (src / "daily.0").mkdir(parents=True)
    (src / "daily.1").mkdir()
    for i in range(50):
        (src / "daily.0" / f"f{i:02}").write_bytes(b"x" * i)
        os.link(src / "daily.0" / f"f{i:02}", src / "daily.1" / f"f{i:02}")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    whole, lean = repo.load_manifest(info), repo.load_manifest(info, lean=True)
    assert "hardlink" in whole.table.column_names and "hardlink" not in lean.table.column_names
    want = [(e.path, e.hardlink) for e in whole.entries()]
    assert sum(h is not None for _, h in want) == 50
    assert [(e.path, e.hardlink) for e in lean.entries(light=True)] == want
    assert [(e.path, e.hardlink) for e in lean.entries()] == want
    rows = np.arange(0, len(want), 3)
    assert [(e.path, e.hardlink) for e in lean.entries_at(rows, light=True)] == [want[r] for r in rows.tolist()]
    assert lean.values_at(rows, ("path", "hardlink"))["hardlink"] == [want[r][1] for r in rows.tolist()]
