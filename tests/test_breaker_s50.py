"""Breaker s50: three fresh breakers on the kinds the review found (writes outside a target, read errors
becoming deletions, failover from an agent's stop). Each test's docstring says what was found; each fails
on the code before its fix. Real files, mounts, users and agents."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from drsync import engine, volumes
from drsync.dataroot.beneath import Beneath
from drsync.errors import IntegrityError, OperationFailed
from drsync.repository.snapshots import SnapshotInfo
from tests.conftest import init_repo_at, write_files
from tests.group import Group, wait_for
from tests.mounts import Mounts
from tests.users import give_to_nobody, run_as_nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, another user)")


# --- a mode set through a name swapped for a link (writes outside a target) --------------------------------


def test_a_mode_is_never_set_through_a_link_swapped_in_after_the_check(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: a restore set a path's mode with fchmodat(dirfd, NAME) after an lstat of NAME; a process
    writing in the target that swapped NAME for a symlink in between had a file outside the target chmodded
    (0600 -> 0666). Here the swap happens exactly after any stat of the name; the file outside keeps its mode."""
    target, outside = tmp_path / "t", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "f").write_text("in\n")
    secret = outside / "secret"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    real_stat = os.stat

    def swapping_stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_stat(path, *args, **kwargs)
        if path == "f" and not (target / "f").is_symlink():
            (target / "f").unlink()
            (target / "f").symlink_to(secret)
        return result

    monkeypatch.setattr(os, "stat", swapping_stat)
    with Beneath(str(target)) as fs:
        fs.chmod("f", 0o666)
    monkeypatch.undo()
    assert secret.stat().st_mode & 0o777 == 0o600


def test_a_directory_opened_for_removal_is_never_chmodded_through_a_link(tmp_path: Path) -> None:
    """The same kind in the removal of a directory drsync cannot list: the link (to a directory outside)
    is removed as a link, never followed, and the directory outside keeps its mode."""
    target, outside = tmp_path / "t", tmp_path / "outside"
    target.mkdir()
    outside.mkdir(mode=0o500)
    (target / "d").symlink_to(outside)
    with Beneath(str(target)) as fs:
        fs.remove_tree("d")
    assert not (target / "d").exists() and outside.stat().st_mode & 0o777 == 0o500


# --- the data root's own filesystem unmounted (rule 8) ------------------------------------------------------


def test_root_volume_gone_judges_only_an_unmounted_filesystem_on_the_same_host() -> None:
    rec = {"host": "h1", "mount_point": "/srv/data"}
    assert volumes.root_volume_gone(rec, "h1", "/", frozenset({"/"}))
    assert volumes.root_volume_gone(rec, "h1", "/srv", frozenset({"/", "/srv"}))
    assert volumes.root_volume_gone(rec, "h2", "/", frozenset({"/"})) is None  # another host's mounts
    assert volumes.root_volume_gone(rec, "h1", "/srv/data", frozenset({"/", "/srv/data"})) is None
    # a new volume mounted deeper while the old one stays mounted: the operator's choice
    assert volumes.root_volume_gone(rec, "h1", "/srv/data/prod", frozenset({"/", "/srv/data", "/srv/data/prod"})) \
        is None
    assert volumes.root_volume_gone({}, "h1", "/", frozenset({"/"})) is None


@pytest.mark.parametrize("doc", [{"host": "h"}, {"host": "h", "mount_point": "rel"}, {"host": 1, "mount_point": "/a"},
                                 {"host": "h", "mount_point": "/a/../b"}, {"host": "h", "mount_point": "/a\x00"},
                                 ["h", "/a"]])
def test_a_snapshot_document_with_a_bad_root_volume_is_damaged(doc: object) -> None:
    info = SnapshotInfo(id="0123456789abcdef", captured_at=1.0, cluster_id="c", release="1", manifest_hash="0" * 64)
    raw = info.to_bytes().decode().replace('"bytes"', f'"root_volume": {__import__("json").dumps(doc)}, "bytes"', 1)
    with pytest.raises(IntegrityError):
        SnapshotInfo.from_bytes(raw.encode(), "snapshot")


