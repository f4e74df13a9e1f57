"""Pack files and the chunk index.

A pack is ``PACK_MAGIC``, the stored chunks back to back, then a trailer that
lists them (so a pack describes itself and the index can be rebuilt from the
packs alone). The index maps a chunk id to where it lives; it is a set of
Parquet files, one per write session, that are merged in memory.
"""

from __future__ import annotations

import io
import secrets
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import blake3
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drsync.errors import IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.storage import Storage

_ENTRY = struct.Struct("<32sBII")  # id, encoding, stored length, raw length
_TAIL = struct.Struct("<I16s8s")  # entry count, blake3(entries)[:16], end magic


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
    """Appends stored chunks to one pack blob; :meth:`finish` writes the trailer and commits."""

    def __init__(self, storage: Storage) -> None:
        self.pack_id = new_pack_id()
        self.name = fmt.pack_name(self.pack_id)
        self._w = storage.writer(self.name)
        self._w.write(fmt.PACK_MAGIC)
        self._offset = len(fmt.PACK_MAGIC)
        self.entries: list[PackEntry] = []

    @property
    def size(self) -> int:
        return self._offset

    def add(self, chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> PackEntry:
        entry = PackEntry(chunk_id, encoding, self._offset, len(stored), raw_length)
        self._w.write(stored)
        self._offset += len(stored)
        self.entries.append(entry)
        return entry

    def finish(self, *, durable: bool) -> None:
        table = b"".join(_ENTRY.pack(e.chunk_id, e.encoding, e.stored_length, e.raw_length)
                         for e in self.entries)
        self._w.write(table)
        self._w.write(_TAIL.pack(len(self.entries), blake3.blake3(table).digest()[:16],
                                 fmt.PACK_TRAILER_MAGIC))
        self._w.commit(durable=durable)

    def abort(self) -> None:
        self._w.abort()


def read_pack_entries(storage: Storage, pack_id: str, pack_size: int) -> list[PackEntry]:
    """Parse a pack's trailer. Raises IntegrityError if the pack is truncated or damaged."""
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
    entries = []
    offset = len(fmt.PACK_MAGIC)
    for i in range(count):
        cid, enc, stored, raw = _ENTRY.unpack_from(table, i * _ENTRY.size)
        chunks.check_sizes(enc, stored, raw, cid, f"pack {pack_id}: chunk")
        entries.append(PackEntry(cid, enc, offset, stored, raw))
        offset += stored
    if offset != pack_size - _TAIL.size - table_len:
        raise IntegrityError(f"pack {pack_id}: entry table does not add up to the pack size")
    return entries


# --- the index -------------------------------------------------------------

INDEX_SCHEMA = pa.schema([
    ("chunk", pa.binary(fmt.ID_LEN)),
    ("pack", pa.string()),
    ("offset", pa.uint64()),
    ("stored_length", pa.uint32()),
    ("raw_length", pa.uint32()),
    ("encoding", pa.uint8()),
])


def index_bytes(rows: Iterable[tuple[bytes, ChunkLocation]]) -> bytes:
    ids, packs, offs, stored, raw, enc = [], [], [], [], [], []
    for cid, loc in rows:
        ids.append(cid)
        packs.append(loc.pack_id)
        offs.append(loc.offset)
        stored.append(loc.stored_length)
        raw.append(loc.raw_length)
        enc.append(loc.encoding)
    table = pa.table([ids, packs, offs, stored, raw, enc], schema=INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _check_index_rows(table: pa.Table, name: str) -> None:
    """Every row describes a chunk drsync could have written (the limits of
    :func:`drsync.repository.chunks.check_sizes`): a repository file another host wrote never sizes
    a read or a decompression beyond them. Raises IntegrityError naming the first bad row."""
    if not table.num_rows:
        return
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


class ChunkIndex:
    """Chunk id -> location, compact enough for millions of chunks.

    Locations live in parallel typed arrays; the dict maps an id to a row.
    Safe for concurrent ``add``/``get`` from capture threads.
    """

    def __init__(self) -> None:
        self._rows: dict[bytes, int] = {}
        self._packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._pack = array("I")
        self._offset = array("Q")
        self._stored = array("I")
        self._raw = array("I")
        self._enc = array("B")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._rows

    def add(self, chunk_id: bytes, loc: ChunkLocation) -> None:
        with self._lock:
            if chunk_id in self._rows:
                return
            no = self._pack_no.get(loc.pack_id)
            if no is None:
                no = self._pack_no[loc.pack_id] = len(self._packs)
                self._packs.append(loc.pack_id)
            self._rows[chunk_id] = len(self._pack)
            self._pack.append(no)
            self._offset.append(loc.offset)
            self._stored.append(loc.stored_length)
            self._raw.append(loc.raw_length)
            self._enc.append(loc.encoding)

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        row = self._rows.get(chunk_id)
        if row is None:
            return None
        return ChunkLocation(self._packs[self._pack[row]], self._offset[row], self._stored[row],
                             self._raw[row], self._enc[row])

    def items(self) -> Iterator[tuple[bytes, ChunkLocation]]:
        for cid, row in list(self._rows.items()):
            yield cid, ChunkLocation(self._packs[self._pack[row]], self._offset[row],
                                     self._stored[row], self._raw[row], self._enc[row])

    def pack_ids(self) -> set[str]:
        return {self._packs[n] for n in set(self._pack)}

    def load_file(self, data: bytes, name: str) -> None:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as e:
            raise IntegrityError(f"index file {name} is damaged: {e}; run 'drsync repo verify'") from None
        if not table.schema.equals(INDEX_SCHEMA):
            raise IntegrityError(f"index file {name} has an unexpected layout")
        _check_index_rows(table, name)
        cols = [table.column(i).to_pylist() for i in range(6)]
        for cid, pack, off, stored, raw, enc in zip(*cols, strict=True):
            self.add(cid, ChunkLocation(pack, off, stored, raw, enc))
