"""One apply at a time onto an HDFS root, whichever host it runs on: leases on HDFS itself.

The host lock of an apply (:class:`drsync.flocks.ApplyLock`) keeps two applies of one host apart. An HDFS
root is reached from many hosts: a standby agent applying on one edge node and an operator's restore on
another would empty each other's staging area and leave a root that matches neither snapshot (safety
rule 2). So an apply onto an HDFS root also holds a lease in ``<root>/.drsync-staging``, as restic holds
its locks: create your own, then look for others.

- **Take:** write ``lease.<token>`` (a name of its own: no two writers meet on one path), holding the
  holder's identity (host name, boot id, pid namespace, pid and the process's start time) and what the
  apply is. Then list every ``lease.*``: when another one is live, remove your own and refuse
  (:class:`drsync.flocks.ApplyBusy`, nothing changed). Two applies starting together may both refuse;
  never both go on. Stale ones are removed.
- **Live or stale:** stale when not renewed for :data:`STALE_S` seconds by the namenode's clock (its
  modification time; a host that crashed, lost its network or was paused), or at once when its holder is a
  process of this very host (same name, boot and pid namespace) that no longer runs. A same-named host is
  not taken for this one: another boot or pid namespace waits out the age.
- **Renew** every :data:`RENEW_S` seconds, first checking that no other live lease appeared: a holder that
  was paused past :data:`STALE_S` and taken over stops renewing and is told so by :meth:`RootLease.verify`,
  which the apply calls before it starts changing the root (its journal, its commit). A holder paused past
  :data:`STALE_S` in the middle of its commit is not stopped: HDFS offers no fencing of a client.
- **Give back:** remove your own lease; the staging directory too when nothing else is left in it.

The staging area's reset and removal leave the leases alone (:mod:`drsync.dataroot.hdfs`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from drsync.flocks import ApplyBusy
from drsync.storage.hdfs import HdfsError, HdfsFs
from drsync.text import printable

log = logging.getLogger(__name__)

LEASE_PREFIX = "lease."
RENEW_S = 30.0  # seconds between renewals of a held lease
STALE_S = 300.0  # seconds without a renewal (namenode clock) after which a lease is taken over
_HELD: set[str] = set()  # the leases this process holds (paths): another of its own is a leftover


def is_lease(name: str) -> bool:
    """Whether a name in the staging area is a lease's."""
    return name.startswith(LEASE_PREFIX)


def holder_words(doc: dict[str, Any], age_s: float | None) -> str:
    """How a lease's holder is named in a refusal: what, pid, host and when it was last renewed."""
    renewed = f", renewed {age_s:.0f} s ago" if age_s is not None else ""
    return (f"another drsync apply ({printable(str(doc.get('what', '?')))}, pid {doc.get('pid', '?')} on host "
            f"{printable(str(doc.get('host', '?')))}{renewed})")


def _identity() -> dict[str, Any]:
    """This process as a lease names it: a process of this host is looked up only when all of it matches."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns,
            "pid": os.getpid(), "start": _start_of(os.getpid())}


def _start_of(pid: int) -> str:
    """A process's start time (clock ticks since boot, /proc/PID/stat), "" when it does not run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


