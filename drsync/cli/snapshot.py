"""``drsync snapshot create|list|show|diff|delete|restore|expire``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import click

from drsync import engine
from drsync.cli.common import Invocation, emit, exits, progress, repo_or_config, say, table
from drsync.cli.guards import BREAK_GLASS_HELP, own_paths, protection_args, refuse_while_held
from drsync.cli.restoring import finish_restore, foreign_target, restore_options
from drsync.config import parse_duration
from drsync.errors import ConfigError, IntegrityError, RefusedError, UsageError
from drsync.repository.manifest_diff import diff as diff_manifests
from drsync.repository.manifest_root import root_of
from drsync.repository.snapshots import iso
from drsync.text import printable
from drsync.units import count, human_size


@click.group("snapshot")
def snapshot_grp() -> None:
    """Capture, inspect, restore and delete snapshots."""


def _snap_row(s: Any, now: float, protected_until: float | None) -> list[str]:
    exp = s.expires_at
    expires = "-" if exp is None else ("expired" if exp <= now else iso(exp) or "")
    return [str(s.seq) if s.seq else "-", s.id, s.name or "-", s.kind, iso(s.captured_at) or "", str(s.files),
            human_size(s.bytes), expires, iso(protected_until) or "-"]


@snapshot_grp.command("create", epilog=exits(
             "0 taken (warnings do not change it)",
             "1 a hook failed, the data root or repository cannot be read or written, the repository is "
                 "locked, or an empty data root without --allow-empty",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 the repository is damaged"))
@repo_or_config
@click.option("--source", metavar="URL", help="Data root to capture (instead of [cluster] data).")
@click.option("--name", default="", help="A name to find the snapshot by.")
@click.option("--reason", default="", help="Why it was taken (kept with the snapshot).")
@click.option("--ttl", default=None, metavar="DURATION", help="Delete after this long, e.g. 7d.")
@click.option("--allow-empty", is_flag=True,
              help="Capture an empty data root although the last snapshot was not, and filesystems mounted "
                   "inside it as they are, unmounted or empty (their files become deletions on standbys).")
def snapshot_create(inv: Invocation, source: str | None, name: str, reason: str, ttl: str | None,
                    allow_empty: bool) -> None:
    """Capture the data root.

    Runs [snapshots] pre_hook and post_hook around the capture; files whose size, mtime, ctime and inode
    are unchanged are not read again; files that change while read are re-read, then reported as warnings.
    A data root that is empty where the last snapshot was not is refused unless --allow-empty (an
    unmounted volume looks like this). A filesystem mounted inside the data root that is unmounted, or
    holds no files where the last snapshot had some, keeps its last captured version (a warning) unless
    --allow-empty."""
    try:
        ttl_s = parse_duration(ttl, "--ttl") if ttl is not None else None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    cfg = inv.snapshots
    req = engine.SnapshotRequest(
        data_root=inv.data_url(source), name=name, reason=reason, ttl_s=ttl_s,
        hooks=engine.Hooks(cfg.pre_hook, cfg.post_hook, cfg.hook_timeout), reread_attempts=cfg.reread_attempts,
        exclude_paths=own_paths(inv), allow_empty=allow_empty)
    repo = inv.open_repo()
    with progress("snapshot") as (advance, total):
        info = engine.create_snapshot(repo, req, progress=advance, on_total=total)
    doc = {"id": info.id, "name": info.name, "files": info.files, "bytes": info.bytes,
           "new_bytes": info.new_bytes, "read_bytes": info.read_bytes, "reused_files": info.reused_files,
           "duration_s": info.duration_s, "seq": info.seq, "captured_at": iso(info.captured_at),
           "reason": info.reason, "ttl_s": info.ttl_s, "parent": info.parent, "warnings": info.warnings,
           "stale_paths": info.stale_paths, "skipped_paths": info.skipped_paths, "volumes": info.volumes}

    def human() -> None:
        say(f"snapshot {info.id} taken: {count(info.files, 'file')}, {human_size(info.bytes)}, "
                   f"{human_size(info.new_bytes)} new, in {info.duration_s:.2f}s")
        for w in info.warnings:
            say(f"  warning: {w}")

    emit(inv, doc, human)


@snapshot_grp.command("list", epilog=exits(
             "0 listed (a damaged protect.json is a warning here; deletions stop on it)",
             "1 the repository cannot be read",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 the repository is damaged"))
@repo_or_config
def snapshot_list(inv: Invocation) -> None:
    """List snapshots, oldest first: in sequence order (SEQ), whatever their capture times say.

    SEQ is '-' (JSON: 0) for snapshots taken before drsync numbered them; they come first. PROTECTED
    UNTIL: when [snapshots] protect stops keeping it ('-': not protected, or protect is off).
    """
    repo = inv.open_repo()
    snaps = repo.list_snapshots()
    now = time.time()
    try:
        protection = engine.protection_of(repo, inv.snapshots.protect)
    except (IntegrityError, RefusedError) as e:  # deletions stop (they read it again); the listing goes on
        say(f"warning: {e}", err=True)
        window = inv.snapshots.protect
        protection = engine.Protection(window, repo.snapshot_stored_times()) if window > 0 else None
    until = {s.id: protection.until(s, now) if protection and protection.is_protected(s, now) else None
             for s in snaps}
    emit(inv, [{**s.to_json(), "protection_ends_at": until[s.id]} for s in snaps], lambda: table(
        ["SEQ", "ID", "NAME", "KIND", "CAPTURED", "FILES", "SIZE", "EXPIRES", "PROTECTED UNTIL"],
        [_snap_row(s, now, until[s.id]) for s in snaps]))


@snapshot_grp.command("show", epilog=exits(
             "0 shown",
             "1 the repository cannot be read",
             "2 no such snapshot, an ambiguous prefix, or a usage error",
             "3 its document or manifest is damaged"))
@repo_or_config
@click.argument("snapshot_id")
@click.option("--files", is_flag=True, help="List every path too.")
def snapshot_show(inv: Invocation, snapshot_id: str, files: bool) -> None:
    """Show one snapshot (ID, unique prefix, name or 'latest').

    Its document (cluster, release, source, parent, sizes, TTL) and capture warnings; --files reads its
    manifest and lists every path."""
    repo = inv.open_repo()
    info = repo.find_snapshot(snapshot_id)
    doc = info.to_json()
    manifest = repo.load_manifest(info) if files else None
    if manifest is not None:
        doc["entries"] = [{"path": e.path, "type": e.type, "mode": oct(e.mode), "size": e.size,
                           "mtime_ns": e.mtime_ns, "target": e.target} for e in manifest.entries()]

    def human() -> None:
        for k in ("id", "seq", "name", "reason", "kind", "captured_at", "expires_at", "cluster_id", "release",
                  "source", "parent", "files", "bytes", "new_bytes", "duration_s"):
            v = doc.get(k)
            if k == "seq" and not v:
                v = None  # taken before drsync numbered snapshots
            say(f"{k:12} {human_size(v) if k in ('bytes', 'new_bytes') else ('-' if v in (None, '') else v)}")
        if info.stale_paths:
            say(f"{'stale_paths':12} {info.stale_paths} (could not be read: kept at their last captured "
                       f"version)")
        if info.skipped_paths:
            say(f"{'skipped_paths':12} {info.skipped_paths} (could not be captured at all)")
        for w in info.warnings:
            say(f"warning      {w}")  # warnings name their paths printable already
        if manifest is not None:
            def shown(e: dict[str, Any]) -> str:
                link = f" -> {printable(e['target'])}" if e["target"] else ""
                return printable(e["path"]) + link

            table(["TYPE", "MODE", "SIZE", "PATH"],
                   [[e["type"], e["mode"], str(e["size"]), shown(e)] for e in doc["entries"]])

    emit(inv, doc, human)


@snapshot_grp.command("diff", epilog=exits(
             "0 compared (also when they differ)",
             "1 the repository cannot be read",
             "2 no such snapshot, an ambiguous prefix, or a usage error",
             "3 a manifest is damaged"))
@repo_or_config
@click.argument("a")
@click.argument("b")
def snapshot_diff(inv: Invocation, a: str, b: str) -> None:
    """Paths added, removed and changed from snapshot A to snapshot B.

    Compares the two manifests only (no file is read): a path is changed when its type, mode, size, mtime,
    link target or chunks differ; the data root itself ("."), when both record its mode, mtime or extended
    attributes and they differ."""
    repo = inv.open_repo()
    sa, sb = repo.find_snapshot(a), repo.find_snapshot(b)
    ma, mb = repo.open_manifest(sa), repo.open_manifest(sb)
    d = diff_manifests(ma, mb)
    ra, rb = root_of(ma, f"manifest of snapshot {sa.id}"), root_of(mb, f"manifest of snapshot {sb.id}")
    if ra is not None and rb is not None and (ra.mode, ra.mtime_ns, ra.xattrs) != (rb.mode, rb.mtime_ns, rb.xattrs):
        d = dataclasses.replace(d, changed=[".", *d.changed])
    doc = {"from": sa.id, "to": sb.id, **d.as_dict()}

    def human() -> None:
        for mark, paths in (("+", d.added), ("-", d.removed), ("M", d.changed)):
            for p in paths:
                say(f"{mark} {printable(p)}")
        say(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed")

    emit(inv, doc, human)


@snapshot_grp.command("delete", epilog=exits(
             "0 deleted (a garbage collection the repository's lock postponed is a warning: "
                 "'drsync repo gc' frees the data later)",
             "1 the repository is locked (nothing deleted) or cannot be written",
             "2 no such snapshot, or a usage error",
             "3 the repository is damaged",
             "4 refused, nothing deleted: a snapshot is protected, or a standby holds applies back"))
@repo_or_config
@click.argument("snapshot_ids", nargs=-1, required=True)
@click.option("--no-prune", is_flag=True, help="Keep unreferenced chunks (run 'drsync repo gc' later).")
@click.option("--break-glass", is_flag=True, help=BREAK_GLASS_HELP)
def snapshot_delete(inv: Invocation, snapshot_ids: tuple[str, ...], no_prune: bool, break_glass: bool) -> None:
    """Delete snapshots and free the chunks nothing else uses.

    A snapshot stored less than [snapshots] protect ago (the config's, or the window the repository
    records, also with --repo) is refused (exit 4, nothing deleted) unless --break-glass is given.
    """
    refuse_while_held(inv, "delete snapshots")
    res = engine.delete_snapshots(inv.open_repo(), list(snapshot_ids), prune=not no_prune,
                                  **protection_args(inv, break_glass))
    infos, report = res.deleted, res.gc
    doc = {"deleted": [i.id for i in infos], "gc": report.as_dict() if report else None,
           "gc_postponed": res.gc_postponed or None}
    warn_gc_postponed(res.gc_postponed)

    def human() -> None:
        say(f"deleted {', '.join(i.id for i in infos)}")
        if report:
            say(f"freed {human_size(report.freed_bytes)} ({report.deleted_packs} packs deleted, "
                       f"{report.repacked_packs} repacked)")

    emit(inv, doc, human)


def warn_gc_postponed(why: str) -> None:
    """The deletions stand; their chunks stay until a garbage collection runs (one line on stderr)."""
    if why:
        say(f"warning: garbage collection postponed: {why}; the deleted snapshots' data is freed by the "
            f"next 'drsync repo gc'", err=True)


@snapshot_grp.command("restore", epilog=exits(
             "0 restored (or, --dry-run, the restore would go ahead)",
             "1 the target or repository cannot be read or written, or another restore is writing to the target",
             "2 no such snapshot, or a usage error",
             "3 a chunk or manifest is damaged (nothing damaged is written)",
             "4 refused: another cluster id or release, or a foreign target without --overwrite or "
                 "--delete-extra"))
@repo_or_config
@click.argument("snapshot_id")
@click.option("--target", metavar="URL", help="Where to restore (default: the cluster's data root).")
@click.option("--checksum", is_flag=True, help="Re-hash files whose size and mtime match too.")
@restore_options("snapshot")
def snapshot_restore(inv: Invocation, snapshot_id: str, target: str | None, checksum: bool, overwrite: bool,
                     delete_extra: bool, dry_run: bool) -> None:
    """Restore a snapshot onto the same cluster (same cluster id and release).

    Correct files are left alone; the rest is staged, verified and renamed into place, and what the
    snapshot lacks is removed. Refused onto another cluster id or release (use a backup to move data
    between clusters)."""
    repo = inv.open_repo()
    cluster_id = inv.config.cluster.id if inv.config else repo.config.cluster_id
    release = inv.config.cluster.release if inv.config else repo.config.release
    dest = inv.data_url(target, "--target")
    with progress("restore") as (advance, total):
        info, result = engine.restore_snapshot(repo, snapshot_id, dest, cluster_id=cluster_id,
                                               release=release, checksum=checksum, progress=advance,
                                               on_total=total, protect=own_paths(inv), dry_run=dry_run,
                                               foreign=foreign_target(inv, dest, overwrite, delete_extra),
                                               distcp=engine.distcp_settings(inv.config) if inv.config else None,
                                               data_root=inv.config.cluster.data if inv.config else None)
    finish_restore(inv, "snapshot", info.id, dest, dry_run, result)


@snapshot_grp.command("expire", epilog=exits(
             "0 expired (or, --dry-run, listed; a garbage collection the repository's lock postponed is a "
                 "warning: 'drsync repo gc' frees the data later)",
             "1 the repository is locked (nothing deleted) or cannot be written",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 the repository is damaged",
             "4 refused: a standby holds applies back"))
@repo_or_config
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--break-glass", is_flag=True, help=BREAK_GLASS_HELP)
def snapshot_expire(inv: Invocation, dry_run: bool, break_glass: bool) -> None:
    """Delete snapshots past their TTL, and periodic ones beyond [snapshots] keep.

    Those stored less than [snapshots] protect ago (the config's, or the window the repository records, also
    with --repo) stay (listed as protected) unless --break-glass is given.
    """
    if not dry_run:
        refuse_while_held(inv, "expire snapshots")
    res = engine.expire_snapshots(inv.open_repo(), inv.snapshots.keep, dry_run=dry_run,
                                  **protection_args(inv, break_glass))
    doc = {"deleted": [s.id for s in res.deleted], "kept": [s.id for s in res.kept], "dry_run": dry_run,
           "protected": [s.id for s in res.protected], "break_glass": [s.id for s in res.break_glass],
           "gc": res.gc.as_dict() if res.gc else None, "gc_postponed": res.gc_postponed or None}
    warn_gc_postponed(res.gc_postponed)
    verb = "would delete" if dry_run else "deleted"
    protected = (f"; {len(res.protected)} of them protected by [snapshots] protect (--break-glass deletes them): "
                 f"{', '.join(s.id for s in res.protected)}" if res.protected else "")
    emit(inv, doc, lambda: click.echo(
        f"{verb} {len(res.deleted)} snapshot(s){': ' if res.deleted else ''}"
        f"{', '.join(s.id for s in res.deleted)}; kept {len(res.kept)}{protected}"))
