"""Breaker s57b: what a restore onto a kept target (not the cluster's data root, no ``--overwrite``) sets back
besides files, a refusal after a replay that says "nothing was changed", and hard-link groups a target holds
as copies (HDFS has no hard links) planned as links to make again at every apply.

Each test asserts the promised behaviour and fails where it does not hold."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, init_repo_at, snapshot_json, write_files
from tests.group import wait_for
from tests.sites import make_site

OLD_NS = 1_500_000_000_123_456_789


def _tree(src: Path) -> None:
    write_files(src, {"a/f": "same bytes\n", "a/b/g": "more\n", "top": "top\n"})
    os.symlink("a/f", src / "l")
    (src / "a").chmod(0o755)
    for p in (src / "a" / "b", src / "a", src / "l"):
        os.utime(p, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


def _restore(drsync, repo: Path, sid: str, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, *extra)


@pytest.fixture
def restored(drsync, tmp_path: Path) -> tuple[Path, str, Path]:  # type: ignore[no-untyped-def]
    """A snapshot restored into a new directory: (repository, snapshot id, target)."""
    src, repo, out = tmp_path / "src", tmp_path / "repo", tmp_path / "out"
    _tree(src)
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, src)["id"]
    assert _restore(drsync, repo, sid, out).code == 0
    return repo, sid, out


def test_a_kept_target_s_directory_mode_and_symlink_time_are_not_set_back(drsync, restored) -> None:  # type: ignore[no-untyped-def]
    """Was: without --overwrite the restore set an existing directory's mode and a symlink's time back, where
    it refused the same for a file. Now both are refused (exit 4, in a dry run too), named, nothing changed;
    --overwrite sets them back."""
    repo, sid, out = restored
    (out / "a").chmod(0o700)
    os.utime(out / "l", ns=(OLD_NS + 10**9, OLD_NS + 10**9), follow_symlinks=False)
    for extra in (("--dry-run",), ()):
        r = _restore(drsync, repo, sid, out, *extra)
        assert r.code == 4, (extra, r.out, r.err)
        assert "2 existing path(s) whose mode, owner, time or extended attributes" in r.err, r.err
        assert "a, l" in r.err and "--overwrite" in r.err and "nothing was changed" in r.err, r.err
        assert stat.S_IMODE((out / "a").stat().st_mode) == 0o700
        assert os.lstat(out / "l").st_mtime_ns == OLD_NS + 10**9
    # The dry run lists them as metadata to set, not as a symlink to make (breaker s57b: "1 symlink to make").
    dry = _restore(drsync, repo, sid, out, "--overwrite", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert dry.json()["planned"]["metadata"] == ["a", "l"] and dry.json()["planned"]["link"] == []
    assert dry.json()["made_symlinks"] == 0 and dry.json()["written_files"] == 0
    text = _restore(drsync, repo, sid, out, "--overwrite", "--dry-run").out
    assert "  meta    a\n" in text and "(set the mode, owner or time of 2)" in text, text
    done = _restore(drsync, repo, sid, out, "--overwrite", "--json")
    assert done.code == 0 and done.json()["made_symlinks"] == 0, done.err
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o755
    assert os.lstat(out / "l").st_mtime_ns == OLD_NS


def test_a_kept_target_s_directory_time_stays_unless_the_restore_writes_into_it(drsync, restored) -> None:  # type: ignore[no-untyped-def]
    """A directory that differs only in its time is neither refused nor set back without --overwrite; one the
    restore writes into gets the snapshot's time (its own writes moved it); --overwrite sets every one back."""
    repo, sid, out = restored
    later = OLD_NS + 7 * 10**9
    os.utime(out / "a" / "b", ns=(later, later))
    (out / "a" / "f").unlink()
    r = _restore(drsync, repo, sid, out, "--json")
    assert r.code == 0, r.err
    assert r.json()["written_files"] == 1
    assert (out / "a" / "f").read_text() == "same bytes\n"
    assert (out / "a" / "b").stat().st_mtime_ns == later, "a kept directory's time was set back"
    assert (out / "a").stat().st_mtime_ns == OLD_NS, "the directory written into keeps the snapshot's time"
    assert _restore(drsync, repo, sid, out, "--overwrite").code == 0
    assert (out / "a" / "b").stat().st_mtime_ns == OLD_NS


