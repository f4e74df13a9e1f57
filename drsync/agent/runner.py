"""The process that runs a fence or demote command, so that nothing the command starts outlives the agent.

``/bin/sh -c COMMAND`` runs under a small runner (``python -I -S``, :data:`_RUNNER`) that makes itself the
child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): every process the command starts stays the runner's
descendant, even one that made a session of its own (``setsid``) or was double-forked, so the runner finds
them all by their parents in ``/proc``. The runner kills them all (stopped first, so none forks away
meanwhile) when:

- the agent dies (kill -9 included: its stdin, a pipe whose writing end only the agent holds, ends);
- the agent is stopped (SIGSTOP, a debugger: its ZooKeeper session and fencing node end while it cannot act);
- it is sent SIGTERM (the agent's timeout, an interrupt, or the agent's session lost: :meth:`Runner.kill`);
- its own limit passed (the command's timeout and 5 s: the agent could not end it);
- the shell failed (a failed fence releases the fencing node: nothing of it may run on beside the next
  standby's; what a successful one leaves, an ssh master connection, may stay).

Should the runner itself be frozen or killed by somebody else, the agent kills the runner's descendants
itself, and every process still carrying the run's mark (``DRSYNC_FENCE_RUN`` in its environment, which
all the command's processes inherit unless they clear it).

The command and its environment reach the runner through a file, not its command line: the command gets
exactly the environment the agent wrote (the interpreter's own locale coercion never reaches it), and a
fence's ``pkill -f PATTERN`` cannot match its runner. The runner writes how it ended to a status pipe:
``exit N``, ``signal N``, ``nostart REASON``, or ``killed WHY`` (``agent``, ``stopped``, ``term``,
``deadline``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

MARK = "DRSYNC_FENCE_RUN"  # the variable naming one run of a command, inherited by all it starts
EXTRA_S = 5.0  # the runner's own limit: the command's timeout and this

_RUNNER = """
import ctypes, os, select, signal, sys, time
limit, status_fd, env_fd = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
agent, me = os.getppid(), os.getpid()
os.set_inheritable(status_fd, False)
with os.fdopen(env_fd, "rb") as f:
    items = f.read().split(b"\\0")
command, env = items[0], dict(e.split(b"=", 1) for e in items[1:] if b"=" in e)
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
except Exception:
    pass
wake_r, wake_w = os.pipe()
for fd in (wake_r, wake_w):
    os.set_blocking(fd, False)
signal.set_wakeup_fd(wake_w)
term = []
signal.signal(signal.SIGTERM, lambda *a: term.append(1))
signal.signal(signal.SIGCHLD, lambda *a: None)
def say(text):
    os.write(status_fd, text.encode())
try:
    shell = os.posix_spawn("/bin/sh", [b"/bin/sh", b"-c", command], env, setsid=True,
                           file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)])
except (OSError, ValueError) as e:
    say("nostart " + (getattr(e, "strerror", None) or str(e)))
    sys.exit(0)
def stopped():
    try:
        with open("/proc/%d/stat" % agent, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False
def reap():
    ended = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        if pid == shell:
            ended = st
def descendants():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/" + d + "/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    found, todo = [], list(kids.get(me, ()))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += kids.get(p, ())
    return found
def kill_all():
    seen = set()
    for _ in range(100):
        new = [p for p in descendants() if p not in seen]
        if not new:
            break
        for p in new:
            seen.add(p)
            try:
                os.kill(p, signal.SIGSTOP)
            except OSError:
                pass
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    end = time.monotonic() + 5
    while time.monotonic() < end:
        reap()
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.01)
        except ChildProcessError:
            break
end = time.monotonic() + limit
while True:
    st = reap()
    if st is not None:
        code = os.waitstatus_to_exitcode(st)
        if code != 0:
            kill_all()
        say(("signal %d" % -code) if code < 0 else ("exit %d" % code))
        break
    why = "term" if term else "stopped" if stopped() else "deadline" if time.monotonic() >= end else None
    if why is None and 0 in select.select([0, wake_r], [], [], 0.5)[0]:
        why = "agent"
    if why is not None:
        kill_all()
        say("killed " + why)
        break
    try:
        os.read(wake_r, 4096)
    except BlockingIOError:
        pass
