"""The manifest: the table of one snapshot, stored as Parquet.

One row per path below the data root (the root itself is not a row), sorted
by path. Files carry their chunk list; ``content`` is the BLAKE3 of the
concatenated chunk ids, so two manifests diff as a join on scalar columns.
Everything here is pure: building, reading and counting tables. Validating one is
:mod:`drsync.repository.manifest_check`; diffing two is :mod:`drsync.repository.manifest_diff`.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drsync import allocators
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, ids_array, sort_unique
from drsync.repository.spool import Spool

FILE, DIR, SYMLINK = "file", "dir", "symlink"
TYPES = (FILE, DIR, SYMLINK)

# Version 2: paths and link targets are bytes (any name a POSIX filesystem holds), times are seconds
# plus nanoseconds (any time, before 1970 and after 2262), and files carry extended attributes (POSIX
# ACLs among them), their hard-link group, whether they are sparse, and whether they are stale.
SCHEMA = pa.schema([
    ("path", pa.binary()),
    ("type", pa.string()),
    ("mode", pa.uint32()),
    ("uid", pa.uint32()),
    ("gid", pa.uint32()),
    ("size", pa.int64()),
    ("mtime_s", pa.int64()),
    ("mtime_nsec", pa.uint32()),
    ("ctime_ns", pa.int64()),
    ("inode", pa.uint64()),
    ("target", pa.binary()),
    ("content", pa.binary(fmt.ID_LEN)),
    ("chunks", pa.list_(pa.binary(fmt.ID_LEN))),
    ("chunk_sizes", pa.list_(pa.uint32())),
    ("xattrs", pa.binary()),
    ("hardlink", pa.binary()),
    ("sparse", pa.bool_()),
    ("stale", pa.bool_()),
], metadata={b"drsync.format": str(fmt.FORMAT_VERSION).encode()})

# Version 1 (drsync before 2026-12): UTF-8 paths, int64 nanosecond times, no attributes. Still read.
SCHEMA_V1 = pa.schema([
    ("path", pa.string()), ("type", pa.string()), ("mode", pa.uint32()), ("uid", pa.uint32()),
    ("gid", pa.uint32()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()),
    ("inode", pa.uint64()), ("target", pa.string()), ("content", pa.binary(fmt.ID_LEN)),
    ("chunks", pa.list_(pa.binary(fmt.ID_LEN))), ("chunk_sizes", pa.list_(pa.uint32())),
])

EMPTY_CONTENT = blake3.blake3(b"").digest()
_INT64 = (-(1 << 63), (1 << 63) - 1)


def content_digest(chunk_ids: list[bytes]) -> bytes:
    return blake3.blake3(b"".join(chunk_ids)).digest()


def encode_name(name: str | None) -> bytes | None:
    """A path or link target as the bytes the filesystem holds (str paths use surrogateescape)."""
    return None if name is None else os.fsencode(name)


def decode_name(raw: bytes | None) -> str | None:
    """Bytes from a manifest as drsync's str form of a path: lossless (undecodable bytes become
    lone surrogates, as ``os.fsdecode`` does), so ``encode_name(decode_name(b)) == b``."""
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def split_ns(values: list[int]) -> tuple[list[int] | pa.Array, list[int] | pa.Array]:
    """Nanosecond times as (seconds, nanoseconds) columns; floor division keeps times before 1970 exact.
    Times that fit int64 (1677..2262, nearly all) are split by Arrow kernels, the rest in Python."""
    lo, hi = _INT64
    if values and lo <= min(values) and max(values) <= hi:
        ns = pa.array(values, pa.int64())
        secs = pc.divide(ns, 1_000_000_000)  # truncates toward zero
        rem = pc.subtract(ns, pc.multiply(secs, 1_000_000_000))
        neg = pc.less(rem, 0)
        secs = pc.if_else(neg, pc.subtract(secs, 1), secs)
        rem = pc.if_else(neg, pc.add(rem, 1_000_000_000), rem)
        return secs, pc.cast(rem, pa.uint32())
    return [v // 1_000_000_000 for v in values], [v % 1_000_000_000 for v in values]


def clamp_int64(values: list[int]) -> list[int]:
    lo, hi = _INT64
    if not values or (lo <= min(values) and max(values) <= hi):
        return values
    return [v if lo <= v <= hi else (lo if v < lo else hi) for v in values]


def encode_xattrs(pairs: list[tuple[bytes, bytes]] | None) -> bytes | None:
    """Extended attributes as one deterministic blob: sorted (name, value), each length-prefixed."""
    if not pairs:
        return None
    out = bytearray()
    for name, value in sorted(pairs):
        out += struct.pack(">HI", len(name), len(value)) + name + value
    return bytes(out)


def decode_xattrs(blob: bytes | None) -> list[tuple[bytes, bytes]]:
    """Inverse of :func:`encode_xattrs`; IntegrityError when the blob is malformed."""
    pairs: list[tuple[bytes, bytes]] = []
    i = 0
    raw = blob or b""
    while i < len(raw):
        if i + 6 > len(raw):
            raise IntegrityError("extended attributes are truncated")
        nl, vl = struct.unpack_from(">HI", raw, i)
        i += 6
        if i + nl + vl > len(raw):
            raise IntegrityError("extended attributes are truncated")
        pairs.append((raw[i:i + nl], raw[i + nl:i + nl + vl]))
        i += nl + vl
    return pairs


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None
    chunks: list[bytes]
    chunk_sizes: list[int]
    xattrs: bytes | None = None
    hardlink: str | None = None  # path of the first file of this file's hard-link group
    sparse: bool = False
    stale: bool = False
    content: bytes | None = None  # the manifest's content digest (BLAKE3 of the chunk ids, or of an HDFS checksum)
    # Where it came from: its row in the manifest (-1: not read from one), and for a light entry
    # (:meth:`Manifest.entries` ``light``, no chunk lists or digest) whether it is external.
    row: int = field(default=-1, compare=False)
    light_external: bool | None = field(default=None, compare=False)

    @property
    def external(self) -> bool:
        """Whether this file's bytes are not in the repository but in the capturing cluster's HDFS
        snapshot (``replication.engine = "distcp"``); see :func:`is_external`."""
        if self.light_external is not None:
            return self.light_external
        return self.type == FILE and is_external(self.chunks, self.chunk_sizes, self.size)

    def filled(self, chunks: list[bytes] | None, chunk_sizes: list[int] | None, content: bytes | None) -> Entry:
        """This (light) entry with its chunk lists and content digest, as its manifest row has them."""
        # Built directly: dataclasses.replace costs three times as much, and an apply fills every entry it writes.
        return Entry(self.path, self.type, self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.target,
                     chunks or [], chunk_sizes or [], self.xattrs, self.hardlink, self.sparse, self.stale, content,
                     row=self.row)


# Columns every row has a value in (the layout allows nulls; no writer leaves one).
REQUIRED = ("path", "type", "mode", "uid", "gid", "size", "mtime_s", "mtime_nsec", "mtime_ns")  # mtime_ns: version 1


def check_values(t: pa.Table, what: str) -> None:
    """IntegrityError when a piece of a manifest has a null where every row holds a value (:data:`REQUIRED`)
    or a null chunk id: damage or a hostile writer, refused before anything reads a row. Null counts only
    (no pass over the values)."""
    for name in REQUIRED:
        if name in t.column_names and t.column(name).null_count:
            raise IntegrityError(f"{what} is damaged: column {name} has an empty (null) value; it was not used")
    if "chunks" in t.column_names and pc.list_flatten(t.column("chunks")).null_count:
        raise IntegrityError(f"{what} is damaged: it lists a chunk id that is null; it was not used")


def _pycolumn(t: pa.Table, name: str) -> list:  # type: ignore[type-arg]
    if name in ("path", "target", "hardlink"):
        raw = t.column(name).to_pylist()
        if not pa.types.is_binary(t.column(name).type) and not pa.types.is_large_binary(t.column(name).type):
            return raw  # a text column (a table made in memory): already str
        if name == "path" and raw:  # never null: one join, one decode, one split in C
            parts = b"\0".join(raw).decode("utf-8", "surrogateescape").split("\0")
            if len(parts) == len(raw):
                return parts
        return [None if b is None else b.decode("utf-8", "surrogateescape") for b in raw]
    if name == "mtime_ns":
        secs, nsec = t.column("mtime_s"), t.column("mtime_nsec")
        lo, hi = pc.min_max(secs).values() if len(secs) else (None, None)
        if lo is not None and lo.as_py() > -9_000_000_000 and hi.as_py() < 9_000_000_000:  # no int64 overflow
            return pc.add(pc.multiply(secs, 1_000_000_000), pc.cast(nsec, pa.int64())).to_pylist()
        return [a * 1_000_000_000 + b for a, b in zip(secs.to_pylist(), nsec.to_pylist(), strict=True)]
    return t.column(name).to_pylist()


def _shared(values: list) -> list:  # type: ignore[type-arg]
    """``values`` with equal ones as one object (types, modes: a handful of values over a million rows)."""
    seen: dict[object, object] = {}
    return [seen.setdefault(v, v) for v in values]


def _entries_of(t: pa.Table, start: int, light: bool, rows: list[int] | None = None) -> Iterator[Entry]:
    """Entries of the rows of ``t`` (rows ``start``... of their manifest, or the manifest rows ``rows``)."""
    if rows is None:
        rows = range(start, start + t.num_rows)  # type: ignore[assignment]
    assert rows is not None
    if not light:
        c = {n: _pycolumn(t, n) for n in Manifest._FULL}
        c["type"], c["mode"] = _shared(c["type"]), _shared(c["mode"])
        for i in range(t.num_rows):
            yield Entry(c["path"][i], c["type"][i], c["mode"][i], c["uid"][i], c["gid"][i], c["size"][i],
                        c["mtime_ns"][i], c["target"][i], c["chunks"][i] or [], c["chunk_sizes"][i] or [],
                        c["xattrs"][i], c["hardlink"][i], bool(c["sparse"][i]), bool(c["stale"][i]), c["content"][i],
                        row=rows[i])
        return
    c = {n: _pycolumn(t, n) for n in Manifest._LIGHT}
    c["type"], c["mode"] = _shared(c["type"]), _shared(c["mode"])
    external = external_mask(t).tolist()
    for i in range(t.num_rows):
        yield Entry(c["path"][i], c["type"][i], c["mode"][i], c["uid"][i], c["gid"][i], c["size"][i],
                    c["mtime_ns"][i], c["target"][i], [], [], c["xattrs"][i], c["hardlink"][i], bool(c["sparse"][i]),
                    bool(c["stale"][i]), None, row=rows[i], light_external=external[i])


def bool_mask(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as a NumPy mask, a null as False."""
    return np.asarray(a.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def path_parents(paths: pa.Array | pa.ChunkedArray) -> tuple[pa.Array | pa.ChunkedArray, np.ndarray]:
    """``(parents, named)``: each path's parent directory (split off in C at its last ``/``; the path itself
    where it has none) and the mask of the paths that have one (bool)."""
    split = pc.split_pattern(paths, "/", max_splits=1, reverse=True)
    return pc.list_element(split, 0), bool_mask(pc.equal(pc.list_value_length(split), 2))


def external_mask(t: pa.Table) -> np.ndarray:
    """``(N,)`` bool: which rows of manifest table ``t`` are external (:func:`is_external`), vectorised;
    the few candidates (rows captured for DistCp) are confirmed one by one."""
    if t.num_rows == 0:
        return np.zeros(0, dtype=bool)
    if LEAN_EXTERNAL in t.column_names:  # a lean table (:meth:`Manifest.lean`) carries it, worked out on load
        return np.asarray(t.column(LEAN_EXTERNAL).to_numpy(zero_copy_only=False), dtype=bool).copy()
    files = pc.and_(pc.equal(t.column("type"), FILE), pc.greater(t.column("size"), 0))
    # A null chunk list is an empty one, as validate reads it: such a row is external, never an empty file.
    maybe = pc.and_(files, pc.and_(pc.equal(pc.fill_null(pc.list_value_length(t.column("chunks")), 0), 0),
                                   pc.equal(pc.list_value_length(t.column("chunk_sizes")), 1)))
    mask = np.asarray(pc.fill_null(maybe, False).to_numpy(zero_copy_only=False), dtype=bool).copy()
    rows = np.flatnonzero(mask)
    if len(rows):
        picked = t.select(["size", "chunk_sizes"]).take(pa.array(rows, pa.int64()))
        sizes, lists = picked.column("size").to_pylist(), picked.column("chunk_sizes").to_pylist()
        for r, size, cs in zip(rows.tolist(), sizes, lists, strict=True):
            mask[r] = is_external([], cs, size)
    return mask


def is_external(chunk_ids: list[bytes] | None, chunk_sizes: list[int] | None, size: int) -> bool:
    """A file row whose content lives outside the repository: no chunk ids and one size, the file's.

    Such rows come from a capture for DistCp: ``content`` is :func:`hdfs_checksum_digest` of the
    file's HDFS checksum, and the bytes are copied by DistCp from the HDFS snapshot the snapshot
    document names (``content_snapshot``). drsync before external rows refuses them (chunk list and
    sizes differ in length), so an older release never applies such a snapshot as empty files.
    """
    return size > 0 and not chunk_ids and chunk_sizes is not None and len(chunk_sizes) == 1 and chunk_sizes[0] == size


def hdfs_checksum_digest(algorithm: str, checksum: bytes) -> bytes:
    """The ``content`` of an external row: BLAKE3 of an HDFS FileChecksum (its algorithm name, e.g.
    ``COMPOSITE-CRC32C``, and its bytes), as WebHDFS GETFILECHECKSUM reports them."""
    return blake3.blake3(b"drsync.hdfs-file-checksum\0" + algorithm.encode() + b"\0" + checksum).digest()


# Python-level columns a caller may give (from_columns) or read (pycolumn): names are str, times ns.
_DEFAULTS = {"xattrs": None, "hardlink": None, "sparse": False, "stale": False}


# What a lean manifest (:meth:`Manifest.lean`) leaves in its file: the chunk lists and content digests (about
# 73 MiB of a 1,000,000-file table's 161), the change-detection columns an apply never reads, and the
# extended attributes (ACLs and user attributes on every file: 300 bytes a file and more), and the hard links'
# names (a backup tree of two hard-linked days of 500,000 files of 63-byte paths: 36 MiB; an apply numbers
# the groups by their first file's row, drsync.repository.link_leaders), read back a row group at a time
# with the rows that ask for them.
LEAN_LEFT_OUT = ("chunks", "chunk_sizes", "content", "ctime_ns", "inode", "xattrs", "hardlink")
_LIGHT_LEFT_OUT = ("xattrs", "hardlink")  # what light entries hold of the columns a lean manifest leaves out
LEAN_EXTERNAL = "external"  # the lean table's own column: :func:`external_mask`, worked out on load
_HEAVY = ("chunks", "chunk_sizes", "content")


def index_in_unique(values: pa.Array, keys: pa.Array) -> np.ndarray:
    """Each of ``values`` (nulls allowed) as its index in ``keys`` (unique, of the values' type), or -1.

    Hashes the values' distinct ones and probes every key against them, never a table of ``keys``: for many
    keys (a million-file manifest's hard-link leaders, half a million in a tree of two hard-linked days, whose
    table held about 30 MiB) asked about a few values at a time (a slice's)."""
    distinct = pc.unique(values.drop_null())
    if not len(distinct) or not len(keys):
        return np.full(len(values), -1, np.int64)
    found = pc.index_in(keys, value_set=distinct).fill_null(-1).to_numpy()  # per key: its place in distinct
    index = np.full(len(distinct), -1, np.int64)
    hit = np.flatnonzero(found >= 0)
    index[found[hit]] = hit
    at = pc.index_in(values, value_set=distinct).fill_null(-1).to_numpy()
    return np.where(at >= 0, index[np.maximum(at, 0)], -1)


class Manifest:
    """An immutable, path-sorted Arrow table following :data:`SCHEMA`.

    A *lean* manifest (:meth:`lean`) holds every column but :data:`LEAN_LEFT_OUT` in memory and reads those
    from its :class:`ManifestFile` (``source``) for the rows that ask for them: what an apply holds of a
    million-file snapshot. Every method answers the same for both; only ``table`` lacks those columns."""

    def __init__(self, table: pa.Table, source: ManifestFile | None = None) -> None:
        self.table = table
        self.source = source  # a lean manifest's file (None: the table is whole)
        self.validated = False  # its rows passed manifest_check.validate (there, or as a file before a lean load)
        self._split: tuple[list[pa.RecordBatch], np.ndarray] | None = None  # for entries_at: batches, starts
        self._groups = _GroupCache(source) if source is not None else None

    @classmethod
    def lean(cls, source: ManifestFile) -> Manifest:
        """The manifest of ``source`` without the columns :data:`LEAN_LEFT_OUT`, read a row group at a time
        (each checked as :meth:`ManifestFile.group` checks it), with which rows are external worked out
        on the way. At 1,000,000 files about 90 MiB instead of 161."""
        keep = [n for n in SCHEMA.names if n not in LEAN_LEFT_OUT]
        parts = []
        limit, total = decoded_limit(), 0
        for g in range(source.num_groups):
            # Every column is read and checked, as a whole load checks it (damage in a column left out is
            # refused now, not by the next whole load); only the lean ones are kept. The extended attributes
            # (30 MiB a group with ACLs on every file) are read apart, and let go before the rest is.
            for part in ([["xattrs"], [n for n in SCHEMA.names if n != "xattrs"]] if not source.is_v1 else [None]):
                t = source.group(g, part)
                total += t.nbytes
                if total > limit:  # as Manifest.from_bytes: a footer may understate what its groups decode into
                    raise ManifestTooLarge(f"{source.what} decodes into more than {limit} bytes, the most drsync "
                                           f"decodes (docs/FORMAT.md, Limits); it was not read")
                check_values(t, source.what)
                if part == ["xattrs"]:
                    del t  # checked: not held while the rest is read
            ext = external_mask(t)
            parts.append(t.select(keep).append_column(LEAN_EXTERNAL, pa.array(ext, pa.bool_())))
        if not parts:
            empty = SCHEMA.empty_table().select(keep)
            parts.append(empty.append_column(LEAN_EXTERNAL, pa.array([], pa.bool_())))
        allocators.give_back()  # the row groups read whole and let go (at 1,000,000 files about 27 MiB)
        return cls(pa.concat_tables(parts), source)

    @classmethod
    def empty(cls) -> Manifest:
        return cls(SCHEMA.empty_table())

    @classmethod
    def from_columns(cls, columns: dict[str, list | pa.Array]) -> Manifest:
        """Build from Python-level columns: ``path``/``target``/``hardlink`` as str, ``mtime_ns`` as int
        nanoseconds; the attribute columns may be left out (none)."""
        return cls(sort_by_path(table_from_columns(columns)))

    def __len__(self) -> int:
        return self.table.num_rows

    def to_spool(self, memory_bytes: int | None = None) -> Spool:
        """The manifest serialised (:class:`ManifestWriter`) into a spool (in a temporary file past
        ``memory_bytes``, default 16 MiB)."""
        if self.source is not None:
            raise TypeError("a lean manifest is not serialised: read its file (Manifest.source) instead")
        w = ManifestWriter(self.table.schema, memory_bytes=memory_bytes)
        w.write(self.table)
        return w.finish()

    def to_bytes(self) -> bytes:
        return self.to_spool(memory_bytes=fmt.MANIFEST_MAX_BYTES + 1).getvalue()  # never a temporary file

    @classmethod
    def from_bytes(cls, data: bytes | pa.NativeFile | Spool, what: str = "manifest",
                   size: int | None = None) -> Manifest:
        """Parse a manifest of at most ``fmt.MANIFEST_MAX_BYTES`` (2 GiB). Raises IntegrityError.

        ``data``: the manifest's bytes, a seekable file of ``size`` bytes (a large stored manifest
        read by ranges: only the column chunks being decoded are held besides the table), or a spool."""
        if isinstance(data, Spool):
            data, size = data.source(), data.size
        if (len(data) if size is None else size) > fmt.MANIFEST_MAX_BYTES:  # type: ignore[arg-type]
            raise IntegrityError(f"{what} is {len(data) if size is None else size} bytes; a manifest is at most "  # type: ignore[arg-type]
                                 f"{fmt.MANIFEST_MAX_BYTES} bytes (docs/FORMAT.md, Limits); it was not read")
        try:
            table = _read_bounded(data, what)
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"{what} is damaged or truncated: {e}") from None
        v1 = layout_is_v1(table.schema, what)
        try:
            # Parquet does not check that strings are UTF-8 or that lists are consistent; a damaged or
            # hostile manifest must fail here, with a clear error, not later inside a restore.
            table.validate(full=True)
        except pa.ArrowInvalid as e:
            raise IntegrityError(f"{what} is damaged: {e}") from None
        check_values(table, what)  # before an upgrade, which reads the values
        return cls(_upgrade_v1(table)) if v1 else cls(table)

    @staticmethod
    def chunk_ids_from_bytes(data: bytes, what: str = "manifest") -> pa.ChunkedArray:
        """Every chunk id a serialised manifest names, in file order with repeats: its ``chunks`` column
        flattened (``fixed_size_binary(32)``, 32 bytes an id). Reads only that column, with the checks
        :meth:`from_bytes` makes of the layout and of that column (IntegrityError); the result does not
        refer to ``data``. :class:`IdSet` ``.of()`` it for a sorted set."""
        if len(data) > fmt.MANIFEST_MAX_BYTES:
            raise IntegrityError(f"{what} is {len(data)} bytes; a manifest is at most {fmt.MANIFEST_MAX_BYTES} "
                                 f"bytes (docs/FORMAT.md, Limits); it was not read")
        try:
            f = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
            layout_is_v1(f.schema_arrow, what)
            check_decoded_size(f, what)
            col = f.read(columns=["chunks"]).column("chunks")
            for c in col.chunks:
                c.validate(full=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"{what} is damaged: {e}") from None
        return pc.list_flatten(col)

    def pycolumn(self, name: str) -> list:  # type: ignore[type-arg]
        """One column as Python values: names as str (lossless), ``mtime_ns`` as int nanoseconds."""
        if self.source is not None and name in LEAN_LEFT_OUT:
            return [v for t in column_groups(self.source, [name]) for v in _pycolumn(t, name)]
        return _pycolumn(self.table, name)

    def columns_at(self, rows: list[int] | np.ndarray, columns: list[str]) -> pa.Table:
        """``columns`` at manifest ``rows`` (in that order), taken from each row's own record batch (or, for
        a lean manifest's left-out columns, its file's row group: the last few read are kept)."""
        wanted = np.asarray(rows, dtype=np.int64)
        if self._groups is not None and any(c in LEAN_LEFT_OUT for c in columns):
            return self._groups.take(wanted, columns)
        if not len(wanted):
            return self.table.select(columns).slice(0, 0)
        batches, starts = self._batches()
        which = np.searchsorted(starts, wanted, side="right") - 1
        order = np.argsort(which, kind="stable")
        parts = []
        for b in np.unique(which).tolist():
            sel = wanted[which == b] - starts[b]
            parts.append(pa.Table.from_batches([batches[b].select(columns).take(pa.array(sel))]))
        t = pa.concat_tables(parts)
        if (np.diff(which) < 0).any():  # rows out of batch order: back to the order asked
            t = t.take(pa.array(np.argsort(order, kind="stable")))
        return t

    def in_order(self, name: str) -> Callable[[np.ndarray], pa.Array]:
        """A reader of column ``name`` at ascending rows, each call's after the last one's (a merge over the
        manifest, a walk of a write list): a lean manifest's left-out column is streamed from its file a batch
        at a time, with no row group held (one of extended attributes can be 30 MiB). Rows asked out of that
        order are read as :meth:`columns_at` reads them."""
        stream = _Ordered(self.source, name) if self.source is not None and name in LEAN_LEFT_OUT else None

        def read(rows: np.ndarray) -> pa.Array:
            got = stream.take(rows) if stream is not None else None
            if got is None:
                got = self.columns_at(rows, [name]).column(name).combine_chunks()
            return got

        return read

    def _with_left_out(self, t: pa.Table, rows: np.ndarray,
                     xattrs: Callable[[np.ndarray], pa.Array] | None = None) -> pa.Table:
        """``t`` (manifest ``rows``) with its ``xattrs`` and ``hardlink`` columns, read from a lean manifest's file
        (the extended attributes by ``xattrs``, an :meth:`in_order` reader, when given)."""
        missing = [n for n in _LIGHT_LEFT_OUT if n not in t.column_names]
        if not missing:
            return t
        if "xattrs" in missing and xattrs is not None:
            t = t.append_column("xattrs", xattrs(rows))
            missing.remove("xattrs")
        if missing:
            read = self.columns_at(rows, missing)
            for n in missing:
                t = t.append_column(n, read.column(n))
        return t

    def _batches(self) -> tuple[list[pa.RecordBatch], np.ndarray]:
        split = self._split
        if split is None:  # one assignment: threads staging at once see both parts or neither
            batches = self.table.to_batches()
            split = self._split = (batches, np.cumsum([0] + [b.num_rows for b in batches]))
        return split

    _FULL = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "target", "chunks", "chunk_sizes",
             "xattrs", "hardlink", "sparse", "stale", "content")
    _LIGHT = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "target", "xattrs", "hardlink", "sparse",
              "stale")

    def entries(self, *, light: bool = False) -> Iterator[Entry]:
        """Every row as an :class:`Entry` (with its ``row``), in manifest order, decoded one record batch
        at a time. ``light``: without chunk lists and content digest (``external`` still answers), for
        planning at scale; :meth:`entries_at` gives the full entries of chosen rows later."""
        start = 0
        for batch in self.table.to_batches():
            t = self._with_left_out(pa.Table.from_batches([batch]), np.arange(start, start + batch.num_rows))
            part = _entries_of(t, start, light or self.source is not None)
            if self.source is not None and not light:
                yield from self._filled(list(part))
            else:
                yield from part
            start += batch.num_rows

    def _filled(self, light: list[Entry]) -> list[Entry]:
        """Light entries of a lean manifest with their chunk lists and digests from its file."""
        heavy = self.columns_at([e.row for e in light], list(_HEAVY))
        cols = [heavy.column(n).to_pylist() for n in _HEAVY]
        return [e.filled(c, s, d) for e, c, s, d in zip(light, *cols, strict=True)]

    def entries_at(self, rows: list[int] | np.ndarray, *, light: bool = False,
                   xattrs: Callable[[np.ndarray], pa.Array] | None = None) -> list[Entry]:
        """The full entries of manifest rows ``rows`` (in that order; ``light``: as :meth:`entries` gives
        them). Costs what the rows cost: each is taken from its own record batch (a take on the whole
        chunked table would join every batch first). ``xattrs``: an :meth:`in_order` reader of them."""
        if not len(rows):
            return []
        if self.source is not None and not light:
            return self._filled(self.entries_at(rows, light=True))
        batches, starts = self._batches()
        wanted = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(starts, wanted, side="right") - 1
        out: list[Entry | None] = [None] * len(rows)
        for b in np.unique(which).tolist():
            sel = np.flatnonzero(which == b)
            picked = self._with_left_out(pa.Table.from_batches([batches[b].take(pa.array(wanted[sel] - starts[b]))]),
                                       wanted[sel], xattrs if (np.diff(wanted) >= 0).all() else None)
            for k, e in zip(sel.tolist(), _entries_of(picked, 0, light, wanted[sel].tolist()), strict=True):
                out[k] = e
        return out  # type: ignore[return-value]

    def values_at(self, rows: np.ndarray, names: tuple[str, ...],  # type: ignore[type-arg]
                  xattrs: Callable[[np.ndarray], pa.Array] | None = None) -> dict[str, list]:
        """The Python values of columns ``names`` (as light entries hold them: paths, targets and hard links
        as text, ``mtime_ns`` worked out) for manifest rows ``rows`` (ascending), without an entry object
        per row: a million rows are journaled at the cost of their values. ``xattrs``: an :meth:`in_order`
        reader of them."""
        batches, starts = self._batches()
        wanted = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(starts, wanted, side="right") - 1
        out: dict[str, list] = {n: [] for n in names}  # type: ignore[type-arg]
        for b in np.unique(which).tolist():
            rows_b = wanted[which == b]
            picked = pa.Table.from_batches([batches[b].take(pa.array(rows_b - starts[b]))])
            if any(n in _LIGHT_LEFT_OUT for n in names):
                picked = self._with_left_out(picked, rows_b, xattrs)
            for n in names:
                out[n].extend(_pycolumn(picked, n))
        return out

    def paths_naming(self, chunk_id: bytes, limit: int = 3) -> list[str]:
        """The first ``limit`` paths whose file names ``chunk_id`` (for messages; vectorised)."""
        out: list[str] = []
        start = 0
        for part in (c for t in column_groups(self, ["chunks"]) for c in t.column("chunks").chunks):
            hits = pc.is_in(pc.list_flatten(part), value_set=pa.array([chunk_id], pa.binary(fmt.ID_LEN)))
            rows = np.unique(np.asarray(pc.list_parent_indices(part))[np.asarray(hits, dtype=bool)])
            out += [self.pycolumn_at("path", start + int(r)) for r in rows[:limit - len(out)]]
            start += len(part)
            if len(out) >= limit:
                break
        return out

    def pycolumn_at(self, name: str, row: int) -> object:
        """One value of column ``name`` at ``row``, as :meth:`pycolumn` gives it."""
        if self.source is not None and name in LEAN_LEFT_OUT:
            return self.columns_at([row], [name]).column(name).to_pylist()[0]
        return _pycolumn(self.table.slice(row, 1), name)[0]

    def chunk_ids(self) -> set[bytes]:
        """Every chunk id the manifest names, as a Python set (one object per id: small manifests and
        tests; at scale use :meth:`chunk_id_set` or :meth:`chunk_id_array`)."""
        return set(pc.unique(self.chunk_id_column()).to_pylist())

    def chunk_id_set(self) -> IdSet:
        """Every chunk id the manifest names, each once, as a sorted :class:`IdSet` (40 bytes an id)."""
        return IdSet.of(self.chunk_id_column())

    def chunk_id_column(self) -> pa.ChunkedArray:
        """Every chunk id the manifest names, in row order with repeats: the ``chunks`` column flattened,
        its own buffers (no copy; ``fixed_size_binary(32)``; a lean manifest's read from its file)."""
        if self.source is not None:
            return pa.chunked_array([c for t in column_groups(self.source, ["chunks"])
                                     for c in pc.list_flatten(t.column("chunks")).chunks], pa.binary(fmt.ID_LEN))
        return pc.list_flatten(self.table.column("chunks"))

    def chunk_id_array(self) -> np.ndarray:
        """Every chunk id the manifest names, each once, sorted: a ``(U,)`` ``'S32'`` array."""
        return self.chunk_id_set().ids

    def total_bytes(self) -> int:
        t = self.table.select(["type", "size"])
        return int(pc.sum(pc.filter(t.column("size"), pc.equal(t.column("type"), FILE))).as_py() or 0)

    def file_count(self) -> int:
        return int(pc.sum(pc.equal(self.table.column("type"), FILE)).as_py() or 0)

    def external_count(self) -> int:
        """How many files have their bytes outside the repository (:func:`is_external`)."""
        return int(external_mask(self.table).sum())

    def stale_count(self) -> int:
        return int(pc.sum(pc.cast(self.table.column("stale"), pa.int64())).as_py() or 0)

    def without(self, drop: Callable[[str], bool]) -> Manifest:
        """This manifest without the paths ``drop`` answers true for and everything below them, still a
        whole tree: a hard-link group whose first file is left out gets its first kept member as its
        first file (the others link to that one). What validates before validates after."""
        if self.source is not None:
            raise TypeError("a lean manifest keeps its file's rows: load the manifest whole to leave paths out")
        paths = self.pycolumn("path")
        links = self.pycolumn("hardlink")
        dropped: set[str] = set()
        keep = []
        for p in paths:
            gone = drop(p) or any(a in dropped for a in _parents(p))
            if gone:
                dropped.add(p)
            keep.append(not gone)
        lead_of: dict[str, str] = {}  # a left-out first file -> the member that takes its place
        new_links: list[str | None] = []
        for p, h, kept in zip(paths, links, keep, strict=True):
            if kept and h is not None and h in dropped:
                h = lead_of.setdefault(h, p)
                h = None if h == p else h
            new_links.append(h)
        t = self.table.set_column(self.table.schema.get_field_index("hardlink"), self.table.schema.field("hardlink"),
                                  pa.array([encode_name(h) for h in new_links], pa.binary()))
        return Manifest(t.filter(pa.array(keep, pa.bool_())))


