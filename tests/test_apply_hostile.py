"""Hostile tests of the write side: snapshot restore, backup restore and the standby's apply.

Each test states a promise of README.md, docs/FORMAT.md or DESIGN.md and builds the target
(or the repository) the way an attacker, a crash or an odd machine would leave it. A test that
fails here is a broken promise, not a flaky test: none of them waits on time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, age_tree, init_repo_at, run_drsync, tree_state
from tests.users import NOBODY, run_as_nobody

STAGING = ".drsync-staging"


# --- helpers ----------------------------------------------------------------------------------


def full_state(path: Path) -> dict[str, tuple]:
    """Everything below ``path``, drsync's staging included, plus the top directory itself."""
    out: dict[str, tuple] = {}
    s = path.lstat()
    out["."] = (s.st_mode, s.st_uid, s.st_mtime_ns)
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(path).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode, st.st_uid, st.st_mtime_ns)
            elif p.is_fifo():
                out[rel] = ("fifo", st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode, st.st_uid, st.st_mtime_ns, st.st_ino, p.read_bytes())
    return out


def snapshot_of(base: Path, src: Path, name: str = "repo") -> tuple[str, str]:
    repo = str(base / name)
    if not os.path.exists(repo):
        r = run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1")
        assert r.code == 0, r.err
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    return repo, r.json()["id"]


def restore(repo: str, snap: str, target: Path, timeout: float = 120) -> tuple[int, str]:
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                   snap, "--repo", repo, "--target", target, timeout=timeout)
    return r.code, r.err


def one_line_error(err: str) -> bool:
    return (len(err.strip().splitlines()) == 1 and "internal error" not in err and "Traceback" not in err)


def staging_left(target: Path) -> list[str]:
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.name == STAGING)


def craft_manifest(repo: str, snap: str, rows: list[dict]) -> None:  # type: ignore[type-arg]
    """Replace a snapshot's manifest inside its repository by ``rows`` (and fix the document's hash),
    as someone able to write the repository (or a damaged shipment) could."""
    import blake3

    from drsync.repository.manifest import Manifest

    names = ("path", "type", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "inode", "target", "content",
             "chunks", "chunk_sizes")
    cols: dict[str, list] = {n: [] for n in names}  # type: ignore[type-arg]
    for r in rows:
        full = {"mode": 0o755, "uid": 0, "gid": 0, "size": 0, "mtime_ns": 10**18, "ctime_ns": 10**18,
                "inode": 1, "target": None, "content": None, "chunks": [], "chunk_sizes": []} | r
        for n in names:
            cols[n].append(full[n])
    data = Manifest.from_columns(cols).to_bytes()
    # A new file in its place (as a writer would put it there): a snapshot with the same manifest bytes shares the
    # old file on a local repository (a hard link), and keeps it.
    path = Path(repo, "manifests", f"{snap}.parquet")
    path.with_suffix(".crafted").write_bytes(data)
    os.replace(path.with_suffix(".crafted"), path)
    doc_path = Path(repo, "snapshots", f"{snap}.json")
    doc = json.loads(doc_path.read_bytes())
    doc["manifest_hash"] = blake3.blake3(data).hexdigest()
    doc_path.write_text(json.dumps(doc))


def simple_source(base: Path) -> Path:
    src = base / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"new a\n")
    (src / "d" / "b").write_bytes(b"new b\n")
    age_tree(src)
    return src


def make_outside(base: Path) -> Path:
    out = base / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "victim").write_bytes(b"precious\n")
    (out / "sub" / "victim2").write_bytes(b"also precious\n")
    os.chmod(out / "sub", 0o751)
    age_tree(out, 1000)
    return out


# --- 1. nothing lands outside the target: drsync's own staging area and journal -----------------


