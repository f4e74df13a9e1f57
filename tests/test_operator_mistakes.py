"""Operator mistakes that must be refused (issue: two agents with one name, one port, one data root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SLOW, init_repo, make_tree, run_drsync, tree_state
from tests.group import Group, PrimaryWatcher, wait_for
from tests.zk import free_port


@pytest.fixture
def grp(tmp_path: Path, zk_server, group: str) -> Iterator[Group]:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    yield g
    g.stop_all()


def bootstrap(g: Group) -> None:
    g.start("east")
    g.start("west")
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")


def copy_config(g: Group, name: str, tmp: Path, *, keep: tuple[str, ...] = ()) -> Path:
    """A copy of ``name``'s config as an operator makes one: new ports, and new paths unless kept."""
    text = g.cfg[name].read_text()
    text = text.replace(g.addr[name], f"127.0.0.1:{free_port()}").replace(g.metrics[name], f"127.0.0.1:{free_port()}")
    if "data" not in keep:
        data = tmp / "copy-data"
        if not data.exists():
            make_tree(data, files=3, big=0)
        (data / "catalog" / "impostor.txt").write_text("only the copy has this\n")
        text = text.replace(f'data = "{g.data[name]}"', f'data = "{data}"')
    if "repository" not in keep:
        text = text.replace(f'repository = "{tmp / (name + "-repo")}"', f'repository = "{tmp / "copy-repo"}"')
    if "repository" in keep and "state" not in keep:
        text = text.replace("[agent]\n", f'[agent]\nstate_dir = "{tmp / "copy-state"}"\n')
    p = tmp / "copy.toml"
    p.write_text(text)
    if "repository" not in keep and not (tmp / "copy-repo").exists():
        init_repo(p)
    return p


def run_agent(cfg: Path, timeout: float = 60 * SLOW) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=timeout)


def test_a_second_agent_with_the_same_name_is_refused(grp: Group, tmp_path: Path) -> None:
    g = grp
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    copy = copy_config(g, "east", tmp_path)
    check = run_drsync("config", "check", "--config", copy, "--json")
    named = {c["name"]: c for c in json.loads(check.out)["checks"]}
    assert check.code != 0 and not named["agent name"]["ok"] and g.addr["east"] in named["agent name"]["detail"]
    r = run_agent(copy)
    assert r.returncode == 2, r.stderr
    assert "another agent is already registered as 'east'" in r.stderr and g.addr["east"] in r.stderr
    # Issue 20 audit: one line on stderr (it was "started ... gRPC on", then the refusal three times), and
    # nothing says the refused agent started.
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drsync: error: "), r.stderr
    with_json = subprocess.run([sys.executable, "-m", "drsync", "agent", "--config", str(copy), "--log-format",
                                "json"], capture_output=True, text=True, timeout=60 * SLOW)
    (record,) = [json.loads(line) for line in with_json.stderr.strip().splitlines()]
    assert with_json.returncode == 2 and record["level"] == "ERROR", with_json.stderr
    assert "another agent is already registered as 'east'" in record["message"], record
    # The real agents never noticed: one primary at epoch 1, the standby never saw the copy's tree.
    (g.data["east"] / "catalog" / "after.txt").write_text("production goes on\n")
    wait_for(lambda: g.in_sync("east", "west"), "replication to go on")
    assert not (g.data["west"] / "catalog" / "impostor.txt").exists()
    watcher.close()
    assert {p for p in watcher.primary if p is not None} == {("east", 1)}
    assert g.primary() == ("east", 1) and g.record("east")["role"] == "primary"
    # The real agent restarted (same state dir, same identity) replaces its own earlier record.
    g.kill("east")
    g.start("east")
    wait_for(lambda: g.primary() == ("east", 1), "east to take its claim back after kill -9")


