"""Snapshot metadata: the small JSON document that makes a snapshot exist."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from drsync import documents, volumes
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.units import iso_time, parse_iso


class AmbiguousRef(ValueError):
    """A snapshot reference that fits more than one snapshot (the callers turn it into a UsageError)."""


def pick_by_ref(ref: str, items: list[Any], *, id_of: Callable[[Any], str],
                name_of: Callable[[Any], str]) -> Any | None:
    """The one of ``items`` (oldest first) that ``ref`` names, by the rules every command shares: a full
    id; ``latest`` (the last item); a name (the newest of that name); or an id prefix of 4+ characters that
    fits one id. None when nothing fits. :class:`AmbiguousRef` (naming the candidates) when a prefix fits
    several ids, or when ``ref`` is a name and also the start of other snapshots' ids. Pure."""
    exact = [x for x in items if id_of(x) == ref]
    if exact:
        return exact[0]
    if ref == "latest":
        return items[-1] if items else None
    named = [x for x in items if name_of(x) == ref]
    prefixed = [x for x in items if len(ref) >= 4 and id_of(x).startswith(ref)]
    others = [x for x in prefixed if name_of(x) != ref]
    if named and others:  # which one was meant cannot be told
        raise AmbiguousRef(f"snapshot {ref!r} is ambiguous: it is the name of {id_of(named[-1])} and the start of "
                           f"{', '.join(id_of(x) for x in others)}; give the full id")
    if named:
        return named[-1]
    if len(prefixed) > 1:
        raise AmbiguousRef(f"snapshot {ref!r} is ambiguous: it matches {', '.join(id_of(x) for x in prefixed)}")
    return prefixed[0] if prefixed else None


def iso(ts: float | None) -> str | None:
    return None if ts is None else iso_time(ts)


def new_snapshot_id() -> str:
    return secrets.token_hex(8)


def clip_warning(line: str, limit: int = fmt.WARNING_MAX_CHARS) -> str:
    """``line`` cut to at most ``limit`` characters (1 KiB by default) by an ellipsis in its middle: a
    warning is "path: what is wrong", and a very long path must not cut off what is wrong."""
    if len(line) <= limit:
        return line
    head = limit // 3
    return line[:head] + "\u2026" + line[len(line) - (limit - head - 1):]