@needs_root
@pytest.mark.parametrize("below", [False, True])
def test_a_capture_refuses_a_root_whose_filesystem_is_unmounted(tmp_path: Path, mounts: Mounts, below: bool) -> None:
    """Found: production's root was a mounted volume; under the mount point lay an older copy (27 of 30
    files). Unmounted, the capture took the older copy for production with no warning, and the standby
    deleted the 3 files only the volume held (10 %: under max_delete_fraction). Rule 8: a root that is
    unmounted where the last snapshot was not never becomes a deletion. The same with the root a directory
    of the unmounted filesystem (``below``)."""
    mnt = tmp_path / "mnt"
    root = mnt / "data" if below else mnt
    write_files(root, {f"d/f{i}": f"old {i}\n" for i in range(27)})  # what lies under the mount point
    mounts.tmpfs(mnt)
    write_files(root, {f"d/f{i}": f"current {i}\n" for i in range(30)})
    init_repo_at(tmp_path / "repo", "c", "1")
    repo = engine.open_repository(str(tmp_path / "repo"))
    first = engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert first.root_volume["mount_point"] == str(mnt)
    mounts.umount(mnt)
    with pytest.raises(OperationFailed, match="is not mounted now"):
        engine.create_snapshot(repo, engine.SnapshotRequest(str(root)))
    assert [s.id for s in repo.list_snapshots()] == [first.id]
    # --allow-empty captures it as it is (retired on purpose), and the next capture judges that one
    taken = engine.create_snapshot(repo, engine.SnapshotRequest(str(root), allow_empty=True))
    assert taken.files == 27 and taken.root_volume == {}
    assert engine.create_snapshot(repo, engine.SnapshotRequest(str(root))).files == 27


# --- renamed, then unreadable (rule 8) -------------------------------------------------------------------------


def _manifest_paths(repo: str, ref: str) -> dict[str, bool]:
    r = engine.open_repository(repo)
    return {e.path: e.stale for e in r.load_manifest(r.find_snapshot(ref)).entries()}


@needs_root
def test_a_directory_or_file_renamed_then_unreadable_keeps_its_last_version(open_tmp: Path) -> None:
    """Found: ``mv b b2; chmod 000 b2`` and ``mv a/f00 a/g00; chmod 000 a/g00`` on production (an agent that
    cannot read them): the capture said "b2: ... nothing below it is captured" and "a/g00: not captured",
    and the standby deleted b/ and a/f00, files production still holds. Now what the last snapshot has of
    the same inode, size and time is kept under the new name (stale), and a directory that cannot be listed
    and is new keeps every path the capture lacks (``mv c z/c; chmod 000 z``). Breaker s50d: with the old
    name reused (``mkdir b``) the file was lost again, and an inode a deleted file left, reused by a new
    unreadable file, kept the deleted one for ever."""
    src, repo = open_tmp / "src", str(open_tmp / "repo")
    write_files(src, {**{f"b/f{i}": f"b{i}\n" for i in range(5)}, "a/f00": "a0\n", "a/keep": "k\n",
                      "c/x": "c\n", "x/y": "becomes a file\n", "gone.txt": "deleted on purpose\n"})
    give_to_nobody(open_tmp)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "one")[0] == 0
    os.rename(src / "b", src / "b2")
    os.chmod(src / "b2", 0)
    os.rename(src / "a" / "f00", src / "a" / "g00")
    os.chmod(src / "a" / "g00", 0)
    (src / "z").mkdir()
    os.rename(src / "c", src / "z" / "c")
    os.chmod(src / "z", 0)
    subprocess.run(["rm", "-r", str(src / "x")], check=True)
    (src / "x").write_text("x is a file now\n")  # a type change: nothing is kept below it
    os.unlink(src / "gone.txt")
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    two = _manifest_paths(repo, "two")
    # under their new names where the last snapshot has them by inode (and size and time); c, moved into
    # the unlistable z, under its old name (nothing says where it went)
    for p in [*(f"b2/f{i}" for i in range(5)), "a/g00", "c/x"]:
        assert two.get(p) is True, (p, sorted(two))
    assert "b/f0" not in two and "a/f00" not in two
    assert two["x"] is False and "x/y" not in two
    assert "a/keep" in two and "b2" in two and "z" in two
    # readable again: the next capture settles it (the old names go, the new ones hold the files)
    for p in (src / "b2", src / "z"):
        os.chmod(p, 0o755)
    os.chmod(src / "a" / "g00", 0o644)
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "three")[0] == 0
    three = _manifest_paths(repo, "three")
    assert "b/f0" not in three and three["b2/f0"] is False and three["a/g00"] is False and "a/f00" not in three
    assert three["z/c/x"] is False and "gone.txt" not in three and not any(three.values())


