"""``drsync backup create|restore|verify|list|prune``: portable backups outside the repository.
"""

from __future__ import annotations

import os

import click

from drsync import backup, engine
from drsync.cli.common import (
    Exit,
    Invocation,
    config_only,
    echo_json,
    emit,
    exits,
    progress,
    repo_or_config,
    report_damage,
    say,
    table,
)
from drsync.cli.guards import own_paths
from drsync.cli.restoring import finish_restore, foreign_target, restore_options
from drsync.config import KeepPolicy
from drsync.errors import EXIT_FAILED, EXIT_INTEGRITY, UsageError
from drsync.fsutil import local_location
from drsync.repository.snapshots import iso
from drsync.text import printable
from drsync.units import count, human_size


@click.group("backup")
def backup_grp() -> None:
    """Portable backups: create, restore, verify, list, prune."""


def _backup_dest(inv: Invocation, dest: str | None, how: str = "--dest DIR") -> str:
    """The backup directory: given on the command line (``how`` says how, for the error), or the config's; a
    local directory (a path or ``file://``; UsageError for another scheme: never a directory named ``file:``)."""
    dest = dest or (inv.config.backups.destination if inv.config else "")
    if not dest:
        raise UsageError(f"name the backup directory: {how}, or --config FILE with [backups] destination")
    local = local_location(dest)
    if local is None:
        raise UsageError(f"backup directory {dest}: backups are written to a local directory (a path or file://); "
                         f"copy the backup elsewhere afterwards")
    return local


@backup_grp.command("create", epilog=exits(
             "0 created",
             "1 the repository cannot be read or DEST written",
             "2 no such snapshot, no --dest (nor [backups] destination), or a usage error",
             "3 a chunk or manifest in the repository is damaged"))
@repo_or_config
@click.option("--snapshot", "snapshot_id", required=True, help="Snapshot ID, name or 'latest'.")
@click.option("--dest", metavar="DIR", help="Directory that holds backups (default [backups] destination).")
@click.option("--mode", type=click.Choice(backup.MODES), default=None,
              help="full, light (without bulk data) or dataless (metadata only).")
def backup_create(inv: Invocation, snapshot_id: str, dest: str | None, mode: str | None) -> None:
    """Pull a snapshot out as a self-contained, portable backup.

    Writes DEST/<backup id>/ with only the chunks the snapshot needs, its manifest and backup.json, so
    that it restores without the repository; 'light' leaves out [backups] light_exclude globs, 'dataless'
    keeps metadata only. Chunks are checked against their hashes as they are copied."""
    cfg = inv.config.backups if inv.config else None
    mode = mode or (cfg.mode if cfg else "full")
    with progress("backup") as (advance, total):
        info = backup.create_backup(inv.open_repo(), snapshot_id, _backup_dest(inv, dest), mode=mode,
                                    light_exclude=cfg.light_exclude if cfg else (), progress=advance,
                                    on_total=total)
    emit(inv, info.to_json(), lambda: say(
        f"backup {info.path} created ({info.mode}): {count(info.files, 'file')}, {human_size(info.bytes)}, "
        f"{human_size(info.stored_bytes)} stored"))


@backup_grp.command("restore", epilog=exits(
             "0 restored (or, --dry-run, the restore would go ahead)",
             "1 the backup or target cannot be read or written, or another restore is writing to the target",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 the backup is damaged",
             "4 refused: a foreign target without --overwrite or --delete-extra"))
@config_only
@click.argument("backup_dir")
@click.option("--target", required=True, metavar="URL", help="Data root to restore onto (any cluster).")
@click.option("--checksum", is_flag=True, help="Re-hash files whose size and mtime match too.")
@restore_options("backup")
def backup_restore(inv: Invocation, backup_dir: str, target: str, checksum: bool, overwrite: bool,
                   delete_extra: bool, dry_run: bool) -> None:
    """Restore a backup onto any data root.

    Unlike snapshot restore it needs no repository and checks no cluster id or release: a backup moves
    data between clusters."""
    dest = engine.data_root_url(target)
    with progress("restore") as (advance, total):
        meta, result = backup.restore_backup(backup_dir, dest, checksum=checksum, progress=advance,
                                             on_total=total, dry_run=dry_run,
                                             foreign=foreign_target(inv, dest, overwrite, delete_extra),
                                             protect=own_paths(inv, repository=True))
    finish_restore(inv, "backup", meta.id, dest, dry_run, result)


