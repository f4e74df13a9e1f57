"""The data root's own metadata in a manifest: key-value metadata ``drsync.root`` (docs/FORMAT.md).

The root is not a row of the manifest (every row is a path below it), so its mode, owner, time and
extended attributes ride in the Parquet file's key-value metadata, a JSON object::

    {"mode": 488, "uid": 0, "gid": 0, "mtime_s": 1764581400, "mtime_nsec": 0, "xattrs": "<hex>" | null}

A reader that does not know the key ignores it (an older drsync restores such a snapshot as before);
a manifest without it (written before 2026-12, or built by hand) restores the root as before: made
with the process's default mode, its metadata never set. A value of another shape makes the manifest
damaged (IntegrityError).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import pyarrow as pa

from drsync.errors import IntegrityError
from drsync.repository.manifest import DIR, Entry, decode_xattrs

if TYPE_CHECKING:
    from drsync.repository.manifest import Manifest, ManifestFile

ROOT_KEY = b"drsync.root"
_U32 = 1 << 32
_I64 = 1 << 63
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


def encode(e: Entry) -> bytes:
    """``e`` (the root's metadata, path "") as the value of :data:`ROOT_KEY`."""
    return json.dumps({"mode": e.mode, "uid": e.uid, "gid": e.gid, "mtime_s": e.mtime_ns // 1_000_000_000,
                       "mtime_nsec": e.mtime_ns % 1_000_000_000,
                       "xattrs": e.xattrs.hex() if e.xattrs else None}, sort_keys=True).encode()


def with_root(schema: pa.Schema, e: Entry | None) -> pa.Schema:
    """``schema`` carrying ``e`` as the root's metadata (``e`` None: without any)."""
    meta = {k: v for k, v in (schema.metadata or {}).items() if k != ROOT_KEY}
    if e is not None:
        meta[ROOT_KEY] = encode(e)
    return schema.with_metadata(meta)


def parse(meta: dict[bytes, bytes] | None, what: str) -> Entry | None:
    """The root's metadata in a manifest's key-value metadata ``meta``, as an entry of path "" and type
    ``dir``; None when it has none. IntegrityError when the value is not what :func:`encode` writes."""
    raw = (meta or {}).get(ROOT_KEY)
    if raw is None:
        return None

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{what} is damaged: its root metadata ({ROOT_KEY.decode()}) {why}")

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("a key twice")
        return dict(pairs)

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        if raw[:1] != b"{" or raw[-1:] != b"}":  # what encode writes: no byte order mark, no white space around
            raise ValueError("not an object alone")
        doc = json.loads(raw, object_pairs_hook=unique, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad("is not JSON, or names a key twice") from None
    keys = {"mode", "uid", "gid", "mtime_s", "mtime_nsec", "xattrs"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise bad(f"does not have exactly the keys {', '.join(sorted(keys))}")
    for name, lo, hi in (("mode", 0, 0o7777 + 1), ("uid", 0, _U32), ("gid", 0, _U32), ("mtime_s", -_I64, _I64),
                         ("mtime_nsec", 0, 1_000_000_000)):
        v = doc[name]
        if type(v) is not int or not lo <= v < hi:
            raise bad(f"has {name} {v!r}, not an integer in [{lo}, {hi})")
    blob: bytes | None = None
    if doc["xattrs"] is not None:
        if not isinstance(doc["xattrs"], str) or not _HEX.fullmatch(doc["xattrs"]):
            raise bad("has extended attributes that are not a non-empty lowercase hex string")
        blob = bytes.fromhex(doc["xattrs"])
        try:
            decode_xattrs(blob)
        except IntegrityError as e:
            raise bad(str(e)) from None
    return Entry("", DIR, doc["mode"], doc["uid"], doc["gid"], 0, doc["mtime_s"] * 1_000_000_000 + doc["mtime_nsec"],
                 None, [], [], blob)


def root_of(manifest: Manifest | ManifestFile, what: str = "manifest") -> Entry | None:
    """The root's metadata ``manifest`` carries (None: none). IntegrityError when damaged."""
    source = getattr(manifest, "source", None)
    if source is not None:  # a lean manifest: its file's schema (the table was rebuilt from its groups)
        manifest = source
    schema = manifest.schema if hasattr(manifest, "schema") else manifest.table.schema  # type: ignore[union-attr]
    return parse(schema.metadata, what)


def same_but_time(a: Entry | None, b: Entry | None) -> bool:
    """Whether two roots' metadata are alike in all but their time (mode, owner, attributes; None: none
    recorded). A root's time moves with what drsync itself does there (an HDFS snapshot taken of it, a staging
    area made and removed), so it alone is no change worth an apply."""
    if a is None or b is None:
        return a is b
    return (a.mode, a.uid, a.gid, a.xattrs or None) == (b.mode, b.uid, b.gid, b.xattrs or None)
