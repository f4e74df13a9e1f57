"""``[snapshots] protect``: history the primary cannot erase (issue 18, part 3).

Every path that deletes snapshots (retention in the agent, ``snapshot expire``, ``snapshot delete``,
TTLs, garbage collection) keeps a snapshot this repository stored less than ``protect`` ago, unless an
operator breaks the glass; and what a primary sends (an old capture time, a TTL, many tiny snapshots)
cannot shorten that. Real repositories, real commands, real agents; "long ago" is made by setting a
snapshot document's modification time back on the storage (the clock protection counts on).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from drsync import engine
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.config import KeepPolicy, config_from_dict
from drsync.errors import ConfigError, IntegrityError
from drsync.protection import (
    LEDGER_NAME,
    REPO_DOC,
    Protection,
    RecordedWindow,
    as_stored_by_standby,
    human_duration,
    read_break_glass,
    read_window,
    record_window,
    split_protected,
)
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage.local import LocalStorage
from drsync.transport import Caller, ReceivedChunk
from tests.conftest import init_repo, init_repo_at, make_tree, run_drsync, tree_state
from tests.group import Group, scrape, wait_for
from tests.zk import free_port

HOUR = 3600.0
DAY = 86400.0


# --- helpers -------------------------------------------------------------------------------------------


def info(sid: str, captured_at: float, *, kind: str = "cycle", seq: int = 0,
         ttl_s: float | None = None) -> SnapshotInfo:
    return SnapshotInfo(id=sid, captured_at=captured_at, cluster_id="c", release="1", manifest_hash="0" * 64,
                        kind=kind, seq=seq, ttl_s=ttl_s)


def write_config(tmp: Path, *, protect: str = "1h", keep: str = "{ last = 1 }", extra: str = "") -> Path:
    data, repo = tmp / "data", tmp / "repo"
    data.mkdir(exist_ok=True)
    p = tmp / "cluster.toml"
    p.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{repo}"\n'
                 f'[agent]\nstate_dir = "{tmp / "state"}"\n{extra}'
                 f'[snapshots]\nkeep = {keep}\nprotect = "{protect}"\n')
    if not (repo / "config.json").exists():
        init_repo(p)
    return p


def cycle_snapshot(tmp: Path, content: str) -> SnapshotInfo:
    """A replication-cycle snapshot of ``tmp/data`` (what retention's keep policy applies to)."""
    (tmp / "data" / "file.txt").write_text(content)
    repo = engine.open_repository(str(tmp / "repo"))
    return engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp / "data"), kind="cycle"))


def stored_ago(repo_dir: Path, sid: str, seconds: float) -> None:
    """Make the repository's storage say it stored snapshot ``sid`` ``seconds`` ago."""
    t = time.time() - seconds
    os.utime(repo_dir / "snapshots" / f"{sid}.json", (t, t))


def listed_repo(repo: Path) -> list[str]:
    r = run_drsync("snapshot", "list", "--repo", repo, "--json")
    assert r.code == 0, r.err
    return [s["id"] for s in r.json()]


def listed(cfg: Path) -> dict[str, dict[str, Any]]:
    r = run_drsync("snapshot", "list", "--config", cfg, "--json")
    assert r.code == 0, r.err
    return {s["id"]: s for s in r.json()}


def assert_refused_for_protection(r: Any, sid: str) -> None:
    assert r.code == 4, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert sid in lines[0] and "protected for another" in lines[0] and "--break-glass" in lines[0], lines[0]


# --- the pure rules --------------------------------------------------------------------------------------


def test_protection_counts_from_when_this_repository_stored_the_snapshot() -> None:
    now = 1_800_000_000.0
    p = Protection(HOUR, {"old": now - 2 * HOUR, "young": now - 10, "liar": now - 60, "future": now - 2 * HOUR})
    snaps = {"old": info("old", now - 2 * HOUR), "young": info("young", now - 20),
             # A primary wrote a capture time a month back: stored a minute ago, it is protected all the same.
             "liar": info("liar", now - 30 * DAY),
             # A capture time in the future does not lengthen protection past the stored time's window.
             "future": info("future", now + 365 * DAY)}
    assert {k: p.is_protected(s, now) for k, s in snaps.items()} == \
        {"old": False, "young": True, "liar": True, "future": False}
    assert p.until(snaps["liar"], now) == now - 60 + HOUR
    # Stored after the listing that gave the times: protected as if stored now.
    assert Protection(HOUR, {}).is_protected(info("new", now - 5 * DAY), now)
    # protect = 0 is off.
    assert not Protection(0.0, {"young": now}).is_protected(snaps["young"], now)


