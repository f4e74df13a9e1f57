"""The agent's log as an operator reads it: levels, time zones, JSON lines, start and stop lines,
and a wrong ZooKeeper address that does not flood it."""

from __future__ import annotations

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


def _config(tmp: Path, zookeeper: str) -> tuple[Path, str, str]:
    (tmp / "data").mkdir()
    (tmp / "data" / "f").write_text("x")
    assert run_drsync("init", "--repo", tmp / "repo", "--cluster-id", "c", "--release", "1").code == 0
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = tmp / "east.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp / "data"}"\nrepository = "{tmp / "repo"}"\n'
                   f'[agent]\nname = "east"\nrole = "auto"\nlisten = "{listen}"\nmetrics = "{metrics}"\n'
                   f'[coordination]\nzookeeper = "{zookeeper}"\ngroup = "logs"\n')
    return cfg, listen, metrics


def _kazoo_retries(text: str) -> int:
    """How many connection failures the log stands for (the lines and the attempts they count)."""
    lines = [ln for ln in text.splitlines() if "Connection dropped" in ln or "Connection refused" in ln]
    return len(lines) + sum(int(n) for n in re.findall(r"and (\d+) more times", text))


def test_a_wrong_zookeeper_address_logs_a_line_per_backoff_step_as_json(tmp_path: Path) -> None:
    cfg, listen, metrics = _config(tmp_path, f"127.0.0.1:{free_port()}")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg), "--log-format",
                                 "json"], stderr=out, stdout=out)
    try:
        # Many attempts fail (kazoo retries several times a second): wait until at least 30 did.
        wait_for(lambda: _kazoo_retries(log.read_text()) >= 30, "30 failed connection attempts", timeout=120)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line is one JSON object
    for r in records:
        assert {"time", "level", "logger", "group", "agent", "message"} <= set(r), r
        assert r["group"] == "logs" and r["agent"] == "east"
        assert datetime.fromisoformat(r["time"]).tzinfo is not None, r["time"]  # ISO 8601 with a zone
    kazoo = [r for r in records if r["logger"].endswith(".kazoo")]
    attempts = _kazoo_retries(log.read_text())
    assert len(kazoo) * 3 <= attempts, (len(kazoo), attempts)  # one line per backoff step, not per attempt
    assert not any("Connecting to" in r["message"] for r in records)
    # drsync's own line says what is wrong, as a warning; start and stop lines name the addresses.
    assert any(r["level"] == "WARNING" and "cannot reach ZooKeeper" in r["message"] for r in records)
    started = records[0]["message"]
    assert "started" in started and listen in started and f"http://{metrics}/" in started
    assert "stopped" in records[-1]["message"]
    assert proc.returncode == 0


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
