"""A WebHDFS server for tests: namenodes and a datanode on loopback, following the Hadoop REST spec.

The HDFS tests run on a real Hadoop mini cluster (tests/hadoop, tests/realhdfs.py);
this server is for the faults that cluster cannot produce on demand (a namenode
without GETSNAPSHOTDIFF, a refused anonymous request, a hook at an exact request),
and tests/test_hdfs.py checks it answers as the real namenode does on what it
models. It follows the WebHDFS REST API (Hadoop's
``hadoop-hdfs/src/site/markdown/WebHDFS.md``, cited below as "spec §") wherever
a client can tell the difference; it keeps the namespace in memory and file
bytes in local files (so large files stream and never sit in memory).

Fault switches for tests: ``safe_mode``, ``active`` (which namenode is active;
the others answer ``StandbyException``), ``set_quota`` (a space quota that
fails a datanode write midway with ``DSQuotaExceededException``), ``tokens``
(delegation tokens; with ``require_token`` an anonymous call gets 401),
``snapshot_diff`` (False: the op is unknown, as on namenodes before 3.0),
``list_snapshot_dir`` (False: ``<dir>/.snapshot`` cannot be listed, as through some gateways),
``list_limit`` (entries per ``LISTSTATUS_BATCH`` page, ``dfs.ls.limit``),
``latency_s`` (a modelled round trip per namenode call, for benchmarks) and
``on_request`` (a hook run before every namenode request).

Where it differs from a real Hadoop 3.5 namenode (seen on the mini cluster): a
snapshot freezes everything here, while in HDFS a file open for write is not
frozen (its length in the snapshot grows until it is closed, and GETSNAPSHOTDIFF
reports none of it) nor is a directory's modification time when a child is added
after the snapshot; renames across directories are reported here as a delete plus
a create, by HDFS as one RENAME; a write here never outlives a failover, while on
HDFS the datanode's own client fails when its namenode turns standby (and the
retried CREATE meets the first attempt's file, still open under its lease); with
simple authentication HDFS ignores ``delegation=`` altogether (anonymous ``dr.who``);
reads count once here, twice in HDFS's audit log (the namenode's redirect and the
datanode's client); and HDFS does not audit what safe mode refuses.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

PREFIX = "/webhdfs/v1"
NAMENODE_RPC_PORT = 8020  # namenode i redirects with namenoderpcaddress=127.0.0.1:8020+i
SUPERUSER = "hdfs"


class RemoteError(Exception):
    """An exception the server reports as a RemoteException JSON body (spec § Error Responses)."""

    JAVA: ClassVar[dict[str, tuple[str, int]]] = {
        "FileNotFoundException": ("java.io.FileNotFoundException", 404),
        "FileAlreadyExistsException": ("org.apache.hadoop.fs.FileAlreadyExistsException", 403),
        "AccessControlException": ("org.apache.hadoop.security.AccessControlException", 403),
        "SafeModeException": ("org.apache.hadoop.hdfs.server.namenode.SafeModeException", 403),
        "StandbyException": ("org.apache.hadoop.ipc.StandbyException", 403),
        "DSQuotaExceededException": ("org.apache.hadoop.hdfs.protocol.DSQuotaExceededException", 403),
        "SnapshotException": ("org.apache.hadoop.hdfs.protocol.SnapshotException", 403),
        "SnapshotAccessControlException": ("org.apache.hadoop.hdfs.protocol.SnapshotAccessControlException", 403),
        "PathIsNotEmptyDirectoryException": ("org.apache.hadoop.fs.PathIsNotEmptyDirectoryException", 403),
        "ParentNotDirectoryException": ("org.apache.hadoop.fs.ParentNotDirectoryException", 403),
        "IOException": ("java.io.IOException", 403),
        "IllegalArgumentException": ("java.lang.IllegalArgumentException", 400),
        "SecurityException": ("java.lang.SecurityException", 401),
    }

    def __init__(self, exception: str, message: str) -> None:
        super().__init__(message)
        self.exception = exception
        self.message = message

    @property
    def status(self) -> int:
        return self.JAVA[self.exception][1]

    def body(self) -> bytes:
        return json.dumps({"RemoteException": {"exception": self.exception, "javaClassName":
                           self.JAVA[self.exception][0], "message": self.message}}).encode()


@dataclass
class Inode:
    type: str  # FILE | DIRECTORY | SYMLINK
    file_id: int
    owner: str
    group: str
    permission: int
    mtime_ms: int
    atime_ms: int
    children: dict[str, Inode] = field(default_factory=dict)
    data: str | None = None  # local file holding the bytes (immutable once complete)
    length: int = 0
    symlink: str | None = None
    snapshottable: bool = False
    snapshots: dict[str, Inode] = field(default_factory=dict)
    space_quota: int = -1
    writing: bool = False

    def status(self, name: str) -> dict[str, Any]:
        """A FileStatus JSON object (spec § FileStatus Properties)."""
        s: dict[str, Any] = {
            "accessTime": self.atime_ms, "blockSize": 134217728 if self.type == "FILE" else 0,
            "childrenNum": len(self.children), "fileId": self.file_id, "group": self.group,
            "length": self.length if self.type == "FILE" else 0, "modificationTime": self.mtime_ms,
            "owner": self.owner, "pathSuffix": name, "permission": f"{self.permission:o}",
            "replication": 3 if self.type == "FILE" else 0, "storagePolicy": 0, "type": self.type,
        }
        if self.symlink is not None:
            s["symlink"] = self.symlink
        if self.snapshottable:
            s["snapshotEnabled"] = True
        return s


def _now_ms() -> int:
    return int(time.time() * 1000)


class WebHdfsCluster:
    """One HDFS namespace served by ``namenodes`` namenode endpoints and one datanode endpoint."""

    def __init__(self, *, namenodes: int = 1, superuser: str = SUPERUSER) -> None:
        self.store = tempfile.mkdtemp(prefix="drsync-webhdfs-")
        self.lock = threading.RLock()
        self._ids = itertools.count(16386)  # HDFS inode ids start above the reserved range
        self.superuser = superuser
        self.root = Inode("DIRECTORY", next(self._ids), superuser, "supergroup", 0o777, _now_ms(), 0)
        self.safe_mode = False
        self.active = 0
        self.tokens: dict[str, str] = {}
        self.require_token = False
        self.snapshot_diff = True
        self.list_snapshot_dir = True  # False: LISTSTATUS of <dir>/.snapshot is refused, as by some gateways
        self.list_limit = 1000
        self.latency_s = 0.0  # added to every namenode call, like a network round trip (benchmarks)
        self.on_request: Callable[[str, str], None] | None = None
        self.requests: list[tuple[str, str]] = []
        self._servers: list[ThreadingHTTPServer] = []
        self.namenode_urls = [self._serve(_NamenodeHandler, i) for i in range(namenodes)]
        self.datanode_url = self._serve(_DatanodeHandler, -1)

    def _serve(self, handler: type[BaseHTTPRequestHandler], index: int) -> str:
        cluster = self

        class Handler(handler):  # type: ignore[valid-type, misc]
            pass

        Handler.cluster = cluster  # type: ignore[attr-defined]
        Handler.index = index  # type: ignore[attr-defined]
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True, name=f"webhdfs-{index}").start()
        self._servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    def url(self, path: str, user: str | None = "drsync") -> str:
        hosts = ",".join(u.split("://", 1)[1] for u in self.namenode_urls)
        return f"hdfs://{hosts}{path}" + (f"?user={user}" if user else "")

    def close(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        shutil.rmtree(self.store, ignore_errors=True)

    # --- helpers for tests (as an administrator would, with the hdfs command) ---

    def mkdirs(self, path: str, owner: str = "drsync", permission: int = 0o755) -> None:
        with self.lock:
            self._mkdirs(path, self.superuser, permission)
            self._resolve(path).owner = owner

    def allow_snapshot(self, path: str) -> None:
        with self.lock:
            self._resolve(path).snapshottable = True

    def set_quota(self, path: str, space_bytes: int) -> None:
        with self.lock:
            self._resolve(path).space_quota = space_bytes

    def chmod(self, path: str, permission: int, owner: str | None = None) -> None:
        with self.lock:
            node = self._resolve(path)
            node.permission = permission
            if owner:
                node.owner = owner

    def snapshots(self, path: str) -> list[str]:
        with self.lock:
            return sorted(self._resolve(path).snapshots)

    def files(self, path: str = "/") -> dict[str, bytes]:
        """Every file below ``path`` with its bytes (the live tree, not snapshots)."""
        out: dict[str, bytes] = {}
        with self.lock:
            start = self._resolve(path)
            stack = [("", start)]
            while stack:
                rel, node = stack.pop()
                for name, child in node.children.items():
                    r = f"{rel}/{name}" if rel else name
                    if child.type == "DIRECTORY":
                        stack.append((r, child))
                    elif child.type == "FILE":
                        out[r] = self._read(child, 0, None)
        return out

    # --- the namespace ---

    @staticmethod
    def _parts(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _resolve(self, path: str, *, snapshots: bool = True) -> Inode:
        node, _ = self._walk(path, snapshots=snapshots)
        return node

    def _walk(self, path: str, *, snapshots: bool = True) -> tuple[Inode, bool]:
        """The inode at ``path`` and whether it lies inside a read-only snapshot (spec § Snapshots)."""
        node = self.root
        parts = self._parts(path)
        in_snapshot = False
        i = 0
        while i < len(parts):
            name = parts[i]
            if node.type != "DIRECTORY":
                raise RemoteError("ParentNotDirectoryException", f"{path} (is not a directory)")
            if name == ".snapshot" and node.snapshottable and snapshots:
                if i + 1 == len(parts):
                    if not self.list_snapshot_dir:  # a gateway that hides the folder (tests only)
                        raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
                    listing = Inode("DIRECTORY", node.file_id, node.owner, node.group, 0o555, node.mtime_ms, 0)
                    listing.children = dict(node.snapshots)
                    return listing, True
                snap = node.snapshots.get(parts[i + 1])
                if snap is None:
                    raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
                node, in_snapshot, i = snap, True, i + 2
                continue
            child = node.children.get(name)
            if child is None:
                raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
            node = child
            i += 1
        return node, in_snapshot

    def _parent(self, path: str) -> tuple[Inode, str]:
        parts = self._parts(path)
        if parts and parts[-1] == ".snapshot":
            raise RemoteError("IllegalArgumentException", f"{path}: \".snapshot\" is a reserved name")
        if not parts:
            raise RemoteError("IOException", "cannot operate on the root")
        node, in_snap = self._walk("/" + "/".join(parts[:-1]))
        if in_snap:
            raise RemoteError("SnapshotAccessControlException",
                              f"Modification on a read-only snapshot is disallowed: {path}")
        if node.type != "DIRECTORY":
            raise RemoteError("ParentNotDirectoryException", f"Parent path is not a directory: {path}")
        return node, parts[-1]

    def _check(self, user: str, node: Inode, bit: int, path: str, what: str) -> None:
        """HDFS permission check (HdfsPermissionsGuide): owner, then group membership, then other."""
        if user == self.superuser:
            return
        shift = 6 if user == node.owner else 0
        if not (node.permission >> shift) & bit:
            access = {4: "READ", 2: "WRITE", 1: "EXECUTE"}[bit]
            raise RemoteError("AccessControlException",
                              f"Permission denied: user={user}, access={access}, inode=\"{path}\":"
                              f"{node.owner}:{node.group}:{_mode_string(node)} ({what})")

    def _check_write_parent(self, user: str, path: str) -> tuple[Inode, str]:
        parent, name = self._parent(path)
        self._check(user, parent, 2, "/" + "/".join(self._parts(path)[:-1]), "write")
        return parent, name

    def _mkdirs(self, path: str, user: str, permission: int) -> None:
        if ".snapshot" in self._parts(path):
            raise RemoteError("SnapshotAccessControlException", f"{path}: \".snapshot\" is a reserved name; "
                              f"modification on a read-only snapshot is disallowed")
        node = self.root
        walked = ""
        for name in self._parts(path):
            walked += "/" + name
            child = node.children.get(name)
            if child is None:
                self._check(user, node, 2, walked.rsplit("/", 1)[0] or "/", "mkdirs")
                child = Inode("DIRECTORY", next(self._ids), user, "supergroup", permission, _now_ms(), 0)
                node.children[name] = child
                node.mtime_ms = _now_ms()
            elif child.type != "DIRECTORY":
                raise RemoteError("ParentNotDirectoryException", f"Parent path is not a directory: {walked}")
            node = child

    def _make_parents(self, path: str, user: str) -> None:
        """FileSystem.create makes missing parent directories (WebHDFS CREATE does too)."""
        parent = "/" + "/".join(self._parts(path)[:-1])
        try:
            self._resolve(parent)
        except RemoteError as e:
            if e.exception != "FileNotFoundException":
                raise
            self._mkdirs(parent, user, 0o755)

    def _quota_root(self, path: str) -> Inode | None:
        node = self.root
        found = node if node.space_quota >= 0 else None
        for name in self._parts(path)[:-1]:
            node = node.children.get(name)  # type: ignore[assignment]
            if node is None:
                break
            if node.space_quota >= 0:
                found = node
        return found

    @staticmethod
    def _usage(node: Inode) -> int:
        if node.type == "FILE":
            return node.length
        return sum(WebHdfsCluster._usage(c) for c in node.children.values())

    def _read(self, node: Inode, offset: int, length: int | None) -> bytes:
        if not node.data:
            return b""
        with open(node.data, "rb") as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)

    def new_data_file(self) -> str:
        fd, path = tempfile.mkstemp(dir=self.store)
        os.close(fd)
        return path


def _mode_string(node: Inode) -> str:
    kind = "d" if node.type == "DIRECTORY" else "-"
    bits = "".join(c if node.permission & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return kind + bits


def _bool(v: str | None, default: bool = False) -> bool:
    return default if v is None else v.lower() == "true"


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls
    cluster: WebHdfsCluster
    index: int

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", *, ctype: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, doc: object, status: int = 200) -> None:
        self._reply(status, json.dumps(doc).encode())

    def _error(self, err: RemoteError) -> None:
        # A body the client did not send must still be drained, or the connection desynchronises.
        self.close_connection = True
        self._reply(err.status, err.body())

    def _request(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        if not parts.path.startswith(PREFIX):
            raise RemoteError("IllegalArgumentException", f"{parts.path}: not a WebHDFS path")
        path = unquote(parts.path[len(PREFIX):]) or "/"
        params = {k.lower() if k.lower() in ("op",) else k: v[-1]
                  for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        return path, params

    def _user(self, params: dict[str, str]) -> str:
        """Spec § Authentication: a delegation token names the user; else ``user.name`` when security is off."""
        c = self.cluster
        token = params.get("delegation")
        if token is not None:
            user = c.tokens.get(token)
            if user is None:
                raise RemoteError("SecurityException", "Failed to obtain user group information: "
                                  "token is expired or doesn't exist")
            return user
        if c.require_token:
            raise RemoteError("SecurityException", "Authentication required")
        return params.get("user.name") or "dr.who"

    def _body_chunks(self):  # type: ignore[no-untyped-def]
        """The request body as it arrives: Content-Length or chunked transfer coding (RFC 9112 § 7.1)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
                yield data

    def _drain(self) -> None:
        for _ in self._body_chunks():
            pass


