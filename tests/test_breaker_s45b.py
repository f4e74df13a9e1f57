"""Breaker s45b: hostile cases for damaged backups, prune, the agent beside them, times, names and ports.

Failing on the code this was written against (each docstring says what it proves):

1. A backup whose backup.json is a directory, a FIFO, JSON nested 100,000 deep, 200 MB long, or holds a
   count no float can hold: `backup list`/`prune`/`verify` end as exit 1 ("Is a directory", "internal
   error: RecursionError/OverflowError") hiding every other backup, hang forever (FIFO), or read it whole
   (474 MB RSS) -- instead of naming it as damage (exit 3) and going on with the others.
2. The same damage in `[backups] destination` stops a primary agent from starting (RecursionError), hangs
   it (FIFO), or makes every backup pass "fail" after writing its backup, so it never prunes and writes a
   new backup every retry.
3. A deeply nested snapshot document: `snapshot list` and `repo verify` end as "internal error".
4. Prune: a backup directory that is a symlink stops the prune (exit 1) and leaves a `.deleting-` link that
   `backup list` calls a leftover forever; a copy with the newest's time (an interrupted `cp -a`) wins the
   tie and the original newest is removed; a directory holding only a copied backup.json and an operator's
   files is removed whole; a backup being created right now (its `.partial-*`) is removed under it.
5. The agent's own prune removes the backup it took "at once" because of one dated in the future; and
   `[backups] keep = {}` is accepted, then every backup is logged as failed after it was written.
6. `--json` prints NaN/Infinity (not JSON) from a backup.json or snapshot document that holds them.
7. `promote --before 0001-01-01T00:00:00` / `drill run --before ...`: "internal error: ValueError".
8. Config: a port spelled "+70000" or "70000 " passes (gRPC then listens on 4464); a superscript digit
   port is an internal error; a name with a character outside the BMP (an emoji) passes although
   ZooKeeper refuses it (BadArgumentsError, forever).
9. A metrics client that resets its connection puts a 20-line Python traceback in the agent's text log.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, Result, init_repo_at, run_drsync
from tests.test_breaker_s45 import _one_error_line, primary_beside, start_agent
from tests.zk import free_port

# The start of every record of the agent's text log (logsetup: ISO 8601 time with its zone).
RECORD_START = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
NESTED = "[" * 100_000 + "]" * 100_000


def _strict_json(text: str):  # type: ignore[no-untyped-def]
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON."""
    def refuse(c: str) -> None:
        raise ValueError(f"{c} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _repo(tmp_path: Path) -> str:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "f").write_text("x")
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data)
    assert r.code == 0, r
    return repo


def _backup(tmp_path: Path) -> Path:
    """A real full backup of a one-file snapshot, in tmp_path/backups/<id>."""
    repo = _repo(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "backups",
                   "--json")
    assert r.code == 0, r
    return Path(r.json()["path"])


def _rewrite_meta(backup_dir: Path, change) -> None:  # type: ignore[no-untyped-def]
    meta = backup_dir / "backup.json"
    meta.write_text(json.dumps(change(json.loads(meta.read_text()))))


def _copy(src: Path, name: str, created_at: str | None = None) -> Path:
    dst = src.parent / name
    shutil.copytree(src, dst, symlinks=True)
    if created_at:
        _rewrite_meta(dst, lambda d: {**d, "created_at": created_at})
    return dst


