"""Breaking the promises of ``replication.engine = "distcp"`` (deploy/hdfs/README.md, "Two engines").

Every test runs real drsync agents or commands against the session's real HDFS mini cluster and
real DistCp jobs (``scripts/hadoop-cluster distcp``, a JVM of its own, as ``hadoop distcp``).
Two directories of one cluster play production and the standby.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

import pytest

from drsync.config import load_config
from drsync.dataroot.distcp import HISTORY_PREFIX
from drsync.engine import SnapshotRequest, create_snapshot, distcp_settings
from drsync.errors import RefusedError
from drsync.repository.format import manifest_name
from drsync.repository.manifest import Manifest
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import init_repo, run_drsync
from tests.group import Group, scrape
from tests.hadoop import cluster as hc
from tests.sites import HdfsSite, make_site, same_tree
from tests.test_agents import Pair, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
HADOOP_CLUSTER = REPO_ROOT / "scripts" / "hadoop-cluster"


def _engine_lines(hdfs_cluster: hc.HadoopCluster, command: str | None = None, url: str = "") -> str:
    command = command or f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir}"
    lines = f'engine = "distcp"\ndistcp_command = "{command}"\ndistcp_jar = "{hc.DISTCP_JAR}"\n'
    return lines + (f'distcp_url = "{url}"\n' if url else "")


def _configure(pair: Pair, primary: str, standby: str) -> None:
    with open(pair.primary_cfg, "a") as f:  # its [replication] section is the last one
        f.write(primary)
    with open(pair.standby_cfg, "a") as f:
        f.write("[replication]\n" + standby)


def _hdfs_pair(tmp_path: Path, webhdfs, *, snapshottable_standby: bool = True,  # type: ignore[no-untyped-def]
               prod_site: HdfsSite | None = None) -> Pair:
    """An agent pair on two directories of the session's HDFS, production's snapshottable (both by default)."""
    prod = prod_site or make_site("hdfs", tmp_path, webhdfs)
    standby = make_site("hdfs", tmp_path, webhdfs)
    pair = Pair(tmp_path, prod, standby)
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    if snapshottable_standby:
        webhdfs.allow_snapshot(standby.path("standby-data"))
    return pair


def _distcp_pair(tmp_path: Path, webhdfs, hdfs_cluster, *, standby_lines: str | None = None,  # type: ignore[no-untyped-def]
                 snapshottable_standby: bool = True, prod_site: HdfsSite | None = None) -> Pair:
    pair = _hdfs_pair(tmp_path, webhdfs, snapshottable_standby=snapshottable_standby, prod_site=prod_site)
    lines = _engine_lines(hdfs_cluster)
    _configure(pair, lines, standby_lines if standby_lines is not None else lines)
    return pair


def _log(tmp_path: Path, name: str) -> str:
    p = tmp_path / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def _applied(pair: Pair) -> str:
    from drsync.transport.grpc import GrpcStandbyLink

    link = GrpcStandbyLink(pair.standby_addr)
    try:
        return link.hello("test", 1).applied_snapshot
    finally:
        link.close()


def _synced_then_primary_stopped(pair: Pair) -> str:
    """Start both agents, wait until the standby matches production, stop the primary (nothing ships
    any more): the snapshot the standby applied."""
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to match production by DistCp", timeout=120)
    pair.kill("primary", signal.SIGTERM)
    return _applied(pair)


def _refused_or_synced(pair: Pair, tmp_path: Path, marker: str) -> bool:
    return pair.in_sync() or marker in _log(tmp_path, "primary") or marker in _log(tmp_path, "standby")


# --- 7. hostile names: a file whose name is in Unicode's decomposed form ------------------------


def test_a_name_in_decomposed_unicode_replicates_by_distcp(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """A file named ``café`` in NFD (``e`` + combining acute, what macOS writes) on production.

    Found: DistCp over ``webhdfs://`` asks the datanode for the composed twin of the name, which
    does not exist, so every shipment failed, blamed on "the HDFS snapshot to copy from ... is
    gone". Now: over WebHDFS the shipment is refused up front saying to set ``distcp_url`` to the
    RPC URI; with it (here the mini cluster's HA nameservice) the file replicates."""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    try:
        nfd = unicodedata.normalize("NFD", "café-") + "table.csv"
        pair.prod_site.write("prod-data", f"catalog/{nfd}", b"decomposed name\n" * 100)
        pair.start("standby")
        pair.start("primary")
        wait_for(lambda: "decomposed Unicode" in _log(tmp_path, "primary"), "the advice to set distcp_url",
                 timeout=120)
        assert "snapshot to copy from" not in _log(tmp_path, "primary") and not pair.in_sync()
        pair.stop_all()
        rpc = str(hdfs_cluster.info["hdfs"])  # hdfs://drsync-ns, resolved by the cluster's client config
        for cfg, root in ((pair.primary_cfg, pair.prod_site.path("prod-data")),
                          (pair.standby_cfg, pair.standby_site.path("standby-data"))):
            cfg.write_text(cfg.read_text() + f'distcp_url = "{rpc}{root}"\n')
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the NFD name to replicate over RPC", timeout=120)
    finally:
        pair.stop_all()


# --- 5. a production file the standby's user may not read -------------------------------------


def test_a_production_file_the_standby_user_cannot_read_is_named_in_the_error(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """Production runs as user ``produser``; one file is 0600. The standby's DistCp runs as
    ``drsync`` (its data root's ``?user=``), which may not read it (README: "That user must read
    production's snapshot").

    Expected: one line naming the problem (permission denied, which file or user) and what to do.
    Observed: "DistCp failed (exit 25): IOException: DistCp failure: Job job_local..._0001 has
    failed: NA" -- the cause (AccessControlException) is in DistCp's output but drsync picks the
    last exception line, DistCp's summary.
    """
    base = f"{webhdfs.test_dir}/{tmp_path.name}"
    webhdfs.mkdirs(base)
    webhdfs.chmod(base, 0o777)
    webhdfs.mkdirs(f"{base}/prod-data")
    webhdfs.chmod(f"{base}/prod-data", 0o755, owner="produser")
    prod = HdfsSite(webhdfs, base, user="produser")
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster, prod_site=prod)
    try:
        prod.write("prod-data", "catalog/salaries.csv", b"only production reads this\n" * 50)
        prod.chmod("prod-data", "catalog/salaries.csv", 0o600)
        pair.start("standby")
        pair.start("primary")
        wait_for(lambda: "nothing was committed" in _log(tmp_path, "standby") + _log(tmp_path, "primary"),
                 "the standby to refuse the shipment", timeout=120)
        line = next(ln for ln in (_log(tmp_path, "standby") + _log(tmp_path, "primary")).splitlines()
                    if "nothing was committed" in ln)
        assert "Permission denied" in line or "salaries.csv" in line, line[-500:]
    finally:
        pair.stop_all()


# --- 5. drsync config check: the DistCp command -------------------------------------------------


def test_config_check_reports_a_distcp_command_whose_path_does_not_exist(tmp_path: Path, webhdfs) -> None:  # type: ignore[no-untyped-def]
    """README: "drsync config check checks this, the command and the jar". A command given by its
    full path (``/opt/hadoop/bin/hadoop distcp``, the usual way outside $PATH) that does not exist
    passes the check. Observed: every check passes (exit 0); the standby's first shipment then fails.
    Root cause: DistCpSettings.problems only looks a command up when it has no "/" in it."""
    site = make_site("hdfs", tmp_path, webhdfs)
    assert isinstance(site, HdfsSite)
    webhdfs.mkdirs(site.path("data"))
    webhdfs.allow_snapshot(site.path("data"))
    cfg = tmp_path / "standby.toml"
    cfg.write_text(f'[cluster]\nid = "analytics"\nrelease = "6.2.1"\ndata = "{site.url("data")}"\n'
                   f'repository = "{tmp_path / "repo"}"\n'
                   f'[agent]\nname = "standby"\nrole = "standby"\nlisten = "127.0.0.1:0"\nmetrics = "127.0.0.1:0"\n'
                   f'[replication]\nengine = "distcp"\ndistcp_command = "{tmp_path}/no-hadoop/bin/hadoop distcp"\n'
                   f'distcp_jar = "{hc.DISTCP_JAR}"\n')
    init_repo(cfg)
    r = run_drsync("config", "check", "--config", cfg, "--json")
    assert r.code != 0 and "no-hadoop" in r.out, r.out


# --- 2. restore by DistCp with distcp_url set ----------------------------------------------------


def test_snapshot_restore_to_another_target_with_distcp_url_set(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """The standby sets ``distcp_url`` (README: "How DistCp jobs reach this cluster's data root").
    ``drsync snapshot restore ID --config standby.toml --target URL`` then copies by DistCp into the
    *data root's* staging area (distcp_url), not the target's: the check finds nothing at the target
    ("not copied", exit 3, blamed on "a file being written when it was captured") and the standby's
    live data root is left with a ``.drsync-staging`` full of the restore's files, which a running
    agent's apply shares.
    Root cause: drsync/dataroot/distcp.py root_url() answers settings.url for any root, and
    DistCpStager.stage() uses it for the target it stages into."""
    pair = _hdfs_pair(tmp_path, webhdfs)
    prod, standby = pair.prod_site, pair.standby_site
    assert isinstance(standby, HdfsSite)
    active = hdfs_cluster.state()["webhdfs"][0]
    std_url = f"webhdfs://{active}{standby.path('standby-data')}"
    _configure(pair, _engine_lines(hdfs_cluster), _engine_lines(hdfs_cluster, url=std_url))
    try:
        applied = _synced_then_primary_stopped(pair)
        pair.kill("standby", signal.SIGTERM)
        r = run_drsync("snapshot", "restore", applied, "--config", pair.standby_cfg, "--target",
                       standby.url("restored"))
        leftovers = [s["pathSuffix"] for s in standby._fs().list_dir(standby.path("standby-data"))
                     if s["pathSuffix"].startswith(".drsync")]
        assert r.code == 0, r.err
        assert same_tree(standby, "restored", prod, "prod-data")
        assert leftovers == [], "the restore wrote into the standby's data root"
    finally:
        pair.stop_all()


# --- 2/5. a standby data root that cannot be snapshotted ---------------------------------------


def test_a_standby_root_that_cannot_be_snapshotted_does_not_apply_without_history(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """README: "Both data roots must be snapshottable ... the standby keeps its history in
    snapshots", and such a root is one of the errors promised a clear message (exit 2).
    Observed: the standby agent starts, applies every shipment, and only logs a warning per apply
    ("applied, but not kept as an HDFS snapshot"): it runs without the history that
    ``snapshot restore`` and promotions rely on. Root cause: drsync/config.py engine_problem()
    checks only the URL scheme, and Committer._keep_history (drsync/agent/committer.py) turns the
    failure into a warning after the commit."""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster, snapshottable_standby=False)
    try:
        pair.start("standby")
        proc = pair.procs["standby"]
        pair.start("primary")
        wait_for(lambda: proc.poll() is not None or pair.in_sync() or "allowSnapshot" in _log(tmp_path, "primary"),
                 "the standby to refuse or apply", timeout=120)
        warning = next((ln for ln in _log(tmp_path, "standby").splitlines() if "not kept as an HDFS snapshot" in ln),
                       "")
        assert not pair.in_sync(), f"applied with no history kept, only a warning: {warning[-300:]}"
    finally:
        pair.stop_all()


# --- 1. kill -9 of the standby agent during DistCp ---------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_standby_during_distcp_leaves_no_copy_running(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """The standby agent is killed with SIGKILL while its DistCp job runs, then restarted.

    Expected: the dead agent's copy does not outlive it (or the restarted agent stops it before it
    stages anything of its own): a copy nobody waits for keeps writing into the root's
    ``.drsync-staging`` -- the area the restarted agent resets, stages, verifies and commits from.
    Observed: DistCp runs in a session of its own (``start_new_session=True``,
    drsync/dataroot/distcp.py DistCpStager._run), so it survives the agent's death, and nothing
    stops it after the restart: it is still running after the restarted standby has applied a
    snapshot, and goes on writing into the standby's staging area whenever it gets to it.
    The DistCp here waits on a gate file before it copies (a copy of hours, made quickly).
    """
    gate, started, first = tmp_path / "hold", tmp_path / "started", tmp_path / "first-run"
    slow = tmp_path / "slow-first-distcp"
    slow.write_text("#!/bin/sh\n"
                    f"if mkdir {first} 2>/dev/null; then\n"
                    f"  echo $$ > {started}\n"
                    f"  while [ -e {gate} ]; do sleep 0.1; done\n"
                    "fi\n"
                    f"exec {HADOOP_CLUSTER} distcp {hdfs_cluster.dir} \"$@\"\n")
    slow.chmod(0o755)
    gate.touch()
    lines = _engine_lines(hdfs_cluster, command=str(slow))
    prod = make_site("hdfs", tmp_path, webhdfs)
    standby = make_site("hdfs", tmp_path, webhdfs)
    pair = Pair(tmp_path, prod, standby)
    webhdfs.allow_snapshot(prod.path("prod-data"))
    webhdfs.mkdirs(standby.path("standby-data"))
    webhdfs.allow_snapshot(standby.path("standby-data"))
    _configure(pair, lines, lines)
    orphan = 0
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(lambda: started.exists() and started.read_text().strip() != "", "the standby's DistCp to start")
        orphan = int(started.read_text())
        killed = pair.procs["standby"].pid
        listings = sorted(Path(tempfile.gettempdir()).glob(f"drsync-distcp-*-*-{killed}-*-*.lst"))
        assert listings, "the standby's DistCp listing file is not named after its agent"
        pair.kill("standby")  # SIGKILL, in the middle of the copy
        pair.start("standby")
        wait_for(pair.in_sync, "the restarted standby to apply a snapshot", timeout=120)
        assert not _alive(orphan), "the killed agent's DistCp is still running after the restarted standby applied"
        # The killed agent could not remove its listing file (production's file names): the next stage did.
        assert not any(p.exists() for p in listings), listings
    finally:
        gate.unlink(missing_ok=True)
        if orphan and _alive(orphan):
            os.killpg(orphan, signal.SIGKILL)
        pair.stop_all()


# --- 6. drills and backups of a DistCp-engine standby -------------------------------------------


def _tamper_in_place(site: HdfsSite, name: str, rel: str) -> None:
    """Other bytes of the same length, the modification time and mode put back: what a bad disk
    or a stray writer leaves, invisible to sizes and times."""
    fs = site._fs()
    path = f"{site.path(name)}/{rel}"
    st = fs.status(path)
    assert st is not None
    data = bytearray(fs.read(path))
    data[len(data) // 2] ^= 0xFF
    fs.write(path, bytes(data), overwrite=True)
    fs.set_times(path, int(st["modificationTime"]) * 1_000_000)
    fs.set_permission(path, int(st["permission"], 8))


def test_a_drill_catches_a_damaged_standby_file_and_backups_need_dataless(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """Passes today; nothing else checks that a drill of a DistCp standby fails on damaged bytes,
    nor that a full or light backup of such a snapshot is refused with its reason."""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    try:
        applied = _synced_then_primary_stopped(pair)
        r = run_drsync("backup", "create", "--config", pair.standby_cfg, "--snapshot", applied,
                       "--dest", tmp_path / "backups", "--mode", "full")
        assert r.code == 2 and "dataless" in r.err and "Traceback" not in r.err, r.err
        r = run_drsync("backup", "create", "--config", pair.standby_cfg, "--snapshot", applied,
                       "--dest", tmp_path / "backups", "--mode", "dataless")
        assert r.code == 0, r.err
        assert isinstance(pair.standby_site, HdfsSite)
        pair.kill("standby", signal.SIGTERM)  # nothing applies while the drill judges the root
        _tamper_in_place(pair.standby_site, "standby-data", "tables/orders/part-1.bin")
        drill = run_drsync("drill", "run", "--config", pair.standby_cfg, "--full", "--json")
        report = drill.json()
        assert drill.code == 1 and not report["passed"], report
        verify = next(s for s in report["steps"] if s["name"] == "verify")
        assert "part-1.bin" in verify["detail"], verify
    finally:
        pair.stop_all()


def test_a_drill_after_switching_to_distcp_checks_the_bytes_of_every_file(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """A group that ran ``engine = "agent"`` switches both agents to ``"distcp"`` (the README's
    table offers the choice; nothing says it must be made on day one).

    The first DistCp capture reuses every unchanged row of the agent-engine parent as it is (rows
    with chunk lists: drsync/capture.py _ParentView, ``external_ok=True``), so the applied
    snapshot mixes external rows and chunk rows. The drill of a snapshot with any external row
    takes the DistCp path (drsync/agent/drill.py run_drill -> distcp_root_step), which checks the
    bytes of external rows only: a chunk-row file damaged on the standby (same size, time, mode)
    passes ``drill run --full``. Expected: the full drill fails and names the file."""
    pair = _hdfs_pair(tmp_path, webhdfs)
    prod, standby = pair.prod_site, pair.standby_site
    assert isinstance(standby, HdfsSite)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the agent engine to sync the standby", timeout=120)
        pair.kill("primary", signal.SIGTERM)
        pair.kill("standby", signal.SIGTERM)
        lines = _engine_lines(hdfs_cluster)
        _configure(pair, lines, lines)
        prod.write("prod-data", "catalog/f003.txt", b"changed after the switch to DistCp\n" * 20)
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the DistCp engine to ship the change", timeout=120)
        pair.kill("primary", signal.SIGTERM)
        pair.kill("standby", signal.SIGTERM)  # nothing applies while the drill judges the root
        _tamper_in_place(standby, "standby-data", "tables/orders/part-0.bin")  # unchanged since the switch
        drill = run_drsync("drill", "run", "--config", pair.standby_cfg, "--full", "--json")
        report = drill.json()
        verify = next(s for s in report["steps"] if s["name"] == "verify")
        assert not report["passed"] and "part-0.bin" in verify["detail"], verify
    finally:
        pair.stop_all()


# --- 7. odd trees and odd changes -------------------------------------------------------------


class _Logs:
    """The agents' logs from a mark on: a refusal is seen at once instead of waiting for a timeout."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.mark()

    def mark(self) -> None:
        self.at = {n: len(_log(self.tmp, n)) for n in ("primary", "standby")}

    def since(self) -> str:
        return "".join(_log(self.tmp, n)[self.at[n]:] for n in ("primary", "standby"))


def _settled_in_sync(pair: Pair) -> bool:
    """In sync; a walk that met the standby's root mid-commit (a path changing type) is not."""
    try:
        return pair.in_sync()
    except Exception:
        return False


def _sync_or_refusal(pair: Pair, logs: _Logs, what: str) -> None:
    wait_for(lambda: _settled_in_sync(pair) or "nothing was committed" in logs.since(), what, timeout=120)
    refusal = next((ln for ln in logs.since().splitlines() if "nothing was committed" in ln), "")
    assert pair.in_sync(), f"{what}: {refusal[-400:]}"
    logs.mark()


def test_odd_names_and_odd_changes_replicate_by_distcp(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """Names with spaces, %, +, a tab and a newline, a path 60 directories deep, an empty file, a
    file of exactly two blocks; then a file replaced by a directory and back, a rename across
    directories and a permission-only change. (Passes today; the stock pair test has none of
    these with the DistCp engine.)"""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    prod = pair.prod_site
    assert isinstance(prod, HdfsSite)
    deep = "/".join(f"level-{i:03}" for i in range(60))
    odd = {"odd/with space %41 +plus.txt": b"percent and plus\n" * 10, "odd/tab\there": b"tab\n" * 10,
           "odd/new\nline": b"newline\n" * 10, f"{deep}/bottom.txt": b"deep\n" * 10, "odd/empty": b"",
           "odd/two-blocks.bin": os.urandom(2 << 20)}
    for rel, data in odd.items():
        prod.write("prod-data", rel, data)
    logs = _Logs(tmp_path)
    try:
        pair.start("standby")
        pair.start("primary")
        _sync_or_refusal(pair, logs, "odd names to replicate")
        fs = prod._fs()
        root = prod.path("prod-data")
        fs.delete(f"{root}/catalog/f005.txt")
        prod.write("prod-data", "catalog/f005.txt/now-a-directory.txt", b"a file became a directory\n")
        assert fs.rename(f"{root}/catalog/f006.txt", f"{root}/tables/orders/moved-from-catalog.txt")
        prod.chmod("prod-data", "catalog/f007.txt", 0o600)
        _sync_or_refusal(pair, logs, "a file replaced by a directory, a rename and a chmod to replicate")
        fs.delete(f"{root}/catalog/f005.txt", recursive=True)
        prod.write("prod-data", "catalog/f005.txt", b"a directory became a file again\n")
        _sync_or_refusal(pair, logs, "a directory replaced by a file to replicate")
    finally:
        pair.stop_all()


# --- 2. history snapshots once the standby is production ----------------------------------------


def test_history_snapshots_expire_with_their_snapshots_after_the_standby_became_primary(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """Disaster recovery by hand with fixed roles: production is lost, the standby's config becomes
    ``role = "primary"`` and its agent runs on its data root, now production.

    README: history snapshots are "expired with the drsync snapshots they stand for". Observed:
    once the agent is primary its retention expires the drsync snapshots, but their
    ``drsync-snap-<id>`` HDFS snapshots stay for good (drsync/agent/maintenance.py retention() drops
    history only when ``d.role != "primary"``). On what is now production, each of them pins every
    block later overwritten or deleted: disk space that never comes back."""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    standby = pair.standby_site
    assert isinstance(standby, HdfsSite)
    root = standby.path("standby-data")

    def history() -> list[str]:
        return [n for n in webhdfs.snapshots(root) if n.startswith("drsync-snap-")]

    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(lambda: pair.in_sync() and len(history()) >= 2, "the standby to keep history snapshots", timeout=120)
        pair.kill("primary", signal.SIGTERM)
        pair.kill("standby", signal.SIGTERM)
        kept_before = history()
        text = pair.standby_cfg.read_text().replace('role = "standby"', 'role = "primary"')
        text = text.replace("[replication]\n", '[replication]\ninterval = "1s"\nstandbys = []\n')
        pair.standby_cfg.write_text(text + '[snapshots]\nkeep = { last = 1 }\n')
        with open(tmp_path / "promoted.log", "ab") as log:  # the child keeps its own copy of the fd
            pair.procs["standby"] = subprocess.Popen(
                [sys.executable, "-m", "drsync", "agent", "--config", str(pair.standby_cfg)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: "expired" in _log(tmp_path, "promoted"), "the new primary's retention to expire snapshots")
        listed = {s["id"] for s in run_drsync("snapshot", "list", "--config", pair.standby_cfg, "--json").json()}
        stale = [n for n in kept_before if n.removeprefix("drsync-snap-") not in listed and n in history()]
        assert stale == [], f"history snapshots of expired drsync snapshots stay on the new production root: {stale}"
    finally:
        pair.stop_all()


# --- 4. a promotion while DistCp copies -----------------------------------------------------------


def _distcp_group(tmp_path: Path, webhdfs, zk_server, group: str, replication: str,  # type: ignore[no-untyped-def]
                  extra: str = "", names: tuple[str, ...] = ("east", "west")) -> tuple[HdfsSite, Group]:
    """ZooKeeper roles, data roots and repositories in directories of the session's HDFS (all
    snapshottable), production's (``east-data``) with a tree; nothing started, each repository made."""
    site = make_site("hdfs", tmp_path, webhdfs)
    assert isinstance(site, HdfsSite)
    site.make_tree(f"{names[0]}-data", files=10, big=1)
    for name in names:
        webhdfs.mkdirs(site.path(f"{name}-data"))
        webhdfs.allow_snapshot(site.path(f"{name}-data"))
    g = Group(tmp_path, zk_server.hosts, group, list(names), data=False, replication=replication,
              extra='fence_command = "none"\n' + extra)
    for name in g.names:
        text = g.cfg[name].read_text()
        text = text.replace(f'data = "{g.data[name]}"', f'data = "{site.url(name + "-data")}"')
        text = text.replace(f'repository = "{tmp_path / (name + "-repo")}"',
                            f'repository = "{site.url(name + "-repo")}"')
        text = text.replace("[coordination]", f'state_dir = "{tmp_path / (name + "-state")}"\n[coordination]')
        g.cfg[name].write_text(text)
        assert run_drsync("init", "--config", g.cfg[name]).code == 0
    return site, g


def _start_synced(site: HdfsSite, g: Group) -> None:
    """Start the group, promote east and wait until west applied production by DistCp."""
    for name in g.names:
        g.start(name)
    assert g.promote("east").code == 0
    wait_for(lambda: same_tree(site, "west-data", site, "east-data") and g.record("west").get("applied_snapshot"),
             "west to apply production by DistCp", timeout=120)


def test_a_promotion_stops_a_distcp_copy_in_flight(tmp_path: Path, webhdfs, hdfs_cluster, zk_server, group) -> None:  # type: ignore[no-untyped-def]
    """ZooKeeper roles, both data roots on HDFS, engine "distcp". While the standby's DistCp copies
    a shipment (a copy of hours: it waits on a gate), production's agent dies and the standby is
    promoted. README: "A promotion stops a DistCp copy in flight ... the standby is promoted with
    the snapshot it had applied". Nothing else tests this with real agents."""
    gate, started = tmp_path / "hold", tmp_path / "started"
    slow = tmp_path / "gated-distcp"
    slow.write_text("#!/bin/sh\n"
                    f"if [ -e {gate} ]; then echo $$ > {started}; while [ -e {gate} ]; do sleep 0.1; done; fi\n"
                    f"exec {HADOOP_CLUSTER} distcp {hdfs_cluster.dir} \"$@\"\n")
    slow.chmod(0o755)
    site, g = _distcp_group(tmp_path, webhdfs, zk_server, group, _engine_lines(hdfs_cluster, command=str(slow)))
    try:
        _start_synced(site, g)
        before, before_applied = site.state("west-data"), g.record("west")["applied_snapshot"]
        gate.touch()
        # Written aside and renamed in: a capture in the middle of the write would hold the file open and
        # empty, a snapshot west may apply before the copy under test (then not the state taken above).
        site.write("east-aside", "late.bin", os.urandom(1 << 20))
        assert site._fs().rename(f"{site.path('east-aside')}/late.bin", f"{site.path('east-data')}/catalog/late.bin")
        wait_for(started.exists, "west's next DistCp to start")
        copier = int(started.read_text())
        g.kill("east")
        wait_for(lambda: g.primary() is None, "east's primary node to go")
        r = g.promote("west", "--accept-data-loss")
        assert r.code == 0, r.err
        assert (p := g.primary()) is not None and p[0] == "west", p
        assert gate.exists(), "the promotion waited for the copy"
        assert not _alive(copier), "the DistCp copy in flight was not stopped"
        gate.unlink()
        after, applied = site.state("west-data"), g.record("west").get("applied_snapshot")
        assert "catalog/late.bin" not in after, "the stopped copy's file was committed"
        if applied == before_applied:
            assert after == before, {k: (before.get(k), after.get(k)) for k in {*before, *after}
                                     if before.get(k) != after.get(k)}
        else:  # east captured once more before late.bin (a directory's time only): west holds that one, whole
            r = run_drsync("snapshot", "restore", applied, "--config", g.cfg["west"], "--target", site.url("check"))
            assert r.code == 0, r.err
            assert after == site.state("check")
    finally:
        gate.unlink(missing_ok=True)
        g.stop_all()


def test_an_earlier_snapshot_restores_and_promotes_from_the_standbys_own_history(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster, zk_server, group) -> None:
    """Damage replicates to a DistCp-engine standby; production is lost; the operator restores the
    last good snapshot elsewhere, then promotes the standby at it (``promote --to-snapshot``).

    By then production's HDFS snapshot of the good capture is gone (the next capture replaced it):
    the bytes must come from the standby's own history snapshot ``drsync-snap-<id>``. Found: restore
    did so, but the point promotion (Committer._apply) always copied from production's snapshot and
    failed with "the HDFS snapshot to copy from ... is gone"."""
    site, g = _distcp_group(tmp_path, webhdfs, zk_server, group, _engine_lines(hdfs_cluster),
                            extra="[snapshots]\nkeep = { last = 1000 }\n")
    try:
        _start_synced(site, g)
        good = g.record("west")["applied_snapshot"]
        good_state = site.state("west-data")
        # The damage rewrites a file (the promotion must copy its good bytes back) and adds one.
        site.write("east-data", "catalog/f003.txt", b"encrypted by ransomware\n" * 40)
        site.write("east-data", "RANSOM-NOTE.txt", b"pay up\n")
        wait_for(lambda: g.record("west").get("applied_snapshot") not in (None, good)
                 and same_tree(site, "west-data", site, "east-data"), "the damage to reach west", timeout=120)
        source = Repository.open(open_storage(site.url("west-repo"))).find_snapshot(good).content_snapshot
        assert f"{site.path('east-data')}/.snapshot/" in source
        wait_for(lambda: source.rsplit("/", 1)[1] not in webhdfs.snapshots(site.path("east-data")),
                 "production's next capture to drop the good capture's HDFS snapshot")
        g.kill("east")
        wait_for(lambda: g.primary() is None, "east's primary node to go")
        r = run_drsync("snapshot", "restore", good, "--config", g.cfg["west"], "--target", site.url("restored"))
        assert r.code == 0, r.err
        assert site.state("restored") == good_state
        history = f"{site.path('west-data')}/.snapshot/{HISTORY_PREFIX}{good}"
        mark = len(g.log("west"))
        r = g.promote("west", "--to-snapshot", good, "--accept-data-loss")
        assert r.code == 0, r.err
        assert (p := g.primary()) is not None and p[0] == "west", p
        assert site.state("west-data") == good_state
        copies = [ln for ln in g.log("west")[mark:].splitlines() if "running DistCp from" in ln]
        assert copies and all(history in ln for ln in copies), copies
    finally:
        g.stop_all()


def test_a_fenced_primarys_distcp_shipment_is_refused_and_lag_is_exported(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster, zk_server, group) -> None:
    """Safety rule 1 with engine "distcp" (three agents, ZooKeeper roles). East, primary at epoch 1,
    freezes (SIGSTOP) past its session; west is promoted (epoch 2); east wakes. A DistCp shipment is
    only a manifest naming east's HDFS snapshot: north must refuse east's at epoch 1 before any DistCp
    job runs, and nothing east wrote after the promotion reaches north, while west's changes do. The
    lag metrics are exported as with the agent engine."""
    site, g = _distcp_group(tmp_path, webhdfs, zk_server, group, _engine_lines(hdfs_cluster),
                            names=("east", "west", "north"))

    def synced(name: str, source: str) -> bool:
        return bool(same_tree(site, f"{name}-data", site, f"{source}-data") and g.record(name).get("applied_snapshot"))

    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        wait_for(lambda: synced("west", "east") and synced("north", "east"), "west and north to apply by DistCp",
                 timeout=120)
        # Lag metrics in DistCp mode: on each standby, what its Hello says it applied, and a lag; on the primary,
        # the lag of its standbys.
        for name in ("west", "north"):
            hello = g.hello(name)
            m = scrape(g.metrics[name], g.group, name)
            assert m["drsync_last_applied_snapshot_timestamp_seconds"] >= hello.applied_captured_at > 0, m
            assert math.isfinite(m["drsync_replication_lag_seconds"]) and m["drsync_replication_lag_seconds"] >= 0, m
        east = scrape(g.metrics["east"], g.group, "east")
        assert east["drsync_is_primary"] == 1 and math.isfinite(east["drsync_replication_lag_seconds"]), east
        assert "DistCp copied" in g.log("north")  # the bytes went by DistCp

        g.procs["east"].send_signal(signal.SIGSTOP)
        site.write("east-data", "catalog/late.bin", b"written after east was fenced\n" * 100)
        wait_for(lambda: g.primary() is None, "the frozen primary's session to expire", timeout=60)
        r = g.promote("west", "--accept-data-loss")
        assert r.code == 0, r.err
        wait_for(lambda: g.hello("north").epoch == 2, "north to learn epoch 2")
        g.procs["east"].send_signal(signal.SIGCONT)
        g.wait_role("east", "ex-primary")  # no demote_command: it waits for drsync rejoin
        # East's DistCp shipment of late.bin (its shipper's capture, had it not been fenced), sent at epoch 1.
        cfg = load_config(g.cfg["east"])
        repo = Repository.open(open_storage(cfg.cluster.repository))
        info = create_snapshot(repo, SnapshotRequest(cfg.cluster.data, kind="cycle", distcp=distcp_settings(cfg)))
        manifest = repo.storage.read(manifest_name(info.id))
        assert info.content_snapshot and Manifest.from_bytes(manifest, "east's manifest").external_count() > 0
        mark = len(g.log("north"))
        link = GrpcStandbyLink(g.addr["north"], sender="east")
        try:
            with pytest.raises(RefusedError, match="epoch 1 from east is lower than epoch 2"):
                link.commit(1, "east", dataclasses.replace(info, seq=0).to_bytes(), iter([manifest]))
        finally:
            link.close()
        assert "running DistCp" not in g.log("north")[mark:]
        assert "catalog/late.bin" not in site.paths("north-data")
        # North follows the new primary, by DistCp; east's late write never arrives.
        site.write("west-data", "catalog/from-west.bin", b"written on the new primary\n" * 100)
        wait_for(lambda: synced("north", "west"), "north to follow west by DistCp", timeout=120)
        assert "catalog/late.bin" not in site.paths("north-data")
        assert "running DistCp" in g.log("north")[mark:]
        hello = g.hello("north")
        assert scrape(g.metrics["north"], g.group, "north")["drsync_last_applied_snapshot_timestamp_seconds"] >= \
            hello.applied_captured_at > info.captured_at
    finally:
        g.stop_all()


# --- deletion guard: confirming a held DistCp snapshot ------------------------------------------


def test_a_held_distcp_snapshot_can_be_confirmed(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """README's table: the deletion guard works "the same" with the DistCp engine. A shipment that
    deletes most files (and adds one) is held; the hold stays on the *first* held snapshot
    (docs/operations.md, "Deletion guard") and the operator confirms it with
    ``drsync apply --confirm HELD``.

    Observed: the confirm fails: production's capture snapshot for the held shipment was deleted
    by the primary's next capture (only snapshots offered or in flight are pinned:
    drsync/agent/shipper.py pinned_hdfs_snapshots), so DistCp has nothing to copy from ("is gone").
    The hold cannot be confirmed at all with the DistCp engine."""
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    prod = pair.prod_site
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to match production by DistCp", timeout=120)
        for i in range(20):
            prod.remove("prod-data", f"catalog/f{i:03}.txt")
        prod.write("prod-data", "catalog/after-the-purge.bin", os.urandom(300_000))

        def hold() -> dict:
            r = run_drsync("apply", "--config", pair.standby_cfg, "--json")
            return r.json() if r.code == 0 else {}

        wait_for(lambda: hold().get("snapshot"), "the purge to be held")
        snapshot = hold()["snapshot"]
        # A later shipment is stored and refused while the first one stays held: the primary's capture of it
        # replaced the held one's HDFS snapshot, had it not been pinned.
        wait_for(lambda: hold().get("refused", 0) >= 1, "a later shipment to be refused")
        r = run_drsync("apply", "--confirm", snapshot, "--config", pair.standby_cfg, "--json")
        assert r.code == 0, r.err
        # Copied by DistCp from production's snapshot, kept pinned; then the newest one stored behind it,
        # when it passes the guards, is applied at once too.
        result = r.json()["result"]
        assert result["applied"] == snapshot
        assert _applied(pair) in (snapshot, result["then_applied"])
    finally:
        pair.stop_all()


# --- 1. production keeps the source snapshot while a standby copies from it ------------------------


def test_an_operators_snapshot_on_production_keeps_the_source_a_standby_copies_from(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster) -> None:
    """The primary runs one cycle (``--once``; with the default 5m interval the shipment in flight is
    likewise production's newest capture). While the standby's DistCp copies it (held at a gate),
    an operator takes a snapshot on production by hand (``drsync snapshot create --config
    primary.toml``, e.g. before a full backup, as README suggests). README: production "keeps its
    HDFS snapshot as DistCp's source while a standby may copy from it".

    Observed: the command's capture takes the agent's newest kept snapshot for its diff base and
    deletes it as "superseded" (drsync/dataroot/hdfs.py _tidy: ``n == base`` -> doomed; only the
    agent's own process knows what is pinned), so the copy in flight loses its source."""
    gate, started = tmp_path / "hold", tmp_path / "started"
    slow = tmp_path / "gated-distcp"
    slow.write_text("#!/bin/sh\n"
                    f"if [ -e {gate} ]; then for a in \"$@\"; do echo \"$a\"; done > {started}.tmp; "
                    f"mv {started}.tmp {started}; while [ -e {gate} ]; do sleep 0.1; done; fi\n"
                    f"exec {HADOOP_CLUSTER} distcp {hdfs_cluster.dir} \"$@\"\n")
    slow.chmod(0o755)
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster, standby_lines=_engine_lines(hdfs_cluster, command=str(slow)))
    prod = pair.prod_site
    assert isinstance(prod, HdfsSite)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to match production by DistCp", timeout=120)
        pair.kill("primary", signal.SIGTERM)
        gate.touch()
        prod.write("prod-data", "catalog/new.bin", os.urandom(200_000))
        # One cycle (as with the default 5m interval: the shipment in flight is the newest capture).
        with open(tmp_path / "primary.log", "ab") as log:
            pair.procs["primary"] = subprocess.Popen(
                [sys.executable, "-m", "drsync", "agent", "--config", str(pair.primary_cfg), "--once"],
                stdout=log, stderr=log)
        wait_for(started.exists, "the standby's DistCp of the change to start")
        source = started.read_text().splitlines()[-2]  # DistCp's source: production's kept snapshot
        name = source.rsplit("/", 1)[-1]
        assert name in webhdfs.snapshots(prod.path("prod-data"))
        r = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--name", "before-backup")
        assert r.code == 0, r.err
        assert name in webhdfs.snapshots(prod.path("prod-data")), \
            f"{name}, the source of the standby's copy in flight, was deleted by 'drsync snapshot create'"
    finally:
        gate.unlink(missing_ok=True)
        pair.stop_all()


# --- kill -9 of the standby in its commit, and before its history snapshot ---------------------


def _rpc_pair(tmp_path: Path, webhdfs, hdfs_cluster) -> Pair:  # type: ignore[no-untyped-def]
    """A DistCp pair whose agents reach their data roots over the RPC URL (``distcp_url = hdfs://...``)."""
    pair = _hdfs_pair(tmp_path, webhdfs)
    rpc = str(hdfs_cluster.info["hdfs"])  # hdfs://drsync-ns, resolved by the cluster's client config
    _configure(pair, _engine_lines(hdfs_cluster, url=f"{rpc}{pair.prod_site.path('prod-data')}"),
               _engine_lines(hdfs_cluster, url=f"{rpc}{pair.standby_site.path('standby-data')}"))
    return pair


def _gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str) -> Path:
    """A pause point (drsync/faults.py) the agents this test starts stop at while the returned file exists."""
    gates = tmp_path / "gates"
    gates.mkdir(exist_ok=True)
    monkeypatch.setenv("DRSYNC_FAULT_PAUSE", str(gates))  # inherited by the agents
    gate = gates / point
    gate.touch()
    return gate


def test_kill_9_of_a_distcp_standby_in_its_commit_rolls_forward_on_restart(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine "distcp" over the RPC URL. The standby is killed -9 in the commit step of a shipment:
    DistCp staged every file and drsync checked them, the journal is written, nothing is moved into the
    root yet (pause point ``hdfs-commit``). On restart ``Committer.recover`` rolls the commit forward
    before the agent serves: the root is the snapshot, recorded as applied, and kept as the history
    snapshot ``drsync-snap-<id>``."""
    gate = _gate(tmp_path, monkeypatch, "hdfs-commit")
    pair = _rpc_pair(tmp_path, webhdfs, hdfs_cluster)
    root = pair.standby_site.path("standby-data")
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(Path(f"{gate}.reached").exists, "the standby's commit to have its journal written", timeout=120)
        pending = json.loads((tmp_path / "standby-state" / "applying.json").read_text())["snapshot"]
        assert (tmp_path / "standby-state" / "apply.journal").exists()  # the commit's journal
        pair.kill("standby")
        pair.kill("primary", signal.SIGTERM)
        assert not pair.in_sync()  # nothing was moved into the root
        assert "running DistCp from hdfs://" in _log(tmp_path, "standby")
        gate.unlink()
        pair.start("standby")  # recovers before it serves
        assert "finished an apply that was interrupted" in _log(tmp_path, "standby")
        assert _applied(pair) == pending
        assert pair.in_sync()  # production is unchanged since the capture: the root is the snapshot
        assert f"{HISTORY_PREFIX}{pending}" in webhdfs.snapshots(root)
    finally:
        gate.unlink(missing_ok=True)
        pair.stop_all()


def test_a_distcp_standby_killed_before_its_history_snapshot_takes_it_on_restart(  # type: ignore[no-untyped-def]
        tmp_path: Path, webhdfs, hdfs_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standby is killed -9 after its apply committed and recorded the snapshot as applied, before
    it took the history snapshot ``drsync-snap-<id>`` (pause point ``keep-history``). Found:
    Committer._apply removed its pending record first, and recover() kept history only after replaying
    a journal, so the applied snapshot stayed without the history restores and point promotions copy
    from. Now the restarted standby takes it."""
    gate = _gate(tmp_path, monkeypatch, "keep-history")
    pair = _distcp_pair(tmp_path, webhdfs, hdfs_cluster)
    root = pair.standby_site.path("standby-data")
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(Path(f"{gate}.reached").exists, "the standby's apply to be committed", timeout=120)
        pair.kill("standby")
        pair.kill("primary", signal.SIGTERM)
        assert not [n for n in webhdfs.snapshots(root) if n.startswith(HISTORY_PREFIX)]
        gate.unlink()
        pair.start("standby")
        applied = _applied(pair)
        assert applied and pair.in_sync()
        assert f"{HISTORY_PREFIX}{applied}" in webhdfs.snapshots(root), webhdfs.snapshots(root)
    finally:
        gate.unlink(missing_ok=True)
        pair.stop_all()


def test_a_distcp_command_with_distcp_options_replicates(tmp_path: Path, webhdfs, hdfs_cluster) -> None:  # type: ignore[no-untyped-def]
    """deploy/hdfs/README.md's own example, ``distcp_command = "hadoop distcp -m 40"``: drsync appended its
    ``-D`` options after ``-m 40``; Hadoop's GenericOptionsParser stops at the first option it does not know,
    so DistCp took them for sources ("-Ddfs.checksum.combine.mode=COMPOSITE_CRC doesn't exist") and every
    shipment failed. They now go before DistCp's own options, and the pair replicates."""
    lines = _engine_lines(hdfs_cluster, f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir} -m 2")
    pair = _hdfs_pair(tmp_path, webhdfs)
    _configure(pair, lines, lines)
    try:
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to match production by DistCp with -m 2", timeout=120)
        assert "doesn't exist" not in _log(tmp_path, "standby")
    finally:
        pair.stop_all()


def test_generic_options_go_where_distcp_reads_them() -> None:
    from drsync.dataroot.distcp import with_generic_options

    g = ["-Da=1"]
    assert with_generic_options(["hadoop", "distcp"], g) == ["hadoop", "distcp", "-Da=1"]
    assert with_generic_options(["hadoop", "distcp", "-m", "40"], g) == ["hadoop", "distcp", "-Da=1", "-m", "40"]
    assert with_generic_options(["hadoop", "--config", "/etc/h", "distcp", "-update"], g) == [
        "hadoop", "--config", "/etc/h", "distcp", "-Da=1", "-update"]
    assert with_generic_options(["hadoop-cluster", "distcp", "/tmp/c"], g) == ["hadoop-cluster", "distcp", "/tmp/c",
                                                                                "-Da=1"]
    assert with_generic_options(["my-distcp", "-m", "4"], g) == ["my-distcp", "-Da=1", "-m", "4"]