def test_expiry_plan_keeps_what_protect_covers_and_expires_the_rest() -> None:
    now = 1_800_000_000.0
    snaps = [info(f"s{i}", now - (10 - i) * HOUR, seq=i + 1) for i in range(10)]
    snaps.append(info("ttl", now - 3 * HOUR, kind="manual", seq=11, ttl_s=60))
    due = engine.plan_expiry(snaps, KeepPolicy(last=2), now)
    assert [s.id for s in due] == [f"s{i}" for i in range(8)] + ["ttl"]
    # s6, s7 and the TTL'd one were stored within the last 4.5 hours: protect = 4.5h keeps them.
    stored = {s.id: s.captured_at for s in snaps}
    deletable, protected = split_protected(due, Protection(4.5 * HOUR, stored), now)
    assert [s.id for s in deletable] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert [s.id for s in protected] == ["s6", "s7", "ttl"]
    assert split_protected(due, None, now) == (due, [])


def test_a_shipped_ttl_is_not_stored_by_the_standby() -> None:
    shipped = info("a1b2c3d4e5f60718", 0.0, ttl_s=1.0)
    assert as_stored_by_standby(shipped).ttl_s is None
    assert as_stored_by_standby(shipped).expires_at is None


def test_protect_is_a_duration_and_off_by_default() -> None:
    base = {"cluster": {"id": "c", "release": "1", "data": "/d", "repository": "/r"}}
    assert config_from_dict(base).snapshots.protect == 0.0
    assert config_from_dict({**base, "snapshots": {"protect": "7d"}}).snapshots.protect == 7 * DAY
    for bad in ("soon", -1, True, "7 days"):
        with pytest.raises(ConfigError, match=r"^snapshots\.protect: "):
            config_from_dict({**base, "snapshots": {"protect": bad}})
    assert [human_duration(s) for s in (0, 59, 3600, 3599, 90061)] == ["0s", "59s", "1h", "59m 59s", "1d 1h"]


def test_an_invalid_protect_is_a_one_line_usage_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('protect = "1h"', 'protect = "a week"'))
    r = run_drsync("snapshot", "list", "--config", cfg)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "snapshots.protect" in r.err, r.err


# --- the commands that delete ----------------------------------------------------------------------------


def test_snapshot_delete_refuses_a_protected_snapshot_and_deletes_an_older_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    old, young = cycle_snapshot(tmp_path, "one"), cycle_snapshot(tmp_path, "two")
    stored_ago(tmp_path / "repo", old.id, 2 * HOUR)
    r = run_drsync("snapshot", "delete", young.id, "--config", cfg)
    assert_refused_for_protection(r, young.id)
    assert "59m" in r.err  # how long it stays protected
    # Several at once: one protected among them and nothing is deleted.
    assert_refused_for_protection(run_drsync("snapshot", "delete", old.id, young.id, "--config", cfg), young.id)
    assert set(listed(cfg)) == {old.id, young.id}
    assert listed(cfg)[young.id]["protection_ends_at"] and listed(cfg)[old.id]["protection_ends_at"] is None
    r = run_drsync("snapshot", "delete", old.id, "--config", cfg)
    assert r.code == 0, r.err
    assert set(listed(cfg)) == {young.id}
    assert not (tmp_path / "state" / LEDGER_NAME).exists()  # nothing broke the glass


def test_expiry_keeps_protected_snapshots_and_expires_older_ones(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, keep="{ last = 1 }")
    snaps = [cycle_snapshot(tmp_path, f"version {i}") for i in range(5)]
    for s in snaps[:2]:
        stored_ago(tmp_path / "repo", s.id, 3 * HOUR)
    dry = run_drsync("snapshot", "expire", "--config", cfg, "--dry-run", "--json").json()
    assert dry["deleted"] == [s.id for s in snaps[:2]] and dry["protected"] == [s.id for s in snaps[2:4]]
    res = run_drsync("snapshot", "expire", "--config", cfg, "--json")
    assert res.code == 0, res.err
    assert res.json()["deleted"] == [s.id for s in snaps[:2]]
    assert res.json()["protected"] == [s.id for s in snaps[2:4]]
    assert set(listed(cfg)) == {s.id for s in snaps[2:]}
    # Once their window has passed, the same command expires them.
    for s in snaps[2:4]:
        stored_ago(tmp_path / "repo", s.id, 2 * HOUR)
    assert run_drsync("snapshot", "expire", "--config", cfg).code == 0
    assert set(listed(cfg)) == {snaps[4].id}


