"""Breaker session 64: a capture whose rows are all the parent's stores the parent's manifest bytes
(``capture._Unchanged``, a0aa9d3), tried against odd trees, odd parents and races.

Two oracles. The ordinary path: the same capture against the same parent with ``_Unchanged.of`` answering
None must give the same bytes. And, where a tree changes while it is walked (two captures cannot see the same
state), the bytes stored must be those the one serializer (:class:`ManifestWriter`) makes of the rows they
hold. Faults it found (F1: a parent written otherwise copied; F2: three groups held) are fixed; their tests pass.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drsync import capture, engine, tree
from drsync.errors import OperationFailed
from drsync.repository import manifest as manifest_mod
from drsync.repository import repo as repo_mod
from drsync.repository.manifest import Manifest, ManifestFile, ManifestWriter
from drsync.repository.manifest_patch import apply_patch, make_patch
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage
from tests.conftest import run_drsync

PAST = 1_600_000_000
GROUP, WINDOW = 256, 128


@pytest.fixture(autouse=True)
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", GROUP)
    monkeypatch.setattr(capture, "_WINDOW", WINDOW)
    monkeypatch.setattr(tree, "_BATCH_ROWS", 50)


def _age(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        os.utime(p, (PAST, PAST), follow_symlinks=False)


def _plain(root: Path, files: int = 511) -> None:
    """One directory ``d`` and ``files`` files in it: 1 + files rows (512: exactly two groups, four windows)."""
    (root / "d").mkdir(parents=True)
    for i in range(files):
        (root / "d" / f"f{i:04}").write_bytes(f"{i}".encode() * (1 + i % 5))
    _age(root)


def _rewrite(p: Path) -> None:
    p.write_bytes(b"changed " + p.read_bytes())
    os.utime(p, (PAST, PAST))


class Run:
    """One capture's outcome: the stored bytes and what the snapshot document would say besides."""

    def __init__(self, result: capture.CaptureResult, data: bytes) -> None:
        self.data = data
        self.rest = (result.files, result.bytes, result.reused_files, result.stale, result.skipped,
                     sorted(result.warnings.lines()), result.volumes)


def _capture(repo: Repository, root: Path, parent: str | Manifest | ManifestFile | None, *, shortcut: bool,
             monkeypatch: pytest.MonkeyPatch, **kw: object) -> Run:
    info = repo.find_snapshot(parent) if isinstance(parent, str) else None
    with monkeypatch.context() as m:
        if not shortcut:
            m.setattr(capture._Unchanged, "of", classmethod(lambda cls, *a: None))
        with repo.write_session() as session:
            writer = session.chunk_writer()
            pm = repo.open_manifest(info) if info is not None else parent
            result = capture.capture(str(root), writer, parent=pm,  # type: ignore[arg-type]
                                     parent_captured_at=info.captured_at if info else PAST + 1000, **kw)
            writer.flush()
            with result.stored:
                return Run(result, result.stored.getvalue())


def _both(repo: Repository, root: Path, parent: str | Manifest | ManifestFile | None,
          monkeypatch: pytest.MonkeyPatch, **kw: object) -> tuple[Run, Run]:
    return (_capture(repo, root, parent, shortcut=True, monkeypatch=monkeypatch, **kw),
            _capture(repo, root, parent, shortcut=False, monkeypatch=monkeypatch, **kw))


def _reencoded(data: bytes) -> bytes:
    """What the one serializer makes of the rows (and schema metadata) ``data`` holds."""
    f = ManifestFile(data)
    w = ManifestWriter(f.schema)
    for g in range(f.num_groups):
        w.write(f.group(g))
    return w.finish().getvalue()


def _first(tmp_path: Path, build: Callable[[Path], None], storage: str = "memory") -> tuple[Repository, Path, str]:
    root = tmp_path / "data"
    build(root)
    st = MemoryStorage() if storage == "memory" else LocalStorage(str(tmp_path / "repo"), create=True)
    repo = Repository.init(st, cluster_id="c", release="1")
    return repo, root, engine.create_snapshot(repo, engine.SnapshotRequest(str(root))).id


def _parent_bytes(repo: Repository, sid: str) -> bytes:
    return repo.manifest_bytes(repo.find_snapshot(sid))


# --- windows and groups that line up exactly -----------------------------------------------------------------

