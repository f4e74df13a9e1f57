"""Links resolved through each other (drsync.repository.manifest_check.escaping_links) with a stack of their
own: the same answers as the recursive resolution on random link sets, chains of any length (a chain of 600
links and one climbing link gave a RecursionError: no snapshot of the tree could be taken or restored), and
what a call held is freed when it returns (its closures referred to each other, so every link it resolved
stayed in memory until a full collection, which a process rarely runs). Cases from breaker s53."""

from __future__ import annotations

import gc
import os
import random
import tracemalloc
from pathlib import Path

import pytest

from drsync import engine
from drsync.errors import IntegrityError
from drsync.repository.manifest import Manifest
from drsync.repository.manifest_check import escaping_links, validate
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
                  + [(p, "symlink", t) for p, t in links.items()], key=lambda r: r[0].encode())
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