def test_a_journal_planted_in_the_target_cannot_reach_outside(tmp_path: Path) -> None:
    """Whoever can write the target (its unprivileged owner, the cluster's data) can leave a file at
    .drsync-staging/journal.json; a later restore by root must not act on paths outside the target.
    Today the journal's paths are replayed unchecked and Beneath walks '..' components, so the
    restore deletes outside/victim and chmods outside/sub 0777."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    (target / STAGING / "trash").mkdir(parents=True)
    hostile = {"phase": "commit", "remove": ["../outside/victim"], "mkdir": [], "write": [], "link": [],
               "fix_meta": [], "dirs": [["../outside/sub", "dir", 0o777, 0, 0, 0, 10**9, None]], "staged": {},
               "unlock": ["../outside"], "touched_dirs": ["../outside/sub"]}
    (target / STAGING / "journal.json").write_text(json.dumps(hostile))
    before = full_state(outside)
    code, err = restore(repo, snap, target)
    assert full_state(outside) == before, "a planted journal made the restore change files outside the target"
    assert code == 0 or one_line_error(err), err


def test_a_staging_link_to_another_targets_staging_area_is_not_followed(tmp_path: Path) -> None:
    """target/.drsync-staging -> outside/.drsync-staging, where outside holds a journal (another data
    root with an interrupted restore, or anything named journal.json): the journal is read and
    rewritten through the link (fsutil.atomic_write on a path), changing a file outside."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    (outside / STAGING).mkdir()
    (outside / STAGING / "journal.json").write_text('{"phase": "done", "owner": "another target"}')
    age_tree(outside, 1000)
    target = tmp_path / "target"
    target.mkdir()
    os.symlink("../outside/" + STAGING, target / STAGING)
    before = full_state(outside)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert full_state(outside) == before, "the restore wrote through the .drsync-staging link"
    assert tree_state(target) == tree_state(src)
    assert staging_left(target) == []


