"""Links resolved through each other (drsync.repository.link_walk) with a stack of their
own: the same answers as the recursive resolution on random link sets, chains of any length (a chain of 600
links and one climbing link gave a RecursionError: no snapshot of the tree could be taken or restored), and
what a call held is freed when it returns (its closures referred to each other, so every link it resolved
stayed in memory until a full collection, which a process rarely runs). Cases from breaker s53."""

from __future__ import annotations

import gc
import itertools
import os
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

from drsync import engine
from drsync.errors import IntegrityError
from drsync.repository import link_walk
from drsync.repository.link_walk import escaping_in, escaping_links
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage

_LOOP = ("\x00loop",)


def _reference(links: dict[str, str]) -> list[str]:
    """The recursive resolution drsync used before (small inputs only)."""
    memo: dict[str, tuple[str, ...] | None] = {}

    def resolve(p: str) -> tuple[str, ...] | None:
        if p in memo:
            return memo[p]
        memo[p] = _LOOP
        memo[p] = walk(tuple(p.split("/")[:-1]), links[p])
        return memo[p]

    def walk(start: tuple[str, ...], target: str) -> tuple[str, ...] | None:
        if not target or target.startswith("/") or "\x00" in target:
            return None
        cur = list(start)
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not cur:
                    return None
                cur.pop()
                continue
            cur.append(comp)
            if "/".join(cur) in links:
                r = resolve("/".join(cur))
                if r is None or r == _LOOP:
                    return r
                cur = list(r)
        return tuple(cur)

    return sorted(p for p in links if resolve(p) is None)


@pytest.mark.parametrize("seed", range(6))
def test_the_stack_resolves_as_the_recursion_did(seed: int) -> None:
    rnd = random.Random(seed)
    names = ["a", "b", "c", "a/x", "a/y", "b/z", "c/d/e", "a/x/w", "up", "d"]
    parts = ["..", ".", "", "a", "b", "x", "y", "z", "c", "d", "e", "w", "up"]
    for _ in range(400):
        links = {p: "/".join(rnd.choice(parts) for _ in range(rnd.randint(0, 4)))
                 for p in rnd.sample(names, rnd.randint(1, len(names)))}
        if rnd.random() < 0.1:
            links[rnd.choice(list(links))] = "/" + rnd.choice(parts)
        assert escaping_links(links) == _reference(links), links


def _links_manifest(links: dict[str, str], files: tuple[str, ...] = (), dirs: tuple[str, ...] = ()) -> Manifest:
    rows = sorted([(p, "dir", None) for p in dirs] + [(p, "file", None) for p in files]
                  + [(p, "symlink", t) for p, t in links.items()],
                  key=lambda r: r[0].encode("utf-8", "surrogateescape"))
    n = len(rows)
    return Manifest.from_columns({
        "path": [r[0] for r in rows], "type": [r[1] for r in rows], "target": [r[2] for r in rows],
        "mode": [0o755 if r[1] == "dir" else 0o644 for r in rows], "uid": [0] * n, "gid": [0] * n,
        "size": [0] * n, "mtime_ns": [1] * n, "ctime_ns": [1] * n, "inode": [1] * n,
        "content": [None] * n, "chunks": [[]] * n, "chunk_sizes": [[]] * n, "hardlink": [None] * n})


def test_a_chain_of_100000_links_and_one_climbing_link_is_judged() -> None:
    n = 100_000
    links = {f"l{i:06d}": f"l{i + 1:06d}" for i in range(n)}
    links["d/up"] = "../l000000"  # climbs, and leads inside the root along the whole chain
    validate(_links_manifest(links, files=(f"l{n:06d}",), dirs=("d",)))
    links["d/top"] = ".."
    links[f"l{n - 1:06d}"] = "d/top/.."  # the chain's end now leaves the root through d/top: so does the chain
    assert len(escaping_links(links)) == n + 1
    with pytest.raises(IntegrityError, match="leads outside the data root through other links"):
        validate(_links_manifest(links, files=(f"l{n:06d}",), dirs=("d",)))


