"""Safety rule 2 (atomic apply): a real kill -9 at EVERY mutating step of a commit.

One commit mixes every kind of change (see :func:`versions`): content changed, file added and
removed, directory added and removed with children, file -> directory, directory -> file,
file -> symlink, symlink -> file, directory -> symlink, symlink -> directory, a retargeted
symlink, a mode-only change, a directory's mtime-only change, a new empty directory, a type
change at depth (``a/b/c`` file -> directory) and a 0o555 directory that loses a file and gains
one. The snapshots come from a real repository; the target starts as the old snapshot.

``tests/crashdriver.py`` applies the new snapshot in a forked child as the standby does (with
a journal) and sends it SIGKILL right before its N-th mutating call inside the commit (or inside
the close that follows: the journal's "done", the staging area's removal). A run without a kill
counts the steps; then every N is tried on a fresh copy of the target. After each kill the
target is recovered (``recover_apply``, what the standby runs at start; or a real ``drsync
snapshot restore``) and must equal EXACTLY the old or the new snapshot (types, bytes, modes,
owners, nanosecond mtimes of files, directories and links, link targets, empty directories),
with no ``.drsync-staging`` left. A second level kills the recovery itself at each of its
steps, then recovers again. The same runs against an HDFS target (the WebHDFS test server lives
in the pytest process, never in the killed one), and a real standby agent is killed at steps of
its commit and restarted (all steps with ``DRSYNC_RELIABILITY=full``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drsync import engine
from drsync.apply import recover_apply
from drsync.dataroot import STAGING
from tests.conftest import run_drsync
from tests.crashdriver import Driver

ROOT = Path(__file__).resolve().parent.parent
FULL = os.environ.get("DRSYNC_RELIABILITY") == "full"
KILLED = signal.SIGKILL

# --- the scenario -------------------------------------------------------------------------

# A spec entry: ("dir", mode, mtime_ns) | ("file", mode, mtime_ns, bytes) | ("link", target, mtime_ns)
Spec = dict[str, tuple[Any, ...]]


def T(k: int) -> int:
    """A distinct past mtime with a nanosecond part (HDFS keeps only the milliseconds)."""
    return 1_600_000_000_000_000_000 + k * 1_000_003_000 + 123_456_789


def versions(links: bool) -> tuple[Spec, Spec]:
    """The old and the new snapshot's trees. Entries the same in both are unchanged by the apply."""
    def d(k: int, mode: int = 0o755) -> tuple[Any, ...]:
        return ("dir", mode, T(k))

    def f(k: int, data: bytes, mode: int = 0o644) -> tuple[Any, ...]:
        return ("file", mode, T(k), data)

    def ln(k: int, target: str) -> tuple[Any, ...]:
        return ("link", target, T(k))

    same: Spec = {
        "keep": d(1), "keep/stay.txt": f(2, b"unchanged\n"),
        "mt/f.txt": f(3, b"inside a directory whose mtime alone changes\n"),
        "a": d(4), "a/b": d(5),  # a/b keeps its mtime although its child changes type
        "ro/stays.txt": f(6, b"in a read-only directory\n"),
        "big.bin": f(7, bytes(range(256)) * 300),
    }
    old: Spec = {
        **same,
        "changed.txt": f(10, b"old content\n"),
        "removed.txt": f(11, b"goes away\n"),
        "olddir": d(12), "olddir/a.txt": f(13, b"a\n"), "olddir/deep": d(14, 0o555),
        "olddir/deep/b.txt": f(15, b"b\n", 0o600),
        "f2d": f(16, b"a file that becomes a directory\n"),
        "d2f": d(17), "d2f/c1.txt": f(18, b"c1\n"), "d2f/sub": d(19), "d2f/sub/c2.txt": f(20, b"c2\n"),
        "modeonly.txt": f(21, b"only the mode changes\n", 0o644),
        "mt": d(22),
        "a/b/c": f(23, b"a file at depth\n"),
        "ro": d(24, 0o555), "ro/old.txt": f(25, b"removed from a read-only directory\n"),
    }
    new: Spec = {
        **same,
        "changed.txt": f(30, b"new content, longer than before\n"),
        "added.txt": f(31, b"added\n", 0o640),
        "newdir": d(32), "newdir/x.txt": f(33, b"x\n"), "newdir/sub": d(34, 0o700),
        "newdir/sub/y.txt": f(35, b"y\n"),
        "f2d": d(36), "f2d/inner.txt": f(37, b"inner\n"), "f2d/sub": d(38), "f2d/sub/z.txt": f(39, b"z\n"),
        "d2f": f(40, b"a directory that became a file\n"),
        "modeonly.txt": f(21, b"only the mode changes\n", 0o600),
        "mt": d(41),
        "emptynew": d(42, 0o750), "emptynew/deeper": d(43),
        "a/b/c": d(44), "a/b/c/d.txt": f(45, b"d\n"),
        "ro": d(46, 0o555), "ro/new.txt": f(47, b"added to a read-only directory\n"),
    }
    if links:
        old.update({
            "f2l": f(50, b"a file that becomes a link\n"),
            "l2f": ln(51, "keep/stay.txt"),
            "d2l": d(52), "d2l/k.txt": f(53, b"k\n"),
            "l2d": ln(54, "keep"),
            "retarget": ln(55, "changed.txt"),
            "samelink": ln(56, "a/b"),
        })
        new.update({
            "f2l": ln(60, "changed.txt"),
            "l2f": f(61, b"a link that became a file\n"),
            "d2l": ln(62, "newdir"),
            "l2d": d(63), "l2d/m.txt": f(64, b"m\n"), "l2d/sub": d(65), "l2d/sub/n.txt": f(66, b"n\n"),
            "retarget": ln(67, "keep/stay.txt"),
            "samelink": ln(56, "a/b"),
        })
    return old, new


