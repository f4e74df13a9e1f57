"""Breaker s48b: attacks on the fixes of breaker s48, from the user's side.

1. Rule 8 for every volume of the tree (a removed nested mount point is a removal).
2. Restores stay out of every running agent's data root on this host (the agents' registry in
   /run/drsync/agents or $TMPDIR/drsync-agents-<uid>).
3. One agent fences at a time; a fence never outlives the agent that runs it.

Each test's docstring says what was observed and what is expected. Real tmpfs mounts, real agents (one of
them run as the unprivileged user nobody), real ZooKeeper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SLOW, init_repo_at, run_drsync, snapshot_json, tree_state, write_files
from tests.group import wait_for
from tests.mounts import Mounts
from tests.procs import alive
from tests.test_failover import bootstrap

# --- helpers ------------------------------------------------------------------------------------------------


TOP = {f"top/t{i}": f"{i}\n" for i in range(20)}


def _kill_pids(pids: Path) -> None:
    """Kill the fence commands this test started (their pid files), whatever became of their agents."""
    if not pids.exists():
        return
    for p in pids.iterdir():
        try:
            pid = int(p.read_text().split()[0])
        except (ValueError, IndexError):
            continue
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --- 1. rule 8 for every volume ------------------------------------------------------------------------------


def test_a_removed_nested_mount_point_is_a_removal_not_an_empty_outer_volume(tmp_path: Path, mounts: Mounts) -> None:
    """DATA/vol is a filesystem of its own whose only files are on a nested one, DATA/vol/inner (4 files): the
    snapshot records volumes {"vol": 4, "vol/inner": 4}. The inner disk is retired on purpose: unmounted and its
    mount point directory removed (`umount vol/inner; rmdir vol/inner`). Observed: the next snapshot keeps the 4
    files stale, records {"vol": 4, "vol/inner": 4} again, and warns "vol: the filesystem mounted here holds no
    files, but the last snapshot had 4 below it (the wrong or an empty volume?)" -- about the outer volume, which
    is the right one and still mounted -- on every snapshot from now on. Expected (operations.md 12: "A mount
    point directory that was removed is taken as removed on purpose"): vol/inner's files are removals (weighed
    by the deletion guard), vol/inner is no longer recorded, and no warning blames vol."""
    root, repo = tmp_path / "root", tmp_path / "repo"
    write_files(root, TOP)
    init_repo_at(repo, "c", "1")
    mounts.tmpfs(root / "vol")
    mounts.tmpfs(root / "vol" / "inner", {f"g{i}": f"i{i}\n" for i in range(4)})
    first = snapshot_json(repo, root)
    assert first["files"] == 24 and first["volumes"] == {"vol": 4, "vol/inner": 4}, first
    mounts.umount(root / "vol" / "inner")
    (root / "vol" / "inner").rmdir()
    after = snapshot_json(repo, root)
    assert (after["files"], after["volumes"], after["warnings"]) == (20, {"vol": 0}, []), (
        f"the removed mount point vol/inner: files {after['files']}, volumes {after['volumes']}, "
        f"warnings {after['warnings']}")


# --- 3. one agent fences at a time; a fence never outlives its agent ----------------------------------------


def _able_starts_a_slow_fence(make_group, tmp_path: Path, fence_command: str):  # type: ignore[no-untyped-def]
    """east primary, able and zulu standbys (automatic failover, fence_timeout 120 s): east is killed and able,
    first by name, starts its fence (``fence_command``). Returns (group, fence log)."""
    log = tmp_path / "fenced"
    fence = f'fence_command = "{fence_command}"\nfence_timeout = "120s"\nfailover_cooldown = "0s"\n'
    g = make_group(["east", "able", "zulu"], session_timeout="2s", failover="automatic", extra=fence)
    bootstrap(g)
    g.kill("east")
    first = wait_for(lambda: log.exists() and log.read_text().split()[:2], "a standby to start fencing",
                     timeout=30 / SLOW)
    assert first == ["able", "start"], first
    return g, log


def test_a_fence_command_in_a_session_of_its_own_outlives_its_killed_agent(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """east primary; able's fence_command starts its real work with `setsid` (a new session and process group,
    as ssh wrappers, `daemon`-style BMC tools and `setsid -w ipmitool ...` do) and that work takes 40 s; zulu's
    fence succeeds at once. east is killed; able takes the fencing node and starts its fence; able's agent is
    killed -9 mid-fence. Observed: the node ends with able's session and zulu fences and promotes, while able's
    fence (the `setsid` child) still runs, orphaned, and would finish ("able done") after zulu became primary:
    two fences at once. The watchdog kills only the fence's first process group. Expected (operations.md 4a: "A
    fence never outlives the agent running it: if that agent dies mid-fence (kill -9), the fence's whole
    process group is killed with it"): every process the fence started is gone once able's agent is dead (a
    cgroup, or a subreaper that kills all descendants, not a single process group)."""
    log, pids = tmp_path / "fenced", tmp_path / "pids"
    pids.mkdir()
    work = tmp_path / "work.sh"
    work.write_text(f'#!/bin/sh\necho $$ > {pids}/$DRSYNC_AGENT-work\necho $DRSYNC_AGENT start >> {log}\n'
                    f'if [ $DRSYNC_AGENT = able ]; then sleep 40; fi\necho $DRSYNC_AGENT done >> {log}\n')
    work.chmod(0o755)
    try:
        g, log = _able_starts_a_slow_fence(make_group, tmp_path, f"setsid -w {work}")
        g.kill("able")
        wait_for(lambda: (p := g.primary()) is not None and p[0] == "zulu", "zulu to promote", timeout=40 / SLOW)
        orphan = int((pids / "able-work").read_text())
        assert not alive(orphan), (f"able's fence (pid {orphan}, in a session of its own) still runs after its "
                                    f"agent was killed -9 and zulu fenced and promoted: {log.read_text().split()}")
    finally:
        _kill_pids(pids)


def test_a_stopped_fencing_agents_fence_runs_beside_the_next_standbys(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """east primary; able's fence_command takes 40 s (a slow BMC), zulu's succeeds at once. east is killed;
    able takes the fencing node and starts its fence; able's agent is then stopped (SIGSTOP: a VM paused, a
    process frozen by a debugger or a cgroup freezer, a long GC-like stall). Observed: able's ZooKeeper session
    expires, so the fencing node ends; zulu takes it, runs its own fence and promotes while able's fence
    command is still running: two fence commands at once, and able's finishes after zulu became primary (had it
    been "power-cycle production", the second could hit the new primary's storage ...). Expected (operations.md
    4a: "One agent fences at a time"): while able's fence command runs, no other fence starts -- the command is
    tied to the session that holds the node (killed when the holder can no longer hold the node, e.g. by a
    watchdog that is not itself stopped), or zulu does not fence before able's command is gone."""
    pids = tmp_path / "pids"
    pids.mkdir()
    log = tmp_path / "fenced"
    able = None
    try:
        g, log = _able_starts_a_slow_fence(
            make_group, tmp_path, f"echo $$ > {pids}/$DRSYNC_AGENT; echo $DRSYNC_AGENT start >> {log}; "
                                  f"if [ $DRSYNC_AGENT = able ]; then sleep 40; fi; echo $DRSYNC_AGENT done >> {log}")
        able = g.procs["able"]
        able.send_signal(signal.SIGSTOP)
        fence_pid = int((pids / "able").read_text())
        wait_for(lambda: "zulu start" in log.read_text() or not alive(fence_pid),
                 "zulu to start fencing, or able's fence to end", timeout=40 / SLOW)
        both = "zulu start" in log.read_text() and alive(fence_pid)
        assert not both, (f"zulu started its fence while able's fence command (pid {fence_pid}) still runs (able's "
                          f"agent stopped): {log.read_text().split()}")
    finally:
        if able is not None:
            able.send_signal(signal.SIGCONT)
        _kill_pids(pids)


