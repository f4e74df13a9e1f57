"""drsync config check: every problem at once, against real ZooKeeper and real peer agents."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import init_repo, run_drsync
from tests.group import Group, wait_for
from tests.zk import free_port


def test_every_config_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[cluster]\nid = "x"\nrelease = 3\ndata = "/nonexistent"\n[agent]\nnmae = "typo"\n'
                   'role = "leader"\n[coordination]\nsession_timeout = "ten seconds"\n[tls]\nca = "ca.pem"\n')
    r = run_drsync("config", "check", "--config", cfg, "--json")
    assert r.code == 2
    details = [c["detail"] for c in json.loads(r.out)["checks"]]
    for expected in ("cluster.release", "missing required key(s): repository", "agent.nmae: unknown key",
                     "agent.role", "coordination.session_timeout", "[tls] needs all of ca, cert and key"):
        assert any(expected in d for d in details), (expected, details)
    assert len(r.err.strip().splitlines()) == 1 and "6 problem(s)" in r.err
    human = run_drsync("config", "check", "--config", cfg)
    assert "[cluster] is missing" in human.out  # brackets are shown, not eaten as markup


def test_every_unknown_key_is_reported_at_once(tmp_path: Path) -> None:
    """Issue 20: config check names every unknown key (and section) in one run, each with what is allowed
    there, not only the first one: two in one table, one in each of three others, and a nested one."""
    cfg = tmp_path / "typos.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path / "r"}"\n'
                   'colour = "blue"\n[agent]\nnmae = "typo"\nrol = "auto"\n[replication]\nintervall = "5m"\n'
                   '[snapshots]\nkeep = { forever = 1 }\n[bogus]\nx = 1\n')
    r = run_drsync("config", "check", "--config", cfg, "--json")
    assert r.code == 2, (r.code, r.out, r.err)
    failed = [c["detail"] for c in json.loads(r.out)["checks"] if not c["ok"]]
    expected = ["[bogus]: unknown section", "cluster.colour: unknown key", "agent.nmae: unknown key",
                "agent.rol: unknown key", "replication.intervall: unknown key", "snapshots.keep.forever: unknown key"]
    for word in expected:
        assert sum(d.startswith(word) for d in failed) == 1, (word, failed)
    assert len(failed) == len(expected) and all("allowed" in d for d in failed), failed
    assert "allowed in [agent]: " in next(d for d in failed if d.startswith("agent.rol"))
    assert len(r.err.strip().splitlines()) == 1 and f"{len(expected)} problem(s)" in r.err


def test_a_healthy_group_checks_out_and_problems_are_named(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        wait_for(lambda: g.record("west").get("applied_snapshot"), "west to sync")
        r = run_drsync("config", "check", "--config", g.cfg["west"], "--json")
        assert r.code == 0, r.out + r.err
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert checks["zookeeper"]["ok"] and "primary east" in checks["zookeeper"]["detail"]
        assert checks["peer east"]["ok"] and "(primary)" in checks["peer east"]["detail"]
        assert checks["repository"]["ok"] and "in use by the running agent" in checks["listen address"]["detail"]
        # The same config with the wrong release, and ZooKeeper somewhere nobody listens.
        bad = tmp_path / "west-bad.toml"
        bad.write_text(g.cfg["west"].read_text().replace('release = "6.2.1"', 'release = "7.0"')
                       .replace(zk_server.hosts, f"127.0.0.1:{free_port()}"))
        r = run_drsync("config", "check", "--config", bad, "--json", "--timeout", "1")
        assert r.code == 1, r.out + r.err
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert not checks["repository"]["ok"] and "release '7.0'" in checks["repository"]["detail"]
        assert not checks["zookeeper"]["ok"] and "cannot reach ZooKeeper" in checks["zookeeper"]["detail"]
    finally:
        g.stop_all()


def test_automatic_failover_without_a_fence_is_refused_by_check_and_at_start(tmp_path: Path) -> None:
    """Safety rule 7: automatic failover must fence production first, unless the operator wrote "none"."""
    base = (f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{tmp_path}/data"\nrepository = "{tmp_path}/repo"\n'
            f'[agent]\nname = "west"\nlisten = "127.0.0.1:{free_port()}"\nmetrics = ""\n'
            f'[coordination]\nzookeeper = "127.0.0.1:{free_port()}"\nfailover = "automatic"\n')
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "auto.toml"
    cfg.write_text(base)
    init_repo(cfg)
    r = run_drsync("config", "check", "--config", cfg, "--json", "--timeout", "0.5")  # no ZooKeeper runs there
    checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
    assert r.code == 2 and not checks["fencing"]["ok"] and "fence_command" in checks["fencing"]["detail"]
    r = run_drsync("agent", "--config", cfg)
    assert r.code == 2 and "fence_command" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert "Traceback" not in r.err
    # The explicit choice is accepted (and config check says what it means).
    cfg.write_text(base + 'fence_command = "none"\n')
    r = run_drsync("config", "check", "--config", cfg, "--json", "--timeout", "0.5")
    checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
    assert checks["fencing"]["ok"] and "do not fence" in checks["fencing"]["detail"]


def test_help_of_agent_side_commands_names_only_options_they_take() -> None:
    """--repo works for one-shot commands; commands that need an agent's config do not offer it."""
    for cmd in (["agent"], ["status"], ["promote"], ["rejoin"], ["switchover"], ["apply"], ["drill", "run"]):
        r = run_drsync(*cmd, "--help")
        assert r.code == 0 and "--config" in r.out and "--repo" not in r.out, (cmd, r.out)
        r = run_drsync(*cmd, "--repo", "/tmp/x")
        assert r.code == 2 and "--repo" in r.err, (cmd, r.err)
    assert "--repo" in run_drsync("snapshot", "list", "--help").out


