"""Breaker s45: hostile cases for "every line meant for a person stays one line".

Failing on the code this was written against (each docstring says what it proves):

1. A table row (``snapshot list``, ``snapshot show --files``, ``config check``, ...) folds onto several
   lines when a cell is long: ``table`` renders with rich's ``overflow="fold"`` at 200 columns.
2. Table cells are not shown as written: rich turns ``:warning:`` into an emoji and doubles a trailing
   backslash (``n\\`` shows as ``n\\\\``, the way a printable name with two backslashes shows).
3. ``snapshot show`` escapes the capture warnings a second time (``fi\\\\nfo`` where ``snapshot create``
   printed ``fi\\nfo``): by printable's own rule it names a file whose name holds a backslash.
4. A damaged ``backup.json`` (or one whose time is out of range) ends ``backup verify``/``list``/``prune``
   and a primary agent's start as ``internal error`` (exit 1) instead of naming the damage.
5. The same damage in ``[backups] destination`` puts a multi-line Python traceback in the agent's text log
   (no ``--debug``), once per maintenance pass.
6. A snapshot document whose capture time is out of datetime's range: ``snapshot list`` ends as
   ``internal error`` while ``repo verify`` calls the repository intact.
7. Found while fixing 4: ``backup prune`` removed backups by the id in their backup.json, so beside a
   copied backup (same id, older date) ``--keep-last 1`` removed the newest backup; and a backup dated in
   the future stopped the agent's scheduled backups until that date.
8. ``[agent] listen``, ``advertise`` and ``metrics`` took a port past 65535.
9. A group or agent name with a ``/`` nested its ZooKeeper node inside another group's or agent's.

What held (regression guards): lock conflicts and ``repo unlock --json`` with newlines and lone surrogates
in the holder's host and command; ``repo verify`` and ``backup verify`` damage reports naming files with
newlines; click's usage errors; TOML escapes in every config value; ``agent --once`` text log against an
unreachable standby with hostile names; names with undecodable bytes in ``show --files``/``diff`` and
their JSON; hook failures; a refused restore naming paths with newlines.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, Result, init_repo, init_repo_at, run_drsync
from tests.zk import free_port

FORGED = "2026-12-01T00:00:00.000+00:00 ERROR group=prod agent=p drsync: forged"
# The start of every record of the agent's text log (logsetup: ISO 8601 time with its zone).
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _lines(text: str) -> list[str]:
    return text.splitlines()


def _one_error_line(r: Result) -> bool:
    """stderr is exactly one line, the ``drsync: error:`` one."""
    return len(_lines(r.err)) == 1 and r.err.startswith("drsync: error: ")


def _repo_with_snapshot(tmp_path: Path, name: str = "", files: dict[str, str] | None = None) -> tuple[str, Path]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for rel, text in (files or {"f": "x"}).items():
        (data / rel).write_text(text)
    repo = str(tmp_path / "repo")
    if not os.path.exists(repo):
        init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", name)
    assert r.code == 0, r
    return repo, data


def _backup(tmp_path: Path) -> Path:
    """A real full backup of a one-file snapshot, in tmp_path/backups/<id>."""
    repo, _ = _repo_with_snapshot(tmp_path)
    dest = tmp_path / "backups"
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", dest, "--json")
    assert r.code == 0, r
    return Path(r.json()["path"])


def _rewrite_meta(backup_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    meta = backup_dir / "backup.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps(change(doc)))


# --- 1. table rows fold -------------------------------------------------------------------------


def test_a_long_snapshot_name_keeps_its_table_row_on_one_line(tmp_path: Path) -> None:
    """`snapshot list` with a 250-character name: the header and ONE row. Today rich folds the NAME cell
    (overflow="fold", 200 columns when stdout is not a terminal): the row takes three lines, the later
    ones holding only the rest of the name, which a script reading rows takes for rows of their own."""
    repo, _ = _repo_with_snapshot(tmp_path, name="N" * 250)
    r = run_drsync("snapshot", "list", "--repo", repo)
    assert r.code == 0, r
    assert len(_lines(r.out)) == 2, r.out


def test_a_long_path_keeps_its_show_files_row_on_one_line(tmp_path: Path) -> None:
    """`snapshot show --files` lists one row per path; a path of 240 characters (well within NAME_MAX)
    takes two lines today, the second one indented under PATH."""
    long_name = "p" * 240
    repo, _ = _repo_with_snapshot(tmp_path, files={long_name: "x"})
    r = run_drsync("snapshot", "show", "latest", "--files", "--repo", repo)
    assert r.code == 0, r
    rows = _lines(r.out)[_lines(r.out).index(next(x for x in _lines(r.out) if x.startswith("TYPE"))) + 1:]
    assert len(rows) == 1 and rows[0].endswith(long_name), rows


def test_config_check_keeps_each_check_on_one_line(tmp_path: Path) -> None:
    """`config check` on an ordinary config whose data root has a long (valid) path: the `data root` row's
    DETAIL folds onto a second line today. (An unreachable standby's ordinary gRPC message, about 190
    characters, folds the same way.)"""
    data = tmp_path / ("d" * 200)
    data.mkdir()
    (data / "f").write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path}/repo"\n\n'
                   f'[agent]\nname = "a"\nrole = "standby"\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'metrics = "127.0.0.1:{free_port()}"\n')
    init_repo(cfg)
    r = run_drsync("config", "check", "--config", cfg, "--timeout", "1")
    rows = [x for x in _lines(r.out) if x.strip()]
    assert rows[0].startswith("CHECK"), r
    continuation = [x for x in rows[1:] if x.startswith(" ")]
    assert continuation == [], r.out


# --- 2. table cells not shown as written ---------------------------------------------------------


def test_a_table_cell_does_not_turn_emoji_codes_into_emoji(tmp_path: Path) -> None:
    """A snapshot named ':warning: :cross_mark:' is listed as those characters; today rich's emoji codes
    turn it into '⚠ ❌' in `snapshot list` (and `backup list`, `status`, ...), while `snapshot show`
    prints the real name: the table shows a name no snapshot has."""
    repo, _ = _repo_with_snapshot(tmp_path, name=":warning: :cross_mark:")
    r = run_drsync("snapshot", "list", "--repo", repo)
    assert r.code == 0, r
    assert ":warning: :cross_mark:" in _lines(r.out)[1], r.out


def test_a_table_cell_ending_in_a_backslash_shows_one_backslash(tmp_path: Path) -> None:
    """A snapshot named 'n\\' (one trailing backslash): `snapshot show` prints 'n\\', `snapshot list`
    prints 'n\\\\' today (rich.markup.escape doubles a trailing backslash and nothing undoes it), so the
    names 'n\\' and 'n\\\\' look the same in the table."""
    repo, _ = _repo_with_snapshot(tmp_path, name="n\\")
    r = run_drsync("snapshot", "list", "--repo", repo)
    assert r.code == 0, r
    assert _lines(r.out)[1].split()[2] == "n\\", r.out


# --- 3. snapshot show escapes warnings twice --------------------------------------------------------


def test_snapshot_show_escapes_a_capture_warning_once(tmp_path: Path) -> None:
    """A fifo named 'fi<newline>fo' in the data root: `snapshot create` warns 'fi\\nfo: special file ...'
    and `snapshot show` must print the same escape. Today it prints 'fi\\\\nfo' (printable() over a
    message whose path is printable already), which by printable's own rule names a file called
    'fi\\nfo' with a real backslash in it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    os.mkfifo(data / "fi\nfo")
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
    assert r.code == 0 and "  warning: fi\\nfo: special file" in r.out, r
    r = run_drsync("snapshot", "show", "latest", "--repo", repo)
    shown = [x for x in _lines(r.out) if x.startswith("warning")]
    assert shown == ["warning      fi\\nfo: special file (fifo, socket or device) not captured"], r.out


