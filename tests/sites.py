"""Where a test's data roots and repositories live: a local directory or the test WebHDFS server.

Tests that must hold on every storage take a :class:`Site` (or two, for a
pair across storages) and use only what is here: URLs, a generated tree,
small edits and the tree's state. States compare in a portable form:
modification times in milliseconds (what HDFS keeps), and symlinks only
between two local sites (HDFS has them disabled).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, Protocol

from tests.conftest import age_tree, make_tree, tree_state

State = dict[str, tuple]


class Site(Protocol):
    kind: str

    def url(self, name: str) -> str: ...

    def make_tree(self, name: str, *, seed: int = 1, files: int = 20, big: int = 2) -> None: ...

    def write(self, name: str, rel: str, data: bytes) -> None: ...

    def remove(self, name: str, rel: str) -> None: ...

    def chmod(self, name: str, rel: str, mode: int) -> None: ...

    def set_mtime(self, name: str, rel: str, mtime_ns: int) -> None: ...

    def state(self, name: str) -> State: ...

    def paths(self, name: str) -> list[str]: ...

    def age(self, name: str, seconds: int = 10) -> None:
        """Move every mtime into the past, so nothing counts as 'racily' modified during a capture."""
        ...


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class LocalSite:
    kind = "local"

    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, name: str) -> Path:
        return self.base / name

    def url(self, name: str) -> str:
        return str(self.base / name)

    def make_tree(self, name: str, *, seed: int = 1, files: int = 20, big: int = 2) -> None:
        make_tree(self.base / name, seed=seed, files=files, big=big)

    def write(self, name: str, rel: str, data: bytes) -> None:
        p = self.base / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def remove(self, name: str, rel: str) -> None:
        (self.base / name / rel).unlink()

    def chmod(self, name: str, rel: str, mode: int) -> None:
        (self.base / name / rel).chmod(mode)

    def set_mtime(self, name: str, rel: str, mtime_ns: int) -> None:
        os.utime(self.base / name / rel, ns=(mtime_ns, mtime_ns))

    def age(self, name: str, seconds: int = 10) -> None:
        age_tree(self.base / name, seconds)

    def paths(self, name: str) -> list[str]:
        root = self.base / name
        return [p.relative_to(root).as_posix() for p in root.rglob("*")] if root.exists() else []

    def state(self, name: str) -> State:
        out: State = {}
        root = self.base / name
        if not root.exists():
            return out
        for rel, v in tree_state(root).items():
            if v[0] == "root":  # the root's own mode, as HDFS keeps it (no setuid or setgid)
                out[rel] = ("root", v[1] & 0o1777)
            elif v[0] == "link":
                out[rel] = ("link", v[1])
            elif v[0] == "dir":
                out[rel] = ("dir", v[1], v[2] // 1_000_000)
            else:
                out[rel] = ("file", v[1], v[2] // 1_000_000, _digest(v[3]))
        return out


class HdfsSite:
    kind = "hdfs"

    def __init__(self, cluster: Any, base: str, *, user: str = "drsync") -> None:
        self.cluster = cluster
        self.base = base.rstrip("/")
        self.user = user

    def path(self, name: str) -> str:
        return f"{self.base}/{name}"

    def url(self, name: str) -> str:
        return self.cluster.url(self.path(name), user=self.user)

    def _fs(self):  # type: ignore[no-untyped-def]
        from drsync.storage.hdfs import HdfsFs, parse_hdfs_url

        return HdfsFs(parse_hdfs_url(self.url("")), retry_s=5)

    def make_tree(self, name: str, *, seed: int = 1, files: int = 20, big: int = 2) -> None:
        """The same shape as tests.conftest.make_tree, written over WebHDFS (no symlinks on HDFS)."""
        rnd = random.Random(seed)
        fs = self._fs()
        root = self.path(name)
        for d in ("catalog", "tables/orders", "empty/deeper"):
            fs.mkdirs(f"{root}/{d}")
        for i in range(files):
            fs.write(f"{root}/catalog/f{i:03}.txt", (f"file {i} " * rnd.randrange(1, 200)).encode())
        for i in range(big):
            w = fs.writer(f"{root}/tables/orders/part-{i}.bin")
            data = rnd.randbytes(3 * 1024 * 1024 + i * 4097)
            for k in range(0, len(data), 1 << 20):
                w.write(data[k:k + (1 << 20)])
            w.close()
        fs.write(f"{root}/catalog/empty-file", b"")
        fs.write(f"{root}/catalog/secret.txt", b"only the owner reads this\n")
        fs.set_permission(f"{root}/catalog/secret.txt", 0o600)
        fs.write(f"{root}/catalog/run.sh", b"#!/bin/sh\necho hi\n")
        fs.set_permission(f"{root}/catalog/run.sh", 0o755)
        fs.set_times(f"{root}/catalog/f001.txt", 1_600_000_000_123_000_000)
        fs.set_permission(f"{root}/empty", 0o750)

    def write(self, name: str, rel: str, data: bytes) -> None:
        self._fs().write(f"{self.path(name)}/{rel}", data, overwrite=True)

    def remove(self, name: str, rel: str) -> None:
        self._fs().delete(f"{self.path(name)}/{rel}", recursive=True)

    def chmod(self, name: str, rel: str, mode: int) -> None:
        self._fs().set_permission(f"{self.path(name)}/{rel}", mode)

    def set_mtime(self, name: str, rel: str, mtime_ns: int) -> None:
        self._fs().set_times(f"{self.path(name)}/{rel}", mtime_ns)

    def age(self, name: str, seconds: int = 10) -> None:
        from drsync.dataroot.hdfs import walk

        fs = self._fs()
        root = self.path(name)
        scan = walk(fs, root)
        paths, mtimes = scan.values("path"), scan.values("mtime_ns")
        for k in sorted(range(len(paths)), key=lambda k: -paths[k].count("/")):
            fs.set_times(f"{root}/{paths[k]}", mtimes[k] - seconds * 10**9)

    def paths(self, name: str) -> list[str]:
        from drsync.dataroot.hdfs import walk

        return walk(self._fs(), self.path(name)).values("path")

    def state(self, name: str) -> State:
        """Read over WebHDFS, so that the same works against a real namenode."""
        from drsync.dataroot.hdfs import walk
        from drsync.storage.hdfs import HdfsError

        fs = self._fs()
        root = self.path(name)
        if fs.status(root) is None:
            return {}
        scan = walk(fs, root)
        out: State = {".": ("root", int(fs.status(root)["permission"], 8))}
        types, modes, mtimes = scan.values("type"), scan.values("mode"), scan.values("mtime_ns")
        for k, rel in enumerate(scan.values("path")):
            if rel.startswith(".drsync"):
                continue
            mtime_ms = mtimes[k] // 1_000_000
            if types[k] == "dir":
                out[rel] = ("dir", modes[k], mtime_ms)
                continue
            try:
                data = _digest(fs.read(f"{root}/{rel}"))
            except HdfsError as e:  # changed under the walk (an apply is renaming files in): not settled
                if e.exception != "FileNotFoundException":
                    raise
                data = "vanished while read"
            out[rel] = ("file", modes[k], mtime_ms, data)
        return out


def comparable(a: Site, a_state: State, b: Site, b_state: State) -> tuple[State, State]:
    """Both states as far as both storages can hold them (no symlinks where HDFS is involved)."""
    if a.kind == b.kind == "local":
        return a_state, b_state

    def strip(s: State) -> State:
        return {k: v for k, v in s.items() if v[0] != "link"}

    return strip(a_state), strip(b_state)


def same_tree(a: Site, a_name: str, b: Site, b_name: str) -> bool:
    if isinstance(a, LocalSite) and isinstance(b, LocalSite):  # exactly, to the nanosecond
        return tree_state(a.path(a_name)) == tree_state(b.path(b_name))
    x, y = comparable(a, a.state(a_name), b, b.state(b_name))
    return x == y


def make_site(kind: str, tmp_path: Path, cluster: Any) -> Site:
    if kind == "local":
        return LocalSite(tmp_path)
    assert cluster is not None
    base = f"{cluster.test_dir}/{os.path.basename(str(tmp_path))}"
    cluster.mkdirs(base)
    return HdfsSite(cluster, base)