def test_config_check_finds_a_shared_state_dir_a_dead_advertise_address_and_a_missing_chroot(
        tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Three places where config check said ok and the agent then failed or misbehaved."""
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    try:
        g.start("west")
        west_state = json.loads(run_drsync("config", "check", "--config", g.cfg["west"], "--json").out)
        assert all(c["ok"] for c in west_state["checks"] if c["name"] in ("state directory", "advertise address"))
        # A copy of east's config whose state directory is west's (only the state dir was copied wrongly).
        from drsync.agent.state import state_dir_of
        from drsync.config import load_config

        west_dir = state_dir_of(load_config(g.cfg["west"]))
        shared = tmp_path / "east-shared.toml"
        shared.write_text(g.cfg["east"].read_text().replace("[agent]\n", f'[agent]\nstate_dir = "{west_dir}"\n'))
        r = run_drsync("config", "check", "--config", shared, "--json")
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert r.code == 2 and not checks["state directory"]["ok"], r.out
        assert "belongs to agent 'west'" in checks["state directory"]["detail"]
        g.kill("west")
        r = run_drsync("agent", "--config", shared, timeout=60)
        assert r.code == 2 and "belongs to agent 'west'" in r.err and len(r.err.strip().splitlines()) == 1, r.err
        # west running, but advertising an address nobody answers on.
        dead = f"127.0.0.1:{free_port()}"
        g.cfg["west"].write_text(g.cfg["west"].read_text().replace("[agent]\n", f'[agent]\nadvertise = "{dead}"\n'))
        g.start("west", wait=False)
        wait_for(lambda: g.record("west").get("address") == dead, "west to register its advertised address")
        r = run_drsync("config", "check", "--config", g.cfg["west"], "--json", "--timeout", "2")
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert r.code != 0 and not checks["advertise address"]["ok"], r.out
        assert f"no agent answers on {dead}" in checks["advertise address"]["detail"]
        # A chroot that does not exist: how to create it, and no library warning on stderr.
        chroot = tmp_path / "chroot.toml"
        chroot.write_text(g.cfg["east"].read_text().replace(zk_server.hosts, f"{zk_server.hosts}/no/such/chroot"))
        r = run_drsync("config", "check", "--config", chroot)
        assert r.code != 0 and "zkCli.sh create /no/such/chroot" in r.out
        assert "Warning" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    finally:
        g.stop_all()


def test_config_check_tells_a_second_config_of_a_running_agent_from_its_own(tmp_path: Path, zk_server,
                                                                           group: str) -> None:
    """Issue 20: a copy of a running agent's config (same name and state directory, other ports) was
    "state directory ok ... writable", "listen address ok (in use by the running agent)" and "agent name ok
    ... registered by this agent". Now: the lock is another process's (FAIL with its pid), the ports are
    judged for what they are, and the name is registered at another address (FAIL naming it)."""
    g = Group(tmp_path, zk_server.hosts, group, ["east"])
    try:
        g.start("east")
        own = {c["name"]: c for c in json.loads(run_drsync("config", "check", "--config", g.cfg["east"],
                                                           "--json").out)["checks"]}
        pid = str(g.procs["east"].pid)
        assert own["state directory"]["ok"] and pid in own["state directory"]["detail"], own
        assert "in use by the running agent" in own["listen address"]["detail"] and own["agent name"]["ok"]
        listen = f"127.0.0.1:{free_port()}"
        dup = tmp_path / "east-dup.toml"
        dup.write_text(g.cfg["east"].read_text().replace(g.addr["east"], listen)
                       .replace(g.metrics["east"], f"127.0.0.1:{free_port()}"))
        r = run_drsync("config", "check", "--config", dup, "--json")
        checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
        assert r.code == 2, r.out
        assert not checks["state directory"]["ok"] and f"pid {pid}" in checks["state directory"]["detail"]
        assert g.addr["east"] in checks["state directory"]["detail"]
        assert checks["listen address"]["ok"] and "running agent" not in checks["listen address"]["detail"]
        assert not checks["agent name"]["ok"] and g.addr["east"] in checks["agent name"]["detail"], checks
        assert listen in checks["agent name"]["detail"]
    finally:
        g.stop_all()


def test_an_advertise_address_that_cannot_work_is_flagged_and_a_live_agent_is_never_called_gone(
        tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: advertise = loopback with another port passed config check while the agent was stopped, the
    agent did not warn, and drsync status called the live, heartbeating agent "down ... process gone"."""
    g = Group(tmp_path, zk_server.hosts, group, ["east"])
    try:
        wrong = f"127.0.0.1:{free_port()}"
        cfg = g.cfg["east"]
        cfg.write_text(cfg.read_text().replace("[agent]\n", f'[agent]\nadvertise = "{wrong}"\n'))
        r = run_drsync("config", "check", "--config", cfg, "--json")
        adv = {c["name"]: c for c in json.loads(r.out)["checks"]}["advertise address"]
        assert adv["warn"] and "loopback" in adv["detail"] and g.addr["east"].rsplit(":", 1)[1] in adv["detail"]
        table = run_drsync("config", "check", "--config", cfg).out
        assert any(ln.startswith("advertise address") and " WARN " in ln for ln in table.splitlines()), table
        g.start("east")
        # The agent registers first and examines its advertise address after: wait for its line.
        warned = wait_for(lambda: [ln for ln in g.log("east").splitlines() if " WARNING " in ln and wrong in ln],
                          "east to warn about its advertise address")
        assert "loopback" in warned[0], g.log("east")
        wait_for(lambda: g.record("east").get("advertise_answers") is False, "east to find its advertise dead")
        doc = g.status("east")
        east = next(a for a in doc["agents"] if a["name"] == "east")
        assert east["state"] == "up" and "does not answer" in east["note"] and "gone" not in (east["down_reason"] or "")
        out = g.drsync("east", "status").out
        assert f"agent east is up, but its advertised address {wrong} does not answer" in out, out
        # A running agent whose advertise does not answer: config check's wording is its own (no shipper words).
        r = run_drsync("config", "check", "--config", cfg, "--json", "--timeout", "2")
        adv = {c["name"]: c for c in json.loads(r.out)["checks"]}["advertise address"]
        assert not adv["ok"] and "will retry" not in adv["detail"] and "standby" not in adv["detail"], adv
    finally:
        g.stop_all()


def test_a_bandwidth_target_naming_no_standby_is_a_warning(tmp_path: Path) -> None:
    """A typo in [replication.targets."..."] would leave the WAN standby without its limit: config check says
    so (WARN), naming the key; a key that names a standby checks out."""
    (tmp_path / "data").mkdir()
    standby = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[agent]\nname = "east"\nrole = "primary"\n'
                   f'listen = "127.0.0.1:{free_port()}"\nmetrics = ""\n[replication]\nstandbys = ["{standby}"]\n'
                   f'[replication.targets."127.0.0.1:1"]\nbandwidth_limit = "1MiB/s"\n')
    init_repo(cfg)
    checks = {c["name"]: c for c in json.loads(run_drsync("config", "check", "--config", cfg, "--json").out)["checks"]}
    t = checks["standby targets"]
    assert t["ok"] and t["warn"] and "'127.0.0.1:1' name no standby in replication.standbys" in t["detail"], t
    cfg.write_text(cfg.read_text().replace('targets."127.0.0.1:1"', f'targets."{standby}"'))
    checks = {c["name"]: c for c in json.loads(run_drsync("config", "check", "--config", cfg, "--json").out)["checks"]}
    assert checks["standby targets"]["ok"] and not checks["standby targets"]["warn"], checks["standby targets"]


