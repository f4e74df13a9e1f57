"""What one test sees of the session's real HDFS (tests/hadoop: Hadoop's MiniDFSCluster, an HA pair).

Each test gets a directory of its own below ``/t`` (owned by the test user ``drsync``) and admin
actions done by Hadoop itself as the HDFS superuser: ``dfsadmin`` (safe mode, quotas, allowing
snapshots), ``haadmin`` (failover), the namenodes' audit log (what a client really asked), and
Hadoop's own client for listings, copies and digests, so that no check of drsync's HDFS code rests
on that same code.

URLs name the standby namenode first, so that every client finds the active one by failing over.
"""

from __future__ import annotations

import uuid
from typing import Any

import requests

from drsync.storage.hdfs import HdfsFs, parse_hdfs_url
from tests.hadoop.cluster import HadoopCluster

BASE = "/t"
USER = "drsync"


class RealHdfs:
    """The session's cluster with a test directory of this test's own (``test_dir``)."""

    def __init__(self, cluster: HadoopCluster) -> None:
        self.cluster = cluster
        self.superuser = str(cluster.info["superuser"])
        state = cluster.state()
        # Standby first: every client starts at a namenode that refuses and must fail over.
        self.hosts = ",".join(reversed(state["webhdfs"]))
        self.admin_fs = HdfsFs(parse_hdfs_url(self.url("/", user=self.superuser)), retry_s=30)
        self.fs = HdfsFs(parse_hdfs_url(self.url("/")), retry_s=30)
        self.test_dir = f"{BASE}/{uuid.uuid4().hex[:10]}"
        self.fs.mkdirs(self.test_dir)

    # --- what every HDFS test uses ---------------------------------------------------

    def url(self, path: str, user: str | None = USER) -> str:
        return f"hdfs://{self.hosts}{path}" + (f"?user={user}" if user else "")

    def mkdirs(self, path: str) -> None:
        self.fs.mkdirs(path)

    @property
    def namenode_urls(self) -> list[str]:
        """``http://host:port`` of each namenode's WebHDFS, the active one first (asked now)."""
        return [f"http://{hp}" for hp in self.cluster.state()["webhdfs"]]

    def append(self, path: str, data: bytes, user: str = USER) -> None:
        """WebHDFS APPEND (two steps, like CREATE), straight to the active namenode."""
        r = requests.post(f"{self.namenode_urls[0]}/webhdfs/v1{path}", params={"op": "APPEND", "user.name": user},
                          allow_redirects=False, timeout=30)
        assert r.status_code == 307, r.text
        requests.post(r.headers["Location"], data=data, timeout=60).raise_for_status()

    # --- admin, done by Hadoop as the superuser --------------------------------------

    def allow_snapshot(self, path: str) -> None:
        self.cluster.dfsadmin("-allowSnapshot", path)

    def disallow_snapshot(self, path: str) -> None:
        self.cluster.dfsadmin("-disallowSnapshot", path)

    def snapshots(self, path: str) -> list[str]:
        """Snapshot names of ``path`` as Hadoop's own client lists them (``<path>/.snapshot``)."""
        return sorted(self.cluster.run("snapshots", path)["names"])

    def chmod(self, path: str, mode: int, owner: str | None = None) -> None:
        self.admin_fs.set_permission(path, mode)
        if owner is not None:
            active = self.cluster.state()["webhdfs"][0]
            r = requests.put(f"http://{active}/webhdfs/v1{path}",
                             params={"op": "SETOWNER", "owner": owner, "user.name": self.superuser}, timeout=30)
            r.raise_for_status()

    def set_quota(self, path: str, nbytes: int) -> None:
        """A space quota of ``nbytes`` (counted with replication, in whole blocks while a file is
        written); negative clears it."""
        if nbytes < 0:
            self.cluster.dfsadmin("-clrSpaceQuota", path)
        else:
            self.cluster.dfsadmin("-setSpaceQuota", str(nbytes), path)

    def set_name_quota(self, path: str, names: int) -> None:
        """At most ``names`` files and directories below ``path`` (itself included); negative clears it."""
        if names < 0:
            self.cluster.dfsadmin("-clrQuota", path)
        else:
            self.cluster.dfsadmin("-setQuota", str(names), path)

    def safe_mode(self, on: bool) -> None:
        self.cluster.dfsadmin("-safemode", "enter" if on else "leave")

    def active_index(self) -> int | None:
        for nn in self.cluster.state()["namenodes"]:
            if nn["state"] == "active":
                return int(nn["index"])
        return None

    def failover(self) -> None:
        """A graceful failover to the other namenode (``haadmin -failover``)."""
        nns = self.cluster.state()["namenodes"]
        active = next(nn for nn in nns if nn["state"] == "active")
        other = next(nn for nn in nns if nn["state"] != "active")
        self.cluster.haadmin("-failover", active["id"], other["id"])

    def all_standby(self) -> None:
        for nn in self.cluster.state()["namenodes"]:
            if nn["state"] == "active":
                self.cluster.haadmin("-transitionToStandby", nn["id"])

    def heal(self) -> None:
        """Back to one active namenode and out of safe mode (after a test that changed either)."""
        state = self.cluster.state()
        if not any(nn["state"] == "active" for nn in state["namenodes"]):
            self.cluster.haadmin("-transitionToActive", state["namenodes"][0]["id"])
        if "ON" in self.cluster.dfsadmin("-safemode", "get")["out"]:
            self.safe_mode(False)

    # --- what Hadoop itself says happened ----------------------------------------------

    def audit_mark(self) -> int:
        return self.cluster.audit_next()

    def ops_since(self, mark: int, under: str | None = None) -> list[tuple[str, str]]:
        """``(cmd, src)`` of every namenode operation since ``mark`` below ``under`` (default: the
        test directory); ``cmd`` is Hadoop's audit name (``open``, ``listStatus``, ``create``,
        ``rename``, ``setTimes``, ``setPermission``, ``computeSnapshotDiff``...)."""
        top = (under or self.test_dir).rstrip("/")
        return [(e["cmd"], e["src"]) for e in self.cluster.audit(mark)
                if e.get("src") and (e["src"] == top or e["src"].startswith(top + "/"))]

    def events_since(self, mark: int, under: str | None = None) -> list[dict[str, Any]]:
        """Like :meth:`ops_since`, whole audit events: ``ok`` (False: the namenode refused), ``user``,
        ``cmd``, ``src``, ``dst``."""
        top = (under or self.test_dir).rstrip("/")
        return [e for e in self.cluster.audit(mark)
                if e.get("src") and (e["src"] == top or e["src"].startswith(top + "/"))]

    def token(self, user: str = USER) -> str:
        """A real delegation token for ``user``. Note: with simple authentication (this cluster has no
        Kerberos) the namenodes' WebHDFS ignores ``delegation=``: every such request acts as ``dr.who``."""
        return self.cluster.token(user)

    def tree(self, path: str) -> dict[str, dict[str, Any]]:
        """Every entry below ``path`` by relative path: type, mode, mtime_ms, owner, and for files
        length and sha256 (read by Hadoop's client)."""
        return {e["path"]: e for e in self.cluster.run("tree", path)["entries"]}

    def copy(self, src: str, dst: str) -> None:
        """``hdfs dfs -cp -p`` as the superuser: the same tree under new inode ids."""
        self.cluster.run("copy", src, dst)