def _three(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The newest backup (now) and two older copies: 'old-2024' and 'old-2023'."""
    newest = _backup(tmp_path)
    return newest, _copy(newest, "old-2024", "2024-01-01T00:00:00Z"), _copy(newest, "old-2023", "2023-01-01T00:00:00Z")


def _primary_beside(tmp_path: Path, backups: Path, extra: str = "") -> Path:
    """A primary's config with [backups] destination ``backups`` (``extra``: more [backups] lines) and its
    own listen and metrics ports."""
    return primary_beside(tmp_path, backups, agent=f'listen = "127.0.0.1:{free_port()}"\n'
                          f'metrics = "127.0.0.1:{free_port()}"\n', extra=extra)


def _named_once(r: Result, name: str) -> bool:
    return len([x for x in r.err.splitlines() if name in x and "backup.json" in x]) == 1


def _config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path}/r"\n\n{body}',
                   encoding="utf-8")
    return cfg


# --- 1. a backup.json no reader should choke on ----------------------------------------------------------


def test_a_backup_json_that_is_a_directory_is_named_and_the_others_go_on(tmp_path: Path) -> None:
    """backup.json is a directory: today `backup list` and `prune` end 'the operation failed: ...backup.json:
    Is a directory' (exit 1), list nothing and prune nothing; `backup verify` exits 1 too. It cannot be
    read, so: named (exit 3), kept, and the other backups listed and pruned."""
    newest, old24, old23 = _three(tmp_path)
    (old24 / "backup.json").unlink()
    (old24 / "backup.json").mkdir()
    r = run_drsync("backup", "list", newest.parent)
    assert r.code == 3 and _named_once(r, "old-2024") and newest.name in r.out, r
    r = run_drsync("backup", "verify", old24)
    assert r.code == 3 and "backup.json" in r.err, r
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1")
    assert r.code == 3 and _named_once(r, "old-2024"), r
    assert newest.is_dir() and old24.is_dir() and not old23.exists()


def test_a_fifo_backup_json_is_never_opened(tmp_path: Path) -> None:
    """backup.json is a FIFO: today `backup list` opens it and waits for a writer forever (so does a
    primary agent at start, `agent --once` included). A backup.json that is not a regular file is damage,
    named, never read. So that nothing hangs, the test answers an open (a non-blocking open for writing
    succeeds once the FIFO has a reader) with a good backup.json: read from a FIFO, it lists as a backup."""
    newest, old24, _ = _three(tmp_path)
    good = (old24 / "backup.json").read_bytes()
    fifo = old24 / "backup.json"
    fifo.unlink()
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "backup", "list", str(newest.parent)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened = False
    while proc.poll() is None and not opened:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO, e
            continue
        opened = True
        try:
            os.write(fd, good)
        except BrokenPipeError:  # opened, looked at and closed without reading: fine
            pass
        os.close(fd)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "old-2024/backup.json" in err and newest.name in out, (opened, out, err)


def test_a_200_mb_backup_json_is_damage_not_read_whole(tmp_path: Path) -> None:
    """A backup.json of 200 MB (a valid document padded with blanks): today `backup list` reads and parses
    it whole (474 MB peak RSS, against a 68 MB listing otherwise) and lists it as a good backup. drsync
    writes backup.json as a snapshot document (at most 1 MiB, docs/FORMAT.md Limits) and a few fields:
    one this large was not written by drsync; it should be refused unread, named as damage (exit 3)."""
    newest, old24, _ = _three(tmp_path)
    text = (old24 / "backup.json").read_text()
    with open(old24 / "backup.json", "w") as f:
        f.write(" " * 200_000_000)
        f.write(text)
    r = run_drsync("backup", "list", newest.parent)
    assert r.code == 3 and _named_once(r, "old-2024") and newest.name in r.out, r


@pytest.mark.parametrize("command", ["list", "verify"])
def test_a_deeply_nested_backup_json_is_damage_not_an_internal_error(tmp_path: Path, command: str) -> None:
    """backup.json is '[' * 100000 + ']' * 100000 (200 kB): today 'drsync: internal error: RecursionError:
    maximum recursion depth exceeded while decoding a JSON array' (exit 1) for list, prune and verify, and
    the list hides every other backup."""
    newest, old24, _ = _three(tmp_path)
    (old24 / "backup.json").write_text(NESTED)
    r = run_drsync("backup", "list", newest.parent) if command == "list" else run_drsync("backup", "verify", old24)
    assert r.code == 3 and "internal error" not in r.err and "backup.json" in r.err, r


def test_a_count_no_float_can_hold_is_damage_not_an_internal_error(tmp_path: Path) -> None:
    """"bytes": 10**400 in backup.json passes the type checks (an int, not negative); `backup list` then
    ends 'internal error: OverflowError: integer division result too large for a float' (human_size), and
    lists nothing else."""
    newest, old24, _ = _three(tmp_path)
    _rewrite_meta(old24, lambda d: {**d, "bytes": 10 ** 400})
    r = run_drsync("backup", "list", newest.parent)
    assert "internal error" not in r.err and newest.name in r.out, r


def test_backup_list_json_stays_json_when_a_backup_json_holds_nan(tmp_path: Path) -> None:
    """The snapshot inside backup.json says "duration_s": NaN and "bytes": Infinity (Python's json reads
    both): today `backup list --json` prints them as NaN and Infinity, which is not JSON (a strict parser
    refuses the output), with exit 0. Either the output stays JSON or the backup is named damaged."""
    newest, old24, _ = _three(tmp_path)
    _rewrite_meta(old24, lambda d: {**d, "snapshot": {**d["snapshot"], "duration_s": float("nan"),
                                                       "bytes": float("inf")}})
    r = run_drsync("backup", "list", newest.parent, "--json")
    _strict_json(r.out)


def test_snapshot_show_json_stays_json_when_a_document_holds_nan(tmp_path: Path) -> None:
    """A snapshot document with "duration_s": NaN and "ttl_s": Infinity passes check_types (floats):
    `snapshot show --json` prints NaN and Infinity (not JSON) and `repo verify` calls it intact."""
    repo = _repo(tmp_path)
    doc_path = next((Path(repo) / "snapshots").glob("*.json"))
    doc = json.loads(doc_path.read_text())
    doc_path.write_text(json.dumps({**doc, "duration_s": float("nan"), "ttl_s": float("inf")}))
    r = run_drsync("snapshot", "show", "latest", "--repo", repo, "--json")
    if r.code == 0:
        _strict_json(r.out)
    else:
        assert r.code == 3 and doc_path.name in r.err, r


def test_a_deeply_nested_snapshot_document_is_damage_not_an_internal_error(tmp_path: Path) -> None:
    """snapshots/<id>.json is '[' * 100000 + ']' * 100000 (under the 1 MiB limit): today `snapshot list`
    and `repo verify` end 'internal error: RecursionError' (exit 1); a running primary agent stops
    ('unexpected error in its loop'). It is a damaged document: exit 3 naming it."""
    repo = _repo(tmp_path)
    doc_path = next((Path(repo) / "snapshots").glob("*.json"))
    doc_path.write_text(NESTED)
    for args in (["snapshot", "list"], ["repo", "verify"]):
        r = run_drsync(*args, "--repo", repo)
        assert r.code == 3 and "internal error" not in r.err and doc_path.name in r.err, (args, r)


# --- 2. the primary agent beside damaged backups ---------------------------------------------------------


def test_a_primary_agent_starts_beside_a_deeply_nested_backup_json(tmp_path: Path) -> None:
    """[backups] destination holds a backup whose backup.json is nested 100,000 deep: today `drsync agent
    --once` does not start ('internal error: RecursionError ...', exit 1), so one bad directory among the
    backups stops replication. It should start, replicate and warn once at WARNING."""
    newest, old24, _ = _three(tmp_path)
    (old24 / "backup.json").write_text(NESTED)
    r = run_drsync("agent", "--config", _primary_beside(tmp_path, newest.parent), "--once")
    assert r.code == 0 and "internal error" not in r.err, r
    assert len([x for x in r.err.splitlines() if " WARNING " in x and "old-2024" in x]) == 1, r.err


def test_the_agent_prunes_beside_a_backup_json_that_is_a_directory(tmp_path: Path) -> None:
    """A backup whose backup.json is a directory beside older good ones; keep = { last = 1 }: today the
    agent writes its backup, then logs 'ERROR ... backup of snapshot X failed: [Errno 21] Is a directory'
    (the backup was written), never prunes, never names the damaged backup at WARNING, and tries again
    (a new backup) after 10 minutes, or at every `--once`. It should warn once and prune the others."""
    newest, old24, old23 = _three(tmp_path)
    _rewrite_meta(newest, lambda d: {**d, "created_at": "2025-01-01T00:00:00Z"})  # due now
    (old24 / "backup.json").unlink()
    (old24 / "backup.json").mkdir()
    cfg = _primary_beside(tmp_path, newest.parent, 'interval = "1h"\nkeep = { last = 1 }\n')
    r = run_drsync("agent", "--config", cfg, "--once")
    assert r.code == 0, r
    assert not [x for x in r.err.splitlines() if " ERROR " in x], r.err
    assert len([x for x in r.err.splitlines() if " WARNING " in x and "old-2024" in x]) == 1, r.err
    assert old24.is_dir() and not old23.exists() and not newest.exists()


def test_the_backup_taken_because_of_a_future_one_is_not_pruned_at_once(tmp_path: Path) -> None:
    """The newest backup says 2100 (a clock that was ahead); keep = { last = 1 }. The agent warns and takes a
    new backup at once, as promised -- and its own prune, ordering by created_at, then keeps the 2100
    backup and removes the one it just took (and every real one): today only the 2100 backup is left,
    while drsync_backup_last_success says a backup was taken now. The new backup must survive."""
    newest, old24, _ = _three(tmp_path)
    _rewrite_meta(old24, lambda d: {**d, "created_at": "2100-01-01T00:00:00Z"})
    _rewrite_meta(newest, lambda d: {**d, "created_at": "2025-01-01T00:00:00Z"})  # a backup is due
    before = {p.name for p in newest.parent.iterdir()}
    r = run_drsync("agent", "--config", _primary_beside(tmp_path, newest.parent, 'interval = "1h"\n'
                                                                  'keep = { last = 1 }\n'), "--once")
    assert r.code == 0 and any("in the future" in x for x in r.err.splitlines()), r
    taken = {p.name for p in newest.parent.iterdir()} - before
    assert len(taken) == 1, (sorted(p.name for p in newest.parent.iterdir()), r.err)
    assert old24.is_dir()  # dated in the future: its age is unknown, so it is kept and named, never pruned


def test_a_backups_keep_that_keeps_nothing_is_refused_or_harmless(tmp_path: Path) -> None:
    """`[backups] keep = {}`: config load and `config check` accept it ('every key valid'); then every
    backup pass writes its backup and logs 'ERROR ... backup of snapshot X failed: give at least one
    --keep-* option' (an option the agent has not got), and writes another one after 10 minutes. Either
    the config is refused (exit 2 naming backups.keep) or a written backup is not reported failed."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path}/r"\n\n'
                   f'[backups]\ndestination = "{tmp_path}/b"\nkeep = {{}}\n')
    r = run_drsync("init", "--config", cfg)
    assert r.code == 2 and "backups.keep: keeps no backup" in r.err, r


