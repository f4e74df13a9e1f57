"""Scanning a local directory tree into columns (path, type, mode, ..., inode).

Columns rather than one object per entry: a 100,000-file data root is scanned
on every replication cycle, and per-entry Python objects cost more than the
lstat calls themselves. Entries are relative, slash-separated paths; the root
itself is not an entry; links are never followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat as st
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import fsutil, native_walk
from drsync.repository import link_walk
from drsync.repository.link_walk import Rows, may_escape
from drsync.repository.manifest import DIR, FILE, SYMLINK, clamp_int64, encode_xattrs, split_ns
from drsync.repository.manifest_check import RESERVED_NAME, symlink_leaves_root, symlink_stays_inside
from drsync.repository.snapshots import WarningLog
from drsync.text import printable

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
_BATCH_ROWS = 16384  # entries held as Python values before they are sealed into an Arrow batch


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
    # Directories removed or renamed between their parent's listing and their own (kept stale, never a
    # deletion: a rename during the walk would otherwise lose the subtree from this snapshot).
    vanished: list[tuple[str, int]] = field(default_factory=list)  # (path, its inode; 0: not known)
    unreadable: list[str] = field(default_factory=list)
    # The device of each of those paths (a directory's own, an entry's directory's) where known: a stale
    # row joins a hard-link group of today's only on its own device (inode numbers repeat across them).
    devices: dict[str, int] = field(default_factory=dict)
    # Why the root itself could not be listed (it is then among ``unlisted`` as ""), or None.
    root_problem: str | None = None
    batches: list[pa.RecordBatch] = field(default_factory=list)
    sorted: bool = False  # entries were appended in path order (bytes), as the manifest sorts them
    rows: list[tuple] = field(default_factory=list)  # type: ignore[type-arg]  # whole rows, in COLUMNS order
    # A lazy scan's walk (a local tree): each step seals at least one more batch. None once walked.
    source: Iterator[None] | None = None
    # Some symlink sealed so far has a target that climbs ('..'), is empty or holds a NUL: only then can links
    # lead outside the root through each other, and they are resolved together once all are known
    # (:meth:`escaping`; a lazy scan's from what was captured of it, :func:`escaping_in`). Nothing is held
    # per link: a tree of a million ordinary links costs nothing here.
    climbs: bool = False
    # The hash() of the path of each link left out because its text leaves the root (8 bytes a link): a kept
    # link that passes through one (``b -> a``, ``a -> /etc``) leaves too, and is told by the same walk.
    outside: array = field(default_factory=lambda: array("q"))
    # The hash() of each path the listing passed over (an excluded path, the reserved staging name) that is a
    # directory or a link: a link there or below is read from the tree (``read_link``) when a walk reaches it
    # (``b -> excluded/l``, ``excluded/l -> /etc``). Few: one per such name met.
    unwalked: array = field(default_factory=lambda: array("q"))
    # Staging areas of drsync's below the top (an HDFS walk): an apply around another one's target checks them.
    nested_staging: list[str] = field(default_factory=list)
    # The hash() of each special file's path (fifo, socket, device): never captured, never kept from a parent.
    specials: array = field(default_factory=lambda: array("q"))
    # A link's target at a path relative to the root (None: no link there), read now; for ``unwalked``.
    read_link: Callable[[bytes], bytes | None] | None = None
    linked: bool = False  # some symlink was kept (sealed): only then can a walk reach an unwalked place

    COLUMNS = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "target",
               "nlink", "dev", "blocks")

    def __len__(self) -> int:
        self._walk_all()
        return sum(b.num_rows for b in self.batches) + len(self.path) + len(self.rows)

    def append_row(self, row: dict[str, object]) -> None:
        for name in self.COLUMNS:
            getattr(self, name).append(row.get(name, 1 if name == "nlink" else 0 if name in ("blocks", "dev")
                                               else None))

    def seal(self) -> None:
        """Move the appended values into an Arrow batch (names as bytes, lossless)."""
        if self.rows:
            if self.path:
                self.seal_columns()
            rows, self.rows = self.rows, []
            for name, values in zip(self.COLUMNS, zip(*rows, strict=True), strict=True):
                setattr(self, name, list(values))
            del rows
        self.seal_columns()

    def seal_columns(self) -> None:
        if not self.path:
            return
        cols: dict[str, object] = {}
        for name in self.COLUMNS:
            values = getattr(self, name)
            setattr(self, name, [])
            if name in ("path", "target"):
                try:  # bytes as they are; str (HDFS) as UTF-8, which os.fsencode gives for valid text
                    cols[name] = pa.array(values, pa.binary())
                except (UnicodeEncodeError, pa.ArrowException, TypeError):
                    cols[name] = [v if v is None or type(v) is bytes else os.fsencode(v) for v in values]
            elif name == "mtime_ns":
                cols["mtime_s"], cols["mtime_nsec"] = split_ns(values)
            elif name == "ctime_ns":
                cols[name] = clamp_int64(values)
            else:
                cols[name] = values
        batch = pa.RecordBatch.from_arrays(
            [pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
             for f in SCAN_SCHEMA], schema=SCAN_SCHEMA)
        self.batches.append(batch)
        if not self.climbs:
            targets = batch.column("target").filter(pc.equal(batch.column("type"), SYMLINK))
            self.linked = self.linked or len(targets) > 0
            self.climbs = may_escape(targets)

    def table(self) -> pa.Table:
        """Every entry as one table of :data:`SCAN_SCHEMA` (walks what a lazy scan has not walked yet,
        leaving out its links that escape the root through other links; seals what is still appended)."""
        self._walk_all()
        self.seal()
        return pa.Table.from_batches(self.batches, schema=SCAN_SCHEMA)

    def _walk_all(self) -> None:
        if self.source is None:
            return
        for _ in self.source:
            pass
        self.source = None
        self.drop_escaping_links()

    def windows(self, rows: int) -> Iterator[pa.Table]:
        """The entries in path order (the manifest's), ``rows`` at a time (the last window may hold
        fewer): tables of :data:`SCAN_SCHEMA`.

        A lazy scan (a local tree, walked in path order) is walked as the windows are taken, so memory
        holds about one window of it, never the whole scan; its ``warnings``, ``unlisted`` and
        ``unreadable`` are complete only once the last window was taken, and the links that escape the
        root through other links are still among the windows (one can only tell them once every link is
        known): :meth:`escaping` names them afterwards. Any other scan is sorted whole (a column at a
        time) and sliced."""
        if self.source is None or not self.sorted:
            t = self.sorted_table()
            for lo in range(0, t.num_rows, rows):
                yield t.slice(lo, rows)
            return
        pending: list[pa.RecordBatch] = []
        count = 0
        for _ in self.source:
            pending += self.batches
            count += sum(b.num_rows for b in self.batches)
            self.batches = []
            while count >= rows:
                t = pa.Table.from_batches(pending, schema=SCAN_SCHEMA)
                rest = t.slice(rows)
                yield t.slice(0, rows)
                pending, count = rest.to_batches(), rest.num_rows
        self.source = None
        if count:
            yield pa.Table.from_batches(pending, schema=SCAN_SCHEMA)

    def sorted_table(self) -> pa.Table:
        """Every entry as one table sorted by path (the manifest's order), emptying the scan's batches:
        sorted a column at a time, so that the unsorted copy of only one column is held beside the
        sorted table."""
        t = self.table()
        self.batches = []
        if self.sorted:
            return t
        order = pc.sort_indices(t.column("path"))
        columns = {name: t.column(name) for name in t.column_names}
        schema = t.schema
        del t
        for name in schema.names:
            columns[name] = columns[name].take(order).combine_chunks()
        return pa.table([columns.pop(name) for name in schema.names], schema=schema)

    def escaping(self) -> set[bytes]:
        """The paths (bytes) of the sealed batches' links that reach outside the root through other links,
        each warned about; they must not be captured. Empty when no target climbs, and once asked (a lazy
        scan's batches are let go as its windows are taken: its capture asks :func:`escaping_in` of what it
        wrote, when :attr:`climbs`)."""
        if not self.links_to_judge:
            return set()
        self.climbs = self.linked = False
        return escaping_in(lambda: [pa.Table.from_batches(self.batches, schema=SCAN_SCHEMA)], self.warnings,
                           self.left_out_links())

    def left_out_links(self) -> link_walk.LeftOut | None:
        """What a walk over the captured links may reach that is not among them (:attr:`outside`,
        :attr:`unwalked`), for :func:`escaping_in`; None when nothing was left out."""
        if not len(self.outside) and not len(self.unwalked):
            return None
        return link_walk.LeftOut(np.sort(np.frombuffer(self.outside, np.int64)),
                                 np.sort(np.frombuffer(self.unwalked, np.int64)), self.read_link)

    def left_out(self, rel: bytes) -> None:
        """Note a link at ``rel`` left out because its text leaves the root (:attr:`outside`)."""
        self.outside.append(hash(rel))
        self.climbs = True

    def passed_over(self, rel: bytes) -> None:
        """Note a directory or link at ``rel`` the listing did not enter (:attr:`unwalked`)."""
        self.unwalked.append(hash(rel))

    @property
    def links_to_judge(self) -> bool:
        """Whether the captured links must be walked through each other (:func:`escaping_in`): some target
        climbs or a link was left out by its text (:attr:`climbs`), or links were kept beside places the
        listing passed over."""
        return self.climbs or (self.linked and len(self.unwalked) > 0)

    def entries(self) -> dict[str, LocalEntry]:
        """Every entry by path (str), as an apply compares them: for HDFS targets and small trees."""
        cols = {name: self.values(name) for name in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns",
                                                     "target")}
        return {p: LocalEntry(p, *row) for p, *row in zip(
            cols["path"], cols["type"], cols["mode"], cols["uid"], cols["gid"], cols["size"], cols["mtime_ns"],
            cols["target"], strict=True)}

    def values(self, name: str) -> list:  # type: ignore[type-arg]
        """One column of every entry as Python values, in scan order: ``path`` and ``target`` as str
        (lossless, as ``os.fsdecode``), ``mtime_ns`` as int nanoseconds. For small trees and tests."""
        t = self.table()
        if name in ("path", "target"):
            return [None if v is None else os.fsdecode(v) for v in t.column(name).to_pylist()]
        if name == "mtime_ns":
            return [s * 1_000_000_000 + ns for s, ns in zip(t.column("mtime_s").to_pylist(),
                                                           t.column("mtime_nsec").to_pylist(), strict=True)]
        return t.column(name).to_pylist()

    def drop_escaping_links(self) -> None:
        """Leave out links that reach outside the root through other links (the manifest rule)."""
        self.seal()
        bad = self.escaping()
        if not bad:
            return
        t = self.table()
        drop = pa.array(sorted(bad), pa.binary())
        keep = pc.invert(pc.and_(pc.equal(t.column("type"), SYMLINK), pc.is_in(t.column("path"), value_set=drop)))
        self.batches = t.filter(keep).combine_chunks().to_batches()


def escaping_in(rows: Rows, warnings: WarningLog | None = None,
                outside: link_walk.LeftOut | None = None) -> set[bytes]:
    """The paths (bytes) of the symlinks among ``rows`` (a scan's or a manifest's tables: path, type,
    target; read again as links are followed, :func:`drsync.repository.link_walk.escaping_in`) that reach
    outside the root through the others, each warned about in ``warnings`` as not captured."""
    bad = link_walk.escaping_in(rows, outside=outside)
    for x, target in bad if warnings is not None else ():
        path, to = os.fsdecode(x), os.fsdecode(target)
        how = "leaves the data root" if not symlink_stays_inside(path, to) else \
            "leads outside the data root through other links"
        warnings.append(f"{printable(path)}: symlink to {printable(to)} {how}; not captured")
    return {x for x, _ in bad}


@dataclass(slots=True)
class LocalEntry:
    """One existing path of a local tree (what an apply compares against)."""

    path: str
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


# An entry's type in :class:`EntryColumns` (``kind``): these codes, in this order. "other" is a fifo, socket
# or device (:data:`drsync.apply.OTHER`).
KINDS = (FILE, DIR, SYMLINK, "other")
K_FILE, K_DIR, K_LINK = 0, 1, 2


@dataclass
class EntryColumns:
    """Entries of a local tree as columns, one row an entry, in the manifest's order (path bytes): what an
    apply's first pass compares against a manifest without a Python object per entry. ``paths``: relative
    paths (Arrow binary or large_binary); ``kind``: codes of :data:`KINDS`; ``mode`` (permission bits),
    ``uid``, ``gid``, ``size`` (bytes, 0 but for files), ``mtime_s`` and ``mtime_nsec``, ``ino``, ``nlink``:
    NumPy arrays; ``targets`` and ``xattrs``: lists (bytes or None)."""

    paths: pa.Array
    kind: np.ndarray
    mode: np.ndarray
    uid: np.ndarray
    gid: np.ndarray
    size: np.ndarray
    mtime_s: np.ndarray
    mtime_nsec: np.ndarray
    ino: np.ndarray
    nlink: np.ndarray
    targets: list[bytes | None]
    xattrs: list[bytes | None]
    ctime_ns: np.ndarray | None = None  # int64 status-change times, as a manifest keeps them; None: not listed

    def __len__(self) -> int:
        return len(self.kind)

    def entry(self, i: int) -> LocalEntry:
        """Row ``i`` as a :class:`LocalEntry` (what the planner compares)."""
        target = self.targets[i]
        return LocalEntry(os.fsdecode(self.paths[i].as_py()), KINDS[int(self.kind[i])], int(self.mode[i]),
                          int(self.uid[i]), int(self.gid[i]), int(self.size[i]),
                          int(self.mtime_s[i]) * 1_000_000_000 + int(self.mtime_nsec[i]),
                          None if target is None else os.fsdecode(target), int(self.ino[i]), self.xattrs[i],
                          int(self.nlink[i]))

    def slice(self, lo: int, hi: int) -> EntryColumns:
        return EntryColumns(self.paths[lo:hi], self.kind[lo:hi], self.mode[lo:hi], self.uid[lo:hi], self.gid[lo:hi],
                            self.size[lo:hi], self.mtime_s[lo:hi], self.mtime_nsec[lo:hi], self.ino[lo:hi],
                            self.nlink[lo:hi], self.targets[lo:hi], self.xattrs[lo:hi],
                            None if self.ctime_ns is None else self.ctime_ns[lo:hi])

    @staticmethod
    def concat(parts: list[EntryColumns]) -> EntryColumns:
        if len(parts) == 1:
            return parts[0]
        paths = pa.concat_arrays([p.paths.cast(pa.large_binary()) for p in parts])

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        # a part listed without status-change times makes them unknown for the batch (compared as differing)
        ctimes = [p.ctime_ns if p.ctime_ns is not None else np.full(len(p), -1, np.int64) for p in parts]
        return EntryColumns(paths, cat("kind"), cat("mode"), cat("uid"), cat("gid"), cat("size"), cat("mtime_s"),
                            cat("mtime_nsec"), cat("ino"), cat("nlink"), [t for p in parts for t in p.targets],
                            [x for p in parts for x in p.xattrs], np.concatenate(ctimes))

    @staticmethod
    def of_entries(entries: list[LocalEntry]) -> EntryColumns:
        """Columns of ``entries`` (any listing: the Python one, special files). Times are kept exactly (the
        seconds of any time a file system holds fit int64)."""
        def num(values: list[int], dtype: str) -> np.ndarray:
            return np.array(values, dtype=dtype) if values else np.zeros(0, dtype)

        secs = clamp_int64([e.mtime_ns // 1_000_000_000 for e in entries])
        return EntryColumns(
            pa.array([os.fsencode(e.path) for e in entries], pa.large_binary()),
            num([KINDS.index(e.type) for e in entries], "i1"), num([e.mode for e in entries], "i8"),
            num([e.uid for e in entries], "i8"), num([e.gid for e in entries], "i8"),
            num([e.size for e in entries], "i8"), num(secs, "i8"),
            num([e.mtime_ns % 1_000_000_000 for e in entries], "i8"), num([e.ino for e in entries], "u8"),
            num([e.nlink for e in entries], "i8"),
            [None if e.target is None else os.fsencode(e.target) for e in entries], [e.xattrs for e in entries])


# Seconds whose nanoseconds fit int64 with room: beyond them a time is compared entry by entry, not in columns.
MTIME_S_LIMIT = 9_000_000_000


def mtime_in_range(secs: np.ndarray) -> np.ndarray:
    """Which seconds (int64) are within :data:`MTIME_S_LIMIT` either way."""
    return (secs > -MTIME_S_LIMIT) & (secs < MTIME_S_LIMIT)


def scan_tree(root: str, exclude: frozenset[str] = frozenset(), *, native: bool | None = None) -> TreeScan:
    """Every entry below ``root`` but the relative paths in ``exclude`` (and what lies below them);
    special files and links leaving the root become warnings.

    Names are read as bytes (any name the filesystem holds, captured exactly) and sealed into Arrow
    batches as the walk goes. Entries come in the manifest's order (sorted by path bytes): each
    directory's listing is sorted, and a subdirectory's contents are placed by ``name + "/"``, so
    ``a-b`` comes before ``a/x`` as bytes order says (``scan.sorted``). Directories deeper than
    ``PATH_MAX`` are listed through descriptors opened one component at a time.

    The walk is lazy: it runs as :meth:`TreeScan.windows` takes its entries (a capture holds about one
    window of the scan), or whole at the first call that needs every entry (:meth:`TreeScan.table`).
    Directories are listed by :mod:`drsync.native_walk` (C) where it is built (``native`` None), or
    in Python (``native`` False; the same rows and warnings, slower)."""
    scan = TreeScan(fsutil.absolute(root), sorted=True)
    scan.read_link = lambda rel: fsutil.link_beneath(scan.root, rel)
    if native is None:
        native = native_walk.available()
    scan.source = native_walk.walk(scan, exclude, _BATCH_ROWS, SCAN_SCHEMA) if native else _walk(scan, exclude)
    return scan


def _walk(scan: TreeScan, exclude: frozenset[str]) -> Iterator[None]:
    """The walk of a lazy :func:`scan_tree`: appends its entries to ``scan``, and steps each time it sealed
    :data:`_BATCH_ROWS` of them into a batch (and once at the end, with the rest sealed)."""
    lister = _Lister(scan.root, scan, exclude)
    add = scan.rows.append
    count = 0
    # An item of a listing is (key, row) for an entry or (key, None, rel, abspath, (dev, inode)) for a directory's
    # contents.
    try:
        top = os.stat(scan.root)
        examined = (top.st_dev, top.st_ino)
    except OSError:
        examined = None
    for row in in_path_order(lister.items(b"", os.fsencode(scan.root), examined),
                             lambda item: lister.items(item[2], item[3], item[4])):
        add(row)
        count += 1
        if count >= _BATCH_ROWS:
            scan.seal()
            add = scan.rows.append
            count = 0
            yield
    scan.seal()
    yield


def in_path_order(top: list[tuple], listing: Callable[[tuple], list[tuple]]) -> Iterator[Any]:  # type: ignore[type-arg]
    """A tree's entries in the manifest's order (path bytes), from one listing per directory: each listing
    is sorted descending by key (an entry's name; a subdirectory's contents under ``name + "/"``, so
    ``a-b`` comes before ``a/x``) and holds ``(key, value)`` for an entry, yielded as ``value``, or
    ``(key, None, ...)`` for a directory's contents, opened with ``listing(item)`` when its turn comes.
    Holds one listing per level of the path being walked."""
    frames = [top]
    while frames:
        items = frames[-1]
        if not items:
            frames.pop()
            continue
        item = items.pop()
        if item[1] is None:
            frames.append(listing(item))
            continue
        yield item[1]


T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T], *, batch: int = 2048, depth: int = 4, name: str = "drsync-ahead") -> Iterator[T]:
    """``items`` in their order, produced by a thread of their own at most ``depth`` batches of ``batch``
    ahead: a walk's system calls (which run without the GIL) overlap the caller's work on what it took.
    An exception of ``items`` is raised in the caller's thread. Closing this generator stops the thread
    at its next batch and waits for it, ``items`` closed (its ``finally`` run) in that thread: what the
    walk opened up is set back before the caller goes on."""
    ahead: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            got: list[T] = []
            for item in items:
                got.append(item)
                if len(got) >= batch:
                    ahead.put(got)
                    got = []
                    if stop.is_set():
                        return
            ahead.put(got)
            ahead.put(_END)
        except BaseException as e:  # handed to the caller's thread, raised there
            ahead.put(e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            got = ahead.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to hand over a batch: it sees `stop` after its put
            with contextlib.suppress(queue.Empty):
                ahead.get(timeout=0.1)
        thread.join()


class _Lister:
    """One directory listing of :func:`scan_tree`: its entries examined (lstat) and sorted."""

    def __init__(self, root: str, scan: TreeScan, exclude: frozenset[str]) -> None:
        self.root = root
        self.scan = scan
        self.exclude = frozenset(os.fsencode(p) for p in exclude)
        self.reserved = frozenset(os.fsencode(n) for n in RESERVED_NAMES)

    def items(self, rel_dir: bytes, abs_dir: bytes, examined: tuple[int, int] | None = None) -> list[tuple]:
        """The sorted listing of ``rel_dir``: through a descriptor of the directory its parent's listing
        ``examined`` (device, inode), never of what its path leads to now: one swapped for a symlink
        (to a place outside the root) since is kept at its last captured content, never listed."""
        scan = self.scan
        warn = scan.warnings.append
        fsdecode, fsencode = os.fsdecode, os.fsencode

        def unlisted(problem: str, dev: int | None) -> list[tuple]:  # type: ignore[type-arg]
            native_walk.note_unlisted(scan, rel_dir, problem, dev)
            return []

        opened = fsutil.open_walked_dir(self.root, rel_dir, abs_dir, examined)
        if opened is None:  # removed or renamed since its parent was listed: what it held is kept, stale
            if rel_dir:
                scan.vanished.append((fsdecode(rel_dir), examined[1] if examined else 0))
            return []
        if isinstance(opened, str):
            return unlisted(opened, examined[0] if examined else None)
        fd, st_dir = opened
        try:
            it = os.scandir(fd)
        except OSError as e:
            os.close(fd)
            return unlisted(f"cannot be listed ({e.strerror or e})", examined[0] if examined else None)
        def unexaminable(rel: bytes, err: OSError) -> None:
            scan.unreadable.append(fsdecode(rel))
            scan.devices[fsdecode(rel)] = st_dir.st_dev
            warn(f"{printable(fsdecode(rel))}: cannot be examined ({err.strerror or err}); its last captured "
                 f"version is kept")

        out: list[tuple] = []  # type: ignore[type-arg]
        prefix = rel_dir + b"/" if rel_dir else b""
        reserved, exclude = self.reserved, self.exclude
        S_ISREG, S_ISDIR, S_ISLNK = st.S_ISREG, st.S_ISDIR, st.S_ISLNK
        try:
            with it:
                for e in it:
                    name = fsencode(e.name)  # scandir of a descriptor gives str names
                    if name in reserved:
                        if rel_dir:
                            warn(f"{printable(fsdecode(prefix + name))}: the name is reserved for drsync's staging "
                                 f"area; not captured")
                        native_walk.note_passed_over(scan, fd, prefix, (name,))
                        continue
                    full = abs_dir + b"/" + name
                    rel = prefix + name
                    if exclude and rel in exclude:
                        native_walk.note_passed_over(scan, fd, prefix, (name,))
                        continue
                    try:
                        s = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        unexaminable(rel, err)
                        continue
                    m = s.st_mode
                    target = None
                    if S_ISREG(m):
                        typ, size = FILE, s.st_size
                    elif S_ISDIR(m):
                        typ, size = DIR, 0
                        out.append((name + b"/", None, rel, full, (s.st_dev, s.st_ino)))
                    elif S_ISLNK(m):
                        typ, size = SYMLINK, 0
                        try:
                            target = os.readlink(name, dir_fd=fd)
                        except FileNotFoundError:
                            continue
                        except OSError as err:
                            unexaminable(rel, err)
                            continue
                        if symlink_leaves_root(fsdecode(rel), fsdecode(target)):
                            warn(f"{printable(fsdecode(rel))}: symlink to {printable(fsdecode(target))} leaves the "
                                 f"data root; not captured")
                            scan.left_out(rel)
                            continue
                    else:
                        warn(f"{printable(fsdecode(rel))}: special file (fifo, socket or device) not captured")
                        scan.specials.append(hash(rel))
                        continue
                    out.append((name, (rel, typ, m & 0o7777, s.st_uid, s.st_gid, size, s.st_mtime_ns, s.st_ctime_ns,
                                       s.st_ino, target, s.st_nlink, s.st_dev, s.st_blocks)))
        finally:
            os.close(fd)
        out.sort(reverse=True)  # keys are unique: a name never holds "/"
        return out


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
