"""Capture any tree a real cluster holds (issue: one odd file never stops replication).

Names that are not UTF-8, times before 1970 and after 2262, paths longer than PATH_MAX,
hard links, sparse files, extended attributes and POSIX ACLs: each is captured, backed
up, verified and restored byte for byte, also through a real primary/standby pair. A
path that exists but cannot be read keeps its last version (stale), never a deletion;
an empty data root where the last snapshot was not is refused.
"""

from __future__ import annotations

import json
import os
import stat as st
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from drsync import backup, engine
from drsync.errors import OperationFailed
from drsync.repository.manifest import SCHEMA_V1, Manifest
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import SLOW, age_tree, run_drsync
from tests.users import give_to_nobody, pair_configs, preload_everything, run_as_nobody, serves, start_agent

NS = 1_000_000_000
YEAR_2400 = 13_569_465_600 * NS + 123_456_789
YEAR_1900 = -2_208_988_800 * NS + 5


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The kernel's xattr form of a POSIX ACL: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_ACCESS = posix_acl([(1, 6, 0xFFFFFFFF), (2, 4, 1234), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
                        (0x20, 0, 0xFFFFFFFF)])
ACL_DEFAULT = posix_acl([(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (8, 5, 4321), (0x10, 5, 0xFFFFFFFF),
                         (0x20, 0, 0xFFFFFFFF)])


def exact_state(root: str | bytes) -> dict[bytes, tuple]:
    """Everything a restore must give back, read through directory descriptors (so paths longer
    than PATH_MAX work): type, mode, mtime, bytes or link target, xattrs (ACLs included), whether
    the file is sparse, and which paths share an inode."""
    top = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    first_of_inode: dict[int, bytes] = {}
    for dirpath, dirnames, filenames, dfd in os.fwalk(top):
        rel_dir = os.path.relpath(dirpath, top) if dirpath != top else b""
        for name in sorted(dirnames + filenames):
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rel.split(b"/")[0].startswith(b".drsync"):
                continue
            s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if st.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=dfd), s.st_mtime_ns)
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                xattrs = {n: os.getxattr(fd, n) for n in sorted(os.listxattr(fd))}
                if st.S_ISDIR(s.st_mode):
                    out[rel] = ("dir", st.S_IMODE(s.st_mode), s.st_mtime_ns, xattrs)
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
            finally:
                os.close(fd)
            link_of = first_of_inode.setdefault(s.st_ino, rel) if s.st_nlink > 1 else None
            out[rel] = ("file", st.S_IMODE(s.st_mode), s.st_mtime_ns, data, xattrs,
                        s.st_blocks * 512 < s.st_size, link_of)
    return out


