"""Start, drive and stop a real HDFS mini cluster (Hadoop 3.5's MiniDFSCluster in its own JVM).

Only the standard library here, so that ``scripts/hadoop-cluster`` runs with any Python 3.11.
The Java side is ``tests/hadoop/src/main/java/drsync/hadoop/MiniCluster.java``, built with Maven
from ``tests/hadoop/pom.xml`` on first use (Debian's ``maven`` is installed if missing; the jars
come from Maven Central). :func:`build` also builds drsync's own DistCp copy listing
(``java/distcp``, product code: ``DISTCP_JAR``), and :func:`distcp_command` runs Hadoop's DistCp
in a new JVM against a cluster, as ``hadoop distcp`` would. ``scripts/hadoop-cluster`` is the
command-line face of this module.

A started cluster is described by ``DIR/cluster.json``:

- ``webhdfs``: ``host:port`` of every namenode's WebHDFS, the active one first;
- ``hdfs``: the RPC URI (``hdfs://drsync-ns`` for an HA pair, with ``conf_dir`` holding the
  client configuration that resolves it);
- ``pid``: the JVM's process id; ``control``: the loopback URL of its admin port;
- ``namenodes``: index, id (``nn1``...), state, webhdfs and rpc address of each namenode;
- ``superuser``: the HDFS superuser (the user that started the cluster).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
TARGET = HERE / "target"
JAR = TARGET / "drsync-minicluster-1.jar"
CLASSPATH = TARGET / "classpath.txt"
MAIN = "drsync.hadoop.MiniCluster"
# drsync's DistCp copy listing (drsync.distcp.ListedCopyListing): product code, built here too.
DISTCP_DIR = HERE.parent.parent / "java" / "distcp"
DISTCP_JAR = DISTCP_DIR / "target" / "drsync-distcp.jar"
DISTCP_MAIN = "org.apache.hadoop.tools.DistCp"


class HadoopClusterError(RuntimeError):
    """The cluster could not be built, started or asked; the message says what to look at."""


def _sources(project: Path) -> list[Path]:
    return [project / "pom.xml", *sorted((project / "src").rglob("*"))]


def _stale(project: Path, outputs: list[Path]) -> bool:
    """Whether a Maven project must be built: an output is missing or older than a source."""
    if not all(p.exists() for p in outputs):
        return True
    built = min(p.stat().st_mtime for p in outputs)
    return any(p.is_file() and p.stat().st_mtime > built for p in _sources(project))


def _ensure_maven() -> str:
    mvn = shutil.which("mvn")
    if mvn:
        return mvn
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "maven"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    mvn = shutil.which("mvn")
    if not mvn:
        raise HadoopClusterError("Maven is not installed and apt-get could not install it: install Debian's maven")
    return mvn


def _package(project: Path, what: str, outputs: list[Path]) -> None:
    proc = subprocess.run([_ensure_maven(), "-q", "-B", "-f", str(project / "pom.xml"), "package", "-DskipTests"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise HadoopClusterError(f"building {what} failed (mvn package in {project}):\n{tail}")
    for p in outputs:  # Maven leaves an unchanged output (classpath.txt) as it was: stale at every call
        os.utime(p)


def build() -> list[str]:
    """Build the launcher and drsync's DistCp listing (``DISTCP_JAR``) where their sources changed;
    return the mini cluster's Java classpath (its jar first; the DistCp listing jar is not on it)."""
    TARGET.mkdir(exist_ok=True)
    with open(TARGET / ".build.lock", "w") as lock:  # two test workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stale(HERE, [JAR, CLASSPATH]):
            _package(HERE, "the HDFS mini cluster", [JAR, CLASSPATH])
        if _stale(DISTCP_DIR, [DISTCP_JAR]):
            _package(DISTCP_DIR, "drsync's DistCp copy listing", [DISTCP_JAR])
    return [str(JAR), *CLASSPATH.read_text().strip().split(":")]


