"""Pack files and the chunk index.

A pack is ``PACK_MAGIC``, the stored chunks back to back, then a trailer that
lists them (so a pack describes itself and the index can be rebuilt from the
packs alone). The index maps a chunk id to where it lives; it is a set of
Parquet files, one per write session, that are merged in memory into sorted
NumPy arrays (:class:`ChunkIndex`: about 61 bytes a chunk, no Python object per chunk).
"""

from __future__ import annotations

import dataclasses
import io
import secrets
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drsync.errors import IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import ID_DTYPE, find_one, id_at, id_key, ids_array, locate, sort_unique, to_arrow
from drsync.storage import BlobWriter, Storage

_ENTRY = struct.Struct("<32sBII")  # id, encoding, stored length, raw length
_TAIL = struct.Struct("<I16s8s")  # entry count, blake3(entries)[:16], end magic
# The same entry as a NumPy record (packed, little-endian): a whole trailer parses in one call.
_ENTRY_DTYPE = np.dtype([("id", ID_DTYPE), ("encoding", "u1"), ("stored", "<u4"), ("raw", "<u4")])
assert _ENTRY_DTYPE.itemsize == _ENTRY.size


@dataclass(frozen=True)
class PackEntry:
    chunk_id: bytes
    encoding: int
    offset: int
    stored_length: int
    raw_length: int


@dataclass(frozen=True)
class ChunkLocation:
    pack_id: str
    offset: int
    stored_length: int
    raw_length: int
    encoding: int


def new_pack_id() -> str:
    return secrets.token_hex(16)


