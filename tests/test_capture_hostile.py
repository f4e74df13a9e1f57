"""Hostile tests of the read side: snapshot create and everything downstream of it.

Each test asserts what README.md, docs/FORMAT.md and DESIGN.md promise. Those that
fail name a broken promise; the passing ones are the strongest attacks that held,
kept as regression tests.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drsync import engine
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from tests.conftest import SLOW, run_drsync
from tests.test_capture_any_tree import exact_state
from tests.users import NOBODY, give_to_nobody, pair_configs, preload_everything, run_as_nobody, serves, start_agent

NS = 1_000_000_000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to act as another user, mount, chattr)")


def init_repo(path: Path | str) -> str:
    r = run_drsync("init", "--repo", path, "--cluster-id", "c", "--release", "1")
    assert r.code == 0, r.err
    return str(path)


def manifest_of(repo: str, ref: str) -> dict[str, object]:
    r = Repository.open(LocalStorage(repo))
    m = r.load_manifest(r.find_snapshot(ref))
    return {e.path: e for e in m.entries()}


# --- promise 3: unreadable is never deleted -------------------------------------------------------


@needs_root
def test_a_directory_readable_but_not_searchable_keeps_everything_below_it(open_tmp: Path) -> None:
    """A directory of mode 0o444 can be listed but not searched: its entries cannot be examined.
    A subdirectory's content must stay in the snapshot (stale), not vanish."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "sub" / "f").write_bytes(b"below a directory that loses its search bit\n")
    (src / "d" / "g").write_bytes(b"g\n")
    (src / "plain").write_bytes(b"p\n")
    give_to_nobody(base)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)
    assert code == 0, err
    os.chmod(src / "d", 0o444)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    entries = manifest_of(repo, "two")
    assert {"d/g", "d/sub", "d/sub/f"} <= set(entries), sorted(entries)
    assert all(entries[p].stale for p in ("d/g", "d/sub", "d/sub/f"))  # type: ignore[attr-defined]
    out = base / "restored"
    r = run_drsync("snapshot", "restore", "two", "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    assert (out / "d" / "sub" / "f").read_bytes() == b"below a directory that loses its search bit\n"


@needs_root
def test_a_readable_but_unsearchable_directory_never_deletes_on_a_real_standby(open_tmp: Path) -> None:
    """The same through a real pair: production's agent (as nobody) runs one cycle after a directory
    lost its search bit; the standby must keep the files below it."""
    from tests.group import wait_for

    base = open_tmp
    prod, standby = base / "prod", base / "standby"
    (prod / "d" / "sub").mkdir(parents=True)
    (prod / "d" / "sub" / "f").write_bytes(b"must survive on the standby\n")
    (prod / "plain").write_bytes(b"plain\n")
    standby.mkdir()
    scfg, pcfg = pair_configs(base, prod, standby)
    give_to_nobody(prod, base / "primary-repo", pcfg)
    sproc = start_agent(scfg, base / "standby.log")
    preload_everything()
    try:
        wait_for(lambda: serves(scfg), "the standby to serve")
        code, err = run_as_nobody("agent", "--config", pcfg, "--once")
        assert code == 0, err
        assert (standby / "d" / "sub" / "f").exists()
        os.chmod(prod / "d", 0o444)
        (prod / "plain").write_bytes(b"plain, changed\n")
        code, err = run_as_nobody("agent", "--config", pcfg, "--once")
        assert code == 0, err
        assert (standby / "plain").read_bytes() == b"plain, changed\n"
        assert (standby / "d" / "sub" / "f").read_bytes() == b"must survive on the standby\n"
    finally:
        sproc.terminate()
        sproc.wait(timeout=30 * SLOW)


@needs_root
def test_an_unreadable_directory_keeps_its_extended_attributes(open_tmp: Path) -> None:
    """user.* attributes of a directory the agent cannot read are a read error, not a removal:
    the directory keeps its last captured attributes."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "team").mkdir(parents=True)
    (src / "team" / "in").write_bytes(b"in\n")
    os.setxattr(src / "team", "user.owner", b"analytics")
    give_to_nobody(base)
    os.chown(src / "team", 0, 0)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)[0] == 0
    before = manifest_of(repo, "latest")["team"].xattrs  # type: ignore[attr-defined]
    assert before and b"analytics" in before
    os.chmod(src / "team", 0o711)  # searchable, not readable: user.* attributes cannot be read
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    assert manifest_of(repo, "two")["team"].xattrs == before  # type: ignore[attr-defined]


@needs_root
def test_an_unreadable_hard_link_leader_keeps_its_group(open_tmp: Path) -> None:
    """Three names of one inode; the first (in byte order) sits in a directory that becomes unlistable.
    Its last captured version was one inode with the other two: a restore gives that back."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "locked").mkdir(parents=True)
    (src / "open").mkdir()
    (src / "locked" / "a").write_bytes(b"one inode\n")
    os.link(src / "locked" / "a", src / "open" / "b")
    os.link(src / "locked" / "a", src / "open" / "c")
    give_to_nobody(base)
    os.chown(src / "locked", 0, 0)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)[0] == 0
    os.chmod(src / "locked", 0o700)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    out = base / "out"
    r = run_drsync("snapshot", "restore", "two", "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    inodes = {os.stat(out / p).st_ino for p in ("locked/a", "open/b", "open/c")}
    assert len(inodes) == 1, "the hard-link group was split"


@needs_root
def test_an_unreadable_root_keeps_everything_stale(open_tmp: Path) -> None:
    """Held: a root the agent cannot list keeps every path of the last snapshot, flagged stale."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f\n")
    (src / "g").write_bytes(b"g\n")
    give_to_nobody(base)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)[0] == 0
    os.chown(src, 0, 0)
    os.chmod(src, 0o700)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    doc = run_drsync("snapshot", "show", "two", "--repo", repo, "--json").json()
    assert doc["stale_paths"] == 3, doc
    out = base / "out"
    assert run_drsync("snapshot", "restore", "two", "--repo", repo, "--target", out).code == 0
    assert (out / "d" / "f").read_bytes() == b"f\n" and (out / "g").read_bytes() == b"g\n"


@needs_root
def test_a_fresh_empty_filesystem_mounted_over_the_root_is_refused(tmp_path: Path) -> None:
    """The data root replaced by an empty mount: a freshly made ext4 volume holds only lost+found.
    The capture must refuse (it would delete everything on the standbys) unless --allow-empty."""
    img = tmp_path / "vol.ext4"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True).returncode != 0:
        pytest.skip("mkfs.ext4 is not available")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"production data\n")
    repo = init_repo(tmp_path / "repo")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src).code == 0
    if subprocess.run(["mount", "-o", "loop", str(img), str(src)], capture_output=True).returncode != 0:
        pytest.skip("cannot loop-mount here")
    try:
        r = run_drsync("snapshot", "create", "--repo", repo, "--source", src)
        assert r.code == 1 and "--allow-empty" in r.err, r.out + r.err
        assert len(r.err.strip().splitlines()) == 1, r.err
    finally:
        subprocess.run(["umount", str(src)], check=True)
    assert len(run_drsync("snapshot", "list", "--repo", repo, "--json").json()) == 1


def test_a_repository_inside_the_root_is_left_out_when_named_through_a_symlink(tmp_path: Path) -> None:
    """README: a repository kept inside the data root is left out of snapshots. Data roots are often
    reached through a symlink (/srv/cluster -> /data/cluster): the repository must still be left out."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (real / "f").write_bytes(b"data\n")
    repo = init_repo(real / ".drsync")
    for source, repo_name in ((tmp_path / "link", repo), (real, str(tmp_path / "link" / ".drsync"))):
        r = run_drsync("snapshot", "create", "--repo", repo_name, "--source", source, "--json")
        assert r.code == 0, r.err
        paths = [e["path"] for e in run_drsync("snapshot", "show", r.json()["id"], "--files", "--repo", repo,
                                               "--json").json()["entries"]]
        assert paths == ["f"], paths


# --- promise 1: one odd file never fails or stalls a snapshot ------------------------------------


def _capture_swapping_a_file_for_a_fifo(src: str, repo_path: str, out: str) -> None:
    repo = Repository.open(LocalStorage(repo_path))

    def swap(_total: int) -> None:  # called after the scan, before the files are read
        os.unlink(os.path.join(src, "f"))
        os.mkfifo(os.path.join(src, "f"))

    info = engine.create_snapshot(repo, engine.SnapshotRequest(src), on_total=swap)
    Path(out).write_text(json.dumps({"files": info.files, "warnings": info.warnings}))


def test_a_file_replaced_by_a_fifo_during_capture_does_not_stall_it(tmp_path: Path) -> None:
    """A file that becomes a fifo between the scan and its read: the capture must go on (the fifo is
    not captured), not wait forever in open() for a writer that never comes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"a regular file at scan time\n")
    (src / "g").write_bytes(b"g\n")
    repo = init_repo(tmp_path / "repo")
    out = tmp_path / "result.json"
    proc = multiprocessing.get_context("fork").Process(
        target=_capture_swapping_a_file_for_a_fifo, args=(str(src), repo, str(out)))
    proc.start()
    proc.join(120)  # a bound on a hang, not a stand-in for a condition: a capture of 2 files takes <1 s
    stalled = proc.is_alive()
    if stalled:
        proc.kill()
        proc.join()
    assert not stalled, "snapshot create hung opening a fifo that replaced a file during the capture"
    assert proc.exitcode == 0
    assert json.loads(out.read_text())["files"] == 1


# --- promise 2: one path-validity rule on both sides ---------------------------------------------


@needs_root
def test_capture_never_writes_a_snapshot_its_restore_refuses(open_tmp: Path) -> None:
    """A stale link kept from the last snapshot (``locked/l -> ..``, in a directory that became
    unlistable) and a new link through it (``a -> locked/l/..``) make a manifest that leaves the
    root. Whatever capture accepts, verify, backup and restore must accept (or capture must leave
    the link out, as it does for links it can see through)."""
    base = open_tmp
    src, repo = base / "src", str(base / "repo")
    (src / "locked").mkdir(parents=True)
    os.symlink("..", src / "locked" / "l")
    (src / "f").write_bytes(b"f\n")
    give_to_nobody(base)
    os.chown(src / "locked", 0, 0)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src)[0] == 0
    os.chmod(src / "locked", 0o700)
    os.symlink("locked/l/..", src / "a")
    os.lchown(src / "a", NOBODY, NOBODY)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    r = run_drsync("snapshot", "restore", "two", "--repo", repo, "--target", base / "out")
    assert r.code == 0, r.err
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "two", "--dest", base / "bk", "--json")
    assert r.code == 0, r.err
    assert run_drsync("backup", "verify", r.json()["path"]).code == 0
    r = run_drsync("backup", "restore", r.json()["path"], "--target", base / "out2")
    assert r.code == 0, r.err


# --- promise 4: attributes, and what is not carried is reported ----------------------------------


@needs_root
def test_attributes_of_a_symlink_that_are_not_carried_are_reported(tmp_path: Path) -> None:
    """Links carry no extended attributes in the manifest; a link that has some (trusted.*, security.*
    labels) loses them: the capture must say so, as it does for everything else it leaves out."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    os.symlink("f", src / "l")
    try:
        os.setxattr(src / "l", "trusted.label", b"x", follow_symlinks=False)
    except OSError:
        pytest.skip("this filesystem keeps no attributes on links")
    repo = init_repo(tmp_path / "repo")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    assert any(w.startswith("l:") and "attribute" in w for w in r.json()["warnings"]), r.json()["warnings"]


def _every_odd_thing(src: bytes) -> None:
    os.makedirs(src)
    os.mkdir(src + b"/bytes")
    for b in range(1, 256):
        if b == 0x2F:
            continue
        name = bytes([b]) if b != 0x2E else b"x."
        with open(src + b"/bytes/" + name, "wb") as f:
            f.write(bytes([b]))
    with open(src + b"/bytes/" + bytes(range(1, 256)).replace(b"/", b""), "wb") as f:
        f.write(b"every byte in one name")
    with open(src + b"/" + b"\xff" * 255, "wb") as f:
        f.write(b"255 bytes, none UTF-8")
    for m in (0o4755, 0o2755, 0o6711, 0o7777, 0o0000):
        p = src + b"/mode-%o" % m
        with open(p, "wb") as f:
            f.write(b"m")
        os.chown(p, 1234, 5678)
        os.chmod(p, m)
    for m in (0o1777, 0o2775, 0o3700, 0o0500):
        p = src + b"/dmode-%o" % m
        os.mkdir(p)
        os.chown(p, 1234, 5678)
        os.chmod(p, m)
    for name, ns in ((b"t-minus-1ns", -1), (b"t-1900", -2_208_988_800 * NS + 999_999_999),
                     (b"t-2262", (1 << 63) - 1), (b"t-after-int64", (1 << 63) + NS + 7),
                     (b"t-year-5138", 10**11 * NS + 5), (b"t-year-minus-1199", -(10**11) * NS + 5)):
        with open(src + b"/" + name, "wb") as f:
            f.write(name)
        os.utime(src + b"/" + name, ns=(ns, ns))
    with open(src + b"/xa", "wb") as f:
        f.write(b"attributes")
    os.setxattr(src + b"/xa", "user.empty", b"")
    os.setxattr(src + b"/xa", "user.binary", bytes(range(256)))
    os.setxattr(src + b"/xa", b"user.\xff\xfe", b"a name that is not UTF-8")
    for i in range(100):
        os.setxattr(src + b"/xa", f"user.n{i:03}", b"v" * i)
    try:
        os.setxattr(src + b"/xa", "user.big", os.urandom(60_000))
    except OSError:
        pass  # ext4 without ea_inode keeps one block of attributes
    # 150 levels of 250 bytes: a path of about 37 KB, with a link group, a symlink and attributes.
    fd = os.open(src, os.O_RDONLY)
    for i in range(150):
        name = b"%03d" % i + b"\xfe" * 247
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    w = os.open(b"bottom", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
    os.write(w, b"deep")
    os.fchmod(w, 0o4750)
    os.setxattr(w, "user.deep", b"d")
    os.close(w)
    os.link(b"bottom", b"bottom-link", src_dir_fd=fd, dst_dir_fd=fd)
    os.symlink(b"bottom", b"deep-sym", dir_fd=fd)
    os.symlink(b"../../..", b"deep-up", dir_fd=fd)
    os.close(fd)
    os.mkdir(src + b"/h1")
    os.mkdir(src + b"/h2")
    with open(src + b"/h1/a", "wb") as f:
        f.write(b"four names")
    for p in (b"/h2/b", b"/h2/c", b"/zz"):
        os.link(src + b"/h1/a", src + p)
    with open(src + b"/sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"z" * 10_000)
    os.symlink(b"a/../" * 818 + b"zz", src + b"/long-target")
    # Everything in the past, so no file counts as modified during the capture.
    for _d, dirs, files, dfd in os.fwalk(src, topdown=False):
        for n in files + dirs:
            s = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            if 10**18 < s.st_mtime_ns < 2 * 10**18:
                os.utime(n, ns=(s.st_atime_ns, s.st_mtime_ns - 10 * NS), dir_fd=dfd, follow_symlinks=False)


def owners(root: Path) -> dict[bytes, tuple[int, int]]:
    top = os.fsencode(root)
    return {os.path.join(os.path.relpath(dp, top), n): (s.st_uid, s.st_gid)
            for dp, dn, fn, dfd in os.fwalk(top) for n in dn + fn
            for s in [os.stat(n, dir_fd=dfd, follow_symlinks=False)]}


@needs_root
def test_every_odd_name_time_mode_and_attribute_round_trips(tmp_path: Path) -> None:
    """Held: every byte value in names, 255-byte names, a 37 KB path, times from -1199 to 5138,
    setuid/setgid/sticky with other owners, 100 attributes (binary, empty, non-UTF-8 names),
    a group of four hard links, holes: snapshot restore and backup restore give back the same."""
    fs = tmp_path / "fs"  # tmpfs keeps every attribute size and time range asked of it
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _round_trip_every_odd_thing(fs)
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=True)


def _round_trip_every_odd_thing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _every_odd_thing(os.fsencode(src))
    want, want_owners = exact_state(src), owners(src)
    repo = init_repo(tmp_path / "repo")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert (doc["warnings"], doc["skipped_paths"], doc["stale_paths"]) == ([], 0, 0), doc
    assert run_drsync("repo", "verify", "--repo", repo).code == 0
    r = run_drsync("snapshot", "restore", doc["id"], "--repo", repo, "--target", tmp_path / "out")
    assert r.code == 0, r.err
    assert exact_state(tmp_path / "out") == want
    assert owners(tmp_path / "out") == want_owners
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", doc["id"], "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    assert run_drsync("backup", "verify", r.json()["path"]).code == 0
    r = run_drsync("backup", "restore", r.json()["path"], "--target", tmp_path / "out2")
    assert r.code == 0, r.err
    assert exact_state(tmp_path / "out2") == want
    assert os.stat(tmp_path / "out2" / "sparse").st_blocks * 512 < 1 << 20
    again = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert again.code == 0, again.err
    d = run_drsync("snapshot", "diff", doc["id"], again.json()["id"], "--repo", repo, "--json").json()
    assert (d["added"], d["removed"], d["changed"]) == ([], [], [])


# --- promise 6: one-line errors, human output on odd names ---------------------------------------

ODD = [b"new\nline", b"esc\x1b[31mred\x1b[0m", b"osc\x1b]0;title\x07", b"bad\xff\xfe", b"cr\rx", b"c1\xc2\x9b31m",
       b"\xed\xa0\x80surrogate", b"[bold]x[\xe2\x88\x95bold]"]


def run_bytes(*args: str | os.PathLike[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    proc = subprocess.run([sys.executable, "-m", "drsync", *map(str, args)], capture_output=True,
                          env={**os.environ, **env}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_human_output_on_odd_names_never_crashes(tmp_path: Path) -> None:
    """Held: diff, show --files, list and the capture's warnings (fifos and escaping links named
    oddly), on UTF-8, ASCII and Latin-1 terminals."""
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src)
    repo = init_repo(tmp_path / "repo")
    first = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--allow-empty", "--json").json()["id"]
    for n in ODD:
        with open(raw + b"/" + n, "wb") as f:
            f.write(n)
        os.mkfifo(raw + b"/fifo-" + n)
        os.symlink(b"/etc/" + n, raw + b"/out-" + n)
    for env in ({}, {"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "latin-1"}, {"LC_ALL": "C", "LANG": "C"}):
        code, out, err = run_bytes("snapshot", "create", "--repo", repo, "--source", src, env=env)
        assert code == 0 and not err, err
        assert out.count(b"warning:") == 2 * len(ODD), out
        for cmd in (["snapshot", "diff", first, "latest"], ["snapshot", "show", "latest", "--files"],
                    ["snapshot", "list"]):
            code, out, err = run_bytes(*cmd, "--repo", repo, env=env)
            assert code == 0 and not err, (cmd, err)
    d = run_drsync("snapshot", "diff", first, "latest", "--repo", repo, "--json").json()
    assert sorted(os.fsencode(p) for p in d["added"]) == sorted(ODD)


@needs_root
def test_an_error_naming_a_path_with_a_newline_is_one_line(tmp_path: Path) -> None:
    """Errors are one line on stderr: a restore refused because of an immutable file whose name holds a
    newline must still print one line."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "a\nb").write_bytes(b"new\n")
    repo = init_repo(tmp_path / "repo")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src).code == 0
    (out / "a\nb").write_bytes(b"old\n")
    if subprocess.run(["chattr", "+i", str(out / "a\nb")], capture_output=True).returncode != 0:
        pytest.skip("no chattr here")
    try:
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", out, "--overwrite")
    finally:
        subprocess.run(["chattr", "-i", str(out / "a\nb")], check=True)
    assert r.code == 1 and "immutable" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err


# --- promise 5: latest follows the sequence ------------------------------------------------------


def test_latest_follows_the_sequence_when_the_clock_steps_back(tmp_path: Path) -> None:
    """Held: a capture whose clock says 2000 is still the newest, and `snapshot list` shows seq."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"1")
    repo = Repository.init(LocalStorage(str(tmp_path / "repo")), cluster_id="c", release="1")
    engine.create_snapshot(repo, engine.SnapshotRequest(str(src), name="now"))
    (src / "f").write_bytes(b"2")
    stepped = engine.create_snapshot(repo, engine.SnapshotRequest(str(src), name="stepped"),
                                     clock=lambda: 946_684_800.0)
    assert repo.find_snapshot("latest").id == stepped.id
    listed = run_drsync("snapshot", "list", "--repo", tmp_path / "repo", "--json").json()
    assert [s["seq"] for s in listed] == [1, 2] and listed[-1]["id"] == stepped.id
    human = run_drsync("snapshot", "list", "--repo", tmp_path / "repo").out
    rows = human.strip().splitlines()
    assert rows[0].split()[0] == "SEQ" and rows[-1].split()[0] == "2" and "2000-01-01" in rows[-1], human