def odd_tree(root: Path) -> None:
    """What real clusters hold and drsync used to fail on or silently change."""
    raw = os.fsencode(root)
    root.mkdir(parents=True)
    os.mkdir(raw + b"/dir-\xff\xfe")
    with open(raw + b"/dir-\xff\xfe/caf\xe9-latin1.txt", "wb") as f:
        f.write(b"a latin-1 name\n")
    with open(raw + b"/bad\xffname", "wb") as f:
        f.write(b"not utf-8\n")
    os.symlink(b"bad\xffname", raw + b"/link-to-\xff")
    for name in ("back\\slash", "new\nline", "tab\there", " space ", "-dash", "*?[x]"):
        (root / name).write_bytes(name.encode())
    (root / "times").mkdir()
    (root / "times" / "year-2400").write_bytes(b"future\n")
    os.utime(root / "times" / "year-2400", ns=(YEAR_2400, YEAR_2400))
    (root / "times" / "year-1900").write_bytes(b"past\n")
    os.utime(root / "times" / "year-1900", ns=(YEAR_1900, YEAR_1900))
    (root / "times" / "dir-2400").mkdir()
    os.utime(root / "times" / "dir-2400", ns=(YEAR_2400, YEAR_2400))
    # Deeper than PATH_MAX: 22 directories of 200 bytes.
    deep = os.fsencode(root / "deep")
    os.mkdir(deep)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(22):
        name = (f"{i:02}-" + "d" * 197).encode()
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    wfd = os.open("at-the-bottom", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
    os.write(wfd, b"more than 4096 bytes below the root\n")
    os.close(wfd)
    os.close(fd)
    # Hard links: three names of one inode, and a pair in another directory.
    (root / "links").mkdir()
    (root / "links" / "a").write_bytes(b"one inode, three names\n")
    os.link(root / "links" / "a", root / "links" / "b")
    os.link(root / "links" / "a", root / "c-elsewhere")
    (root / "links" / "p").write_bytes(b"a pair\n")
    os.link(root / "links" / "p", root / "links" / "q")
    # Sparse: 16 MiB with 8 KiB of data in the middle.
    with open(root / "sparse.img", "wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(os.urandom(8192))
    # Extended attributes and POSIX ACLs (access on a file, access and default on a directory).
    (root / "attrs").mkdir()
    (root / "attrs" / "f").write_bytes(b"with attributes\n")
    os.setxattr(root / "attrs" / "f", "user.checksum", b"\x00\x01binary\xff")
    os.setxattr(root / "attrs" / "f", "user.empty", b"")
    os.setxattr(root / "attrs" / "f", "system.posix_acl_access", ACL_ACCESS)
    os.setxattr(root / "attrs", "user.owner-team", b"analytics")
    os.setxattr(root / "attrs", "system.posix_acl_default", ACL_DEFAULT)
    for p in (root / "attrs" / "f", root / "attrs", root / "links" / "a"):
        s = p.stat()
        os.utime(p, ns=(s.st_mtime_ns - 10 * NS, s.st_mtime_ns - 10 * NS))


def init_repo(path: Path) -> str:
    r = run_drsync("init", "--repo", path, "--cluster-id", "c", "--release", "1")
    assert r.code == 0, r.err
    return str(path)


def test_an_odd_tree_is_captured_backed_up_and_restored_exactly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    odd_tree(src)
    age_tree(src)
    repo = init_repo(tmp_path / "repo")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    assert not r.json()["warnings"], r.json()["warnings"]
    doc = r.json()
    assert doc["skipped_paths"] == 0 and doc["stale_paths"] == 0, doc
    snap = doc["id"]
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    want = exact_state(src)
    # A snapshot restore over a target holding other things, and into a new directory.
    target = tmp_path / "target"
    (target / "links").mkdir(parents=True)
    (target / "links" / "a").write_bytes(b"an unrelated file\n")
    os.link(target / "links" / "a", target / "links" / "stray")
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra", snap, "--repo", repo, "--target", target)
    assert r.code == 0, r.err
    assert exact_state(target) == want
    # Backup, verify, restore on "another cluster".
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", snap, "--dest", tmp_path / "backups", "--json")
    assert r.code == 0, r.err
    path = r.json()["path"]
    assert run_drsync("backup", "verify", path).code == 0
    r = run_drsync("backup", "restore", "--overwrite", "--delete-extra", path, "--target", tmp_path / "from-backup")
    assert r.code == 0, r.err
    got = exact_state(tmp_path / "from-backup")
    assert got == want
    assert os.stat(tmp_path / "from-backup" / "sparse.img").st_blocks * 512 < 1 << 20  # holes, not 16 MiB
    # A second capture of the unchanged tree reuses everything (but the file dated in the future,
    # whose mtime cannot tell a same-tick rewrite) and diffs empty.
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0 and r.json()["read_bytes"] == len(b"future\n"), r.out + r.err
    d = run_drsync("snapshot", "diff", snap, r.json()["id"], "--repo", repo, "--json").json()
    assert (d["added"], d["removed"], d["changed"]) == ([], [], [])


def test_diff_and_listings_show_undecodable_names_without_failing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    repo = init_repo(tmp_path / "repo")
    first = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json", "--allow-empty").json()["id"]
    with open(os.fsencode(src) + b"/x\xff", "wb") as f:
        f.write(b"x")
    second = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json").json()["id"]
    human = run_drsync("snapshot", "diff", first, second, "--repo", repo)
    assert human.code == 0 and "x\\xff" in human.out, human.out + human.err
    as_json = run_drsync("snapshot", "diff", first, second, "--repo", repo, "--json")
    assert as_json.code == 0
    added = json.loads(as_json.out)["added"]
    assert [os.fsencode(p) for p in added] == [b"x\xff"]  # surrogate escapes in JSON: lossless


# --- unreadable is never deleted ------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to capture as a user that cannot read")
def test_unreadable_paths_keep_their_last_version(open_tmp: Path) -> None:
    base = open_tmp
    src = base / "src"
    (src / "private").mkdir(parents=True)
    (src / "private" / "inner.txt").write_bytes(b"inside a directory that will be locked\n")
    (src / "secret.txt").write_bytes(b"a file that will become unreadable\n")
    (src / "plain.txt").write_bytes(b"plain\n")
    repo = base / "repo"
    give_to_nobody(base)
    code, err = run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
    assert code == 0, err
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)
    assert code == 0, err
    os.chmod(src / "secret.txt", 0)
    os.chmod(src / "private", 0)
    (src / "plain.txt").write_bytes(b"plain, changed\n")
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "second")
    assert code == 0, err
    r = run_drsync("snapshot", "show", "second", "--repo", repo, "--json")
    doc = r.json()
    assert doc["stale_paths"] == 2, json.dumps(doc)  # secret.txt and private/inner.txt
    assert any("secret.txt" in w for w in doc["warnings"])
    out = base / "restored"
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra", "second", "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    assert (out / "secret.txt").read_bytes() == b"a file that will become unreadable\n"
    assert (out / "private" / "inner.txt").read_bytes() == b"inside a directory that will be locked\n"
    assert (out / "plain.txt").read_bytes() == b"plain, changed\n"
    m = Repository.open(LocalStorage(str(repo)))
    manifest = m.load_manifest(m.find_snapshot("second"))
    stale = {p for p, s in zip(manifest.pycolumn("path"), manifest.pycolumn("stale"), strict=True) if s}
    assert stale == {"secret.txt", "private/inner.txt"}