def test_a_ttl_does_not_delete_inside_the_protect_window(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / "data" / "f").write_text("x")
    r = run_drsync("snapshot", "create", "--config", cfg, "--ttl", "1s", "--json")
    sid = r.json()["id"]
    repo = engine.open_repository(str(tmp_path / "repo"))
    later = time.time() + 60  # its TTL ran out a minute ago
    res = engine.expire_snapshots(repo, KeepPolicy(last=1), now=later, protect_window_s=HOUR)
    assert res.deleted == [] and [s.id for s in res.protected] == [sid]
    assert sid in listed(cfg)
    # Without a window given, the one the repository records (drsync init wrote the config's) applies.
    assert engine.expire_snapshots(repo, KeepPolicy(last=1), now=later).deleted == []
    (tmp_path / "repo" / REPO_DOC).unlink()
    assert [s.id for s in engine.expire_snapshots(repo, KeepPolicy(last=1), now=later).deleted] == [sid]


def test_break_glass_deletes_logs_and_counts_in_the_agents_metric(tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, extra=f'name = "standby"\nrole = "standby"\nlisten = "127.0.0.1:{free_port()}"\n'
                                       f'metrics = "{metrics}"\n')
    a, b, c = (cycle_snapshot(tmp_path, f"v{i}") for i in range(3))
    r = run_drsync("snapshot", "delete", a.id, "--config", cfg, "--break-glass")
    assert r.code == 0, r.err
    warning = [line for line in r.err.splitlines() if "WARNING" in line and "BREAK GLASS" in line]
    assert len(warning) == 1 and a.id in warning[0] and "snapshot delete" in warning[0], r.err
    entries = read_break_glass(str(tmp_path / "state"))
    assert [(e["snapshot"], e["how"]) for e in entries] == [(a.id, "drsync snapshot delete --break-glass")]
    assert entries[0]["user"] and entries[0]["host"] and entries[0]["protected_until_unix"] > time.time()
    # One time format (issue 20): ISO 8601 with zone in the ledger and in --json, the Unix time beside it.
    for key in ("at", "captured_at", "stored_at", "protected_until"):
        assert entries[0][key].endswith("Z") and isinstance(entries[0][f"{key}_unix"], float), entries[0]
    # The agent counts what one-shot commands did before it started, and after.
    with open(tmp_path / "agent.log", "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=log,
                                 stderr=log)
    try:
        def deletions() -> float | None:
            try:
                return scrape(metrics, "default", "standby").get("drsync_protected_snapshot_deletions_total")
            except OSError:
                return None

        wait_for(lambda: deletions() == 1.0, "the agent to export one break-glass deletion")
        stored_ago(tmp_path / "repo", b.id, 2 * HOUR)  # b is older than protect: no glass broken for it
        r = run_drsync("snapshot", "expire", "--config", cfg, "--break-glass", "--json")
        assert r.code == 0, r.err
        assert r.json()["deleted"] == [b.id] and r.json()["break_glass"] == []
        r = run_drsync("snapshot", "delete", c.id, "--config", cfg, "--break-glass")
        assert r.code == 0, r.err
        wait_for(lambda: deletions() == 2.0, "the agent to count the second break-glass deletion")
        # With --repo alone (no config) it is recorded where the repository says its agent keeps state.
        d = cycle_snapshot(tmp_path, "v3")
        r = run_drsync("snapshot", "delete", d.id, "--repo", tmp_path / "repo", "--break-glass")
        assert r.code == 0 and "BREAK GLASS" in r.err, r.err
        wait_for(lambda: deletions() == 3.0, "the agent to count the break-glass deletion made with --repo")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)


# --- the window the repository carries: --repo alone keeps it too ----------------------------------------


