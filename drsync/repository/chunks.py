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


def decode(encoding: int, stored: bytes, raw_length: int, expected_id: bytes) -> bytes:
    """Turn stored bytes back into the chunk and check it against its id."""
    if encoding == fmt.ENC_RAW:
        data = stored
    elif encoding == fmt.ENC_ZSTD:
        try:
            data = _decompressor().decompress(stored, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"chunk {expected_id.hex()[:16]} does not decompress: {e}") from None
    else:
        raise IntegrityError(f"chunk {expected_id.hex()[:16]} has unknown encoding {encoding}")
    if len(data) != raw_length or chunk_id(data) != expected_id:
        raise IntegrityError(f"chunk {expected_id.hex()[:16]} does not match its hash")
    return data