# --- 4. damaged backup.json: internal error ------------------------------------------------------------


DAMAGED_META = {
    "a list": lambda doc: [],
    "format not a number": lambda doc: {**doc, "format": "x"},
    "created_at before year 1 in UTC": lambda doc: {**doc, "created_at": "0001-01-01T00:00:00+01:00"},
}


@pytest.mark.parametrize("damage", list(DAMAGED_META))
@pytest.mark.parametrize("command", ["verify", "list", "prune"])
def test_a_damaged_backup_json_is_named_not_an_internal_error(tmp_path: Path, damage: str, command: str) -> None:
    """backup.json damaged (a list, a non-numeric format, a time datetime cannot hold): `backup verify`
    must report the damage (exit 3), `backup list`/`prune` name it on one line (exit 3) — never
    'drsync: internal error: AttributeError/ValueError ...; rerun with --debug' with exit 1, which is
    what they print today."""
    bdir = _backup(tmp_path)
    _rewrite_meta(bdir, DAMAGED_META[damage])
    args = {"verify": ["backup", "verify", bdir], "list": ["backup", "list", bdir.parent],
            "prune": ["backup", "prune", bdir.parent, "--keep-daily", "2", "--dry-run"]}[command]
    r = run_drsync(*args)
    assert r.code == 3 and "internal error" not in r.err, r
    assert f"{bdir.name}/backup.json" in r.err or "backup.json" in r.err, r
    assert bdir.is_dir()  # a prune never removes what it cannot read