def _distcp_jvm(dir: str | os.PathLike[str], main: str, args: list[str], hadoop_classpath: str | None) -> list[str]:
    c = attach(dir)
    cp = [str(c.info["conf_dir"]), *build()]
    extra = os.environ.get("HADOOP_CLASSPATH", "") if hadoop_classpath is None else hadoop_classpath
    cp += [p for p in extra.split(":") if p]
    # A short-lived client JVM: C1 only and the serial collector start it about 0.6 s sooner.
    return [_java(), "-Xmx1g", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j.configuration={(HERE / 'distcp-log4j.properties').as_uri()}", "-cp", ":".join(cp), main, *args]


def distcp_command(dir: str | os.PathLike[str], args: list[str]) -> list[str]:
    """``hadoop distcp ARGS`` against the cluster of ``dir`` as a command for a new JVM: its client
    configuration (``conf_dir``) first on the classpath, then the mini cluster's jars, then
    ``$HADOOP_CLASSPATH`` (as ``hadoop`` adds it), MapReduce's local runner, Hadoop's log lines on
    stderr (INFO, as ``hadoop`` logs to the console). The cluster must be running."""
    return _distcp_jvm(dir, DISTCP_MAIN, args, None)


def distcp_runs(dir: str | os.PathLike[str], runs: list[list[str]], *, hadoop_classpath: str = "",
                timeout: float = 300) -> list[tuple[int, str]]:
    """Several DistCp runs as :func:`distcp_command` makes them, in one JVM (``DistCpRuns``, for tests
    with many cases): each run's return value (-1 where ``hadoop distcp`` exits 255) and log lines."""
    TARGET.mkdir(exist_ok=True)
    file = TARGET / f"distcp-runs.{os.getpid()}.{time.monotonic_ns()}.json"
    file.write_text(json.dumps(runs))
    try:
        command = _distcp_jvm(dir, "drsync.hadoop.DistCpRuns", [str(file)], hadoop_classpath)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        file.unlink()
    out: list[tuple[int, str]] = []
    log: list[str] = []
    for line in proc.stderr.splitlines():
        if line.startswith("drsync-distcp-run "):
            log = []
        elif line.startswith("drsync-distcp-rc "):
            out.append((int(line.split()[2]), "\n".join(log)))
        else:
            log.append(line)
    if proc.returncode != 0 or len(out) != len(runs):
        raise HadoopClusterError(f"DistCpRuns failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return out


@dataclass
class HadoopCluster:
    """A running mini cluster: its directory and description (``cluster.json``)."""

    dir: Path
    info: dict[str, Any]

    @property
    def webhdfs(self) -> list[str]:
        return list(self.info["webhdfs"])

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> dict[str, Any]:
        """One admin action (see MiniCluster.java): ``{"rc", "out", "err"}`` and more for some."""
        req = urllib.request.Request(f"{self.info['control']}/run", data=json.dumps(list(args)).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                answer: dict[str, Any] = json.loads(r.read())
        except (OSError, ValueError) as e:
            raise HadoopClusterError(f"the mini cluster in {self.dir} does not answer ({e}); is it running?") from e
        if check and answer.get("rc") != 0:
            raise HadoopClusterError(f"{' '.join(args)} failed (rc {answer.get('rc')}): "
                                     f"{(answer.get('err') or answer.get('out') or '').strip()}")
        return answer

    def dfsadmin(self, *args: str, check: bool = True) -> dict[str, Any]:
        return self.run("dfsadmin", *args, check=check)

    def haadmin(self, *args: str, check: bool = True) -> dict[str, Any]:
        return self.run("haadmin", *args, check=check)

    def state(self) -> dict[str, Any]:
        """Namenode states now: ``{"webhdfs": [...active first], "namenodes": [...], "datanodes": N}``."""
        out: dict[str, Any] = json.loads(self.run("state")["out"])
        return out

    def audit_next(self) -> int:
        """The number the next audit event will get (take it before an action, then ``audit`` it)."""
        return int(self.run("audit", str(1 << 62))["next"])  # asks for no event, only the next number

    def audit(self, since: int) -> list[dict[str, Any]]:
        """The namenodes' audit events numbered ``since`` and later: ``ok``, ``user``, ``cmd``,
        ``src``, ``dst``, ``seq`` (``cmd`` is Hadoop's name: ``open``, ``listStatus``, ``create``,
        ``computeSnapshotDiff``...)."""
        events: list[dict[str, Any]] = self.run("audit", str(since))["events"]
        return events

    def token(self, user: str) -> str:
        """A delegation token for ``user``, URL-encoded (as WebHDFS's ``delegation=`` takes it)."""
        return str(self.run("token", user)["token"])

    def alive(self) -> bool:
        """Whether the JVM still runs (a child of this process that has exited is reaped here)."""
        try:
            if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                return False
        except ChildProcessError:
            pass  # started by another process: ask the kernel
        try:  # the PID may have been reused since the JVM died: it must still be the launcher
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return MAIN.encode() in cmdline and str(self.dir).encode() in cmdline

    def stop(self, timeout: float = 60) -> None:
        stop(self.dir, timeout=timeout)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java:
        raise HadoopClusterError("no java on PATH: install a Java 17 JDK (Debian: openjdk-17-jre-headless)")
    return java


def start(dir: str | os.PathLike[str], *, ha: bool = False, datanodes: int = 1, block_size: int = 1 << 20,
          ls_limit: int = 1000, heap: str = "2g", timeout: float = 300, lean: bool = False) -> HadoopCluster:
    """Start a cluster in the background and wait until it answers (``timeout`` seconds at most). ``lean``
    (tests): the serial collector and the C1 compiler only, as the suite's ZooKeeper and DistCp JVMs have
    them: half the JVM's CPU over the HDFS tests (56 s to 28 s), where the data moved is small; benchmarks
    keep the JVM's defaults."""
    d = Path(dir).resolve()
    if datanodes < 0:
        raise HadoopClusterError(f"--datanodes {datanodes}: give 0 or more datanodes")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HadoopClusterError(f"cannot use {d} for a cluster: {e.strerror}") from None
    existing = _read(d)
    if existing is not None and existing.alive():
        raise HadoopClusterError(f"a mini cluster already runs from {d} (pid {existing.pid}): stop it first")
    for leftover in ("cluster.json", "hdfs", "conf", "tmp", "jvm-tmp"):
        p = d / leftover
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cp = build()
    (d / "jvm-tmp").mkdir()  # the JVM's temporary files (Jetty's web app directories) go with the cluster
    args = [_java(), f"-Xmx{heap}", *(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"] if lean else []),
            "-Djava.net.preferIPv4Stack=true", f"-Djava.io.tmpdir={d / 'jvm-tmp'}", "-cp", ":".join(cp), MAIN,
            "--dir", str(d), "--datanodes", str(datanodes), "--block-size", str(block_size),
            "--ls-limit", str(ls_limit)]
    if ha:
        args.append("--ha")
    with open(d / "cluster.log", "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        c = _read(d)
        if c is not None:
            return c
        if proc.poll() is not None or "Exception in thread \"main\"" in _tail(d / "cluster.log", 200):
            proc.kill()
            raise HadoopClusterError(f"the mini cluster failed while starting (exit {proc.wait()}): "
                                     f"{_cause(d / 'cluster.log')}; see {d}/cluster.log")
        if time.monotonic() > deadline:
            proc.kill()
            raise HadoopClusterError(f"the mini cluster did not answer within {timeout:.0f} s: see {d}/cluster.log")
        time.sleep(0.2)


def _tail(p: Path, lines: int = 15) -> str:
    try:
        text = p.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _cause(p: Path) -> str:
    """The first exception line of a failed start (the log holds the whole stack)."""
    for line in _tail(p, 400).splitlines():
        if "Exception" in line or "Error" in line:
            return line.strip().removeprefix('Exception in thread "main" ')
    return "no exception in the log"


def _read(d: Path) -> HadoopCluster | None:
    try:
        info = json.loads((d / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    return HadoopCluster(d, info)


def attach(dir: str | os.PathLike[str]) -> HadoopCluster:
    """The running cluster described in ``dir/cluster.json``."""
    c = _read(Path(dir).resolve())
    if c is None or not c.alive():
        raise HadoopClusterError(f"no mini cluster runs from {dir}: start one with scripts/hadoop-cluster start {dir}")
    return c


def stop(dir: str | os.PathLike[str], timeout: float = 60) -> bool:
    """Stop the cluster of ``dir`` by its PID (SIGTERM, then SIGKILL). False if none was running."""
    c = _read(Path(dir).resolve())
    if c is None or not c.alive():
        return False
    os.kill(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while c.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if c.alive():
        os.kill(c.pid, signal.SIGKILL)
        while c.alive():
            time.sleep(0.05)
    return True