# --- signals that end an agent (rule 7) ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_an_agent_stopped_by_any_signal_of_a_stop_writes_the_marker_and_nobody_fails_over(
        tmp_path: Path, zk_server, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    """Found: SIGHUP (a closed terminal or ssh session), SIGQUIT or SIGUSR1 ended the primary's agent
    without the maintenance marker SIGTERM writes, and the standby (failover = automatic) fenced a
    production that was up and promoted itself. Now those stop it as SIGTERM does (exit 0, marker
    written); SIGUSR1 and the like are logged and ignored."""
    g = Group(tmp_path, zk_server.hosts, f"s50-{sig.name.lower()}", ["east", "west"], failover="automatic",
              interval="2s", extra='fence_command = "none"\n')
    try:
        g.start_all("east")
        g.wait_synced("east", "west", "the first sync")
        east = g.procs["east"]
        east.send_signal(signal.SIGUSR1)
        wait_for(lambda: "received SIGUSR1 and ignores it" in g.log("east"), "east to log SIGUSR1")
        assert east.poll() is None, "SIGUSR1 ended the agent"
        p = g.procs.pop("east")
        p.send_signal(sig)
        assert p.wait(60) == 0
        assert f"received {sig.name}: stopping as for SIGTERM" in g.log("east")
        assert g.connected().zk.exists(f"/drsync/{g.group}/maintenance") is not None
    finally:
        g.stop_all()


# --- a foreign staging area and device nodes in a restore's target ----------------------------------------


def _repo_with(tmp_path: Path) -> tuple[str, str]:
    from tests.conftest import run_drsync

    repo, src = str(tmp_path / "repo"), tmp_path / "src"
    write_files(src, {"f": "x\n"})
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "A").code == 0
    return repo, "A"


def test_delete_extra_removes_a_foreign_staging_area_as_the_refusal_advises(tmp_path: Path) -> None:
    """Found: a target holding ``.drsync-staging/journal.json`` that is not drsync's (not a JSON object) was
    refused "rerun with --delete-extra to remove it"; with --delete-extra the restore then read it as its own
    journal and failed "apply journal ... is damaged" (exit 3). A staging area drsync did not make holds no
    apply of drsync's: its records are never read, and --delete-extra removes it."""
    from tests.conftest import run_drsync

    repo, snap = _repo_with(tmp_path)
    target = tmp_path / "t"
    write_files(target, {".drsync-staging/journal.json": "v\n", ".drsync-staging/restore.json": "[]"})
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target)
    assert r.code == 4 and "--delete-extra" in r.err, r
    dry = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target, "--delete-extra", "--dry-run")
    assert dry.code == 0, dry.err
    r = run_drsync("snapshot", "restore", snap, "--repo", repo, "--target", target, "--delete-extra")
    assert r.code == 0, r.err
    assert sorted(p.name for p in target.iterdir()) == ["f"]


def test_a_restore_never_opens_a_device_node_named_like_a_repository_config(tmp_path: Path) -> None:
    """Found: with --delete-extra the restore checks whether a directory it removes holds a drsync
    repository by opening ``DIR/config.json`` for reading, a character device or fifo of that name
    included (opening some arms a watchdog or rewinds a tape). Now only a regular file is opened; the
    check looks with O_PATH first (traced with strace)."""
    import shutil

    from tests.conftest import ROOT

    if shutil.which("strace") is None or os.geteuid() != 0:
        pytest.skip("needs strace and root (mknod)")
    repo, snap = _repo_with(tmp_path)
    target = tmp_path / "t"
    (target / "extra").mkdir(parents=True)
    os.mknod(target / "extra" / "config.json", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat", str(ROOT / ".venv/bin/drsync"),
                        "snapshot", "restore", snap, "--repo", repo, "--target", str(target), "--overwrite",
                        "--delete-extra"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    opened = [ln for ln in trace.read_text().splitlines() if "extra/config.json" in ln and "O_PATH" not in ln]
    assert opened == [], opened
    assert not (target / "extra").exists()


@needs_root
def test_a_renamed_unreadable_file_whose_old_name_is_reused_keeps_its_data(open_tmp: Path) -> None:
    """Breaker s50d: ``mv b b2; chmod 000 b2; mkdir b``: the file was kept under b, which is a directory now,
    so it was left out and the standby deleted its only copy. It is kept under b2, its name now."""
    src, repo = open_tmp / "src", str(open_tmp / "repo")
    write_files(src, {"b": "precious\n", "other": "o\n"})
    give_to_nobody(open_tmp)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "one")[0] == 0
    os.rename(src / "b", src / "b2")
    os.chmod(src / "b2", 0)
    (src / "b").mkdir()
    os.chown(src / "b", 65534, 65534)
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    two = _manifest_paths(repo, "two")
    assert two["b2"] is True and two["b"] is False


