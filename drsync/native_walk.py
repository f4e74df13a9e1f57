"""The capture's walk of a local tree through :mod:`drsync._listdir` (C): columns without a Python object per entry.

:func:`drsync.tree.scan_tree` walks a data root on every snapshot. Its pure-Python
listing costs several microseconds an entry beyond the system calls (a DirEntry,
an lstat result, a tuple, and the sealing of those into Arrow). Here each
directory is listed by ``drsync._listdir.list_dir``: the entries are examined
(``fstatat`` without following links, ``readlinkat``) relative to a descriptor
this module opened, sorted by name bytes, and returned as buffers that become
Arrow columns directly. Python work is per directory, not per entry.

The walk is the same as the pure-Python one in every observable way (the same
rows in the same order, the same warnings, unreadable and unlisted paths; a test
compares both on hostile trees): each directory is opened with ``O_NOFOLLOW``
(through :func:`drsync.fsutil.open_beneath` past :data:`drsync.fsutil.LONG_PATH`)
and its (device, inode) checked against what its parent's listing saw, so a
directory swapped for a symlink meanwhile is never listed. When the extension is
not built (no C compiler where drsync was installed), :func:`available` is False
and the pure-Python listing is used.
"""

from __future__ import annotations

import os
import queue
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from drsync import fsutil
from drsync.repository.link_walk import climbing_target
from drsync.repository.manifest import DIR, FILE, SYMLINK, clamp_int64
from drsync.repository.manifest_check import RESERVED_NAME, symlink_leaves_root
from drsync.repository.snapshots import WarningLog
from drsync.text import printable

T = TypeVar("T")

if TYPE_CHECKING:
    from drsync.tree import EntryColumns, TreeScan

try:
    from drsync import _listdir
except ImportError:  # not built: drsync.tree lists in Python
    _listdir = None

# One record of _listdir's meta buffer (struct rec in drsync/_listdir.c): native byte order, no padding.
RECORD = np.dtype([
    ("ino", "u8"), ("nlink", "u8"), ("dev", "u8"), ("size", "i8"), ("mtime_s", "i8"), ("ctime_s", "i8"),
    ("blocks", "i8"), ("mtime_nsec", "u4"), ("ctime_nsec", "u4"), ("mode", "u4"), ("uid", "u4"), ("gid", "u4"),
    ("kind", "u4"), ("xattrs", "u4"), ("reserved", "u4"),
])
_TYPES = pa.array([FILE, DIR, SYMLINK], pa.string())  # by the record's kind
_RECORD_SIZE = RECORD.itemsize
_K_LINK, _K_PROBLEM, _K_SPECIAL, _K_RESERVED = (
    (_listdir.K_LINK, _listdir.K_PROBLEM, _listdir.K_SPECIAL, _listdir.K_RESERVED) if _listdir else (2, 4, 3, 5))
_CTIME_S = 9_223_372_035  # seconds whose nanoseconds surely fit int64


def _arrow(values: np.ndarray) -> pa.Array:
    """A contiguous NumPy array of numbers as an Arrow array over the same memory (``pa.array`` would
    import numpy.ma on its first call: 15 ms of every snapshot's start)."""
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def note_unlisted(notes: _Notes | TreeScan, rel_dir: bytes, problem: str, dev: int | None) -> None:
    """Record a directory a walk could not list (kept at its last captured content, never a deletion):
    in ``unlisted``, its device where known, the root's ``problem``, and a warning."""
    rel = os.fsdecode(rel_dir)
    notes.unlisted.append(rel)
    if dev is not None:
        notes.devices[rel] = dev
    if not rel_dir:
        notes.root_problem = problem
    notes.warnings.append(f"{printable(rel) or '.'}: {problem}; {UNLISTED_KEPT}")