# --- 3. prune: what it may remove ---------------------------------------------------------------------------


def test_a_symlinked_backup_does_not_stop_the_prune(tmp_path: Path) -> None:
    """old-2024 is a symlink to a backup kept on another disk. Today prune renames the link to
    '.deleting-old-2024', fails 'Cannot call rmtree on a symbolic link' (exit 1) before old-2023 is pruned,
    and `backup list` from then on calls the link an 'incomplete leftover, removed by prune' that prune
    never removes. Whatever it does with the link, the target must stay, the rest be pruned, and no
    '.deleting-' entry be left behind."""
    newest, old24, old23 = _three(tmp_path)
    elsewhere = tmp_path / "other-disk" / "old-2024"
    elsewhere.parent.mkdir()
    shutil.move(old24, elsewhere)
    old24.symlink_to(elsewhere)
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1")
    assert (elsewhere / "backup.json").is_file() and (elsewhere / "packs").is_dir()
    assert r.code != 1 and not old23.exists(), r
    assert not [p.name for p in newest.parent.iterdir() if p.name.startswith(".deleting-")]


def test_prune_keeps_the_original_newest_over_a_copy_with_its_time(tmp_path: Path) -> None:
    """`cp -a` of the newest backup, interrupted (its packs not copied yet), as 'zz-copy': same backup.json,
    same created_at. `prune --keep-last 1` breaks the tie by directory name, keeps the broken copy and
    removes the original newest backup: the only backup left fails `backup verify`. A copy must not
    cost the newest backup; on a tie the directory named by its own id is the backup."""
    newest = _backup(tmp_path)
    copy = _copy(newest, "zz-copy")
    shutil.rmtree(copy / "packs")
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1")
    assert r.code in (0, 3), r
    assert newest.is_dir(), r.out


