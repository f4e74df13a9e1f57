"""Cutting files into content-defined chunks, naming and encoding them.

Everything here is pure computation (no repository state): FastCDC cut points,
BLAKE3 ids, and the raw-or-zstd encoding of one chunk. The compiled cores of
pyfastcdc, blake3 and zstandard release the GIL, so capture threads scale.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import BinaryIO

import blake3
import zstandard
from pyfastcdc import FastCDC

from drsync.errors import IntegrityError
from drsync.repository import format as fmt

_local = threading.local()


def _cdc() -> FastCDC:
    cdc = getattr(_local, "cdc", None)
    if cdc is None:
        cdc = FastCDC(fmt.CHUNK_AVG, min_size=fmt.CHUNK_MIN, max_size=fmt.CHUNK_MAX,
                      normalized_chunking=1, seed=fmt.CHUNK_SEED)
        _local.cdc = cdc
    return cdc


def chunk_id(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def cut_stream(f: BinaryIO) -> Iterator[memoryview]:
    """Yield the chunks of a stream. Each view is valid only until the next one is asked for."""
    for c in _cdc().cut_stream(f):
        yield c.data


def cut_buffer(buf: bytes | memoryview) -> Iterator[memoryview]:
    for c in _cdc().cut_buf(buf):
        yield c.data


def _compressor() -> zstandard.ZstdCompressor:
    z = getattr(_local, "zc", None)
    if z is None:
        z = zstandard.ZstdCompressor(level=fmt.ZSTD_LEVEL)
        _local.zc = z
    return z


def _decompressor() -> zstandard.ZstdDecompressor:
    z = getattr(_local, "zd", None)
    if z is None:
        z = zstandard.ZstdDecompressor()
        _local.zd = z
    return z


def encode(data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
    """Return (encoding, stored bytes). Incompressible chunks are stored raw."""
    n = len(data)
    if n >= 2 * fmt.COMPRESS_SAMPLE:
        sample = _compressor().compress(data[: fmt.COMPRESS_SAMPLE])
        if len(sample) > fmt.COMPRESS_SAMPLE * fmt.COMPRESS_SAMPLE_RATIO:
            return fmt.ENC_RAW, data
    packed = _compressor().compress(data)
    if len(packed) >= n * 0.97:
        return fmt.ENC_RAW, data
    return fmt.ENC_ZSTD, packed


def check_sizes(encoding: int, stored_length: int, raw_length: int, chunk_id: bytes, what: str = "chunk") -> None:
    """Refuse a chunk description that no drsync writes, before anything is allocated from it.

    Limits (docs/FORMAT.md, "Limits"): the id is ``ID_LEN`` (32) bytes, the encoding one of
    ``ENCODINGS``, ``raw_length`` at most ``CHUNK_MAX`` (1 MiB) and ``stored_length`` at most
    ``STORED_MAX`` (1 MiB + 4 KiB); a raw chunk is stored as its raw length. Raises IntegrityError.
    """
    if len(chunk_id) != fmt.ID_LEN:
        raise IntegrityError(f"{what} has an id of {len(chunk_id)} bytes; chunk ids are {fmt.ID_LEN} bytes "
                             f"(BLAKE3-256)")
    name = f"{what} {chunk_id.hex()[:16]}"
    if encoding not in fmt.ENCODINGS:
        raise IntegrityError(f"{name} has unknown encoding {encoding} (known: 0 raw, 1 zstd)")
    if not 0 <= raw_length <= fmt.CHUNK_MAX:
        raise IntegrityError(f"{name} claims {raw_length} raw bytes; a chunk is at most {fmt.CHUNK_MAX} bytes")
    if not 0 <= stored_length <= fmt.STORED_MAX:
        raise IntegrityError(f"{name} claims {stored_length} stored bytes; a stored chunk is at most "
                             f"{fmt.STORED_MAX} bytes")
    if encoding == fmt.ENC_RAW and stored_length != raw_length:
        raise IntegrityError(f"{name} is stored raw in {stored_length} bytes but claims {raw_length} raw bytes")


def decode(encoding: int, stored: bytes | memoryview, raw_length: int, expected_id: bytes) -> bytes | memoryview:
    """Turn stored bytes back into the chunk and check it against its id.

    Every size is checked (:func:`check_sizes`) before decompressing, and zstd never allocates more
    than ``raw_length`` (at most 1 MiB): a frame whose header claims another size is refused
    unread, and one without a size is decompressed into a ``raw_length`` buffer, so a lying frame
    (a zstd bomb) costs at most 1 MiB. Raises IntegrityError.
    """
    check_sizes(encoding, len(stored), raw_length, expected_id)
    if encoding == fmt.ENC_RAW:
        data = stored
    else:
        try:
            declared = zstandard.get_frame_parameters(stored).content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and declared != raw_length:
                raise IntegrityError(f"chunk {expected_id.hex()[:16]} is a zstd frame of {declared} bytes but "
                                     f"claims {raw_length} raw bytes")
            # max_output_size bounds the buffer only when the frame does not declare its size (checked above).
            data = _decompressor().decompress(stored, max_output_size=max(1, raw_length))
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {expected_id.hex()[:16]} does not decompress: {e}") from None
    if len(data) != raw_length or chunk_id(data) != expected_id:
        raise IntegrityError(f"chunk {expected_id.hex()[:16]} does not match its hash")
    return data


def _raw_dict(base: bytes | memoryview) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def delta_encode(data: bytes | memoryview, base: bytes | memoryview) -> bytes:
    """``data`` as a zstd frame compressed with ``base`` (:func:`delta_dictionary`: bytes the standby holds) as
    a raw-content dictionary, its size in the frame header: what a primary sends for a chunk as a delta
    (encoding :data:`format.ENC_DELTA`, on the wire only). Pure."""
    return zstandard.ZstdCompressor(level=fmt.DELTA_LEVEL, dict_data=_raw_dict(base),
                                    write_content_size=True).compress(data)


def check_delta_sizes(delta_length: int, raw_length: int, chunk_id: bytes, bases: tuple[bytes, ...] | None = None,
                      skip: int = 0) -> None:
    """Refuse a delta chunk's description that no drsync sends (ids of 32 bytes, 1 to ``DELTA_BASES_MAX`` base
    ids when ``bases`` is given, a skip under ``CHUNK_MAX``, ``raw_length`` at most ``CHUNK_MAX``, the frame
    at most ``STORED_MAX``), before anything is read for it. IntegrityError."""
    name = f"uploaded chunk {chunk_id.hex()[:16]} (a delta)"
    if len(chunk_id) != fmt.ID_LEN:
        raise IntegrityError(f"an uploaded delta chunk has an id of {len(chunk_id)} bytes; chunk ids are "
                             f"{fmt.ID_LEN} bytes (BLAKE3-256)")
    if bases is not None and (not 1 <= len(bases) <= fmt.DELTA_BASES_MAX
                              or any(len(b) != fmt.ID_LEN for b in bases) or not 0 <= skip < fmt.CHUNK_MAX):
        raise IntegrityError(f"{name} names {len(bases)} base chunks (ids of {sorted({len(b) for b in bases})} "
                             f"bytes) and skips {skip} bytes of them; a delta names 1 to {fmt.DELTA_BASES_MAX} "
                             f"chunk ids of {fmt.ID_LEN} bytes and skips less than {fmt.CHUNK_MAX}")
    if not 0 <= raw_length <= fmt.CHUNK_MAX or not 0 <= delta_length <= fmt.STORED_MAX:
        raise IntegrityError(f"{name} claims {raw_length} raw bytes in {delta_length}; a chunk is at most "
                             f"{fmt.CHUNK_MAX} bytes and a delta at most {fmt.STORED_MAX}")


def delta_dictionary(bases: list[bytes | memoryview], skip: int, length: int) -> bytes:
    """What a delta is taken against: ``bases`` joined, less their first ``skip`` bytes, cut to ``length``
    (the bytes a path held at a new chunk's offsets, so that a delta's matches lie one chunk length back,
    within zstd's window). Pure."""
    return b"".join(bases)[skip:skip + length]


def delta_decode(delta: bytes | memoryview, base: bytes | memoryview, raw_length: int,
                 expected_id: bytes) -> bytes:
    """The chunk a :func:`delta_encode` frame holds, checked against its id. The frame must declare
    ``raw_length`` (at most ``CHUNK_MAX``), be at most ``STORED_MAX`` bytes and ask for a window of at most
    ``DELTA_WINDOW_MAX``, so a hostile frame costs at most a few MiB. Raises IntegrityError."""
    name = f"chunk {expected_id.hex()[:16]} (sent as a delta)"
    check_delta_sizes(len(delta), raw_length, expected_id)
    try:
        params = zstandard.get_frame_parameters(delta)
        if params.content_size != raw_length:
            raise IntegrityError(f"{name} is a zstd frame that does not declare its {raw_length} raw bytes")
        if params.window_size > fmt.DELTA_WINDOW_MAX:
            raise IntegrityError(f"{name} asks for a {params.window_size}-byte window; at most "
                                 f"{fmt.DELTA_WINDOW_MAX} is accepted")
        data = zstandard.ZstdDecompressor(dict_data=_raw_dict(base), max_window_size=fmt.DELTA_WINDOW_MAX
                                          ).decompress(delta, max_output_size=max(1, raw_length))
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{name} does not decompress against its base: {e}") from None
    if len(data) != raw_length or chunk_id(data) != expected_id:
        raise IntegrityError(f"{name} does not match its hash")
    return data