def _killed_at_commit(repo: Path, sid: str, out: Path, gates: Path) -> None:
    """A restore of ``sid`` onto ``out`` killed (SIGKILL) once its journal is written, before its commit."""
    gates.mkdir()
    (gates / "apply-commit").write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "drsync", "snapshot", "restore", sid, "--repo", str(repo),
                             "--target", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates)})
    try:
        wait_for(lambda: (gates / "apply-commit.reached").exists() or proc.poll() is not None,
                 "the restore to write its journal")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("refused", [True, False], ids=["then-refused", "then-done"])
def test_a_restore_that_completes_an_interrupted_one_says_so(drsync, restored, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            refused: bool) -> None:
    """Was: a restore that first completed an apply killed during its commit, then refused, said "nothing was
    changed"; one that then succeeded said nothing of it (breaker s58). Now both say what they did; the
    completed apply's file is there."""
    repo, _, out = restored
    src = tmp_path / "src"
    write_files(src, {"a/b/new": "written by the second snapshot\n"})
    second = snapshot_json(repo, src)["id"]
    _killed_at_commit(repo, second, out, tmp_path / "gates")
    assert not (out / "a" / "b" / "new").exists()
    if refused:
        (out / "top").chmod(0o600)  # the kept target changed by hand: a mode the snapshot does not have
    r = _restore(drsync, repo, second, out)
    assert (out / "a" / "b" / "new").read_text() == "written by the second snapshot\n"
    if refused:
        assert r.code == 4, (r.out, r.err)
        assert "nothing was changed but for completing the apply cut short before" in r.err, r.err
        assert stat.S_IMODE((out / "top").stat().st_mode) == 0o600
    else:
        assert r.code == 0, r.err
        assert "held an apply cut short before" in r.out and "completed first" in r.out, r.out


def test_hard_links_restored_onto_hdfs_as_copies_are_not_written_again(drsync, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                      webhdfs) -> None:
    """HDFS has no hard links: a group's names are written as copies. Was: every later apply planned them as
    links still to make, wrote them again (a standby on HDFS, every cycle), and a restore onto the result
    without --overwrite was refused as overwriting them. Now a copy alike in size and time is done."""
    src = tmp_path / "src"
    write_files(src, {"d/lead": "one file, three names\n", "plain": "x\n"})
    os.link(src / "d" / "lead", src / "d" / "second")
    os.link(src / "d" / "lead", src / "third")
    repo = tmp_path / "repo"
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, src)["id"]
    dst = make_site("hdfs", tmp_path / "dst", webhdfs)
    first = drsync("snapshot", "restore", sid, "--repo", repo, "--target", dst.url("out"), "--json")
    assert first.code == 0, first.err
    assert first.json()["written_files"] == 4 and "written as copies" in first.out + first.err
    again = drsync("snapshot", "restore", sid, "--repo", repo, "--target", dst.url("out"), "--json")
    assert again.code == 0, again.err
    assert again.json()["written_files"] == 0 and again.json()["unchanged_files"] == 4, again.json()