class RootLease:
    """The lease of one apply onto an HDFS root, in its staging directory ``staging`` through ``fs``."""

    def __init__(self, fs: HdfsFs, staging: str, url: str) -> None:
        self.fs = fs
        self.url = url
        self.staging = staging
        self.path = ""  # our lease, once written
        self.lost: str | None = None  # why we no longer hold it (another live lease), once seen
        self._stop = threading.Event()

    @contextmanager
    def hold(self, what: str) -> Iterator[RootLease]:
        """Hold a lease for the ``with`` body; :class:`drsync.flocks.ApplyBusy` (exit 1, nothing changed;
        logged at WARNING) when another apply holds the root."""
        self._take(what)
        renewer = threading.Thread(target=self._renew, name="drsync-hdfs-lease", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            self._stop.set()
            renewer.join()
            self._give_back()

    def holder(self) -> str | None:
        """Who holds the root now (:func:`holder_words`), or None: what a dry run says."""
        for _, doc, age, live in self._others():
            if live:
                return holder_words(doc, age)
        return None

    def verify(self, what: str) -> None:
        """ApplyBusy when another apply took the root over (this one was paused past :data:`STALE_S`): called
        before the apply starts changing the root."""
        if self.lost is None:
            self.lost = self._taken_over()
        self._refuse_if_lost(what)

    # --- the steps --------------------------------------------------------------------

    def _take(self, what: str) -> None:
        token = secrets.token_hex(8)
        body = json.dumps({**_identity(), "what": what, "since": time.time()}).encode()
        made = self.fs.status(self.staging) is None
        self.fs.mkdirs(self.staging, 0o700)
        path = posixpath.join(self.staging, LEASE_PREFIX + token)
        _HELD.add(path)  # before it exists: a look of another thread of this process never takes it for a leftover
        try:
            self.fs.write(path, body, overwrite=True, permission=0o600)  # a name of its own: a retry may overwrite
        except BaseException:
            _HELD.discard(path)
            self._remove_staging_if_empty(made)
            raise
        self.path = path
        stale: list[tuple[str, dict[str, Any], float | None]] = []
        for name, doc, age, live in self._others():
            if live:
                self._delete_own()
                self._remove_staging_if_empty(made)
                busy = ApplyBusy(what, f"{holder_words(doc, age)} is writing to {printable(self.url)}")
                log.warning("%s", busy)
                raise busy
            stale.append((name, doc, age))
        for name, doc, age in stale:
            log.warning("%s: taking over from %s, which is gone", self.url, holder_words(doc, age))
            try:
                self.fs.delete(posixpath.join(self.staging, name), recursive=True)
            except HdfsError as e:
                if e.exception != "FileNotFoundException":
                    raise

    def _others(self) -> list[tuple[str, dict[str, Any], float | None, bool]]:
        """Every lease but ours: (name, its document, seconds since its renewal by the namenode's clock,
        whether it is live)."""
        try:
            listed = [s for s in self.fs.list_dir(self.staging) if is_lease(s["pathSuffix"])]
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return []
            raise
        now = self.fs.server_time()
        out = []
        for s in listed:
            name = s["pathSuffix"]
            if posixpath.join(self.staging, name) == self.path:
                continue
            age = None if now is None else max(0.0, now - int(s["modificationTime"]) / 1000)
            doc: dict[str, Any] = {}
            if s.get("type") == "FILE":
                try:
                    parsed = json.loads(self.fs.read(posixpath.join(self.staging, name)))
                    doc = parsed if isinstance(parsed, dict) else {}
                except HdfsError as e:
                    if e.exception == "FileNotFoundException":
                        continue  # given back meanwhile
                    raise
                except ValueError:
                    pass  # cut short while written: judged by its age alone
            out.append((name, doc, age, not _gone(doc, age, posixpath.join(self.staging, name))))
        return out

    def lost_now(self) -> bool:
        """Whether this lease was taken over (removed as stale by another apply): one look at it."""
        if self.lost is None and self.path and self.fs.status(self.path) is None:
            self.lost = "another drsync apply"
        return self.lost is not None

    def verify_held(self, what: str) -> None:
        """ApplyBusy when :meth:`lost_now`: a cheap check before each staged file."""
        self.lost_now()
        self._refuse_if_lost(what)

    def _refuse_if_lost(self, what: str) -> None:
        if self.lost is not None:
            busy = ApplyBusy(what, f"{self.lost} took {printable(self.url)} over while this apply was held up")
            log.warning("%s", busy)
            raise busy

    def _taken_over(self) -> str | None:
        """Who took the root over from this lease (another live lease, or ours removed as stale), or None."""
        live = next((holder_words(doc, age) for _, doc, age, live in self._others() if live), None)
        if live is not None:
            return live
        return "another drsync apply (gone since)" if self.fs.status(self.path) is None else None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if self.lost is None:
                    self.lost = self._taken_over()
                if self.lost is not None:
                    log.error("%s: %s took this root over while this apply was held up; it is not renewed, and "
                              "the apply stops before it changes the root", self.url, self.lost)
                    return
                now = self.fs.server_time()  # staleness is judged by the namenode's clock
                self.fs.set_times(self.path, int((now if now is not None else time.time()) * 1e9))
            except (HdfsError, OSError) as e:
                log.warning("%s: cannot renew the apply's lease (%s); another host may take it over after %d s",
                            self.url, e, STALE_S)

    def _delete_own(self) -> None:
        _HELD.discard(self.path)
        try:
            self.fs.delete(self.path)
        except HdfsError as e:
            if e.exception != "FileNotFoundException":
                raise
        self.path = ""

    def _remove_staging_if_empty(self, made: bool) -> None:
        try:
            if made and not list(self.fs.list_dir(self.staging)):
                self.fs.delete(self.staging)
        except HdfsError:
            pass  # gone already, or not ours to judge: left as it is

    def _give_back(self) -> None:
        try:
            if self.path:
                self._delete_own()
            if not list(self.fs.list_dir(self.staging)):
                self.fs.delete(self.staging)
        except (HdfsError, OSError) as e:
            # FileNotFoundException: the root itself removed (a refused restore's new one)
            if getattr(e, "exception", None) != "FileNotFoundException":
                log.warning("%s: cannot give back the apply's lease (%s); the next apply takes it over once it "
                            "is stale", self.url, e)


def _gone(doc: dict[str, Any], age: float | None, path: str) -> bool:
    """Whether a lease's holder is gone: not renewed for :data:`STALE_S` seconds, or a process of this very
    host (name, boot and pid namespace alike) that no longer runs (its pid free, or another process's now),
    or this process, which does not hold it (``path``) any more."""
    if age is not None and age > STALE_S:
        return True
    me = _identity()
    if any(doc.get(k) != me[k] for k in ("host", "boot", "pidns")) or not isinstance(doc.get("pid"), int):
        return False
    if doc["pid"] == os.getpid():
        return path not in _HELD
    return _start_of(doc["pid"]) != doc.get("start")
