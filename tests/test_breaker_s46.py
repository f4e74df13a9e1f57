"""Breaker s46: hostile cases for backup prune's failures and leftovers, promote's failed fence_command, and
continuous mode's inotify watcher.

Each failed on the code this was written against (its docstring says what was observed and what is expected);
all pass since the fixes of the same session:

1. ``backup prune``: the file a removal stopped at is named by a path that does not exist (``../../config.json``:
   shutil.rmtree reports the bare entry name, made relative to DEST as if it were a path of the current
   directory); the summary counts the backup it could not remove as removed; a failure hides every damaged
   backup (exit 1, none of them named on stderr); ``--dry-run`` says nothing of the leftovers (``.partial-*``,
   ``.deleting-*``) the prune removes; a prune running beside another prune (the agent's and an operator's)
   reports each backup the other one removed as "could not be removed: No such file or directory" (exit 1);
   and a backup whose directory name is 246 bytes or longer can never be pruned ('.deleting-' + its name is
   past NAME_MAX).
2. ``promote`` over an earlier primary: a fence_command that fails at once but leaves a daemon holding its
   output (``ssh -o ControlPersist``, ``setsid ... &``) holds the promotion far past fence_timeout (as long as
   the daemon lives: for ever) and is then reported as "did not finish within 25s (killed)" though it exited
   1 at once; a fence killed by a signal "exited with -9"; an interrupted promote (Ctrl-C) leaves its fence
   running, unsupervised, after the operator gave up the promotion.
3. Continuous mode's watcher: every failed start (the root cannot be watched: the watch limit) leaks an
   inotify instance (and two pipe descriptors) of watchdog's reader; the agent retries every 5 minutes, and
   fs.inotify.max_user_instances (128 per user, shared with every other root process) runs out.

What held: a ``.partial-*`` held by a live ``backup create`` (another process) is never removed; after the
obstacle (an immutable directory) is gone the next prune removes the leftover and exits 0 with "failed": [];
a failed, timed-out or missing fence with --json is one line on stderr, exit 4, epoch unchanged; a queue
overflow reaches only the watcher whose queue overflowed, whichever was started first, every time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, SLOW, Result, run_drsync
from tests.group import Group, wait_for

DRSYNC = [sys.executable, "-m", "drsync"]


# --- helpers ------------------------------------------------------------------------------------------------


def _backups(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A real full backup of a one-file snapshot (now) and three older copies: old-2024, old-2023, old-2022."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    repo = tmp_path / "repo"
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data).code == 0
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "latest", "--dest", tmp_path / "backups",
                   "--json")
    assert r.code == 0, r
    newest = Path(r.json()["path"])
    olds = []
    for year in (2024, 2023, 2022):
        dst = newest.parent / f"old-{year}"
        shutil.copytree(newest, dst, symlinks=True)
        meta = json.loads((dst / "backup.json").read_text())
        meta["created_at"] = f"{year}-01-01T00:00:00Z"
        (dst / "backup.json").write_text(json.dumps(meta))
        olds.append(dst)
    return newest, olds[0], olds[1], olds[2]


def _chattr(flag: str, path: Path) -> None:
    if subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute (chattr +i)")


def _unstick(dest: Path, stuck: Path, backup: str) -> None:
    """chattr -i on ``stuck`` wherever a prune left it (renamed to .deleting-<backup> or not)."""
    rel = stuck.relative_to(dest / backup)
    for p in (dest / f".deleting-{backup}" / rel, stuck):
        if p.exists():
            subprocess.run(["chattr", "-i", str(p)], check=True)


def _err_lines(r: Result) -> list[str]:
    return r.err.splitlines()


# --- 1. backup prune --------------------------------------------------------------------------------------


def test_a_file_prune_could_not_remove_is_named_by_a_path_in_dest(tmp_path: Path) -> None:
    """old-2024's config.json is immutable. Observed (prune run from /): 'old-2024: Operation not permitted
    (../../../../config.json)' -- shutil.rmtree reports the bare entry name and prune makes it relative to
    DEST as if it were a path of the current directory, so the path changes with the cwd and names nothing.
    Expected: the reason names the file by a path inside DEST that exists (e.g. .deleting-old-2024/config.json)."""
    newest, old24, _, _ = _backups(tmp_path)
    dest = newest.parent
    stuck = old24 / "config.json"
    _chattr("+i", stuck)
    try:
        proc = subprocess.run([*DRSYNC, "backup", "prune", str(dest), "--keep-last", "1", "--json"],
                              capture_output=True, text=True, cwd="/", timeout=120)
    finally:
        _unstick(dest, stuck, "old-2024")
    assert proc.returncode == 1, proc
    failed = json.loads(proc.stdout)["failed"]
    assert [f["backup"] for f in failed] == ["old-2024"], failed
    m = re.search(r"\(([^()]*)\)$", failed[0]["reason"])
    assert m, failed
    named = m.group(1)
    assert not named.startswith("..") and "config.json" in named, failed
    assert (dest / named).exists() or (dest / f".deleting-{named}").exists(), (named, sorted(os.listdir(dest)))


def test_a_prune_that_could_not_remove_a_backup_still_names_the_damaged_ones(tmp_path: Path) -> None:
    """old-2024 cannot be removed (immutable file) and old-2022's backup.json is damaged. Observed: exit 1 and one
    stderr line about old-2024 only; nothing on stderr or stdout says old-2022 is damaged and was kept (the
    damage is only in --json's "damaged"). Expected: the damaged backup is named on stderr as it is without
    the failure (exit 3 alone), whatever exit code the two together give."""
    newest, old24, _, old22 = _backups(tmp_path)
    dest = newest.parent
    (old22 / "backup.json").write_text("[")
    stuck = old24 / "config.json"
    _chattr("+i", stuck)
    try:
        r = run_drsync("backup", "prune", dest, "--keep-last", "1")
    finally:
        _unstick(dest, stuck, "old-2024")
    assert r.code in (1, 3) and "Traceback" not in r.err, r
    assert "old-2024" in r.err, r.err
    assert "old-2022" in r.err, ("the damaged backup is not named", r.out, r.err)


def test_prune_does_not_count_a_backup_it_could_not_remove_as_removed(tmp_path: Path) -> None:
    """--keep-last 2 of four backups: old-2023 goes, old-2022 cannot (immutable file). Observed stdout:
    'removed 2 backup(s), kept 2' above the error line saying one could not be removed. Expected: the
    summary counts what was removed (1)."""
    newest, _, _, old22 = _backups(tmp_path)
    dest = newest.parent
    stuck = old22 / "config.json"
    _chattr("+i", stuck)
    try:
        r = run_drsync("backup", "prune", dest, "--keep-last", "2")
    finally:
        _unstick(dest, stuck, "old-2022")
    assert r.code == 1, r
    summary = [x for x in r.out.splitlines() if x.startswith("removed ")]
    assert summary and not summary[0].startswith("removed 2 "), r.out


def test_a_backup_with_a_long_directory_name_can_be_pruned(tmp_path: Path) -> None:
    """A backup renamed to a 250-byte name (a legal name; `backup list` lists it). Observed:
    every prune fails on it, 'old-xxx...: File name too long (old-xxx...)' (exit 1), because prune renames it to
    '.deleting-' + its name, 260 bytes, past NAME_MAX -- the error blames the backup's name, and nothing the
    operator can fix but renaming it by hand. Expected: prune removes it like any other (exit 0)."""
    newest, _, _, old22 = _backups(tmp_path)
    dest = newest.parent
    long_name = dest / ("old-2022-" + "x" * 241)
    assert len(long_name.name) == 250
    old22.rename(long_name)
    listed = run_drsync("backup", "list", dest, "--json")
    assert long_name.name in [os.path.basename(b["path"]) for b in listed.json()["backups"]], listed
    r = run_drsync("backup", "prune", dest, "--keep-last", "3", "--json")
    assert r.code == 0 and json.loads(r.out)["failed"] == [], r
    assert not long_name.exists() and sorted(os.listdir(dest)) == sorted([newest.name, "old-2024", "old-2023"])


def test_dry_run_names_the_leftovers_the_prune_removes(tmp_path: Path) -> None:
    """A '.partial-*' left by a crashed create and a '.deleting-*' left by a crashed prune. Observed:
    `prune --dry-run` (text and --json) names neither, then `prune` removes both without naming them. Expected:
    --dry-run ("Only say what would be removed") says they would be removed."""
    newest, *_ = _backups(tmp_path)
    dest = newest.parent
    for name in (".partial-20260101T000000Z-crashed-1a2b3c4d", ".deleting-old-2021"):
        (dest / name / "packs").mkdir(parents=True)
        (dest / name / "packs" / "p1").write_bytes(b"x" * 1000)
    dry = run_drsync("backup", "prune", dest, "--keep-last", "4", "--dry-run", "--json")
    text = run_drsync("backup", "prune", dest, "--keep-last", "4", "--dry-run")
    assert dry.code == 0 and text.code == 0, (dry, text)
    assert (dest / ".deleting-old-2021").is_dir(), "a dry run removed something"
    real = run_drsync("backup", "prune", dest, "--keep-last", "4")
    assert real.code == 0 and not (dest / ".deleting-old-2021").exists(), real
    for name in (".partial-20260101T000000Z-crashed-1a2b3c4d", ".deleting-old-2021"):
        assert name in dry.out, ("--dry-run --json does not name the leftover it would remove", name, dry.out)
        assert name in text.out + text.err, ("--dry-run does not name the leftover", name, text.out)


def test_a_prune_beside_another_prune_does_not_report_their_removals_as_failures(tmp_path: Path) -> None:
    """Two prunes at once (the agent's [backups] prune and an operator's): A is held by strace at its first
    unlink (just after renaming old-2024 to '.deleting-old-2024', as a slow disk would hold it); B runs whole
    and removes everything A meant to remove. Observed: A then exits 1 with 'could not be removed' for all three,
    'old-2024: No such file or directory (../../CHECKSUMS.b3); old-2023: No such file or directory (old-2023);
    ...' although every one of them is gone, as decided. Expected: a backup that is gone is not a failure (prune
    already says so for a leftover another prune removed): exit 0, "failed": []."""
    strace = shutil.which("strace")
    if not strace:
        pytest.skip("no strace here to hold a prune still at its first unlink")
    newest, _, old23, old22 = _backups(tmp_path)
    dest = newest.parent
    a = subprocess.Popen([strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=unlinkat",
                          "-e", "inject=unlinkat:delay_enter=3600s:when=1", "--",
                          *DRSYNC, "backup", "prune", str(dest), "--keep-last", "1", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def held() -> bool:
            if a.poll() is not None:
                out, err = a.communicate()
                if "ptrace" in err:
                    pytest.skip(f"strace cannot trace here: {err.strip()}")
                raise AssertionError(f"prune A ended early: {out} {err}")
            if not (dest / ".deleting-old-2024").exists():
                return False
            # A is in a tracing stop at its first unlinkat (the rename is done, nothing unlinked yet).
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        st = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    if f"TracerPid:\t{a.pid}\n" in st and "\nState:\tt" in st:
                        return True
            return False
        wait_for(held, "prune A to rename old-2024 and stop at its first unlink", 30)
        b = run_drsync("backup", "prune", dest, "--keep-last", "1", "--json")
        assert b.code == 0, b
        assert not old23.exists() and not old22.exists() and not (dest / ".deleting-old-2024").exists()
    finally:
        a.kill()  # strace: the kernel detaches prune A, which goes on from its unlink
    # strace is gone; prune A (its child) goes on alone: its output ends when it exits.
    out = a.stdout.read() if a.stdout else ""
    err = a.stderr.read() if a.stderr else ""
    a.wait()
    assert out, ("prune A wrote no report", err)
    assert "could not be removed" not in err, err
    assert json.loads(out)["failed"] == [], out
    assert newest.is_dir() and sorted(os.listdir(dest)) == [newest.name]


# --- 1. what held -------------------------------------------------------------------------------------------


def test_held_a_backup_being_created_by_another_process_is_never_pruned(tmp_path: Path) -> None:
    """A real `drsync backup create` held still (DRSYNC_FAULT_PAUSE, point 'backup': its '.partial-*' made and
    locked) while `backup prune --keep-last 1 --json` runs: the '.partial-*' stays, prune exits 0, and the
    create then completes."""
    newest, *_ = _backups(tmp_path)
    dest = newest.parent
    (tmp_path / "data" / "g").write_text("a second snapshot: a backup id of its own")
    assert run_drsync("snapshot", "create", "--repo", tmp_path / "repo", "--source", tmp_path / "data").code == 0
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "backup").touch()
    create = subprocess.Popen([*DRSYNC, "backup", "create", "--repo", str(tmp_path / "repo"), "--snapshot",
                               "latest", "--dest", str(dest), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DRSYNC_FAULT_PAUSE": str(gates)})
    try:
        def paused() -> bool:
            if create.poll() is not None:
                raise AssertionError(f"backup create ended before its pause: {create.communicate()}")
            return (gates / "backup.reached").exists()
        wait_for(paused, "backup create to reach its pause", 30)
        partial = [p for p in os.listdir(dest) if p.startswith(".partial-")]
        assert len(partial) == 1, os.listdir(dest)
        r = run_drsync("backup", "prune", dest, "--keep-last", "1", "--json")
        assert r.code == 0 and json.loads(r.out)["failed"] == [], r
        assert (dest / partial[0]).is_dir(), "prune removed a backup being written"
    finally:
        (gates / "backup").unlink()
        out, err = create.communicate(timeout=120)
    assert create.returncode == 0, err
    assert Path(json.loads(out)["path"]).is_dir()


def test_held_after_the_obstacle_is_gone_the_next_prune_removes_the_leftover(tmp_path: Path) -> None:
    """old-2023's packs directory is immutable (nothing in it can be unlinked) and a crashed create's '.partial-*'
    holds an immutable directory too: prune exits 1 with one line naming both, --json lists both under
    "failed", and old-2022 is removed all the same; once chattr -i, the next prune removes both leftovers and
    exits 0 with "failed": []."""
    newest, old24, old23, old22 = _backups(tmp_path)
    dest = newest.parent
    leftover = dest / ".partial-20250101T000000Z-x-00000000"
    (leftover / "d").mkdir(parents=True)
    (leftover / "d" / "f").write_text("y")
    stuck = [old23 / "packs", leftover / "d"]
    for p in stuck:
        _chattr("+i", p)
    try:
        r = run_drsync("backup", "prune", dest, "--keep-last", "2", "--json")
        assert r.code == 1 and len(_err_lines(r)) == 1 and r.err.startswith("drsync: error: "), r
        assert "old-2023" in r.err and leftover.name in r.err, r.err
        assert sorted(f["backup"] for f in json.loads(r.out)["failed"]) == sorted([leftover.name, "old-2023"]), r.out
        assert not old22.exists() and old24.is_dir() and newest.is_dir()
    finally:
        _unstick(dest, stuck[0], "old-2023")
        subprocess.run(["chattr", "-i", str(stuck[1])], check=True)
    r = run_drsync("backup", "prune", dest, "--keep-last", "2", "--json")
    assert r.code == 0 and json.loads(r.out)["failed"] == [] and r.err == "", r
    assert sorted(os.listdir(dest)) == sorted([newest.name, "old-2024"])


# --- 2. promote over an earlier primary whose fence_command fails ---------------------------------------------


@pytest.fixture(scope="module")
def fenced_group(zk_server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """east was primary at epoch 1 and is gone (killed, its session expired); west, a running standby in
    sync, is to be promoted over it. Each test writes west's fence_command and fence_timeout; a failed fence
    changes nothing, so the group serves them all."""
    tmp = tmp_path_factory.mktemp("fence")
    g = Group(tmp, zk_server.hosts, f"g-{uuid.uuid4().hex[:12]}", ["east", "west"],
              extra='fence_command = "exit 3"\nfence_timeout = "2s"')
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "west to follow production")
        g.kill("east")
        wait_for(lambda: g.primary() is None, "east's ZooKeeper session to expire")
        yield g
    finally:
        g.stop_all()


def _set_fence(g: Group, command: str, timeout: str) -> Path:
    cfg = g.cfg["west"]
    text = cfg.read_text()
    text = re.sub(r"fence_command = .*\n", lambda _m: f"fence_command = {json.dumps(command)}\n", text)
    text = re.sub(r"fence_timeout = .*\n", f'fence_timeout = "{timeout}"\n', text)
    cfg.write_text(text)
    return cfg


def _kill_pidfile(pidfile: Path, group: bool = False) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_failed_fence_that_leaves_a_daemon_behind_is_bounded_by_fence_timeout(fenced_group: Group,
                                                                                  tmp_path: Path) -> None:
    """fence_command exits 1 at once but leaves a daemon holding its output (what `ssh -o ControlPersist=...`
    or a `setsid ... &` in a fence script does); fence_timeout = "2s". Observed: promote waits as long as the
    daemon lives (here 300 s: it never answers in 20 s; with a 25 s daemon it answered after 25 s with
    'fence_command did not finish within 25s (killed): ...' -- wrong on both counts: it exited 1 at once).
    Expected: exit 4 within about fence_timeout, naming how it failed ('exited with 1')."""
    g = fenced_group
    pidfile = tmp_path / "daemon.pid"
    cfg = _set_fence(g, f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & "
                        "echo the old primary does not answer; exit 1", "2s")
    started = time.monotonic()
    try:
        r = run_drsync("promote", "--config", cfg, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"promote still waits {time.monotonic() - started:.0f}s after a fence that exited 1 at once "
                    f"(fence_timeout 2s): it waits for the fence's daemon to close its output")
    finally:
        _kill_pidfile(pidfile)
    assert r.code == 4 and len(_err_lines(r)) == 1, r
    assert "fence_command exited with 1: the old primary does not answer" in r.err, r.err
    assert g.coord.view().epoch.epoch == 1


def test_a_fence_killed_by_a_signal_is_not_said_to_exit_with_a_negative_code(fenced_group: Group) -> None:
    """The fence is killed by SIGKILL (the OOM killer, an operator). Observed: 'fence_command exited with -9: bye'
    -- -9 is no exit status. Expected: it says the fence was killed by signal 9 (SIGKILL)."""
    g = fenced_group
    cfg = _set_fence(g, "echo bye; kill -KILL $$", "10s")
    r = run_drsync("promote", "--config", cfg)
    assert r.code == 4 and len(_err_lines(r)) == 1, r
    assert "exited with -9" not in r.err and ("SIGKILL" in r.err or "signal 9" in r.err), r.err
    assert g.coord.view().epoch.epoch == 1


def test_an_interrupted_promote_does_not_leave_its_fence_running(fenced_group: Group, tmp_path: Path) -> None:
    """The operator presses Ctrl-C (SIGINT) while the fence runs (fence_timeout 60s). Observed: promote says
    'drsync: interrupted' (exit 130) and its fence, in a session of its own, runs on unsupervised: it may still
    fence production after the operator gave up the promotion. Expected: the fence and its process group are
    killed, as at fence_timeout."""
    g = fenced_group
    pidfile = tmp_path / "fence.pid"
    cfg = _set_fence(g, f"echo $$ > {pidfile}; sleep 120; echo fenced east after all", "60s")
    proc = subprocess.Popen([*DRSYNC, "promote", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the fence to start", 30)
        fence = int(pidfile.read_text().strip())
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert g.coord.view().epoch.epoch == 1
        try:
            wait_for(lambda: not _alive(fence), "the interrupted promote's fence to be stopped", 2)
        except AssertionError:
            pytest.fail(f"promote was interrupted (exit {proc.returncode}) but its fence_command (pid {fence}) "
                        f"still runs")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_pidfile(pidfile, group=True)


def test_held_a_failed_fence_is_one_line_with_json_and_changes_nothing(fenced_group: Group) -> None:
    """Non-zero exit (last line named), a fence that cannot be found, and a timeout, each with --json: exit 4,
    exactly one line on stderr naming fence_command, how it failed, its last output line and --no-fence, no
    traceback, nothing on stdout to mistake for a result, and the epoch in ZooKeeper unchanged."""
    g = fenced_group
    cases = [("echo checking east; echo east refuses >&2; exit 3", "5s",
              r"fence_command exited with 3: east refuses;"),
             ("/nonexistent/fence-east", "5s", r"fence_command exited with 127: .*/nonexistent/fence-east"),
             ("echo asking east; sleep 60", "1s", r"fence_command did not finish within \d+s \(killed\): asking east;")]
    for command, timeout, said in cases:
        cfg = _set_fence(g, command, timeout)
        for flags in (["--json"], []):  # without --json it printed the fence's own ERROR record as well
            r = run_drsync("promote", "--config", cfg, *flags)
            assert r.code == 4 and len(_err_lines(r)) == 1 and "Traceback" not in r.err, (command, flags, r)
            assert re.search(said, r.err) and "--no-fence" in r.err and "fix the fence" in r.err, (command, r.err)
            assert r.out == "", (command, r.out)
            assert g.coord.view().epoch.epoch == 1 and g.primary() is None, command


# --- 3. continuous mode's watcher ---------------------------------------------------------------------------

_LEAK_PROBE = """
import json, os, sys
from drsync.agent.watcher import RootWatcher, WatchError

