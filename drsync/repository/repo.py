"""The repository: chunks in packs, one manifest per snapshot, an index.

Write order is what makes crashes harmless (docs/FORMAT.md, "Crash safety"):
packs, then the index that names them, then the manifest, then the snapshot
document. A snapshot exists exactly when its document does; anything written
before a crash and never referenced is removed by garbage collection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import documents, faults
from drsync.errors import ChunkDamaged, ChunksLost, IntegrityError, NotFound, OperationFailed, UsageError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_at, id_key, id_list, ids_array, locate, sort_unique, unique_sorted
from drsync.repository.lock import DEFAULT_WAIT_S, RepositoryLock
from drsync.repository.manifest import Manifest, ManifestFile, column_groups
from drsync.repository.manifest_check import validate
from drsync.repository.packs import (
    ChunkIndex,
    ChunkLocation,
    IndexRows,
    PackTable,
    PackWriter,
    index_file_packs,
    iter_index_file,
    read_pack_table,
    write_index,
)
from drsync.repository.snapshots import AmbiguousRef, SnapshotInfo, iso, pick_by_ref
from drsync.repository.spool import Spool
from drsync.storage import (
    ObjectExists,
    ObjectMissing,
    RangeReader,
    ReadOnlyStorage,
    Storage,
    StoredObject,
    read_bounded,
)
from drsync.units import parse_iso

log = logging.getLogger("drsync.repository")

# Chunk ids located at a time by check_chunks_present.
_CHECK_SLICE = 65536
# A manifest larger than this is hashed and decoded by ranges instead of read whole (bytes).
RANGED_MANIFEST_BYTES = 16 << 20

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

    Every writer writes under a repository lock, so that garbage collection never sweeps
    while its packs exist but are not indexed yet. Give it the held lock of the operation
    (``lock``, shared or exclusive: :meth:`WriteSession.chunk_writer` does); without one it
    takes a shared lock of its own before its first chunk (waiting up to the default lock
    wait) and drops it when :meth:`flush` or :meth:`abort` ends the session.

    Thread-safe: capture workers call :meth:`add` concurrently.

    ``export``: the caller adds each chunk once into a repository that holds none of them (a backup
    being built): the repository's index is never loaded or asked, and each :meth:`flush` keeps
    nothing of the rows it wrote (its index file holds them), so flushing every so often bounds the
    writer's memory however many chunks it writes.
    """

    def __init__(self, repo: Repository, *, lock: RepositoryLock | None = None, index: ChunkIndex | None = None,
                 pack_target: int = fmt.PACK_TARGET_SIZE, export: bool = False) -> None:
        if lock is not None and (not lock.held or lock.storage.url != repo.storage.url):
            raise UsageError(f"a chunk writer for {repo.storage.url} needs a lock held on that repository; "
                             f"use Repository.write_session()")
        self.repo = repo
        # The repository's index loads lazily: a capture where nothing changed never needs it.
        self._given_index = index
        self._given_lock = lock
        self._own_lock: RepositoryLock | None = None
        self._pack_target = pack_target
        self._export = export
        self._lock = threading.Lock()
        self._pack: PackWriter | None = None
        # The index rows of the chunks added since the last seal (columns, not an object per chunk).
        self._new = ChunkIndex()
        # Finished packs are synced by a background thread while capture goes on, so the
        # disk writes back as we go instead of in one burst at the end.
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future[None]] = []
        self.new_bytes = 0
        self.new_stored_bytes = 0
        # Told of each chunk this writer stores, once it is in its pack (not yet durable): (id, encoding,
        # stored bytes, raw length). Called on the adding thread, outside the writer's lock: it must not
        # block, and must copy a view it keeps (the caller may reuse its buffer): drsync.agent.early.
        self.tee: Callable[[bytes, int, bytes | memoryview, int], None] | None = None
        # Set when a pack could not be written: the chunks indexed into it are not where the index says.
        # Nothing more is added (every later add raises this); a flush indexes the packs written whole
        # before it (an upload keeps what arrived), then raises it.
        self._broken: OperationFailed | None = None
        self._broken_packs: set[str] = set()

    @property
    def _index(self) -> ChunkIndex:
        return self.repo.index if self._given_index is None else self._given_index

    def _ensure_locked(self) -> None:
        """Under ``self._lock``: the session's lock is held before anything is written or checked."""
        if self._given_lock is not None:
            if not self._given_lock.held:
                raise UsageError(f"the lock this chunk writer of {self.repo.storage.url} was given has been "
                                 f"released; start a new Repository.write_session()")
            return
        if self._own_lock is None:
            self._own_lock = self.repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S).acquire()

    def _release_own_lock(self) -> None:
        own, self._own_lock = self._own_lock, None
        if own is not None:
            own.release()

    def has(self, chunk_id: bytes) -> bool:
        return chunk_id in self._index or chunk_id in self._new

    def add(self, chunk_id: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk unless the repository has it; True when it was new."""
        # Cheap pre-check once the session's lock is held (before it, the index may be stale);
        # add_stored decides under the lock.
        if (self._own_lock is not None or self._given_lock is not None) and self.has(chunk_id):
            return False
        enc, stored = chunks.encode(data)
        return self.add_stored(chunk_id, enc, stored, len(data))

    def add_stored(self, chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> bool:
        """Store an already-encoded chunk (copying between repositories, or received over the wire).

        True when it was new; False when the repository (or this session) has it already.
        Raises LockedError when the writer has to take its own lock and cannot.
        """
        with self._lock:
            self._check_whole()
            self._ensure_locked()
            if chunk_id in self._new or (not self._export and chunk_id in self._index):
                return False
            if self._pack is None:
                self._pack = PackWriter(self.repo.storage)
            try:
                entry = self._pack.add(chunk_id, encoding, stored, raw_length)
            except OSError as e:
                raise self._break(e) from None
            self._new.add(chunk_id, ChunkLocation(self._pack.pack_id, entry.offset, entry.stored_length,
                                                  entry.raw_length, entry.encoding), unindexed=True)
            self.new_bytes += raw_length
            self.new_stored_bytes += len(stored)
            if self._pack.size >= self._pack_target or self._pack.count >= fmt.PACK_MAX_CHUNKS:
                self._finish_pack()
        tee = self.tee
        if tee is not None:
            tee(chunk_id, encoding, stored, raw_length)
        return True

    def _check_whole(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _break(self, e: OSError) -> OperationFailed:
        """Under ``self._lock``: the open pack could not be written (a full disk, an I/O error). Its chunks
        are indexed at offsets its file does not hold: it is dropped, and the writer takes nothing more.
        Returns the error (OperationFailed, never an OSError: a capture must not take it for one file's)."""
        pack, self._pack = self._pack, None
        if pack is not None:
            self._broken_packs.add(pack.pack_id)
            with contextlib.suppress(OSError):
                pack.abort()
        self._broken = OperationFailed(
            f"repository {self.repo.storage.url}: a pack could not be written ({e.strerror or e}); nothing of "
            f"this write is committed (free space or fix the disk, then run it again)")
        return self._broken

    def _finish_pack(self) -> None:
        assert self._pack is not None
        try:
            self._pack.finish(durable=False)
        except OSError as e:
            raise self._break(e) from None
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

    def seal(self) -> IndexRows:
        """Close the open pack and make all packs of the session durable.

        Returns the new index rows (columns); the caller writes them into an index file (still under
        the session's lock: :meth:`flush` does both).
        """
        runs = self._seal_runs()
        self._check_whole()
        return IndexRows.concat(runs)

    def _seal_runs(self) -> list[IndexRows]:
        """:meth:`seal`, the rows as the session's index holds them (a few sorted runs: no merged copy)."""
        with self._lock:
            if self._pack is not None:
                self._finish_pack()
            self._wait_syncs()
            runs = self._new.runs()
            self._new = ChunkIndex()
            if self._broken_packs:  # rows into a pack that was not written whole are never indexed
                runs = [r.take(~np.isin(np.asarray(r.packs, dtype=object)[r.pack], list(self._broken_packs)))
                        if len(r) else r for r in runs]
            return runs

    def flush(self) -> None:
        """Make every chunk added so far durable and visible in the index; drops the writer's own lock.
        Raises OperationFailed after a pack could not be written (the chunks in packs written whole are
        indexed first)."""
        try:
            runs = [r for r in self._seal_runs() if len(r)]
            if not runs:
                self._check_whole()
                return
            name = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
            write_index(self.repo.storage, name, runs)
            if self._export:
                pass
            elif self._given_index is None:
                self.repo._note_index_file(name, runs)
            else:
                for rows in runs:
                    self._given_index.add_rows(rows)
            self._check_whole()
        finally:
            with self._lock:
                if self._pack is None and not len(self._new):
                    self._release_own_lock()

    def abort(self) -> None:
        """Abandon what was not flushed (its packs are garbage for the next GC); drops the own lock."""
        with self._lock:
            try:
                if self._pack is not None:
                    self._pack.abort()
                    self._pack = None
                try:
                    self._wait_syncs()
                except Exception:  # the session is being abandoned; its packs are garbage anyway
                    pass
            finally:
                self._new = ChunkIndex()
                self._release_own_lock()


class WriteSession:
    """A shared repository lock held for one write: chunks, their index, then a snapshot.

    While it is open no garbage collection can sweep (the sweep takes the exclusive lock), so
    chunks written in the session stay until the snapshot naming them is committed, and the
    session's index (refreshed when the lock was taken) stays true. Open it with
    :meth:`Repository.write_session`; close it (``with``, or :meth:`close`) when the shipment
    or capture is over. Raises LockedError from :meth:`Repository.write_session` when an
    exclusive lock (a GC sweep, a delete) is held beyond ``wait_s``.
    """

    def __init__(self, repo: Repository, lock: RepositoryLock) -> None:
        self.repo = repo
        self.lock = lock

    def chunk_writer(self, *, pack_target: int = fmt.PACK_TARGET_SIZE) -> ChunkWriter:
        """A writer under this session's lock; call its ``flush()`` before :meth:`commit`."""
        return ChunkWriter(self.repo, lock=self.lock, pack_target=pack_target)

    def missing_chunks(self, ids: Iterable[bytes]) -> list[bytes]:
        """The ids (in the given order) the repository does not hold: what a sender must still send."""
        self._check_open()
        return self.repo.missing_chunks(ids)

    def commit(self, info: SnapshotInfo, manifest_bytes: bytes | Spool, *, manifest: Manifest | None = None,
               require_chunks: bool = True) -> SnapshotInfo:
        """Store the snapshot (see :meth:`Repository.commit_snapshot`); by default first checks that
        every chunk the manifest names is indexed and its pack exists (IntegrityError otherwise,
        nothing written). ``manifest`` is ``manifest_bytes`` already parsed, to save parsing twice."""
        self._check_open()
        return self.repo.commit_snapshot(info, manifest_bytes, manifest=manifest, require_chunks=require_chunks,
                                         lock=self.lock)

    def _check_open(self) -> None:
        if not self.lock.held:
            raise UsageError(f"the write session on {self.repo.storage.url} is closed; open a new one")

    def close(self) -> None:
        if self.lock.held:
            self.lock.release()

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    # pack id -> the ids of the chunks found damaged in it, or that it lacks (for drsync.repository.repair)
    damaged_at: dict[str, set[bytes]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.damaged_chunks or self.damaged_files or self.problems)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "packs": self.packs, "chunks": self.chunks, "snapshots": self.snapshots,
                "damaged_chunks": self.damaged_chunks, "damaged_files": self.damaged_files,
                "problems": self.problems}


class Repository:
    """One repository on a storage. Thread-safe; one object may serve a whole agent.

    The chunk index is loaded once and cached. The cache is trusted only while this object
    holds a shared lock (no garbage collection can sweep meanwhile; it was re-validated when
    the lock was taken); otherwise every question re-validates it first with one listing of
    ``index/``: new index files are loaded, and if a file it had loaded is gone (another
    process's GC replaced the index) the whole index is reloaded.
    """

    def __init__(self, storage: Storage, config: RepoConfig) -> None:
        self.storage = storage
        self.config = config
        self._index: ChunkIndex | None = None
        self._index_files: set[str] = set()
        self._index_lock = threading.Lock()
        self._held = threading.Lock()
        self._shared_held = 0
        self._shared_by_thread: dict[int, int] = {}  # thread ident -> shared locks it took
        self._lock_threads: dict[int, int] = {}  # id(lock) -> the thread that took it

    # --- opening -------------------------------------------------------------

    @classmethod
    def init(cls, storage: Storage, *, cluster_id: str, release: str) -> Repository:
        """Create a repository on ``storage``: UsageError when one is there, also one that lost its
        ``config.json`` (its snapshots, index or protect window are still there: a new identity over them
        would drop its protection), or when another init creates one at the same moment."""
        already = f"{storage.url} is already a drsync repository"
        if storage.exists(fmt.CONFIG_NAME):
            raise UsageError(already)
        left = next((d for d in (fmt.SNAPSHOTS_DIR, fmt.INDEX_DIR, fmt.MANIFESTS_DIR) if storage.list(d)), None)
        if left is not None or storage.exists(fmt.PROTECT_NAME):
            if storage.exists(fmt.CONFIG_NAME):  # made meanwhile by an init racing this one (config.json first)
                raise UsageError(already)
            raise UsageError(f"{storage.url} holds a drsync repository's data ({left or fmt.PROTECT_NAME}) but no "
                             f"{fmt.CONFIG_NAME}: it is a damaged repository, not an empty place; restore "
                             f"{fmt.CONFIG_NAME} from a copy, or create the repository somewhere else")
        config = RepoConfig(id=secrets.token_hex(16), cluster_id=cluster_id, release=release,
                            created_at=time.time())
        try:
            storage.write(fmt.CONFIG_NAME, config.to_bytes(), durable=True, exclusive=True)
        except ObjectExists:  # another init won the race
            raise UsageError(already) from None
        return cls(storage, config)

    @classmethod
    def open(cls, storage: Storage) -> Repository:
        try:
            raw = read_bounded(storage, fmt.CONFIG_NAME, fmt.SMALL_DOC_MAX_BYTES, f"{storage.url}/{fmt.CONFIG_NAME}")
        except ObjectMissing:
            raise NotFound(f"no drsync repository at {storage.url}; create one with "
                           f"'drsync init' (or check the path)") from None
        try:
            doc = documents.loads(raw)
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
        config = RepoConfig(id=doc["id"], cluster_id=doc["cluster_id"], release=doc["release"],
                            created_at=parse_iso(doc["created_at"]), version=version)
        if storage.exists(fmt.BACKUP_META):  # a backup directory: read, verified and restored, never changed
            storage = ReadOnlyStorage(storage, f"{storage.url} is a backup (it holds {fmt.BACKUP_META}), which "
                                               f"drsync keeps exactly as written (checked against its checksum "
                                               f"file): nothing was changed; restore it with 'drsync backup "
                                               f"restore', and take snapshots or collect garbage in a repository")
        return cls(storage, config)

    @property
    def read_only(self) -> str | None:
        """Why this repository is never written (a backup directory), or None."""
        return self.storage.refusal if isinstance(self.storage, ReadOnlyStorage) else None

    def refuse_if_read_only(self) -> None:
        """UsageError before a write starts (the storage refuses each write as well)."""
        if self.read_only:
            raise UsageError(self.read_only)

    def lock(self, *, exclusive: bool, wait_s: float = 0.0) -> RepositoryLock:
        """A repository lock (not yet taken: ``with repo.lock(...)`` or ``.acquire()``).

        Shared for whatever writes chunks or snapshots or reads them; exclusive only for
        deleting snapshots and GC's sweep. ``wait_s``: seconds to wait for a conflicting lock
        (0 = give up at once) before LockedError. Taking a shared lock re-validates the cached
        index. Writers should prefer :meth:`write_session`.
        """
        return RepositoryLock(self.storage, exclusive=exclusive, wait_s=wait_s,
                              on_acquire=self._on_lock, on_release=self._on_unlock)

    def _on_lock(self, lock: RepositoryLock) -> None:
        if lock.exclusive:
            return
        with self._index_lock:
            if self._index is not None:
                self._refresh_index_locked()
        me = threading.get_ident()
        with self._held:
            self._shared_held += 1
            self._shared_by_thread[me] = self._shared_by_thread.get(me, 0) + 1
            self._lock_threads[id(lock)] = me

    def _on_unlock(self, lock: RepositoryLock) -> None:
        if not lock.exclusive:
            with self._held:
                self._shared_held -= 1
                owner = self._lock_threads.pop(id(lock), None)
                if owner is not None:
                    left = self._shared_by_thread.get(owner, 0) - 1
                    if left > 0:
                        self._shared_by_thread[owner] = left
                    else:
                        self._shared_by_thread.pop(owner, None)

    def _thread_holds_shared(self) -> bool:
        with self._held:
            return self._shared_by_thread.get(threading.get_ident(), 0) > 0

    def write_session(self, *, wait_s: float = DEFAULT_WAIT_S) -> WriteSession:
        """Take a shared lock for a write (an upload, a capture) and everything up to its commit.

        ``with repo.write_session() as s: w = s.chunk_writer(); ...; w.flush(); s.commit(info, mb)``.
        Raises LockedError (one line, naming the holder) after ``wait_s`` seconds of an exclusive
        lock (0 = at once).
        """
        self.refuse_if_read_only()
        return WriteSession(self, self.lock(exclusive=False, wait_s=wait_s).acquire())

    # --- chunks ----------------------------------------------------------------

    @property
    def index(self) -> ChunkIndex:
        """The chunk index, valid now (see the class docstring). Do not keep it beyond a lock."""
        with self._index_lock:
            if self._index is None:
                self._load_index_locked()
            elif self._shared_held == 0:
                self._refresh_index_locked()
            assert self._index is not None
            return self._index

    def _load_index_locked(self) -> None:
        index = ChunkIndex()
        loaded: set[str] = set()
        for obj in self.storage.list(fmt.INDEX_DIR):
            try:
                index.load_file(self._index_source(obj), obj.name)
            except ObjectMissing:
                continue  # replaced by a GC while we listed; its rows are in the new file
            loaded.add(obj.name)
        self._index, self._index_files = index, loaded

    def _index_source(self, obj: StoredObject) -> bytes | pa.NativeFile:
        """An index file's bytes, or past :data:`RANGED_MANIFEST_BYTES` a file read by ranges (a
        1,000,000-chunk index file is about 40 MiB that a load need not hold)."""
        if obj.size <= RANGED_MANIFEST_BYTES:
            return self.storage.read(obj.name)
        return pa.PythonFile(RangeReader(self.storage, obj.name, obj.size), mode="r")

    def _refresh_index_locked(self) -> None:
        names = {o.name for o in self.storage.list(fmt.INDEX_DIR)}
        if not self._index_files <= names:
            self._load_index_locked()  # a GC replaced index files: what we had may name deleted packs
            return
        assert self._index is not None
        for name in sorted(names - self._index_files):
            try:
                self._index.load_file(self.storage.read(name), name)
            except ObjectMissing:
                self._load_index_locked()
                return
            self._index_files.add(name)

    def refresh_index(self) -> None:
        """Re-validate the cached index now (one listing; reload if a GC replaced it)."""
        with self._index_lock:
            if self._index is not None:
                self._refresh_index_locked()

    def _note_index_file(self, name: str, runs: list[IndexRows]) -> None:
        """A writer of this object wrote ``name`` holding ``runs``: add them without reading it back."""
        with self._index_lock:
            if self._index is None:
                return  # loaded with everything else when first needed
            for rows in runs:
                self._index.add_rows(rows)
            self._index_files.add(name)

    def reload_index(self) -> None:
        """Forget the cached index; the next question loads it again."""
        with self._index_lock:
            self._index = None
            self._index_files = set()

    def chunk_writer(self, *, lock: RepositoryLock | None = None, export: bool = False) -> ChunkWriter:
        """A chunk writer under ``lock`` (held), or taking its own shared lock (see :class:`ChunkWriter`,
        also for ``export``)."""
        return ChunkWriter(self, lock=lock, export=export)

    def has_chunk(self, chunk_id: bytes) -> bool:
        """Whether the repository holds the chunk (without a held shared lock: one listing per call;
        ask :meth:`missing_chunks` for many)."""
        return chunk_id in self.index

    def missing_chunks(self, ids: Iterable[bytes]) -> list[bytes]:
        """The ids, in the given order, that the repository does not hold (one validation, one batch
        search for all; an id that is not 32 bytes is never held)."""
        ids = ids if isinstance(ids, list) else list(ids)
        if not ids:
            return []
        well_formed = [len(c) == fmt.ID_LEN for c in ids]
        if all(well_formed):
            held = self.index.contains_many(ids)
            return [ids[i] for i in np.flatnonzero(~held)]
        return [c for c, ok in zip(ids, well_formed, strict=True) if not ok or c not in self.index]

    def all_indexed(self, wanted: IdSet) -> bool:
        """Whether every id of ``wanted`` is indexed (see :meth:`reader_for`)."""
        return self.reader_for(wanted) is not None

    def reader_for(self, wanted: IdSet) -> Repository | ChunkReader | None:
        """Something to read ``wanted``'s chunks from when every one of them is indexed, else None (the
        caller then asks :meth:`missing_chunks`, which loads and refreshes the index and is exact; None also
        when an index file could not be read).

        With the index loaded, this repository. Otherwise the index is not loaded: each index file is read
        by ranges, checked as a load checks it, and only the rows of ``wanted`` are kept, a batch at a time
        (a restore of a 1 % change locates its few chunks without the whole index, about 60 MiB at
        1,000,000 chunks and twice that while it loads)."""
        if not len(wanted):
            return self
        with self._index_lock:
            loaded = self._index is not None
        if loaded:
            return self if bool(self.index.contains_many(wanted.ids).all()) else None
        try:
            seen, at = self._locate_unloaded(wanted)
        except (ObjectMissing, IntegrityError):
            return None  # a GC replaced a file while we listed, or one is damaged: the exact path says
        if not bool(seen.all()):
            return None
        return ChunkReader(self, ChunkIndex.from_sorted(wanted.ids, wanted.key, at))

    def _locate_unloaded(self, wanted: IdSet) -> tuple[np.ndarray, IndexRows]:
        """Where ``wanted``'s ids are, from the index files without loading the index: ``(seen, rows)``,
        ``seen`` (N,) bool and ``rows`` (N,) row i the location of ``wanted.ids[i]`` where ``seen[i]``.

        Each index file is read by ranges and checked as a load checks it (IntegrityError when one is
        damaged; ObjectMissing when a GC replaced one while we listed); only the rows of ``wanted`` are
        kept, a batch at a time, filled in place (21 bytes a chunk beside the set's 40): no merge, no
        second copy of the ids. The first location found for an id is kept."""
        n = len(wanted)
        seen = np.zeros(n, bool)
        at = IndexRows(wanted.ids, np.zeros(n, np.uint32), np.zeros(n, np.uint64), np.zeros(n, np.uint32),
                       np.zeros(n, np.uint32), np.zeros(n, np.uint8), ())
        packs: dict[str, int] = {}
        for rows, hit, to in self._first_rows_of(wanted, seen):
            numbers = np.array([packs.setdefault(p, len(packs)) for p in rows.packs], np.uint32)
            at.pack[to] = numbers[rows.pack[hit]]
            at.offset[to], at.stored_length[to] = rows.offset[hit], rows.stored_length[hit]
            at.raw_length[to], at.encoding[to] = rows.raw_length[hit], rows.encoding[hit]
        return seen, dataclasses.replace(at, packs=tuple(packs))

    def _packs_holding_unloaded(self, wanted: IdSet) -> tuple[np.ndarray, tuple[str, ...]]:
        """Which of ``wanted``'s ids the index files hold, and the packs holding them: ``(seen, packs)``,
        ``seen`` (N,) bool. As :meth:`_locate_unloaded` without the locations: 1 byte an id beside the set
        (not 22), which at 1,000,000 chunks kept a standby's commit check under its memory target."""
        seen = np.zeros(len(wanted), bool)
        packs: dict[str, None] = {}
        for rows, hit, _ in self._first_rows_of(wanted, seen):
            packs.update(dict.fromkeys(rows.packs[k] for k in np.unique(rows.pack[hit]).tolist()))
        return seen, tuple(packs)

    def _first_rows_of(self, wanted: IdSet, seen: np.ndarray) -> Iterator[tuple[IndexRows, np.ndarray, np.ndarray]]:
        """The index files' rows, a batch at a time, read by ranges and checked (IntegrityError when one is
        damaged; ObjectMissing when a GC replaced one while we listed): for each batch holding ids of
        ``wanted`` not ``seen`` yet, ``(rows, hit, to)``: ``rows[hit]`` are their first rows and ``to`` their
        positions in ``wanted``, already marked in ``seen`` (a (N,) bool array, updated in place)."""
        for obj in self.storage.list(fmt.INDEX_DIR):
            source = pa.PythonFile(RangeReader(self.storage, obj.name, obj.size), mode="r")
            for rows in iter_index_file(source, obj.name):
                pos, found = locate(wanted.ids, wanted.key, rows.ids)
                hit = np.flatnonzero(found)
                hit = hit[~seen[pos[hit]]]
                if not len(hit):
                    continue
                hit = hit[np.unique(pos[hit], return_index=True)[1]]  # repeated in the batch: its first row
                to = pos[hit]
                seen[to] = True
                yield rows, hit, to

    def located(self, wanted: IdSet, batch: int = 65_536) -> Iterator[IndexRows]:
        """Where ``wanted``'s chunks are, a batch of rows at a time, each id once, each batch in pack and offset
        order (reading them walks each pack forward): what an upload reads, without the index.

        Not loaded, the index files are read by ranges and only the rows of ``wanted`` are yielded as they
        are found: 41 bytes an id (the set and a flag), never the index (61 bytes a chunk of the repository)
        beside them. Loaded, from the index, ``batch`` ids at a time. IntegrityError for an id that no
        index file holds (after the others were yielded) or a damaged index file."""
        seen = np.zeros(len(wanted), bool)
        with self._index_lock:
            loaded = self._index is not None
        if not loaded:
            try:
                for rows, hit, _ in self._first_rows_of(wanted, seen):
                    part = rows.take(hit)
                    yield part.take(np.lexsort((part.offset, part.pack)))
            except ObjectMissing:
                pass  # a GC replaced an index file while we listed: the rest from the loaded index, exact
            else:
                if not seen.all():  # every index file was read: loading them all would find no more
                    cid = id_at(wanted.ids, int(np.flatnonzero(~seen)[0]))
                    raise IntegrityError(f"chunk {cid.hex()[:16]} is not in the repository")
                return
        rest = np.flatnonzero(~seen)
        absent: bytes | None = None
        for lo in range(0, len(rest), batch):
            ids = wanted.ids[rest[lo:lo + batch]]
            found, rows = self.index.locate_many(ids)
            if not found.all():  # rows holds the found ones: they are yielded, the absent named after all
                absent = absent or id_at(ids, int(np.flatnonzero(~found)[0]))
            yield rows.take(np.lexsort((rows.offset, rows.pack)))
        if absent is not None:
            raise IntegrityError(f"chunk {absent.hex()[:16]} is not in the repository")

    def check_chunks_present(self, chunk_ids: np.ndarray | pa.Array | pa.ChunkedArray | Iterable[bytes],
                             what: str) -> None:
        """IntegrityError unless every chunk is indexed and its pack exists (one listing of ``packs/``).

        ``chunk_ids``: any form :func:`drsync.repository.ids.ids_array` takes, repeats allowed (at scale,
        :meth:`Manifest.chunk_id_column`: no copy). ``what`` names the thing needing them in the message
        (e.g. ``"snapshot 1a2b"``).
        """
        pieces = (chunk_ids.chunks if isinstance(chunk_ids, pa.ChunkedArray) else
                  [chunk_ids if isinstance(chunk_ids, np.ndarray | pa.Array) else ids_array(chunk_ids)])
        if not any(len(p) for p in pieces):
            return
        with self._index_lock:
            loaded = self._index is not None
        if loaded:
            missing, numbers, names = self._check_loaded(pieces)
        else:
            # Not loaded (a standby lets it go after each commit): located from the index files, only these
            # ids kept (61 bytes an id), never the whole index and its merges.
            # A part of CHECK_PART_IDS ids at a time (the index files read once a part): at 1,000,000 chunks
            # the whole set, sorted from the manifest's column, peaked a standby's commit at 315 MiB.
            arrays = [ids_array(p) for p in pieces]
            del chunk_ids, pieces
            missing, held = [], {}
            for part in _id_parts(arrays, CHECK_PART_IDS):
                wanted = IdSet.of_pieces(part)
                del part
                try:
                    seen, packs = self._packs_holding_unloaded(wanted)
                except ObjectMissing:  # a GC replaced an index file while we listed: the loaded index is exact
                    gone, numbers, names = self._check_loaded([wanted.ids])
                    missing += gone
                    held.update(dict.fromkeys(names[n] for n in numbers))
                    continue
                if not seen.all():
                    missing.append(wanted.ids[~seen])
                held.update(dict.fromkeys(packs))
            numbers, names = set(range(len(held))), tuple(held)
        if missing:
            gone_ids = unique_sorted(np.concatenate(missing))
            raise ChunksLost(
                f"{what} names {len(gone_ids)} chunk(s) this repository does not hold (first "
                f"{id_at(gone_ids, 0).hex()[:16]}); nothing was committed: the sender must send them again")
        packs = {fmt.pack_name(names[n]) for n in numbers}
        if packs:
            present = {o.name for o in self.storage.list(fmt.PACKS_DIR)}
            gone = packs - present
            if gone:
                raise ChunksLost(
                    f"{what} names chunks in pack(s) that are gone ({len(gone)}, first {sorted(gone)[0]}); "
                    f"nothing was committed (a standby forgets them and the sender sends them again; "
                    f"elsewhere run 'drsync repo repair' on {self.storage.url})")

    def lost_packs(self) -> set[str]:
        """Packs the index names that ``packs/`` does not hold (damage: a pack deleted by hand or lost with
        a disk), from the index files' pack columns alone (a few MiB read at 1,000,000 chunks, no index
        loaded) and one listing. IntegrityError if an index file is damaged. Exact under a held lock (no
        GC sweeps in between)."""
        for _ in range(3):
            named: set[str] = set()
            try:
                for obj in self.storage.list(fmt.INDEX_DIR):
                    named |= index_file_packs(pa.PythonFile(RangeReader(self.storage, obj.name, obj.size),
                                                            mode="r"), obj.name)
                break
            except ObjectMissing:
                continue  # a GC replaced an index file while we listed (a caller without a lock): list again
        else:
            raise IntegrityError(f"the index files of {self.storage.url} keep changing while they are read; "
                                 f"run 'drsync repo verify'")
        if not named:
            return set()
        present = {o.name for o in self.storage.list(fmt.PACKS_DIR)}
        return {p for p in named if fmt.pack_name(p) not in present}

    def _check_loaded(self, pieces: list[np.ndarray | pa.Array]
                      ) -> tuple[list[np.ndarray], set[int], tuple[str, ...]]:
        """:meth:`check_chunks_present` with the loaded index: (ids missing, pack numbers named, pack ids).
        Located a slice at a time, keeping only the packs named and the ids missing: at 1,000,000 chunks
        the whole located table (53 bytes a chunk) is never made, nor (from an Arrow column) a copy of the ids."""
        index = self.index
        numbers: set[int] = set()
        names: tuple[str, ...] = ()
        missing: list[np.ndarray] = []
        for piece in pieces:
            ids = ids_array(piece)
            for lo in range(0, len(ids), _CHECK_SLICE):
                found, rows = index.locate_many(ids[lo:lo + _CHECK_SLICE])
                if not found.all():
                    missing.append(ids[lo:lo + _CHECK_SLICE][~found])
                numbers.update(np.unique(rows.pack).tolist())
                names = rows.packs
        return missing, numbers, names

    def read_stored(self, chunk_id: bytes) -> tuple[ChunkLocation, bytes]:
        return self.read_at(chunk_id, self.index.get(chunk_id))

    def read_at(self, chunk_id: bytes, loc: ChunkLocation | None) -> tuple[ChunkLocation, bytes]:
        """The chunk's stored bytes at ``loc`` (IntegrityError when it is None, or the pack is missing or short)."""
        if loc is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} is not in the repository")
        try:
            stored = self.storage.read_range(fmt.pack_name(loc.pack_id), loc.offset, loc.stored_length)
        except ObjectMissing:
            raise ChunkDamaged(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack_id} is missing", chunk_id,
                               loc.pack_id) from None
        if len(stored) != loc.stored_length:
            raise ChunkDamaged(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack_id} is truncated", chunk_id, loc.pack_id)
        return loc, stored

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's bytes, checked against its id (IntegrityError if not indexed, ChunkDamaged if damaged)."""
        loc, stored = self.read_stored(chunk_id)
        return decode_located(loc, stored, chunk_id)

    def read_chunks(self, chunk_ids: list[bytes]) -> list[bytes]:
        """:meth:`read_chunk` of each of ``chunk_ids``, in order, with fewer calls (:func:`read_located`)."""
        return read_located(self, self.index, chunk_ids)

    # --- snapshots ---------------------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first in the repository's own order (``SnapshotInfo.order_key``:
        sequence numbers, not capture times, which a wrong clock can put anywhere). Raises IntegrityError
        at the first damaged document (:meth:`_snapshots_and_damage` goes on past them)."""
        return self._snapshots_and_damage(stop_at_damage=True)[0]

    def _snapshots_and_damage(self, *, stop_at_damage: bool) -> tuple[list[SnapshotInfo], list[str]]:
        """The readable snapshots (sorted as :meth:`list_snapshots`) and one line per damaged document;
        ``stop_at_damage`` raises the first one's IntegrityError instead."""
        out: list[SnapshotInfo] = []
        damage: list[str] = []
        not_files = getattr(self.storage, "not_files", None)
        for name in not_files(fmt.SNAPSHOTS_DIR) if not_files is not None else []:
            if name.endswith(".json"):
                problem = (f"snapshot document {name} is a pipe, socket, device, directory or dangling link, not a "
                           f"file: the repository is damaged (the snapshot's chunks are kept); restore the "
                           f"document from a copy, or remove it to give the snapshot up")
                if stop_at_damage:
                    raise IntegrityError(problem)
                damage.append(problem)
        for obj in self.storage.list(fmt.SNAPSHOTS_DIR):
            try:
                info = self._snapshot_doc(obj)
            except IntegrityError as e:
                if stop_at_damage:
                    raise
                damage.append(str(e))
                continue
            if info is not None:
                out.append(info)
        out.sort(key=lambda s: s.order_key)
        return out, damage

    def _snapshot_doc(self, obj: StoredObject) -> SnapshotInfo | None:
        """The document ``obj`` names (None: not a document, or gone meanwhile). IntegrityError if damaged."""
        if not obj.name.endswith(".json"):
            return None
        if obj.size > fmt.SNAPSHOT_DOC_MAX_BYTES:  # never read a document no drsync writes
            raise IntegrityError(f"snapshot {obj.name} is {obj.size} bytes; a snapshot document is at most "
                                 f"{fmt.SNAPSHOT_DOC_MAX_BYTES} bytes (docs/FORMAT.md, Limits); remove or "
                                 f"restore it")
        try:
            return SnapshotInfo.from_bytes(read_bounded(self.storage, obj.name, fmt.SNAPSHOT_DOC_MAX_BYTES,
                                                        f"snapshot document {obj.name}"), f"snapshot {obj.name}")
        except ObjectMissing:
            return None

    def snapshot_stored_times(self) -> dict[str, float]:
        """When this repository stored each snapshot: snapshot id -> Unix seconds, the modification time
        of its document on this repository's storage (one listing; written once, never rewritten). It is
        this cluster's clock, never a time a peer wrote: what ``[snapshots] protect`` counts from."""
        suffix = ".json"
        return {o.name[len(fmt.SNAPSHOTS_DIR):-len(suffix)]: o.mtime for o in self.storage.list(fmt.SNAPSHOTS_DIR)
                if o.name.endswith(suffix)}

    def find_snapshot(self, ref: str) -> SnapshotInfo:
        """A snapshot by id, unique id prefix, name (newest of that name) or ``latest``.

        Newest means last in :meth:`list_snapshots` order (sequence numbers, not capture times).
        """
        snaps = self.list_snapshots()
        if not snaps:
            raise NotFound(f"repository {self.storage.url} has no snapshots yet")
        try:
            found = pick_by_ref(ref, snaps, id_of=lambda s: s.id, name_of=lambda s: s.name)
        except AmbiguousRef as e:
            raise UsageError(str(e)) from None
        if found is not None:
            return found
        raise NotFound(f"no snapshot {ref!r} in {self.storage.url}; 'drsync snapshot list' shows them")

    def load_manifest(self, info: SnapshotInfo, *, lean: bool = False) -> Manifest:
        """The snapshot's manifest as a table, checked against its hash (IntegrityError otherwise). One
        of more than :data:`RANGED_MANIFEST_BYTES` is hashed and then decoded by ranges, its bytes never
        held whole (at 1,000,000 files: 74 MiB less at the peak of every load). ``lean``: without the
        chunk lists and digests, which it reads from the checked bytes when asked (:meth:`Manifest.lean`:
        what an apply holds; 90 MiB instead of 161 at 1,000,000 files), validated as a file first
        (:func:`~drsync.repository.manifest_check.validate`; IntegrityError): an apply does not validate it again
        beside its table (at a million files, 95 MiB less at the apply's validation peak)."""
        if lean:
            source = self.open_manifest(info)
            validate(source, f"manifest of snapshot {info.id}")
            manifest = Manifest.lean(source)
            manifest.validated = True
            return manifest
        with self.manifest_spool(info) as spool:
            return Manifest.from_bytes(spool, f"manifest of snapshot {info.id}")

    def open_manifest(self, info: SnapshotInfo, *, in_place: bool = False) -> ManifestFile:
        """The snapshot's manifest, read one row group at a time (:class:`ManifestFile`): checked
        against the snapshot's hash like :meth:`load_manifest`, without building the whole table (and,
        past :data:`RANGED_MANIFEST_BYTES`, without holding its bytes). ``in_place``: see
        :meth:`manifest_spool`."""
        spool = self.manifest_spool(info, in_place=in_place)  # the reader keeps its file, if any
        return ManifestFile(spool, f"manifest of snapshot {info.id}")

    def manifest_spool(self, info: SnapshotInfo, *, in_place: bool = False) -> Spool:
        """The snapshot's manifest checked against its hash (IntegrityError otherwise), as a
        :class:`~drsync.repository.spool.Spool`: its bytes, or past :data:`RANGED_MANIFEST_BYTES` an
        unnamed local temporary file it was copied into by ranges while hashed. What is decoded or sent
        from it is exactly what was hashed (never a second read of the stored object), and the temporary
        file's pages are the page cache's, not this process's memory.

        ``in_place``: past that size, from a storage that opens its objects (a local repository), the stored
        file itself, hashed and then read through one descriptor (:meth:`Spool.of_descriptor`), not copied.
        For a reader that is done soon and then calls ``check_unchanged`` on the spool (or on its
        :class:`ManifestFile`) before it trusts what it read, or whose bytes are hashed again where they go
        (a shipment's): another program writing into the file meanwhile would otherwise go unseen."""
        name = fmt.manifest_name(info.id)
        missing = f"snapshot {info.id}: its manifest is missing"
        opener = getattr(self.storage, "open_object", None) if in_place else None
        if opener is not None:
            try:
                fd = opener(name)
            except ObjectMissing:
                raise IntegrityError(missing) from None
            try:
                large = os.fstat(fd).st_size > RANGED_MANIFEST_BYTES
            except BaseException:
                os.close(fd)
                raise
            if large:
                spool = Spool.of_descriptor(fd, fmt.MANIFEST_MAX_BYTES)
                if spool.hexdigest() != info.manifest_hash:
                    spool.close()
                    raise IntegrityError(_damaged_manifest(info))
                return spool
            os.close(fd)
        try:
            head = self.storage.read_range(name, 0, RANGED_MANIFEST_BYTES + 1)
        except ObjectMissing:
            raise IntegrityError(missing) from None
        if len(head) <= RANGED_MANIFEST_BYTES:
            spool = Spool.of(head)
        else:
            spool = Spool(RANGED_MANIFEST_BYTES)
            try:
                spool.write(head)
                del head
                while len(piece := self.storage.read_range(name, spool.size, RANGED_MANIFEST_BYTES)) > 0:
                    spool.write(piece)
                    if spool.size > fmt.MANIFEST_MAX_BYTES:
                        break  # Manifest.from_bytes refuses it by its size
            except ObjectMissing:
                spool.close()
                raise IntegrityError(missing) from None
        if spool.hexdigest() != info.manifest_hash:
            spool.close()
            raise IntegrityError(_damaged_manifest(info))
        return spool

    def _check_manifest_hash(self, info: SnapshotInfo, hasher: blake3.blake3) -> None:
        if hasher.hexdigest() != info.manifest_hash:
            raise IntegrityError(_damaged_manifest(info))

    def manifest_bytes(self, info: SnapshotInfo) -> bytes:
        """The snapshot's manifest as stored, checked against its hash (IntegrityError otherwise)."""
        try:
            data = self.storage.read(fmt.manifest_name(info.id))
        except ObjectMissing:
            raise IntegrityError(f"snapshot {info.id}: its manifest is missing") from None
        self._check_manifest_hash(info, blake3.blake3(data))
        return data

    def load_manifest_chunks(self, info: SnapshotInfo) -> IdSet:
        """The chunk ids snapshot ``info`` needs (sorted, each once), checked as :meth:`load_manifest` checks
        the manifest (its hash, its layout) but reading only its ``chunks`` column: what GC needs."""
        data = self.manifest_bytes(info)
        flat = Manifest.chunk_ids_from_bytes(data, f"manifest of snapshot {info.id}")
        del data  # before sorting
        return IdSet.of(flat)

    def commit_snapshot(self, info: SnapshotInfo, manifest_bytes: bytes | Spool, *, manifest: Manifest | None = None,
                        require_chunks: bool = False, lock: RepositoryLock | None = None) -> SnapshotInfo:
        """Write manifest then snapshot document, each durable. The document is the commit point.

        The snapshot gets this repository's next sequence number (1 + the highest one here),
        whatever ``info.seq`` says: a snapshot shipped from a primary is numbered in the order
        it arrives. Returns the committed document (with its seq). Runs under a shared lock:
        ``lock`` (held; :meth:`WriteSession.commit` passes its own), else one the calling thread
        holds, else one taken here for the commit. Other committers may hold shared locks too: within one process the
        numbering is serialised; two processes committing at the same instant may both take
        the same number, and ``SnapshotInfo.order_key`` then orders that pair by capture time.
        ``require_chunks``: first check that every chunk the manifest names is indexed and in an
        existing pack (IntegrityError, nothing written, otherwise); ``manifest`` is the parsed
        ``manifest_bytes`` when the caller has it.
        """
        if lock is not None and not lock.held:
            raise UsageError(f"snapshot {info.id}: the lock given to commit it on {self.storage.url} is released")
        covered = lock is not None or self._thread_holds_shared()
        own = None if covered else self.lock(exclusive=False, wait_s=DEFAULT_WAIT_S).acquire()
        try:
            if require_chunks:
                if manifest is None:
                    spool = manifest_bytes if isinstance(manifest_bytes, Spool) else Spool.of(manifest_bytes)
                    manifest = Manifest.from_bytes(spool, f"manifest of snapshot {info.id}")
                self.check_chunks_present(manifest.chunk_id_column(), f"snapshot {info.id}")
            self._store_manifest(info, manifest_bytes)
            if lock is not None:
                lock.verify()  # a lock another process removed as stale: a GC may have swept meanwhile
            with _COMMIT_LOCK:
                seq = 1 + max((s.seq for s in self.list_snapshots()), default=0)
                info = dataclasses.replace(info, seq=seq)
                self.storage.write(fmt.snapshot_name(info.id), info.to_bytes(), durable=True, exclusive=True)
            return info
        finally:
            if own is not None:
                own.release()

    def _store_manifest(self, info: SnapshotInfo, manifest: bytes | Spool) -> None:
        """Write the manifest, durable; a spool in a temporary file is streamed, never read whole. One with the
        bytes of a manifest stored here already (by the snapshots' hashes: an unchanged capture, a shipment
        naming the applied snapshot's) is linked to it where the storage links (a local one), not written."""
        name = fmt.manifest_name(info.id)
        if self._link_manifest(info, manifest, name):
            return
        if not isinstance(manifest, Spool) or manifest.in_memory:
            self.storage.write(name, manifest if isinstance(manifest, bytes) else manifest.getvalue(), durable=True)
            return
        out = self.storage.writer(name)
        try:
            for piece in manifest.pieces(RANGED_MANIFEST_BYTES // 4):
                out.write(piece)
            out.commit(durable=True)
        except BaseException:
            out.abort()
            raise

    def _link_manifest(self, info: SnapshotInfo, manifest: bytes | Spool, name: str) -> bool:
        """Whether the manifest of ``info`` was stored as a link to the newest snapshot's with its hash (a
        storage without ``link``, or none such: False, nothing done). That snapshot's file is read and hashed
        first: a damaged copy (e.g. the one a shipment named and the standby could not use, whose bytes then
        came whole) is never linked; the bytes are written instead. Reading a manifest costs less than
        writing it durably (at 1,000,000 files, 70 MiB from the page cache against a write and its fsync)."""
        link = getattr(self.storage, "link", None)
        if link is None:
            return False
        size = manifest.size if isinstance(manifest, Spool) else len(manifest)
        same = [s for s in self.list_snapshots() if s.manifest_hash == info.manifest_hash and s.id != info.id]
        if not same:
            return False
        source = fmt.manifest_name(max(same, key=lambda s: s.seq).id)
        if isinstance(manifest, Spool) and manifest.hexdigest() == info.manifest_hash and \
                self._is_stored_file(manifest, source):  # hashed through that very file, and still as hashed
            manifest.check_unchanged(f"the manifest of snapshot {info.id} ({source})")
            return bool(link(source, name, size=size))
        hasher = blake3.blake3()
        step = RANGED_MANIFEST_BYTES // 4
        try:
            for lo in range(0, size, step):
                piece = self.storage.read_range(source, lo, min(step, size - lo))
                if len(piece) != min(step, size - lo):
                    return False
                hasher.update(piece)
        except (ObjectMissing, IntegrityError, OSError):
            return False
        return hasher.hexdigest() == info.manifest_hash and bool(link(source, name, size=size))

    def _is_stored_file(self, manifest: bytes | Spool, name: str) -> bool:
        """Whether ``manifest`` is a spool of the stored object ``name`` itself (:meth:`manifest_spool` of a
        local repository), whose hash it checked as it read it: the same file (device and inode)."""
        opener = getattr(self.storage, "open_object", None)
        mine = manifest.file_identity() if isinstance(manifest, Spool) else None
        if opener is None or mine is None:
            return False
        try:
            fd = opener(name)
        except (ObjectMissing, IntegrityError, OSError):
            return False
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) == mine

    def delete_snapshot(self, info: SnapshotInfo) -> None:
        """Remove the document first (the snapshot is gone), then its manifest. Chunks go at GC."""
        self.storage.delete(fmt.snapshot_name(info.id))
        self.storage.delete(fmt.manifest_name(info.id))

    # --- garbage collection -------------------------------------------------------

    def gc(self, *, repack_threshold: float = 0.25, dry_run: bool = False,
           wait_s: float = DEFAULT_WAIT_S) -> GcReport:
        """Delete chunks no snapshot references, in two phases; takes its own locks.

        **Mark**, under a shared lock (writers go on): read every snapshot's manifest, plan,
        copy the live chunks of mostly-dead packs (dead share above ``repack_threshold``) into
        new packs and index them (durable). **Sweep**, under the exclusive lock, short: add the
        chunks of snapshots committed since the mark, keep every index row written since the
        mark, write one complete new index (durable), then delete the old index files, every
        pack it does not name, and manifests without a snapshot. Crash-safe at every step:
        nothing is deleted before what replaces it is durable.

        ``wait_s``: seconds to wait for each lock (0 = give up at once): LockedError. Call it
        without holding a lock on this repository. OperationFailed when another GC swept
        between this one's mark and sweep (nothing deleted; run it again).
        """
        from drsync.repository.gc import mark, sweep

        self.refuse_if_read_only()
        with self.lock(exclusive=False, wait_s=wait_s) as shared:
            plan = mark(self, repack_threshold, dry_run, shared)
        if dry_run or not plan.sweep_needed:
            return plan.report
        log.info("garbage collection of %s: marked (%d live chunks, %d dead, %d packs to repack); "
                 "sweeping under the exclusive lock", self.storage.url, plan.report.live_chunks,
                 plan.report.dead_chunks, len(plan.repacked))
        with self.lock(exclusive=True, wait_s=wait_s) as exclusive:
            faults.pause("gc")
            try:
                sweep(self, plan, exclusive)
            finally:
                self.reload_index()
        return plan.report

    # --- verification ---------------------------------------------------------------

    def verify(self, *, on_progress: Callable[[int], None] | None = None,
               require_chunks: bool = True) -> VerifyReport:
        """Re-read every pack, re-hash every chunk, check every manifest against the index.

        ``require_chunks=False`` is for metadata-only (dataless) copies, whose manifests
        name chunks that are deliberately absent.
        """
        report = VerifyReport()
        # Every index file that reads: a damaged one is a problem, and the chunks only it placed count as
        # missing (their files are named below), never a stop without a report.
        index = ChunkIndex()
        for obj in self.storage.list(fmt.INDEX_DIR):
            try:
                index.load_file(self.storage.read(obj.name), obj.name)
            except ObjectMissing:
                continue
            except IntegrityError as e:
                report.problems.append(str(e).split("; run 'drsync repo verify'")[0])
        present = {o.name: o.size for o in self.storage.list(fmt.PACKS_DIR)}
        bad: dict[bytes, str] = {}
        for pack_id, rows in index.pack_batches():  # one pack's rows at a time, packs in id order
            name = fmt.pack_name(pack_id)
            report.packs += 1
            table: PackTable | None = None
            here: dict[bytes, str] = {}
            if name not in present:
                report.problems.append(f"pack {pack_id} is missing")
            else:
                try:
                    table = read_pack_table(self.storage, pack_id, present[name])
                except IntegrityError as e:
                    report.problems.append(str(e))
                if table is not None:
                    # A damaged copy the index does not place here (a repair forgot it) is garbage, not damage.
                    indexed = set(id_list(rows.ids))
                    here.update((c, r) for c, r in self._verify_pack(pack_id, table).items() if c in indexed)
                    report.chunks += len(table)
                if on_progress:
                    on_progress(present[name])
            # Chunks the index places in this pack that it does not list (it is missing or damaged), or
            # places where the pack does not have them: a read through the index would get other bytes.
            here.update(index_disagreements(pack_id, rows, table))
            if here:
                report.damaged_at[pack_id] = set(here)
            bad.update(here)
        report.damaged_chunks = {cid.hex(): reason for cid, reason in bad.items()}
        bad_ids = IdSet.of(list(bad)) if bad else None
        snapshots, damaged_docs = self._snapshots_and_damage(stop_at_damage=False)
        report.problems.extend(damaged_docs)
        for info in snapshots:
            report.snapshots += 1
            try:
                # One manifest at a time, a row group at a time (a table of 1,000,000 files is 160 MiB).
                manifest = self.open_manifest(info)
                # What a restore checks first (safe paths, a whole tree, consistent sizes): a verified
                # snapshot is one a restore accepts.
                validate(manifest, f"snapshot {info.id}: its manifest")
                found: list[tuple[str, str]] = []
                if require_chunks:
                    found = list(damaged_paths(manifest, index, bad, bad_ids))
                else:  # the chunks are absent on purpose; every row group is still read and checked
                    for g in range(manifest.num_groups):
                        manifest.group(g)
            except IntegrityError as e:
                report.problems.append(str(e))
                continue
            finally:
                manifest = None
            report.damaged_files.extend({"snapshot": info.id, "path": path, "reason": reason}
                                        for path, reason in found)
        return report

    def _verify_pack(self, pack_id: str, table: PackTable) -> dict[bytes, str]:
        """Decode and re-hash every chunk ``table`` lists: chunk id -> reason, for the damaged ones."""
        bad: dict[bytes, str] = {}
        name = fmt.pack_name(pack_id)
        # Read the pack in large sequential pieces rather than chunk by chunk.
        window = b""
        window_start = 0
        n = fmt.ID_LEN
        step = fmt.PACK_MAX_CHUNKS  # Python values for a slice of the table at a time (a pack of any count)
        for lo in range(0, len(table), step):
            sl = slice(lo, lo + step)
            raw_ids = table.ids[sl].tobytes()
            for i, (enc, offset, stored_length, raw_length) in enumerate(zip(
                    table.encoding[sl].tolist(), table.offset[sl].tolist(), table.stored_length[sl].tolist(),
                    table.raw_length[sl].tolist(), strict=True)):
                cid = raw_ids[i * n:(i + 1) * n]
                if offset + stored_length > window_start + len(window):
                    window_start = offset
                    window = self.storage.read_range(name, offset, max(stored_length, 16 * 1024 * 1024))
                start = offset - window_start
                stored = window[start:start + stored_length]
                try:
                    if len(stored) != stored_length:
                        raise IntegrityError(f"chunk {cid.hex()[:16]} is truncated")
                    chunks.decode(enc, stored, raw_length, cid)
                except IntegrityError as err:
                    bad[cid] = f"{err} (pack {pack_id})"
        return bad


