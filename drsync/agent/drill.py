"""Drills: prove on the standby that it could take over right now.

A drill (1) verifies the chunks of the last applied snapshot (all, or a
sample with a full pass every ``drills.full_every`` drills), (2) restores that
snapshot into a scratch directory and compares it with the manifest and with
the standby's data root, (3) times a dry-run promotion against ZooKeeper
(session, epoch and primary reads, a compare-and-set on a rehearsal node:
everything but taking over), and (4) records the RPO (the lag at drill time)
and an estimated RTO. It only reads the repository and the data root, and
cleans its scratch space; it refuses to restore where the disk is too small.

Reports are JSON: returned to the caller, kept under the agent's state dir
(``drills/``, newest ``drills.keep``) and in ZooKeeper (``drills/<seq>``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from drsync import documents, engine, fsutil
from drsync.agent.clock import lag_s as clock_lag_s
from drsync.agent.state import StateStore
from drsync.apply import apply_manifest, comparison_resolution, plan_apply
from drsync.apply_root import plan_root
from drsync.config import Config
from drsync.coordination import Coordinator
from drsync.dataroot import DataRoot, open_data_root
from drsync.dataroot.beneath import Beneath
from drsync.dataroot.local import LocalDataRoot
from drsync.errors import DrsyncError, IntegrityError, UsageError
from drsync.repository.ids import id_at
from drsync.repository.manifest import FILE, SYMLINK, Entry, Manifest, hdfs_checksum_digest
from drsync.repository.manifest_root import root_of
from drsync.repository.repo import Repository
from drsync.tree import LocalEntry
from drsync.units import human_size

# Room left free beyond the restored bytes (metadata, staging, the filesystem's own needs).
SCRATCH_MARGIN_BYTES = 64 * 1024 * 1024
# Tries at comparing the root when the standby applies a newer snapshot during a drill.
ROOT_COMPARE_ATTEMPTS = 3


@dataclass
class DrillStep:
    name: str
    passed: bool
    duration_s: float
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class DrillReport:
    agent: str
    group: str
    started_at: float
    snapshot: str | None = None
    captured_at: float | None = None
    finished_at: float = 0.0
    passed: bool = False
    steps: list[DrillStep] = field(default_factory=list)
    rpo_s: float | None = None
    rto_s: float | None = None
    rto_basis: str = ""
    number: int = 0
    full_verify: bool = True
    zookeeper_seq: str | None = None
    # drill run --to-snapshot: a rehearsal of a promotion at that earlier point (its trial restore is
    # judged against its manifest only; the root holds the applied snapshot, not this one).
    point_in_time: bool = False
    # drill run --before TIME: the time given (Unix seconds); the point is the newest snapshot this standby
    # stored at or before it (drsync.agent.pointintime.choose_point), as drsync promote --before picks it.
    before: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure planning -------------------------------------------------------------------------


def verify_all_this_time(number: int, sample: float, full_every: int) -> bool:
    """Whether drill ``number`` (1, 2, ...) verifies every chunk rather than a sample. Pure."""
    return sample >= 1.0 or full_every <= 1 or number % full_every == 0


def sample_indices(n: int, fraction: float, seed: int) -> Sequence[int]:
    """A reproducible sample (ascending) of at least one of ``n`` positions (``n`` > 0). Pure."""
    if fraction >= 1.0 or not n:
        return range(n)
    return sorted(random.Random(seed).sample(range(n), max(1, round(n * fraction))))


def sample_chunks(chunk_ids: Iterable[bytes], fraction: float, seed: int) -> list[bytes]:
    """A reproducible sample of at least one chunk (of a non-empty collection), sorted. Pure."""
    ids = sorted(chunk_ids)
    return [ids[i] for i in sample_indices(len(ids), fraction, seed)]


def scratch_needed(manifest: Manifest) -> int:
    return manifest.total_bytes() + SCRATCH_MARGIN_BYTES


def estimate_rto(promotion_s: float, *, automatic: bool, session_timeout_s: float, grace_s: float) -> tuple[float,
                                                                                                          str]:
    """Estimated time to recover: detection (automatic failover only) plus a promotion. Pure."""
    if automatic:
        return (round(session_timeout_s + grace_s + promotion_s, 3),
                f"session timeout {session_timeout_s:g}s + grace {grace_s:g}s + promotion {promotion_s:.3f}s")
    return round(promotion_s, 3), f"promotion {promotion_s:.3f}s once an operator runs drsync promote"


# --- the steps ---------------------------------------------------------------------------------


def _files_of_chunk(manifest: Manifest, chunk_id: bytes) -> list[str]:
    return manifest.paths_naming(chunk_id)


def verify_step(repo: Repository, manifest: Manifest, snapshot: str, *, full: bool, fraction: float,
                seed: int) -> DrillStep:
    started = time.monotonic()
    ids = manifest.chunk_id_array()  # sorted, 32 bytes an id: no Python object per chunk
    chosen = sample_indices(len(ids), 1.0 if full else fraction, seed)
    bad: list[str] = []
    checked_bytes = 0
    for i in chosen:
        cid = id_at(ids, i)
        try:
            checked_bytes += len(repo.read_chunk(cid))
        except IntegrityError as e:
            bad.append(f"{', '.join(_files_of_chunk(manifest, cid)) or '?'}: {e}")
    figures = {"chunks": len(ids), "checked": len(chosen), "checked_bytes": checked_bytes, "damaged": len(bad)}
    if bad:
        return DrillStep("verify", False, round(time.monotonic() - started, 3),
                         f"{len(bad)} damaged chunk(s) in snapshot {snapshot}; first: {bad[0]}; run 'drsync repo "
                         f"repair' on this standby: its primary then sends them again", figures)
    what = "all" if full else f"a {fraction:.0%} sample:"
    return DrillStep("verify", True, round(time.monotonic() - started, 3),
                     f"{what} {len(chosen)} of {len(ids)} chunks intact", figures)


def _structure_diffs(root: DataRoot, manifest: Manifest, own: tuple[str, ...]) -> tuple[list[str],
                                                                                        dict[str, LocalEntry]]:
    """Paths and metadata of a data root that differ from a manifest (up to 5 of each kind), and its scan."""
    scan = {p: e for p, e in root.existing().items() if not p.startswith(".drsync")}
    protected = frozenset(r for r in (root.relative_inside(p) for p in own) if r)
    plan = plan_apply(list(manifest.entries()), scan, compare_owner=root.owners_settable(),
                      mtime_resolution_ns=comparison_resolution(manifest, root), protected=protected)
    diffs = [f"{e.path} differs" for e in plan.write[:5]] + [f"{p} should not exist" for p in plan.remove[:5]]
    # Symlinks an apply could not make (HDFS has them disabled) were reported then; not a difference now.
    links = plan.link if root.supports_symlinks else []
    diffs += [f"{e.path} is missing" for e in [*plan.mkdir, *links] if e.path not in scan][:5]
    # A link pointing right with another time or owner is planned as a link too: it is there.
    relinked = [e for e in links if e.path in scan and scan[e.path].type == SYMLINK
                and os.fsdecode(scan[e.path].target or "") == e.target]
    diffs += [f"{e.path} differs" for e in links if e.path in scan and e not in relinked][:5]
    diffs += [f"{e.path} has other metadata" for e in [*plan.fix_meta, *relinked][:5]]
    # The root's own mode, owner and attributes (its time moves with what drsync itself keeps there).
    want, have = root_of(manifest), root.root_entry()
    if want is not None and have is not None and plan_root(
            want, have, keep=True, touched=False, compare_owner=root.owners_settable(),
            compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits)[1]:
        diffs.append(". (the data root itself) has other metadata")
    return diffs, scan


def _compare_trees(expected: str, actual: str, manifest: Manifest, own: tuple[str, ...] = ()) -> list[str]:
    """Differences between a trial restore and the data root: metadata by plan, then content.
    ``own``: drsync's files that may lie inside the data root (repository, state), not compared."""
    root = open_data_root(actual)
    diffs, scan = _structure_diffs(root, manifest, own)
    if diffs:
        return diffs
    local = isinstance(root, LocalDataRoot)
    with contextlib.ExitStack() as opened:
        # Both trees are read below their tops by descriptor (Beneath): a path longer than PATH_MAX is
        # compared like any other.
        trial, data = (opened.enter_context(Beneath(expected)), opened.enter_context(Beneath(root.root))) if local \
            else (None, None)
        for e in manifest.entries():
            if e.type != FILE:
                continue
            # A local root is compared byte for byte with the trial restore; an HDFS root is re-hashed
            # against the manifest the restore was verified against.
            if e.external:  # copied by DistCp: its HDFS checksum is what the manifest holds
                same = _checksum_matches(root, e)
            elif trial is not None and data is not None:
                same = _same_bytes(trial, data, e.path)
            else:
                same = root.same_content(e, scan[e.path])
            if not same:
                diffs.append(f"{e.path}: content differs")
                if len(diffs) >= 5:
                    break
    return diffs