class _NamenodeHandler(_Base):
    """The namenode's WebHDFS endpoints (spec § Operations)."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    WRITE_OPS: ClassVar[set[str]] = {
        "CREATE", "MKDIRS", "RENAME", "SETPERMISSION", "SETOWNER", "SETTIMES", "CREATESNAPSHOT", "DELETESNAPSHOT",
        "RENAMESNAPSHOT", "APPEND", "DELETE", "ALLOWSNAPSHOT"}

    def _dispatch(self, method: str) -> None:
        c = self.cluster
        try:
            self._drain()
            path, params = self._request()
            op = params.get("op", "").upper()
            c.requests.append((op, path))
            if c.latency_s:
                time.sleep(c.latency_s)  # the modelled round trip itself, not a wait for a condition
            if c.on_request:
                c.on_request(op, path)
            if self.index != c.active and op == "CREATE":
                # Hadoop 3.5: a standby picks a datanode for CREATE without asking its namespace; the
                # datanode's own call to that namenode is what fails (StandbyException, from the datanode).
                self._redirect(path, params, params.get("user.name") or "dr.who")
                return
            if self.index != c.active:
                # An HA namenode in standby state serves nothing (HDFS High Availability guide).
                category = "WRITE" if op in self.WRITE_OPS else "READ"
                raise RemoteError("StandbyException", f"Operation category {category} is not supported in "
                                  f"state standby. Visit https://s.apache.org/sbnn-error")
            handler = getattr(self, f"op_{method}_{op}", None)
            if handler is None:
                raise RemoteError("IllegalArgumentException",
                                  f"Invalid value for webhdfs parameter \"op\": No enum constant "
                                  f"org.apache.hadoop.hdfs.web.resources.{method.title()}OpParam.Op.{op}")
            user = self._user(params)
            if c.safe_mode and op in self.WRITE_OPS:
                raise RemoteError("SafeModeException", f"Cannot {op.lower()} {path}. Name node is in safe mode.")
            with c.lock:
                handler(path, params, user)
        except RemoteError as e:
            self._error(e)

    def _redirect(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Create and Write to a File / Open and Read a File: a 307 to a datanode URL."""
        q = "&".join(f"{quote(k)}={quote(v)}" for k, v in params.items() if k not in ("user.name", "delegation"))
        location = f"{self.cluster.datanode_url}{PREFIX}{quote(path)}?{q}&user.name={quote(user)}" \
                   f"&namenoderpcaddress=127.0.0.1:{NAMENODE_RPC_PORT + self.index}"
        self._reply(307, b"", headers={"Location": location})

    # GET
    def op_GET_GETFILESTATUS(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Status of a File/Directory: a ``FileStatus`` object, 404 FileNotFoundException if absent."""
        node = self.cluster._resolve(path)
        self._json({"FileStatus": node.status("")})

    def op_GET_LISTSTATUS(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § List a Directory (a file lists as itself)."""
        node = self.cluster._resolve(path)
        if node.type != "DIRECTORY":
            self._json({"FileStatuses": {"FileStatus": [node.status("")]}})
            return
        self.cluster._check(user, node, 4, path, "listStatus")
        self._json({"FileStatuses": {"FileStatus": [c.status(n) for n, c in sorted(node.children.items())]}})

    def op_GET_LISTSTATUS_BATCH(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Iteratively List a Directory: pages after ``startAfter`` with ``remainingEntries``."""
        node = self.cluster._resolve(path)
        if node.type != "DIRECTORY":
            raise RemoteError("IllegalArgumentException", f"{path} is not a directory")
        self.cluster._check(user, node, 4, path, "listStatus")
        after = params.get("startafter", "")  # Hadoop 3.5 takes only this spelling (not the docs' startAfter)
        names = [n for n in sorted(node.children) if n > after]
        page = names[: self.cluster.list_limit]
        self._json({"DirectoryListing": {"partialListing": {"FileStatuses": {"FileStatus": [
            node.children[n].status(n) for n in page]}}, "remainingEntries": len(names) - len(page)}})

    def op_GET_OPEN(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Open and Read a File: a 307 to a datanode, which serves ``offset``/``length``."""
        node = self.cluster._resolve(path)
        if node.type != "FILE":
            raise RemoteError("FileNotFoundException", f"Path is not a file: {path}")
        self.cluster._check(user, node, 4, path, "open")
        self._redirect(path, params, user)

    def op_GET_GETHOMEDIRECTORY(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Get Home Directory: ``{"Path": "/user/<user>"}``."""
        self._json({"Path": f"/user/{user}"})

    def op_GET_GETSNAPSHOTDIFF(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Get Snapshot Diff. An empty snapshot name means the current tree, as in the DFS API."""
        c = self.cluster
        if not c.snapshot_diff:
            raise RemoteError("IllegalArgumentException", "Invalid value for webhdfs parameter \"op\": No enum "
                              "constant org.apache.hadoop.hdfs.web.resources.GetOpParam.Op.GETSNAPSHOTDIFF")
        node = c._resolve(path)
        if not node.snapshottable:
            raise RemoteError("SnapshotException", f"Directory is not a snapshottable directory: {path}")

        def tree(name: str) -> Inode:
            if not name:
                return node
            if name not in node.snapshots:
                raise RemoteError("SnapshotException", f"Cannot find the snapshot of directory {path} with "
                                  f"name {name}")
            return node.snapshots[name]

        old, new = params.get("oldsnapshotname", ""), params.get("snapshotname", "")
        diff = _diff(tree(old), tree(new), "")
        self._json({"SnapshotDiffReport": {"diffList": diff, "fromSnapshot": old, "snapshotRoot": path,
                                           "toSnapshot": new}})

    # PUT
    def op_PUT_CREATE(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Create and Write to a File, step 1: a 307 to a datanode; the data goes there (step 2)."""
        c = self.cluster
        c._make_parents(path, user)
        parent, name = c._parent(path)
        existing = parent.children.get(name)
        if existing is not None and (existing.type == "DIRECTORY" or not _bool(params.get("overwrite"))):
            raise RemoteError("FileAlreadyExistsException", f"{path} for client 127.0.0.1 already exists")
        c._check(user, parent, 2, "/" + "/".join(c._parts(path)[:-1]), "create")
        self._redirect(path, params, user)

    def op_PUT_MKDIRS(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Make a Directory: ``{"boolean": true}``, parents included."""
        perm = int(params.get("permission") or "755", 8)
        c = self.cluster
        c._mkdirs(path, user, perm)
        self._json({"boolean": True})

    def op_PUT_RENAME(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Rename a File/Directory: ``{"boolean": false}`` when the destination exists or a parent is
        missing."""
        c = self.cluster
        dst = params.get("destination", "")
        try:
            src_parent, src_name = c._check_write_parent(user, path)
            node = src_parent.children.get(src_name)
            if node is None:
                self._json({"boolean": False})
                return
            dst_parent, dst_name = c._parent(dst)
        except RemoteError as e:
            if e.exception == "FileNotFoundException":
                self._json({"boolean": False})
                return
            raise
        target = dst_parent.children.get(dst_name)
        if target is not None and target.type == "DIRECTORY":  # rename into a directory (FileSystem.rename)
            dst_parent, dst_name = target, src_name
            target = dst_parent.children.get(dst_name)
        if target is not None:
            self._json({"boolean": False})
            return
        c._check(user, dst_parent, 2, dst, "rename")
        del src_parent.children[src_name]
        dst_parent.children[dst_name] = node
        src_parent.mtime_ms = dst_parent.mtime_ms = _now_ms()
        self._json({"boolean": True})

    def op_PUT_SETPERMISSION(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Set Permission: owner or superuser only; empty 200."""
        node = self._own(path, user)
        node.permission = int(params.get("permission") or "755", 8)
        self._reply(200)

    def op_PUT_SETOWNER(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Set Owner: changing the owner needs the superuser; empty 200."""
        node = self._own(path, user)
        if user != self.cluster.superuser and params.get("owner"):
            raise RemoteError("AccessControlException", "Non-super user cannot change owner")
        node.owner = params.get("owner") or node.owner
        node.group = params.get("group") or node.group
        self._reply(200)

    def op_PUT_SETTIMES(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Set Access or Modification Time: -1 keeps a time; empty 200. Needs WRITE access to
        the path itself, from its owner too (as a real namenode checks it, FSDirAttrOp.setTimes)."""
        node, in_snap = self.cluster._walk(path)
        if in_snap:
            raise RemoteError("SnapshotAccessControlException", "Modification on a read-only snapshot is "
                              "disallowed")
        self.cluster._check(user, node, 2, path, "setTimes")
        mtime = int(params.get("modificationtime", "-1"))
        atime = int(params.get("accesstime", "-1"))
        if mtime != -1:
            node.mtime_ms = mtime
        if atime != -1:
            node.atime_ms = atime
        self._reply(200)

    def _own(self, path: str, user: str) -> Inode:
        node, in_snap = self.cluster._walk(path)
        if in_snap:
            raise RemoteError("SnapshotAccessControlException", "Modification on a read-only snapshot is "
                              "disallowed")
        if user not in (node.owner, self.cluster.superuser):
            raise RemoteError("AccessControlException", f"Permission denied. user={user} is not the owner of "
                              f"inode={path}")
        return node

    def op_PUT_ALLOWSNAPSHOT(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Allow Snapshot: superuser only (hdfs dfsadmin -allowSnapshot)."""
        if user != self.cluster.superuser:
            raise RemoteError("AccessControlException", "Superuser privilege is required")
        self.cluster._resolve(path).snapshottable = True
        self._reply(200)

    def op_PUT_CREATESNAPSHOT(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Create Snapshot: ``{"Path": "<dir>/.snapshot/<name>"}``; a frozen copy of the tree."""
        node = self._own(path, user)
        if not node.snapshottable:
            raise RemoteError("SnapshotException", f"Directory is not a snapshottable directory: {path}")
        name = params.get("snapshotname") or time.strftime("s%Y%m%d-%H%M%S.000")
        if name in node.snapshots:
            raise RemoteError("SnapshotException", f"Failed to add snapshot: there is already a snapshot with "
                              f"the same name \"{name}\".")
        frozen = copy.deepcopy(Inode(node.type, node.file_id, node.owner, node.group, node.permission,
                                     node.mtime_ms, node.atime_ms, children=node.children))
        node.snapshots[name] = frozen
        self._json({"Path": f"{path.rstrip('/')}/.snapshot/{name}"})

    def op_PUT_RENAMESNAPSHOT(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Rename Snapshot: empty 200."""
        node = self._own(path, user)
        old, new = params.get("oldsnapshotname", ""), params.get("snapshotname", "")
        if old not in node.snapshots:
            raise RemoteError("SnapshotException", f"The snapshot {old} does not exist for directory {path}")
        node.snapshots[new] = node.snapshots.pop(old)
        self._reply(200)

    # POST
    def op_POST_APPEND(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Append to a File: a 307 to a datanode, like CREATE."""
        node = self.cluster._resolve(path)
        self.cluster._check(user, node, 2, path, "append")
        self._redirect(path, params, user)

    # DELETE
    def op_DELETE_DELETE(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Delete a File/Directory: ``{"boolean": false}`` when the path does not exist."""
        c = self.cluster
        try:
            parent, name = c._check_write_parent(user, path)
        except RemoteError as e:
            if e.exception == "FileNotFoundException":
                self._json({"boolean": False})
                return
            raise
        node = parent.children.get(name)
        if node is None:
            self._json({"boolean": False})
            return
        if node.type == "DIRECTORY" and node.children and not _bool(params.get("recursive")):
            raise RemoteError("PathIsNotEmptyDirectoryException", f"`{path} is non empty': Directory is not empty")
        if _has_snapshots(node):
            raise RemoteError("SnapshotException", f"The directory {path} cannot be deleted since {path} is "
                              f"snapshottable and already has snapshots")
        # Like FSDirDeleteOp: ALL access to every directory of the subtree, owners included.
        todo = [(path, node)]
        while todo:
            p, n = todo.pop()
            if n.type == "DIRECTORY" and n.children:
                for bit in (4, 2, 1):
                    c._check(user, n, bit, p, "delete")
                todo.extend((f"{p}/{k}", v) for k, v in n.children.items())
        del parent.children[name]
        parent.mtime_ms = _now_ms()
        self._json({"boolean": True})

    def op_DELETE_DELETESNAPSHOT(self, path: str, params: dict[str, str], user: str) -> None:
        """Spec § Delete Snapshot: empty 200; SnapshotException for an unknown name."""
        node = self._own(path, user)
        name = params.get("snapshotname", "")
        if node.snapshots.pop(name, None) is None:
            raise RemoteError("SnapshotException", f"Cannot delete snapshot {name} from path {path}: the "
                              f"snapshot does not exist.")
        self._reply(200)


def _has_snapshots(node: Inode) -> bool:
    if node.snapshots:
        return True
    return any(_has_snapshots(c) for c in node.children.values() if c.type == "DIRECTORY")


def _diff(old: Inode, new: Inode, rel: str) -> list[dict[str, str]]:
    """A snapshot diff report (spec § SnapshotDiffReport JSON Schema): paths relative to the snapshot root.

    Like HDFS, a directory whose children changed is reported MODIFY, a created
    or deleted subtree only at its top, and an inode kept under a new name as
    RENAME (matched by inode id within one directory level, which is all drsync
    relies on: a RENAME is treated as a delete plus a create).
    """
    out: list[dict[str, str]] = []
    changed_here = False
    old_by_id = {c.file_id: n for n, c in old.children.items()}
    for name, child in sorted(new.children.items()):
        path = f"{rel}/{name}" if rel else name
        before = old.children.get(name)
        if before is None or before.file_id != child.file_id:
            changed_here = True
            was = old_by_id.get(child.file_id)
            if was is not None and was not in new.children:
                out.append({"sourcePath": f"{rel}/{was}" if rel else was, "targetPath": path, "type": "RENAME"})
            else:
                if before is not None:
                    out.append({"sourcePath": path, "targetPath": "", "type": "DELETE"})
                out.append({"sourcePath": path, "targetPath": "", "type": "CREATE"})
            continue
        if child.type == "DIRECTORY":
            out.extend(_diff(before, child, path))
            if (before.permission, before.owner, before.group, before.mtime_ms) != (
                    child.permission, child.owner, child.group, child.mtime_ms) and not any(
                    d["sourcePath"] == path for d in out):
                out.append({"sourcePath": path, "targetPath": "", "type": "MODIFY"})
        elif (before.data, before.length, before.permission, before.mtime_ms, before.symlink) != (
                child.data, child.length, child.permission, child.mtime_ms, child.symlink):
            out.append({"sourcePath": path, "targetPath": "", "type": "MODIFY"})
    new_ids = {c.file_id for c in new.children.values()}
    for name, child in sorted(old.children.items()):
        if name not in new.children and child.file_id not in new_ids:
            changed_here = True
            out.append({"sourcePath": f"{rel}/{name}" if rel else name, "targetPath": "", "type": "DELETE"})
        elif name in new.children and new.children[name].file_id != child.file_id and child.file_id in new_ids:
            changed_here = True
    if changed_here:
        out.insert(0, {"sourcePath": rel, "targetPath": "", "type": "MODIFY"})
    return out


class _DatanodeHandler(_Base):
    """The datanode side of the two-step CREATE/APPEND and of OPEN (spec § Create and Write to a File)."""

    def do_PUT(self) -> None:
        self._write(append=False)

    def do_POST(self) -> None:
        self._write(append=True)

    def _write(self, *, append: bool) -> None:
        c = self.cluster
        try:
            path, params = self._request()
            user = self._user(params)
            data_file = c.new_data_file()
            with c.lock:
                rpc = params.get("namenoderpcaddress", "")
                if rpc.rpartition(":")[2].isdigit() and int(rpc.rpartition(":")[2]) - NAMENODE_RPC_PORT != c.active:
                    raise RemoteError("StandbyException", "Operation category WRITE is not supported in state "
                                      "standby. Visit https://s.apache.org/sbnn-error")
                if c.safe_mode:
                    raise RemoteError("SafeModeException", f"Cannot create file {path}. Name node is in safe mode.")
                if not append:
                    c._make_parents(path, user)
                parent, name = c._check_write_parent(user, path)
                node = parent.children.get(name)
                if append:
                    if node is None or node.type != "FILE":
                        raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
                    if node.data:
                        shutil.copyfile(node.data, data_file)  # snapshots keep the old bytes
                else:
                    if node is not None and (node.type != "FILE" or not _bool(params.get("overwrite"))):
                        raise RemoteError("FileAlreadyExistsException", f"{path} already exists")
                    perm = int(params.get("permission") or "644", 8)
                    node = Inode("FILE", next(c._ids), user, parent.group, perm, _now_ms(), _now_ms())
                    parent.children[name] = node
                    parent.mtime_ms = _now_ms()
                node.writing = True
                quota_root = c._quota_root(path)
                written = node.length if append else 0
                node.data, node.length = data_file, written
            failure: RemoteError | None = None
            try:
                with open(data_file, "ab") as f:
                    for piece in self._body_chunks():
                        if failure is not None:
                            continue  # read the rest of the body, so the client hears the answer
                        if quota_root is not None:
                            with c.lock:
                                used = c._usage(quota_root)
                            if used + len(piece) > quota_root.space_quota:
                                failure = RemoteError(
                                    "DSQuotaExceededException",
                                    f"The DiskSpace quota of {path.rsplit('/', 1)[0] or '/'} is exceeded: quota = "
                                    f"{quota_root.space_quota} B but diskspace consumed = {used + len(piece)} B")
                                continue
                        f.write(piece)
                        written += len(piece)
                        with c.lock:
                            node.length = written
            finally:
                with c.lock:
                    node.writing = False
                    node.mtime_ms = _now_ms()
            if failure is not None:
                raise failure  # the part written stays, as HDFS keeps what reached the datanodes
            if append:
                self._reply(200)
            else:
                self._reply(201, b"", headers={"Location": f"hdfs://127.0.0.1:8020{quote(path)}"})
        except RemoteError as e:
            self._error(e)

    def do_GET(self) -> None:
        c = self.cluster
        try:
            path, params = self._request()
            self._user(params)
            with c.lock:
                node = c._resolve(path)
                data, length = node.data, node.length
            offset = int(params.get("offset") or 0)
            want = params.get("length")
            end = length if want in (None, "", "null") else min(length, offset + int(want))  # type: ignore[arg-type]
            n = max(0, end - offset)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if n and data:
                with open(data, "rb") as f:
                    f.seek(offset)
                    while n:
                        piece = f.read(min(n, 1 << 20))
                        if not piece:
                            break
                        self.wfile.write(piece)
                        n -= len(piece)
        except RemoteError as e:
            self._error(e)