# --- 2. restores stay out of every running agent's data root: the registry ---------------------------------

NOBODY = 65534

_AS_NOBODY = (
    "import os, sys\n"
    "sys.path.insert(0, {root!r})\n"
    "from tests.users import preload_everything\n"
    "preload_everything()\n"
    "from drsync.cli import main\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534); os.chdir('/')\n"
    "raise SystemExit(main(sys.argv[1:]))\n")


def _source_repo(base: Path) -> Path:
    """A repository of its own (not any agent's) with one snapshot of a small tree."""
    src, repo = base / "src", base / "srcrepo"
    write_files(src, {"a": "a\n", "d/b": "b\n"})
    init_repo_at(repo, "c", "1")
    snapshot_json(repo, src)
    return repo


def _private_tmpdir(base: Path) -> Path:
    """A directory standing for /tmp (world-writable, sticky), so that the registries planted here are seen only
    by the commands this test runs with TMPDIR pointing at it."""
    t = base / "tmpdir"
    t.mkdir()
    t.chmod(0o1777)
    return t


def test_every_restore_empties_the_directory_a_registry_symlink_in_tmp_names(tmp_path: Path) -> None:
    """An unprivileged user (here uid 65534) makes `$TMPDIR/drsync-agents-65534` -- the private registry an agent
    of theirs would use -- a symlink to a directory of root's (here VICTIM, holding keep.conf and authorized_keys;
    in real life /etc/cron.d, /root/.ssh, ...). root then runs an ordinary restore, far from any agent:
    `drsync snapshot restore latest --repo R --target OUT` (and `--dry-run`, and `drsync backup restore`).
    Observed: the restore exits 0, and every file of VICTIM is gone: the restore follows the symlink, takes each
    file as a stale registry entry and removes it, as root -- even the dry run that says "nothing was changed".
    Expected: a registry that is not a real directory owned by the uid its name gives (and entries not owned by
    it) is ignored, never written to; a restore removes nothing outside its target (a stale entry is at most
    skipped)."""
    repo = _source_repo(tmp_path)
    tmpdir = _private_tmpdir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmpdir / f"drsync-agents-{NOBODY}"
    os.symlink(victim, link)
    os.lchown(link, NOBODY, NOBODY)
    env = {"TMPDIR": str(tmpdir)}
    lost: dict[str, list[str]] = {}
    for what, args in {"restore --dry-run": ("--target", tmp_path / "out1", "--dry-run"),
                       "restore": ("--target", tmp_path / "out2")}.items():
        (victim / "keep.conf").write_text("important\n")
        (victim / "authorized_keys").write_text("ssh-ed25519 AAAA root@admin\n")
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, *args, env=env)
        assert r.code == 0, r.err
        gone = sorted({"keep.conf", "authorized_keys"} - {p.name for p in victim.iterdir()})
        if gone:
            lost[what] = gone
    assert not lost, (f"a restore as root removed files of {victim} (named by a symlink {link} an unprivileged "
                      f"user can make): {lost}")


