"""scripts/hadoop-cluster as benchmarks and outside checks use it: start, admin, stop, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "hadoop-cluster"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_start_admin_stop(tmp_path: Path) -> None:
    d = tmp_path / "hc"
    started = _run("start", str(d), "--datanodes", "2")
    assert started.returncode == 0, started.stderr
    info = json.loads((d / "cluster.json").read_text())
    assert info == json.loads(started.stdout)
    try:
        assert info["hdfs"].startswith("hdfs://127.0.0.1:") and len(info["webhdfs"]) == 1 and info["pid"] > 0
        # WebHDFS answers, as the superuser the file names.
        r = requests.get(f"http://{info['webhdfs'][0]}/webhdfs/v1/?op=GETFILESTATUS&user.name={info['superuser']}",
                         timeout=30)
        assert r.ok and r.json()["FileStatus"]["type"] == "DIRECTORY"
        # Hadoop's own dfsadmin, its output and exit code passed through.
        report = _run("admin", str(d), "dfsadmin", "-report")
        assert report.returncode == 0 and "Live datanodes (2)" in report.stdout, report.stdout + report.stderr
        bad = _run("admin", str(d), "dfsadmin", "-no-such-action")
        assert bad.returncode != 0 and "Unknown command" in bad.stderr
        again = _run("start", str(d))
        assert again.returncode == 1 and "already runs" in again.stderr and len(again.stderr.splitlines()) == 1
    finally:
        stopped = _run("stop", str(d))
    assert stopped.returncode == 0, stopped.stderr
    gone = _run("stop", str(d))
    assert gone.returncode == 1 and gone.stderr.startswith("hadoop-cluster: no cluster runs from")
    assert _run("admin", str(d), "state").returncode == 1
    no_cluster = _run("distcp", str(d), "hdfs://drsync-ns/a", "hdfs://drsync-ns/b")
    assert no_cluster.returncode == 1 and no_cluster.stderr.startswith("hadoop-cluster: no mini cluster runs from")


def test_ha_pair_lists_the_active_namenode_first_and_fails_over(tmp_path: Path) -> None:
    d = tmp_path / "ha"
    started = _run("start", str(d), "--ha")
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads(started.stdout)
        assert info["hdfs"] == "hdfs://drsync-ns" and (Path(info["conf_dir"]) / "hdfs-site.xml").exists()
        states = {nn["id"]: nn["state"] for nn in info["namenodes"]}
        assert states == {"nn1": "active", "nn2": "standby"}
        assert info["webhdfs"][0] == info["namenodes"][0]["webhdfs"]
        moved = _run("admin", str(d), "haadmin", "-failover", "nn1", "nn2")
        assert moved.returncode == 0, moved.stderr
        state = json.loads(_run("admin", str(d), "state").stdout)
        assert {nn["id"]: nn["state"] for nn in state["namenodes"]} == {"nn1": "standby", "nn2": "active"}
        assert state["webhdfs"][0] == state["namenodes"][1]["webhdfs"]
    finally:
        assert _run("stop", str(d)).returncode == 0