def test_a_same_name_impostor_cannot_take_over_while_the_real_agent_is_down(grp: Group, tmp_path: Path) -> None:
    """Issue 20 audit: with the real primary east stopped (SIGTERM), a copy of its config with a fresh state
    directory decided "claim (epoch 1 names this agent)", became primary at epoch 1, west applied its tree,
    and the real east was refused when it came back. The name belongs to east's persistent agent id (its
    members record, and the epoch records it): the copy is refused, config check says so while east is
    down, and east takes its claim back. A reinstalled host takes the name only by drsync replace-identity,
    after which the old identity is the one refused."""
    g = grp
    watcher = PrimaryWatcher(g.hosts, g.group)
    bootstrap(g)
    real_id = g.record("east")["agent_id"]
    assert g.coord.read_epoch().agent_id == real_id  # promote recorded the promoted agent's identity
    g.kill("east", signal.SIGTERM)  # a maintenance stop of the real primary
    assert g.primary() is None and "east" not in g.coord.agents()
    copy = copy_config(g, "east", tmp_path)
    check = run_drsync("config", "check", "--config", copy, "--json")
    named = {c["name"]: c for c in json.loads(check.out)["checks"]}
    assert check.code == 2 and not named["agent name"]["ok"], (check.code, check.out)
    detail = named["agent name"]["detail"]
    assert f"belongs to another agent (agent id {real_id}" in detail and g.addr["east"] in detail, detail
    assert "drsync replace-identity" in detail and "would be refused" in detail
    r = run_agent(copy)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert f"agent name 'east' in group {g.group} belongs to another agent (agent id {real_id}" in line, line
    assert "give this agent its own agent.name" in line and "drsync replace-identity" in line
    assert g.primary() is None and g.coord.members()["east"].member["agent_id"] == real_id
    # The real east comes back: its own name, its own claim at epoch 1; west never saw the copy's tree.
    g.start("east")
    wait_for(lambda: g.primary() == ("east", 1), "the real east to take its claim back")
    (g.data["east"] / "catalog" / "after.txt").write_text("production goes on\n")
    wait_for(lambda: g.in_sync("east", "west"), "replication to go on")
    assert not (g.data["west"] / "catalog" / "impostor.txt").exists()
    assert {p for p in watcher.primary if p is not None} == {("east", 1)}
    watcher.close()
    assert g.status("west")["primary"] == "east"

    # A reinstalled host: same data root and repository, its state directory lost. Refused until the operator
    # replaces the identity; then it takes east's claim back at epoch 1, and the old identity is refused.
    g.kill("east", signal.SIGTERM)
    new = copy_config(g, "east", tmp_path, keep=("data", "repository"))
    assert run_agent(new).returncode == 2
    live = tmp_path / "live.toml"  # west's name (west runs), another state directory
    live.write_text(g.cfg["west"].read_text().replace("[agent]\n", f'[agent]\nstate_dir = "{tmp_path / "ls"}"\n'))
    r = run_drsync("replace-identity", "--config", live)
    assert r.code == 4 and "registered live" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_drsync("replace-identity", "--config", new, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["replaced"] and doc["replaced_agent_id"] == real_id and doc["agent_id"] != real_id
    assert "identity replaced" in r.err and "WARNING" in r.err  # logged at WARNING on stderr
    (entry,) = [e for e in g.coord.history(5) if e["why"] == "identity replaced"]
    assert entry["to"] == "east" and real_id in entry["detail"] and doc["agent_id"] in entry["detail"]
    assert g.coord.read_epoch().agent_id == doc["agent_id"]
    with open(tmp_path / "new-east.log", "wb") as log:
        reinstalled = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(new)], stdout=log,
                                       stderr=log)
    try:
        wait_for(lambda: g.primary() == ("east", 1), "the reinstalled east to take the claim at epoch 1")
        assert g.record("east")["agent_id"] == doc["agent_id"]
    finally:
        reinstalled.send_signal(signal.SIGTERM)
        reinstalled.wait(timeout=60 * SLOW)
    r = run_agent(g.cfg["east"])  # the old identity (the original state directory)
    assert r.returncode == 2 and f"belongs to another agent (agent id {doc['agent_id']}" in r.stderr, r.stderr


def test_an_agent_on_a_port_in_use_exits(grp: Group, tmp_path: Path) -> None:
    g = grp
    g.start("east")
    for port_of in ("listen", "metrics"):
        text = copy_config(g, "east", tmp_path).read_text().replace('name = "east"', 'name = "other"')
        busy = g.addr["east"] if port_of == "listen" else g.metrics["east"]
        key = "listen" if port_of == "listen" else "metrics"
        lines = [f'{key} = "{busy}"' if line.startswith(f"{key} = ") else line for line in text.splitlines()]
        cfg = tmp_path / f"busy-{port_of}.toml"
        cfg.write_text("\n".join(lines) + "\n")
        # Issue 20: one line naming the address and the key to change, exit 2 (configuration), no gRPC C-core
        # line ("E1201 ... add_port.cc") and no "internal error"; with JSON logs the line is a JSON record.
        r = run_agent(cfg)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
        assert busy in lines[0] and "address already in use" in lines[0], lines
        assert f"set agent.{key} to a free host:port" in lines[0] and "internal error" not in lines[0]
        r = subprocess.run([sys.executable, "-m", "drsync", "agent", "--config", str(cfg), "--log-format", "json"],
                           capture_output=True, text=True, timeout=60 * SLOW)
        records = [json.loads(line) for line in r.stderr.strip().splitlines()]  # every line is JSON
        assert r.returncode == 2 and records[-1]["level"] == "ERROR" and busy in records[-1]["message"], r.stderr
    assert g.procs["east"].poll() is None and g.hello("east").agent == "east"


