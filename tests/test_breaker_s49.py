"""Breaker s49: attacks on fencing's runner (fence_command / demote_command under a subreaper runner).

Each test's docstring says what was observed and what is expected (README "Fencing", operations.md 4a). Real
processes: the "agent" of the in-process cases is a child Python process calling
drsync.agent.fencing.run_command; the group cases run real agents on a real ZooKeeper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import SLOW
from tests.faultproxy import FaultProxy
from tests.group import wait_for
from tests.procs import alive
from tests.test_failover import bootstrap

# --- helpers ------------------------------------------------------------------------------------------------


def _pids(d: Path) -> dict[str, int]:
    out = {}
    for p in d.iterdir():
        try:
            out[p.name] = int(p.read_text().split()[0])
        except (ValueError, IndexError):
            pass
    return out


def _kill_all(d: Path) -> None:
    """Kill what the fences of a test left (their pid files), continuing a stopped runner first."""
    if not d.exists():
        return
    for pid in _pids(d).values():
        for sig in (signal.SIGKILL,):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _work(d: Path, name: str) -> str:
    """A shell snippet: a process that writes its pid to d/name and sleeps long (a fence's real work)."""
    return f"sh -c 'echo $$ > {d}/{name}; exec sleep 600'"


def _started(d: Path, names: tuple[str, ...]) -> dict[str, int]:
    def ready() -> dict[str, int] | None:
        found = _pids(d)
        return found if all(n in found for n in names) else None

    return wait_for(ready, f"the fence to start {names}", timeout=30)


def _agent(code: str) -> subprocess.Popen[str]:
    """A child Python process standing for the agent (or drsync promote) running the fence."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/work/main", env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


_REPORT = ("import json, sys, threading\nfrom drsync.agent.fencing import run_command\n"
           "def report(r):\n"
           "    print(json.dumps({'summary': r.summary(), 'ok': r.ok, 'timed_out': r.timed_out}), flush=True)\n")


# --- 1. the runner itself cannot act: 5 s past fence_timeout everything must still be killed ----------------


def test_a_fence_whose_runner_is_stopped_is_killed_past_its_timeout_with_all_it_started(tmp_path: Path) -> None:
    """fence_command stops its own runner (`kill -STOP $PPID`; the same as an operator's `pkill -STOP -f ...`
    whose pattern is in the fence string, which the runner's command line carries) after starting work in a
    session of its own; fence_timeout 2 s. Observed: run_command returns only after 32 s (the agent waits 30 s
    for the stopped runner, then SIGKILLs the runner's own process group), says "fence_command did not finish
    within 32s (killed)", and the shell, its foreground sleep and the setsid'd work all still run (orphaned to
    init). Expected (README: "it is killed, with every process it started, after that"; operations.md 4a: "if
    that agent ... cannot kill it 5 s past fence_timeout, the fence and every process it started are killed"):
    once run_command has returned (and the fencing node may be released), nothing of the fence runs."""
    d = tmp_path / "pids"
    d.mkdir()
    fence = f"echo $$ > {d}/shell; setsid {_work(d, 'detached')} & kill -STOP $PPID; {_work(d, 'fg')}"
    agent = _agent(_REPORT + f"report(run_command('fence_command', {fence!r}, {{}}, 2.0))\n")
    try:
        out, err = agent.communicate(timeout=300 * SLOW)
        result = json.loads(out.splitlines()[-1])
        pids = _pids(d)
        assert set(pids) == {"shell", "detached", "fg"}, (pids, err[-500:])
        running = {n: p for n, p in pids.items() if alive(p)}
        assert not result["ok"]
        assert not running, (f"run_command returned ({result['summary']!r}) but the fence still runs: {running} "
                             "(its runner was stopped)")
    finally:
        agent.kill()
        _kill_all(d)


def test_a_failed_fence_whose_runner_was_killed_leaves_nothing_running(tmp_path: Path) -> None:
    """fence_command starts work in a session of its own, then its runner is killed -9 (here by the fence
    itself, `kill -9 $PPID`; in life an operator's `pkill -9 -f PATTERN` whose pattern is in the fence string
    carried on the runner's command line, or the OOM killer) and the fence goes on. Observed: run_command
    returns at once "fence_command lost its runner (killed by SIGKILL (signal 9)) and may still run" -- a
    failure, so the caller releases the group's fencing node -- while the shell, its foreground work and the
    setsid'd work all go on running, orphaned to init: the next standby may fence beside it. Expected (README:
    "what a failed one left running is killed"; operations.md 4a: "A failed fence's leftovers are killed
    before the node is released"): when run_command returns a failure, nothing the fence started runs (e.g.
    the agent itself the subreaper, or a cgroup, so that the fence's processes are still found)."""
    d = tmp_path / "pids"
    d.mkdir()
    # The runner is killed once the detached work has started (its pid written): what comes after the kill may
    # or may not start before the agent kills the fence (on a busy machine the agent can be first), so the
    # foreground work is judged only if it started; the shell that would start it must be gone either way.
    fence = (f"echo $$ > {d}/shell; setsid {_work(d, 'detached')} & while [ ! -s {d}/detached ]; do sleep 0.05; "
             f"done; kill -9 $PPID; {_work(d, 'fg')}")
    agent = _agent(_REPORT + f"report(run_command('fence_command', {fence!r}, {{}}, 300.0))\n")
    try:
        out, _err = agent.communicate(timeout=300 * SLOW)
        result = json.loads(out.splitlines()[-1])
        assert not result["ok"], result
        _started(d, ("shell", "detached"))
        pids = _pids(d)
        running = {n: p for n, p in pids.items() if alive(p)}
        assert not running, f"run_command returned a failure ({result['summary']!r}) while the fence runs: {running}"
    finally:
        agent.kill()
        _kill_all(d)


# --- 2. the one-line error says what happened -----------------------------------------------------------------


def test_a_fence_past_its_timeout_while_the_agent_could_not_act_says_did_not_finish(tmp_path: Path) -> None:
    """fence_timeout 1 s; the fence sleeps 600 s; the agent is alive but cannot act (its interpreter lock held
    by another thread for 30 s: a long C call, a stall). The runner's own deadline (timeout + 5 s) kills the
    fence, as promised. Observed: when the agent gets to run again, run_command reports "fence_command lost its
    runner (exit 0) and may still run" (before commit 56c405b: "could not be started") -- it says the fence
    may still run although everything was killed, and does not say it timed out. Expected (promise: "a
    timeout says 'did not finish within'"): the summary says the fence did not finish within its timeout."""
    d = tmp_path / "pids"
    d.mkdir()
    fence = f"echo $$ > {d}/shell; exec sleep 600"
    code = (_REPORT + "import ctypes, os, time\nres = []\n"
            f"t = threading.Thread(target=lambda: res.append(run_command('fence_command', {fence!r}, {{}}, 1.0)))\n"
            f"t.start()\nwhile not os.path.exists({str(d / 'shell')!r}): time.sleep(0.01)\n"
            "ctypes.PyDLL(None).sleep(30)  # holds the GIL: the agent is alive but cannot act\n"
            "t.join(); report(res[0])\n")
    agent = _agent(code)
    try:
        shell = _started(d, ("shell",))["shell"]
        wait_for(lambda: not alive(shell), "the runner to kill the fence at its own deadline", timeout=60)
        out, _err = agent.communicate(timeout=120 * SLOW)
        result = json.loads(out.splitlines()[-1])
        assert not result["ok"]
        assert "did not finish within" in result["summary"], result["summary"]
        assert "may still run" not in result["summary"], result["summary"]
    finally:
        agent.kill()
        _kill_all(d)


def test_a_fence_killed_because_its_agent_was_stopped_is_not_said_to_still_run(tmp_path: Path) -> None:
    """`drsync promote` (here a Python process running run_command with fence_timeout 600 s) is stopped
    mid-fence (Ctrl-Z, SIGSTOP, a debugger): the runner sees it and kills the fence and what it started, as
    promised. Observed: once continued, run_command says "fence_command lost its runner (exit 0) and may still
    run", which sends the operator looking for a fence that is gone (and "lost its runner" for a runner that
    ended as designed). Expected: the line says the fence was killed (because drsync was stopped), not that it
    may still run."""
    d = tmp_path / "pids"
    d.mkdir()
    fence = f"echo $$ > {d}/shell; setsid {_work(d, 'detached')} & exec sleep 600"
    agent = _agent(_REPORT + f"report(run_command('fence_command', {fence!r}, {{}}, 600.0))\n")
    try:
        pids = _started(d, ("shell", "detached"))
        agent.send_signal(signal.SIGSTOP)
        wait_for(lambda: not any(alive(p) for p in pids.values()), "the fence to be killed (agent stopped)")
        agent.send_signal(signal.SIGCONT)
        out, _err = agent.communicate(timeout=120 * SLOW)
        result = json.loads(out.splitlines()[-1])
        assert not result["ok"]
        assert "may still run" not in result["summary"], result["summary"]
    finally:
        agent.send_signal(signal.SIGCONT)
        agent.kill()
        _kill_all(d)


# --- 3. never raises ------------------------------------------------------------------------------------------


def test_a_fence_command_with_a_nul_byte_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    """fence_command = "echo a\\u0000b" (valid TOML; `drsync config check` says "fence_command set", ok).
    Observed: run_command raises ValueError("embedded null byte"); `drsync promote --force` ends with "internal
    error: ValueError", and an agent under automatic failover stops ("agent west stops: unexpected error in
    its loop") at each failover attempt -- every standby of the group dies instead of waiting. Expected
    (run_command's contract: "never raises"; a fence that cannot run stops the promotion): a failed
    CommandResult ("could not be started"), or config check refusing the value."""
    from drsync.agent.fencing import run_command

    try:
        r = run_command("fence_command", "echo a\x00b", {}, 5.0)
    except ValueError as e:
        raise AssertionError(f"run_command raised {e!r}") from None
    assert not r.ok, r


# --- 4. one agent fences at a time ----------------------------------------------------------------------------


def test_a_fencer_cut_off_from_zookeeper_keeps_fencing_while_the_next_standby_fences(make_group,  # type: ignore[no-untyped-def]
                                                                                     tmp_path: Path) -> None:
    """east primary; able and zulu standbys (automatic failover, session_timeout 2 s); able reaches ZooKeeper
    through a proxy. east is killed; able takes the fencing node and starts its fence (40 s, a slow BMC); then
    able's link to ZooKeeper goes silent (a partition; able's process runs on). Observed: able's session
    expires, the ephemeral fencing node ends with it, zulu takes it and runs its own fence (and promotes) while
    able's fence command still runs -- two fences at once; able's would finish after zulu became primary.
    The runner kills the fence when the agent dies or is stopped, not when the agent lost the session that
    holds the node. Expected (operations.md 4a: "One agent fences at a time"): a fence is killed once its agent
    can no longer hold the fencing node (session suspended/lost), before another may take it; or zulu does
    not fence while able's command runs."""
    log, pids = tmp_path / "fenced", tmp_path / "pids"
    pids.mkdir()
    fence = (f"echo $$ > {pids}/$DRSYNC_AGENT; echo $DRSYNC_AGENT start >> {log}; "
             f"if [ $DRSYNC_AGENT = able ]; then sleep 40; fi; echo $DRSYNC_AGENT done >> {log}")
    g = make_group(["east", "able", "zulu"], session_timeout="2s", failover="automatic",
                   extra=f'fence_command = "{fence}"\nfence_timeout = "60s"\nfailover_cooldown = "0s"\n')
    proxy = FaultProxy(g.hosts.split(",")[0])
    cfg = g.cfg["able"].read_text().replace(f'zookeeper = "{g.hosts}"', f'zookeeper = "{proxy.address}"')
    assert proxy.address in cfg
    g.cfg["able"].write_text(cfg)
    try:
        bootstrap(g)
        g.kill("east")
        first = wait_for(lambda: log.exists() and log.read_text().split()[:2], "a standby to start fencing",
                         timeout=30)
        assert first == ["able", "start"], first
        fence_pid = int((pids / "able").read_text())
        proxy.set("drop")
        wait_for(lambda: "zulu start" in log.read_text() or not alive(fence_pid),
                 "zulu to start fencing, or able's fence to end", timeout=60)
        both = "zulu start" in log.read_text() and alive(fence_pid)
        assert not both, (f"zulu started its fence while able's fence command (pid {fence_pid}) still runs (able "
                          f"cut off from ZooKeeper): {log.read_text().split()}")
    finally:
        proxy.set("pass")
        _kill_all(pids)
        proxy.close()


def test_a_config_holding_a_nul_character_is_refused_by_name(tmp_path: Path) -> None:
    """TOML's \\u0000 in any string of the config (a fence_command here) is a config error naming the key."""
    from tests.conftest import run_drsync

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{tmp_path}/d"\nrepository = "{tmp_path}/r"\n'
                   '[coordination]\nfence_command = "echo a\\u0000b"\n')
    r = run_drsync("config", "check", "--config", cfg)
    assert r.code == 2 and "coordination.fence_command: holds a NUL character" in r.out + r.err, r