@needs_root
def test_an_inode_reused_by_a_new_unreadable_file_does_not_keep_a_deleted_file(open_tmp: Path) -> None:
    """Breaker s50d: a file deleted on purpose, its inode number reused at once (ext4 does) by a new file the
    agent cannot read: the deleted file was kept, stale, in every later snapshot. A rename keeps size and
    time; a new file of the same inode that differs in them is not the old one."""
    src, repo = open_tmp / "src", str(open_tmp / "repo")
    write_files(src, {"old.txt": "deleted on purpose\n", "keep": "k\n"})
    give_to_nobody(open_tmp)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "one")[0] == 0
    ino = (src / "old.txt").stat().st_ino
    os.unlink(src / "old.txt")
    for i in range(50):  # a new file, as root, 0600: the agent (nobody) cannot read it
        f = src / f"new{i}.bin"
        f.write_bytes(b"other bytes, another size" * (i + 1))
        f.chmod(0o600)
        if f.stat().st_ino == ino:
            break
    code, err = run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "two")
    assert code == 0, err
    assert "old.txt" not in _manifest_paths(repo, "two")


def test_a_snapshot_document_that_is_no_file_is_damage_and_gc_keeps_its_chunks(tmp_path: Path) -> None:
    """Breaker s50d: ``snapshots/ID.json`` replaced by a fifo (or a directory, a device, a dangling link) was
    skipped: verify said "intact, 0 snapshots", and gc freed the snapshot's chunks and manifest, so putting
    the document back found them gone. It is damage now (exit 3), and gc refuses."""
    from tests.conftest import run_drsync

    repo, _ = _repo_with(tmp_path)
    docs = tmp_path / "repo" / "snapshots"
    (doc,) = list(docs.iterdir())
    saved = tmp_path / "saved.json"
    doc.rename(saved)
    for kind in ("fifo", "dir", "dangling"):
        {"fifo": lambda: os.mkfifo(doc), "dir": doc.mkdir,
         "dangling": lambda: doc.symlink_to(tmp_path / "nowhere")}[kind]()
        assert run_drsync("repo", "verify", "--repo", repo).code == 3, kind
        r = run_drsync("repo", "gc", "--repo", repo)
        assert r.code == 3 and "not a file" in r.err, (kind, r)
        doc.rmdir() if kind == "dir" else doc.unlink()
    saved.rename(doc)
    assert run_drsync("repo", "verify", "--repo", repo).code == 0


@pytest.mark.parametrize("name", ["backup.json", "config.json", "CHECKSUMS.b3"])
def test_backup_verify_never_opens_a_fifo_or_device_in_the_backup(tmp_path: Path, name: str) -> None:
    """Breaker s50d: ``backup verify`` opened a backup's files by name: a fifo there blocked it for good, a
    /dev/zero-like device was read without end. Only regular files are opened; the rest is damage (exit 3)."""
    from tests.conftest import run_drsync

    repo, snap = _repo_with(tmp_path)
    assert run_drsync("backup", "create", "--snapshot", snap, "--repo", repo, "--dest", tmp_path / "b").code == 0
    (backup,) = list((tmp_path / "b").iterdir())
    (backup / name).unlink()
    os.mkfifo(backup / name)
    r = run_drsync("backup", "verify", backup)
    assert r.code == 3 and name in r.out + r.err, r


def test_signals_are_taken_from_the_first_moment_of_drsync_agent(tmp_path: Path) -> None:
    """Breaker s50d: SIGUSR1, SIGUSR2 or SIGALRM in the agent's first few hundred milliseconds (imports,
    before its handlers) killed it: no marker, nothing logged. Importing the command line of ``drsync agent``
    takes them at once: the others ignored, a stop remembered and carried out once the agent runs."""
    import sys

    code = ("import os, signal, sys, threading\n"
            "sys.argv = [os.path.join(sys.argv[1], 'drsync'), 'agent']\n"
            "import drsync.cli\n"
            "from drsync.cli import signals\n"
            "assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN\n"
            "os.kill(os.getpid(), signal.SIGUSR2); os.kill(os.getpid(), signal.SIGHUP)\n"
            "class Agent: stop = threading.Event()\n"
            "signals.handle(Agent, 'east')\n"
            "assert Agent.stop.is_set()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "received SIGHUP while it started: stopping" in r.stderr
    # any other program importing drsync keeps its own signals
    other = subprocess.run([sys.executable, "-c", "import signal, sys; sys.argv = ['pytest', 'agent']; "
                            "import drsync.cli; print(signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert other.stdout.strip() == "True", other