def build(root: Path, spec: Spec) -> None:
    """Make ``root`` hold exactly ``spec`` (it must not exist)."""
    root.mkdir(parents=True)
    for path in sorted(spec):
        e, p = spec[path], root / path
        if e[0] == "dir":
            p.mkdir(0o700)
        elif e[0] == "file":
            p.write_bytes(e[3])
        else:
            os.symlink(e[1], p)
    for path, e in spec.items():
        p = root / path
        if e[0] == "file":
            os.chmod(p, e[1])
            os.utime(p, ns=(e[2], e[2]))
        elif e[0] == "link":
            os.utime(p, ns=(e[2], e[2]), follow_symlinks=False)
    for path in sorted((p for p, e in spec.items() if e[0] == "dir"), key=lambda p: -p.count("/")):
        e = spec[path]
        os.chmod(root / path, e[1])
        os.utime(root / path, ns=(e[2], e[2]))


def expected_local(spec: Spec) -> dict[str, tuple[Any, ...]]:
    uid, gid = os.getuid(), os.getgid()
    out: dict[str, tuple[Any, ...]] = {}
    for path, e in spec.items():
        if e[0] == "file":
            out[path] = ("file", e[1], e[2], uid, gid, e[3])
        elif e[0] == "dir":
            out[path] = ("dir", e[1], e[2], uid, gid)
        else:
            out[path] = ("link", e[1], e[2], uid, gid)
    return out