def test_a_capture_of_a_long_chain_with_a_climbing_link_is_taken_and_restored(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    n = 600
    (src / f"l{n:04d}").write_bytes(b"end\n")
    for i in range(n):
        (src / f"l{i:04d}").symlink_to(f"l{i + 1:04d}")
    (src / "d" / "up").symlink_to("../l0000")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    engine.restore_snapshot(repo, info.id, str(tmp_path / "tgt"), cluster_id="c", release="1")
    tgt = tmp_path / "tgt"
    assert os.readlink(tgt / "d" / "up") == "../l0000" and os.readlink(tgt / "l0599") == "l0600"
    assert (tgt / "l0600").read_bytes() == b"end\n" and len(os.listdir(tgt)) == n + 2


def test_what_a_resolution_held_is_freed_when_it_returns() -> None:
    links = {f"d{i // 1000:03d}/l{i % 1000:03d}": f"x{i}" for i in range(50_000)}
    links["zzz/up"] = ".."
    gc.collect()
    gc.disable()  # what is freed must be freed without the cycle collector
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert escaping_links(links) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 1 << 20, f"{held / (1 << 20):.1f} MiB still held after the call"


def _rows(links: dict[str, str], rnd: random.Random, files: int = 0) -> link_walk.Rows:
    """``links`` as a tree's rows (binary, sorted, with some files among them), cut into tables at random."""
    rows = sorted([(p.encode(), "symlink", t.encode()) for p, t in links.items()]
                  + [(f"f{i}".encode(), "file", None) for i in range(files)])
    cuts = sorted({0, len(rows), *(rnd.randrange(len(rows) + 1) for _ in range(3))})
    tables = [pa.table({"path": pa.array([r[0] for r in rows[a:b]], pa.binary()),
                        "type": pa.array([r[1] for r in rows[a:b]], pa.string()),
                        "target": pa.array([r[2] for r in rows[a:b]], pa.binary())})
              for a, b in itertools.pairwise(cuts)]
    return lambda: iter(tables)


def _random_links(rnd: random.Random, shortest: int) -> dict[str, str]:
    """Links at some of a few nested names, each a target of ``shortest`` to 4 components naming them."""
    names = ["a", "b", "c", "a/x", "a/y", "b/z", "c/d/e", "a/x/w", "up", "d", "c/d"]
    parts = ["..", ".", "", "a", "b", "x", "y", "z", "c", "d", "e", "w", "up"]
    return {p: "/".join(rnd.choice(parts) for _ in range(rnd.randint(shortest, 4)))
            for p in rnd.sample(names, rnd.randint(1, len(names)))}


@pytest.mark.parametrize("seed", range(4))
def test_links_read_from_rows_escape_as_the_recursion_says(seed: int) -> None:
    """escaping_in reads the targets a climbing link's walk needs from the rows again (a pass per step), or holds
    every link in columns once one escapes: the same answers as the recursive resolution, ``every=False`` one of
    them at least when there are any, and only escaping ones."""
    rnd = random.Random(seed)
    for _ in range(300):
        links = _random_links(rnd, 0)
        want = _reference(links)
        rows = _rows(links, rnd, files=rnd.randint(0, 3))
        got = escaping_in(rows)
        assert [p.decode() for p, _ in got] == want, links
        assert all(t.decode() == links[p.decode()] for p, t in got)
        some = [p.decode() for p, _ in escaping_in(rows, every=False)]
        assert bool(some) == bool(want) and set(some) <= set(want), links


def test_a_chain_longer_than_the_passes_is_judged_with_every_link_held() -> None:
    """A climbing link at the head of a chain longer than link_walk._ROUNDS: its walk needs a pass per link, so
    after the passes allowed every link is held in columns, and the answer is still the whole truth."""
    rnd = random.Random(7)
    n = link_walk._ROUNDS * 3
    links = {f"l{i:03d}": f"l{i + 1:03d}" for i in range(n)}
    links["d/up"] = "../l000"
    assert escaping_in(_rows(links, rnd)) == []
    links[f"l{n:03d}"] = "d/.."  # the chain's end leaves the root: the whole chain does
    links["d"] = "."
    got = [p.decode() for p, _ in escaping_in(_rows(links, rnd))]
    assert got == _reference(links) and len(got) == n + 2  # the chain (n + 1 links) and d/up
    assert escaping_in(_rows(links, rnd), every=False)


def test_one_climbing_link_among_200000_holds_no_object_per_link() -> None:
    """Validation of a tree of 200,000 links with one ``..`` link anywhere: the links are not held as Python objects
    (a dict of every link was about 60 MiB here, and at 1,000,000 links took `repo verify` from 204 to 549 MiB),
    only a hash per link and what the climbing link's walk passes through."""
    n = 200_000
    links = {f"d{i // 1000:03d}/l{i % 1000:03d}": f"sub/x{i}" for i in range(n)}
    links["d100/up"] = "../d101/l005"  # climbs, and stays inside through another link
    links["d101/l005"] = "../d102/l007"
    manifest = _links_manifest(links, dirs=tuple(f"d{i:03d}" for i in range(200)))
    gc.collect()
    tracemalloc.start()
    try:
        validate(manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"validation traced {peak / (1 << 20):.1f} MiB"
    links["d102/l007"] = "../zz/top/.."  # inside by its text, outside through zz/top
    links["zz/top"] = ".."
    with pytest.raises(IntegrityError, match="d100/up -> ../d101/l005 leads outside the data root through other"):
        validate(_links_manifest(links, dirs=(*(f"d{i:03d}" for i in range(200)), "zz")))


def test_a_chain_of_climbing_links_ending_at_a_plain_link_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Breaker s54: c/l0 -> ../c/l1 -> ... -> ../c/end, and c/end -> file. Every link of the chain climbs, its end
    does not, so every walk stopped at the end, whose target was not held yet, and the next link's walk went the
    whole chain again: quadratic (4,000 links took 26 s per create, verify or restore; 100,000 would take hours).
    A walk that stops now marks the links it passed as waiting, and the next walk that reaches one stops there."""
    walkers: list[link_walk._Walker] = []

    class Counted(link_walk._Walker):
        def __init__(self, target_of) -> None:  # type: ignore[no-untyped-def]
            super().__init__(target_of)
            walkers.append(self)

    monkeypatch.setattr(link_walk, "_Walker", Counted)
    n = 3000
    links = {f"c/l{i:05d}": f"../c/l{i + 1:05d}" for i in range(n)}
    links[f"c/l{n:05d}"] = "end"
    links["c/end"] = "file"
    assert escaping_in(_rows(links, random.Random(1))) == []
    steps = sum(w.steps for w in walkers)
    assert steps < 20 * n, f"{steps} components walked for a chain of {n} links"
    links["c/end"] = "../.."  # the end now leaves the root: so does the whole chain
    assert len(escaping_in(_rows(links, random.Random(1)))) == n + 2


@pytest.mark.parametrize("seed", range(4))
def test_links_through_links_left_out_escape_as_the_recursion_says(seed: int) -> None:
    """``outside``: links a capture left out by their text (absolute, empty, or climbing above the root at
    once) are not among the rows, only their path hashes; a walk reaching one leaves. The answers are the
    recursion's over every link, less the left-out ones."""
    import numpy as np

    rnd = random.Random(seed)
    for _ in range(300):
        links = _random_links(rnd, 1)
        gone = set(rnd.sample(sorted(links), rnd.randint(1, len(links))))
        for p in gone:
            links[p] = rnd.choice(("/etc", "../" * (p.count("/") + 1) + "x"))
        want = [p for p in _reference(links) if p not in gone]
        kept = {p: t for p, t in links.items() if p not in gone}
        outside = np.sort(np.array([hash(p.encode()) for p in gone], np.int64))
        got = escaping_in(_rows(kept, rnd, files=rnd.randint(0, 3)), outside=link_walk.LeftOut(outside))
        assert [p.decode() for p, _ in got] == want, (links, gone)


@pytest.mark.parametrize("seed", range(4))
def test_links_through_unwalked_paths_escape_as_the_recursion_says_on_the_tree_and_in_the_rows(seed: int) -> None:
    """``outside.unwalked``: a place the listing passed over (an excluded path, the reserved staging name), its
    links read when a walk reaches them. A listed link is named when the recursion over every link, hidden
    ones included, says it leaves (the tree), or the recursion over the listed links it keeps says so (the
    rows alone, as a restore validates them)."""
    import numpy as np

    rnd = random.Random(seed)
    met = 0
    for _ in range(300):
        links = _random_links(rnd, 1)
        top = rnd.choice(("a", "c", "a/x", "b", "c/d"))
        hidden = {p: t for p, t in links.items() if p == top or p.startswith(top + "/")}
        listed = {p: t for p, t in links.items() if p not in hidden}
        reads: list[bytes] = []

        def read(rel: bytes, hidden: dict[str, str] = hidden, reads: list[bytes] = reads) -> bytes | None:
            reads.append(rel)
            t = hidden.get(rel.decode())
            return None if t is None else t.encode()

        on_tree = [p for p in _reference(links) if p in listed]
        alone = _reference({p: t for p, t in listed.items() if p not in on_tree})
        outside = link_walk.LeftOut(None, np.array([hash(top.encode())], np.int64), read)
        got = escaping_in(_rows(listed, rnd, files=rnd.randint(0, 3)), outside=outside)
        assert [p.decode() for p, _ in got] == sorted({*on_tree, *alone}), (links, top)
        assert all(r == top.encode() or r.startswith(top.encode() + b"/") for r in reads)
        met += outside.met_unwalked
    assert met >= 10  # hidden links were reached (about 20 times in 300)