def note_passed_over(notes: _Notes | TreeScan, fd: int, prefix: bytes, names: Iterable[bytes]) -> None:
    """Record the ``names`` a listing of the directory at ``fd`` (``prefix``: its path and a slash) passed
    over (excluded, reserved) that are links or hold one (:func:`links_among`): a walk over the captured
    links that reaches them reads what is there (:attr:`TreeScan.unwalked`)."""
    for name in links_among(fd, names):
        notes.passed_over(prefix + name)


def links_among(fd: int, names: Iterable[bytes]) -> tuple[bytes, ...]:
    """Those of ``names`` (in the directory at ``fd``) that are links or hold one (:func:`holds_link`). A name
    gone meanwhile, a file and a directory without links (a repository, a state directory) are not: nothing
    there changes a walk."""
    out = []
    for name in names:
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode) or (stat.S_ISDIR(mode) and holds_link(fd, name)):
            out.append(name)
    return tuple(out)


_PASSED_OVER_ENTRIES = 1_000_000  # entries of a passed-over directory looked at for links before assuming one


def holds_link(dfd: int, name: bytes, budget: int = _PASSED_OVER_ENTRIES) -> bool:
    """Whether directory ``name`` (in the directory at ``dfd``) holds a symlink at any depth, told by the
    entries' types as listed (no stat where the filesystem gives them). True, cautiously, when a directory of
    it cannot be opened or listed, or past ``budget`` entries."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = os.open(name, flags, dir_fd=dfd)
    except OSError:
        return True
    try:
        todo: list[bytes] = [b"."]
        while todo:
            rel = todo.pop()
            try:
                fd = os.open(rel, flags, dir_fd=top)
                try:
                    with os.scandir(fd) as it:
                        for e in it:
                            budget -= 1
                            if budget < 0 or e.is_symlink():
                                return True
                            if e.is_dir(follow_symlinks=False):
                                todo.append(rel + b"/" + os.fsencode(e.name))
                finally:
                    os.close(fd)
            except OSError:
                return True
        return False
    finally:
        os.close(top)


# What a capture does with a directory it could not list (an earlier snapshot's content below it, marked stale);
# capture._merge_stale adds a line when no earlier snapshot has anything there.
UNLISTED_KEPT = "what the last snapshot holds below it is kept, stale"


def available() -> bool:
    """True when the C listing is built and matches this module's record layout."""
    return _listdir is not None and RECORD.itemsize == _listdir.RECORD_SIZE


class _Listing:
    """One directory's entries (rows sorted by name bytes), as the C listing's buffers, and where each
    subdirectory's contents go. Rows are taken in order (``cursor``); links that leave the root are
    ``dropped`` rows, skipped as they are taken."""

    __slots__ = ("abs_dir", "ahead_at", "count", "cursor", "data", "dirs", "drop_at", "dropped", "lens", "link_at",
                 "links", "meta", "next_dir", "offsets")

    def __init__(self, abs_dir: bytes, count: int, offsets: bytes, lens: bytes, data: bytes, meta: bytes,
                 dirs: list[tuple[int, int, bytes, int, int]], links: list[tuple[int, bytes]],
                 dropped: list[int]) -> None:
        self.abs_dir = abs_dir
        self.count = count
        self.offsets = memoryview(offsets).cast("q")
        self.lens = memoryview(lens)
        self.data = memoryview(data)
        self.meta = memoryview(meta)
        self.dirs = dirs  # (row, position, name, dev, ino): its contents follow the first `position` rows
        self.links = links  # (row, target), ascending: taken as the cursor passes them
        self.dropped = dropped  # rows left out, ascending
        self.cursor = 0
        self.next_dir = 0
        self.ahead_at = 0  # its directories before this one were considered for reading ahead (_plan)
        self.link_at = 0  # links and dropped rows before these indices were passed
        self.drop_at = 0