@pytest.mark.parametrize("shared", ["data", "repository"])
def test_two_agents_never_share_a_data_root_or_repository(grp: Group, tmp_path: Path, shared: str) -> None:
    g = grp
    g.start("east")
    before = tree_state(g.data["east"])
    cfg = copy_config(g, "east", tmp_path, keep=(shared,))
    cfg.write_text(cfg.read_text().replace('name = "east"', 'name = "other"'))
    r = run_agent(cfg)
    assert r.returncode != 0 and "two agents must never share a data root or repository" in r.stderr, r.stderr
    assert str(g.procs["east"].pid) in r.stderr
    assert tree_state(g.data["east"]) == before


@pytest.mark.parametrize("shared", ["data", "repository"])
def test_agents_with_separate_lock_directories_still_never_share_a_data_root_or_repository(
        grp: Group, tmp_path: Path, shared: str) -> None:
    """Issue 20 audit: the host lock file lives in /run/lock, $DRSYNC_LOCK_DIR or the temp directory, which
    two systemd units (PrivateTmp), two containers or two DRSYNC_LOCK_DIRs do not share. The agent also locks
    the data root and repository directories themselves: the second agent exits non-zero with one line; a
    command run beside the running agent is not held up by that lock; the agent's lock files go when it stops."""
    g = grp
    east_locks, copy_locks = tmp_path / "locks-east", tmp_path / "locks-copy"
    east_locks.mkdir()
    copy_locks.mkdir()
    g.start("east", env={**os.environ, "DRSYNC_LOCK_DIR": str(east_locks)})
    assert g.promote("east").code == 0
    wait_for(lambda: g.drsync("east", "snapshot", "list", "--json").json(), "east's first snapshot")
    assert len(list(east_locks.glob("drsync-*.lock"))) == 2  # its data root and its repository
    before = tree_state(g.data["east"])
    cfg = copy_config(g, "east", tmp_path, keep=(shared,))
    cfg.write_text(cfg.read_text().replace('name = "east"', 'name = "other"'))
    r = subprocess.run([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60 * SLOW, env={**os.environ, "DRSYNC_LOCK_DIR": str(copy_locks)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stderr)
    what, where = ("data root", g.data["east"]) if shared == "data" else ("repository", tmp_path / "east-repo")
    assert f"already serves {what} {os.path.realpath(where)}" in lines[0], lines
    assert "two agents must never share a data root or repository" in lines[0] and "stop it" in lines[0]
    assert f"pid {g.procs['east'].pid}" in lines[0], lines
    assert tree_state(g.data["east"]) == before and g.procs["east"].poll() is None
    assert not list(copy_locks.glob("drsync-*.lock"))  # the refused agent left no lock file behind
    # Commands run beside the agent do not take that lock: they work while it runs.
    assert g.drsync("east", "repo", "verify").code == 0
    assert g.drsync("east", "snapshot", "list", "--json").code == 0
    g.kill("east", signal.SIGTERM)
    assert not list(east_locks.glob("drsync-*.lock"))  # released: removed, not left for every later start
    g.start("east", env={**os.environ, "DRSYNC_LOCK_DIR": str(east_locks)})  # and taken again at once
    wait_for(lambda: g.primary() == ("east", 1), "east to take its claim back")


def test_an_empty_standby_promoted_over_production_empties_nothing(grp: Group) -> None:
    """An empty standby cannot become production by --force --accept-data-loss; with the explicit
    --promote-empty-root it can, and production's root, when its agent rejoins, is held by the
    deletion guard instead of being emptied."""
    g = grp
    g.start("east")
    assert g.promote("east").code == 0
    wait_for(lambda: g.drsync("east", "snapshot", "list", "--json").json(), "east's first snapshot")
    g.kill("east")
    production = tree_state(g.data["east"])
    g.start("west")  # empty, never applied anything
    r = g.promote("west", "--force", "--accept-data-loss")
    assert r.code == 4 and "is empty" in r.err and "--promote-empty-root" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and g.coord.read_epoch().epoch == 1
    r = g.promote("west", "--force", "--promote-empty-root", "--accept-data-loss")
    assert r.code == 0, r.err
    (change,) = [e for e in g.coord.history(5) if e["epoch"] == 2]
    assert change["to"] == "west" and "--promote-empty-root" in change["detail"], change
    g.start("east")
    g.wait_role("east", "ex-primary")
    assert g.drsync("east", "rejoin").code == 0
    g.wait_role("east", "standby")
    held = wait_for(lambda: (g.drsync("east", "apply", "--json").json() or {}).get("held") and
                    g.drsync("east", "apply", "--json").json(), "east to hold the emptying shipment")
    assert tree_state(g.data["east"]) == production
    assert held["snapshot"] and "drsync apply --confirm" in held["message"]


def test_promote_succeeds_only_when_an_agent_acts_as_primary_and_dry_run_changes_nothing(grp: Group) -> None:
    """`promote` of an agent that is not running changes nothing and exits 1 naming the group's state;
    `promote --dry-run` runs every check, changes nothing, and exits as the promotion would."""
    g = grp
    g.start("west")
    r = g.promote("east")  # east's agent is not running
    assert r.code == 1 and "not running" in r.err and "nothing was changed" in r.err, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert g.connected().read_epoch().epoch == 0 and g.primary() is None
    g.start("east")
    dry = g.promote("east", "--dry-run")
    doc = dry.json()
    assert dry.code == 0 and doc["would_promote"] and doc["epoch_after"] == 1, (dry.code, dry.out, dry.err)
    assert {c["name"]: c["ok"] for c in doc["checks"]} == {"primary": True, "data root": True, "lag": True,
                                                           "agent": True, "fence": True}
    assert g.connected().read_epoch().epoch == 0 and g.primary() is None  # nothing changed
    empty = g.promote("west", "--dry-run")  # west's root is empty: the real one would be refused (4)
    assert empty.code == 4 and not empty.json()["would_promote"]
    assert [c["name"] for c in empty.json()["checks"] if not c["ok"]] == ["data root"]
    human = g.drsync("west", "promote", "--dry-run")
    assert human.code == 4 and "FAIL  data root" in human.out, human.out
    assert g.connected().read_epoch().epoch == 0
    assert g.promote("east").code == 0 and g.primary() == ("east", 1)


def test_promote_whose_agent_never_acts_as_primary_within_wait_fails_and_says_so(grp: Group,
                                                                                  tmp_path: Path) -> None:
    """The epoch moved to the agent, but it does not take over within --wait (held at the pause point
    before its claim, as a hung agent would be): exit 1, one line naming the epoch, the role the agent
    reports and the primary node, and what to do; once it goes on, it takes over at that epoch."""
    g = grp
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "claim").write_text("")
    g.start("east", env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates)})
    r = g.promote("east", "--wait", "1")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, (r.code, r.err)
    assert "epoch 1 now names east, but it does not act as primary within 1s" in r.err, r.err
    assert "its agent reports role standby" in r.err and "primary node: none" in r.err
    assert "the group has no working primary until it does" in r.err and "check its log" in r.err
    wait_for(lambda: (gates / "claim.reached").exists(), "east to stop before its claim")
    assert g.coord.read_epoch().epoch == 1 and g.primary() is None and g.record("east")["role"] == "standby"
    (gates / "claim").unlink()
    wait_for(lambda: g.primary() == ("east", 1), "east to take over once it goes on")
    g.wait_role("east", "primary")


