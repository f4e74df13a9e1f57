"""What ``snapshot restore`` and ``backup restore`` share: a target that is not this cluster's data root
(``--overwrite``, ``--delete-extra``), ``--dry-run`` and the report of what was (or would be) written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from drsync import engine
from drsync.cli.common import Exit, Invocation, emit, say
from drsync.errors import EXIT_REFUSED, RefusedError
from drsync.fsutil import lies_within, local_or_none, same_place
from drsync.text import printable
from drsync.units import count, human_size

if TYPE_CHECKING:  # the apply machinery is imported by a restore only (a snapshot create starts faster)
    from drsync.apply import ApplyResult, ForeignTarget


def foreign_target(inv: Invocation, dest: str, overwrite: bool, delete_extra: bool) -> ForeignTarget | None:
    """A restore onto the cluster's own data root may change whatever is there; onto any other target,
    overwriting what is there needs --overwrite and removing what the snapshot lacks --delete-extra.

    RefusedError (exit 4, nothing changed) onto the data root of a running agent (this config's, the
    --repo's, or any other on this host), into a directory inside it, or one holding it:
    a standby's agent applies to that root and records what it holds (a restore under it would leave the
    root behind what the agent reports, and a promotion would take that root), a primary's captures from it."""
    target = engine.data_root_url(dest)
    for who, root_given in _running_roots(inv):
        root = engine.data_root_url(root_given)
        where = ("is that root" if same_place(target, root) else "lies inside that root"
                 if lies_within(target, root) else "holds that root" if lies_within(root, target) else "")
        if where:
            raise RefusedError(f"{who} is running on data root {root_given} (it applies shipments to it, or "
                               f"captures it), and {dest} {where}; a restore there now would leave the root "
                               f"other than what the agent reports: stop the agent first (on production, its "
                               f"writers too), or restore outside it with --target")
    if inv.config is not None and same_place(target, engine.data_root_url(inv.config.cluster.data)):
        return None  # the cluster's own root, however spelled (a symlink or bind mount of it too)
    from drsync.apply import ForeignTarget

    return ForeignTarget(overwrite=overwrite, delete_extra=delete_extra)


def _running_roots(inv: Invocation) -> list[tuple[str, str]]:
    """(who, data root) of every running agent a restore must stay out of: this config's, the one of the
    repository given with --repo (its default state directory), and every other agent running on this host
    (:func:`drsync.agent.registry.running_agents`)."""
    from drsync.agent.locks import StateDirLock
    from drsync.agent.registry import running_agents
    from drsync.agent.state import state_dir_of

    out: list[tuple[str, str]] = []
    if inv.config is not None and StateDirLock.held(state_dir_of(inv.config)):
        out.append((f"agent {inv.config.agent.name}", inv.config.cluster.data))
    repo = local_or_none(inv.repo) if inv.repo else None
    if repo:
        root = StateDirLock.data_root(os.path.join(repo, "agent"))
        if root:
            out.append((f"the agent of repository {inv.repo}", root))
    out += [(f"the agent with state directory {printable(sd)}", root) for sd, root in running_agents()]
    return out


def restore_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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


def _made(result: ApplyResult, verb: str = "made") -> str:
    """``, 2 directories, 1 symlink made`` for what an apply makes besides files (empty: nothing)."""
    made = [f"{n} {word if n == 1 else words}" for n, word, words in (
        (result.made_dirs, "directory", "directories"), (result.made_symlinks, "symlink", "symlinks"),
        (result.made_hardlinks, "hard link", "hard links")) if n]
    return f", {', '.join(made)} {verb}" if made else ""


def report_restore(what: str, dest: str, result: ApplyResult) -> None:
    if result.planned is not None:
        replaced = set(result.planned.get("overwrite", []))
        fixed = result.planned.get("metadata", [])
        say(f"dry run: restoring {what} to {dest} would write {count(result.written_files, 'file')} "
                   f"({human_size(result.written_bytes)}; {len(replaced)} path(s) overwritten)"
                   f"{_made(result, 'to make')}, leave "
                   f"{result.unchanged_files} unchanged"
                   + (f" (set the mode, owner or time of {len(fixed)})" if fixed else "")
                   + f" and remove {result.removed}"
                   + ("; the restore itself would be refused (exit 4)" if result.refused else "")
                   + "; nothing was changed")
        listed = [("remove", result.planned.get("remove", [])),
                  ("replace", sorted(replaced)),
                  ("write", [p for p in result.planned.get("write", []) if p not in replaced]),
                  ("mkdir", result.planned.get("mkdir", [])),
                  ("meta", fixed),
                  ("link", [p for p in result.planned.get("link", []) if p not in replaced]),
                  ("hardlink", [p for p in result.planned.get("hardlink", []) if p not in replaced])]
        for kind, paths in listed:
            for p in paths[:20]:
                say(f"  {kind:7} {printable(p)}")
            if len(paths) > 20:
                say(f"  {kind:7} ... and {len(paths) - 20} more (--json lists all)")
        for w in result.warnings:
            say(f"  note: {w}")
        return
    say(f"restored {what} to {dest}: {count(result.written_files, 'file')} written "
        f"({human_size(result.written_bytes)}){_made(result)}, {result.unchanged_files} unchanged, "
        f"{result.removed} removed")
    for w in result.warnings:
        say(f"  note: {w}")


def finish_restore(inv: Invocation, kind: str, ident: str, dest: str, dry_run: bool, result: ApplyResult) -> None:
    """Report a restore of ``kind`` (snapshot or backup) ``ident`` (JSON or text); a dry run that would be
    refused exits 4."""
    doc = {kind: ident, "target": dest, "dry_run": dry_run, **result.as_dict()}
    emit(inv, doc, lambda: report_restore(f"{kind} {ident}", dest, result))
    if result.refused:
        raise Exit(EXIT_REFUSED, f"dry run: the restore would be refused: {result.refused}")
