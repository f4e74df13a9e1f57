"""Breaker: continuous mode must never miss a change silently (interval = 1h, so only notification or the
promised fall-back polling every min_interval can move a change to the standby)."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.group import wait_for
from tests.test_agents import Pair
from tests.test_continuous import continuous_pair, metric

DEADLINE = 15  # seconds (times SLOW): settle 100ms, min_interval 1s, so this is generous


@pytest.fixture
def cpair(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = continuous_pair(tmp_path)
    yield p
    p.stop_all()


def started(p: Pair) -> Pair:
    p.start("standby")
    p.start("primary")
    wait_for(p.in_sync, "the first shipment", 60)
    return p


def log(p: Pair, name: str = "primary") -> str:
    """The agent's log with the test's directory as ``<tmp>``: the directory is named after the test, so a
    line that only names a path (e.g. "...test_the_watch_limit...") never matches what a test looks for."""
    return (p.tmp / f"{name}.log").read_text(errors="replace").replace(str(p.tmp), "<tmp>")


def test_a_directory_tree_moved_in_from_outside_is_watched(cpair: Pair) -> None:
    p = started(cpair)
    outside = p.tmp / "outside"
    (outside / "a" / "b" / "c").mkdir(parents=True)
    (outside / "a" / "b" / "c" / "f.txt").write_text("one")
    os.rename(outside, p.prod / "moved-in")
    wait_for(p.in_sync, "the moved-in tree to reach the standby", DEADLINE)
    # A later change deep inside the moved-in tree must be seen too.
    (p.prod / "moved-in" / "a" / "b" / "c" / "f.txt").write_text("two, changed deep inside")
    wait_for(p.in_sync, "a change deep inside a moved-in tree", DEADLINE)
    (p.prod / "moved-in" / "a" / "b" / "new").mkdir()
    (p.prod / "moved-in" / "a" / "b" / "new" / "g.txt").write_text("new file in a new dir of a moved-in tree")
    wait_for(p.in_sync, "a new dir inside a moved-in tree", DEADLINE)


def test_a_directory_renamed_inside_the_root_keeps_being_watched(cpair: Pair) -> None:
    p = started(cpair)
    (p.prod / "x" / "y").mkdir(parents=True)
    (p.prod / "x" / "y" / "f").write_text("1")
    wait_for(p.in_sync, "new dir", DEADLINE)
    os.rename(p.prod / "x", p.prod / "catalog" / "x2")
    wait_for(p.in_sync, "renamed dir", DEADLINE)
    (p.prod / "catalog" / "x2" / "y" / "f").write_text("2 after the rename")
    wait_for(p.in_sync, "a change inside a renamed directory", DEADLINE)


def test_a_directory_moved_out_and_back_in(cpair: Pair) -> None:
    p = started(cpair)
    (p.prod / "small").mkdir()
    (p.prod / "small" / "f").write_text("1")
    wait_for(p.in_sync, "a small directory", DEADLINE)
    os.rename(p.prod / "small", p.tmp / "small-away")
    wait_for(p.in_sync, "a directory moved out", DEADLINE)
    (p.tmp / "small-away" / "f").write_text("changed while away")
    os.rename(p.tmp / "small-away", p.prod / "small")
    wait_for(p.in_sync, "a directory moved back in", DEADLINE)
    (p.prod / "small" / "f").write_text("changed after coming back")
    wait_for(p.in_sync, "a change in a directory moved back in", DEADLINE)


def test_a_deep_new_tree_written_at_once(cpair: Pair) -> None:
    p = started(cpair)
    d = p.prod
    for i in range(120):
        d = d / f"d{i}"
    d.mkdir(parents=True)
    (d / "bottom.txt").write_text("at the bottom")
    wait_for(p.in_sync, "a file at the bottom of a 120-deep new tree", DEADLINE)
    (d / "bottom.txt").write_text("changed at the bottom")
    wait_for(p.in_sync, "a change at the bottom of a deep tree", DEADLINE)


def _mmap_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as m:
            m[: len(data)] = data
            m.flush()
    finally:
        os.close(fd)


def test_a_file_rewritten_through_mmap(cpair: Pair) -> None:
    p = started(cpair)
    f = p.prod / "catalog" / "f003.txt"
    size = f.stat().st_size
    _mmap_write(f, b"M" * size)
    wait_for(p.in_sync, "an mmap write (same size) to reach the standby", DEADLINE)


def test_a_file_rewritten_with_o_direct(cpair: Pair) -> None:
    p = started(cpair)
    f = p.prod / "odirect.bin"
    f.write_bytes(b"\0" * 8192)
    wait_for(p.in_sync, "the file", DEADLINE)
    buf = mmap.mmap(-1, 4096)
    buf.write(b"D" * 4096)
    fd = os.open(f, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, 4096)
    finally:
        os.close(fd)
    wait_for(p.in_sync, "an O_DIRECT write to reach the standby", DEADLINE)


def test_the_root_replaced_falls_back_with_one_warning(cpair: Pair) -> None:
    p = started(cpair)
    shutil.copytree(p.prod, p.tmp / "new-root", symlinks=True)
    os.rename(p.prod, p.tmp / "old-root")
    os.rename(p.tmp / "new-root", p.prod)
    (p.prod / "catalog" / "f003.txt").write_text("written in the replacement root")
    wait_for(p.in_sync, "a change in a replaced root", DEADLINE)
    (p.prod / "catalog" / "f004.txt").write_text("again")
    wait_for(p.in_sync, "a second change in a replaced root", DEADLINE)
    assert metric(p.metrics["primary"], "drsync_change_watch") == 0


def test_a_mount_over_the_root_falls_back(cpair: Pair) -> None:
    p = started(cpair)
    copy = p.tmp / "copy"
    shutil.copytree(p.prod, copy, symlinks=True)
    subprocess.run(["mount", "--bind", str(copy), str(p.prod)], check=True)
    try:
        (p.prod / "catalog" / "f003.txt").write_text("written on the bind mount over the root")
        wait_for(p.in_sync, "a change on a mount over the root", DEADLINE)
        assert metric(p.metrics["primary"], "drsync_change_watch") == 0
    finally:
        p.stop_all()
        subprocess.run(["umount", str(p.prod)], check=False)


def test_a_root_given_as_a_symlink_flipped_to_a_new_release(tmp_path: Path) -> None:
    """data = .../current -> releases/r1; a deploy flips current to releases/r2 (atomic symlink swap)."""
    rel = tmp_path / "releases"
    p = continuous_pair(tmp_path)
    try:
        rel.mkdir()
        os.rename(p.prod, rel / "r1")
        os.symlink(rel / "r1", p.prod)
        started(p)
        shutil.copytree(rel / "r1", rel / "r2", symlinks=True)
        (rel / "r2" / "catalog" / "f003.txt").write_text("release 2")
        os.symlink(rel / "r2", tmp_path / "next")
        os.rename(tmp_path / "next", p.prod)  # atomic flip
        try:
            wait_for(lambda: (p.standby_data / "catalog" / "f003.txt").read_text() == "release 2",
                     "the flipped root to reach the standby", DEADLINE)
        finally:
            print("drsync_change_watch =", metric(p.metrics["primary"], "drsync_change_watch"))
            print(log(p)[-1500:])
    finally:
        p.stop_all()


def overflow_while_stopped(p: Pair, then: Callable[[Path], None] = lambda flood: None) -> None:
    """Overflow the primary's inotify queue: 20,000 files made in a watched directory while the agent is
    stopped (SIGSTOP), then ``then(flood)``, then SIGCONT. The directory exists and is watched first: files
    made in a directory not yet watched queue no events (its creation is one, and the capture it triggers
    walks it)."""
    wait_for(lambda: "applied" in log(p), "the primary to see the first shipment applied", 30)
    flood = p.prod / "flood"
    flood.mkdir()
    (flood / "first").touch()
    wait_for(lambda: (p.standby_data / "flood" / "first").exists(), "the flood directory to be watched and shipped")
    prim = p.procs["primary"]
    prim.send_signal(signal.SIGSTOP)
    try:
        for i in range(20000):
            (flood / f"f{i}").touch()
        then(flood)
    finally:
        prim.send_signal(signal.SIGCONT)


def test_a_queue_overflow_falls_back_and_loses_nothing(cpair: Pair) -> None:
    """The kernel drops every event after the queue is full: the change made last is only known from the
    overflow. Nothing changes after SIGCONT, so only the overflow (or the fall-back polling) can ship it."""
    p = started(cpair)

    def undo_and_change(flood: Path) -> None:
        shutil.rmtree(flood)
        (p.prod / "catalog" / "f004.txt").write_text("the change whose event the full queue dropped")
    overflow_while_stopped(p, undo_and_change)
    wait_for(p.in_sync, "the change made while the queue overflowed (interval is 1h)", DEADLINE)


def test_a_queue_overflow_is_warned_about(cpair: Pair) -> None:
    p = started(cpair)
    overflow_while_stopped(p)
    wait_for(p.in_sync, "the flood to ship", DEADLINE)
    def warned() -> bool:
        return any(" WARNING " in line and ("overflow" in line.split("drsync", 1)[-1])
                   for line in log(p).splitlines())
    wait_for(warned, "one WARNING naming the queue overflow (docs/operations.md section 15)", 10)
    assert metric(p.metrics["primary"], "drsync_change_watch") == 0


def test_a_root_on_tmpfs(tmp_path: Path) -> None:
    p = continuous_pair(tmp_path)
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    try:
        shutil.copytree(p.prod, mnt / "root", symlinks=True)
        shutil.rmtree(p.prod)
        cfg = p.primary_cfg.read_text().replace(f'data = "{p.prod}"', f'data = "{mnt / "root"}"')
        p.primary_cfg.write_text(cfg)
        p.prod = mnt / "root"
        started(p)
        (p.prod / "catalog" / "f003.txt").write_text("on tmpfs")
        wait_for(p.in_sync, "a write on tmpfs", DEADLINE)
        f = p.prod / "catalog" / "f004.txt"
        _mmap_write(f, b"T" * f.stat().st_size)
        wait_for(p.in_sync, "an mmap write on tmpfs", DEADLINE)
    finally:
        p.stop_all()
        subprocess.run(["umount", str(mnt)], check=False)


def _start_primary_with_watch_limit(p: Pair, limit: int) -> None:
    """The primary in its own user namespace, whose inotify watch limit is ``limit`` (the host's is untouched)."""
    import sys
    script = (f'echo {limit} > /proc/sys/user/max_inotify_watches && '
              f'exec {sys.executable} -m drsync agent --config {p.primary_cfg}')
    with open(p.tmp / "primary.log", "ab") as out:
        p.procs["primary"] = subprocess.Popen(["unshare", "-U", "-r", "sh", "-c", script], stdout=out, stderr=out)


def test_the_watch_limit_reached_by_directories_made_later(cpair: Pair) -> None:
    p = cpair
    ndirs = sum(1 for _ in os.walk(p.prod))
    p.start("standby")
    _start_primary_with_watch_limit(p, ndirs + 3)
    wait_for(p.in_sync, "the first shipment", 60)
    for i in range(10):
        (p.prod / f"later-{i}").mkdir()
    wait_for(p.in_sync, "new directories", DEADLINE)
    (p.prod / "later-9" / "f.txt").write_text("in a directory past the watch limit")
    wait_for(p.in_sync, "a write in a directory that could not be watched", DEADLINE)
    (p.prod / "later-9" / "f.txt").write_text("again, in a directory past the watch limit")
    wait_for(p.in_sync, "a second write in a directory that could not be watched", DEADLINE)
    warnings = [line for line in log(p).splitlines() if " WARNING " in line and "watch" in line]
    assert len(warnings) == 1, warnings
    assert metric(p.metrics["primary"], "drsync_change_watch") == 0


def test_the_watch_limit_reached_at_start_is_warned_and_polled(cpair: Pair) -> None:
    """Control for the test above: the same user-namespace limit, already too low when the agent starts."""
    p = cpair
    ndirs = sum(1 for _ in os.walk(p.prod))
    p.start("standby")
    _start_primary_with_watch_limit(p, ndirs - 2)
    wait_for(p.in_sync, "the first shipment", 60)
    wait_for(lambda: any(" WARNING " in line and "watch" in line for line in log(p).splitlines()),
             "the watch-limit warning", 20)
    (p.prod / "catalog" / "f003.txt").write_text("polled")
    wait_for(p.in_sync, "a polled change", DEADLINE)