def _same_bytes(a: Beneath, b: Beneath, rel: str) -> bool:
    """Whether file ``rel`` holds the same bytes below ``a`` and ``b`` (never through a link)."""
    fa = a.open_read(rel)
    try:
        fb = b.open_read(rel)
        try:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            with open(fa, "rb", closefd=False) as x, open(fb, "rb", closefd=False) as y:
                while True:  # a buffered read gives the whole block unless at the end
                    block = x.read(1 << 20)
                    if block != y.read(1 << 20):
                        return False
                    if not block:
                        return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _checksum_matches(root: object, e: Entry) -> bool:
    fs = root.fs  # type: ignore[attr-defined]
    algorithm, value = fs.file_checksum(f"{root.root.rstrip('/')}/{e.path}")  # type: ignore[attr-defined]
    return hdfs_checksum_digest(algorithm, value) == e.content


def distcp_root_step(manifest: Manifest, snapshot: str, *, data_root: str, full: bool, fraction: float, seed: int,
                     applied_now: Callable[[], str], own: tuple[str, ...] = ()) -> DrillStep:
    """engine "distcp": the bytes are not in the repository, so no trial restore from it. Instead the
    standby's root is compared with the manifest: every path and its metadata, and the HDFS checksums
    of its files (all, or a sample) against the ones production took when it captured them."""
    started = time.monotonic()
    files = [e for e in manifest.entries() if e.type == FILE]
    chosen = files if full else [files[i] for i in sorted(random.Random(seed).sample(
        range(len(files)), max(1, round(len(files) * fraction)) if files else 0))]
    figures: dict[str, Any] = {"files": len(files), "checked": len(chosen), "bytes": manifest.total_bytes()}
    try:
        root = open_data_root(data_root)
        diffs, scan = _structure_diffs(root, manifest, own)
        if not diffs:
            for e in chosen:
                # Files copied by DistCp by their HDFS checksum; any a mixed snapshot holds as chunks
                # (stale rows kept from an earlier capture) by reading them.
                same = _checksum_matches(root, e) if e.external else e.path in scan and root.same_content(
                    e, scan[e.path])
                if not same:
                    diffs.append(f"{e.path}: content differs from the snapshot's")
                    if len(diffs) >= 3:
                        break
    except DrsyncError as e:
        return DrillStep("verify", False, round(time.monotonic() - started, 3), f"cannot check the data root: {e}",
                         figures)
    figures["root_compared"] = applied_now() == snapshot
    if not figures["root_compared"]:
        return DrillStep("verify", True, round(time.monotonic() - started, 3),
                         f"the standby applied a newer snapshot than {snapshot} meanwhile; its root was not judged",
                         figures)
    if diffs:
        return DrillStep("verify", False, round(time.monotonic() - started, 3),
                         f"the standby's data root differs from its applied snapshot {snapshot}: {'; '.join(diffs)}",
                         figures)
    what = "every file's" if full else f"a {fraction:.0%} sample of files':"
    return DrillStep("verify", True, round(time.monotonic() - started, 3),
                     f"DistCp engine: the data root holds every path of {snapshot} with its metadata, and {what} "
                     f"HDFS checksums ({len(chosen)} of {len(files)}) match the ones production took", figures)


