"""Data roots: the cluster's directory tree, which snapshots capture and applies change.

A data root lives on a local filesystem (:class:`~drsync.dataroot.local.LocalDataRoot`)
or on HDFS (:class:`~drsync.dataroot.hdfs.HdfsDataRoot`). Capture and apply
(``drsync/capture.py``, ``drsync/apply.py``) hold the logic and talk to a root
only through :class:`DataRoot`: scan it into columns, read a file as pieces with
its version before and after, stage files, commit a plan. What differs between
storages is here: how a consistent view is frozen (an HDFS snapshot; on a local
filesystem re-reading files that change), the precision of modification times
(HDFS keeps milliseconds), and whether owners can be set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol

from drsync.fsutil import local_location
from drsync.repository import chunks
from drsync.repository.manifest import content_digest
from drsync.storage import HDFS_SCHEMES
from drsync.tree import LocalEntry, TreeScan

if TYPE_CHECKING:
    from drsync.apply import ApplyPlan, Journal
    from drsync.repository.manifest import Entry, Manifest

# (uid_t)-1: the owner is not known (HDFS keeps user names, not ids); chown(2) leaves such an id alone.
UNKNOWN_ID = 0xFFFFFFFF
STAGING = ".drsync-staging"
# Files below this size cost their per-file work (open, create, attributes, the Python around them) more than
# their bytes: a root says how many threads should read or write them at once (``small_file_threads``).
SMALL_FILE_BYTES = 256 * 1024


class FileVersion(NamedTuple):
    """What identifies one version of a file: if any of it changes, the bytes may have changed.

    A tuple, not a dataclass: two are made per file read, on the capture's hot path."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int
    uid: int
    gid: int


class OpenFile(Protocol):
    """A file being read for a capture."""

    before: FileVersion

    def pieces(self) -> Iterator[memoryview | bytes]:
        """The content cut into content-defined chunks (FastCDC), read as a stream."""
        ...

    def after(self) -> FileVersion:
        """The version once read: equal to ``before`` when nothing changed meanwhile."""
        ...

    def xattrs(self) -> tuple[bytes | None, str | None]:
        """Extended attributes (ACLs included) encoded for the manifest, and a problem to report."""
        ...


class DataRoot(Protocol):
    url: str
    # Modification times are kept to this precision (1 ns locally, 1 ms on HDFS): an apply
    # compares times at the coarser precision of the manifest's source and the target.
    mtime_resolution_ns: int
    supports_symlinks: bool
    #: The permission bits the storage keeps (0o7777 on POSIX; HDFS keeps rwx and the sticky bit).
    mode_bits: int
    supports_xattrs: bool
    # What an apply could not carry onto this root (attributes it does not keep): reported, not fatal.
    warnings: list[str]
    #: Threads that stage files below :data:`SMALL_FILE_BYTES` at once; None: as many as stage larger files.
    small_file_threads: int | None

    # --- capture ---
    def check_capturable(self) -> None:
        """Raise UsageError when the root is missing or not a directory."""
        ...

    def frozen(self, tag: str, parent_tag: str | None = None,
               parent: Manifest | None = None) -> AbstractContextManager[FrozenRoot]:
        """A consistent read-only view for one capture (an HDFS snapshot where possible)."""
        ...

    def has_data(self) -> bool:
        """Whether the root holds anything besides drsync's own files."""
        ...

    # --- apply ---
    def prepare_target(self) -> bool:
        """Make sure the root exists as a directory; True when it had to be created."""
        ...

    def missing(self) -> bool:
        """Whether the root does not exist (as a directory)."""
        ...

    def relative_inside(self, path: str) -> str | None:
        """``path`` (a local path or URL) relative to the root when it lies inside it, else None.
        Raises UsageError when it is the root itself."""
        ...

    def lies_within(self, path: str) -> bool:
        """Whether the root is ``path`` (a local path or URL) or lies inside it."""
        ...

    def existing(self) -> dict[str, LocalEntry]:
        """Every entry of the target (links wherever they point, special files as ``other``)."""
        ...

    def same_content(self, e: Entry, have: LocalEntry) -> bool:
        """Re-hash an existing file and compare it with the manifest (``--checksum``)."""
        ...

    def owners_settable(self) -> bool:
        ...

    def root_entry(self) -> Entry | None:
        """The root directory's own metadata as an entry of path "" and type ``dir`` (mode, owner, mtime in
        nanoseconds, extended attributes where the root keeps them); None when the root is missing."""
        ...

    def open_root(self) -> int | None:
        """Open the root up (owner rwx) for an apply when this user owns it but may not write or search it;
        returns the mode it had (None: nothing changed), which the apply gives it back (:meth:`set_root`)."""
        ...

    def set_root(self, e: Entry) -> None:
        """Give the root directory ``e``'s metadata (what :meth:`root_entry` reads; owners only as root)."""
        ...

    def link_max(self, lead: str, name: str) -> int:
        """How many names the file at ``lead`` may have for ``name`` to be made one of them (paths relative to
        the root): 1 where there are no hard links, 0 when ``name`` cannot be one (another filesystem)."""
        ...

    def check_plan(self, plan: ApplyPlan) -> None:
        """Refuse, before anything changes, a plan the commit could not carry out (UsageError or
        OperationFailed naming the path): mount points in the way, directories this user cannot write."""
        ...

    def claim(self, what: str) -> AbstractContextManager[None]:
        """Hold the root for one apply (``what`` names it) against applies from other hosts, as long as the
        ``with`` lasts (an HDFS root: :mod:`drsync.dataroot.hdfs_lease`; a local root: nothing, its flocks
        do). ApplyBusy (nothing changed) when another holds it."""
        ...

    def claimant(self) -> str | None:
        """Who holds the root for an apply now, in words (:meth:`claim`), or None: what a dry run says."""
        ...

    def verify_claim(self, what: str) -> None:
        """ApplyBusy when the claim was taken over meanwhile (this apply was held up past its lease): called
        before the apply starts changing the root."""
        ...

    def journal(self) -> Journal:
        """Where an apply without a journal of its own keeps it: in the root's staging area."""
        ...

    def foreign_staging(self, top_only: bool = False) -> str | None:
        """A staging area's place (``.drsync-staging`` at the top of the root, or unless ``top_only`` of a
        filesystem mounted in it) holding what drsync did not put there: a file or link of that name, or a
        directory with content but none of drsync's marks (an apply's record or journal). None when there
        is none. An apply refuses such a root before it changes anything (emptying the area would delete
        it), and a capture says it leaves it out."""
        ...

    def reset_staging(self, plan: ApplyPlan) -> None:
        """Empty staging areas for the plan (one per filesystem it writes to)."""
        ...

    def staged_name(self, n: int, e: Entry) -> str:
        """The staged name :meth:`write_staged` gives the ``n``-th file of a plan (``n``: its place in
        ``plan.write``). The commit finds a file there unless the apply names another place for it
        (files staged by DistCp), so a million staged files need no map of names."""
        ...

    def write_staged(self, n: int, e: Entry, data: Iterable[bytes]) -> str:
        """Write one file into the staging area with its mode and mtime; returns its staged name."""
        ...

    def flush(self) -> None:
        """Make everything staged or committed so far durable."""
        ...

    def drop_staging(self) -> None:
        """Remove the staging areas and the trash, keeping only an in-root journal if there is one."""
        ...

    def remove_root(self) -> None:
        ...

    def settle(self) -> None:
        """Set back what a scan killed half-way left changed (modes it opened up to list)."""
        ...

    def seal(self) -> None:
        """After a commit: record what removing the staging areas must leave (the mtimes the commit set)."""
        ...

    def commit(self, plan: ApplyPlan, staged: dict[str, str]) -> None:
        """Make the root equal the plan. Every step is idempotent: after a crash at any instant,
        a journaled apply runs it again, any number of times, to the same end."""
        ...