def test_delete_and_expire_with_repo_alone_keep_the_window_the_repository_records(tmp_path: Path) -> None:
    """``drsync init --config`` recorded protect = 1h in the repository (protect.json): ``snapshot delete``
    and ``snapshot expire`` run with ``--repo`` and no config refuse and keep what it protects."""
    write_config(tmp_path)
    repo = tmp_path / "repo"
    doc = json.loads((repo / REPO_DOC).read_text())
    assert doc["window_s"] == HOUR and doc["state_dir"] == str(tmp_path / "state")
    snaps = [cycle_snapshot(tmp_path, f"v{i}") for i in range(5)]
    old, young = snaps[0], snaps[1]
    stored_ago(repo, old.id, 2 * HOUR)
    assert_refused_for_protection(run_drsync("snapshot", "delete", young.id, "--repo", repo), young.id)
    assert_refused_for_protection(run_drsync("snapshot", "delete", old.id, young.id, "--repo", repo), young.id)
    r = run_drsync("snapshot", "list", "--repo", repo, "--json")
    assert {s["id"] for s in r.json() if s["protection_ends_at"]} == {s.id for s in snaps[1:]}
    # No config: the default keep (last = 3) finds the two oldest due; the window keeps the younger one.
    r = run_drsync("snapshot", "expire", "--repo", repo, "--json")
    assert r.code == 0 and r.json()["deleted"] == [old.id] and r.json()["protected"] == [young.id], r.out + r.err
    assert set(listed_repo(repo)) == {s.id for s in snaps[1:]}
    assert not (tmp_path / "state" / LEDGER_NAME).exists()
    # A repository carrying a window is still one any drsync reads: verify and GC know no new file.
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    assert run_drsync("repo", "gc", "--repo", repo).code == 0
    assert set(listed_repo(repo)) == {s.id for s in snaps[1:]}


def test_break_glass_with_repo_alone_is_recorded_in_the_agents_state_directory(tmp_path: Path) -> None:
    write_config(tmp_path)
    repo = tmp_path / "repo"
    a, b = cycle_snapshot(tmp_path, "a"), cycle_snapshot(tmp_path, "b")
    r = run_drsync("snapshot", "delete", a.id, "--repo", repo, "--break-glass")
    assert r.code == 0, r.err
    warning = [line for line in r.err.splitlines() if "WARNING" in line and "BREAK GLASS" in line]
    assert len(warning) == 1 and a.id in warning[0], r.err
    entries = read_break_glass(str(tmp_path / "state"))  # where the agent counts them (its metric)
    assert [(e["snapshot"], e["how"]) for e in entries] == [(a.id, "drsync snapshot delete --break-glass")]
    assert "--repo" in entries[0]["command"]
    r = run_drsync("snapshot", "expire", "--repo", repo, "--break-glass", "--json")
    assert r.code == 0 and r.json()["break_glass"] == [], r.err  # no config: nothing is due under keep
    assert set(listed_repo(repo)) == {b.id}
    # The state directory the repository names is on another machine: refused, one line, nothing deleted.
    doc = json.loads((repo / REPO_DOC).read_text())
    (repo / REPO_DOC).write_text(json.dumps({**doc, "state_dir": str(tmp_path / "elsewhere"), "host": "east-9"}))
    r = run_drsync("snapshot", "delete", b.id, "--repo", repo, "--break-glass")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "elsewhere on east-9" in r.err, r.err
    assert set(listed_repo(repo)) == {b.id}