def test_an_empty_data_root_is_refused_unless_allowed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"f")
    repo = init_repo(tmp_path / "repo")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src).code == 0
    for child in ("a/f", "a"):
        p = src / child
        p.unlink() if p.is_file() else p.rmdir()
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src)
    assert r.code == 1 and "is empty" in r.err and "--allow-empty" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert len(run_drsync("snapshot", "list", "--repo", repo, "--json").json()) == 1
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--allow-empty")
    assert r.code == 0, r.err


# --- property: arbitrary names, modes and times round-trip -----------------------------------

NAME = hs.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..") and b != b".drsync-staging")
EXT4_MIN, EXT4_MAX = -(1 << 31) * NS, ((1 << 34) - (1 << 31) - 1) * NS  # what ext4 keeps (1901..2446)
MTIME = hs.integers(min_value=EXT4_MIN, max_value=EXT4_MAX)


@hs.composite
def trees(draw: hs.DrawFn) -> list[tuple[bytes, str, int, int, bytes]]:
    """(path, kind, mode, mtime_ns, content) rows of a small tree of dirs and files."""
    rows: list[tuple[bytes, str, int, int, bytes]] = []
    dirs = [b""]
    for _ in range(draw(hs.integers(min_value=1, max_value=12))):
        parent = draw(hs.sampled_from(dirs))
        name = draw(NAME)
        path = parent + b"/" + name if parent else name
        if any(r[0] == path for r in rows):
            continue
        if draw(hs.booleans()):
            rows.append((path, "dir", draw(hs.integers(0o700, 0o777)) | 0o700, draw(MTIME), b""))
            dirs.append(path)
        else:
            rows.append((path, "file", draw(hs.integers(0, 0o7777)), draw(MTIME), draw(hs.binary(max_size=64))))
    return rows