def restore_step(repo: Repository, manifest: Manifest, snapshot: str, *, scratch_dir: str, data_root: str | None,
                 applied_now: Callable[[], str], own: tuple[str, ...] = ()) -> DrillStep:
    """Restore ``snapshot`` into scratch space and compare it with its manifest, then the data root with it
    (``data_root`` None: a point-in-time rehearsal, the restore alone is judged)."""
    started = time.monotonic()
    os.makedirs(scratch_dir, exist_ok=True)
    need, free = scratch_needed(manifest), shutil.disk_usage(scratch_dir).free
    figures: dict[str, Any] = {"bytes": manifest.total_bytes(), "files": manifest.file_count(), "free": free}
    if free < need:
        return DrillStep("restore", False, round(time.monotonic() - started, 3),
                         f"refused: the trial restore needs {need} bytes in {scratch_dir} but only {free} are free; "
                         f"point drills.scratch at a larger disk", figures)
    target = os.path.join(scratch_dir, f"drill-{os.getpid()}-{int(time.time())}")
    try:
        # A fresh directory of this drill's own (its pid and time), often in the agent's state directory inside
        # its repository or data root, which the agent flocks: no apply lock (drsync.flocks.ApplyLock).
        apply_manifest(manifest, repo, target, what=f"drill restore of snapshot {snapshot}", replan=True,
                       locked=False)
        mismatch = _compare_trees(target, target, manifest)  # the restore against the manifest
        if mismatch:
            return DrillStep("restore", False, round(time.monotonic() - started, 3),
                             f"the trial restore does not match the manifest of {snapshot}: {mismatch[0]}", figures)
        if data_root is None:
            return DrillStep("restore", True, round(time.monotonic() - started, 3),
                             f"restored {figures['files']} files ({human_size(figures['bytes'])}) of {snapshot}; "
                             f"they match its manifest: a promotion at this point would start from them", figures)
        # The data root against the restore; a snapshot applied meanwhile makes the comparison moot.
        before = applied_now()
        diffs = (_compare_trees(target, data_root, manifest, (repo.storage.url, *own))
                 if before == snapshot else [])
        moved = applied_now() != snapshot
        figures["root_compared"] = not moved
        if moved:
            return DrillStep("restore", True, round(time.monotonic() - started, 3),
                             f"restored {snapshot} intact; the standby applied a newer snapshot meanwhile, so its "
                             f"root was not compared", figures)
        if diffs:
            return DrillStep("restore", False, round(time.monotonic() - started, 3),
                             f"the standby's data root differs from its applied snapshot {snapshot}: "
                             f"{'; '.join(diffs[:3])}", figures)
        return DrillStep("restore", True, round(time.monotonic() - started, 3),
                         f"restored {figures['files']} files ({human_size(figures['bytes'])}) of {snapshot}; they "
                         f"match the manifest and the standby's data root", figures)
    except DrsyncError as e:
        return DrillStep("restore", False, round(time.monotonic() - started, 3), f"trial restore failed: {e}",
                         figures)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def promotion_step(open_coord: Callable[[], Coordinator] | None, agent: str) -> DrillStep:
    started = time.monotonic()
    if open_coord is None:
        return DrillStep("promotion", True, 0.0, "fixed roles: promotion is a configuration change; not rehearsed",
                         {"rehearsed": False})
    try:
        coord = open_coord()
        coord.start()
        try:
            epoch = coord.read_epoch()
            primary = coord.read_primary()
            coord.rehearse_promotion(agent)
        finally:
            coord.close()
    except DrsyncError as e:
        return DrillStep("promotion", False, round(time.monotonic() - started, 3),
                         f"a promotion now would fail: {e}", {"rehearsed": True})
    took = round(time.monotonic() - started, 3)
    who = primary.agent if primary else "none"
    return DrillStep("promotion", True, took, f"dry-run promotion in {took:.3f}s (epoch {epoch.epoch}, primary {who})",
                     {"rehearsed": True, "epoch": epoch.epoch, "primary": primary.agent if primary else None})