def test_a_damaged_or_newer_protection_document_stops_deletions(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    repo = tmp_path / "repo"
    s = cycle_snapshot(tmp_path, "a")
    stored_ago(repo, s.id, 2 * HOUR)  # not protected by its age
    doc = (repo / REPO_DOC).read_text()
    (repo / REPO_DOC).write_text(doc[: len(doc) // 2])
    for how in (("--repo", repo), ("--config", cfg)):
        r = run_drsync("snapshot", "delete", s.id, *how)
        assert r.code == 3 and REPO_DOC in r.err and "damaged" in r.err and len(r.err.strip().splitlines()) == 1
    (repo / REPO_DOC).write_text(json.dumps({**json.loads(doc), "format": 99}))
    r = run_drsync("snapshot", "delete", s.id, "--repo", repo)
    assert r.code == 4 and "upgrade drsync" in r.err, r.err
    assert set(listed_repo(repo)) == {s.id}
    (repo / REPO_DOC).write_text(json.dumps({**json.loads(doc), "window_s": "forever"}))
    assert run_drsync("snapshot", "expire", "--repo", repo).code == 3
    assert set(listed_repo(repo)) == {s.id}


def test_the_recorded_window_is_written_when_it_changes_and_a_shorter_one_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = LocalStorage(str(tmp_path / "repo"), create=True)
    assert record_window(storage, 0.0, by="agent a", state_dir=str(tmp_path / "st")) is None
    assert read_window(storage) is None  # protect never on: nothing written
    record_window(storage, 2 * HOUR, by="agent a", state_dir=str(tmp_path / "st"))
    first = read_window(storage)
    assert first is not None and (first.window_s, first.set_by, first.state_dir) == (2 * HOUR, "agent a",
                                                                                    str(tmp_path / "st"))
    mtime = (tmp_path / "repo" / REPO_DOC).stat().st_mtime_ns
    assert record_window(storage, 2 * HOUR, by="agent a", state_dir=str(tmp_path / "st")) == first
    assert (tmp_path / "repo" / REPO_DOC).stat().st_mtime_ns == mtime  # the same: not rewritten
    with caplog.at_level("WARNING", logger="drsync.protection"):
        record_window(storage, 0.0, by="agent a", state_dir=str(tmp_path / "st"))
    assert any("protect shortened from 2h to off by agent a" in r.getMessage() for r in caplog.records)
    assert read_window(storage).window_s == 0.0  # type: ignore[union-attr]
    # A damaged document is written again, even with protect off.
    (tmp_path / "repo" / REPO_DOC).write_text("{")
    with pytest.raises(IntegrityError, match="damaged"):
        read_window(storage)
    record_window(storage, 0.0, by="agent a")
    assert read_window(storage) == RecordedWindow(0.0, read_window(storage).set_at, "agent a")  # type: ignore[union-attr]


def test_init_records_a_window_given_on_the_command_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    r = run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1", "--protect", "7d", "--json")
    assert r.code == 0 and r.json()["protect_s"] == 7 * DAY, r.err
    assert json.loads((repo / REPO_DOC).read_text())["window_s"] == 7 * DAY
    (tmp_path / "data").mkdir()
    sid = run_drsync("snapshot", "create", "--repo", repo, "--source", tmp_path / "data", "--allow-empty",
                     "--json").json()["id"]
    assert_refused_for_protection(run_drsync("snapshot", "delete", sid, "--repo", repo), sid)
    r = run_drsync("init", "--repo", tmp_path / "other", "--cluster-id", "c", "--release", "1", "--protect", "soon")
    assert r.code == 2 and "--protect" in r.err and not (tmp_path / "other").exists(), r.err
    assert not run_drsync("init", "--repo", tmp_path / "plain", "--cluster-id", "c", "--release",
                          "1").code and not (tmp_path / "plain" / REPO_DOC).exists()


def test_init_with_a_config_records_its_protect_window(tmp_path: Path) -> None:
    """``drsync init --config`` as an operator runs it (write_config's helper does the same in-process)."""
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[agent]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[snapshots]\nprotect = "3h"\n')
    r = run_drsync("init", "--config", cfg, "--json")
    assert r.code == 0 and r.json()["protect_s"] == 3 * HOUR, r.err
    assert json.loads((tmp_path / "repo" / REPO_DOC).read_text())["window_s"] == 3 * HOUR


def test_the_agent_records_its_window_in_the_repository_at_start(tmp_path: Path) -> None:
    """A repository created without a window (``init --repo``) kept by an agent whose config says protect =
    2h: at its start the agent records the window, and ``--repo`` commands keep it from then on."""
    repo = tmp_path / "repo"
    init_repo_at(repo, "c", "1")
    (tmp_path / "data").mkdir()
    s = cycle_snapshot(tmp_path, "a")
    assert run_drsync("snapshot", "delete", s.id, "--repo", repo).code == 0  # nothing protects it yet
    s = cycle_snapshot(tmp_path, "b")
    cfg = write_config(tmp_path, protect="2h", extra=f'name = "standby"\nrole = "standby"\n'
                                                      f'listen = "127.0.0.1:{free_port()}"\n')
    with open(tmp_path / "agent.log", "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=log,
                                 stderr=log)
    try:
        wait_for(lambda: (repo / REPO_DOC).exists(), "the agent to record its window")
        doc = json.loads((repo / REPO_DOC).read_text())
        assert doc["window_s"] == 2 * HOUR and doc["state_dir"] == str(tmp_path / "state")
        assert doc["set_by"] == "agent standby"
        assert_refused_for_protection(run_drsync("snapshot", "delete", s.id, "--repo", repo), s.id)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)


def test_gc_keeps_the_data_of_a_protected_snapshot(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, keep="{ last = 1 }")
    make_tree(tmp_path / "data", files=10, big=1)
    good_tree = tree_state(tmp_path / "data")
    repo = engine.open_repository(str(tmp_path / "repo"))
    good = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "data"), kind="cycle"))
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "other.txt").write_text("nothing of the good tree is left")
    engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "data"), kind="cycle", allow_empty=True))
    assert run_drsync("snapshot", "expire", "--config", cfg).code == 0  # due under last = 1; protected
    gc = run_drsync("repo", "gc", "--config", cfg, "--json")
    assert gc.code == 0, gc.err
    assert gc.json()["live_chunks"] > 0
    assert run_drsync("repo", "verify", "--config", cfg).code == 0
    r = run_drsync("snapshot", "restore", good.id, "--config", cfg, "--target", tmp_path / "restored")
    assert r.code == 0, r.err
    assert tree_state(tmp_path / "restored") == good_tree


