"""The ``drsync`` command line: parsing, tables, ``--json``, progress, exit codes.

Nothing imports this module. Every command takes ``--config FILE`` (or
``DRSYNC_CONFIG``); one-shot commands can instead take ``--repo`` and
``--source``/``--target``. Errors print one line to stderr and exit with the
code DESIGN.md fixes; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

from drsync import __version__, backup, engine
from drsync.apply import ApplyResult, ForeignTarget
from drsync.config import Config, KeepPolicy, SnapshotsConfig, load_config, parse_duration
from drsync.errors import (
    EXIT_FAILED,
    EXIT_INTEGRITY,
    EXIT_REFUSED,
    EXIT_USAGE,
    ConfigError,
    DrsyncError,
    IntegrityError,
    RefusedError,
    UsageError,
)
from drsync.logsetup import FORMATS
from drsync.logsetup import configure as configure_logging
from drsync.protection import human_duration, read_window
from drsync.repository.lock import remove_locks
from drsync.repository.manifest import diff as diff_manifests
from drsync.repository.manifest import printable
from drsync.repository.snapshots import iso
from drsync.storage import open_storage
from drsync.units import human_size, with_iso_times


@dataclass
class Invocation:
    config: Config | None
    repo: str | None
    json: bool
    debug: bool

    def repo_url(self) -> str:
        if self.repo:
            return self.repo
        if self.config:
            return self.config.cluster.repository
        raise UsageError("name the repository: --repo URL, or --config FILE with [cluster] repository")

    def open_repo(self) -> engine.Repository:
        return engine.open_repository(self.repo_url())

    def data_url(self, given: str | None, what: str = "--source") -> str:
        if given:
            return given
        if self.config:
            return self.config.cluster.data
        raise UsageError(f"name the data root: {what} URL, or --config FILE with [cluster] data")

    @property
    def snapshots(self) -> SnapshotsConfig:
        return self.config.snapshots if self.config else SnapshotsConfig()


def _options(with_repo: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config, --json, --debug (and --repo where a command can work without an agent's config),
    turned into an Invocation."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(config_path: str | None, as_json: bool, debug: bool, repo: str | None = None,
                    **kw: Any) -> Any:
            _STATE["debug"] = debug or _STATE.get("debug", False)
            cfg = load_config(config_path) if config_path else None
            return fn(Invocation(cfg, repo, as_json, debug), **kw)

        options = [click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DRSYNC_CONFIG",
                                help="TOML configuration file (or DRSYNC_CONFIG).")]
        if with_repo:
            options.append(click.option("--repo", "repo", metavar="URL", help="Repository URL (instead of --config)."))
        options += [click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout."),
                    click.option("--debug", is_flag=True, help="Show tracebacks on errors.")]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


# Every command: one-shot ones can name a repository instead of a config; agent-side ones cannot.
_common = _options(with_repo=True)
_config_only = _options(with_repo=False)


_STATE: dict[str, bool] = {}


def emit(inv: Invocation, doc: Any, human: Callable[[], None]) -> None:
    """``--json``: the document, every time in it ISO 8601 with zone (and ``<key>_unix``); else ``human``."""
    if inv.json:
        _echo_json(doc)
    else:
        human()


def _echo_json(doc: Any) -> None:
    """One JSON document on stdout, every time in it ISO 8601 with zone (and ``<key>_unix``): the same for
    a command's result and for the document it prints before failing."""
    click.echo(json.dumps(with_iso_times(doc), indent=2, sort_keys=True, default=str))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*(escape(c) for c in r))  # cells are data, never rich markup ("[cluster]" must show)
    console = Console(width=200 if not sys.stdout.isatty() else None, highlight=False)
    with console.capture() as captured:
        console.print(t)
    # rich pads every row to the table's width: no trailing spaces in what scripts and diffs read.
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