# 512 rows: "d" is row 0, d/f0000 row 1 ... d/f0510 row 511. Groups of 256, windows of 128.
EXACT: dict[str, Callable[[Path], object]] = {
    "nothing": lambda r: None,
    "row 0 (the directory's time)": lambda r: os.utime(r / "d", (PAST + 3, PAST + 3)),
    "row 127, a window's last": lambda r: _rewrite(r / "d" / "f0126"),
    "row 128, a window's first": lambda r: _rewrite(r / "d" / "f0127"),
    "row 255, the first group's last": lambda r: _rewrite(r / "d" / "f0254"),
    "row 256, the second group's first": lambda r: _rewrite(r / "d" / "f0255"),
    "row 511, the very last": lambda r: _rewrite(r / "d" / "f0510"),
    "a row added past the last (row 512: a third group)": lambda r: (r / "d" / "zz").write_bytes(b"z"),
    "the last row dropped": lambda r: (r / "d" / "f0510").unlink(),
    "row 256 dropped": lambda r: (r / "d" / "f0255").unlink(),
    "a row added at a group's boundary": lambda r: (r / "d" / "f0254a").write_bytes(b"a"),
    "a row added before the first": lambda r: (r / "a").write_bytes(b"a"),
}


@pytest.mark.parametrize("change", list(EXACT))
def test_windows_and_groups_that_line_up_exactly(tmp_path: Path, change: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = _first(tmp_path, _plain)
    parent = _parent_bytes(repo, first)
    assert ManifestFile(parent).starts == [0, 256, 512]
    EXACT[change](root)
    fast, slow = _both(repo, root, first, monkeypatch)
    assert fast.data == slow.data and fast.rest == slow.rest
    assert (fast.data == parent) == (change == "nothing")
    assert _reencoded(fast.data) == fast.data


def test_a_parent_of_zero_rows_and_an_empty_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = _first(tmp_path, lambda r: r.mkdir())
    parent = _parent_bytes(repo, first)
    assert len(ManifestFile(parent)) == 0
    fast, slow = _both(repo, root, first, monkeypatch)
    assert fast.data == slow.data == parent
    _plain(root, 300)
    fast, slow = _both(repo, root, first, monkeypatch)
    assert fast.data == slow.data and len(ManifestFile(fast.data)) == 301


def test_an_emptied_root_is_refused_or_captured_empty_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = _first(tmp_path, _plain)
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    os.utime(root, (PAST, PAST))
    for shortcut in (True, False):
        with pytest.raises(OperationFailed, match="holds no files"):
            _capture(repo, root, first, shortcut=shortcut, monkeypatch=monkeypatch)
    fast, slow = _both(repo, root, first, monkeypatch, allow_empty=True)
    assert fast.data == slow.data and len(ManifestFile(fast.data)) == 0


# --- parents written otherwise ---------------------------------------------------------------------------------


def test_an_in_memory_parent_gives_the_bytes_a_stored_one_gives(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = _first(tmp_path, _plain)
    loaded = repo.load_manifest(repo.find_snapshot(first))
    for change in (None, "d/f0300"):
        if change:
            _rewrite(root / change)
        stored = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
        memory = _capture(repo, root, loaded, shortcut=True, monkeypatch=monkeypatch)
        assert stored.data == memory.data


def test_a_parent_rebuilt_from_a_patch_is_the_writers_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standby's manifest rebuilt from a patch (then promoted: its captures take it as their parent)."""
    repo, root, first = _first(tmp_path, _plain)
    _rewrite(root / "d" / "f0100")
    (root / "d" / "f0400").unlink()
    second = engine.create_snapshot(repo, engine.SnapshotRequest(str(root))).id
    base, new = (repo.open_manifest(repo.find_snapshot(s)) for s in (first, second))
    patch, _ = make_patch(base, new)
    rebuilt = apply_patch(repo.open_manifest(repo.find_snapshot(first)), ManifestFile(patch)).getvalue()
    assert rebuilt == _parent_bytes(repo, second)
    fast, slow = _both(repo, root, ManifestFile(rebuilt), monkeypatch)
    assert fast.data == slow.data == rebuilt


def _replace_manifest(repo_dir: Path, sid: str, data: bytes) -> None:
    """Store ``data`` as snapshot ``sid``'s manifest (as an older drsync would have written it)."""
    (repo_dir / "manifests" / f"{sid}.parquet").write_bytes(data)
    doc_path = repo_dir / "snapshots" / f"{sid}.json"
    doc = json.loads(doc_path.read_bytes())
    doc["manifest_hash"] = blake3.blake3(data).hexdigest()
    doc_path.write_text(json.dumps(doc))


def test_a_version_1_parent_is_encoded_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_capture_any_tree import v1_bytes

    repo, root, first = _first(tmp_path, _plain, storage="local")
    whole = _parent_bytes(repo, first)
    m = Manifest.from_bytes(whole)
    old = v1_bytes(m, row_group=GROUP)
    _replace_manifest(tmp_path / "repo", first, old)
    doc_path = tmp_path / "repo" / "snapshots" / f"{first}.json"
    doc = json.loads(doc_path.read_bytes())
    doc["format"] = 1
    doc_path.write_text(json.dumps(doc))
    repo = Repository.open(LocalStorage(str(tmp_path / "repo")))
    assert repo.open_manifest(repo.find_snapshot(first)).is_v1
    fast, slow = _both(repo, root, first, monkeypatch)
    assert fast.data == slow.data != old
    assert not ManifestFile(fast.data).is_v1


def _old_writer(data: bytes, *, dictionary: bool, row_group: int) -> bytes:
    """``data``'s rows and metadata written as an older drsync wrote them: dictionary pages on every column
    (before 5b26512), or row groups of another size."""
    if row_group == 0:  # the same writer under another pyarrow: only the footer's created_by differs
        mine = f"parquet-cpp-arrow version {pa.__version__}".encode()
        other = b"parquet-cpp-arrow version " + (b"9" * len(pa.__version__.encode()))
        assert data.count(mine) == 1
        return data.replace(mine, other)
    f = ManifestFile(data)
    t = pa.concat_tables([f.group(g) for g in range(f.num_groups)])
    sink = pa.BufferOutputStream()
    schema = manifest_mod.SCHEMA.with_metadata(f.schema.metadata)
    kw: dict[str, object] = {} if dictionary else {"use_dictionary": list(manifest_mod._FEW_VALUES)}
    with pq.ParquetWriter(sink, schema, compression="zstd", **kw) as w:  # type: ignore[arg-type]
        w.write_table(t.cast(schema), row_group_size=row_group)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("older", ["dictionary pages on every column", "row groups of 200", "another pyarrow"])
def test_a_parent_written_by_an_older_drsync_gives_the_ordinary_bytes(tmp_path: Path, older: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo, root, first = _first(tmp_path, _plain, storage="local")
    current = _parent_bytes(repo, first)
    old = _old_writer(current, dictionary=older.startswith("dictionary"),
                      row_group=200 if "200" in older else 0 if "pyarrow" in older else GROUP)
    assert old != current and Manifest.from_bytes(old).table.equals(Manifest.from_bytes(current).table)
    _replace_manifest(tmp_path / "repo", first, old)
    repo = Repository.open(LocalStorage(str(tmp_path / "repo")))
    assert repo.find_snapshot(first).manifest_hash == blake3.blake3(old).hexdigest()
    assert run_drsync("repo", "verify", "--repo", tmp_path / "repo").code == 0
    fast, slow = _both(repo, root, first, monkeypatch)
    assert slow.data == current
    assert fast.data == slow.data, "the older bytes were copied"


# --- stale rows and lost content ---------------------------------------------------------------------------


def test_a_stale_row_loses_its_flag_once_the_file_reads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable file (a read error simulated as test_breaker_s34 does) and an unlistable directory keep
    their last version, stale; captured again while still unreadable, then once readable."""
    from tests.test_breaker_s34 import _failing

    repo, root, _ = _first(tmp_path, _plain)
    (root / "e").mkdir()
    (root / "e" / "inner").write_bytes(b"inner")
    _age(root)
    second = engine.create_snapshot(repo, engine.SnapshotRequest(str(root))).id
    _rewrite(root / "d" / "f0300")
    (root / "e" / "inner").write_bytes(b"inner, changed")
    with monkeypatch.context() as m:
        _failing(m, root, {"d/f0300"}, {"e"})
        third = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
        assert third.stale_paths == 2
        stale_parent = _parent_bytes(repo, third.id)
        fast, slow = _both(repo, root, third.id, m)  # still unreadable
        assert fast.data == slow.data and fast.rest == slow.rest
        assert fast.rest[3] == 2
        assert Manifest.from_bytes(fast.data).table.equals(Manifest.from_bytes(stale_parent).table)
    fast, slow = _both(repo, root, third.id, monkeypatch)  # readable again
    assert fast.data == slow.data and fast.rest == slow.rest
    m2 = Manifest.from_bytes(fast.data)
    assert m2.stale_count() == 0
    by = {e.path: e for e in m2.entries()}
    assert by["d/f0300"].size == (root / "d" / "f0300").stat().st_size and not by["d/f0300"].stale
    assert by["e/inner"].size == len(b"inner, changed")
    assert Manifest.from_bytes(_parent_bytes(repo, second)).stale_count() == 0


def test_content_lost_by_a_repair_is_read_again_and_the_copy_names_chunks_held(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack lost, ``drsync repo repair`` forgets its chunks; nothing changed in the tree: the next capture
    reads the files again (their rows, and so the manifest, are the parent's) and the repository is whole."""
    from drsync.repository import repair

    root = tmp_path / "data"
    _plain(root, 400)
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalStorage(str(repo_dir), create=True), cluster_id="c", release="1")
    engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    for i in range(3):
        (root / f"late{i}").write_bytes(os.urandom(100_000))
    _age(root)
    second = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    packs = sorted((repo_dir / "packs").rglob("*.pack"), key=lambda p: p.stat().st_mtime_ns)
    packs[-1].unlink()
    assert run_drsync("repo", "repair", "--repo", repo_dir).code == 0
    shutil.copytree(repo_dir, tmp_path / "copy")  # the ordinary path compared on a copy: a capture writes chunks
    copy = Repository.open(LocalStorage(str(tmp_path / "copy")))
    lost = repair.lost_of(copy, copy.open_manifest(second))
    assert len(lost)
    fast, slow = _both(copy, root, second.id, monkeypatch, lost=lost)
    assert fast.data == slow.data == _parent_bytes(copy, second.id)
    assert fast.rest == slow.rest
    repo = Repository.open(LocalStorage(str(repo_dir)))
    third = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert third.read_bytes >= 300_000 and third.manifest_hash == second.manifest_hash
    assert run_drsync("repo", "verify", "--repo", repo_dir).code == 0
    out = tmp_path / "out"
    engine.restore_snapshot(repo, third.id, str(out), cluster_id="c", release="1")
    for i in range(3):
        assert (out / f"late{i}").read_bytes() == (root / f"late{i}").read_bytes()


# --- odd trees -----------------------------------------------------------------------------------------------

ACL = b"\x02\x00\x00\x00" + b"".join(
    t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
    for t, p, i in [(1, 6, 0xFFFFFFFF), (2, 4, 1234), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)])


def _odd(root: Path) -> None:
    _plain(root, 300)
    d = root / "odd"
    d.mkdir()
    os.mkfifo(d / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock"))
    s.close()
    try:
        os.mknod(d / "null", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pass
    for name in (b"\xff\xfe-not-utf8", b"new\nline", b"back\\slash", b"-", b"tab\there", b"\x01ctl", "é-nfc".encode()):
        (d / os.fsdecode(name)).write_bytes(name * 3)
    with open(d / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.write(b"head")
    os.link(root / "d" / "f0001", d / "zz-link-to-f0001")  # a hard link windows apart
    (d / "rel").symlink_to("../d/f0002")
    (d / "out").symlink_to("/etc/passwd")
    (d / "up").symlink_to("..")
    (d / "esc").symlink_to("up/../..")  # escapes through another link
    os.setxattr(d / "sparse", "user.note", b"kept")
    os.setxattr(root / "d", "user.dir", b"on a directory")
    os.setxattr(root / "d" / "f0003", "system.posix_acl_access", ACL)
    (root / "repo-inside").mkdir()
    _age(root)


def _xattr(p: Path, value: bytes) -> None:
    os.setxattr(p, "user.note", value)


ODD: dict[str, Callable[[Path], object]] = {
    "nothing": lambda r: None,
    "a file's attribute changed": lambda r: _xattr(r / "odd" / "sparse", b"other"),
    "a directory's attribute changed": lambda r: os.setxattr(r / "d", "user.dir", b"other"),
    "an attribute removed": lambda r: os.removexattr(r / "d", "user.dir"),
    "an ACL changed": lambda r: os.setxattr(r / "d" / "f0003", "system.posix_acl_access",
                                            ACL.replace(b"\xd2\x04", b"\xd3\x04")),
    "the root's attribute set": lambda r: os.setxattr(r, "user.root", b"r"),
    "the fifo removed": lambda r: (r / "odd" / "fifo").unlink(),
    "a non-UTF-8 name renamed": lambda r: os.rename(r / "odd" / os.fsdecode(b"\xff\xfe-not-utf8"),
                                                    r / "odd" / os.fsdecode(b"\xff\xfd-not-utf8")),
    "the hard link's other name removed": lambda r: (r / "d" / "f0001").unlink(),
    "the sparse file filled": lambda r: (r / "odd" / "sparse").write_bytes(b"\0" * (8 << 20) + b"head"),
    "an escaping link made harmless": lambda r: ((r / "odd" / "esc").unlink(), (r / "odd" / "esc").symlink_to("rel")),
    "a file added beside the repository": lambda r: (r / "repo-inside" / "x").write_bytes(b"x"),
}


@pytest.mark.parametrize("change", list(ODD))
def test_an_odd_tree_gives_the_ordinary_bytes(tmp_path: Path, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    _odd(root)
    repo = Repository.init(LocalStorage(str(root / "repo-inside" / "r"), create=True), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    parent = _parent_bytes(repo, first.id)
    paths = set(Manifest.from_bytes(parent).pycolumn("path"))
    assert "odd/esc" not in paths and "odd/out" not in paths and "odd/fifo" not in paths
    assert "odd/" + os.fsdecode(b"\xff\xfe-not-utf8") in paths and not any(p.startswith("repo-inside/r") for p in paths)
    ODD[change](root)
    if change != "the root's attribute set":
        os.utime(root, (PAST, PAST))
    kw = {"exclude": frozenset({"repo-inside/r"})}  # as the engine leaves the repository out
    fast, slow = _both(repo, root, first.id, monkeypatch, **kw)
    assert fast.data == slow.data and fast.rest == slow.rest
    assert (fast.data == parent) == (change == "nothing")  # the repository inside wrote a snapshot meanwhile
    again = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert repo.manifest_bytes(again) == fast.data
    out = tmp_path / "out"
    engine.restore_snapshot(repo, again.id, str(out), cluster_id="c", release="1")
    for rel in ("d/f0003", "odd/sparse", "odd/" + os.fsdecode(b"new\nline")):
        if (root / rel).exists():
            assert (out / rel).read_bytes() == (root / rel).read_bytes()
            assert sorted(os.listxattr(out / rel)) == sorted(os.listxattr(root / rel))
    assert sorted(os.listxattr(out / "d")) == sorted(os.listxattr(root / "d"))


# --- races -----------------------------------------------------------------------------------------------


def test_a_tree_changing_during_the_walk_stores_the_writers_bytes_of_its_rows(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The first file read (in the first window) changes the tree: a file of a later window is rewritten, one
    removed, one added past the last, and a file of a window already deferred (the parent's rows so far) is
    rewritten. Whatever the walk saw, the bytes stored are the ones the writer makes of the rows stored."""
    repo, root, first = _first(tmp_path, _plain)
    _rewrite(root / "d" / "f0200")  # the first file read: the windows before it are the parent's rows
    fired: list[int] = []

    def progress(n: int) -> None:
        if fired:
            return
        fired.append(n)
        _rewrite(root / "d" / "f0450")
        (root / "d" / "f0460").unlink()
        (root / "d" / "zzz").write_bytes(b"new")
        _rewrite(root / "d" / "f0005")  # already passed: the parent's row stands for it

    run = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch, progress=progress)
    assert fired
    assert _reencoded(run.data) == run.data
    paths = Manifest.from_bytes(run.data).pycolumn("path")
    assert "d/f0005" in paths and "d/f0200" in paths
    # quiet again: the next capture sees the tree as it is, either way alike
    fast, slow = _both(repo, root, first, monkeypatch)
    assert fast.data == slow.data and fast.rest == slow.rest
    by = {e.path: e for e in Manifest.from_bytes(fast.data).entries()}
    assert "d/f0460" not in by and by["d/zzz"].size == 3
    assert by["d/f0450"].size == (root / "d" / "f0450").stat().st_size


def test_a_file_rewritten_while_it_is_read_in_a_deferred_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only file read is in the last window and changes while read: re-read, then captured as last read;
    the three windows before it (the parent's rows) are written from the parent, the bytes the writer's."""
    repo, root, first = _first(tmp_path, _plain)
    target = root / "d" / "f0500"
    target.write_bytes(b"x" * 3_000_000)
    os.utime(target, (PAST, PAST))
    count = [0]

    def progress(n: int) -> None:
        count[0] += 1
        if count[0] == 1:
            with open(target, "ab") as f:
                f.write(b"more")

    run = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch, progress=progress)
    assert _reencoded(run.data) == run.data
    by = {e.path: e for e in Manifest.from_bytes(run.data).entries()}
    assert by["d/f0500"].size == sum(by["d/f0500"].chunk_sizes)
    assert len(by) == 512


# --- memory -----------------------------------------------------------------------------------------------


def _held_peak(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Observes (does not change) how many parent groups a capture holds at once."""
    peak = [0]
    held = capture._Parent.held

    def watching(self: capture._Parent, g: int) -> object:
        got = held(self, g)
        peak[0] = max(peak[0], len(self._held))
        return got

    monkeypatch.setattr(capture._Parent, "held", watching)
    return peak


def test_an_unchanged_capture_holds_one_or_two_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 400)  # as in production, four windows a group
    monkeypatch.setattr(capture, "_WINDOW", 100)
    repo, root, first = _first(tmp_path, lambda r: _plain(r, 2399))
    peak = _held_peak(monkeypatch)
    fast = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
    assert fast.data == _parent_bytes(repo, first)
    assert 1 <= peak[0] <= 2


def test_a_shifted_capture_holds_at_most_two_groups_of_all_columns(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 400)
    monkeypatch.setattr(capture, "_WINDOW", 100)

    def build(r: Path) -> None:
        _plain(r, 2399)
        for p in (r / "d").iterdir():
            os.setxattr(p, "user.acl", os.urandom(300))  # wide rows: what a group of ACLs costs
        _age(r)

    repo, root, first = _first(tmp_path, build)
    (root / "0-new").write_bytes(b"new")
    os.utime(root, (PAST, PAST))
    peak = _held_peak(monkeypatch)
    fast = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
    assert len(ManifestFile(fast.data)) == 2401
    assert peak[0] <= 2


# --- large parents: read by ranges from a temporary file, the copy into one ---------------------------------


@pytest.mark.parametrize("where", ["nothing", "d/f0040", "d/f1000", "d/f1998"])
def test_a_parent_read_from_a_temporary_file_copies_and_carries_alike(tmp_path: Path, where: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's manifest past RANGED_MANIFEST_BYTES (read by ranges from its spool's file, by the encoder
    thread writing the rows before a change while the windows after it read their groups), and the capture's
    spool past _SPOOL_BYTES: the same bytes, run after run."""
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 4096)
    monkeypatch.setattr(capture, "_SPOOL_BYTES", 4096)
    repo, root, first = _first(tmp_path, lambda r: _plain(r, 1999))
    parent = _parent_bytes(repo, first)
    assert len(parent) > 4096 and ManifestFile(parent).num_groups == 8
    assert not repo.manifest_spool(repo.find_snapshot(first)).in_memory
    if where != "nothing":
        _rewrite(root / where)
    slow = _capture(repo, root, first, shortcut=False, monkeypatch=monkeypatch)
    for _ in range(5):
        fast = _capture(repo, root, first, shortcut=True, monkeypatch=monkeypatch)
        assert fast.data == slow.data and fast.rest == slow.rest
    assert (fast.data == parent) == (where == "nothing")


# --- as a newcomer: the README's commands ----------------------------------------------------------------


def test_the_readme_cycle_unchanged_then_changed(tmp_path: Path) -> None:
    repo, data = tmp_path / "repo", tmp_path / "data"
    _plain(data, 300)
    assert run_drsync("init", "--repo", repo, "--cluster-id", "analytics-east", "--release", "6.2.1").code == 0

    def create(name: str) -> dict:  # type: ignore[type-arg]
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", name, "--json")
        assert r.code == 0, r.err
        return r.json()

    a, b = create("a"), create("b")
    r = Repository.open(LocalStorage(str(repo)))
    sa, sb = r.find_snapshot(a["id"]), r.find_snapshot(b["id"])
    assert sa.manifest_hash == sb.manifest_hash and sb.read_bytes == 0
    diff = run_drsync("snapshot", "diff", "a", "b", "--repo", repo, "--json")
    assert diff.code == 0, diff.err
    (data / "d" / "f0150").write_bytes(b"new content")
    os.chmod(data, 0o750)
    c = create("c")
    sc = r.find_snapshot(c["id"])
    assert sc.manifest_hash != sb.manifest_hash
    out = tmp_path / "restored"
    res = run_drsync("snapshot", "restore", "c", "--repo", repo, "--target", out)
    assert res.code == 0, res.err
    assert (out / "d" / "f0150").read_bytes() == b"new content"
    assert (out.stat().st_mode & 0o777) == 0o750
    res = run_drsync("snapshot", "restore", "b", "--repo", repo, "--target", tmp_path / "restored-b")
    assert res.code == 0, res.err
    assert (tmp_path / "restored-b" / "d" / "f0150").read_bytes() == (b"150" * 1)
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


# --- a real agent pair ---------------------------------------------------------------------------------------


def test_an_agent_pair_through_unchanged_and_changed_cycles(tmp_path: Path) -> None:
    from tests.group import wait_for
    from tests.test_agents import Pair
    from tests.test_manifest_reference import _applied, _many_files, _once

    p = Pair(tmp_path)
    try:
        _many_files(p.prod, 1500)
        p.start("standby")
        _once(p)
        assert p.in_sync()
        prod = Repository.open(LocalStorage(str(tmp_path / "primary-repo")))
        for step in ("unchanged", "middle", "unchanged", "last removed", "first added", "unchanged"):
            if step == "middle":
                (p.prod / "logs" / "d007" / "f050.log").write_bytes(b"changed in the middle")
            elif step == "last removed":
                (p.prod / "logs" / "d014" / "f099.log").unlink()
            elif step == "first added":
                (p.prod / "0-first").write_bytes(b"before every other path")
            _once(p)
            snaps = prod.list_snapshots()
            newest, before = snaps[-1], snaps[-2]
            assert (newest.manifest_hash == before.manifest_hash) == (step == "unchanged"), step
            wait_for(lambda want=newest.id: _applied(p) == want, f"the standby to apply {step}")
            assert p.in_sync(), step
            standby = Repository.open(LocalStorage(str(tmp_path / "standby-repo")))
            assert standby.find_snapshot(newest.id).manifest_hash == newest.manifest_hash
    finally:
        p.stop_all()
    assert run_drsync("repo", "verify", "--config", p.standby_cfg).code == 0


# --- filesystems mounted inside the root, and a root that is a mount point --------------------------------


def test_a_volume_unmounted_inside_the_root_keeps_its_files_either_way(tmp_path: Path, mounts: object,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    _plain(root, 300)
    mounts.tmpfs(root / "m", {f"v{i:03}": f"on the volume {i}" for i in range(200)})  # type: ignore[attr-defined]
    _age(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert first.volumes == {"m": 200}
    kw = {"parent_volumes": first.volumes}
    fast, slow = _both(repo, root, first.id, monkeypatch, **kw)
    assert fast.data == slow.data == _parent_bytes(repo, first.id) and fast.rest == slow.rest
    mounts.umount(root / "m")  # type: ignore[attr-defined]
    os.utime(root / "m", (PAST, PAST))
    fast, slow = _both(repo, root, first.id, monkeypatch, **kw)
    assert fast.data == slow.data and fast.rest == slow.rest
    kept = Manifest.from_bytes(fast.data)
    assert kept.stale_count() == 201 and fast.rest[6] == {"m": 200}  # the mount point and its 200 files
    assert sum(1 for p in kept.pycolumn("path") if p.startswith("m/")) == 200


def test_a_root_whose_filesystem_is_unmounted_is_refused_either_way(tmp_path: Path, mounts: object,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    mounts.tmpfs(root)  # type: ignore[attr-defined]
    _plain(root, 300)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert first.root_volume
    mounts.umount(root)  # type: ignore[attr-defined]
    _plain(root, 300)  # what lies under the mount point looks like the tree, rows and all but inodes
    for shortcut in (True, False):
        with pytest.raises(OperationFailed, match="unmounted|mount"):
            _capture(repo, root, first.id, shortcut=shortcut, monkeypatch=monkeypatch,
                     parent_root_volume=first.root_volume)
