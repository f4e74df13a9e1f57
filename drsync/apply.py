"""Applying a manifest to a target data root, local or HDFS (restore is a delta).

Plan first (pure: :func:`plan_apply` compares the manifest with what the
target holds), then stage, then commit:

1. every file to (re)write is built in ``<target>/.drsync-staging`` from
   verified chunks; a damaged or missing chunk aborts here and the target is
   untouched;
2. the staged data is made durable at once (one ``syncfs`` locally; a closed
   HDFS file is on its datanodes already);
3. extra paths are removed, directories made, staged files renamed into place,
   links made, modes, owners and mtimes set (the root's
   :meth:`~drsync.dataroot.DataRoot.commit`), then flushed again.

With a journal (the standby's apply) step 3 is recorded first, so a restart
replays it: the target ends as the old snapshot or the new one, never a mix.
Files whose type, size and mtime already match are left alone (``checksum``
re-hashes them too); mtimes compare at the coarser precision of the two
storages (HDFS keeps milliseconds). Paths matching ``exclude`` are neither
written nor removed (light backups leave bulk data alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync import allocators, documents, faults, fsutil
from drsync.apply_chunks import PartReaders, check_rows
from drsync.apply_root import RootOpening, close_up, holds_data, plan_root, set_root
from drsync.dataroot import SMALL_FILE_BYTES, STAGING, UNKNOWN_ID, DataRoot, open_data_root, small_files_pool
from drsync.errors import ChunkDamaged, IntegrityError, OperationFailed, RefusedError, UsageError
from drsync.flocks import ApplyBusy, ApplyLock
from drsync.pathglob import compile_globs
from drsync.repository.link_walk import escaping_links
from drsync.repository.manifest import (
    DIR,
    FILE,
    SYMLINK,
    Entry,
    Manifest,
    ManifestFile,
    column_groups,
    decode_name,
    external_mask,
)
from drsync.repository.manifest_check import validate
from drsync.repository.manifest_diff import content_changed
from drsync.repository.manifest_root import root_of
from drsync.text import one_line, printable
from drsync.tree import LocalEntry
from drsync.unchanged import MadeDirs, Residual, WriteList, split_unchanged

__all__ = ["STAGING", "ApplyPlan", "ApplyResult", "ChunkSource", "ExternalStager", "abandon_apply", "apply_manifest",
           "plan_apply", "recover_apply"]


class ChunkSource(Protocol):
    """Where an apply reads chunks. A source may also have ``read_chunks(ids) -> list[bytes]`` (``read_chunk``
    of each, in order, with fewer calls: a repository's), which small files are read with."""

    def read_chunk(self, chunk_id: bytes) -> bytes: ...

    def has_chunk(self, chunk_id: bytes) -> bool: ...


OTHER = "other"  # a fifo, socket or device in the target: never in a manifest, always replaced
STAGE_ATTEMPTS = 3  # a file's staging, when the storage says trying again from the start can succeed
log = logging.getLogger("drsync.apply")


class ExternalStager(Protocol):
    """Stages files whose bytes are not in the repository (external rows; DistCp does this)."""

    def stage(self, root: DataRoot, items: list[tuple[int, Entry]],
              progress: Callable[[int], None] | None = None) -> dict[str, str]: ...


@dataclass
class ApplyPlan:
    """What a commit does, in this order: open up ``unlock``, move ``remove`` into the trash
    (top-most paths only; a path whose type changes is removed and made anew), make ``mkdir``,
    rename ``write`` into place, link ``hardlink`` members to their group's first file, make ``link``,
    fix ``fix_meta``, finish ``dirs`` deepest first."""

    write: list[Entry] | WriteList = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    mkdir: list[Entry] | Iterable[Entry] = field(default_factory=list)  # parents first; a merge's: its MadeDirs too
    link: list[Entry] | WriteList = field(default_factory=list)  # a merge's: new symlinks as rows too
    fix_meta: list[Entry] | WriteList = field(default_factory=list)  # files whose mode, owner or xattrs only differ
    hardlink: list[Entry] | WriteList = field(default_factory=list)  # a merge's: new groups as rows too
    unchanged: int = 0
    # Files (non-directories) of the target the plan removes, those inside removed directories included, and
    # not written back in another form: what the target really loses (the root's own deletion guard).
    removes_files: list[str] = field(default_factory=list)
    dirs: list[Entry] = field(default_factory=list)
    # Directories whose metadata the commit must set: new ones, ones whose mode or mtime differ,
    # and parents of anything written, removed, linked or made (their mtime moves). None: all of them.
    touched_dirs: set[str] | None = None
    # Existing directories the commit changes but lacking owner rwx: opened up first, finished last.
    unlock: list[str] = field(default_factory=list)
    # Snapshot paths left alone because drsync's own files (repository, state) are there.
    protected_skipped: list[str] = field(default_factory=list)
    # Paths of ``write``, ``hardlink`` and ``link`` that exist in the target (replaced, not created).
    replaces: list[str] = field(default_factory=list)
    # Directories the merge found only in the manifest (drsync.unchanged): in ``mkdir``, and finished.
    made: MadeDirs | None = None
    # Directories of files whose metadata is set or that hard links are made to: searched, not changed.
    passed_dirs: set[str] = field(default_factory=set)
    # Existing directories whose mode, owner or extended attributes, and symlinks (pointing right) whose time
    # or owner, the commit sets back: with ``fix_meta``, what a kept target's refusal counts.
    refit: list[str] = field(default_factory=list)
    refit_links: int = 0  # of which symlinks (in ``link`` too, but not made)
    # Paths the snapshot lacks inside directories ``remove`` takes away to put a file or link there (top-most).
    retyped_contents: list[str] = field(default_factory=list)
    # Whether the commit writes, removes or makes a name in the root directory itself (its time moves).
    root_touched: bool = True
    # What the root directory itself gets once the commit and its clean-up are done (:func:`plan_root`), or None.
    root: Entry | None = None

    def dirs_to_finish(self, *, made: bool = True) -> list[Entry] | Iterable[Entry]:
        """``dirs`` (deepest first) limited to the touched ones, and (``made``) the merge's new directories,
        all deepest first."""
        head = self.dirs if self.touched_dirs is None else [e for e in self.dirs if e.path in self.touched_dirs]
        return self.made.deepest_first_with(head) if made and self.made is not None else head

    @property
    def write_bytes(self) -> int:
        if isinstance(self.write, WriteList):
            return self.write.total_size()
        return sum(e.size for e in self.write)


@dataclass
class ApplyResult:
    written_files: int = 0
    written_bytes: int = 0
    unchanged_files: int = 0
    removed: int = 0
    # Directories, symlinks and hard links made (a restore into an empty target is mostly these besides files).
    made_dirs: int = 0
    made_symlinks: int = 0
    made_hardlinks: int = 0
    warnings: list[str] = field(default_factory=list)
    # Only for a dry run: what would be written, removed, made and linked (paths), nothing changed.
    planned: dict[str, list[str]] | None = None
    # Only for a dry run: why the real run would be refused (RefusedError, exit 4), or None.
    refused: str | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _made(plan: ApplyPlan) -> dict[str, int]:
    """:class:`ApplyResult`'s counts of what ``plan`` makes besides files."""
    return {"made_dirs": len(plan.mkdir), "made_symlinks": len(plan.link) - plan.refit_links,
            "made_hardlinks": len(plan.hardlink)}


def _known_to(base: Manifest | ManifestFile | None, paths: list[str]) -> int:
    """How many of ``paths`` the manifest ``base`` holds (0 without one); one row group at a time."""
    if base is None or not paths:
        return 0
    wanted = pa.array([os.fsencode(p) for p in paths], pa.binary())
    found = np.zeros(len(paths), dtype=bool)
    groups = [base.table] if isinstance(base, Manifest) else (base.group(i, ["path"]) for i in range(base.num_groups))
    for t in groups:
        found |= pc.is_in(wanted, value_set=t.column("path").combine_chunks()).to_numpy(zero_copy_only=False)
    return int(found.sum())


class RootRemovalHeld(RefusedError):
    """An apply would remove more of the files its target holds now than ``max_remove_fraction`` allows
    that the snapshot the root is known to hold does not have (counted on the target itself: a wrong volume
    mounted at a standby's root, files written there by something else). Raised after planning, before
    anything changed."""

    def __init__(self, removed: int, files: int, limit: float, what: str, url: str) -> None:
        self.removed, self.files, self.limit = removed, files, limit
        super().__init__(f"{what} would remove {removed:,} of the {files:,} files {url} holds now "
                         f"({removed / files:.1%}, over replication.max_delete_fraction {limit:g}) that are not in "
                         f"the snapshot it is known to hold: another volume mounted there, or files written by "
                         f"something other than drsync?")


@dataclass(frozen=True)
class ForeignTarget:
    """A target that is not the cluster's own data root (a restore somewhere else): what it already holds
    is not the snapshot's to destroy. Replacing an existing file, link or directory the snapshot differs
    from needs ``overwrite``; removing a path the snapshot lacks needs ``delete_extra``. ``flags`` names
    the command's options that allow each, for the refusal."""

    overwrite: bool = False
    delete_extra: bool = False
    flags: tuple[str, str] = ("--overwrite", "--delete-extra")

    def refusal(self, plan: ApplyPlan, wanted: set[str], what: str, url: str,
                done: str = "nothing was changed") -> str | None:
        """Why applying ``plan`` onto this target is refused (None: it is not). ``wanted``: the snapshot's paths;
        ``done``: what the apply did before it planned (an interrupted apply completed)."""
        replaced = [] if self.overwrite else sorted({*plan.replaces, *(p for p in plan.remove if p in wanted)})
        extra = [] if self.delete_extra else sorted(
            [*(p for p in plan.remove if p not in wanted), *plan.retyped_contents])
        # Files it holds alike but for their mode, owner or extended attributes: set back only with overwrite
        # (what is there is kept as it is); counted, and the first few named (a plan may hold a million as rows).
        refit = 0 if self.overwrite else len(plan.fix_meta) + len(plan.refit)
        if not replaced and not extra and not refit:
            return None

        def shown(paths: list[str], total: int | None = None) -> str:
            more = (len(paths) if total is None else total) - 3
            return ", ".join(printable(p) for p in paths[:3]) + (f" and {more} more" if more > 0 else "")

        parts = ([f"{len(replaced)} existing path(s) it would overwrite ({shown(replaced)})"] if replaced else []) + (
            [f"{refit} existing path(s) whose mode, owner, time or extended attributes it would set back "
             f"({shown(sorted(plan.refit)[:3] + [e.path for e in itertools.islice(plan.fix_meta, 3)], refit)})"]
            if refit else []) + (
            [f"{len(extra)} path(s) the snapshot does not have, which it would remove ({shown(extra)})"]
            if extra else [])
        needed = [f for f, need in zip(self.flags, (replaced or refit, extra), strict=True) if need]
        return (f"{what}: {url} is not this cluster's data root and holds {' and '.join(parts)}: {done}; "
                f"rerun with {' '.join(needed)} to replace what is there (--dry-run lists it), or "
                f"restore into an empty directory")


def _within_mode_bits(entries: list[Entry], root: DataRoot) -> list[Entry]:
    """The entries with only the permission bits the root keeps (said once): a mode the root cannot
    hold would differ from the target's at every apply, and be set again every time."""
    extra = 0o7777 & ~root.mode_bits
    dropped = [e.path for e in entries if e.mode & extra]
    if not dropped:
        return entries
    root.warnings.append(f"setuid/setgid bits of {len(dropped)} path(s) not kept: {root.url} holds only "
                         f"{oct(root.mode_bits)} (e.g. {printable(dropped[0])})")
    return [dataclasses.replace(e, mode=e.mode & ~extra) if e.mode & extra else e for e in entries]


def plan_apply(entries: list[Entry], existing: dict[str, LocalEntry], *,
               excluded: Callable[[str], bool] = lambda p: False,
               same_content: Callable[[Entry, LocalEntry], bool] | None = None,
               structure_only: bool = False, compare_owner: bool = False,
               mtime_resolution_ns: int = 1, protected: frozenset[str] = frozenset(),
               compare_xattrs: bool = False, content_changed: frozenset[str] = frozenset(),
               also_touched: Iterable[str] = (), also_passed: Iterable[str] = (),
               keep_uncarried: bool = False, also_links: Callable[[], dict[str, str]] | None = None,
               link_max: Callable[[str], int] | None = None, keep_dir_times: bool = False) -> ApplyPlan:
    """What to do to turn ``existing`` into ``entries``. Pure; no I/O unless ``same_content`` does some.

    ``compare_owner``: the target can set owners, so a differing owner is fixed.
    ``compare_xattrs``: the target keeps extended attributes, so differing ones are fixed.
    ``mtime_resolution_ns``: the coarser precision of the manifest's source and the target.
    ``protected``: paths of drsync's own (a repository or state directory inside the target): they and
    everything below are neither written nor removed, and their parents stay directories.
    ``content_changed``: files whose content differs from what the target is known to hold (see
    :func:`drsync.repository.manifest_diff.content_changed`): written even when size and time match.
    ``also_touched``: directories the commit changes for files planned elsewhere (new files of a
    :class:`~drsync.unchanged.WriteList`): finished, and opened up when needed, as if planned here.
    ``also_passed``: directories of files whose metadata the commit sets, planned elsewhere: opened up
    when their owner may not search them.
    ``keep_uncarried`` (a standby's apply): what no snapshot carries (fifos, sockets, devices, links leading
    outside the root) is left in place where the snapshot has nothing: removed, it could never be restored
    (an ex-primary rejoining keeps its ``shared -> /srv/shared``), and captures do not see it anyway.
    ``also_links``: the symlinks the target holds alike with the snapshot, left out of ``existing`` (a merge's:
    :meth:`drsync.unchanged.Residual.alike_links`), asked for only when a link of ``existing`` climbs with
    ``..`` and may be resolved through them.
    ``link_max(first file, name)``: how many names the group's first file may have for the name to be one of
    them (the root's :meth:`~drsync.dataroot.DataRoot.link_max`; 1: no hard links, 0: another filesystem): a
    name of a hard-link group that the target holds as a file of its own, alike, while the first file has as
    many names as it may, is the copy an earlier commit wrote because no link could be made: left as it is,
    not linked (and failing, or copied) again.
    ``keep_dir_times``: a kept target (a restore without ``--overwrite``): an existing directory that differs
    only in its time, and that the commit changes nothing in, keeps it.
    Raises :class:`UsageError` when the snapshot has a file or link where a protected path's parent is.
    """
    res = max(1, mtime_resolution_ns)
    holders = {a for p in protected for a in _ancestors(p)}

    def is_protected(path: str) -> bool:
        return bool(protected) and (path in protected or any(a in protected for a in _ancestors(path)))

    touched: set[str] = set()
    plan = ApplyPlan()
    wanted: dict[str, Entry] = {}
    for e in entries:
        if excluded(e.path) or (structure_only and e.type == FILE):
            continue
        if is_protected(e.path):
            plan.protected_skipped.append(e.path)
            continue
        if e.path in holders and e.type != DIR:
            raise UsageError(f"the snapshot has a {e.type} at {e.path}, where drsync's own files lie inside the "
                             f"target ({sorted(protected)[0]}); move the repository and state directory out of "
                             f"the data root")
        wanted[e.path] = e
    uncarried: set[str] = set()
    if keep_uncarried:
        uncarried = {p for p, h in existing.items() if h.type == OTHER}
        links = {p: h.target for p, h in existing.items() if h.type == SYMLINK and h.target is not None}
        if also_links is not None and any(".." in t.split("/") for t in links.values()):
            links = {**also_links(), **links}
        uncarried.update(escaping_links(links) if links else ())
    for path, have in existing.items():
        if excluded(path) or (structure_only and have.type == FILE) or is_protected(path):
            continue
        want = wanted.get(path)
        if want is None and path in uncarried:
            continue
        if path in holders and have.type == DIR:
            continue  # holds drsync's own files: kept whatever the snapshot says
        if want is None or want.type != have.type:
            plan.remove.append(path)
    removed = set(plan.remove)
    plan.removes_files = [p for p in removed if p not in wanted and existing[p].type != DIR]
    leaders = {e.hardlink for e in wanted.values() if e.hardlink is not None}
    # How many paths of the target share each multiply-linked inode: more links than that live
    # outside the target, and such a file is replaced, never changed in place.
    inside_links = Counter(h.ino for h in existing.values() if h.type == FILE and h.nlink > 1)
    # And which snapshot groups (by first file; "" for a name in none) the names of each such inode are in:
    # a group's first file whose inode another group's name, or a name in no group, shares too is written anew,
    # as its other names are linked to it (two groups of equal bytes linked into one inode stay apart).
    sharing: dict[int, set[str]] = {}
    for p, h in existing.items():
        if h.type == FILE and h.nlink > 1:
            w = wanted.get(p)
            lead = "" if w is None or w.type != FILE else (w.hardlink or (p if p in leaders else ""))
            sharing.setdefault(h.ino, set()).add(lead)
    rewritten: set[str] = set()
    relinked_meta: set[str] = set()  # links already pointing right whose time or owner the commit fixes
    anchored: dict[str, LocalEntry] = {}  # groups' first names gone, linked to the file another name holds
    members: dict[str, list[str]] = {}

    def holds_alike(e: Entry, h: LocalEntry) -> bool:  # whether the target's file ``h`` at ``e.path`` holds its bytes
        return (h.size == e.size and e.path not in content_changed and h.mtime_ns // res == e.mtime_ns // res
                and (same_content is None or same_content(e, h)))

    def meta_differs(e: Entry, have: LocalEntry) -> bool:
        return have.mode != e.mode or owner_differs(e, have) or (compare_xattrs and have.xattrs != e.xattrs)

    def members_of() -> dict[str, list[str]]:  # the other names of each group, by its first name (made once)
        if not members:
            for p, w in wanted.items():
                if w.hardlink is not None:
                    members.setdefault(w.hardlink, []).append(p)
        return members

    def owner_differs(e: Entry, have: LocalEntry) -> bool:
        return compare_owner and e.uid != UNKNOWN_ID and (have.uid, have.gid) != (e.uid, e.gid)

    # Removing a directory removes what is inside it: list only the top-most paths.
    plan.remove = [p for p in plan.remove if not any(a in removed for a in _ancestors(p))]
    # What a directory the snapshot has a file or link at holds goes with it: paths the snapshot lacks, listed
    # (top-most) and counted as removed, which a kept target allows only as it allows removing any.
    # Such a path's removed ancestors are all the snapshot's (the top-most of them is the retyped directory).
    if any(p in wanted and existing[p].type == DIR for p in plan.remove):
        plan.retyped_contents = sorted(q for q in removed if q not in wanted and (
            ups := [a for a in _ancestors(q) if a in removed]) and all(a in wanted for a in ups))
    for path, e in wanted.items():
        have = existing.get(path)
        if have is not None and path in removed:
            have = None
        xattrs_differ = compare_xattrs and have is not None and have.xattrs != e.xattrs
        if e.type == DIR:
            plan.dirs.append(e)
            if have is None:
                plan.mkdir.append(e)
                touched.add(path)
            elif have.mode != e.mode or xattrs_differ or owner_differs(e, have):
                touched.add(path)
                plan.refit.append(path)
            elif have.mtime_ns // res != e.mtime_ns // res and not keep_dir_times:
                touched.add(path)
        elif e.type == SYMLINK:
            if have is None or os.fsdecode(have.target or "") != e.target:
                plan.link.append(e)
            elif have.mtime_ns // res != e.mtime_ns // res or owner_differs(e, have):
                plan.link.append(e)  # the commit keeps a link that points right and sets its time and owner
                relinked_meta.add(path)
                plan.refit.append(path)
                plan.refit_links += 1
        elif e.hardlink is not None and e.hardlink in wanted:
            continue  # decided below, once its group's first file is
        else:
            # A file that shares its inode with paths the snapshot does not link it to is written anew.
            stray_link = have is not None and have.nlink > 1 and (
                path not in leaders or have.nlink > inside_links[have.ino] or sharing.get(have.ino) != {path})
            if have is not None and not stray_link and holds_alike(e, have):
                plan.unchanged += 1
                if meta_differs(e, have):
                    plan.fix_meta.append(e)
            elif have is None and path in leaders and (anchor := _anchor(
                    e, members_of(), existing, removed, inside_links, sharing,
                    lambda m, h: holds_alike(wanted[m], h))):
                # The group's first name is gone, its other names hold the file: the name is linked to them again
                # (breaker s58b: the file was written anew and every other name relinked, "overwritten").
                anchored[path] = have = existing[anchor]
                plan.hardlink.append(dataclasses.replace(e, hardlink=anchor))
                if meta_differs(e, have):
                    plan.fix_meta.append(wanted[anchor])  # the name that holds the file now: what is set back
            else:
                plan.write.append(e)
                rewritten.add(path)

    def copied(e: Entry, have: LocalEntry, lead: LocalEntry) -> bool:
        """Whether the name ``have`` of a group is held alike as a file of its own (the copy a commit wrote
        where no link could be made), its group's first file ``lead`` being there."""
        return have.nlink == 1 and lead.type == FILE and holds_alike(e, have)

    _plan_members(plan, wanted, existing, anchored, removed, rewritten, copied, meta_differs, link_max)
    plan.replaces = [e.path for e in (*plan.write, *plan.hardlink, *plan.link)
                     if e.path in existing and e.path not in removed and e.path not in relinked_meta]
    touched.update(p.rpartition("/")[0] for p in plan.remove)
    touched.update(e.path.rpartition("/")[0] for e in (*plan.write, *plan.link, *plan.mkdir, *plan.hardlink))
    touched.update(also_touched)
    plan.root_touched = "" in touched
    touched.discard("")
    # A directory we change, or pass through to reach one, but may not write into or search is opened
    # up for the commit and finished after it.
    # So is one passed through to set a file's metadata, or to link to a group's first file.
    passed = {*also_passed, *(e.path.rpartition("/")[0] for e in plan.fix_meta),
              *((e.hardlink or "").rpartition("/")[0] for e in plan.hardlink)}
    passed.discard("")
    plan.passed_dirs = passed
    reach = touched | passed
    for p in touched | passed:
        reach.update(_ancestors(p))
    plan.unlock = sorted(p for p in reach if (h := existing.get(p)) is not None and h.type == DIR
                         and p not in removed and (h.mode & 0o700) != 0o700)
    touched.update(plan.unlock)
    plan.touched_dirs = touched
    # Remove children before parents; create parents before children.
    plan.remove.sort(key=lambda p: p.count("/"), reverse=True)
    plan.mkdir.sort(key=lambda e: e.path)
    plan.dirs.sort(key=lambda e: e.path.count("/"), reverse=True)
    return plan


def _anchor(e: Entry, members: dict[str, list[str]], existing: dict[str, LocalEntry], removed: set[str],
            inside_links: Counter[int], sharing: dict[int, set[str]],
            alike: Callable[[str, LocalEntry], bool]) -> str | None:
    """The other name of ``e``'s group (``e`` its first file, gone from the target) whose file the name ``e`` can
    be linked to again: a file alike to the snapshot's at that name (``alike(name, file)``: its content checked
    where the apply checks that name's), linked to no name outside the target or of another group; of several,
    the one of most names. None: there is none, and the file is written."""
    best: LocalEntry | None = None
    for m in members.get(e.path, ()):
        h = existing.get(m)
        if h is None or m in removed or h.type != FILE or not alike(m, h):
            continue
        if h.nlink > 1 and (h.nlink > inside_links[h.ino] or sharing.get(h.ino) != {e.path}):
            continue
        if best is None or h.nlink > best.nlink:
            best = h
    return best.path if best is not None else None


def _plan_members(plan: ApplyPlan, wanted: dict[str, Entry], existing: dict[str, LocalEntry],
                  anchored: dict[str, LocalEntry], removed: set[str], rewritten: set[str],
                  copied: Callable[[Entry, LocalEntry, LocalEntry], bool],
                  meta_differs: Callable[[Entry, LocalEntry], bool],
                  link_max: Callable[[str, str], int] | None) -> None:
    """Decide the names of hard-link groups but their first files (``plan.hardlink``, ``unchanged``, ``fix_meta``).

    A name linked to its first file already is unchanged. One the target holds as a copy of it (``copied``:
    what a commit writes where no link can be made) stays a copy when no link can be made now either: the
    first file on another filesystem (``link_max`` 0), or as many names as it may have (``link_max``), links
    planned for the group's other names counted first; where there is room, as many copies as fit are linked
    (in the manifest's order) and the others kept. Every other name is linked. ``anchored``: the groups whose
    first name, gone, is linked to the file another name holds (that file, by first name): a link planned too."""
    copies: list[tuple[Entry, LocalEntry, LocalEntry]] = []
    needs: Counter[str] = Counter(list(anchored))  # links planned to each first file
    for path, e in wanted.items():
        if e.type != FILE or e.hardlink is None or e.hardlink not in wanted:
            continue
        have = existing.get(path)
        lead = anchored.get(e.hardlink) or (None if e.hardlink in removed else existing.get(e.hardlink))
        if have is None or path in removed or lead is None or e.hardlink in rewritten or have.type != FILE:
            pass
        elif have is lead or (have.ino and have.ino == lead.ino and have.nlink > 1 and lead.nlink > 1):
            plan.unchanged += 1  # (one inode number on two filesystems is two files: both have other names)
            continue
        elif link_max is not None and copied(e, have, lead):
            copies.append((e, have, lead))
            continue
        plan.hardlink.append(e)
        needs[e.hardlink] += 1
    room: dict[str, int] = {}
    for e, have, lead in copies:  # in the manifest's order
        lead_path = e.hardlink or ""
        most = link_max(lead_path, e.path) if link_max is not None else 0
        if most and lead_path not in room:
            room[lead_path] = most - lead.nlink - needs[lead_path]
        if most and room[lead_path] > 0:
            room[lead_path] -= 1
            plan.hardlink.append(e)
        else:
            plan.unchanged += 1
            if meta_differs(e, have):
                plan.fix_meta.append(e)


def _repository_refusal(root: DataRoot, plan: ApplyPlan, protected: frozenset[str], what: str,
                        done: str = "nothing was changed") -> str | None:
    """Why the plan is refused for a drsync repository in the target (not a protected one) that it would
    write into or remove; None when it touches none. Looks only where the plan changes something: the
    directories it touches (and their ancestors) and the subtrees it removes."""
    find = getattr(root, "repositories_at", None)
    if find is None:
        return None
    dirs = set(plan.touched_dirs or ()) | {e.path.rpartition("/")[0] for e in plan.fix_meta}
    check = set(dirs)
    for d in dirs:
        check.update(_ancestors(d))

    def mine(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in protected)

    found = [r for r in find(sorted(check), plan.remove) if not mine(r)]
    if not found:
        return None
    return (f"{what}: {root.url} holds a drsync repository at {printable(found[0])}, which this restore would "
            f"write into or remove; a restore never changes a repository: move it out of the target or restore "
            f"elsewhere; {done}")


def _planned(excluded: Callable[[str], bool], protected: frozenset[str],
             changed: frozenset[str]) -> Callable[[str], bool]:
    """Which paths :func:`plan_apply` must see whatever they compare like: excluded, protected (or holding
    protected paths), or known to have changed content."""
    holders = {a for p in protected for a in _ancestors(p)}

    def planned(path: str) -> bool:
        return (path in changed or excluded(path) or path in holders
                or (bool(protected) and (path in protected or any(a in protected for a in _ancestors(path)))))
    return planned


def _to_plan(manifest: Manifest, root: DataRoot, *, dry_run: bool, merge: bool, drop_alike: bool, resolution: int,
             planned: Callable[[str], bool] | None, identity: bool = False,
             ) -> tuple[list[Entry], dict[str, LocalEntry], int, Residual | None]:
    """The manifest's entries and the target's for :func:`plan_apply`, and how many plain files are
    already alike and left out of both, and the merge's residue when there was one (its new plain files
    are planned as rows: :func:`drsync.unchanged.split_unchanged`; a local root is merged in path order,
    so a million unchanged or new files are never held as objects)."""
    missing = dry_run and root.missing()
    walk = getattr(root, "walk_existing", None)
    if merge and walk is not None:
        walking = iter(()) if missing else walk()
        try:
            rest = split_unchanged(manifest, walking, resolution_ns=resolution, compare_owner=root.owners_settable(),
                                   compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits, planned=planned,
                                   drop_alike=drop_alike, identity=identity)
        finally:
            close = getattr(walking, "close", None)
            if close is not None:
                close()  # a walk left early (a manifest out of order) sets back what it opened up now
        allocators.give_back()  # what the merge's windows freed, before the plan is built on its residue
        if rest is not None:
            return manifest.entries_at(rest.rows, light=True), rest.existing, rest.unchanged, rest
    # Planned on light entries (no chunk lists); the files to write get their chunk lists a staging
    # batch at a time (:meth:`Manifest.entries_at`).
    return list(manifest.entries(light=True)), {} if missing else root.existing(), 0, None


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def comparison_resolution(manifest: Manifest, root: DataRoot) -> int:
    """The precision at which the manifest's times and the root's can be compared."""
    return max(root.mtime_resolution_ns, _manifest_resolution(manifest))


def _manifest_resolution(manifest: Manifest) -> int:
    """1 ms when every time in the manifest is whole milliseconds (captured on HDFS), else 1 ns."""
    col = manifest.table.column("mtime_nsec")
    if len(col) and pc.all(pc.equal(pc.cast(pc.remainder(col, 1_000_000), "int64"), 0)).as_py():
        return 1_000_000
    return 1


def apply_manifest(manifest: Manifest, source: ChunkSource, target: str | DataRoot, *, what: str = "snapshot",
                   exclude: tuple[str, ...] = (), checksum: bool = False, structure_only: bool = False,
                   progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None, workers: int = 4,
                   journal: str | None = None, on_committed: Callable[[], None] | None = None,
                   protect: tuple[str, ...] = (), dry_run: bool = False,
                   foreign: ForeignTarget | None = None, external: ExternalStager | None = None,
                   cancel: Callable[[], bool] | None = None, base: Manifest | ManifestFile | None = None,
                   keep_repositories: bool = False, max_remove_fraction: float | None = None,
                   keep_uncarried: bool = False, captured_root: bool = False, replan: bool = False,
                   root_held: bool = False, locked: bool = True) -> ApplyResult:
    """Make ``target`` equal ``manifest``: whole and verified, or unchanged with an error.

    ``dry_run``: plan only and report it in ``ApplyResult.planned`` (and in ``ApplyResult.refused`` why
    the real run would be refused); the target is not touched.
    ``foreign``: when set, the target is not the cluster's own data root: overwriting or removing what it
    holds is refused (RefusedError, nothing changed) unless ``foreign`` allows it (:class:`ForeignTarget`).

    ``journal``: a local file for the commit's journal (the standby keeps it in its state
    directory); without one the root keeps it in its staging area, so that an interrupted restore is
    completed by the next apply or restore onto the same target. ``protect``: paths (local paths or
    URLs) of drsync's own files that may lie inside the target; they are left alone.
    ``external``: stages files whose bytes are not in the repository (a snapshot captured for
    DistCp); without one such a snapshot is refused. ``cancel``: asked between staging batches; when
    it answers true the apply stops before its journal (OperationFailed, target unchanged).
    ``base``: the manifest the target is known to hold (a standby's applied snapshot): a file whose
    content differs from it is written even when its size and time match (``checksum`` instead reads
    every file whose size and time match, for a target nobody vouches for).
    ``max_remove_fraction`` (a standby's apply: replication.max_delete_fraction): :class:`RootRemovalHeld`
    when the plan would remove more than that share of the files the target holds, counting only files
    ``base`` does not have (those it has are the deletion guard's, which allows for renames).
    ``keep_uncarried`` (a standby's apply): see :func:`plan_apply`.
    ``captured_root``: the target is the tree ``manifest`` was captured from (rolling a cluster's own data
    root back): a file whose size and time match is taken as unchanged only as the very version captured
    (its inode and status-change time too); the others are checked by content.
    ``replan`` (restores): an earlier apply onto the target cut short whose journal no replay completes (the
    target was changed by hand since) is dropped, with a warning, and this apply plans against the target
    as it is; otherwise that is an error (a standby's record of what its root holds must not go stale).
    ``keep_repositories`` (restores): a drsync repository found in the target where the plan would write
    into it or remove it (not one named in ``protect``, which is left alone) refuses the apply
    (RefusedError, nothing changed): a restore never destroys a repository, even one it does not know.
    One apply at a time onto a target, or anything inside or around it (:class:`drsync.flocks.ApplyLock`,
    taken before the target is looked at and held until the apply is over): another one refuses this one
    (ApplyBusy, exit 1, nothing changed), and a dry run says so in its warnings. ``root_held``: the caller
    holds the target's directory flock for its lifetime (an agent's own data root): only the lock file is taken.
    ``locked`` False: no apply lock at all, for a fresh directory of the caller's own that nothing else names (a
    drill's trial restore in its scratch space, which may lie in an agent's repository or data root).
    Raises IntegrityError (missing or damaged chunks, bad manifest), UsageError (a target that
    cannot hold the snapshot: mount points in the way, protected paths), OperationFailed (I/O).
    """
    if not manifest.validated:  # a lean manifest was validated as a file before its load (Repository.load_manifest)
        validate(manifest, what)
    allocators.give_back()  # what validation freed inside glibc's heaps, before the chunk check and planning
    root = open_data_root(target) if isinstance(target, str) else target
    with _applying(root, what, dry_run=dry_run, root_held=root_held, locked=locked) as (lock, busy), \
            contextlib.ExitStack() as claimed:
        # Every chunk must be present before anything on the target changes.
        outside = np.flatnonzero(external_mask(manifest.table))
        if len(outside) and external is None and not structure_only:
            first = os.fsdecode(manifest.table.column("path")[int(outside[0])].as_py())
            raise IntegrityError(f"{what}: {len(outside)} file(s) (e.g. {printable(first)}) were captured for "
                                 f"DistCp (replication.engine = \"distcp\"): their bytes are in an HDFS snapshot, not "
                                 f"in the repository; nothing was changed")
        for p in protect:
            if root.lies_within(p):
                raise UsageError(f"target {root.url} lies inside drsync's own {p}; restore to a directory outside it")
        # A target that does not exist yet gets every file: its chunks are checked before it (and any missing
        # parent of it) is made. Otherwise after planning, only what the apply writes.
        fresh = root.missing()
        # The root's own metadata before this apply moves it: what a kept target keeps, and what an apply that
        # opened the root up gives back when it ends without giving the root its metadata (RootOpening).
        had_top = None if fresh else root.root_entry()
        opening = RootOpening(had_top)
        # drsync stages under a reserved name, emptying it first: what else is there goes only as the restore's
        # other extras do (--delete-extra), never unasked.
        stray = None if fresh else root.foreign_staging()
        if stray is not None and not (foreign is not None and foreign.delete_extra):
            how = (f"rerun with {foreign.flags[1]} to remove it, or move it out of the target" if foreign is not None
                   else "move it out of the root and run again")
            raise RefusedError(f"{what}: {printable(stray)} holds what drsync did not put there, and drsync stages its "
                               f"apply under that name (emptying it first); {how}; nothing was changed")
        whole: ChunkSource | None = None  # a reader of every chunk, when they are few enough to be located at once
        if fresh and not structure_only:
            whole = check_rows(manifest, source, what,
                               _rows_not_excluded(manifest, compile_globs(exclude) if exclude else None))
        pending = False
        abandoned: str | None = None  # an interrupted apply: None, none found; "": completed; else why dropped
        if dry_run:
            created_target, log_ = False, None
            # An interrupted apply is completed by the real run before it plans: this plan is against the
            # target as it is now, so it says so.
            # A staging area drsync did not make holds no apply of drsync's (only its own journal does).
            found = None if root.missing() or not (journal is not None or stray is None) else _interrupted(
                root, _journal_for(root, journal))
            pending = found is not None
            if found is not None and found[1].root is not None:  # what its completion gives the root
                had_top = found[1].root
        else:
            created_target = root.prepare_target()
            # A root this user owns but may not write (restored read-only) is opened up for the apply; its mode
            # is set back when it ends without giving the root its metadata (refused, failed, none to give).
            opening.mode = root.open_root()
            claimed.callback(lambda: close_up(root, opening))
            if lock is not None:  # the target made just now is flocked too (the lock file held it till now)
                lock.hold_directory()
                # An HDFS root is held against applies from other hosts too (drsync.dataroot.hdfs_lease), before
                # an interrupted apply's journal is looked at: it may be another host's, in flight. A root made
                # just now stays when that refuses this apply: the other apply may have made it too.
                claimed.enter_context(root.claim(what))
            log_ = _journal_for(root, journal)
            # An earlier apply onto this target that was cut short is completed (or undone) first; a staging area
            # drsync did not make (removed below, as --delete-extra asked) holds none: its records are not read.
            if journal is not None or stray is None:
                if stray is None:
                    root.settle()
                abandoned = _finish_interrupted(root, log_, replan=replan, in_root=journal is None)
                if abandoned == "":  # the root as the completion left it (opened up again if it set it read-only,
                    # which records its mode in the staging area made anew: read first, the time that moves too)
                    had_top = root.root_entry()
                    if (mode := root.open_root()) is not None:
                        opening.mode = mode
                    if had_top is not None and opening.mode is not None:
                        had_top = dataclasses.replace(had_top, mode=opening.mode)
                    opening.entry = had_top
        protected = frozenset(r for r in (root.relative_inside(p) for p in protect) if r)
        # Times compare at the precision both sides keep: a manifest captured on HDFS has whole
        # milliseconds, and so does anything applied to HDFS.
        resolution = comparison_resolution(manifest, root)
        excluded = compile_globs(exclude)
        changed = content_changed(base, manifest) if base is not None else frozenset()
        # Rolling the cluster's own data root back (no other target, no snapshot it is known to hold): a file is
        # taken as unchanged only as the version the capture saw (its inode and status-change time too), as the
        # capture itself reuses a file unread; one whose size and time match but not those (rewritten in place
        # and its time put back, as ransomware does) has its content checked, as --checksum would.
        identity = captured_root and base is None and not checksum
        narrowed = any(g.strip().lstrip("/") for g in exclude) or protected or changed
        allocators.give_back()  # what the chunk check freed, before the merge holds its windows
        entries, existing, unchanged, rest = _to_plan(manifest, root, dry_run=dry_run, merge=not structure_only,
                                                      drop_alike=not checksum, resolution=resolution,
                                                      planned=_planned(excluded, protected, changed) if narrowed
                                                      else None, identity=identity)
        suspects = rest.suspects if rest is not None else set()
        entries = _within_mode_bits(entries, root)
        same_content = _with_chunks(manifest, root.same_content) if checksum or suspects else None
        if same_content is not None and not checksum:  # only the suspects are read
            by_content = same_content
            same_content = lambda e, have: e.path not in suspects or by_content(e, have)  # noqa: E731
        plan = plan_apply(entries, existing, excluded=excluded, same_content=same_content,
                          structure_only=structure_only,
                          compare_owner=root.owners_settable(), mtime_resolution_ns=resolution, protected=protected,
                          compare_xattrs=root.supports_xattrs, content_changed=changed,
                          also_touched=rest.new_parents if rest is not None else (),
                          also_passed=rest.meta_parents if rest is not None else (), keep_uncarried=keep_uncarried,
                          also_links=(lambda: rest.alike_links(manifest)) if rest is not None else None,
                          link_max=root.link_max, keep_dir_times=foreign is not None and not foreign.overwrite)
        if rest is not None:
            rest.fold(plan, manifest, later=getattr(root, "mount_points", tuple))
        # The root directory's own metadata, set last (docs/FORMAT.md, drsync.root), against the root as the
        # user left it (an interrupted apply completed: as that left it), not as this apply opened it up. A kept
        # target's own root keeps its mode, owner and attributes; an empty directory is a new one.
        keep_top = foreign is not None and not foreign.overwrite and not fresh and holds_data(root)
        top, top_differs = plan_root(root_of(manifest, what), had_top, keep=keep_top,
                                     touched=plan.root_touched, compare_owner=root.owners_settable(),
                                     compare_xattrs=root.supports_xattrs, mode_bits=root.mode_bits)
        if top_differs and keep_top:
            plan.refit.append(".")  # counted and named in the refusal as the others
        plan.root = top  # journaled: a replay gives it too
        try:
            # What the root cannot do is refused, and what it does otherwise is planned (a hard link across
            # two filesystems mounted in the target becomes a copy to write), before the chunks are located
            # and before a dry run counts: both see the writes the commit makes.
            if not (dry_run and root.missing()):  # a dry run onto a target not made yet: nothing there to check
                root.check_plan(plan)
            # The chunks the apply writes are located a part at a time at scale (a first sync): drsync.apply_chunks.
            parts = None if structure_only else PartReaders(manifest, source, what, plan.write, whole=whole)
            if parts is not None and not fresh:
                # Every chunk of what the apply writes is present before anything on the target changes (an
                # interrupted apply completed above wrote its own staged files); a restore onto a target that
                # holds the snapshot already reads, and so needs, none.
                parts.check()
        except BaseException:
            if created_target:
                root.remove_root()
            raise
        if max_remove_fraction is not None and not dry_run:
            # Removing files the root is known to hold (``base``) is judged by the deletion guard before the
            # apply, renames allowed for; what else the root holds is judged here, on the root itself.
            root_files = unchanged + sum(1 for h in existing.values() if h.type != DIR)
            if len(plan.removes_files) > max_remove_fraction * root_files:
                strays = len(plan.removes_files) - _known_to(base, plan.removes_files)
                if strays > max_remove_fraction * root_files:
                    raise RootRemovalHeld(strays, root_files, max_remove_fraction, what, root.url)
        plan.removes_files = []
        # A refusal after an interrupted apply was completed says so: that did change the target.
        done = "nothing was changed" if abandoned is None else (
            "nothing was changed but for completing the apply cut short before" if not abandoned
            else "nothing was changed but for dropping the apply cut short before")
        refused = foreign.refusal(plan, {e.path for e in entries}, what, root.url, done) if foreign else None
        if keep_repositories and not refused:
            refused = _repository_refusal(root, plan, protected, what, done)
        if refused and not dry_run:
            if created_target:
                root.remove_root()
            raise RefusedError(refused)
        if dry_run:
            # A path the snapshot has in another form (a file where it holds a directory) is replaced, as the
            # refusal counts it: listed under overwrite, not remove.
            wanted = {e.path for e in entries}
            replaced_types = [p for p in plan.remove if p in wanted]
            strays = [root.relative_inside(stray) or STAGING] if stray is not None else []
            # Symlinks that point right and get their time or owner only are listed with the metadata fixes.
            refit = set(plan.refit) | ({"."} if top_differs else set())
            links = [e.path for e in plan.link if e.path not in refit]
            dry = ApplyResult(written_files=len(plan.write), written_bytes=plan.write_bytes,
                              unchanged_files=plan.unchanged, **_made(plan),
                              removed=len(plan.remove) - len(replaced_types) + len(strays)
                              + len(plan.retyped_contents),
                              planned={"write": [e.path for e in plan.write],
                                       "remove": [p for p in plan.remove if p not in wanted] + strays
                                       + plan.retyped_contents,
                                       "metadata": sorted([*refit, *(e.path for e in plan.fix_meta)]),
                                       "mkdir": [e.path for e in plan.mkdir], "link": links,
                                       "hardlink": [e.path for e in plan.hardlink],
                                       "overwrite": sorted({*plan.replaces, *replaced_types})}, refused=refused)
            if busy:
                dry.warnings.append(f"{busy}: this plan reads the target while it changes, and the real run is "
                                    f"refused until that apply is over")
            if pending:
                dry.warnings.append(f"{root.url} holds an interrupted apply: the real run completes it first and then "
                                    f"plans again, so what it writes and removes can differ from this list; run the "
                                    f"restore (or any restore onto this target) to complete it, then --dry-run again")
            return dry
        assert log_ is not None
        skipped_links = []
        if plan.link and not root.supports_symlinks:
            skipped_links, plan.link = plan.link, []
        if on_total:
            on_total(plan.write_bytes)

        staged: dict[str, str] = {}
        allocators.give_back()  # what planning freed (at a million files, scans and merges) is not kept resident
        try:
            root.reset_staging(plan)

            def stage(batch: list[tuple[int, Entry]]) -> None:
                if cancel is not None and cancel():
                    raise OperationFailed(f"{what}: apply stopped before anything was committed (cancelled)")
                full = _full(manifest, batch)
                # A batch lies in one part of the write list (batches are made a part at a time): one reader.
                first = parts.reader(batch[0][0]) if parts is not None else source
                for n, e, data in _prefetched(full, first) if _small(batch) else (
                        (n, e, None) for n, e in full):
                    reader = parts.reader(n) if parts is not None else source
                    for attempt in range(STAGE_ATTEMPTS):
                        try:
                            name = root.write_staged(n, e, _chunk_data(e, reader, what, progress) if data is None
                                                     else _counted(data, progress))
                            if name != root.staged_name(n, e):
                                staged[e.path] = name
                            break
                        except OperationFailed as err:
                            # A streamed body cannot be sent again by the storage (safe mode entered, a
                            # namenode failover while a big file streams): stage the file again from the start.
                            if not getattr(err, "retryable", False) or attempt + 1 == STAGE_ATTEMPTS:
                                raise
                            log.warning("staging %s failed (%s); writing it again", e.path, err)

            if external is not None:
                staged.update(external.stage(root, _full(manifest, [(n, e) for n, e in enumerate(plan.write)
                                                                    if e.external]), progress))
            numbered = ((n, e) for n, e in enumerate(plan.write) if external is None or not e.external)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drsync-apply") as pool, \
                    small_files_pool(root.small_file_threads, workers, "drsync-apply-small") as small:
                small = small or pool
                # A window of batches at a time: the pool never holds the whole list.
                window = workers * 8
                # A part of the write list at a time (its chunks located, the other parts' not held).
                for items in parts.split(numbered) if parts is not None else [numbered]:
                    batches = _batches(items)
                    while part := list(itertools.islice(batches, window)):
                        allocators.give_back()
                        if parts is not None:  # positions ascend in each batch, small files' and others' apart
                            parts.cover(min(b[0][0] for b in part), max(b[-1][0] for b in part))
                        # Batches of small files go to the root's small-file threads (one on a local filesystem,
                        # whose creations in the staging directory serialise), the others to the pool, at once.
                        few = [b for b in part if _small(b)]
                        many = [b for b in part if not _small(b)]
                        list(itertools.chain(pool.map(stage, many), small.map(stage, few)))
            if cancel is not None and cancel():
                raise OperationFailed(f"{what}: apply stopped before anything was committed (cancelled)")
            root.flush()
            _fault_apply_delay()
            faults.pause("apply-staged")  # tests: staged and flushed, the apply lock held, no journal yet
            # Still this apply's root (an HDFS root's lease not taken over while it was held up)?
            root.verify_claim(what)
            allocators.give_back()  # what staging freed, before the journal reads the plan's columns again
            # From here on the apply only moves forward: a restart replays the journal.
            log_.save(_plan_json(plan, staged))
        except ApplyBusy:
            raise  # another apply holds the root now: its staging area, its target, nothing of ours to undo
        except BaseException:
            # Nothing was committed: leave the target as it was (including not existing at all).
            root.drop_staging()
            if created_target:
                root.remove_root()
            raise

        # Removed: paths the snapshot does not have (a path it has in another type is replaced, and counted
        # where it is written), as the dry run and the refusal count them.
        wanted_types = {e.path for e in entries}
        result = ApplyResult(written_files=len(plan.write), written_bytes=plan.write_bytes,
                             unchanged_files=plan.unchanged, **_made(plan),
                             removed=sum(1 for p in plan.remove if p not in wanted_types) + (stray is not None)
                             + len(plan.retyped_contents))
        if abandoned:
            result.warnings.append(abandoned)
        elif abandoned == "":  # what this run changed besides its own plan: said, as a refusal says it
            result.warnings.append(f"{root.url} held an apply cut short before ({what} or another): it was "
                                   f"completed first")
        if skipped_links:
            result.warnings.append(f"{len(skipped_links)} symlink(s) not made: {root.url} cannot hold symlinks "
                                   f"(e.g. {skipped_links[0].path})")
        if plan.protected_skipped:
            result.warnings.append(f"{len(plan.protected_skipped)} path(s) of the snapshot left alone because drsync's "
                                   f"own files are there (e.g. {plan.protected_skipped[0]})")
        allocators.give_back()
        faults.pause("apply-commit")  # tests: the journal written, nothing committed yet
        root.commit(plan, staged)
        copies = getattr(root, "link_copies", 0)  # names written as files of their own: files, not links
        result.made_hardlinks -= copies
        result.written_files += copies
        result.written_bytes += getattr(root, "link_copy_bytes", 0)
        result.warnings.extend(root.warnings)
        notes = _close(root, log_, on_committed, top=plan.root, in_root=journal is None)
        result.warnings.extend(notes)
        opening.done = plan.root is not None and not notes
        return result


@contextlib.contextmanager
def _applying(root: DataRoot, what: str, *, dry_run: bool, root_held: bool, locked: bool = True
              ) -> Iterator[tuple[ApplyLock | None, str | None]]:
    """The apply lock on ``root`` for the apply's duration: (lock, None). A dry run takes none: (None, None)
    when the real run would find it free, (None, why not) when another apply holds it."""
    if dry_run or not locked:
        yield None, (ApplyLock.probe(root.url) or root.claimant()) if dry_run and locked else None
        return
    try:
        lock = ApplyLock(root.url, what, directory=not root_held)
    except ApplyBusy as e:
        log.warning("%s", e)
        raise
    try:
        yield lock, None
    finally:
        lock.release()


FAULT_APPLY_DELAY_ENV = "DRSYNC_FAULT_APPLY_DELAY_S"


def _fault_apply_delay() -> None:
    """Test-only fault injection: with ``$DRSYNC_FAULT_APPLY_DELAY_S`` set to a number of seconds, every
    apply waits that long after staging, before it commits (a slow apply, e.g. a huge snapshot, made
    quickly). Never set it in production; unset or empty, nothing happens."""
    raw = os.environ.get(FAULT_APPLY_DELAY_ENV, "")
    if raw:
        time.sleep(float(raw))


class Journal(Protocol):
    """Where a commit's plan is kept until it is done: written durably and atomically (``data``: the
    bytes, or pieces of them written one after the other)."""

    def load(self) -> bytes | None: ...

    def save(self, data: bytes | Iterable[bytes]) -> None: ...

    def remove(self) -> None: ...


class FileJournal:
    """A journal in a local file (the standby's state directory, or a local root's staging area)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def save(self, data: bytes | Iterable[bytes]) -> None:
        fsutil.atomic_write(self.path, data, durable=True)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsutil.fsync_dir(os.path.dirname(self.path) or ".")


def _journal_for(root: DataRoot, journal: str | None) -> Journal:
    return FileJournal(journal) if journal else root.journal()


def _close(root: DataRoot, log_: Journal, on_committed: Callable[[], None] | None, *, done: bool = False,
           top: Entry | None = None, in_root: bool = True) -> list[str]:
    """After the commit: durable, sealed, marked done, reported, then the staging area goes, the root directory
    gets ``top``'s metadata, and the journal goes: a crash before that replays the close, root included. A
    journal in the root's staging area (``in_root``) moves the root's time as it goes (and, for a user other
    than root, needs a root it may write): the time, and a mode without owner write, are given again after
    it. Returns what could not be set. ``done``: the journal says so already (a replay): the seal it recorded
    must not be taken again."""
    if not done:
        root.flush()
        root.seal()
        log_.save(json.dumps({"phase": "done", "root": _entry_json(top) if top is not None else None}).encode())
    if on_committed:
        on_committed()  # before the journal goes: a crash here replays the close, then this again
    root.drop_staging()
    notes = []
    if top is not None:
        notes = set_root(root, top, writable=in_root and os.geteuid() != 0 and (top.mode & 0o300) != 0o300)
    log_.remove()
    root.drop_staging()  # the in-root journal's directory, now empty
    if in_root and top is not None:
        notes = set_root(root, top)
    return notes


def _interrupted(root: DataRoot, log_: Journal) -> tuple[bool, ApplyPlan, dict[str, str]] | None:
    """The journal of an apply cut short: (done, its plan, its staged files), or None when there is none.
    IntegrityError when it cannot be read as one (written atomically: a damaged one is not ours to guess at)."""
    raw = log_.load()
    if raw is None:
        return None
    try:
        doc = documents.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        done = doc.get("phase", "commit") == "done"
        plan, staged = (ApplyPlan(), {}) if done else _plan_from_json(doc)
        if doc.get("root") is not None:  # journals of earlier versions have none
            plan.root = _entry_from_json(doc["root"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"apply journal of {root.url} is damaged; restore the target from a snapshot "
                             f"into an empty directory") from None
    return done, plan, staged


def _finish_interrupted(root: DataRoot, log_: Journal, *, replan: bool = False, in_root: bool = True) -> str | None:
    """Complete the apply whose journal ``log_`` holds, if any. Returns None (no journal), "" (completed), or,
    with ``replan``, why it was dropped instead: its commit met a target changed since the crash (a
    directory it writes into removed by hand, the trash it marks its steps with emptied), which no replay
    completes; the caller then plans against the target as it is (a restore's plan covers every path, so
    the result is whole all the same). Without ``replan`` that error is raised."""
    found = _interrupted(root, log_)
    if found is None:
        return None
    done, plan, staged = found
    if not done:
        try:
            root.commit(plan, staged)
        except (OperationFailed, OSError) as e:
            if not replan:
                raise
            why = (f"the apply cut short on {root.url} could not be completed ({one_line(str(e))}): the target was "
                   f"changed since; it was dropped, and this apply planned against the target as it is")
            log.warning("%s", why)
            _drop(root, log_)
            return why
    _close(root, log_, None, done=done, top=plan.root, in_root=in_root)
    return ""


def _rows_not_excluded(manifest: Manifest, excluded: Callable[[str], bool] | None) -> np.ndarray:
    """Every manifest row, or with ``exclude`` patterns those whose path they leave in (a row group's
    paths decoded at a time)."""
    if excluded is None:
        return np.arange(len(manifest), dtype=np.int64)
    keep: list[np.ndarray] = []
    start = 0
    for t in column_groups(manifest, ["path"]):
        paths = t.column("path").to_pylist()
        keep.append(start + np.flatnonzero([not excluded(decode_name(p) or "") for p in paths]))
        start += len(paths)
    return np.concatenate(keep) if keep else np.empty(0, np.int64)


def _full(manifest: Manifest, items: list[tuple[int, Entry]]) -> list[tuple[int, Entry]]:
    """``items`` with light entries (planning's) replaced by the manifest's full ones (chunk lists),
    keeping what planning changed (mode bits)."""
    rows = [e.row for _, e in items if e.row >= 0]
    if not rows:
        return items
    heavy = manifest.columns_at(rows, ["chunks", "chunk_sizes", "content"])
    full = zip(*(heavy.column(c).to_pylist() for c in ("chunks", "chunk_sizes", "content")), strict=True)
    return [(n, e.filled(*next(full)) if e.row >= 0 else e) for n, e in items]


def _with_chunks(manifest: Manifest, same: Callable[[Entry, LocalEntry], bool]) -> Callable[[Entry, LocalEntry], bool]:
    """``same`` (a root's content check) for light entries: each gets its chunk list first, read a window
    of rows at a time (planning asks in manifest order)."""
    size = 4096
    start, rows = -1, []

    def check(e: Entry, have: LocalEntry) -> bool:
        nonlocal start, rows
        if e.row < 0 or e.chunks:
            return same(e, have)
        if e.row - start not in range(len(rows)):
            start = e.row - e.row % size
            names = ["chunks", "chunk_sizes", "content"]
            part = manifest.columns_at(np.arange(start, min(start + size, len(manifest))), names)
            rows = list(zip(*(part.column(n).to_pylist() for n in names), strict=True))
        return same(e.filled(*rows[e.row - start]), have)

    return check


def _chunk_data(e: Entry, source: ChunkSource, what: str,
                progress: Callable[[int], None] | None) -> Iterator[bytes]:
    for cid in e.chunks:
        try:
            data = source.read_chunk(cid)
        except ChunkDamaged as err:  # its type kept: a standby forgets that chunk and its primary resends it
            raise ChunkDamaged(f"{what}: {e.path}: {err}; nothing was changed", err.chunk_id, err.pack_id) from None
        except IntegrityError as err:
            raise IntegrityError(f"{what}: {e.path}: {err}; nothing was changed") from None
        if progress:
            progress(len(data))
        yield data


PREFETCH_BYTES = 4 << 20  # small files' bytes whose chunks are read at once (ChunkSource.read_chunks)


def _prefetched(items: list[tuple[int, Entry]], source: ChunkSource
                ) -> Iterator[tuple[int, Entry, list[bytes] | None]]:
    """``(position, entry, its chunks' bytes)`` for small files' ``items``: the chunks of up to
    :data:`PREFETCH_BYTES` of files read with one :meth:`ChunkSource.read_chunks` (most lie end to end in
    one pack). When a group has a missing or damaged chunk (or the source reads one chunk at a time) its
    files get None: they are read one by one (:func:`_chunk_data`), so that the error names the file."""
    many: Callable[[list[bytes]], list[bytes]] | None = getattr(source, "read_chunks", None)
    if many is None:
        yield from ((n, e, None) for n, e in items)
        return
    group: list[tuple[int, Entry]] = []
    acc = 0
    for item in [*items, None]:
        if item is not None and (not group or acc + item[1].size <= PREFETCH_BYTES):
            group.append(item)
            acc += item[1].size
            continue
        try:
            data: list[bytes] | None = many([c for _, e in group for c in e.chunks])
        except IntegrityError:
            data = None
        at = 0
        for n, e in group:
            yield n, e, None if data is None else data[at:at + len(e.chunks)]
            at += len(e.chunks)
        if item is not None:
            group, acc = [item], item[1].size


def _counted(data: list[bytes], progress: Callable[[int], None] | None) -> Iterator[bytes]:
    for piece in data:
        if progress:
            progress(len(piece))
        yield piece


_ENTRY_FIELDS = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "target")
_JOURNAL_COLUMNS = (*_ENTRY_FIELDS, "xattrs", "hardlink", "sparse")  # an entry's journal row, as manifest columns


def _plan_json(plan: ApplyPlan, staged: dict[str, str], batch: int = 4096) -> Iterator[bytes]:
    """The commit journal, ``{"phase": "commit", "remove": [...], ...}``, as JSON text in pieces of at
    most ``batch`` items: a million-file plan is written without a second copy of it in memory."""
    ent = _entry_json

    # The directories to finish, not every directory planned: a replay finishes the same ones.
    lists: list[tuple[str, Iterable[Entry] | Iterable[str], bool]] = [
        ("remove", plan.remove, False), ("mkdir", plan.mkdir, True), ("write", plan.write, True),
        ("link", plan.link, True), ("fix_meta", plan.fix_meta, True), ("dirs", plan.dirs_to_finish(), True),
        ("unlock", plan.unlock, False), ("hardlink", plan.hardlink, True)]

    def parts(items: Iterable[Entry] | Iterable[str], entries: bool) -> Iterator[list[object]]:
        if isinstance(items, WriteList):  # its manifest rows journaled from their columns, no entry each
            yield from parts(items.head, True)
            xattrs = items.manifest.in_order("xattrs")  # streamed from a lean manifest's file as the rows pass
            for i in range(0, len(items.rows), batch):
                c = items.manifest.values_at(items.rows[i:i + batch], _JOURNAL_COLUMNS, xattrs)
                yield [[*row[:-3], None if row[-3] is None else row[-3].hex(), row[-2], bool(row[-1])]
                       for row in zip(*(c[n] for n in _JOURNAL_COLUMNS), strict=True)]
            return
        walk = iter(items)
        while part := list(itertools.islice(walk, batch)):
            yield [ent(e) for e in part] if entries else part  # type: ignore[arg-type]

    yield b'{"phase": "commit", "root": ' + json.dumps(_entry_json(plan.root) if plan.root else None).encode()
    for key, items, entries in lists:
        yield f', "{key}": ['.encode()
        first = True
        for part in parts(items, entries):
            if part:
                yield (b"" if first else b", ") + json.dumps(part)[1:-1].encode()
                first = False
        yield b"]"
    yield b', "staged": {'
    names = list(staged)
    for i in range(0, len(names), batch):
        part = {k: staged[k] for k in names[i:i + batch]}
        yield (b", " if i else b"") + json.dumps(part)[1:-1].encode()
    yield b'}, "touched_dirs": '
    if plan.touched_dirs is None:
        yield b"null}"
        return
    # Every directory the commit finishes, the merge's new ones too: any version's replay finishes them.
    yield json.dumps(sorted(plan.touched_dirs))[:-1].encode()
    made = (e.path for e in plan.made.deepest_first_with([])) if plan.made is not None else iter(())
    first = not plan.touched_dirs
    while part := list(itertools.islice(made, batch)):
        yield (b"" if first else b", ") + json.dumps(part)[1:-1].encode()
        first = False
    yield b"]}"


def _entry_json(e: Entry) -> list[object]:
    """A journal's row of ``e``: its :data:`_ENTRY_FIELDS`, extended attributes (hex), hard link, sparseness."""
    return [*(getattr(e, f) for f in _ENTRY_FIELDS), e.xattrs.hex() if e.xattrs is not None else None,
            e.hardlink, e.sparse]


def _entry_from_json(row: list) -> Entry:  # type: ignore[type-arg]
    base = row[:len(_ENTRY_FIELDS)]
    xattrs, hardlink, sparse = [*row[len(_ENTRY_FIELDS):], None, None, False][:3]
    return Entry(*base, chunks=[], chunk_sizes=[], xattrs=bytes.fromhex(xattrs) if xattrs else None,
                 hardlink=hardlink, sparse=bool(sparse))


def _plan_from_json(doc: dict) -> tuple[ApplyPlan, dict[str, str]]:  # type: ignore[type-arg]
    ent = _entry_from_json

    # Journaled in the commit's order (parents first to make, deepest first to finish), with every directory it
    # finishes named in ``touched_dirs``.
    plan = ApplyPlan(write=[ent(r) for r in doc["write"]], remove=list(doc["remove"]),
                     mkdir=[ent(r) for r in doc["mkdir"]], link=[ent(r) for r in doc["link"]],
                     fix_meta=[ent(r) for r in doc["fix_meta"]], dirs=[ent(r) for r in doc["dirs"]],
                     unlock=list(doc.get("unlock", [])), hardlink=[ent(r) for r in doc.get("hardlink", [])])
    touched = doc.get("touched_dirs")  # journals of earlier versions have none: finish every directory
    plan.touched_dirs = set(touched) if touched is not None else None
    return plan, dict(doc["staged"])


def recover_apply(target: str | DataRoot, journal: str | None = None) -> bool:
    """Finish an apply that was interrupted. True when one was finished.

    With a journal in the commit phase the staged files were complete and durable: the commit is
    replayed (every step of it may run again any number of times). Without one the apply never
    started changing the target: the staging area is dropped. The root is claimed meanwhile (an HDFS root's
    lease): ApplyBusy when another host's apply holds it (its journal is its own, in flight).
    """
    root = open_data_root(target) if isinstance(target, str) else target
    if root.missing():
        return False
    with root.claim("the recovery of an interrupted apply"):  # ApplyBusy: another host's apply is in flight
        root.settle()
        if _finish_interrupted(root, _journal_for(root, journal), in_root=journal is None) is not None:
            return True
        root.drop_staging()
        return False


def abandon_apply(target: str | DataRoot, journal: str | None = None) -> None:
    """Drop an interrupted apply's journal and staging area without completing it: the caller applies a
    whole snapshot next, with every file compared (the root is left part old, part new until then)."""
    root = open_data_root(target) if isinstance(target, str) else target
    if root.missing():
        return
    with root.claim("dropping an interrupted apply"):
        root.settle()
        _drop(root, _journal_for(root, journal))


def _drop(root: DataRoot, log_: Journal) -> None:
    """An apply's journal and staging area gone, the apply not completed."""
    log_.remove()
    root.drop_staging()


def _small(batch: list[tuple[int, Entry]]) -> bool:
    """Whether every file of ``batch`` is below :data:`SMALL_FILE_BYTES` (staged by the root's small-file threads)."""
    return all(e.size < SMALL_FILE_BYTES for _, e in batch)


def _batches(items: Iterable[tuple[int, Entry]], max_files: int = 256,
             max_bytes: int = 32 * 1024 * 1024) -> Iterator[list[tuple[int, Entry]]]:
    """Group files so that each pool task carries enough work to pay for itself (lazily): files below
    :data:`SMALL_FILE_BYTES` and larger ones in batches of their own, each batch in the items' order."""
    open_: dict[bool, tuple[list[tuple[int, Entry]], int]] = {}
    for item in items:
        small = item[1].size < SMALL_FILE_BYTES
        batch, acc = open_.get(small, ([], 0))
        if batch and (len(batch) >= max_files or acc >= max_bytes):
            # The other kind's batch goes too: a batch never spans more of the list than a full one would.
            yield from (b for b, _ in sorted(open_.values(), key=lambda b: b[0][0][0]))
            open_.clear()
            batch, acc = [], 0
        batch.append(item)
        open_[small] = (batch, acc + item[1].size)
    yield from (b for b, _ in sorted(open_.values(), key=lambda b: b[0][0][0]))