def test_prune_never_removes_a_directory_that_only_holds_a_backup_json(tmp_path: Path) -> None:
    """An operator's directory in the backup directory holding a copied backup.json and notes.txt, nothing
    else (no repository, no CHECKSUMS.b3): today `backup list` lists it as a backup and `prune` removes it
    with everything in it. It is not a complete backup: prune must leave it alone."""
    newest, old24, _ = _three(tmp_path)
    notes = newest.parent / "operator-notes"
    notes.mkdir()
    shutil.copy(old24 / "backup.json", notes / "backup.json")
    (notes / "notes.txt").write_text("keep me")
    run_drsync("backup", "prune", newest.parent, "--keep-last", "1")
    assert (notes / "notes.txt").is_file()


def test_prune_does_not_remove_a_backup_being_created(tmp_path: Path) -> None:
    """A backup is being written (its `.partial-*` directory, here held still after its first chunk by its
    progress callback) when an operator runs `backup prune DIR --keep-last 5`: today prune removes the
    '.partial-' directory as a leftover under the running create, which then fails ('a pack could not be
    written (No such file or directory)'). A create in progress is not a leftover."""
    from drsync import backup, engine

    repo = engine.open_repository(_repo(tmp_path))
    dest = tmp_path / "backups"
    dest.mkdir()
    reached, go = threading.Event(), threading.Event()

    def hold(_n: int) -> None:
        reached.set()
        go.wait(300)

    result: dict[str, object] = {}

    def create() -> None:
        try:
            result["info"] = backup.create_backup(repo, "latest", str(dest), progress=hold)
        except Exception as e:  # reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=create, daemon=True)
    t.start()
    try:
        assert reached.wait(120)
        assert [p.name for p in dest.iterdir() if p.name.startswith(".partial-")]
        r = run_drsync("backup", "prune", dest, "--keep-last", "5")
    finally:
        go.set()
        t.join(120)
    assert "error" not in result, (result, r)


