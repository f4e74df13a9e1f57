"""Snapshot operations: what the command line and the agent call.

Each function takes the repository lock it needs, runs hooks, and turns the
pieces (capture, apply, repository) into one operation with one result.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from drsync import allocators, faults, fsutil
from drsync.capture import CHUNKS, HDFS_CHECKSUM, capture
from drsync.config import MAX_DURATION_S, Config, KeepPolicy
from drsync.dataroot import DataRoot, open_data_root
from drsync.dataroot.distcp import DistCpSettings, DistCpStager, content_source, root_url
from drsync.errors import LockedError, OperationFailed, RefusedError, UsageError
from drsync.fsutil import local_location
from drsync.protection import (
    Protection,
    check_deletable,
    read_window,
    record_break_glass,
    record_window,
    split_protected,
)
from drsync.repository import repair
from drsync.repository.lock import DEFAULT_WAIT_S
from drsync.repository.repo import GcReport, Repository, VerifyReport
from drsync.repository.snapshots import SnapshotInfo, new_snapshot_id
from drsync.retention import plan_retention
from drsync.storage import open_storage
from drsync.text import printable

if TYPE_CHECKING:  # the apply machinery (numpy and all) is imported by a restore only
    from drsync.apply import ApplyResult, ForeignTarget

log = logging.getLogger("drsync.engine")

LOCK_WAIT_S = DEFAULT_WAIT_S


def local_path(url: str, what: str) -> str:
    """A local directory from a path or file:// URL, for what must be local (the agent's state)."""
    local = local_location(url)
    if local is None:
        raise UsageError(f"{what} {url} is not a local path; set agent.state_dir to a local directory")
    return local


def data_root_url(url: str) -> str:
    """The canonical form of a data root: an absolute path, or an HDFS URL as drsync writes it."""
    return open_data_root(url).url


def open_repository(url: str, *, retry_s: float | None = None) -> Repository:
    """``retry_s``: for a repository on HDFS, seconds a request is retried (None: the client's default)."""
    return Repository.open(open_storage(url, retry_s=retry_s))


def init_repository(url: str, *, cluster_id: str, release: str, protect_s: float = 0.0,
                    state_dir: str = "") -> Repository:
    """Create the repository at ``url`` (``drsync init``); with ``protect_s`` > 0 (seconds) record that
    ``[snapshots] protect`` window in it (:func:`record_protection`; ``state_dir``: the keeping agent's).
    UsageError when a repository is already there or the window is not 0 to 1000 years (nothing is created);
    OperationFailed when the storage cannot be written."""
    if not 0 <= protect_s <= MAX_DURATION_S:  # also NaN
        raise UsageError(f"a protect window of {protect_s!r} seconds cannot be recorded: give 0 to 1000 years")
    repo = Repository.init(open_storage(url, create=True), cluster_id=cluster_id, release=release)
    if protect_s > 0:
        record_protection(repo, protect_s, by="drsync init", state_dir=state_dir)
    return repo


@dataclass(frozen=True)
class Hooks:
    pre: str = ""
    post: str = ""
    timeout_s: float = 300.0