@pytest.mark.parametrize("kind", ["link-to-file", "file", "link-to-fifo"])
def test_a_staging_name_that_is_not_a_directory_is_replaced(tmp_path: Path, kind: str) -> None:
    """A link named .drsync-staging (to a file, or a plain file by that name) is replaced by the
    staging area like any other link in the target; today the journal lookup goes through it first
    and the restore fails with '... journal.json: Not a directory'."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    if kind == "link-to-file":
        os.symlink(str(outside / "victim"), target / STAGING)
    elif kind == "file":
        (target / STAGING).write_bytes(b"someone's file\n")
    else:
        os.mkfifo(outside / "pipe")
        os.symlink(str(outside / "pipe"), target / STAGING)
    before = full_state(outside)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert full_state(outside) == before
    assert tree_state(target) == tree_state(src)
    assert staging_left(target) == []


def test_a_fifo_where_the_journal_lives_does_not_hang_the_restore(tmp_path: Path) -> None:
    """A fifo at .drsync-staging/journal.json (or a link there to one) blocks open() forever: the
    restore hangs instead of replacing it or refusing with one line."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    target = tmp_path / "target"
    (target / STAGING).mkdir(parents=True)
    os.mkfifo(target / STAGING / "journal.json")
    try:
        code, err = restore(repo, snap, target, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the restore blocked opening a fifo named journal.json in the target")
    assert code == 0 or one_line_error(err), err


def test_a_hard_link_in_the_target_does_not_carry_metadata_changes_outside(tmp_path: Path) -> None:
    """target/f is a hard link to outside/victim; the snapshot's f has the same size and mtime but
    another mode and owner. The plan keeps the file and fixes its metadata in place (chmod/chown on
    the shared inode), so outside/victim becomes mode 0600 owned by uid 65534."""
    outside = make_outside(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(outside / "victim", src / "f")
    (src / "f").chmod(0o600)
    os.chown(src / "f", NOBODY, NOBODY)
    repo, snap = snapshot_of(tmp_path, src)
    target = tmp_path / "target"
    target.mkdir()
    os.link(outside / "victim", target / "f")
    s = (outside / "victim").stat()
    before = (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns, (outside / "victim").read_bytes())
    code, err = restore(repo, snap, target)
    assert code == 0, err
    s = (outside / "victim").stat()
    assert (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns, (outside / "victim").read_bytes()) == before, \
        "the restore changed a file outside the target through a hard link"
    assert tree_state(target) == tree_state(src)


# --- 1. regression: hostile links in the target and in manifests ---------------------------------


def test_links_everywhere_in_a_deep_target_write_nothing_outside(tmp_path: Path) -> None:
    """Links at every level of a deep path, links to the target's parent and to itself, chains
    ending outside, a link loop: all replaced, outside unchanged byte for byte and by metadata."""
    src = tmp_path / "src"
    deep = src / "l1" / "l2" / "l3" / "l4"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep\n")
    (src / "l1" / "victim").write_bytes(b"inside\n")
    (src / "loop").mkdir()
    (src / "self").mkdir()
    os.symlink("l1/l2", src / "good")
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    (target / "l1" / "l2").mkdir(parents=True)
    os.symlink("../../../outside", target / "l1" / "l2" / "l3")
    os.symlink(str(outside / "victim"), target / "l1" / "victim")
    os.symlink("loop2", target / "loop")
    os.symlink("loop", target / "loop2")
    os.symlink(".", target / "self")
    os.symlink("../outside/sub", target / "good")
    before = full_state(outside)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert full_state(outside) == before
    assert tree_state(target) == tree_state(src)
    assert staging_left(target) == []


HOSTILE_ROWS = {
    "escape-through-links": [{"path": "a", "type": "symlink", "target": "d/b/.."}, {"path": "d", "type": "dir"},
                             {"path": "d/b", "type": "symlink", "target": ".."}],
    "dotdot": [{"path": "..", "type": "dir"}],
    "dotdot-inside": [{"path": "d", "type": "dir"}, {"path": "d/../../outside/x", "type": "dir"}],
    "absolute": [{"path": "/tmp/drsync-hostile-abs", "type": "dir"}],
    "absolute-link": [{"path": "l", "type": "symlink", "target": "/etc"}],
    "duplicate": [{"path": "d", "type": "dir"}, {"path": "d", "type": "symlink", "target": "x"}],
    "reserved-top": [{"path": STAGING, "type": "dir"}],
    "reserved-deep": [{"path": "d", "type": "dir"}, {"path": f"d/{STAGING}", "type": "dir"},
                      {"path": f"d/{STAGING}/journal.json", "type": "dir"}],
    "nul": [{"path": "a\x00b", "type": "dir"}],
    "no-parent": [{"path": "x/y", "type": "dir"}],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ROWS))
def test_hostile_manifests_in_a_repository_are_refused(tmp_path: Path, case: str) -> None:
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    craft_manifest(repo, snap, HOSTILE_ROWS[case])
    outside = make_outside(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_bytes(b"old\n")
    before, before_out = full_state(target), full_state(outside)
    code, err = restore(repo, snap, target)
    assert code == 3, err
    assert one_line_error(err), err
    assert full_state(target) == before and full_state(outside) == before_out
    assert not os.path.lexists("/tmp/drsync-hostile-abs")


# --- 2. bad input changes nothing: manifests the commit cannot carry out --------------------------


COMMIT_FAILS = {
    # Valid by every rule of FORMAT.md, yet the commit fails half-way through: the target loses
    # "keep", gains "a" and keeps a journal that every later restore replays and fails on again.
    "link-target-longer-than-PATH_MAX": [{"path": "a", "type": "dir"},
                                         {"path": "b", "type": "symlink", "target": "a/" * 3000 + "x"}],
    "name-longer-than-NAME_MAX": [{"path": "a", "type": "dir"}, {"path": "a/" + "n" * 300, "type": "dir"}],
    # FORMAT.md: mode is "permission bits (0o7777 mask)"; a larger value ends in "internal error".
    "mode-beyond-0o7777": [{"path": "a", "type": "dir", "mode": 0xFFFFFFFF}],
}


@pytest.mark.parametrize("case", sorted(COMMIT_FAILS))
def test_manifests_the_commit_cannot_carry_out_change_nothing(tmp_path: Path, case: str) -> None:
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    _, good = snapshot_of(tmp_path, src)
    craft_manifest(repo, snap, COMMIT_FAILS[case])
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_bytes(b"old\n")
    before = full_state(target)
    code, err = restore(repo, snap, target)
    assert code in (1, 2, 3), err
    assert one_line_error(err), err
    assert full_state(target) == before, "a refused manifest left the target half-written"
    # And the target is not wedged: a good snapshot restores onto it.
    code, err = restore(repo, good, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)


def test_names_that_are_not_utf8_are_not_an_internal_error(tmp_path: Path) -> None:
    """Newcomer quickstart on a tree with a file name that is not UTF-8 (any Linux name is bytes):
    'snapshot create' ends in 'internal error: UnicodeEncodeError'. It should capture it, or skip it
    with a warning, or refuse with one line; and a target holding such names restores cleanly."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "plain").write_bytes(b"plain\n")
    with open(os.fsencode(src) + b"/bad\xffname", "wb") as f:
        f.write(b"latin-1 name\n")
    repo = str(tmp_path / "repo")
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    assert r.code == 0 or one_line_error(r.err), r.err


def test_a_target_full_of_names_that_are_not_utf8_restores_exactly(tmp_path: Path) -> None:
    """Regression: extra paths with undecodable names (files, directories, links) are removed."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    target = tmp_path / "target"
    (target / "d").mkdir(parents=True)
    t = os.fsencode(target)
    with open(t + b"/bad\xff", "wb") as f:
        f.write(b"x")
    os.mkdir(t + b"/dir\xfe")
    with open(t + b"/dir\xfe/f\x80", "wb") as f:
        f.write(b"y")
    os.symlink(b"/etc/\xff", t + b"/d/l\xff")
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)


# --- 2. type changes: regression ---------------------------------------------------------------


def make_kind(root: Path, name: str, kind: str, seed: str) -> None:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    up = "../" * name.count("/")
    if kind == "file":
        p.write_bytes(f"file {seed}\n".encode())
        p.chmod(0o640)
    elif kind == "dir":
        (p / "c" / "gc").mkdir(parents=True)
        (p / "c" / "f").write_bytes(f"child {seed}\n".encode())
        os.symlink("c/f", p / "l")
        (p / "c").chmod(0o700)
    elif kind == "emptydir":
        p.mkdir()
        p.chmod(0o711)
    elif kind == "link-file":
        os.symlink(up + "anchor", p)
    elif kind == "link-dir":
        os.symlink(up + "anchordir", p)
    elif kind == "dangling":
        os.symlink("nowhere/at/all", p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(p))
        finally:
            s.close()


@pytest.mark.parametrize("depth", ["", "x/y/z/"], ids=["top", "depth-3"])
def test_type_changes_including_sockets_and_mode_000_dirs_restore_exactly(tmp_path: Path, depth: str) -> None:
    kinds_old = ("file", "dir", "emptydir", "link-file", "link-dir", "dangling", "fifo", "socket")
    kinds_new = ("file", "dir", "emptydir", "link-file", "link-dir", "dangling")
    src, target = tmp_path / "src", tmp_path / "target"
    for root in (src, target):
        (root / "anchordir").mkdir(parents=True)
        (root / "anchor").write_bytes(b"anchor\n")
    for a in kinds_old:
        for b in kinds_new:
            if a != b:
                name = f"{depth}{a}--{b}"
                make_kind(target, name, a, "old")
                make_kind(src, name, b, "new")
    # An old directory nobody may enter, whose subtree the new snapshot replaces by a file.
    (target / depth / "locked" / "in").mkdir(parents=True)
    (target / depth / "locked" / "in" / "f").write_bytes(b"x")
    (target / depth / "locked" / "in").chmod(0)
    (target / depth / "locked").chmod(0)
    (src / depth / "locked").parent.mkdir(parents=True, exist_ok=True)
    (src / depth / "locked").write_bytes(b"now a file\n")
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)
    assert staging_left(target) == []


