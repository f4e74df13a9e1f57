"""The million-file part of ``make bench`` (``--only scale``): every operation's time and peak memory.

One tree of ``files`` small files (default 1,000,000, one chunk each) is built once and reused by
every step; steps that write a copy of it remove the copy before the next one, so the disk holds
at most the tree, two repositories, one backup and one copy (about 5 times the tree's size).
A second tree, a backup server's rotation of two days hard-linked to each other (``files`` entries,
``files / 2`` inodes, 63-byte paths), is captured and restored the same way, into an empty directory and
onto itself. Each step runs as its own process and reports its wall time and peak RSS (``wait4``; a running
agent's from its ``VmHWM``) against DESIGN.md's targets: 300 MiB for every operation, an
unchanged snapshot in 5 s, a no-change cycle in half of ``rsync -a``'s no-op to its daemon.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench import DRSYNC, AgentPair, Report, RsyncDaemon, Run, drop_caches, run, run_warm, vm_hwm_mib

MEMORY_TARGET_MIB = 300
UNCHANGED_TARGET_S = 5.0


def build_tree(root: Path, files: int) -> None:
    """``files`` files of 64 B to 1 KiB of random bytes, 1,000 per directory, 100 directories per
    parent; kept between runs when ``root/.complete`` says it holds ``files`` files."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text().strip() == str(files):
        print(f"scale: reusing the tree of {files} files in {root}")
        return
    shutil.rmtree(root, ignore_errors=True)
    print(f"scale: generating {files} files in {root} ...")
    rnd = random.Random(42)
    per = 1000
    for d in range((files + per - 1) // per):
        sub = root / f"d{d // 100:02}" / f"d{d:04}"
        sub.mkdir(parents=True)
        for i in range(min(per, files - d * per)):
            fd = os.open(sub / f"f{i:05}.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, rnd.randbytes(rnd.randrange(64, 1024)))
            os.close(fd)
    past = time.time() - 60  # nothing "racily" new for the unchanged-file check
    os.utime(root, (past, past))
    marker.write_text(f"{files}\n")
    os.utime(marker, (past, past))


def change_files(root: Path, files: int, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the files (new random bytes, new size); returns how many."""
    rnd = random.Random(seed)
    per = 1000
    n = max(1, int(files * fraction))
    for k in rnd.sample(range(files), n):
        d, i = divmod(k, per)
        with open(root / f"d{d // 100:02}" / f"d{d:04}" / f"f{i:05}.dat", "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(64, 1024)))
    return n


def bench_scale(work: Path, tree: Path, files: int, rep: Report) -> None:
    build_tree(tree, files)
    os.sync()

    def add(what: str, r: Run, peer: Run | None = None, target: float | None = None, note: str = "") -> None:
        mem = "met" if r.peak_mib <= MEMORY_TARGET_MIB else "MISSED"
        rep.add(f"scale {files}: {what}", r.seconds, peer.seconds if peer else None, target, r.peak_mib,
                f"[{mem} {MEMORY_TARGET_MIB} MiB] {note}".rstrip())

    def drsync(*args: str) -> Run:
        return run([*DRSYNC, *args])

    repo = work / "s-repo"
    drsync("init", "--repo", str(repo), "--cluster-id", "bench", "--release", "1")
    copy = work / "s-copy"
    drop_caches()
    peer = run(["rsync", "-a", f"{tree}/", f"{copy}/"])
    drop_caches()
    first = drsync("snapshot", "create", "--repo", str(repo), "--source", str(tree), "--json")
    add("first snapshot", first, peer)
    shutil.rmtree(copy)
    again = drsync("snapshot", "create", "--repo", str(repo), "--source", str(tree), "--json")
    add("unchanged snapshot (warm)", again, None, None,
        f"[{'met' if again.seconds <= UNCHANGED_TARGET_S else 'MISSED'} {UNCHANGED_TARGET_S:g} s; in-process "
        f"{json.loads(again.out)['duration_s']:.2f}s]")
    a = json.loads(first.out)["id"]
    changed = change_files(tree, files, 0.01, seed=1)
    inc = drsync("snapshot", "create", "--repo", str(repo), "--source", str(tree), "--json")
    b = json.loads(inc.out)["id"]
    add(f"snapshot after rewriting 1 % ({changed} files)", inc)
    add("snapshot diff", drsync("snapshot", "diff", a, b, "--repo", str(repo), "--json"))

    out = work / "s-out"
    drop_caches()
    add("restore to a new directory", drsync("snapshot", "restore", a, "--repo", str(repo), "--target", str(out)))
    again = ("--overwrite", "--delete-extra")  # onto the copy restored before: a delta restore
    add("delta restore of the 1 % change", drsync("snapshot", "restore", *again, b, "--repo", str(repo), "--target",
                                                   str(out)))
    add("no-change restore", drsync("snapshot", "restore", *again, b, "--repo", str(repo), "--target", str(out)))
    shutil.rmtree(out)

    backups = work / "s-backups"
    made = drsync("backup", "create", "--repo", str(repo), "--snapshot", b, "--dest", str(backups), "--json")
    add("backup create (full)", made)
    backup_dir = json.loads(made.out)["path"]
    add("backup verify", drsync("backup", "verify", backup_dir))
    add("backup restore to a new directory", drsync("backup", "restore", backup_dir, "--target", str(out)))
    shutil.rmtree(out)
    shutil.rmtree(backups)

    add("repo verify", drsync("repo", "verify", "--repo", str(repo)))
    drsync("snapshot", "delete", a, "--repo", str(repo))
    add("repo gc (after deleting the first snapshot)", drsync("repo", "gc", "--repo", str(repo)))
    shutil.rmtree(repo)

    daemon = RsyncDaemon(work)
    pair = AgentPair(work, "s-pair", tree)
    try:
        peer = daemon.sync(tree, "scale")
        first, figures = pair.cycle()
        add("agents: first sync (primary)", first, peer, None, f"(in the agent {figures['cycle_s']:.2f}s)")
        rep_standby("first sync", pair, files, rep)
        changed = change_files(tree, files, 0.01, seed=2)
        peer = daemon.sync(tree, "scale")
        inc, figures = pair.cycle()
        add(f"agents: cycle after rewriting 1 % ({changed} files)", inc, peer, None,
            f"(in the agent {figures['cycle_s']:.2f}s)")
        peer = run_warm(["rsync", "-a", f"{tree}/", f"rsync://127.0.0.1:{daemon.port}/bench/scale/"])
        noop = run([*DRSYNC, "agent", "--config", str(pair.primary), "--once", "--json"])
        add("agents: no-change cycle (warm)", noop, peer, 0.5)
        rep_standby("all cycles", pair, files, rep)
    finally:
        pair.stop()
        daemon.stop()
        shutil.rmtree(work / "s-pair", ignore_errors=True)
        shutil.rmtree(work / "rsyncd", ignore_errors=True)
    bench_hardlinked(work, files, add)


def build_rotation(root: Path, files: int) -> None:
    """A backup rotation: ``daily.0`` holds ``files // 2`` small files, ``daily.1`` the same names hard-linked
    to them (``daily.0/home/user042/projects/data-0421/report_042137_final.csv``: 63 bytes)."""
    shutil.rmtree(root, ignore_errors=True)
    print(f"scale: generating a rotation of two hard-linked days of {files // 2} files in {root} ...")
    for i in range(files // 2):
        d0 = root / "daily.0" / "home" / f"user{i // 5000:03}" / "projects" / f"data-{i // 100:04}"
        d1 = root / "daily.1" / d0.relative_to(root / "daily.0")
        if i % 100 == 0:
            d0.mkdir(parents=True)
            d1.mkdir(parents=True)
        name = f"report_{i:06}_final.csv"
        (d0 / name).write_text(f"id,{i}\n")
        os.link(d0 / name, d1 / name)
    past = time.time() - 60
    os.utime(root, (past, past))


def bench_hardlinked(work: Path, files: int, add: Callable[..., None]) -> None:
    """Capture and restore of a hard-linked backup rotation (:func:`build_rotation`): its names are read
    back from the manifest's file by the apply, a peak of its own."""
    tree, repo, out = work / "s-rotation", work / "s-rotation-repo", work / "s-rotation-out"
    try:
        build_rotation(tree, files)
        os.sync()
        run([*DRSYNC, "init", "--repo", str(repo), "--cluster-id", "bench", "--release", "1"])
        made = run([*DRSYNC, "snapshot", "create", "--repo", str(repo), "--source", str(tree), "--json"])
        add("hard-linked rotation: snapshot", made)
        sid = json.loads(made.out)["id"]
        drop_caches()
        add("hard-linked rotation: restore to a new directory",
            run([*DRSYNC, "snapshot", "restore", sid, "--repo", str(repo), "--target", str(out)]))
        add("hard-linked rotation: no-change restore",
            run([*DRSYNC, "snapshot", "restore", "--overwrite", "--delete-extra", sid, "--repo", str(repo),
                 "--target", str(out)]))
    finally:
        for p in (tree, repo, out):
            shutil.rmtree(p, ignore_errors=True)


def rep_standby(when: str, pair: AgentPair, files: int, rep: Report) -> None:
    """The standby agent's peak memory so far (it runs for the whole part)."""
    peak = vm_hwm_mib(pair.proc.pid)
    rep.add(f"scale {files}: agents: standby's peak after {when}", 0.0, None, None, peak,
            f"[{'met' if peak <= MEMORY_TARGET_MIB else 'MISSED'} {MEMORY_TARGET_MIB} MiB]")
