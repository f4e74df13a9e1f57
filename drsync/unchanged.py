"""Which files of a manifest a target already holds, found by one sorted merge (the apply's first pass).

An apply at scale compares a million manifest rows with a million target
entries, and most are plain files that already match. Holding both sides as
Python objects costs about a kilobyte a file; instead the manifest (sorted by
path bytes) and the target's walk as columns
(:func:`drsync.dataroot.local.walk_target_columns`, in the same order) are
merged a window of rows at a time, with column operations (a no-change restore
of 100,000 files makes no Python object for any of them). A plain file that matches in
every way the planner compares (type, size, time at the common precision,
mode, owner and extended attributes where compared, one link) is counted and
dropped; one that matches in all but mode, owner or extended attributes is
counted too and kept as a manifest row whose metadata the commit sets
(``Residual.meta_rows``); everything else (directories, links, hard-link groups, differing or
missing files, paths only the target has) is kept for
:func:`drsync.apply.plan_apply`, which decides them exactly as it would have
with both sides whole. The counted files are what the planner would have left
alone, or whose metadata alone it would have fixed, so the plan is the same.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import allocators
from drsync.dataroot import UNKNOWN_ID
from drsync.repository.link_leaders import LinkLeaders
from drsync.repository.manifest import (
    DIR,
    FILE,
    SYMLINK,
    Manifest,
    bool_mask,
    column_groups,
    external_mask,
    path_parents,
)
from drsync.tree import K_DIR, K_FILE, K_LINK, EntryColumns, LocalEntry, mtime_in_range

if TYPE_CHECKING:
    from drsync.apply import ApplyPlan
    from drsync.repository.manifest import Entry

__all__ = ["MadeDirs", "Residual", "WriteList", "split_unchanged"]

# Manifest rows decoded to Python values at a time: 8192 light entries of 64-byte paths with hard-link names are
# about 6 MiB (a restore of two hard-linked days of 500,000 files peaked 8 MiB higher at 16384).
_BATCH = 8192
_SETTLE_ROWS = 1 << 16  # hard-link group members set aside before the groups all seen are decided
# What the merge keeps of each file of a hard-link group both sides hold, until its group is decided, and
# in what type (about 70 bytes a file): its row, group and whether it leads; the target's inode and link
# count; whether it is alike as a member and whether the first file differs in metadata only; and the
# target's mode, owner, size and time, for the planner when the group is not settled.
_HELD: dict[str, type] = {"rows": np.int64, "group": np.int32, "lead": np.bool_, "ino": np.int64, "nlink": np.int32,
                          "fine": np.bool_, "fix": np.bool_, "mode": np.int32, "uid": np.uint32, "gid": np.uint32,
                          "size": np.int64, "secs": np.int64, "nsec": np.int32}


@dataclass
class Residual:
    """What is left to plan: ``rows`` (int64 manifest rows, ascending), ``existing`` (target entries by
    path) and how many plain files were found ``unchanged`` (no action needed)."""

    rows: np.ndarray
    existing: dict[str, LocalEntry]
    unchanged: int
    # Plain files only the manifest has (int64 rows, ascending): written, nothing else to decide, so
    # they never reach the planner (:class:`WriteList`); and their parent directories (the commit
    # touches them).
    new_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    new_parents: set[str] = dataclasses.field(default_factory=set)
    # With ``identity``: files alike in size and time whose inode or status-change time is not the one the
    # capture saw (changed since, however their time looks): their content is to be checked.
    suspects: set[str] = dataclasses.field(default_factory=set)
    # Plain files both hold alike in content (type, size, time, one link) but not in mode, owner or extended
    # attributes (int64 rows, ascending; counted in ``unchanged``): the commit sets their metadata only
    # (``ApplyPlan.fix_meta``), so they never reach the planner either (``chmod -R`` undone on a million files).
    meta_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Directories both hold alike in every way compared (int64 rows, ascending): kept from the planner;
    # :meth:`fold` finishes (and first opens up) those the commit changes something in.
    dir_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Directories only the manifest has (int64 rows, ascending): made and finished by the commit as rows
    # (:class:`MadeDirs`), never as planner objects (a restore of a million directories into an empty target).
    made_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # The directories of ``meta_rows``: passed through to set their metadata (opened up when not searchable).
    meta_parents: set[str] = dataclasses.field(default_factory=set)
    # Files of hard-link groups only the manifest has, but for each group's first file (in ``new_rows``):
    # linked to that first file by the commit (int64 rows, ascending; ``ApplyPlan.hardlink`` as a WriteList).
    link_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Symlinks only the manifest has (int64 rows, ascending): made by the commit (``ApplyPlan.link``, a WriteList).
    symlink_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Symlinks both hold alike (int64 rows, ascending): nothing to do; :meth:`alike_links` names them for the
    # planner when it must resolve the target's own links through them.
    alike_link_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def alike_links(self, manifest: Manifest) -> dict[str, str]:
        """{path: target} of the symlinks both hold alike (what the target holds there too)."""
        got = manifest.values_at(self.alike_link_rows, ("path", "target"))
        return dict(zip(got["path"], got["target"], strict=True))

    def fold(self, plan: ApplyPlan, manifest: Manifest, later: Callable[[], Iterable[str]] = tuple) -> None:
        """Add what the merge settled to ``plan`` (the planner's plan of ``rows`` and ``existing``): the
        unchanged count, the new files to write and the files whose metadata alone is set, as manifest rows
        (:class:`WriteList`), and the settled directories the commit passes through or changes something in:
        opened up first when their owner lacks rwx (``unlock``) and finished, deepest first (``dirs``), as
        :func:`drsync.apply.plan_apply` does with the directories it sees. ``later``: the directories the
        root may yet add to ``touched_dirs`` (mount points, whose staging areas move their times), asked only
        when directories were settled: listed in ``dirs`` too, so that the commit finishes them if it does."""
        plan.unchanged += self.unchanged
        if len(self.new_rows):
            plan.write = WriteList(list(plan.write), manifest, self.new_rows)
        if len(self.meta_rows):
            plan.fix_meta = WriteList(list(plan.fix_meta), manifest, self.meta_rows)
        if len(self.link_rows):
            plan.hardlink = WriteList(list(plan.hardlink), manifest, self.link_rows)
        if len(self.symlink_rows):
            plan.link = WriteList(list(plan.link), manifest, self.symlink_rows)
        if len(self.made_rows):
            plan.made = MadeDirs(manifest, self.made_rows)
            plan.mkdir = plan.made.in_path_order(plan.mkdir)
        touched = plan.touched_dirs
        if not len(self.dir_rows) or touched is None:
            return
        later_dirs = set(later())
        passed = plan.passed_dirs | self.meta_parents  # passed through to set metadata or link
        if not (touched or later_dirs or passed):
            return
        reach = touched | passed
        for p in touched | passed:
            parts = p.split("/")
            reach.update("/".join(parts[:i]) for i in range(1, len(parts)))
        hits = _rows_named(manifest, self.dir_rows, reach | later_dirs)
        if not len(hits):
            return
        dirs = manifest.entries_at(hits, light=True)
        # Alike: the target's mode is the manifest's.
        unlock = [e.path for e in dirs if e.path in reach and (e.mode & 0o700) != 0o700]
        if unlock:
            plan.unlock = sorted({*plan.unlock, *unlock})
            touched.update(unlock)
        finish = [e for e in dirs if e.path in touched or e.path in later_dirs]
        if finish:
            plan.dirs = sorted([*plan.dirs, *finish], key=lambda e: e.path.count("/"), reverse=True)


def _rows_named(manifest: Manifest, rows: np.ndarray, paths: set[str]) -> np.ndarray:
    """Those of ``rows`` (ascending) whose path is one of ``paths``, by a column lookup a batch at a time."""
    if not paths:
        return np.zeros(0, np.int64)
    wanted = pa.array(sorted(os.fsencode(p) for p in paths), pa.binary())
    out = []
    for i in range(0, len(rows), _BATCH):
        part = rows[i:i + _BATCH]
        names = manifest.columns_at(part, ["path"]).column("path")
        out.append(part[bool_mask(pc.is_in(names, value_set=wanted.cast(names.type)))])
    return np.concatenate(out)


def split_unchanged(manifest: Manifest, walk: Iterable[EntryColumns], *, resolution_ns: int = 1,
                    compare_owner: bool = False, compare_xattrs: bool = False, mode_bits: int = 0o7777,
                    planned: Callable[[str], bool] | None = None, drop_alike: bool = True,
                    identity: bool = False) -> Residual | None:
    """Merge ``manifest`` with ``walk`` (the target's entries as runs of columns in path-bytes order:
    :func:`drsync.dataroot.local.walk_target_columns`) and drop the plain files both hold alike.
    ``planned(path)``: the path must go to the planner whatever it compares like (excluded, protected,
    known to have changed content); None when no path must. Memory: one record batch of each side and what
    is kept. ``drop_alike`` False (``--checksum``: alike files are read to be sure) keeps the files both
    hold for the planner and only splits off the new ones. ``identity`` (the target is the tree the manifest
    was captured from): a file is alike only as the very version the capture saw, its inode and
    status-change time too (a rewrite in place that put its time back differs); those alike but for that
    are kept for the planner and named in ``Residual.suspects``. Returns None when either side is out of
    path order (a hostile manifest): the caller plans the whole of both instead.

    Column operations throughout: both sides are cut into windows that end at the same path (the lower
    of the two batches' last paths), and each window's paths are matched by a hash lookup, which in
    sorted, duplicate-free windows pairs exactly the rows a row-by-row merge would."""
    t = manifest.table
    if t.schema.field("path").type != pa.binary():
        return None
    merge = _Merge(manifest, resolution_ns, compare_owner, compare_xattrs, mode_bits, planned, drop_alike, identity)
    allocators.give_back()  # what numbering the hard-link groups freed, before the merge holds its windows
    target = _Target(walk)
    try:
        return _merge(t, merge, target)
    except _OutOfOrder:
        return None


def _merge(t: pa.Table, merge: _Merge, target: _Target) -> Residual | None:
    last_key: bytes | None = None
    start = 0
    for batch in t.to_batches(max_chunksize=_BATCH):
        paths = batch.column(batch.schema.get_field_index("path"))
        if not len(paths):
            continue
        if not _ascending(paths, last_key):
            raise _OutOfOrder
        last_key = paths[-1].as_py()
        side = merge.side(batch, start)
        mi = 0
        while mi < len(paths):
            tb = target.current()
            if tb is None:  # the target has nothing more: the rest of the manifest is new to it
                merge.window(side, mi, len(paths), None, 0, 0)
                break
            bound = min(last_key, target.last_key)
            upto = mi + _count_at_most(paths[mi:], bound)
            tupto = target.at + _count_at_most(tb.paths[target.at:], bound)
            merge.window(side, mi, upto, tb, target.at, tupto)
            mi = upto
            target.at = tupto
        start += batch.num_rows
    while True:  # paths only the target has, past the manifest's last
        tb = target.current()
        if tb is None:
            break
        merge.keep_target(tb, np.arange(target.at, len(tb)))
        target.at = len(tb)
    return merge.residual()


class _OutOfOrder(Exception):
    """A side of the merge is not in path order: the caller plans the whole of both."""


class _Target:
    """The walk's runs gathered into batches of at least :data:`_BATCH` rows; ``at``: the first row of the
    current batch not yet merged."""

    def __init__(self, walk: Iterable[EntryColumns]) -> None:
        self.runs = iter(walk)
        self.batch: EntryColumns | None = None
        self.at = 0
        self.last_key: bytes = b""
        self.previous: bytes | None = None
        self.done = False

    def current(self) -> EntryColumns | None:
        if self.batch is not None and self.at < len(self.batch):
            return self.batch
        self.batch, self.at = None, 0
        parts: list[EntryColumns] = []
        rows = 0
        while not self.done and rows < _BATCH:
            run = next(self.runs, None)
            if run is None:
                self.done = True
            elif len(run):
                parts.append(run)
                rows += len(run)
        if not parts:
            return None
        batch = EntryColumns.concat(parts)
        if not _ascending(batch.paths, self.previous):
            raise _OutOfOrder
        self.batch = batch
        self.previous = self.last_key = batch.paths[-1].as_py()
        return batch


def _ascending(paths: pa.Array, before: bytes | None) -> bool:
    """Whether ``paths`` rise strictly, from above ``before``."""
    if before is not None and paths[0].as_py() <= before:
        return False
    return len(paths) < 2 or not pc.any(pc.less_equal(paths[1:], paths[:-1])).as_py()


def _count_at_most(paths: pa.Array, bound: bytes) -> int:
    """How many of ``paths`` (ascending) are at most ``bound``."""
    return int(pc.sum(pc.less_equal(paths, pa.scalar(bound, paths.type))).as_py() or 0)


@dataclass
class _Side:
    """One manifest batch as NumPy columns for :class:`_Merge` (``start``: its first row in the manifest)."""

    start: int
    paths: pa.Array
    dirs: np.ndarray        # a directory holding no mode bits the target cannot keep
    plain: np.ndarray       # a file without a hard link, not external, not a hard link group's first file,
    #                         and holding no mode bits the target cannot keep: what can be written or left as is
    size: np.ndarray
    mode: np.ndarray
    mtime: np.ndarray       # nanoseconds at the comparison's resolution (valid where ``timed``)
    timed: np.ndarray
    uid: np.ndarray
    gid: np.ndarray
    xattrs: pa.Array
    links: np.ndarray       # a symlink
    targets: pa.Array       # the symlinks' targets (bytes; null for other rows)
    group: np.ndarray       # a file of a hard-link group (bytes in the repository, mode bits the target keeps):
    #                         its group's number (int64, a group of ``_Merge.leaders``); -1 for any other row
    leader: np.ndarray      # the group's first file (the path its other files name)
    inode: np.ndarray | None = None  # with identity: the capture's inode and status-change time of each row,
    ctime: np.ndarray | None = None  # and which rows are files with bytes in the repository
    files: np.ndarray | None = None


class _Merge:
    def __init__(self, manifest: Manifest, resolution_ns: int, compare_owner: bool, compare_xattrs: bool,
                 mode_bits: int, planned: Callable[[str], bool] | None, drop_alike: bool, identity: bool) -> None:
        t = manifest.table
        self.res = max(1, resolution_ns)
        self.manifest, self.identity = manifest, identity
        self.suspects: set[str] = set()
        self.extra = 0o7777 & ~mode_bits
        self.compare_owner, self.compare_xattrs = compare_owner, compare_xattrs
        self.planned, self.drop_alike = planned, drop_alike
        self.xattrs_at = manifest.in_order("xattrs")  # a lean manifest's, streamed from its file as batches pass
        # The hard-link groups, by their first file's row, and how many files each has (it and those naming
        # it): a group is settled only whole.
        self.leaders = LinkLeaders(t.column("path"),
                                   (g.column("hardlink") for g in column_groups(manifest, ["hardlink"])))
        self.hardlinks_at = manifest.in_order("hardlink")  # a lean manifest's, streamed from its file
        self.group_size = self.leaders.size
        # Members of hard-link groups, decided once every member was seen (groups span windows, a whole tree
        # apart in a backup tree linked across its days): those only the manifest has (rows, groups, which
        # lead) and those both hold as multiply-linked files (rows, groups, which lead, the target's inode
        # and link count, whether alike as a member, whether the first file differs in metadata only, and
        # what the planner needs of the target's file when its group is not settled: mode, owner, size,
        # time; the extended attributes of the few that have them by row). About 70 bytes a linked file.
        self.links_new: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.links_held: dict[str, list[np.ndarray]] = {n: [] for n in _HELD}
        self.links_held_xattrs: dict[int, bytes] = {}
        # Members of each group seen so far: a group is decided once all its files were seen, so only groups
        # still open (spanning windows not yet merged) are held (:meth:`_settle_links`).
        self.members_seen = np.zeros(len(self.leaders), np.int32)
        self.links_pending = 0  # rows set aside in links_new and links_held
        self.settle_at = _SETTLE_ROWS
        self.links_settled = False  # some group was decided: its rows go in path order with the others
        self.link_rows: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.new_rows: list[np.ndarray] = []
        self.meta_rows: list[np.ndarray] = []
        self.dir_rows: list[np.ndarray] = []
        self.made_rows: list[np.ndarray] = []
        self.symlink_rows: list[np.ndarray] = []
        self.alike_link_rows: list[np.ndarray] = []
        self.new_parents: set[bytes] = set()
        self.meta_parents: set[bytes] = set()
        self.existing: dict[str, LocalEntry] = {}
        self.unchanged = 0

    def side(self, batch: pa.RecordBatch, start: int) -> _Side:
        bt = pa.Table.from_batches([batch])

        def col(name: str) -> np.ndarray:
            return bt.column(name).to_numpy()

        paths = bt.column("path").combine_chunks().cast(pa.large_binary())  # as the walk's
        mode = col("mode").astype(np.int64)
        files = bool_mask(pc.equal(bt.column("type"), FILE)) & ~external_mask(bt)  # bytes in the repository
        hardlinks = self.hardlinks_at(np.arange(start, start + bt.num_rows))
        unlinked = bool_mask(pc.is_null(hardlinks))
        keeps_mode = mode & self.extra == 0
        lead_of = self.leaders.group_of_rows(np.arange(start, start + bt.num_rows))
        plain = files & unlinked & (lead_of < 0) & keeps_mode
        named = self.leaders.group_of_names(hardlinks)
        leader = files & unlinked & (lead_of >= 0) & keeps_mode
        group = np.where(leader, lead_of, np.where(files & keeps_mode, named, -1)).astype(np.int64)
        secs = col("mtime_s")
        timed = mtime_in_range(secs)
        mtime = (np.where(timed, secs, 0) * 1_000_000_000 + col("mtime_nsec").astype(np.int64)) // self.res
        inode = ctime = None
        rows = np.arange(start, start + bt.num_rows)
        if self.identity:  # a lean manifest reads them from its file, a batch at a time
            ids = bt if "inode" in bt.column_names else self.manifest.columns_at(rows, ["inode", "ctime_ns"])
            inode, ctime = ids.column("inode").to_numpy(), ids.column("ctime_ns").to_numpy()
        # Compared only where the target keeps them (a lean manifest reads them from its file).
        xattrs = (pa.nulls(bt.num_rows, pa.binary()) if not self.compare_xattrs
                  else bt.column("xattrs").combine_chunks() if "xattrs" in bt.column_names
                  else self.xattrs_at(rows))
        dirs = bool_mask(pc.equal(bt.column("type"), DIR)) & (mode & self.extra == 0)
        links = bool_mask(pc.equal(bt.column("type"), SYMLINK))
        targets = bt.column("target").combine_chunks().cast(pa.large_binary())
        return _Side(start, paths, dirs, plain, col("size"), mode, mtime, timed, col("uid").astype(np.int64),
                     col("gid").astype(np.int64), xattrs, links, targets, group, leader, inode, ctime,
                     files if inode is not None else None)

    def window(self, m: _Side, lo: int, hi: int, tb: EntryColumns | None, tlo: int, thi: int) -> None:
        """Manifest rows ``lo:hi`` of ``m`` against target rows ``tlo:thi`` of ``tb``: both hold every path of
        their side up to the same one, so equal paths are in both."""
        n = hi - lo
        if tb is None or thi == tlo:
            at = np.full(n, -1, np.int64)
        else:
            at = pc.index_in(m.paths[lo:hi], value_set=tb.paths[tlo:thi]).fill_null(-1).to_numpy()
        matched = at >= 0
        rows = np.arange(lo, hi)
        # Paths only the manifest has: plain files are written with nothing else to decide.
        new = ~matched & m.plain[lo:hi]
        if self.planned is not None:
            new[new] = ~self._planned(m.paths, rows[new])
        self.new_rows.append(m.start + rows[new])
        # Directories only the manifest has: made, and finished, with nothing else to decide.
        made = ~matched & m.dirs[lo:hi]
        if self.planned is not None and made.any():
            made[made] = ~self._planned(m.paths, rows[made])
        self.made_rows.append(m.start + rows[made])
        # Symlinks only the manifest has: made, with nothing else to decide.
        made_link = ~matched & m.links[lo:hi]
        if self.planned is not None and made_link.any():
            made_link[made_link] = ~self._planned(m.paths, rows[made_link])
        self.symlink_rows.append(m.start + rows[made_link])
        if new.any() or made.any() or made_link.any():
            self._note_parents(m.paths.take(pa.array(rows[new | made | made_link])))
        # Files of hard-link groups only the manifest has: settled once their whole group is seen.
        members = m.group[lo:hi]
        np.add.at(self.members_seen, members[members >= 0], 1)
        new_link = ~matched & (m.group[lo:hi] >= 0)
        if self.planned is not None and new_link.any():
            new_link[new_link] = ~self._planned(m.paths, rows[new_link])
        if new_link.any():
            nr = rows[new_link]
            self.links_new.append((m.start + nr, m.group[nr], m.leader[nr]))
            self.links_pending += len(nr)
        keep = ~matched & ~new & ~made & ~made_link & ~new_link
        # Paths both hold: a plain file alike in every way compared is left alone.
        kept_targets = np.zeros(0, np.int64)
        if matched.any():
            mr = rows[matched]
            tr = at[matched] + tlo
            assert tb is not None
            alike, meta, suspect = self._alike(m, mr, tb, tr)
            dirs = self._dirs_alike(m, mr, tb, tr)
            links = self._links_alike(m, mr, tb, tr)
            settled = alike | meta | dirs | links  # no decision left for the planner
            if self.planned is not None and settled.any():
                settled[settled] = ~self._planned(m.paths, mr[settled])
                alike &= settled
                meta &= settled
                dirs &= settled
                links &= settled
            self.alike_link_rows.append(m.start + mr[links])
            settled |= self._held_links(m, mr, tb, tr, suspect)
            self.unchanged += int((alike | meta).sum())
            self.meta_rows.append(m.start + mr[meta])
            if meta.any():
                self._note_parents(m.paths.take(pa.array(mr[meta])), self.meta_parents)
            self.dir_rows.append(m.start + mr[dirs])
            keep[np.flatnonzero(matched)[~settled]] = True
            kept_targets = tr[~settled]
        self.rows.append(m.start + rows[keep])
        if self.links_pending >= self.settle_at:
            self._settle_links(final=False)
        # Target rows kept for the planner: those that differ, and paths only the target has, in path order.
        if tb is not None and thi > tlo:
            only = np.ones(thi - tlo, bool)
            only[at[matched]] = False
            self.keep_target(tb, np.sort(np.concatenate([kept_targets, np.flatnonzero(only) + tlo])))

    def _alike(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Masks over the pairs ``mr``/``tr``: (plain files alike in every way compared, plain files alike in
        content (type, size, time, one link; not suspect) whose mode, owner or extended attributes differ,
        and with identity the files suspect (:meth:`_suspects`; None without))."""
        none = np.zeros(len(mr), bool)
        if not self.drop_alike:
            return none, none, None
        suspect = self._suspects(m, mr, tb, tr) if m.files is not None else None
        same = self._content_alike(m, mr, tb, tr, m.plain[mr] & (tb.nlink[tr] == 1), suspect)
        alike = self._meta_alike(m, mr, tb, tr, same)
        return alike, same & ~alike, suspect

    def _content_alike(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray, mask: np.ndarray,
                       suspect: np.ndarray | None) -> np.ndarray:
        """``mask`` narrowed to the pairs the target holds as files of the same size and time (and, with
        identity, not ``suspect``)."""
        same = self._same_time(m, mr, tb, tr, mask & (tb.kind[tr] == K_FILE) & (tb.size[tr] == m.size[mr]))
        return same & ~suspect if suspect is not None else same

    def _held_links(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray,
                    suspect: np.ndarray | None) -> np.ndarray:
        """Files of hard-link groups the target holds as multiply-linked files, set aside (the mask of them)
        until their whole group is seen (:meth:`_settle_links`)."""
        held = (m.group[mr] >= 0) & (tb.kind[tr] == K_FILE) & (tb.nlink[tr] > 1)
        if not self.drop_alike or not held.any():
            return np.zeros(len(mr), bool)
        if self.planned is not None:
            held[held] = ~self._planned(m.paths, mr[held])
        lead = m.leader[mr] & held
        content = self._content_alike(m, mr, tb, tr, lead, suspect)
        fix = content & ~self._meta_alike(m, mr, tb, tr, content)
        fine = np.where(lead, content, True)
        hr, tr_ = mr[held], tr[held]
        for name, values in zip(_HELD, (m.start + hr, m.group[hr].astype(np.int32), m.leader[hr], tb.ino[tr_],
                                        tb.nlink[tr_], fine[held], fix[held], tb.mode[tr_], tb.uid[tr_], tb.gid[tr_],
                                        tb.size[tr_], tb.mtime_s[tr_], tb.mtime_nsec[tr_]), strict=True):
            self.links_held[name].append(values.astype(_HELD[name]))
        self.links_pending += len(hr)
        for row, i in zip((m.start + hr).tolist(), tr_.tolist(), strict=True):
            if tb.xattrs[i] is not None:
                self.links_held_xattrs[row] = tb.xattrs[i]
        return held

    def _meta_alike(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` narrowed to the pairs alike in mode, and in owner and extended attributes where compared."""
        alike = mask & (tb.mode[tr] == m.mode[mr])
        if self.compare_owner:
            uid = m.uid[mr]
            alike &= (uid == UNKNOWN_ID) | ((tb.uid[tr] == uid) & (tb.gid[tr] == m.gid[mr]))
        if self.compare_xattrs and alike.any():
            mine = m.xattrs.take(pa.array(mr))
            theirs = pa.array([tb.xattrs[i] for i in tr.tolist()], pa.binary())
            both_none = bool_mask(pc.and_(pc.is_null(mine), pc.is_null(theirs)))
            alike &= both_none | bool_mask(pc.equal(mine, theirs))
        return alike

    def _dirs_alike(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray) -> np.ndarray:
        """Directories both hold alike in every way the planner compares (mode, time at the common precision,
        owner and extended attributes where compared): nothing to do unless the commit changes what is in
        them, which :meth:`Residual.fold` finds out."""
        if not self.drop_alike:
            return np.zeros(len(mr), bool)
        return self._meta_alike(m, mr, tb, tr, self._same_time(m, mr, tb, tr, m.dirs[mr] & (tb.kind[tr] == K_DIR)))

    def _links_alike(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray) -> np.ndarray:
        """Symlinks both hold alike as the planner compares them (target, time at the common precision, owner
        where compared; a link's mode and attributes are not): nothing to do."""
        alike = m.links[mr] & (tb.kind[tr] == K_LINK)
        if not alike.any():
            return alike
        theirs = pa.array([tb.targets[i] for i in tr[alike].tolist()], pa.large_binary())
        alike[alike] = bool_mask(pc.equal(m.targets.take(pa.array(mr[alike])), theirs).fill_null(False))
        alike = self._same_time(m, mr, tb, tr, alike)
        if self.compare_owner:
            uid = m.uid[mr]
            alike &= (uid == UNKNOWN_ID) | ((tb.uid[tr] == uid) & (tb.gid[tr] == m.gid[mr]))
        return alike

    def _same_time(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` narrowed to the pairs whose modification times are equal at the comparison's resolution."""
        mask = mask & m.timed[mr] & mtime_in_range(tb.mtime_s[tr])
        if mask.any():
            secs = np.where(mask, tb.mtime_s[tr], 0)
            mask &= (secs * 1_000_000_000 + tb.mtime_nsec[tr]) // self.res == m.mtime[mr]
        return mask

    def _suspects(self, m: _Side, mr: np.ndarray, tb: EntryColumns, tr: np.ndarray) -> np.ndarray:
        """With identity: the files whose size and time match (the quick check would pass them, whatever
        their mode, owner, attributes or links) but whose inode or status-change time is not the one the
        capture saw (noted in ``suspects``; the mask of them returned)."""
        assert m.files is not None and m.inode is not None and m.ctime is not None
        quick = self._same_time(m, mr, tb, tr, m.files[mr] & (tb.kind[tr] == K_FILE) & (tb.size[tr] == m.size[mr]))
        if not quick.any():
            return quick
        same = tb.ino[tr] == m.inode[mr]
        same &= tb.ctime_ns[tr] == m.ctime[mr] if tb.ctime_ns is not None else False
        suspect = quick & ~same
        if suspect.any():
            self.suspects.update(os.fsdecode(p) for p in m.paths.take(pa.array(mr[suspect])).to_pylist())
        return suspect

    def _planned(self, paths: pa.Array, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` the planner must see whatever they compare like (``planned``, path by path)."""
        assert self.planned is not None
        if not len(rows):
            return np.zeros(0, bool)
        names = paths.take(pa.array(rows)).to_pylist()
        return np.fromiter((self.planned(os.fsdecode(p)) for p in names), bool, len(names))

    def _note_parents(self, paths: pa.Array, into: set[bytes] | None = None) -> None:
        """Add the parents of ``paths`` to ``into`` (default ``new_parents``): b"" for a path at the top."""
        parents, has = path_parents(paths)
        noted = self.new_parents if into is None else into
        noted.update(pc.unique(parents.filter(pa.array(has))).to_pylist())
        if not has.all():
            noted.add(b"")  # the root itself (the planner tells its own directory apart)

    def keep_target(self, tb: EntryColumns, rows: np.ndarray) -> None:
        for i in rows.tolist():
            e = tb.entry(i)
            self.existing[e.path] = e

    def _settle_links(self, *, final: bool = True) -> None:
        """Decide the hard-link groups set aside whose files were all seen (``final``: every group), each as a
        whole, as :func:`drsync.apply.plan_apply` would; the others stay set aside.

        A group only the manifest has (every file new to the target, none planned) is written: its first file
        as a new file (``new_rows``), the others linked to it (``link_rows``). A group the target holds as one
        inode linked exactly as many times as the group has files, its first file alike in content, is left
        alone (its metadata set when only that differs: ``meta_rows``). Any other group goes to the planner
        whole, with the target's entries of its files. Called whenever what the last call left and a quarter
        more (at least :data:`_SETTLE_ROWS` rows) are set aside: groups within a window or a few cost nothing held."""
        size, n = self.group_size, len(self.leaders)
        done = np.ones(n, bool) if final else self.members_seen >= size
        left = 0
        if self.links_new:
            rows, group, lead = (np.concatenate([p[i] for p in self.links_new]) for i in range(3))
            now = done[group]
            self.links_new = [(rows[~now], group[~now], lead[~now])] if not now.all() else []
            left += int((~now).sum())
            rows, group, lead = rows[now], group[now], lead[now]
            whole = ((np.bincount(group, minlength=n) == size) & (np.bincount(group[lead], minlength=n) == 1))[group]
            self.new_rows.append(rows[whole & lead])
            self.link_rows.append(rows[whole & ~lead])
            self.rows.append(rows[~whole])
            for i in range(0, int(whole.sum()), _BATCH):
                part = rows[whole][i:i + _BATCH]
                self._note_parents(self.manifest.columns_at(part, ["path"]).column("path").combine_chunks())
            self.links_settled = True
        if self.links_held["rows"]:
            now = done[np.concatenate(self.links_held["group"])]
            later = ~now
            left += int(later.sum())
            some_later, all_now = bool(later.any()), bool(now.all())

            def column(name: str) -> np.ndarray:  # joined, its parts let go at once, what stays set aside kept
                parts, self.links_held[name] = self.links_held[name], []
                joined = np.concatenate(parts)
                del parts  # (at a million held members, each column's copies were the settling's peak)
                if some_later:
                    self.links_held[name] = [joined[later]]
                return joined if all_now else joined[now]

            rows, group, lead, ino, nlink, fine, fix = (column(n) for n in list(_HELD)[:7])
            lead_ino = np.full(n, -1, np.int64)
            lead_ino[group[lead]] = ino[lead]
            bad = ino != lead_ino[group]  # one temporary column at a time
            bad |= nlink != size[group]
            bad |= ~fine
            whole = ((np.bincount(group, minlength=n) == size) & (np.bincount(group[lead], minlength=n) == 1)
                     & (np.bincount(group[bad], minlength=n) == 0))[group]
            self.unchanged += int(whole.sum())
            fixes = rows[whole & fix]
            if len(fixes):
                self.meta_rows.append(fixes)
                self._note_parents(self.manifest.columns_at(fixes, ["path"]).column("path").combine_chunks(),
                                   self.meta_parents)
            self.rows.append(rows[~whole])
            planned = np.flatnonzero(~whole)
            rest = [column(n)[planned] for n in list(_HELD)[7:]]  # a column at a time, only the rows planned
            if len(planned):
                mode, uid, gid, size_, secs, nsec = rest
                paths = self.manifest.columns_at(rows[planned], ["path"]).column("path").to_pylist()
                for k, i in enumerate(planned.tolist()):
                    path = os.fsdecode(paths[k])
                    self.existing[path] = LocalEntry(
                        path, FILE, int(mode[k]), int(uid[k]), int(gid[k]), int(size_[k]),
                        int(secs[k]) * 1_000_000_000 + int(nsec[k]), None, int(ino[i]),
                        self.links_held_xattrs.pop(int(rows[i]), None), int(nlink[i]))
            for row in rows[whole].tolist() if self.links_held_xattrs else ():
                self.links_held_xattrs.pop(row, None)
            self.links_settled = True
        self.links_pending = left
        # The next call once a quarter more (at least _SETTLE_ROWS) is set aside: each call costs what is set
        # aside, so the calls cost a few times the rows in all, and what waits for a group's last file (a backup
        # tree's first day, until its last day is walked) is held with at most a quarter more beside it, not
        # twice over (a million held files of hard-linked days: 25 MiB less at the peak).
        self.settle_at = left + max(_SETTLE_ROWS, left // 4)

    def residual(self) -> Residual:
        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

        def ascending(parts: list[np.ndarray]) -> np.ndarray:
            return np.sort(joined(parts), kind="stable")

        self._settle_links()
        if self.links_settled:  # the groups' rows, decided as they closed, go in path order with the others
            self.rows, self.new_rows, self.meta_rows = ([ascending(x)] for x in (self.rows, self.new_rows,
                                                                                  self.meta_rows))
        return Residual(joined(self.rows), self.existing, self.unchanged, joined(self.new_rows),
                        {os.fsdecode(d) for d in self.new_parents}, self.suspects, joined(self.meta_rows),
                        joined(self.dir_rows), joined(self.made_rows), meta_parents={
                            os.fsdecode(d) for d in self.meta_parents if d}, link_rows=ascending(self.link_rows),
                        symlink_rows=joined(self.symlink_rows), alike_link_rows=joined(self.alike_link_rows))


class WriteList:
    """``ApplyPlan.write`` at scale: the planner's entries (``head``, a list), then the manifest rows
    ``rows`` as light entries decoded :data:`_BATCH` at a time whenever the list is walked, so a million
    new files cost 8 bytes each between walks. Supports what the apply, the commit and the journal do
    with the list: ``len``, iteration, slicing, ``append``/``extend`` (onto ``head``)."""

    def __init__(self, head: list[Entry], manifest: Manifest, rows: np.ndarray) -> None:
        self.head = head
        self.manifest = manifest
        self.rows = rows

    def __len__(self) -> int:
        return len(self.head) + len(self.rows)

    def __iter__(self) -> Iterator[Entry]:
        yield from self.head
        yield from _decoded(self.manifest, self.rows)

    def __getitem__(self, k: int | slice) -> Entry | list[Entry]:
        if isinstance(k, int):
            got = self[k:k + 1] if k >= 0 else self[len(self) + k:len(self) + k + 1]
            if not got:
                raise IndexError(k)
            return got[0]
        start, stop, step = k.indices(len(self))
        if step != 1:
            return list(itertools.islice(self, start, stop, step))
        h = len(self.head)
        out = list(self.head[start:stop])
        lo, hi = max(start - h, 0), max(stop - h, 0)
        if hi > lo:
            out.extend(self.manifest.entries_at(self.rows[lo:hi], light=True))
        return out

    def append(self, e: Entry) -> None:
        self.head.append(e)

    def extend(self, items: Iterable[Entry]) -> None:
        self.head.extend(items)

    def total_size(self) -> int:
        """Bytes of every file in the list: the rows' sizes summed a column chunk at a time, read in
        place (a take would join the column and copy the sizes: 15 MiB at 1,000,000 rows)."""
        total = sum(e.size for e in self.head)
        start = 0
        for chunk in self.manifest.table.column("size").chunks:
            sizes = chunk.to_numpy(zero_copy_only=False)
            mine = (self.rows >= start) & (self.rows < start + len(sizes))
            total += int(sizes[self.rows[mine] - start].sum())
            start += len(sizes)
        return total


def _decoded(manifest: Manifest, rows: np.ndarray) -> Iterator[Entry]:
    """Light entries of manifest ``rows``, in their order, decoded :data:`_BATCH` at a time."""
    xattrs = manifest.in_order("xattrs")  # streamed from a lean manifest's file as the rows pass
    for i in range(0, len(rows), _BATCH):
        yield from manifest.entries_at(rows[i:i + _BATCH], light=True, xattrs=xattrs)


def _path_key(e: Entry) -> bytes:
    return os.fsencode(e.path)


def _depth_key(e: Entry) -> int:
    return -e.path.count("/")


class MadeDirs:
    """Directories an apply makes, as manifest ``rows`` (ascending: path order, parents first): what
    ``ApplyPlan.mkdir`` and the directories to finish hold beyond the planner's own, decoded
    :data:`_BATCH` at a time when walked (8 bytes a directory between walks, and 8 more for the finishing
    order)."""

    def __init__(self, manifest: Manifest, rows: np.ndarray) -> None:
        self.manifest, self.rows = manifest, rows
        depth = np.concatenate([pc.count_substring(manifest.columns_at(rows[i:i + _BATCH], ["path"]).column("path"),
                                                   "/").to_numpy(zero_copy_only=False)
                                for i in range(0, len(rows), _BATCH)]) if len(rows) else np.zeros(0, np.int64)
        self.deepest_first = rows[np.argsort(-depth.astype(np.int64), kind="stable")]

    def in_path_order(self, head: Iterable[Entry]) -> _Merged:
        """``head`` (the planner's directories to make) and these, parents before children."""
        return _Merged(sorted(head, key=_path_key), self.manifest, self.rows, _path_key)

    def deepest_first_with(self, head: list[Entry]) -> _Merged:
        """``head`` (the planner's directories to finish, deepest first) and these, deepest first."""
        return _Merged(head, self.manifest, self.deepest_first, _depth_key)


class _Merged:
    """A list of entries sorted by ``key`` (``head``) and manifest ``rows`` in the same order, walked as one
    sorted sequence; supports ``len`` and iteration (what the commit and its journal do)."""

    def __init__(self, head: list[Entry], manifest: Manifest, rows: np.ndarray,
                 key: Callable[[Entry], object]) -> None:
        self.head, self.manifest, self.rows, self.key = head, manifest, rows, key

    def __len__(self) -> int:
        return len(self.head) + len(self.rows)

    def __iter__(self) -> Iterator[Entry]:
        return heapq.merge(self.head, _decoded(self.manifest, self.rows), key=self.key)  # type: ignore[type-var]