def index_disagreements(pack_id: str, rows: IndexRows, table: PackTable | None) -> dict[bytes, str]:
    """Chunk id -> reason, for each of ``rows`` (the index's rows of pack ``pack_id``) that the pack's own
    table (``table``; None: the pack is missing or unreadable) does not list, or lists at another offset,
    length or encoding. Vectorised; one object per disagreeing row only."""
    out: dict[bytes, str] = {}
    if not len(rows):
        return out
    if table is None or not len(table):
        found = np.zeros(len(rows), bool)
        at = np.zeros(len(rows), np.intp)
    else:
        key = id_key(table.ids)
        order = sort_unique(table.ids, key)
        pos, found = locate(table.ids[order], key[order], rows.ids)
        at = order[np.minimum(pos, len(order) - 1)]
    for i in np.flatnonzero(~found):
        cid = id_at(rows.ids, int(i))
        out[cid] = f"chunk {cid.hex()[:16]} not found in pack {pack_id}"
    if table is None or not len(table):
        return out
    differs = found & ((table.offset[at] != rows.offset) | (table.stored_length[at] != rows.stored_length)
                       | (table.raw_length[at] != rows.raw_length) | (table.encoding[at] != rows.encoding))
    for i in np.flatnonzero(differs):
        cid, j = id_at(rows.ids, int(i)), int(at[i])
        out[cid] = (f"chunk {cid.hex()[:16]}: the index places it at offset {int(rows.offset[i])} "
                    f"({int(rows.stored_length[i])} bytes) in pack {pack_id}, the pack at offset "
                    f"{int(table.offset[j])} ({int(table.stored_length[j])} bytes): the index is damaged; "
                    f"restore the repository from a backup or the standby")
    return out