def expected_hdfs(spec: Spec) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for path, e in spec.items():
        if e[0] == "file":
            out[path] = ("file", e[1], e[2] // 1_000_000, e[3])
        elif e[0] == "dir":
            out[path] = ("dir", e[1], e[2] // 1_000_000)
    return out


# --- local trees: exact state, copy, removal -----------------------------------------------


def local_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything below ``root`` except its top-level staging area: type, mode, owner, mtime (ns),
    bytes or link target. Fifos, sockets and devices show as "other"."""
    out: dict[str, tuple[Any, ...]] = {}

    def walk(d: Path, rel: str) -> None:
        for name in sorted(os.listdir(d)):
            if not rel and name == STAGING:
                continue
            p, r = d / name, f"{rel}/{name}" if rel else name
            s = os.lstat(p)
            ident = (s.st_uid, s.st_gid)
            if stat.S_ISLNK(s.st_mode):
                out[r] = ("link", os.readlink(p), s.st_mtime_ns, *ident)
            elif stat.S_ISDIR(s.st_mode):
                out[r] = ("dir", stat.S_IMODE(s.st_mode), s.st_mtime_ns, *ident)
                walk(p, r)
            elif stat.S_ISREG(s.st_mode):
                out[r] = ("file", stat.S_IMODE(s.st_mode), s.st_mtime_ns, *ident, p.read_bytes())
            else:
                out[r] = ("other", s.st_mode)

    walk(root, "")
    return out


def copy_tree(src: Path, dst: Path) -> None:
    """An exact copy (modes, owners, ns mtimes of everything, links as links), made in name order."""
    s = os.lstat(src)
    os.mkdir(dst, 0o700)
    for name in sorted(os.listdir(src)):
        a, b = src / name, dst / name
        sa = os.lstat(a)
        if stat.S_ISDIR(sa.st_mode):
            copy_tree(a, b)
            continue
        if stat.S_ISLNK(sa.st_mode):
            os.symlink(os.readlink(a), b)
        else:
            shutil.copyfile(a, b, follow_symlinks=False)
            os.chmod(b, stat.S_IMODE(sa.st_mode))
        if os.geteuid() == 0:
            os.chown(b, sa.st_uid, sa.st_gid, follow_symlinks=False)
        os.utime(b, ns=(sa.st_atime_ns, sa.st_mtime_ns), follow_symlinks=False)
    if os.geteuid() == 0:
        os.chown(dst, s.st_uid, s.st_gid)
    os.chmod(dst, stat.S_IMODE(s.st_mode))
    os.utime(dst, ns=(s.st_atime_ns, s.st_mtime_ns))


def remove_tree(root: Path) -> None:
    if not root.exists():
        return
    for dirpath, dirs, _ in os.walk(root):
        for name in dirs:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(root)


# --- judging a state ------------------------------------------------------------------------


def _differences(state: dict[str, Any], want: dict[str, Any], limit: int = 6) -> str:
    keys = sorted(set(state) | set(want))
    bad = [k for k in keys if state.get(k) != want.get(k)]

    def show(v: Any) -> str:
        if v is None:
            return "absent"
        return repr(tuple(x[:24] + b"..." if isinstance(x, bytes) and len(x) > 24 else x for x in v))

    lines = [f"    {k}: {show(state.get(k))} (expected {show(want.get(k))})" for k in bad[:limit]]
    more = f"\n    ... {len(bad) - limit} more" if len(bad) > limit else ""
    return "\n".join(lines) + more


def judge(state: dict[str, Any], old: dict[str, Any], new: dict[str, Any], label: str) -> str:
    """'old' or 'new'; anything else is a violation of safety rule 2, named path by path."""
    if state == new:
        return "new"
    if state == old:
        return "old"
    raise AssertionError(f"SAFETY RULE 2 VIOLATED ({label}): the target is neither the old snapshot nor the new "
                         f"one.\n  differences from the new snapshot:\n{_differences(state, new)}\n"
                         f"  differences from the old snapshot:\n{_differences(state, old)}")


def test_the_judge_tells_a_mix_from_either_snapshot() -> None:
    """The comparison can fail: one path of the new snapshot in the old tree, or one nanosecond off."""
    old_spec, new_spec = versions(links=True)
    old, new = expected_local(old_spec), expected_local(new_spec)
    assert judge(old, old, new, "") == "old" and judge(new, old, new, "") == "new"
    for path in sorted(set(old) ^ set(new)) + sorted(k for k in old if k in new and old[k] != new[k]):
        mix = dict(old)
        if path in new:
            mix[path] = new[path]
        else:
            del mix[path]
        with pytest.raises(AssertionError, match="SAFETY RULE 2 VIOLATED"):
            judge(mix, old, new, path)
    off = dict(new)
    off["mt"] = (*off["mt"][:2], off["mt"][2] + 1, *off["mt"][3:])
    with pytest.raises(AssertionError, match="mt:"):
        judge(off, old, new, "one ns")


# --- the local scenario ----------------------------------------------------------------------


@dataclass
class Case:
    repo: str
    old_id: str
    new_id: str
    base: Path  # the target holding the old snapshot (restored by drsync)
    old: dict[str, Any]
    new: dict[str, Any]
    work: Path


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    d = Driver(str(tmp_path_factory.mktemp("driver") / "driver.log"), str(ROOT))
    yield d
    d.close()


def make_case(tmp: Path, *, links: bool) -> tuple[str, str, str]:
    """A repository with the old and the new tree captured by drsync: (repo, old id, new id)."""
    repo_url = str(tmp / "repo")
    repo = engine.init_repository(repo_url, cluster_id="east", release="1")
    old_spec, new_spec = versions(links)
    src = tmp / "src"
    build(src, old_spec)
    assert local_state(src) == expected_local(old_spec)
    old_id = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    remove_tree(src)
    build(src, new_spec)
    assert local_state(src) == expected_local(new_spec)
    new_id = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    return repo_url, old_id, new_id


@pytest.fixture(scope="module")
def local_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("local-case")
    repo_url, old_id, new_id = make_case(tmp, links=True)
    old_spec, new_spec = versions(links=True)
    base = tmp / "base"
    engine.restore_snapshot(engine.open_repository(repo_url), old_id, str(base), cluster_id="east", release="1")
    case = Case(repo_url, old_id, new_id, base, expected_local(old_spec), expected_local(new_spec), tmp)
    assert local_state(base) == case.old, "the restored old snapshot is not exactly the old tree"
    assert not (base / STAGING).exists()
    return case


def apply_job(case: Case, target: str, journal: str | None, kill_at: int, work: Path) -> dict[str, Any]:
    return {"op": "apply", "repo": case.repo, "snapshot": case.new_id, "target": target, "journal": journal,
            "kill_at": kill_at, "count_file": str(work / "count.json") if kill_at == 0 else None,
            "note_file": str(work / "note.txt")}


def count_steps(driver: Driver, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` to completion (no kill) and return the counts it wrote."""
    assert job["kill_at"] == 0 and job["count_file"]
    if os.path.exists(job["count_file"]):
        os.unlink(job["count_file"])
    res = driver.run(job)
    assert res["signal"] is None and res["code"] == 0, f"the uninterrupted run failed: {res} (see driver.log)"
    with open(job["count_file"]) as f:
        return json.load(f)


def killed(driver: Driver, job: dict[str, Any]) -> str:
    """Run ``job``, check that it died by SIGKILL, and say at which step."""
    note = Path(job["note_file"])
    note.unlink(missing_ok=True)
    res = driver.run(job)
    assert res["signal"] == KILLED, f"expected a death by SIGKILL at step {job['kill_at']}, got {res}"
    return note.read_text().strip()


def staging_left(target: Path) -> list[str]:
    s = target / STAGING
    return sorted(p.relative_to(target).as_posix() for p in [s, *s.rglob("*")]) if s.exists() else []


@pytest.mark.parametrize("journal_kind", ["standby", "in-root"])
def test_kill_9_at_every_step_of_a_local_commit(driver: Driver, local_case: Case, tmp_path: Path,
                                                journal_kind: str) -> None:
    """``standby``: the journal in a state directory (the agent's apply); ``in-root``: a restore's
    journal kept in ``<root>/.drsync-staging``. Recovery is ``recover_apply``, as at agent start."""
    case = local_case

    def journal_for(name: str) -> str | None:
        return str(tmp_path / f"{name}.journal") if journal_kind == "standby" else None

    full = tmp_path / "full"
    copy_tree(case.base, full)
    counts = count_steps(driver, apply_job(case, str(full), journal_for("full"), 0, tmp_path))
    assert local_state(full) == case.new, "the uninterrupted apply did not produce the new snapshot"
    assert staging_left(full) == [] and not os.path.exists(str(tmp_path / "full.journal"))
    total = counts["total"]
    assert counts["applies"] == 1 and counts["commit"] >= 40, counts
    remove_tree(full)

    mixed = 0
    for n in range(1, total + 1):
        target = tmp_path / f"t{n}"
        copy_tree(case.base, target)
        journal = journal_for(f"t{n}")
        step = killed(driver, apply_job(case, str(target), journal, n, tmp_path))
        label = f"{journal_kind} journal, killed before {step}"
        crashed = local_state(target)
        if crashed not in (case.old, case.new):
            mixed += 1
        pending = os.path.exists(journal or str(target / STAGING / "journal.json"))
        # Only a kill after the journal's removal (the last steps) leaves nothing to replay.
        assert recover_apply(str(target), journal) is pending, f"{label}: recovery returned {not pending}"
        outcome = judge(local_state(target), case.old, case.new, label)
        assert outcome == "new", f"{label}: the journal was written before the commit, yet recovery rolled back"
        assert staging_left(target) == [], f"{label}: recovery left {staging_left(target)}"
        assert journal is None or not os.path.exists(journal), f"{label}: recovery left the journal"
        # A second recovery has nothing to do and changes nothing.
        assert recover_apply(str(target), journal) is False
        assert local_state(target) == case.new
        remove_tree(target)
    # The kills really landed inside the commit: most crashed trees were a mix before recovery.
    assert mixed >= counts["commit"] // 2, f"only {mixed} of {total} crashed trees were mixed before recovery"
    print(f"local commit ({journal_kind} journal): {total} steps ({counts['commit']} commit, "
          f"{counts['close']} close), every one killed and recovered; {mixed} crashed trees were mixed")


def second_level_points(commit: int, total: int) -> list[int]:
    """Where to kill the apply before killing its recovery: all of them with DRSYNC_RELIABILITY=full."""
    if FULL:
        return list(range(1, total + 1))
    return sorted({1, commit // 3, (2 * commit) // 3, commit, commit + 1, total})


def test_kill_9_during_recovery_at_every_step_then_recover_again(driver: Driver, local_case: Case,
                                                                 tmp_path: Path) -> None:
    """A crash during recovery: the recovery is killed at each of its own steps, then run again."""
    case = local_case
    full = tmp_path / "full"
    copy_tree(case.base, full)
    counts = count_steps(driver, apply_job(case, str(full), str(tmp_path / "full.journal"), 0, tmp_path))
    remove_tree(full)
    trials = 0
    for n in second_level_points(counts["commit"], counts["total"]):
        crashed, journal = tmp_path / f"crashed-{n}", tmp_path / f"crashed-{n}.journal"
        copy_tree(case.base, crashed)
        step = killed(driver, apply_job(case, str(crashed), str(journal), n, tmp_path))
        saved_journal = journal.read_bytes()
        # How many steps its recovery takes.
        probe = tmp_path / "probe"
        copy_tree(crashed, probe)
        probe_journal = tmp_path / "probe.journal"
        probe_journal.write_bytes(saved_journal)
        rec = count_steps(driver, {"op": "recover", "target": str(probe), "journal": str(probe_journal),
                                   "kill_at": 0, "count_file": str(tmp_path / "count.json")})
        assert local_state(probe) == case.new
        remove_tree(probe)
        assert rec["total"] >= 1
        for m in range(1, rec["total"] + 1):
            target, tj = tmp_path / f"t{n}-{m}", tmp_path / f"t{n}-{m}.journal"
            copy_tree(crashed, target)
            tj.write_bytes(saved_journal)
            rstep = killed(driver, {"op": "recover", "target": str(target), "journal": str(tj), "kill_at": m,
                                    "note_file": str(tmp_path / "note.txt")})
            label = f"apply killed before {step}; its recovery killed before {rstep}"
            assert recover_apply(str(target), str(tj)) is True, f"{label}: the second recovery found nothing"
            assert judge(local_state(target), case.old, case.new, label) == "new", label
            assert staging_left(target) == [] and not tj.exists(), f"{label}: left {staging_left(target)}"
            remove_tree(target)
            tj.unlink(missing_ok=True)
            trials += 1
        remove_tree(crashed)
    print(f"recovery killed at each of its steps after {len(second_level_points(counts['commit'], counts['total']))}"
          f" apply kill points: {trials} trials")


def test_interrupted_restore_is_completed_by_the_next_real_restore(driver: Driver, local_case: Case,
                                                                   tmp_path: Path) -> None:
    """A restore (journal in the root's staging area) killed mid-commit; the next real ``drsync snapshot
    restore`` onto the target completes it first, then restores what it was asked (here: the old one)."""
    case = local_case
    full = tmp_path / "full"
    copy_tree(case.base, full)
    counts = count_steps(driver, apply_job(case, str(full), None, 0, tmp_path))
    remove_tree(full)
    points = range(1, counts["total"] + 1) if FULL else sorted({counts["commit"] // 2, counts["commit"] + 1})
    for n in points:
        target = tmp_path / f"t{n}"
        copy_tree(case.base, target)
        step = killed(driver, apply_job(case, str(target), None, n, tmp_path))
        assert (target / STAGING / "journal.json").exists()
        r = run_drsync("snapshot", "restore", case.old_id, "--repo", case.repo, "--target", target, "--json")
        assert r.code == 0, f"killed before {step}: {r.err}"
        judge(local_state(target), case.old, case.new, f"restore after a kill before {step}")
        assert local_state(target) == case.old, f"killed before {step}: the restore did not end at its snapshot"
        assert staging_left(target) == []
        remove_tree(target)


# --- HDFS ----------------------------------------------------------------------------------


def hdfs_state(cluster: Any, path: str) -> dict[str, tuple[Any, ...]]:
    """The namespace below ``path`` as the server keeps it (all HDFS has: type, permission, ms mtime,
    bytes), except the top-level staging area."""
    out: dict[str, tuple[Any, ...]] = {}
    with cluster.lock:
        stack = [("", cluster._resolve(path))]
        while stack:
            rel, node = stack.pop()
            for name, child in node.children.items():
                if not rel and name == STAGING:
                    continue
                r = f"{rel}/{name}" if rel else name
                if child.type == "DIRECTORY":
                    out[r] = ("dir", child.permission, child.mtime_ms)
                    stack.append((r, child))
                elif child.type == "FILE":
                    out[r] = ("file", child.permission, child.mtime_ms, cluster._read(child, 0, None))
                else:
                    out[r] = ("link", child.symlink, child.mtime_ms)
    return out


def hdfs_copy(cluster: Any, src: str, dst: str) -> None:
    """``hdfs dfs -cp -p`` as the server's administrator: the same tree under new inode ids (file
    bytes are immutable on the server, so copies share them)."""
    with cluster.lock:
        clone = copy.deepcopy(cluster._resolve(src))
        stack = [clone]
        while stack:
            node = stack.pop()
            node.file_id = next(cluster._ids)
            stack.extend(node.children.values())
        parent, name = cluster._parent(dst)
        assert name not in parent.children
        parent.children[name] = clone


def hdfs_staging_left(cluster: Any, path: str) -> bool:
    with cluster.lock:
        return STAGING in cluster._resolve(path).children


def test_kill_9_at_every_step_of_an_hdfs_commit(driver: Driver, webhdfs: Any, tmp_path: Path) -> None:
    """The same on an HDFS target (no symlinks there). The killed child talks WebHDFS to the server in
    the pytest process; one commit worker, so that no call is in flight when it dies and each N is one
    exact point in the sequence of namenode calls."""
    repo_url, old_id, new_id = make_case(tmp_path, links=False)
    old_spec, new_spec = versions(links=False)
    old, new = expected_hdfs(old_spec), expected_hdfs(new_spec)
    c = webhdfs
    base = f"{c.test_dir}/base"
    engine.restore_snapshot(engine.open_repository(repo_url), old_id, c.url(base), cluster_id="east", release="1")
    assert hdfs_state(c, base) == old, "the old snapshot restored onto HDFS is not exactly the old tree"
    case = Case(repo_url, old_id, new_id, tmp_path, old, new, tmp_path)

    def job(name: str, kill_at: int) -> dict[str, Any]:
        return {**apply_job(case, c.url(f"{c.test_dir}/{name}"), str(tmp_path / f"{name}.journal"), kill_at,
                            tmp_path), "hdfs_workers": 1}

    hdfs_copy(c, base, f"{c.test_dir}/full")
    counts = count_steps(driver, job("full", 0))
    assert hdfs_state(c, f"{c.test_dir}/full") == new, "the uninterrupted apply did not produce the new snapshot"
    assert not hdfs_staging_left(c, f"{c.test_dir}/full")
    total = counts["total"]
    assert counts["applies"] == 1 and counts["commit"] >= 25, counts
    mixed = 0
    for n in range(1, total + 1):
        name = f"t{n}"
        hdfs_copy(c, base, f"{c.test_dir}/{name}")
        step = killed(driver, job(name, n))
        label = f"HDFS, killed before {step}"
        if hdfs_state(c, f"{c.test_dir}/{name}") not in (old, new):
            mixed += 1
        journal = str(tmp_path / f"{name}.journal")
        assert recover_apply(c.url(f"{c.test_dir}/{name}"), journal) is True, f"{label}: nothing recovered"
        outcome = judge(hdfs_state(c, f"{c.test_dir}/{name}"), old, new, label)
        assert outcome == "new", f"{label}: the journal was written before the commit, yet recovery rolled back"
        assert not hdfs_staging_left(c, f"{c.test_dir}/{name}"), f"{label}: recovery left the staging area"
        assert not os.path.exists(journal)
    assert mixed >= counts["commit"] // 2, f"only {mixed} of {total} crashed trees were mixed before recovery"
    # Recovery killed too, at each of its steps, after a kill in the middle of the commit.
    n = counts["commit"] // 2
    hdfs_copy(c, base, f"{c.test_dir}/crashed")
    step = killed(driver, job("crashed", n))
    saved = (tmp_path / "crashed.journal").read_bytes()
    hdfs_copy(c, f"{c.test_dir}/crashed", f"{c.test_dir}/probe")
    (tmp_path / "probe.journal").write_bytes(saved)
    rec = count_steps(driver, {"op": "recover", "target": c.url(f"{c.test_dir}/probe"),
                               "journal": str(tmp_path / "probe.journal"), "kill_at": 0, "hdfs_workers": 1,
                               "count_file": str(tmp_path / "count.json")})
    assert hdfs_state(c, f"{c.test_dir}/probe") == new
    for m in range(1, rec["total"] + 1):
        name = f"r{m}"
        hdfs_copy(c, f"{c.test_dir}/crashed", f"{c.test_dir}/{name}")
        (tmp_path / f"{name}.journal").write_bytes(saved)
        rstep = killed(driver, {"op": "recover", "target": c.url(f"{c.test_dir}/{name}"), "hdfs_workers": 1,
                                "journal": str(tmp_path / f"{name}.journal"), "kill_at": m,
                                "note_file": str(tmp_path / "note.txt")})
        label = f"HDFS, apply killed before {step}; its recovery killed before {rstep}"
        assert recover_apply(c.url(f"{c.test_dir}/{name}"), str(tmp_path / f"{name}.journal")) is True, label
        assert judge(hdfs_state(c, f"{c.test_dir}/{name}"), old, new, label) == "new", label
        assert not hdfs_staging_left(c, f"{c.test_dir}/{name}"), label
    print(f"HDFS commit: {total} steps ({counts['commit']} commit, {counts['close']} close), every one killed "
          f"and recovered; {mixed} mixed before recovery; recovery after step {n} killed at each of its "
          f"{rec['total']} steps")


# --- a real standby agent ----------------------------------------------------------------------


def test_kill_9_standby_agent_at_steps_of_its_commit(tmp_path: Path) -> None:
    """A real standby agent, started through the driver, killed -9 at a step of its commit, then
    restarted normally: its root is the previous or the new snapshot (the one it records as
    applied) and replication goes on. A few steps normally; every step with DRSYNC_RELIABILITY=full."""
    from drsync.transport.grpc import GrpcStandbyLink
    from tests.test_agents import Pair, wait_for

    specs = dict(zip("AB", versions(links=True), strict=True))
    want = {k: expected_local(v) for k, v in specs.items()}
    pair = Pair(tmp_path)
    try:
        def set_production(version: str) -> None:
            remove_tree(pair.prod)
            build(pair.prod, specs[version])

        def start_standby(kill_at: int) -> subprocess.Popen[bytes]:
            count = tmp_path / "count.json"
            count.unlink(missing_ok=True)
            with open(tmp_path / "standby.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.crashdriver", "agent", "--kill-at", str(kill_at),
                     "--count-file", str(count), "--note-file", str(tmp_path / "note.txt"), "--",
                     "agent", "--config", str(pair.standby_cfg)], cwd=ROOT, stdout=log, stderr=log)
            pair.procs["standby"] = proc
            link = GrpcStandbyLink(pair.standby_addr)
            try:
                wait_for(link.health, "the standby agent (through the crash driver) to serve")
            finally:
                link.close()
            return proc

        def stop(name: str) -> None:
            pair.kill(name, signal.SIGTERM)

        # The standby holds A.
        set_production("A")
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first shipment")
        stop("primary")
        stop("standby")
        assert local_state(pair.standby_data) == want["A"]
        held = "A"

        def ship(to: str, kill_at: int) -> subprocess.Popen[bytes]:
            set_production(to)
            proc = start_standby(kill_at)
            pair.start("primary")
            return proc

        # Each direction's steps, counted by an agent that is not killed.
        counts: dict[str, dict[str, Any]] = {}
        for to in ("B", "A"):
            proc = ship(to, 0)
            wait_for(lambda: (tmp_path / "count.json").exists() and pair.in_sync(), f"the standby to apply {to}")
            stop("primary")
            stop("standby")
            assert proc.returncode == 0
            counts[to] = json.loads((tmp_path / "count.json").read_text())
            assert counts[to]["applies"] == 1, counts[to]
            assert local_state(pair.standby_data) == want[to]
            held = to
        assert held == "A"

        if FULL:
            points = {to: list(range(1, counts[to]["total"] + 1)) for to in ("B", "A")}
        else:
            points = {"B": [1, counts["B"]["commit"]], "A": [counts["A"]["commit"] // 2]}
        trials = [(to, points[to][i]) for i in range(max(map(len, points.values()))) for to in ("B", "A")
                  if i < len(points[to])]
        for to, n in trials:
            if held == to:  # ship the other version first, without a kill
                ship("A" if to == "B" else "B", 0)
                wait_for(pair.in_sync, "a plain shipment")
                stop("primary")
                stop("standby")
                held = "A" if to == "B" else "B"
            proc = ship(to, n)
            wait_for(lambda proc=proc: proc.poll() is not None, f"the standby to die at step {n} of applying {to}")
            del pair.procs["standby"]
            assert proc.returncode == -KILLED, f"the standby ended with {proc.returncode}, not by SIGKILL"
            step = (tmp_path / "note.txt").read_text().strip()
            label = f"agent applying {held}->{to}, killed before {step}"
            stop("primary")
            pair.start("standby")  # recovers before it serves
            outcome = judge(local_state(pair.standby_data), want[held], want[to], label)
            assert outcome == to, f"{label}: recovery rolled back"
            assert staging_left(pair.standby_data) == [], f"{label}: left {staging_left(pair.standby_data)}"
            pair.assert_root_is_applied_snapshot(f"{to}-{n}")
            held = to
            stop("standby")
        # The pair goes on replicating: a later change arrives.
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to hold production after the kills")
        (pair.prod / "keep" / "later.txt").write_bytes(b"written after the kills\n")
        wait_for(pair.in_sync, "a later change to arrive")
        print(f"agent: steps {counts['B']['total']} (A->B), {counts['A']['total']} (B->A); killed at {trials}")
    finally:
        pair.stop_all()
