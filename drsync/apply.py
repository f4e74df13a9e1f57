"""Applying a manifest to a local target directory (restore is a delta).

Plan first (pure: :func:`plan_apply` compares the manifest with what the
target holds), then stage, then commit:

1. every file to (re)write is built in ``<target>/.drsync-staging`` from
   verified chunks; a damaged or missing chunk aborts here and the target is
   untouched;
2. one ``syncfs`` makes the staged data durable (instead of one fsync per file);
3. extra paths are removed, directories made, staged files renamed into place,
   links made, modes, owners and mtimes set; a second ``syncfs`` ends it.

Files whose type, size and mtime already match are left alone (``checksum``
re-hashes them too). Paths matching ``exclude`` are neither written nor
removed (light backups leave bulk data alone).
"""

from __future__ import annotations

import json
import os
import shutil
import stat as st
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from drsync import fsutil
from drsync.errors import IntegrityError, UsageError
from drsync.pathglob import compile_globs
from drsync.repository import chunks
from drsync.repository.manifest import DIR, FILE, SYMLINK, Entry, Manifest, content_digest, validate
from drsync.tree import LocalEntry, scan_tree

STAGING = ".drsync-staging"


class ChunkSource(Protocol):
    def read_chunk(self, chunk_id: bytes) -> bytes: ...

    def has_chunk(self, chunk_id: bytes) -> bool: ...


@dataclass
class ApplyPlan:
    write: list[Entry] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    mkdir: list[Entry] = field(default_factory=list)
    link: list[Entry] = field(default_factory=list)
    fix_meta: list[Entry] = field(default_factory=list)
    unchanged: int = 0
    dirs: list[Entry] = field(default_factory=list)

    @property
    def write_bytes(self) -> int:
        return sum(e.size for e in self.write)


@dataclass
class ApplyResult:
    written_files: int = 0
    written_bytes: int = 0
    unchanged_files: int = 0
    removed: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def plan_apply(entries: list[Entry], existing: dict[str, LocalEntry], *,
               excluded: Callable[[str], bool] = lambda p: False,
               same_content: Callable[[Entry, LocalEntry], bool] | None = None,
               structure_only: bool = False) -> ApplyPlan:
    """What to do to turn ``existing`` into ``entries``. Pure; no I/O unless ``same_content`` does some."""
    plan = ApplyPlan()
    wanted: dict[str, Entry] = {}
    for e in entries:
        if excluded(e.path) or (structure_only and e.type == FILE):
            continue
        wanted[e.path] = e
    for path, have in existing.items():
        if excluded(path) or (structure_only and have.type == FILE):
            continue
        want = wanted.get(path)
        if want is None or want.type != have.type:
            plan.remove.append(path)
    removed = set(plan.remove)
    # Removing a directory removes what is inside it: list only the top-most paths.
    plan.remove = [p for p in plan.remove if not any(a in removed for a in _ancestors(p))]
    for path, e in wanted.items():
        have = existing.get(path)
        if have is not None and path in removed:
            have = None
        if e.type == DIR:
            plan.dirs.append(e)
            if have is None:
                plan.mkdir.append(e)
        elif e.type == SYMLINK:
            if have is None or os.fsdecode(have.target or "") != e.target:
                plan.link.append(e)
        else:
            if (have is not None and have.size == e.size and have.mtime_ns == e.mtime_ns
                    and (same_content is None or same_content(e, have))):
                plan.unchanged += 1
                if have.mode != e.mode or (os.geteuid() == 0 and (have.uid, have.gid) != (e.uid, e.gid)):
                    plan.fix_meta.append(e)
            else:
                plan.write.append(e)
    # Remove children before parents; create parents before children.
    plan.remove.sort(key=lambda p: p.count("/"), reverse=True)
    plan.mkdir.sort(key=lambda e: e.path)
    plan.dirs.sort(key=lambda e: e.path.count("/"), reverse=True)
    return plan


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _same_content(e: Entry, have: LocalEntry) -> bool:
    """Re-hash an existing file and compare with the manifest (``--checksum``)."""
    ids: list[bytes] = []
    try:
        with open(have.abspath, "rb", buffering=0) as f:
            for data in chunks.cut_stream(f):
                ids.append(chunks.chunk_id(data))
    except OSError:
        return False
    return content_digest(ids) == content_digest(e.chunks)