class ChunkReader:
    """Reads the chunks a part of the index locates (:meth:`Repository.reader_for`): what an apply reads
    from, without the whole index."""

    def __init__(self, repo: Repository, index: ChunkIndex) -> None:
        self.repo, self.index = repo, index

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's bytes, checked against its id (IntegrityError if not located here, ChunkDamaged if damaged)."""
        loc, stored = self.repo.read_at(chunk_id, self.index.get(chunk_id))
        return decode_located(loc, stored, chunk_id)

    def read_chunks(self, chunk_ids: list[bytes]) -> list[bytes]:
        """:meth:`read_chunk` of each of ``chunk_ids``, in order, with fewer calls (:func:`read_located`)."""
        return read_located(self.repo, self.index, chunk_ids)

    def has_chunk(self, chunk_id: bytes) -> bool:
        return chunk_id in self.index


RUN_BYTES = 4 << 20  # the most stored bytes read_located reads with one call


def decode_located(loc: ChunkLocation, stored: bytes | memoryview, chunk_id: bytes) -> bytes | memoryview:
    """:func:`chunks.decode` of a chunk read at ``loc``: ChunkDamaged (naming the pack) when it does not
    decode to bytes matching ``chunk_id``."""
    try:
        return chunks.decode(loc.encoding, stored, loc.raw_length, chunk_id)
    except IntegrityError as e:
        raise ChunkDamaged(f"{e} (pack {loc.pack_id})", chunk_id, loc.pack_id) from None


