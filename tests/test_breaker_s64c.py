"""Breaker s64c: manifests hard-linked on local storage (f1b1057, 73dad41), spool readers through their own
descriptor (Arrow's OSFile), and the chunk count of a named-manifest shipment made on a thread (Counting).

Real repositories on the local filesystem; the link limits, an immutable source and planted non-files are real
filesystem conditions, not mocks."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from drsync import engine
from drsync.agent import primary
from drsync.agent.primary import Counting, count_chunks
from drsync.errors import DrsyncError
from drsync.repository import format as fmt
from drsync.repository import manifest as manifest_mod
from drsync.repository import repo as repo_mod
from drsync.repository.manifest import ManifestFile
from drsync.repository.repo import Repository
from drsync.repository.spool import Spool
from drsync.storage.local import LocalStorage
from drsync.storage.memory import MemoryStorage

PAST = 1_600_000_000


def build(root: Path, dirs: int = 4, files: int = 100) -> None:
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"f{i:04}").write_bytes(f"{d}-{i}".encode() * (1 + i % 7))
    for p in [root, *root.rglob("*")]:
        os.utime(p, (PAST, PAST), follow_symlinks=False)


def local_repo(tmp_path: Path) -> tuple[Repository, Path]:
    path = tmp_path / "repo"
    return Repository.init(LocalStorage(str(path), create=True), cluster_id="c", release="1"), path


def mpath(path: Path, snap_id: str) -> Path:
    return path / fmt.manifest_name(snap_id)


def snap(repo: Repository, root: Path):
    return engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))


def commit_bytes(repo: Repository, like, data: bytes, snap_id: str):
    """Commit ``data`` as the manifest of a copy of snapshot ``like`` named ``snap_id`` (what a standby does
    with a manifest whose bytes came whole)."""
    import dataclasses

    with repo.write_session() as session:
        return session.commit(dataclasses.replace(like, id=snap_id), data, require_chunks=False)


def assert_clean(repo: Repository) -> None:
    report = repo.verify()
    assert not report.problems and not report.damaged_files, (report.problems, report.damaged_files)


def restore_ok(repo: Repository, snap_id: str, root: Path, out: Path) -> None:
    engine.restore_snapshot(repo, snap_id, str(out), cluster_id="c", release="1")
    for p in root.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(root)).read_bytes() == p.read_bytes()


# --- 1. hard links ----------------------------------------------------------------------------------------


def test_unchanged_snapshots_share_one_inode_and_survive_deletion_in_any_order(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    snaps = [snap(repo, root) for _ in range(5)]
    inodes = {mpath(path, s.id).stat().st_ino for s in snaps}
    assert len(inodes) == 1 and mpath(path, snaps[0].id).stat().st_nlink == 5
    for victim, left in ((2, 4), (0, 3), (4, 2)):
        repo.delete_snapshot(snaps[victim])
        repo.gc()
        assert mpath(path, snaps[1].id).stat().st_nlink == left
        assert_clean(repo)
    restore_ok(repo, snaps[3].id, root, tmp_path / "out")
    # a new unchanged capture links to the newest remaining one
    again = snap(repo, root)
    assert mpath(path, again.id).stat().st_ino == mpath(path, snaps[3].id).stat().st_ino
    repo.delete_snapshot(snaps[1])
    repo.delete_snapshot(snaps[3])
    repo.gc()
    assert mpath(path, again.id).stat().st_nlink == 1
    assert_clean(repo)
    restore_ok(repo, again.id, root, tmp_path / "out2")


def test_a_damaged_shared_file_is_reported_for_every_snapshot_and_an_unchanged_capture_writes_fresh(
        tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    snaps = [snap(repo, root) for _ in range(3)]
    f = mpath(path, snaps[0].id)
    size = f.stat().st_size
    with open(f, "r+b") as fh:  # in place, same size
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    report = repo.verify()
    text = "\n".join(report.problems)
    for s in snaps:
        assert s.id in text, (s.id, report.problems)
    with pytest.raises(DrsyncError):  # a capture against the damaged parent refuses (as before these commits)
        snap(repo, root)
    good = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    ref = snap(good, root)
    assert ref.manifest_hash == snaps[0].manifest_hash
    fresh = commit_bytes(repo, snaps[0], good.manifest_bytes(ref), "00000000000000f1")
    assert mpath(path, fresh.id).stat().st_ino != f.stat().st_ino
    assert repo.manifest_bytes(fresh)
    restore_ok(repo, fresh.id, root, tmp_path / "out")


def _fill_links(target: Path, where: Path) -> int:
    """Hard links to ``target`` in ``where`` until the filesystem refuses (EMLINK); the count made."""
    where.mkdir()
    n = 0
    while True:
        try:
            os.link(target, where / f"l{n}")
        except OSError as e:
            if e.errno == errno.EMLINK:
                return n
            raise
        n += 1
        if n > 200_000:
            return -1


def test_a_source_at_its_link_limit_is_written_instead(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    first = snap(repo, root)
    src = mpath(path, first.id)
    made = _fill_links(src, tmp_path / "links")
    if made < 0:
        shutil.rmtree(tmp_path / "links")
        pytest.skip("this filesystem has no small link limit")
    try:
        again = snap(repo, root)
        new = mpath(path, again.id)
        assert new.stat().st_ino != src.stat().st_ino and new.stat().st_nlink == 1
        assert repo.manifest_bytes(again) == repo.manifest_bytes(first)
        assert not [p for p in (path / "manifests").iterdir() if p.name.startswith(".tmp-")]
    finally:
        shutil.rmtree(tmp_path / "links")
    assert_clean(repo)


def test_an_immutable_source_cannot_be_linked_and_is_written_instead(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    first = snap(repo, root)
    src = mpath(path, first.id)
    if subprocess.run(["chattr", "+i", str(src)], capture_output=True).returncode != 0:
        pytest.skip("no immutable attribute on this filesystem")
    try:
        again = snap(repo, root)
        new = mpath(path, again.id)
        assert new.stat().st_ino != src.stat().st_ino
        assert repo.manifest_bytes(again) == repo.manifest_bytes(first)
    finally:
        subprocess.run(["chattr", "-i", str(src)], check=True)
    assert_clean(repo)


def test_a_symlink_planted_at_the_sources_name_is_not_linked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    first = snap(repo, root)
    src = mpath(path, first.id)
    elsewhere = tmp_path / "elsewhere.parquet"
    shutil.copyfile(src, elsewhere)
    src.unlink()
    src.symlink_to(elsewhere)  # the same bytes, read through the link: the hash checks
    again = snap(repo, root)
    new = mpath(path, again.id)
    assert not new.is_symlink() and new.stat().st_ino != elsewhere.stat().st_ino
    assert elsewhere.stat().st_nlink == 1
    assert repo.manifest_bytes(again) == elsewhere.read_bytes()


def test_a_directory_planted_at_the_sources_name_is_not_linked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    first = snap(repo, root)
    data = repo.manifest_bytes(first)
    src = mpath(path, first.id)
    src.unlink()
    src.mkdir()
    again = commit_bytes(repo, first, data, "00000000000000d1")
    assert mpath(path, again.id).is_file() and mpath(path, again.id).read_bytes() == data
    assert src.is_dir()


def test_a_source_replaced_by_other_bytes_of_the_same_size_is_not_linked(tmp_path: Path) -> None:
    """The race the hash check closes: the newest file of that hash rewritten (same size) after the snapshot
    committed; the next commit of those bytes must write them, not link the rewritten file."""
    root = tmp_path / "data"
    build(root)
    repo, path = local_repo(tmp_path)
    first = snap(repo, root)
    data = repo.manifest_bytes(first)
    src = mpath(path, first.id)
    src.write_bytes(bytes(len(data)))  # zeroes, same size
    info = commit_bytes(repo, first, data, "00000000000000aa")
    new = mpath(path, info.id)
    assert new.stat().st_ino != src.stat().st_ino and new.read_bytes() == data


def test_memory_storage_has_no_link_and_stores_bytes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    assert getattr(repo.storage, "link", None) is None
    a, b = snap(repo, root), snap(repo, root)
    repo.delete_snapshot(a)
    repo.gc()
    assert repo.manifest_bytes(b)
    assert_clean(repo)


def test_a_non_root_committer_refused_a_link_by_protected_hardlinks_writes_instead(tmp_path: Path) -> None:
    """A non-root committer that cannot link (fs.protected_hardlinks: a source owned by another user it
    cannot write) must fall back to writing."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own the source as another user")
    try:
        with open("/proc/sys/fs/protected_hardlinks") as fh:
            protected = fh.read().strip() == "1"
    except OSError:
        protected = False
    if not protected:
        pytest.skip("fs.protected_hardlinks is off")
    base = Path("/tmp/breaker-s64c") / tmp_path.name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    os.chmod(base.parent, 0o755)
    try:
        root = base / "data"
        build(root)
        for p in [root, *root.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        repo, path = local_repo(base)
        first = snap(repo, root)
        src = mpath(path, first.id)
        os.chmod(src, 0o444)  # owned by root, not writable by others: protected_hardlinks refuses a link by nobody
        for p in [base, path, *path.rglob("*")]:
            if p != src:
                os.chown(p, 65534, 65534, follow_symlinks=False)
        script = (
            "from drsync import engine\n"
            "from drsync.repository.repo import Repository\n"
            "from drsync.storage.local import LocalStorage\n"
            f"repo = Repository.open(LocalStorage({str(path)!r}))\n"
            f"s = engine.create_snapshot(repo, engine.SnapshotRequest({str(root)!r}))\n"
            "print(s.id)\n")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME=str(base))
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            script], capture_output=True, text=True, env=env, cwd="/work/main", timeout=120)
        if r.returncode != 0 and "setpriv" in r.stderr:
            pytest.skip(r.stderr)
        assert r.returncode == 0, r.stderr
        new = mpath(path, r.stdout.strip())
        assert r.stdout.strip() != first.id
        assert new.read_bytes() == src.read_bytes()  # an unchanged capture
        assert new.stat().st_ino != src.stat().st_ino and new.stat().st_uid == 65534
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- 2. spools ----------------------------------------------------------------------------------------------


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _file_spool(data: bytes) -> Spool:
    s = Spool(memory_bytes=16)
    s.write(data)
    assert not s.in_memory
    return s


