"""Shared fixtures: the real CLI in a subprocess, generated data trees, repositories."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# How much slower than an idle machine a busy one may be. Every wait for a condition
# (tests.group.wait_for) scales its timeout by it: a timeout is only an upper bound, so a generous
# one costs nothing when the condition comes true, and a loaded machine does not fail the suite.
SLOW = float(os.environ.get("DRSYNC_TEST_SLOWDOWN", "5"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):  # type: ignore[no-untyped-def]
        return json.loads(self.out)


def run_drsync(*args: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> Result:
    """Run the installed CLI as a real process (exit codes, stdout and stderr as users see them)."""
    proc = subprocess.run([sys.executable, "-m", "drsync", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def drsync() -> Callable[..., Result]:
    return run_drsync


def init_repo_at(url: str | os.PathLike[str], cluster_id: str, release: str) -> None:
    """What ``drsync init --repo URL --cluster-id ID --release R`` does, in this process (see :func:`init_repo`)."""
    from drsync import engine

    engine.init_repository(str(url), cluster_id=cluster_id, release=release)


def init_repo(config: str | os.PathLike[str]) -> None:
    """What ``drsync init --config FILE`` does, in this process: the repository of an agent a test starts.

    The command has tests of its own (test_snapshot_cli, test_protect, ...); a test whose subject is an
    agent pair need not pay for a process per repository (about 0.2 s of CPU, its imports)."""
    from drsync import engine
    from drsync.cli.common import Invocation
    from drsync.cli.guards import state_dir_for
    from drsync.config import load_config

    cfg = load_config(str(config))
    window = cfg.snapshots.protect
    engine.init_repository(cfg.cluster.repository, cluster_id=cfg.cluster.id, release=cfg.cluster.release,
                           protect_s=window,
                           state_dir=state_dir_for(Invocation(cfg, None, False, False)) if window > 0 else "")


def write_files(root: Path, files: dict[str, str]) -> None:
    """Write each relative path of ``files`` below ``root`` with its text (directories made as needed)."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def snapshot_json(repo: Path, root: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    """``drsync snapshot create --repo REPO --source ROOT --json`` (exit 0 asserted): its document."""
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", root, "--json", *extra)
    assert r.code == 0, r.err
    return r.json()  # type: ignore[no-any-return]


def make_tree(root: Path, *, seed: int = 1, files: int = 30, big: int = 2) -> None:
    """A small data tree with what restores must get right: modes, empty dirs, links, big files."""
    rnd = random.Random(seed)
    (root / "catalog").mkdir(parents=True, exist_ok=True)
    (root / "tables" / "orders").mkdir(parents=True, exist_ok=True)
    (root / "empty" / "deeper").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        p = root / "catalog" / f"f{i:03}.txt"
        p.write_text(f"file {i} " * rnd.randrange(1, 200))
    for i in range(big):
        (root / "tables" / "orders" / f"part-{i}.bin").write_bytes(rnd.randbytes(3 * 1024 * 1024 + i * 4097))
    (root / "catalog" / "empty-file").write_bytes(b"")
    secret = root / "catalog" / "secret.txt"
    secret.write_text("only the owner reads this\n")
    secret.chmod(0o600)
    script = root / "catalog" / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    os.symlink("../catalog/f000.txt", root / "tables" / "link-to-f000")
    os.symlink("orders", root / "tables" / "orders-link")
    os.utime(root / "catalog" / "f001.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (root / "empty").chmod(0o750)


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything a restore must reproduce: type, mode, mtime, content or link target; the root's own mode
    (key ".": its time moves with what is written into it after a capture)."""
    if not root.is_dir():
        return {}
    out: dict[str, tuple] = {".": ("root", root.stat().st_mode & 0o7777)}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".drsync"):
                continue
            try:
                st = p.lstat()
                if p.is_symlink():
                    out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
                elif p.is_dir():
                    out[rel] = ("dir", st.st_mode & 0o7777, st.st_mtime_ns)
                else:
                    out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime_ns, p.read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                continue  # moved away while we walked (an apply in flight): the caller compares again
    return out


@pytest.fixture
def open_tmp():  # type: ignore[no-untyped-def]
    """A scratch directory every user can reach (pytest's own is private to root)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="drsync-users-"))
    base.chmod(0o755)
    yield base
    subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True, check=False)
    subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_tree(root)
    return root


@pytest.fixture
def repo_url(tmp_path: Path) -> str:
    url = str(tmp_path / "repo")
    init_repo_at(url, "east", "6.2.1")
    return url


def age_tree(root: Path, seconds: int = 10) -> None:
    """Move every mtime into the past, so nothing counts as 'racily' modified during a capture."""
    # Through directory descriptors, bottom up: works for any name and for paths beyond PATH_MAX.
    for _dirpath, dirs, files, dfd in os.fwalk(os.fsencode(root), topdown=False):
        for name in files + dirs:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9), dir_fd=dfd,
                     follow_symlinks=False)


# --- real ZooKeeper ------------------------------------------------------------------


# --- real HDFS (Hadoop's MiniDFSCluster) ---------------------------------------------------


@pytest.fixture(scope="session")
def hdfs_cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real HDFS for the run: an HA pair of namenodes and a datanode (tests/hadoop).

    1 MiB blocks (so that quotas and multi-block files are cheap) and 25 entries per listing page
    (``dfs.ls.limit``, so that every listing of a test tree pages).
    """
    from tests.hadoop import cluster as hc

    d = tmp_path_factory.mktemp("hdfs")
    try:
        c = hc.start(d, ha=True, datanodes=1, block_size=1 << 20, ls_limit=25, lean=True)
    except hc.HadoopClusterError as e:
        pytest.fail(f"no real HDFS for the HDFS tests: {e}")
    from drsync.storage.hdfs import HdfsFs, parse_hdfs_url
    from tests.realhdfs import BASE

    hosts = ",".join(c.webhdfs)
    su = HdfsFs(parse_hdfs_url(f"hdfs://{hosts}/?user={c.info['superuser']}"), retry_s=30)
    su.mkdirs(BASE)
    su.set_permission(BASE, 0o1777)
    yield c
    c.stop()


