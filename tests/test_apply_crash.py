"""Safety rule 2 (atomic apply): a real kill -9 at EVERY mutating step of an apply.

One apply mixes every kind of change (see :func:`versions`): content changed, file added and
removed, directory added and removed with children, file -> directory, directory -> file,
file -> symlink, symlink -> file, directory -> symlink, symlink -> directory, a retargeted
symlink, a mode-only change, a directory's mtime-only change, a new empty directory, a type
change at depth (``a/b/c`` file -> directory below a read-only ``a``), a 0o555 directory that
loses a file and gains one, a removed read-only directory, and an unchanged directory its owner
may not list (0o300). The snapshots come from a real repository; the target starts as the old one.

``tests/crashdriver.py`` applies the new snapshot in a forked child as the standby does (with a
journal) and sends it SIGKILL right before its N-th mutating call: while it prepares (scan,
staging, the journal's "commit" record), while it commits, or while it closes (the journal's
"done", the staging area's removal). A run without a kill counts the steps; then every N is
tried on a fresh copy of the target. After each kill the target is recovered (``recover_apply``,
what the standby agent runs at start; or a real ``drsync snapshot restore``) and must equal
EXACTLY the old snapshot (killed before the journal's "commit" record) or the new one (after it):
types, bytes, modes, owners, nanosecond mtimes of files, directories and links, link targets,
empty directories; with no ``.drsync-staging`` and no journal left. Every violation is collected,
so a failing test names all of its steps at once.

Also: as another user than root (``nobody``), with a filesystem mounted inside the target, the
recovery itself killed at each of its steps, the same on a real HDFS target (the mini cluster's
JVM, never the killed process), and a real standby agent killed at steps
of its commit and restarted (all steps with ``DRSYNC_RELIABILITY=full``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
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
NOBODY = 65534
AM_ROOT = os.geteuid() == 0

# --- the scenario -------------------------------------------------------------------------

# A spec entry: ("dir", mode, mtime_ns) | ("file", mode, mtime_ns, bytes) | ("link", target, mtime_ns)
Spec = dict[str, tuple[Any, ...]]
State = dict[str, tuple[Any, ...]]


def T(k: int) -> int:
    """A distinct past mtime with a nanosecond part (HDFS keeps only the milliseconds)."""
    return 1_600_000_000_000_000_000 + k * 1_000_003_000 + 123_456_789


def d(k: int, mode: int = 0o755) -> tuple[Any, ...]:
    return ("dir", mode, T(k))


def f(k: int, data: bytes, mode: int = 0o644) -> tuple[Any, ...]:
    return ("file", mode, T(k), data)


def ln(k: int, target: str) -> tuple[Any, ...]:
    return ("link", target, T(k))


def versions(hdfs: bool = False, deep_f2d: bool = True) -> tuple[Spec, Spec]:
    """The old and the new snapshot's trees; entries the same in both are unchanged by the apply.
    ``hdfs``: without what HDFS cannot hold or drsync cannot read there (symlinks, an unlistable
    directory). ``deep_f2d``: the file that becomes a directory gets a subdirectory too (which a
    non-root apply cannot do yet: see test_a_file_becomes_a_directory_with_a_subdirectory_as_nobody)."""
    same: Spec = {
        "keep": d(1), "keep/stay.txt": f(2, b"unchanged\n"),
        "mt/f.txt": f(3, b"inside a directory whose mtime alone changes\n"),
        "a": d(4, 0o555), "a/b": d(5),  # a/b keeps its mtime although its child changes type
        "ro/stays.txt": f(6, b"in a read-only directory\n"),
        "big.bin": f(7, bytes(range(256)) * 300),
    }
    old: Spec = {
        **same,
        "changed.txt": f(10, b"old content\n"),
        "removed.txt": f(11, b"goes away\n"),
        "olddir": d(12, 0o555), "olddir/a.txt": f(13, b"a\n"), "olddir/deep": d(14, 0o555),
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
        "f2d": d(36), "f2d/inner.txt": f(37, b"inner\n"),
        "d2f": f(40, b"a directory that became a file\n"),
        "modeonly.txt": f(21, b"only the mode changes\n", 0o600),
        "mt": d(41),
        "emptynew": d(42, 0o750), "emptynew/deeper": d(43),
        "a/b/c": d(44), "a/b/c/d.txt": f(45, b"d\n"),
        "ro": d(46, 0o555), "ro/new.txt": f(47, b"added to a read-only directory\n"),
    }
    if deep_f2d:
        new.update({"f2d/sub": d(38), "f2d/sub/z.txt": f(39, b"z\n")})
    if not hdfs:
        unlistable: Spec = {"locked": d(8, 0o300), "locked/secret.txt": f(9, b"its owner may not list it\n")}
        old.update({
            **unlistable,
            "f2l": f(50, b"a file that becomes a link\n"),
            "l2f": ln(51, "keep/stay.txt"),
            "d2l": d(52), "d2l/k.txt": f(53, b"k\n"),
            "l2d": ln(54, "keep"),
            "retarget": ln(55, "changed.txt"),
            "samelink": ln(56, "a/b"),
        })
        new.update({
            **unlistable,
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


def expected_local(spec: Spec, owner: tuple[int, int] | None = None) -> State:
    uid, gid = owner or (os.getuid(), os.getgid())
    out: State = {}
    for path, e in spec.items():
        if e[0] == "file":
            out[path] = ("file", e[1], e[2], uid, gid, e[3])
        elif e[0] == "dir":
            out[path] = ("dir", e[1], e[2], uid, gid)
        else:
            out[path] = ("link", e[1], e[2], uid, gid)
    return out


def expected_hdfs(spec: Spec) -> State:
    """What :func:`hdfs_state` reads for a spec (bytes as their SHA-256, as the real cluster reports them)."""
    out: State = {}
    for path, e in spec.items():
        if e[0] == "file":
            out[path] = ("file", e[1], e[2] // 1_000_000, hashlib.sha256(e[3]).hexdigest())
        elif e[0] == "dir":
            out[path] = ("dir", e[1], e[2] // 1_000_000)
    return out


# --- local trees: exact state, copy, removal -----------------------------------------------


def local_state(root: Path) -> State:
    """Everything below ``root`` except its top-level staging area: type, mode, owner, mtime (ns),
    bytes or link target. Fifos, sockets and devices show as "other". (Read as root: directories
    their owner may not list are read all the same.)"""
    out: State = {}

    def walk(dir_: Path, rel: str) -> None:
        for name in sorted(os.listdir(dir_)):
            if not rel and name == STAGING:
                continue
            p, r = dir_ / name, f"{rel}/{name}" if rel else name
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


def copy_tree(src: Path, dst: Path, owner: tuple[int, int] | None = None, *, into: bool = False) -> None:
    """An exact copy (modes, ns mtimes of everything, links as links), made in name order; owned by
    ``owner`` if given (else as the source). ``into``: ``dst`` exists already (a mount point)."""
    s = os.lstat(src)
    if not into:
        os.mkdir(dst, 0o700)
    for name in sorted(os.listdir(src)):
        a, b = src / name, dst / name
        sa = os.lstat(a)
        if stat.S_ISDIR(sa.st_mode):
            copy_tree(a, b, owner)
            continue
        if stat.S_ISLNK(sa.st_mode):
            os.symlink(os.readlink(a), b)
        else:
            shutil.copyfile(a, b, follow_symlinks=False)
            os.chmod(b, stat.S_IMODE(sa.st_mode))
        if AM_ROOT:
            os.chown(b, *(owner or (sa.st_uid, sa.st_gid)), follow_symlinks=False)
        os.utime(b, ns=(sa.st_atime_ns, sa.st_mtime_ns), follow_symlinks=False)
    if AM_ROOT:
        os.chown(dst, *(owner or (s.st_uid, s.st_gid)))
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


def staging_left(target: Path) -> list[str]:
    s = target / STAGING
    return sorted(p.relative_to(target).as_posix() for p in [s, *s.rglob("*")]) if s.exists() else []


# --- judging a state ------------------------------------------------------------------------


def _differences(state: State, want: State, limit: int = 6) -> str:
    keys = sorted(set(state) | set(want))
    bad = [k for k in keys if state.get(k) != want.get(k)]

    def show(v: Any) -> str:
        if v is None:
            return "absent"
        return repr(tuple(x[:24] + b"..." if isinstance(x, bytes) and len(x) > 24 else x for x in v))

    lines = [f"      {k}: {show(state.get(k))} (expected {show(want.get(k))})" for k in bad[:limit]]
    more = f"\n      ... {len(bad) - limit} more" if len(bad) > limit else ""
    return "\n".join(lines) + more


def judge(state: State, old: State, new: State, label: str) -> str:
    """'old' or 'new'; anything else is a violation of safety rule 2, named path by path."""
    if state == new:
        return "new"
    if state == old:
        return "old"
    far = {k for k in set(state) | set(new) if state.get(k) != new.get(k)}
    near_old = {k for k in set(state) | set(old) if state.get(k) != old.get(k)}
    name, want, other = ("old", old, len(far)) if len(near_old) < len(far) else ("new", new, len(near_old))
    raise AssertionError(f"SAFETY RULE 2 VIOLATED ({label}): the target is neither the old snapshot nor the new "
                         f"one; it is nearest the {name} one, which it differs from in:\n"
                         f"{_differences(state, want)}\n    (and from the other snapshot in {other} paths)")


class Violations:
    """Every broken expectation of a test, reported together at its end."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def recovered(self, label: str, recover: Any, *args: Any) -> Any:
        """Run a recovery; one that raises is a violation (the target stays broken), not the end of
        the test: the remaining steps are still tried. Returns what it returned, or None."""
        try:
            return recover(*args)
        except Exception as e:
            self.items.append(f"{label}: the recovery failed: {type(e).__name__}: {e}")
            return None

    def judge(self, state: State, old: State, new: State, label: str, want: str) -> None:
        try:
            outcome = judge(state, old, new, label)
        except AssertionError as e:
            self.items.append(str(e))
            return
        self.check(outcome == want, f"{label}: the target is the {outcome} snapshot, expected the {want} one "
                                    f"(the journal's 'commit' record decides)")

    def assert_none(self, what: str) -> None:
        if self.items:
            raise AssertionError(f"{len(self.items)} violation(s) {what}:\n" + "\n".join(self.items))


