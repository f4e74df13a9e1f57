"""Change notification for a local data root (``replication.mode = "continuous"``): the only module that
imports watchdog (inotify on Linux).

:class:`RootWatcher` watches a directory tree recursively (directories created later too) and records
when the first change not yet taken happened; paths of drsync's own inside the root (the agent's state
directory, a repository) are left out, and so are reads (open, close without writing), so a capture never
triggers the next one. It never decides when to capture (:mod:`drsync.agent.cadence` does): it says
*whether* the root changed since the last :meth:`RootWatcher.take`, and whether notification can still
be trusted (:meth:`RootWatcher.problem`):

* the kernel's event queue overflowed (events were lost): ``fs.inotify.max_queued_events``;
* a directory could not be watched (watchdog skips those silently; the usual cause is the
  ``fs.inotify.max_user_watches`` limit): found by comparing the directories of the tree, by device
  and inode, with the watches this process holds (``/proc/self/fdinfo``),
  :meth:`RootWatcher.coverage_problem`;
* a filesystem was mounted or unmounted inside the tree (:mod:`drsync.agent.mounts`): inotify sees
  nothing of it, and the directories it brings have no watch;
* the root itself was deleted, moved, replaced or unmounted: its (device, inode) changed, or the
  watch on it ended.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from drsync.agent.mounts import MountWatch

log = logging.getLogger("drsync.agent")

# What changes content or metadata (watchdog 7 reports chmod, chown, utime and xattrs as Attrib events);
# reads (opened, closed without writing) are never asked for.
_CHANGES = [FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, FileAttribEvent,
            DirAttribEvent, FileDeletedEvent, DirDeletedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent,
            EventsLostEvent]
# Directories found unwatched are looked at again after this long: one created meanwhile may just not
# have its watch yet.
RECHECK_AFTER_S = 0.5
# More directories created between two captures than this: the next capture checks the whole tree.
MAX_NEW_DIRS = 10_000
# A watch in /proc/PID/fdinfo: the inode and the kernel's device number of the watched directory.
_WATCH_LINE = re.compile(r"^inotify wd:\S+ ino:([0-9a-fA-F]+) sdev:([0-9a-fA-F]+)", re.MULTILINE)
_STARTING = threading.Lock()  # one watcher opens its descriptor at a time: each tells its own apart
_OVERFLOW = "Inotify queue overflowed"
_UNWATCHED = "Unable to watch"


def sysctl(name: str) -> str:
    """The value of a sysctl such as ``fs.inotify.max_user_watches`` ("?" when unreadable)."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def watch_limit_advice() -> str:
    return (f"raise fs.inotify.max_user_watches (now {sysctl('fs.inotify.max_user_watches')}; e.g. sysctl -w "
            f"fs.inotify.max_user_watches=1048576, and in /etc/sysctl.d/ to keep it) and restart the agent")


def overflow_advice() -> str:
    return (f"raise fs.inotify.max_queued_events (now {sysctl('fs.inotify.max_queued_events')}; e.g. sysctl -w "
            f"fs.inotify.max_queued_events=1048576, and in /etc/sysctl.d/ to keep it) and restart the agent")


class _QuietOverflows(logging.Filter):
    """watchdog logs a queue overflow and, per directory it could not watch, a warning of its own. The
    watcher whose queue overflowed hears of it from its own observer (an ``EventsLostEvent`` for its watch,
    each observer having an inotify instance and queue of its own) and the agent reports it in its own
    words, with what to do; :meth:`RootWatcher.coverage_problem` finds every unwatched directory and the
    agent warns once. Both records are dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith((_OVERFLOW, _UNWATCHED))


for _name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
    logging.getLogger(_name).addFilter(_QuietOverflows())


def _reader_pipe(observer: Observer) -> tuple[int, int] | None:  # type: ignore[valid-type]
    """The identity (device, inode) of the wake-up pipe of an observer's inotify reader, or None."""
    reader = getattr(observer, "_inotify_fd", None)
    try:
        st = os.fstat(reader._kill_r)  # type: ignore[union-attr]
    except (AttributeError, OSError):
        return None
    return st.st_dev, st.st_ino


def _stop_reader(observer: Observer, pipe: tuple[int, int] | None) -> None:  # type: ignore[valid-type]
    """Stop an observer's inotify reader and make sure its descriptors are closed. watchdog 7.1.1 opens
    the inotify instance, and starts its reader, when the first tree is scheduled; stopped before its
    first read (a tree that could not be scheduled, a watcher stopped soon after it started), the reader
    ends without closing it. Each failed start (the agent retries every few minutes) held an instance of
    the user's ``fs.inotify.max_user_instances`` (128, shared by the user's processes) for good. The
    reader closes its instance and its wake-up pipe together: ``pipe`` (:func:`_reader_pipe`, taken
    while the reader was known to run) still open once the reader ended means that nothing closed them;
    a descriptor number reused since is another inode."""
    reader = getattr(observer, "_inotify_fd", None)
    if reader is None or pipe is None:
        return
    try:
        reader.stop()
    except Exception:  # already stopped
        pass
    if reader.is_alive():
        reader.join(5.0)
    if reader.is_alive():
        return
    try:
        st = os.fstat(reader._kill_r)
    except OSError:
        return  # closed
    if (st.st_dev, st.st_ino) == pipe:
        reader._close_resources()


