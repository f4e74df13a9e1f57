"""Breaker tests (stop 28) for issues 15 and 16: each test here failed when written.

Real parts only: the session's HDFS mini cluster, real DistCp JVMs (scripts/hadoop-cluster distcp).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from drsync.apply import apply_manifest
from drsync.dataroot.distcp import DistCpSettings, DistCpStager
from drsync.dataroot.hdfs import HdfsDataRoot
from drsync.errors import OperationFailed
from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.hadoop import cluster as hc
from tests.sites import HdfsSite, make_site, same_tree
from tests.test_distcp_engine import HADOOP_CLUSTER, _capture, _Repo


def _write_with_bpc(hdfs_cluster, local: Path, dest_dir: str, bpc: int) -> None:  # type: ignore[no-untyped-def]
    """Write local files into HDFS as a client configured with ``dfs.bytes-per-checksum = bpc`` does
    (a production cluster whose clients/datanodes are configured so): a plain DistCp from file://
    over RPC, no -pc, so the client's setting is used."""
    rpc = str(hdfs_cluster.info["hdfs"])
    cmd = hc.distcp_command(hdfs_cluster.dir, [f"-Ddfs.bytes-per-checksum={bpc}", f"file://{local}",
                                               f"{rpc}{dest_dir}"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_production_written_with_other_bytes_per_checksum_verifies_over_webhdfs(  # type: ignore[no-untyped-def]
        webhdfs, hdfs_cluster, tmp_path: Path) -> None:
    """Issue 16: "a standby cluster (or copy job) with another dfs.bytes-per-checksum still verifies
    every copied file against production's checksums (over WebHDFS ...)". Production's files were
    written with dfs.bytes-per-checksum=1024 (production cluster configured so), the standby's
    datanode writes with its default 512. DistCp runs with the default address (webhdfs:// to the
    standby root, no distcp_url). Over WebHDFS, DistCp's -pc cannot take effect: Hadoop's
    WebHdfsFileSystem does not override FileSystem.create(..., ChecksumOpt), which ignores the
    checksum option, and the datanode creates the file with its own setting; so the copy's
    MD5-of-MD5-of-CRC32C differs from production's and every shipment is refused.

    No copy over WebHDFS can keep another bytes per checksum, so such a copy cannot be verified there:
    the apply is refused with one line that names the cause and both ways out (distcp_url over RPC, or
    one dfs.bytes-per-checksum), nothing committed; over RPC (COMPOSITE_CRC, -pc) the same file copies
    and verifies."""
    prod = make_site("hdfs", tmp_path, webhdfs)
    assert isinstance(prod, HdfsSite)
    local = tmp_path / "local" / "data"
    local.mkdir(parents=True)
    (local / "f.bin").write_bytes(b"production bytes " * 5000)
    webhdfs.mkdirs(prod.path("prod"))
    _write_with_bpc(hdfs_cluster, local / "f.bin", prod.path("prod") + "/f.bin", 1024)
    webhdfs.allow_snapshot(prod.path("prod"))
    root = HdfsDataRoot(prod.url("prod"))


    repo = Repository.init(open_storage(str(tmp_path / "repo")), cluster_id="c", release="1")
    result = _capture(root, repo)
    source = (f"webhdfs://{root.fs.active_namenode()}{prod.path('prod')}/.snapshot/"
              f"{result.content_snapshot}")
    settings = DistCpSettings.from_strings(f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir}", str(hc.DISTCP_JAR), "")
    stager = DistCpStager(settings, source, what="test snapshot")
    target = HdfsDataRoot(prod.url("standby"))
    with pytest.raises(OperationFailed) as refused:
        apply_manifest(result.manifest, _Repo(), target, external=stager)
    msg = str(refused.value)
    assert "bytes-per-checksum" in msg and "distcp_url" in msg and "nothing was committed" in msg, msg
    assert "\n" not in msg
    assert target.fs.status(prod.path("standby") + "/f.bin") is None
    # Over RPC the copy keeps production's bytes per checksum (-pc) and verifies.
    over_rpc = str(hdfs_cluster.info["hdfs"])
    rpc = DistCpSettings.from_strings(f"{HADOOP_CLUSTER} distcp {hdfs_cluster.dir}", str(hc.DISTCP_JAR),
                                      f"{over_rpc}{prod.path('standby')}", prod.path("standby"))
    apply_manifest(result.manifest, _Repo(), target,
                   external=DistCpStager(rpc, over_rpc + "/" + source.split("/", 3)[3], what="test snapshot"))
    assert same_tree(prod, "standby", prod, "prod")


# --- issue 15: peer input limits --------------------------------------------------------------------


def test_a_peers_snapshot_document_keeps_at_most_the_documented_warnings(tmp_path: Path) -> None:
    """docs/FORMAT.md, Limits: "warnings in a snapshot document | the first 20 (WARNING_SAMPLE) and a
    line `... and N more`". A hostile peer commits a document under the 1 MiB limit that lists 60,000
    short warnings (and an empty manifest). The standby clips each warning's length but never their
    number: it stores and serves the 60,000 lines (every `snapshot show`, status and the document
    itself carry them)."""
    import grpc

    from drsync.repository import format as fmt
    from drsync.repository.manifest import Manifest
    from tests.test_peer_limits import Standby, _doc, commit

    s = Standby(tmp_path)
    try:
        manifest = Manifest.empty().to_bytes()
        warnings = [f"w{i}" for i in range(60_000)]
        doc = _doc(manifest, warnings=warnings)
        assert len(doc) <= fmt.SNAPSHOT_DOC_MAX_BYTES, len(doc)
        out = commit(s, doc, iter([manifest]))
        if isinstance(out, grpc.RpcError):
            return  # refused: the limit holds
        stored = s.repo.list_snapshots()
        assert stored, out
        kept = stored[-1].warnings
        assert len(kept) <= fmt.WARNING_SAMPLE + 1, f"the standby kept {len(kept)} warnings from a peer"
    finally:
        s.close()
