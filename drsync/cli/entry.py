"""The entry points: :func:`main` runs one command and turns its error into one line and the exit code
DESIGN.md fixes; :func:`run` is the console script (``drsync = "drsync.cli:run"``).
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import sys
import traceback

import click

from drsync.cli.common import STATE, Exit
from drsync.errors import EXIT_FAILED, EXIT_USAGE, DrsyncError, UsageError
from drsync.repository.lock import environment_problem
from drsync.text import OneLineFormatter, one_line


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
    record, so that a log shipper's stream stays JSON lines. Whatever the message holds (a path, a
    command, an exception's text), it stays one line (:func:`one_line`)."""
    message = one_line(message)
    if STATE.get("json_log"):
        logging.getLogger("drsync").error("%s", message)
    else:
        click.echo(f"drsync: {prefix}: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    from drsync.cli import cli  # the root group, every command registered

    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="drsync-printable")
    # A lock that cannot be refreshed may be removed as stale before a long command ends: said on stderr.
    logging.getLogger("drsync.repository.lock").setLevel(logging.WARNING)
    # What a repair left (a capture that could not bring back a forgotten chunk, a repaired.json it could not
    # remove): said on stderr too.
    logging.getLogger("drsync.repository.repair").setLevel(logging.WARNING)
    STATE.clear()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", tracebacks=debug))
    logging.basicConfig(level=logging.ERROR, handlers=[handler])
    try:
        problem = environment_problem()
        if problem:
            raise UsageError(problem)
        cli.main(args=args, prog_name="drsync", standalone_mode=False)
        return 0
    except Exit as e:
        if str(e):  # "" when the error was already logged (agent --log-format json)
            _error(str(e))
        return e.code
    except DrsyncError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
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

        _error(str(describe_os_error(e, "the operation")))
        return EXIT_FAILED
    except Exception as e:  # a bug: say so plainly, and how to get the details
        if debug:
            traceback.print_exc()
        _error(f"{type(e).__name__}: {e}" + ("" if debug else "; rerun with --debug for details"),
               prefix="internal error")
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