"""


@dataclass
class Ended:
    """How a run ended: ``status`` as the runner wrote it ("" when it wrote none), ``timed_out`` (killed at
    the timeout), ``aborted`` (the reason ``abort`` gave), ``runner_code`` (the runner's own exit)."""

    status: str
    timed_out: bool
    aborted: str
    runner_code: int | None


class Runner:
    """One run of a command under the runner process. Raises OSError (or ValueError: a NUL byte in the
    command) when it cannot be started."""

    def __init__(self, command: str, env: dict[str, str], out: IO[bytes], timeout_s: float) -> None:
        self.mark = secrets.token_hex(8)
        self.env_file = _environment_file(command, {**env, MARK: self.mark})
        try:
            alive_r, self.alive_w = os.pipe()  # the runner's stdin: it ends when this process does
            self.status_r, status_w = os.pipe()
        except BaseException:
            self.env_file.close()
            raise
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _RUNNER, str(timeout_s + EXTRA_S), str(status_w),
                 str(self.env_file.fileno())],
                stdin=alive_r, stdout=out, stderr=subprocess.STDOUT, pass_fds=(status_w, self.env_file.fileno()),
                env={}, start_new_session=True)
        except BaseException:
            self._close()
            raise
        finally:
            os.close(alive_r)
            os.close(status_w)

    def wait(self, timeout_s: float, abort: Callable[[], str | None] | None = None) -> Ended:
        """Until the runner ends, killing the command at ``timeout_s`` or when ``abort`` (asked every 0.2 s)
        gives a reason; on an interrupt, kills it and lets the interrupt go on."""
        deadline = time.monotonic() + timeout_s
        timed_out, aborted = False, ""
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    self.proc.wait(timeout=max(0.0, min(left, 0.2) if abort is not None else left))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() >= deadline:
                    timed_out = True
                elif abort is not None:
                    aborted = abort() or ""
                if timed_out or aborted:
                    self.kill()
                    break
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(self.alive_w)
        status = self._read_status()
        if status == "killed deadline":
            timed_out = True
        return Ended(status, timed_out, aborted, self.proc.returncode)

    def kill(self) -> None:
        """End the command and every process it started: the runner does it on SIGTERM; should it not end
        within 10 s (frozen), this process kills its descendants and it; should it be gone already without
        having done so (killed by somebody else), every process carrying the run's mark is killed."""
        try:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_all([self.proc.pid, *_descendants(self.proc.pid)])
            self.proc.wait()
            self.sweep()

    def sweep(self) -> int:
        """Kill every process still carrying this run's mark (its runner was lost); how many there were.
        Passes until one finds none, so that a process forked meanwhile is caught too."""
        killed: set[int] = set()
        for _ in range(20):
            found = [p for p in _marked(MARK, self.mark) if p not in killed]  # a killed one may linger a moment
            if not found:
                break
            _kill_all(found)
            killed.update(found)
        end = time.monotonic() + 5
        while time.monotonic() < end and not all(_dead(p) for p in killed):  # SIGKILL takes effect a moment later
            time.sleep(0.01)
        return len(killed)

    def close(self) -> None:
        self.env_file.close()

    def _read_status(self) -> str:
        try:
            return os.read(self.status_r, 4096).decode(errors="replace")
        finally:
            os.close(self.status_r)
            self.status_r = -1

    def _close(self) -> None:
        for fd in (self.alive_w, self.status_r):
            if fd >= 0:
                os.close(fd)
        self.env_file.close()


def _environment_file(command: str, env: dict[str, str]) -> IO[bytes]:
    """An unlinked temporary file holding the command, then each ``NAME=VALUE``, NUL-terminated (raises
    OSError: no writable temporary directory or a full one; ValueError: a NUL byte in them)."""
    items = [os.fsencode(command), *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())]
    if any(b"\0" in i for i in items):
        raise ValueError("the command or its environment holds a NUL byte")
    f = tempfile.TemporaryFile()  # noqa: SIM115 (the Runner closes it)
    try:
        f.write(b"".join(i + b"\0" for i in items))
        f.flush()
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list[int]:
    kids = _children()
    found, todo = [], list(kids.get(pid, ()))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += kids.get(p, ())
    return found


def _marked(name: str, value: str) -> list[int]:
    """The processes whose environment holds ``name=value`` (those this process may read)."""
    needle = f"{name}={value}".encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(d))
            except OSError:
                continue
    return found


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _kill_all(pids: list[int]) -> None:
    """Stop, then kill, ``pids``."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