def _fds_on(ino: tuple[int, int]) -> list[int]:
    out = []
    for n in _fds():
        try:
            st = os.stat(f"/proc/self/fd/{n}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ino:
            out.append(n)
    return out


def test_spool_readers_have_own_positions_and_fail_after_close_and_free_the_file() -> None:
    data = os.urandom(200_000)
    s = _file_spool(data)
    st = os.fstat(s._file.fileno())  # type: ignore[union-attr]
    ino = (st.st_dev, st.st_ino)
    a, b = s.source(), s.source()
    assert isinstance(a, pa.NativeFile) and isinstance(b, pa.NativeFile)
    assert a.read(10) == data[:10]
    assert b.read(5) == data[:5]
    assert a.read(10) == data[10:20]
    assert a.size() == len(data)
    s.close()
    with pytest.raises((ValueError, OSError)):
        a.read(10)
    with pytest.raises((ValueError, OSError)):
        b.read_at(10, 0)
    assert _fds_on(ino) == [], "a descriptor on the spool's temporary file outlived close()"


def test_a_reader_kept_only_inside_a_parquet_reader_is_closed_with_the_spool(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    info = snap(repo, root)
    s = _file_spool(repo.manifest_bytes(info))
    st = os.fstat(s._file.fileno())  # type: ignore[union-attr]
    pf = pq.ParquetFile(s.source())  # the Python reader object is not held by the caller
    gc.collect()
    s.close()
    with pytest.raises((ValueError, OSError, pa.ArrowInvalid)):
        pf.read_row_group(0)
    assert _fds_on((st.st_dev, st.st_ino)) == []


def test_many_spools_leak_no_descriptor(tmp_path: Path) -> None:
    root = tmp_path / "data"
    build(root)
    repo = Repository.init(MemoryStorage(), cluster_id="c", release="1")
    info = snap(repo, root)
    data = repo.manifest_bytes(info)
    before = len(_fds())
    for i in range(300):
        s = _file_spool(data)
        mf = ManifestFile(s)
        if i % 3 == 0:
            mf.group(0)
            s.source().read(4)
        if i % 3 == 1:
            s.close()
            continue
        with s:
            mf.reopen().group(mf.num_groups - 1)
    del mf, s
    assert len(_fds()) <= before + 2


def test_a_spool_dropped_unclosed_keeps_its_readers_working() -> None:
    data = os.urandom(100_000)
    s = _file_spool(data)
    r = s.source()
    del s
    gc.collect()
    assert r.read_at(100, 5000) == data[5000:5100]
    r.close()


def test_concurrent_readers_on_threads_read_correctly() -> None:
    data = os.urandom(1 << 20)
    s = _file_spool(data)
    errors: list[str] = []

    def run(k: int) -> None:
        r = s.source()
        for j in range(200):
            at = ((k * 7919 + j * 104729) % (len(data) - 4096))
            r.seek(at)
            if r.read(4096) != data[at:at + 4096]:
                errors.append(f"{k}:{j}")
        r.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert errors == []


def test_a_closed_spool_reader_never_reads_a_file_that_reused_its_descriptor() -> None:
    data = b"A" * 100_000
    s = _file_spool(data)
    r = s.source()
    fd = r.fileno()
    s.close()
    opened = [os.open("/dev/zero", os.O_RDONLY) for _ in range(8)]  # the freed numbers taken by another file
    try:
        assert fd in opened
        with pytest.raises((ValueError, OSError)):
            r.read_at(10, 0)
    finally:
        for o in opened:
            os.close(o)


# --- 3. Counting -----------------------------------------------------------------------------------------


def test_counting_of_a_file_spool_manifest_equals_count_chunks(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 50)
    root = tmp_path / "data"
    build(root)
    repo, _ = local_repo(tmp_path)
    info = snap(repo, root)
    s = _file_spool(repo.manifest_bytes(info))
    mf = ManifestFile(s)
    expect = count_chunks(ManifestFile(repo.manifest_bytes(info)))
    counts = [Counting(mf.reopen()) for _ in range(6)]
    assert all(c.result() == expect for c in counts)
    s.close()


class _NoStandby:
    """A link no call may reach: the guard refuses the commit before it."""

    target = "nowhere"

    def missing(self, epoch, batches):
        raise AssertionError("asked about chunks")

    def upload(self, epoch, batches):
        raise AssertionError("uploaded")

    def commit(self, *a, **k):
        raise AssertionError("committed")


def test_a_refused_named_shipment_reads_nothing_after_its_spool_closes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_mod, "ROW_GROUP", 20)
    monkeypatch.setattr(repo_mod, "RANGED_MANIFEST_BYTES", 4096)  # its spool is a temporary file
    root = tmp_path / "data"
    build(root, dirs=10, files=300)
    repo, _ = local_repo(tmp_path)
    info = snap(repo, root)

    class Fenced(Exception):
        pass

    def guard(final: bool) -> None:
        if final:
            raise Fenced("no longer primary")

    counts: list[Counting] = []

    class Kept(Counting):  # the counts made, kept to ask them afterwards (the shipment drops its own)
        def __init__(self, manifest: object) -> None:
            super().__init__(manifest)  # type: ignore[arg-type]
            counts.append(self)

    monkeypatch.setattr(primary, "Counting", Kept)
    with pytest.raises(Fenced):
        primary.ship_snapshot(repo, info, _NoStandby(), epoch=1, sender="p", guard=guard, manifest_of=info.id)  # type: ignore[arg-type]
    assert counts, "no Counting made"
    for c in counts:
        c.result()  # raises when the count read its file after the spool closed


def test_backups_repair_and_verify_of_linked_snapshots_through_the_cli(tmp_path: Path) -> None:
    from tests.conftest import make_tree, run_drsync, tree_state
    from tests.test_backup_cli import config

    make_tree(tmp_path / "data")
    cfg = config(tmp_path)
    assert run_drsync("init", "--config", cfg).code == 0
    ids = []
    for _ in range(3):
        r = run_drsync("snapshot", "create", "--config", cfg, "--json")
        assert r.code == 0, r.err
        ids.append(r.json()["id"])
    repo_dir = tmp_path / "repo-east"
    inos = {(repo_dir / fmt.manifest_name(i)).stat().st_ino for i in ids}
    assert len(inos) == 1
    paths = []
    for i in ids[:2]:
        b = run_drsync("backup", "create", "--config", cfg, "--snapshot", i, "--mode", "full", "--json")
        assert b.code == 0, b.err
        paths.append(Path(b.json()["path"]))
    d = run_drsync("snapshot", "delete", "--config", cfg, "--break-glass", ids[0])
    assert d.code == 0, d.out + d.err
    assert not (repo_dir / fmt.manifest_name(ids[0])).exists()
    assert (repo_dir / fmt.manifest_name(ids[1])).stat().st_nlink == 2
    g = run_drsync("repo", "gc", "--config", cfg)
    assert g.code == 0, g.err
    rep = run_drsync("repo", "repair", "--config", cfg)
    assert rep.code == 0, rep.out + rep.err
    v = run_drsync("repo", "verify", "--config", cfg)
    assert v.code == 0, v.out + v.err
    for n, p in enumerate(paths):
        vb = run_drsync("backup", "verify", p, "--json")
        assert vb.code == 0 and vb.json()["ok"] is True, vb.out + vb.err
        out = tmp_path / f"restored{n}"
        r = run_drsync("backup", "restore", p, "--target", out, "--json")
        assert r.code == 0, r.err
        assert tree_state(out) == tree_state(tmp_path / "data")
    b = run_drsync("backup", "create", "--config", cfg, "--snapshot", ids[2], "--mode", "full", "--json")
    assert b.code == 0, b.err
    assert run_drsync("backup", "verify", b.json()["path"], "--json").json()["ok"] is True