# --- 4. times, names and ports -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["promote"], ["drill", "run"]])
def test_a_before_time_no_date_can_show_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    """`--before 0001-01-01T00:00:00` (no zone: local time, here UTC) is a time a datetime cannot turn into
    Unix seconds. parse_before uses its own fromisoformat, not the strict parser, and today ends
    'drsync: internal error: ValueError: year 0 is out of range' (exit 1). Exit 2 naming --before."""
    repo = tmp_path / "r"
    init_repo_at(repo, "c", "1")
    cfg = _config(tmp_path, f'[agent]\nname = "s"\nrole = "standby"\nstate_dir = "{tmp_path}/st"\n'
                            f'listen = "127.0.0.1:{free_port()}"\n')
    r = run_drsync(*command, "--config", cfg, "--before", "0001-01-01T00:00:00", env={"TZ": "UTC"})
    assert r.code == 2 and "internal error" not in r.err and "--before" in r.err, r


@pytest.mark.parametrize("value", ["127.0.0.1:+70000", "127.0.0.1:70000 ", "127.0.0.1:\u00b9"])
@pytest.mark.parametrize("key", ["listen", "metrics"])
def test_a_port_past_65535_in_any_spelling_is_a_configuration_error(tmp_path: Path, key: str,
                                                                     value: str) -> None:
    """The port check takes only ASCII-and-Unicode digits: '+70000' and '70000 ' (a trailing blank) pass,
    and the agent then listens with gRPC on port 4464 (70000 - 65536) while logging 'gRPC on
    127.0.0.1:70000 ' (and `config check` ends 'internal error: OverflowError'); a superscript one
    ('¹', which str.isdigit accepts and int refuses) is 'internal error: ValueError' in every command that
    reads the config. Exit 2 and one line naming the key."""
    r = run_drsync("init", "--config", _config(tmp_path, f'[agent]\n{key} = "{value}"\n'))
    assert r.code == 2 and len(r.err.splitlines()) == 1 and f"agent.{key}" in r.err, r


@pytest.mark.parametrize("key", ["agent.name", "coordination.group"])
def test_a_name_outside_the_bmp_is_refused_like_zookeeper_refuses_it(tmp_path: Path, key: str) -> None:
    """ZooKeeper checks node names as Java (UTF-16) strings: a character outside the BMP (an emoji) is a
    surrogate pair, inside its forbidden range U+D800-U+F8FF. A real ZooKeeper 3.8 answers
    BadArgumentsError; drsync's check looks at code points, so `config check` says 'every key valid' and
    the agent retries 'cannot register in ZooKeeper yet: BadArgumentsError' forever. Exit 2, one line."""
    section, name = key.split(".")
    r = run_drsync("init", "--config", _config(tmp_path, f'[{section}]\n{name} = "east-\U0001F600"\n'))
    assert r.code == 2 and len(r.err.splitlines()) == 1 and f"{key}: " in r.err, r