def _parents(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b``."""
    at = path.find("/")
    while at >= 0:
        yield path[:at]
        at = path.find("/", at + 1)


def layout_is_v1(schema: pa.Schema, what: str) -> bool:
    """Check a stored manifest's schema (its format version and columns): True for version 1 (read by
    upgrading), False for the current one; IntegrityError for anything else."""
    meta = schema.metadata or {}
    version = meta.get(b"drsync.format", b"?").decode(errors="replace")
    if not version.isdigit():
        raise IntegrityError(f"{what} is not a drsync manifest")
    if int(version) > fmt.FORMAT_VERSION:
        raise IntegrityError(f"{what} uses manifest format {version}, newer than this drsync "
                             f"understands ({fmt.FORMAT_VERSION}); upgrade drsync")
    bare = schema.remove_metadata()
    if int(version) == 1 and bare == SCHEMA_V1:
        return True
    if bare != SCHEMA.remove_metadata():
        raise IntegrityError(f"{what} does not have the manifest columns")
    return False


def decoded_limit() -> int:
    """The most a manifest may decode into, in bytes (docs/FORMAT.md, Limits)."""
    return fmt.MANIFEST_DECODED_FACTOR * fmt.MANIFEST_MAX_BYTES


class ManifestTooLarge(IntegrityError):
    """A manifest that would decode into more than :func:`decoded_limit` bytes (refused unread)."""


def check_decoded_size(pf: pq.ParquetFile, what: str) -> None:
    """Refuse, from the footer alone, a manifest whose columns say they decode into more than the
    limit (a small, highly compressed one included). ManifestTooLarge."""
    md = pf.metadata
    declared = sum(md.row_group(i).column(j).total_uncompressed_size
                   for i in range(md.num_row_groups) for j in range(md.num_columns))
    if declared > decoded_limit():
        raise ManifestTooLarge(f"{what} decodes into {declared} bytes, more than {decoded_limit()}, the most "
                               f"drsync decodes (docs/FORMAT.md, Limits); it was not read")


def _read_bounded(data: bytes | pa.NativeFile, what: str) -> pa.Table:
    """The whole table, decoded a batch at a time and refused (ManifestTooLarge) as soon as the
    batches pass the limit: dictionary and run-length encoding let a few hundred KiB say gigabytes."""
    # Without pre-buffering: it holds a row group's column chunks beside what is decoded from them
    # (70 MiB more at the peak of a 1,000,000-file manifest read by ranges).
    pf = pq.ParquetFile(data if isinstance(data, pa.NativeFile) else pa.BufferReader(data), pre_buffer=False)
    check_decoded_size(pf, what)
    limit, total, batches = decoded_limit(), 0, []
    for batch in pf.iter_batches(batch_size=8192, use_threads=False):
        total += batch.nbytes
        if total > limit:
            raise ManifestTooLarge(f"{what} decodes into more than {limit} bytes, the most drsync decodes "
                                   f"(docs/FORMAT.md, Limits); it was not read")
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=pf.schema_arrow)


class ManifestFile:
    """A stored manifest read one row group at a time: what a capture of a million files compares
    with, without holding the whole table (its bytes are 70-odd MiB at 1,000,000 files, the table
    more than twice that). Each group read is checked as :meth:`Manifest.from_bytes` checks the
    whole (Arrow validation, the columns of :data:`SCHEMA`); version-1 groups are upgraded.
    Raises IntegrityError on damage. Groups are sorted by path, as the manifest."""

    def __init__(self, data: bytes | pa.NativeFile | Spool, what: str = "manifest", size: int | None = None) -> None:
        """``data``: the manifest's bytes, a seekable file of ``size`` bytes (read by ranges, group by
        group: then not even the bytes are held), or a spool (its temporary file, if any, kept open by
        this reader)."""
        self._spool = data if isinstance(data, Spool) else None  # copy() duplicates a file spool's file
        if isinstance(data, Spool):
            data, size = data.source(), data.size
        if (len(data) if size is None else size) > fmt.MANIFEST_MAX_BYTES:  # type: ignore[arg-type]
            Manifest.from_bytes(data, what, size)  # raises the size error
        self.what = what
        self._data, self.size = data, len(data) if size is None else size  # type: ignore[arg-type]
        try:
            source = data if isinstance(data, pa.NativeFile) else pa.BufferReader(data)
            self._pf = pq.ParquetFile(source, pre_buffer=False)
            schema = self._pf.schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"{what} is damaged or truncated: {e}") from None
        self.is_v1 = layout_is_v1(schema, what)  # the layout before 2026-12 (read whole a group at a time)
        self.schema = schema  # with its key-value metadata (the root's: drsync.repository.manifest_root)
        check_decoded_size(self._pf, what)
        md = self._pf.metadata
        self.num_groups = md.num_row_groups
        self.starts = [0]
        for i in range(self.num_groups):
            self.starts.append(self.starts[-1] + md.row_group(i).num_rows)
        self.num_rows = self.starts[-1]

    def __len__(self) -> int:
        return self.num_rows

    def reopen(self) -> ManifestFile:
        """Another reader of the same bytes (its own Parquet reader: for another thread)."""
        return ManifestFile(self._data, self.what, self.size)

    def written_as(self, fingerprint: WriterFingerprint) -> bool:
        """Whether this file was written as ``fingerprint`` says (:meth:`ManifestWriter.fingerprint`): by the
        same Parquet library, in row groups of :data:`ROW_GROUP` rows (the last fewer), each column compressed
        and dictionary-paged alike."""
        md = self._pf.metadata
        if md.created_by != fingerprint.created_by:
            return False
        for g in range(self.num_groups):
            rg = md.row_group(g)
            if rg.num_rows != ROW_GROUP and g != self.num_groups - 1:
                return False
            if tuple(_column_form(rg.column(i)) for i in range(rg.num_columns)) != fingerprint.columns:
                return False
        return True

    def check_unchanged(self) -> None:
        """IntegrityError when this reader's spool is of a stored file (read in place) that another program
        wrote into since it was hashed: see :meth:`drsync.repository.spool.Spool.check_unchanged`."""
        if self._spool is not None:
            self._spool.check_unchanged(self.what)

    def copy(self, memory_bytes: int | None = None) -> Spool:
        """The manifest's bytes as they are, in a new :class:`~drsync.repository.spool.Spool` (in memory up
        to ``memory_bytes``, past that in its temporary file), read in pieces of 1 MiB; read from a file
        spool, a :meth:`~drsync.repository.spool.Spool.duplicate` of it (its file, not a copy)."""
        same = self._spool.duplicate() if self._spool is not None else None
        if same is not None:
            return same
        out = Spool(memory_bytes)
        piece = 1 << 20
        for lo in range(0, self.size, piece):
            n = min(piece, self.size - lo)
            if isinstance(self._data, pa.NativeFile):
                out.write(self._data.read_at(n, lo))
            else:
                out.write(memoryview(self._data)[lo:lo + n])
        return out

    def group(self, i: int, columns: list[str] | None = None) -> pa.Table:
        """Row group ``i`` (rows ``starts[i]`` to ``starts[i + 1]``), only ``columns`` if given."""
        try:
            if self.is_v1:
                t = self._pf.read_row_group(i)
                check_values(t, self.what)  # the upgrade reads the values
                t = _upgrade_v1(t)
                t = t.select(columns) if columns else t
            else:
                t = self._pf.read_row_group(i, columns=columns)
            t.validate(full=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"{self.what} is damaged: {e}") from None
        return t

    def column_batches(self, name: str, rows: int) -> Iterator[pa.Array]:
        """Column ``name`` from the first row to the last, at most ``rows`` at a time (:meth:`pieces`)."""
        for t in self.pieces([name], rows):
            yield t.column(0).combine_chunks()

    def pieces(self, columns: list[str], rows: int) -> Iterator[pa.Table]:
        """``columns`` from the first row to the last, at most ``rows`` at a time, checked as :meth:`group`
        checks a group; streamed (a page at a time), never a row group whole (a version-1 manifest's are)."""
        if self.is_v1:
            for g in range(self.num_groups):
                t = self.group(g, columns)
                for lo in range(0, t.num_rows, rows):
                    yield t.slice(lo, rows)
            return
        try:
            for b in self._pf.iter_batches(batch_size=rows, columns=columns, use_threads=False):
                b.validate(full=True)
                yield pa.Table.from_batches([b])
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"{self.what} is damaged: {e}") from None

    def read(self) -> Manifest:
        """The whole manifest as a table."""
        return Manifest(pa.concat_tables([self.group(i) for i in range(self.num_groups)])
                        if self.num_groups else SCHEMA.empty_table())

    def file_count(self) -> int:
        return sum(int(pc.sum(pc.equal(self.group(i, ["type"]).column("type"), FILE)).as_py() or 0)
                   for i in range(self.num_groups))


