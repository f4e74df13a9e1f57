"""Breaker s44: hostile cases for today's promises.

1. ``snapshot expire`` whose garbage collection cannot have the lock: exit 0, the deletions stand, one
   ``warning: garbage collection postponed:`` line naming the holder and ``drsync repo gc``, ``--json`` with
   ``"gc": null`` and ``"gc_postponed"``; no postponement without contention nor with ``--dry-run``.
2. The agent logs such a postponement at INFO, and every other refusal of its retention at WARNING or above.
3. ``drsync init`` (and ``engine.init_repository``) with a protect window; refusals (exit 2, one line)
   leave an existing repository untouched; a bad window creates nothing.
4. ``tests.reliability.combinations`` and the ``tmp_path`` / ``group`` fixtures.

Real processes, real files and real locks; a lock is held between an expiry's deletions and its
collection with the pause point ``gc-mark`` (drsync.faults), as tests/test_gc_postponed.py does."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drsync import engine
from drsync.errors import DrsyncError
from drsync.protection import REPO_DOC
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import ROOT, run_drsync
from tests.group import wait_for
from tests.test_breaker_s38 import Maint
from tests.test_gc_postponed import collect_under_a_held_lock as _collect_under_a_held_lock
from tests.test_gc_postponed import finish as _finish
from tests.test_gc_postponed import gate as _gate
from tests.test_gc_postponed import spawn as _spawn
from tests.test_gc_postponed import wait_reached as _wait_reached

PREFIX = "warning: garbage collection postponed:"
HOUR = 3600.0


# --- helpers -------------------------------------------------------------------------------------------


def _not_fault_trial(err: str) -> list[str]:
    """stderr without the pause points' own lines (drsync.faults: the trial's, not the command's)."""
    return [ln for ln in err.splitlines() if "fault trial:" not in ln]


def _unique_snapshot(repo: Repository, data: Path, tag: str, kind: str = "cycle", ttl_s: float | None = None):  # type: ignore[no-untyped-def]
    data.mkdir(exist_ok=True)
    (data / "f.bin").write_bytes(os.urandom(64 * 1024) + tag.encode())  # no chunk shared with another snapshot
    return engine.create_snapshot(repo, engine.SnapshotRequest(str(data), kind=kind, ttl_s=ttl_s))


