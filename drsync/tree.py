"""Scanning a local directory tree into columns (path, type, mode, ..., inode).

Columns rather than one object per entry: a 100,000-file data root is scanned
on every replication cycle, and per-entry Python objects cost more than the
lstat calls themselves. Entries are relative, slash-separated paths; the root
itself is not an entry; links are never followed.
"""

from __future__ import annotations

import os
import stat as st
from dataclasses import dataclass, field

from drsync.repository.manifest import DIR, FILE, RESERVED_NAME, SYMLINK, escaping_links, symlink_stays_inside

# Names that belong to drsync itself (the staging area of an apply), at any depth.
RESERVED_NAMES = frozenset({RESERVED_NAME})


@dataclass
class TreeScan:
    root: str
    path: list[str] = field(default_factory=list)
    type: list[str] = field(default_factory=list)
    mode: list[int] = field(default_factory=list)
    uid: list[int] = field(default_factory=list)
    gid: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    ctime_ns: list[int] = field(default_factory=list)
    inode: list[int] = field(default_factory=list)
    target: list[str | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.path)

    def abspath(self, k: int) -> str:
        return os.path.join(self.root, self.path[k])

    def entry(self, k: int) -> LocalEntry:
        return LocalEntry(self.path[k], self.abspath(k), self.type[k], self.mode[k], self.uid[k], self.gid[k],
                          self.size[k], self.mtime_ns[k], self.target[k])

    def entries(self) -> dict[str, LocalEntry]:
        return {self.path[k]: self.entry(k) for k in range(len(self))}

    def drop_escaping_links(self) -> None:
        """Leave out links that reach outside the root through other links (the manifest rule)."""
        links = {self.path[k]: self.target[k] for k in range(len(self)) if self.type[k] == SYMLINK}
        bad = set(escaping_links(links)) if links else set()  # type: ignore[arg-type]
        if not bad:
            return
        keep = [k for k in range(len(self)) if self.path[k] not in bad]
        for name in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "target"):
            col = getattr(self, name)
            setattr(self, name, [col[k] for k in keep])
        for p in sorted(bad):
            self.warnings.append(f"{p}: symlink to {links[p]} leads outside the data root through other "
                                 f"links; not captured")


@dataclass(slots=True)
class LocalEntry:
    """One existing path of a local tree (what an apply compares against)."""

    path: str
    abspath: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None


def scan_tree(root: str, exclude: frozenset[str] = frozenset()) -> TreeScan:
    """Every entry below ``root``; special files and links leaving the root become warnings."""
    root = os.path.abspath(root)
    scan = TreeScan(root)
    # Local aliases: this loop runs once per file of the data root.
    path_a, type_a, mode_a = scan.path.append, scan.type.append, scan.mode.append
    uid_a, gid_a, size_a = scan.uid.append, scan.gid.append, scan.size.append
    mtime_a, ctime_a, inode_a, target_a = (scan.mtime_ns.append, scan.ctime_ns.append, scan.inode.append,
                                           scan.target.append)
    warn = scan.warnings.append
    S_ISREG, S_ISDIR, S_ISLNK = st.S_ISREG, st.S_ISDIR, st.S_ISLNK
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            it = os.scandir(abs_dir)
        except FileNotFoundError:
            continue  # removed while we walked: simply not in this scan
        except PermissionError:
            warn(f"{rel_dir or '.'}: permission denied; not captured")
            continue
        prefix = f"{rel_dir}/" if rel_dir else ""
        with it:
            for e in it:
                name = e.name
                if name in RESERVED_NAMES:
                    if rel_dir:
                        warn(f"{prefix}{name}: the name is reserved for drsync's staging area; not captured")
                    continue
                if exclude and e.path in exclude:
                    continue
                try:
                    s = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                m = s.st_mode
                rel = prefix + name
                target = None
                if S_ISREG(m):
                    typ, size = FILE, s.st_size
                elif S_ISDIR(m):
                    typ, size = DIR, 0
                    stack.append((rel, e.path))
                elif S_ISLNK(m):
                    typ, size = SYMLINK, 0
                    try:
                        target = os.readlink(e.path)
                    except FileNotFoundError:
                        continue
                    if not symlink_stays_inside(rel, target):
                        warn(f"{rel}: symlink to {target} leaves the data root; not captured")
                        continue
                else:
                    warn(f"{rel}: special file (fifo, socket or device) not captured")
                    continue
                path_a(rel)
                type_a(typ)
                mode_a(m & 0o7777)
                uid_a(s.st_uid)
                gid_a(s.st_gid)
                size_a(size)
                mtime_a(s.st_mtime_ns)
                ctime_a(s.st_ctime_ns)
                inode_a(s.st_ino)
                target_a(target)
    scan.drop_escaping_links()
    return scan