def apply_manifest(manifest: Manifest, source: ChunkSource, target: str, *, what: str = "snapshot",
                   exclude: tuple[str, ...] = (), checksum: bool = False, structure_only: bool = False,
                   progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None, workers: int = 4,
                   journal: str | None = None, on_committed: Callable[[], None] | None = None) -> ApplyResult:
    validate(manifest, what)
    target = os.path.abspath(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UsageError(f"target {target} exists and is not a directory; name a directory")
    entries = list(manifest.entries())
    # Every chunk must be present before anything on the target changes.
    for e in entries:
        if e.type == FILE and not structure_only:
            for cid in e.chunks:
                if not source.has_chunk(cid):
                    raise IntegrityError(f"{what}: {e.path}: chunk {cid.hex()[:16]} is missing from the "
                                         f"repository; nothing was changed")
    created_target = not os.path.exists(target)
    os.makedirs(target, exist_ok=True)
    existing = scan_tree(target).entries() if os.listdir(target) else {}
    plan = plan_apply(entries, existing, excluded=compile_globs(exclude),
                      same_content=_same_content if checksum else None, structure_only=structure_only)
    if on_total:
        on_total(plan.write_bytes)

    staging = os.path.join(target, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, 0o700)
    staged: dict[str, str] = {}
    try:
        def stage(batch: list[tuple[int, Entry]]) -> None:
            for n, e in batch:
                tmp = os.path.join(staging, str(n))
                _write_file(tmp, e, source, what, progress)
                staged[e.path] = tmp

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drsync-apply") as pool:
            list(pool.map(stage, _batches(list(enumerate(plan.write)))))
        fsutil.syncfs(target)
    except BaseException:
        # Nothing was committed: leave the target as it was (including not existing at all).
        shutil.rmtree(staging, ignore_errors=True)
        if created_target:
            shutil.rmtree(target, ignore_errors=True)
        raise

    result = ApplyResult(written_files=len(plan.write), written_bytes=plan.write_bytes,
                         unchanged_files=plan.unchanged, removed=len(plan.remove))
    if journal:
        # From here on the apply only moves forward: a restart replays the journal.
        fsutil.atomic_write(journal, json.dumps(_plan_to_json(plan, staged)).encode(), durable=True)
    _commit(target, plan, staged)
    shutil.rmtree(staging, ignore_errors=True)
    fsutil.syncfs(target)
    if on_committed:
        on_committed()  # before the journal goes: a crash here replays the commit, then this again
    if journal:
        os.unlink(journal)
        fsutil.fsync_dir(os.path.dirname(journal))
    return result


_ENTRY_FIELDS = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "target")


def _plan_to_json(plan: ApplyPlan, staged: dict[str, str]) -> dict[str, object]:
    def ent(e: Entry) -> list[object]:
        return [getattr(e, f) for f in _ENTRY_FIELDS]

    return {"remove": plan.remove, "mkdir": [ent(e) for e in plan.mkdir], "write": [ent(e) for e in plan.write],
            "link": [ent(e) for e in plan.link], "fix_meta": [ent(e) for e in plan.fix_meta],
            "dirs": [ent(e) for e in plan.dirs], "staged": staged}


def _plan_from_json(doc: dict) -> tuple[ApplyPlan, dict[str, str]]:  # type: ignore[type-arg]
    def ent(row: list) -> Entry:  # type: ignore[type-arg]
        return Entry(*row, chunks=[], chunk_sizes=[])

    plan = ApplyPlan(write=[ent(r) for r in doc["write"]], remove=list(doc["remove"]),
                     mkdir=[ent(r) for r in doc["mkdir"]], link=[ent(r) for r in doc["link"]],
                     fix_meta=[ent(r) for r in doc["fix_meta"]], dirs=[ent(r) for r in doc["dirs"]])
    return plan, dict(doc["staged"])