# --- the drill ---------------------------------------------------------------------------------


def drills_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "drills")


def load_reports(state_dir: str, limit: int = 0) -> list[dict[str, Any]]:
    d = drills_dir(state_dir)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for n in names[-limit:] if limit else names:
        try:
            with open(os.path.join(d, n), "rb") as f:
                out.append(documents.loads(f.read(), allow_nan=True))
        except (OSError, ValueError):
            continue
    return out


def _save(state_dir: str, report: DrillReport, keep: int) -> None:
    d = drills_dir(state_dir)
    os.makedirs(d, exist_ok=True)
    fsutil.atomic_write(os.path.join(d, f"drill-{report.number:08d}.json"),
                        json.dumps(report.as_dict(), indent=1).encode(), durable=True)
    names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    for old in names[:-keep] if keep > 0 else []:
        try:
            os.unlink(os.path.join(d, old))
        except FileNotFoundError:
            pass


def _point_before(cfg: Config, repo: Repository, state_dir: str, before: float) -> str:
    """The id of the recovery point ``drsync promote --before`` would pick at ``before`` (Unix seconds): the
    newest snapshot this standby stored at or before it. UsageError (the nearest points named) when none."""
    from drsync.agent.hold import HoldFile
    from drsync.agent.pointintime import choose_point, recovery_points

    points = recovery_points(repo.list_snapshots(), StateStore(state_dir).load(), cluster_id=cfg.cluster.id,
                             held=HoldFile(state_dir).load().snapshot, stored_at=repo.snapshot_stored_times())
    return choose_point(points, before=before).id


