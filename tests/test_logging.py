"""The agent's log as an operator reads it: levels, time zones, JSON lines, start and stop lines,
and a wrong ZooKeeper address that does not flood it."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tests.conftest import run_drsync
from tests.group import wait_for
from tests.zk import free_port


def _data_and_repo(tmp: Path) -> None:
    (tmp / "data").mkdir()
    (tmp / "data" / "f").write_text("x")
    assert run_drsync("init", "--repo", tmp / "repo", "--cluster-id", "c", "--release", "1").code == 0


def _config(tmp: Path, zookeeper: str) -> tuple[Path, str, str]:
    _data_and_repo(tmp)
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = tmp / "east.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp / "data"}"\nrepository = "{tmp / "repo"}"\n'
                   f'[agent]\nname = "east"\nrole = "auto"\nlisten = "{listen}"\nmetrics = "{metrics}"\n'
                   f'[coordination]\nzookeeper = "{zookeeper}"\ngroup = "logs"\n')
    return cfg, listen, metrics


def _steps(records: list[dict], what: str) -> list[float]:
    """The delays ("next try in Ns") of drsync's own lines about ``what``, in order."""
    return [float(m.group(1)) for r in records if what in r["message"]
            for m in [re.search(r"next try in (\d+)s", r["message"])] if m]


def _json_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """An agent writing JSON log lines (stdout and stderr) to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg), "--log-format",
                                 "json"], stderr=out, stdout=out)


def _json_records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_a_wrong_zookeeper_address_logs_a_line_per_backoff_step_as_json(tmp_path: Path) -> None:
    cfg, listen, metrics = _config(tmp_path, f"127.0.0.1:{free_port()}")
    log = tmp_path / "agent.log"
    proc = _json_agent(cfg, log)
    try:
        wait_for(lambda: len(_steps(_json_records(log), "cannot reach ZooKeeper")) >= 3,
                 "three steps of the agent's backoff", timeout=120)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = _json_records(log)  # every line is one JSON object
    for r in records:
        assert {"time", "level", "logger", "group", "agent", "message"} <= set(r), r
        assert r["group"] == "logs" and r["agent"] == "east"
        assert datetime.fromisoformat(r["time"]).tzinfo is not None, r["time"]  # ISO 8601 with a zone
    # kazoo's own attempts ("Connection dropped", "Failed connecting ... retry policy") are debug detail:
    # drsync's one line per step of its backoff says what is wrong, with growing delays.
    assert not [r for r in records if r["logger"].endswith(".kazoo") and r["level"] != "INFO"], records
    assert not any("Connecting to" in r["message"] or "retry policy" in r["message"] for r in records)
    steps = _steps(records, "cannot reach ZooKeeper")
    assert steps[:3] == [1.0, 2.0, 4.0], steps
    assert all(r["level"] == "WARNING" for r in records if "cannot reach ZooKeeper" in r["message"])
    started = records[0]["message"]
    assert "started" in started and listen in started and f"http://{metrics}/" in started
    assert "stopped" in records[-1]["message"]
    assert proc.returncode == 0
    # Issue 20 audit: one WARNING per backoff step (the first step also logged the role that follows from it,
    # "standby (no ZooKeeper session) [cannot reach ...]", as a second WARNING); that role line is INFO, once.
    warnings = [r["message"] for r in records if r["level"] == "WARNING"]
    assert warnings and all("cannot reach ZooKeeper" in w and "next try in" in w for w in warnings), warnings
    assert len(warnings) == len(steps), warnings
    role = [r for r in records if "standby (no ZooKeeper session)" in r["message"]]
    assert len(role) == 1 and role[0]["level"] == "INFO", role


def test_a_missing_chroot_backs_off_instead_of_spinning(tmp_path: Path, zk_server) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: a chroot that does not exist made the agent reconnect thousands of times in 10 s, one
    WARNING each. Every failed coordination pass now waits for a growing, capped delay, one line per step."""
    cfg, _, _ = _config(tmp_path, f"{zk_server.hosts}/nochroot/sub")
    log = tmp_path / "agent.log"
    proc = _json_agent(cfg, log)
    try:
        wait_for(lambda: sum("does not exist" in r["message"] for r in _json_records(log)) >= 3,
                 "three failed passes", timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = _json_records(log)
    failed = [r for r in records if "does not exist" in r["message"]]
    assert _steps(records, "does not exist")[:3] == [1.0, 2.0, 4.0], [r["message"] for r in failed]
    # Each pass is one connection and one line: nothing in between.
    connects = [r for r in records if "connection established" in r["message"]]
    assert len(connects) <= len(failed) + 1 and len(records) < 4 * len(failed) + 4, [r["message"] for r in records]
    # How to create it, each level in turn (zkCli.sh create makes one level, not its parents).
    assert "zkCli.sh create /nochroot; zkCli.sh create /nochroot/sub" in failed[0]["message"]
    gaps = [(datetime.fromisoformat(b["time"]) - datetime.fromisoformat(a["time"])).total_seconds()
            for a, b in itertools.pairwise(failed)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps


def test_text_logs_carry_an_iso_time_with_zone_and_a_stop_line(tmp_path: Path) -> None:
    cfg, listen, _ = _config(tmp_path, f"127.0.0.1:{free_port()}")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stderr=out, stdout=out)
    try:
        wait_for(lambda: "cannot reach ZooKeeper" in log.read_text(), "the agent to say ZooKeeper is out of reach")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) "
                       r"group=logs agent=east ")
    assert all(stamp.match(line) for line in lines), lines
    assert listen in lines[0] and "stopped" in lines[-1]