# --- 3. crashes ---------------------------------------------------------------------------------


def test_kill_9_of_restores_at_moments_seen_from_outside(tmp_path: Path) -> None:
    """Kill -9 a real restore as soon as its staging area, its journal or its trash appears (polled
    from outside, no timing), then kill the recovering restore the same way; the final restore
    leaves exactly the new snapshot, and a recovery killed before its journal leaves old or new."""
    old, new = tmp_path / "old", tmp_path / "new"
    for i in range(40):
        (old / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (old / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(2000 + i))
    (old / "becomes-file").mkdir()
    (old / "becomes-file" / "x").write_bytes(b"x")
    os.symlink("d0", old / "link")
    shutil.copytree(old, new, symlinks=True)
    shutil.rmtree(new / "becomes-file")
    (new / "becomes-file").write_bytes(b"a file now\n")
    (new / "link").unlink()
    (new / "link").mkdir()
    for i in range(0, 40, 3):
        (new / f"d{i % 4}" / f"f{i}").write_bytes(os.urandom(3000))
    age_tree(old)
    age_tree(new)
    repo, snap_old = snapshot_of(tmp_path, old)
    _, snap_new = snapshot_of(tmp_path, new)
    want_old, want_new = tree_state(old), tree_state(new)
    target = tmp_path / "target"
    for moment in ("staging", "journal", "trash-entry"):
        shutil.rmtree(target, ignore_errors=True)
        assert restore(repo, snap_old, target)[0] == 0
        proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "restore", "--overwrite", "--delete-extra",
                                snap_new, "--repo", repo,
                                 "--target", str(target)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        probe = {"staging": target / STAGING, "journal": target / STAGING / "journal.json",
                 "trash-entry": target / STAGING / "trash" / "0"}[moment]
        while proc.poll() is None and not os.path.lexists(probe):
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = tree_state(target)
        assert state in (want_old, want_new) or os.path.exists(target / STAGING / "journal.json"), moment
        code, err = restore(repo, snap_new, target)
        assert code == 0, err
        assert tree_state(target) == want_new, moment
        assert staging_left(target) == []


# --- 4. permissions ------------------------------------------------------------------------------


def chattr_works(path: Path) -> bool:
    probe = path / "probe"
    probe.write_bytes(b"")
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    probe.unlink()
    return ok


def test_an_immutable_file_is_a_one_line_error_naming_it_and_the_target_stays_unchanged(open_tmp: Path) -> None:
    """chattr +i on one file the snapshot changes: today the restore renames the files before it
    into place, then fails on it with 'the operation failed: 1: Operation not permitted' (the staged
    file's number, not the path) and leaves a half-written target with a journal in commit phase."""
    if not chattr_works(open_tmp):
        pytest.skip("chattr +i does not work here")
    src = open_tmp / "src"
    src.mkdir()
    for n in ("a", "m", "z"):
        (src / n).write_bytes(f"new {n}\n".encode())
    age_tree(src)
    repo, snap = snapshot_of(open_tmp, src)
    target = open_tmp / "target"
    target.mkdir()
    for n in ("a", "m", "z"):
        (target / n).write_bytes(f"old {n}, longer\n".encode())
    subprocess.run(["chattr", "+i", str(target / "m")], check=True)
    before = full_state(target)
    code, err = restore(repo, snap, target)
    subprocess.run(["chattr", "-i", str(target / "m")], check=True)
    if code == 0:  # worked around: then it must be whole
        assert tree_state(target) == tree_state(src)
        return
    assert code == 1 and one_line_error(err), err
    assert str(target / "m") in err or "'m'" in err or " m:" in err, f"the error does not name the path: {err}"
    assert full_state(target) == before, "a refused restore left a half-written target"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run drsync as another user")
def test_a_writable_directory_of_another_user_gives_a_one_line_error_naming_it(open_tmp: Path) -> None:
    """Running as uid 65534 on a target it owns, with one directory owned by root but mode 0777:
    check_plan lets it through (writable), the commit writes every file, then utime on the root
    directory fails: 'the operation failed:: Operation not permitted' (no path), exit 1, journal
    left in commit phase, and every later restore fails the same way (the target is wedged)."""
    src = open_tmp / "src"
    (src / "shared").mkdir(parents=True)
    (src / "a").write_bytes(b"new a\n")
    (src / "shared" / "x").write_bytes(b"new x\n")
    (src / "shared").chmod(0o777)
    age_tree(src)
    repo, snap = snapshot_of(open_tmp, src)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", repo], check=True)
    target = open_tmp / "target"
    (target / "shared").mkdir(parents=True)
    (target / "a").write_bytes(b"old a, longer\n")
    (target / "shared" / "x").write_bytes(b"old x, longer\n")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", target], check=True)
    os.chown(target / "shared", 0, 0)
    (target / "shared").chmod(0o777)
    before = full_state(target)
    code, err = run_as_nobody("snapshot", "restore", "--overwrite", "--delete-extra",
                              snap, "--repo", repo, "--target", target)
    if code == 0:  # worked around
        assert tree_state(target) == tree_state(src)
        return
    assert code == 1 and one_line_error(err), err
    assert "shared" in err, f"the error does not name the directory: {err}"
    assert full_state(target) == before, "a refused restore left a half-written target"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run drsync as another user")
def test_unprivileged_restore_into_its_own_locked_down_tree(open_tmp: Path) -> None:
    """Regression: uid 65534 restores over its own tree of mode-000 directories, read-only
    directories, unreadable files and a dangling link, with a type change inside a 000 directory."""
    src = open_tmp / "src"
    (src / "ro" / "in").mkdir(parents=True)
    (src / "ro" / "in" / "f").write_bytes(b"new\n")
    (src / "zero").write_bytes(b"zero is a file now\n")
    (src / "secret").write_bytes(b"new secret\n")
    age_tree(src)
    repo, snap = snapshot_of(open_tmp, src)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", repo], check=True)
    target = open_tmp / "target"
    (target / "ro" / "in").mkdir(parents=True)
    (target / "ro" / "in" / "old").write_bytes(b"old\n")
    (target / "zero" / "deep").mkdir(parents=True)
    (target / "zero" / "deep" / "f").write_bytes(b"x")
    (target / "secret").write_bytes(b"old\n")
    os.symlink("/nonexistent", target / "dangling")
    subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", target], check=True)
    (target / "secret").chmod(0)
    (target / "ro" / "in").chmod(0o500)
    (target / "ro").chmod(0o500)
    (target / "zero" / "deep").chmod(0)
    (target / "zero").chmod(0)
    code, err = run_as_nobody("snapshot", "restore", "--overwrite", "--delete-extra",
                              snap, "--repo", repo, "--target", target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src)
    assert staging_left(target) == []


# --- 5. drsync's own files inside the data root ---------------------------------------------------


def agent_config(base: Path) -> tuple[Path, Path, Path]:
    data = base / "data"
    (data / "tables").mkdir(parents=True)
    (data / "tables" / "t1").write_bytes(b"one\n")
    state = data / "var" / "state"
    cfg = base / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{data}/.drsync"\n'
                   f'[agent]\nname = "sb"\nrole = "standby"\nstate_dir = "{state}"\n'
                   f'listen = "127.0.0.1:1"\nmetrics = "127.0.0.1:2"\n')
    r = run_drsync("init", "--config", cfg)
    assert r.code == 0, r.err
    return cfg, data, state