@contextmanager
def progress(label: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(advance, set_total) callbacks; a live bar only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield (lambda n: None), (lambda n: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield (lambda n: bar.advance(task, n)), (lambda n: bar.update(task, total=n))


# --- commands -------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="drsync")
def cli() -> None:
    """drsync: snapshots, portable backups and a standby cluster kept in sync."""


@cli.command("init")
@_common
@click.option("--cluster-id", help="The cluster this repository belongs to.")
@click.option("--release", help="The release the cluster runs.")
@click.option("--protect", metavar="DURATION", help="Record this [snapshots] protect window in the repository "
              "(default: the config's): no snapshot stored less than it ago is deleted, even by commands run "
              "with --repo alone.")
def init_cmd(inv: Invocation, cluster_id: str | None, release: str | None, protect: str | None) -> None:
    """Create a repository."""
    cluster_id = cluster_id or (inv.config.cluster.id if inv.config else None)
    release = release or (inv.config.cluster.release if inv.config else None)
    if not cluster_id or not release:
        raise UsageError("init needs --cluster-id and --release (or --config with [cluster] id and release)")
    window = (parse_duration(protect, "--protect") if protect is not None else
              inv.config.snapshots.protect if inv.config else 0.0)
    repo = engine.init_repository(inv.repo_url(), cluster_id=cluster_id, release=release)
    if window > 0:
        engine.record_protection(repo, window, by="drsync init", state_dir=_state_dir(inv))
    doc = {"repository": repo.storage.url, "id": repo.config.id, "cluster_id": cluster_id, "release": release,
           "protect_s": window}
    emit(inv, doc, lambda: click.echo(f"created repository {repo.storage.url} for cluster {cluster_id} "
                                      f"(release {release})" + (f"; snapshots are protected for "
                                                                 f"{human_duration(window)} after they are stored"
                                                                 if window > 0 else "")))


@cli.group("snapshot")
def snapshot_grp() -> None:
    """Capture, inspect, restore and delete snapshots."""


def _snap_row(s: Any, now: float, protected_until: float | None) -> list[str]:
    exp = s.expires_at
    expires = "-" if exp is None else ("expired" if exp <= now else iso(exp) or "")
    return [str(s.seq) if s.seq else "-", s.id, s.name or "-", s.kind, iso(s.captured_at) or "", str(s.files),
            human_size(s.bytes), expires, iso(protected_until) or "-"]


@snapshot_grp.command("create")
@_common
@click.option("--source", metavar="URL", help="Data root to capture (instead of [cluster] data).")
@click.option("--name", default="", help="A name to find the snapshot by.")
@click.option("--reason", default="", help="Why it was taken (kept with the snapshot).")
@click.option("--ttl", default=None, metavar="DURATION", help="Delete after this long, e.g. 7d.")
@click.option("--allow-empty", is_flag=True,
              help="Capture an empty data root although the last snapshot was not (it deletes everything "
                   "on standbys).")
def snapshot_create(inv: Invocation, source: str | None, name: str, reason: str, ttl: str | None,
                    allow_empty: bool) -> None:
    """Capture the data root."""
    try:
        ttl_s = parse_duration(ttl, "--ttl") if ttl is not None else None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    cfg = inv.snapshots
    req = engine.SnapshotRequest(
        data_root=inv.data_url(source), name=name, reason=reason, ttl_s=ttl_s,
        hooks=engine.Hooks(cfg.pre_hook, cfg.post_hook, cfg.hook_timeout), reread_attempts=cfg.reread_attempts,
        exclude_paths=_own_paths(inv), allow_empty=allow_empty)
    repo = inv.open_repo()
    with progress("snapshot") as (advance, total):
        info = engine.create_snapshot(repo, req, progress=advance, on_total=total)
    doc = {"id": info.id, "name": info.name, "files": info.files, "bytes": info.bytes,
           "new_bytes": info.new_bytes, "read_bytes": info.read_bytes, "reused_files": info.reused_files,
           "duration_s": info.duration_s, "seq": info.seq, "captured_at": iso(info.captured_at),
           "reason": info.reason, "ttl_s": info.ttl_s, "parent": info.parent, "warnings": info.warnings,
           "stale_paths": info.stale_paths, "skipped_paths": info.skipped_paths}

    def human() -> None:
        click.echo(f"snapshot {info.id} taken: {info.files} files, {human_size(info.bytes)}, "
                   f"{human_size(info.new_bytes)} new, in {info.duration_s:.2f}s")
        for w in info.warnings:
            click.echo(f"  warning: {w}")

    emit(inv, doc, human)


@snapshot_grp.command("list")
@_common
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
        click.echo(f"warning: {e}", err=True)
        window = inv.snapshots.protect
        protection = engine.Protection(window, repo.snapshot_stored_times()) if window > 0 else None
    until = {s.id: protection.until(s, now) if protection and protection.is_protected(s, now) else None
             for s in snaps}
    emit(inv, [{**s.to_json(), "protection_ends_at": until[s.id]} for s in snaps], lambda: _table(
        ["SEQ", "ID", "NAME", "KIND", "CAPTURED", "FILES", "SIZE", "EXPIRES", "PROTECTED UNTIL"],
        [_snap_row(s, now, until[s.id]) for s in snaps]))


@snapshot_grp.command("show")
@_common
@click.argument("snapshot_id")
@click.option("--files", is_flag=True, help="List every path too.")
def snapshot_show(inv: Invocation, snapshot_id: str, files: bool) -> None:
    """Show one snapshot (ID, unique prefix, name or 'latest')."""
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
            click.echo(f"{k:12} {human_size(v) if k in ('bytes', 'new_bytes') else ('-' if v in (None, '') else v)}")
        for w in info.warnings:
            click.echo(f"warning      {printable(w)}")
        if manifest is not None:
            def shown(e: dict[str, Any]) -> str:
                link = f" -> {printable(e['target'])}" if e["target"] else ""
                return printable(e["path"]) + link

            _table(["TYPE", "MODE", "SIZE", "PATH"],
                   [[e["type"], e["mode"], str(e["size"]), shown(e)] for e in doc["entries"]])

    emit(inv, doc, human)


@snapshot_grp.command("diff")
@_common
@click.argument("a")
@click.argument("b")
def snapshot_diff(inv: Invocation, a: str, b: str) -> None:
    """Paths added, removed and changed from snapshot A to snapshot B."""
    repo = inv.open_repo()
    sa, sb = repo.find_snapshot(a), repo.find_snapshot(b)
    d = diff_manifests(repo.open_manifest(sa), repo.open_manifest(sb))
    doc = {"from": sa.id, "to": sb.id, **d.as_dict()}

    def human() -> None:
        for mark, paths in (("+", d.added), ("-", d.removed), ("M", d.changed)):
            for p in paths:
                click.echo(f"{mark} {printable(p)}")
        click.echo(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed")

    emit(inv, doc, human)


_BREAK_GLASS_HELP = ("Delete snapshots younger than [snapshots] protect too (operators on this cluster only; each "
                     "one is logged at WARNING and counted in the agent's state directory).")


def _state_dir(inv: Invocation) -> str:
    """The state directory of the agent that keeps this repository: its config's, else the one the
    repository's protect.json names (when it is on this machine), else the default inside a local
    repository; "" when none can be found."""
    from drsync.agent.state import state_dir_of

    try:
        if inv.config is not None:
            return state_dir_of(inv.config)
        try:
            recorded = read_window(open_storage(inv.repo_url()))
        except (IntegrityError, RefusedError):
            recorded = None  # a damaged document stops deletions by itself (engine.protection_of)
        if recorded is not None and recorded.state_dir and (os.path.isdir(recorded.state_dir) or
                                                            recorded.host == socket.gethostname()):
            return recorded.state_dir
        return os.path.join(engine.local_path(inv.repo_url(), "repository"), "agent")
    except DrsyncError:
        return ""


def _protection(inv: Invocation, break_glass: bool) -> dict[str, Any]:
    """The deletion commands' protection arguments: this cluster's [snapshots] protect (the window the
    repository records applies whatever is given: engine.protection_of) and, with --break-glass, the state
    directory where each protected deletion is recorded (the agent's, also with --repo alone)."""
    logging.getLogger("drsync.protection.break_glass").setLevel(logging.WARNING)  # on stderr, with who and what
    if inv.config is not None:
        from drsync.agent.state import state_dir_of

        return {"protect_window_s": inv.config.snapshots.protect,
                "break_glass_dir": state_dir_of(inv.config) if break_glass else None}
    if not break_glass:
        return {}
    recorded = read_window(open_storage(inv.repo_url()))
    if recorded is None or recorded.window_s <= 0:
        return {}  # nothing is protected here: nothing to record
    if recorded.state_dir and _state_dir(inv) != recorded.state_dir:
        raise UsageError(f"--break-glass records each deletion in the state directory of the agent that keeps "
                         f"this repository, {recorded.state_dir} on {recorded.host or 'its machine'}, which is not "
                         f"on this machine: run the command there, or with that agent's --config")
    state_dir = _state_dir(inv)
    if not state_dir:
        raise UsageError("--break-glass with --repo records each deletion in the state directory of the agent "
                         "that keeps this repository, and the repository names none: rerun with that agent's "
                         "--config")
    return {"break_glass_dir": state_dir}


@snapshot_grp.command("delete")
@_common
@click.argument("snapshot_ids", nargs=-1, required=True)
@click.option("--no-prune", is_flag=True, help="Keep unreferenced chunks (run 'drsync repo gc' later).")
@click.option("--break-glass", is_flag=True, help=_BREAK_GLASS_HELP)
def snapshot_delete(inv: Invocation, snapshot_ids: tuple[str, ...], no_prune: bool, break_glass: bool) -> None:
    """Delete snapshots and free the chunks nothing else uses.

    A snapshot stored less than [snapshots] protect ago (the config's, or the window the repository
    records, also with --repo) is refused (exit 4, nothing deleted) unless --break-glass is given.
    """
    _refuse_while_held(inv, "delete snapshots")
    infos, report = engine.delete_snapshots(inv.open_repo(), list(snapshot_ids), prune=not no_prune,
                                            **_protection(inv, break_glass))
    doc = {"deleted": [i.id for i in infos], "gc": report.as_dict() if report else None}

    def human() -> None:
        click.echo(f"deleted {', '.join(i.id for i in infos)}")
        if report:
            click.echo(f"freed {human_size(report.freed_bytes)} ({report.deleted_packs} packs deleted, "
                       f"{report.repacked_packs} repacked)")

    emit(inv, doc, human)


def _hold_of(inv: Invocation) -> Any:
    """The apply hold (deletion guard or operator) of the standby agent that keeps this repository, if any.

    Found in the agent's state directory: the config's, else the one the repository's protect.json names,
    else the default one inside a local ``--repo``."""
    from drsync.agent.hold import HoldFile

    state_dir = _state_dir(inv)
    if not state_dir:
        return None
    hold = HoldFile(state_dir).load()
    return hold if hold.active or hold.flagged else None


def _refuse_while_held(inv: Invocation, what: str) -> None:
    """While a standby holds applies back, its older snapshots are what an operator may need: keep them."""
    hold = _hold_of(inv)
    if hold is None:
        return
    why = (f"snapshot {hold.snapshot} is held by the "
           f"{'mass-change' if hold.changed and not hold.removed else 'deletion'} guard" if hold.snapshot else
           "applies are held (drsync apply --hold)" if hold.operator_since else
           f"the mass change of snapshot {hold.flagged} is not acknowledged (drsync apply --confirm "
           f"{hold.flagged})")
    raise RefusedError(f"will not {what} in this repository while {why}: the snapshots it keeps may be the "
                       f"good copy; settle the hold first (drsync apply --confirm or --resume, with the "
                       f"standby's config)")


def _own_paths(inv: Invocation) -> tuple[str, ...]:
    """drsync's own files that a config puts inside the data root (the agent's state directory)."""
    if inv.config is None:
        return ()
    from drsync.agent.state import state_dir_of

    try:
        return (state_dir_of(inv.config),)
    except DrsyncError:
        return ()


def _foreign(inv: Invocation, dest: str, overwrite: bool, delete_extra: bool) -> ForeignTarget | None:
    """A restore onto the cluster's own data root may change whatever is there; onto any other target,
    overwriting what is there needs --overwrite and removing what the snapshot lacks --delete-extra."""
    if inv.config is not None and engine.data_root_url(dest) == engine.data_root_url(inv.config.cluster.data):
        return None
    return ForeignTarget(overwrite=overwrite, delete_extra=delete_extra)


def _restore_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--overwrite, --delete-extra and --dry-run of the restore commands."""
    mine = "this cluster's data root"
    options = [
        click.option("--overwrite", is_flag=True, help=f"Replace files, links and directories that already exist "
                     f"in a target other than {mine} and differ from the {what}'s (refused otherwise: exit 4, "
                     f"nothing changed)."),
        click.option("--delete-extra", is_flag=True, help=f"Remove what the {what} lacks from a target other than "
                     f"{mine} (refused otherwise: exit 4, nothing changed)."),
        click.option("--dry-run", is_flag=True, help="Only list what would be written, overwritten and removed; "
                     "exit 4 when the restore would be refused."),
    ]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@snapshot_grp.command("restore")
@_common
@click.argument("snapshot_id")
@click.option("--target", metavar="URL", help="Where to restore (default: the cluster's data root).")
@click.option("--checksum", is_flag=True, help="Re-hash files whose size and mtime match too.")
@_restore_options("snapshot")
def snapshot_restore(inv: Invocation, snapshot_id: str, target: str | None, checksum: bool, overwrite: bool,
                     delete_extra: bool, dry_run: bool) -> None:
    """Restore a snapshot onto the same cluster (same cluster id and release)."""
    repo = inv.open_repo()
    cluster_id = inv.config.cluster.id if inv.config else repo.config.cluster_id
    release = inv.config.cluster.release if inv.config else repo.config.release
    dest = inv.data_url(target, "--target")
    with progress("restore") as (advance, total):
        info, result = engine.restore_snapshot(repo, snapshot_id, dest, cluster_id=cluster_id,
                                               release=release, checksum=checksum, progress=advance,
                                               on_total=total, protect=_own_paths(inv), dry_run=dry_run,
                                               foreign=_foreign(inv, dest, overwrite, delete_extra),
                                               distcp=engine.distcp_settings(inv.config) if inv.config else None,
                                               data_root=inv.config.cluster.data if inv.config else None)
    doc = {"snapshot": info.id, "target": dest, "dry_run": dry_run, **result.as_dict()}
    emit(inv, doc, lambda: _report_restore(f"snapshot {info.id}", dest, result))
    if result.refused:
        raise _Exit(EXIT_REFUSED, f"dry run: the restore would be refused: {result.refused}")


def _report_restore(what: str, dest: str, result: ApplyResult) -> None:
    if result.planned is not None:
        replaced = set(result.planned.get("overwrite", []))
        click.echo(f"dry run: restoring {what} to {dest} would write {result.written_files} files "
                   f"({human_size(result.written_bytes)}; {len(replaced)} path(s) overwritten), leave "
                   f"{result.unchanged_files} unchanged and remove {result.removed}"
                   + ("; the restore itself would be refused (exit 4)" if result.refused else "")
                   + "; nothing was changed")
        listed = [("remove", result.planned.get("remove", [])),
                  ("replace", sorted(replaced)),
                  ("write", [p for p in result.planned.get("write", []) if p not in replaced]),
                  ("mkdir", result.planned.get("mkdir", [])),
                  ("link", [p for p in result.planned.get("link", []) if p not in replaced])]
        for kind, paths in listed:
            for p in paths[:20]:
                click.echo(f"  {kind:7} {printable(p)}")
            if len(paths) > 20:
                click.echo(f"  {kind:7} ... and {len(paths) - 20} more (--json lists all)")
        return
    click.echo(f"restored {what} to {dest}: {result.written_files} files written "
               f"({human_size(result.written_bytes)}), {result.unchanged_files} unchanged, {result.removed} removed")
    for w in result.warnings:
        click.echo(f"  note: {w}")


@snapshot_grp.command("expire")
@_common
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--break-glass", is_flag=True, help=_BREAK_GLASS_HELP)
def snapshot_expire(inv: Invocation, dry_run: bool, break_glass: bool) -> None:
    """Delete snapshots past their TTL, and periodic ones beyond [snapshots] keep.

    Those stored less than [snapshots] protect ago (the config's, or the window the repository records, also
    with --repo) stay (listed as protected) unless --break-glass is given.
    """
    if not dry_run:
        _refuse_while_held(inv, "expire snapshots")
    res = engine.expire_snapshots(inv.open_repo(), inv.snapshots.keep, dry_run=dry_run,
                                  **_protection(inv, break_glass))
    doc = {"deleted": [s.id for s in res.deleted], "kept": [s.id for s in res.kept], "dry_run": dry_run,
           "protected": [s.id for s in res.protected], "break_glass": [s.id for s in res.break_glass],
           "gc": res.gc.as_dict() if res.gc else None}
    verb = "would delete" if dry_run else "deleted"
    protected = (f"; {len(res.protected)} of them protected by [snapshots] protect (--break-glass deletes them): "
                 f"{', '.join(s.id for s in res.protected)}" if res.protected else "")
    emit(inv, doc, lambda: click.echo(
        f"{verb} {len(res.deleted)} snapshot(s){': ' if res.deleted else ''}"
        f"{', '.join(s.id for s in res.deleted)}; kept {len(res.kept)}{protected}"))


@cli.group("backup")
def backup_grp() -> None:
    """Portable backups: create, restore, verify, list, prune."""


def _backup_dest(inv: Invocation, dest: str | None, how: str = "--dest DIR") -> str:
    """The backup directory: given on the command line (``how`` says how, for the error), or the config's."""
    if dest:
        return dest
    if inv.config and inv.config.backups.destination:
        return inv.config.backups.destination
    raise UsageError(f"name the backup directory: {how}, or --config FILE with [backups] destination")


@backup_grp.command("create")
@_common
@click.option("--snapshot", "snapshot_id", required=True, help="Snapshot ID, name or 'latest'.")
@click.option("--dest", metavar="DIR", help="Directory that holds backups (default [backups] destination).")
@click.option("--mode", type=click.Choice(backup.MODES), default=None,
              help="full, light (without bulk data) or dataless (metadata only).")
def backup_create(inv: Invocation, snapshot_id: str, dest: str | None, mode: str | None) -> None:
    """Pull a snapshot out as a self-contained, portable backup."""
    cfg = inv.config.backups if inv.config else None
    mode = mode or (cfg.mode if cfg else "full")
    with progress("backup") as (advance, total):
        info = backup.create_backup(inv.open_repo(), snapshot_id, _backup_dest(inv, dest), mode=mode,
                                    light_exclude=cfg.light_exclude if cfg else (), progress=advance,
                                    on_total=total)
    emit(inv, info.to_json(), lambda: click.echo(
        f"backup {info.path} created ({info.mode}): {info.files} files, {human_size(info.bytes)}, "
        f"{human_size(info.stored_bytes)} stored"))


@backup_grp.command("restore")
@_config_only
@click.argument("backup_dir")
@click.option("--target", required=True, metavar="URL", help="Data root to restore onto (any cluster).")
@click.option("--checksum", is_flag=True, help="Re-hash files whose size and mtime match too.")
@_restore_options("backup")
def backup_restore(inv: Invocation, backup_dir: str, target: str, checksum: bool, overwrite: bool,
                   delete_extra: bool, dry_run: bool) -> None:
    """Restore a backup onto any data root."""
    dest = engine.data_root_url(target)
    with progress("restore") as (advance, total):
        meta, result = backup.restore_backup(backup_dir, dest, checksum=checksum, progress=advance,
                                             on_total=total, dry_run=dry_run,
                                             foreign=_foreign(inv, dest, overwrite, delete_extra))
    doc = {"backup": meta.id, "target": dest, "dry_run": dry_run, **result.as_dict()}
    emit(inv, doc, lambda: _report_restore(f"backup {meta.id}", dest, result))
    if result.refused:
        raise _Exit(EXIT_REFUSED, f"dry run: the restore would be refused: {result.refused}")


def _report_damage(problems: list[str], damaged_files: list[dict[str, str]], what: str) -> None:
    for p in problems:
        click.echo(f"  {p}", err=True)
    for d in damaged_files:
        where = f"snapshot {d['snapshot']}: " if "snapshot" in d else ""
        click.echo(f"  {where}{printable(d.get('path') or d.get('file') or '')}: {d['reason']}", err=True)
    raise _Exit(EXIT_INTEGRITY, f"{what}: {len(damaged_files) + len(problems)} problem(s) found; see above")


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@backup_grp.command("verify")
@_config_only
@click.argument("backup_dir")
def backup_verify(inv: Invocation, backup_dir: str) -> None:
    """Re-read and re-hash a whole backup; exit 3 on corruption."""
    with progress("verify") as (advance, _total):
        report = backup.verify_backup(backup_dir, progress=advance)
    if inv.json:
        _echo_json(report.as_dict())
        if not report.ok:
            raise _Exit(EXIT_INTEGRITY, f"backup {backup_dir} is damaged")
        return
    if report.ok:
        r = report.repository
        click.echo(f"backup {backup_dir} is intact ({r.chunks if r else 0} chunks verified)")
        return
    repo_report = report.repository
    problems = list(repo_report.problems) if repo_report else []
    files = [{"file": d["file"], "reason": d["reason"]} for d in report.damaged_backup_files]
    files += repo_report.damaged_files if repo_report else []
    _report_damage(problems, files, f"backup {backup_dir} is damaged")


@backup_grp.command("list")
@_config_only
@click.argument("dest", required=False)
def backup_list(inv: Invocation, dest: str | None) -> None:
    """List the backups in a backup directory."""
    backups, leftovers = backup.list_backups(_backup_dest(inv, dest, "drsync backup list DIR"))
    doc = {"backups": [b.to_json() for b in backups], "incomplete": leftovers}

    def human() -> None:
        _table(["BACKUP", "SNAPSHOT", "MODE", "CREATED", "FILES", "SIZE", "STORED"],
               [[b.id, b.snapshot.get("id", "?"), b.mode, iso(b.created_at) or "", str(b.files), human_size(b.bytes),
                 human_size(b.stored_bytes)] for b in backups])
        if leftovers:
            click.echo(f"{len(leftovers)} incomplete leftover(s), removed by 'drsync backup prune': "
                       f"{', '.join(leftovers)}")

    emit(inv, doc, human)


@backup_grp.command("prune")
@_config_only
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
    """Remove backups that the retention policy does not keep (restic's rules)."""
    policy = KeepPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.is_empty() and inv.config:
        policy = inv.config.backups.keep
    decisions = backup.prune_backups(_backup_dest(inv, dest, "drsync backup prune DIR"), policy, dry_run=dry_run)
    doc = {"dry_run": dry_run, "keep": [{"id": d.id, "reasons": d.reasons} for d in decisions if d.keep],
           "remove": [d.id for d in decisions if not d.keep]}

    def human() -> None:
        for d in decisions:
            click.echo(f"{'keep  ' if d.keep else 'remove'} {d.id} {' '.join(d.reasons)}")
        n = sum(1 for d in decisions if not d.keep)
        click.echo(f"{'would remove' if dry_run else 'removed'} {n} backup(s), kept {len(decisions) - n}")

    emit(inv, doc, human)


@cli.group("repo")
def repo_grp() -> None:
    """Repository maintenance: verify, gc, unlock."""


@repo_grp.command("verify")
@_common
def repo_verify(inv: Invocation) -> None:
    """Re-read and re-hash every chunk; exit 3 on corruption."""
    repo = inv.open_repo()
    with progress("verify") as (advance, _total):
        report = engine.verify_repository(repo, progress=advance)
    if inv.json:
        _echo_json(report.as_dict())
        if not report.ok:
            raise _Exit(EXIT_INTEGRITY, f"repository {repo.storage.url} is damaged")
        return
    if report.ok:
        click.echo(f"repository {repo.storage.url} is intact: {report.packs} packs, {report.chunks} chunks, "
                   f"{report.snapshots} snapshots verified")
        return
    problems = list(report.problems) + [f"chunk {c[:16]}: {r}" for c, r in report.damaged_chunks.items()]
    _report_damage(problems, report.damaged_files, f"repository {repo.storage.url} is damaged")


@repo_grp.command("gc")
@_common
@click.option("--dry-run", is_flag=True)
def repo_gc(inv: Invocation, dry_run: bool) -> None:
    """Delete chunks that no snapshot references."""
    if not dry_run:
        _refuse_while_held(inv, "collect garbage")
    report = engine.gc_repository(inv.open_repo(), dry_run=dry_run)
    emit(inv, report.as_dict(), lambda: click.echo(
        f"{'would free' if dry_run else 'freed'} {human_size(report.freed_bytes)}: {report.deleted_packs} packs "
        f"deleted, {report.repacked_packs} repacked, {report.live_chunks} live chunks kept"))


@repo_grp.command("unlock")
@_common
@click.option("--all", "all_locks", is_flag=True, help="Remove every lock, not only stale ones.")
def repo_unlock(inv: Invocation, all_locks: bool) -> None:
    """Remove stale locks (of processes that are gone)."""
    repo = inv.open_repo()
    removed = remove_locks(repo.storage, all_locks=all_locks)
    emit(inv, {"removed": [lk.describe() for lk in removed]},
         lambda: click.echo(f"removed {len(removed)} lock(s)" + "".join(f"\n  {lk.describe()}" for lk in removed)))


@cli.command("status")
@_config_only
@click.option("--points", is_flag=True, help="List the points in time this agent could be promoted at (its "
              "repository's snapshots: applied, pending, held, stored); needs no ZooKeeper.")
def status_cmd(inv: Invocation, points: bool) -> None:
    """Who is primary, the epoch, and every agent the group has known: up or down, last seen, role, lag."""
    from drsync.agent.status import agent_rows, collect_status, headline, local_points, refusal_lines

    if inv.config is None:
        raise UsageError("drsync status needs --config FILE (the agent's configuration)")
    if points:
        pts = local_points(inv.config)
        emit(inv, pts, lambda: (click.echo(pts["summary"]), _table(
            ["SNAPSHOT", "CAPTURED", "KIND", "STATE", "FILES", "SIZE"],
            [[p["id"], iso(p["captured_at"]), p["kind"], p["state"], str(p["files"]), human_size(p["bytes"])]
             for p in pts["points"]])))
        return
    doc = collect_status(inv.config)
    try:
        pts = local_points(inv.config)
        doc["recovery_points"] = {"count": len(pts["points"]), "pending": pts["pending"],
                                  "oldest_captured_at": pts["points"][0]["captured_at"] if pts["points"] else None,
                                  "newest_captured_at": pts["points"][-1]["captured_at"] if pts["points"] else None,
                                  "summary": pts["summary"].split(". Promote")[0]}
    except DrsyncError:
        doc["recovery_points"] = None  # this host has no readable repository of the agent

    def human() -> None:
        click.echo(headline(doc))
        _table(["AGENT", "STATE", "ROLE", "ADDRESS", "LAST SEEN", "LAG", "APPLIED SNAPSHOT"], agent_rows(doc))
        for a in doc["agents"]:
            if a.get("state") == "down":
                click.echo(f"agent {a['name'] or a['address']} is down: {a.get('down_reason')}")
        for line in refusal_lines(doc):
            click.echo(line)
        m = doc.get("maintenance")
        if m:
            click.echo(f"MAINTENANCE: agent {m['agent']} (primary of epoch {m.get('epoch')}) stopped on purpose "
                       f"since {m['since']} ({m.get('reason')}): no automatic promotion until it is back")
        waiting = [a for a in doc["agents"] if a.get("role") == "ex-primary"]
        for a in waiting:
            click.echo(f"agent {a['name']} is an ex-primary waiting to rejoin: demote_command has not succeeded; "
                       f"once its production writers are stopped, run drsync rejoin with its config")
        for a in doc["agents"]:
            h = a.get("apply_hold")
            if h and h.get("held"):
                why = [x for x in (h.get("message"), "applies held by an operator: drsync apply --resume"
                                   if h.get("operator_hold") else None) if x]
                click.echo(f"APPLY HELD on {a['name']}: {'; '.join(why) or 'applies are held'}")
            if h and h.get("flagged"):
                click.echo(f"MASS CHANGE on {a['name']}: {h.get('flagged_message')}")
        if doc.get("switchover"):
            sw = doc["switchover"]
            click.echo(f"switchover to {sw.get('to')}: {sw.get('status')}")
        if doc.get("replication"):
            click.echo(f"replication mode (this config): {doc['replication']['summary']}")
        last = doc["last_snapshot"]
        click.echo(f"last snapshot here: {last['id']} at {last['captured_at']}" if last else "no snapshot here yet")
        if doc.get("recovery_points"):
            click.echo(doc["recovery_points"]["summary"] + " (drsync status --points lists them)")
        d = doc.get("last_drill")
        if d:
            click.echo(f"last drill: #{d.get('number')} by {d.get('agent')} at {iso(d.get('started_at') or 0)}: "
                       f"{'passed' if d.get('passed') else 'FAILED'}, RPO {d.get('rpo_s')} s, RTO {d.get('rto_s')} s")
        else:
            click.echo("no drill yet (drsync drill run on a standby)")

    emit(inv, doc, human)


@cli.command("history")
@_config_only
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many changes to show, newest first (0: every one kept).")
def history_cmd(inv: Invocation, limit: int) -> None:
    """Every change of primary in this group: epoch, from, to, when, why and by whom."""
    from drsync.agent.history import collect_history, history_rows

    entries = collect_history(_need_config(inv, "history"), limit)
    emit(inv, entries, lambda: _table(["EPOCH", "WHEN", "FROM", "TO", "WHY", "BY", "DETAIL"], history_rows(entries))
         if entries else click.echo("no change of primary recorded yet (drsync promote makes the first)"))


@cli.command("promote")
@_config_only
@click.option("--force", is_flag=True, help="Promote although a primary's session is alive (it is stepped down) "
              "or its agent is stopped for maintenance.")
@click.option("--accept-data-loss", is_flag=True, help="Promote although this standby lacks data the group has: "
              "its lag exceeds max_lag_on_failover, another live standby has applied a newer snapshot (position "
              "check), or it has never applied a snapshot. Not for an empty data root (--promote-empty-root).")
@click.option("--no-fence", is_flag=True, help="Do not run coordination.fence_command: you stopped the old "
              "primary's production writers yourself.")
@click.option("--promote-empty-root", is_flag=True, help="Promote although this agent's data root is empty: the "
              "group's production becomes an empty tree (other agents' deletion guards hold that shipment).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the agent to confirm it acts as primary.")
@click.option("--dry-run", is_flag=True, help="Run every check and say what would happen; change nothing (exit "
              "code as the promotion would end: 0, 1, 2 or 4).")
@click.option("--to-snapshot", "to_snapshot", metavar="ID", help="Promote at this earlier snapshot of the "
              "standby's own repository (damage that replicated): it is applied first; newer ones are kept.")
@click.option("--before", metavar="TIME", help="Promote at the newest snapshot captured at or before TIME (ISO "
              "8601, local time without a zone; Unix seconds; or a span ago such as 2h).")
@click.option("--apply-received", is_flag=True, help="With replication.apply_delay: apply the newest snapshot "
              "received first, then promote.")
@click.option("--delayed-state", is_flag=True, help="With replication.apply_delay: promote the root as it is; the "
              "snapshots received meanwhile stay unapplied in the repository.")
def promote_cmd(inv: Invocation, force: bool, accept_data_loss: bool, no_fence: bool, promote_empty_root: bool,
                wait_s: float, dry_run: bool, to_snapshot: str | None, before: str | None, apply_received: bool,
                delayed_state: bool) -> None:
    """Make this config's agent the primary of its group; succeeds only once its agent acts as primary.

    Exit 4 when refused for safety, 1 when its agent is not running or does not take over within
    --wait. Over an earlier primary, coordination.fence_command runs first and must succeed.
    --to-snapshot/--before promote at an earlier point (drsync status --points lists them)."""
    from drsync.agent.control import PointChoice, promote
    from drsync.agent.pointintime import parse_before

    point = PointChoice(to_snapshot=to_snapshot,
                        before=parse_before(before, time.time()) if before is not None else None,
                        apply_received=apply_received, delayed_state=delayed_state)
    doc = promote(_need_config(inv, "promote"), force=force, accept_data_loss=accept_data_loss, wait_s=wait_s,
                  no_fence=no_fence, promote_empty_root=promote_empty_root, dry_run=dry_run, point=point)

    def human() -> None:
        click.echo(doc["message"])
        for c in doc.get("checks", []):
            click.echo(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<12} {c['detail']}")

    emit(inv, doc, human)
    if dry_run and doc.get("exit_code"):
        raise SystemExit(doc["exit_code"])


@cli.command("rejoin")
@_config_only
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the running agent to report itself a standby.")
def rejoin_cmd(inv: Invocation, wait_s: float) -> None:
    """Let this ex-primary rejoin as a standby: you confirm its production writers are stopped.

    Needed when demote_command is not configured or did not succeed. Its data root is kept as a
    'before-rejoin' snapshot first, then follows the primary."""
    from drsync.agent.control import rejoin

    doc = rejoin(_need_config(inv, "rejoin"), wait_s=wait_s)
    emit(inv, doc, lambda: click.echo(doc["message"]))


@cli.command("replace-identity")
@_config_only
def replace_identity_cmd(inv: Invocation) -> None:
    """Make this agent the owner of its agent.name in the group, in place of the identity recorded there.

    An agent's identity is the agent id in its state directory, made at its first start; the group
    refuses another id under a name it knows (a copied config with a fresh state directory is not the
    agent). After a reinstall, or when the state directory was lost, run this once on the new host with
    the agent stopped and the old one gone for good: the group then records this state directory's id
    (and, when the epoch names this agent, lets it take its primary claim back); the old identity is
    refused from then on. Refused while the name is registered live; logged at WARNING and recorded in
    drsync history."""
    from drsync.agent.control import replace_identity

    logging.getLogger("drsync.identity").setLevel(logging.WARNING)  # on stderr, with who and what
    doc = replace_identity(_need_config(inv, "replace-identity"))
    emit(inv, doc, lambda: click.echo(doc["message"]))


@cli.command("switchover")
@_config_only
@click.option("--to", "to", metavar="AGENT", help="The standby that becomes primary (default: this config's agent, "
              "or the only standby).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait (coordination.switchover_timeout).")
@click.option("--cancel", is_flag=True, help="Withdraw a pending switchover request.")
def switchover_cmd(inv: Invocation, to: str | None, timeout_s: float | None, cancel: bool) -> None:
    """Planned hand-over with zero data loss: final snapshot shipped and applied, then the roles swap."""
    from drsync.agent.control import switchover

    doc = switchover(_need_config(inv, "switchover"), to=to, timeout_s=timeout_s, cancel=cancel)
    if cancel:
        emit(inv, doc, lambda: click.echo("switchover request withdrawn" if doc["cancelled"] else
                                          "no switchover was pending"))
        return
    emit(inv, doc, lambda: click.echo(f"switched over from {doc['from']} to {doc['to']} at epoch {doc['epoch']} "
                                      f"(final snapshot {doc['final_snapshot']}, {doc['took_s']:.1f}s)"))


@cli.group("drill")
def drill_grp() -> None:
    """Rehearsals on the standby: verify, trial-restore, time a dry-run promotion."""


@drill_grp.command("run")
@_config_only
@click.option("--full", is_flag=True, help="Verify every chunk, whatever drills.sample says.")
@click.option("--to-snapshot", "point", metavar="ID", help="Rehearse a promotion at this earlier snapshot "
              "(drsync status --points): verify it in full and restore it into scratch space.")
def drill_run(inv: Invocation, full: bool, point: str | None) -> None:
    """Run a drill now on this standby; exit 1 when it fails."""
    from drsync.agent.drill import run_drill
    from drsync.agent.loop import open_coordinator
    from drsync.agent.state import state_dir_of

    cfg = _need_config(inv, "drill run")
    open_coord = None
    is_primary = False
    if cfg.agent.role == "auto":
        def open_coord() -> Any:
            return open_coordinator(cfg)

        coord = open_coord()
        coord.start()
        try:
            primary = coord.read_primary()
        finally:
            coord.close()
        is_primary = primary is not None and primary.agent == cfg.agent.name
    report = run_drill(cfg, state_dir=state_dir_of(cfg), open_coord=open_coord, full=full or None,
                       is_primary=is_primary, point=point)
    doc = report.as_dict()

    def human() -> None:
        click.echo(f"drill {report.number} on {'the earlier ' if report.point_in_time else ''}snapshot "
                   f"{report.snapshot or '-'}: "
                   f"{'passed' if report.passed else 'FAILED'}")
        for s in report.steps:
            click.echo(f"  {'ok  ' if s.passed else 'FAIL'} {s.name:10} {s.duration_s:8.2f}s  {s.detail}")
        click.echo(f"  RPO {report.rpo_s if report.rpo_s is not None else '-'} s, "
                   f"RTO {report.rto_s if report.rto_s is not None else '-'} s ({report.rto_basis or 'not estimated'})")

    emit(inv, doc, human)
    if not report.passed:
        first = next(s for s in report.steps if not s.passed)
        raise _Exit(EXIT_FAILED, f"drill {report.number} failed at {first.name}: {first.detail}")


@cli.group("config")
def config_grp() -> None:
    """Configuration."""


@config_grp.command("check")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), envvar="DRSYNC_CONFIG",
              help="TOML configuration file (or DRSYNC_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds to wait for ZooKeeper and each peer agent.")
def config_check(config_path: str, as_json: bool, debug: bool, timeout_s: float) -> None:
    """Validate a config, its data root and repository, ZooKeeper and the peer agents; list every problem."""
    from drsync.agent.configcheck import check_config

    checks = check_config(config_path, timeout_s=timeout_s)
    failed = [c for c in checks if not c.ok]
    inv = Invocation(None, None, as_json, debug)
    emit(inv, {"ok": not failed, "checks": [c.as_dict() for c in checks]},
         lambda: _table(["CHECK", "RESULT", "DETAIL"],
                        [[c.name, ("WARN" if c.warn else "ok") if c.ok else "FAIL", c.detail] for c in checks]))
    if failed:
        code = EXIT_USAGE if any(c.kind == "config" for c in failed) else EXIT_FAILED
        raise _Exit(code, f"{len(failed)} problem(s) in {config_path}; first: {failed[0].name}: {failed[0].detail}")


def _need_config(inv: Invocation, what: str) -> Config:
    if inv.config is None:
        raise UsageError(f"drsync {what} needs --config FILE (the agent's configuration)")
    return inv.config


@cli.command("apply")
@_config_only
@click.option("--confirm", "confirm", metavar="SNAPSHOT",
              help="Apply the snapshot a guard holds (deletions, mass changes), or acknowledge an applied mass "
                   "change (replication.on_mass_change = \"alert\").")
@click.option("--hold", "hold", is_flag=True, help="Store shipments but apply none until --resume.")
@click.option("--resume", "resume", is_flag=True, help="Lift a hold set with --hold.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds to wait for the running agent to carry the request out.")
def apply_cmd(inv: Invocation, confirm: str | None, hold: bool, resume: bool, wait_s: float) -> None:
    """On a standby: show what holds applies back or is flagged; confirm a held snapshot; hold and resume applies."""
    from drsync.agent.hold import HoldFile
    from drsync.agent.requests import submit
    from drsync.agent.state import StateStore, state_dir_of

    cfg = _need_config(inv, "apply")
    chosen = [n for n, v in (("--confirm", confirm is not None), ("--hold", hold), ("--resume", resume)) if v]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {', '.join(chosen)}")
    if cfg.agent.role == "primary":
        raise UsageError(f"agent {cfg.agent.name} is a primary (agent.role); run drsync apply with the "
                         f"standby's config")
    if chosen:
        name, args = (("apply-confirm", {"snapshot": confirm}) if confirm is not None else
                      ("apply-hold", {}) if hold else ("apply-resume", {}))
        reply = submit(cfg, name, args, wait_s=wait_s, open_agent=_open_agent_here)
        doc = {"action": name, **reply.as_dict()}
        if not reply.ok:
            if inv.json:
                _echo_json(doc)
            raise _Exit(reply.exit_code, reply.message)
        emit(inv, doc, lambda: click.echo(reply.message))
        return
    state_dir = state_dir_of(cfg)
    h = HoldFile(state_dir).load()
    applied = StateStore(state_dir).load().applied_snapshot
    doc = {"agent": cfg.agent.name, "applied_snapshot": applied or None, **h.as_dict()}

    def human() -> None:
        click.echo(f"standby {cfg.agent.name}: applied snapshot {applied or '(none)'}")
        if h.operator_since:
            click.echo(f"applies held since {iso(h.operator_since)} (drsync apply --hold); "
                       f"'drsync apply --resume' lifts it")
        if h.snapshot:
            click.echo(f"held by the {'mass-change' if h.changed and not h.removed else 'deletion'} guard since "
                       f"{iso(h.held_at)}: {h.message}")
        if h.flagged:
            click.echo(f"MASS CHANGE (applied, not acknowledged): {h.flagged_message}")
        if h.active and h.latest:
            click.echo(f"{h.refused} shipment(s) stored and refused while held; newest {h.latest}")
        if not h.active:
            click.echo("nothing is held: shipments are applied as they arrive")

    emit(inv, doc, human)


def _open_agent_here(cfg: Config) -> Any:
    """The agent of ``cfg`` opened in this process without network: a request carried out directly while
    no agent runs (drsync.agent.requests.submit)."""
    from drsync.agent.loop import Agent

    return Agent(cfg, serve_network=False)


@cli.command("agent")
@_config_only
@click.option("--once", is_flag=True, help="Primary only: run one replication cycle and exit (1 if it failed).")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Log lines on stderr as text or as JSON objects (time, level, logger, group, agent, message).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="The least severe records logged (--once: warning unless set lower).")
def agent_cmd(inv: Invocation, once: bool, log_format: str, log_level: str) -> None:
    """Run the agent for this cluster (gRPC server and, as primary, the shipping loop).

    Logs go to stderr, one line per record with an ISO 8601 time and zone, the group and the agent;
    refusals and failed shipments are warnings or errors."""
    import signal

    from drsync.agent.loop import Agent

    if inv.config is None:
        raise UsageError("drsync agent needs --config FILE")
    c = inv.config
    level = getattr(logging, log_level.upper())
    if once and log_level == "info":
        level = logging.WARNING
    configure_logging(group=c.coordination.group, agent=c.agent.name, fmt=log_format, level=level)
    _STATE["json_log"] = log_format == "json"  # from here on, the error that ends the command is a record
    if inv.json and not once:
        raise UsageError("--json reports the one cycle of --once; a running agent writes JSON logs with "
                         "--log-format json")
    if once and c.agent.role != "primary":
        raise UsageError("--once runs one replication cycle; it needs agent.role = \"primary\"")
    try:
        agent = Agent(c, serve_network=not once)  # a one-shot cycle must not collide with a running agent
    except DrsyncError as e:
        if log_format != "json":
            raise
        # JSON logs stay JSON: the one-line error is a log record, and nothing else is printed.
        logging.getLogger("drsync.agent").error("agent %s cannot start: %s", c.agent.name, e)
        raise _Exit(e.exit_code, "") from None
    if once:
        try:
            decision = agent.run_cycle()
            agent.maintain()
        finally:
            agent.close()
        emit(inv, {"ok": decision.ok, "snapshot": decision.snapshot, "shipped": decision.shipped,
                   "paused": decision.paused,
                   "results": decision.results, "duration_s": decision.duration_s},
             lambda: click.echo(str(decision)))
        if not decision.ok:
            raise _Exit(EXIT_FAILED, "the replication cycle did not reach every standby; see above")
        return
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.run()
    if agent.fatal is not None:
        raise agent.fatal


