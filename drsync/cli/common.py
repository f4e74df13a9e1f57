"""What every command shares: the invocation (``--config``, ``--repo``, ``--json``, ``--debug``), its output
(one JSON document, tables, progress on a terminal) and the exit an error ends with.
"""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

from drsync import engine
from drsync.config import Config, SnapshotsConfig, load_config
from drsync.errors import EXIT_INTEGRITY, UsageError
from drsync.fsutil import same_place
from drsync.text import one_line, printable
from drsync.units import with_iso_times


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
            STATE["debug"] = debug or STATE.get("debug", False)
            cfg = load_config(config_path) if config_path else None
            if repo and cfg is not None and not same_place(repo, cfg.cluster.repository):
                # The config's data root and cluster id are not that repository's: never mixed.
                raise UsageError(f"--repo {repo} and --config {config_path} (its repository "
                                 f"{cfg.cluster.repository}) name two repositories: give one of them (DRSYNC_CONFIG "
                                 f"counts as --config: unset it to use --repo alone)")
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
repo_or_config = _options(with_repo=True)


config_only = _options(with_repo=False)


STATE: dict[str, bool] = {}


def emit(inv: Invocation, doc: Any, human: Callable[[], None]) -> None:
    """``--json``: the document, every time in it ISO 8601 with zone (and ``<key>_unix``); else ``human``."""
    if inv.json:
        echo_json(doc)
    else:
        human()


def echo_json(doc: Any) -> None:
    """One JSON document on stdout, every time in it ISO 8601 with zone (and ``<key>_unix``): the same for
    a command's result and for the document it prints before failing."""
    click.echo(json.dumps(with_iso_times(doc), indent=2, sort_keys=True, default=str))


def say(text: str, *, err: bool = False) -> None:
    """One line of a command's human output (stdout, or stderr with ``err``): a path, an error's text or
    a command line inside it can neither split the line nor forge another (:func:`one_line`)."""
    click.echo(one_line(text), err=err)


def table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns aligned, one line per row however long a cell is (a terminal wraps it; nothing folds or
    crops it), each cell shown as written: never read as rich markup or emoji codes (``[cluster]``,
    ``:warning:``), control characters escaped (:func:`one_line`)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h, no_wrap=True, overflow="ignore")
    for r in rows:
        t.add_row(*(Text(one_line(c if isinstance(c, str) else str(c))) for c in r))  # any value: never a crash
    console = Console(width=1 << 20, highlight=False, emoji=False, markup=False)
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


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def need_config(inv: Invocation, what: str) -> Config:
    if inv.config is None:
        raise UsageError(f"drsync {what} needs --config FILE (the agent's configuration)")
    return inv.config


def report_damage(problems: list[str], damaged_files: list[dict[str, str]], what: str) -> None:
    for p in problems:
        say(f"  {p}", err=True)
    for d in damaged_files:
        where = f"snapshot {d['snapshot']}: " if "snapshot" in d else ""
        say(f"  {where}{printable(d.get('path') or d.get('file') or '')}: {d['reason']}", err=True)
    raise Exit(EXIT_INTEGRITY, f"{what}: {len(damaged_files) + len(problems)} problem(s) found; see above")


# The exit codes of DESIGN.md, in the root command's help; each command's epilog says what they mean for it.
EXIT_TABLE = (("0", "ok"), ("1", "operation failed (I/O, network, an agent that does not answer)"),
              ("2", "usage or configuration error"), ("3", "integrity error: corruption found"),
              ("4", "refused for safety (fenced, cluster or release mismatch, lag, a hold)"))


def exits(*codes: str) -> str:
    """A command's epilog: ``"N what N means here"`` for each exit code it can end with, kept as lines
    (click's ``\\b``) and wrapped to fit 80 columns."""
    lines = ["\b", "Exit codes:"]
    for line in codes:
        code, what = line.split(" ", 1)
        lines += textwrap.wrap(what, 70, initial_indent=f"  {code}  ", subsequent_indent="     ",
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)