class _Pending:
    """Rows taken from listings, sealed into one Arrow batch of SCAN_SCHEMA at a time: the buffers' pieces are
    joined once a batch (no NumPy or Arrow call per directory, which a tree of small directories pays for)."""

    def __init__(self) -> None:
        self.data: list[memoryview] = []
        self.lens: list[memoryview] = []
        self.meta: list[memoryview] = []
        self.targets: list[tuple[int, bytes]] = []  # (row of the batch, target)
        self.rows = 0

    def take(self, listing: _Listing, stop: int) -> None:
        """The listing's rows from its cursor up to ``stop`` (less its dropped rows)."""
        lo = listing.cursor
        dropped, links = listing.dropped, listing.links
        while lo < stop:
            if listing.drop_at < len(dropped) and dropped[listing.drop_at] == lo:
                listing.drop_at += 1
                lo += 1
                continue
            hi = min(stop, dropped[listing.drop_at]) if listing.drop_at < len(dropped) else stop
            while listing.link_at < len(links) and links[listing.link_at][0] < hi:
                row, target = links[listing.link_at]
                listing.link_at += 1
                self.targets.append((self.rows + row - lo, target))
            o = listing.offsets
            self.data.append(listing.data[o[lo]:o[hi]])
            self.lens.append(listing.lens[lo * 4:hi * 4])
            self.meta.append(listing.meta[lo * _RECORD_SIZE:hi * _RECORD_SIZE])
            self.rows += hi - lo
            lo = hi
        listing.cursor = max(listing.cursor, stop)

    def seal(self, schema: pa.Schema) -> pa.RecordBatch:
        n = self.rows
        meta = np.frombuffer(b"".join(self.meta), RECORD)
        lens = np.frombuffer(b"".join(self.lens), np.uint32)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        data = b"".join(self.data)
        if len(data) <= 0x7FFFFFFF:
            paths = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                           pa.py_buffer(data)])
        else:  # deep paths in a full batch: Arrow's binary column holds 2 GiB; the large one is cast
            paths = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
            paths = paths.cast(pa.binary())  # raises ArrowInvalid, as the Python listing's batch would
        if self.targets:
            values: list[bytes | None] = [None] * n
            for r, t in self.targets:
                values[r] = t
            target = pa.array(values, pa.binary())
        else:
            target = pa.nulls(n, pa.binary())
        cs = meta["ctime_s"]
        if n and (cs.min() < -_CTIME_S or cs.max() > _CTIME_S):  # beyond 1677..2262: clamped as the manifest does
            ctime = pa.array(clamp_int64([s * 1_000_000_000 + ns for s, ns in
                                          zip(cs.tolist(), meta["ctime_nsec"].tolist(), strict=True)]), pa.int64())
        else:
            ctime = _arrow(cs * 1_000_000_000 + meta["ctime_nsec"].astype(np.int64))

        def col(name: str) -> pa.Array:
            return _arrow(np.ascontiguousarray(meta[name]))

        columns = {
            "path": paths, "type": _TYPES.take(col("kind")), "mode": _arrow(meta["mode"] & 0o7777),
            "uid": col("uid"), "gid": col("gid"), "size": col("size"), "mtime_s": col("mtime_s"),
            "mtime_nsec": col("mtime_nsec"), "ctime_ns": ctime, "inode": col("ino"), "target": target,
            "nlink": col("nlink"), "dev": col("dev"), "blocks": col("blocks"),
        }
        self.data, self.lens, self.meta, self.targets, self.rows = [], [], [], [], 0
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


@dataclass
class _Notes:
    """What a stretch of the walk could not capture, gathered apart from the scan (the walk runs in its own
    thread) and added to it, in walk order, with the batch it came with (:meth:`apply`)."""

    warnings: WarningLog = field(default_factory=WarningLog)
    unlisted: list[str] = field(default_factory=list)
    vanished: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)
    climbs: bool = False  # some link's target climbs (TreeScan.climbs)
    linked: bool = False  # some link was kept (TreeScan.linked)
    outside: list[bytes] = field(default_factory=list)  # links left out by their text (TreeScan.left_out)
    unwalked: list[bytes] = field(default_factory=list)  # names passed over (TreeScan.passed_over)
    specials: list[bytes] = field(default_factory=list)  # special files (TreeScan.specials)
    root_problem: str | None = None

    def apply(self, scan: TreeScan) -> None:
        scan.warnings.merge(self.warnings)
        if self.root_problem is not None:
            scan.root_problem = self.root_problem
        scan.unlisted += self.unlisted
        scan.vanished += self.vanished
        scan.unreadable += self.unreadable
        scan.devices.update(self.devices)
        scan.climbs = scan.climbs or self.climbs
        scan.linked = scan.linked or self.linked
        for rel in self.outside:
            scan.left_out(rel)
        for rel in self.unwalked:
            scan.passed_over(rel)
        scan.specials.extend(hash(rel) for rel in self.specials)

    def passed_over(self, rel: bytes) -> None:
        self.unwalked.append(rel)


