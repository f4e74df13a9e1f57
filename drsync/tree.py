"""Scanning a local directory tree into columns (path, type, mode, ..., inode).

Columns rather than one object per entry: a 100,000-file data root is scanned
on every replication cycle, and per-entry Python objects cost more than the
lstat calls themselves. Entries are relative, slash-separated paths; the root
itself is not an entry; links are never followed.
"""

from __future__ import annotations

import errno
import os
import stat as st
from dataclasses import dataclass, field

from drsync import fsutil
from drsync.repository.manifest import (
    DIR,
    FILE,
    RESERVED_NAME,
    SYMLINK,
    encode_xattrs,
    escaping_links,
    printable,
    symlink_stays_inside,
)
from drsync.repository.snapshots import WarningLog

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
    nlink: list[int] = field(default_factory=list)
    dev: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # 512-byte blocks allocated (fewer than size: sparse)
    # What could not be captured: a count and the first few lines (O(1) memory however many).
    warnings: WarningLog = field(default_factory=WarningLog)
    # Directories that exist but could not be listed, and entries that exist but could not be
    # examined: never deletions (the capture keeps their last captured version, marked stale).
    unlisted: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    COLUMNS = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "target",
               "nlink", "dev", "blocks")

    def __len__(self) -> int:
        return len(self.path)

    def abspath(self, k: int) -> str:
        return os.path.join(self.root, self.path[k])

    def entry(self, k: int) -> LocalEntry:
        return LocalEntry(self.path[k], self.abspath(k), self.type[k], self.mode[k], self.uid[k], self.gid[k],
                          self.size[k], self.mtime_ns[k], self.target[k])

    def entries(self) -> dict[str, LocalEntry]:
        return {self.path[k]: self.entry(k) for k in range(len(self))}

    def append_row(self, row: dict[str, object]) -> None:
        for name in self.COLUMNS:
            getattr(self, name).append(row.get(name, 1 if name == "nlink" else 0 if name in ("blocks", "dev")
                                               else None))

    def drop_escaping_links(self) -> None:
        """Leave out links that reach outside the root through other links (the manifest rule)."""
        links = {self.path[k]: self.target[k] for k in range(len(self)) if self.type[k] == SYMLINK}
        bad = set(escaping_links(links)) if links else set()  # type: ignore[arg-type]
        if not bad:
            return
        keep = [k for k in range(len(self)) if self.path[k] not in bad]
        for name in self.COLUMNS:
            col = getattr(self, name)
            setattr(self, name, [col[k] for k in keep])
        for p in sorted(bad):
            self.warnings.append(f"{printable(p)}: symlink to {printable(links[p] or '')} leads outside the data "
                                 f"root through other links; not captured")


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
    ino: int = 0
    xattrs: bytes | None = None
    nlink: int = 1


def scan_tree(root: str, exclude: frozenset[str] = frozenset()) -> TreeScan:
    """Every entry below ``root`` but the relative paths in ``exclude`` (and what lies below them);
    special files and links leaving the root become warnings.

    Names are str with undecodable bytes kept as surrogates (``os.fsdecode``), so any name
    the filesystem holds is captured exactly. Directories deeper than ``PATH_MAX`` are listed
    through descriptors opened one component at a time."""
    root = os.path.abspath(root)
    scan = TreeScan(root)
    # Local aliases: this loop runs once per file of the data root.
    path_a, type_a, mode_a = scan.path.append, scan.type.append, scan.mode.append
    uid_a, gid_a, size_a = scan.uid.append, scan.gid.append, scan.size.append
    mtime_a, ctime_a, inode_a, target_a = (scan.mtime_ns.append, scan.ctime_ns.append, scan.inode.append,
                                           scan.target.append)
    nlink_a, dev_a, blocks_a = scan.nlink.append, scan.dev.append, scan.blocks.append
    warn = scan.warnings.append
    S_ISREG, S_ISDIR, S_ISLNK = st.S_ISREG, st.S_ISDIR, st.S_ISLNK
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        fd = None
        try:
            if len(abs_dir) > fsutil.LONG_PATH:
                fd = fsutil.open_beneath(root, rel_dir, os.O_RDONLY | os.O_DIRECTORY)
                it = os.scandir(fd)
            else:
                it = os.scandir(abs_dir)
        except FileNotFoundError:
            continue  # removed while we walked: simply not in this scan
        except NotADirectoryError:
            continue  # replaced by something else while we walked
        except OSError as e:
            if fd is not None:
                os.close(fd)
            scan.unlisted.append(rel_dir)
            warn(f"{printable(rel_dir) or '.'}: cannot be listed ({e.strerror or e}); its last captured "
                 f"content is kept")
            continue
        prefix = f"{rel_dir}/" if rel_dir else ""
        try:
            with it:
                for e in it:
                    name = e.name
                    if name in RESERVED_NAMES:
                        if rel_dir:
                            warn(f"{printable(prefix + name)}: the name is reserved for drsync's staging area; "
                                 f"not captured")
                        continue
                    full = e.path if fd is None else os.path.join(abs_dir, name)
                    rel = prefix + name
                    if exclude and rel in exclude:
                        continue
                    try:
                        s = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        scan.unreadable.append(rel)
                        warn(f"{printable(rel)}: cannot be examined ({err.strerror or err}); its last captured "
                             f"version is kept")
                        continue
                    m = s.st_mode
                    target = None
                    if S_ISREG(m):
                        typ, size = FILE, s.st_size
                    elif S_ISDIR(m):
                        typ, size = DIR, 0
                        stack.append((rel, full))
                    elif S_ISLNK(m):
                        typ, size = SYMLINK, 0
                        try:
                            target = os.readlink(name, dir_fd=fd) if fd is not None else os.readlink(full)
                        except FileNotFoundError:
                            continue
                        if not symlink_stays_inside(rel, target):
                            warn(f"{printable(rel)}: symlink to {printable(target)} leaves the data root; not "
                                 f"captured")
                            continue
                    else:
                        warn(f"{printable(rel)}: special file (fifo, socket or device) not captured")
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
                    nlink_a(s.st_nlink)
                    dev_a(s.st_dev)
                    blocks_a(s.st_blocks)
        finally:
            if fd is not None:
                os.close(fd)
    scan.drop_escaping_links()
    return scan


def read_xattrs(path: str | int) -> tuple[bytes | None, str | None]:
    """A file's or directory's extended attributes (POSIX ACLs included, as ``system.posix_acl_*``),
    encoded for the manifest, and a problem to report (None when all were read). ``path`` may be
    an open descriptor (for paths longer than PATH_MAX)."""
    follow = isinstance(path, int)  # a descriptor is the entry itself
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return None, None
        return None, f"extended attributes cannot be read ({e.strerror or e})"
    pairs: list[tuple[bytes, bytes]] = []
    for name in names:
        try:
            pairs.append((os.fsencode(name), os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                return None, f"extended attribute {name} cannot be read ({e.strerror or e})"
    return encode_xattrs(pairs), None