def test_the_judge_tells_a_mix_from_either_snapshot() -> None:
    """The comparison can fail: one path of the new snapshot in the old tree, or one nanosecond off."""
    old_spec, new_spec = versions()
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
    v = Violations()
    v.judge(old, old, new, "x", "new")
    with pytest.raises(AssertionError, match="the old snapshot, expected the new"):
        v.assert_none("")


# --- the local scenario ----------------------------------------------------------------------


@dataclass
class Case:
    repo: str
    old_id: str
    new_id: str
    base: Path  # the target holding the old snapshot (restored by drsync)
    old_spec: Spec
    new_spec: Spec
    open_dir: Path  # a directory every user can reach


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    d = Driver(str(tmp_path_factory.mktemp("driver") / "driver.log"), str(ROOT))
    yield d
    d.close()


def scratch_dir() -> Path:
    """Scratch space every user can reach (pytest's own is private to root), for runs as nobody. On a
    tmpfs when there is one: a kill -9 loses no page cache, so what the trials check does not depend on
    the disk, and thousands of fsyncs and syncfs calls then cost nothing (on a disk other processes
    write to, each one waits for their data too)."""
    shm = "/dev/shm"
    usable = os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)
    base = Path(tempfile.mkdtemp(prefix="drsync-apply-crash-", dir=shm if usable else None))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="module")
def open_dir() -> Iterator[Path]:
    base = scratch_dir()
    yield base
    remove_tree(base)