def test_json_records_about_a_snapshot_carry_its_id_as_a_key(tmp_path: Path) -> None:
    _data_and_repo(tmp_path)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[agent]\nname = "east"\nrole = "primary"\n'
                   f'[replication]\nstandbys = ["127.0.0.1:{free_port()}"]\n')  # nobody there: a warning
    r = run_drsync("agent", "--config", cfg, "--once", "--log-format", "json", "--log-level", "info")
    assert r.code == 1, r.err
    records = [json.loads(line) for line in r.err.splitlines() if line.strip()]  # every line, the error too
    assert records[-1]["level"] == "ERROR" and "did not reach every standby" in records[-1]["message"]
    about = [x for x in records if re.search(r"\bsnapshot [0-9a-f]{16}\b", x["message"])]
    assert about, records
    for x in about:
        assert x["snapshot"] == re.search(r"\bsnapshots? ([0-9a-f]{16})\b", x["message"]).group(1)  # type: ignore[union-attr]
        assert x["group"] and x["agent"] == "east" and x["time"]
    assert all("snapshot" not in x for x in records if not re.search(r"[0-9a-f]{16}", x["message"]))


def test_a_shipment_to_a_stopped_standby_is_a_warning_with_the_reason_first(tmp_path: Path) -> None:
    """Issue 20: a running primary whose standby is stopped logs each failed shipment at WARNING, the reason
    first ("failed: ... standby ... : <why>"), then which snapshot to which standby and when it tries again."""
    from tests.test_agents import Pair

    pair = Pair(tmp_path)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first sync")
        pair.kill("standby", signal.SIGTERM)
        (pair.prod / "catalog" / "after-stop.txt").write_text("written while the standby is stopped\n")
        pattern = re.compile(r" WARNING .*drsync[.\w]*: failed: (.+) \(snapshot ([0-9a-f]{16}) to (\S+); next try "
                             r"in \d+s\)$")

        def failed() -> list[re.Match[str]]:
            return [m for ln in (tmp_path / "primary.log").read_text().splitlines() for m in [pattern.search(ln)]
                    if m]
        wait_for(lambda: failed(), "a failed shipment in the primary's log")
        why, _, target = failed()[0].groups()
        assert target == pair.standby_addr and pair.standby_addr in why, why
        assert re.search(r"unavailable|refused|cannot reach|not reach", why, re.IGNORECASE), why
        log = (tmp_path / "primary.log").read_text()
        assert not re.search(r" INFO .*: failed", log), log  # never at INFO
    finally:
        pair.stop_all()


def test_an_idle_primary_logs_its_routine_cycles_at_debug(tmp_path: Path) -> None:
    """Unchanged captures (every cycle of an idle root; every poll in continuous mode on HDFS) add no INFO
    lines: capture, shipment, expiry and the standby's no-op stay at DEBUG; a change is at INFO again."""
    from tests.group import scrape, wait_for
    from tests.test_agents import Pair

    pair = Pair(tmp_path)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first sync")

        def shipments() -> float:
            return scrape(pair.metrics["primary"], "default", "primary").get("drsync_ship_duration_seconds_count", 0)
        first = shipments()
        wait_for(lambda: shipments() >= first + 5, "five more (unchanged) cycles")
        log = (tmp_path / "primary.log").read_text()
        captured = [ln for ln in log.splitlines() if re.search(r"INFO .*snapshot [0-9a-f]{16} captured", ln)]
        sent = [ln for ln in log.splitlines() if re.search(r"INFO .*snapshot [0-9a-f]{16} to .*: applied", ln)]
        assert len(captured) <= 2 and len(sent) <= 2, (captured, sent)  # the first sync (and at most one more)
        (pair.prod / "catalog" / "new.txt").write_text("a change\n")
        wait_for(lambda: (pair.standby_data / "catalog" / "new.txt").exists(), "the change to replicate")
        wait_for(lambda: re.search(r"INFO .*to .*: applied \([1-9]", (tmp_path / "primary.log").read_text()),
                 "the change's shipment at INFO")
    finally:
        pair.stop_all()
