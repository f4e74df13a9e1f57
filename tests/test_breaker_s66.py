"""Breaker s66: today's changes (f251cc5..HEAD) attacked.

Warming passing over batches the reader reached; a capture window that read nothing not trimming the heap;
the chunk count's unstable sort; a large manifest of a local repository read in place through a descriptor of
the stored file (Spool.of_descriptor / duplicate / file_identity, LocalStorage.open_object,
Repository.manifest_spool / _link_manifest / _is_stored_file, ManifestFile.copy).

Most cases shrink ``RANGED_MANIFEST_BYTES`` so that small trees take the large (in place) path.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import numpy as np
import pytest

import drsync.capture as capture_mod
import drsync.repository.repo as repo_mod
from drsync import allocators, backup, engine
from drsync.agent.primary import ChunkCount, count_chunks, ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.errors import IntegrityError
from drsync.repository import format as fmt
from drsync.repository import spool as spool_mod
from drsync.repository.ids import ID_DTYPE, gather, pieces_key, sort_unique
from drsync.repository.manifest import Manifest, ManifestFile
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool
from drsync.transport import Caller, CommitOutcome
from drsync.warming import WARM_AHEAD, Warming
from tests.group import wait_for
from tests.test_snapshot_order import LocalLink, contents, new_repo, snap

ROOT = Path(__file__).resolve().parent.parent
SMALL = 512  # RANGED_MANIFEST_BYTES for these tests: every manifest here is "large"
FULL = os.environ.get("DRSYNC_RELIABILITY") == "full"


def _fds() -> set[str]:
    """This process's descriptors, but the storage's cache of pack descriptors (held by design)."""
    out = set()
    for f in os.listdir("/proc/self/fd"):
        try:
            if "/packs/" in os.readlink(f"/proc/self/fd/{f}"):
                continue
        except OSError:
            continue
        out.add(f)
    return out


def _old(root: Path) -> None:
    """Every file old enough not to be re-read as racily clean."""
    for p in root.rglob("*"):
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)


def _tree(root: Path, n: int = 300, generation: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:04}.txt").write_text(f"file {i} of generation {generation if i % 7 == 0 else 0}\n" * 3)
    _old(root)


def _hash_file(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def _in_thread(fn: Callable[[], object], timeout: float = 120) -> object:
    """``fn()`` in a thread: a hang fails here (the call's own timeout), never the whole run."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} hung"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", SMALL)


@pytest.fixture
def one(tmp_path: Path, large: None) -> tuple[Repository, SnapshotInfo, Path]:
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    info = snap(repo, tmp_path / "data")
    return repo, info, tmp_path / "repo" / fmt.manifest_name(info.id)


# --------------------------------------------------------------------------------------------------------------
# Non-regular manifest objects, swaps and damage


def _make(path: Path, kind: str, tmp: Path, good: bytes) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink to a fifo":
        os.mkfifo(tmp / "elsewhere-fifo")
        os.symlink(tmp / "elsewhere-fifo", path)
    elif kind == "symlink to a directory":
        os.symlink(tmp, path)
    elif kind == "dangling symlink":
        os.symlink(tmp / "nothing-here", path)
    elif kind == "symlink loop":
        os.symlink(path, path)
    elif kind == "character device":
        if os.geteuid() == 0:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
        else:
            os.symlink("/dev/zero", path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "symlink to a larger file":
        (tmp / "bigger").write_bytes(good + b"\0" * 4096)
        os.symlink(tmp / "bigger", path)
    else:
        raise AssertionError(kind)


KINDS = ["fifo", "directory", "symlink to a fifo", "symlink to a directory", "dangling symlink",
         "symlink loop", "character device",
         "socket", "symlink to a larger file"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_manifest_that_is_not_a_regular_file_is_refused_without_a_hang_or_a_leak(
        one: tuple[Repository, SnapshotInfo, Path], tmp_path: Path, kind: str) -> None:
    repo, info, path = one
    good = path.read_bytes()
    _make(path, kind, tmp_path, good)
    before = _fds()
    for read in (repo.manifest_spool, repo.open_manifest, repo.load_manifest,
                 lambda i: repo.load_manifest(i, lean=True), repo.manifest_bytes):
        with pytest.raises(IntegrityError):
            _in_thread(lambda r=read: r(info))  # type: ignore[misc]
    assert _fds() <= before


@pytest.mark.parametrize("kind", ["fifo", "directory", "character device", "dangling symlink",
                                  "socket",
                                  "symlink loop"])
def test_the_cli_refuses_a_non_regular_manifest_with_exit_3(tmp_path: Path, kind: str) -> None:
    """The CLI (a real process, the large path forced through a tiny RANGED_MANIFEST_BYTES set before the CLI
    runs): restore, diff, backup create and repo verify each end with exit 3, no traceback, no hang."""
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data", 50)
    info = snap(repo, tmp_path / "data")
    path = tmp_path / "repo" / fmt.manifest_name(info.id)
    _make(path, kind, tmp_path, path.read_bytes())
    boot = ("import sys; import drsync.repository.repo as r; r.RANGED_MANIFEST_BYTES = 512; "
            "from drsync.cli import run; sys.argv[0] = 'drsync'; run()")
    for args in (["snapshot", "restore", info.id, "--target", str(tmp_path / "out")],
                 ["snapshot", "diff", info.id, info.id],
                 ["backup", "create", "--snapshot", info.id, "--dest", str(tmp_path / "bk")],
                 ["repo", "verify"]):
        proc = subprocess.run([sys.executable, "-c", boot, *args, "--repo", str(tmp_path / "repo")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 3, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr


def test_a_symlink_to_the_right_bytes_is_read_but_never_hard_linked(
        one: tuple[Repository, SnapshotInfo, Path], tmp_path: Path) -> None:
    """LocalStorage follows an object's symlink by design (it did before today too); a symlinked parent
    manifest of the right bytes is read, and an unchanged capture's manifest is then written, not linked
    to the symlink (nor through it to a file outside the repository)."""
    repo, info, path = one
    outside = tmp_path / "outside-manifest"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(outside, path)
    second = snap(repo, tmp_path / "data")
    assert second.manifest_hash == info.manifest_hash
    mine = tmp_path / "repo" / fmt.manifest_name(second.id)
    assert not mine.is_symlink() and os.stat(mine).st_ino != os.stat(outside).st_ino
    assert _hash_file(mine) == second.manifest_hash and os.stat(outside).st_nlink == 1


def test_a_manifest_replaced_by_rename_after_hashing_is_never_linked_unverified(
        one: tuple[Repository, SnapshotInfo, Path], tmp_path: Path) -> None:
    """A spool of A's file; A's name then replaced by a rename with damaged bytes; B committed from the spool:
    the name is another inode now, so it is hashed again (damaged): B's bytes are written from the spool."""
    repo, a, path = one
    with repo.manifest_spool(a, in_place=True) as spool:
        raw = bytearray(path.read_bytes())
        raw[700] ^= 1
        repo.storage.write(fmt.manifest_name(a.id), bytes(raw))
        b = dataclasses_replace(a, id="00000000000000b1")
        repo.commit_snapshot(b, spool)
    pb = tmp_path / "repo" / fmt.manifest_name(b.id)
    assert _hash_file(pb) == a.manifest_hash and os.stat(pb).st_ino != os.stat(path).st_ino


def dataclasses_replace(info: SnapshotInfo, **kw: object) -> SnapshotInfo:
    import dataclasses

    return dataclasses.replace(info, captured_at=info.captured_at + 1, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("swap", ["fifo", "directory", "missing"])
def test_a_link_source_swapped_for_a_non_file_between_the_spool_and_the_commit_falls_back_to_writing(
        one: tuple[Repository, SnapshotInfo, Path], tmp_path: Path, swap: str) -> None:
    repo, a, path = one
    good = path.read_bytes()
    before = _fds()
    with repo.manifest_spool(a, in_place=True) as spool:
        path.unlink()
        if swap == "fifo":
            os.mkfifo(path)
        elif swap == "directory":
            path.mkdir()
        b = dataclasses_replace(a, id="00000000000000b2")
        _in_thread(lambda: repo.commit_snapshot(b, spool))
    pb = tmp_path / "repo" / fmt.manifest_name(b.id)
    assert pb.read_bytes() == good
    assert _fds() <= before


def test_an_oversized_sparse_manifest_is_refused(one: tuple[Repository, SnapshotInfo, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest replaced by a huge sparse file: hashed no further than the limit, refused, no descriptor
    left (MANIFEST_MAX_BYTES shrunk: the real one is 2 GiB)."""
    repo, info, path = one
    monkeypatch.setattr(fmt, "MANIFEST_MAX_BYTES", 1 << 20)
    with open(path, "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse
    before = _fds()
    reads: list[int] = []
    real = os.pread

    def counted(fd: int, n: int, at: int) -> bytes:
        reads.append(n)
        return real(fd, n, at)

    monkeypatch.setattr(spool_mod.os, "pread", counted)
    with pytest.raises(IntegrityError, match="damaged"):
        repo.manifest_spool(info, in_place=True)
    assert sum(reads) <= (1 << 20) + 1
    assert _fds() <= before


def test_an_io_error_while_hashing_in_place_leaves_no_descriptor(one: tuple[Repository, SnapshotInfo, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo, info, _ = one
    real = os.pread
    calls = [0]

    def failing(fd: int, n: int, at: int) -> bytes:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, at)

    monkeypatch.setattr(spool_mod.os, "pread", failing)
    before = _fds()
    with pytest.raises(OSError):
        repo.manifest_spool(info, in_place=True)
    assert _fds() <= before


def test_a_failure_building_the_in_place_spool_leaves_no_descriptor(one: tuple[Repository, SnapshotInfo, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    repo, info, _ = one
    real = Spool.__init__

    def boom(self: Spool, memory_bytes: int | None = None) -> None:
        raise MemoryError("no memory for the spool")

    before = _fds()
    monkeypatch.setattr(Spool, "__init__", boom)
    try:
        with pytest.raises(MemoryError):
            repo.manifest_spool(info, in_place=True)
    finally:
        monkeypatch.setattr(Spool, "__init__", real)
    assert _fds() <= before


# --------------------------------------------------------------------------------------------------------------
# In-place (external) damage: drsync never rewrites a stored object in place, but other things do


def test_a_spool_of_a_stored_file_overwritten_in_place_after_hashing_is_refused_when_checked(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    """An in-place overwrite after hashing (an rsync --inplace restore, dd conv=notrunc, a buggy tool) is read
    back by a spool of the stored file (it is not a copy): its reader's check_unchanged refuses it, and a link
    of it is never made (the link's own check)."""
    repo, info, path = one
    with repo.manifest_spool(info, in_place=True) as spool:
        spool.check_unchanged("m")  # nothing changed yet
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 16, 700)
        finally:
            os.close(fd)
        with pytest.raises(IntegrityError, match="written in place"):
            spool.check_unchanged("m")
        b = SnapshotInfo(id="0123456789abcdef", captured_at=info.captured_at + 1, cluster_id=info.cluster_id,
                         release=info.release, manifest_hash=info.manifest_hash, files=info.files)
        with pytest.raises(IntegrityError, match="written in place"):
            repo.commit_snapshot(b, spool)
    assert not repo.storage.exists(fmt.manifest_name(b.id))


def test_a_hard_link_or_unlink_of_the_stored_file_is_not_taken_for_damage(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    """A link made or removed moves the file's change time: the spool hashes it again, finds the same bytes,
    and goes on."""
    repo, info, path = one
    with repo.manifest_spool(info, in_place=True) as spool:
        os.link(path, path.with_name("extra-name"))
        spool.check_unchanged("m")
        os.unlink(path.with_name("extra-name"))
        spool.check_unchanged("m")


def _damage_before_the_copy(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """An unchanged capture's parent file (``path``) damaged in place (one byte) just before its rows are taken."""
    real = capture_mod._Unchanged.copy

    def damaged_then_copy(self: object, memory_bytes: int) -> Spool:
        fd = os.open(path, os.O_RDWR)
        try:
            b = os.pread(fd, 1, 700)
            os.pwrite(fd, bytes([b[0] ^ 1]), 700)
        finally:
            os.close(fd)
        return real(self, memory_bytes)  # type: ignore[arg-type]

    monkeypatch.setattr(capture_mod._Unchanged, "copy", damaged_then_copy)


def test_an_unchanged_capture_whose_parents_file_is_damaged_in_place_during_it_is_refused(
        one: tuple[Repository, SnapshotInfo, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's manifest is read in place during a capture; damaged in place meanwhile (after it was hashed
    at the capture's start), the capture is refused and commits nothing, rather than take rows (or a link)
    from a file that no longer matches its hash."""
    repo, a, path = one
    _damage_before_the_copy(monkeypatch, path)
    with pytest.raises(IntegrityError, match="written in place"):
        snap(repo, tmp_path / "data")
    assert [s.id for s in repo.list_snapshots()] == [a.id]


def test_the_same_in_place_damage_under_the_threshold_leaves_the_new_snapshot_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case above under the threshold: the parent is read into memory at once, so the new snapshot is
    intact."""
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    a = snap(repo, tmp_path / "data")
    path = tmp_path / "repo" / fmt.manifest_name(a.id)
    _damage_before_the_copy(monkeypatch, path)
    b = snap(repo, tmp_path / "data")
    assert _hash_file(tmp_path / "repo" / fmt.manifest_name(b.id)) == b.manifest_hash


def test_a_manifest_truncated_in_place_while_decoded_is_an_integrity_error(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    repo, info, path = one
    with repo.manifest_spool(info, in_place=True) as spool:
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(IntegrityError):
            ManifestFile(spool, "m").read()


# --------------------------------------------------------------------------------------------------------------
# Deletion, GC, hard links, a filesystem without them, threads


def test_a_spool_and_a_manifest_file_outlive_their_snapshots_delete_and_gc(
        tmp_path: Path, large: None) -> None:
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    a = snap(repo, tmp_path / "data")
    (tmp_path / "data" / "f0001.txt").write_text("changed")
    b = snap(repo, tmp_path / "data")
    good = (tmp_path / "repo" / fmt.manifest_name(a.id)).read_bytes()
    before = _fds()
    spool = repo.manifest_spool(a, in_place=True)
    mf = repo.open_manifest(a, in_place=True)
    dup = mf.copy()
    engine.delete_snapshots(repo, [a.id], prune=False)
    engine.gc_repository(repo)
    assert not (tmp_path / "repo" / fmt.manifest_name(a.id)).exists()
    for s in (spool, dup):
        assert b"".join(s.pieces(1000)) == good and s.hexdigest() == a.manifest_hash
    assert mf.read().file_count() == 300
    for s in (spool, dup):
        s.close()
    del mf
    import gc

    gc.collect()
    assert _fds() <= before
    assert engine.verify_repository(repo).ok
    engine.restore_snapshot(repo, b.id, str(tmp_path / "out"), cluster_id="east", release="6.2.1")
    assert contents(tmp_path / "out") == contents(tmp_path / "data")


def test_linked_manifests_survive_deleting_and_collecting_the_others(tmp_path: Path, large: None) -> None:
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    taken = [snap(repo, tmp_path / "data") for _ in range(4)]
    paths = [tmp_path / "repo" / fmt.manifest_name(s.id) for s in taken]
    assert len({os.stat(p).st_ino for p in paths}) == 1 and os.stat(paths[0]).st_nlink == 4
    engine.delete_snapshots(repo, [s.id for s in taken[:3]], prune=False)
    engine.gc_repository(repo)
    assert os.stat(paths[3]).st_nlink == 1 and _hash_file(paths[3]) == taken[3].manifest_hash
    assert not [n for n in os.listdir(tmp_path / "repo" / "manifests") if n.startswith(".")]
    assert engine.verify_repository(repo).ok
    again = snap(repo, tmp_path / "data")  # linked to the survivor
    assert os.stat(tmp_path / "repo" / fmt.manifest_name(again.id)).st_ino == os.stat(paths[3]).st_ino


@pytest.mark.parametrize("err", [errno.EPERM, errno.EMLINK])
def test_a_manifest_that_cannot_be_hard_linked_is_written(tmp_path: Path, large: None,
                                                          monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """Manifests that cannot be linked (EPERM: a filesystem without hard links for them; EMLINK: an unchanged
    tree's manifest at the link-count limit, 65,000 on ext4, a year of 8-minute cycles kept): written instead.
    (A local repository needs hard links anyway: its exclusive writes, e.g. locks, end with one.)"""
    real = os.link

    def no_links(src: str, dst: str, *a: object, **k: object) -> None:
        if "/manifests/" in os.fspath(src):
            raise OSError(err, os.strerror(err))
        real(src, dst, *a, **k)  # type: ignore[arg-type]

    repo = new_repo(tmp_path / "repo")
    monkeypatch.setattr(os, "link", no_links)
    _tree(tmp_path / "data")
    taken = [snap(repo, tmp_path / "data") for _ in range(3)]
    paths = [tmp_path / "repo" / fmt.manifest_name(s.id) for s in taken]
    assert len({os.stat(p).st_ino for p in paths}) == 3
    assert all(_hash_file(p) == taken[0].manifest_hash for p in paths)
    assert not [n for n in os.listdir(tmp_path / "repo" / "manifests") if n.startswith(".")]
    assert engine.verify_repository(repo).ok


def test_a_parent_deleted_while_a_capture_duplicates_it_leaves_the_new_snapshot_intact(
        tmp_path: Path, large: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's snapshot document and manifest removed (as a delete would, the capture's lock aside)
    between the capture's reading of the parent and its copy: the duplicate still holds the parent's bytes,
    nothing of that hash is left to link to, so the bytes are written, and they are the hashed ones."""
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    a = snap(repo, tmp_path / "data")
    real = capture_mod._Unchanged.copy

    def deleted_then_copy(self: object, memory_bytes: int) -> Spool:
        repo.delete_snapshot(a)
        return real(self, memory_bytes)  # type: ignore[arg-type]

    monkeypatch.setattr(capture_mod._Unchanged, "copy", deleted_then_copy)
    b = snap(repo, tmp_path / "data")
    pb = tmp_path / "repo" / fmt.manifest_name(b.id)
    assert b.manifest_hash == a.manifest_hash and _hash_file(pb) == b.manifest_hash
    assert os.stat(pb).st_nlink == 1
    monkeypatch.undo()
    assert engine.verify_repository(repo).ok


def test_many_threads_read_a_large_manifest_while_its_name_is_replaced_and_leak_nothing(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    repo, info, path = one
    good = path.read_bytes()
    before = _fds()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            for _ in range(15):
                try:
                    s = repo.manifest_spool(info, in_place=True)
                except IntegrityError:
                    continue  # the moment the name held the damaged copy
                with s:
                    mf = ManifestFile(s, "m")
                    with mf.copy() as dup:
                        assert dup.getvalue() == good == s.getvalue()
                    assert mf.read().file_count() == 300
                    del mf
        except BaseException as e:
            errors.append(e)

    def swapper() -> None:
        bad = bytearray(good)
        bad[700] ^= 1
        while not stop.is_set():
            repo.storage.write(fmt.manifest_name(info.id), bytes(bad))
            repo.storage.write(fmt.manifest_name(info.id), good)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    sw = threading.Thread(target=swapper)
    sw.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    sw.join(60)
    assert not errors, errors[:3]
    import gc

    gc.collect()
    assert _fds() <= before
    assert path.read_bytes() == good


def test_a_closed_manifest_files_copy_is_refused_not_a_copy_of_another_file(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    repo, info, _ = one
    spool = repo.manifest_spool(info, in_place=True)
    mf = ManifestFile(spool, "m")
    spool.close()
    # A descriptor number reused by the next open must never be duplicated instead.
    with open(os.devnull, "rb"), pytest.raises(ValueError):
        mf.copy()


def test_descriptors_of_the_in_place_path_are_read_only_and_the_stored_file_is_untouched(
        one: tuple[Repository, SnapshotInfo, Path]) -> None:
    repo, info, path = one
    good, st = path.read_bytes(), path.stat()
    spool = repo.manifest_spool(info, in_place=True)
    dup = spool.duplicate()
    assert dup is not None
    for s in (spool, dup):
        assert s._file is not None
        flags = __import__("fcntl").fcntl(s._file.fileno(), __import__("fcntl").F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(ValueError):
            s.write(b"x")
        assert ManifestFile(s, "m").read().file_count() == 300
        s.close()
    assert path.read_bytes() == good and path.stat().st_mtime_ns == st.st_mtime_ns


# --------------------------------------------------------------------------------------------------------------
# Shipments: primary -> standby, bytes and by reference, above and below the threshold


class RefLink(LocalLink):
    """A LocalLink that takes a commit by reference (manifest_of) as the gRPC server does: the standby's own
    copy of the named snapshot's manifest, checked, committed."""

    def __init__(self, rx: StandbyReceiver) -> None:
        super().__init__(rx)
        self.forms: list[str] = []

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "", patch_of: str = "") -> CommitOutcome:
        if not manifest_of:
            self.forms.append("bytes")
            return super().commit(epoch, sender, snapshot_doc, pieces, sender_seq)
        self.forms.append("reference")
        with self.rx.held_manifest(manifest_of, snapshot_doc) as spool:
            info, result = self.rx.commit(Caller(sender, epoch), snapshot_doc, spool, sender_seq)
        return CommitOutcome(info.id, result.written_files, result.removed, self.rx.state.applied_at)


def _shipped_once_and_captured_again(
        tmp_path: Path) -> tuple[Repository, Repository, Path, StandbyReceiver, RefLink, SnapshotInfo, SnapshotInfo]:
    """A primary's snapshot ``a`` shipped (bytes) to an in-process standby, and ``b`` captured unchanged."""
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    _tree(data)
    standby = new_repo(tmp_path / "standby")
    (tmp_path / "sdata").mkdir()
    rx = StandbyReceiver(standby, str(tmp_path / "sdata"), StateStore(str(tmp_path / "state")), agent="standby-1")
    link = RefLink(rx)
    a = snap(primary, data)
    ship_snapshot(primary, a, link, epoch=1, sender="east-1")
    return primary, standby, data, rx, link, a, snap(primary, data)


@pytest.mark.parametrize("ranged", [SMALL, 16 << 20])
def test_a_shipment_by_reference_links_the_standbys_copy_above_and_below_the_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranged: int) -> None:
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", ranged)
    primary, standby, data, rx, link, a, b = _shipped_once_and_captured_again(tmp_path)
    assert b.manifest_hash == a.manifest_hash
    before = _fds()
    ship_snapshot(primary, b, link, epoch=1, sender="east-1", manifest_of=a.id)
    assert link.forms == ["bytes", "reference"]
    assert rx.state.applied_snapshot == b.id
    sa, sb = (tmp_path / "standby" / fmt.manifest_name(s.id) for s in (a, b))
    assert _hash_file(sb) == b.manifest_hash and os.stat(sa).st_ino == os.stat(sb).st_ino
    assert _fds() <= before
    assert contents(tmp_path / "sdata") == contents(data)
    assert engine.verify_repository(standby).ok


@pytest.mark.parametrize("harm", ["fifo", "flipped byte", "missing"])
def test_a_shipment_by_reference_to_a_harmed_standby_copy_is_refused_not_linked(
        tmp_path: Path, large: None, harm: str) -> None:
    primary, _standby, _data, rx, link, a, b = _shipped_once_and_captured_again(tmp_path)
    sa = tmp_path / "standby" / fmt.manifest_name(a.id)
    if harm == "fifo":
        sa.unlink()
        os.mkfifo(sa)
    elif harm == "missing":
        sa.unlink()
    else:
        raw = bytearray(sa.read_bytes())
        raw[700] ^= 1
        sa.write_bytes(bytes(raw))
    before = _fds()
    _in_thread(lambda: ship_snapshot(primary, b, link, epoch=1, sender="east-1", manifest_of=a.id))
    assert link.forms == ["bytes", "reference", "bytes"]  # refused (ManifestNotHeld), then the bytes sent
    assert _fds() <= before
    sb = tmp_path / "standby" / fmt.manifest_name(b.id)
    assert _hash_file(sb) == b.manifest_hash
    if harm != "missing":
        assert sa.is_fifo() or os.stat(sb).st_ino != os.stat(sa).st_ino  # never linked to the harmed copy
    assert rx.state.applied_snapshot == b.id


@pytest.mark.parametrize("swept", [False, pytest.param(True, marks=pytest.mark.xfail(
    strict=True, reason="a link interrupted by kill -9 between os.link and os.rename leaves manifests/.tmp-*; GC "
    "removes such leftovers only when it sweeps anyway (garbage to delete: tests/test_gc_leftovers.py), never in "
    "a sweep of their own, which would wait for the exclusive lock behind every open standby session"))])
def test_a_standby_commit_interrupted_after_linking_is_taken_again(
        tmp_path: Path, large: None, monkeypatch: pytest.MonkeyPatch, swept: bool) -> None:
    """kill -9 between the link's temporary name and its rename, played in process: the link's temporary name
    is left; the commit again (restart) succeeds, the standby verifies, and GC leaves the survivor intact."""
    primary, standby, _data, _rx, link, a, b = _shipped_once_and_captured_again(tmp_path)

    class Killed(BaseException):
        pass

    real_rename = os.rename

    def killed(src: str, dst: str, *args: object, **kw: object) -> None:
        if os.path.basename(src).startswith(".tmp-") and fmt.manifest_name(b.id).split("/")[-1] in dst:
            raise Killed()
        real_rename(src, dst, *args, **kw)  # type: ignore[arg-type]

    real_unlink = os.unlink
    monkeypatch.setattr(os, "rename", killed)
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(Killed):
        ship_snapshot(primary, b, link, epoch=1, sender="east-1", manifest_of=a.id)
    monkeypatch.setattr(os, "unlink", real_unlink)
    monkeypatch.setattr(os, "rename", real_rename)
    left = [n for n in os.listdir(tmp_path / "standby" / "manifests") if n.startswith(".tmp-")]
    assert left  # the interrupted link
    rx2 = StandbyReceiver(standby, str(tmp_path / "sdata"), StateStore(str(tmp_path / "state")),
                          agent="standby-1")
    ship_snapshot(primary, b, RefLink(rx2), epoch=1, sender="east-1", manifest_of=a.id)
    assert rx2.state.applied_snapshot == b.id
    assert _hash_file(tmp_path / "standby" / fmt.manifest_name(b.id)) == b.manifest_hash
    engine.gc_repository(standby)
    assert engine.verify_repository(standby).ok
    assert _hash_file(tmp_path / "standby" / fmt.manifest_name(a.id)) == a.manifest_hash
    # The interrupted link's temporary name is swept, or the inode it holds outlives every snapshot naming it.
    if swept:
        assert not [n for n in os.listdir(tmp_path / "standby" / "manifests") if n.startswith(".tmp-")]


def test_a_backup_of_a_large_local_manifest_restores_and_verifies(tmp_path: Path, large: None) -> None:
    repo = new_repo(tmp_path / "repo")
    _tree(tmp_path / "data")
    snap(repo, tmp_path / "data")
    b = snap(repo, tmp_path / "data")  # linked to the first
    before = _fds()
    made = backup.create_backup(repo, b.id, str(tmp_path / "backups"))
    assert _fds() <= before
    assert backup.verify_backup(made.path).ok
    backup.restore_backup(made.path, str(tmp_path / "out"))
    assert contents(tmp_path / "out") == contents(tmp_path / "data")


# --------------------------------------------------------------------------------------------------------------
# The capture: no heap trim after a window that read nothing; bytes the same either way


def test_a_capture_trims_only_after_windows_that_read_and_its_bytes_match_a_fresh_encoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims = [0]
    monkeypatch.setattr(allocators, "give_back", lambda: trims.__setitem__(0, trims[0] + 1))
    monkeypatch.setattr(capture_mod, "_WINDOW", 64)
    repo = new_repo(tmp_path / "repo")
    data = tmp_path / "data"
    _tree(data, 600)
    a = snap(repo, data)
    assert trims[0] >= 8  # 10 windows, each read: all but the first trimmed after
    trims[0] = 0
    b = snap(repo, data)
    assert b.manifest_hash == a.manifest_hash and trims[0] == 0
    (data / "f0300.txt").write_text("changed, in the fifth window")
    os.utime(data / "f0300.txt", (1_700_000_100, 1_700_000_100))  # only its own ctime moves
    c = snap(repo, data)
    assert trims[0] == 1  # only after the window that read it
    # The pure encoding of the same tree: a fresh repository, no parent.
    fresh = new_repo(tmp_path / "fresh")
    d = snap(fresh, data)
    assert d.manifest_hash == c.manifest_hash
    assert (tmp_path / "fresh" / fmt.manifest_name(d.id)).read_bytes() == \
        (tmp_path / "repo" / fmt.manifest_name(c.id)).read_bytes()


# --------------------------------------------------------------------------------------------------------------
# Chunk counts: the unstable sort


def _ref_count(rows: list[list[tuple[bytes, int]]]) -> ChunkCount:
    seen: dict[bytes, int] = {}
    for r in rows:
        for cid, size in r:
            seen.setdefault(cid, size)
    return ChunkCount(len(seen), sum(seen.values()))


def _manifest_of(rows: list[list[tuple[bytes, int]] | None]) -> Manifest:
    n = len(rows)
    paths = [f"d/f{i:05}" for i in range(n)]
    chunks = [[c for c, _ in r] if r is not None else [] for r in rows]
    sizes = [[s for _, s in r] if r is not None else [77] for r in rows]  # None: a DistCp row (no ids)
    return Manifest.from_columns({
        "path": paths, "type": ["file"] * n, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n,
        "size": [sum(s) for s in sizes], "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)),
        "target": [None] * n, "content": [bytes(32)] * n, "chunks": chunks, "chunk_sizes": sizes})


@pytest.mark.parametrize("seed", range(10))
def test_chunk_counts_are_exact_for_hostile_manifests_in_any_row_grouping(seed: int,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import drsync.repository.manifest as manifest_mod

    rnd = random.Random(seed)
    prefix = [rnd.randbytes(8) for _ in range(3)]
    pool = [p + rnd.randbytes(24) for p in prefix for _ in range(5)]  # many ids per shared 8-byte prefix
    pool += [p + b"\0" * 24 for p in prefix] + [b"\0" * 32, b"\0" * 31 + b"\1", b"\1" + b"\0" * 31]
    size = {c: rnd.randrange(1, 1 << 20) for c in pool}
    rows: list[list[tuple[bytes, int]] | None] = []
    for _ in range(rnd.randrange(0, 3000)):
        r = rnd.random()
        if r < 0.1:
            rows.append(None)
        else:
            rows.append([(c, size[c]) for c in (rnd.choice(pool) for _ in range(rnd.randrange(0, 6)))])
    want = _ref_count([r for r in rows if r is not None])
    m = _manifest_of(rows)
    assert count_chunks(m) == want
    monkeypatch.setattr(manifest_mod, "ROW_GROUP_ROWS", rnd.choice([1, 7, 100]), raising=False)
    assert count_chunks(ManifestFile(m.to_bytes())) == want


def test_sort_unique_unstable_on_all_equal_and_all_tied_keys() -> None:
    rnd = random.Random(5)
    same8 = b"\x42" * 8
    raw = [same8 + rnd.randbytes(24) for _ in range(300)]
    raw = raw + raw[::-1] + [same8 + b"\0" * 24] * 50 + [b"\0" * 32] * 1000
    rnd.shuffle(raw)
    ids = np.frombuffer(b"".join(raw), ID_DTYPE)
    pieces = [ids[:1].copy(), ids[1:700].copy(), ids[700:].copy()]
    for order in (sort_unique(ids, stable=False),
                  sort_unique(None, pieces_key(pieces), take=lambda at: gather(pieces, at), stable=False)):
        assert [ids[i:i + 1].tobytes() for i in order] == sorted(set(raw))


# --------------------------------------------------------------------------------------------------------------
# Warming


def test_warming_passes_over_batches_the_reader_reached_and_stays_within_its_bound() -> None:
    batches = [[f"b{i}"] for i in range(12)]
    warmed: list[int] = []
    first = threading.Event()

    def warm(rels: list[str]) -> int:
        i = int(rels[0][1:])
        warmed.append(i)
        if i == 1:
            first.wait(60)
        return len(rels)

    w = Warming(warm, batches)
    try:
        wait_for(lambda: warmed == [1], "the warmer to start batch 1")
        for _ in range(5):
            w.read_one()  # the reader overtakes: it reads batch 5 now
        first.set()
        wait_for(lambda: len(warmed) >= 3, "the warmer to move on")
        assert warmed == [1, 6, 7]  # 2..5 passed over; 7 = 5 + WARM_AHEAD
        for _ in range(20):  # the reader runs past the end
            w.read_one()
    finally:
        _in_thread(w.close, 60)
    assert all(i <= 5 + WARM_AHEAD or i > 7 for i in warmed) and warmed[:3] == [1, 6, 7]
    assert len(warmed) == len(set(warmed))  # never one batch twice


@pytest.mark.parametrize("batches", [[], [["a"]], [["a"], []], [[], [], []]])
def test_warming_of_degenerate_batch_lists_closes(batches: list[list[str]]) -> None:
    calls: list[list[str]] = []
    w = Warming(lambda rels: calls.append(rels) or len(rels), batches)  # type: ignore[func-returns-value]
    for _ in range(len(batches) + 2):
        w.read_one()
    _in_thread(w.close, 60)
    assert all(r in batches[1:] for r in calls)


def test_warming_closed_twice_and_from_many_threads_returns() -> None:
    w = Warming(lambda rels: len(rels), [["a"], ["b"], ["c"], ["d"], ["e"]])
    ts = [threading.Thread(target=w.close) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive()
    w.close()
    w.read_one()  # after close: harmless


def test_warming_when_the_warm_callable_returns_nonsense_never_raises() -> None:
    for bad in (lambda rels: None, lambda rels: "x", lambda rels: 1 / 0):
        with Warming(bad, [["a"], ["b"], ["c"]]) as w:  # type: ignore[arg-type]
            w.read_one()


# --------------------------------------------------------------------------------------------------------------
# Scale (DRSYNC_RELIABILITY=full): a real tree whose manifest passes the real 16 MiB threshold


@pytest.mark.skipif(not FULL, reason="scale: DRSYNC_RELIABILITY=full")
def test_a_250000_file_tree_takes_the_in_place_path_with_the_real_threshold(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from scale import build_tree  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "bench"))
    data = tmp_path / "data"
    build_tree(data, 250_000)
    (data / ".complete").unlink()
    repo = new_repo(tmp_path / "repo")
    a = snap(repo, data)
    pa_ = tmp_path / "repo" / fmt.manifest_name(a.id)
    assert pa_.stat().st_size > repo_mod.RANGED_MANIFEST_BYTES
    before = _fds()
    spool = repo.manifest_spool(a, in_place=True)
    assert not spool.in_memory and spool.file_identity() == (pa_.stat().st_dev, pa_.stat().st_ino)
    spool.close()
    b = snap(repo, data)
    pb = tmp_path / "repo" / fmt.manifest_name(b.id)
    assert b.manifest_hash == a.manifest_hash and pb.stat().st_ino == pa_.stat().st_ino
    assert _fds() <= before
    assert count_chunks(repo.open_manifest(b, in_place=True)).chunks == len(repo.load_manifest_chunks(b))
