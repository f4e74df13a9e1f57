from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from drsync.config import KeepPolicy, config_from_dict, load_config, parse_duration
from drsync.errors import ConfigError

MINIMAL = """
[cluster]
id = "analytics-east"
release = "6.2.1"
data = "data"
repository = "repo"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "drsync.toml"
    p.write_text(text)
    return p


def test_shortest_config_is_the_cluster_table(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.cluster.id == "analytics-east"
    # Relative paths resolve against the config file's directory.
    assert cfg.cluster.data == str(tmp_path / "data")
    assert cfg.agent.role == "auto"
    assert cfg.coordination.session_timeout == 10.0
    assert cfg.replication.interval == 300.0
    assert cfg.snapshots.keep == KeepPolicy(last=3, hourly=24, daily=7)


def test_full_design_example_parses(tmp_path: Path) -> None:
    text = MINIMAL + """
[agent]
name = "east-1"
listen = "127.0.0.1:7420"
advertise = "east-1.example:7420"
metrics = "127.0.0.1:9420"
role = "primary"

[coordination]
zookeeper = "zk1:2181,zk2:2181,zk3:2181"
group = "analytics"
session_timeout = "10s"
failover = "manual"
max_lag_on_failover = "15m"

[replication]
interval = "5m"
standbys = ["standby-1.example:7420"]

[snapshots]
interval = "1h"
keep = { last = 3, hourly = 24, daily = 7 }

[backups]
interval = "24h"
mode = "full"
light_exclude = ["tables/**"]
destination = "/srv/backups"
keep = { last = 3, daily = 7, weekly = 4, monthly = 6 }

[drills]
interval = "24h"

[tls]
ca = "ca.pem"
cert = "east-1.pem"
key = "east-1.key"
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.coordination.max_lag_on_failover == 900.0
    assert cfg.replication.standbys == ("standby-1.example:7420",)
    assert cfg.backups.keep.monthly == 6
    assert cfg.tls.enabled and cfg.tls.ca == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("extra, message", [
    ("[agent]\nnmae = 'x'\n", "agent.nmae: unknown key"),
    ("[agent]\nrole = 'leader'\n", "agent.role: 'leader' is not one of auto, primary, standby"),
    ("[replication]\ninterval = 'soon'\n", "replication.interval: 'soon' is not a duration"),
    ("[replication]\nstandbys = 'a:1'\n", "replication.standbys: expected a list of strings"),
    ("[snapshots]\nkeep = { forever = 1 }\n", "snapshots.keep.forever: unknown key"),
    ("[snapshots]\nreread_attempts = true\n", "snapshots.reread_attempts: expected an integer"),
    ("[backup]\nmode = 'full'\n", "[backup]: unknown section"),
    ("[tls]\nca = 'ca.pem'\n", "[tls] needs all of ca, cert and key"),
])
def test_bad_config_names_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL + extra))
    assert message in str(e.value)


def test_missing_cluster_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[cluster\] is missing required key\(s\): repository"):
        load_config(write(tmp_path, "[cluster]\nid='a'\nrelease='1'\ndata='d'\n"))
    with pytest.raises(ConfigError, match=r"\[cluster\] is missing"):
        load_config(write(tmp_path, "[agent]\nname='a'\n"))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[cluster\nid="))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1.5h", 5400), ("7d", 604800),
                                           ("250ms", 0.25), (42, 42), ("2w", 1209600)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1s", "5 minutes", "", "m5", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("role", "replication", "said"), [
    ("primary", 'upstream = "near"', "replication.upstream names the agent to follow under ZooKeeper roles"),
    ("auto", 'upstream = "east-1"', "names this agent itself"),
    ("auto", 'standbys = ["a:1"]', "replication.standbys is for fixed roles"),
    ("auto", 'upstream = " east-1 "', "no leading or trailing spaces"),
    ("standby", 'standbys = ["a:1", "a:1"]', "lists a:1 more than once"),
    ("standby", 'standbys = ["127.0.0.1:7420"]', "this agent's own address"),
])
def test_a_topology_that_cannot_work_is_refused_at_start(tmp_path: Path, role: str, replication: str,
                                                         said: str) -> None:
    from drsync.config import topology_problem

    cfg = config_from_dict({"cluster": {"id": "c", "release": "1", "data": str(tmp_path), "repository": "r"},
                            "agent": {"name": "east-1", "role": role},
                            "replication": tomllib.loads(replication)})
    assert said in (topology_problem(cfg) or "")
