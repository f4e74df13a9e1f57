"""Deployment files, checked as far as this machine allows: systemd-analyze, promtool, docker compose
(when the client has it), the example configs, and the runbook's commands against the real CLI."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from drsync.cli import cli
from drsync.config import config_problems, load_config, read_config_document
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def _verify_unit(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    drsync_bin = str(Path(sys.executable).parent / "drsync")  # the console script next to this interpreter
    text = (DEPLOY / "systemd" / "drsync-agent@.service").read_text()
    assert "ExecStart=/usr/local/bin/drsync agent --config /etc/drsync/%i.toml" in text
    for key in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "User=drsync"):
        assert key in text
    unit = tmp_path / "drsync-agent@east.service"  # an instance, with this machine's drsync binary
    unit.write_text(text.replace("/usr/local/bin/drsync", drsync_bin))
    r = _verify_unit(unit)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    # The check can fail: a misspelt key is reported.
    unit.write_text(text.replace("/usr/local/bin/drsync", drsync_bin).replace("KillSignal=", "KillSgnal="))
    assert "Unknown key" in _verify_unit(unit).stderr


def test_compose_stack_is_complete() -> None:
    compose_dir = DEPLOY / "compose"
    doc = yaml.safe_load((compose_dir / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"zk1", "zk2", "zk3", "east", "west", "prometheus", "grafana"} <= set(services)
    assert {services[z]["environment"]["ZOO_MY_ID"] for z in ("zk1", "zk2", "zk3")} == {1, 2, 3}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            host = vol.split(":", 1)[0]
            if host.startswith("."):
                assert (compose_dir / host).exists(), f"{name} mounts {host}, which does not exist"
    assert (ROOT / services["east"]["build"]["context"].replace("../..", ".") / services["east"]["build"][
        "dockerfile"]).exists()
    for agent in ("east", "west"):
        cfg = load_config(compose_dir / "config" / f"{agent}.toml")
        assert cfg.agent.name == agent and cfg.coordination.zookeeper == "zk1:2181,zk2:2181,zk3:2181"
        assert cfg.agent.advertise == f"{agent}:7420" and cfg.agent.role == "auto"
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(compose_dir / "prometheus.yml")], capture_output=True,
                           text=True)
        rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text().count("- alert:")
        assert r.returncode == 0 and f"{rules} rules found" in r.stdout, r.stdout + r.stderr
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0 if shutil.which(
            "docker") else False:
        r = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=compose_dir, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr


def test_example_configs_pair_up_with_tls_and_acls() -> None:
    east = load_config(DEPLOY / "examples" / "east.toml")
    west = load_config(DEPLOY / "examples" / "west.toml")
    for path in ("east.toml", "west.toml"):
        assert config_problems(read_config_document(DEPLOY / "examples" / path)) == []
    assert (east.cluster.id, east.cluster.release) == (west.cluster.id, west.cluster.release)
    assert east.coordination == west.coordination and east.coordination.username and east.coordination.password
    assert east.tls.enabled and west.tls.enabled and east.tls.cert != west.tls.cert
    assert east.agent.name != west.agent.name and east.agent.role == west.agent.role == "auto"


def _runbook_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "operations.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("drsync "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_runbook_commands_are_real() -> None:
    commands = _runbook_commands()
    assert len(commands) >= 12
    seen = set()
    for argv in commands:
        group: click.Command = cli
        path = []
        args = list(argv)
        while isinstance(group, click.Group) and args and not args[0].startswith("-"):
            name = args.pop(0)
            sub = group.get_command(click.Context(group), name)
            assert sub is not None, f"drsync {' '.join([*path, name])}: no such command"
            group = sub
            path.append(name)
        assert not isinstance(group, click.Group), f"drsync {' '.join(path)} needs a subcommand"
        known = {opt for p in group.params for opt in getattr(p, "opts", [])}
        for a in args:
            if a.startswith("--"):
                assert a.split("=", 1)[0] in known, f"drsync {' '.join(path)}: no option {a}"
        seen.add(" ".join(path))
    for needed in ("promote", "switchover", "status", "drill run", "config check", "backup restore"):
        assert needed in seen, f"the runbook never shows drsync {needed}"


def test_the_command_reference_is_current_and_every_command_explains_itself() -> None:
    """docs/cli.md is every command's --help (regenerate: python scripts/gen_cli_docs.py)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "docs" / "cli.md").read_text()
    for block in text.split("\n## ")[1:]:
        name, _, body = block.partition("\n")
        _, _, rest = body.partition("Usage:")[2].partition("\n\n")
        assert rest.strip() and not rest.lstrip().startswith("Options:"), f"{name} has no description"
    # Issue 20: what the real command prints, not a rendering that skips the group's context settings
    # (cli.md showed "--help" where drsync shows "-h, --help").
    for path in (["promote"], ["backup", "verify"], []):
        real = subprocess.run([sys.executable, "-m", "drsync", *path, "--help"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "100"})
        assert real.returncode == 0 and "-h, --help" in real.stdout, real.stdout
        section = text.split(f"\n## `{' '.join(['drsync', *path])}`\n\n```text\n", 1)[1].split("\n```\n", 1)[0]
        assert section == real.stdout.rstrip(), (path, section, real.stdout)


def test_shell_completion_script_and_completions() -> None:
    env = {**os.environ, "_DRSYNC_COMPLETE": "bash_source"}
    r = subprocess.run([sys.executable, "-m", "drsync"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "_drsync_completion" in r.stdout, r.stderr
    env = {**os.environ, "_DRSYNC_COMPLETE": "bash_complete", "COMP_WORDS": "drsync snap", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-m", "drsync"], env=env, capture_output=True, text=True)
    assert "snapshot" in r.stdout, (r.stdout, r.stderr)
