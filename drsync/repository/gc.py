"""Garbage collection of a repository, in two phases (docs/FORMAT.md, "Garbage collection").

:meth:`drsync.repository.repo.Repository.gc` runs :func:`mark` under a shared lock
(writers go on) and :func:`sweep` under the exclusive lock (short: it only re-checks what
changed since the mark, writes one new index, then deletes).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass, field

from drsync.errors import OperationFailed
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.lock import RepositoryLock
from drsync.repository.packs import ChunkIndex, ChunkLocation, index_bytes
from drsync.repository.repo import ChunkWriter, GcReport, Repository


@dataclass
class GcPlan:
    """What GC's mark found and did; its sweep re-checks it under the exclusive lock."""

    report: GcReport
    snapshot_ids: set[str]
    referenced: set[bytes]
    index_files: set[str]
    by_pack: dict[str, list[tuple[bytes, ChunkLocation]]]
    doomed: set[str]
    repacked: set[str]
    sweep_needed: bool = False
    copied: set[bytes] = field(default_factory=set)
    copies: list[tuple[bytes, ChunkLocation]] = field(default_factory=list)
    copies_index: str = ""


def mark(repo: Repository, repack_threshold: float, dry_run: bool, lock: RepositoryLock) -> GcPlan:
    """GC's mark, under the shared ``lock``: what is referenced, what to delete, live chunks of
    mostly-dead packs copied into new packs (indexed, durable)."""
    report = GcReport()
    snaps = repo.list_snapshots()
    referenced: set[bytes] = set()
    for s in snaps:
        referenced |= repo.load_manifest(s).chunk_ids()
    live_manifests = {fmt.manifest_name(s.id) for s in snaps}
    report.removed_snapshots_orphans = sum(1 for o in repo.storage.list(fmt.MANIFESTS_DIR)
                                           if o.name not in live_manifests)
    index = ChunkIndex()
    index_files: set[str] = set()
    for obj in repo.storage.list(fmt.INDEX_DIR):  # no sweep can run: the files stay while we read
        index.load_file(repo.storage.read(obj.name), obj.name)
        index_files.add(obj.name)
    pack_sizes = {o.name: o.size for o in repo.storage.list(fmt.PACKS_DIR)}
    by_pack: dict[str, list[tuple[bytes, ChunkLocation]]] = defaultdict(list)
    for cid, loc in index.items():
        by_pack[loc.pack_id].append((cid, loc))
    del index

    doomed: set[str] = set()  # packs whose every needed chunk is dead (deleted) or copied (repacked)
    to_repack: list[tuple[bytes, ChunkLocation]] = []
    repacked: set[str] = set()
    for pack_id, rows in by_pack.items():
        live = [r for r in rows if r[0] in referenced]
        report.live_chunks += len(live)
        report.dead_chunks += len(rows) - len(live)
        if not live:
            doomed.add(pack_id)
            report.deleted_packs += 1
            report.freed_bytes += pack_sizes.get(fmt.pack_name(pack_id), 0)
            continue
        dead_bytes = sum(loc.stored_length for cid, loc in rows if cid not in referenced)
        total = sum(loc.stored_length for _, loc in rows) or 1
        if dead_bytes / total > repack_threshold:
            to_repack.extend(live)
            doomed.add(pack_id)
            repacked.add(fmt.pack_name(pack_id))
            report.repacked_packs += 1
            report.freed_bytes += pack_sizes.get(fmt.pack_name(pack_id), 0)
        else:
            report.kept_packs += 1
    indexed = {fmt.pack_name(p) for p in by_pack}
    unindexed = [n for n in pack_sizes if n not in indexed]  # orphans, or a writer's packs in progress
    report.deleted_packs += len(unindexed)
    report.freed_bytes += sum(pack_sizes[n] for n in unindexed)
    plan = GcPlan(report=report, snapshot_ids={s.id for s in snaps}, referenced=referenced,
                   index_files=index_files, by_pack=dict(by_pack), doomed=doomed, repacked=repacked)
    plan.sweep_needed = bool(doomed or unindexed or report.removed_snapshots_orphans or len(index_files) > 1)
    if dry_run or not plan.sweep_needed or not to_repack:
        return plan

    # Copy the live chunks of mostly-dead packs now, while writers go on; indexed at once, so a
    # crash or a failed sweep leaves valid duplicates (any listed location is valid), never orphans.
    writer = ChunkWriter(repo, lock=lock, index=ChunkIndex())
    try:
        for cid, loc in to_repack:
            stored = repo.storage.read_range(fmt.pack_name(loc.pack_id), loc.offset, loc.stored_length)
            chunks.decode(loc.encoding, stored, loc.raw_length, cid)  # never copy a damaged chunk
            writer.add_stored(cid, loc.encoding, stored, loc.raw_length)
            plan.copied.add(cid)
        plan.copies = writer.seal()
    except BaseException:
        writer.abort()
        raise
    plan.copies_index = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
    repo.storage.write(plan.copies_index, index_bytes(plan.copies), durable=True)
    return plan

def sweep(repo: Repository, plan: GcPlan) -> None:
    """Under the exclusive lock: re-check what changed since the mark, then replace and delete."""
    snaps = repo.list_snapshots()
    fresh: set[bytes] = set()
    for s in snaps:
        if s.id not in plan.snapshot_ids:  # committed since the mark: its chunks are needed too
            fresh |= repo.load_manifest(s).chunk_ids()
    fresh -= plan.referenced
    needed = plan.referenced | fresh
    files_now = {o.name for o in repo.storage.list(fmt.INDEX_DIR)}
    if not plan.index_files <= files_now:
        raise OperationFailed(f"another garbage collection of {repo.storage.url} swept while this one was "
                              f"marking; nothing was deleted: run 'drsync repo gc' again")
    rows: list[tuple[bytes, ChunkLocation]] = list(plan.copies)
    for name in sorted(files_now - plan.index_files - {plan.copies_index}):
        since = ChunkIndex()  # written since the mark (an upload not committed yet, say): all kept
        since.load_file(repo.storage.read(name), name)
        rows.extend(since.items())
    for pack_id, pack_rows in plan.by_pack.items():
        if pack_id in plan.doomed and not any(cid in fresh and cid not in plan.copied for cid, _ in pack_rows):
            continue
        # Kept, or doomed at the mark but holding a chunk a snapshot committed since then needs.
        rows.extend(r for r in pack_rows if r[0] in needed)
    named = {fmt.pack_name(loc.pack_id) for _, loc in rows}
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
    if not dead_packs and not dead_manifests and len(files_now) <= 1:
        return
    new_index = f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet"
    repo.storage.write(new_index, index_bytes(rows), durable=True)
    for name in sorted(files_now):
        repo.storage.delete(name)
    for name in dead_packs:
        repo.storage.delete(name)
    for name in dead_manifests:
        repo.storage.delete(name)