def test_promote_of_a_killed_agent_whose_registration_lingers_changes_nothing(tmp_path: Path, zk_server,
                                                                              group: str) -> None:
    """Issue 20: after kill -9 its ZooKeeper registration lives until the session times out; `promote
    --dry-run` said "agent is running" and the real promote bumped the epoch and wrote history, then failed.
    The agent check proves the process alive (state directory lock, or a Hello answered at its address)."""
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], session_timeout="60s")
    try:
        g.start("east")
        g.start("west")
        g.kill("east")
        assert "east" in g.coord.agents()  # the registration lingers
        dry = g.promote("east", "--dry-run")
        doc = dry.json()
        agent = next(c for c in doc["checks"] if c["name"] == "agent")
        assert dry.code == 1 and not doc["would_promote"] and not agent["ok"], (dry.code, dry.out)
        assert "does not answer" in agent["detail"] and g.addr["east"] in agent["detail"], agent
        r = g.promote("east")
        assert r.code == 1 and "not running" in r.err and "nothing was changed" in r.err, (r.code, r.err)
        assert g.coord.read_epoch().epoch == 0 and g.coord.history(10) == []
        # West's agent runs: its check passes on the lock (or its Hello), not on its registration alone.
        west = next(c for c in g.promote("west", "--dry-run").json()["checks"] if c["name"] == "agent")
        assert west["ok"] and "locked" in west["detail"], west
    finally:
        g.stop_all()


