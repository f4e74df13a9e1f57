"""A capture whose rows are all the parent's stores the parent's manifest bytes instead of encoding every row
again (``capture._Unchanged``); the first window that differs has the rows before it written from the parent.

The oracle is the ordinary path: the same capture, of the same tree state against the same parent, with the
shortcut switched off, must give the same bytes, whatever changed and wherever it lies (first, middle or last
window; the root's own metadata; a row dropped or added at either end). Windows and row groups are small, so
that a 2,000-entry tree spans many of each and windows straddle groups."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from drsync import capture, engine, tree
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository import manifest as manifest_mod
from drsync.repository.manifest import ManifestFile, ManifestWriter
from drsync.repository.repo import Repository
from drsync.repository.spool import Spool
from drsync.storage.memory import MemoryStorage

PAST = 1_600_000_000


@pytest.fixture(autouse=True)
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 300)
    monkeypatch.setattr(capture, "_WINDOW", 128)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 50)


def build(root: Path) -> None:
    for d in range(8):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(250):
            (sub / f"f{i:04}").write_bytes(f"{d}-{i}".encode() * (1 + i % 7))
    (root / "d3" / "lnk").symlink_to("f0001")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (PAST, PAST), follow_symlinks=False)


def capture_against(repo: Repository, root: Path, parent_id: str, *, shortcut: bool,
                    monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The manifest bytes of a capture of ``root`` against snapshot ``parent_id``, with or without the
    shortcut (its chunks written to ``repo``, nothing committed)."""
    parent = repo.find_snapshot(parent_id)
    with monkeypatch.context() as m:
        if not shortcut:
            m.setattr(capture._Unchanged, "of", classmethod(lambda cls, *a: None))
        with repo.write_session() as session:
            writer = session.chunk_writer()
            result = capture.capture(str(root), writer, parent=repo.open_manifest(parent),
                                     parent_captured_at=parent.captured_at)
            writer.flush()
            with result.stored:
                return result.stored.getvalue()


def first_snapshot(tmp_path: Path) -> tuple[Repository, Path, str]:
    root = tmp_path / "data"
    build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    return repo, root, info.id