@backup_grp.command("verify", epilog=exits(
             "0 intact",
             "1 the backup cannot be read",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 damage found (each problem listed)"))
@config_only
@click.argument("backup_dir")
def backup_verify(inv: Invocation, backup_dir: str) -> None:
    """Re-read and re-hash a whole backup; exit 3 on corruption.

    Checks backup.json, the manifest and every chunk against its hash; each damaged file is listed on
    stderr (--json: in the report)."""
    with progress("verify") as (advance, _total):
        report = backup.verify_backup(backup_dir, progress=advance)
    if inv.json:
        echo_json(report.as_dict())
        if not report.ok:
            raise Exit(EXIT_INTEGRITY, f"backup {backup_dir} is damaged")
        return
    if report.ok:
        r = report.repository
        say(f"backup {backup_dir} is intact ({count(r.chunks if r else 0, 'chunk')} verified)")
        return
    repo_report = report.repository
    problems = list(repo_report.problems) if repo_report else []
    files = [{"file": d["file"], "reason": d["reason"]} for d in report.damaged_backup_files]
    files += repo_report.damaged_files if repo_report else []
    report_damage(problems, files, f"backup {backup_dir} is damaged")


@backup_grp.command("list", epilog=exits(
             "0 listed (also when there is none)",
             "1 the directory cannot be read",
             "2 no DEST (nor [backups] destination), or a usage error",
             "3 a backup's backup.json is damaged (named on stderr; the others are listed)"))
@config_only
@click.argument("dest", required=False)
def backup_list(inv: Invocation, dest: str | None) -> None:
    """List the backups in a backup directory.

    Reads each backup's backup.json (nothing else); directories left by a backup create that did not
    finish are listed as incomplete, and a backup whose backup.json cannot be read as damaged."""
    listing = backup.list_backups(_backup_dest(inv, dest, "drsync backup list DIR"))
    backups, leftovers = listing.backups, listing.incomplete
    doc = {"backups": [b.to_json() for b in backups], "incomplete": leftovers, "damaged": listing.damaged}

    def human() -> None:
        # BACKUP is the directory (what prune names and removes; a copy keeps its backup.json's id)
        table(["BACKUP", "SNAPSHOT", "MODE", "CREATED", "FILES", "SIZE", "STORED"],
               [[os.path.basename(b.path), str(b.snapshot.get("id", "?")), b.mode, iso(b.created_at) or "",
                 str(b.files), human_size(b.bytes), human_size(b.stored_bytes)] for b in backups])
        if leftovers:
            say(f"{len(leftovers)} incomplete leftover(s), removed by 'drsync backup prune': "
                f"{', '.join(leftovers)}")

    emit(inv, doc, human)
    _report_damaged(listing.damaged)


def _report_damaged(damaged: list[dict[str, str]]) -> None:
    """Exit 3 naming each backup whose backup.json cannot be read (after the command's own report)."""
    if damaged:
        report_damage([], damaged, "damaged backups were left alone (check each with 'drsync backup verify DIR')")


@backup_grp.command("prune", epilog=exits(
             "0 pruned (or, --dry-run, listed)",
             "1 a backup could not be removed (named; the others were pruned)",
             "2 no DEST (nor [backups] destination), or a usage error",
             "3 a backup's backup.json is damaged: it is kept, the others are pruned"))
@config_only
@click.argument("dest", required=False)
@click.option("--keep-last", type=click.IntRange(0), default=0)
@click.option("--keep-hourly", type=click.IntRange(0), default=0)
@click.option("--keep-daily", type=click.IntRange(0), default=0)
@click.option("--keep-weekly", type=click.IntRange(0), default=0)
@click.option("--keep-monthly", type=click.IntRange(0), default=0)
@click.option("--keep-yearly", type=click.IntRange(0), default=0)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def backup_prune(inv: Invocation, dest: str | None, keep_last: int, keep_hourly: int, keep_daily: int,
                 keep_weekly: int, keep_monthly: int, keep_yearly: int, dry_run: bool) -> None:
    """Remove backups that the retention policy does not keep (restic's rules).

    Without --keep-* options the config's [backups] keep applies; a policy that keeps nothing removes
    nothing. Incomplete leftovers are removed too."""
    policy = KeepPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.is_empty() and inv.config:
        policy = inv.config.backups.keep
    pruned = backup.prune_backups(_backup_dest(inv, dest, "drsync backup prune DIR"), policy, dry_run=dry_run)
    decisions = pruned.decisions
    failed = {f["backup"]: f["reason"] for f in pruned.failed}
    doc = {"dry_run": dry_run, "keep": [{"id": d.id, "reasons": d.reasons} for d in decisions if d.keep],
           "remove": pruned.removed,
           "leftovers": pruned.leftovers, "damaged": pruned.damaged, "failed": pruned.failed}

    def human() -> None:
        for d in decisions:
            verb = "keep  " if d.keep else "FAILED" if d.id in failed else "remove"
            say(f"{verb} {d.id} {' '.join(d.reasons)}")
        for name in pruned.leftovers:
            say(f"remove {name} (left over by an interrupted backup or prune)")
        n = len(doc["remove"])
        kept = sum(1 for d in decisions if d.keep)
        say(f"{'would remove' if dry_run else 'removed'} {n} backup(s) and {len(pruned.leftovers)} leftover(s), "
            f"kept {kept}" + (f"; {len(failed)} could not be removed" if failed else ""))

    emit(inv, doc, human)
    if pruned.failed:
        damaged = (f"; {len(pruned.damaged)} damaged backup(s) left alone: "
                   + ", ".join(printable(d["file"]) for d in pruned.damaged)) if pruned.damaged else ""
        raise Exit(EXIT_FAILED, f"{len(pruned.failed)} backup(s) could not be removed (the others were): "
                                + "; ".join(f"{printable(f['backup'])}: {f['reason']}" for f in pruned.failed)
                                + damaged + "; fix that and prune again")
    _report_damaged(pruned.damaged)
