"""Manifest validation: the rules a manifest must meet before anything restores or applies it.

Owns the path rules shared by every side (:func:`unsafe_path_reason`, the reserved staging name and
the length limits), the symlink checks (:func:`symlink_stays_inside` lexically, :func:`escaping_links`
through a whole set of links) and :func:`validate`, which refuses a manifest that could write outside
the root or is inconsistent. Pure, like :mod:`drsync.repository.manifest`, which it builds on.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.errors import IntegrityError
from drsync.repository.manifest import (
    DIR,
    FILE,
    SYMLINK,
    TYPES,
    Manifest,
    ManifestFile,
    _pycolumn,
    check_values,
    column_groups,
    printable,
)

# The name drsync stages an apply under, at the top of a target and of every filesystem mounted
# inside it. It is reserved at any depth: capture skips it (and says so), and a manifest naming it is
# refused, so a staged file can never collide with a snapshot's path.
RESERVED_NAME = ".drsync-staging"
NAME_MAX = 255      # bytes in one path component (Linux, HDFS)
TARGET_MAX = 4095   # bytes in a symlink's target (PATH_MAX - 1)


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` cannot be a manifest path (None when it can): the one rule for every side."""
    if not path:
        return "empty path"
    if path.startswith("/"):
        return "absolute path"
    if "\x00" in path:
        return "NUL byte in path"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "empty, '.' or '..' component"
        if part == RESERVED_NAME:
            return f"{RESERVED_NAME} is reserved for drsync's staging area"
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            return f"a name longer than {NAME_MAX} bytes"
    return None


def suspect_paths(paths: pa.Array | pa.ChunkedArray) -> list[bool]:
    """Which paths (binary or string, no nulls) :func:`unsafe_path_reason` must judge: every path it could
    refuse is among them. The rest are safe by construction: not empty, at most NAME_MAX bytes in all
    (so in each name), no NUL, no ``/`` at either end or twice in a row (no empty component), and no
    component that starts with ``.`` (so none is ``.``, ``..`` or the reserved name). Byte tests over the
    column, so that a manifest of plain names is not judged a name at a time in Python."""
    n = pc.binary_length(paths)
    suspect = pc.or_(pc.equal(n, 0), pc.greater(n, NAME_MAX))
    for test, pattern in ((pc.starts_with, "/"), (pc.starts_with, "."), (pc.ends_with, "/"),
                          (pc.match_substring, "//"), (pc.match_substring, "/."), (pc.match_substring, "\x00")):
        suspect = pc.or_(suspect, test(paths, pattern))
    return suspect.to_pylist()


