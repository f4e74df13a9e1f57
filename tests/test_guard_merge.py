"""The standby's guards and the apply's content check over the row-group merge (issue 17): the deletion
guard, the mass-change guard and ``content_changed`` read the applied snapshot a row group at a time
(a :class:`ManifestFile`) and merge it with the new manifest, so a standby never holds two whole
manifests. Each is checked against a brute-force reference computed from the test's own description of
the two trees, over random trees and row groups small enough that every step boundary is crossed: moves
whose two ends lie in different steps, a directory replacing a file, links, DistCp's external rows.
"""

from __future__ import annotations

import random
from collections import Counter

import blake3
import pytest

import drsync.repository.manifest as manifest_mod
from drsync.guard import changed_files, deletion_guard, removed_files
from drsync.repository.manifest import Manifest, ManifestFile
from drsync.repository.manifest_diff import chunks_beyond, content_changed, diff
from tests.reliability import combinations
from tests.test_mass_change import Spec, manifest


def _random_tree(rnd: random.Random, n: int) -> dict[str, Spec]:
    tree: dict[str, Spec] = {}
    for i in range(n):
        path = f"d{rnd.randrange(6)}/{'e/' if rnd.random() < 0.3 else ''}f{i:04}"
        r = rnd.random()
        tree[path] = (("symlink", f"t{rnd.randrange(5)}") if r < 0.1 else ("external", f"x{rnd.randrange(50)}")
                      if r < 0.2 else "dir" if r < 0.25 else f"c{rnd.randrange(40)}")
    return tree