def read_located(repo: Repository, index: ChunkIndex, chunk_ids: list[bytes]) -> list[bytes]:
    """The chunks ``chunk_ids`` of ``repo``, in order, each checked against its id as
    :meth:`Repository.read_chunk` checks it (and with its errors), located in ``index`` all at once and
    read with one call per run of chunks that lie end to end in a pack, up to :data:`RUN_BYTES` (a capture
    stores the chunks of small files one after another: an apply reads a few hundred of them at a time)."""
    if not chunk_ids:
        return []
    found, rows = index.locate_many(chunk_ids)
    if not found.all():
        raise IntegrityError(f"chunk {chunk_ids[int(np.flatnonzero(~found)[0])].hex()[:16]} is not in the repository")
    pack, off, size = rows.pack.tolist(), rows.offset.tolist(), rows.stored_length.tolist()
    raw, enc = rows.raw_length.tolist(), rows.encoding.tolist()
    out: list[bytes] = []
    i, n = 0, len(chunk_ids)
    while i < n:
        j, end = i + 1, off[i] + size[i]
        while j < n and pack[j] == pack[i] and off[j] == end and end + size[j] - off[i] <= RUN_BYTES:
            end += size[j]
            j += 1
        pack_id = rows.packs[pack[i]]
        try:
            buf = repo.storage.read_range(fmt.pack_name(pack_id), off[i], end - off[i])
        except ObjectMissing:
            raise ChunkDamaged(f"chunk {chunk_ids[i].hex()[:16]}: pack {pack_id} is missing", chunk_ids[i],
                               pack_id) from None
        view = memoryview(buf)
        for k in range(i, j):
            at = off[k] - off[i]
            if at + size[k] > len(buf):
                raise ChunkDamaged(f"chunk {chunk_ids[k].hex()[:16]}: pack {pack_id} is truncated", chunk_ids[k],
                                   pack_id)
            try:
                data = chunks.decode(enc[k], view[at:at + size[k]], raw[k], chunk_ids[k])
            except IntegrityError as e:
                raise ChunkDamaged(f"{e} (pack {pack_id})", chunk_ids[k], pack_id) from None
            out.append(data if isinstance(data, bytes) else bytes(data))  # a raw chunk: not a view of the run
        i = j
    return out