# --- entry point ------------------------------------------------------------------


def _printable_errors(err: UnicodeError) -> tuple[str, int]:
    """Encode-error handler for the terminal: a path byte that is not UTF-8 (kept as a lone surrogate,
    as os.fsdecode does) prints as ``\\xNN``, anything else unencodable as a backslash escape."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start:err.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else
                   c.encode("ascii", "backslashreplace").decode() for c in bad), err.end


codecs.register_error("drsync-printable", _printable_errors)


def _error(message: str, prefix: str = "error") -> None:
    """The one line that ends a failed command: on stderr, or (agent --log-format json) as a JSON log
    record, so that a log shipper's stream stays JSON lines."""
    if _STATE.get("json_log"):
        logging.getLogger("drsync").error("%s", message)
    else:
        click.echo(f"drsync: {prefix}: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="drsync-printable")
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _STATE.clear()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="drsync", standalone_mode=False)
        return 0
    except _Exit as e:
        if str(e):  # "" when the error was already logged (agent --log-format json)
            _error(printable(str(e)))
        return e.code
    except DrsyncError as e:
        if debug:
            traceback.print_exc()
        _error(printable(str(e)))
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("drsync: interrupted", err=True)
        return 130
    except click.ClickException as e:
        _error(e.format_message())
        return EXIT_USAGE if e.exit_code == 2 else e.exit_code
    except KeyboardInterrupt:
        click.echo("drsync: interrupted", err=True)
        return 130
    except OSError as e:
        if debug:
            traceback.print_exc()
        from drsync.fsutil import describe_os_error

        _error(printable(str(describe_os_error(e, "the operation"))))
        return EXIT_FAILED
    except Exception as e:  # a bug: say so plainly, and how to get the details
        if debug:
            traceback.print_exc()
        _error(f"{type(e).__name__}: {e}; rerun with --debug for details", prefix="internal error")
        return EXIT_FAILED


def run() -> None:
    """Console entry point: run, then leave without native teardown.

    Everything drsync writes is flushed and synced before a command returns. Skipping
    the interpreter's finalisation avoids a rare abort ("terminate called without an
    active exception") when C++ thread pools of pyarrow or grpc are torn down at exit,
    which would otherwise turn a clean exit code into SIGABRT.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