def make_case(tmp: Path, old_spec: Spec, new_spec: Spec) -> tuple[str, str, str]:
    """A repository with the old and the new tree captured by drsync: (repo, old id, new id)."""
    repo_url = str(tmp / "repo")
    repo = engine.init_repository(repo_url, cluster_id="east", release="1")
    src = tmp / "src"
    build(src, old_spec)
    assert local_state(src) == expected_local(old_spec)
    old_id = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    remove_tree(src)
    build(src, new_spec)
    assert local_state(src) == expected_local(new_spec)
    new_id = engine.create_snapshot(repo, engine.SnapshotRequest(str(src))).id
    remove_tree(src)
    subprocess.run(["chmod", "-R", "a+rX", repo_url], check=True)  # readable by nobody
    return repo_url, old_id, new_id


@pytest.fixture(scope="module")
def local_case(open_dir: Path) -> Case:
    tmp = open_dir / "case"
    tmp.mkdir()
    old_spec, new_spec = versions()
    repo_url, old_id, new_id = make_case(tmp, old_spec, new_spec)
    base = tmp / "base"
    engine.restore_snapshot(engine.open_repository(repo_url), old_id, str(base), cluster_id="east", release="1")
    assert local_state(base) == expected_local(old_spec), "the restored old snapshot is not exactly the old tree"
    assert not (base / STAGING).exists()
    return Case(repo_url, old_id, new_id, base, old_spec, new_spec, open_dir)


def apply_job(repo: str, snapshot: str, target: str, journal: str | None, kill_at: int, work: Path,
              **extra: Any) -> dict[str, Any]:
    return {"op": "apply", "repo": repo, "snapshot": snapshot, "target": target, "journal": journal,
            "kill_at": kill_at, "count_file": str(work / "count.json") if kill_at == 0 else None,
            "note_file": str(work / "note.txt"), **extra}


