#!/usr/bin/env python3
"""Write docs/man/drsync.1 and one page per command (drsync-snapshot-create.1, ...) from each
command's --help, the same text as docs/cli.md; no dependency beyond click.

  python scripts/gen_man.py     (make man)  then: man docs/man/drsync-status.1
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gen_cli_docs import _help  # noqa: E402

from drsync import __version__  # noqa: E402
from drsync.cli import cli  # noqa: E402

OUT = ROOT / "docs" / "man"


def _roff(text: str) -> str:
    """Help text as literal roff lines: backslashes escaped, no line read as a request."""
    lines = []
    for line in text.rstrip().splitlines():
        line = line.replace("\\", "\\e")
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _page(path: list[str], cmd: click.Command, subcommands: list[str]) -> str:
    name = "-".join(path)
    summary = cmd.get_short_help_str(limit=200).replace("\\", "\\e")
    see = ", ".join(f"{p}(1)" for p in (["drsync"] if len(path) > 1 else []) + subcommands)
    return (f'.TH {name.upper()} 1 "" "drsync {__version__}" "drsync manual"\n'
            f".SH NAME\n{name} \\- {summary}\n"
            f".SH DESCRIPTION\n.nf\n{_roff(_help(path))}\n.fi\n"
            f".SH SEE ALSO\n{see + ', ' if see else ''}docs/cli.md and docs/operations.md in the drsync sources\n")


def _walk(cmd: click.Command, ctx: click.Context, path: list[str], pages: dict[str, str]) -> None:
    subs: list[str] = []
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                subs.append("-".join([*path, name]))
                _walk(sub, click.Context(sub, info_name=name, parent=ctx), [*path, name], pages)
    pages["-".join(path)] = _page(path, cmd, subs)


def main() -> int:
    pages: dict[str, str] = {}
    _walk(cli, click.Context(cli, info_name="drsync"), ["drsync"], pages)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        (OUT / f"{name}.1").write_text(text)
    print(f"wrote {len(pages)} man pages to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