def test_an_unchanged_capture_stores_the_parents_bytes_as_the_writer_would(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = first_snapshot(tmp_path)
    parent_bytes = repo.manifest_bytes(repo.find_snapshot(first))
    assert ManifestFile(parent_bytes).num_groups > 5  # many groups, many windows
    fast = capture_against(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
    slow = capture_against(repo, root, first, shortcut=False, monkeypatch=monkeypatch)
    assert fast == slow == parent_bytes
    again = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert again.manifest_hash == repo.find_snapshot(first).manifest_hash
    assert again.reused_files == again.files and again.read_bytes == 0


def _rewrite(path: Path) -> None:
    path.write_bytes(b"changed " + path.read_bytes())
    os.utime(path, (PAST, PAST))


CHANGES: dict[str, Callable[[Path], None]] = {
    "first file rewritten": lambda r: _rewrite(r / "d0" / "f0000"),
    "a middle file rewritten": lambda r: _rewrite(r / "d4" / "f0123"),
    "the last file rewritten": lambda r: _rewrite(r / "d7" / "f0249"),
    "a mode changed": lambda r: (r / "d5" / "f0010").chmod(0o600),
    "a directory's time moved": lambda r: os.utime(r / "d6", (PAST + 5, PAST + 5)),
    "the root's mode changed": lambda r: r.chmod(0o711),
    "the root's time moved": lambda r: os.utime(r, (PAST + 9, PAST + 9)),
    "the last file removed": lambda r: (r / "d7" / "f0249").unlink(),
    "the first file removed": lambda r: (r / "d0" / "f0000").unlink(),
    "a file added past the last": lambda r: (r / "zz-last").write_bytes(b"new"),
    "a file added before the first": lambda r: (r / "a-first").write_bytes(b"new"),
    "a hard link added": lambda r: os.link(r / "d2" / "f0007", r / "d2" / "f0007-link"),
    "a link retargeted": lambda r: ((r / "d3" / "lnk").unlink(), (r / "d3" / "lnk").symlink_to("f0002")),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_anywhere_gives_the_bytes_of_the_ordinary_path(tmp_path: Path, change: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = first_snapshot(tmp_path)
    parent_bytes = repo.manifest_bytes(repo.find_snapshot(first))
    CHANGES[change](root)
    fast = capture_against(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
    slow = capture_against(repo, root, first, shortcut=False, monkeypatch=monkeypatch)
    assert fast == slow
    assert fast != parent_bytes
    # and the snapshot restores the tree as it is now
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    out = tmp_path / "restored"
    engine.restore_snapshot(repo, info.id, str(out), cluster_id="c", release="1")
    mine = {p.relative_to(root): p for p in root.rglob("*")}
    theirs = {p.relative_to(out): p for p in out.rglob("*")}
    assert mine.keys() == theirs.keys()
    for rel, p in mine.items():
        q = theirs[rel]
        assert p.is_symlink() == q.is_symlink()
        if p.is_symlink():
            assert os.readlink(p) == os.readlink(q)
        elif p.is_file():
            assert p.read_bytes() == q.read_bytes(), rel
            assert p.stat().st_mode == q.stat().st_mode, rel
    assert root.stat().st_mode == out.stat().st_mode


def test_a_parent_of_other_root_metadata_is_never_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows alone are the same, the root's own metadata (in the file's key-value metadata) is not."""
    repo, root, first = first_snapshot(tmp_path)
    os.chmod(root, 0o700)
    fast = capture_against(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
    assert ManifestFile(fast).schema.metadata != ManifestFile(repo.manifest_bytes(repo.find_snapshot(first))
                                                              ).schema.metadata
    table = manifest_mod.Manifest.from_bytes(fast, "m").table
    parent = manifest_mod.Manifest.from_bytes(repo.manifest_bytes(repo.find_snapshot(first)), "m").table
    assert table.equals(parent)  # every row the parent's: only the metadata says the root changed


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_manifest_file_copies_its_bytes_as_they_are(in_memory: bool) -> None:
    """From bytes, and from a spool's temporary file (past its memory limit), into a spool of either kind."""
    w = ManifestWriter()
    rows = manifest_mod.table_from_columns({
        "path": [f"f{i:05}" for i in range(3000)], "type": ["file"] * 3000, "mode": [0o644] * 3000,
        "uid": [0] * 3000, "gid": [0] * 3000, "size": [0] * 3000, "mtime_s": [PAST] * 3000,
        "mtime_nsec": [0] * 3000, "ctime_ns": [0] * 3000, "inode": list(range(3000)),
        "content": [manifest_mod.EMPTY_CONTENT] * 3000, "chunks": [[]] * 3000, "chunk_sizes": [[]] * 3000,
        "target": [None] * 3000})
    w.write(rows)
    data = w.finish().getvalue()
    if in_memory:
        source: bytes | Spool = data
    else:
        source = Spool(memory_bytes=100)
        source.write(data)
        assert not source.in_memory
    for limit in (1 << 30, 100):
        copied = ManifestFile(source).copy(limit)
        assert copied.getvalue() == data
        assert copied.hexdigest() == Spool.of(data).hexdigest()


@pytest.mark.parametrize("kind", ["plain", "odd"])
def test_a_capture_written_manifest_is_taken_as_the_writers_own(tmp_path: Path, kind: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken (not merely harmless): a manifest a capture wrote has the writer's fingerprint
    whatever its rows hold (links, extended attributes, special files, all-null columns), and an unchanged
    capture of it never encodes a row."""
    from tests.test_breaker_s64 import _odd

    root = tmp_path / "data"
    if kind == "odd":
        _odd(root)
        # A link that escapes through other links is told once the walk is over (its row is written, then
        # taken out): such a tree's capture encodes its rows as before.
        (root / "odd" / "esc").unlink()
    else:
        build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    data = repo.manifest_bytes(first)
    assert ManifestFile(data).written_as(ManifestWriter.fingerprint())
    encoded: list[int] = []
    real = ManifestWriter.write
    monkeypatch.setattr(ManifestWriter, "write", lambda self, t: (encoded.append(t.num_rows), real(self, t))[1])
    again = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert again.manifest_hash == first.manifest_hash
    assert sum(encoded) == 0, "an unchanged capture encoded rows"


def _local_repo(tmp_path: Path) -> tuple[Repository, Path]:
    from drsync.storage.local import LocalStorage

    path = tmp_path / "repo"
    return Repository.init(LocalStorage(str(path), create=True), cluster_id="c", release="1"), path


def test_an_unchanged_snapshots_manifest_is_linked_to_its_parents_on_local_storage(tmp_path: Path) -> None:
    """Stored once (a hard link), and each name outlives the other: the parent deleted and collected, the
    unchanged snapshot still verifies and restores."""
    root = tmp_path / "data"
    build(root)
    repo, path = _local_repo(tmp_path)
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    again = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    a, b = (path / fmt.manifest_name(s.id) for s in (first, again))
    assert a.stat().st_ino == b.stat().st_ino and b.stat().st_nlink == 2
    repo.delete_snapshot(first)
    repo.gc()
    assert not a.exists() and b.stat().st_nlink == 1
    assert repo.manifest_bytes(again)  # its hash checks
    out = tmp_path / "out"
    engine.restore_snapshot(repo, again.id, str(out), cluster_id="c", release="1")
    assert (out / "d7" / "f0249").read_bytes() == (root / "d7" / "f0249").read_bytes()


def test_a_parent_manifest_of_another_size_is_not_linked(tmp_path: Path) -> None:
    """A stored manifest whose file is not what its hash says (here: grown after its capture read it) is not
    linked: the bytes the capture hashed are written, and the new snapshot verifies."""
    root = tmp_path / "data"
    build(root)
    repo, path = _local_repo(tmp_path)
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    parent = repo.open_manifest(first)
    stored = path / fmt.manifest_name(first.id)
    with open(stored, "ab") as f:  # damage after the read: same hash in the document, another size
        f.write(b"garbage")
    with repo.write_session() as session:
        writer = session.chunk_writer()
        result = capture.capture(str(root), writer, parent=parent, parent_captured_at=first.captured_at)
        writer.flush()
        info = dataclasses.replace(first, id="0123456789abcdef", manifest_hash=result.stored.hexdigest())
        with result.stored:
            info = session.commit(info, result.stored, require_chunks=False)
    new = path / fmt.manifest_name(info.id)
    assert new.stat().st_nlink == 1 and new.stat().st_ino != stored.stat().st_ino
    assert repo.manifest_bytes(info)  # its hash checks
    with pytest.raises(IntegrityError):
        repo.manifest_bytes(first)


def test_a_leftover_manifest_at_the_new_name_is_replaced_by_the_link(tmp_path: Path) -> None:
    """A commit that crashed after writing part of its manifest left that file: the link replaces it."""
    root = tmp_path / "data"
    build(root)
    repo, path = _local_repo(tmp_path)
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    with repo.write_session() as session:
        writer = session.chunk_writer()
        result = capture.capture(str(root), writer, parent=repo.open_manifest(first),
                                 parent_captured_at=first.captured_at)
        writer.flush()
        info = dataclasses.replace(first, id="fedcba9876543210", manifest_hash=result.stored.hexdigest())
        (path / fmt.manifest_name(info.id)).write_bytes(b"half a manifest")
        with result.stored:
            info = session.commit(info, result.stored, require_chunks=False)
    assert (path / fmt.manifest_name(info.id)).stat().st_ino == (path / fmt.manifest_name(first.id)).stat().st_ino
    assert repo.manifest_bytes(info) == repo.manifest_bytes(first)


def test_counting_beside_a_commit_gives_count_chunks_and_raises_its_error(tmp_path: Path) -> None:
    from drsync.agent.primary import Counting, count_chunks

    root = tmp_path / "data"
    build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    mf = repo.open_manifest(info)
    assert Counting(mf).result() == count_chunks(mf)
    spool = Spool(memory_bytes=100)  # in its file
    spool.write(repo.manifest_bytes(info))
    unread = ManifestFile(spool)
    spool.close()  # its reader closed with it: the count fails on its thread, and result() says so
    with pytest.raises((IntegrityError, ValueError, OSError)):
        Counting(unread).result()
