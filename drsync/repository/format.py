"""Constants of the on-disk format (see docs/FORMAT.md, which is the contract).

Changing any of these changes the format: bump ``FORMAT_VERSION`` and teach
the reader the old version, or chunks stop deduplicating across repositories.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 2
REPOSITORY_KIND = "drsync-repository"
# A backup directory (drsync backup create) is a repository with this file beside config.json; drsync
# never changes a repository that has one (its files are checked against CHECKSUMS.b3).
BACKUP_META = "backup.json"

# FastCDC 2020, normalized chunking level 1, sizes avg/4 .. avg*4. The average
# was chosen by measurement (bench/chunking.py, 2026-11-24): throughput is flat
# (~5 GB/s) from 128 KiB to 1 MiB, but what a 1 % change costs is not. With
# 1 % of the bytes rewritten in 1 MiB blocks, 1 MiB chunks store 3.2 % anew,
# 512 KiB 1.8 %, 256 KiB 1.44 %, 128 KiB 1.26 %. 256 KiB is the largest size
# that keeps an incremental under the 1.5 % target, at 4,096 chunks per GiB.
CHUNK_MIN = 64 * 1024
CHUNK_AVG = 256 * 1024
CHUNK_MAX = 1024 * 1024
CHUNK_SEED = 0
CHUNKER = "fastcdc2020"
HASH = "blake3-256"
ID_LEN = 32

# Pack files gather chunks so that a million chunks are not a million files.
PACK_TARGET_SIZE = 32 * 1024 * 1024
# ... or this many chunks, whichever comes first: a pack of small files' chunks has an entry table of at most
# 2.6 MiB, so what reads one table at a time (verify, gc, an index rebuild) holds a bounded amount at a million
# chunks. A writer's choice, not part of the format: a reader takes packs of any count.
PACK_MAX_CHUNKS = 65_536
PACK_MAGIC = b"DRSPACK1"
PACK_TRAILER_MAGIC = b"DRSPEND1"

# Chunk encodings (the ``flags`` byte of a pack entry / index row).
ENC_RAW = 0
ENC_ZSTD = 1
ENCODINGS = frozenset({ENC_RAW, ENC_ZSTD})
ZSTD_LEVEL = 3
# On the wire only (the agent protocol), never in a repository: a chunk sent as a zstd frame compressed with
# the bytes its path held at its offsets (chunks the standby holds, its ``bases``, joined and cut) as a
# raw-content dictionary. The standby decodes it and stores it raw or zstd as a capture would
# (drsync.repository.chunks.delta_dictionary, delta_encode, delta_decode).
ENC_DELTA = 2
# Level 3: level 1's tables find the base's bytes in small chunks only (a 1 MiB chunk with 10 KB changed:
# 1,048,610 bytes at level 1 against 11,085 at 3, measured); about 6 ms a 1 MiB chunk on one core.
DELTA_LEVEL = 3
# The largest zstd window a delta frame may ask its decoder for (bytes): its chunk's length, at most 1 MiB.
DELTA_WINDOW_MAX = 2 * 1024 * 1024
# The most chunks whose bytes one delta is taken against (old chunks are at least CHUNK_MIN long, and only
# those overlapping one chunk's offsets are named).
DELTA_BASES_MAX = 16
# A chunk whose first 16 KiB do not shrink below this ratio is stored raw:
# compressing incompressible data costs CPU and saves nothing.
COMPRESS_SAMPLE = 16 * 1024
COMPRESS_SAMPLE_RATIO = 0.92

# --- Limits on sizes that come from outside (a peer's message, a repository file another host wrote) ---
# Each is checked before anything is allocated from it; docs/FORMAT.md ("Limits") is the contract.

# The most stored bytes one chunk may have, in bytes: zstd's compress bound of the largest chunk
# (CHUNK_MAX + CHUNK_MAX/256 + 64). drsync itself never stores more than CHUNK_MAX (a chunk that does
# not shrink is stored raw); the slack only admits zstd frames written by other encoders.
STORED_MAX = CHUNK_MAX + CHUNK_MAX // 256 + 64
# The largest manifest a standby accepts in one commit, and that drsync reads from a repository, in
# bytes. A manifest costs about 92 bytes per one-chunk file (measured, 2026-12: 200,000 files of a
# warehouse-like tree), so 10 million files are about 0.9 GiB; 2 GiB leaves room for ~35 million more
# chunk ids (32 bytes each), i.e. about 8 TiB of data in multi-chunk files.
MANIFEST_MAX_BYTES = 2 * 1024 * 1024 * 1024
# The most a manifest may decode into (Arrow tables in memory), in bytes: MANIFEST_DECODED_FACTOR times
# MANIFEST_MAX_BYTES. A real manifest decodes into about 2.2 times its bytes (161 MiB from 74 MiB at
# 1,000,000 files); a hostile one of a few hundred KiB (one long path repeated, dictionary- and
# run-length-encoded) would decode into gigabytes. Checked from the footer and batch by batch.
MANIFEST_DECODED_FACTOR = 4
# Small repository documents other hosts write (a lock, config.json, protect.json), in bytes: read at
# most this much, so a damaged or hostile one of gigabytes is refused, not read.
SMALL_DOC_MAX_BYTES = 64 * 1024
# The largest snapshot document (JSON) drsync accepts from a peer or a repository, in bytes. A document
# is about 1 KiB plus its warning sample (at most WARNING_SAMPLE lines of WARNING_MAX_CHARS characters,
# under 130 KiB even when every character is escaped), its name and its reason.
SNAPSHOT_DOC_MAX_BYTES = 1024 * 1024
# A snapshot document keeps the first WARNING_SAMPLE warnings of its capture (plus a line counting the
# rest), each cut to WARNING_MAX_CHARS characters (a path alone may be 100 KiB long).
WARNING_SAMPLE = 20
WARNING_MAX_CHARS = 1024

CONFIG_NAME = "config.json"
SNAPSHOTS_DIR = "snapshots/"
MANIFESTS_DIR = "manifests/"
INDEX_DIR = "index/"
PACKS_DIR = "packs/"
LOCKS_DIR = "locks/"
PROTECT_NAME = "protect.json"  # the [snapshots] protect window the repository carries (drsync.protection)
REPAIRED_NAME = "repaired.json"  # snapshots a repair left naming chunks it forgot (drsync.repository.repair)


def pack_name(pack_id: str) -> str:
    return f"{PACKS_DIR}{pack_id[:2]}/{pack_id}.pack"


_SNAPSHOT_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def is_valid_snapshot_id(snapshot_id: str) -> bool:
    """Snapshot ids name files: letters, digits, '-' and '_' only (no '/', no '..')."""
    return bool(_SNAPSHOT_ID.match(snapshot_id))


def snapshot_name(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_DIR}{snapshot_id}.json"


def manifest_name(snapshot_id: str) -> str:
    return f"{MANIFESTS_DIR}{snapshot_id}.parquet"