class PackWriter:
    """Appends stored chunks to one pack blob; :meth:`finish` writes the trailer and commits.

    The trailer grows as packed bytes (41 a chunk), not as an object per chunk.
    """

    def __init__(self, storage: Storage) -> None:
        self.pack_id = new_pack_id()
        self.name = fmt.pack_name(self.pack_id)
        self._w = storage.writer(self.name)
        self._w.write(fmt.PACK_MAGIC)
        self._offset = len(fmt.PACK_MAGIC)
        self._table = bytearray()
        self.count = 0

    @property
    def size(self) -> int:
        return self._offset

    def add(self, chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> PackEntry:
        entry = PackEntry(chunk_id, encoding, self._offset, len(stored), raw_length)
        self._w.write(stored)
        self._offset += len(stored)
        self._table += _ENTRY.pack(chunk_id, encoding, len(stored), raw_length)
        self.count += 1
        return entry

    def finish(self, *, durable: bool) -> None:
        table = bytes(self._table)
        self._w.write(table)
        self._w.write(_TAIL.pack(self.count, blake3.blake3(table).digest()[:16], fmt.PACK_TRAILER_MAGIC))
        self._w.commit(durable=durable)

    def abort(self) -> None:
        self._w.abort()


@dataclass(frozen=True)
class PackTable:
    """A pack's trailer as columns, in pack order (K chunks): ``ids`` (K,) ``'S32'``; ``encoding``
    (K,) uint8; ``offset`` (K,) uint64, bytes from the start of the pack; ``stored_length`` and
    ``raw_length`` (K,) uint32, bytes."""

    ids: np.ndarray
    encoding: np.ndarray
    offset: np.ndarray
    stored_length: np.ndarray
    raw_length: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def read_pack_table(storage: Storage, pack_id: str, pack_size: int) -> PackTable:
    """Parse a pack's trailer into columns. Raises IntegrityError if the pack is truncated or damaged,
    or lists a chunk no drsync writes (:func:`drsync.repository.chunks.check_sizes`)."""
    name = fmt.pack_name(pack_id)
    if pack_size < len(fmt.PACK_MAGIC) + _TAIL.size:
        raise IntegrityError(f"pack {pack_id} is truncated ({pack_size} bytes)")
    count, digest, magic = _TAIL.unpack(storage.read_range(name, pack_size - _TAIL.size, _TAIL.size))
    table_len = count * _ENTRY.size
    if magic != fmt.PACK_TRAILER_MAGIC or table_len > pack_size - _TAIL.size - len(fmt.PACK_MAGIC):
        raise IntegrityError(f"pack {pack_id} has no valid trailer (truncated or overwritten)")
    table = storage.read_range(name, pack_size - _TAIL.size - table_len, table_len)
    if blake3.blake3(table).digest()[:16] != digest:
        raise IntegrityError(f"pack {pack_id} has a damaged entry table")
    rec = np.frombuffer(table, _ENTRY_DTYPE, count=count)
    enc, stored, raw = rec["encoding"], rec["stored"], rec["raw"]
    bad = _bad_sizes(enc, stored, raw)
    if bad.any():
        i = int(np.argmax(bad))
        chunks.check_sizes(int(enc[i]), int(stored[i]), int(raw[i]), id_at(rec["id"], i), f"pack {pack_id}: chunk")
    ends = np.cumsum(stored, dtype=np.uint64) + np.uint64(len(fmt.PACK_MAGIC))
    end = int(ends[-1]) if count else len(fmt.PACK_MAGIC)
    if end != pack_size - _TAIL.size - table_len:
        raise IntegrityError(f"pack {pack_id}: entry table does not add up to the pack size")
    offset = ends - stored.astype(np.uint64)
    return PackTable(np.ascontiguousarray(rec["id"]), enc.copy(), offset, stored.astype(np.uint32),
                     raw.astype(np.uint32))


def read_pack_entries(storage: Storage, pack_id: str, pack_size: int) -> list[PackEntry]:
    """Parse a pack's trailer into one object per chunk (small packs; at scale use :func:`read_pack_table`).
    Raises IntegrityError if the pack is truncated or damaged."""
    t = read_pack_table(storage, pack_id, pack_size)
    return [PackEntry(id_at(t.ids, i), enc, off, stored, raw) for i, (enc, off, stored, raw) in
            enumerate(zip(t.encoding.tolist(), t.offset.tolist(), t.stored_length.tolist(),
                          t.raw_length.tolist(), strict=True))]


def _bad_sizes(encoding: np.ndarray, stored: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """(K,) bool: rows no drsync writes (the limits of :func:`drsync.repository.chunks.check_sizes`)."""
    return ((raw > fmt.CHUNK_MAX) | (stored > fmt.STORED_MAX)
            | ~np.isin(encoding, np.array(sorted(fmt.ENCODINGS), np.uint8))
            | ((encoding == fmt.ENC_RAW) & (stored != raw)))


# --- the index -------------------------------------------------------------

INDEX_SCHEMA = pa.schema([
    ("chunk", pa.binary(fmt.ID_LEN)),
    ("pack", pa.string()),
    ("offset", pa.uint64()),
    ("stored_length", pa.uint32()),
    ("raw_length", pa.uint32()),
    ("encoding", pa.uint8()),
])
# INDEX_SCHEMA as read with the pack column dictionary-encoded (a number per row, each pack id once).
_INDEX_SCHEMA_READ = INDEX_SCHEMA.set(1, pa.field("pack", pa.dictionary(pa.int32(), pa.string())))
# Rows per Parquet row group of an index file (and per slice materialised while writing one).
INDEX_ROW_GROUP = 64 * 1024


@dataclass(frozen=True)
class IndexRows:
    """Index rows as columns (N rows), the form index files are read into and written from.

    ``ids`` (N,) ``'S32'`` chunk ids; ``pack`` (N,) uint32, a number into ``packs`` (the pack ids,
    dictionary-encoded); ``offset`` (N,) uint64 and ``stored_length``/``raw_length`` (N,) uint32, bytes;
    ``encoding`` (N,) uint8. No order is implied (a :class:`ChunkIndex` hands them sorted by id).
    """

    ids: np.ndarray
    pack: np.ndarray
    offset: np.ndarray
    stored_length: np.ndarray
    raw_length: np.ndarray
    encoding: np.ndarray
    packs: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (the pack id table aside)."""
        return int(sum(a.nbytes for a in (self.ids, self.pack, self.offset, self.stored_length,
                                          self.raw_length, self.encoding)))

    @classmethod
    def empty(cls) -> IndexRows:
        return cls(np.empty(0, ID_DTYPE), np.empty(0, np.uint32), np.empty(0, np.uint64), np.empty(0, np.uint32),
                   np.empty(0, np.uint32), np.empty(0, np.uint8), ())

    @classmethod
    def from_pylist(cls, rows: Iterable[tuple[bytes, ChunkLocation]]) -> IndexRows:
        """From ``(chunk id, location)`` pairs (few rows; one Python object each on the way in)."""
        ids: list[bytes] = []
        pack_no: dict[str, int] = {}
        pack, offs, stored, raw = array("I"), array("Q"), array("I"), array("I")
        enc = array("B")
        for cid, loc in rows:
            ids.append(cid)
            pack.append(pack_no.setdefault(loc.pack_id, len(pack_no)))
            offs.append(loc.offset)
            stored.append(loc.stored_length)
            raw.append(loc.raw_length)
            enc.append(loc.encoding)
        return cls(ids_array(ids), np.array(pack, np.uint32), np.array(offs, np.uint64), np.array(stored, np.uint32),
                   np.array(raw, np.uint32), np.array(enc, np.uint8), tuple(pack_no))

    @classmethod
    def from_table(cls, table: pa.Table) -> IndexRows:
        """From a table with the columns of :data:`INDEX_SCHEMA` (``pack`` may be dictionary-encoded),
        without nulls (ValueError otherwise). Zero-copy where a column is one chunk."""
        pack_no: dict[str, int] = {}
        parts: list[np.ndarray] = []
        for c in table.column("pack").chunks:
            if not pa.types.is_dictionary(c.type):
                c = pc.dictionary_encode(c)
            local = np.array([pack_no.setdefault(p, len(pack_no)) for p in c.dictionary.to_pylist()], np.uint32)
            idx = c.indices.to_numpy(zero_copy_only=False)
            parts.append(local[idx] if len(local) else np.empty(0, np.uint32))
        pack = np.concatenate(parts) if len(parts) != 1 else parts[0]

        def col(name: str, dtype: type) -> np.ndarray:
            return table.column(name).to_numpy().astype(dtype, copy=False)

        for name in table.column_names:
            if table.column(name).null_count:
                raise ValueError(f"column {name} has nulls")
        return cls(ids_array(table.column("chunk")), pack.astype(np.uint32, copy=False), col("offset", np.uint64),
                   col("stored_length", np.uint32), col("raw_length", np.uint32), col("encoding", np.uint8),
                   tuple(pack_no))

    @classmethod
    def concat(cls, parts: Sequence[IndexRows]) -> IndexRows:
        """One set of rows from several (their pack tables merged)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        pack_no: dict[str, int] = {}
        packs = []
        for p in parts:
            m = np.array([pack_no.setdefault(name, len(pack_no)) for name in p.packs], np.uint32)
            packs.append(m[p.pack])
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate(packs),
                   np.concatenate([p.offset for p in parts]), np.concatenate([p.stored_length for p in parts]),
                   np.concatenate([p.raw_length for p in parts]), np.concatenate([p.encoding for p in parts]),
                   tuple(pack_no))

    def take(self, sel: np.ndarray | slice) -> IndexRows:
        """The rows at ``sel`` (a (N,) bool mask, an int index array or a slice); the pack table is kept."""
        return IndexRows(self.ids[sel], self.pack[sel], self.offset[sel], self.stored_length[sel],
                         self.raw_length[sel], self.encoding[sel], self.packs)

    def pack_numbers(self) -> np.ndarray:
        """(P,) the numbers (into ``packs``) of the packs at least one row names."""
        return np.flatnonzero(np.bincount(self.pack, minlength=len(self.packs)))

    def pack_names(self) -> set[str]:
        """The ids of the packs at least one row names."""
        return {self.packs[int(n)] for n in self.pack_numbers()}

    def to_table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows ``start:stop`` as a table of :data:`INDEX_SCHEMA` (pack ids materialised as strings)."""
        s = slice(start, stop)
        pack = pa.array(self.packs, pa.string()).take(pa.array(self.pack[s]))
        return pa.Table.from_arrays([to_arrow(self.ids[s]), pack, pa.array(self.offset[s]),
                                     pa.array(self.stored_length[s]), pa.array(self.raw_length[s]),
                                     pa.array(self.encoding[s])], schema=INDEX_SCHEMA)

    def location(self, i: int) -> ChunkLocation:
        return ChunkLocation(self.packs[int(self.pack[i])], int(self.offset[i]), int(self.stored_length[i]),
                             int(self.raw_length[i]), int(self.encoding[i]))

    def iter_rows(self, batch: int = 65536) -> Iterator[tuple[bytes, ChunkLocation]]:
        """Every row as ``(chunk id, location)``, one Python object each (a batch of them at a time)."""
        for start in range(0, len(self), batch):
            s = slice(start, start + batch)
            raw = np.ascontiguousarray(self.ids[s]).tobytes()
            n = fmt.ID_LEN
            for j, (p, off, stored, rawlen, enc) in enumerate(zip(
                    self.pack[s].tolist(), self.offset[s].tolist(), self.stored_length[s].tolist(),
                    self.raw_length[s].tolist(), self.encoding[s].tolist(), strict=True)):
                yield raw[j * n:(j + 1) * n], ChunkLocation(self.packs[p], off, stored, rawlen, enc)


IndexInput = IndexRows | Sequence[IndexRows] | pa.Table | Iterable[tuple[bytes, ChunkLocation]]


def _as_parts(rows: IndexInput) -> list[IndexRows]:
    if isinstance(rows, pa.Table):
        return [IndexRows.from_table(rows)]
    if isinstance(rows, IndexRows):
        return [rows]
    rows = list(rows)
    if rows and all(isinstance(r, IndexRows) for r in rows):
        return rows  # type: ignore[return-value]
    return [IndexRows.from_pylist(rows)]  # type: ignore[arg-type]


def _write_index_to(sink: object, parts: list[IndexRows]) -> None:
    with pq.ParquetWriter(sink, INDEX_SCHEMA, compression="zstd") as w:
        if not any(len(p) for p in parts):
            w.write_table(INDEX_SCHEMA.empty_table())
        for rows in parts:
            for start in range(0, len(rows), INDEX_ROW_GROUP):
                w.write_table(rows.to_table(start, start + INDEX_ROW_GROUP))


def index_bytes(rows: IndexInput) -> bytes:
    """An index file (Parquet, :data:`INDEX_SCHEMA`, zstd) holding ``rows``: columns (or several parts of
    them, e.g. :meth:`ChunkIndex.runs`, written one after the other), a table of the index schema, or
    ``(chunk id, location)`` pairs. Written a row group at a time."""
    buf = io.BytesIO()
    _write_index_to(buf, _as_parts(rows))
    return buf.getvalue()


class _BlobFile(io.RawIOBase):
    """A :class:`~drsync.storage.BlobWriter` as the binary file Parquet's writer wants, handing it
    pieces of about 1 MiB (Parquet writes many small ones)."""

    PIECE = 1 << 20

    def __init__(self, blob: BlobWriter) -> None:
        self._blob, self._at, self._buf = blob, 0, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(memoryview(b))
        self._buf += b
        self._at += n
        if len(self._buf) >= self.PIECE:
            self.drain()
        return n

    def drain(self) -> None:
        if self._buf:
            self._blob.write(bytes(self._buf))
            self._buf.clear()

    def tell(self) -> int:
        return self._at


def write_index(storage: Storage, name: str, rows: IndexInput, *, durable: bool = True) -> None:
    """:func:`index_bytes` streamed into ``storage`` as ``name`` (visible only once whole): never the whole
    file in memory (about 40 MiB at 1,000,000 chunks, twice over in a buffer)."""
    blob = storage.writer(name)
    try:
        sink = _BlobFile(blob)
        _write_index_to(sink, _as_parts(rows))
        sink.drain()
        blob.commit(durable=durable)
    except BaseException:
        blob.abort()
        raise


OFFSET_MAX = 1 << 48  # bytes: no pack drsync writes is near this; an index row placing a chunk past it is damage


def _check_index_rows(table: pa.Table, name: str) -> None:
    """Every row describes a chunk drsync could have written (the limits of
    :func:`drsync.repository.chunks.check_sizes`), and no value is null: a repository file another
    host wrote never sizes a read or a decompression beyond them. Raises IntegrityError naming the
    first bad row."""
    if not table.num_rows:
        return
    for col in table.column_names:
        if table.column(col).null_count:
            raise IntegrityError(f"index file {name} is damaged: column {col} has nulls; run 'drsync repo verify'")
    far = pc.index(pc.greater(table.column("offset"), OFFSET_MAX), True).as_py()
    if far >= 0:
        raise IntegrityError(f"index file {name} is damaged: row {far} places a chunk at offset "
                             f"{table.column('offset')[far].as_py()}, past any pack drsync writes")
    bad = pc.or_(pc.or_(pc.greater(table.column("raw_length"), fmt.CHUNK_MAX),
                        pc.greater(table.column("stored_length"), fmt.STORED_MAX)),
                 pc.invert(pc.is_in(table.column("encoding"), value_set=pa.array(sorted(fmt.ENCODINGS), pa.uint8()))))
    bad = pc.or_(bad, pc.and_(pc.equal(table.column("encoding"), fmt.ENC_RAW),
                              pc.not_equal(table.column("stored_length"), table.column("raw_length"))))
    first = pc.index(bad, True).as_py()
    if first >= 0:
        row = table.slice(first, 1).to_pylist()[0]
        try:
            chunks.check_sizes(row["encoding"], row["stored_length"], row["raw_length"], row["chunk"],
                               f"index file {name}: chunk")
        except IntegrityError as e:
            raise IntegrityError(f"{e}; run 'drsync repo verify'") from None


def iter_index_file(data: bytes | pa.NativeFile, name: str, batch_rows: int = INDEX_ROW_GROUP // 2
                    ) -> Iterator[IndexRows]:
    """Parse and check one index file, ``batch_rows`` rows at a time (IntegrityError if it is damaged,
    of another layout, or names a chunk no drsync writes). Columns go straight into NumPy (zero-copy
    views of the decoded batch); pack ids are read dictionary-encoded. Decoding a batch at a time
    keeps Arrow's memory to one batch, whatever the file's row groups."""
    try:
        source = data if isinstance(data, pa.NativeFile) else pa.BufferReader(data)
        f = pq.ParquetFile(source, read_dictionary=["pack"], pre_buffer=False)
        if not f.schema_arrow.equals(_INDEX_SCHEMA_READ):
            raise IntegrityError(f"index file {name} has an unexpected layout")
        for batch in f.iter_batches(batch_size=batch_rows, use_threads=False):
            table = pa.Table.from_batches([batch])
            _check_index_rows(table, name)
            yield IndexRows.from_table(table)
    # KeyError: a file without the pack column; IndexError: a damaged dictionary index of the pack column
    except (pa.ArrowInvalid, OSError, KeyError, ValueError, IndexError) as e:
        raise IntegrityError(f"index file {name} is damaged: {e!s}; run 'drsync repo verify'") from None


def index_file_packs(data: bytes | pa.NativeFile, name: str) -> set[str]:
    """The pack ids one index file names, from its ``pack`` column alone (read dictionary-encoded: the
    values of each batch's dictionary, a superset at most), without decoding the other columns.
    IntegrityError if the file is damaged or of another layout."""
    try:
        source = data if isinstance(data, pa.NativeFile) else pa.BufferReader(data)
        f = pq.ParquetFile(source, read_dictionary=["pack"], pre_buffer=False)
        if not f.schema_arrow.equals(_INDEX_SCHEMA_READ):
            raise IntegrityError(f"index file {name} has an unexpected layout")
        named: set[str] = set()
        for batch in f.iter_batches(batch_size=INDEX_ROW_GROUP, columns=["pack"], use_threads=False):
            named.update(p for p in batch.column(0).dictionary.to_pylist() if p is not None)
        return named
    except (pa.ArrowInvalid, OSError, KeyError, ValueError, IndexError) as e:
        raise IntegrityError(f"index file {name} is damaged: {e!s}; run 'drsync repo verify'") from None


def read_index_file(data: bytes, name: str) -> IndexRows:
    """Every row of one index file, checked (:func:`iter_index_file`), in file order."""
    return IndexRows.concat(list(iter_index_file(data, name)))


@dataclass(frozen=True)
class _Run:
    """Index rows sorted by chunk id, each id once (arrays read-only, never written): ``ids`` (N,)
    ``'S32'``, ``key`` their (N,) uint64 :func:`id_key`, ``pack`` (N,) uint32 numbers into the owning
    index's pack table, ``offset`` (N,) uint64, ``stored``/``raw`` (N,) uint32, ``enc`` (N,) uint8."""

    ids: np.ndarray
    key: np.ndarray
    pack: np.ndarray
    offset: np.ndarray
    stored: np.ndarray
    raw: np.ndarray
    enc: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.ids, self.key, self.pack, self.offset, self.stored, self.raw,
                                          self.enc)))

    def rows(self, packs: tuple[str, ...]) -> IndexRows:
        return IndexRows(self.ids, self.pack, self.offset, self.stored, self.raw, self.enc, packs)

    def columns(self) -> tuple[np.ndarray, ...]:
        return self.ids, self.key, self.pack, self.offset, self.stored, self.raw, self.enc