@settings(max_examples=int(os.environ.get("DRSYNC_PROPERTY_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=trees())
def test_any_names_modes_and_times_round_trip_through_backup(tmp_path_factory: pytest.TempPathFactory,
                                                              rows: list[tuple[bytes, str, int, int, bytes]]) -> None:
    base = tmp_path_factory.mktemp("prop")
    src = os.fsencode(base / "src")
    os.mkdir(src)
    for path, kind, _mode, _mtime, data in rows:
        full = src + b"/" + path
        if kind == "dir":
            os.mkdir(full)
        else:
            with open(full, "wb") as f:
                f.write(data)
    for path, _kind, mode, mtime, _data in sorted(rows, key=lambda r: -r[0].count(b"/")):
        os.chmod(src + b"/" + path, mode)
        os.utime(src + b"/" + path, ns=(mtime, mtime))
    storage = LocalStorage(str(base / "repo"))
    repo = Repository.init(storage, cluster_id="c", release="1")
    info = engine.create_snapshot(repo, engine.SnapshotRequest(os.fsdecode(src)))
    assert info.skipped_paths == 0 and info.stale_paths == 0
    made = backup.create_backup(repo, info.id, str(base / "backups"), mode="full")
    assert backup.verify_backup(made.path).ok
    backup.restore_backup(made.path, str(base / "out"))
    assert exact_state(base / "out") == exact_state(src)


# --- older repositories ----------------------------------------------------------------------


def test_a_version_1_manifest_still_restores(tmp_path: Path) -> None:
    """The upgrade path: snapshots written by drsync before format 2 stay readable."""
    import blake3

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"written by an older drsync\n")
    os.symlink("d/f", src / "l")
    repo = init_repo(tmp_path / "repo")
    snap = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json").json()["id"]
    r = Repository.open(LocalStorage(repo))
    m = r.load_manifest(r.find_snapshot(snap))
    data = v1_bytes(m)
    Path(repo, "manifests", f"{snap}.parquet").write_bytes(data)
    doc_path = Path(repo, "snapshots", f"{snap}.json")
    doc = json.loads(doc_path.read_bytes())
    doc["manifest_hash"], doc["format"] = blake3.blake3(data).hexdigest(), 1
    doc_path.write_text(json.dumps(doc))
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    r2 = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                    snap, "--repo", repo, "--target", tmp_path / "out")
    assert r2.code == 0, r2.err
    assert exact_state(tmp_path / "out") == exact_state(src)
    assert isinstance(Manifest.from_bytes(data), Manifest)


def test_capture_refuses_to_delete_on_an_unmounted_root_in_process(tmp_path: Path) -> None:
    from drsync.capture import capture

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(src)))
    (src / "f").unlink()
    with pytest.raises(OperationFailed, match="is empty"):
        capture(str(src), repo.chunk_writer(), parent=repo.load_manifest(first))
    assert len(capture(str(src), repo.chunk_writer(), parent=repo.load_manifest(first),
                       allow_empty=True).manifest) == 0


def test_an_odd_tree_replicates_through_a_real_agent_pair(tmp_path: Path) -> None:
    from tests.group import wait_for

    prod, standby = tmp_path / "prod", tmp_path / "standby"
    odd_tree(prod)
    standby.mkdir()
    scfg, pcfg = pair_configs(tmp_path, prod, standby)
    proc = start_agent(scfg, tmp_path / "standby.log")
    try:
        wait_for(lambda: serves(scfg), "the standby to serve")
        r = run_drsync("agent", "--config", pcfg, "--once", "--json")
        assert r.code == 0, r.out + r.err
        assert exact_state(standby) == exact_state(prod)
        # A change to one odd file ships as a change, not as a new tree.
        with open(os.fsencode(prod) + b"/bad\xffname", "ab") as f:
            f.write(b"more\n")
        r = run_drsync("agent", "--config", pcfg, "--once", "--json")
        assert r.code == 0, r.out + r.err
        assert exact_state(standby) == exact_state(prod)
    finally:
        proc.terminate()
        proc.wait(timeout=30 * SLOW)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run production's agent as a user that cannot read")
