"""Breaker, stop 28 (issues 18 and 20): promises that do not hold.

- A wrong ZooKeeper address logs one WARNING per backoff step: with a mistyped host name (does not resolve)
  or an address where something listens that is not ZooKeeper, kazoo's own warnings are logged beside the
  agent's one per step ("Cannot resolve ...", "Connection time-out ...").
- ``config check`` warns when ``agent.advertise`` is not an address of this host: the wildcard addresses
  ``0.0.0.0`` / ``::`` (what ``listen`` often holds, copied into ``advertise``) are reported ``ok``, though
  they are nobody's address: another agent dialling them reaches its own host.
- Every time in JSON output is ISO 8601 UTC with a ``_unix`` number beside it: ``drsync apply --json`` of a
  standby with nothing held writes ``captured_at`` and ``held_at`` as a bare ``0.0``.
- ``drill run --before TIME --json`` (and ``last_drill`` in ``status --json`` after it) writes the time as a bare
  Unix number (``"before": 1796185722.70``), no ISO 8601, no ``before_unix``.
- An agent whose data root is its repository is refused as "another drsync agent (pid N)" where N is its own
  pid: no other agent exists.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SLOW, init_repo, run_drsync
from tests.group import wait_for
from tests.zk import free_port


def write_config(tmp: Path, *, zookeeper: str = "", advertise: str = "", role: str = "standby",
                 data: Path | None = None, repo: Path | None = None) -> Path:
    data = data or tmp / "data"
    repo = repo or tmp / "repo"
    data.mkdir(exist_ok=True)
    (data / "a.txt").write_text("a\n")
    text = (f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{data}"\nrepository = "{repo}"\n'
            f'[agent]\nname = "zed"\nrole = "{role}"\nlisten = "127.0.0.1:{free_port()}"\n'
            f'metrics = "127.0.0.1:{free_port()}"\n')
    if advertise:
        text += f'advertise = "{advertise}"\n'
    if zookeeper:
        # The shortest session drsync allows: each attempt against a silent address waits 5 s, not 10.
        text += f'[coordination]\nzookeeper = "{zookeeper}"\ngroup = "g"\nsession_timeout = "2s"\n'
    cfg = tmp / "zed.toml"
    cfg.write_text(text)
    if not repo.exists():
        init_repo(cfg)
    return cfg


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """Something that accepts TCP connections and never answers (a wrong port, not ZooKeeper)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(50)
    srv.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                held.append(c)
            except (TimeoutError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("where", ["unresolvable-name", "not-zookeeper"])
def test_a_wrong_zookeeper_address_logs_one_warning_per_backoff_step(tmp_path: Path, where: str,
                                                                     request: pytest.FixtureRequest) -> None:
    hosts = "zk1.invalid:2181" if where == "unresolvable-name" else request.getfixturevalue("silent_listener")
    cfg = write_config(tmp_path, zookeeper=hosts, role="auto")
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], stdout=log,
                                 stderr=log)
    try:
        # Three backoff steps (attempts 1, 2 and 3) logged by the agent.
        wait_for(lambda: "(attempt 3;" in log_path.read_text(errors="replace"), "three backoff steps", timeout=90)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60 * SLOW)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    text = log_path.read_text(errors="replace")
    text = text[:text.index("(attempt 3;")]
    steps = len(re.findall(r"cannot join the group in ZooKeeper", text))
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert len(warnings) == steps, "\n".join(warnings)


@pytest.mark.parametrize("advertise", ["0.0.0.0:7420", "[::]:7420"])
def test_config_check_warns_when_advertise_is_a_wildcard_no_host_has(tmp_path: Path, advertise: str) -> None:
    cfg = write_config(tmp_path, advertise=advertise)
    r = run_drsync("config", "check", "--config", cfg)
    row = next(line for line in r.out.splitlines() + r.err.splitlines() if line.startswith("advertise address"))
    assert re.match(r"advertise address\s+(WARN|FAIL)", row), row


def test_apply_json_writes_no_time_as_a_bare_number(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert run_drsync("snapshot", "create", "--config", cfg).code == 0
    r = run_drsync("apply", "--json", "--config", cfg)
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    bad = {}
    for key, value in doc.items():
        if key.endswith(("_at", "_since")):
            iso = value is None or (isinstance(value, str) and re.match(r"\d{4}-\d\d-\d\dT", value))
            if not iso or (value is not None and f"{key}_unix" not in doc):
                bad[key] = value
    assert not bad, f"times not in ISO 8601 with a _unix beside them: {bad}"


def test_an_agent_whose_data_root_is_its_repository_is_not_refused_as_another_agent(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfg = write_config(tmp_path, repo=repo)
    cfg.write_text(cfg.read_text().replace(f'data = "{tmp_path / "data"}"', f'data = "{repo}"'))
    r = subprocess.run([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60 * SLOW, env={**os.environ, "DRSYNC_LOCK_DIR": str(tmp_path)})
    assert r.returncode != 0, r.stderr
    m = re.search(r"another drsync agent \(pid (\d+)", r.stderr)
    assert not m, f"refused naming 'another drsync agent' with pid {m.group(1)}, no other agent runs: {r.stderr}"








def _bare_times(doc: object, path: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{path}.{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 1e9 < v < 4e9 and not k.endswith("_unix"):
                out.append(f"{here}={v}")
            elif isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)", v):
                if not v.endswith("Z") and not v.endswith("+00:00"):
                    out.append(f"{here}={v} (not UTC)")
                if f"{k}_unix" not in doc:
                    out.append(f"{here}={v} (no {k}_unix)")
            else:
                out += _bare_times(v, here)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _bare_times(v, f"{path}[{i}]")
    return out


def test_times_in_promote_and_drill_json_are_iso_with_unix_beside(make_group) -> None:  # type: ignore[no-untyped-def]
    """Every time in --json output is ISO 8601 UTC with a <key>_unix beside it: ``drill run --before TIME
    --json`` writes the time it was given as a bare Unix number (``"before": 1796185722.70``)."""
    g = make_group(["east", "west"])
    for n in g.names:
        g.start(n)
    assert g.promote("east").code == 0
    g.wait_synced("east", "west", "west's first sync")
    docs = {}
    for args in (("promote", "--json", "--dry-run", "--force"), ("promote", "--json", "--dry-run", "--force",
                 "--before", "0s"), ("drill", "run", "--json"), ("drill", "run", "--json", "--to-snapshot", "latest"),
                 ("drill", "run", "--json", "--before", "0s"), ("history", "--json"), ("status", "--points", "--json")):
        r = g.drsync("west", *args)
        try:
            docs[" ".join(args)] = json.loads(r.out)
        except ValueError:
            docs[" ".join(args)] = {"_unparsed": r.out[-300:], "err": r.err[-300:], "code": r.code}
    assert all("_unparsed" not in d for d in docs.values()), docs
    docs["status --json after the drills"] = g.status("west")
    bad = {k: _bare_times(v) for k, v in docs.items() if _bare_times(v)}
    assert not bad, json.dumps(bad, indent=1)