@pytest.fixture
def webhdfs(hdfs_cluster):  # type: ignore[no-untyped-def]
    """The real HDFS with a directory of this test's own (tests/realhdfs.py); healed afterwards
    (an active namenode, out of safe mode) for the next test."""
    from tests.realhdfs import RealHdfs

    h = RealHdfs(hdfs_cluster)
    yield h
    h.heal()


@pytest.fixture(scope="session")
def fake_webhdfs_cluster():  # type: ignore[no-untyped-def]
    """The WebHDFS test server (tests/webhdfs.py), only for faults a real namenode cannot produce
    on demand; each test that takes it says which."""
    from tests.webhdfs import WebHdfsCluster

    cluster = WebHdfsCluster(namenodes=2)
    cluster.active = 1  # the first namenode is the standby: every client exercises HA failover
    yield cluster
    cluster.close()


@pytest.fixture
def fake_webhdfs(fake_webhdfs_cluster, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The shared WebHDFS test server, reset to a healthy state, with a directory of this test's own."""
    import uuid

    c = fake_webhdfs_cluster
    c.safe_mode, c.active, c.require_token, c.snapshot_diff, c.list_limit = False, 1, False, True, 1000
    c.list_snapshot_dir = True
    c.on_request = None
    c.test_dir = f"/t/{uuid.uuid4().hex[:10]}"
    c.mkdirs(c.test_dir)
    yield c
    c.on_request = None
    c.safe_mode = False
    c.active = 1


@pytest.fixture(scope="session")
def zk_server():  # type: ignore[no-untyped-def]
    """One standalone ZooKeeper for the whole run; tests keep apart by group name."""
    from tests.zk import ZkCluster, zookeeper_available

    if not zookeeper_available():
        pytest.fail("ZooKeeper is not installed: run the tests with make test, which installs it")
    cluster = ZkCluster.create(1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def zk_ensemble():  # type: ignore[no-untyped-def]
    """A fresh 3-node ensemble, for tests that kill servers."""
    from tests.zk import ZkCluster

    cluster = ZkCluster.create(3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def group(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ZooKeeper group name unique to the test. Like :func:`tmp_path`, it does not spell the test's
    name: a group name is in every agent log line (``group=...``), and a test that looks for a word in
    its output must not find it in its own name."""
    import uuid

    name = f"g-{uuid.uuid4().hex[:12]}"
    _index(tmp_path_factory, f"group {name}", request.node.nodeid)
    return name


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's ``tmp_path`` under a name that does not spell the test's (``t0``, ``t1``, ...).

    pytest names the directory after the test (``test_the_watch_limit_...0``), and the directory is in
    paths that logs, errors and reports print: ``"watch" in line`` or ``"damaged" in r.err`` then held for
    any line naming a path, and could not fail. Which test a directory belongs to is in ``index.txt`` of
    the worker's base directory (for a failure's post-mortem)."""
    path = tmp_path_factory.mktemp("t", numbered=True)
    _index(tmp_path_factory, str(path), request.node.nodeid)
    return path


def _index(factory: pytest.TempPathFactory, what: str, nodeid: str) -> None:
    with open(factory.getbasetemp() / "index.txt", "a", encoding="utf-8") as f:
        f.write(f"{what}\t{nodeid}\n")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist a worker hands its reliability results to the controller."""
    from dataclasses import asdict

    from tests import reliability

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["drsync_reliability"] = json.dumps([asdict(r) for r in reliability.RESULTS])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # type: ignore[no-untyped-def]
    """The controller side of pytest_sessionfinish: every worker's results go into one table."""
    from tests import reliability

    for r in json.loads(getattr(node, "workeroutput", {}).get("drsync_reliability", "[]")):
        reliability.RESULTS.append(reliability.ScenarioResult(**r))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """The reliability suite's table: scenario, trials, faults injected, violations, data lost."""
    from tests import reliability

    if reliability.RESULTS:
        terminalreporter.write_sep("=", "reliability")
        for line in reliability.table():
            terminalreporter.write_line(line)


@pytest.fixture
def make_group(tmp_path: Path, zk_server, group: str):  # type: ignore[no-untyped-def]
    """Make agent groups on the session's ZooKeeper (``hosts`` for another ensemble); all are stopped after."""
    from tests.group import Group

    made: list[Group] = []

    def make(names: list[str], hosts: str | None = None, **kw: object) -> Group:
        g = Group(tmp_path, hosts or zk_server.hosts, group, names, **kw)  # type: ignore[arg-type]
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop_all()


@pytest.fixture
def mounts():  # type: ignore[no-untyped-def]
    """Mount tmpfs and bind mounts (:class:`tests.mounts.Mounts`); every one left is unmounted after the test."""
    from tests.mounts import Mounts

    m = Mounts()
    yield m
    for p in reversed(m.points):
        subprocess.run(["umount", "-l", str(p)], check=False)


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is private to root), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to capture as another user")
    base = Path(tempfile.mkdtemp(prefix="drsync-open-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for dp, dns, _ in os.walk(base):
            for n in dns:
                os.chmod(os.path.join(dp, n), 0o755)
        shutil.rmtree(base, ignore_errors=True)
