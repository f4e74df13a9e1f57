"""Snapshot metadata: the small JSON document that makes a snapshot exist."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from drsync.errors import IntegrityError
from drsync.repository import format as fmt


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def new_snapshot_id() -> str:
    return secrets.token_hex(8)


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
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> SnapshotInfo:
        try:
            doc = json.loads(data)
            version = int(doc.get("format", 0))
            if version > fmt.FORMAT_VERSION:
                raise IntegrityError(f"{what} uses format {version}, newer than this drsync understands "
                                     f"({fmt.FORMAT_VERSION}); upgrade drsync")
            doc.pop("expires_at", None)
            doc["captured_at"] = parse_iso(doc["captured_at"])
            return cls(**doc)
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{what} is damaged: {e}") from None