class _Read(NamedTuple):
    """A directory opened, listed and closed (:meth:`_NativeLister.read`): ``opened`` its stat, or what
    :func:`drsync.fsutil.open_walked_dir` said instead (None: removed meanwhile; a str: why it cannot be
    listed); ``listed``: ``_listdir.list_dir``'s result, or the OSError it raised; ``passed``: the names it
    passed over that are links or hold one (:func:`links_among`)."""

    opened: os.stat_result | str | None
    listed: tuple[Any, ...] | OSError | None = None
    passed: tuple[bytes, ...] = ()


PREFETCH_THREADS = 2  # directories listed at once ahead of the walk (the listing runs without the GIL)
PREFETCH_AHEAD = 4  # listings read ahead and not yet taken, at most (each holds its directory's buffers)
# Only directories whose blocks hold this many bytes are read ahead: on ext4 from about 400 entries of short
# names (a 4 KiB directory block holds about 100) to about 25,000. (tmpfs gives directories no blocks.)
PREFETCH_DIR_BYTES = (16 << 10, 1 << 20)
_BLOCKS = struct.Struct("=q")
_BLOCKS_AT = RECORD.fields["blocks"][1]  # the byte offset of ``blocks`` (512-byte units) in a record


def worth_reading_ahead(dir_bytes: int) -> bool:
    """Whether a directory whose blocks hold ``dir_bytes`` is listed ahead of a walk (:class:`ReadAhead`): a
    small one lists faster than a thread takes it over, and a large one is listed when the walk comes to it,
    not beside the one it works on (what is read ahead is a few mid-sized listings' buffers at most)."""
    return PREFETCH_DIR_BYTES[0] <= dir_bytes <= PREFETCH_DIR_BYTES[1]


class ReadAhead(Generic[T]):
    """Lists the directories a walk comes to next on threads of their own, while it works on the one before:
    a tree of many directories is listed by :data:`PREFETCH_THREADS` at once (at 100,000 files in 100
    directories, 0.16 s listed one at a time, 0.09 s two at a time). Only system calls and pure work run
    ahead (the walk's ``read``); what the walk makes of a listing (its notes, warnings and errors, in walk
    order) is made when it takes it. A directory is taken as it was when it was read ahead, as a walk that
    is not atomic may see it anyway. At most :data:`PREFETCH_AHEAD` listings are held, and no descriptor (a
    read closes what it opened); one that failed is read again by the walk in turn."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="drsync-list")
        self.ahead: dict[Any, Future[T]] = {}

    @property
    def full(self) -> bool:
        return len(self.ahead) >= PREFETCH_AHEAD

    def submit(self, key: Any, read: Callable[..., T], *args: Any) -> None:
        if key not in self.ahead:
            self.ahead[key] = self.pool.submit(read, *args)

    def take(self, key: Any) -> T | None:
        """What was read ahead for ``key`` (its exception raised here), or None: not read ahead."""
        future = self.ahead.pop(key, None)
        return future.result() if future is not None else None

    def settle(self) -> None:
        """Wait for the reads under way: each holds a descriptor until it ends. A directory whose read ahead
        failed is read again by the walk after this, with no more descriptors held than a walk in turn holds
        (else, short of descriptors, it could fail again for want of the ones read-ahead held meanwhile)."""
        wait(list(self.ahead.values()))

    def close(self) -> None:
        """Stop: what was read ahead and not taken is let go."""
        for future in self.ahead.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.ahead.clear()


def _plan(ahead: ReadAhead[_Read], lister: _NativeLister, frames: list[_Listing]) -> None:
    """Read ahead, up to the bound, the directories the capture's walk comes to next: those of its innermost
    frame not taken yet, then its parent's, and so on out."""
    for frame in reversed(frames):
        frame.ahead_at = max(frame.ahead_at, frame.next_dir)
        while frame.ahead_at < len(frame.dirs):
            if ahead.full:
                return
            row, _, name, dev, ino = frame.dirs[frame.ahead_at]
            frame.ahead_at += 1
            if worth_reading_ahead(_BLOCKS.unpack_from(frame.meta, row * _RECORD_SIZE + _BLOCKS_AT)[0] * 512):
                rel = _rel_of(frame, row)
                ahead.submit(rel, lister.read, rel, frame.abs_dir + b"/" + name, (dev, ino))