def test_snapshot_restore_with_config_leaves_the_agent_state_dir_alone(tmp_path: Path) -> None:
    """README: 'A repository or agent state directory kept inside the data root is ... left alone by
    applies'; config check says so too. 'drsync snapshot restore --config F' protects only the
    repository: the state directory (not in the snapshot) is removed as an extra path."""
    cfg, _data, state = agent_config(tmp_path)
    r = run_drsync("snapshot", "create", "--config", cfg, "--name", "before-agent", "--json")
    assert r.code == 0, r.err
    state.mkdir(parents=True)
    (state / "state.json").write_bytes(b'{"applied_snapshot": "abc", "epoch": 7}\n')
    check = run_drsync("config", "check", "--config", cfg, "--json")
    assert any("state directory" in c["detail"] and "leave it alone" in c["detail"]
               for c in check.json()["checks"] if c["name"] == "nesting")
    r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra", "before-agent", "--config", cfg)
    assert r.code == 0, r.err
    assert (state / "state.json").read_bytes() == b'{"applied_snapshot": "abc", "epoch": 7}\n', \
        "the restore removed the agent's state directory"


def test_snapshot_create_with_config_leaves_the_agent_state_dir_out(tmp_path: Path) -> None:
    """config check: 'state directory ... is inside the data root: snapshots leave it out'. A
    snapshot taken with 'drsync snapshot create --config F' captures it, and restoring that snapshot
    later rolls the agent's state (applied snapshot, epoch) back."""
    cfg, _data, state = agent_config(tmp_path)
    state.mkdir(parents=True)
    (state / "state.json").write_bytes(b'{"epoch": 1}\n')
    r = run_drsync("snapshot", "create", "--config", cfg, "--json")
    assert r.code == 0, r.err
    r = run_drsync("snapshot", "show", r.json()["id"], "--config", cfg, "--files", "--json")
    assert r.code == 0, r.err
    assert "var/state/state.json" not in r.out, "the snapshot holds the agent's state directory"


