"""Manifest validation: the rules a manifest must meet before anything restores or applies it.

Owns the path rules shared by every side (:func:`unsafe_path_reason`, the reserved staging name and
the length limits), the symlink rules a link at a time (:func:`symlink_leaves_root`; the rest are judged
together by :mod:`drsync.repository.link_walk`) and :func:`validate`, which refuses a manifest that could write outside
the root or is inconsistent. Pure, like :mod:`drsync.repository.manifest`, which it builds on.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import allocators
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.link_walk import escaping_in, may_escape
from drsync.repository.manifest import (
    DIR,
    FILE,
    SYMLINK,
    TYPES,
    Manifest,
    ManifestFile,
    _pycolumn,
    bool_mask,
    check_values,
    column_groups,
    index_in_unique,
    path_parents,
)
from drsync.repository.manifest_root import root_of
from drsync.text import printable

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
    """True when a link at ``path`` pointing to ``target`` resolves inside the root *by its text alone*.

    Neither way is the answer for a link among others: a chain through other links can leave the root
    (``a -> d/b/..`` with ``d/b -> ..``), and a ``..`` after another link climbs from where that link
    leads (``y -> x/../..`` with ``x -> d/e`` is the root itself). What is refused or dropped is decided by
    :func:`symlink_leaves_root` a link at a time and :mod:`drsync.repository.link_walk` over the whole set;
    this only words a refusal (a link whose text leaves the root "leaves" it, else it leads out "through
    other links")."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined != ".." and not joined.startswith("../") and not joined.startswith("/")


def symlink_leaves_root(path: str, target: str) -> bool:
    """True when a link at ``path`` pointing to ``target`` leaves the root whatever the other links are:
    its target is empty, absolute or holds a NUL, or its leading ``..`` components climb above the root from
    the link's directory (whose components are directories). A ``..`` after a name is not judged here: the
    name may be a link (``y -> x/../..`` with ``x -> d/e`` is the root itself); :mod:`drsync.repository.link_walk`
    resolves such links with the others."""
    if not target or target.startswith("/") or "\x00" in target:
        return True
    depth = path.count("/")  # the link's directory, in components below the root
    for comp in target.split("/"):
        if comp == "..":
            depth -= 1
            if depth < 0:
                return True
        elif comp not in ("", "."):
            return False
    return False


def validate(manifest: Manifest | ManifestFile, what: str = "manifest") -> None:
    """Refuse a manifest that could write outside the root or is inconsistent (IntegrityError naming the
    first fault). Checked before anything touches a target, so bad input changes nothing; ``repo verify``
    checks every snapshot the same way, so a verified repository restores.

    A row group at a time: beyond one group it holds the directories, the parents named, the symlinks
    and the hard links (never every path), and it checks uniqueness by path order (a manifest out of
    order, which drsync never writes, is checked with a set of its paths instead). Column operations
    (:func:`_screen`) pick the rows a per-row check could refuse; only those are judged one at a time in
    Python, in row order, so the first fault named is the one a row-by-row pass would name."""
    root_of(manifest, what)  # the root's own metadata, if it carries any, has its shape
    dirs: set[str] = set()
    parent_of: dict[str, str] = {}  # each parent named -> the first path naming it
    climbs = False  # some symlink target has a '..' (or is empty or absolute): links are then resolved together
    leads: list[pa.Array] = []  # the first files hard links name (each slice's, unique), as bytes
    ordered, last = True, None
    seen: set[bytes] = set()  # once out of order: every path so far, each row checked against it in turn
    done = 0  # rows of the slices before this one
    cols = ["path", "type", "mode", "size", "target", "hardlink", "chunks", "chunk_sizes", "uid", "gid", "mtime_s",
            "mtime_nsec"]  # the last four for check_values alone
    for t in _slices(column_groups(manifest, cols)):
        check_values(t, what)  # nulls first: every check below reads values
        if not t.num_rows:
            continue
        need, sums = _screen(t)
        keys = t.column("path")
        first_key = _raw(keys[0])
        ooo = -1  # the first row out of path order (while the manifest is still in order)
        if ordered:
            if last is not None and first_key <= last:
                ooo = 0
            elif t.num_rows > 1:
                later = np.flatnonzero(bool_mask(pc.less_equal(keys[1:], keys[:-1])))
                ooo = int(later[0]) + 1 if len(later) else -1
            if ooo >= 0:
                need[ooo:] = True
        else:
            need[:] = True
        rows = np.flatnonzero(need)
        if len(rows):
            picked = t.select(["path", "type", "mode", "size", "target", "hardlink"]).take(pa.array(rows))
            paths = _pycolumn(picked, "path")
            types, modes, sizes = (picked.column(n).to_pylist() for n in ("type", "mode", "size"))
            targets, hardlinks = _pycolumn(picked, "target"), _pycolumn(picked, "hardlink")
            counts = {n: pc.list_value_length(t.column(n).take(pa.array(rows))).to_pylist()
                      for n in ("chunks", "chunk_sizes")}
            for k, row in enumerate(rows.tolist()):
                path, typ = paths[k], types[k]
                if _suspect(path):
                    raise IntegrityError(f"{what}: unsafe path {printable(path)!r} ({unsafe_path_reason(path)}); "
                                         f"refusing it")
                if row == ooo:
                    if _raw(keys[row]) == (last if row == 0 else _raw(keys[row - 1])):
                        raise IntegrityError(f"{what}: {printable(path)} appears twice")
                    ordered = False  # from here on uniqueness by a set (only a manifest drsync did not write)
                    seen = _keys_before(manifest, done) | {_raw(k) for k in keys[:row]}
                if not ordered:
                    key = path.encode("utf-8", "surrogateescape")
                    if key in seen:
                        raise IntegrityError(f"{what}: {printable(path)} appears twice")
                    seen.add(key)
                if typ not in TYPES:
                    raise IntegrityError(f"{what}: {printable(path)}: unknown entry type {typ!r}")
                if modes[k] is None or modes[k] > 0o7777:
                    raise IntegrityError(f"{what}: {printable(path)}: mode {modes[k]!r} is not a permission mode")
                if typ == SYMLINK:
                    if len((targets[k] or "").encode("utf-8", "surrogateescape")) > TARGET_MAX:
                        raise IntegrityError(f"{what}: symlink {printable(path)}: target longer than {TARGET_MAX} "
                                             f"bytes")
                    if symlink_leaves_root(path, targets[k] or ""):
                        raise IntegrityError(f"{what}: symlink {printable(path)} -> {printable(targets[k] or '')} "
                                             f"points outside the data root")
                chunks, pieces, total = counts["chunks"][k] or 0, counts["chunk_sizes"][k] or 0, int(sums[row])
                if chunks != pieces and not (typ == FILE and not chunks and pieces == 1 and total == sizes[k]
                                             and sizes[k] > 0):
                    raise IntegrityError(f"{what}: {printable(path)}: chunk list and chunk sizes differ in length")
                if typ == FILE and total != sizes[k]:
                    raise IntegrityError(f"{what}: {printable(path)}: chunks add up to {total} bytes, size says "
                                         f"{sizes[k]}")
                if hardlinks[k] is not None and typ != FILE:
                    raise IntegrityError(f"{what}: {printable(path)}: a {typ} cannot be a hard link")
        if not climbs:
            climbs = may_escape(t.column("target").filter(pc.equal(t.column("type"), SYMLINK)))
        named = t.column("hardlink").drop_null()
        if len(named):
            leads.append(pc.unique(named.cast(pa.large_binary()).combine_chunks()))
        last = _raw(keys[-1])
        done += t.num_rows
        dirs.update(_pycolumn(pa.table({"path": pc.filter(keys, pc.equal(t.column("type"), DIR))}), "path"))
        _note_parents(keys, parent_of)
    del seen
    for parent, child in parent_of.items():
        if parent not in dirs:
            raise IntegrityError(f"{what}: {printable(child)} has no parent directory entry {printable(parent)!r}")
    if leads:
        first_files = pc.unique(pa.chunked_array(leads))  # no joined copy of them
        leads.clear()
        allocators.give_back()  # what the row checks freed, before the link check holds its columns
        _check_hard_links(manifest, first_files, what)
    if climbs:  # only then is every link read again (in columns), and resolved through the others
        escaping = escaping_in(lambda: column_groups(manifest, ["path", "type", "target"]), every=False)
        if escaping:
            path, target = (os.fsdecode(x) for x in escaping[0])
            if not symlink_stays_inside(path, target):
                raise IntegrityError(f"{what}: symlink {printable(path)} -> {printable(target)} points outside the "
                                     f"data root")
            raise IntegrityError(f"{what}: symlink {printable(path)} -> {printable(target)} leads outside the data "
                                 f"root through other links of the snapshot; refusing it")


def _check_hard_links(manifest: Manifest | ManifestFile, leads: pa.Array, what: str) -> None:
    """Each hard link names the first file of its group: a file of this snapshot (not a directory or link),
    without a link of its own, not the linking path itself, and of the linking row's size and content (a
    row says what the file holds; a link to another content would restore other bytes). ``leads``: every
    path named (unique, bytes). IntegrityError naming the first linking row that fails, in row order.

    One pass over the manifest, in columns, a slice at a time. Per first file it keeps its kind, size and
    content digest (about 45 bytes a group, in NumPy arrays indexed like ``leads``); a link row whose first
    file came before it (always, in a manifest drsync writes: the first file is the group's first path) is
    judged in its slice and kept no longer; one whose first file comes later is set aside (its row, first
    file, size and content) and judged at the end. Both lookups hash the slice's side, never ``leads``."""
    n = len(leads)
    width = fmt.ID_LEN
    seen = np.zeros(n, bool)  # the first file's row was read
    lead_ok = np.zeros(n, bool)  # found, a file, without a link of its own
    lead_size = np.full(n, -1, np.int64)
    lead_null = np.ones(n, bool)  # no content digest
    lead_content = np.zeros((n, width), np.uint8)
    later: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "lead", "size", "null", "content", "itself")}
    first_bad: tuple[int, bool] | None = None  # (row, whether the first file is wrong) of the earliest failure
    done = 0
    for t in _slices(column_groups(manifest, ["path", "type", "size", "content", "hardlink"]), 4 * _SLICE_ROWS):
        paths = t.column("path").combine_chunks()
        link = t.column("hardlink").combine_chunks()
        size = t.column("size").to_numpy()
        null, content = _digests(t.column("content").combine_chunks(), width)
        at = _positions(leads, paths)  # per lead: its row in this slice, or -1
        here = np.flatnonzero(at >= 0)
        if len(here):
            r = at[here]
            seen[here] = True
            lead_ok[here] = (bool_mask(pc.equal(t.column("type"), FILE)) & bool_mask(pc.is_null(link)))[r]
            lead_size[here], lead_null[here], lead_content[here] = size[r], null[r], content[r]
        linking = np.flatnonzero(bool_mask(pc.is_valid(link)))
        if len(linking):
            sel = pa.array(linking)
            names = link.take(sel)
            which = index_in_unique(names.cast(leads.type), leads)  # per linking row: its first file's, or -1
            itself = bool_mask(pc.equal(names, paths.take(sel)))
            ready = (which >= 0) & seen[np.maximum(which, 0)]
            rows = linking[ready]
            bad = _judged(which[ready], size[rows], null[rows], content[rows], itself[ready],
                          lead_ok, lead_size, lead_null, lead_content)
            if bad is not None and (first_bad is None or done + int(rows[bad[0]]) < first_bad[0]):
                first_bad = (done + int(rows[bad[0]]), bad[1])
            rows = linking[~ready]  # their first file is further on (or nowhere): judged at the end
            for k, v in zip(later, (done + rows, which[~ready], size[rows], null[rows], content[rows],
                                    itself[~ready]), strict=True):
                later[k].append(v)
        done += t.num_rows
    if later["row"]:
        rows, w = np.concatenate(later["row"]), np.concatenate(later["lead"])
        bad = _judged(w, np.concatenate(later["size"]), np.concatenate(later["null"]),
                      np.concatenate(later["content"]), np.concatenate(later["itself"]),
                      lead_ok & seen, lead_size, lead_null, lead_content)
        if bad is not None and (first_bad is None or int(rows[bad[0]]) < first_bad[0]):
            first_bad = (int(rows[bad[0]]), bad[1])
    if first_bad is None:
        return
    path, lead = _row_values(manifest, first_bad[0], ("path", "hardlink"))
    if first_bad[1]:
        raise IntegrityError(f"{what}: {printable(path)}: hard link to {printable(lead)}, which is not "
                             f"another file of the snapshot without a link of its own")
    raise IntegrityError(f"{what}: {printable(path)}: hard link to {printable(lead)}, whose size or "
                         f"content differs from this row's; refusing it")


