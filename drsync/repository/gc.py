"""Garbage collection of a repository, in two phases (docs/FORMAT.md, "Garbage collection").

:meth:`drsync.repository.repo.Repository.gc` runs :func:`mark` under a shared lock
(writers go on) and :func:`sweep` under the exclusive lock (short: it only re-checks what
changed since the mark, writes one new index, then deletes).

Both work on arrays, not on an object per chunk: the referenced chunk ids are one sorted
:class:`~drsync.repository.ids.IdSet` built from the manifests' ``chunks`` columns, the index is
its sorted :class:`~drsync.repository.packs.IndexRows`, and live/dead chunks and bytes per pack
are counted with ``np.bincount`` over pack numbers.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import numpy as np

from drsync import allocators, faults
from drsync.errors import IntegrityError, OperationFailed
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list, ids_array, locate
from drsync.repository.lock import RepositoryLock
from drsync.repository.packs import ChunkIndex, IndexRows, read_index_file, write_index
from drsync.repository.repo import ChunkWriter, GcReport, Repository

log = logging.getLogger(__name__)


@dataclass
class GcPlan:
    """What GC's mark found and did; its sweep re-checks it under the exclusive lock.

    ``rows``: every index row at the mark (N rows, sorted by chunk id, each id once); ``live``: (N,)
    bool, the rows a snapshot at the mark references; ``doomed``: (P,) bool over ``rows.packs``, the
    packs whose every needed chunk is dead (deleted) or copied (repacked); ``repacked``: their pack
    names, for the repacked ones; ``copied``/``copies``: the chunks copied out of repacked packs and
    their new index rows, written to ``copies_index``.
    """

    report: GcReport
    snapshot_ids: set[str]
    referenced: IdSet
    index_files: set[str]
    rows: IndexRows
    live: np.ndarray
    doomed: np.ndarray
    repacked: set[str]
    sweep_needed: bool = False
    copied: IdSet = field(default_factory=IdSet.empty)
    copies: IndexRows = field(default_factory=IndexRows.empty)
    copies_index: str = ""


def _unfinished(repo: Repository) -> list[str]:
    """Temporary files of the repository's folders (a storage that names them): under the exclusive lock,
    those of writes that never finished (a process killed between writing and renaming), since no write is
    under way then and a writer whose lock was taken from it fails at its rename. Never listed as objects, they
    would otherwise keep their bytes (a pack, a manifest's inode) for good."""
    temporary = getattr(repo.storage, "temporary_files", None)
    if temporary is None:
        return []
    return [t for d in (fmt.PACKS_DIR, fmt.INDEX_DIR, fmt.MANIFESTS_DIR, fmt.SNAPSHOTS_DIR) for t in temporary(d)]


def mark(repo: Repository, repack_threshold: float, dry_run: bool, lock: RepositoryLock) -> GcPlan:
    """GC's mark, under the shared ``lock``: what is referenced, what to delete, live chunks of
    mostly-dead packs copied into new packs (indexed, durable)."""
    report = GcReport()
    snaps = repo.list_snapshots()
    referenced = IdSet.empty()
    for s in snaps:
        referenced = referenced.union(repo.load_manifest_chunks(s))
        allocators.give_back()  # the manifest's columns, freed inside glibc's heaps, are not kept resident
    faults.pause("gc-mark")  # tests: a mark over millions of chunks, the shared lock held (writers go on)
    live_manifests = {fmt.manifest_name(s.id) for s in snaps}
    report.removed_snapshots_orphans = sum(1 for o in repo.storage.list(fmt.MANIFESTS_DIR)
                                           if o.name not in live_manifests)
    index = ChunkIndex()
    index_files: set[str] = set()
    for obj in repo.storage.list(fmt.INDEX_DIR):  # no sweep can run: the files stay while we read
        index.load_file(repo.storage.read(obj.name), obj.name)
        index_files.add(obj.name)
    rows = index.rows()
    del index
    allocators.give_back()
    pack_sizes = {o.name: o.size for o in repo.storage.list(fmt.PACKS_DIR)}

    # Per pack (P of them, by number into rows.packs): rows, live rows, stored bytes, dead stored bytes.
    npacks = len(rows.packs)
    at, live = locate(referenced.ids, referenced.key, ids_array(rows.ids))
    # Every chunk a snapshot names must have an index row, or its pack would look unindexed (an orphan)
    # and be deleted: an index file lost, unreadable, or not listed (a pipe, a name no read addresses).
    located = np.zeros(len(referenced), bool)
    located[at[live]] = True
    del at
    if not located.all():
        unlocated = referenced.ids[~located]
        naming = [s.id for s in snaps if bool(repo.load_manifest_chunks(s).contains_many(unlocated).any())]
        raise IntegrityError(f"garbage collection of {repo.storage.url}: {int((~located).sum())} chunk(s) that "
                             f"snapshot(s) {', '.join(naming[:3])}{' ...' if len(naming) > 3 else ''} reference "
                             f"are in no index file (one lost, damaged or not a regular file, or the chunks were "
                             f"lost); nothing was deleted: run 'drsync repo repair' (it indexes the packs again "
                             f"where they are), then restore or delete (drsync snapshot delete) the snapshots it "
                             f"still lists")
    del located
    n_rows = np.bincount(rows.pack, minlength=npacks)
    n_live = np.bincount(rows.pack[live], minlength=npacks)
    total_bytes = np.bincount(rows.pack, weights=rows.stored_length, minlength=npacks)
    dead_bytes = np.bincount(rows.pack[~live], weights=rows.stored_length[~live], minlength=npacks)
    indexed = n_rows > 0
    dead = indexed & (n_live == 0)
    repack = indexed & ~dead & (dead_bytes / np.maximum(total_bytes, 1) > repack_threshold)
    doomed = dead | repack
    report.live_chunks = int(live.sum())
    report.dead_chunks = len(rows) - report.live_chunks
    report.deleted_packs = int(dead.sum())
    report.repacked_packs = int(repack.sum())
    report.kept_packs = int((indexed & ~doomed).sum())
    report.freed_bytes = sum(pack_sizes.get(fmt.pack_name(rows.packs[int(p)]), 0) for p in np.flatnonzero(doomed))
    repacked = {fmt.pack_name(rows.packs[int(p)]) for p in np.flatnonzero(repack)}
    indexed_names = {fmt.pack_name(rows.packs[int(p)]) for p in np.flatnonzero(indexed)}
    unindexed = [n for n in pack_sizes if n not in indexed_names]  # orphans, or a writer's packs in progress
    report.deleted_packs += len(unindexed)
    report.freed_bytes += sum(pack_sizes[n] for n in unindexed)
    plan = GcPlan(report=report, snapshot_ids={s.id for s in snaps}, referenced=referenced,
                  index_files=index_files, rows=rows, live=live, doomed=doomed, repacked=repacked)
    # (Temporary files left by writes that never finished go with the next sweep, _unfinished: never one of their
    # own, which would wait for the exclusive lock behind every standby's open session.)
    plan.sweep_needed = bool(doomed.any() or unindexed or report.removed_snapshots_orphans or len(index_files) > 1)
    to_repack = rows.take(np.flatnonzero(live & repack[rows.pack]))
    if dry_run or not plan.sweep_needed or not len(to_repack):
        return plan

    # Copy the live chunks of mostly-dead packs now, while writers go on; indexed at once, so a
    # crash or a failed sweep leaves valid duplicates (any listed location is valid), never orphans.
    to_repack = to_repack.take(np.lexsort((to_repack.offset, to_repack.pack)))  # pack by pack, in order
    writer = ChunkWriter(repo, lock=lock, index=ChunkIndex())
    try:
        for start in range(0, len(to_repack), 65536):
            part = to_repack.take(slice(start, start + 65536))
            for cid, (p, off, stored_len, raw_len, enc) in zip(id_list(part.ids), zip(
                    part.pack.tolist(), part.offset.tolist(), part.stored_length.tolist(), part.raw_length.tolist(),
                    part.encoding.tolist(), strict=True), strict=True):
                stored = repo.storage.read_range(fmt.pack_name(part.packs[p]), off, stored_len)
                chunks.decode(enc, stored, raw_len, cid)  # never copy a damaged chunk
                writer.add_stored(cid, enc, stored, raw_len)
        plan.copies = writer.seal()
    except BaseException:
        writer.abort()
        raise
    plan.copied = IdSet.of(to_repack.ids)
    plan.copies_index = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
    write_index(repo.storage, plan.copies_index, plan.copies)
    return plan


def sweep(repo: Repository, plan: GcPlan, lock: RepositoryLock) -> None:
    """Under the exclusive ``lock``: re-check what changed since the mark, then replace and delete.
    LockedError, nothing deleted, when the lock was lost (removed by another process) before the
    deletions: a writer may have packs not indexed yet."""
    snaps = repo.list_snapshots()
    fresh = IdSet.empty()
    for s in snaps:
        if s.id not in plan.snapshot_ids:  # committed since the mark: its chunks are needed too
            fresh = fresh.union(repo.load_manifest_chunks(s))
    fresh = fresh.difference(plan.referenced)
    files_now = {o.name for o in repo.storage.list(fmt.INDEX_DIR)}
    if not plan.index_files <= files_now:
        raise OperationFailed(f"another garbage collection of {repo.storage.url} swept while this one was "
                              f"marking; nothing was deleted: run 'drsync repo gc' again")
    parts: list[IndexRows] = [plan.copies]
    for name in sorted(files_now - plan.index_files - {plan.copies_index}):
        # Written since the mark (an upload not committed yet, say): all kept.
        parts.append(read_index_file(repo.storage.read(name), name))
    rows = plan.rows
    needed = plan.live
    rescued = np.zeros(len(rows.packs), bool)
    if len(fresh):
        is_fresh = fresh.contains_many(rows.ids)
        needed = needed | is_fresh
        # Doomed at the mark but holding a chunk a snapshot committed since then needs (and not copied).
        rescued[rows.pack[is_fresh & ~plan.copied.contains_many(rows.ids)]] = True
    keep_pack = ~plan.doomed | rescued
    parts.append(rows.take(np.flatnonzero(keep_pack[rows.pack] & needed)))
    new_rows = IndexRows.concat(parts)
    del parts
    named = {fmt.pack_name(p) for p in new_rows.pack_names()}
    # Writers write packs under a shared lock and index them before releasing it: under the
    # exclusive lock, a pack the new index does not name is garbage.
    dead = [o for o in repo.storage.list(fmt.PACKS_DIR) if o.name not in named]
    dead_packs = [o.name for o in dead]
    # The report tells what the sweep really deletes (a snapshot committed since the mark may keep a pack).
    plan.report.repacked_packs = sum(1 for n in dead_packs if n in plan.repacked)
    plan.report.deleted_packs = len(dead_packs) - plan.report.repacked_packs
    plan.report.freed_bytes = sum(o.size for o in dead)
    live_manifests = {fmt.manifest_name(s.id) for s in snaps}
    dead_manifests = [o.name for o in repo.storage.list(fmt.MANIFESTS_DIR) if o.name not in live_manifests]
    unfinished = _unfinished(repo)
    if unfinished:  # under a lock still held (see below), or nothing is removed
        lock.verify()
        for name in unfinished:
            repo.storage.remove_temporary(name)
        log.info("garbage collection of %s removed %d temporary file(s) of writes that never finished",
                 repo.storage.url, len(unfinished))
    if not dead_packs and not dead_manifests and len(files_now) <= 1:
        return
    # The listings above are whole only if no writer could run since the lock was taken: its file is
    # still there now (a removed lock file never comes back), or nothing is deleted.
    lock.verify()
    new_index = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
    write_index(repo.storage, new_index, new_rows)
    del new_rows
    for name in sorted(files_now):
        repo.storage.delete(name)
    for name in dead_packs:
        repo.storage.delete(name)
    for name in dead_manifests:
        repo.storage.delete(name)