def test_unreadable_paths_on_production_never_delete_the_standbys_copies(open_tmp: Path) -> None:
    """A real pair: production's agent (as an unprivileged user) loses read access to a file and a
    directory; the standby keeps its copies and the primary's metric counts the stale paths."""
    import signal
    import urllib.request

    from drsync.cli import main
    from tests.group import wait_for
    from tests.zk import free_port

    base = open_tmp
    prod, standby = base / "prod", base / "standby"
    (prod / "private").mkdir(parents=True)
    (prod / "private" / "inner.txt").write_bytes(b"in a directory production will lock\n")
    (prod / "secret.txt").write_bytes(b"a file production will make unreadable\n")
    (prod / "plain.txt").write_bytes(b"plain\n")
    standby.mkdir()
    metrics = f"127.0.0.1:{free_port()}"
    scfg, pcfg = pair_configs(base, prod, standby, primary_extra='interval = "1s"\n', primary_metrics=metrics)
    give_to_nobody(prod, base / "primary-repo", pcfg)
    sproc = start_agent(scfg, base / "standby.log")
    wait_for(lambda: serves(scfg), "the standby to serve")
    preload_everything()  # the child cannot read this interpreter's library once it is nobody
    pid = os.fork()
    if pid == 0:  # pragma: no cover - production's agent, as nobody
        code = 1
        try:
            fd = os.open(base / "primary.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(["agent", "--config", str(pcfg)])
        finally:
            os._exit(code)

    def stale_metric() -> float | None:
        try:
            text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("drsync_snapshot_stale_paths{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    try:
        wait_for(lambda: (standby / "plain.txt").exists() and (standby / "secret.txt").exists(),
                 "the first shipment to apply", timeout=120)
        os.chmod(prod / "secret.txt", 0)
        os.chmod(prod / "private", 0)
        (prod / "plain.txt").write_bytes(b"plain, changed after\n")
        wait_for(lambda: stale_metric() == 2, "the primary to report 2 stale paths", timeout=120)
        wait_for(lambda: (standby / "plain.txt").read_bytes() == b"plain, changed after\n",
                 "the change to reach the standby", timeout=120)
        assert (standby / "secret.txt").read_bytes() == b"a file production will make unreadable\n"
        assert (standby / "private" / "inner.txt").read_bytes() == b"in a directory production will lock\n"
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        sproc.terminate()
        sproc.wait(timeout=30 * SLOW)
        for name in ("primary.log", "standby.log"):  # shown when the test fails
            print(f"--- {name}\n" + (base / name).read_text(errors="replace")[-3000:])


def v1_bytes(m: Manifest, row_group: int | None = None) -> bytes:
    """``m`` written in manifest format 1 (a release before hard links and split times), as an older
    drsync stored it."""
    old = pa.table({
        "path": pa.array(m.pycolumn("path"), pa.string()), "type": m.table.column("type"),
        "mode": m.table.column("mode"), "uid": m.table.column("uid"), "gid": m.table.column("gid"),
        "size": m.table.column("size"), "mtime_ns": pa.array(m.pycolumn("mtime_ns"), pa.int64()),
        "ctime_ns": m.table.column("ctime_ns"), "inode": m.table.column("inode"),
        "target": pa.array(m.pycolumn("target"), pa.string()), "content": m.table.column("content"),
        "chunks": m.table.column("chunks"), "chunk_sizes": m.table.column("chunk_sizes"),
    }, schema=SCHEMA_V1.with_metadata({b"drsync.format": b"1"}))
    buf = pa.BufferOutputStream()
    pq.write_table(old, buf, row_group_size=row_group)
    return buf.getvalue().to_pybytes()