def primary_beside(tmp_path: Path, backups: Path, agent: str = "", extra: str = "") -> Path:
    """The config of a primary (one-file data root, its own repository) whose [backups] destination is
    ``backups``; ``agent`` and ``extra`` add lines to [agent] and to [backups]."""
    data = tmp_path / "pdata"
    data.mkdir()
    (data / "f").write_text("y")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path}/prepo"\n\n'
                   f'[agent]\nname = "p"\nrole = "primary"\n{agent}\n[backups]\ndestination = "{backups}"\n{extra}')
    init_repo(cfg)
    return cfg


def test_a_primary_agent_starts_beside_a_damaged_backup(tmp_path: Path) -> None:
    """`drsync agent --once` of a primary whose [backups] destination holds a backup with a damaged
    backup.json ([]): today the agent cannot even start ('internal error: AttributeError: 'list' object
    has no attribute 'get''), so one bad directory among the backups stops replication."""
    bdir = _backup(tmp_path)
    _rewrite_meta(bdir, lambda doc: [])
    cfg = primary_beside(tmp_path, bdir.parent)
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 0 and "internal error" not in r.err, r
    warned = [x for x in r.err.splitlines() if " WARNING " in x and bdir.name in x]
    assert len(warned) == 1 and "damaged and kept" in warned[0], r.err


# --- 5. a traceback in the agent's text log --------------------------------------------------------------


def start_agent(cfg: Path) -> tuple[subprocess.Popen[str], queue.Queue[str | None], threading.Thread]:
    """``drsync agent --config cfg`` as a process, and its stderr line by line on a queue (None: closed),
    read by the returned thread."""
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reader


def test_the_agents_text_log_has_no_traceback_when_a_backup_is_damaged(tmp_path: Path) -> None:
    """A primary agent with [backups] every 1s whose destination holds one backup with a created_at
    datetime cannot hold in UTC ("0001-01-01T00:00:00+01:00"): the agent starts, writes a backup, and its
    prune fails. Every line of its text log must be a record (time, level, ...): today it writes
    'ERROR ... maintenance pass failed' followed by a 15-line Python traceback (without --debug), on
    every pass, and never prunes again."""
    bdir = _backup(tmp_path)
    _rewrite_meta(bdir, DAMAGED_META["created_at before year 1 in UTC"])
    cfg = primary_beside(tmp_path, bdir.parent, agent=f'listen = "127.0.0.1:{free_port()}"\n'
                          f'metrics = "127.0.0.1:{free_port()}"\n', extra='interval = "1s"\n')
    proc, lines, reader = start_agent(cfg)
    seen: list[str] = []
    try:
        while True:  # until the first backup attempt is reported, however it ends
            line = lines.get(timeout=60)
            assert line is not None, "".join(seen)
            seen.append(line)
            if "maintenance pass failed" in line or "backup" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        reader.join(timeout=60)
    while (line := lines.get_nowait() if not lines.empty() else None) is not None:
        seen.append(line)
    log = "".join(seen)
    assert "Traceback" not in log, log
    assert all(RECORD.match(x) for x in log.splitlines()), log


# --- 6. a snapshot document with an out-of-range time -------------------------------------------------


def test_a_snapshot_time_out_of_range_is_not_an_internal_error(tmp_path: Path) -> None:
    """A snapshot document whose captured_at is "9999-12-31T23:59:59-14:00" (year 10000 in UTC, which a
    standby stores as a hostile primary sent it): today `snapshot list` ends 'internal error: ValueError:
    year 10000 is out of range' (exit 1) while `repo verify` says the repository is intact (exit 0). The
    listing should show it, or verify and list should name it as damage (exit 3)."""
    repo, _ = _repo_with_snapshot(tmp_path)
    doc_path = next((Path(repo) / "snapshots").glob("*.json"))
    doc = json.loads(doc_path.read_text())
    doc["captured_at"] = "9999-12-31T23:59:59-14:00"
    doc_path.write_text(json.dumps(doc))
    r = run_drsync("snapshot", "list", "--repo", repo)
    assert r.code == 3 and _one_error_line(r) and doc_path.name in r.err and "out of range" in r.err, r
    r = run_drsync("repo", "verify", "--repo", repo)
    assert r.code == 3 and doc_path.name in r.err, r


