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

import pyarrow as pa
import pyarrow.compute as pc

from drsync import fsutil
from drsync.repository.manifest import (
    DIR,
    FILE,
    RESERVED_NAME,
    SYMLINK,
    clamp_int64,
    encode_xattrs,
    escaping_links,
    printable,
    split_ns,
    symlink_stays_inside,
)
from drsync.repository.snapshots import WarningLog

# Names that belong to drsync itself (the staging area of an apply), at any depth.
RESERVED_NAMES = frozenset({RESERVED_NAME})


# One row per entry, unsorted (the capture sorts): what a scan holds once its batches are sealed.
SCAN_SCHEMA = pa.schema([
    ("path", pa.binary()), ("type", pa.string()), ("mode", pa.uint32()), ("uid", pa.uint32()),
    ("gid", pa.uint32()), ("size", pa.int64()), ("mtime_s", pa.int64()), ("mtime_nsec", pa.uint32()),
    ("ctime_ns", pa.int64()),
    ("inode", pa.uint64()), ("target", pa.binary()), ("nlink", pa.uint64()), ("dev", pa.uint64()),
    ("blocks", pa.int64()),
])
_BATCH_ROWS = 65536  # entries held as Python values before they are sealed into an Arrow batch


@dataclass
class TreeScan:
    """A scan's entries as columns: appended as Python values (``path`` str or bytes, ``target``
    likewise, times in ns), sealed every :data:`_BATCH_ROWS` entries into Arrow batches of
    :data:`SCAN_SCHEMA` (modification time split as in the manifest, so any time fits; ctime
    clamped to int64 as in the manifest), so a million entries cost about 100 bytes each."""

    root: str
    path: list[str | bytes] = field(default_factory=list)
    type: list[str] = field(default_factory=list)
    mode: list[int] = field(default_factory=list)
    uid: list[int] = field(default_factory=list)
    gid: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    mtime_ns: list[int] = field(default_factory=list)
    ctime_ns: list[int] = field(default_factory=list)
    inode: list[int] = field(default_factory=list)
    target: list[str | bytes | None] = field(default_factory=list)
    nlink: list[int] = field(default_factory=list)
    dev: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # 512-byte blocks allocated (fewer than size: sparse)
    # What could not be captured: a count and the first few lines (O(1) memory however many).
    warnings: WarningLog = field(default_factory=WarningLog)
    # Directories that exist but could not be listed, and entries that exist but could not be
    # examined: never deletions (the capture keeps their last captured version, marked stale).
    unlisted: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    batches: list[pa.RecordBatch] = field(default_factory=list)

    COLUMNS = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "target",
               "nlink", "dev", "blocks")

    def __len__(self) -> int:
        return sum(b.num_rows for b in self.batches) + len(self.path)

    def append_row(self, row: dict[str, object]) -> None:
        for name in self.COLUMNS:
            getattr(self, name).append(row.get(name, 1 if name == "nlink" else 0 if name in ("blocks", "dev")
                                               else None))

    def seal(self) -> None:
        """Move the appended values into an Arrow batch (names as bytes, lossless)."""
        if not self.path:
            return
        cols: dict[str, object] = {}
        for name in self.COLUMNS:
            values = getattr(self, name)
            setattr(self, name, [])
            if name in ("path", "target"):
                values = [v if v is None or type(v) is bytes else os.fsencode(v) for v in values]
            if name == "mtime_ns":
                cols["mtime_s"], cols["mtime_nsec"] = split_ns(values)
            elif name == "ctime_ns":
                cols[name] = clamp_int64(values)
            else:
                cols[name] = values
        self.batches.append(pa.RecordBatch.from_arrays(
            [pa.array(cols[f.name], f.type) for f in SCAN_SCHEMA], schema=SCAN_SCHEMA))

    def table(self) -> pa.Table:
        """Every entry as one table of :data:`SCAN_SCHEMA` (seals what is still appended)."""
        self.seal()
        return pa.Table.from_batches(self.batches, schema=SCAN_SCHEMA)

    def drop_escaping_links(self) -> None:
        """Leave out links that reach outside the root through other links (the manifest rule)."""
        t = self.table()
        is_link = pc.equal(t.column("type"), SYMLINK)
        if not pc.any(is_link).as_py():
            return
        lt = t.filter(is_link)
        links = {os.fsdecode(p): os.fsdecode(g or b"") for p, g in
                 zip(lt.column("path").to_pylist(), lt.column("target").to_pylist(), strict=True)}
        bad = set(escaping_links(links))
        if not bad:
            return
        drop = pa.array(sorted(os.fsencode(p) for p in bad), pa.binary())
        keep = pc.invert(pc.and_(is_link, pc.is_in(t.column("path"), value_set=drop)))
        self.batches = t.filter(keep).combine_chunks().to_batches()
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

    Names are read as bytes (any name the filesystem holds, captured exactly) and sealed into Arrow
    batches as the walk goes. Directories deeper than ``PATH_MAX`` are listed through descriptors
    opened one component at a time."""
    root = os.path.abspath(root)
    scan = TreeScan(root)
    broot = os.fsencode(root)
    bexclude = frozenset(os.fsencode(p) for p in exclude)
    reserved = frozenset(os.fsencode(n) for n in RESERVED_NAMES)
    # Local aliases: this loop runs once per file of the data root.
    path_a, type_a, mode_a = scan.path.append, scan.type.append, scan.mode.append
    uid_a, gid_a, size_a = scan.uid.append, scan.gid.append, scan.size.append
    mtime_a, ctime_a, inode_a, target_a = (scan.mtime_ns.append, scan.ctime_ns.append, scan.inode.append,
                                           scan.target.append)
    nlink_a, dev_a, blocks_a = scan.nlink.append, scan.dev.append, scan.blocks.append
    warn = scan.warnings.append
    S_ISREG, S_ISDIR, S_ISLNK = st.S_ISREG, st.S_ISDIR, st.S_ISLNK
    fsdecode = os.fsdecode
    stack: list[tuple[bytes, bytes]] = [(b"", broot)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        fd = None
        try:
            if len(abs_dir) > fsutil.LONG_PATH:
                fd = fsutil.open_beneath(root, fsdecode(rel_dir), os.O_RDONLY | os.O_DIRECTORY)
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
            scan.unlisted.append(fsdecode(rel_dir))
            warn(f"{printable(fsdecode(rel_dir)) or '.'}: cannot be listed ({e.strerror or e}); its last captured "
                 f"content is kept")
            continue
        prefix = rel_dir + b"/" if rel_dir else b""
        try:
            with it:
                for e in it:
                    name = e.name
                    if fd is not None:
                        name = os.fsencode(name)  # scandir of a descriptor gives str names
                    if name in reserved:
                        if rel_dir:
                            warn(f"{printable(fsdecode(prefix + name))}: the name is reserved for drsync's staging "
                                 f"area; not captured")
                        continue
                    full = e.path if fd is None else abs_dir + b"/" + name
                    rel = prefix + name
                    if bexclude and rel in bexclude:
                        continue
                    try:
                        s = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        scan.unreadable.append(fsdecode(rel))
                        warn(f"{printable(fsdecode(rel))}: cannot be examined ({err.strerror or err}); its last "
                             f"captured version is kept")
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
                        if not symlink_stays_inside(fsdecode(rel), fsdecode(target)):
                            warn(f"{printable(fsdecode(rel))}: symlink to {printable(fsdecode(target))} leaves the "
                                 f"data root; not captured")
                            continue
                    else:
                        warn(f"{printable(fsdecode(rel))}: special file (fifo, socket or device) not captured")
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
        if len(scan.path) >= _BATCH_ROWS:
            scan.seal()
            path_a, type_a, mode_a = scan.path.append, scan.type.append, scan.mode.append
            uid_a, gid_a, size_a = scan.uid.append, scan.gid.append, scan.size.append
            mtime_a, ctime_a, inode_a, target_a = (scan.mtime_ns.append, scan.ctime_ns.append, scan.inode.append,
                                                   scan.target.append)
            nlink_a, dev_a, blocks_a = scan.nlink.append, scan.dev.append, scan.blocks.append
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
