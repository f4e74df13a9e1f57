"""The ``drsync`` command line: the root group, with every command family registered on it.

Nothing below imports this package. Every command takes ``--config FILE`` (or ``DRSYNC_CONFIG``);
one-shot commands can instead take ``--repo`` and ``--source``/``--target``. Errors print one line to
stderr and exit with the code DESIGN.md fixes; ``--debug`` adds the traceback.

- :mod:`drsync.cli.common`: the invocation (``--config``, ``--repo``, ``--json``, ``--debug``), output
  (JSON, tables, progress) and the exit an error ends with
- :mod:`drsync.cli.guards`: what keeps a repository's snapshots (protect window, apply holds)
- :mod:`drsync.cli.restoring`: the restore options and report shared by snapshot and backup restore
- :mod:`drsync.cli.repo`: ``init`` and ``repo verify|repair|gc|unlock``
- :mod:`drsync.cli.snapshot`: ``snapshot create|list|show|diff|delete|restore|expire``
- :mod:`drsync.cli.backup`: ``backup create|restore|verify|list|prune``
- :mod:`drsync.cli.agent`: ``agent``, ``apply``, ``drill run``, ``config check`` (one agent's side)
- :mod:`drsync.cli.group`: ``status``, ``history``, ``promote``, ``switchover``, ``rejoin``,
  ``replace-identity`` (the group's roles)
- :mod:`drsync.cli.entry`: ``main`` and the console entry point ``run`` (exit codes, error lines)
"""

from __future__ import annotations

from drsync.cli import signals

signals.early()  # `drsync agent`: before the imports below (hundreds of milliseconds), no signal kills it

import importlib  # noqa: E402

import click  # noqa: E402

from drsync import __version__  # noqa: E402
from drsync.cli.common import EXIT_TABLE  # noqa: E402
from drsync.cli.entry import main, run  # noqa: E402

# Each command's module, imported when the command runs (or --help lists them all): a snapshot create
# does not pay for the agent's, the group's and the restores' imports (grpc, kazoo, the apply machinery).
COMMANDS = {
    "init": ("repo", "init_cmd"), "snapshot": ("snapshot", "snapshot_grp"), "backup": ("backup", "backup_grp"),
    "repo": ("repo", "repo_grp"), "status": ("group", "status_cmd"), "history": ("group", "history_cmd"),
    "promote": ("group", "promote_cmd"), "rejoin": ("group", "rejoin_cmd"),
    "replace-identity": ("group", "replace_identity_cmd"), "switchover": ("group", "switchover_cmd"),
    "drill": ("agent", "drill_grp"), "config": ("agent", "config_grp"), "apply": ("agent", "apply_cmd"),
    "agent": ("agent", "agent_cmd"),
}


class LazyGroup(click.Group):
    """The root group: its commands are :data:`COMMANDS`, each loaded from its module on first use
    (click's documented pattern for lazily loaded subcommands)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"drsync.cli.{module}"), attr)
        assert isinstance(command, click.Command) and command.name == cmd_name, (module, attr)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog="\n".join([
    "\b", "Every command's full help: drsync COMMAND --help, all of them in docs/cli.md",
    "(and man pages: make man, then man docs/man/drsync-COMMAND.1); the runbook is",
    "docs/operations.md. Each command's help ends with what its exit codes mean.",
    "", "\b", "Exit codes (DESIGN.md):", *(f"  {code}  {what}" for code, what in EXIT_TABLE)]))
@click.version_option(__version__, prog_name="drsync")
def cli() -> None:
    """drsync: snapshots, portable backups and a standby cluster kept in sync.

    Every command takes --config FILE (or DRSYNC_CONFIG); one-shot commands (init, snapshot, backup, repo)
    can name a repository with --repo instead. --json prints one JSON document on stdout; an error is one
    line on stderr (--debug adds the traceback)."""


__all__ = ["COMMANDS", "cli", "main", "run"]
