"""The repository: chunks in packs, one manifest per snapshot, an index.

Write order is what makes crashes harmless (docs/FORMAT.md, "Crash safety"):
packs, then the index that names them, then the manifest, then the snapshot
document. A snapshot exists exactly when its document does; anything written
before a crash and never referenced is removed by garbage collection.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from drsync.errors import IntegrityError, NotFound, UsageError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.lock import RepositoryLock
from drsync.repository.manifest import Manifest
from drsync.repository.packs import (
    ChunkIndex,
    ChunkLocation,
    PackEntry,
    PackWriter,
    index_bytes,
    read_pack_entries,
)
from drsync.repository.snapshots import SnapshotInfo, iso
from drsync.storage import ObjectMissing, Storage

# Serialises numbering and writing snapshot documents within this process (an agent's cycle,
# its receiver and its drills share one process). See Repository.commit_snapshot.
_COMMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class RepoConfig:
    id: str
    cluster_id: str
    release: str
    created_at: float
    version: int = fmt.FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps({
            "kind": fmt.REPOSITORY_KIND, "version": self.version, "id": self.id,
            "cluster_id": self.cluster_id, "release": self.release, "created_at": iso(self.created_at),
            "chunker": {"algorithm": fmt.CHUNKER, "min": fmt.CHUNK_MIN, "avg": fmt.CHUNK_AVG,
                        "max": fmt.CHUNK_MAX, "seed": fmt.CHUNK_SEED, "normalization": 1},
            "hash": fmt.HASH, "compression": "zstd",
        }, indent=1).encode()


class ChunkWriter:
    """One write session: new chunks go into packs; :meth:`flush` makes them durable and indexed.

    Thread-safe: capture workers call :meth:`add` concurrently.
    """

    def __init__(self, repo: Repository, *, index: ChunkIndex | None = None,
                 pack_target: int = fmt.PACK_TARGET_SIZE) -> None:
        self.repo = repo
        # The repository's index loads lazily: a capture where nothing changed never needs it.
        self._given_index = index
        self._pack_target = pack_target
        self._lock = threading.Lock()
        self._pack: PackWriter | None = None
        self._new: list[tuple[bytes, ChunkLocation]] = []
        self._pending: set[bytes] = set()
        # Finished packs are synced by a background thread while capture goes on, so the
        # disk writes back as we go instead of in one burst at the end.
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future[None]] = []
        self.new_bytes = 0
        self.new_stored_bytes = 0

    @property
    def _index(self) -> ChunkIndex:
        return self.repo.index if self._given_index is None else self._given_index

    def has(self, chunk_id: bytes) -> bool:
        return chunk_id in self._index or chunk_id in self._pending

    def add(self, chunk_id: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk unless the repository has it; True when it was new."""
        if self.has(chunk_id):
            return False
        enc, stored = chunks.encode(data)
        return self.add_stored(chunk_id, enc, stored, len(data))

    def add_stored(self, chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> bool:
        """Store an already-encoded chunk (copying between repositories, or received over the wire)."""
        with self._lock:
            if chunk_id in self._index or chunk_id in self._pending:
                return False
            if self._pack is None:
                self._pack = PackWriter(self.repo.storage)
            entry = self._pack.add(chunk_id, encoding, stored, raw_length)
            self._pending.add(chunk_id)
            self._new.append((chunk_id, ChunkLocation(self._pack.pack_id, entry.offset, entry.stored_length,
                                                      entry.raw_length, entry.encoding)))
            self.new_bytes += raw_length
            self.new_stored_bytes += len(stored)
            if self._pack.size >= self._pack_target:
                self._finish_pack()
            return True

    def _finish_pack(self) -> None:
        assert self._pack is not None
        self._pack.finish(durable=False)
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drsync-packsync")
        self._syncs.append(self._syncer.submit(self.repo.storage.sync, [self._pack.name]))
        self._pack = None

    def _wait_syncs(self) -> None:
        syncs, self._syncs = self._syncs, []
        try:
            for f in syncs:
                f.result()
        finally:
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)
                self._syncer = None

    def seal(self) -> list[tuple[bytes, ChunkLocation]]:
        """Close the open pack and make all packs of the session durable.

        Returns the new index rows; the caller writes them into an index file.
        """
        with self._lock:
            if self._pack is not None:
                self._finish_pack()
            self._wait_syncs()
            rows = list(self._new)
            self._new.clear()
            self._pending.clear()
            return rows

    def flush(self) -> None:
        """Make every chunk added so far durable and visible in the index."""
        rows = self.seal()
        if not rows:
            return
        name = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
        self.repo.storage.write(name, index_bytes(rows), durable=True)
        for cid, loc in rows:
            self._index.add(cid, loc)

    def abort(self) -> None:
        with self._lock:
            if self._pack is not None:
                self._pack.abort()
                self._pack = None
            try:
                self._wait_syncs()
            except Exception:  # the session is being abandoned; its packs are garbage anyway
                pass