# --- what a primary sends --------------------------------------------------------------------------------


def test_a_primary_supplied_ttl_and_old_capture_time_do_not_shorten_the_standbys_history(tmp_path: Path) -> None:
    """A primary (right epoch) ships a snapshot whose document says it was captured a month ago and
    expires after a minute: the standby stores it without the TTL and protects it from when it stored it."""
    prod = tmp_path / "prod"
    prod.mkdir()
    (prod / "table.csv").write_text("id,amount\n1,100\n" * 100)
    primary = Repository.init(LocalStorage(str(tmp_path / "prod-repo"), create=True), cluster_id="c", release="1")
    taken = engine.create_snapshot(primary, engine.SnapshotRequest(str(prod), kind="cycle"))
    manifest_bytes = primary.storage.read(f"manifests/{taken.id}.parquet")
    site = tmp_path / "standby-site"
    site.mkdir()
    cfg = write_config(site, keep="{ last = 1 }")
    rx = StandbyReceiver(engine.open_repository(str(site / "repo")), str(site / "data"),
                         StateStore(str(site / "state")), agent="standby")
    caller = Caller(sender="primary", epoch=1, sent_at=time.time(), received_at=time.time(), instance="i1")
    chunks = [primary.read_stored(cid) for cid in primary.load_manifest(taken).chunk_ids()]
    ids = list(primary.load_manifest(taken).chunk_ids())
    rx.receive(caller, iter([[ReceivedChunk(cid, loc.encoding, loc.raw_length, bytes(stored))
                              for cid, (loc, stored) in zip(ids, chunks, strict=True)]]))
    hostile = dataclasses.replace(taken, captured_at=time.time() - 30 * DAY, ttl_s=60.0, seq=0)
    stored, _ = rx.commit(caller, hostile.to_bytes(), manifest_bytes)
    rx.close()
    assert stored.ttl_s is None
    doc = listed(cfg)[taken.id]
    assert doc["ttl_s"] is None and doc["expires_at"] is None and doc["protection_ends_at"]
    # A newer snapshot makes it due under keep last = 1, by its capture time it is a month old: kept.
    newer = cycle_snapshot(site, "newer")
    res = run_drsync("snapshot", "expire", "--config", cfg, "--json").json()
    assert res["deleted"] == [] and res["protected"] == [taken.id]
    assert_refused_for_protection(run_drsync("snapshot", "delete", taken.id, "--config", cfg), taken.id)
    assert set(listed(cfg)) == {taken.id, newer.id}
    # Without protect the standby's own retention decides (keep last = 1), never the primary's TTL.
    cfg.write_text(cfg.read_text().replace('protect = "1h"', 'protect = "0s"').replace("last = 1", "last = 2"))
    assert run_drsync("snapshot", "expire", "--config", cfg, "--json").json()["deleted"] == []


# --- a hostile primary -----------------------------------------------------------------------------------

HOSTILE_CYCLES = 12