class _NativeLister:
    """Lists one directory of a scan through the C listing, with the pure-Python lister's rules."""

    def __init__(self, root: str, exclude: frozenset[str]) -> None:
        self.root = root
        self.notes = _Notes()
        self.reserved = (os.fsencode(RESERVED_NAME),)
        by_dir: dict[bytes, list[bytes]] = {}
        for p in exclude:
            head, _, name = os.fsencode(p).rpartition(b"/")
            by_dir.setdefault(head, []).append(name)
        self.excluded = {d: tuple(names) for d, names in by_dir.items()}

    def read(self, rel_dir: bytes, abs_dir: bytes, examined: tuple[int, int] | None) -> _Read:
        """The system-call part of :meth:`listing`, without notes or warnings: safe on any thread (a prefetch,
        :class:`ReadAhead`). The directory's descriptor is closed before it returns: what is read ahead holds
        none."""
        opened = fsutil.open_walked_dir(self.root, rel_dir, abs_dir, examined)
        if opened is None or isinstance(opened, str):
            return _Read(opened)
        fd, st_dir = opened
        prefix = rel_dir + b"/" if rel_dir else b""
        try:
            assert _listdir is not None
            excluded = self.excluded.get(rel_dir, ())
            listed = _listdir.list_dir(fd, prefix, self.reserved, excluded)
            reserved = (n for k, n, _ in listed[6] if k == _K_RESERVED)
            return _Read(st_dir, listed, links_among(fd, [*excluded, *reserved]))
        except OSError as e:
            return _Read(st_dir, e)
        finally:
            os.close(fd)

    def listing(self, rel_dir: bytes, abs_dir: bytes, examined: tuple[int, int] | None,
                read: _Read | None = None) -> _Listing | None:
        """``rel_dir``'s listing, or None (removed meanwhile, or unlisted: warned and recorded); ``read``: its
        system calls made already (:meth:`read`, ahead of the walk), else made now."""
        scan = self.notes
        warn = scan.warnings.append
        fsdecode = os.fsdecode

        def unlisted(problem: str, dev: int | None) -> None:
            note_unlisted(scan, rel_dir, problem, dev)

        # A directory read ahead that could not be listed then (out of descriptors, say) is listed now, as the
        # walk in turn lists it: only the walk's own attempt can leave it unlisted.
        if read is None or not isinstance(read.listed, tuple):
            read = self.read(rel_dir, abs_dir, examined)
        st_dir, listed, passed = read
        if st_dir is None:  # removed or renamed since its parent was listed: what it held is kept, stale
            if rel_dir:
                scan.vanished.append((fsdecode(rel_dir), examined[1] if examined else 0))
            return None
        if isinstance(st_dir, str):
            unlisted(st_dir, examined[0] if examined else None)
            return None
        if isinstance(listed, OSError):
            unlisted(f"cannot be listed ({listed.strerror or listed})", examined[0] if examined else None)
            return None
        assert listed is not None
        prefix = rel_dir + b"/" if rel_dir else b""
        count, offsets, lens, data, meta, dirs, events = listed
        for name in passed:
            scan.passed_over(prefix + name)
        links: list[tuple[int, bytes]] = []
        dropped: list[int] = []
        for kind, name, value in events:  # in readdir's order, as the Python listing warns
            if kind == _K_LINK:
                row, target = value
                rel = fsdecode(prefix + name)
                if not symlink_leaves_root(rel, fsdecode(target)):
                    links.append(value)
                    scan.linked = True
                    if not scan.climbs:
                        scan.climbs = climbing_target(fsdecode(target))
                else:
                    warn(f"{printable(rel)}: symlink to {printable(fsdecode(target))} leaves the data root; "
                         f"not captured")
                    scan.outside.append(prefix + name)
                    dropped.append(row)
            elif kind == _K_PROBLEM:
                rel = fsdecode(prefix + name)
                scan.unreadable.append(rel)
                scan.devices[rel] = st_dir.st_dev
                warn(f"{printable(rel)}: cannot be examined ({os.strerror(value)}); its last captured version "
                     f"is kept")
            elif kind == _K_SPECIAL:
                warn(f"{printable(fsdecode(prefix + name))}: special file (fifo, socket or device) not captured")
                scan.specials.append(prefix + name)
            elif rel_dir:  # reserved
                warn(f"{printable(fsdecode(prefix + name))}: the name is reserved for drsync's staging area; "
                     f"not captured")
        links.sort()
        dropped.sort()
        return _Listing(abs_dir, count, offsets, lens, data, meta, dirs, links, dropped)