class WarningLog:
    """The warnings of one capture in O(``keep``) memory: how many there were, and the first ``keep``
    (20 by default, ``fmt.WARNING_SAMPLE``), each clipped to ``fmt.WARNING_MAX_CHARS`` characters.

    A tree with a million unreadable files costs a count, not a million strings. Iterating yields
    the kept sample; :meth:`lines` adds a line counting the rest (what a snapshot document stores).
    """

    __slots__ = ("count", "keep", "sample")

    def __init__(self, lines: Iterable[str] = (), keep: int = fmt.WARNING_SAMPLE) -> None:
        self.count = 0
        self.keep = keep
        self.sample: list[str] = []
        self.extend(lines)

    def append(self, line: str) -> None:
        self.count += 1
        if len(self.sample) < self.keep:
            self.sample.append(clip_warning(line))

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.append(line)

    def merge(self, other: WarningLog) -> None:
        """Add ``other``'s warnings after these (its sample and its count)."""
        self.extend(other.sample)
        self.count += other.count - len(other.sample)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.sample)

    def lines(self) -> list[str]:
        """The sample, and "... and N more" when there were more than it keeps."""
        more = self.count - len(self.sample)
        return [*self.sample, f"... and {more} more"] if more > 0 else list(self.sample)


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    captured_at: float
    cluster_id: str
    release: str
    manifest_hash: str
    name: str = ""
    reason: str = ""
    kind: str = "manual"  # manual | periodic | cycle | received
    ttl_s: float | None = None
    source: str = ""
    parent: str | None = None
    files: int = 0
    bytes: int = 0
    new_bytes: int = 0
    read_bytes: int = 0
    reused_files: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    format: int = fmt.FORMAT_VERSION
    stale_paths: int = 0    # paths that exist but could not be read: kept at their last version
    skipped_paths: int = 0  # paths that could not be captured at all (reported in warnings)
    # Position in this repository's history, given by Repository.commit_snapshot: 1 + the highest
    # seq in the repository. 0 = unknown (a document written before drsync numbered snapshots).
    seq: int = 0
    # replication.engine = "distcp": the HDFS snapshot (a Hadoop URI) holding the bytes of the
    # manifest's external rows, and the checksum algorithm their content digests come from.
    content_snapshot: str = ""
    content_checksum: str = ""
    # Filesystems mounted inside the data root at capture -> the files on each (drsync.volumes); the
    # next capture keeps a volume's files when it is unmounted or empty. Written only when not empty.
    volumes: dict[str, int] = field(default_factory=dict)
    # The filesystem a local data root lay on, off the host's root filesystem: {"host": H, "mount_point": M}
    # (drsync.volumes.root_volume_gone). Written only when set.
    root_volume: dict[str, str] = field(default_factory=dict)

    @property
    def order_key(self) -> tuple[int, float, str]:
        """Where this snapshot sorts in its repository, oldest first: by ``seq``, never by the clock.

        Documents without a seq (0) come before every numbered one, among themselves by capture
        time. Two commits that overlapped may share a seq; capture time and id order them.
        """
        return (self.seq, self.captured_at, self.id)

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl_s is None else self.captured_at + self.ttl_s

    def is_expired(self, now: float) -> bool:
        exp = self.expires_at
        return exp is not None and exp <= now

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["captured_at"] = iso(self.captured_at)
        doc["expires_at"] = iso(self.expires_at)
        return doc

    def to_bytes(self) -> bytes:
        """The snapshot document. Without a seq (0) it has no ``seq`` key, as older versions wrote it."""
        doc = self.to_json()
        if not self.seq:
            del doc["seq"]
        if not self.volumes:
            del doc["volumes"]
        if not self.root_volume:
            del doc["root_volume"]
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> SnapshotInfo:
        """Parse a snapshot document (from a repository or a peer), at most ``SNAPSHOT_DOC_MAX_BYTES``
        (1 MiB); its warnings come back as a capture stores them: at most ``WARNING_SAMPLE`` lines, each
        clipped to ``WARNING_MAX_CHARS``, and a line counting the rest. Raises IntegrityError."""
        if len(data) > fmt.SNAPSHOT_DOC_MAX_BYTES:
            raise IntegrityError(f"{what} is {len(data)} bytes; a snapshot document is at most "
                                 f"{fmt.SNAPSHOT_DOC_MAX_BYTES} bytes (docs/FORMAT.md, Limits); it was not read")
        try:
            doc = documents.loads(data)
            version = int(doc.get("format", 0))
            if version > fmt.FORMAT_VERSION:
                raise IntegrityError(f"{what} uses format {version}, newer than this drsync understands "
                                     f"({fmt.FORMAT_VERSION}); upgrade drsync")
            doc.pop("expires_at", None)
            doc["captured_at"] = parse_iso(doc["captured_at"])
            info = cls(**doc)
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            raise IntegrityError(f"{what} is damaged: {e}") from None
        info.check_types(what)
        ws = info.warnings
        if len(ws) > fmt.WARNING_SAMPLE + 1 or any(len(w) > fmt.WARNING_MAX_CHARS for w in ws):
            # What a capture stores (WarningLog.lines): the first WARNING_SAMPLE, clipped, and a count of
            # the rest; a document from a peer or a damaged disk keeps no more than that.
            kept = [clip_warning(w) for w in ws[:fmt.WARNING_SAMPLE]]
            rest = ws[fmt.WARNING_SAMPLE:]
            kept += [clip_warning(rest[0])] if len(rest) == 1 else [f"... and {len(rest)} more"] if rest else []
            info = dataclasses.replace(info, warnings=kept)
        return info

    def check_types(self, what: str) -> None:
        """Every field has its type (a document from a peer or a damaged disk may say anything)."""
        def bad(name: str) -> IntegrityError:
            return IntegrityError(f"{what} is damaged: {name} has the wrong type or form ({getattr(self, name)!r})")

        for name in ("id", "cluster_id", "release", "manifest_hash", "name", "reason", "kind", "source",
                     "content_snapshot", "content_checksum"):
            if not isinstance(getattr(self, name), str):
                raise bad(name)
        for name in ("files", "bytes", "new_bytes", "read_bytes", "reused_files", "format", "stale_paths",
                     "skipped_paths", "seq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(name)
        if self.seq < 0:
            raise bad("seq")
        for name in ("duration_s", "ttl_s"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise bad(name)
        if self.parent is not None and not isinstance(self.parent, str):
            raise bad("parent")
        if not isinstance(self.warnings, list) or not all(isinstance(w, str) for w in self.warnings):
            raise bad("warnings")
        if not fmt.is_valid_snapshot_id(self.id):  # it becomes a file name: never a path
            raise bad("id")
        if not isinstance(self.volumes, dict) or not all(
                volumes.valid_mount_point(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.volumes.items()):
            raise bad("volumes")
        if not volumes.valid_root_volume(self.root_volume):
            raise bad("root_volume")