def _cluster(tmp: Path, *, keep: str = "{ last = 1 }", protect: str = "0s", role: str = "") -> tuple[Path, Repository]:
    """A config (keep last 1) and its repository holding two cycle snapshots with no chunk in common."""
    data, url = tmp / "data", tmp / "repo"
    repo = Repository.init(open_storage(str(url)), cluster_id="c", release="1")
    _unique_snapshot(repo, data, "one")
    _unique_snapshot(repo, data, "two")
    cfg = tmp / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{url}"\n'
                   f'[agent]\nname = "a"\nstate_dir = "{tmp / "state"}"\n{role}'
                   f'[snapshots]\nkeep = {keep}\nprotect = "{protect}"\n')
    return cfg, repo


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: size, mtime (ns) and content hash; directories with their mtime."""
    out: dict[str, tuple[int, int, str]] = {".": (0, root.stat().st_mtime_ns, "dir")}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


def _strict_json(text: str) -> object:
    """JSON as any other program reads it: NaN and Infinity are not JSON."""
    def refuse(c: str) -> object:
        raise ValueError(f"{c} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _one_error_line(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err


# --- 1. snapshot expire and a postponed garbage collection -----------------------------------------------


def test_s44_expire_postponed_by_another_drsync_process_names_it_and_repo_gc_frees_later(tmp_path: Path) -> None:
    """The holder is a real `drsync snapshot create` (its shared lock, paused before its commit), taken
    after the expiry's deletions: exit 0, one JSON document, one warning line naming that process."""
    cfg, repo = _cluster(tmp_path)
    pa = _gate(tmp_path, "pause-expire", "gc-mark")
    expire = _spawn("snapshot", "expire", "--config", cfg, "--json",
                    env={"DRSYNC_FAULT_PAUSE": str(pa), "DRSYNC_LOCK_WAIT": "0"})
    pb = _gate(tmp_path, "pause-create", "snapshot-commit")
    create = None
    try:
        _wait_reached(pa, "gc-mark", expire)
        create = _spawn("snapshot", "create", "--repo", repo.storage.url, "--source", tmp_path / "data",
                        env={"DRSYNC_FAULT_PAUSE": str(pb), "DRSYNC_LOCK_WAIT": "0"})
        _wait_reached(pb, "snapshot-commit", create)
        (pa / "gc-mark").unlink()
        code, out, err = _finish(expire)
    finally:
        for p in pa / "gc-mark", pb / "snapshot-commit":
            p.unlink(missing_ok=True)
        if expire.poll() is None:
            expire.kill()
    assert create is not None
    ccode, _, cerr = _finish(create)
    assert ccode == 0, cerr
    assert code == 0, err
    doc = _strict_json(out)
    assert isinstance(doc, dict)
    assert len(doc["deleted"]) == 1 and doc["gc"] is None and doc["dry_run"] is False, doc
    assert isinstance(doc["gc_postponed"], str) and f"pid {create.pid}" in doc["gc_postponed"], doc
    lines = _not_fault_trial(err)
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert f"pid {create.pid}" in lines[0] and "drsync repo gc" in lines[0], lines[0]
    # The deletion stands (the first snapshot is gone; the kept one and the new manual one stay) ...
    left = run_drsync("snapshot", "list", "--repo", repo.storage.url, "--json")
    assert left.code == 0, left.err
    assert doc["deleted"][0] not in {s["id"] for s in left.json()}
    # ... and the command the warning names frees the deleted snapshot's data.
    gc = run_drsync("repo", "gc", "--repo", repo.storage.url, "--json")
    assert gc.code == 0, gc.err
    assert gc.json()["freed_bytes"] > 0, gc.out


def test_s44_expire_with_repo_postponed_human_output(tmp_path: Path) -> None:
    """--repo (a manual snapshot past its TTL), human output: exit 0, stdout says what was deleted, stderr
    one warning line."""
    url = tmp_path / "repo"
    repo = Repository.init(open_storage(str(url)), cluster_id="c", release="1")
    gone = _unique_snapshot(repo, tmp_path / "data", "ttl", kind="manual", ttl_s=0.001)
    _unique_snapshot(repo, tmp_path / "data", "stays", kind="manual")
    wait_for(lambda: gone.is_expired(time.time()), "the TTL to pass", 10)
    pause = _gate(tmp_path, "pause", "gc-mark")
    proc = _spawn("snapshot", "expire", "--repo", url, env={"DRSYNC_FAULT_PAUSE": str(pause),
                                                            "DRSYNC_LOCK_WAIT": "0"})
    code, out, err = _collect_under_a_held_lock(proc, pause, repo)
    assert code == 0, err
    assert gone.id in out and "deleted 1 snapshot" in out, out
    lines = _not_fault_trial(err)
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "drsync repo gc" in lines[0], err
    assert f"pid {os.getpid()}" in lines[0], lines[0]  # the holder: this process
    assert gone.id not in {s.id for s in repo.list_snapshots()}


def test_s44_expire_with_a_lock_wait_postpones_after_waiting(tmp_path: Path) -> None:
    """DRSYNC_LOCK_WAIT above 0: the collection waits that long for the holder, then postpones (exit 0)."""
    cfg, repo = _cluster(tmp_path)
    pause = _gate(tmp_path, "pause", "gc-mark")
    proc = _spawn("snapshot", "expire", "--config", cfg, "--json",
                  env={"DRSYNC_FAULT_PAUSE": str(pause), "DRSYNC_LOCK_WAIT": "0.3"})
    code, out, err = _collect_under_a_held_lock(proc, pause, repo)
    assert code == 0, err
    doc = _strict_json(out)
    assert isinstance(doc, dict) and doc["gc"] is None and doc["gc_postponed"], doc
    assert sum(ln.startswith(PREFIX) for ln in err.splitlines()) == 1, err


def test_s44_expire_without_contention_collects_and_says_gc_postponed_null(tmp_path: Path) -> None:
    cfg, repo = _cluster(tmp_path)
    r = run_drsync("snapshot", "expire", "--config", cfg, "--json", env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 0, r.err
    doc = _strict_json(r.out)
    assert isinstance(doc, dict)
    assert "gc_postponed" in doc and doc["gc_postponed"] is None, doc
    assert doc["gc"] is not None and doc["gc"]["freed_bytes"] > 0, doc
    assert "postponed" not in r.err, r.err
    assert len(repo.list_snapshots()) == 1


def test_s44_expire_with_nothing_due_postpones_nothing(tmp_path: Path) -> None:
    cfg, _repo = _cluster(tmp_path, keep="{ last = 5 }")
    r = run_drsync("snapshot", "expire", "--config", cfg, "--json", env={"DRSYNC_LOCK_WAIT": "0"})
    assert r.code == 0, r.err
    doc = _strict_json(r.out)
    assert isinstance(doc, dict) and doc["deleted"] == [] and doc["gc"] is None and doc["gc_postponed"] is None


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_s44_expire_dry_run_never_postpones(tmp_path: Path, as_json: bool) -> None:
    """--dry-run with another process's shared lock held throughout (and the gc-mark gate set, which a
    dry run must never reach): exit 0, gc_postponed null, no warning, nothing deleted."""
    cfg, repo = _cluster(tmp_path)
    pause = _gate(tmp_path, "pause", "gc-mark")
    held = repo.lock(exclusive=False, wait_s=0).acquire()
    try:
        r = run_drsync("snapshot", "expire", "--config", cfg, "--dry-run", *(["--json"] if as_json else []),
                       env={"DRSYNC_FAULT_PAUSE": str(pause), "DRSYNC_LOCK_WAIT": "0"}, timeout=120)
    finally:
        held.release()
    assert r.code == 0, r.err
    assert not (pause / "gc-mark.reached").exists()
    assert "postponed" not in r.err and "warning" not in r.err.lower(), r.err
    if as_json:
        doc = _strict_json(r.out)
        assert isinstance(doc, dict) and doc["dry_run"] is True and doc["gc"] is None
        assert doc["gc_postponed"] is None and len(doc["deleted"]) == 1, doc
    else:
        assert "would delete 1" in r.out, r.out
    assert len(repo.list_snapshots()) == 2


def test_s44_expire_locked_before_deleting_says_nothing_of_a_postponed_collection(tmp_path: Path) -> None:
    """The expiry's own lock cannot be had: nothing deleted, exit 1 (DESIGN: operation failed), and no
    claim that a collection was postponed after deletions."""
    cfg, repo = _cluster(tmp_path)
    held = repo.lock(exclusive=False, wait_s=0).acquire()
    try:
        r = run_drsync("snapshot", "expire", "--config", cfg, "--json", env={"DRSYNC_LOCK_WAIT": "0"})
    finally:
        held.release()
    assert r.code == 1, (r.code, r.err)
    assert "postponed" not in r.err and r.out == "", (r.out, r.err)
    _one_error_line(r.err)
    assert len(repo.list_snapshots()) == 2


def test_s44_snapshot_delete_whose_collection_is_postponed_reports_as_expire_does(tmp_path: Path) -> None:
    """Beyond today's promises, the same situation through `snapshot delete`: the snapshot is deleted, then
    its collection cannot have the lock. Like expire it should exit 0 with the postponement said; exit 1
    ('the repository is locked', per its --help) tells the operator nothing was done, and a rerun of the same
    command then fails with 'no such snapshot'."""
    _cfg, repo = _cluster(tmp_path)
    victim = repo.list_snapshots()[0].id
    pause = _gate(tmp_path, "pause", "gc-mark")
    proc = _spawn("snapshot", "delete", victim, "--repo", repo.storage.url, "--json",
                  env={"DRSYNC_FAULT_PAUSE": str(pause), "DRSYNC_LOCK_WAIT": "0"})
    code, out, err = _collect_under_a_held_lock(proc, pause, repo)
    assert victim not in {s.id for s in repo.list_snapshots()}  # deleted, whatever the exit code says
    assert code == 0, (code, out, err)
    assert sum(ln.startswith(PREFIX) for ln in err.splitlines()) == 1, err


# --- 2. the agent: INFO for a postponed collection, WARNING or above for every other refusal ------------


def _json_records(err: str) -> list[dict[str, str]]:
    out = []
    for ln in err.splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and "level" in rec:
            out.append(rec)
    return out


def _agent_once(cfg: Path, pause: Path) -> subprocess.Popen[str]:
    return _spawn("agent", "--once", "--config", cfg, "--log-level", "debug", "--log-format", "json",
                  env={"DRSYNC_FAULT_PAUSE": str(pause)})


def test_s44_agent_process_logs_its_postponed_collection_at_info(tmp_path: Path) -> None:
    """A real `drsync agent --once` whose retention expires a snapshot while another process holds the
    shared lock at its collection: the postponement is an INFO record; nothing but the pause point's own
    records is WARNING or above."""
    cfg, repo = _cluster(tmp_path, role='role = "primary"\n')
    pause = _gate(tmp_path, "pause", "gc-mark")
    proc = _agent_once(cfg, pause)
    code, _out, err = _collect_under_a_held_lock(proc, pause, repo)
    assert code == 0, err
    recs = _json_records(err)
    postponed = [r for r in recs if "postponed" in r.get("message", "")]
    assert postponed and all(r["level"] == "INFO" for r in postponed), postponed
    loud = [r for r in recs if r["level"] in ("WARNING", "ERROR", "CRITICAL") and r.get("logger") != "drsync.faults"]
    assert not loud, loud
    assert len(repo.list_snapshots()) == 1  # the cycle's new snapshot; both old ones expired


def test_s44_agent_retention_refused_by_a_damaged_protect_json_is_a_warning(tmp_path: Path) -> None:
    """protect.json damaged while the agent runs (its start writes a damaged one again, so the damage comes
    while its capture is paused): retention refuses every deletion (operations.md: 'A damaged protect.json
    stops every deletion'). That refusal is not a routine postponement: it must be WARNING or above."""
    cfg, repo = _cluster(tmp_path, role='role = "primary"\n')
    pause = _gate(tmp_path, "pause", "snapshot-commit")
    proc = _agent_once(cfg, pause)
    try:
        _wait_reached(pause, "snapshot-commit", proc)
        (tmp_path / "repo" / REPO_DOC).write_text("{ not json")
        (pause / "snapshot-commit").unlink()
        code, _out, err = _finish(proc)
    finally:
        (pause / "snapshot-commit").unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert len(repo.list_snapshots()) == 3  # nothing expired: the refusal happened
    recs = _json_records(err)
    about = [r for r in recs if REPO_DOC in r.get("message", "") and r.get("logger") != "drsync.faults"]
    assert about, err
    assert any(r["level"] in ("WARNING", "ERROR", "CRITICAL") for r in about), \
        [(r["level"], r["message"]) for r in about]


def test_s44_agent_gc_refused_on_damage_is_a_warning_not_a_postponement(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The collection after an expiry refuses because chunks a snapshot names are in no index file (exit 3
    for `repo gc`: 'run drsync repo verify'). That is damage, not the repository being in use: the agent
    must log it at WARNING or above, and must not say retention was skipped when it deleted a snapshot."""
    m = Maint(tmp_path)
    m.snap()
    m.snap()
    for p in (tmp_path / "r" / "index").iterdir():
        p.unlink()
    caplog.set_level(logging.DEBUG, logger="drsync")
    m.open().run_pass()
    assert m.snapshots() == 1  # the expiry's deletion happened
    about = [r for r in caplog.records if "no index file" in r.getMessage()]
    assert about, caplog.text
    assert all(r.levelno >= logging.WARNING for r in about), [(r.levelname, r.getMessage()) for r in about]
    assert not [r for r in about if "skipped" in r.getMessage()], [r.getMessage() for r in about]


def test_s44_agent_retries_a_postponed_collection_without_another_expiry(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """INFO is justified by 'it retries within minutes'. The agent's first expiry ever (last_gc_at 0) has
    its collection postponed; the next passes, with the lock free and nothing more to expire (captures
    stopped, or a standby whose primary is gone), must collect it: the expired snapshot's data goes."""
    m = Maint(tmp_path)
    m.snap()
    m.snap()
    pause = _gate(tmp_path, "pause", "gc-mark")
    worker = m.open()
    monkeypatch.setenv("DRSYNC_FAULT_PAUSE", str(pause))
    t = threading.Thread(target=worker.run_pass)
    t.start()
    wait_for(lambda: (pause / "gc-mark.reached").exists() or not t.is_alive(), "the collection's mark", 60)
    held = m.repo.lock(exclusive=False, wait_s=0).acquire()
    try:
        (pause / "gc-mark").unlink()
        t.join(120)
    finally:
        held.release()
    monkeypatch.delenv("DRSYNC_FAULT_PAUSE")
    assert not t.is_alive() and m.snapshots() == 1
    packs_after_postponement = m.packs()
    worker.run_pass()  # the retry the loop makes RETRY_EVERY_S later: the lock is free now
    m.open().run_pass()  # and after a restart
    assert m.packs() < packs_after_postponement, "the postponed collection never ran again"


# --- 3. drsync init and engine.init_repository ----------------------------------------------------------


def _existing(tmp: Path) -> Path:
    url = tmp / "repo"
    r = run_drsync("init", "--repo", url, "--cluster-id", "c", "--release", "1", "--protect", "7d")
    assert r.code == 0, r.err
    repo = engine.open_repository(str(url))
    _unique_snapshot(repo, tmp / "data", "kept")
    assert json.loads((url / REPO_DOC).read_text())["window_s"] == 7 * 86400
    return url


@pytest.mark.parametrize("how", ["repo+protect", "repo", "config+protect-key", "config+flag", "json",
                                 "config-state-dir-in-repo"])
def test_s44_init_over_a_repository_refuses_and_touches_nothing(tmp_path: Path, how: str) -> None:
    url = _existing(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "other"\nrelease = "9"\ndata = "{tmp_path / "data"}"\nrepository = "{url}"\n'
                   f'[agent]\nstate_dir = "{tmp_path / "elsewhere"}"\n[snapshots]\nprotect = "1s"\n')
    args = {"repo+protect": ["--repo", url, "--cluster-id", "x", "--release", "2", "--protect", "1s"],
            "repo": ["--repo", url, "--cluster-id", "x", "--release", "2"],
            "config+protect-key": ["--config", cfg],
            "config+flag": ["--config", cfg, "--protect", "0"],
            "json": ["--repo", url, "--cluster-id", "x", "--release", "2", "--protect", "1h", "--json"],
            "config-state-dir-in-repo": ["--config", tmp_path / "d.toml"]}[how]
    (tmp_path / "d.toml").write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                                     f'repository = "{url}"\n[snapshots]\nprotect = "2h"\n')
    before = _tree(url)
    r = run_drsync("init", *args)
    assert r.code == 2, (r.code, r.err)
    _one_error_line(r.err)
    assert "already" in r.err and r.out == "", (r.out, r.err)
    assert _tree(url) == before
    assert not (tmp_path / "elsewhere").exists()


def test_s44_init_racing_another_init_refuses_as_already_there(tmp_path: Path) -> None:
    """Two `drsync init` of one repository at the same moment (two operators, or a retried deploy step):
    the one that finds the repository made by the other is refused as any init over a repository is (exit 2,
    'already a drsync repository'), and the winner's protect.json is the one kept. Each process runs the
    real CLI; a gate file lets both start their init together once imported."""
    script = ("import os, sys, time\n"
              "gate, ready = sys.argv[1], sys.argv[2]\n"
              "from drsync.cli.entry import main\n"
              "open(ready, 'w').close()\n"
              "while not os.path.exists(gate):\n"
              "    time.sleep(0.001)\n"
              "sys.exit(main(sys.argv[3:]))\n")
    for trial in range(6):
        d = tmp_path / f"trial{trial}"
        d.mkdir()
        url = d / "repo"
        procs = []
        for i, window in enumerate(["1h", "2h"]):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", script, str(d / "gate"), str(d / f"ready{i}"), "init", "--repo", str(url),
                 "--cluster-id", "c", "--release", "1", "--protect", window],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        wait_for(lambda d=d: all((d / f"ready{i}").exists() for i in range(2)), "both inits imported", 60)  # type: ignore[misc]
        (d / "gate").touch()
        results = [_finish(p) for p in procs]
        codes = sorted(c for c, _, _ in results)
        assert codes == [0, 2], [(c, e) for c, _, e in results]
        winner = next(i for i, (c, _, _) in enumerate(results) if c == 0)
        loser_err = next(e for c, _, e in results if c != 0)
        assert "already a drsync repository" in loser_err, loser_err
        assert json.loads((url / REPO_DOC).read_text())["window_s"] == (winner + 1) * HOUR