def test_a_standby_of_another_release_refuses_at_hello_says_so_and_stores_nothing(tmp_path: Path, zk_server,
                                                                                  group: str) -> None:
    """Issue 20: a standby of release 2.0 in a group whose snapshots are release 1.0 logged only INFO (and
    stored the foreign chunks); status showed it as a healthy standby. Now both sides refuse at Hello, before
    anything is negotiated or stored; the standby logs the refusal at WARNING, reason first, once (not per
    retry), and drsync status shows it."""
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        west_cfg = g.cfg["west"]
        west_cfg.write_text(west_cfg.read_text().replace('release = "6.2.1"', 'release = "2.0"'))
        import shutil

        shutil.rmtree(tmp_path / "west-repo")
        init_repo(west_cfg)
        g.start("east")
        g.start("west")
        assert g.promote("east").code == 0
        wait_for(lambda: g.log("east").count("ships cluster 'analytics' release '6.2.1'") >= 3,
                 "east's shipper to be refused three times")
        assert f"refused by standby {g.addr['west']}: east ships cluster" in g.log("east")
        assert "refused: standby" not in g.log("east")  # said once, not "refused: standby X refused: ..."
        refusals = [ln for ln in g.log("west").splitlines() if "refused a shipment" in ln]
        assert len(refusals) == 1 and " WARNING " in refusals[0], refusals
        line = refusals[0]
        assert line.index("ships cluster 'analytics' release '6.2.1'") < line.index("(from east")
        assert "release '2.0'" in line and "coordination.group" in line  # advice for role = auto
        assert "received" not in g.log("west")  # nothing negotiated, nothing stored
        assert g.drsync("west", "snapshot", "list", "--json").json() == []
        doc = wait_for(lambda: (d := g.status("east")) and next(a for a in d["agents"] if a["name"] == "west")
                       .get("last_refusal") and d, "status to show west's refusal")
        west = next(a for a in doc["agents"] if a["name"] == "west")
        assert "release '2.0'" in west["last_refusal"]["reason"] and west["last_refusal"]["at"].endswith("Z")
        out = g.drsync("east", "status").out
        assert "agent west REFUSES shipments:" in out and "up (refusing)" in out, out
    finally:
        g.stop_all()


class _OtherRelease:
    """A standby (an older drsync that does not check the sender's cluster) of another release."""

    target = "standby-2"

    def hello(self, sender: str, epoch: int):  # type: ignore[no-untyped-def]
        from drsync.transport import StandbyHello

        return StandbyHello("west", "standby", "analytics", "2.0", epoch, "", 0.0, 0.0)

    def missing(self, epoch, batches):  # type: ignore[no-untyped-def]
        raise AssertionError("negotiated with a standby of another release")

    def close(self) -> None:
        pass


def test_the_primary_ships_nothing_to_a_standby_whose_hello_names_another_release(tmp_path: Path) -> None:
    from drsync import engine
    from drsync.agent.shipper import Shipper
    from drsync.metrics import AgentMetrics, new_registry
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    make_tree(tmp_path / "data", files=3, big=0)
    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="analytics", release="6.2.1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(tmp_path / "data")))
    outcomes = []
    s = Shipper("standby-2", repo=repo, link=lambda t: _OtherRelease(), sender="east", epoch=lambda: 1,
                guard=lambda final: None, bandwidth_bps=0.0, metrics=AgentMetrics(new_registry(), group="g",
                                                                                    agent="east"),
                on_outcome=outcomes.append)
    out = s.ship(info)
    assert not out.ok and out.summary.startswith("refused: standby west keeps cluster 'analytics' release '2.0'")
    assert "nothing was shipped" in out.summary and "cluster.release of production" in out.summary


def test_waits_and_timeouts_below_zero_are_usage_errors_and_tables_have_no_trailing_spaces(tmp_path: Path) -> None:
    for args in (["promote", "--wait", "-5"], ["rejoin", "--wait", "-1"], ["switchover", "--timeout", "-1"],
                 ["apply", "--wait", "-2"], ["config", "check", "--timeout", "-1"]):
        r = run_drsync(*args, "--config", tmp_path / "none.toml")
        assert r.code == 2 and "x>=0" in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[cluster]\nid = "x"\n')
    out = run_drsync("config", "check", "--config", cfg).out
    assert out.strip() and not any(line != line.rstrip() for line in out.splitlines()), out
