"""Every line drsync writes for a person (errors, warnings, reports, table rows, text logs) stays one
line whatever a path, a name, a command or a remote's message in it holds: no character can split the
line, forge a line of its own, hide text or reorder it, and no string makes the escaping itself fail."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from drsync import logsetup
from drsync.text import OneLineFormatter, one_line, printable
from tests.conftest import Result, init_repo_at, run_drsync

# Bidirectional classes that change the order text is shown in (Trojan Source, CVE-2021-42574).
REORDERING = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI", "LRM", "RLM", "ALM"}
FORGED = "2026-12-01T00:00:00.000+00:00 ERROR group=prod agent=p drsync: forged"


def _shown_alone(out: str) -> list[str]:
    """The characters of ``out`` a reader cannot see as themselves on one line."""
    return [c for c in out if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs")
            or unicodedata.bidirectional(c) in REORDERING or 0xE0000 <= ord(c) <= 0xE007F]


@pytest.mark.parametrize("escape", [one_line, printable])
def test_no_code_point_splits_hides_or_breaks_a_line(escape) -> None:  # type: ignore[no-untyped-def]
    text = "".join(f"a{chr(c)}" for c in range(0x110000))  # every code point, lone surrogates included
    out = escape(text)
    assert len(out.splitlines()) == 1
    assert _shown_alone(out) == []
    assert out.encode("utf-8")  # encodable: a terminal or a log file takes it as it is


def test_names_keep_their_bytes_readable_and_unambiguous() -> None:
    undecodable = os.fsdecode(b"caf\xe9\xff")
    assert printable(undecodable) == "caf\\xe9\\xff"
    assert printable("caf\\xe9") == "caf\\\\xe9"  # the text "\xe9" in a name does not print like byte 0xe9
    assert printable("a\nb\u202ec") == "a\\nb\\u202ec"
    assert one_line("from JSON: \ud800") == "from JSON: \\ud800"
    assert one_line(one_line("x\ny\u2029z")) == one_line("x\ny\u2029z")  # escaping twice changes nothing


@pytest.mark.parametrize("tracebacks", [False, True])
def test_a_text_log_record_stays_one_line_and_a_traceback_only_with_debug(tracebacks: bool) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s", tracebacks=tracebacks))
    log = logging.getLogger("drsync.test-one-line")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("cannot read %s", f"/data/x\n{FORGED}\u2028more")
        try:
            raise ValueError("boom\nFORGED")
        except ValueError:
            log.exception("failed on %s", "a\rb")
    finally:
        log.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert first == f"WARNING cannot read /data/x\\n{FORGED}\\u2028more"
    if tracebacks:  # --debug: the traceback follows its record
        assert rest[0] == "ERROR failed on a\\rb"
        assert rest[1].startswith("Traceback") and rest[-2:] == ["ValueError: boom", "FORGED"]
    else:
        assert rest == ["ERROR failed on a\\rb (ValueError: boom\\nFORGED; --debug shows the traceback)"]


def test_the_agents_text_log_escapes_and_its_json_log_stays_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("text", "json"):
            logsetup.configure(group="g\nx", agent="a", fmt=fmt)
            logging.getLogger("drsync.agent").warning("snapshot %s of %s", "0123456789abcdef", f"d\n{FORGED}")
        err = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert len(err) == 2
    assert err[0].endswith(f"drsync.agent: snapshot 0123456789abcdef of d\\n{FORGED}")
    doc = json.loads(err[1])
    assert doc["message"] == f"snapshot 0123456789abcdef of d\n{FORGED}"  # JSON keeps the real text
    assert doc["snapshot"] == "0123456789abcdef"


def _drsync(*args: str, cwd: Path) -> Result:
    return run_drsync(*args, cwd=cwd)


def test_commands_print_paths_and_names_with_line_breaks_on_one_line(tmp_path: Path) -> None:
    """Reports, table rows, warnings and errors of real commands, with a newline and a line separator
    in the repository's path, the restore target, a snapshot's name and an unknown command."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    repo = f"{tmp_path}/repo\n{FORGED}"
    r = _drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1", cwd=tmp_path)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [f"created repository {tmp_path}/repo\\n{FORGED} for cluster c (release 1)"]

    r = _drsync("snapshot", "create", "--repo", repo, "--source", str(data), "--name", "n\u2028x\ny", cwd=tmp_path)
    assert r.code == 0 and len(r.out.splitlines()) == 1, r
    sid = r.out.split()[1]
    rows = _drsync("snapshot", "list", "--repo", repo, cwd=tmp_path).out.splitlines()
    assert len(rows) == 2 and "n\\u2028x\\ny" in rows[1]

    target = tmp_path / f"t\n{FORGED}\u2029"
    for extra, lines in ((["--dry-run"], 2), ([], 1)):  # a dry run lists the one file it would write
        r = _drsync("snapshot", "restore", "--repo", repo, sid, "--target", str(target), *extra, cwd=tmp_path)
        assert r.code == 0, r.err
        assert len(r.out.splitlines()) == lines, r.out
        assert "t\\n2026-12-01" in r.out.splitlines()[0] and "\\u2029" in r.out.splitlines()[0]
    assert (target / "f").read_text() == "x"

    r = _drsync(f"snapshot\n{FORGED}", cwd=tmp_path)  # click's own usage error
    assert r.code == 2 and r.err.count("\n") == 1 and "\\n2026-12-01" in r.err

    r = _drsync("snapshot", "list", "--repo", f"{tmp_path}/none\n{FORGED}", cwd=tmp_path)
    assert r.code != 0 and r.err.count("\n") == 1 and r.err.startswith("drsync: error: ")


def test_a_lock_holders_command_with_a_newline_stays_on_its_line(tmp_path: Path) -> None:
    """`repo unlock` reports each removed lock on its own line, whatever the holder's command line held."""
    url = str(tmp_path / "repo")
    init_repo_at(url, "c", "1")
    code = ("import sys; from drsync.repository.lock import RepositoryLock; "
            "from drsync.storage import open_storage\n"
            f"sys.argv = ['drsync', {('x' + chr(10) + FORGED)!r}]\n"
            f"RepositoryLock(open_storage({url!r}), exclusive=False).acquire()\n"
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = _drsync("repo", "unlock", "--repo", url, "--all", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "removed 1 lock(s)" and len(lines) == 2 and f"x\\n{FORGED}" in lines[1], lines