class FrozenRoot(Protocol):
    """A read-only view of a data root for the length of one capture."""

    consistent: bool  # True when nothing can change under the capture (an HDFS snapshot)
    notes: list[str]
    #: Threads that read files below :data:`SMALL_FILE_BYTES` at once; None: as many as read larger files.
    small_file_threads: int | None

    def scan(self, exclude: frozenset[str]) -> TreeScan:
        ...

    def open_file(self, rel: str) -> AbstractContextManager[OpenFile]:
        """Open for reading; FileNotFoundError when it vanished, OSError when it cannot be read."""
        ...

    def warm(self, rels: list[str]) -> int:
        """Ask the storage to start reading these files, about to be read (:mod:`drsync.warming`), and return
        how many it asked for (those not cached already); best effort: reads no content, raises nothing, may
        do nothing."""
        ...

    def xattrs(self, rel: str) -> tuple[bytes | None, str | None]:
        """Extended attributes (ACLs included) encoded for the manifest, and a problem to report."""
        ...


def stream_matches(f: BinaryIO, e: Entry) -> bool:
    """Whether a file's bytes, cut and hashed as a capture would, are the manifest entry's content."""
    ids = [chunks.chunk_id(data) for data in chunks.cut_stream(f)]
    return content_digest(ids) == content_digest(e.chunks)


def small_files_pool(threads: int | None, workers: int, name: str) -> AbstractContextManager[ThreadPoolExecutor | None]:
    """The threads that read or stage a root's small files (its ``small_file_threads``, at most
    ``workers``): a pool of their own named ``name``, or None when they share the other files' pool."""
    if threads is None or threads >= workers:
        return nullcontext()
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)


def open_data_root(url: str, *, retry_s: float | None = None) -> DataRoot:
    """The data root a config or a command line names: a path, ``file://PATH`` or an HDFS URL.

    ``retry_s``: for HDFS, how long (seconds) a request is retried and may take, instead of the
    client's defaults (``config check --timeout``)."""
    from drsync.errors import UsageError

    local = local_location(url)
    if local is None:
        scheme = url.split("://", 1)[0]
        if scheme in HDFS_SCHEMES:
            from drsync.dataroot.hdfs import HdfsDataRoot

            return HdfsDataRoot(url, retry_s=retry_s)
        raise UsageError(f"{url}: unknown data root scheme {scheme!r}; use a path or hdfs://namenode:9870/PATH")
    from drsync.dataroot.local import LocalDataRoot

    return LocalDataRoot(local)