class WatchError(Exception):
    """The root cannot be watched; the message says why and what to do."""


def _inotify_fds() -> set[int]:
    out = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for n in names:
        try:
            if os.readlink(f"/proc/self/fd/{n}") == "anon_inode:inotify":
                out.add(int(n))
        except (OSError, ValueError):
            pass
    return out


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: RootWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):  # the kernel dropped events of this watcher's queue
            self.watcher._overflowed()
        else:
            self.watcher._event(event)


class RootWatcher:
    """Recursive change notification over one local directory tree."""

    def __init__(self, root: str, *, exclude: Iterable[str] = (), on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.given = root  # as configured: a symlink flipped to another tree is a replaced root
        self.root = os.path.realpath(root)
        # drsync's own paths inside the root, as the filesystem names them (symlinks resolved).
        self.exclude = tuple(sorted({os.path.realpath(p) for p in exclude if p} - {self.root}))
        self.on_change = on_change
        self.clock = clock
        self._lock = threading.Lock()
        self._first: float | None = None
        self.changes = 0  # change events seen (not left out)
        self.first_path = ""  # the path of the first change of the current batch (what woke the agent)
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._fd: int | None = None  # this watcher's inotify descriptor, when it could be told apart
        self._root_id: tuple[int, int] | None = None
        self._pipe: tuple[int, int] | None = None  # its observer's reader's wake-up pipe (_stop_reader)
        self._mounts: MountWatch | None = None
        self._problem: str | None = None
        # Directories created or moved in since the last look (bounded; None: too many, look at everything).
        self._new_dirs: set[str] | None = set()

    # --- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the tree now (every directory in it is watched when this returns). WatchError when the
        root cannot be watched at all; directories that could not be watched are found by
        :meth:`coverage_problem`."""
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise WatchError(f"cannot watch data root {self.root}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise WatchError(f"cannot watch data root {self.root}: not a directory")
        self._root_id = (st.st_dev, st.st_ino)
        # Mounts inside the tree from now on are seen (before the watches are set up: none is missed).
        self._mounts = MountWatch(self.root)
        # The observer's inotify descriptor is told apart as the one it opened: watchdog 7.1.0 opens it when
        # the observer is made, 7.1.1 when the tree is scheduled (one per observer in both).
        with _STARTING:
            before = _inotify_fds()
            try:
                observer = Observer()
            except OSError as e:
                self._mounts.close()
                raise WatchError(self._os_error(e)) from None
            try:
                observer.schedule(_Handler(self), self.root, recursive=True, event_filter=_CHANGES)
                observer.start()
            except OSError as e:
                pipe = _reader_pipe(observer)
                self._mounts.close()
                try:
                    observer.stop()
                except Exception:  # never started: nothing to stop
                    pass
                _stop_reader(observer, pipe)
                raise WatchError(self._os_error(e)) from None
            fds = _inotify_fds() - before
        self._fd = fds.pop() if len(fds) == 1 else None
        self._pipe = _reader_pipe(observer)
        self._observer = observer

    def _os_error(self, e: OSError) -> str:
        if e.errno == errno.ENOSPC:
            return f"inotify watch limit reached while watching data root {self.root}: {watch_limit_advice()}"
        if e.errno == errno.EMFILE:
            return (f"inotify instance limit reached: raise fs.inotify.max_user_instances (now "
                    f"{sysctl('fs.inotify.max_user_instances')}) and restart the agent")
        return f"cannot watch data root {self.root}: {e.strerror or e}"

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if self._mounts is not None:
            self._mounts.close()
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(5.0)
            _stop_reader(observer, self._pipe)

    @property
    def running(self) -> bool:
        return self._observer is not None

    # --- changes --------------------------------------------------------------------------------

    def _excluded(self, path: str) -> bool:
        return any(path == x or path.startswith(x + os.sep) for x in self.exclude)

    def _event(self, event: FileSystemEvent) -> None:
        paths = [os.fsdecode(p) for p in (event.src_path, event.dest_path) if p]
        if not paths or all(self._excluded(p) for p in paths):
            return
        with self._lock:
            self.changes += 1
            if event.is_directory and event.event_type in ("created", "moved") and self._new_dirs is not None:
                self._new_dirs.add(paths[-1])
                if len(self._new_dirs) > MAX_NEW_DIRS:
                    self._new_dirs = None
            first = self._first is None
            if first:
                self._first = self.clock()
                self.first_path = paths[0]
        if first:
            self.on_change()  # once per batch: a busy root does not wake the agent per event

    @property
    def first_change(self) -> float | None:
        """When the first change not yet taken was seen (the clock's time), or None."""
        return self._first

    def take(self) -> float | None:
        """The first change not yet taken, and forget it: a capture starts now and covers it (and every
        change before it); a change seen from now on belongs to the next capture."""
        with self._lock:
            first, self._first = self._first, None
            return first

    # --- can notification be trusted? ----------------------------------------------------------------

    def _overflowed(self) -> None:
        if self._problem is None:
            self._problem = f"the kernel's inotify event queue overflowed and changes were lost: {overflow_advice()}"
        self.on_change()

    def problem(self) -> str | None:
        """Why changes may no longer be seen (cheap: no walk), or None while the watch is whole."""
        if self._problem is not None:
            return self._problem
        observer = self._observer
        if observer is None:
            return None
        try:
            st = os.stat(self.root)
            same = (st.st_dev, st.st_ino) == self._root_id
        except OSError as e:
            return f"data root {self.root} is gone ({e.strerror}): it was moved, deleted or unmounted while watched"
        if not same:
            return f"data root {self.root} was replaced or remounted while watched"
        if os.path.realpath(self.given) != self.root:
            return (f"data root {self.given} now leads to {os.path.realpath(self.given)}, not to the watched "
                    f"{self.root} (a symlink was changed)")
        if not observer.is_alive() or not observer.emitters or not all(e.is_alive() for e in observer.emitters):
            return f"the watch on data root {self.root} ended (the root was deleted, moved or unmounted)"
        moved = self._mounts.changed() if self._mounts is not None else []
        if moved:  # directories under a new mount have no watch; under an unmounted one, maybe none
            self._problem = (f"a filesystem was mounted or unmounted inside data root {self.root} while it was "
                             f"watched (at {os.path.relpath(moved[0], self.root)}): its directories are watched "
                             f"when notification is set up again")
            return self._problem
        return None

    def new_dirs_problem(self) -> str | None:
        """:meth:`coverage_problem` for the directories created or moved in since the last call only (all of
        the tree after very many): a directory past the watch limit is found at the next capture, not at the
        next heartbeat."""
        with self._lock:
            new, self._new_dirs = self._new_dirs, set()
        if new is None:
            return self.coverage_problem()
        tops = [p for p in sorted(new) if os.path.isdir(p) and not self._excluded(p)]
        return self.coverage_problem(tops) if tops else None

    def coverage_problem(self, tops: list[str] | None = None) -> str | None:
        """Whether every directory of the tree (drsync's own left out; or of the subtrees ``tops``) holds a
        watch of this watcher: a walk of the directories, compared with the watches the kernel lists for
        this process's inotify descriptor (every inotify descriptor of the process when this watcher's could
        not be told apart). None when all are watched, or when the kernel's list cannot be read."""
        if self._observer is None:
            return None
        missing = self._unwatched(tops)
        if not missing:
            return None
        time.sleep(RECHECK_AFTER_S)  # a directory created just now may not have its watch yet
        watched = self._watched()
        still = []
        for path, ino in missing:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode) and key == ino and watched is not None and key not in watched:
                still.append(path)
        if not still:
            return None
        first = os.path.relpath(still[0], self.root)
        n = len(still)
        return (f"{n} director{'y' if n == 1 else 'ies'} of data root {self.root} {'is' if n == 1 else 'are'} not "
                f"watched (first: {first}): the inotify watch limit was reached ({watch_limit_advice()}), or a "
                f"directory was moved out of the tree and back (watched again when notification is set up again)")

    def _watched(self) -> set[tuple[int, int]] | None:
        """The directories the kernel lists as watched for this watcher's descriptor (or for all of the
        process's inotify descriptors) as (st_dev, st_ino): inode numbers repeat across filesystems, and a
        tree may span several. None when /proc cannot be read."""
        fds = [self._fd] if self._fd is not None else sorted(_inotify_fds())
        if not fds:
            return None
        watched: set[tuple[int, int]] = set()
        try:
            for fd in fds:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for m in _WATCH_LINE.finditer(f.read()):
                        sdev = int(m.group(2), 16)  # the kernel's dev_t: major << 20 | minor
                        watched.add((os.makedev(sdev >> 20, sdev & 0xFFFFF), int(m.group(1), 16)))
        except OSError:
            return None
        return watched

    def _unwatched(self, tops: list[str] | None = None) -> list[tuple[str, tuple[int, int]]]:
        watched = self._watched()
        if watched is None:
            return []
        out: list[tuple[str, tuple[int, int]]] = []
        stack = [self.root] if tops is None else list(tops)
        for top in stack if tops is not None else ():
            try:
                st = os.lstat(top)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in watched:
                out.append((top, (st.st_dev, st.st_ino)))
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    entries = list(it)
            except OSError:
                continue
            for e in entries:
                try:
                    if not e.is_dir(follow_symlinks=False) or self._excluded(e.path):
                        continue
                    st = e.stat(follow_symlinks=False)  # one lstat per directory: its device too
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in watched:
                    out.append((e.path, key))
                stack.append(e.path)
        return out
