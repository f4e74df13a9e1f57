#!/usr/bin/env python3
"""Write docs/cli.md: every drsync command's full --help, from the command line itself.

  python scripts/gen_cli_docs.py          rewrite docs/cli.md
  python scripts/gen_cli_docs.py --check  exit 1 when docs/cli.md is not what the code says
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drsync.cli import cli  # noqa: E402

OUT = ROOT / "docs" / "cli.md"
HEAD = """# drsync command reference

Every command's `--help`, generated from the code by `scripts/gen_cli_docs.py` (a test checks it
is current). Shell completion: `eval "$(_DRSYNC_COMPLETE=bash_source drsync)"` in `~/.bashrc`
(`zsh_source` for zsh, `fish_source` for fish). Exit codes: 0 ok, 1 operation failed, 2 usage or
configuration error, 3 integrity error, 4 refused for safety; each command's help ends with what they
mean for it. `make man` writes the same text as man pages (`man docs/man/drsync-status.1`).
"""


def _help(path: list[str]) -> str:
    """Exactly what ``drsync ... --help`` prints (the group's context_settings, e.g. ``-h``, included) on any
    terminal of 80 columns or more (click then wraps help at 78: min(columns, 80) - 2)."""
    from click.testing import CliRunner

    r = CliRunner().invoke(cli, [*path[1:], "--help"], prog_name="drsync", terminal_width=78)
    if r.exit_code != 0:
        raise SystemExit(f"{' '.join(path)} --help failed: {r.output}")
    return r.output


def _walk(cmd: click.Command, ctx: click.Context, path: list[str]) -> list[str]:
    out = [f"\n## `{' '.join(path)}`\n\n```text\n{_help(path).rstrip()}\n```\n"]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _walk(sub, click.Context(sub, info_name=name, parent=ctx), [*path, name])
    return out


def render() -> str:
    ctx = click.Context(cli, info_name="drsync")
    return HEAD + "".join(_walk(cli, ctx, ["drsync"]))


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/cli.md is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
