"""Breaker s57: hard-link groups a target's filesystem cannot hold as links, and a restore onto a kept target
that would set existing files' metadata back.

Each test asserts the promised behaviour and fails where it does not hold."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import init_repo_at

NAMES = 65_100  # more names than ext4 lets one file have (65,000)
HOLE = 1 << 20
BODY = b"\0" * HOLE + b"one file, many names\n"


@pytest.fixture
def crowded_group() -> Iterator[Path]:
    """A tree on tmpfs (no link limit) whose one file has :data:`NAMES` + 1 names in 66 directories."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("needs a writable tmpfs at /dev/shm for a file of more than 65,000 names")
    base = shm / f"drsync-test-{uuid.uuid4().hex[:8]}"
    src = base / "many"
    (src / "z").mkdir(parents=True)
    fd = os.open(src / "z" / "lead", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, BODY[HOLE:], HOLE)  # sparse: a 1 MiB hole, then the bytes
    os.close(fd)
    try:
        for i in range(NAMES):
            d = src / f"d{i // 1000:03}"
            if i % 1000 == 0:
                d.mkdir()
            os.link(src / "z" / "lead", d / f"n{i}")
    except OSError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"/dev/shm holds no file of {NAMES} names here: {e}")
    try:
        yield src
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _captured(drsync, src: Path, base: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A repository at ``base/repo`` holding a snapshot of ``src``: (repository, snapshot id)."""
    repo = str(base / "repo")
    init_repo_at(repo, "c", "1")
    r = drsync("snapshot", "create", "--repo", repo, "--source", src, "--json")
    assert r.code == 0, r.err
    return repo, r.json()["id"]


def test_a_group_with_more_names_than_the_target_allows_is_restored_with_copies_and_again(
        drsync, crowded_group: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Was: the commit failed on EMLINK halfway through the links, and every run again failed the same way
    (the journal replayed into the same wall). Now the names past the limit are files of their own with the
    group's bytes, holes and metadata, the run says so, and a second run completes too."""
    out = tmp_path / "out"
    out.mkdir()
    if os.pathconf(out, "PC_LINK_MAX") > NAMES:
        pytest.skip(f"{tmp_path}'s filesystem lets one file have {NAMES} names: nothing to fall back from")
    repo, sid = _captured(drsync, crowded_group, tmp_path)
    out.rmdir()
    r = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, "--json")
    assert r.code == 0, r.err
    assert "written as copies" in r.out + r.err and "Too many links" in r.out + r.err
    made = r.json()
    assert not (out / ".drsync-staging").exists()
    names = [out / f"d{i // 1000:03}" / f"n{i}" for i in range(NAMES)] + [out / "z" / "lead"]
    inodes = [p.stat() for p in names]
    assert all(p.read_bytes() == BODY for p in names[-20:])
    lead = inodes[0]  # the group's first name in path order (d000/n0) is its file
    linked = sum(1 for s in inodes if s.st_ino == lead.st_ino)
    assert linked == lead.st_nlink and linked >= 60_000  # as many names as the filesystem took
    copies = [s for s in inodes if s.st_ino != lead.st_ino]
    assert len(copies) == NAMES + 1 - linked
    assert all(stat.S_IMODE(s.st_mode) == stat.S_IMODE(lead.st_mode) and s.st_mtime_ns == lead.st_mtime_ns
               for s in copies)
    assert all(s.st_blocks * 512 < HOLE for s in copies), "a copy filled the file's hole"
    # Counted as what they are (breaker s57b): the copies are files written, not links made.
    assert (made["made_hardlinks"], made["written_files"]) == (linked - 1, 1 + len(copies)), made
    assert made["written_bytes"] == len(BODY) * (1 + len(copies)), made  # breaker s58: the copies' bytes were not
    # The same restore again finds the target whole (breaker s57b: it planned the copies as links still to make,
    # and without --overwrite refused them as names it "would overwrite"): nothing to do, in a dry run too.
    dry = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert dry.json()["planned"]["hardlink"] == [] and dry.json()["written_files"] == 0
    again = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, "--json")
    assert again.code == 0, again.err
    assert (again.json()["written_files"], again.json()["made_hardlinks"]) == (0, 0), again.json()
    assert [p.stat().st_ino for p in names] == [s.st_ino for s in inodes]
    # Names of the group's file removed (breaker s58: every copy was then planned as a link to make, refused
    # without --overwrite and written again as a copy with it): they are linked again, the copies stay.
    gone = [p for p, s in zip(names, inodes, strict=True) if s.st_ino == lead.st_ino][-100:]
    for p in gone:
        p.unlink()
    back = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, "--json")
    assert back.code == 0, back.err
    assert (back.json()["made_hardlinks"], back.json()["written_files"]) == (100, 0), back.json()
    assert [p.stat().st_ino for p in names] == [s.st_ino for s in inodes]
    # The group's first name removed (breaker s58b: the file was written anew, every other name "overwritten",
    # refused without --overwrite): linked back to the file its other names hold.
    names[0].unlink()
    back = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, "--json")
    assert back.code == 0, back.err
    assert (back.json()["made_hardlinks"], back.json()["written_files"]) == (1, 0), back.json()
    assert [p.stat().st_ino for p in names] == [s.st_ino for s in inodes]
    # The copies are not links of the group: a second restore onto the same target relinks what it can.
    r = drsync("snapshot", "restore", "--overwrite", "--delete-extra", sid, "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    assert not (out / ".drsync-staging").exists()
    assert (out / "d000" / "n0").stat().st_nlink == lead.st_nlink


def test_a_kept_target_s_modes_are_not_set_back_without_overwrite(drsync, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Was: without --overwrite a restore onto a target it does not own set existing files' mode (and a
    hard-link group's owner) back, and --dry-run said nothing would change. Now both refuse (exit 4),
    naming the file; --overwrite sets it back."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_text("same bytes\n")
    os.link(src / "a" / "f", src / "g")
    (src / "a" / "f").chmod(0o644)
    repo, sid = _captured(drsync, src, tmp_path)
    out = tmp_path / "out"
    assert drsync("snapshot", "restore", sid, "--repo", repo, "--target", out).code == 0
    (out / "a" / "f").chmod(0o4777)
    for extra in (("--dry-run",), ()):
        r = drsync("snapshot", "restore", sid, "--repo", repo, "--target", out, *extra)
        assert r.code == 4, (extra, r.out, r.err)
        assert "mode, owner, time or extended attributes" in r.err and "--overwrite" in r.err, r.err
        assert "a/f" in r.err or "g" in r.err
        assert stat.S_IMODE((out / "a" / "f").stat().st_mode) == 0o4777
    r = drsync("snapshot", "restore", "--overwrite", sid, "--repo", repo, "--target", out)
    assert r.code == 0, r.err
    assert stat.S_IMODE((out / "a" / "f").stat().st_mode) == 0o644
    assert (out / "a" / "f").stat().st_ino == (out / "g").stat().st_ino