def walk(scan: TreeScan, exclude: frozenset[str], batch_rows: int, schema: pa.Schema) -> Iterator[None]:
    """The lazy walk of :func:`drsync.tree.scan_tree` through the C listing: appends Arrow batches of
    ``schema`` to ``scan.batches`` in the manifest's order (path bytes, a directory's contents placed by
    ``name + "/"``), stepping each time it added one of about ``batch_rows`` rows (and once at the end).

    The walk runs in a thread of its own, two batches ahead at most: the listing's system calls run
    without the GIL, beside the capture's work on the batches already taken. Only the caller's thread
    touches ``scan``; closing this generator stops the walk at its next batch."""
    ahead: queue.Queue[tuple[pa.RecordBatch | None, _Notes] | BaseException] = queue.Queue(maxsize=2)
    stop = threading.Event()

    # The thread holds the walk, never the scan: a scan dropped unfinished (a failed capture) is collected, and
    # this generator's close stops the thread.
    batches = _batches(scan.root, exclude, batch_rows, schema)

    def produce() -> None:
        try:
            for item in batches:
                ahead.put(item)
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the caller's thread, raised there
            ahead.put(e)
        finally:
            batches.close()  # a walk stopped early lets go of what it read ahead (ReadAhead.close)

    threading.Thread(target=produce, name="drsync-walk", daemon=True).start()
    try:
        while True:
            item = ahead.get()
            if isinstance(item, BaseException):
                raise item
            batch, notes = item
            notes.apply(scan)
            if batch is None:
                break
            scan.batches.append(batch)
            yield
        yield
    finally:
        stop.set()
        while True:  # unblock a walk waiting to hand over a batch: it sees `stop` after its put
            try:
                ahead.get_nowait()
            except queue.Empty:
                break


