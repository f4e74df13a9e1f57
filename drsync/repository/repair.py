"""Repair of a repository that lost data: its index stops naming what it no longer holds.

A pack deleted by hand or lost with a disk, or a chunk whose stored bytes rotted, stays named by the
index: a standby's negotiation would say it holds those chunks, nothing would send them again, and every
commit naming one would be refused for ever. :func:`forget` drops those index rows under the exclusive
lock: one new index file, durable before the old ones are deleted (a crash in between leaves both, and
the next repair finds the same rows again). Nothing else is deleted: a damaged pack's other chunks stay
where they are, and a lost pack that comes back is garbage for the next GC (its chunks were sent again).

It also indexes again the packs no index file names (an index file lost or deleted: its packs look
like garbage), every chunk of them checked against its id first.

Then the repository says it lacks what it lost. When snapshots name a chunk it does not hold
(forgotten now or earlier, or lost with its pack and index file together) it writes ``repaired.json``
(docs/FORMAT.md): while that is there, a standby checks every chunk of each commit, not only those of
the files that changed (its stored snapshots no longer vouch for theirs), so the primary sends back
whatever the snapshot it ships needs (:class:`drsync.errors.ChunksLost`); the first commit that passes
the whole check removes it. On a primary a capture writes them again when a file still holds them, and
the snapshots naming the others stay incomplete (``RepairReport.incomplete``) until restored from the
standby or a backup.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from drsync import allocators
from drsync.errors import ChunksLost, DrsyncError, IntegrityError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list, ids_array
from drsync.repository.lock import RepositoryLock
from drsync.repository.manifest import Manifest, ManifestFile, column_groups
from drsync.repository.packs import IndexRows, read_index_file, read_pack_table, write_index
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool

log = logging.getLogger("drsync.repository.repair")


@dataclass
class RepairReport:
    """What :func:`forget` found and dropped.

    ``lost_packs``: pack ids the index named that ``packs/`` does not hold; ``damaged_chunks``: chunks
    dropped from packs that exist (bytes that do not match their id, or rows the pack does not list);
    ``forgotten_chunks``: distinct chunk ids the repository no longer holds at all (a copy in another
    pack keeps a chunk held); ``forgotten_rows``: index rows dropped; ``incomplete``: ids of snapshots
    naming a chunk not held after the repair (their files with those chunks cannot be restored from here
    until the chunks come back); ``reindexed_packs``/``reindexed_chunks``: packs no index file named,
    indexed again (their chunks that check); ``dry_run``: nothing was changed."""

    lost_packs: list[str] = field(default_factory=list)
    reindexed_packs: list[str] = field(default_factory=list)
    reindexed_chunks: int = 0
    damaged_chunks: int = 0
    forgotten_chunks: int = 0
    forgotten_rows: int = 0
    incomplete: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.forgotten_rows or self.reindexed_chunks)

    def as_dict(self) -> dict[str, object]:
        return {"lost_packs": self.lost_packs, "reindexed_packs": self.reindexed_packs,
                "reindexed_chunks": self.reindexed_chunks, "damaged_chunks": self.damaged_chunks,
                "forgotten_chunks": self.forgotten_chunks, "forgotten_rows": self.forgotten_rows,
                "incomplete_snapshots": self.incomplete, "dry_run": self.dry_run}


def rows_to_keep(rows: IndexRows, lost: set[str], damaged: Mapping[str, set[bytes]]) -> np.ndarray:
    """(N,) bool over ``rows``: False for a row in a pack of ``lost`` (pack ids), or naming a chunk that
    ``damaged`` (pack id -> chunk ids) lists for its pack; a copy of the same chunk in another pack is
    kept. Pure."""
    keep = np.ones(len(rows), bool)
    for number, pack in enumerate(rows.packs):
        in_pack = rows.pack == number
        if pack in lost:
            keep &= ~in_pack
        elif damaged.get(pack):
            bad = ids_array(sorted(damaged[pack]))
            keep &= ~(in_pack & np.isin(rows.ids, bad))
    return keep


def orphan_rows(repo: Repository, present: dict[str, int], named: set[str]) -> tuple[IndexRows, list[str]]:
    """Index rows for the packs of ``present`` (pack name -> size) that no index row names (``named``: pack
    ids): each pack's own table, each chunk read and checked against its id (a damaged one is left out).
    Returns the rows and the ids of the packs they come from; a pack whose table cannot be read is skipped
    (it stays garbage). Caller holds the exclusive lock: no writer has packs in progress."""
    parts: list[IndexRows] = []
    found: list[str] = []
    for name, size in sorted(present.items()):
        pack_id = name.rsplit("/", 1)[-1].removesuffix(".pack")
        if pack_id in named or fmt.pack_name(pack_id) != name:
            continue
        try:
            table = read_pack_table(repo.storage, pack_id, size)
        except IntegrityError as e:
            log.warning("repository %s: pack %s is in no index file and cannot be read (%s); left as garbage",
                        repo.storage.url, pack_id, e)
            continue
        good = _intact(repo.storage.read(name), table.ids, table.offset, table.stored_length, table.raw_length,
                       table.encoding)
        if good.any():
            n = int(good.sum())
            parts.append(IndexRows(table.ids[good], np.zeros(n, np.uint32), table.offset[good],
                                   table.stored_length[good], table.raw_length[good], table.encoding[good],
                                   (pack_id,)))
            found.append(pack_id)
    return IndexRows.concat(parts), found


def _index_parts(repo: Repository) -> tuple[list[str], list[IndexRows]]:
    """Every index file's name and rows, one part a file (never joined: at 1,000,000 chunks the rows are
    61 MiB, a joined copy as much again)."""
    names = [o.name for o in repo.storage.list(fmt.INDEX_DIR)]
    return names, [read_index_file(repo.storage.read(n), n) for n in names]


def damaged_in(repo: Repository, packs: set[str]) -> dict[str, set[bytes]]:
    """Pack id -> the chunks the index places in it whose bytes there are short or do not match their id,
    for ``packs`` (pack ids; one damaged chunk found by an apply: its pack's other chunks are checked too,
    so that a truncated pack is forgotten in one go, not a chunk a shipment). Each pack is read once."""
    out: dict[str, set[bytes]] = {}
    rows: dict[str, list[IndexRows]] = {}
    for _, part in zip(*_index_parts(repo), strict=True):
        for number, pack in enumerate(part.packs):
            if pack in packs:
                rows.setdefault(pack, []).append(part.take(np.flatnonzero(part.pack == number)))
    for pack, pieces in rows.items():
        mine = IndexRows.concat(pieces)
        try:
            data = repo.storage.read(fmt.pack_name(pack))
        except DrsyncError:
            out[pack] = set(id_list(mine.ids))  # gone or unreadable: every chunk of it
            continue
        bad = ~_intact(data, mine.ids, mine.offset, mine.stored_length, mine.raw_length, mine.encoding)
        if bad.any():
            out[pack] = set(id_list(mine.ids[bad]))
    return out


def _intact(data: bytes, ids: np.ndarray, offset: np.ndarray, stored_length: np.ndarray, raw_length: np.ndarray,
            encoding: np.ndarray) -> np.ndarray:
    """(N,) bool: chunk i lies whole in the pack's bytes ``data`` at ``offset[i]`` and decodes to bytes
    matching ``ids[i]`` (columns as :class:`IndexRows` and :class:`PackTable` hold them)."""
    view = memoryview(data)
    good = np.zeros(len(ids), bool)
    for i, (cid, off, size, raw, enc) in enumerate(zip(id_list(ids), offset.tolist(), stored_length.tolist(),
                                                       raw_length.tolist(), encoding.tolist(), strict=True)):
        if off + size <= len(data):
            try:
                chunks.decode(enc, view[off:off + size], raw, cid)
                good[i] = True
            except IntegrityError:
                pass
    return good


def forget(repo: Repository, lock: RepositoryLock, *, damaged: Mapping[str, set[bytes]] | None = None,
           dry_run: bool = False) -> RepairReport:
    """Index again the packs no index file names (:func:`orphan_rows`), and drop the index rows of lost
    packs and of ``damaged`` chunks (pack id -> chunk ids, e.g. :meth:`Repository.verify`'s
    ``damaged_at``). ``lock``: the repository's exclusive lock, held. When snapshots name a chunk not held,
    writes ``repaired.json`` (see the module's docstring).

    IntegrityError, nothing changed (safety rule 8's reading of a read error: an unmounted disk is not a
    loss to forget), when every pack the index names is gone, or a pack counted lost is still there but is
    no file (a directory), or the directory ``packs/<2 hex>`` it lies in is gone or no directory (a disk
    mounted there is missing). An index file that cannot be read is an IntegrityError too (its rows cannot
    be kept or dropped knowingly). Memory: the index rows (61 bytes a chunk) and the sorted ids kept (40),
    one file's parts at a time, never joined; then one snapshot's chunk ids at a time."""
    report = RepairReport(dry_run=dry_run)
    names, parts = _index_parts(repo)
    named: set[str] = set()
    for part in parts:
        named |= part.pack_names()
    present = {o.name: o.size for o in repo.storage.list(fmt.PACKS_DIR)}
    lost = {p for p in named if fmt.pack_name(p) not in present}
    if named and lost == named:
        raise IntegrityError(f"every pack the index of {repo.storage.url} names ({len(named)}) is gone from "
                             f"{fmt.PACKS_DIR}: is its storage mounted? nothing was forgotten; restore the "
                             f"repository from a backup or the standby, or init a new one")
    _refuse_unsure(repo, lost)
    orphans, report.reindexed_packs = orphan_rows(repo, present, named)
    report.reindexed_chunks = len(orphans)
    report.lost_packs = sorted(lost)
    kept: list[IndexRows] = []
    dropped: list[np.ndarray] = []
    for i, part in enumerate(parts):
        keep = rows_to_keep(part, lost, damaged or {})
        if not keep.all():
            lost_numbers = [n for n, p in enumerate(part.packs) if p in lost]
            report.damaged_chunks += int((~keep & ~np.isin(part.pack, lost_numbers)).sum())
            report.forgotten_rows += int((~keep).sum())
            dropped.append(part.ids[~keep])
            part = part.take(keep)
        kept.append(part)
        parts[i] = IndexRows.empty()  # each file's rows held once
    del parts
    kept.append(orphans)
    held = IdSet.of_pieces([k.ids for k in kept])
    report.forgotten_chunks = len(IdSet.of_pieces(dropped).difference(held)) if dropped else 0
    del dropped
    if report.changed and not dry_run:
        lock.verify()  # the listings above are whole only while this lock is ours
        write_index(repo.storage, f"{fmt.INDEX_DIR}{secrets.token_hex(16)}.parquet", kept)
    del kept, orphans
    allocators.give_back()
    # Every snapshot naming a chunk not held now: forgotten now or by an earlier repair, or lost with its
    # pack and its index file together (then nothing but the manifests names it any more).
    for info in repo.list_snapshots():
        if not bool(held.contains_many(repo.load_manifest_chunks(info).ids).all()):
            report.incomplete.append(info.id)
        allocators.give_back()
    del held
    if dry_run:
        return report
    if report.incomplete:  # before the old index goes: a crash in between leaves rows to forget again
        mark_repaired(repo, report)
    if report.changed:
        for name in names:
            repo.storage.delete(name)
        repo.reload_index()
        log.info("repository %s: indexed %d chunk(s) of %d pack(s) no index named; forgot %d chunk(s) it no "
                 "longer holds (%d lost pack(s), %d damaged chunk(s)); %d snapshot(s) name chunks it lacks",
                 repo.storage.url, report.reindexed_chunks, len(report.reindexed_packs),
                 report.forgotten_chunks, len(lost), report.damaged_chunks, len(report.incomplete))
    return report


def _refuse_unsure(repo: Repository, lost: set[str]) -> None:
    """IntegrityError when a pack counted lost is there but no file, or its ``packs/<2 hex>`` directory is
    gone or no directory: a read error (a disk not mounted there), not a loss to forget."""
    is_dir = getattr(repo.storage, "is_dir", None)  # local and HDFS storages; an in-memory one has no folders
    for d in sorted({p[:2] for p in lost}) if is_dir is not None else []:
        where = f"{fmt.PACKS_DIR}{d}"
        if not is_dir(where):
            raise IntegrityError(f"{repo.storage.url}/{where} is gone or no directory while the index names packs in "
                                 f"it: is a disk not mounted there? nothing was forgotten; if its packs are truly "
                                 f"lost, create it as an empty directory and run 'drsync repo repair' again")
    for p in sorted(lost):
        if repo.storage.exists(fmt.pack_name(p)):
            raise IntegrityError(f"{repo.storage.url}/{fmt.pack_name(p)} is there but no file (a directory, a "
                                 f"dangling link?); nothing was forgotten: put the pack back, or remove that entry "
                                 f"and run 'drsync repo repair' again")


def mark_repaired(repo: Repository, report: RepairReport) -> None:
    """Write ``repaired.json`` (durable): ``{"at": unix seconds, "snapshots": [ids], "forgotten_chunks": n}``,
    the snapshots ``report`` found naming chunks the repository does not hold."""
    doc = {"at": time.time(), "snapshots": sorted(report.incomplete), "forgotten_chunks": report.forgotten_chunks}
    repo.storage.write(fmt.REPAIRED_NAME, json.dumps(doc, sort_keys=True).encode())


def repaired_snapshots(repo: Repository) -> list[str]:
    """The snapshots ``repaired.json`` lists, [] when there is none. One that is not what a repair writes
    (damage, a directory, a document listing none) counts as listing ``["?"]``: every chunk is still
    checked (:func:`repaired_problem` says what is wrong with it)."""
    try:
        if not repo.storage.exists(fmt.REPAIRED_NAME):
            return []
    except (DrsyncError, OSError):
        return ["?"]
    return _listed(repo)[0] or ["?"]


def repaired_problem(repo: Repository) -> str:
    """What is wrong with ``repaired.json`` ("" when it is absent or what a repair writes), for verify."""
    try:
        if not repo.storage.exists(fmt.REPAIRED_NAME):
            return ""
    except (DrsyncError, OSError) as e:
        return f"{fmt.REPAIRED_NAME} cannot be checked ({e})"
    return _listed(repo)[1]


def _listed(repo: Repository) -> tuple[list[str], str]:
    """(the snapshots ``repaired.json`` lists, "" or what is wrong with it)."""
    bad = (f"{fmt.REPAIRED_NAME} of {repo.storage.url} is not what 'drsync repo repair' writes; every chunk of "
           f"each commit and capture is checked until it is gone: remove it (a repair writes it again if needed)")
    try:
        data = repo.storage.read(fmt.REPAIRED_NAME)
        if len(data) > fmt.SMALL_DOC_MAX_BYTES:
            return [], bad
        doc = json.loads(data)
    except (DrsyncError, OSError, ValueError, UnicodeDecodeError) as e:
        return [], f"{bad} ({e})"
    snaps = doc.get("snapshots") if isinstance(doc, dict) else None
    if isinstance(snaps, list) and snaps and all(isinstance(x, str) for x in snaps):
        return snaps, ""
    return [], bad


def clear_repaired(repo: Repository) -> bool:
    """Remove ``repaired.json``: a commit or capture checked every chunk of its snapshot and found them all
    held. One that cannot be removed (a directory, say) is left with a WARNING saying so (False)."""
    try:
        repo.storage.delete(fmt.REPAIRED_NAME)
        return True
    except (DrsyncError, OSError) as e:
        log.warning("repository %s: could not remove %s (%s): remove it; until then every commit and capture "
                    "checks every chunk", repo.storage.url, fmt.REPAIRED_NAME, e)
        return False


def lost_of(repo: Repository, parent: Manifest | ManifestFile) -> IdSet:
    """The chunks ``parent`` names that the repository does not hold (after a repair forgot them): a
    capture reads the files naming them again. Loads the index (the rare path: ``repaired.json`` is there)."""
    pieces = [ids_array(pc.list_flatten(t.column("chunks"))) for t in column_groups(parent, ["chunks"])]
    ids = IdSet.of(np.concatenate(pieces)) if pieces else IdSet.empty()
    if not len(ids):
        return ids
    held = repo.index.contains_many(ids.ids)
    return IdSet(ids.ids[~held], ids.key[~held])


def settle(repo: Repository, info: SnapshotInfo, manifest: Spool) -> None:
    """After a capture read again what a repair forgot: remove ``repaired.json`` when the new snapshot's
    every chunk is held (its manifest's bytes, ``manifest``); else leave it and say which (a file that could
    not be read keeps its last version, and its chunks stay lost)."""
    table = Manifest.from_bytes(manifest, f"manifest of snapshot {info.id}")
    try:
        repo.check_chunks_present(table.chunk_id_column(), f"snapshot {info.id}")
    except ChunksLost as e:
        log.warning("repository %s: %s; restore those files from the standby or a backup", repo.storage.url, e)
        return
    if clear_repaired(repo):
        log.info("repository %s holds every chunk of snapshot %s again (after a repair)", repo.storage.url, info.id)