def _change(rnd: random.Random, old: dict[str, Spec]) -> dict[str, Spec]:
    new = dict(old)
    for path in rnd.sample(sorted(old), k=len(old) // 3):
        r = rnd.random()
        if r < 0.25:
            del new[path]
        elif r < 0.5:  # a move, often to another directory (another step of the merge)
            new[f"d{rnd.randrange(6)}/moved/{path.replace('/', '_')}"] = new.pop(path)
        elif r < 0.7:
            new[path] = f"c{rnd.randrange(40)}"
        elif r < 0.8:
            new[path] = "dir"
        elif r < 0.9:
            new[path] = ("external", f"x{rnd.randrange(50)}")
        else:
            new[path] = ("symlink", f"t{rnd.randrange(5)}")
    for i in range(rnd.randrange(len(old) // 5 + 1)):
        new[f"d{rnd.randrange(6)}/new{i:03}"] = f"c{rnd.randrange(40)}"
    return new


def _kind(spec: Spec) -> str:
    return "dir" if spec == "dir" else spec[0] if isinstance(spec, tuple) else "file"


def _ref_removed(a: dict[str, Spec], b: dict[str, Spec]) -> tuple[int, int, int]:
    na = {p: s for p, s in a.items() if s != "dir"}
    nb = {p: s for p, s in b.items() if s != "dir"}
    gone = Counter(s for p, s in na.items() if p not in nb)
    added = Counter(s for p, s in nb.items() if p not in na)
    moved = sum(min(n, added[k]) for k, n in gone.items())
    return len(na), sum(gone.values()) - moved, len(nb)


def _ref_changed(a: dict[str, Spec], b: dict[str, Spec], compare_external: bool) -> tuple[int, int]:
    files = {p: s for p, s in a.items() if _kind(s) in ("file", "external")}
    changed = 0
    for p, s in files.items():
        t = b.get(p)
        if t is None or _kind(t) not in ("file", "external") or _kind(t) != _kind(s):
            continue
        if not compare_external and _kind(s) == "external":
            continue
        changed += s != t
    return len(files), changed


def _ref_content_changed(a: dict[str, Spec], b: dict[str, Spec]) -> frozenset[str]:
    return frozenset(p for p, s in b.items() if _kind(s) in ("file", "external") and
                     (_kind(a.get(p, "dir")) not in ("file", "external") or a[p] != s))


CASES = combinations(range(6), (1, 3, 7, 65536))


@pytest.mark.parametrize(("seed", "group"), CASES)
def test_guards_over_the_merge_match_a_brute_force_reference(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                              group: int) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    rnd = random.Random(seed)
    old = _random_tree(rnd, rnd.randrange(1, 120))
    new = _change(rnd, old)
    ma, mb = manifest(old), manifest(new)
    fa, fb = ManifestFile(ma.to_bytes()), ManifestFile(mb.to_bytes())
    if group < 10:
        assert fa.num_groups > 2, "the merge must cross row groups"
    for a, b in ((fa, mb), (fa, fb), (ma, mb)):
        assert removed_files(a, b) == _ref_removed(old, new)
        assert removed_files(b, a) == _ref_removed(new, old)
        for ext in (True, False):
            assert changed_files(a, b, compare_external=ext) == _ref_changed(old, new, ext)
        assert content_changed(a, b) == _ref_content_changed(old, new)
        assert content_changed(b, a) == _ref_content_changed(new, old)


@pytest.mark.parametrize("group", [1, 2, 5])
def test_a_move_across_row_groups_is_not_a_removal(monkeypatch: pytest.MonkeyPatch, group: int) -> None:
    """Ten files moved from the first directory to the last: the removed end of each move is in an early
    step of the merge, the added end in a late one; none is counted as removed."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    middle: dict[str, Spec] = {f"m/f{i:03}": f"m{i}" for i in range(30)}
    old: dict[str, Spec] = {**{f"a/f{i}": f"moved {i}" for i in range(10)}, **middle}
    new: dict[str, Spec] = {**middle, **{f"z/f{i}": f"moved {i}" for i in range(10)}}
    fa = ManifestFile(manifest(old).to_bytes())
    assert removed_files(fa, manifest(new)) == (40, 0, 40)
    assert deletion_guard(fa, manifest(new), 0.0) is None
    gone = {**middle, **{f"z/f{i}": f"other {i}" for i in range(10)}}
    hold = deletion_guard(fa, manifest(gone), 0.2)
    assert hold is not None and hold.removed == 10 and hold.files == 40


def test_an_unsorted_manifest_is_compared_whole() -> None:
    """A manifest out of path order (none that drsync writes) gives the same figures, compared whole."""
    old: dict[str, Spec] = {f"f{i:02}": f"c{i}" for i in range(20)}
    new = {**old, "f03": "other", "zz": "c4"}
    del new["f04"]
    ma, mb = manifest(old), manifest(new)
    backwards = type(mb)(mb.table.take(list(range(mb.table.num_rows))[::-1]))
    assert removed_files(ma, backwards) == _ref_removed(old, new)
    assert changed_files(ma, backwards) == _ref_changed(old, new, True)
    assert content_changed(ma, backwards) == _ref_content_changed(old, new)
    assert sorted(diff(ma, backwards).paths()) == ["f03", "f04", "zz"]


def _chunked(entries: dict[str, list[bytes] | None]) -> Manifest:
    """A manifest of files with the given chunk lists (None: a directory); content from the list."""
    paths = sorted(entries)
    n = len(paths)
    lists = [entries[p] or [] for p in paths]
    return Manifest.from_columns({
        "path": paths, "type": ["dir" if entries[p] is None else "file" for p in paths], "mode": [0o644] * n,
        "uid": [0] * n, "gid": [0] * n, "size": [4 * len(c) for c in lists], "mtime_ns": [0] * n,
        "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": [None] * n,
        "content": [None if entries[p] is None else blake3.blake3(b"".join(entries[p] or [])).digest()
                    for p in paths],
        "chunks": lists, "chunk_sizes": [[4] * len(c) for c in lists]})


def _ids(rnd: random.Random, pool: list[bytes]) -> list[bytes]:
    return [rnd.choice(pool) for _ in range(rnd.randrange(0, 5))]


@pytest.mark.parametrize(("seed", "group"), CASES)
def test_chunks_beyond_a_base_are_those_of_rows_it_does_not_hold_alike(monkeypatch: pytest.MonkeyPatch, seed: int,
                                                                       group: int) -> None:
    """What a commit checks beyond the applied snapshot: the chunks of every row whose chunk list is not
    exactly the applied one's at that path (a new path, a list reordered, one id swapped, one more id),
    repeats and row order kept; nothing of a row held alike. Against a brute-force reference."""
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", group)
    rnd = random.Random(seed)
    pool = [blake3.blake3(bytes([i])).digest() for i in range(12)]
    old: dict[str, list[bytes] | None] = {
        f"d{rnd.randrange(5)}/f{i:03}": None if rnd.random() < 0.15 else _ids(rnd, pool)
        for i in range(rnd.randrange(1, 90))}
    new = dict(old)
    for p in rnd.sample(sorted(old), k=len(old) // 2):
        chunks = old[p]
        r = rnd.random()
        if r < 0.2:
            del new[p]
        elif r < 0.4 and chunks and len(chunks) > 1:
            new[p] = chunks[::-1]
        elif r < 0.6 and chunks:
            new[p] = [*chunks[:-1], rnd.choice(pool)]
        elif r < 0.8:
            new[p] = [*(chunks or []), rnd.choice(pool)]
        else:
            new[f"z/{p}"] = _ids(rnd, pool)
    reference = [c for p in sorted(new) if new[p] is not None and new[p] != old.get(p) for c in new[p] or []]
    ma, mb = _chunked(old), _chunked(new)
    fa, fb = ManifestFile(ma.to_bytes()), ManifestFile(mb.to_bytes())
    for a, b in ((fa, mb), (fa, fb), (ma, mb)):
        assert chunks_beyond(a, b).to_pylist() == reference
        assert chunks_beyond(b, b).to_pylist() == []
    assert chunks_beyond(_chunked({}), mb).to_pylist() == [c for p in sorted(new) for c in new[p] or []]


def test_chunks_beyond_an_unsorted_base_are_the_same() -> None:
    pool = [blake3.blake3(bytes([i])).digest() for i in range(4)]
    old = {f"f{i}": [pool[i % 4], pool[(i + 1) % 4]] for i in range(8)}
    new = {**old, "f2": [pool[0]], "f9": [pool[3]]}
    ma = _chunked(old)
    backwards = type(ma)(ma.table.take(list(range(ma.table.num_rows))[::-1]))
    assert chunks_beyond(backwards, _chunked(new)).to_pylist() == [pool[0], pool[3]]
