"""Portable backups: a snapshot pulled out into a self-contained directory.

A backup directory is a one-snapshot drsync repository (same documented
format) plus ``backup.json`` (what it is) and ``CHECKSUMS.b3`` (a BLAKE3 line
per file). It is built under ``.partial-*`` and renamed into place only when
complete and synced, so an interrupted creation never looks like a backup.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import blake3
import numpy as np

from drsync import documents, faults, fsutil
from drsync.apply import ApplyResult, ForeignTarget, apply_manifest
from drsync.config import KeepPolicy
from drsync.errors import IntegrityError, NotFound, UsageError
from drsync.pathglob import compile_globs
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import ID_DTYPE, id_list
from drsync.repository.lock import DEFAULT_WAIT_S
from drsync.repository.manifest import (
    FILE,
    Manifest,
    ManifestCounts,
    ManifestFile,
    chunks_in_order,
    manifest_counts,
)
from drsync.repository.manifest_check import validate
from drsync.repository.repo import Repository, VerifyReport
from drsync.repository.snapshots import SnapshotInfo, iso
from drsync.repository.spool import Spool
from drsync.retention import RetentionDecision, plan_retention
from drsync.storage.local import LocalStorage
from drsync.units import parse_iso

BACKUP_META = fmt.BACKUP_META
CHECKSUMS = "CHECKSUMS.b3"
BACKUP_FORMAT = 1
MODES = ("full", "light", "dataless")
EXPORT_FLUSH = 1 << 18  # chunks copied into a backup between index files


@dataclass
class BackupInfo:
    id: str
    path: str
    mode: str
    created_at: float
    snapshot: dict[str, Any]
    excluded: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    stored_bytes: int = 0
    format: int = BACKUP_FORMAT

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["created_at"] = iso(self.created_at)
        return doc


# A backup.json holds the snapshot's document (at most SNAPSHOT_DOC_MAX_BYTES) and a few fields.
BACKUP_META_MAX_BYTES = fmt.SNAPSHOT_DOC_MAX_BYTES + fmt.SMALL_DOC_MAX_BYTES


def _read_meta(path: str) -> BackupInfo:
    """The backup.json of the backup directory ``path``. NotFound: no such directory; UsageError: not a
    complete backup, or a newer format; IntegrityError: damaged (not a regular file of at most
    ``BACKUP_META_MAX_BYTES``, not strict JSON, a field missing or of the wrong type, a time no date can
    show). It is never opened unless it is a regular file (a fifo would block the reader for good)."""
    meta = os.path.join(path, BACKUP_META)
    if not os.path.isdir(path):
        raise NotFound(f"backup {path} does not exist")
    try:
        st = os.lstat(meta)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{meta} is damaged: it is not a regular file")
        if st.st_size > BACKUP_META_MAX_BYTES:
            raise IntegrityError(f"{meta} is damaged: it is {st.st_size} bytes, a backup.json is at most "
                                 f"{BACKUP_META_MAX_BYTES}; it was not read")
        fd = os.open(meta, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(BACKUP_META_MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path} is not a complete drsync backup (no {BACKUP_META})") from None
    if len(raw) > BACKUP_META_MAX_BYTES:
        raise IntegrityError(f"{meta} is damaged: it grew past {BACKUP_META_MAX_BYTES} bytes while read")
    try:
        doc = documents.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError(f"a JSON {type(doc).__name__}, not an object")
        version = doc.get("format", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"format {version!r} is not a number")
        if version > BACKUP_FORMAT:
            raise UsageError(f"backup {path} has format {version}, newer than this drsync understands; "
                             f"upgrade drsync")
        unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(BackupInfo)} - {"path"})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} (a backup.json of format {version} has none)")
        missing = [k for k in ("id", "mode", "created_at", "snapshot") if k not in doc]
        if missing:
            raise ValueError(f"field {missing[0]!r} is missing")
        doc["created_at"] = parse_iso(doc["created_at"])
        doc["path"] = fsutil.absolute(path)
        info = BackupInfo(**doc)
        _check_types(info)
        return info
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{meta} is damaged: {e}") from None


def _check_types(info: BackupInfo) -> None:
    """TypeError or ValueError naming the first field of a backup.json that a backup never holds."""
    if not isinstance(info.id, str):
        raise TypeError(f"id {info.id!r} is not a string")
    if info.mode not in MODES:
        raise ValueError(f"mode {info.mode!r} is not one of {', '.join(MODES)}")
    for name in ("files", "bytes", "stored_bytes"):
        v = getattr(info, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
            raise TypeError(f"{name} {v!r} is not a count")
    if not isinstance(info.snapshot, dict):
        raise TypeError("snapshot is not an object")
    if not isinstance(info.excluded, list) or not all(isinstance(x, str) for x in info.excluded):
        raise TypeError("excluded is not a list of globs")


def create_backup(repo: Repository, ref: str, dest: str, *, mode: str = "full",
                  light_exclude: tuple[str, ...] = (),
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> BackupInfo:
    if mode not in MODES:
        raise UsageError(f"backup mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "light" and not light_exclude:
        raise UsageError("a light backup needs [backups] light_exclude globs in the config (the bulk data "
                         "it leaves out)")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UsageError(f"backup destination {dest} is a file; name a directory")
    inside = repository_around(dest)
    if inside:
        raise UsageError(f"backup destination {dest} lies inside the drsync repository {inside}, whose garbage "
                         f"collection and listings would take the backup for its own files; name a directory "
                         f"outside it")
    with repo.lock(exclusive=False, wait_s=DEFAULT_WAIT_S):
        info = repo.find_snapshot(ref)
        prepared = _prepare(repo, info, mode, light_exclude)
        created = time.time()
        backup_id = f"{datetime.fromtimestamp(created, UTC):%Y%m%dT%H%M%SZ}-{info.id}-{mode}"
        os.makedirs(dest, exist_ok=True)
        final = os.path.join(dest, backup_id)
        if os.path.exists(final):
            raise UsageError(f"backup {final} exists already")
        partial = os.path.join(dest, f".partial-{backup_id}-{secrets.token_hex(4)}")
        with _dest_lock(dest, fcntl.LOCK_SH):  # no prune looks at leftovers before this one is locked
            os.mkdir(partial)
            held = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(held, fcntl.LOCK_EX)  # a prune meanwhile leaves this directory alone
        try:
            faults.pause("backup")
            binfo = _build(repo, info, prepared, partial, backup_id, mode, created, progress, on_total)
            fsutil.syncfs(partial)
            os.rename(partial, final)
            fsutil.fsync_dir(dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            os.close(held)
    binfo.path = fsutil.absolute(final)
    return binfo


def repository_around(path: str) -> str:
    """The drsync repository ``path`` (a local directory, existing or not) is, or lies inside, or ""."""
    from drsync.dataroot.local import is_repository

    p = os.path.realpath(path)
    while True:
        if is_repository(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return ""
        p = parent


@dataclass
class _Prepared:
    """What a backup holds of a snapshot: its manifest (a spool: in a temporary file when large; closed
    once written into the backup), counts, and the ``(U,)`` chunk ids to copy in manifest order (none
    for a dataless backup)."""
    manifest: Spool
    counts: ManifestCounts
    chunk_ids: np.ndarray
    excluded: list[str]


def _prepare(repo: Repository, info: SnapshotInfo, mode: str, light_exclude: tuple[str, ...]) -> _Prepared:
    """Full and dataless backups hold the snapshot's manifest as stored, read here a row group at a time
    (a manifest of 1,000,000 files is about 160 MiB as a table); a light one is filtered whole. Raises
    UsageError for a snapshot whose bytes are not all in the repository (captured for DistCp)."""
    stored = repo.manifest_spool(info)
    manifest: Manifest | ManifestFile = ManifestFile(stored, f"manifest of snapshot {info.id}")
    # A backup no restore would accept is refused now, not found out when it is needed (IntegrityError).
    validate(manifest, f"manifest of snapshot {info.id}")
    counts = manifest_counts(manifest)
    outside = counts.external
    if outside and mode != "dataless":
        raise UsageError(f"snapshot {info.id} was captured for DistCp (replication.engine = \"distcp\"): the "
                         f"bytes of {outside} file(s) are in HDFS snapshot {info.content_snapshot or '(none)'}, "
                         f"not in the repository, so a {mode} backup cannot hold them; take a dataless backup, "
                         f"or capture with 'drsync snapshot create' (which reads every byte) and back that up")
    excluded: list[str] = []
    if mode == "light":
        match = compile_globs(light_exclude)
        whole = manifest.read()
        manifest = whole.without(match)
        del whole
        stored.close()
        stored = manifest.to_spool()
        counts = manifest_counts(manifest)
        excluded = list(light_exclude)
    ids = chunks_in_order(manifest) if mode != "dataless" else np.empty(0, ID_DTYPE)
    return _Prepared(stored, counts, ids, excluded)


def _build(repo: Repository, info: SnapshotInfo, prepared: _Prepared, partial: str, backup_id: str, mode: str,
           created: float, progress: Callable[[int], None] | None,
           on_total: Callable[[int], None] | None) -> BackupInfo:
    storage = LocalStorage(partial, create=True)
    brepo = Repository.init(storage, cluster_id=info.cluster_id, release=info.release)
    counts = prepared.counts
    # The manifest goes in first and its bytes are dropped before the chunks are copied: nothing in the
    # partial directory is visible before the rename, whatever order it is written in.
    snap = dataclasses.replace(info, manifest_hash=prepared.manifest.hexdigest(), files=counts.files,
                               bytes=counts.bytes)
    with prepared.manifest:  # closed: its bytes (or temporary file) go before the chunks are copied
        brepo.commit_snapshot(snap, prepared.manifest)
    # Each chunk id once, into an empty repository: an export writer, flushed every EXPORT_FLUSH chunks
    # (an index file each), holds at most that many index rows.
    writer = brepo.chunk_writer(export=True)
    if len(prepared.chunk_ids):
        if on_total:
            on_total(counts.bytes)
        for start in range(0, len(prepared.chunk_ids), EXPORT_FLUSH):
            for cid in id_list(prepared.chunk_ids[start:start + EXPORT_FLUSH]):
                loc, data = repo.read_stored(cid)
                chunks.decode(loc.encoding, data, loc.raw_length, cid)  # never export a damaged chunk
                writer.add_stored(cid, loc.encoding, data, loc.raw_length)
                if progress:
                    progress(loc.raw_length)
            writer.flush()
    binfo = BackupInfo(id=backup_id, path=partial, mode=mode, created_at=created, snapshot=info.to_json(),
                       excluded=prepared.excluded, files=snap.files, bytes=snap.bytes,
                       stored_bytes=writer.new_stored_bytes)
    doc = binfo.to_json()
    doc.pop("path")
    fsutil.atomic_write(os.path.join(partial, BACKUP_META), json.dumps(doc, indent=1).encode(), durable=False)
    lines = [f"{_hash_file(os.path.join(partial, rel))}  {rel}\n" for rel in _files(partial)]
    fsutil.atomic_write(os.path.join(partial, CHECKSUMS), "".join(lines).encode(), durable=False)
    return binfo


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            if rel != CHECKSUMS and not f.startswith(".tmp-"):
                out.append(rel)
    return sorted(out)


def _hash_file(path: str) -> str:
    """The BLAKE3 hex digest of a backup's file; NotRegular for a pipe, socket, device or link there."""
    h = blake3.blake3()
    with open(fsutil.open_regular(path), "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


@dataclass
class BackupVerifyReport:
    backup: str
    damaged_backup_files: list[dict[str, str]] = field(default_factory=list)
    repository: VerifyReport | None = None

    @property
    def ok(self) -> bool:
        return not self.damaged_backup_files and (self.repository is None or self.repository.ok)

    def as_dict(self) -> dict[str, Any]:
        return {"backup": self.backup, "ok": self.ok, "damaged_backup_files": self.damaged_backup_files,
                "repository": self.repository.as_dict() if self.repository else None}


def verify_backup(path: str, *, progress: Callable[[int], None] | None = None) -> BackupVerifyReport:
    report = BackupVerifyReport(fsutil.absolute(path))
    try:
        meta: BackupInfo | None = _read_meta(path)
    except IntegrityError as e:  # a damaged backup.json is damage like any other file's, in the report
        meta = None
        report.damaged_backup_files.append({"file": BACKUP_META, "reason": f"unreadable ({e})"})
    listed: dict[str, str] = {}
    try:
        with open(fsutil.open_regular(os.path.join(path, CHECKSUMS)), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                digest, _, rel = line.rstrip("\n").partition("  ")
                parts = rel.split("/")
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel or \
                        rel.startswith("/") or ".." in parts or "" in parts:
                    # A blank or damaged line, or a path leading out of the backup: never read as a file name.
                    report.damaged_backup_files.append({"file": CHECKSUMS, "reason": f"line {number} is not "
                                                        f"'<BLAKE3 hex>  <path inside the backup>'"})
                    continue
                listed[rel] = digest
    except FileNotFoundError:
        report.damaged_backup_files.append({"file": CHECKSUMS, "reason": "missing"})
    except (UnicodeDecodeError, ValueError, OSError):
        report.damaged_backup_files.append({"file": CHECKSUMS, "reason": "unreadable"})
    present = set(_files(path))
    for rel, digest in sorted(listed.items()):
        if rel not in present:
            report.damaged_backup_files.append({"file": rel, "reason": "missing"})
        else:
            try:
                same = _hash_file(os.path.join(path, rel)) == digest
            except fsutil.NotRegular:
                report.damaged_backup_files.append({"file": rel, "reason": "not a regular file (never opened)"})
                continue
            except OSError as e:
                report.damaged_backup_files.append({"file": rel, "reason": f"unreadable ({e.strerror or e})"})
                continue
            if not same:
                report.damaged_backup_files.append({"file": rel, "reason": "checksum mismatch"})
    for rel in sorted(present - set(listed)):
        report.damaged_backup_files.append({"file": rel, "reason": "not listed in the checksum file"})
    try:
        repo = Repository.open(LocalStorage(path))
    except (NotFound, IntegrityError) as e:
        # The backup's repository cannot be opened (its config.json is gone or damaged): that is damage
        # to the backup, reported with the rest, not a command used wrongly.
        if not any(d["file"] == "config.json" for d in report.damaged_backup_files):
            report.damaged_backup_files.append({"file": "config.json", "reason": f"unreadable ({e})"})
        return report
    report.repository = repo.verify(on_progress=progress, require_chunks=meta is None or meta.mode != "dataless")
    return report


def restore_backup(path: str, target: str, *, checksum: bool = False,
                   progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None, dry_run: bool = False,
                   foreign: ForeignTarget | None = None,
                   protect: tuple[str, ...] = ()) -> tuple[BackupInfo, ApplyResult]:
    """Restore onto any data root: a backup is portable across clusters and releases. ``dry_run``,
    ``foreign`` and ``protect`` (drsync's own paths that may lie in the target: left alone) as in
    :func:`drsync.apply.apply_manifest`; any other drsync repository the restore would change refuses it."""
    meta = _read_meta(path)
    repo = Repository.open(LocalStorage(path))
    snaps = repo.list_snapshots()
    if len(snaps) != 1:
        raise IntegrityError(f"backup {path} should hold one snapshot, it holds {len(snaps)}")
    manifest = repo.load_manifest(snaps[0], lean=True)
    result = apply_manifest(manifest, repo, target, what=f"backup {meta.id}", checksum=checksum, replan=True,
                            exclude=tuple(meta.excluded), structure_only=meta.mode == "dataless",
                            progress=progress, on_total=on_total, protect=(path, *protect), dry_run=dry_run,
                            foreign=foreign, keep_repositories=True,
                            captured_root=foreign is None)  # the cluster's own data root (CLI)
    if meta.mode == "dataless":
        result.warnings.append("dataless backup: directories and links restored, file contents are not "
                               "in this backup")
    return meta, result


@dataclass
class BackupListing:
    """What a backup directory holds: ``backups`` complete and readable, oldest first; ``incomplete``
    the names of leftovers of a create or prune that did not finish; ``damaged`` one
    ``{"file": "<name>/backup.json", "reason": ...}`` per backup whose backup.json cannot be read."""

    backups: list[BackupInfo]
    incomplete: list[str]
    damaged: list[dict[str, str]]


# A backup dated later than this past now is not ordered by its date (a clock that was ahead).
FUTURE_SKEW_S = 300.0


def list_backups(dest: str) -> BackupListing:
    """The backups in ``dest``, oldest first (equal times: a directory named by its backup's id, the
    original, after a copy). Listed in ``damaged``, never an error and never pruned: a backup.json that
    cannot be read, a directory without the rest of a backup (``CHECKSUMS.b3``, ``config.json``), a
    symbolic link (its backup lies elsewhere), and a backup dated more than ``FUTURE_SKEW_S`` ahead (its
    age is unknown: ordered by that date it would outlive every real backup). One bad backup must not
    hide the others, nor stop an agent's backups. NotFound: ``dest`` is not a directory."""
    if not os.path.isdir(dest):
        what = "is not a directory" if os.path.exists(dest) else "does not exist"
        raise NotFound(f"backup directory {dest} {what}")
    done, partial, damaged = [], [], []
    now = time.time()
    for name in sorted(os.listdir(dest)):
        p = os.path.join(dest, name)
        if name.startswith((".partial-", ".deleting-")):
            if os.path.islink(p):
                damaged.append({"file": name, "reason": f"{p} is a symbolic link named like a leftover of an "
                                                        f"interrupted backup or prune: prune leaves it alone"})
            elif os.path.isdir(p):
                partial.append(name)
            continue
        if not os.path.lexists(os.path.join(p, BACKUP_META)):
            continue  # not a backup (a file, or a directory of something else)
        try:
            if os.path.islink(p):
                raise IntegrityError(f"{p} is a symbolic link: its backup lies elsewhere, and prune leaves it alone")
            info = _read_meta(p)
            for part in (CHECKSUMS, "config.json"):
                if not os.path.isfile(os.path.join(p, part)):
                    raise IntegrityError(f"{p} has a {BACKUP_META} but no {part}: not a complete backup")
            if info.created_at > now + FUTURE_SKEW_S:
                raise IntegrityError(f"{p} says it was created in the future ({iso(info.created_at)}), by a clock "
                                     f"that was ahead or a copy from elsewhere: its age is unknown")
            done.append(info)
        except (IntegrityError, UsageError) as e:  # damaged, or written by a newer drsync: left alone
            damaged.append({"file": f"{name}/{BACKUP_META}", "reason": str(e)})
    done.sort(key=lambda b: (b.created_at, os.path.basename(b.path) == b.id, os.path.basename(b.path)))
    return BackupListing(done, partial, damaged)


@contextmanager
def _dest_lock(dest: str, how: int) -> Iterator[None]:
    """A lock on the backup directory itself, held for a moment: shared while a creator makes and locks
    its ``.partial-`` directory, exclusive while a prune decides which leftovers are abandoned (between
    the two steps of a creator, its directory would look abandoned)."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _being_written(path: str) -> bool:
    """Whether a ``.partial-`` directory belongs to a backup being created now (its creator holds a
    lock on the directory; a crashed creator holds none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock taken here
    return False


@dataclass
class PruneResult:
    """What a prune decided for each readable backup, the backups it could not read (kept), those it
    decided to remove but could not (``{"backup": directory, "reason": ...}``; the others were removed
    all the same), and the leftovers of interrupted creations and removals it removed (or, on a dry run,
    would remove)."""

    decisions: list[RetentionDecision]
    damaged: list[dict[str, str]]
    failed: list[dict[str, str]] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def removed(self) -> list[str]:
        """The backups removed (decided and not failed)."""
        failed = {f["backup"] for f in self.failed}
        return [d.id for d in self.decisions if not d.keep and d.id not in failed]


def prune_backups(dest: str, policy: KeepPolicy, *, dry_run: bool = False) -> PruneResult:
    """Remove the backups ``policy`` does not keep, and incomplete leftovers. Decisions name backups by
    their directory (what is removed; a copied or renamed backup keeps the id in its backup.json). A
    backup whose backup.json cannot be read is never removed (nothing says how old it is): it is in
    ``damaged``. What another prune removed meanwhile counts as removed."""
    if policy.is_empty():
        raise UsageError("give at least one --keep-* option; pruning with no policy would delete everything")
    listing = list_backups(dest)
    decisions = plan_retention([(os.path.basename(b.path), b.created_at) for b in listing.backups], policy,
                               in_order=True)  # list_backups' order: an original after its copy
    if dry_run:
        abandoned = [n for n in listing.incomplete if not _being_written(os.path.join(dest, n))]
        return PruneResult(decisions, listing.damaged, leftovers=abandoned)
    failed: list[dict[str, str]] = []
    for d in decisions:
        if not d.keep:
            problem = _remove_dir(dest, d.id)
            if problem:
                failed.append({"backup": d.id, "reason": problem})
    leftovers = []
    for name in listing.incomplete:  # an earlier prune's or creation's leftovers: named when they stay
        path = os.path.join(dest, name)
        with _dest_lock(dest, fcntl.LOCK_EX):
            if _being_written(path) or not os.path.isdir(path):
                continue
        problem = _rmtree(dest, path)
        if problem:
            failed.append({"backup": name, "reason": problem})
        else:
            leftovers.append(name)
    fsutil.fsync_dir(dest)
    return PruneResult(decisions, listing.damaged, failed, leftovers)


# The longest name a directory entry may have (ext4, XFS, btrfs: 255 bytes).
NAME_MAX = 255


def _doomed_name(name: str) -> str:
    """``.deleting-NAME``, or, where that would be longer than a name may be, ``.deleting-`` with as much
    of NAME as fits and a hash of all of it (a backup renamed to a long name must still be removable)."""
    doomed = f".deleting-{name}"
    if len(os.fsencode(doomed)) <= NAME_MAX:
        return doomed
    digest = blake3.blake3(os.fsencode(name)).hexdigest()[:16]
    head = os.fsencode(name)[:NAME_MAX - len(".deleting-") - len(digest) - 1]
    return f".deleting-{head.decode('utf-8', 'ignore')}-{digest}"


def _remove_dir(dest: str, name: str) -> str:
    """Remove backup ``name``: "" when it is gone (another prune may have removed it), else why not."""
    # Rename first: a prune cut short leaves a '.deleting-' directory, never a half backup.
    doomed = os.path.join(dest, _doomed_name(name))
    try:
        os.rename(os.path.join(dest, name), doomed)
    except FileNotFoundError:
        return ""  # removed meanwhile (another prune)
    except OSError as e:
        return f"{e.strerror or e} (renaming it to {os.path.basename(doomed)})"
    fsutil.fsync_dir(dest)
    return _rmtree(dest, doomed)


def _rmtree(dest: str, path: str) -> str:
    """Remove the tree at ``path``, as much of it as can go: "" when all of it went (or was gone), else
    the first failure, naming its file relative to ``dest``."""
    problems: list[str] = []

    def failed(_fn: object, where: str, exc: tuple[type[BaseException], BaseException, object]) -> None:
        e = exc[1]
        if isinstance(e, FileNotFoundError):
            return  # removed meanwhile (another prune removing the same leftover)
        if not problems:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            problems.append(f"{reason} ({os.path.relpath(where, dest)})")

    shutil.rmtree(path, onerror=failed)
    return problems[0] if problems else ""


__all__ = ["FILE", "BackupInfo", "BackupListing", "PruneResult", "create_backup", "list_backups", "prune_backups",
           "restore_backup", "verify_backup"]