def _digests(col: pa.FixedSizeBinaryArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A content column as ``(null, digests)``: a bool per row, and a ``(rows, width)`` uint8 array (zeros
    where null), viewing the column's buffer when it has one."""
    null = bool_mask(pc.is_null(col))
    data = col.buffers()[1]
    if data is None or col.type.byte_width != width:
        return null, np.zeros((len(col), width), np.uint8)
    raw = np.frombuffer(data, np.uint8)[col.offset * width:(col.offset + len(col)) * width]
    return null, raw.reshape(len(col), width)


def _positions(leads: pa.Array, paths: pa.Array) -> np.ndarray:
    """Per lead, its index in ``paths`` (a slice's paths, unique), or -1: the hash is the slice's."""
    return pc.index_in(leads, value_set=paths.cast(leads.type)).fill_null(-1).to_numpy()


def _judged(which: np.ndarray, size: np.ndarray, null: np.ndarray, content: np.ndarray, itself: np.ndarray,
            lead_ok: np.ndarray, lead_size: np.ndarray, lead_null: np.ndarray, lead_content: np.ndarray
            ) -> tuple[int, bool] | None:
    """The first failing link row (its index here, and whether its first file is the fault) or None:
    rows naming first files ``which`` (-1: none), with their sizes, digests and self-naming flags."""
    at = np.maximum(which, 0)
    bad_lead = itself | (which < 0) | ~lead_ok[at]
    same = (null & lead_null[at]) | (~null & ~lead_null[at] & (content == lead_content[at]).all(axis=1))
    bad = bad_lead | (size != lead_size[at]) | ~same
    if not bad.any():
        return None
    k = int(np.flatnonzero(bad)[0])
    return k, bool(bad_lead[k])


def _row_values(manifest: Manifest | ManifestFile, row: int, names: tuple[str, ...]) -> list[str]:
    """The text values (as :func:`_pycolumn` gives them) of columns ``names`` at one row."""
    for t in column_groups(manifest, list(names)):
        if row < t.num_rows:
            one = t.slice(row, 1)
            return [_pycolumn(one, n)[0] for n in names]
        row -= t.num_rows
    raise IndexError(row)


def _screen(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(need, sums)`` for a slice of a manifest: ``need`` (bool, one a row) marks every row a per-row check
    of :func:`validate` could refuse (a suspect path, a type other than file or directory, a mode beyond
    0o7777, chunk lists that do not match or do not add up to the size, a hard link of a non-file, a symlink); the rest
    pass them all. ``sums``: each row's chunk sizes added up (int64). Column operations only."""
    types = t.column("type")
    is_file = bool_mask(pc.equal(types, FILE))
    plain = is_file | bool_mask(pc.equal(types, DIR))
    sizes = t.column("size").to_numpy()
    sums = _list_sums(t.column("chunk_sizes"))
    chunks = pc.list_value_length(t.column("chunks")).fill_null(0).to_numpy()
    pieces = pc.list_value_length(t.column("chunk_sizes")).fill_null(0).to_numpy()
    whole = is_file & (chunks == 0) & (pieces == 1) & (sums == sizes) & (sizes > 0)  # one unchunked piece
    need = ~plain | (t.column("mode").to_numpy() > 0o7777) | ((chunks != pieces) & ~whole)
    need |= is_file & (sums != sizes)
    need |= bool_mask(pc.is_valid(t.column("hardlink"))) & ~is_file  # file links: _check_hard_links, in columns
    need |= np.asarray(suspect_paths(t.column("path")), dtype=bool)
    return need, sums


def _note_parents(paths: pa.ChunkedArray, parent_of: dict[str, str]) -> None:
    """Record in ``parent_of`` each parent directory ``paths`` name (not yet there) with the first path naming
    it. Parents are split off in C; only the rows whose parent differs from the row before are decoded
    (a sorted manifest names each directory's parent in runs)."""
    parents, has = path_parents(paths)
    starts = has.copy()
    if len(parents) > 1:
        starts[1:] &= bool_mask(pc.not_equal(parents[1:], parents[:-1])) | ~has[:-1]
    rows = pa.array(np.flatnonzero(starts))
    if not len(rows):
        return
    named = _pycolumn(pa.table({"path": parents.take(rows)}), "path")
    children = _pycolumn(pa.table({"path": paths.take(rows)}), "path")
    for parent, child in zip(named, children, strict=True):
        parent_of.setdefault(parent, child)


def _raw(v: pa.Scalar) -> bytes:
    """A path value's bytes (the order :func:`validate` checks), for a binary or a string column."""
    got = v.as_py()
    return got if isinstance(got, bytes) else got.encode("utf-8", "surrogateescape")


def _keys_before(manifest: Manifest | ManifestFile, n: int) -> set[bytes]:
    """The paths (bytes) of the manifest's first ``n`` rows."""
    out: set[bytes] = set()
    for t in column_groups(manifest, ["path"]):
        if n <= 0:
            break
        out.update(_raw(v) for v in t.column("path")[:n])
        n -= t.num_rows
    return out


def _suspect(path: str) -> bool:
    return unsafe_path_reason(path) is not None


# Rows decoded to Python values at a time: a quarter of a row group (its values as objects cost
# about 400 bytes a row, 25 MiB for a whole group at the peak of every apply).
_SLICE_ROWS = 16384


def _slices(pieces: Iterator[pa.Table], rows: int | None = None) -> Iterator[pa.Table]:
    step = rows or _SLICE_ROWS
    for t in pieces:
        for lo in range(0, t.num_rows, step):
            yield t.slice(lo, step)


def _list_sums(col: pa.ChunkedArray) -> np.ndarray:
    """The sum of each list of ``col`` (0 for an empty or null one; int64), for sliced arrays too."""
    out: list[np.ndarray] = []
    for chunk in col.chunks:
        off = chunk.offsets.to_numpy().astype(np.int64)  # into chunk.values, which a slice does not cut
        values = chunk.values.slice(int(off[0]), int(off[-1] - off[0])).cast(pa.int64())
        cums = np.concatenate(([0], np.cumsum(values.to_numpy(zero_copy_only=False), dtype=np.int64)))
        off -= off[0]
        out.append(cums[off[1:]] - cums[off[:-1]])
    return np.concatenate(out) if out else np.zeros(0, np.int64)