def _batches(root: str, exclude: frozenset[str], batch_rows: int,
             schema: pa.Schema) -> Iterator[tuple[pa.RecordBatch | None, _Notes]]:
    """The walk itself: (batch, what could not be captured since the last batch), and (None, the rest) at
    the end."""
    lister = _NativeLister(root, exclude)
    try:
        top = os.stat(root)
        examined: tuple[int, int] | None = (top.st_dev, top.st_ino)
    except OSError:
        examined = None
    pending = _Pending()
    prefetch: ReadAhead[_Read] = ReadAhead()
    try:
        first = lister.listing(b"", os.fsencode(root), examined)
        frames = [first] if first is not None else []
        _plan(prefetch, lister, frames)
        while frames:
            f = frames[-1]
            more = f.next_dir < len(f.dirs)
            upto = f.dirs[f.next_dir][1] if more else f.count  # the rows before the next directory's contents
            if f.cursor < upto:
                pending.take(f, min(upto, f.cursor + batch_rows - pending.rows))
            elif more:
                row, _, name, dev, ino = f.dirs[f.next_dir]
                f.next_dir += 1
                rel = _rel_of(f, row)
                read = prefetch.take(rel)
                if read is not None and not isinstance(read.listed, tuple):
                    prefetch.settle()  # read again in turn (listing), with no descriptor held by read-ahead
                child = lister.listing(rel, f.abs_dir + b"/" + name, (dev, ino), read)
                if child is not None:
                    frames.append(child)
                _plan(prefetch, lister, frames)
            else:
                frames.pop()
            if pending.rows >= batch_rows:
                notes, lister.notes = lister.notes, _Notes()
                yield pending.seal(schema), notes
        if pending.rows:
            notes, lister.notes = lister.notes, _Notes()
            yield pending.seal(schema), notes
        yield None, lister.notes
    finally:
        prefetch.close()


def _rel_of(frame: _Listing, row: int) -> bytes:
    """The relative path of ``frame``'s row ``row``."""
    return frame.data[frame.offsets[row]:frame.offsets[row + 1]].tobytes()


def target_entries(dfd: int, rel_dir: str, excluded: tuple[bytes, ...],
                   xattr_dir: bytes | None) -> tuple[list[tuple], list[bytes], list[tuple[bytes, int]]]:  # type: ignore[type-arg]
    """One directory of an apply's target walk (:func:`drsync.dataroot.local.walk_target`) through the C
    listing: ``(items, specials, problems)``. ``items`` are in walk order, descending (as
    :func:`drsync.tree.in_path_order` pops them): ``(key, LocalEntry)`` for an entry, ``(key, None, rel)``
    for a directory's contents. Extended attributes are read (``read_xattrs`` of ``xattr_dir/name``) only
    for the entries the listing found holding some, or could not tell. ``specials`` (fifos, sockets,
    devices) and ``problems`` (name, errno: entries that could not be examined) are the caller's to
    handle. Raises OSError when the directory cannot be read."""
    from drsync.tree import LocalEntry, read_xattrs

    assert _listdir is not None
    prefix = os.fsencode(rel_dir) + b"/" if rel_dir else b""
    count, offsets, _, data, meta, dirs, events = _listdir.list_dir(dfd, prefix, (), excluded, xattr_dir)
    rels = pa.Array.from_buffers(pa.large_binary(), count,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)]).to_pylist()
    links = [value for kind, _, value in events if kind == _K_LINK]
    problems = [(name, value) for kind, name, value in events if kind == _K_PROBLEM]
    specials = [name for kind, name, _ in events if kind == _K_SPECIAL]
    rec = np.frombuffer(meta, RECORD)
    kinds = rec["kind"].tolist()
    types = [(FILE, DIR, SYMLINK)[k] for k in kinds]
    sizes = np.where(rec["kind"] == 0, rec["size"], 0).tolist()
    mtimes = (rec["mtime_s"] * 1_000_000_000 + rec["mtime_nsec"].astype(np.int64)).tolist() \
        if count and rec["mtime_s"].min() >= -_CTIME_S and rec["mtime_s"].max() <= _CTIME_S else \
        [s * 1_000_000_000 + ns for s, ns in zip(rec["mtime_s"].tolist(), rec["mtime_nsec"].tolist(), strict=True)]
    targets: list[bytes | None] = [None] * count
    for row, target in links:
        targets[row] = target
    xattrs: list[bytes | None] = [None] * count
    for row in np.flatnonzero(rec["xattrs"]).tolist() if xattr_dir is not None else ():
        xattrs[row] = read_xattrs(os.fsdecode(xattr_dir + b"/" + rels[row].rpartition(b"/")[2]))[0]
    decode = os.fsdecode
    entries = [LocalEntry(decode(r), t, m & 0o7777, u, g, sz, mt, None if tg is None else decode(tg), ino, xa, nl)
               for r, t, m, u, g, sz, mt, tg, ino, xa, nl in zip(
                   rels, types, rec["mode"].tolist(), rec["uid"].tolist(), rec["gid"].tolist(), sizes, mtimes,
                   targets, rec["ino"].tolist(), xattrs, rec["nlink"].tolist(), strict=True)]
    items: list[tuple] = []  # type: ignore[type-arg]
    at = 0
    for row, pos, *_ in dirs:  # a directory's contents come after the first `pos` entries
        items.extend(zip(rels[at:pos], entries[at:pos], strict=True))
        at = pos
        items.append((rels[row] + b"/", None, entries[row].path))
    items.extend(zip(rels[at:], entries[at:], strict=True))
    items.reverse()
    return items, specials, problems