def run_hook(kind: str, command: str, env: dict[str, str], timeout_s: float) -> None:
    try:
        proc = subprocess.run(command, shell=True, env=allocators.environ_for_children(env), timeout=timeout_s,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"{kind} hook {shlex.quote(command)} did not finish within "
                              f"{timeout_s:.0f}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = f": {detail[-1]}" if detail else ""
        raise OperationFailed(f"{kind} hook {shlex.quote(command)} exited with {proc.returncode}{last}")


@dataclass
class SnapshotRequest:
    data_root: str
    name: str = ""
    reason: str = ""
    ttl_s: float | None = None
    kind: str = "manual"
    hooks: Hooks = field(default_factory=Hooks)
    reread_attempts: int = 3
    # Local paths of drsync's own inside the data root (the agent's state directory): left out.
    exclude_paths: tuple[str, ...] = ()
    # Capture an empty root although the parent snapshot was not empty (else refused: unmounted?), and
    # the filesystems mounted inside it as they are (else one unmounted or emptied keeps its last version).
    allow_empty: bool = False
    # replication.engine = "distcp": files are checksummed, not read, and the capture's HDFS snapshot
    # is kept for a standby's DistCp (drsync.dataroot.distcp); pinned: older ones still copied from.
    distcp: DistCpSettings | None = None
    pinned: frozenset[str] = frozenset()
    # Told of each new chunk as the capture stores it (ChunkWriter.tee): an agent's early upload.
    on_chunk: Callable[[bytes, int, bytes | memoryview, int], None] | None = None


def distcp_settings(cfg: Config) -> DistCpSettings | None:
    """How this cluster's agent runs DistCp, or None with ``replication.engine = "agent"``."""
    r = cfg.replication
    if r.engine != "distcp":
        return None
    root = urlsplit(cfg.cluster.data).path or "/"
    return DistCpSettings.from_strings(r.distcp_command, r.distcp_jar, r.distcp_url, posixpath.normpath(root))


def create_snapshot(repo: Repository, req: SnapshotRequest, *,
                    progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None,
                    clock: Callable[[], float] = time.time) -> SnapshotInfo:
    """Capture ``req.data_root`` into ``repo`` as its newest snapshot (the next sequence number).

    ``clock`` gives the capture time (Unix seconds) and is the wall clock; a test passes a
    skewed one to play a machine whose clock is wrong. Nothing orders snapshots by that time:
    the parent is the newest snapshot by sequence, and so is the new one once committed.
    """
    repo.refuse_if_read_only()
    data_root = open_data_root(req.data_root)
    data_root.check_capturable()
    root = data_root.url
    # A repository or agent state kept inside the data root is not part of the cluster's data. Where
    # it lies is decided on the real filesystem (symlinks resolved), not by comparing path strings.
    exclude = frozenset(r for r in (_inside(data_root, p) for p in (repo.storage.url, *req.exclude_paths)) if r)
    hook_env = {"DRSYNC_DATA": root, "DRSYNC_SNAPSHOT_NAME": req.name, "DRSYNC_REPOSITORY": repo.storage.url}
    with repo.write_session(wait_s=LOCK_WAIT_S) as session:
        parent = _parent_of(repo, root)
        # Read in place (not copied), and checked unchanged once the capture is done with it (below).
        parent_manifest = repo.open_manifest(parent, in_place=True) if parent else None
        repaired = bool(repair.repaired_snapshots(repo))
        lost = repair.lost_of(repo, parent_manifest) if repaired and parent_manifest is not None else None
        if req.hooks.pre:
            run_hook("pre-snapshot", req.hooks.pre, hook_env, req.hooks.timeout_s)
        started = time.monotonic()
        captured_at = clock()
        writer = session.chunk_writer()
        writer.tee = req.on_chunk
        post_error: OperationFailed | None = None
        try:
            try:
                result = capture(data_root, writer, parent=parent_manifest,
                                 parent_captured_at=parent.captured_at if parent else None,
                                 reread_attempts=req.reread_attempts, exclude=exclude,
                                 progress=progress, on_total=on_total, captured_at=captured_at,
                                 allow_empty=req.allow_empty,
                                 content=HDFS_CHECKSUM if req.distcp is not None else CHUNKS, pinned=req.pinned,
                                 parent_volumes=parent.volumes if parent else None,
                                 parent_root_volume=parent.root_volume if parent else None, lost=lost)
            finally:
                if req.hooks.post:
                    try:
                        run_hook("post-snapshot", req.hooks.post, hook_env, req.hooks.timeout_s)
                    except OperationFailed as e:
                        post_error = e
            writer.flush()
            if parent_manifest is not None:  # its rows decided what was reused: as hashed, or refused
                parent_manifest.check_unchanged()
        except BaseException:
            writer.abort()
            raise
        info = SnapshotInfo(
            id=new_snapshot_id(), captured_at=captured_at, cluster_id=repo.config.cluster_id,
            release=repo.config.release, manifest_hash=result.stored.hexdigest(),
            name=req.name, reason=req.reason, kind=req.kind, ttl_s=req.ttl_s, source=root,
            parent=parent.id if parent else None, files=result.files, bytes=result.bytes,
            new_bytes=writer.new_bytes, read_bytes=result.read_bytes, reused_files=result.reused_files,
            duration_s=round(time.monotonic() - started, 3),
            warnings=result.warnings.lines(), stale_paths=result.stale, skipped_paths=result.skipped,
            content_snapshot=(f"{root_url(req.distcp, data_root)}/.snapshot/{result.content_snapshot}"
                              if req.distcp is not None and result.content_snapshot else ""),
            content_checksum=",".join(sorted(result.checksum_algorithms)), volumes=result.volumes,
            root_volume=result.root_volume)
        # Not re-checked chunk by chunk: whatever this capture reuses is named by the parent, which
        # cannot be deleted (nor its chunks collected) while the session's shared lock is held; the
        # commit checks that the lock is still held (lost: another process removed it as stale).
        faults.pause("snapshot-commit")  # tests: captured and flushed, the shared lock held, not committed
        with result.stored:
            info = session.commit(info, result.stored, require_chunks=False)
            if repaired:
                repair.settle(repo, info, result.stored)
    for w in result.warnings.lines():
        log.warning("snapshot %s: %s", info.id, w)
    if result.stale or result.skipped:
        log.warning("snapshot %s: %d path(s) could not be read and keep their last captured version (stale), "
                    "%d could not be captured at all", info.id, result.stale, result.skipped)
    if post_error is not None:
        raise OperationFailed(f"snapshot {info.id} was taken, but {post_error}")
    return info


def _parent_of(repo: Repository, root: str) -> SnapshotInfo | None:
    """The newest snapshot (by sequence) of this data root and cluster: what the capture compares with. A
    local root is the same directory under another spelling too (a symlink to it, a bind mount: compared by
    device and inode), so that its guards (an emptied or unmounted root, unreadable paths kept) hold."""
    snaps = [s for s in repo.list_snapshots() if s.cluster_id == repo.config.cluster_id]
    same: dict[str, bool] = {root: True}
    local = fsutil.is_local_location(root)
    for s in reversed(snaps):
        if s.source not in same:
            same[s.source] = local and fsutil.is_local_location(s.source) and fsutil.same_place(s.source, root)
        if same[s.source]:
            return s
    return None


def check_same_cluster(info: SnapshotInfo, cluster_id: str, release: str) -> None:
    problems = []
    if info.cluster_id != cluster_id:
        problems.append(f"cluster id {info.cluster_id!r}, this cluster is {cluster_id!r}")
    if info.release != release:
        problems.append(f"release {info.release!r}, this cluster runs {release!r}")
    if problems:
        raise RefusedError(
            f"snapshot {info.id} has {' and '.join(problems)}: a snapshot restores only onto the same "
            f"cluster and release; to move data, pull a backup ('drsync backup create --snapshot "
            f"{info.id} --dest DIR') and restore it with 'drsync backup restore'")


def _inside(root: DataRoot, path: str) -> str | None:
    """Where drsync's own ``path`` (the repository, a state directory) lies inside the data root, relative,
    to be left out of the capture; None when outside it. UsageError when it is the data root itself: a
    capture would take the repository (or state) as the cluster's data, and change it as it reads."""
    try:
        return root.relative_inside(path)
    except UsageError:
        raise UsageError(f"{printable(path)} is the data root itself: drsync's repository or state cannot be the "
                         f"data it captures; keep it outside the data root (or in a directory of its own "
                         f"inside it); nothing was captured") from None


def restore_snapshot(repo: Repository, ref: str, target: str, *, cluster_id: str, release: str,
                     checksum: bool = False, progress: Callable[[int], None] | None = None,
                     on_total: Callable[[int], None] | None = None,
                     protect: tuple[str, ...] = (), dry_run: bool = False,
                     foreign: ForeignTarget | None = None, distcp: DistCpSettings | None = None,
                     data_root: str | None = None) -> tuple[SnapshotInfo, ApplyResult]:
    """Restore snapshot ``ref`` onto ``target`` (see :func:`drsync.apply.apply_manifest` for ``dry_run``
    and ``foreign``).

    A snapshot captured for DistCp is copied by DistCp (``distcp``, the config's settings) from the
    HDFS snapshot that still holds it: the standby's history snapshot of ``data_root`` (its own
    data root, where it applied it) first, else the one the primary kept when it captured it."""
    with repo.lock(exclusive=False, wait_s=LOCK_WAIT_S):
        info = repo.find_snapshot(ref)
        check_same_cluster(info, cluster_id, release)
        manifest = repo.load_manifest(info, lean=True)
        external = None
        if manifest.external_count() and not dry_run:
            if distcp is None:
                raise UsageError(f"snapshot {info.id} was captured for DistCp: its file bytes are in HDFS "
                                 f"snapshots, not in the repository; restore it with --config of an agent whose "
                                 f"[replication] engine = \"distcp\"")
            external = DistCpStager(distcp, content_source(info, data_root, distcp), what=f"snapshot {info.id}",
                                    algorithm=info.content_checksum, when_gone=(
                                        f"production no longer keeps snapshot {info.id}'s bytes: restore it with "
                                        f"--config of a standby that applied it (its data root keeps it as HDFS "
                                        f"snapshot drsync-snap-{info.id}), or restore a newer snapshot"))
        from drsync.apply import apply_manifest

        result = apply_manifest(manifest, repo, target, what=f"snapshot {info.id}", checksum=checksum, replan=True,
                                progress=progress, on_total=on_total, protect=(repo.storage.url, *protect),
                                dry_run=dry_run, foreign=foreign, external=external, keep_repositories=True,
                                captured_root=foreign is None)  # the cluster's own data root (CLI)
    return info, result


def protection_of(repo: Repository, window_s: float) -> Protection | None:
    """``[snapshots] protect`` over this repository's snapshots: the longer of ``window_s`` (a config's, 0
    without one) and the window the repository carries (``protect.json``, whatever flags a command was
    given); None when both are off. IntegrityError when that document is damaged (nothing is deleted)."""
    recorded = read_window(repo.storage)
    window_s = max(window_s, recorded.window_s if recorded is not None else 0.0)
    return Protection(window_s, repo.snapshot_stored_times()) if window_s > 0 else None


def record_protection(repo: Repository, window_s: float, *, by: str, state_dir: str = "") -> None:
    """Record ``[snapshots] protect`` in the repository (``protect.json``), so that commands run with
    ``--repo`` alone keep it too; the agent calls it at every start, ``drsync init`` when given a window."""
    record_window(repo.storage, window_s, by=by, state_dir=state_dir)


def delete_snapshots(repo: Repository, refs: list[str], *, prune: bool = True, protect_window_s: float = 0.0,
                     break_glass_dir: str | None = None, lock_wait_s: float | None = None,
                     clock: Callable[[], float] = time.time) -> DeleteResult:
    """Delete snapshots (briefly under the exclusive lock), then collect garbage (``prune``; see
    :meth:`Repository.gc`). LockedError when the deletion's lock cannot be had within ``lock_wait_s``
    (default ``LOCK_WAIT_S``; 0 = give up at once, as the agent's loop thread does: it never waits for a
    lock), and nothing is deleted; when only the collection's cannot, the snapshots stay deleted and
    ``gc_postponed`` in the result says why (as :func:`expire_snapshots` does).

    A snapshot stored less than ``protect_window_s`` seconds ago is protected (:mod:`drsync.protection`):
    RefusedError naming it, and nothing deleted; unless ``break_glass_dir`` (the agent's state directory)
    is given: then each protected one is recorded there and logged at WARNING before it is deleted."""
    repo.refuse_if_read_only()
    wait_s = LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
    with repo.lock(exclusive=True, wait_s=wait_s):
        infos = [repo.find_snapshot(r) for r in refs]
        now = clock()
        protection = protection_of(repo, protect_window_s)
        if break_glass_dir is None:
            check_deletable(infos, protection, now)
        elif protection is not None:
            _, protected = split_protected(infos, protection, now)
            record_break_glass(break_glass_dir, protected, protection, now, "drsync snapshot delete --break-glass")
        for info in infos:
            repo.delete_snapshot(info)
    report, postponed = _collect_after_deleting(repo, wait_s) if prune else (None, "")
    return DeleteResult(infos, report, postponed)


def _collect_after_deleting(repo: Repository, wait_s: float) -> tuple[GcReport | None, str]:
    """The garbage collection that follows deletions: its report, or (None, why) when its lock could not be
    had (the snapshots stay deleted; their chunks go at the next collection)."""
    try:
        return repo.gc(wait_s=wait_s), ""
    except LockedError as e:
        return None, str(e)


@dataclass
class DeleteResult:
    deleted: list[SnapshotInfo]
    gc: GcReport | None
    gc_postponed: str = ""  # as in ExpireResult


@dataclass
class ExpireResult:
    deleted: list[SnapshotInfo]
    kept: list[SnapshotInfo]
    gc: GcReport | None
    # Due for deletion (TTL or keep policy) but stored less than [snapshots] protect ago: kept.
    protected: list[SnapshotInfo] = field(default_factory=list)
    # Protected ones deleted all the same (break glass); also in ``deleted``.
    break_glass: list[SnapshotInfo] = field(default_factory=list)
    # Why the garbage collection after the deletions did not run (the repository was in use), or "".
    # The caller logs it: a command at WARNING, the agent (which retries on its own) at INFO.
    gc_postponed: str = ""


def plan_expiry(snaps: list[SnapshotInfo], keep: KeepPolicy, now: float) -> list[SnapshotInfo]:
    """Snapshots due for deletion: any past its TTL, and periodic ones the keep policy does not keep.

    Manual snapshots live until their TTL or an explicit delete. "Newest" (``keep.last``, and
    which snapshot of an hour or day stands for it) is the sequence order; capture times only
    say which hour or day a snapshot belongs to. ``[snapshots] protect`` is applied on top
    (:func:`drsync.protection.split_protected`).
    """
    doomed = {s.id for s in snaps if s.is_expired(now)}
    periodic = sorted((s for s in snaps if s.kind in ("periodic", "cycle") and s.id not in doomed),
                      key=lambda s: s.order_key)
    if periodic and not keep.is_empty():
        decisions = plan_retention([(s.id, s.captured_at) for s in periodic], keep, in_order=True)
        doomed |= {d.id for d in decisions if not d.keep}
    return [s for s in snaps if s.id in doomed]


def expire_snapshots(repo: Repository, keep: KeepPolicy, *, now: float | None = None,
                     dry_run: bool = False, protect: frozenset[str] = frozenset(),
                     collect: bool = True, lock_wait_s: float | None = None, protect_window_s: float = 0.0,
                     break_glass_dir: str | None = None) -> ExpireResult:
    """Apply TTLs and the keep policy. ``protect`` names snapshots that must stay (e.g. the
    one a standby has applied); ``protect_window_s`` is ``[snapshots] protect``: snapshots stored less
    than that ago stay too (``protected`` in the result), unless ``break_glass_dir`` (the agent's state
    directory) is given: then they are recorded there, logged at WARNING and deleted. ``collect=False``
    leaves garbage collection for later; ``lock_wait_s=0`` gives up at once when the repository is in use
    (retention can wait): LockedError before anything is deleted; when only the garbage collection that
    follows cannot have its lock, the snapshots stay deleted, ``gc`` is None and ``gc_postponed`` says why."""
    if not dry_run:
        repo.refuse_if_read_only()
    now = time.time() if now is None else now
    wait_s = LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
    with repo.lock(exclusive=not dry_run, wait_s=wait_s):
        snaps = repo.list_snapshots()
        due = [s for s in plan_expiry(snaps, keep, now) if s.id not in protect]
        protection = protection_of(repo, protect_window_s)
        doomed, spared = split_protected(due, protection, now)
        broken: list[SnapshotInfo] = []
        if break_glass_dir is not None and spared:
            doomed, broken, spared = due, spared, []
        if dry_run:
            return ExpireResult(doomed, [s for s in snaps if s not in doomed], None, spared, broken)
        if broken:
            assert protection is not None
            record_break_glass(break_glass_dir or "", broken, protection, now,
                               "drsync snapshot expire --break-glass")
        for s in doomed:
            repo.delete_snapshot(s)
    report, postponed = _collect_after_deleting(repo, wait_s) if doomed and collect else (None, "")
    return ExpireResult(doomed, [s for s in snaps if s not in doomed], report, spared, broken, postponed)


def gc_repository(repo: Repository, *, dry_run: bool = False, lock_wait_s: float | None = None) -> GcReport:
    """Collect garbage (:meth:`Repository.gc`: mark under a shared lock, sweep under the exclusive one).

    ``lock_wait_s``: seconds to wait for each lock (default ``LOCK_WAIT_S``; 0 = give up at once):
    LockedError, one line naming the holder."""
    return repo.gc(dry_run=dry_run, wait_s=LOCK_WAIT_S if lock_wait_s is None else lock_wait_s)


def verify_repository(repo: Repository, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
    with repo.lock(exclusive=False, wait_s=LOCK_WAIT_S):
        report = repo.verify(on_progress=progress)
        problem = repair.repaired_problem(repo)
        if problem:
            report.problems.append(problem)
        return report


def repair_repository(repo: Repository, *, dry_run: bool = False,
                      progress: Callable[[int], None] | None = None) -> tuple[VerifyReport, repair.RepairReport]:
    """Verify (every chunk re-read and re-hashed, under the shared lock: shipments and captures go on),
    then make the index forget what the repository lost, under the exclusive lock (briefly): lost packs and
    damaged chunks (:func:`drsync.repository.repair.forget`; a standby's primary then sends them again).
    Damage found stays damage, so the verify's findings hold under the later lock; the lost packs are
    listed again there. ``dry_run``: report only. Returns the verify report (before) and the repair's.
    IntegrityError when every pack is gone or an index file cannot be read (nothing changed)."""
    repo.refuse_if_read_only()
    report = verify_repository(repo, progress=progress)
    with repo.lock(exclusive=True, wait_s=LOCK_WAIT_S) as lock:
        return report, repair.forget(repo, lock, damaged=report.damaged_at, dry_run=dry_run)
