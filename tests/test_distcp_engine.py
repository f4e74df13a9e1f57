"""replication.engine = "distcp": DistCp moves the bytes between two HDFS data roots, drsync the rest.

Everything here runs on the session's real HDFS mini cluster (two directories of one cluster play
production and the standby) with real DistCp jobs: ``scripts/hadoop-cluster distcp`` starts
Hadoop's DistCp in a JVM of its own (the MapReduce local runner), as ``hadoop distcp`` would.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.bench import DISTCP_COPIED
from drsync.apply import apply_manifest
from drsync.capture import HDFS_CHECKSUM, capture
from drsync.dataroot.distcp import Cancelled, DistCpSettings, DistCpStager, listing_prefix, remove_orphaned_listings
from drsync.dataroot.hdfs import HISTORY_PREFIX, HdfsDataRoot
from drsync.errors import IntegrityError, OperationFailed, UsageError
from drsync.liveness import ProcessRef
from drsync.repository.manifest import Manifest, hdfs_checksum_digest
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import run_drsync
from tests.hadoop import cluster as hc
from tests.sites import HdfsSite, make_site, same_tree
from tests.test_agents import Pair, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
HADOOP_CLUSTER = REPO_ROOT / "scripts" / "hadoop-cluster"


def _settings(hdfs_cluster: hc.HadoopCluster, command: str | None = None) -> DistCpSettings:
    return DistCpSettings.from_strings(command or f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir}",
                                       str(hc.DISTCP_JAR), "")


def _engine_lines(hdfs_cluster: hc.HadoopCluster, command: str | None = None) -> str:
    s = _settings(hdfs_cluster, command)
    return (f'engine = "distcp"\ndistcp_command = "{" ".join(s.command)}"\n'
            f'distcp_jar = "{s.jar}"\n')


class _Repo:
    """A chunk source for applies of snapshots that hold no chunks at all."""

    def has_chunk(self, chunk_id: bytes) -> bool:
        return False

    def read_chunk(self, chunk_id: bytes) -> bytes:
        raise AssertionError("an external row was read from the repository")


def _write(site: HdfsSite, name: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        site.write(name, rel, data)


TREE = {
    "a/part-00000": b"first table " * 1000,
    "b/part-00000": os.urandom(3 * (1 << 20) + 17),  # several 1 MiB blocks, same basename as above
    "b/deeper/x y%+é.txt": b"odd name",
    "empty-file": b"",
}


@pytest.fixture
def sites(webhdfs, tmp_path: Path):  # type: ignore[no-untyped-def]
    prod = make_site("hdfs", tmp_path, webhdfs)
    assert isinstance(prod, HdfsSite)
    return webhdfs, prod


def _capture(root: HdfsDataRoot, repo: Repository, parent: Manifest | None = None, **kw):  # type: ignore[no-untyped-def]
    with repo.write_session() as session:
        writer = session.chunk_writer()
        result = capture(root, writer, parent=parent, content=HDFS_CHECKSUM, captured_at=time.time(), **kw)
        writer.flush()
    return result


def test_listing_files_of_gone_agents_are_removed_and_no_others(tmp_path: Path) -> None:
    """A SIGKILLed agent leaves its DistCp listing (production's file names) in the temporary
    directory; the next stage removes those of this host and pid namespace whose writer is gone,
    never a live agent's, another host's (its pid means nothing here) or a file drsync did not name."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = ProcessRef.current()
    gone = listing_prefix(dataclasses.replace(me, pid=dead.pid))
    assert listing_prefix().startswith("drsync-distcp-") and f"-{os.getpid()}-" in listing_prefix()
    names = [f"{gone}x1y2.lst", f"{listing_prefix()}a7b8.lst",
             f"{listing_prefix(dataclasses.replace(me, host='other.host', pid=dead.pid))}c5d6.lst",
             "drsync-distcp-k3m4.lst", f"other-{dead.pid}-x.lst", f"{gone}x.txt"]
    for n in names:
        (tmp_path / n).write_text("catalog%2Ff\t1\n")
    (tmp_path / f"{gone}dir.lst").mkdir()  # not a file: left, no error
    for host in ("prod-nn-1.example.com", "a b%c/d", "ü-host", ""):  # the name goes into a URI for DistCp
        assert re.fullmatch(r"drsync-distcp-[A-Za-z0-9._-]+-", listing_prefix(dataclasses.replace(me, host=host)))
    assert remove_orphaned_listings(str(tmp_path)) == [str(tmp_path / names[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], f"{gone}dir.lst"])


def test_a_capture_for_distcp_reads_no_file_and_keeps_its_snapshot(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, prod = sites
    _write(prod, "prod", TREE)
    cluster.allow_snapshot(prod.path("prod"))
    root = HdfsDataRoot(prod.url("prod"))
    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    result = _capture(root, repo)
    rows = {e.path: e for e in result.manifest.entries()}
    # Every non-empty file is an external row whose content is its HDFS checksum, and nothing was
    # read or stored: the bytes stay in the kept HDFS snapshot.
    for rel, data in TREE.items():
        e = rows[rel]
        if data:
            assert e.external and e.chunks == [] and e.chunk_sizes == [len(data)]
            algorithm, value = root.fs.file_checksum(f"{prod.path('prod')}/{rel}")
            assert e.content == hdfs_checksum_digest(algorithm, value)
        else:
            assert not e.external
    assert result.read_bytes == 0 and not result.manifest.chunk_ids()
    # WebHDFS answers MD5-of-MD5-of-CRC32C (it depends on block size and bytes per checksum, which
    # DistCp -pbc keeps), whatever dfs.checksum.combine.mode says: seen on Hadoop 3.5.
    assert result.checksum_algorithms and all("CRC32" in a for a in result.checksum_algorithms)
    assert result.content_snapshot in cluster.snapshots(prod.path("prod"))
    # The next capture keeps its own snapshot and deletes the one before (nothing pinned it).
    prod.write("prod", "a/part-00001", b"more")
    second = _capture(root, repo, parent=result.manifest)
    names = cluster.snapshots(prod.path("prod"))
    assert second.content_snapshot in names and result.content_snapshot not in names
    # A pinned one (a standby still copies from it) stays.
    third = _capture(root, repo, parent=second.manifest, pinned=frozenset({second.content_snapshot}))
    names = cluster.snapshots(prod.path("prod"))
    assert {second.content_snapshot, third.content_snapshot} <= set(names)
    # A row the parent holds unchanged is reused, not checksummed again.
    assert {e.path: e.content for e in third.manifest.entries()}["a/part-00000"] == rows["a/part-00000"].content


def test_a_root_that_cannot_be_snapshotted_is_refused_for_distcp(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, prod = sites
    _write(prod, "prod", {"f": b"x"})
    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    with pytest.raises(UsageError, match="allowSnapshot"):
        _capture(HdfsDataRoot(prod.url("prod")), repo)


def _captured(cluster, prod: HdfsSite, tmp_path: Path) -> tuple[Manifest, str]:  # type: ignore[no-untyped-def]
    """TREE on production, captured for DistCp: the manifest and its kept snapshot as a DistCp source."""
    _write(prod, "prod", TREE)
    cluster.allow_snapshot(prod.path("prod"))
    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    root = HdfsDataRoot(prod.url("prod"))
    result = _capture(root, repo)
    return result.manifest, f"webhdfs://{root.fs.active_namenode()}{prod.path('prod')}/.snapshot/{result.content_snapshot}"


def test_distcp_stages_verifies_and_commits(sites, hdfs_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, prod = sites
    manifest, source = _captured(cluster, prod, tmp_path)
    target = HdfsDataRoot(prod.url("standby"))
    stager = DistCpStager(_settings(hdfs_cluster), source, what="test snapshot")
    result = apply_manifest(manifest, _Repo(), target, external=stager)
    assert result.written_files == len(TREE)
    assert same_tree(prod, "standby", prod, "prod")


@pytest.mark.parametrize("over", ["webhdfs", "rpc"])
def test_a_copy_written_with_other_bytes_per_checksum_still_verifies(  # type: ignore[no-untyped-def]
        over: str, sites, hdfs_cluster, tmp_path: Path) -> None:
    """DistCp's client writes with ``dfs.bytes-per-checksum`` 1024 (a ``-D`` in the configured
    ``distcp_command``; production's files have the default 512). Found: with ``-pb`` alone the copy
    is checksummed with the client's setting (Hadoop 3.5 keeps the source's checksum type only with
    ``-pc``: RetriableFileCopyCommand.getChecksumOpt), so its HDFS checksum differed from the
    manifest's and every shipment failed drsync's check. Over ``webhdfs://`` and over the RPC URL
    (``distcp_url = hdfs://...``, COMPOSITE_CRC)."""
    cluster, prod = sites
    manifest, source = _captured(cluster, prod, tmp_path)
    command = f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir} -Ddfs.bytes-per-checksum=1024"
    url = ""
    if over == "rpc":
        rpc = str(hdfs_cluster.info["hdfs"])  # hdfs://drsync-ns, resolved by the cluster's client config
        source = rpc + "/" + source.split("/", 3)[3]
        url = f"{rpc}{prod.path('standby')}"
    settings = DistCpSettings.from_strings(command, str(hc.DISTCP_JAR), url, prod.path("standby"))
    stager = DistCpStager(settings, source, what="test snapshot")
    result = apply_manifest(manifest, _Repo(), HdfsDataRoot(prod.url("standby")), external=stager)
    assert result.written_files == len(TREE)
    assert same_tree(prod, "standby", prod, "prod")
    fs = HdfsDataRoot(prod.url("standby")).fs
    for rel, data in TREE.items():
        if data:
            assert fs.file_checksum(f"{prod.path('standby')}/{rel}") == \
                fs.file_checksum(f"{prod.path('prod')}/{rel}"), rel


def test_a_copy_that_differs_from_the_checksums_commits_nothing(sites, hdfs_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A DistCp that wrote other bytes of the same length (a bad disk, a source changed in place):
    drsync's own check after the copy refuses it and the target keeps what it had."""
    cluster, prod = sites
    manifest, source = _captured(cluster, prod, tmp_path)
    prod.write("standby", "keep.txt", b"what the standby had")
    before = prod.state("standby")
    corrupt = tmp_path / "corrupt-distcp"
    corrupt.write_text(f"#!/bin/sh\n{HADOOP_CLUSTER} distcp {hdfs_cluster.dir} \"$@\" || exit $?\n"
                       f"DRSYNC_TAMPER_WEBHDFS={','.join(hdfs_cluster.state()['webhdfs'])} "
                       f"PYTHONPATH={REPO_ROOT} exec {sys.executable} {REPO_ROOT / 'tests' / 'distcp_tamper.py'} "
                       f"\"$@\"\n")
    corrupt.chmod(0o755)
    stager = DistCpStager(_settings(hdfs_cluster, str(corrupt)), source, what="test snapshot")
    with pytest.raises(IntegrityError, match="do not match the snapshot"):
        apply_manifest(manifest, _Repo(), HdfsDataRoot(prod.url("standby")), external=stager)
    assert prod.state("standby") == before


def test_a_gone_source_snapshot_and_a_missing_distcp_are_clear_errors(sites, hdfs_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, prod = sites
    manifest, source = _captured(cluster, prod, tmp_path)
    gone = source.rsplit("/", 1)[0] + "/drsync-1-gone-1"
    target = HdfsDataRoot(prod.url("standby"))
    with pytest.raises(OperationFailed, match="is gone"):
        apply_manifest(manifest, _Repo(), target, external=DistCpStager(_settings(hdfs_cluster), gone))
    assert prod.state("standby") == {}
    bad = DistCpSettings.from_strings("no-such-hadoop distcp", str(hc.DISTCP_JAR), "")
    with pytest.raises(UsageError, match="not on PATH"):
        apply_manifest(manifest, _Repo(), target, external=DistCpStager(bad, gone))
    # Without a stager (an agent-engine standby) such a snapshot is refused, not applied as empty files.
    with pytest.raises(IntegrityError, match="captured for DistCp"):
        apply_manifest(manifest, _Repo(), target)


def test_a_cancelled_copy_stops_at_once_and_commits_nothing(sites, hdfs_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, prod = sites
    manifest, source = _captured(cluster, prod, tmp_path)
    started = tmp_path / "started"
    slow = tmp_path / "slow-distcp"  # stands for a copy of hours: it waits until killed
    slow.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 600\n")
    slow.chmod(0o755)
    cancel = threading.Event()
    stager = DistCpStager(_settings(hdfs_cluster, str(slow)), source, cancel=cancel, what="test snapshot")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            apply_manifest(manifest, _Repo(), HdfsDataRoot(prod.url("standby")), external=stager)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    wait_for(started.exists, "DistCp to start")
    cancel.set()
    t.join(60)
    assert not t.is_alive() and errors and isinstance(errors[0], Cancelled)
    assert prod.state("standby") == {}


def _history(cluster, path: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n in cluster.snapshots(path) if n.startswith(HISTORY_PREFIX)]


@pytest.fixture
def distcp_pair(tmp_path: Path, webhdfs, hdfs_cluster):  # type: ignore[no-untyped-def]
    sites = [make_site("hdfs", tmp_path, webhdfs) for _ in range(2)]
    pair = Pair(tmp_path, *sites)
    prod, standby = sites
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    webhdfs.allow_snapshot(standby.path("standby-data"))
    lines = _engine_lines(hdfs_cluster)
    with open(pair.primary_cfg, "a") as f:  # its [replication] section is the last one
        f.write(lines)
    with open(pair.standby_cfg, "a") as f:
        f.write("[replication]\n" + lines)
    yield webhdfs, pair
    pair.stop_all()


def test_an_hdfs_pair_replicates_with_distcp(distcp_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, pair = distcp_pair
    prod, standby = pair.prod_site, pair.standby_site
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to match production by DistCp", timeout=180)
    prod.write("prod-data", "catalog/f003.txt", b"changed on production")
    prod.write("prod-data", "tables/orders/new.bin", os.urandom(2_500_000))
    prod.remove("prod-data", "tables/orders/part-1.bin")
    prod.chmod("prod-data", "catalog/f004.txt", 0o640)
    wait_for(pair.in_sync, "the standby to follow a change", timeout=180)
    pair.kill("primary", signal.SIGTERM)
    link = GrpcStandbyLink(pair.standby_addr)
    applied = link.hello("test", 1).applied_snapshot
    link.close()
    # The bytes went by DistCp: the standby's repository holds manifests and no file data.
    listed = run_drsync("snapshot", "list", "--config", pair.standby_cfg, "--json").json()
    assert applied in [s["id"] for s in listed]
    repo = Repository.open(open_storage(standby.url("standby-repo")))
    manifest = repo.load_manifest(repo.find_snapshot(applied))
    assert manifest.external_count() > 0 and not manifest.chunk_ids()
    # The standby keeps each applied snapshot as an HDFS snapshot of its root, named by its id.
    wait_for(lambda: f"{HISTORY_PREFIX}{applied}" in _history(cluster, standby.path("standby-data")),
             "the applied snapshot kept as an HDFS snapshot")
    # Production keeps only the snapshots a standby may still copy from (its newest).
    kept = [n for n in cluster.snapshots(prod.path("prod-data")) if n.startswith("drsync-")]
    assert 1 <= len(kept) <= 3, kept  # the newest, and at most one offered and one in flight before it
    log = (tmp_path / "standby.log").read_text()
    assert DISTCP_COPIED.search(log), "bench/bench.py reads each DistCp job's figures from this line"
    # A drill judges the root by paths, metadata and HDFS checksums (no trial restore from a
    # repository that holds no bytes).
    drill = run_drsync("drill", "run", "--config", pair.standby_cfg, "--full", "--json")
    report = drill.json()
    verify = next(s for s in report["steps"] if s["name"] == "verify")
    assert verify["passed"] and "HDFS checksums" in verify["detail"], report
    # A restore copies by DistCp from the standby's history snapshot of what it applied.
    r = run_drsync("snapshot", "restore", applied, "--config", pair.standby_cfg, "--target",
                   standby.url("restored"))
    assert r.code == 0, r.err
    assert same_tree(standby, "restored", prod, "prod-data")


def test_an_agent_engine_standby_refuses_distcp_snapshots_and_a_local_root_refuses_the_engine(
        distcp_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, pair = distcp_pair
    # The standby without the engine: every shipment is refused with a reason, its root unchanged.
    text = pair.standby_cfg.read_text()
    pair.standby_cfg.write_text(text[:text.rindex("[replication]")])
    pair.start("standby")
    pair.start("primary")
    before = pair.standby_site.state("standby-data")
    wait_for(lambda: "captured for DistCp" in (tmp_path / "primary.log").read_text(),
             "the primary to log the standby's refusal")
    assert pair.standby_site.state("standby-data") == before
    # A local data root cannot take the engine: the agent does not start.
    local = tmp_path / "local.toml"
    local.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{tmp_path}"\nrepository = "{tmp_path / "r"}"\n'
                     f'[agent]\nname = "x"\nrole = "standby"\n[replication]\nengine = "distcp"\n')
    r = run_drsync("agent", "--config", local, timeout=60)
    assert r.code == 2 and "needs the data root on HDFS" in r.err and "Traceback" not in r.err
    check = run_drsync("config", "check", "--config", local, "--json")
    engine = next(c for c in check.json()["checks"] if c["name"] == "replication engine")
    assert not engine["ok"] and "needs the data root on HDFS" in engine["detail"]



def test_distcp_dies_with_a_killed_agent(tmp_path: Path) -> None:
    """kill -9 of the process running DistCp (the standby's agent) leaves no copy running on: the
    JVM gets SIGKILL from the kernel (PR_SET_PDEATHSIG, by setpriv)."""
    pid_file = tmp_path / "distcp.pid"
    slow = tmp_path / "slow-distcp"  # stands for a long DistCp JVM
    slow.write_text(f"#!/bin/sh\necho $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}\nexec sleep 600\n")
    slow.chmod(0o755)
    script = (
        "from drsync.dataroot.distcp import DistCpSettings, DistCpStager\n"
        "from drsync.repository.manifest import Entry\n"
        f"s = DistCpSettings((r'{slow}',), r'{slow}', 'webhdfs://127.0.0.1:1/standby')\n"
        "e = Entry('f', 'file', 0o644, 0, 0, 5, 0, None, [], [5], content=b'x' * 32)\n"
        "DistCpStager(s, 'webhdfs://127.0.0.1:1/prod/.snapshot/x').stage(object(), [(0, e)])\n")
    agent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    try:
        wait_for(pid_file.exists, "DistCp to start")
        copy = int(pid_file.read_text())
        assert Path(f"/proc/{copy}").exists()
        agent.kill()
        agent.wait(30)
        wait_for(lambda: not Path(f"/proc/{copy}").exists() or "zombie" in _proc_state(copy),
                 "DistCp to die with its agent")
    finally:
        if agent.poll() is None:
            agent.kill()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def test_the_cause_of_a_failed_distcp_is_its_first_real_exception() -> None:
    from drsync.dataroot.distcp import _cause

    out = ["2026-12-01 INFO mapreduce.Job: map 0% reduce 0%",
           "Caused by: org.apache.hadoop.security.AccessControlException: Permission denied: user=drsync, "
           "access=READ, inode=\"/prod/.snapshot/s/catalog/salaries.csv\":produser:supergroup:-rw-------",
           "Exception: without a class name",
           "java.io.IOException: DistCp failure: Job job_local1_0001 has failed: NA"]
    cause = _cause(out)
    assert cause.startswith("AccessControlException: Permission denied") and "salaries.csv" in cause
    assert "grant it read access" in cause
    assert _cause(["java.io.IOException: DistCp failure: Job x has failed: NA"]).startswith("IOException: DistCp")
    assert _cause(["ERROR tools.DistCp: something"]) == "ERROR tools.DistCp: something"
    assert _cause([]) == "no output"


def test_a_promotion_applies_the_snapshots_waiting_for_apply_delay_after_stopping_a_copy(  # type: ignore[no-untyped-def]
        sites, hdfs_cluster, tmp_path: Path) -> None:
    """A take-over stops the DistCp copy in flight (Committer.cancel_staging), then applies what waits for
    replication.apply_delay (apply_due(everything=True)). Found: the stop was a flag left set, so that
    apply's own DistCp was killed at its first look at it and the waiting snapshot was dropped from the
    pending list with an error; the promoted root lacked it. A delayed apply whose copy is stopped keeps
    its snapshot pending."""
    from drsync.agent.standby import StandbyReceiver
    from drsync.agent.state import StateStore
    from drsync.engine import SnapshotRequest, create_snapshot
    from drsync.transport import Caller
    from tests.test_pointintime import _ship

    cluster, prod = sites
    _write(prod, "prod", {"a/part-00000": b"first table " * 1000})
    cluster.allow_snapshot(prod.path("prod"))
    cluster.mkdirs(prod.path("standby"))
    cluster.allow_snapshot(prod.path("standby"))
    gate, started = tmp_path / "hold", tmp_path / "started"
    gated = tmp_path / "gated-distcp"  # a copy of hours while the gate exists
    gated.write_text("#!/bin/sh\n"
                     f"if [ -e {gate} ]; then touch {started}; while [ -e {gate} ]; do sleep 0.1; done; fi\n"
                     f"exec {HADOOP_CLUSTER} distcp {hdfs_cluster.dir} \"$@\"\n")
    gated.chmod(0o755)
    settings = _settings(hdfs_cluster, str(gated))
    primary = Repository.init(open_storage(str(tmp_path / "prod-repo")), cluster_id="c", release="1")
    standby = Repository.init(open_storage(str(tmp_path / "standby-repo")), cluster_id="c", release="1")
    store = StateStore(str(tmp_path / "state"))
    rx = StandbyReceiver(standby, prod.url("standby"), store, agent="standby", distcp=settings, apply_delay_s=3600)
    caller = Caller(sender="primary", epoch=1, sent_at=time.time(), received_at=time.time(), instance="i1")
    try:
        first = create_snapshot(primary, SnapshotRequest(prod.url("prod"), kind="cycle", distcp=settings))
        assert _ship(primary, first, rx, caller, first.to_bytes()) == first.id  # the first applies at once
        prod.write("prod", "b/part-00000", b"second table " * 1000)
        second = create_snapshot(primary, SnapshotRequest(prod.url("prod"), kind="cycle", distcp=settings))
        _ship(primary, second, rx, caller, second.to_bytes())
        assert [p[0] for p in store.current.pending] == [second.id] and store.current.applied_snapshot == first.id
        before = prod.state("standby")
        # A delayed apply's copy in flight is stopped: nothing committed, the snapshot stays pending.
        gate.touch()
        results: list[str] = []
        t = threading.Thread(target=lambda: results.append(rx.committer.apply_due(everything=True)))
        t.start()
        wait_for(started.exists, "the delayed apply's DistCp to start")
        rx.committer.cancel_staging()
        t.join(120)
        assert not t.is_alive() and results == [""]
        assert [p[0] for p in store.current.pending] == [second.id] and store.current.applied_snapshot == first.id
        assert prod.state("standby") == before
        gate.unlink()
        rx.committer.cancel_staging()  # what a take-over does first: no copy is in flight here
        assert rx.committer.apply_due(everything=True) == second.id
        assert store.current.applied_snapshot == second.id and store.current.pending == ()
        assert same_tree(prod, "standby", prod, "prod")
    finally:
        gate.unlink(missing_ok=True)
        rx.close()


def test_a_gone_source_says_what_to_do_for_a_point_promotion_and_a_restore(  # type: ignore[no-untyped-def]
        sites, hdfs_cluster, tmp_path: Path) -> None:
    """A snapshot this standby stored but never applied (applies held), whose capture's HDFS snapshot
    production's next capture deleted: a point promotion at it and a restore of it fail. Found: both said
    "the next shipment copies from a newer one", which no shipment does for either."""
    from drsync.agent.standby import StandbyReceiver
    from drsync.agent.state import StateStore
    from drsync.engine import SnapshotRequest, create_snapshot, restore_snapshot
    from drsync.errors import RefusedError
    from drsync.transport import Caller
    from tests.test_pointintime import _ship

    cluster, prod = sites
    _write(prod, "prod", {"a/part-00000": b"first table " * 1000})
    cluster.allow_snapshot(prod.path("prod"))
    cluster.mkdirs(prod.path("standby"))
    cluster.allow_snapshot(prod.path("standby"))
    settings = _settings(hdfs_cluster)
    primary = Repository.init(open_storage(str(tmp_path / "prod-repo")), cluster_id="c", release="1")
    standby = Repository.init(open_storage(str(tmp_path / "standby-repo")), cluster_id="c", release="1")
    rx = StandbyReceiver(standby, prod.url("standby"), StateStore(str(tmp_path / "state")), agent="west",
                         distcp=settings)
    caller = Caller(sender="primary", epoch=1, sent_at=time.time(), received_at=time.time(), instance="i1")
    try:
        first = create_snapshot(primary, SnapshotRequest(prod.url("prod"), kind="cycle", distcp=settings))
        _ship(primary, first, rx, caller, first.to_bytes())
        rx.hold_applies()
        prod.write("prod", "b/part-00000", b"second table " * 1000)
        second = create_snapshot(primary, SnapshotRequest(prod.url("prod"), kind="cycle", distcp=settings))
        with pytest.raises(RefusedError, match="holds applies"):
            _ship(primary, second, rx, caller, second.to_bytes())
        prod.write("prod", "c/part-00000", b"third table " * 1000)
        create_snapshot(primary, SnapshotRequest(prod.url("prod"), kind="cycle", distcp=settings))
        assert second.content_snapshot.rsplit("/", 1)[1] not in cluster.snapshots(prod.path("prod"))
        before = prod.state("standby")
        with pytest.raises(OperationFailed, match="is gone") as promoted:
            rx.committer.apply_now(second.id, "for a test")
        message = str(promoted.value)
        assert "next shipment" not in message and "never applied" in message and "drsync-snap-" in message, message
        assert len(message.splitlines()) == 1 and prod.state("standby") == before
        with pytest.raises(OperationFailed, match="is gone") as restored:
            restore_snapshot(standby, second.id, prod.url("restored"), cluster_id="c", release="1",
                             distcp=settings, data_root=prod.url("standby"))
        message = str(restored.value)
        assert "next shipment" not in message and "--config of a standby that applied it" in message, message
    finally:
        rx.close()