def recover_apply(target: str, journal: str) -> bool:
    """Finish or roll back an apply that was interrupted. True when one was finished.

    With a journal the staged files were complete and durable: replay the commit.
    Without one the apply never started changing the target: drop the staging area.
    """
    target = os.path.abspath(target)
    staging = os.path.join(target, STAGING)
    if os.path.exists(journal):
        with open(journal, "rb") as f:
            plan, staged = _plan_from_json(json.loads(f.read()))
        _commit(target, plan, staged)
        shutil.rmtree(staging, ignore_errors=True)
        fsutil.syncfs(target)
        os.unlink(journal)
        fsutil.fsync_dir(os.path.dirname(journal))
        return True
    if os.path.exists(staging):
        shutil.rmtree(staging, ignore_errors=True)
    return False


def _batches(items: list[tuple[int, Entry]], max_files: int = 256,
             max_bytes: int = 32 * 1024 * 1024) -> list[list[tuple[int, Entry]]]:
    """Group small files so that each pool task carries enough work to pay for itself."""
    out: list[list[tuple[int, Entry]]] = [[]]
    acc = 0
    for item in items:
        if out[-1] and (len(out[-1]) >= max_files or acc >= max_bytes):
            out.append([])
            acc = 0
        out[-1].append(item)
        acc += item[1].size
    return out


def _write_file(tmp: str, e: Entry, source: ChunkSource, what: str,
                progress: Callable[[int], None] | None) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for cid in e.chunks:
            try:
                data = source.read_chunk(cid)
            except IntegrityError as err:
                raise IntegrityError(f"{what}: {e.path}: {err}; nothing was changed") from None
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if progress:
                progress(len(data))
        _set_meta_fd(fd, e)
    finally:
        os.close(fd)
    os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))


def _set_meta_fd(fd: int, e: Entry) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, e.uid, e.gid)
    os.fchmod(fd, e.mode)


def _commit(target: str, plan: ApplyPlan, staged: dict[str, str]) -> None:
    """Make the target equal the plan. Idempotent, so a journaled apply can be run again."""
    def full(path: str) -> str:
        return os.path.join(target, *path.split("/"))

    # Directories we write into must be writable by us until the end.
    for e in plan.dirs:
        try:
            s = os.lstat(full(e.path))
        except FileNotFoundError:
            continue
        if st.S_ISDIR(s.st_mode) and (s.st_mode & 0o700) != 0o700:
            os.chmod(full(e.path), st.S_IMODE(s.st_mode) | 0o700)
    for path in plan.remove:
        p = full(path)
        if os.path.isdir(p) and not os.path.islink(p):
            _rmtree_forcing(p)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    for e in plan.mkdir:
        os.makedirs(full(e.path), 0o700, exist_ok=True)
    for e in plan.write:
        try:
            os.replace(staged[e.path], full(e.path))
        except FileNotFoundError:
            if not os.path.exists(full(e.path)):
                raise
            # Already moved by the interrupted run this one completes.
    for e in plan.link:
        p = full(e.path)
        tmp = fsutil.temp_name(p)
        os.symlink(e.target or "", tmp)
        os.replace(tmp, p)
        if os.geteuid() == 0:
            os.lchown(p, e.uid, e.gid)
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    for e in plan.fix_meta:
        p = full(e.path)
        if os.geteuid() == 0:
            os.lchown(p, e.uid, e.gid)
        os.chmod(p, e.mode)
    # Deepest directories first, so setting a child's times does not disturb its parent's.
    for e in plan.dirs:
        p = full(e.path)
        if os.geteuid() == 0:
            os.lchown(p, e.uid, e.gid)
        s = os.lstat(p)
        if st.S_IMODE(s.st_mode) != e.mode:
            os.chmod(p, e.mode)
        if s.st_mtime_ns != e.mtime_ns:
            os.utime(p, ns=(e.mtime_ns, e.mtime_ns))


def _rmtree_forcing(path: str) -> None:
    def onerror(func, p, exc):  # type: ignore[no-untyped-def]
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=onerror)


__all__ = ["ApplyPlan", "ApplyResult", "ChunkSource", "apply_manifest", "plan_apply"]