BAD_PROTECT = ["abc", "-1h", "", "1e3h", "5 parsecs", "inf", "nan", "1h30m", "1" + "0" * 320, "9" * 309 + "w"]


@pytest.mark.parametrize("value", BAD_PROTECT, ids=["word", "negative", "empty", "exponent", "unit", "inf", "nan",
                                                    "two-units", "320-digit", "309-digit-weeks"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_s44_init_with_a_bad_protect_exits_2_and_creates_nothing(tmp_path: Path, value: str, as_json: bool) -> None:
    """A window no clock can count (digits beyond any float: infinity seconds) is as bad as a word."""
    url = tmp_path / "repo"
    r = run_drsync("init", "--repo", url, "--cluster-id", "c", "--release", "1", "--protect", value,
                   *(["--json"] if as_json else []))
    assert r.code == 2, (r.code, r.out, r.err)
    _one_error_line(r.err)
    assert "--protect" in r.err, r.err
    assert not (url / "config.json").exists() and not (url / REPO_DOC).exists()


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-0.0"], ids=["inf", "nan", "1e400", "minus-zero"])
def test_s44_init_with_a_config_whose_protect_is_not_a_duration(tmp_path: Path, value: str) -> None:
    """TOML lets `protect = inf`, `nan` or `1e400` (a float that is infinity) be written unquoted; DESIGN: a
    wrong value is an error (exit 2) naming the key. -0.0 is a harmless zero (off)."""
    url = tmp_path / "repo"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\nrepository = "{url}"\n'
                   f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[snapshots]\nprotect = {value}\n')
    r = run_drsync("init", "--config", cfg, "--json")
    if value == "-0.0":
        assert r.code == 0, r.err
        assert _strict_json(r.out) and not (url / REPO_DOC).exists()
        return
    assert r.code == 2, (r.code, r.out, r.err)
    _one_error_line(r.err)
    assert "snapshots.protect" in r.err, r.err
    assert not (url / "config.json").exists()


def test_s44_init_records_the_window_given(tmp_path: Path) -> None:
    url = tmp_path / "repo"
    r = run_drsync("init", "--repo", url, "--cluster-id", "c", "--release", "1", "--protect", "90m", "--json")
    assert r.code == 0, r.err
    doc = _strict_json(r.out)
    assert isinstance(doc, dict) and doc["protect_s"] == 5400
    rec = json.loads((url / REPO_DOC).read_text())
    assert rec["window_s"] == 5400 and rec["set_by"] == "drsync init" and os.path.isabs(rec["state_dir"]), rec
    # A snapshot stored now is protected with --repo alone (the window is the repository's).
    snap = _unique_snapshot(engine.open_repository(str(url)), tmp_path / "data", "x", kind="manual")
    d = run_drsync("snapshot", "delete", snap.id, "--repo", url)
    assert d.code == 4, (d.code, d.err)


def test_s44_init_with_a_config_and_protect_zero_records_nothing(tmp_path: Path) -> None:
    """--protect 0 overrides the config's window: no protect.json (the agent records its own at start)."""
    url = tmp_path / "repo"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\nrepository = "{url}"\n'
                   f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[snapshots]\nprotect = "3h"\n')
    r = run_drsync("init", "--config", cfg, "--protect", "0", "--json")
    assert r.code == 0, r.err
    assert r.json()["protect_s"] == 0 and not (url / REPO_DOC).exists()
    r2 = run_drsync("init", "--config", cfg, "--json")
    assert r2.code == 2
    assert not (url / REPO_DOC).exists()


def test_s44_engine_init_repository_refuses_an_existing_repository_and_keeps_it(tmp_path: Path) -> None:
    url = _existing(tmp_path)
    before = _tree(url)
    with pytest.raises(DrsyncError) as e:
        engine.init_repository(str(url), cluster_id="x", release="2", protect_s=1.0, state_dir=str(tmp_path / "s"))
    assert e.value.exit_code == 2 and "already" in str(e.value)
    assert _tree(url) == before


def test_s44_engine_init_repository_records_the_window(tmp_path: Path) -> None:
    url = tmp_path / "repo"
    engine.init_repository(str(url), cluster_id="c", release="1", protect_s=120.0, state_dir="rel/state")
    rec = json.loads((url / REPO_DOC).read_text())
    assert rec["window_s"] == 120 and rec["state_dir"] == os.path.abspath("rel/state"), rec
    engine.init_repository(str(tmp_path / "plain"), cluster_id="c", release="1")
    assert not (tmp_path / "plain" / REPO_DOC).exists()


def test_s44_engine_init_repository_with_an_infinite_window(tmp_path: Path) -> None:
    """protect_s=inf (what an unquoted `protect = inf` in a config gives): either refused with nothing
    created, or a protect.json that drsync itself reads back; never a repository whose protect.json every
    deletion then calls damaged."""
    url = tmp_path / "repo"
    try:
        engine.init_repository(str(url), cluster_id="c", release="1", protect_s=float("inf"))
    except DrsyncError:
        assert not (url / "config.json").exists()
        return
    from drsync.protection import read_window

    read_window(open_storage(str(url)))  # IntegrityError: "protect.json is damaged"


def test_s44_init_over_a_repository_that_lost_its_config_json(tmp_path: Path) -> None:
    """A repository with snapshots, packs and a 7-day protect.json whose config.json is gone (a partial
    copy; `drsync snapshot list` then says 'create one with drsync init'). A repository is there: init must
    refuse rather than write a new identity over it and replace its protect window with a 1-second one."""
    url = _existing(tmp_path)
    (url / "config.json").unlink()
    before = _tree(url)
    r = run_drsync("init", "--repo", url, "--cluster-id", "c", "--release", "1", "--protect", "1s")
    assert json.loads((url / REPO_DOC).read_text())["window_s"] == 7 * 86400, "protect.json replaced"
    assert r.code == 2, (r.code, r.out, r.err)
    assert _tree(url) == before


# --- 4. tests.reliability.combinations and the fixtures ---------------------------------------------------


def _combinations(level: str, axes: str) -> object:
    code = ("import json, sys\nfrom tests.reliability import combinations\n"
            f"try:\n    print(json.dumps(combinations(*{axes})))\n"
            "except Exception as e:\n    print(json.dumps({'raised': type(e).__name__}))\n")
    env = {k: v for k, v in os.environ.items() if k != "DRSYNC_RELIABILITY"}
    if level:
        env["DRSYNC_RELIABILITY"] = level
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


AXES = ["([8, 7, 50, 49, 1], ['FF', 'MF', 'FM', 'MM'])", "(range(4), (1, 2, 5))", "([1], ['a'], [None, True])",
        "(['a', 'b'], [1, 2, 3, 4, 5, 6, 7], [[0], [1], [2]])", "([0, 0, 1], [2])"]


@pytest.mark.parametrize("axes", AXES)
def test_s44_combinations_full_is_the_product_and_short_covers_every_value(axes: str) -> None:
    import itertools

    want = [list(t) for t in itertools.product(*eval(axes))]
    assert _combinations("full", axes) == want
    short = _combinations("", axes)
    assert isinstance(short, list) and short and all(len(t) == len(eval(axes)) for t in short)
    for i, axis in enumerate(eval(axes)):
        assert {json.dumps(v) for v in axis} <= {json.dumps(t[i]) for t in short}, (i, axis, short)
    assert all(t in want for t in short)


@pytest.mark.parametrize("axes", ["([1, 2], [])", "()", "([],)"], ids=["an-empty-axis", "no-axes", "only-empty"])
def test_s44_combinations_of_degenerate_grids_return_as_at_the_full_level(axes: str) -> None:
    """A grid with an empty axis has no combination (product: []); a grid of no axes has one, ()
    (product: [()]). The short level must return a list too (every value of every axis appears in it,
    vacuously), not raise while pytest collects the module."""
    import itertools

    want = [list(t) for t in itertools.product(*eval(axes))]
    assert _combinations("full", axes) == want
    assert _combinations("", axes) == want


def _index_lines(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    text = (tmp_path_factory.getbasetemp() / "index.txt").read_text(encoding="utf-8")
    return [ln.split("\t") for ln in text.splitlines()]


def test_s44_tmp_path_of_the_zebracorn_test(tmp_path: Path, tmpdir, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    for word in ("zebracorn", "s44", "tmp_path_of", request.node.name):
        assert word not in str(tmp_path) and word not in str(tmpdir), (word, tmp_path, tmpdir)
    assert [str(tmp_path), request.node.nodeid] in _index_lines(tmp_path_factory)


def test_s44_group_of_the_quokkafish_test(group: str, request: pytest.FixtureRequest,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    for word in ("quokkafish", "s44", "group_of", request.node.name):
        assert word not in group, (word, group)
    assert [f"group {group}", request.node.nodeid] in _index_lines(tmp_path_factory)


class TestS44Platypus:
    @pytest.mark.parametrize("v", ["narwhal"])
    def test_in_a_class_with_a_parameter(self, v: str, tmp_path: Path, group: str, request: pytest.FixtureRequest,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
        for word in ("Platypus", "platypus", "narwhal", "in_a_class"):
            assert word not in str(tmp_path) and word not in group, (word, tmp_path, group)
        rows = _index_lines(tmp_path_factory)
        assert [str(tmp_path), request.node.nodeid] in rows and [f"group {group}", request.node.nodeid] in rows


def test_s44_tmp_paths_of_two_tests_differ_and_map_back(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                         request: pytest.FixtureRequest) -> None:
    rows = _index_lines(tmp_path_factory)
    mine = [r for r in rows if r[0] == str(tmp_path)]
    assert mine == [[str(tmp_path), request.node.nodeid]], mine  # one test per directory
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())