def count_steps(driver: Driver, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` to completion (no kill) and return the counts it wrote."""
    assert job["kill_at"] == 0 and job["count_file"]
    if os.path.exists(job["count_file"]):
        os.unlink(job["count_file"])
    res = driver.run(job)
    assert res["signal"] is None and res["code"] == 0, f"the uninterrupted run failed: {res} (see driver.log)"
    with open(job["count_file"]) as fh:
        return json.load(fh)


def new_snapshot_steps(driver: Driver, case: Case, work: Path, journal: str | None) -> dict[str, Any]:
    """The steps of applying the case's new snapshot onto a copy of its base (run once, not killed: the
    counts a killed run is placed by), the copy removed afterwards."""
    full = work / "full"
    copy_tree(case.base, full)
    counts = count_steps(driver, apply_job(case.repo, case.new_id, str(full), journal, 0, work))
    remove_tree(full)
    return counts


def killed(driver: Driver, job: dict[str, Any]) -> str:
    """Run ``job``, check that it died by SIGKILL, and say at which step."""
    note = Path(job["note_file"])
    note.unlink(missing_ok=True)
    res = driver.run(job)
    assert res["signal"] == KILLED, f"expected a death by SIGKILL at step {job['kill_at']}, got {res}"
    return note.read_text().strip()


def summary(counts: dict[str, Any]) -> str:
    return (f"{counts['total']} steps ({counts['stage']} before the journal's commit record, {counts['commit']} "
            f"in the commit, {counts['close']} in the close)")


@pytest.fixture(scope="module")
def nobody_case(open_dir: Path) -> Case:
    """The scenario without a subdirectory below the file that becomes a directory: a non-root apply
    of that fails outright (test_a_file_becomes_a_directory_with_a_subdirectory_as_nobody), which would
    leave nothing of the crash trials to run as another user."""
    tmp = open_dir / "nobody-case"
    tmp.mkdir()
    old_spec, new_spec = versions(deep_f2d=False)
    repo_url, old_id, new_id = make_case(tmp, old_spec, new_spec)
    base = tmp / "base"
    engine.restore_snapshot(engine.open_repository(repo_url), old_id, str(base), cluster_id="east", release="1")
    assert local_state(base) == expected_local(old_spec)
    return Case(repo_url, old_id, new_id, base, old_spec, new_spec, open_dir)


@pytest.mark.parametrize(("user", "journal_kind"), [("owner", "standby"), ("nobody", "in-root")])
def test_kill_9_at_every_step_of_a_local_apply(driver: Driver, request: pytest.FixtureRequest, user: str,
                                               journal_kind: str) -> None:
    """``standby``: the journal in a state directory (the agent's apply); ``in-root``: a restore's
    journal in ``<root>/.drsync-staging``. ``owner``: the user running the tests owns the target;
    ``nobody``: an unprivileged user does (owners are not set, read-only and unlistable directories
    must be opened up). Recovery is ``recover_apply`` as that user, as at agent start."""
    who = (NOBODY, NOBODY) if user == "nobody" else None
    if who and not AM_ROOT:
        pytest.skip("running as another user needs root")
    case: Case = request.getfixturevalue("nobody_case" if who else "local_case")
    work = case.open_dir / f"{user}-{journal_kind}"
    work.mkdir()
    if who:
        os.chown(work, *who)
    as_user = {"uid": who[0], "gid": who[1]} if who else {}
    old, new = expected_local(case.old_spec, who), expected_local(case.new_spec, who)
    base = work / "base"
    copy_tree(case.base, base, who)
    assert local_state(base) == old

    def journal_for(name: str) -> str | None:
        return str(work / f"{name}.journal") if journal_kind == "standby" else None

    def recover(target: Path, journal: str | None) -> None:
        if who:
            res = driver.run({"op": "recover", "target": str(target), "journal": journal, "kill_at": 0, **as_user})
            if res["code"] != 0:
                log = Path(driver.log.name).read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"as {user}, exit {res['code']}: {log[-1] if log else ''}")
        else:
            recover_apply(str(target), journal)

    full = work / "full"
    copy_tree(base, full, who)
    counts = count_steps(driver, apply_job(case.repo, case.new_id, str(full), journal_for("full"), 0, work,
                                           **as_user))
    assert local_state(full) == new, "the uninterrupted apply did not produce the new snapshot"
    assert staging_left(full) == [] and not (work / "full.journal").exists()
    assert counts["applies"] == 1 and counts["commit"] >= 40, counts
    remove_tree(full)

    bad, mixed = Violations(), 0
    for n in range(1, counts["total"] + 1):
        target = work / f"t{n}"
        copy_tree(base, target, who)
        journal = journal_for(f"t{n}")
        step = killed(driver, apply_job(case.repo, case.new_id, str(target), journal, n, work, **as_user))
        label = f"{user}, {journal_kind} journal, killed before {step}"
        crashed = local_state(target)
        mixed += crashed not in (old, new)
        if n > counts["stage"]:
            bad.check(crashed == new or n <= counts["stage"] + counts["commit"],
                      f"{label}: the commit had returned, yet the tree was not the new snapshot")
        bad.recovered(label, recover, target, journal)
        bad.judge(local_state(target), old, new, label, "old" if n <= counts["stage"] else "new")
        bad.check(staging_left(target) == [], f"{label}: recovery left {staging_left(target)}")
        bad.check(journal is None or not os.path.exists(journal), f"{label}: recovery left the journal")
        if not who:  # a second recovery has nothing to do and changes nothing
            state = local_state(target)
            bad.check(bad.recovered(label, recover_apply, str(target), journal) is False
                      and local_state(target) == state, f"{label}: a second recovery did something")
        remove_tree(target)
    print(f"\nlocal apply as {user}, {journal_kind} journal: {summary(counts)}, every one killed and recovered; "
          f"{mixed} crashed trees were mixed before recovery")
    bad.assert_none(f"after a kill -9 of a local apply as {user} ({journal_kind} journal)")
    # The kills really landed inside the commit: most crashed trees were a mix before recovery.
    assert mixed >= counts["commit"] // 2, f"only {mixed} of {counts['total']} crashed trees were mixed"


def test_a_file_becomes_a_directory_with_a_subdirectory_as_nobody(driver: Driver, open_dir: Path) -> None:
    """A non-root apply (the agent running as the data's owner) where a file becomes a directory that
    holds a directory must succeed, as it does as root."""
    if not AM_ROOT:
        pytest.skip("running as another user needs root")
    work = open_dir / "f2d-nobody"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    old_spec: Spec = {"x": f(1, b"a file\n")}
    new_spec: Spec = {"x": d(2), "x/sub": d(3), "x/sub/y": f(4, b"y\n")}
    repo, old_id, new_id = make_case(work, old_spec, new_spec)
    target = work / "t"
    engine.restore_snapshot(engine.open_repository(repo), old_id, str(target), cluster_id="east", release="1")
    copy_tree(target, work / "mine", (NOBODY, NOBODY))
    res = driver.run(apply_job(repo, new_id, str(work / "mine"), None, 0, work, uid=NOBODY, gid=NOBODY))
    log = Path(driver.log.name).read_text(errors="replace").strip().splitlines()
    assert res["code"] == 0, (f"a non-root apply of 'x' file -> 'x/sub/y' fails (drsync/dataroot/local.py "
                              f"LocalDataRoot.check_plan stats x/sub through the file x): {log[-1]}")
    assert local_state(work / "mine") == expected_local(new_spec, (NOBODY, NOBODY))


def second_level_points(counts: dict[str, Any]) -> list[int]:
    """Where to kill the apply before killing its recovery (commit and close steps): all of them with
    DRSYNC_RELIABILITY=full."""
    s, c, total = counts["stage"], counts["commit"], counts["total"]
    if FULL:
        return list(range(s + 1, total + 1))
    return sorted({s + 1, s + c // 2, s + c, s + c + 2})


def test_kill_9_during_recovery_at_every_step_then_recover_again(driver: Driver, local_case: Case) -> None:
    """A crash during recovery: the recovery is killed at each of its own steps, then run again."""
    case = local_case
    old, new = expected_local(case.old_spec), expected_local(case.new_spec)
    work = case.open_dir / "second-level"
    work.mkdir()
    counts = new_snapshot_steps(driver, case, work, str(work / "full.journal"))
    bad, trials = Violations(), 0
    for n in second_level_points(counts):
        crashed, journal = work / f"crashed-{n}", work / f"crashed-{n}.journal"
        copy_tree(case.base, crashed)
        step = killed(driver, apply_job(case.repo, case.new_id, str(crashed), str(journal), n, work))
        saved_journal = journal.read_bytes()
        # How many steps its recovery takes (local staged paths are relative: a copy replays as well).
        probe, probe_journal = work / "probe", work / "probe.journal"
        copy_tree(crashed, probe)
        probe_journal.write_bytes(saved_journal)
        rec = count_steps(driver, {"op": "recover", "target": str(probe), "journal": str(probe_journal),
                                   "kill_at": 0, "count_file": str(work / "count.json")})
        assert local_state(probe) == new
        remove_tree(probe)
        for m in range(1, rec["total"] + 1):
            target, tj = work / f"t{n}-{m}", work / f"t{n}-{m}.journal"
            copy_tree(crashed, target)
            tj.write_bytes(saved_journal)
            rstep = killed(driver, {"op": "recover", "target": str(target), "journal": str(tj), "kill_at": m,
                                    "note_file": str(work / "note.txt")})
            label = f"apply killed before {step}; its recovery killed before {rstep}"
            bad.check(bad.recovered(label, recover_apply, str(target), str(tj)) is True,
                      f"{label}: the second recovery found nothing to complete")
            bad.judge(local_state(target), old, new, label, "new")
            bad.check(staging_left(target) == [] and not tj.exists(), f"{label}: left {staging_left(target)}")
            remove_tree(target)
            tj.unlink(missing_ok=True)
            trials += 1
        remove_tree(crashed)
    print(f"\nrecovery killed at each of its steps after apply kills at {second_level_points(counts)}: "
          f"{trials} trials")
    bad.assert_none("after a kill -9 of the recovery of a killed apply")


def test_interrupted_restore_is_completed_by_the_next_real_restore(driver: Driver, local_case: Case) -> None:
    """A restore (journal in the root's staging area) killed mid-commit; the next real ``drsync snapshot
    restore`` onto the target completes it first, then restores what it was asked (here: the old one)."""
    case = local_case
    old, new = expected_local(case.old_spec), expected_local(case.new_spec)
    work = case.open_dir / "real-restore"
    work.mkdir()
    counts = new_snapshot_steps(driver, case, work, None)
    s, c = counts["stage"], counts["commit"]
    points = range(s + 1, counts["total"] + 1) if FULL else sorted({s + c // 2, s + c + 1})
    for n in points:
        target = work / f"t{n}"
        copy_tree(case.base, target)
        step = killed(driver, apply_job(case.repo, case.new_id, str(target), None, n, work))
        # Until the close removes it, the journal is there for the next restore to complete.
        removed = any("os.unlink" in x and "journal.json" in x for x in counts["steps"][:n - 1])
        assert (target / STAGING / "journal.json").exists() is not removed, step
        r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra",
                       case.old_id, "--repo", case.repo, "--target", target, "--json")
        assert r.code == 0, f"killed before {step}: {r.err}"
        judge(local_state(target), old, new, f"restore after a kill before {step}")
        assert local_state(target) == old, f"killed before {step}: the restore did not end at its snapshot"
        assert staging_left(target) == []
        remove_tree(target)


# --- a filesystem mounted inside the target ------------------------------------------------------


def mount_versions() -> tuple[Spec, Spec]:
    """``vol`` is a mount point: changes inside it are staged on its own filesystem."""
    old: Spec = {"vol": d(1), "vol/f.txt": f(2, b"old on the mount\n"), "vol/gone.txt": f(3, b"removed\n"),
                 "vol/sub": d(4), "vol/sub/x": f(5, b"x\n"), "top.txt": f(6, b"old at the top\n")}
    new: Spec = {"vol": d(1), "vol/f.txt": f(12, b"new on the mount, longer\n"), "vol/added.txt": f(13, b"+\n"),
                 "vol/sub": d(4), "vol/sub/x": d(14), "vol/sub/x/y": f(15, b"y\n"),
                 "top.txt": f(16, b"new at the top\n")}
    return old, new


def _mount_tmpfs(path: Path) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_kill_9_at_every_step_with_a_mount_point_inside_the_target(driver: Driver, open_dir: Path) -> None:
    """The target holds a mount point (``vol``, a tmpfs of its own for each trial): the apply stages on
    it, and its directory is one of the snapshot's, whose mtime must end as the snapshot says."""
    work = open_dir / "mount"
    work.mkdir()
    old_spec, new_spec = mount_versions()
    repo, old_id, new_id = make_case(work, old_spec, new_spec)
    old, new = expected_local(old_spec), expected_local(new_spec)
    plain = work / "plain"  # the old snapshot, restored without a mount point
    engine.restore_snapshot(engine.open_repository(repo), old_id, str(plain), cluster_id="east", release="1")
    assert local_state(plain) == old
    mounted: list[Path] = []

    def target_with_mount(name: str) -> Path:
        t = work / name
        copy_tree(plain, t)
        _mount_tmpfs(t / "vol")
        mounted.append(t / "vol")
        copy_tree(plain / "vol", t / "vol", into=True)
        assert local_state(t) == old and os.stat(t / "vol").st_dev != os.stat(t).st_dev
        return t

    def drop(t: Path) -> None:
        subprocess.run(["umount", str(t / "vol")], check=True)
        mounted.remove(t / "vol")
        remove_tree(t)

    try:
        full = target_with_mount("full")
        counts = count_steps(driver, apply_job(repo, new_id, str(full), str(work / "full.journal"), 0, work))
        assert local_state(full) == new, "the uninterrupted apply did not produce the new snapshot"
        assert not (full / "vol" / STAGING).exists()
        drop(full)
        bad = Violations()
        for n in range(1, counts["total"] + 1):
            t = target_with_mount(f"t{n}")
            journal = work / f"t{n}.journal"
            step = killed(driver, apply_job(repo, new_id, str(t), str(journal), n, work))
            label = f"mount point in the target, killed before {step}"
            bad.recovered(label, recover_apply, str(t), str(journal))
            bad.judge(local_state(t), old, new, label, "old" if n <= counts["stage"] else "new")
            bad.check(staging_left(t) == [] and not (t / "vol" / STAGING).exists(), f"{label}: staging left")
            drop(t)
        print(f"\nmount point inside the target: {summary(counts)}, every one killed and recovered")
        bad.assert_none("after a kill -9 of an apply onto a target holding a mount point (the mount point "
                        "directory's mtime is the snapshot's, and must stay so)")
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", str(m)], check=False)


def test_a_failed_staging_leaves_a_mount_point_as_it_was(open_dir: Path) -> None:
    """Safety rule 5 beside rule 2: an apply that fails while staging (a damaged chunk) says "nothing was
    changed"; the mount point's directory, where it staged, must then keep its mtime."""
    from drsync.errors import IntegrityError

    work = open_dir / "mount-failed"
    work.mkdir()
    old_spec, new_spec = mount_versions()
    repo, old_id, new_id = make_case(work, old_spec, new_spec)
    r = engine.open_repository(repo)
    manifest = r.load_manifest(r.find_snapshot(new_id))
    fresh = next(e for e in manifest.entries() if e.path == "vol/added.txt")

    class Damaged:
        """The repository, but the chunk of one new file comes back damaged (as a bit flip would)."""

        def has_chunk(self, cid: bytes) -> bool:
            return r.has_chunk(cid)

        def read_chunk(self, cid: bytes) -> bytes:
            if cid in fresh.chunks:
                raise IntegrityError(f"chunk {cid.hex()[:16]} does not match its hash")
            return r.read_chunk(cid)

    t = work / "t"
    (t / "vol").mkdir(parents=True)
    _mount_tmpfs(t / "vol")
    try:
        engine.restore_snapshot(r, old_id, str(t), cluster_id="east", release="1")
        before = local_state(t)
        assert before == expected_local(old_spec)
        from drsync.apply import apply_manifest

        with pytest.raises(IntegrityError, match="nothing was changed"):
            apply_manifest(manifest, Damaged(), str(t), journal=str(work / "journal"))
        after = local_state(t)
        assert after == before, ("an apply that failed while staging, saying 'nothing was changed', changed the "
                                 f"target:\n{_differences(after, before)}")
    finally:
        subprocess.run(["umount", "-l", str(t / "vol")], check=False)


# --- HDFS ----------------------------------------------------------------------------------


def hdfs_state(cluster: Any, path: str) -> State:
    """The namespace below ``path`` as Hadoop's own client lists it (all HDFS has: type, permission,
    ms mtime, a digest of the bytes), except the top-level staging area."""
    out: State = {}
    for rel, e in cluster.tree(path).items():
        if rel == STAGING or rel.startswith(STAGING + "/"):
            continue
        if e["type"] == "dir":
            out[rel] = ("dir", e["mode"], e["mtime_ms"])
        elif e["type"] == "file":
            out[rel] = ("file", e["mode"], e["mtime_ms"], e["sha256"])
        else:
            out[rel] = ("link", None, e["mtime_ms"])
    return out


def hdfs_copy(cluster: Any, src: str, dst: str) -> None:
    """``hdfs dfs -cp -p`` as the superuser: the same tree under new inode ids."""
    cluster.copy(src, dst)


def hdfs_staging_left(cluster: Any, path: str) -> bool:
    return cluster.admin_fs.status(f"{path}/{STAGING}") is not None


def test_kill_9_at_every_step_of_an_hdfs_commit(driver: Driver, webhdfs: Any, open_dir: Path) -> None:
    """The same on an HDFS target (no symlinks there), at every step of the commit and the close (every
    sixth step in make test, all of them with DRSYNC_RELIABILITY=full). The
    killed child talks WebHDFS to the real mini cluster; one commit worker, so that no call
    is in flight when it dies and each N is one exact point in the sequence of namenode calls."""
    tmp_path = open_dir / "hdfs"
    tmp_path.mkdir()
    old_spec, new_spec = versions(hdfs=True)
    repo_url, old_id, new_id = make_case(tmp_path, old_spec, new_spec)
    old, new = expected_hdfs(old_spec), expected_hdfs(new_spec)
    c = webhdfs
    base = f"{c.test_dir}/base"
    engine.restore_snapshot(engine.open_repository(repo_url), old_id, c.url(base), cluster_id="east", release="1")
    assert hdfs_state(c, base) == old, "the old snapshot restored onto HDFS is not exactly the old tree"

    def job(name: str, kill_at: int) -> dict[str, Any]:
        return apply_job(repo_url, new_id, c.url(f"{c.test_dir}/{name}"), str(tmp_path / f"{name}.journal"),
                         kill_at, tmp_path, hdfs_workers=1)

    hdfs_copy(c, base, f"{c.test_dir}/full")
    counts = count_steps(driver, job("full", 0))
    assert hdfs_state(c, f"{c.test_dir}/full") == new, "the uninterrupted apply did not produce the new snapshot"
    assert not hdfs_staging_left(c, f"{c.test_dir}/full")
    assert counts["applies"] == 1 and counts["commit"] >= 25, counts
    first = counts["stage"] + 1  # the first step of the commit
    bad, mixed = Violations(), 0
    # Every step with DRSYNC_RELIABILITY=full (make reliability); every sixth one (and both ends) otherwise.
    last = counts["total"]
    steps = range(first, last + 1) if FULL else sorted(set(range(first, last + 1, 6)) | {first, last})
    for n in steps:
        name = f"t{n}"
        hdfs_copy(c, base, f"{c.test_dir}/{name}")
        step = killed(driver, job(name, n))
        label = f"HDFS, killed before {step}"
        mixed += hdfs_state(c, f"{c.test_dir}/{name}") not in (old, new)
        journal = str(tmp_path / f"{name}.journal")
        bad.check(bad.recovered(label, recover_apply, c.url(f"{c.test_dir}/{name}"), journal) is True,
                  f"{label}: nothing recovered")
        bad.judge(hdfs_state(c, f"{c.test_dir}/{name}"), old, new, label, "new")
        bad.check(not hdfs_staging_left(c, f"{c.test_dir}/{name}"), f"{label}: recovery left the staging area")
        bad.check(not os.path.exists(journal), f"{label}: recovery left the journal")
    # The recovery killed too, then recovery again. An HDFS journal names its staged files by absolute
    # path, so each trial makes its own crash rather than copying one.
    n = first + counts["commit"] // 2
    hdfs_copy(c, base, f"{c.test_dir}/probe")
    killed(driver, job("probe", n))
    rec = count_steps(driver, {"op": "recover", "target": c.url(f"{c.test_dir}/probe"), "hdfs_workers": 1,
                               "journal": str(tmp_path / "probe.journal"), "kill_at": 0,
                               "count_file": str(tmp_path / "count.json")})
    assert hdfs_state(c, f"{c.test_dir}/probe") == new
    ms = list(range(1, rec["total"] + 1)) if FULL else sorted({1, rec["total"] // 2, rec["total"]})
    for m in ms:
        name = f"r{m}"
        hdfs_copy(c, base, f"{c.test_dir}/{name}")
        step = killed(driver, job(name, n))
        rstep = killed(driver, {"op": "recover", "target": c.url(f"{c.test_dir}/{name}"), "hdfs_workers": 1,
                                "journal": str(tmp_path / f"{name}.journal"), "kill_at": m,
                                "note_file": str(tmp_path / "note.txt")})
        label = f"HDFS, apply killed before {step}; its recovery killed before {rstep}"
        bad.check(bad.recovered(label, recover_apply, c.url(f"{c.test_dir}/{name}"),
                                str(tmp_path / f"{name}.journal")) is True, f"{label}: nothing recovered")
        bad.judge(hdfs_state(c, f"{c.test_dir}/{name}"), old, new, label, "new")
        bad.check(not hdfs_staging_left(c, f"{c.test_dir}/{name}"), f"{label}: staging left")
    print(f"\nHDFS apply: {summary(counts)}; {len(steps)} of the {counts['total'] - first + 1} commit and close "
          f"steps killed and recovered ({mixed} trees mixed before recovery); the recovery after step {n} "
          f"({rec['total']} steps) killed at {ms}")
    bad.assert_none("after a kill -9 of an apply onto HDFS")
    in_commit = [k for k in steps if k < first + counts["commit"]]
    assert mixed >= len(in_commit) // 2, f"only {mixed} crashed trees were mixed before recovery"


# --- a real standby agent ----------------------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def agent_points(counts: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Where the agent is killed in each direction: every step with DRSYNC_RELIABILITY=full; otherwise
    the first step of a commit, one in its middle, and one in the close after the journal says "done"
    (before the agent records the snapshot as applied)."""
    if FULL:
        return {to: list(range(1, c["total"] + 1)) for to, c in counts.items()}
    b, a = counts["B"], counts["A"]
    done = next(i for i in range(b["stage"] + b["commit"], b["total"])
                if b["steps"][i].startswith(("close: os.rename", "close: os.replace")))
    return {"B": [b["stage"] + 1, done + 2], "A": [a["stage"] + a["commit"] // 2]}


def test_kill_9_standby_agent_at_steps_of_its_apply(tmp_path: Path) -> None:
    """A real standby agent, started through the crash driver, killed -9 at a step of the apply of a
    shipment (A -> B or B -> A, each mixing every kind of change), then restarted: its root is exactly the
    previous or the new snapshot, the one it records as applied, and replication goes on. Each restart
    is the next trial's agent (the driver neither counts nor kills its recovery at start); the last one
    is a plain ``drsync agent``. A few steps normally; every step with DRSYNC_RELIABILITY=full."""
    from drsync.transport.grpc import GrpcStandbyLink
    from tests.test_agents import Pair, wait_for

    specs = dict(zip("AB", versions(), strict=True))
    want = {k: expected_local(v) for k, v in specs.items()}
    count_file, note_file = tmp_path / "count.json", tmp_path / "note.txt"
    pair = Pair(tmp_path)

    def set_production(version: str) -> None:
        remove_tree(pair.prod)
        build(pair.prod, specs[version])

    def start_standby(kill_at: int | None) -> subprocess.Popen[bytes]:
        """Through the driver (kill_at None: a plain ``drsync agent``); returns once it serves."""
        if kill_at is None:
            pair.start("standby")
            return pair.procs["standby"]
        count_file.unlink(missing_ok=True)
        note_file.unlink(missing_ok=True)
        with open(tmp_path / "standby.log", "ab") as log:
            pair.procs["standby"] = subprocess.Popen(
                [sys.executable, "-m", "tests.crashdriver", "agent", "--kill-at", str(kill_at), "--count-file",
                 str(count_file), "--note-file", str(note_file), "--", "agent", "--config", str(pair.standby_cfg)],
                cwd=ROOT, stdout=log, stderr=log)
        # Wait for the port first: a gRPC channel whose first probe is refused backs off for a second.
        proc = pair.procs["standby"]
        wait_for(lambda: _accepts(pair.standby_port) or proc.poll() is not None,
                 "the standby agent (through the crash driver) to listen")
        if proc.poll() is not None:
            tail = (tmp_path / "standby.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise AssertionError(f"the standby agent exited with {proc.returncode} as it started: {tail}")
        link = GrpcStandbyLink(pair.standby_addr)
        try:
            wait_for(link.health, "the standby agent (through the crash driver) to serve")
        finally:
            link.close()
        return pair.procs["standby"]

    held = "A"  # the snapshot the standby's root holds (or held when it was killed)
    killed_in: tuple[str, str, str] | None = None  # (from, to, step) of the last kill
    bad = Violations()

    def restarted(kill_at: int | None) -> subprocess.Popen[bytes]:
        """Start the standby and check its root: after a kill, the previous or the new snapshot."""
        nonlocal held
        proc = start_standby(kill_at)
        state = local_state(pair.standby_data)
        if killed_in is None:
            assert state == want[held]
        else:
            frm, to, step = killed_in
            label = f"standby agent applying {frm} -> {to}, killed before {step}"
            bad.judge(state, want[frm], want[to], label, "old" if "(stage)" in step else "new")
            bad.check(staging_left(pair.standby_data) == [], f"{label}: left {staging_left(pair.standby_data)}")
            pair.assert_root_is_applied_snapshot(f"{to}-{step.split()[1]}")
            held = next((v for v in (frm, to) if state == want[v]), held)
        return proc

    def shipment(to: str, kill_at: int) -> dict[str, Any] | None:
        """Ship ``to`` from production to a standby killed at step ``kill_at`` (0: none; its counts)."""
        nonlocal held, killed_in
        proc = restarted(kill_at)
        if held == to:
            bad.assert_none("after a kill -9 of a standby agent")
            raise AssertionError(f"the standby holds {to} already: the shipment would have nothing to apply")
        set_production(to)
        pair.start("primary")
        counts = None
        if kill_at == 0:
            wait_for(lambda: count_file.exists() and pair.in_sync(), f"the standby to apply {to}")
            counts = json.loads(count_file.read_text())
            assert counts["applies"] == 1, counts
            pair.kill("standby")  # idle: a kill -9 is as good as a stop, and quicker
            killed_in = None
        else:
            wait_for(lambda: proc.poll() is not None, f"the standby to die at step {kill_at} of applying {to}")
            del pair.procs["standby"]
            assert proc.returncode == -KILLED, f"the standby ended with {proc.returncode}, not by SIGKILL"
            killed_in = (held, to, note_file.read_text().strip())
        pair.kill("primary")
        # What the restart must find: the previous snapshot after a kill before the journal's commit
        # record, the new one after it (checked, and corrected from the root, by the next restart).
        held = held if killed_in and "(stage)" in killed_in[2] else to
        return counts

    try:
        set_production("A")
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first shipment")
        pair.kill("primary")
        pair.kill("standby")
        # Each direction's steps, counted by an agent that is not killed.
        counts: dict[str, dict[str, Any]] = {}
        for to in ("B", "A"):
            counts[to] = shipment(to, 0)  # type: ignore[assignment]
        points = agent_points(counts)
        trials = [(to, points[to][i]) for i in range(max(map(len, points.values()))) for to in ("B", "A")
                  if i < len(points[to])]
        for to, n in trials:
            if held == to:  # the other direction has no kill point left: ship the other version plainly
                shipment("A" if to == "B" else "B", 0)
            shipment(to, n)
        # A plain restart; then the pair goes on replicating: a later change arrives.
        restarted(None)
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to hold production after the kills")
        (pair.prod / "keep" / "later.txt").write_bytes(b"written after the kills\n")
        wait_for(pair.in_sync, "a later change to arrive")
        shown = trials if len(trials) <= 8 else f"{len(trials)} steps (all of both directions)"
        print(f"\nstandby agent: A->B {summary(counts['B'])}; B->A {summary(counts['A'])}; killed at {shown}")
        bad.assert_none("after a kill -9 of a standby agent")
    finally:
        pair.stop_all()


# --- a target changed by hand after the kill (breaker s50) -------------------------------------------------


def _change_by_hand(target: Path, change: str) -> None:
    """What an operator does to a target an apply was cut short on: empty the trash drsync marks its
    steps with, or remove a directory (every directory the snapshots share, deepest first: one the
    commit writes into among them)."""
    if change == "trash":
        remove_tree(target / STAGING / "trash")
        return
    dirs = sorted((p for p in target.rglob("*") if p.is_dir() and not p.is_symlink() and STAGING not in p.parts),
                  key=lambda p: -len(p.parts))
    if dirs:
        remove_tree(dirs[0])


@pytest.mark.parametrize("change", ["trash", "dir"])
def test_a_restore_cut_short_then_changed_by_hand_ends_at_the_snapshot_asked(driver: Driver, local_case: Case,
                                                                            change: str) -> None:
    """Breaker s50: a restore killed in its commit, then the target changed by hand (its trash emptied, a
    directory removed). Found: the journal's replay failed on the missing path, so every later restore onto
    the target failed ("No such file or directory"), whatever snapshot, while --dry-run said it would go
    ahead. Now the replay that cannot be completed is dropped with a warning and the restore plans against
    the target as it is: it ends at the snapshot asked, whole, with no staging left."""
    case = local_case
    old, new = expected_local(case.old_spec), expected_local(case.new_spec)
    work = case.open_dir / f"by-hand-{change}"
    work.mkdir()
    counts = new_snapshot_steps(driver, case, work, None)
    s, c = counts["stage"], counts["commit"]
    for n in sorted({s + 2, s + c // 2, s + c - 1}):
        target = work / f"t{n}"
        copy_tree(case.base, target)
        step = killed(driver, apply_job(case.repo, case.new_id, str(target), None, n, work))
        _change_by_hand(target, change)
        for sid, want in ((case.new_id, new), (case.old_id, old)):
            r = run_drsync("snapshot", "restore", "--overwrite", "--delete-extra", sid, "--repo", case.repo,
                           "--target", target)
            assert r.code == 0, f"killed before {step}, {change} changed by hand: {r.err}"
            assert local_state(target) == want, f"killed before {step}, {change}: not the snapshot restored"
            assert staging_left(target) == []
        remove_tree(target)


def test_a_standby_whose_cut_short_apply_no_replay_completes_applies_the_snapshot_again(
        driver: Driver, local_case: Case) -> None:
    """Breaker s50, the standby's side: its apply killed in the commit, then its root changed by hand (the
    trash emptied), so the journal's replay fails. Its recovery (agent start) must not leave the root part
    old, part new, nor fail for ever: it records that the root is not vouched for, drops the journal and
    applies the snapshot again with every file compared; a crash in between comes back to it. Real
    kill -9 through the crash driver; the recovery runs in a Committer here."""
    from drsync.agent.committer import Committer
    from drsync.agent.state import StateStore

    case = local_case
    new = expected_local(case.new_spec)
    work = case.open_dir / "standby-by-hand"
    work.mkdir()
    store = StateStore(str(work / "state"))
    counts = new_snapshot_steps(driver, case, work, store.journal)
    s, c = counts["stage"], counts["commit"]
    target = work / "root"
    copy_tree(case.base, target)
    step = killed(driver, apply_job(case.repo, case.new_id, str(target), store.journal, s + c // 2, work))
    assert os.path.exists(store.journal), step
    _change_by_hand(target, "trash")
    with pytest.raises(OSError):  # what the replay alone meets
        recover_apply(str(target), store.journal)
    repo = engine.open_repository(case.repo)
    info = repo.find_snapshot(case.new_id)
    pending = Path(store.dir) / "applying.json"
    pending.write_text(json.dumps({"snapshot": info.id, "captured_at": info.captured_at, "position": [1, 2]}))
    committer = Committer(repo, str(target), store, agent="standby")
    assert committer.recover() is True
    assert local_state(target) == new, f"killed before {step}: the standby's root is not the snapshot it applied"
    assert store.current.applied_snapshot == info.id
    assert not pending.exists() and not os.path.exists(store.journal)
    assert staging_left(target) == []
    # A crash after the record said "apply again" (and before that apply) is the same recovery again.
    pending.write_text(json.dumps({"snapshot": info.id, "captured_at": info.captured_at, "position": [1, 2],
                                   "reapply": True}))
    (target / "stray-from-the-crash").write_text("a mix\n")
    assert Committer(repo, str(target), store, agent="standby").recover() is True
    assert local_state(target) == new
