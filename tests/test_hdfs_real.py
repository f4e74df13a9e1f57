"""The storage-independent HDFS tests against a real namenode (opt-in).

Set ``DRSYNC_TEST_HDFS=http://namenode:9870`` (several, comma-separated, for
namenode HA) to run them; ``DRSYNC_TEST_HDFS_USER`` (default ``drsync``) must
be able to write below ``DRSYNC_TEST_HDFS_DIR`` (default ``/tmp/drsync-tests``).
Without it the module is skipped and says why (``make test`` prints skip
reasons).

What only a real namenode confirms, beyond tests/webhdfs.py: real datanode
pipelines and what "closed" means for durability, the umask applied at
CREATE, real permission and superuser rules, snapshot semantics under
concurrent writes (copy-on-write of blocks, appends to open files), the exact
GETSNAPSHOTDIFF report (renames across directories), HA failover timing, and
Kerberos/delegation-token authentication.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from drsync.capture import capture
from drsync.dataroot.hdfs import SNAPSHOT_PREFIX, HdfsDataRoot
from drsync.repository.repo import Repository
from drsync.storage import Storage, open_storage
from drsync.storage.hdfs import HdfsError, HdfsFs, parse_hdfs_url
from drsync.storage.memory import MemoryStorage
from tests import test_backup_cli as backup_tests
from tests import test_snapshot_cli as snapshot_tests
from tests.sites import HdfsSite
from tests.test_storage_conformance import (  # noqa: F401
    test_aborted_writer_leaves_nothing,
    test_concurrent_exclusive_writes_have_one_winner,
    test_delete,
    test_exclusive_write_never_overwrites,
    test_is_a_storage,
    test_list_by_prefix_sorted_with_sizes,
    test_missing_blob_is_a_clear_error,
    test_overwrite_replaces_whole_blob,
    test_write_read_roundtrip,
    test_writer_is_invisible_until_commit,
)

REAL = os.environ.get("DRSYNC_TEST_HDFS", "")
pytestmark = pytest.mark.skipif(not REAL, reason="no real namenode: set DRSYNC_TEST_HDFS=http://namenode:9870 "
                                                 "to run the HDFS tests against one")


class RealHdfs:
    """What the tests ask of the WebHDFS test server, done on a real cluster."""

    def __init__(self) -> None:
        self.hosts = ",".join(u.split("://", 1)[-1].rstrip("/") for u in REAL.split(","))
        self.user = os.environ.get("DRSYNC_TEST_HDFS_USER", "drsync")
        base = os.environ.get("DRSYNC_TEST_HDFS_DIR", "/tmp/drsync-tests").rstrip("/")
        self.test_dir = f"{base}/{uuid.uuid4().hex[:10]}"
        self.fs = HdfsFs(parse_hdfs_url(self.url("/")))
        self.mkdirs(self.test_dir)

    def url(self, path: str, user: str | None = "drsync") -> str:
        return f"hdfs://{self.hosts}{path}" + (f"?user={self.user}" if user else "")

    def mkdirs(self, path: str) -> None:
        self.fs.mkdirs(path)

    def close(self) -> None:
        try:
            self.fs.delete(self.test_dir, recursive=True)
        except HdfsError:
            pass  # snapshottable directories with snapshots stay; the operator removes them


@pytest.fixture
def webhdfs():  # type: ignore[no-untyped-def]
    cluster = RealHdfs()
    yield cluster
    cluster.close()


@pytest.fixture
def storage(webhdfs) -> Storage:  # type: ignore[no-untyped-def]
    return open_storage(webhdfs.url(f"{webhdfs.test_dir}/store"), create=True)


PAIRS = [("hdfs", "hdfs"), ("local", "hdfs"), ("hdfs", "local")]


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_snapshot_restore_and_delta(drsync, tmp_path: Path, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                    source: str, target: str) -> None:
    snapshot_tests.test_snapshot_restore_and_delta_on_every_storage(drsync, tmp_path, request, source, target)


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_backup_across_storages(drsync, tmp_path: Path, request: pytest.FixtureRequest,  # type: ignore[no-untyped-def]
                                source: str, target: str) -> None:
    backup_tests.test_backup_pulled_onto_local_disk_restores_onto_any_storage(drsync, tmp_path, request, source,
                                                                              target)


def test_capture_uses_a_native_snapshot_when_allowed(webhdfs) -> None:  # type: ignore[no-untyped-def]
    site = HdfsSite(webhdfs, webhdfs.test_dir)
    site.write("data", "a.txt", b"x")
    try:
        webhdfs.fs.client.allow_snapshot(site.path("data"))
    except Exception as e:  # the namenode's own refusal is the reason to skip
        pytest.skip(f"cannot make {site.path('data')} snapshottable as {webhdfs.user} ({e}); "
                    f"run as the HDFS superuser or allow snapshots on DRSYNC_TEST_HDFS_DIR")
    repo = Repository.init(MemoryStorage(), cluster_id="e", release="1")
    w = repo.chunk_writer()
    at = time.time()
    result = capture(HdfsDataRoot(site.url("data")), w, captured_at=at)
    w.flush()
    assert result.manifest.pycolumn("path") == ["a.txt"]
    left = [n for n in webhdfs.fs.list_snapshots(site.path("data")) if n.startswith(SNAPSHOT_PREFIX)]
    assert len(left) <= 1 and all(n.startswith(f"{SNAPSHOT_PREFIX}{int(at * 1000)}-") for n in left)
    for n in left:
        webhdfs.fs.delete_snapshot(site.path("data"), n)
