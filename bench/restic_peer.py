"""restic as the peer of drsync's snapshots (``--only restic``): the same trees, in the same run.

For the incompressible tree (``gen_big``: 1 GiB in 256 files; --quick 64 MiB) and the small files
(``gen_small``: 100,000; --quick 5,000), each tool into a fresh local repository of its own:

- first snapshot: ``drsync snapshot create`` against ``restic backup`` (restic 0.14: repository
  version 2, zstd compression ``auto``);
- unchanged snapshot: the same again, nothing changed (drsync reuses the parent's chunk lists by
  size, mtime and inode; restic by its parent snapshot's metadata);
- restore to a new directory: ``drsync snapshot restore`` against ``restic restore``;
- repository size: ``du`` of each repository (allocated bytes).

The page cache is dropped before every timed command (when the machine allows it). Ratios are
drsync / restic; peak memory is each process's own (wait4), drsync's in the column, restic's in the note.
restic runs with ``RESTIC_PASSWORD`` set and its cache in the work directory (kept between its runs, as
an operator's would be). Its backup is ``restic backup .`` in the tree so that a restore lands at the
target's top like drsync's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import DRSYNC, Report, Run, age, drop_caches, gen_big, gen_small, run

PASSWORD = "drsync-bench"  # a throwaway repository's password, not a secret


@contextmanager
def restic_env(cache: Path) -> Iterator[None]:
    """RESTIC_PASSWORD and RESTIC_CACHE_DIR for the restic commands run inside."""
    saved = {k: os.environ.get(k) for k in ("RESTIC_PASSWORD", "RESTIC_CACHE_DIR")}
    os.environ["RESTIC_PASSWORD"], os.environ["RESTIC_CACHE_DIR"] = PASSWORD, str(cache)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def du_bytes(root: Path) -> int:
    """What ``du`` counts: allocated blocks of every file and directory under ``root``, hard links once."""
    seen: set[tuple[int, int]] = set()
    total = os.lstat(root).st_blocks * 512
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def tree_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files)


def compare(work: Path, tag: str, label: str, tree: Path, rep: Report) -> None:
    """Both tools on ``tree``: first snapshot, unchanged snapshot, restore, repository size."""
    d_repo, r_repo = work / f"r-{tag}-drsync-repo", work / f"r-{tag}-restic-repo"
    d_out, r_out = work / f"r-{tag}-drsync-out", work / f"r-{tag}-restic-out"
    restic = ["restic", "--repo", str(r_repo), "--quiet"]
    run([*DRSYNC, "init", "--repo", str(d_repo), "--cluster-id", "bench", "--release", "1"])
    run([*restic, "init"])

    def drsync_snapshot() -> tuple[Run, dict]:
        drop_caches()
        r = run([*DRSYNC, "snapshot", "create", "--repo", str(d_repo), "--source", str(tree), "--json"])
        return r, json.loads(r.out)

    def restic_backup() -> Run:
        drop_caches()
        return run([*restic, "backup", "--host", "bench", "."], cwd=tree)

    first, doc = drsync_snapshot()
    peer = restic_backup()
    row(rep, f"restic: {label}: first snapshot", first, peer)
    again, doc2 = drsync_snapshot()
    peer = restic_backup()
    row(rep, f"restic: {label}: unchanged snapshot", again, peer, f"drsync read {doc2['read_bytes']} B, "
                                                                 f"in-process {doc2['duration_s']:.2f}s")
    drop_caches()
    restore = run([*DRSYNC, "snapshot", "restore", doc["id"], "--repo", str(d_repo), "--target", str(d_out)])
    drop_caches()
    peer = run([*restic, "restore", "latest", "--target", str(r_out)])
    if tree_bytes(d_out) != tree_bytes(tree) or tree_bytes(r_out) != tree_bytes(tree):
        raise SystemExit(f"bench: restic part: a restore of {tree} does not hold its bytes")
    row(rep, f"restic: {label}: restore to a new directory", restore, peer,
        "drsync fsyncs what it restores, restic does not (strace)")
    shutil.rmtree(d_out)
    shutil.rmtree(r_out)
    ours, theirs, data = du_bytes(d_repo), du_bytes(r_repo), tree_bytes(tree)
    rep.add(f"restic: {label}: repository size (du)", ours / (1 << 20), theirs / (1 << 20), None, 0.0,
            f"(the data: {data / (1 << 20):.1f} MiB; drsync {100 * ours / max(1, data):.1f} %, restic "
            f"{100 * theirs / max(1, data):.1f} % of it)", unit="MiB", vs="drsync vs restic")
    shutil.rmtree(d_repo)
    shutil.rmtree(r_repo)


def row(rep: Report, what: str, ours: Run, peer: Run, note: str = "") -> None:
    rep.add(what, ours.seconds, peer.seconds, None, ours.peak_mib,
            f"(restic peak {peer.peak_mib:.0f} MiB{'; ' + note if note else ''})", vs="drsync vs restic")


def bench_restic(work: Path, big_mib: int, small_files: int, rep: Report) -> None:
    if shutil.which("restic") is None:
        raise SystemExit("bench: restic is not installed (make bench installs it: Debian package restic)")
    version = run(["restic", "version"]).out.strip()
    print(f"restic: {version}; page cache can be dropped: {drop_caches()} (otherwise every run reads a warm cache)")
    rep.results["restic: version"] = version
    big, small = work / "r-big", work / "r-small"
    print(f"restic: generating {big_mib} MiB in 256 files and {small_files} small files ...")
    gen_big(big, big_mib)
    gen_small(small, small_files)
    for tree in (big, small):
        age(tree)
    os.sync()
    try:
        with restic_env(work / "r-restic-cache"):
            compare(work, "big", f"{big_mib} MiB in 256 files", big, rep)
            compare(work, "small", f"{small_files} small files", small, rep)
    finally:
        for p in (big, small, work / "r-restic-cache"):
            shutil.rmtree(p, ignore_errors=True)