def test_a_fifo_in_a_users_registry_hangs_every_restore_on_the_host(tmp_path: Path) -> None:
    """The unprivileged user 65534 (whose agent registry is `$TMPDIR/drsync-agents-65534`, a directory of theirs)
    puts a FIFO there as an "entry" (`mkfifo`). root then runs an ordinary restore far from any agent. Observed:
    `drsync snapshot restore latest --repo R --target OUT` never ends (killed after 20 s, nothing restored): it
    opens the FIFO to read the entry and blocks for ever. The same happens with a regular entry naming a state
    directory whose agent.pid is a FIFO. Expected: an entry that is not a regular file (or whose agent.pid is
    not) is skipped; a planted entry causes at most a refusal, never a hang."""
    repo = _source_repo(tmp_path)
    tmpdir = _private_tmpdir(tmp_path)
    reg = tmpdir / f"drsync-agents-{NOBODY}"
    reg.mkdir(mode=0o700)
    os.mkfifo(reg / "0123456789abcdef01234567")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(reg)], check=True)
    try:
        r = run_drsync("snapshot", "restore", "latest", "--repo", repo, "--target", tmp_path / "out",
                       env={"TMPDIR": str(tmpdir)}, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"drsync snapshot restore hung on a FIFO in {reg} (a registry an unprivileged user owns)")
    assert r.code in (0, 4) and len(r.err.strip().splitlines()) <= 1, r


def test_a_restore_with_another_tmpdir_writes_into_a_running_non_root_agents_root(open_tmp: Path) -> None:
    """A standby agent runs as the unprivileged user nobody (it cannot write /run/drsync/agents, so it announces
    itself in `$TMPDIR/drsync-agents-65534`, its TMPDIR being /var/tmp/... as its service unit sets, or just
    another shell's). root runs `drsync snapshot restore latest --repo OTHER --target NOBODY-DATA/x` with its own
    TMPDIR. Observed: with the agent's TMPDIR the restore is refused (exit 4) -- with any other TMPDIR it exits 0
    and writes into the running agent's data root (the data root's lock in /run/lock, written by the same agent,
    is not consulted). Expected (README: a restore onto, into or holding the data root of any agent running on
    this host is refused): exit 4 whatever the restoring user's TMPDIR, e.g. from a registry location that does
    not depend on the environment of either process, or from the data-root locks in /run/lock."""
    from tests.zk import free_port

    base = open_tmp
    data, repo = base / "nb-data", base / "nb-repo"
    write_files(data, {"f": "x\n"})
    cfg = base / "nb.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\nrepository = "{repo}"\n'
                   f'[agent]\nname = "nb"\nrole = "standby"\nlisten = "127.0.0.1:{free_port()}"\n'
                   f'metrics = "127.0.0.1:{free_port()}"\n')
    init_repo_at(repo, "c", "1")
    agent_tmp = base / "agent-tmp"
    agent_tmp.mkdir()
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(data), str(repo), str(agent_tmp)], check=True)
    other = _source_repo(base / "mine")
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    with open(base / "nb.log", "wb") as log:  # the child keeps its own copy of the fd
        agent = subprocess.Popen([sys.executable, "-c", _AS_NOBODY.format(root=root), "agent", "--config",
                                  str(cfg)], stdout=log, stderr=log, env={**env, "TMPDIR": str(agent_tmp)})
    try:
        from drsync.agent.registry import running_agents

        wait_for(lambda: any(root == str(data) for _, root in running_agents()) or agent.poll() is not None,
                 "the agent run by nobody to announce itself", timeout=30)
        assert agent.poll() is None, (base / "nb.log").read_text()
        same = run_drsync("snapshot", "restore", "latest", "--repo", other, "--target", data / "x",
                          env={"TMPDIR": str(agent_tmp)})
        assert same.code == 4, same
        before = tree_state(data)
        mine = base / "root-tmp"
        mine.mkdir()
        r = run_drsync("snapshot", "restore", "latest", "--repo", other, "--target", data / "y",
                       env={"TMPDIR": str(mine)})
        assert r.code == 4 and tree_state(data) == before, (
            f"with another TMPDIR the restore into the running agent's root exited {r.code} "
            f"({(r.err or r.out).strip()!r}); the root now holds {sorted(tree_state(data))}")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
