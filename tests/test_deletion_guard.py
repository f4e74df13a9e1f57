"""The deletion guard (safety rule 8, second half): a shipped snapshot that would remove more than
replication.max_delete_fraction of the standby's files is stored but held, not applied, until an
operator confirms it; retention never expires snapshots while a hold is in place.

The planning function is tested directly; the rest with real agent processes (a fixed-role pair).
"""

from __future__ import annotations

import blake3

from drsync.guard import deletion_guard, removed_files
from drsync.repository.manifest import Manifest


def manifest(entries: dict[str, str | tuple[str, str]]) -> Manifest:
    """path -> "dir" | file content (str) | ("symlink", target)."""
    paths = sorted(entries)
    kinds, contents, targets = [], [], []
    for p in paths:
        v = entries[p]
        if v == "dir":
            kinds.append("dir"), contents.append(None), targets.append(None)
        elif isinstance(v, tuple):
            kinds.append("symlink"), contents.append(None), targets.append(v[1])
        else:
            kinds.append("file"), contents.append(blake3.blake3(v.encode()).digest()), targets.append(None)
    n = len(paths)
    return Manifest.from_columns({
        "path": paths, "type": kinds, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": [0] * n,
        "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": targets,
        "content": contents, "chunks": [[] for _ in paths], "chunk_sizes": [[] for _ in paths]})


def files(n: int, prefix: str = "f") -> dict[str, str | tuple[str, str]]:
    return {f"{prefix}{i:03}": f"content {prefix}{i}" for i in range(n)}


def test_guard_holds_only_over_the_limit() -> None:
    applied = manifest(files(10))
    half = manifest(dict(list(files(10).items())[:5]))  # removes exactly 50%
    assert deletion_guard(applied, half, 0.5) is None
    four = manifest(dict(list(files(10).items())[:4]))  # removes 60%
    hold = deletion_guard(applied, four, 0.5)
    assert hold is not None and (hold.files, hold.removed, hold.remaining) == (10, 6, 4)
    assert hold.describe() == "would remove 6 of 10 files (60.0%, over replication.max_delete_fraction 0.5)"
    assert deletion_guard(applied, four, 0.6) is None
    assert deletion_guard(applied, applied, 0.0) is None  # nothing removed: never held, even at limit 0
    one = manifest(dict(list(files(10).items())[:9]))
    assert deletion_guard(applied, one, 0.0) is not None  # limit 0: any deletion waits
    big = manifest(files(10_000))
    left = manifest(dict(list(files(10_000).items())[:129]))
    hold = deletion_guard(big, left, 0.5)
    assert hold is not None and "would remove 9,871 of 10,000 files (98.7%" in hold.describe()


def test_guard_on_empty_new_and_empty_applied() -> None:
    applied = manifest(files(3) | {"d": "dir"})
    empty = Manifest.empty()
    hold = deletion_guard(applied, empty, 0.5)
    assert hold is not None and hold.empties and hold.removed == 3
    # An emptied root waits whatever the limit says (a limit of 1 would otherwise let it through).
    hold = deletion_guard(applied, manifest({"d": "dir"}), 1.0)
    assert hold is not None and hold.empties and "without any file" in hold.describe()
    # Nothing applied yet, or an applied root without files: nothing to protect.
    assert deletion_guard(Manifest.empty(), manifest(files(3)), 0.5) is None
    assert deletion_guard(Manifest.empty(), Manifest.empty(), 0.5) is None
    assert deletion_guard(manifest({"d": "dir", "d/e": "dir"}), Manifest.empty(), 0.5) is None


def test_guard_counts_files_not_directories() -> None:
    tree = files(4) | {f"dir{i}": "dir" for i in range(20)}
    applied = manifest(tree)
    # Removing every directory (and no file) removes no file.
    assert removed_files(applied, manifest(files(4)))[:2] == (4, 0)
    assert deletion_guard(applied, manifest(files(4)), 0.5) is None
    # Links count as files.
    with_links = manifest(files(2) | {"l1": ("symlink", "f000"), "l2": ("symlink", "f001")})
    assert removed_files(with_links, manifest(files(2)))[:2] == (4, 2)
    # A file replaced by a directory of the same name is gone.
    assert removed_files(manifest(files(2)), manifest({"f000": "dir", "f001": "content f1"}))[:2] == (2, 1)
    # Files changed in place are not removals.
    changed = {p: v + " changed" for p, v in files(10).items() if isinstance(v, str)}
    assert deletion_guard(manifest(files(10)), manifest(changed), 0.0) is None


def test_guard_does_not_count_renames() -> None:
    applied = manifest(files(10) | {"a": "dir"})
    moved = manifest({f"a/{p}": v for p, v in files(10).items()} | {"a": "dir"})  # mv f* a/
    assert removed_files(applied, moved) == (10, 0, 10)
    assert deletion_guard(applied, moved, 0.5) is None
    # Renamed *and* rewritten (what ransomware does: f000 -> f000.locked, new content) is a removal.
    locked = manifest({f"{p}.locked": "encrypted " + str(v) for p, v in files(10).items()})
    hold = deletion_guard(applied, locked, 0.5)
    assert hold is not None and hold.removed == 10
    # Each added file stands for one removed file at most: ten identical files, one survivor moved.
    same = manifest({f"x{i}": "same" for i in range(10)})
    assert removed_files(same, manifest({"y": "same"}))[:2] == (10, 9)
    # A moved link keeps its target.
    assert removed_files(manifest({"l": ("symlink", "t")}), manifest({"m": ("symlink", "t")}))[:2] == (1, 0)
    assert removed_files(manifest({"l": ("symlink", "t")}), manifest({"m": ("symlink", "u")}))[:2] == (1, 1)