def target_columns(dfd: int, rel_dir: str, excluded: tuple[bytes, ...],
                   xattr_dir: bytes) -> tuple[EntryColumns, list[tuple[int, str, int]], list[bytes],
                                              list[tuple[bytes, int]]]:
    """One directory of an apply's target walk as columns (:class:`drsync.tree.EntryColumns`, ascending by
    name), with no Python object per entry: ``(columns, subdirs, specials, problems)``. ``subdirs``: ``(pos,
    rel, dir_bytes)`` for each directory, whose contents come after the first ``pos`` rows (``dir_bytes``:
    what its blocks hold). ``specials`` and
    ``problems`` as :func:`target_entries` gives them (the caller lists a directory holding specials the
    other way). Raises OSError when the directory cannot be read."""
    from drsync.tree import EntryColumns, read_xattrs

    assert _listdir is not None
    prefix = os.fsencode(rel_dir) + b"/" if rel_dir else b""
    count, offsets, _, data, meta, dirs, events = _listdir.list_dir(dfd, prefix, (), excluded, xattr_dir)
    paths = pa.Array.from_buffers(pa.large_binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    problems = [(name, value) for kind, name, value in events if kind == _K_PROBLEM]
    specials = [name for kind, name, _ in events if kind == _K_SPECIAL]
    rec = np.frombuffer(meta, RECORD)
    targets: list[bytes | None] = [None] * count
    for kind, _, value in events:
        if kind == _K_LINK:
            targets[value[0]] = value[1]
    xattrs: list[bytes | None] = [None] * count
    for row in np.flatnonzero(rec["xattrs"]).tolist():
        name = paths[row].as_py().rpartition(b"/")[2]
        xattrs[row] = read_xattrs(os.fsdecode(xattr_dir + b"/" + name))[0]
    kind = rec["kind"].astype(np.int8)
    cs = rec["ctime_s"]
    ctime = (cs * 1_000_000_000 + rec["ctime_nsec"].astype(np.int64)) if not count or (
        cs.min() >= -_CTIME_S and cs.max() <= _CTIME_S) else np.array(clamp_int64(
            [s * 1_000_000_000 + ns for s, ns in zip(cs.tolist(), rec["ctime_nsec"].tolist(), strict=True)]), np.int64)
    columns = EntryColumns(paths, kind, (rec["mode"] & 0o7777).astype(np.int64), rec["uid"].astype(np.int64),
                           rec["gid"].astype(np.int64), np.where(kind == 0, rec["size"], 0),
                           rec["mtime_s"].copy(), rec["mtime_nsec"].astype(np.int64), rec["ino"].copy(),
                           rec["nlink"].astype(np.int64), targets, xattrs, ctime)
    blocks = rec["blocks"]
    subdirs = [(pos, os.fsdecode(paths[row].as_py()), int(blocks[row]) * 512) for row, pos, *_ in dirs]
    return columns, subdirs, specials, problems
