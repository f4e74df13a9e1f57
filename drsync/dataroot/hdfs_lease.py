"""One apply at a time onto an HDFS root, whichever host it runs on: a lease file on HDFS itself.

The host lock of an apply (:class:`drsync.flocks.ApplyLock`) keeps two applies of one host apart. An HDFS
root is reached from many hosts: a standby agent applying on one edge node and an operator's restore on
another would empty each other's staging area and leave a root that matches neither snapshot (safety
rule 2). So an apply onto an HDFS root also holds ``<root>/.drsync-staging/lease``:

- taken by an exclusive CREATE (the namenode lets one client make a path: ``overwrite=false``), holding
  the host, process id, what the apply is, and a token of its own (a CREATE retried after a lost answer
  finds its own token, and holds);
- renewed every :data:`RENEW_S` seconds while held (its modification time, set by the namenode's clock);
- taken over when its holder is gone: a process of this host that no longer runs, or a lease not renewed
  for :data:`STALE_S` seconds by the namenode's clock (a host that crashed or lost its network). Taking
  over deletes it and creates it anew; between a look and the delete another host could have taken over
  first, a window of one round trip, as in restic's lock discipline;
- given back (deleted) when the apply ends, with the staging directory when nothing else is left in it.

The staging area's reset and removal leave the lease alone (:mod:`drsync.dataroot.hdfs`).
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

LEASE_NAME = "lease"
RENEW_S = 30.0  # seconds between renewals of a held lease
STALE_S = 300.0  # seconds without a renewal (namenode clock) after which another host takes a lease over


def holder_words(doc: dict[str, Any], age_s: float | None) -> str:
    """How a lease's holder is named in a refusal: what, pid, host and when it was last renewed."""
    renewed = f", renewed {age_s:.0f} s ago" if age_s is not None else ""
    return (f"another drsync apply ({printable(str(doc.get('what', '?')))}, pid {doc.get('pid', '?')} on host "
            f"{printable(str(doc.get('host', '?')))}{renewed})")


class RootLease:
    """The lease of one apply onto the HDFS root ``root`` (a path) through ``fs``: :meth:`hold`."""

    def __init__(self, fs: HdfsFs, staging: str, url: str) -> None:
        self.fs = fs
        self.url = url
        self.staging = staging
        self.path = posixpath.join(staging, LEASE_NAME)
        self._stop = threading.Event()

    @contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Hold the lease for the ``with`` body; :class:`drsync.flocks.ApplyBusy` (exit 1, nothing changed;
        logged at WARNING) when another apply holds it."""
        token = secrets.token_hex(8)
        self._take(what, token)
        renewer = threading.Thread(target=self._renew, name="drsync-hdfs-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            self._stop.set()
            renewer.join()
            self._give_back(token)

    def holder(self) -> str | None:
        """Who holds the lease now and is not gone (:func:`holder_words`), or None: what a dry run says."""
        found = self._read()
        if found is None:
            return None
        doc, age = found
        return None if self._gone(doc, age) else holder_words(doc, age)

    # --- the steps --------------------------------------------------------------------

    def _take(self, what: str, token: str) -> None:
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": what, "token": token,
                           "since": time.time()}).encode()
        self.fs.mkdirs(self.staging, 0o700)
        for attempt in range(2):
            try:
                self.fs.write(self.path, body, overwrite=False, permission=0o600)
                return
            except HdfsError as e:
                if e.exception != "FileAlreadyExistsException":
                    raise
            found = self._read()
            if found is None:
                continue  # given back meanwhile
            doc, age = found
            if doc.get("token") == token:
                return  # our own CREATE, made before its answer was lost
            if attempt or not self._gone(doc, age):
                busy = ApplyBusy(what, f"{holder_words(doc, age)} is writing to {printable(self.url)}")
                log.warning("%s", busy)
                raise busy
            log.warning("%s: taking over the lease of %s, which is gone", self.url, holder_words(doc, age))
            self.fs.delete(self.path)

    def _read(self) -> tuple[dict[str, Any], float | None] | None:
        """The lease's document and seconds since its last renewal (namenode clock), or None: no lease."""
        status = self.fs.status(self.path)
        if status is None:
            return None
        try:
            doc = json.loads(self.fs.read(self.path))
        except HdfsError as e:
            if e.exception == "FileNotFoundException":
                return None
            raise
        except ValueError:
            doc = {}  # cut short while written: judged by its age alone
        now = self.fs.server_time()
        age = None if now is None else max(0.0, now - int(status["modificationTime"]) / 1000)
        return (doc if isinstance(doc, dict) else {}), age

    @staticmethod
    def _gone(doc: dict[str, Any], age: float | None) -> bool:
        """Whether a lease's holder is gone: a process of this host that no longer runs, or no renewal for
        :data:`STALE_S` seconds."""
        if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
            try:
                os.kill(doc["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # runs, as another user
            else:
                return doc["pid"] == os.getpid()  # this process holds no lease it does not know of
        return age is not None and age > STALE_S

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                now = self.fs.server_time()  # staleness is judged by the namenode's clock
                self.fs.set_times(self.path, int((now if now is not None else time.time()) * 1e9))
            except (HdfsError, OSError) as e:
                log.warning("%s: cannot renew the apply's lease (%s); another host may take it over after %d s",
                            self.url, e, STALE_S)

    def _give_back(self, token: str) -> None:
        try:
            found = self._read()
            if found is not None and found[0].get("token") == token:
                self.fs.delete(self.path)
            if not list(self.fs.list_dir(self.staging)):
                self.fs.delete(self.staging)
        except HdfsError as e:
            if e.exception != "FileNotFoundException":  # the root itself removed (a refused restore's new one)
                log.warning("%s: cannot give back the apply's lease (%s); the next apply takes it over once it "
                            "is stale", self.url, e)
        except OSError as e:
            log.warning("%s: cannot give back the apply's lease (%s); the next apply takes it over once it is "
                        "stale", self.url, e)