def inotify_instances():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return n

errors = []
for _ in range(20):
    w = RootWatcher(sys.argv[1])
    try:
        w.start()
        w.stop()
        errors.append(None)
    except WatchError as e:
        errors.append(str(e))
print(json.dumps({"errors": errors, "inotify_instances": inotify_instances()}))
"""


def test_a_root_that_cannot_be_watched_leaks_no_inotify_instance(tmp_path: Path) -> None:
    """The agent tries to watch its root again every WATCH_RETRY_S (5 min) after a fall-back. Here (a user
    namespace whose max_inotify_watches is 0: no watch at all) 20 starts each fail with WatchError naming the
    limit, as they should. Observed: the process then holds 7 to 13 (of 20) inotify instances nobody will close --
    watchdog's reader for each failed start -- and two pipe descriptors each: over days of retries the user's
    fs.inotify.max_user_instances (128, shared with every other process of root) runs out. Expected: a failed
    start leaves no inotify instance behind."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "-r", "true"]).returncode != 0:
        pytest.skip("no user namespaces here (unshare -U -r): the watch limit cannot be lowered for one process")
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    probe = tmp_path / "leakprobe.py"
    probe.write_text(_LEAK_PROBE)
    done = subprocess.run(["unshare", "-U", "-r", "sh", "-c",
                           f"echo 0 > /proc/sys/user/max_inotify_watches && exec {sys.executable} {probe} {root}"],
                          capture_output=True, text=True, timeout=60 * SLOW,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert all(e and "inotify watch limit reached" in e for e in out["errors"]), out["errors"][:2]
    assert out["inotify_instances"] == 0, out["inotify_instances"]


def test_held_an_overflow_reaches_only_the_watcher_whose_queue_overflowed(tmp_path: Path) -> None:
    """Two watchers in one process (tests.watchprobe with DRSYNC_PROBE_ALSO): the queue of the first-started,
    then of the second-started watcher overflows (the process stopped while more files than
    fs.inotify.max_queued_events are made in its root). Every time that watcher reports the overflow, naming
    fs.inotify.max_queued_events and what to do, and the other reports nothing. (Also held by hand: 16 rounds
    alternating, some beside a busy loop on one core, and a third watcher started after the first stopped, on
    the first's reused descriptor number.)"""
    from tests.test_continuous import _ask, _probe

    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it in a test")
    for i, flooded in enumerate(["first", "second"]):
        first, second = tmp_path / f"r{i}-first", tmp_path / f"r{i}-second"
        first.mkdir()
        second.mkdir()
        p = _probe(first, also=second)
        try:
            assert p.stdout is not None
            assert json.loads(p.stdout.readline())["started"]
            root = first if flooded == "first" else second
            mine, other = ("problem", "also_problem") if flooded == "first" else ("also_problem", "problem")
            os.kill(p.pid, signal.SIGSTOP)
            try:
                for k in range(limit + 500):
                    os.close(os.open(root / f"f{k}", os.O_CREAT | os.O_WRONLY))
            finally:
                os.kill(p.pid, signal.SIGCONT)
            wait_for(lambda p=p, mine=mine: _ask(p)[mine], f"round {i}: the {flooded} watcher to report its overflow",
                     30)
            answer = _ask(p)
            assert "overflowed" in str(answer[mine]) and "fs.inotify.max_queued_events" in str(answer[mine])
            assert "sysctl -w fs.inotify.max_queued_events=" in str(answer[mine]), answer
            assert answer[other] is None, (i, flooded, answer)
        finally:
            p.kill()
            p.wait()
        shutil.rmtree(first)
        shutil.rmtree(second)


# --- the same kinds, found while fixing them ----------------------------------------------------------------


def test_a_prune_waits_for_a_creator_between_making_and_locking_its_partial_directory(tmp_path: Path) -> None:
    """The breaker's unproven race: `backup create` made its '.partial-' directory and only then locked it, so
    a prune listing DEST in between found an unlocked leftover and removed the backup being written. A
    creator now makes and locks it under a shared lock on DEST, and a prune decides on leftovers under an
    exclusive one. Here the test is the creator, stopped inside that window: the prune waits, and once the
    directory is locked leaves it alone."""
    import fcntl
    import threading

    newest, _, _, _ = _backups(tmp_path)
    dest = newest.parent
    partial = dest / ".partial-being-made"
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(dest_fd, fcntl.LOCK_SH)  # the creator's window: made, not locked yet
    partial.mkdir()
    from drsync import backup
    from drsync.config import KeepPolicy

    done: list[object] = []
    pruner = threading.Thread(target=lambda: done.append(backup.prune_backups(str(dest), KeepPolicy(last=1))))
    pruner.start()
    try:
        # The prune is blocked on DEST (the kernel lists it as waiting for a lock on DEST's inode), or it
        # finished without waiting: either way the directory must still be there.
        waiting = re.compile(rf"->\s+FLOCK\s+\S+\s+WRITE\s+\d+\s+[0-9a-f]+:[0-9a-f]+:{dest.stat().st_ino}\s")
        wait_for(lambda: not pruner.is_alive() or waiting.search(Path("/proc/locks").read_text()),
                 "the prune to wait for DEST's lock", 30)
        assert partial.is_dir(), "the prune removed a .partial- directory inside its creator's window"
        held = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX)  # the creator locks its directory, then lets go of DEST
    finally:
        os.close(dest_fd)
    pruner.join(60)
    assert not pruner.is_alive() and done, "the prune did not finish"
    assert partial.is_dir(), "the prune removed a .partial- directory its creator holds"
    os.close(held)
    assert backup.prune_backups(str(dest), KeepPolicy(last=1)).leftovers == [partial.name]  # abandoned now: gone
    assert not partial.exists()


@pytest.mark.parametrize("key", ["fence_timeout", "demote_timeout", "switchover_timeout", "session_timeout"])
def test_a_timeout_of_zero_is_refused(tmp_path: Path, key: str) -> None:
    """fence_timeout = "0s" was accepted, and then every fence failed as "did not finish within 0s". A
    timeout of nothing is a mistake: `config check` names the key (exit 2)."""
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{tmp_path / "data"}"\n'
                   f'repository = "{tmp_path / "repo"}"\n[coordination]\n{key} = "0s"\n')
    r = run_drsync("config", "check", "--config", cfg)
    assert r.code == 2 and key in r.err and "longer than 0" in r.err and len(_err_lines(r)) == 1, r