def _snapshot_steps(cfg: Config, repo: Repository, state_file: StateStore, report: DrillReport,
                    state_dir: str, point: str | None = None) -> list[DrillStep]:
    """The steps that judge the applied snapshot and the root (or, ``point``, an earlier snapshot a
    promotion could start from; with ``report.before``, the one ``promote --before`` would pick); sets
    ``report.snapshot`` and its RPO."""
    state = state_file.load()
    if report.before is not None and not point:
        try:
            point = _point_before(cfg, repo, state_dir, report.before)
        except UsageError as e:
            return [DrillStep("verify", False, 0.0, f"--before: {e}")]
    if point:
        try:
            info = repo.find_snapshot(point)
            manifest = repo.load_manifest(info, lean=True)
        except DrsyncError as e:
            return [DrillStep("verify", False, 0.0, f"snapshot {point} cannot be read: {e}")]
        if manifest.external_count():
            return [DrillStep("verify", False, 0.0, f"snapshot {info.id} was copied by DistCp (engine \"distcp\"): "
                                                    f"its bytes are not in the repository to rehearse with")]
        report.snapshot, report.captured_at, report.point_in_time = info.id, info.captured_at, True
        rpo = clock_lag_s(info.captured_at, state.clock_offset_s, report.started_at)
        report.rpo_s = round(rpo, 3) if rpo is not None else None
        scratch = cfg.drills.scratch or os.path.join(state_dir, "drill-scratch")
        return [verify_step(repo, manifest, info.id, full=True, fraction=1.0, seed=report.number),
                restore_step(repo, manifest, info.id, scratch_dir=scratch, data_root=None,
                             applied_now=lambda: state_file.load().applied_snapshot, own=(state_dir, scratch))]
    if not state.applied_snapshot:
        return [DrillStep("applied", False, 0.0, "this standby has not applied any snapshot yet: "
                                                 "there is nothing it could take over with")]
    report.snapshot, report.captured_at = state.applied_snapshot, state.applied_captured_at
    rpo = state.lag_s(report.started_at)  # the lag at drill time, on the primary's clock
    report.rpo_s = round(rpo, 3) if rpo is not None else None
    try:
        manifest = repo.load_manifest(repo.find_snapshot(state.applied_snapshot), lean=True)
    except DrsyncError as e:
        return [DrillStep("verify", False, 0.0, f"the applied snapshot cannot be read: {e}")]
    data_root = engine.data_root_url(cfg.cluster.data)
    if manifest.external_count():
        return [distcp_root_step(manifest, state.applied_snapshot, data_root=data_root, full=report.full_verify,
                                 fraction=cfg.drills.sample, seed=report.number,
                                 applied_now=lambda: state_file.load().applied_snapshot, own=(state_dir,))]
    scratch = cfg.drills.scratch or os.path.join(state_dir, "drill-scratch")
    return [verify_step(repo, manifest, state.applied_snapshot, full=report.full_verify,
                        fraction=cfg.drills.sample, seed=report.number),
            restore_step(repo, manifest, state.applied_snapshot, scratch_dir=scratch, data_root=data_root,
                         applied_now=lambda: state_file.load().applied_snapshot, own=(state_dir, scratch))]