# --- 5. the agent's log ---------------------------------------------------------------------------------------


def test_a_reset_metrics_connection_leaves_no_traceback_in_the_agents_log(tmp_path: Path) -> None:
    """A scraper that resets its connection mid-request (a Prometheus scrape timeout, a health check):
    http.server's readline raises ConnectionResetError and socketserver prints '-----', 'Exception
    occurred during processing of request from ...' and a 15-line traceback straight to stderr, beside
    the agent's records, without --debug. Every line of the text log must be a record."""
    import re

    cfg = _primary_beside(tmp_path, tmp_path / "no-backups")
    metrics = re.search(r'metrics = "127.0.0.1:(\d+)"', cfg.read_text())
    assert metrics
    port = int(metrics.group(1))
    proc, lines, _ = start_agent(cfg)
    seen: list[str] = []
    try:
        while not any(" started " in x for x in seen):
            line = lines.get(timeout=60)
            assert line is not None, "".join(seen)
            seen.append(line)
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /metr")  # no end of line: the server's thread waits in readline
        with socket.create_connection(("127.0.0.1", port)) as whole:  # served after `half` was accepted
            whole.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while whole.recv(65536):
                pass
        half.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        half.close()  # RST
        with socket.create_connection(("127.0.0.1", port)) as again:
            again.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while again.recv(65536):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    while (line := lines.get(timeout=60)) is not None:
        seen.append(line)
    log = "".join(seen)
    assert "Traceback" not in log, log
    assert all(re.match(RECORD_START, x) for x in log.splitlines()), log


# --- what held ------------------------------------------------------------------------------------------------


def test_held_damaged_backups_are_named_kept_and_the_rest_pruned(tmp_path: Path) -> None:
    """Several kinds of unreadable backup.json at once (a leap second, Arabic-Indic digits, year 0 once the
    zone is applied, a newer format, a list, duplicate keys leaving a bad mode): `prune --json` exits 3,
    names each on one line, lists them under "damaged", keeps them, and prunes the good old one; times
    with +14:00 and 9 fractional digits are read."""
    newest, old24, old23 = _three(tmp_path)
    bad = {"leap": lambda d: {**d, "created_at": "2024-12-31T23:59:60Z"},
           "arabic": lambda d: {**d, "created_at": "\u0662\u0660\u0662\u0664-01-01T00:00:00Z"},
           "year0": lambda d: {**d, "created_at": "0001-01-01T00:00:00+01:00"},
           "newer": lambda d: {**d, "format": 2},
           "alist": lambda d: [d]}
    for name, change in bad.items():
        _rewrite_meta(_copy(newest, name), change)
    dup = _copy(newest, "dupkeys")
    (dup / "backup.json").write_text((dup / "backup.json").read_text().replace('"mode": "full"',
                                                                               '"mode": "full", "mode": "x"'))
    _rewrite_meta(old24, lambda d: {**d, "created_at": "2024-01-01T13:59:59.123456789+14:00"})
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "2", "--json")
    assert r.code == 3, r
    doc = _strict_json(r.out)
    assert sorted(d["file"].split("/")[0] for d in doc["damaged"]) == sorted([*bad, "dupkeys"]), doc
    assert all(_named_once(r, n) for n in [*bad, "dupkeys"]), r.err
    assert doc["remove"] == ["old-2023"] and not old23.exists() and old24.is_dir(), doc
    assert all((newest.parent / n).is_dir() for n in [*bad, "dupkeys"])


def test_held_prune_never_follows_a_leftover_symlink_out_of_dir(tmp_path: Path) -> None:
    """'.partial-x' and '.deleting-y' are symlinks to a directory outside DIR, and a backup holds a
    symlink 'packs' to it: prune removes the old backup and leaves everything outside DIR as it was. The
    two links are named as damage (exit 3), as a backup that is a link is (breaker s46: they were silent)."""
    newest, old24, _ = _three(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "f").write_text("keep")
    (newest.parent / ".partial-x").symlink_to(outside)
    (newest.parent / ".deleting-y").symlink_to(outside)
    shutil.rmtree(old24 / "packs")
    (old24 / "packs").symlink_to(outside)
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1")
    assert r.code == 3 and ".partial-x" in r.err + r.out and ".deleting-y" in r.err + r.out, r
    assert (outside / "f").read_text() == "keep" and not old24.exists()
    assert (newest.parent / ".partial-x").is_symlink() and (newest.parent / ".deleting-y").is_symlink()