# --- 4b. found while fixing 4: prune by directory, damaged backups kept, a backup from the future ------


def _copy_backup(src: Path, name: str, change) -> Path:  # type: ignore[no-untyped-def]
    import shutil

    dst = src.parent / name
    shutil.copytree(src, dst)
    _rewrite_meta(dst, change)
    return dst


def test_prune_removes_backups_by_directory_and_keeps_the_damaged_ones(tmp_path: Path) -> None:
    """A copied backup keeps the id in its backup.json. Prune decided by id and removed the directory named
    by the id: with a copy dated 2020 beside the original, `--keep-last 1` removed the NEWEST backup (the
    original) and kept the old copy. Now it decides and removes by directory; a damaged backup is kept
    and named (exit 3); the other backups are pruned all the same."""
    newest = _backup(tmp_path)
    old = _copy_backup(newest, "old-copy", lambda d: {**d, "created_at": "2020-01-01T00:00:00Z"})
    damaged = _copy_backup(newest, "damaged", lambda d: [])
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1", "--json")
    assert r.code == 3 and "damaged/backup.json" in r.err, r
    assert json.loads(r.out)["remove"] == ["old-copy"], r.out
    assert newest.is_dir() and damaged.is_dir() and not old.exists()


def test_a_backup_dated_in_the_future_does_not_stop_the_agents_backups(tmp_path: Path) -> None:
    """The newest backup says it was created in 2100 (a clock that was ahead): the agent took its time as
    the last backup and waited until 2100 for the next one. Now it warns and backs up at once."""
    bdir = _backup(tmp_path)
    _rewrite_meta(bdir, lambda d: {**d, "created_at": "2100-01-01T00:00:00Z"})
    cfg = primary_beside(tmp_path, bdir.parent, extra='interval = "1h"\n')
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 0, r
    assert any(" WARNING " in x and "in the future" in x for x in r.err.splitlines()), r.err
    assert len([d for d in bdir.parent.iterdir() if not d.name.startswith(".")]) == 2


