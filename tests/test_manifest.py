"""Manifests: validation of hostile input, and diff as a join (pure, no I/O)."""

from __future__ import annotations

import pytest

from drsync.errors import IntegrityError
from drsync.pathglob import compile_globs
from drsync.repository.manifest import (
    EMPTY_CONTENT,
    Manifest,
    content_digest,
    diff,
    symlink_stays_inside,
    validate,
)

CID = b"\x01" * 32


def build(rows: list[dict]) -> Manifest:
    cols: dict[str, list] = {k: [] for k in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns",
                                             "ctime_ns", "inode", "target", "content", "chunks",
                                             "chunk_sizes")}
    for r in rows:
        typ = r.get("type", "file")
        chunks = r.get("chunks", [CID] if typ == "file" and r.get("size", 5) else [])
        sizes = r.get("chunk_sizes", [r.get("size", 5)] if chunks else [])
        full = {"type": typ, "mode": 0o644, "uid": 0, "gid": 0, "size": r.get("size", 5 if typ == "file" else 0),
                "mtime_ns": 1, "ctime_ns": 1, "inode": 1, "target": None,
                "content": (content_digest(chunks) if chunks else EMPTY_CONTENT) if typ == "file" else None,
                "chunks": chunks, "chunk_sizes": sizes, **r}
        for k in cols:
            cols[k].append(full[k])
    return Manifest.from_columns(cols)


def test_valid_manifest_passes() -> None:
    validate(build([{"path": "d", "type": "dir"}, {"path": "d/f"},
                    {"path": "d/l", "type": "symlink", "target": "f"}]))


@pytest.mark.parametrize("rows, message", [
    ([{"path": "/etc/passwd"}], "unsafe path"),
    ([{"path": "../escape"}], "unsafe path"),
    ([{"path": "d", "type": "dir"}, {"path": "d/../../x"}], "unsafe path"),
    ([{"path": ""}], "unsafe path"),
    ([{"path": "l", "type": "symlink", "target": "/etc/shadow"}], "points outside the data root"),
    ([{"path": "l", "type": "symlink", "target": "../../etc"}], "points outside the data root"),
    ([{"path": "f"}, {"path": "f"}], "appears twice"),
    ([{"path": "nodir/f"}], "has no parent directory entry"),
    ([{"path": "f", "size": 10, "chunk_sizes": [4]}], "chunks add up to 4 bytes, size says 10"),
    ([{"path": "f", "type": "fifo"}], "unknown entry type"),
])
def test_hostile_manifests_are_refused(rows: list[dict], message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        validate(build(rows))


def test_symlink_containment() -> None:
    assert symlink_stays_inside("a/b/link", "../c")
    assert symlink_stays_inside("a/link", "./x/../y")
    assert not symlink_stays_inside("a/link", "../../x")
    assert not symlink_stays_inside("link", "/abs")
    assert not symlink_stays_inside("link", "..")


def test_truncated_manifest_is_an_integrity_error() -> None:
    data = build([{"path": "f"}]).to_bytes()
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        Manifest.from_bytes(data[: len(data) // 2])


def test_newer_format_is_refused() -> None:
    m = build([{"path": "f"}])
    t = m.table.replace_schema_metadata({b"drsync.format": b"99"})
    with pytest.raises(IntegrityError, match="format 99, newer than this drsync"):
        Manifest.from_bytes(Manifest(t).to_bytes())


def test_diff_added_removed_changed() -> None:
    other = b"\x02" * 32
    a = build([{"path": "d", "type": "dir"}, {"path": "d/same"}, {"path": "d/gone"}, {"path": "d/content"},
               {"path": "d/mode"}, {"path": "l", "type": "symlink", "target": "d"}])
    b = build([{"path": "d", "type": "dir"}, {"path": "d/same"}, {"path": "d/new"},
               {"path": "d/content", "chunks": [other]}, {"path": "d/mode", "mode": 0o600},
               {"path": "l", "type": "symlink", "target": "d/same"}])
    d = diff(a, b)
    assert d.added == ["d/new"]
    assert d.removed == ["d/gone"]
    assert d.changed == ["d/content", "d/mode", "l"]
    assert diff(a, a).as_dict() == {"added": [], "removed": [], "changed": []}


def test_diff_type_change_counts_as_changed() -> None:
    a = build([{"path": "x"}])
    b = build([{"path": "x", "type": "dir"}])
    assert diff(a, b).changed == ["x"]


@pytest.mark.parametrize("pattern, path, hit", [
    ("tables/**", "tables/a/b.bin", True),
    ("tables/**", "tables", False),
    ("tables/**", "x/tables/a", False),
    ("*.tmp", "a/b/c.tmp", True),
    ("*.tmp", "c.tmp", True),
    ("logs/*.log", "logs/a.log", True),
    ("logs/*.log", "logs/x/a.log", False),
    ("**/cache", "a/b/cache", True),
    ("**/cache", "cache", True),
])
def test_globs(pattern: str, path: str, hit: bool) -> None:
    assert compile_globs([pattern])(path) is hit