CHECK_PART_IDS = 262_144  # chunk ids a commit check sorts and looks up at a time (about 10 MiB of them)


def _id_parts(arrays: list[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """``arrays`` (1-d id arrays) taken end to end in parts of at most ``size`` ids (views, no copy)."""
    part: list[np.ndarray] = []
    n = 0
    for a in arrays:
        start = 0
        while start < len(a):
            take = a[start:start + size - n]
            part.append(take)
            n += len(take)
            start += len(take)
            if n == size:
                yield part
                part, n = [], 0
    if part:
        yield part


def _damaged_manifest(info: SnapshotInfo) -> str:
    return (f"snapshot {info.id}: its manifest is damaged (hash mismatch); restore it from a backup or the "
            f"standby")


def damaged_paths(manifest: Manifest | ManifestFile, index: ChunkIndex, bad: dict[bytes, str],
                  bad_ids: IdSet | None = None) -> Iterable[tuple[str, str]]:
    """(path, reason) for every file of ``manifest`` that needs a damaged or missing chunk, in manifest
    order; the reason names the file's first such chunk. ``bad_ids``: the ids of ``bad`` as a set (built
    here when not given). Searches a row group's chunk ids in one batch (no object per file or chunk,
    but for the files named). Raises IntegrityError for a damaged row group."""
    if bad and bad_ids is None:
        bad_ids = IdSet.of(list(bad))
    for t in column_groups(manifest, ["path", "chunks"]):
        col = t.column("chunks").combine_chunks()
        ids = ids_array(pc.list_flatten(col))
        if not len(ids):
            continue
        problem = ~index.contains_many(ids)
        if bad_ids is not None:
            problem |= bad_ids.contains_many(ids)
        at = np.flatnonzero(problem)
        if not len(at):
            continue
        owners = pc.list_parent_indices(col).to_numpy()[at]
        rows, first = np.unique(owners, return_index=True)  # a file's first problem chunk comes first
        paths = t.column("path").take(pa.array(rows)).to_pylist()
        for path, j in zip(paths, first.tolist(), strict=True):
            cid = id_at(ids, int(at[j]))
            reason = bad.get(cid) or f"chunk {cid.hex()[:16]} is missing from the repository"
            yield path.decode("utf-8", "surrogateescape"), reason