def symlink_stays_inside(path: str, target: str) -> bool:
    """True when a link at ``path`` pointing to ``target`` resolves inside the root (lexically).

    Lexical only: a chain through other links can still leave the root; :func:`escaping_links`
    resolves a whole set of links through each other."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined != ".." and not joined.startswith("../") and not joined.startswith("/")


_LOOP = ("\x00loop",)  # a link that resolves through itself: the kernel says ELOOP, nothing is reached


def escaping_links(links: dict[str, str]) -> list[str]:
    """The links (path -> target) that resolve outside the root when followed as the kernel would.

    Each component of a target is resolved against the tree the links describe: a component that
    is itself a link is replaced by where that link leads before ``..`` applies, so ``d/b -> ..``
    makes ``a -> d/b/..`` leave the root although it looks inside. Each link is resolved once
    (memoised), so hostile chains cost linear time; loops resolve to nothing and do not escape.
    """
    memo: dict[str, tuple[str, ...] | None] = {}

    def resolve(p: str) -> tuple[str, ...] | None:
        if p in memo:
            return memo[p]
        memo[p] = _LOOP  # in progress: reaching it again is a loop
        r = walk(tuple(p.split("/")[:-1]), links[p])
        memo[p] = r
        return r

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
            key = "/".join(cur)
            if key in links:
                r = resolve(key)
                if r is None or r == _LOOP:
                    return r
                cur = list(r)
        return tuple(cur)

    return sorted(p for p in links if resolve(p) is None)


def validate(manifest: Manifest | ManifestFile, what: str = "manifest") -> None:
    """Refuse a manifest that could write outside the root or is inconsistent (IntegrityError naming the
    first fault). Checked before anything touches a target, so bad input changes nothing; ``repo verify``
    checks every snapshot the same way, so a verified repository restores.

    A row group at a time: beyond one group it holds the directories, the parents named, the symlinks
    and the hard links (never every path), and it checks uniqueness by path order (a manifest out of
    order, which drsync never writes, is checked with a set of its paths instead)."""
    dirs: set[str] = set()
    parent_of: dict[str, str] = {}  # each parent named -> the first path naming it
    links: dict[str, str] = {}
    linked: dict[str, str] = {}  # hard-linked path -> the first file of its group
    ordered, last = True, None
    cols = ["path", "type", "mode", "size", "target", "hardlink", "chunks", "chunk_sizes", "uid", "gid", "mtime_s",
            "mtime_nsec"]  # the last four for check_values alone
    for t in _slices(column_groups(manifest, cols)):
        check_values(t, what)  # nulls first: every check below reads values
        paths = _pycolumn(t, "path")
        suspect = suspect_paths(t.column("path"))
        types = t.column("type").to_pylist()
        sizes = t.column("size").to_pylist()
        targets = _pycolumn(t, "target")
        hardlinks = _pycolumn(t, "hardlink")
        modes = t.column("mode").to_pylist()
        chunk_counts = pc.list_value_length(t.column("chunks")).to_pylist()
        size_counts = pc.list_value_length(t.column("chunk_sizes")).to_pylist()
        sums = _list_sums(t.column("chunk_sizes"))
        for i, path in enumerate(paths):
            reason = "missing path" if path is None else unsafe_path_reason(path) if suspect[i] else None
            if reason:
                raise IntegrityError(f"{what}: unsafe path {printable(path) if path else path!r} ({reason}); "
                                     f"refusing it")
            key = path.encode("utf-8", "surrogateescape")
            if ordered and last is not None and key <= last:
                if key == last:
                    raise IntegrityError(f"{what}: {printable(path)} appears twice")
                ordered = False
            last = key
            typ = types[i]
            if typ not in TYPES:
                raise IntegrityError(f"{what}: {printable(path)}: unknown entry type {typ!r}")
            if modes[i] is None or modes[i] > 0o7777:
                raise IntegrityError(f"{what}: {printable(path)}: mode {modes[i]!r} is not a permission mode")
            if typ == DIR:
                dirs.add(path)
            elif typ == SYMLINK:
                if len((targets[i] or "").encode("utf-8", "surrogateescape")) > TARGET_MAX:
                    raise IntegrityError(f"{what}: symlink {printable(path)}: target longer than {TARGET_MAX} bytes")
                if not symlink_stays_inside(path, targets[i] or ""):
                    raise IntegrityError(f"{what}: symlink {printable(path)} -> {printable(targets[i] or '')} "
                                         f"points outside the data root")
                links[path] = targets[i]
            if (chunk_counts[i] or 0) != (size_counts[i] or 0) and not (
                    typ == FILE and not chunk_counts[i] and size_counts[i] == 1 and sums[i] == sizes[i]
                    and sizes[i] > 0):
                raise IntegrityError(f"{what}: {printable(path)}: chunk list and chunk sizes differ in length")
            if typ == FILE and sums[i] != sizes[i]:
                raise IntegrityError(f"{what}: {printable(path)}: chunks add up to {sums[i]} bytes, size says "
                                     f"{sizes[i]}")
            if hardlinks[i] is not None:
                if typ != FILE:
                    raise IntegrityError(f"{what}: {printable(path)}: a {typ} cannot be a hard link")
                linked[path] = hardlinks[i]
            parent = posixpath.dirname(path)
            if parent:
                parent_of.setdefault(parent, path)
    if not ordered:  # uniqueness the slow way (only for a manifest drsync did not write)
        seen: set[str] = set()
        for t in column_groups(manifest, ["path"]):
            for path in _pycolumn(t, "path"):
                if path in seen:
                    raise IntegrityError(f"{what}: {printable(path)} appears twice")
                seen.add(path)
    for parent, child in parent_of.items():
        if parent not in dirs:
            raise IntegrityError(f"{what}: {printable(child)} has no parent directory entry {printable(parent)!r}")
    if linked:
        # The first file of each group: a file of this snapshot (not a directory or link), without a
        # link of its own, not the path itself, and of the member's size and content
        # (a member row says what the file holds; a link to another content would restore other bytes).
        leads = set(linked.values())
        kinds: dict[str, str] = {}
        held: dict[str, tuple[int, bytes | None]] = {}
        for t in _slices(column_groups(manifest, ["path", "type", "size", "content"])):
            for path, typ, size, digest in zip(_pycolumn(t, "path"), t.column("type").to_pylist(),
                                               t.column("size").to_pylist(), t.column("content").to_pylist(),
                                               strict=True):
                if path in leads:
                    kinds[path] = typ
                if path in leads or path in linked:
                    held[path] = (size, digest)
        for path, lead in linked.items():
            if lead == path or kinds.get(lead) != FILE or lead in linked:
                raise IntegrityError(f"{what}: {printable(path)}: hard link to {printable(lead)}, which is not "
                                     f"another file of the snapshot without a link of its own")
            if held.get(lead) != held.get(path):
                raise IntegrityError(f"{what}: {printable(path)}: hard link to {printable(lead)}, whose size or "
                                     f"content differs from this row's; refusing it")
    escaping = escaping_links(links)
    if escaping:
        p = escaping[0]
        raise IntegrityError(f"{what}: symlink {printable(p)} -> {printable(links[p])} leads outside the data "
                             f"root through other links of the snapshot; refusing it")


# Rows decoded to Python values at a time: a quarter of a row group (its values as objects cost
# about 400 bytes a row, 25 MiB for a whole group at the peak of every apply).
_SLICE_ROWS = 16384


def _slices(pieces: Iterator[pa.Table]) -> Iterator[pa.Table]:
    for t in pieces:
        for lo in range(0, t.num_rows, _SLICE_ROWS):
            yield t.slice(lo, _SLICE_ROWS)


def _list_sums(col: pa.ChunkedArray) -> list[int]:
    """The sum of each list of ``col`` (0 for an empty or null one), for sliced arrays too."""
    out: list[int] = []
    for chunk in col.chunks:
        off = chunk.offsets.to_numpy().astype(np.int64)  # into chunk.values, which a slice does not cut
        values = chunk.values.slice(int(off[0]), int(off[-1] - off[0])).cast(pa.int64())
        cums = np.concatenate(([0], np.cumsum(values.to_numpy(zero_copy_only=False), dtype=np.int64)))
        off -= off[0]
        out.extend((cums[off[1:]] - cums[off[:-1]]).tolist())
    return out