def test_a_repository_inside_the_target_survives_restore_of_a_snapshot_with_a_dir_there(tmp_path: Path) -> None:
    """Regression: the snapshot has its own directory (with files) where the target keeps the
    repository; the repository is left alone, the snapshot's other files restored."""
    src = tmp_path / "src"
    (src / ".drsync" / "junk").mkdir(parents=True)
    (src / ".drsync" / "junk" / "f").write_bytes(b"junk\n")
    (src / "f").write_bytes(b"f\n")
    age_tree(src)
    data = tmp_path / "data"
    data.mkdir()
    repo = str(data / ".drsync")
    init_repo_at(repo, "c", "1")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    code, err = restore(repo, r.json()["id"], data)
    assert code == 0, err
    assert (data / "f").read_bytes() == b"f\n"
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


def test_a_target_inside_the_repository_is_refused(tmp_path: Path) -> None:
    """The repository inside the target is left alone, and the repository as the target is refused;
    but a target inside the repository ('--target REPO/packs') is restored into: every pack is
    removed as an extra path, exit 0, and 'repo verify' then finds the repository destroyed."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    code, err = restore(repo, snap, Path(repo) / "packs")
    assert code != 0 and one_line_error(err), "a restore into the repository's own directory went ahead"
    r = run_drsync("repo", "verify", "--repo", repo)
    assert r.code == 0, r.out + r.err


# --- 7. mount points inside the target -------------------------------------------------------------


@pytest.fixture
def mounted(tmp_path: Path):  # type: ignore[no-untyped-def]
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target / "sub")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield target
    subprocess.run(["umount", "-l", str(target / "sub")], check=False)


def test_a_failed_restore_leaves_the_mount_points_mtime_alone(tmp_path: Path, mounted: Path) -> None:
    """'nothing was changed' after an integrity error during staging, but the mount point's mtime
    moved: creating and dropping sub/.drsync-staging changed it, and drop_staging puts back the time
    it read after creating the staging area. (The same happens on the standby when a kill -9 lands
    between the staging and the journal: recover_apply drops the staging the same way.)"""
    target = mounted
    (target / "sub" / "f").write_bytes(b"old\n")
    os.utime(target / "sub", ns=(10**18, 10**18))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(os.urandom(300_000))
    repo, snap = snapshot_of(tmp_path, src)
    pack = next(Path(repo, "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[100] ^= 0xFF
    pack.write_bytes(bytes(data))
    before = full_state(target)
    code, err = restore(repo, snap, target)
    assert code == 3 and "nothing was changed" in err, err
    assert full_state(target) == before


def test_mount_points_regression(tmp_path: Path, mounted: Path) -> None:
    """A read-only mount is a one-line error with nothing changed; a symlink named .drsync-staging
    on the mount is replaced; a snapshot removing a directory above the mount is refused (exit 2)."""
    target = mounted
    (target / "sub" / "f").write_bytes(b"old\n")
    outside = make_outside(tmp_path)
    os.symlink(str(outside), target / "sub" / STAGING)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"new\n")
    (src / "sub" / "g").write_bytes(b"g\n")
    age_tree(src)
    repo, snap = snapshot_of(tmp_path, src)
    before_out = full_state(outside)
    code, err = restore(repo, snap, target)
    assert code == 0, err
    assert tree_state(target) == tree_state(src) and full_state(outside) == before_out
    assert os.stat(target / "sub").st_dev != os.stat(target).st_dev
    # Read-only: refused with one line, nothing changed.
    (src / "sub" / "f").write_bytes(b"newer, longer\n")
    _, snap2 = snapshot_of(tmp_path, src)
    subprocess.run(["mount", "-o", "remount,ro", str(target / "sub")], check=True)
    before = full_state(target)
    code, err = restore(repo, snap2, target)
    subprocess.run(["mount", "-o", "remount,rw", str(target / "sub")], check=True)
    assert code == 1 and one_line_error(err), err
    # The top directory's own mtime is not part of any snapshot (the staging area came and went).
    assert {k: v for k, v in full_state(target).items() if k != "."} == {k: v for k, v in before.items() if k != "."}
    # A snapshot without "sub" at all: refused up front.
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"x\n")
    _, snap3 = snapshot_of(tmp_path, other)
    before = full_state(target)
    code, err = restore(repo, snap3, target)
    assert code == 2 and "mounted" in err and one_line_error(err), err
    assert full_state(target) == before


def test_a_directory_of_another_user_in_place_of_a_file_is_refused_before_anything_changes(open_tmp: Path) -> None:
    """breaker s52b: as the target's owner (not root), a restore where root made a directory of its own where
    the snapshot has a file wrote its journal, then failed to move that directory away (rename(2) to another
    directory needs write permission on the directory itself): exit 1 with the target half done and the
    journal left. Refused up front now, naming the directory; nothing changed."""
    src = open_tmp / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "g").write_bytes(b"2\n")
    (src / "a").mkdir()
    (src / "a" / "f").write_bytes(b"1\n")
    age_tree(src)
    repo, snap = snapshot_of(open_tmp, src)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", repo], check=True)
    target = open_tmp / "target"
    shutil.copytree(src, target)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", target], check=True)
    (target / "b" / "g").unlink()
    (target / "b" / "g").mkdir()  # root's, 0755
    (target / "a" / "f").write_bytes(b"changed\n")
    os.chown(target / "a" / "f", NOBODY, NOBODY)
    before = tree_state(target)
    code, err = run_as_nobody("snapshot", "restore", "--overwrite", "--delete-extra", snap, "--repo", repo,
                              "--target", target)
    assert code == 1 and f"{target}/b/g: permission denied" in err and "nothing was changed" in err, err
    assert tree_state(target) == before and staging_left(target) == []


def test_a_lean_load_validates_the_file_and_an_apply_of_an_unvalidated_manifest_still_does(tmp_path: Path) -> None:
    """Repository.load_manifest(lean=True) validates the manifest as a file before its table is loaded (so an
    apply need not validate it again beside that table: at a million files the validation peak was 95 MiB
    higher); any other manifest handed to an apply is validated there, so no path skips the rules."""
    from drsync.apply import apply_manifest
    from drsync.errors import IntegrityError
    from drsync.repository.manifest import Manifest
    from drsync.repository.repo import Repository
    from drsync.storage.local import LocalStorage

    src = simple_source(tmp_path)
    repo_path, snap = snapshot_of(tmp_path, src)
    repo = Repository.open(LocalStorage(repo_path))
    assert repo.load_manifest(repo.find_snapshot(snap), lean=True).validated
    craft_manifest(repo_path, snap, HOSTILE_ROWS["escape-through-links"])
    repo = Repository.open(LocalStorage(repo_path))
    info = repo.find_snapshot(snap)
    with pytest.raises(IntegrityError, match="leads outside the data root through other links"):
        repo.load_manifest(info, lean=True)
    unchecked = Manifest.lean(repo.open_manifest(info))
    assert not unchecked.validated
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(IntegrityError, match="leads outside the data root through other links"):
        apply_manifest(unchecked, repo, str(target), what="crafted")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("case", ["escape-through-links", "duplicate", "no-parent"])
def test_a_backup_of_a_manifest_no_restore_would_accept_is_refused(tmp_path: Path, case: str) -> None:
    """Breaker s54b: `backup create` copied a manifest that fails validation and exited 0, a backup that no
    restore would ever accept. It is refused now (exit 3, one line), and no backup is left."""
    src = simple_source(tmp_path)
    repo, snap = snapshot_of(tmp_path, src)
    craft_manifest(repo, snap, HOSTILE_ROWS[case])
    dest = tmp_path / "backups"
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", snap, "--dest", dest, "--mode", "full")
    assert r.code == 3, r.err
    assert one_line_error(r.err), r.err
    assert not dest.exists() or not [p for p in dest.iterdir() if not p.name.startswith(".")]