def _read_only(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable and a.flags.owndata:
        a.flags.writeable = False
    return a


def _merged(pair: list[_Run]) -> _Run:
    """One run holding the two disjoint runs in ``pair``, which is emptied (so that only this function
    holds them): the smaller's rows inserted into the larger's a column at a time, each old column let
    go once its merged one is made. The peak is both runs and one column of the result, not both runs
    and the whole result (the index twice over, for a moment)."""
    a, b = sorted(pair, key=len, reverse=True)
    pair.clear()
    pos = locate(a.ids, a.key, b.ids, b.key)[0]
    big, small = list(a.columns()), list(b.columns())
    del a, b
    out = []
    for i in range(len(big)):
        out.append(_read_only(np.insert(big[i], pos, small[i])))
        big[i] = small[i] = None
    return _Run(*out)


class ChunkIndex:
    """Chunk id -> location, for millions of chunks: no Python object per chunk.

    Storage: a few *runs*, each a set of rows sorted by chunk id (``(N,)`` ``'S32'`` ids, their
    ``uint64`` search keys, uint32 pack numbers into a pack id table, uint64 offsets, uint32 lengths,
    uint8 encodings: 61 bytes a chunk), no id in two runs, searched by binary search behind one
    one-hash Bloom filter over all of them (1-2 bytes a chunk) that turns most lookups of a new chunk
    away at once; plus a small buffer of recent :meth:`add` calls (a dict) made into a run when it holds
    more than ``max(65536, N/8)`` chunks. Rows added in bulk (an index file, a write session) become runs
    of their own, taken over without a copy when they come sorted. When there are more than
    :attr:`_MAX_RUNS` runs the two smallest are merged, so the index never holds a second copy of itself
    (a merge of one big sorted array would, for a moment): about 1.25 times the rows at worst.
    The first location given for an id wins (any listed location is valid).

    Thread-safe: capture threads call :meth:`add` and ``in`` concurrently; every method takes the
    lock. Batch methods (:meth:`contains_many`, :meth:`locate_many`, :meth:`add_rows`,
    :meth:`runs`, :meth:`rows`, :meth:`pack_batches`) are what callers at scale use; :meth:`items` and
    :meth:`get` make one object per chunk.
    """

    _MERGE_MIN = 65536
    _MAX_RUNS = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._runs: list[_Run] = []
        self._size = 0  # rows in the runs
        # A one-hash Bloom filter of the runs' ids (8 bits an id when built, about 12 % false positives)
        # over bytes 8..16 of the id: most lookups of a new chunk end here, without a binary search.
        self._filter = b""
        self._filter_mask = 0
        # Recent single adds: id -> row of the buffer arrays below.
        self._recent: dict[bytes, int] = {}
        self._r_pack, self._r_offset = array("I"), array("Q")
        self._r_stored, self._r_raw, self._r_enc = array("I"), array("I"), array("B")

    @classmethod
    def from_sorted(cls, ids: np.ndarray, key: np.ndarray, rows: IndexRows) -> ChunkIndex:
        """An index over ``ids`` (``(N,)`` sorted, unique, with their :func:`id_key` ``key``, e.g. an
        :class:`~drsync.repository.ids.IdSet`'s) located by ``rows`` (``(N,)``, row i the location of
        ``ids[i]``; its ``ids`` are not read). The arrays are taken over, not copied."""
        index = cls()
        index._packs, index._pack_no = list(rows.packs), {p: i for i, p in enumerate(rows.packs)}
        if len(ids):
            index._runs = [_Run(ids, key, rows.pack, rows.offset, rows.stored_length, rows.raw_length,
                                rows.encoding)]
            index._size = len(ids)
        # No Bloom filter: such an index answers for the ids it was made for, found ones nearly always (a
        # reader of a restore's chunks); the filter would be 23 bits an id for nothing. One is built if rows
        # are added later.
        return index

    # --- one chunk -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return self._size + len(self._recent)

    def __contains__(self, chunk_id: bytes) -> bool:
        with self._lock:
            return chunk_id in self._recent or self._find_locked(chunk_id) is not None

    def add(self, chunk_id: bytes, loc: ChunkLocation, *, unindexed: bool = False) -> None:
        """Add one chunk (kept as it is if the id is already indexed). ``unindexed``: the caller has just
        found the id not indexed, and nothing else adds to this index (a chunk writer's own, under its lock):
        not looked up again."""
        with self._lock:
            if not unindexed and (chunk_id in self._recent or self._find_locked(chunk_id) is not None):
                return
            if len(chunk_id) != fmt.ID_LEN:
                raise ValueError(f"a chunk id is {fmt.ID_LEN} bytes, not {len(chunk_id)}")
            self._recent[chunk_id] = len(self._r_pack)
            self._r_pack.append(self._pack_number_locked(loc.pack_id))
            self._r_offset.append(loc.offset)
            self._r_stored.append(loc.stored_length)
            self._r_raw.append(loc.raw_length)
            self._r_enc.append(loc.encoding)
            if len(self._recent) > max(self._MERGE_MIN, self._size // 8):
                self._merge_recent_locked()

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        with self._lock:
            r = self._recent.get(chunk_id)
            if r is not None:
                return ChunkLocation(self._packs[self._r_pack[r]], self._r_offset[r], self._r_stored[r],
                                     self._r_raw[r], self._r_enc[r])
            hit = self._find_locked(chunk_id)
            if hit is None:
                return None
            run, i = hit
            return ChunkLocation(self._packs[int(run.pack[i])], int(run.offset[i]), int(run.stored[i]),
                                 int(run.raw[i]), int(run.enc[i]))

    # --- many chunks ---------------------------------------------------------------------------

    def contains_many(self, ids: np.ndarray | pa.Array | pa.ChunkedArray | Iterable[bytes]) -> np.ndarray:
        """(K,) bool: which of ``ids`` (K ids, any form :func:`drsync.repository.ids.ids_array` takes) are indexed."""
        q = ids_array(ids)
        key = id_key(q)
        with self._lock:
            self._merge_recent_locked()
            return self._found_locked(q, key)

    def locate_many(self, ids: np.ndarray | pa.Array | pa.ChunkedArray | Iterable[bytes]
                    ) -> tuple[np.ndarray, IndexRows]:
        """Where ``ids`` (K ids) are: ``(found, rows)``, ``found`` (K,) bool and ``rows`` the index rows of
        the found ones, in the order of ``ids`` (``found.sum()`` rows)."""
        q = ids_array(ids)
        key = id_key(q)
        with self._lock:
            self._merge_recent_locked()
            found = np.zeros(len(q), bool)
            out = [np.zeros(len(q), dtype) for dtype in (np.uint32, np.uint64, np.uint32, np.uint32, np.uint8)]
            for run in self._runs:
                pos, hit = locate(run.ids, run.key, q, key)
                at = pos[hit]
                for o, col in zip(out, (run.pack, run.offset, run.stored, run.raw, run.enc), strict=True):
                    o[hit] = col[at]
                found |= hit
            return found, IndexRows(q[found], *(o[found] for o in out), tuple(self._packs))

    def add_rows(self, rows: IndexRows) -> None:
        """Add many rows at once (an index file, a write session): one run, taken over without a copy when
        the rows come sorted by id and each id once (a :meth:`runs` part, most index file batches). Ids
        already indexed, or repeated in ``rows``, keep their first location."""
        if not len(rows):
            return
        with self._lock:
            self._merge_recent_locked()
            numbers = np.array([self._pack_number_locked(p) for p in rows.packs], np.uint32)
            same = np.array_equal(numbers, np.arange(len(numbers), dtype=np.uint32))  # no renumbering: no copy
            self._add_run_locked(rows.ids, rows.pack if same else numbers[rows.pack], rows.offset,
                                 rows.stored_length, rows.raw_length, rows.encoding)

    def load_file(self, data: bytes | pa.NativeFile, name: str) -> None:
        """Add the rows of one index file (:func:`iter_index_file`: IntegrityError if it is damaged, and
        then nothing is added). Read a batch at a time into an index of its own, whose runs are then
        handed over: the peak is one decoded batch beside the rows."""
        part = ChunkIndex()
        for rows in iter_index_file(data, name):
            part.add_rows(rows)
        packs = tuple(part._packs)
        for run in part.runs():
            self.add_rows(dataclasses.replace(run, packs=packs))

    def runs(self) -> list[IndexRows]:
        """Every row, as a few parts each sorted by chunk id, no id in two parts (see the class docstring):
        the arrays are shared, read-only, never written. What a write session's index file is written from
        without first merging them into one sorted copy."""
        with self._lock:
            self._merge_recent_locked()
            packs = tuple(self._packs)
            return [run.rows(packs) for run in self._runs]

    def rows(self) -> IndexRows:
        """Every row, sorted by chunk id (each id once): the runs merged into one (for a moment, the index
        twice over), which then replaces them. The arrays are shared, read-only: never written."""
        with self._lock:
            self._merge_recent_locked()
            while len(self._runs) > 1:
                self._merge_smallest_locked()
            packs = tuple(self._packs)
            if not self._runs:
                return dataclasses.replace(IndexRows.empty(), packs=packs)
            return self._runs[0].rows(packs)

    @property
    def nbytes(self) -> int:
        """Bytes of the runs and their filter (the recent-additions buffer and the pack id table aside)."""
        with self._lock:
            return len(self._filter) + sum(run.nbytes for run in self._runs)

    def items(self) -> Iterator[tuple[bytes, ChunkLocation]]:
        """Every ``(chunk id, location)``, sorted by id: one object per chunk (tests, small indexes)."""
        return self.rows().iter_rows()

    def pack_ids(self) -> set[str]:
        """The ids of the packs the index names."""
        return {name for part in self.runs() for name in part.pack_names()}

    def pack_batches(self) -> Iterator[tuple[str, IndexRows]]:
        """The rows grouped by pack: ``(pack id, rows of that pack sorted by offset)``, packs in id order."""
        rows = self.rows()
        order = np.lexsort((rows.offset, rows.pack))
        packs = rows.pack[order]
        bounds = np.flatnonzero(packs[1:] != packs[:-1]) + 1
        starts = np.concatenate(([0], bounds)) if len(order) else np.empty(0, np.intp)
        ends = np.concatenate((bounds, [len(order)])) if len(order) else np.empty(0, np.intp)
        groups = sorted((rows.packs[int(packs[s])], int(s), int(e)) for s, e in zip(starts, ends, strict=True))
        for pack_id, s, e in groups:
            yield pack_id, rows.take(order[s:e])

    # --- inside the lock ------------------------------------------------------------------------

    def _find_locked(self, chunk_id: bytes) -> tuple[_Run, int] | None:
        """The run and row of ``chunk_id``, or None."""
        if len(chunk_id) != fmt.ID_LEN:
            return None
        if self._filter_mask:  # no filter (an index made from_sorted, or an empty one): search the runs
            h = int.from_bytes(chunk_id[8:16], "big") & self._filter_mask
            if not (self._filter[h >> 3] >> (h & 7)) & 1:
                return None
        for run in self._runs:
            i = find_one(run.ids, run.key, chunk_id)
            if i >= 0:
                return run, i
        return None

    def _found_locked(self, ids: np.ndarray, key: np.ndarray) -> np.ndarray:
        found = np.zeros(len(ids), bool)
        for run in self._runs:
            found |= locate(run.ids, run.key, ids, key)[1]
        return found

    def _build_filter_locked(self) -> None:
        """The filter over every run, sized for 8 bits an id."""
        n = self._size
        if not n:
            self._filter, self._filter_mask = b"", 0
            return
        bits = max(1 << 16, 1 << (8 * n - 1).bit_length())
        flags = np.zeros(bits, bool)
        for run in self._runs:
            self._set_bits(flags, run.ids, bits)
        self._filter = np.packbits(flags, bitorder="little").tobytes()
        self._filter_mask = bits - 1

    @staticmethod
    def _set_bits(flags: np.ndarray, ids: np.ndarray, bits: int) -> None:
        words = np.ascontiguousarray(ids).view(">u8").reshape(-1, fmt.ID_LEN // 8)
        flags[(words[:, 1] & np.uint64(bits - 1)).astype(np.intp)] = True

    def _filter_add_locked(self, run: _Run) -> None:
        """Add a new run's ids to the filter (rebuilt, larger, when the index outgrew it)."""
        bits = self._filter_mask + 1
        if not self._filter_mask or 8 * self._size > 2 * bits:
            self._build_filter_locked()
            return
        flags = np.unpackbits(np.frombuffer(self._filter, np.uint8), bitorder="little").astype(bool)
        self._set_bits(flags, run.ids, bits)
        self._filter = np.packbits(flags, bitorder="little").tobytes()

    def _pack_number_locked(self, pack_id: str) -> int:
        no = self._pack_no.get(pack_id)
        if no is None:
            no = self._pack_no[pack_id] = len(self._packs)
            self._packs.append(pack_id)
        return no

    def _merge_recent_locked(self) -> None:
        if not self._recent:
            return
        ids = np.frombuffer(b"".join(self._recent), ID_DTYPE)
        cols = (np.array(self._r_pack, np.uint32), np.array(self._r_offset, np.uint64),
                np.array(self._r_stored, np.uint32), np.array(self._r_raw, np.uint32), np.array(self._r_enc, np.uint8))
        self._recent = {}
        self._r_pack, self._r_offset = array("I"), array("Q")
        self._r_stored, self._r_raw, self._r_enc = array("I"), array("I"), array("B")
        self._add_run_locked(ids, *cols)

    def _add_run_locked(self, ids: np.ndarray, pack: np.ndarray, offset: np.ndarray, stored: np.ndarray,
                        raw: np.ndarray, enc: np.ndarray) -> None:
        """Rows (``pack`` in this index's numbers) as a new run: sorted (unless they are, strictly), the
        first of a repeated id kept, the ids already indexed left out; then the filter, then compaction."""
        key = id_key(ids)
        order: np.ndarray | None = None
        if len(key) > 1 and not bool((key[1:] > key[:-1]).all()):
            order = sort_unique(ids, key)
        if self._runs:
            new = ~self._found_locked(ids if order is None else ids[order], key if order is None else key[order])
            if not new.all():
                order = (np.flatnonzero(new) if order is None else order[new])
        cols = (ids, key, pack, offset, stored, raw, enc)
        if order is not None:
            if not len(order):
                return
            cols = tuple(c[order] for c in cols)
        run = _Run(*(_read_only(c) for c in cols))
        self._runs.append(run)
        self._size += len(run)
        self._filter_add_locked(run)
        while len(self._runs) > self._MAX_RUNS:
            self._merge_smallest_locked()

    def _merge_smallest_locked(self) -> None:
        self._runs.sort(key=len, reverse=True)
        pair = [self._runs.pop(), self._runs.pop()]
        self._runs.append(_merged(pair))