def assert_standby_can_recover_to(g: Group, standby: str, good: str, good_tree: dict[str, tuple]) -> None:
    """The standby still holds snapshot ``good``, and is promoted at it: its data root is the good tree
    and it acts as primary at a new epoch; the hostile snapshots stay in its repository."""
    assert good in listed(g.cfg[standby]), f"the standby lost the good snapshot {good}"
    r = g.promote(standby, "--to-snapshot", good, "--force")  # the old primary's session may linger
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["applied_snapshot"] == good and doc["newer_kept"], doc
    assert tree_state(g.data[standby]) == good_tree
    assert g.primary() == (standby, doc["epoch"])
    assert set(doc["newer_kept"]) <= set(listed(g.cfg[standby]))


def group_pki(d: Path, names: list[str]) -> Path:
    """A CA and a certificate for each of ``names`` and for the test itself (tests/test_tls.py), made with a
    clock set back a day, so that an agent whose clock is hours behind accepts them too."""
    from tests.test_clock_skew import faketime_env
    from tests.test_tls import make_ca, make_cert

    d.mkdir()
    env = faketime_env(-86400)
    make_ca(d, "ca", env)
    for name in [*names, "test"]:
        make_cert(d, "ca", name, env)
    return d


def test_a_hostile_primary_cannot_push_the_good_snapshot_out_of_the_standbys_history(
        make_group: Any, tmp_path: Path) -> None:
    """A primary with a valid certificate and epoch (mutual TLS, tls.allowed_peers naming it; a clock three
    hours behind, so every capture time it writes is older than protect) rewrites every file, ships many
    tiny snapshots to push the good one out of ``keep = { last = 3 }``, then empties its root. The standby
    keeps the good snapshot."""
    from drsync.errors import OperationFailed
    from drsync.transport.grpc import GrpcStandbyLink
    from tests.test_clock_skew import faketime_env

    # The mass-change guard off: by default it would hold step 1 (and retention pauses while a hold
    # stands), so protect alone is what this test shows (tests/test_mass_change.py covers that guard).
    g = make_group(["east", "west"], extra='\n[snapshots]\nkeep = { last = 3 }\nprotect = "1h"',
                   replication="max_change_fraction = 1.0")
    g.use_tls(group_pki(tmp_path / "pki", g.names))
    g.start("east", env=faketime_env(-3 * 3600))
    g.start("west")
    assert g.promote("east").code == 0
    good = g.wait_synced("east", "west", "the standby to hold production's good data")
    # Shipments go over mutual TLS: a caller without a certificate is not served.
    plain = GrpcStandbyLink(g.addr["west"])
    with pytest.raises(OperationFailed):
        plain.hello("test", 0, timeout_s=5)
    plain.close()
    good_tree = tree_state(g.data["east"])

    # 1. Every file rewritten: it replicates (it is not a deletion).
    for p in sorted((g.data["east"] / "catalog").glob("f*.txt")):
        p.write_text("ransomed\n")
    wait_for(lambda: g.in_sync("east", "west"), "the rewritten files to replicate")

    # 2. Many tiny snapshots: each cycle changes one byte.
    target = g.data["east"] / "catalog" / "f000.txt"
    for i in range(HOSTILE_CYCLES):
        target.write_text(f"tiny {i}\n")
        wait_for(lambda i=i: (g.data["west"] / "catalog" / "f000.txt").read_text() == f"tiny {i}\n",
                 f"tiny change {i} to replicate")
    assert len(listed(g.cfg["west"])) >= HOSTILE_CYCLES + 2  # good, rewritten, the flood: far over last = 3
    # The standby's retention ran and found the good snapshot and the flood (all but the newest 3) due under
    # last = 3, and protect kept them.
    wait_for(lambda: scrape(g.metrics["west"], g.group, "west").get("drsync_retention_protected_snapshots", 0)
             >= HOSTILE_CYCLES - 1, "the standby's retention to protect snapshots")

    # 3. The root emptied but for one file: the standby's deletion guard holds it.
    for p in list(g.data["east"].rglob("*")):
        if (p.is_file() or p.is_symlink()) and p != target:
            p.unlink()
    wait_for(lambda: g.hello("west").held_snapshot, "the standby's deletion guard to hold the emptied root")
    g.kill("east")

    assert_standby_can_recover_to(g, "west", good, good_tree)
