"""A group of real agents with ZooKeeper roles (agent.role = auto), as subprocesses over loopback gRPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drsync.coordination import SessionState
from drsync.coordination.zookeeper import ZooKeeperCoordinator
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import SLOW, Result, init_repo, make_tree, run_drsync, tree_state
from tests.zk import free_port


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60, step: float = 0.05) -> Any:
    """Poll ``cond`` until it is true; ``timeout`` is what an idle machine needs at most (times SLOW).

    Between two polls it waits ``step``, or as long as the last poll took if that was longer (at most a
    second): a costly condition (a tree compared over WebHDFS, a command run) then takes at most about
    half of a core from the system it waits for, and answers at most a second late."""
    timeout *= SLOW
    deadline = time.monotonic() + timeout
    while (start := time.monotonic()) < deadline:
        v = cond()
        if v:
            return v
        time.sleep(min(max(step, time.monotonic() - start), max(step, 1.0)))
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Group:
    """Agents named by the caller; the first one holds the production data."""

    def __init__(self, tmp: Path, hosts: str, group: str, names: list[str], *, session_timeout: str = "4s",
                 failover: str = "manual", extra: str = "", interval: str = "1s", data: bool = True,
                 replication: str = "", auth: tuple[str, str] = ("", "")) -> None:
        self.tmp, self.hosts, self.group, self.names = tmp, hosts, group, names
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.data: dict[str, Path] = {}
        self.addr: dict[str, str] = {}
        self.metrics: dict[str, str] = {}
        self.cfg: dict[str, Path] = {}
        for i, name in enumerate(names):
            self.data[name] = tmp / f"{name}-data"
            if i == 0 and data:
                make_tree(self.data[name], files=20, big=1)
            else:
                self.data[name].mkdir()
            self.addr[name] = f"127.0.0.1:{free_port()}"
            self.metrics[name] = f"127.0.0.1:{free_port()}"
            p = tmp / f"{name}.toml"
            p.write_text(
                f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{self.data[name]}"\n'
                f'repository = "{tmp / (name + "-repo")}"\n'
                f'[agent]\nname = "{name}"\nrole = "auto"\nlisten = "{self.addr[name]}"\n'
                f'metrics = "{self.metrics[name]}"\n'
                f'[coordination]\nzookeeper = "{hosts}"\ngroup = "{group}"\nsession_timeout = "{session_timeout}"\n'
                f'failover = "{failover}"\nfailover_grace = "1s"\n{extra}\n'
                f'[replication]\ninterval = "{interval}"\n{replication}\n')
            init_repo(p)
            self.cfg[name] = p
        self.coord = ZooKeeperCoordinator(hosts, group, session_timeout_s=10.0, username=auth[0], password=auth[1])
        self.coord.start()
        self.tls: tuple[str, str, str] | None = None  # (CA, certificate, key) of the test's own gRPC calls

    def use_tls(self, pki: Path) -> None:
        """Mutual TLS between the agents, before they start: each has its own certificate (``pki/<name>.pem``
        and ``.key``, of ``pki/ca.pem``) and accepts shipments only from the group's (tls.allowed_peers); the
        test's own calls use ``pki/test.pem``. Appends a [tls] table: call :meth:`add_replication` before."""
        peers = ", ".join(f'"{n}"' for n in self.names)
        for name in self.names:
            with open(self.cfg[name], "a") as f:
                f.write(f'[tls]\nca = "{pki / "ca.pem"}"\ncert = "{pki / name}.pem"\nkey = "{pki / name}.key"\n'
                        f'allowed_peers = [{peers}]\n')
        self.tls = (str(pki / "ca.pem"), str(pki / "test.pem"), str(pki / "test.key"))

    def add_replication(self, name: str, line: str) -> None:
        """Add ``line`` (e.g. ``upstream = "near"``) to agent ``name``'s [replication], its config's last table."""
        with open(self.cfg[name], "a") as f:
            f.write(line.rstrip("\n") + "\n")

    # --- processes ------------------------------------------------------------------

    def start(self, name: str, wait: bool = True, env: dict[str, str] | None = None) -> None:
        """Start agent ``name`` (``env``: its whole environment, e.g. with libfaketime preloaded)."""
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "drsync", "agent", "--config", str(self.cfg[name])], stdout=log, stderr=log,
                env=env)
        if wait:
            proc = self.procs[name]
            wait_for(lambda: name in self.coord.agents() or proc.poll() is not None,
                     f"agent {name} to register in ZooKeeper")
            if proc.poll() is not None:
                tail = self.log(name).strip().splitlines()[-3:]
                raise AssertionError(f"agent {name} exited with {proc.returncode}: " + " / ".join(tail))

    def start_all(self, primary: str, env: dict[str, dict[str, str]] | None = None) -> None:
        """Start every agent (``env``: the environment of some by name) and make ``primary`` the primary."""
        for n in self.names:
            self.start(n, env=(env or {}).get(n))
        r = self.promote(primary)
        assert r.code == 0, r.err

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        p.send_signal(sig)
        p.wait(timeout=30 * SLOW)  # a stop finishes the cycle under way first

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.procs[name].send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.kill(name, signal.SIGTERM)
        self.coord.close()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    # --- the group as ZooKeeper and the agents see it ----------------------------------

    def drsync(self, name: str, *args: str) -> Result:
        return run_drsync(*args, "--config", self.cfg[name])

    def promote(self, name: str, *flags: str) -> Result:
        return self.drsync(name, "promote", "--json", *flags)

    def connected(self) -> ZooKeeperCoordinator:
        """The test's own client, once connected (after a ZooKeeper server died it reconnects to another)."""
        wait_for(lambda: self.coord.state is SessionState.CONNECTED, "the test's ZooKeeper client to reconnect")
        return self.coord

    def primary(self) -> tuple[str, int] | None:
        p = self.connected().read_primary()
        return (p.agent, p.epoch) if p else None

    def record(self, name: str) -> dict[str, Any]:
        return self.connected().agents().get(name, {})

    def wait_role(self, name: str, role: str, timeout: float = 60) -> None:
        wait_for(lambda: self.record(name).get("role") == role, f"agent {name} to report role {role}", timeout)

    def hello(self, name: str) -> Any:
        link = GrpcStandbyLink(self.addr[name], tls=self.tls)
        try:
            return link.hello("test", 0)
        finally:
            link.close()

    def wait_serving(self, name: str, timeout: float = 60) -> None:
        """Until the agent answers over gRPC (after a kill -9 its old ZooKeeper node lingers a while)."""
        def answers() -> bool:
            try:
                self.hello(name)
                return True
            except Exception:
                return False
        wait_for(answers, f"agent {name} to serve", timeout)

    def in_sync(self, source: str, target: str) -> bool:
        return tree_state(self.data[source]) == tree_state(self.data[target])

    def wait_synced(self, source: str, target: str, what: str, after: str = "", timeout: float = 60) -> str:
        """Until ``target``'s root equals ``source``'s and ``target`` reports an applied snapshot other than
        ``after``; returns that snapshot id. (An apply renames the tree into place before it records the
        snapshot as applied, so equal trees alone do not say which snapshot the standby reports.)"""
        def synced() -> str:
            if not self.in_sync(source, target):
                return ""
            applied = self.hello(target).applied_snapshot
            return applied if applied and applied != after else ""
        return str(wait_for(synced, what, timeout))

    def status(self, name: str) -> dict[str, Any]:
        r = self.drsync(name, "status", "--json")
        assert r.code == 0, r.err
        return json.loads(r.out)


class PrimaryWatcher:
    """Records every change of the group's ``primary`` and ``epoch`` nodes, as ZooKeeper reports them."""

    def __init__(self, hosts: str, group: str) -> None:
        self.coord = ZooKeeperCoordinator(hosts, group, session_timeout_s=10.0)
        self.coord.start()
        self.primary: list[tuple[str, int] | None] = []
        self.epochs: list[int] = []
        self._lock = threading.Lock()
        base = f"/drsync/{group}"
        self.coord.zk.DataWatch(f"{base}/primary", self._on_primary)
        self.coord.zk.DataWatch(f"{base}/epoch", self._on_epoch)

    def _on_primary(self, data: bytes | None, stat: Any, event: Any = None) -> None:
        with self._lock:
            doc = json.loads(data) if data else None
            self.primary.append((doc["agent"], doc["epoch"]) if doc else None)

    def _on_epoch(self, data: bytes | None, stat: Any, event: Any = None) -> None:
        with self._lock:
            if data:
                self.epochs.append(int(json.loads(data)["epoch"]))

    def close(self) -> None:
        self.coord.close()


def scrape(address: str, group: str, agent: str) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.labels.get("group") == group and s.labels.get("agent") == agent:
                out[s.name] = s.value
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