def test_held_a_renamed_backup_verifies_and_restores(tmp_path: Path) -> None:
    """A backup renamed to a name with a blank and a newline still verifies and restores; prune names it by
    its directory (the escaped newline on one line) and keeps it as the newest."""
    newest = _backup(tmp_path)
    renamed = newest.parent / "moved\nhere"
    newest.rename(renamed)
    assert run_drsync("backup", "verify", renamed).code == 0
    r = run_drsync("backup", "restore", renamed, "--target", tmp_path / "t")
    assert r.code == 0 and (tmp_path / "t" / "f").read_text() == "x", r
    r = run_drsync("backup", "prune", renamed.parent, "--keep-last", "1")
    assert r.code == 0 and "keep   moved\\nhere last" in r.out.splitlines(), r


def test_held_snapshot_times_no_date_can_show_are_damage(tmp_path: Path) -> None:
    """captured_at '0001-01-01T00:00:00+01:00', '9999-12-31T23:59:59-00:01' or Infinity: `snapshot list`,
    `show` and `repo verify` name the document (exit 3); no internal error."""
    repo = _repo(tmp_path)
    doc_path = next((Path(repo) / "snapshots").glob("*.json"))
    doc = json.loads(doc_path.read_text())
    for t in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-00:01", float("inf")):
        doc_path.write_text(json.dumps({**doc, "captured_at": t}))
        for args in (["snapshot", "list"], ["snapshot", "show", doc_path.stem], ["repo", "verify"]):
            r = run_drsync(*args, "--repo", repo)
            assert r.code == 3 and "internal error" not in r.err and doc_path.name in r.err, (t, args, r)


def test_a_backup_that_cannot_be_removed_does_not_keep_the_others(tmp_path: Path) -> None:
    """old-2024 holds a file that cannot be unlinked (immutable, `chattr +i`). Prune stopped at it (exit 1,
    naming only a .parquet file) and old-2023, due for removal too, stayed. Now the others go, and the one
    that could not is named by its directory: exit 1."""
    newest, old24, old23 = _three(tmp_path)
    stuck = next(p for p in old24.rglob("*") if p.is_file())
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute (chattr +i)")
    try:
        r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1", "--json")
    finally:  # prune renamed the backup to '.deleting-old-2024' before it failed to remove it
        moved = newest.parent / ".deleting-old-2024" / stuck.relative_to(old24)
        subprocess.run(["chattr", "-i", str(moved if moved.exists() else stuck)], check=True)
    assert r.code == 1 and _one_error_line(r) and "1 backup(s) could not be removed" in r.err, r
    assert "old-2024" in r.err, r
    assert json.loads(r.out)["failed"][0]["backup"] == "old-2024", r.out
    assert newest.is_dir() and not old23.exists()


def test_a_leftover_that_cannot_be_removed_is_named_at_every_prune(tmp_path: Path) -> None:
    """The backup the last prune could not remove stays as '.deleting-old-2024'. A later prune retried it
    silently (exit 0, nothing said), so nobody learned that space was never freed. Now every prune names
    it (exit 1, JSON 'failed') until it goes, and then says nothing."""
    newest, old24, _ = _three(tmp_path)
    stuck = next(p for p in old24.rglob("*") if p.is_file())
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute (chattr +i)")
    moved = newest.parent / ".deleting-old-2024" / stuck.relative_to(old24)
    try:
        assert run_drsync("backup", "prune", newest.parent, "--keep-last", "1").code == 1
        assert moved.exists()
        r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1", "--json")
        assert r.code == 1 and _one_error_line(r) and ".deleting-old-2024" in r.err, r
        assert [f["backup"] for f in json.loads(r.out)["failed"]] == [".deleting-old-2024"], r.out
    finally:
        subprocess.run(["chattr", "-i", str(moved if moved.exists() else stuck)], check=True)
    r = run_drsync("backup", "prune", newest.parent, "--keep-last", "1", "--json")
    assert r.code == 0 and json.loads(r.out)["failed"] == [], r
    assert not (newest.parent / ".deleting-old-2024").exists() and newest.is_dir()