def test_apply_delay_with_the_distcp_engine_is_refused_by_check_and_at_start(tmp_path: Path) -> None:
    """A delayed apply with engine "distcp" copies from production's HDFS snapshot of the capture, which the
    primary keeps only while it ships that snapshot: with an interval shorter than the delay every delayed
    apply failed with "is gone" once due. Refused with one line naming both keys (check and agent start)."""
    cfg = tmp_path / "standby.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "webhdfs://127.0.0.1:{free_port()}/standby"\n'
                   f'repository = "{tmp_path}/repo"\n'
                   f'[agent]\nname = "west"\nrole = "standby"\nlisten = "127.0.0.1:{free_port()}"\nmetrics = ""\n'
                   '[replication]\nengine = "distcp"\napply_delay = "30m"\n')
    r = run_drsync("config", "check", "--config", cfg, "--json", "--timeout", "0.5")
    checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
    detail = checks["replication engine"]["detail"]
    assert r.code == 2 and not checks["replication engine"]["ok"], r.out
    assert "replication.apply_delay" in detail and "replication.engine" in detail, detail
    r = run_drsync("agent", "--config", cfg)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "replication.apply_delay" in r.err and "replication.engine" in r.err and "Traceback" not in r.err


def test_an_advertise_address_of_another_host_is_a_warning_while_the_agent_is_stopped(tmp_path: Path) -> None:
    """Issue 20 audit: with the agent stopped, config check said "ok ... (not dialled)" for any advertise
    address that resolves. One that is no address of this host (checked by binding to it) is a WARN naming
    the address and what to do; this host's own address stays ok."""
    (tmp_path / "data").mkdir()
    listen = f"127.0.0.1:{free_port()}"
    base = (f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path / "data"}"\nrepository = "{tmp_path / "repo"}"\n'
            f'[agent]\nname = "east"\nrole = "primary"\nlisten = "{listen}"\nmetrics = ""\n')
    cfg = tmp_path / "p.toml"
    cfg.write_text(base)
    init_repo(cfg)
    elsewhere = "192.0.2.7:7420"  # TEST-NET-1: no interface of this host has it
    cfg.write_text(base.replace("[agent]\n", f'[agent]\nadvertise = "{elsewhere}"\n'))
    r = run_drsync("config", "check", "--config", cfg, "--json")
    adv = {c["name"]: c for c in json.loads(r.out)["checks"]}["advertise address"]
    assert adv["ok"] and adv["warn"], adv
    assert f"agent.advertise {elsewhere} resolves to 192.0.2.7, which is no address of this host" in adv["detail"]
    assert "set agent.advertise to this host's own reachable host:port" in adv["detail"], adv
    table = run_drsync("config", "check", "--config", cfg).out
    assert any(ln.startswith("advertise address") and " WARN " in ln for ln in table.splitlines()), table
    cfg.write_text(base.replace("[agent]\n", f'[agent]\nadvertise = "{listen}"\n'))  # this host's own address
    r = run_drsync("config", "check", "--config", cfg, "--json")
    adv = {c["name"]: c for c in json.loads(r.out)["checks"]}["advertise address"]
    assert adv["ok"] and not adv["warn"] and "resolves (not dialled" in adv["detail"], adv
