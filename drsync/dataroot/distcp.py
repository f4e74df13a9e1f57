"""DistCp as the bulk mover between two HDFS data roots (``replication.engine = "distcp"``).

A snapshot captured for DistCp names its files' bytes by HDFS checksum (external rows, see
:func:`drsync.repository.manifest.is_external`) and the HDFS snapshot that holds them. The
standby's apply stages those files with one DistCp job, then checks each staged file against the
manifest before its journaled commit moves anything into the root:

1. a listing file (``SOURCE<TAB>TARGET``, each percent-encoded UTF-8) maps every file's path in
   the source snapshot to its staging name (``.drsync-staging/<n>``);
2. ``replication.distcp_command`` runs with the drsync-distcp jar on ``HADOOP_CLASSPATH`` and
   ``-Ddistcp.copy.listing.class=drsync.distcp.ListedCopyListing`` (stock DistCp keeps only
   basenames when it copies a set of files), block sizes and checksum types preserved (``-pbc``) and
   ``dfs.checksum.combine.mode=COMPOSITE_CRC``, so that DistCp's own copy check holds across
   clusters;
3. every staged file's size and HDFS checksum (WebHDFS GETFILECHECKSUM, computed by a datanode
   from the blocks' stored CRCs, so no byte is read through drsync) must equal the manifest's;
   otherwise nothing is committed (IntegrityError). WebHDFS answers with MD5-of-MD5-of-CRC32C
   (Hadoop 3.5 ignores ``dfs.checksum.combine.mode`` there), which depends on block size and bytes
   per checksum: ``-pbc`` makes the copy keep them (``-pb`` the block size, ``-pc`` the checksum type and
   bytes per checksum; with ``-pb`` alone Hadoop 3.5 writes the copy with the DistCp client's own
   ``dfs.bytes-per-checksum``), so the two sides compare.

The DistCp process can be cancelled (a promotion does not wait for a copy that may take hours):
it is killed, and the apply ends before its journal, leaving the root as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from drsync import allocators
from drsync.dataroot import STAGING, open_data_root
from drsync.errors import IntegrityError, OperationFailed, UsageError
from drsync.liveness import ProcessRef
from drsync.repository.manifest import Entry, hdfs_checksum_digest
from drsync.repository.snapshots import SnapshotInfo
from drsync.text import printable
from drsync.units import human_size

log = logging.getLogger("drsync.distcp")

# A standby's history: its root as applied, kept as HDFS snapshot <prefix><drsync snapshot id>. Not
# a capture's snapshot (drsync-<ms>-<host>-<pid>): a capture never takes it for its own.
HISTORY_PREFIX = "drsync-snap-"
LISTING_CLASS = "drsync.distcp.ListedCopyListing"
LISTING_KEY = "drsync.distcp.listing"
_CHECK_WORKERS = 8
_OUTPUT_TAIL = 40  # lines of DistCp's output kept for an error message
# A listing file names the process that wrote it (host, pid namespace, pid, start time), so that one
# left by a killed agent is removed later by an agent that can tell its writer is gone: of the same
# host and pid namespace (drsync.liveness). The host is written as its letters, digits and dots and a
# hash of the whole name: no '-' (the fields split one way only), no '%' (the name goes into a URI
# for DistCp), and two hosts never share it.
_LISTING = re.compile(r"drsync-distcp-([A-Za-z0-9._]+)-(\d+|x)-([1-9]\d*)-(\d+|x)-[A-Za-z0-9_]+\.lst", re.ASCII)


def _host_token(host: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9.]", "_", host, flags=re.ASCII)[:64]
    return f"{readable}.{hashlib.blake2s(host.encode(errors='surrogateescape'), digest_size=5).hexdigest()}"


def listing_prefix(writer: ProcessRef | None = None) -> str:
    """The name prefix of the DistCp listing files of ``writer`` (default: this process):
    ``drsync-distcp-<host>.<hash>-<pid namespace>-<pid>-<start>-`` (``x`` for what is unknown)."""
    w = writer or ProcessRef.current()
    return f"drsync-distcp-{_host_token(w.host)}-{w.pidns or 'x'}-{w.pid}-{w.start or 'x'}-"


def remove_orphaned_listings(directory: str | None = None) -> list[str]:
    """Remove the DistCp listing files in ``directory`` (default: the temporary directory) whose
    writer is gone, as judged from this host and pid namespace: a SIGKILLed agent cannot remove its
    own, and each names files of production. Left alone: live writers' files (and those whose pid a
    later process has taken are not live), other hosts' and pid namespaces', anything drsync does not
    name so, and directories. A symlink so named is removed, never its target. Returns the paths removed."""
    where = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(where)
    except OSError:
        return removed
    here = socket.gethostname()
    token = _host_token(here)
    for name in names:
        m = _LISTING.fullmatch(name)
        if m is None:
            continue
        host = here if m[1] == token else f"another host ({m[1]})"
        writer = ProcessRef(host, int(m[3]), None if m[4] == "x" else m[4], None if m[2] == "x" else m[2])
        if not writer.judgeable() or writer.alive():
            continue
        path = os.path.join(where, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue  # another agent removed it first, a directory, or not ours to remove
    return removed



def with_generic_options(command: list[str], generic: list[str]) -> list[str]:
    """``command`` (``replication.distcp_command``, split) with Hadoop generic options (``-Dkey=value``)
    where DistCp reads them: before the first option of DistCp's own that follows the word ``distcp``
    (or, without that word, the first option at all), else at the end. Hadoop's GenericOptionsParser
    stops at the first option it does not know: after ``hadoop distcp -m 40`` they were taken for
    source paths ("-Ddfs.checksum.combine.mode=... doesn't exist") and every DistCp copy failed."""
    words = [w.lower() for w in command]
    start = len(words) - words[::-1].index("distcp") if "distcp" in words else 0
    at = next((i for i in range(start, len(command)) if command[i].startswith("-")), len(command))
    return [*command[:at], *generic, *command[at:]]

class Cancelled(OperationFailed):
    """The copy was stopped on purpose (a promotion); the root is unchanged."""


@dataclass(frozen=True)
class DistCpSettings:
    """How this agent runs DistCp (the ``[replication]`` keys of the same names).

    ``command``: the words that start DistCp (``hadoop distcp`` on a Hadoop client host); extra
    DistCp options (``-m 50``, ``-bandwidth 100``) may follow. ``jar``: drsync-distcp.jar (built
    from ``java/distcp``). ``url``: this cluster's data root (its HDFS path ``root``) as a Hadoop URI
    for DistCp jobs (e.g. ``hdfs://prod-ns/data``); empty: ``webhdfs://<active namenode><root>``.
    """

    command: tuple[str, ...] = ("hadoop", "distcp")
    jar: str = ""
    url: str = ""
    root: str = ""  # the HDFS path ``url`` stands for: other roots (a restore's target) get the default

    @classmethod
    def from_strings(cls, command: str, jar: str, url: str, root: str = "") -> DistCpSettings:
        return cls(tuple(shlex.split(command)), jar, url.rstrip("/"), root.rstrip("/") or "/")

    def problems(self) -> list[str]:
        """What keeps DistCp from running here, as one line each (for ``config check`` and startup)."""
        out = []
        if not self.command:
            out.append("replication.distcp_command is empty: set it to 'hadoop distcp'")
        elif "/" not in self.command[0] and not shutil.which(self.command[0]):
            out.append(f"replication.distcp_command: {self.command[0]!r} is not on PATH; install a Hadoop "
                       f"client on this host or give the full path")
        elif "/" in self.command[0] and not os.access(self.command[0], os.X_OK):
            out.append(f"replication.distcp_command: {self.command[0]} does not exist or is not executable; "
                       f"install a Hadoop client there or correct the path")
        if not self.jar:
            out.append("replication.distcp_jar is not set: point it at drsync-distcp.jar (make hadoop builds "
                       "java/distcp/target/drsync-distcp.jar)")
        elif not os.path.isfile(self.jar):
            out.append(f"replication.distcp_jar {self.jar} does not exist: build it with 'make hadoop' or copy it "
                       f"to this host")
        return out


def root_url(settings: DistCpSettings, root: object) -> str:
    """The Hadoop URI of a data root for DistCp: ``distcp_url`` for the configured data root (the RPC
    URI is faster and keeps names exactly as asked); else WebHDFS at the active namenode."""
    if settings.url and (not settings.root or root.root.rstrip("/") == settings.root.rstrip("/")):  # type: ignore[attr-defined]
        return settings.url
    fs, path = root.fs, root.root  # type: ignore[attr-defined]
    return f"webhdfs://{fs.active_namenode()}{path}"


def content_source(info: SnapshotInfo, data_root: str | None, settings: DistCpSettings) -> str:
    """Where DistCp finds a snapshot's bytes: the history snapshot ``drsync-snap-<id>`` of ``data_root``
    (a standby's own root, where it applied it: it stays while the drsync snapshot does), else the HDFS
    snapshot production kept when it captured it (gone once a newer capture replaced it)."""
    if data_root:
        root = open_data_root(data_root)
        history = getattr(root, "history_snapshots", None)
        if history is not None and f"{HISTORY_PREFIX}{info.id}" in history():
            return f"{root_url(settings, root)}/.snapshot/{HISTORY_PREFIX}{info.id}"
    if not info.content_snapshot:
        raise UsageError(f"snapshot {info.id} names no HDFS snapshot that holds its bytes")
    return info.content_snapshot


class DistCpStager:
    """Stages a snapshot's external rows into an HDFS data root with one DistCp job.

    ``source``: Hadoop URI of the directory the rows' paths are relative to (the primary's kept
    HDFS snapshot, ``.../.snapshot/drsync-...``). ``cancel``: set it to stop the job. ``when_gone``: what
    to do when that HDFS snapshot is gone (the caller knows: a shipment, a restore, a promotion).
    """

    def __init__(self, settings: DistCpSettings, source: str, *, cancel: threading.Event | None = None,
                 what: str = "snapshot", algorithm: str = "", when_gone: str = "") -> None:
        if not source:
            raise IntegrityError(f"{what} holds files whose bytes only DistCp can copy, but names no HDFS snapshot "
                                 f"to copy them from")
        self.settings = settings
        self.source = source.rstrip("/")
        self.cancel = cancel or threading.Event()
        self.what = what
        self.algorithm = algorithm
        self.when_gone = when_gone or ("restore or promote to a snapshot a standby applied (its data root keeps "
                                       "each as HDFS snapshot drsync-snap-<id>), or to a newer one")

    def stage(self, root: object, items: list[tuple[int, Entry]],
              progress: Callable[[int], None] | None = None) -> dict[str, str]:
        """Copy each ``(n, entry)`` to the root's ``.drsync-staging/<n>`` and check it; returns
        ``{path: staged path relative to the root}``. Raises IntegrityError (a staged file differs
        from the manifest), OperationFailed (DistCp failed), Cancelled."""
        if not items:
            return {}
        problems = self.settings.problems()
        if problems:
            raise UsageError(f"{self.what}: {problems[0]}")
        # A directory of this copy's own: a DistCp job orphaned by a crash (on YARN a job outlives
        # its client) can only write where no later apply looks.
        sub = f"distcp-{secrets.token_hex(6)}"
        target = f"{root_url(self.settings, root)}/{STAGING}/{sub}"
        if "webhdfs://" in (self.source + target).lower():
            odd = next((e.path for _, e in items if not unicodedata.is_normalized("NFC", e.path)), None)
            if odd is not None:  # Hadoop's WebHDFS client follows a redirect that composes the name
                raise OperationFailed(f"{self.what}: {printable(odd)} has a name in decomposed Unicode, which DistCp "
                                      f"over WebHDFS reads as its composed twin; set replication.distcp_url on both "
                                      f"agents to the cluster's RPC URI (hdfs://nameservice/path); nothing was "
                                      f"committed")
        started = time.monotonic()
        listing = self._write_listing(items)
        try:
            self._run(listing, target, getattr(getattr(root, "location", None), "user", None))
        finally:
            os.unlink(listing)
        staged = self._verify(root, sub, items)
        if progress:
            progress(sum(e.size for _, e in items))
        log.info("%s: DistCp copied %d file(s), %s, from %s in %.1fs; sizes and HDFS checksums match",
                 self.what, len(items), human_size(sum(e.size for _, e in items)), self.source,
                 time.monotonic() - started)
        return staged

    def _write_listing(self, items: list[tuple[int, Entry]]) -> str:
        """The listing file DistCp reads (its path); none is left behind when it cannot be written."""
        remove_orphaned_listings()
        f = tempfile.NamedTemporaryFile("w", encoding="utf-8", prefix=listing_prefix(), suffix=".lst",  # noqa: SIM115
                                        delete=False)
        try:
            with f:
                for n, e in items:
                    f.write(f"{quote(e.path, safe='')}\t{n}\n")
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(f.name)
            raise OperationFailed(f"{self.what}: cannot write DistCp's listing file in {os.path.dirname(f.name)}: "
                                  f"{err.strerror or err}; free space there (or point TMPDIR elsewhere); nothing "
                                  f"was committed") from None
        return f.name

    def _run(self, listing: str, target: str, user: str | None) -> None:
        s = self.settings
        # COMPOSITE_CRC lets DistCp's own check compare across block sizes, but only where both sides are
        # read over RPC: a WebHDFS side answers MD5-of-MD5-of-CRC32C whatever the client asks, which
        # matches the other side's only in that form: -pb keeps the block size and -pc the checksum type and
        # bytes per checksum (without -pc the copy gets the DistCp client's dfs.bytes-per-checksum).
        mode = "MD5MD5CRC" if "webhdfs://" in (self.source + target) else "COMPOSITE_CRC"
        generic = [f"-D{LISTING_KEY}=file://{listing}", f"-Ddistcp.copy.listing.class={LISTING_CLASS}",
                   f"-Ddfs.checksum.combine.mode={mode}"]
        args = [*with_generic_options(s.command, generic), "-pbc", self.source, target]
        env = allocators.environ_for_children()
        env["HADOOP_CLASSPATH"] = ":".join(p for p in (s.jar, env.get("HADOOP_CLASSPATH", "")) if p)
        if user:  # simple authentication: DistCp acts as the user the data root's URL names
            env.setdefault("HADOOP_USER_NAME", user)
        log.info("%s: running DistCp from %s: %s", self.what, self.source, shlex.join(args))
        setpriv = shutil.which("setpriv")
        if setpriv:  # DistCp (its JVM) dies with the agent: a kill -9 leaves no copy running on
            args = [setpriv, "--pdeathsig", "KILL", "--", *args]
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, text=True, errors="replace")
        except OSError as e:
            raise OperationFailed(f"{self.what}: cannot start DistCp ({shlex.join(s.command)}): {e.strerror or e}; "
                                  f"set replication.distcp_command") from None
        tail: list[str] = []
        exceptions: list[str] = []  # every exception line (the first is often the cause), bounded

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.debug("distcp: %s", line.rstrip())
                if line.lstrip().startswith("at ") or "ExitUtil" in line:
                    continue  # stack frames and the exit note: the cause is on the lines before
                tail.append(line.rstrip())
                del tail[:-_OUTPUT_TAIL]
                if "Exception: " in line and len(exceptions) < _OUTPUT_TAIL:
                    exceptions.append(line.rstrip())

        reader = threading.Thread(target=read, name="drsync-distcp-output", daemon=True)
        reader.start()
        while proc.poll() is None:
            if self.cancel.wait(0.2):
                _kill(proc)
                reader.join(5)
                raise Cancelled(f"{self.what}: DistCp stopped (the standby is being promoted); nothing was "
                                f"committed")
        reader.join(5)
        if proc.returncode != 0:
            text = "\n".join(exceptions + tail)
            if ".snapshot" in self.source and "source root" in text and "does not exist" in text:
                raise OperationFailed(f"{self.what}: the HDFS snapshot to copy from ({self.source}) is gone (a newer "
                                      f"capture replaced it); nothing was committed; {self.when_gone}")
            if mode == "MD5MD5CRC" and "Checksum mismatch" in text:
                # Over WebHDFS the standby's datanodes write the copy with their own bytes per checksum
                # (WebHDFS has no way to ask for another), and MD5-of-MD5-of-CRC checksums of different
                # bytes per checksum never match: no copy of such a file can be verified this way.
                raise OperationFailed(
                    f"{self.what}: DistCp's copy does not match production's checksums: production's files use "
                    f"another dfs.bytes-per-checksum than this cluster's datanodes, which a copy over WebHDFS "
                    f"cannot keep; set replication.distcp_url to the standby's hdfs:// address (RPC, COMPOSITE_CRC "
                    f"checksums) or the same dfs.bytes-per-checksum on both clusters; nothing was committed")
            cause = _cause(exceptions + tail)[:400]
            raise OperationFailed(f"{self.what}: DistCp failed (exit {proc.returncode}): {cause}; nothing was "
                                  f"committed (run with --debug for its whole output)")

    def _verify(self, root: object, sub: str, items: list[tuple[int, Entry]]) -> dict[str, str]:
        fs = root.fs  # type: ignore[attr-defined]

        def check(item: tuple[int, Entry]) -> str | None:
            n, e = item
            rel = f"{STAGING}/{sub}/{n}"
            path = posixpath.join(root.root, rel)  # type: ignore[attr-defined]
            st = fs.status(path)
            if st is None:
                return f"{printable(e.path)}: not copied"
            if int(st["length"]) != e.size:
                return f"{printable(e.path)}: {st['length']} bytes copied, the snapshot says {e.size}"
            algorithm, value = fs.file_checksum(path)
            if hdfs_checksum_digest(algorithm, value) != e.content:
                theirs = set(self.algorithm.split(",")) - {""}
                hint = (f" (checksum {algorithm} here, {self.algorithm} on the source: the clusters use other "
                        f"checksum types or dfs.bytes-per-checksum)" if theirs and algorithm not in theirs else "")
                return f"{printable(e.path)}: HDFS checksum differs from the snapshot's{hint}"
            root.finish_staged(rel, e)  # type: ignore[attr-defined]
            return None

        with ThreadPoolExecutor(max_workers=_CHECK_WORKERS, thread_name_prefix="drsync-distcp-check") as pool:
            bad = [p for p in pool.map(check, items) if p]
        if bad:
            raise IntegrityError(f"{self.what}: {len(bad)} file(s) copied by DistCp do not match the snapshot "
                                 f"({'; '.join(bad[:3])}); nothing was committed. A file being written when "
                                 f"it was captured changes like this: the next snapshot is tried")
        return {e.path: f"{STAGING}/{sub}/{n}" for n, e in items}


# DistCp's own summaries of a failure: the cause is an earlier exception line.
_SUMMARIES = ("DistCp failure", "has failed", "Job failed", "Task failed")


def _cause(lines: list[str]) -> str:
    """The most telling line of DistCp's output: the first exception that is not one of DistCp's
    summaries (a permission denied, a missing file), else the last exception, else an ERROR line.
    A denied permission says what to do about it."""
    found: list[str] = []
    for line in lines:
        exc, sep, message = line.partition("Exception: ")
        if sep and message.strip():
            words = exc.split()
            name = words[-1].rsplit(".", 1)[-1].rsplit("$", 1)[-1] if words else ""
            found.append(f"{name}Exception: {message.strip()}")
    cause = next((f for f in found if not any(s in f for s in _SUMMARIES)), found[-1] if found else "")
    if "AccessControlException" in cause or "Permission denied" in cause:
        return (f"{cause} (the user DistCp runs as, the standby data root's ?user=, must read production's "
                f"snapshot: grant it read access there)")
    return cause or next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "no output").strip()


def _kill(proc: subprocess.Popen[str]) -> None:
    """Stop DistCp and the JVMs it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue
