"""``drsync init`` and ``drsync repo verify|repair|gc|unlock``: a repository as a whole.
"""

from __future__ import annotations

import click

from drsync import engine
from drsync.cli.common import Exit, Invocation, echo_json, emit, exits, progress, repo_or_config, report_damage, say
from drsync.cli.guards import refuse_while_held, state_dir_for
from drsync.config import parse_duration
from drsync.errors import EXIT_INTEGRITY, UsageError
from drsync.protection import human_duration
from drsync.repository.lock import remove_locks
from drsync.units import count, human_size


@click.command("init", epilog=exits(
             "0 created",
             "1 the storage cannot be written",
             "2 no --cluster-id or --release (nor a config with them), a bad --protect, or a repository is "
                 "already there"))
@repo_or_config
@click.option("--cluster-id", help="The cluster this repository belongs to.")
@click.option("--release", help="The release the cluster runs.")
@click.option("--protect", metavar="DURATION", help="Record this [snapshots] protect window in the repository "
              "(default: the config's): no snapshot stored less than it ago is deleted, even by commands run "
              "with --repo alone.")
def init_cmd(inv: Invocation, cluster_id: str | None, release: str | None, protect: str | None) -> None:
    """Create a repository.

    Writes the repository's config (cluster id, release, format version) on its storage, and with a
    protect window its protect.json."""
    cluster_id = cluster_id or (inv.config.cluster.id if inv.config else None)
    release = release or (inv.config.cluster.release if inv.config else None)
    if not cluster_id or not release:
        raise UsageError("init needs --cluster-id and --release (or --config with [cluster] id and release)")
    window = (parse_duration(protect, "--protect") if protect is not None else
              inv.config.snapshots.protect if inv.config else 0.0)
    repo = engine.init_repository(inv.repo_url(), cluster_id=cluster_id, release=release, protect_s=window,
                                  state_dir=state_dir_for(inv) if window > 0 else "")
    doc = {"repository": repo.storage.url, "id": repo.config.id, "cluster_id": cluster_id, "release": release,
           "protect_s": window}
    emit(inv, doc, lambda: say(f"created repository {repo.storage.url} for cluster {cluster_id} "
                                      f"(release {release})" + (f"; snapshots are protected for "
                                                                 f"{human_duration(window)} after they are stored"
                                                                 if window > 0 else "")))


@click.group("repo")
def repo_grp() -> None:
    """Repository maintenance: verify, repair, gc, unlock."""


