"""One agent of a group fences at a time (Hadoop ZKFC's order: the lock first, then the fence). Before its
fence_command runs, an agent or `drsync promote` takes the group's ephemeral ``fencing`` node; another that
finds it held does not fence: a standby waits (and says so), `drsync promote` is refused (exit 4). The node
ends with its holder's session; one left for an earlier epoch is taken over. Real ZooKeeper, real agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from drsync.coordination.zookeeper import ZooKeeperCoordinator
from tests.group import wait_for
from tests.procs import alive
from tests.test_failover import bootstrap


def _session(hosts: str, group: str) -> ZooKeeperCoordinator:
    c = ZooKeeperCoordinator(hosts, group, session_timeout_s=10.0)
    c.start()
    return c


def test_the_fencing_node_is_held_by_one_session_at_a_time(zk_server, group: str) -> None:
    a, b = _session(zk_server.hosts, group), _session(zk_server.hosts, group)
    try:
        assert a.take_fencing("east-2", 4) == ""
        assert a.take_fencing("east-2", 4) == "", "the holder takes it again"
        assert b.take_fencing("east-3", 4) == "east-2"
        b.release_fencing()  # not b's: nothing happens
        assert b.take_fencing("east-3", 4) == "east-2"
        a.release_fencing()
        assert b.take_fencing("east-3", 4) == ""
        assert a.take_fencing("east-2", 5) == "", "a node left for an earlier epoch is taken over"
        assert b.take_fencing("east-3", 5) == "east-2"
    finally:
        a.close()
    try:
        assert b.take_fencing("east-3", 5) == "", "the node did not end with its holder's session"
    finally:
        b.close()


def test_a_standby_does_not_fence_while_another_holds_the_fencing_node(make_group, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    attempts = tmp_path / "fence-attempts"
    g = make_group(["east", "west"], session_timeout="2s", failover="automatic",
                   extra=f'failover_cooldown = "0s"\nfence_command = "echo $DRSYNC_AGENT >> {attempts}"\n')
    bootstrap(g)
    other = _session(g.hosts, g.group)
    try:
        assert other.take_fencing("east-2", 1) == ""  # another standby of the group is fencing east
        r = g.drsync("west", "promote", "--force")
        assert r.code == 4 and "agent east-2 is fencing east" in r.err, r
        g.kill("east")
        wait_for(lambda: "agent east-2 is fencing it to take over; this agent waits" in g.log("west"),
                 "west to see the fencing node held and wait", timeout=45)
        assert not attempts.exists(), "west ran fence_command while another agent held the fencing node"
        assert g.primary() is None
    finally:
        other.close()  # the other standby's session ends: west may fence now
    wait_for(lambda: (p := g.primary()) is not None and p[0] == "west", "west to fence and promote", timeout=45)
    assert attempts.read_text().split() == ["west"]


def _fence_in_a_child(tmp_path: Path, timeout_s: float, detach: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """A process running run_command("fence_command", ...) that never ends by itself; (it, the fence's pid).
    ``detach``: the fence's work is double-forked into a session of its own (its parent ends at once), and
    the pid is that work's."""
    pid_file = tmp_path / "fence.pid"
    work = f"echo $$ > {pid_file}; exec sleep {3600 if detach else 300}"  # detached: outlives any wait below
    command = f"( setsid sh -c '{work}' & ); sleep 300" if detach else work
    code = ("import sys; from drsync.agent.fencing import run_command; "
            f"run_command('fence_command', {command!r}, {{}}, {timeout_s})")
    child = subprocess.Popen([sys.executable, "-c", code])
    pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), "the fence to start")
    return child, int(pid)


def test_a_fence_dies_with_the_process_that_runs_it(tmp_path: Path) -> None:
    child, fence = _fence_in_a_child(tmp_path, 300)
    child.kill()
    child.wait()
    wait_for(lambda: not alive(fence), "the fence to be killed with the process that ran it")


def test_a_fence_of_a_frozen_process_is_killed_after_its_timeout(tmp_path: Path) -> None:
    child, fence = _fence_in_a_child(tmp_path, 1)
    child.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(fence), "the fence to be killed although its runner is frozen", timeout=30)
    finally:
        child.send_signal(signal.SIGCONT)
        child.wait()


def test_a_double_forked_fence_dies_with_the_process_that_runs_it(tmp_path: Path) -> None:
    """The fence's work is orphaned at once (a double fork into a session of its own, as daemonising tools
    do): it is still found and killed when the process running the fence is killed -9 (the runner is the
    subreaper of everything the fence starts)."""
    child, work = _fence_in_a_child(tmp_path, 300, detach=True)
    try:
        child.kill()
        child.wait()
        wait_for(lambda: not alive(work), "the double-forked fence to be killed with the process that ran it")
    finally:
        _kill(work)


def test_a_double_forked_fence_is_killed_at_its_timeout(tmp_path: Path) -> None:
    """A fence that does not finish within fence_timeout is killed with all it started, detached or not."""
    child, work = _fence_in_a_child(tmp_path, 2, detach=True)
    try:
        assert child.wait(timeout=120) == 0
        wait_for(lambda: not alive(work), "the double-forked fence to be killed at the fence's timeout")
    finally:
        child.kill()
        _kill(work)


def _kill(pid: int) -> None:
    """Kill a fence's process a failed test left behind."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_what_a_failed_fence_left_running_is_killed_and_a_successful_ones_may_stay(tmp_path: Path) -> None:
    """A failed fence releases the fencing node, so the next standby may fence: nothing the failed one started
    runs on (a detached `ipmitool` retry loop would act beside the next fence). A successful fence's leftover
    (an ssh master connection) is not waited for and stays (README, Fencing)."""
    from drsync.agent.fencing import run_command

    pids = {}
    for outcome in ("failed", "ok"):
        pid_file = tmp_path / outcome
        command = f"( setsid sh -c 'echo $$ > {pid_file}; exec sleep 3600' & ); " + \
            f"while [ ! -s {pid_file} ]; do sleep 0.01; done; exit {1 if outcome == 'failed' else 0}"
        r = run_command("fence_command", command, {}, 60)
        assert r.ok == (outcome == "ok"), r
        pids[outcome] = int(pid_file.read_text())
    try:
        assert not alive(pids["failed"]), "a process the failed fence started still runs after run_command returned"
        assert alive(pids["ok"]), "the successful fence's leftover was killed"
    finally:
        for pid in pids.values():
            _kill(pid)


def test_a_fence_whose_runner_is_killed_by_somebody_else_is_a_failure_and_is_killed_by_its_mark(
        tmp_path: Path) -> None:
    """The runner killed -9 from outside (an OOM killer, an operator's kill): the fence is not taken as done,
    the line says so, and the fence's processes (no longer anybody's descendants) are found by the mark in
    their environment and killed before run_command returns."""
    import threading

    from drsync.agent.fencing import run_command

    pid_file, result = tmp_path / "fence.pid", []
    worker = threading.Thread(target=lambda: result.append(run_command(
        "fence_command", f"echo $$ > {pid_file}; exec sleep 300", {}, 300)))
    worker.start()
    fence = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), "the fence to start"))
    try:
        runner = int(Path(f"/proc/{fence}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(runner, signal.SIGKILL)
        worker.join(timeout=120)
        assert result and not result[0].ok, result
        assert "lost its runner (killed by SIGKILL" in result[0].summary(), result[0].summary()
        assert "1 process(es) still carrying its mark were killed" in result[0].summary(), result[0].summary()
        assert not alive(fence), "the fence still runs after its runner was lost"
    finally:
        _kill(fence)