class _Ordered:
    """One column of a manifest file streamed in row order (:meth:`Manifest.in_order`): the batch read last is
    held, and rows before it are no longer to be had."""

    def __init__(self, source: ManifestFile, name: str) -> None:
        self._batches = source.column_batches(name, _ORDERED_ROWS)
        self._held: pa.Array | None = None
        self._base = 0  # the row of self._held[0] (of the next batch, when none is held)

    def take(self, rows: np.ndarray) -> pa.Array | None:
        """The values at ``rows`` (ascending), or None when they are not (or begin before the batch held)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows) or rows[0] < self._base or (np.diff(rows) < 0).any():
            return None
        parts: list[pa.Array] = []
        i = 0
        while i < len(rows):
            if self._held is None:
                self._held = next(self._batches, None)
                if self._held is None:
                    raise IndexError(f"row {int(rows[i])} out of range")
            end = self._base + len(self._held)
            j = i + int(np.searchsorted(rows[i:], end))  # the rows in the batch held
            if j > i:
                parts.append(self._held.take(pa.array(rows[i:j] - self._base)))
                i = j
            if i < len(rows):
                self._base, self._held = end, None
        return pa.concat_arrays(parts) if len(parts) != 1 else parts[0]


_ORDERED_ROWS = 8192


class _GroupCache:
    """Columns of a lean manifest's file at chosen rows: the row groups those rows are in are read whole
    (Parquet reads no less) and the last :data:`_CACHED_GROUPS` kept (fewer, down to the last one, when they hold
    more than :data:`_CACHED_BYTES`), so an apply staging files in manifest
    order, a few threads at once, reads each group about once. Thread-safe."""

    def __init__(self, source: ManifestFile) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._recent: dict[tuple[int, tuple[str, ...]], pa.Table] = {}

    def _group(self, g: int, columns: tuple[str, ...]) -> pa.Table:
        with self._lock:  # one reader of the file at a time; a group read once, whichever thread asks
            t = self._recent.pop((g, columns), None)
            if t is None:
                t = self.source.group(g, list(columns))
            self._recent[(g, columns)] = t  # most recent last
            # At most _CACHED_GROUPS, and past the most recent one no more bytes than _CACHED_BYTES: a group of
            # wide attributes or chunk lists can be 30 MiB (threads at a group's end then read one twice).
            while len(self._recent) > _CACHED_GROUPS or (
                    len(self._recent) > 1 and sum(v.nbytes for v in self._recent.values()) > _CACHED_BYTES):
                del self._recent[next(iter(self._recent))]
            return t

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        starts = np.asarray(self.source.starts, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            raise IndexError(f"rows out of range of {self.source.what}")
        which = np.searchsorted(starts, rows, side="right") - 1
        key = tuple(columns)
        parts, placed = [], []
        for g in np.unique(which).tolist():
            sel = np.flatnonzero(which == g)
            parts.append(self._group(g, key).take(pa.array(rows[sel] - starts[g])))
            placed.append(sel)
        if not parts:
            return self.source.group(0, columns).slice(0, 0) if self.source.num_groups else \
                SCHEMA.empty_table().select(columns)
        t = pa.concat_tables(parts)
        at = np.concatenate(placed)
        if (np.diff(at) < 0).any():
            t = t.take(pa.array(np.argsort(at, kind="stable")))
        return t


_CACHED_GROUPS = 4
_CACHED_BYTES = 8 << 20


ROW_GROUP = 65536  # manifest rows per Parquet row group


@dataclass(frozen=True)
class WriterFingerprint:
    """What a manifest's Parquet footer says of how :class:`ManifestWriter` wrote it: the library
    (``created_by``), and per leaf column its compression and whether it has dictionary pages."""

    created_by: str
    columns: tuple[tuple[str, str, bool], ...]


def _column_form(c: pq.ColumnChunkMetaData) -> tuple[str, str, bool]:
    return c.path_in_schema, c.compression, any("DICTIONARY" in e for e in c.encodings)


_FINGERPRINT: list[WriterFingerprint] = []
_FEW_VALUES = ("type", "mode", "uid", "gid", "target", "xattrs", "sparse", "stale")  # dictionary-encoded columns


class ManifestWriter:
    """Serialises a manifest given as path-sorted pieces of :data:`SCHEMA` rows into its Parquet
    bytes, holding at most one row group of rows beyond the output: the one serializer, so the same
    rows always make the same bytes (row groups of :data:`ROW_GROUP` rows, however they were split).
    The bytes go into a :class:`~drsync.repository.spool.Spool` (hashed as written; past
    ``memory_bytes``, default 16 MiB, in a temporary file), which :meth:`finish` returns."""

    def __init__(self, schema: pa.Schema = SCHEMA, *, memory_bytes: int | None = None) -> None:
        self._buf = Spool(memory_bytes)
        # Always SCHEMA's own fields (with ``schema``'s metadata: the root's): a schema read back from Parquet
        # names a list's item "element", which changes the bytes (the Arrow schema in the footer), and a
        # manifest rebuilt from a patch (drsync.repository.manifest_patch) must be the same bytes.
        if schema.names == SCHEMA.names:
            schema = SCHEMA.with_metadata({**(SCHEMA.metadata or {}), **(schema.metadata or {})})
        self._schema = schema
        # Dictionary pages only for columns of few distinct values: for paths, ids, sizes and times they
        # cost a third of a no-change cycle's manifest write and made the file larger, not smaller.
        self._w = pq.ParquetWriter(self._buf, schema, compression="zstd",
                                   use_dictionary=[n for n in _FEW_VALUES if n in schema.names])
        self._pending: list[pa.Table] = []
        self._rows = 0

    @property
    def schema(self) -> pa.Schema:
        """The schema written, with its key-value metadata."""
        return self._schema

    @staticmethod
    def fingerprint() -> WriterFingerprint:
        """How this process's writer writes (:class:`WriterFingerprint`), learned once from a manifest of one
        row it writes."""
        if not _FINGERPRINT:
            w = ManifestWriter()
            w.write(table_from_columns({
                "path": ["x"], "type": [FILE], "mode": [0o644], "uid": [0], "gid": [0], "size": [1],
                "mtime_s": [0], "mtime_nsec": [0], "ctime_ns": [0], "inode": [1], "target": [None],
                "content": [EMPTY_CONTENT], "chunks": [[bytes(fmt.ID_LEN)]], "chunk_sizes": [[1]],
                "xattrs": [b"\0\1\0\0\0\1ab"], "hardlink": [None]}))
            md = pq.ParquetFile(pa.BufferReader(w.finish().getvalue())).metadata
            rg = md.row_group(0)
            _FINGERPRINT.append(WriterFingerprint(md.created_by, tuple(_column_form(rg.column(i))
                                                                       for i in range(rg.num_columns))))
        return _FINGERPRINT[0]

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= ROW_GROUP:
            t = pa.concat_tables(self._pending)
            whole = (t.num_rows // ROW_GROUP) * ROW_GROUP
            for lo in range(0, whole, ROW_GROUP):
                self._group(t.slice(lo, ROW_GROUP))
            rest = t.slice(whole)
            self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _group(self, t: pa.Table) -> None:
        """One row group, as it came (however split: the writer's pages do not depend on it, checked for 2 to
        2,000 pieces; no copy of the rows)."""
        if not t.schema.equals(self._schema):
            t = t.cast(self._schema)
        self._w.write_table(t, row_group_size=ROW_GROUP)

    def abandon(self) -> None:
        """Close the writer and let go of what it wrote (its spool's temporary file, if any)."""
        self._pending = []
        self._w.close()
        self._buf.close()

    def finish(self) -> Spool:
        if self._pending:
            self._group(pa.concat_tables(self._pending))
        self._w.close()
        return self._buf


def table_from_columns(columns: dict[str, list | pa.Array]) -> pa.Table:
    """An (unsorted) manifest table from Python-level columns (see :meth:`Manifest.from_columns`)."""
    n = len(columns["path"])

    def names(key: str) -> list[bytes | None] | pa.Array:
        v = columns.get(key)
        if v is None:
            return [None] * n
        if isinstance(v, pa.Array | pa.ChunkedArray):
            return v
        if v and all(type(x) is str for x in v):
            # One encode and one split in C (NUL never occurs in a name; a hostile one falls through).
            parts = "\0".join(v).encode("utf-8", "surrogateescape").split(b"\0")  # type: ignore[arg-type]
            if len(parts) == n:
                return parts
        return [None if x is None else (x if isinstance(x, bytes) else os.fsencode(x)) for x in v]

    if "mtime_s" in columns:
        secs, nsec = columns["mtime_s"], columns["mtime_nsec"]
    else:
        secs, nsec = split_ns(list(columns["mtime_ns"]))
    cols: dict[str, object] = {
        "path": names("path"), "target": names("target"), "hardlink": names("hardlink"),
        "mtime_s": secs, "mtime_nsec": nsec,
        "ctime_ns": clamp_int64(list(columns["ctime_ns"])) if not isinstance(columns["ctime_ns"], pa.Array |
                                                                            pa.ChunkedArray) else columns["ctime_ns"],
    }
    for name in SCHEMA.names:
        if name not in cols:
            cols[name] = columns[name] if name in columns else [_DEFAULTS[name]] * n
    return pa.table({name: cols[name] for name in SCHEMA.names}, schema=SCHEMA)


def _upgrade_v1(table: pa.Table) -> pa.Table:
    """A version-1 manifest in the version-2 columns (the upgrade path: old snapshots stay readable)."""
    n = table.num_rows
    s, nsec = split_ns(table.column("mtime_ns").to_pylist())
    cols = {
        "path": pc.cast(table.column("path"), pa.binary()), "type": table.column("type"),
        "mode": table.column("mode"), "uid": table.column("uid"), "gid": table.column("gid"),
        "size": table.column("size"), "mtime_s": pa.array(s, pa.int64()), "mtime_nsec": pa.array(nsec, pa.uint32()),
        "ctime_ns": table.column("ctime_ns"), "inode": table.column("inode"),
        "target": pc.cast(table.column("target"), pa.binary()), "content": table.column("content"),
        "chunks": table.column("chunks"), "chunk_sizes": table.column("chunk_sizes"),
        "xattrs": pa.nulls(n, pa.binary()), "hardlink": pa.nulls(n, pa.binary()),
        "sparse": pa.array([False] * n, pa.bool_()), "stale": pa.array([False] * n, pa.bool_()),
    }
    return pa.table(cols, schema=SCHEMA)


def sort_by_path(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[("path", "ascending")]))