@repo_grp.command("verify", epilog=exits(
             "0 intact",
             "1 the repository cannot be read",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 damage found (each problem listed)"))
@repo_or_config
def repo_verify(inv: Invocation) -> None:
    """Re-read and re-hash every chunk; exit 3 on corruption.

    Reads every pack, checks each chunk's hash and each snapshot's manifest against the format; the damage
    found is listed on stderr (--json: in the report)."""
    repo = inv.open_repo()
    with progress("verify") as (advance, _total):
        report = engine.verify_repository(repo, progress=advance)
    if inv.json:
        echo_json(report.as_dict())
        if not report.ok:
            raise Exit(EXIT_INTEGRITY, f"repository {repo.storage.url} is damaged")
        return
    if report.ok:
        say(f"repository {repo.storage.url} is intact: {count(report.packs, 'pack')}, "
                   f"{count(report.chunks, 'chunk')}, {count(report.snapshots, 'snapshot')} verified")
        return
    problems = list(report.problems) + [f"chunk {c[:16]}: {r}" for c, r in report.damaged_chunks.items()]
    report_damage(problems, report.damaged_files, f"repository {repo.storage.url} is damaged")


@repo_grp.command("repair", epilog=exits(
             "0 nothing was lost, or the index forgot what was (each snapshot it leaves incomplete listed)",
             "1 the lock is held or the storage fails",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 refused: every pack is gone (is the storage mounted?) or an index file cannot be read; "
                 "nothing was changed"))
@repo_or_config
@click.option("--dry-run", is_flag=True, help="Verify and report what would be forgotten; change nothing.")
def repo_repair(inv: Invocation, dry_run: bool) -> None:
    """Make the index forget chunks the repository lost, so they can come back.

    Verifies every chunk (as repo verify), then, briefly under the exclusive lock, indexes again the packs
    no index file names and drops the index's rows of packs that are gone and of chunks that are damaged;
    nothing else is deleted. On a standby the primary's next
    shipment sends again what its snapshots still need (a running standby forgets lost packs by itself);
    on a primary a capture writes again what its files still hold, and the snapshots listed stay incomplete
    until restored from the standby or a backup."""
    repo = inv.open_repo()
    with progress("verify") as (advance, _total):
        verified, report = engine.repair_repository(repo, dry_run=dry_run, progress=advance)
    doc = {"repository": repo.storage.url, **report.as_dict(), "problems": list(verified.problems)}

    def table() -> None:
        verb = "would forget" if dry_run else "forgot"
        if report.changed:
            say(f"repository {repo.storage.url}: {verb} {count(report.forgotten_chunks, 'chunk')} "
                f"({count(len(report.lost_packs), 'lost pack')}, {count(report.damaged_chunks, 'damaged chunk')})"
                + (f"; {'would index' if dry_run else 'indexed'} {count(report.reindexed_chunks, 'chunk')} of "
                   f"{count(len(report.reindexed_packs), 'pack')} no index file named" if report.reindexed_chunks
                   else ""))
        elif not report.incomplete:
            say(f"repository {repo.storage.url}: nothing lost, nothing to forget")
        for problem in verified.problems:
            if not problem.startswith("pack ") or not problem.endswith(" is missing"):
                say(f"  also: {problem}")
        for snap in report.incomplete:
            say(f"  snapshot {snap} names chunks no longer held: a standby gets them again from its primary; "
                f"elsewhere restore it from the standby or a backup, or delete it")

    emit(inv, doc, table)


@repo_grp.command("gc", epilog=exits(
             "0 collected (or, --dry-run, what would be freed)",
             "1 the lock is held or the storage fails",
             "2 usage or configuration error (an option, the config, a name that does not exist)",
             "3 the repository is damaged",
             "4 refused: a standby holds applies back or has an unacknowledged mass change"))
@repo_or_config
@click.option("--dry-run", is_flag=True)
def repo_gc(inv: Invocation, dry_run: bool) -> None:
    """Delete chunks that no snapshot references.

    Marks what is live under the repository's shared lock (snapshots and uploads go on meanwhile), then
    sweeps under its exclusive lock (briefly: nothing writes then); refused while a standby of this
    repository holds applies back (its older snapshots may be the good copy)."""
    if not dry_run:
        refuse_while_held(inv, "collect garbage")
    report = engine.gc_repository(inv.open_repo(), dry_run=dry_run)
    emit(inv, report.as_dict(), lambda: click.echo(
        f"{'would free' if dry_run else 'freed'} {human_size(report.freed_bytes)}: {report.deleted_packs} packs "
        f"deleted, {report.repacked_packs} repacked, {report.live_chunks} live chunks kept"))


@repo_grp.command("unlock", epilog=exits(
             "0 done (also when nothing was removed)",
             "1 the storage fails",
             "2 usage or configuration error (an option, the config, a name that does not exist)"))
@repo_or_config
@click.option("--all", "all_locks", is_flag=True, help="Remove every lock, not only stale ones.")
def repo_unlock(inv: Invocation, all_locks: bool) -> None:
    """Remove stale locks (of processes that are gone).

    A lock is stale when the process that took it is gone, which only a process on the same host and in
    the same pid namespace can tell (a container with its own pid namespace cannot judge the host's
    locks), or when it has not been refreshed for 30 minutes. --all removes live and unreadable ones too
    (only when you know no drsync process uses the repository)."""
    repo = inv.open_repo()
    removed = remove_locks(repo.storage, all_locks=all_locks)
    def human() -> None:
        say(f"removed {len(removed)} lock(s)")
        for lk in removed:
            say(f"  {lk.describe()}")

    emit(inv, {"removed": [lk.describe() for lk in removed]}, human)