@dataclass
class GcReport:
    removed_snapshots_orphans: int = 0
    deleted_packs: int = 0
    repacked_packs: int = 0
    kept_packs: int = 0
    freed_bytes: int = 0
    live_chunks: int = 0
    dead_chunks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    packs: int = 0
    chunks: int = 0
    snapshots: int = 0
    damaged_chunks: dict[str, str] = field(default_factory=dict)  # chunk hex -> reason
    damaged_files: list[dict[str, str]] = field(default_factory=list)  # {snapshot, path, reason}
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.damaged_chunks or self.damaged_files or self.problems)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "packs": self.packs, "chunks": self.chunks, "snapshots": self.snapshots,
                "damaged_chunks": self.damaged_chunks, "damaged_files": self.damaged_files,
                "problems": self.problems}


class Repository:
    def __init__(self, storage: Storage, config: RepoConfig) -> None:
        self.storage = storage
        self.config = config
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()

    # --- opening -------------------------------------------------------------

    @classmethod
    def init(cls, storage: Storage, *, cluster_id: str, release: str) -> Repository:
        if storage.exists(fmt.CONFIG_NAME):
            raise UsageError(f"{storage.url} is already a drsync repository")
        config = RepoConfig(id=secrets.token_hex(16), cluster_id=cluster_id, release=release,
                            created_at=time.time())
        storage.write(fmt.CONFIG_NAME, config.to_bytes(), durable=True, exclusive=True)
        return cls(storage, config)

    @classmethod
    def open(cls, storage: Storage) -> Repository:
        try:
            raw = storage.read(fmt.CONFIG_NAME)
        except ObjectMissing:
            raise NotFound(f"no drsync repository at {storage.url}; create one with "
                           f"'drsync init' (or check the path)") from None
        try:
            doc = json.loads(raw)
            kind, version = doc["kind"], int(doc["version"])
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{storage.url}/{fmt.CONFIG_NAME} is damaged; it is not a repository "
                                 f"configuration drsync can read") from None
        if kind != fmt.REPOSITORY_KIND:
            raise UsageError(f"{storage.url} is not a drsync repository (kind {kind!r})")
        if version > fmt.FORMAT_VERSION:
            raise UsageError(f"repository {storage.url} has format version {version}, newer than this "
                             f"drsync understands ({fmt.FORMAT_VERSION}); upgrade drsync")
        chunker = doc.get("chunker", {})
        if (chunker.get("avg"), chunker.get("min"), chunker.get("max")) != \
                (fmt.CHUNK_AVG, fmt.CHUNK_MIN, fmt.CHUNK_MAX):
            raise UsageError(f"repository {storage.url} uses chunker parameters {chunker} that this "
                             f"drsync does not support")
        from drsync.repository.snapshots import parse_iso

        config = RepoConfig(id=doc["id"], cluster_id=doc["cluster_id"], release=doc["release"],
                            created_at=parse_iso(doc["created_at"]), version=version)
        return cls(storage, config)

    def lock(self, *, exclusive: bool, wait_s: float = 0.0) -> RepositoryLock:
        return RepositoryLock(self.storage, exclusive=exclusive, wait_s=wait_s)

    # --- chunks ----------------------------------------------------------------

    @property
    def index(self) -> ChunkIndex:
        with self._index_lock:
            if self._index is None:
                index = ChunkIndex()
                for obj in self.storage.list(fmt.INDEX_DIR):
                    index.load_file(self.storage.read(obj.name), obj.name)
                self._index = index
            return self._index

    def reload_index(self) -> None:
        with self._index_lock:
            self._index = None

    def chunk_writer(self) -> ChunkWriter:
        return ChunkWriter(self)

    def has_chunk(self, chunk_id: bytes) -> bool:
        return chunk_id in self.index

    def read_stored(self, chunk_id: bytes) -> tuple[ChunkLocation, bytes]:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in the repository")
        try:
            stored = self.storage.read_range(fmt.pack_name(loc.pack_id), loc.offset, loc.stored_length)
        except ObjectMissing:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack_id} is missing") from None
        if len(stored) != loc.stored_length:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack_id} is truncated")
        return loc, stored

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's bytes, checked against its id (IntegrityError if damaged)."""
        loc, stored = self.read_stored(chunk_id)
        return chunks.decode(loc.encoding, stored, loc.raw_length, chunk_id)

    # --- snapshots ---------------------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first in the repository's own order (``SnapshotInfo.order_key``:
        sequence numbers, not capture times, which a wrong clock can put anywhere)."""
        out = []
        for obj in self.storage.list(fmt.SNAPSHOTS_DIR):
            if not obj.name.endswith(".json"):
                continue
            if obj.size > fmt.SNAPSHOT_DOC_MAX_BYTES:  # never read a document no drsync writes
                raise IntegrityError(f"snapshot {obj.name} is {obj.size} bytes; a snapshot document is at most "
                                     f"{fmt.SNAPSHOT_DOC_MAX_BYTES} bytes (docs/FORMAT.md, Limits); remove or "
                                     f"restore it")
            try:
                out.append(SnapshotInfo.from_bytes(self.storage.read(obj.name), f"snapshot {obj.name}"))
            except ObjectMissing:
                continue
        out.sort(key=lambda s: s.order_key)
        return out

    def find_snapshot(self, ref: str) -> SnapshotInfo:
        """A snapshot by id, unique id prefix, name (newest of that name) or ``latest``.

        Newest means last in :meth:`list_snapshots` order (sequence numbers, not capture times).
        """
        snaps = self.list_snapshots()
        if not snaps:
            raise NotFound(f"repository {self.storage.url} has no snapshots yet")
        if ref == "latest":
            return snaps[-1]
        exact = [s for s in snaps if s.id == ref]
        if exact:
            return exact[0]
        named = [s for s in snaps if s.name == ref]
        if named:
            return named[-1]
        prefixed = [s for s in snaps if s.id.startswith(ref)] if len(ref) >= 4 else []
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise UsageError(f"snapshot {ref!r} is ambiguous: it matches {', '.join(s.id for s in prefixed)}")
        raise NotFound(f"no snapshot {ref!r} in {self.storage.url}; 'drsync snapshot list' shows them")

    def load_manifest(self, info: SnapshotInfo) -> Manifest:
        try:
            data = self.storage.read(fmt.manifest_name(info.id))
        except ObjectMissing:
            raise IntegrityError(f"snapshot {info.id}: its manifest is missing") from None
        if blake3.blake3(data).hexdigest() != info.manifest_hash:
            raise IntegrityError(f"snapshot {info.id}: its manifest is damaged (hash mismatch); restore it "
                                 f"from a backup or the standby")
        return Manifest.from_bytes(data, f"manifest of snapshot {info.id}")

    def commit_snapshot(self, info: SnapshotInfo, manifest_bytes: bytes) -> SnapshotInfo:
        """Write manifest then snapshot document, each durable. The document is the commit point.

        The snapshot gets this repository's next sequence number (1 + the highest one here),
        whatever ``info.seq`` says: a snapshot shipped from a primary is numbered in the order
        it arrives. Returns the committed document (with its seq). The caller holds a shared
        repository lock, which other committers may hold too: within one process the
        numbering is serialised; two processes committing at the same instant may both take
        the same number, and ``SnapshotInfo.order_key`` then orders that pair by capture time.
        """
        self.storage.write(fmt.manifest_name(info.id), manifest_bytes, durable=True)
        with _COMMIT_LOCK:
            seq = 1 + max((s.seq for s in self.list_snapshots()), default=0)
            info = dataclasses.replace(info, seq=seq)
            self.storage.write(fmt.snapshot_name(info.id), info.to_bytes(), durable=True, exclusive=True)
        return info

    def delete_snapshot(self, info: SnapshotInfo) -> None:
        """Remove the document first (the snapshot is gone), then its manifest. Chunks go at GC."""
        self.storage.delete(fmt.snapshot_name(info.id))
        self.storage.delete(fmt.manifest_name(info.id))

    # --- garbage collection -------------------------------------------------------

    def gc(self, *, repack_threshold: float = 0.25, dry_run: bool = False) -> GcReport:
        """Delete chunks no snapshot references. Caller holds the exclusive lock.

        Crash-safe at every step: new packs and a complete new index are written
        and synced before any old index file or pack is deleted.
        """
        report = GcReport()
        snaps = self.list_snapshots()
        referenced: set[bytes] = set()
        for s in snaps:
            referenced |= self.load_manifest(s).chunk_ids()
        live_manifests = {fmt.manifest_name(s.id) for s in snaps}
        for obj in self.storage.list(fmt.MANIFESTS_DIR):
            if obj.name not in live_manifests:
                report.removed_snapshots_orphans += 1
                if not dry_run:
                    self.storage.delete(obj.name)

        self.reload_index()
        index = self.index
        old_index_files = [o.name for o in self.storage.list(fmt.INDEX_DIR)]
        pack_sizes = {o.name: o.size for o in self.storage.list(fmt.PACKS_DIR)}
        by_pack: dict[str, list[tuple[bytes, ChunkLocation]]] = defaultdict(list)
        for cid, loc in index.items():
            by_pack[loc.pack_id].append((cid, loc))

        keep: list[tuple[bytes, ChunkLocation]] = []
        to_delete: list[str] = []
        to_repack: list[tuple[bytes, ChunkLocation]] = []
        for pack_id, rows in by_pack.items():
            live = [r for r in rows if r[0] in referenced]
            report.live_chunks += len(live)
            report.dead_chunks += len(rows) - len(live)
            name = fmt.pack_name(pack_id)
            if not live:
                to_delete.append(name)
                continue
            dead_bytes = sum(loc.stored_length for cid, loc in rows if cid not in referenced)
            total = sum(loc.stored_length for _, loc in rows) or 1
            if dead_bytes / total > repack_threshold:
                to_repack.extend(live)
                to_delete.append(name)
                report.repacked_packs += 1
            else:
                keep.extend(live)
                report.kept_packs += 1
        indexed_packs = {fmt.pack_name(p) for p in by_pack}
        orphans = [n for n in pack_sizes if n not in indexed_packs]
        report.deleted_packs = len(to_delete) - report.repacked_packs + len(orphans)
        report.freed_bytes = sum(pack_sizes.get(n, 0) for n in to_delete + orphans)
        if dry_run or (not to_delete and not orphans and report.removed_snapshots_orphans == 0
                       and len(old_index_files) <= 1):
            return report

        fresh = ChunkIndex()
        for cid, loc in keep:
            fresh.add(cid, loc)
        writer = ChunkWriter(self, index=fresh)
        for cid, loc in to_repack:
            stored = self.storage.read_range(fmt.pack_name(loc.pack_id), loc.offset, loc.stored_length)
            chunks.decode(loc.encoding, stored, loc.raw_length, cid)  # never copy a damaged chunk
            writer.add_stored(cid, loc.encoding, stored, loc.raw_length)
        all_rows = list(fresh.items()) + writer.seal()
        new_index = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
        self.storage.write(new_index, index_bytes(all_rows), durable=True)
        for name in old_index_files:
            self.storage.delete(name)
        for name in to_delete + orphans:
            self.storage.delete(name)
        self.reload_index()
        return report

    # --- verification ---------------------------------------------------------------

    def verify(self, *, on_progress: Callable[[int], None] | None = None,
               require_chunks: bool = True) -> VerifyReport:
        """Re-read every pack, re-hash every chunk, check every manifest against the index.

        ``require_chunks=False`` is for metadata-only (dataless) copies, whose manifests
        name chunks that are deliberately absent.
        """
        report = VerifyReport()
        self.reload_index()
        index = self.index
        pack_objs = self.storage.list(fmt.PACKS_DIR)
        present = {o.name: o.size for o in pack_objs}
        bad: dict[bytes, str] = {}
        listed: set[bytes] = set()
        for pack_id in sorted(index.pack_ids()):
            name = fmt.pack_name(pack_id)
            report.packs += 1
            if name not in present:
                report.problems.append(f"pack {pack_id} is missing")
                continue
            try:
                entries = read_pack_entries(self.storage, pack_id, present[name])
            except IntegrityError as e:
                report.problems.append(str(e))
                entries = []
            listed.update(e.chunk_id for e in entries)
            bad.update(self._verify_pack(pack_id, entries))
            report.chunks += len(entries)
            if on_progress:
                on_progress(present[name])
        # Chunks the index places in a pack that is missing, damaged or does not list them.
        for cid, loc in index.items():
            if cid not in listed and cid not in bad:
                bad[cid] = f"chunk {cid.hex()[:16]} not found in pack {loc.pack_id}"
        report.damaged_chunks = {cid.hex(): reason for cid, reason in bad.items()}
        for info in self.list_snapshots():
            report.snapshots += 1
            try:
                manifest = self.load_manifest(info)
            except IntegrityError as e:
                report.problems.append(str(e))
                continue
            if require_chunks:
                report.damaged_files.extend(
                    {"snapshot": info.id, "path": path, "reason": reason}
                    for path, reason in damaged_paths(manifest, index, bad))
        return report

    def _verify_pack(self, pack_id: str, entries: list[PackEntry]) -> dict[bytes, str]:
        bad: dict[bytes, str] = {}
        name = fmt.pack_name(pack_id)
        # Read the pack in large sequential pieces rather than chunk by chunk.
        window = b""
        window_start = 0
        for e in entries:
            if e.offset + e.stored_length > window_start + len(window):
                window_start = e.offset
                window = self.storage.read_range(name, e.offset, max(e.stored_length, 16 * 1024 * 1024))
            start = e.offset - window_start
            stored = window[start:start + e.stored_length]
            try:
                if len(stored) != e.stored_length:
                    raise IntegrityError(f"chunk {e.chunk_id.hex()[:16]} is truncated")
                chunks.decode(e.encoding, stored, e.raw_length, e.chunk_id)
            except IntegrityError as err:
                bad[e.chunk_id] = f"{err} (pack {pack_id})"
        return bad


def damaged_paths(manifest: Manifest, index: ChunkIndex,
                  bad: dict[bytes, str]) -> Iterable[tuple[str, str]]:
    """(path, reason) for every file of ``manifest`` that needs a damaged or missing chunk."""
    for entry in manifest.entries():
        for cid in entry.chunks:
            if cid in bad:
                yield entry.path, bad[cid]
                break
            if cid not in index:
                yield entry.path, f"chunk {cid.hex()[:16]} is missing from the repository"
                break