def column_groups(m: Manifest | ManifestFile, columns: list[str]) -> Iterator[pa.Table]:
    """The manifest's ``columns``, one path-sorted piece of at most :data:`ROW_GROUP` rows at a time (a
    loaded table sliced, a :class:`ManifestFile` a row group at a time): callers decode a piece to
    Python values without holding the whole manifest as objects."""
    if isinstance(m, Manifest) and m.source is not None and not set(columns) <= set(m.table.column_names):
        m = m.source  # a lean manifest: the columns it leaves out are in its file (the same rows)
    if isinstance(m, Manifest):
        t = m.table.select(columns)
        for lo in range(0, t.num_rows, ROW_GROUP):
            yield t.slice(lo, ROW_GROUP)
        if t.num_rows == 0:
            yield t
        return
    if "xattrs" in columns and not m.is_v1:  # streamed: a row group of extended attributes can be 30 MiB
        yield from m.pieces(columns, max(1, ROW_GROUP // 4))
        return
    for g in range(m.num_groups):
        yield m.group(g, columns)


@dataclass(frozen=True)
class ManifestCounts:
    files: int  # regular files
    bytes: int  # their sizes added up
    external: int  # files whose bytes are outside the repository (:func:`is_external`)


def manifest_counts(m: Manifest | ManifestFile) -> ManifestCounts:
    """Files, their bytes and the external ones, counted a row group at a time."""
    files = size = external = 0
    for t in column_groups(m, ["type", "size", "chunks", "chunk_sizes"]):
        is_file = pc.equal(t.column("type"), FILE)
        files += int(pc.sum(is_file).as_py() or 0)
        size += int(pc.sum(pc.filter(t.column("size"), is_file)).as_py() or 0)
        external += int(external_mask(t).sum())
    return ManifestCounts(files, size, external)


def chunks_in_order(m: Manifest | ManifestFile) -> np.ndarray:
    """Each chunk id the manifest names, once, in manifest order (a file's chunks stay together): a
    ``(U,)`` :data:`~drsync.repository.ids.ID_DTYPE` array (32 bytes an id, never a Python set),
    built from the ``chunks`` column a row group at a time."""
    flat = ids_array(pa.chunked_array([pc.list_flatten(t.column("chunks")) for t in column_groups(m, ["chunks"])],
                                      type=pa.binary(fmt.ID_LEN)))
    return flat[np.sort(sort_unique(flat))]