def run_drill(cfg: Config, *, state_dir: str, open_coord: Callable[[], Coordinator] | None,
              full: bool | None = None, is_primary: bool = False, point: str | None = None,
              before: str | None = None) -> DrillReport:
    """Run one drill on this standby and record it. Never changes the repository or the data root.

    ``point``: rehearse a promotion at that earlier snapshot (``drill run --to-snapshot``): it is verified
    in full and restored into scratch space; the RPO is its age. ``before``: the operator's ``--before
    TIME`` as typed (:func:`drsync.agent.pointintime.parse_before`: ISO 8601, Unix seconds or a span ago):
    rehearse the promotion ``drsync promote --before TIME`` would make, at the newest snapshot this standby
    stored at or before it (a failing step names the nearest points when there is none). UsageError for
    both, or for a TIME that is none of those forms."""
    if is_primary or cfg.agent.role == "primary":
        raise UsageError(f"drills run on a standby; {cfg.agent.name} is the primary of group "
                         f"{cfg.coordination.group}")
    if point is not None and before is not None:
        raise UsageError("choose one: --to-snapshot ID or --before TIME")
    if before is not None:
        from drsync.agent.pointintime import parse_before

        before_s: float | None = parse_before(before, time.time())
    else:
        before_s = None
    previous = load_reports(state_dir, 1)
    number = int(previous[-1].get("number", 0)) + 1 if previous else 1
    report = DrillReport(cfg.agent.name, cfg.coordination.group, time.time(), number=number, before=before_s)
    state_file = StateStore(state_dir)
    report.full_verify = full if full is not None else verify_all_this_time(number, cfg.drills.sample,
                                                                            cfg.drills.full_every)
    repo = engine.open_repository(cfg.cluster.repository)
    # The shared lock first, then the applied snapshot: no retention can expire it (exclusive lock) while
    # the drill reads it, and GC must not move packs under the drill.
    with repo.lock(exclusive=False, wait_s=engine.LOCK_WAIT_S):
        # A commit that reached the standby before the drill may finish applying during it; the
        # comparison with the root is then moot, so it is made again on the newly applied snapshot
        # (a primary that keeps shipping faster than a drill can compare gets the report as it is).
        for attempt in range(1, ROOT_COMPARE_ATTEMPTS + 1):
            steps = _snapshot_steps(cfg, repo, state_file, report, state_dir, point)
            if all(s.figures.get("root_compared", True) for s in steps) or attempt == ROOT_COMPARE_ATTEMPTS:
                break
        report.steps.extend(steps)
    promo = promotion_step(open_coord, cfg.agent.name)
    report.steps.append(promo)
    if promo.passed and promo.figures.get("rehearsed"):
        report.rto_s, report.rto_basis = estimate_rto(
            promo.duration_s, automatic=cfg.coordination.failover == "automatic" and open_coord is not None,
            session_timeout_s=cfg.coordination.session_timeout, grace_s=cfg.coordination.failover_grace)
    report.passed = all(s.passed for s in report.steps)
    report.finished_at = time.time()
    _save(state_dir, report, cfg.drills.keep)
    if open_coord is not None:
        try:
            coord = open_coord()
            coord.start()
            try:
                report.zookeeper_seq = coord.add_drill(report.as_dict(), cfg.drills.keep)
            finally:
                coord.close()
            _save(state_dir, report, cfg.drills.keep)
        except DrsyncError:
            pass  # kept locally; ZooKeeper gets the next one
    return report