@pytest.mark.parametrize("names", [3, 2], ids=["three-names", "two-names"])
def test_a_group_s_first_name_removed_from_a_kept_target_is_linked_back(drsync, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                        names: int) -> None:
    """Breaker s58b: with a hard-link group's first name (in byte order) gone from a kept target, the restore
    planned the file anew and every other name relinked to it: refused as overwriting them (exit 4), and with
    --overwrite rewrote them all. Now the name is linked back to the file the others hold: exit 0, one link
    made, nothing written; with two names, the one left (no other link) is the file."""
    src, repo, out = tmp_path / "src", tmp_path / "repo", tmp_path / "out"
    write_files(src, {"a": "one file, several names\n"})
    for n in range(1, names):
        os.link(src / "a", src / f"n{n}")
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, src)["id"]
    assert _restore(drsync, repo, sid, out).code == 0
    kept = (out / "n1").stat().st_ino
    (out / "a").unlink()
    dry = _restore(drsync, repo, sid, out, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert dry.json()["planned"]["hardlink"] == ["a"] and dry.json()["planned"]["overwrite"] == []
    r = _restore(drsync, repo, sid, out, "--json")
    assert r.code == 0, r.err
    assert (r.json()["made_hardlinks"], r.json()["written_files"]) == (1, 0), r.json()
    assert {(out / p).stat().st_ino for p in ["a", *(f"n{n}" for n in range(1, names))]} == {kept}
    assert (out / "a").read_text() == "one file, several names\n"


def test_what_a_directory_standing_at_a_snapshot_file_holds_is_an_extra(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Breaker s58c: a directory where the snapshot has a file (``p``) or a group's first name (``a``) was
    replaced with --overwrite alone, and what it held went with it, unlisted (remove: [], removed: 0). What it
    holds is what the snapshot lacks: refused without --delete-extra (dry run too), listed and counted with it.
    The group's other names stay as they are, the refusal names only the replaced path."""
    src, repo, out = tmp_path / "src", tmp_path / "repo", tmp_path / "out"
    write_files(src, {"a": "grouped\n", "p": "plain\n"})
    for n in ("b", "c"):
        os.link(src / "a", src / n)
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, src)["id"]
    assert _restore(drsync, repo, sid, out).code == 0
    for name in ("a", "p"):
        (out / name).unlink()
        write_files(out / name, {"inner": "precious\n"})
    for extra in (("--dry-run",), ()):
        r = _restore(drsync, repo, sid, out, "--overwrite", *extra)
        assert r.code == 4, (extra, r.out, r.err)
        assert "2 path(s) the snapshot does not have, which it would remove (a/inner, p/inner)" in r.err, r.err
        assert "--delete-extra" in r.err and (out / "p" / "inner").read_text() == "precious\n"
    r = _restore(drsync, repo, sid, out, "--dry-run", "--json")
    assert "holds 2 existing path(s) it would overwrite (a, p)" in r.json()["refused"], r.json()
    dry = _restore(drsync, repo, sid, out, "--overwrite", "--delete-extra", "--dry-run", "--json").json()
    assert sorted(dry["planned"]["remove"]) == ["a/inner", "p/inner"] and dry["removed"] == 2, dry
    done = _restore(drsync, repo, sid, out, "--overwrite", "--delete-extra", "--json")
    assert done.code == 0, done.err
    got = done.json()
    assert (got["removed"], got["made_hardlinks"], got["written_files"], got["unchanged_files"]) == (2, 1, 1, 2), got
    assert {(out / n).stat().st_ino for n in "abc"} == {(out / "b").stat().st_ino}
    assert (out / "p").read_text() == "plain\n"


def test_metadata_set_back_through_a_relinked_first_name_is_named_where_it_is(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Breaker s58c: with a group's first name gone and its other names chmod'ed, the refusal named the gone
    name. Now it names the name that holds the file; --overwrite links the first name back and sets the mode."""
    src, repo, out = tmp_path / "src", tmp_path / "repo", tmp_path / "out"
    write_files(src, {"a": "grouped\n"})
    (src / "a").chmod(0o644)
    os.link(src / "a", src / "b")
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, src)["id"]
    assert _restore(drsync, repo, sid, out).code == 0
    (out / "a").unlink()
    (out / "b").chmod(0o600)
    r = _restore(drsync, repo, sid, out)
    assert r.code == 4 and "would set back (b)" in r.err, r.err
    assert _restore(drsync, repo, sid, out, "--overwrite").code == 0
    assert (out / "a").stat().st_ino == (out / "b").stat().st_ino
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o644


def test_a_first_name_is_not_linked_back_to_a_file_rewritten_in_place(tmp_path: Path) -> None:
    """Rolling the cluster's own data root back (its files taken as unchanged only as the version captured): a
    group's first name gone and another name rewritten in place, size and time put back (as ransomware does).
    The first name must not be linked back to that file: its content is checked, the file written anew, and
    every name holds the snapshot's bytes again."""
    from drsync import engine

    root, repo = tmp_path / "root", tmp_path / "repo"
    write_files(root, {"d/a": "the captured bytes\n", "keep": "x\n"})
    for n in ("d/b", "d/c"):
        os.link(root / "d" / "a", root / n)
    init_repo_at(repo, "east", "1")
    sid = snapshot_json(repo, root)["id"]
    before = os.stat(root / "d" / "b")
    (root / "d" / "a").unlink()
    (root / "d" / "b").write_text("THE CAPTURED BYTES\n")  # the same inode, both names left
    os.utime(root / "d" / "b", ns=(before.st_atime_ns, before.st_mtime_ns))
    engine.restore_snapshot(engine.open_repository(str(repo)), sid, str(root), cluster_id="east", release="1")
    assert {(root / "d" / n).read_text() for n in "abc"} == {"the captured bytes\n"}
    assert len({(root / "d" / n).stat().st_ino for n in "abc"}) == 1
