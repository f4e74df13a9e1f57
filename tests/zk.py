"""Throwaway real ZooKeeper servers (Debian's zookeeper 3.8 package) for tests and benchmarks.

A standalone server or an N-node ensemble on free loopback ports, each with its
own temporary data directory, started as child Java processes and stopped by
PID. Readiness is ZooKeeper's own ``ruok``/``srvr`` four-letter words.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

ZK_JAR = os.environ.get("DRSYNC_ZK_JAR", "/usr/share/java/zookeeper.jar")
ZK_CONF = "/etc/zookeeper/conf"  # log4j.properties of the package


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out come from below the kernel's ephemeral range, so no outgoing connection (a ZooKeeper
# client, a gRPC channel) can take one between the test picking it and an agent binding it; a port asked
# of the kernel (bind to 0) is from that range and was seen taken that way. Each process starts at its
# own random place (xdist workers, agents of other tests) and never hands a port out twice.
_PORTS_LOW, _PORTS_HIGH = 10_000, max(10_001, min(_ephemeral_low(), 61_000))
_port_rng = random.Random(os.getpid() ^ time.time_ns())
_ports_given: set[int] = set()
# A port handed out is also reserved for as long as this process lives, machine-wide: a one-byte record lock
# at offset ``port`` of one shared file. Another test process (an xdist worker, a second test run, a helper's
# script) then never hands out a port this one gave to an agent that is down for a moment (killed and
# restarted on its ports), which a bind test alone cannot see. The kernel drops the locks when the process
# ends; the file itself stays (empty).
_RESERVATIONS = os.path.join(tempfile.gettempdir(), "drsync-test-ports.lock")
_reservations_fd: int | None = None


def _reserve(port: int) -> bool:
    global _reservations_fd
    if _reservations_fd is None:
        _reservations_fd = os.open(_RESERVATIONS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.lockf(_reservations_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:  # another live process reserved it
        return False
    return True


def free_port() -> int:
    """A loopback TCP port nothing listens on or uses now, outside the ephemeral range, reserved for this
    process (no other test process hands it out while this one lives)."""
    for _ in range(10_000):
        port = _port_rng.randrange(_PORTS_LOW, _PORTS_HIGH)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _reserve(port):
            continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {_PORTS_LOW} and {_PORTS_HIGH}")


def four_letter(port: int, word: str, timeout_s: float = 1.0) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(word.encode())
            out = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                out += b
            return out.decode(errors="replace")
    except OSError:
        return ""


def zookeeper_available() -> bool:
    return os.path.exists(ZK_JAR) and shutil.which("java") is not None


@dataclass
class ZkNode:
    myid: int
    client_port: int
    peer_port: int
    election_port: int
    dir: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def mode(self) -> str:
        """leader, follower, standalone, or '' when it does not serve (no quorum, stopped)."""
        for line in four_letter(self.client_port, "srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

    def serving(self) -> bool:
        return four_letter(self.client_port, "ruok") == "imok" and self.mode() != ""


@dataclass
class ZkCluster:
    """One server (standalone) or an ensemble. ``hosts`` is the connect string."""

    nodes: list[ZkNode] = field(default_factory=list)
    base: str = ""

    @property
    def hosts(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @classmethod
    def create(cls, size: int = 1, base: str | None = None) -> ZkCluster:
        base = base or tempfile.mkdtemp(prefix="drsync-zk-")
        nodes = [ZkNode(i + 1, free_port(), free_port(), free_port(), os.path.join(base, f"zk{i + 1}"))
                 for i in range(size)]
        cluster = cls(nodes, base)
        for n in nodes:
            os.makedirs(os.path.join(n.dir, "data"), exist_ok=True)
            lines = ["tickTime=500", f"dataDir={n.dir}/data", f"clientPort={n.client_port}",
                     "clientPortAddress=127.0.0.1", "initLimit=10", "syncLimit=5", "minSessionTimeout=1000",
                     "maxSessionTimeout=60000", "admin.enableServer=false", "maxClientCnxns=200",
                     "4lw.commands.whitelist=ruok,stat,srvr,mntr"]
            if size > 1:
                with open(os.path.join(n.dir, "data", "myid"), "w") as f:
                    f.write(str(n.myid))
                lines += [f"server.{m.myid}=127.0.0.1:{m.peer_port}:{m.election_port}" for m in nodes]
            with open(os.path.join(n.dir, "zoo.cfg"), "w") as f:
                f.write("\n".join(lines) + "\n")
        return cluster

    def start_node(self, n: ZkNode) -> None:
        with open(os.path.join(n.dir, "zookeeper.log"), "ab") as log:
            n.proc = self._spawn(n, log)

    @staticmethod
    def _spawn(n: ZkNode, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", f"{ZK_CONF}:{ZK_JAR}",
             f"-Dzookeeper.log.dir={n.dir}", "-Dzookeeper.root.logger=INFO,CONSOLE",
             "org.apache.zookeeper.server.quorum.QuorumPeerMain", os.path.join(n.dir, "zoo.cfg")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout_s: float = 60.0) -> ZkCluster:
        for n in self.nodes:
            self.start_node(n)
        self.wait_serving(self.nodes, timeout_s)
        return self

    def wait_serving(self, nodes: list[ZkNode], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(n.serving() for n in nodes):
                return
            for n in nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    raise RuntimeError(f"zookeeper {n.myid} exited: {self.log_tail(n)}")
            time.sleep(0.1)
        raise TimeoutError(f"zookeeper did not start within {timeout_s}s: {self.log_tail(nodes[0])}")

    def log_tail(self, n: ZkNode) -> str:
        try:
            with open(os.path.join(n.dir, "zookeeper.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def leader(self) -> ZkNode | None:
        for n in self.nodes:
            if n.proc is not None and n.mode() in ("leader", "standalone"):
                return n
        return None

    def kill(self, n: ZkNode) -> None:
        if n.proc is not None:
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            n.proc.wait()
            n.proc = None

    def stop(self) -> None:
        for n in self.nodes:
            self.kill(n)
        shutil.rmtree(self.base, ignore_errors=True)