@pytest.mark.parametrize("key", ["listen", "advertise", "metrics"])
def test_a_port_past_65535_is_a_configuration_error(tmp_path: Path, key: str) -> None:
    """`listen = "127.0.0.1:99999"` started an agent that said "gRPC on 127.0.0.1:99999". Now the config
    is refused: exit 2, one line naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path}/r"\n\n'
                   f'[agent]\n{key} = "127.0.0.1:99999"\n')
    r = run_drsync("init", "--config", cfg)
    assert r.code == 2 and _one_error_line(r) and f"agent.{key}: '127.0.0.1:99999' is not host:port" in r.err, r


@pytest.mark.parametrize("key,value", [("coordination.group", "prod/agents"), ("coordination.group", ".."),
                                       ("coordination.group", "a\\nb"), ("agent.name", "a/b"),
                                       ("agent.name", "x\\u0000y"), ("agent.name", "\\ue000")])
def test_a_group_or_agent_name_that_is_not_one_zookeeper_node_is_refused(tmp_path: Path, key: str,
                                                                         value: str) -> None:
    """A group is the node /drsync/<group> and an agent the node agents/<name>. 'prod/agents' nested a
    group inside group prod's agents folder (prod's agents would list its epoch and primary nodes as
    agents); '..' and control characters are not node names at all. Now: exit 2, one line."""
    section, name = key.split(".")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path}/r"\n\n'
                   f'[{section}]\n{name} = "{value}"\n')
    r = run_drsync("init", "--config", cfg)
    # A NUL is refused in any string of the config (breaker s49), before the name's own rule.
    said = "holds a NUL character" if "\\u0000" in value else "ZooKeeper node"
    assert r.code == 2 and _one_error_line(r) and f"{key}: " in r.err and said in r.err, r


# --- what held -------------------------------------------------------------------------------------------


def _write_lock(repo: str, doc: dict) -> None:  # type: ignore[type-arg]
    (Path(repo) / "locks" / "hostile.json").write_text(json.dumps(doc))


def test_held_a_lock_holder_with_newlines_and_lone_surrogates(tmp_path: Path) -> None:
    """A live-looking foreign lock whose host and command hold a newline, ESC, U+2028, U+202E, a lone
    surrogate and an undecodable-byte surrogate: the conflict is one error line (exit 1), and
    `repo unlock --all --json` is valid JSON carrying the real text."""
    import time

    repo, _ = _repo_with_snapshot(tmp_path)
    host, command = f"other\n{FORGED}\ud800", "drsync \x1b[31mevil\u2028\u202eabc\udcff"
    now = time.time()
    _write_lock(repo, {"host": host, "pid": 12345, "start": "x", "pidns": None, "exclusive": True,
                       "command": command, "created": now, "refreshed": now})
    r = run_drsync("repo", "gc", "--repo", repo, env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 1 and _one_error_line(r), r
    assert "other\\nFORGED" not in r.err and "\\n2026-12-01" in r.err and "\\ud800" in r.err and "\\xff" in r.err
    r = run_drsync("repo", "unlock", "--all", "--json", "--repo", repo)
    assert r.code == 0, r
    removed = r.json()["removed"]
    assert len(removed) == 1 and host in removed[0] and command in removed[0]


def test_held_repo_verify_names_a_damaged_document_with_a_newline(tmp_path: Path) -> None:
    """A snapshot document file named 'ev<newline>il.json' that is not JSON: exit 3, each damage on its
    own line, the name escaped."""
    repo, _ = _repo_with_snapshot(tmp_path)
    (Path(repo) / "snapshots" / f"ev\n{FORGED}.json").write_text("junk")
    r = run_drsync("repo", "verify", "--repo", repo)
    assert r.code == 3, r
    err = _lines(r.err)
    assert len(err) == 2 and err[0].startswith("  snapshot snapshots/ev\\n2026-12-01") and \
        err[1].startswith("drsync: error: "), r.err


def test_held_backup_verify_names_files_with_newlines_and_escapes(tmp_path: Path) -> None:
    """A backup holding an extra file named with a newline and a checksum line naming a path with ESC and
    U+2028: exit 3, one line per problem."""
    bdir = _backup(tmp_path)
    (bdir / f"ex\n{FORGED}").write_text("x")
    with open(bdir / "CHECKSUMS.b3", "a", encoding="utf-8") as f:
        f.write("0" * 64 + "  a\x1b[2Jb\u2028c\n")
    r = run_drsync("backup", "verify", bdir)
    assert r.code == 3, r
    err = _lines(r.err)
    assert all(x.startswith("  ") for x in err[:-1]) and err[-1].startswith("drsync: error: "), r.err
    assert any("ex\\n2026-12-01" in x for x in err) and any("a\\x1b[2Jb\\u2028c" in x for x in err), r.err


@pytest.mark.parametrize("args", [
    ["backup", "create", "--repo", "r", "--snapshot", "x", "--mode", "fu\nll"],
    ["snapshot", "list", "--repo", "r", f"ex\n{FORGED}"],
    ["snapshot", "list", f"--fo\n{FORGED}"],
    ["backup", "prune", "/tmp", "--keep-last", "3\n4"],
    ["agent", "--log-format", "te\u2028xt"],
])
def test_held_click_usage_errors_stay_one_line(tmp_path: Path, args: list[str]) -> None:
    r = run_drsync(*args, cwd=tmp_path)
    assert r.code == 2 and _one_error_line(r), r


def _hostile_root(data: Path) -> Path:
    """A data root with one file and a fifo whose name forges a log line (a capture warning names it)."""
    data.mkdir()
    (data / "a").write_text("a")
    os.mkfifo(data / f"ff\n{FORGED}")
    return data


def test_held_toml_escapes_in_config_values(tmp_path: Path) -> None:
    """Cluster id, release, data root, repository, agent and group names from TOML escapes (\\n, U+2028,
    ESC, U+0085, U+202E): init, snapshot create, list and status --points print one line per line."""
    _hostile_root(tmp_path / "d\nX")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "cl\\nFORGED\\u2028"\nrelease = "1\\u001b[2J"\n'
                   f'data = "{tmp_path}/d\\nX"\nrepository = "{tmp_path}/r\\u0085Y"\n\n'
                   f'[agent]\nname = "ag\\u2028ent\\u202e"\nrole = "primary"\n\n'
                   f'[coordination]\ngroup = "gr\\u2029oup"\n')
    for args, lines in ((["init"], 1), (["snapshot", "create"], 2), (["snapshot", "list"], 2),
                        (["status", "--points"], 3)):
        r = run_drsync(*args, "--config", cfg)
        assert r.code == 0 and r.err == "" and len(_lines(r.out)) == lines, (args, r)
        assert not any(c in r.out for c in "\x1b\x85\u2028\u202e"), (args, r)


def test_held_agent_once_text_log_with_hostile_names(tmp_path: Path) -> None:
    """`agent --once` of a primary named 'ag<newline>ent' in group 'gr<newline>oup' whose root holds a
    fifo with a newline, shipping to an unreachable standby: exit 1, every stderr line is a record or the
    final error."""
    data = _hostile_root(tmp_path / "data")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path}/r"\n\n'
                   f'[agent]\nname = "ag\\u2028ent\\u202e"\nrole = "primary"\n\n'
                   f'[coordination]\ngroup = "gr\\u2029oup"\n\n'
                   f'[replication]\nstandbys = ["127.0.0.1:{free_port()}"]\n')
    init_repo(cfg)
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 1 and len(_lines(r.out)) == 1, r
    err = _lines(r.err)
    assert all(RECORD.match(x) for x in err[:-1]) and err[-1].startswith("drsync: error: "), r.err
    assert any("ff\\n2026-12-01" in x for x in err) and "group=gr\\u2029oup agent=ag\\u2028ent\\u202e" in err[0], r.err


def test_held_undecodable_names_in_show_diff_and_json(tmp_path: Path) -> None:
    """Names with undecodable bytes, ESC, a newline, U+2028 and a UTF-8-encoded surrogate, and a link
    target with them: `show --files` and `diff` rows escape them, `--json` carries the real names."""
    repo, data = _repo_with_snapshot(tmp_path)
    d = os.path.join(os.fsencode(data), b"u\xff\x1b")
    os.mkdir(d)
    with open(os.path.join(d, b"n\xc3\n\xe2\x80\xa8\xed\xa0\x80x"), "w") as f:
        f.write("1")
    os.symlink(b"ta\xffr\nget", os.path.join(os.fsencode(data), b"sl\xfe"))
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
    assert r.code == 0, r
    ids = [s["id"] for s in run_drsync("snapshot", "list", "--repo", repo, "--json").json()]
    r = run_drsync("snapshot", "diff", "--repo", repo, *ids)
    assert r.code == 0 and _lines(r.out) == [
        "+ sl\\xfe", "+ u\\xff\\x1b", "+ u\\xff\\x1b/n\\xc3\\n\\u2028\\xed\\xa0\\x80x",
        "M .", "3 added, 0 removed, 1 changed"], r.out  # the root: names added in it moved its time
    r = run_drsync("snapshot", "show", "latest", "--files", "--repo", repo)
    assert r.code == 0 and "sl\\xfe -> ta\\xffr\\nget" in r.out and len(_lines(r.out)) == 15 + 1 + 4, r.out
    r = run_drsync("snapshot", "show", "latest", "--files", "--repo", repo, "--json")
    paths = {e["path"] for e in r.json()["entries"]}
    assert os.fsdecode(b"u\xff\x1b/n\xc3\n\xe2\x80\xa8\xed\xa0\x80x") in paths


def test_held_a_failing_hook_and_a_refused_restore(tmp_path: Path) -> None:
    """A pre_hook whose command and stderr hold newlines and ESC: one error line, exit 1. A restore onto
    a foreign target holding paths with newlines: one error line naming them escaped, exit 4."""
    repo, data = _repo_with_snapshot(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{repo}"\n\n'
                   "[snapshots]\npre_hook = \"printf 'o\\\\nFORGED\\\\n'; printf 'e\\\\nFORGED\\\\x1b[31m\\\\n' >&2; "
                   "exit 3\"\n")
    r = run_drsync("snapshot", "create", "--config", cfg)
    assert r.code == 1 and _one_error_line(r) and "\x1b" not in r.err, r
    target = tmp_path / f"t\n{FORGED}"
    target.mkdir()
    (target / f"ex\n{FORGED}").write_text("q")
    (target / "f").write_text("other")
    r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", target)
    assert r.code == 4 and _one_error_line(r) and "ex\\n2026-12-01" in r.err, r
