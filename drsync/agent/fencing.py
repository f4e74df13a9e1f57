"""Fencing commands: what makes a promotion safe while production may still be writing.

Safety rule 7 (DESIGN.md): an agent is not its cluster. Before a standby
becomes primary, production's writers must be stopped by something outside
drsync, the way Hadoop's ZKFC runs its configured fencing methods before a
standby namenode becomes active:

- ``coordination.fence_command`` runs on the promoting side (the standby that
  promotes itself, or ``drsync promote`` over an earlier primary) and must
  exit 0 within ``fence_timeout``; otherwise nothing is promoted.
  ``"none"`` is the operator's explicit choice to promote without fencing.
- ``coordination.demote_command`` runs on a primary's agent as soon as it can
  no longer prove its claim (session lost, suspended past the session
  timeout, or a newer epoch names another agent), like Patroni demoting its
  own database when it loses the leader key. Its success is also what lets an
  ex-primary rejoin as a standby without ``drsync rejoin``.

Both run through ``/bin/sh -c`` under a runner that is the subreaper of
everything they start: a timeout, an interrupt or the agent's death kills every
process they started (a hung ``ssh``, work detached with ``setsid`` or a double
fork), so a fence never outlives its agent. They get ``DRSYNC_*`` variables
describing the situation; their output is logged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from drsync import allocators, documents, fsutil

log = logging.getLogger("drsync.agent.fencing")

# Output kept for the log and for error messages (the tail, where the reason usually is).
OUTPUT_KEEP = 4000


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class CommandResult:
    """How one fencing or demotion command ended."""

    what: str  # "fence_command" | "demote_command"
    command: str
    ok: bool
    exit_code: int | None  # None when it timed out or could not start; -N: killed by signal N
    output: str  # stdout and stderr, interleaved, at most OUTPUT_KEEP characters (the tail)
    duration_s: float
    timed_out: bool = False
    runner_lost: str = ""  # how its runner ended, when something else killed it before the command ended

    def summary(self) -> str:
        """One line: how it ended and the last line of its output."""
        if self.timed_out:
            how = f"did not finish within {self.duration_s:.0f}s (killed)"
        elif self.runner_lost:
            how = f"lost its runner ({self.runner_lost}) and may still run"
        elif self.exit_code is None:
            how = "could not be started"
        elif self.exit_code < 0:
            how = f"was killed by {_signal_name(-self.exit_code)}"
        else:
            how = f"exited with {self.exit_code}"
        last = next((ln.strip() for ln in reversed(self.output.splitlines()) if ln.strip()), "")
        return f"{self.what} {how}" + (f": {last}" if last else "")


def run_command(what: str, command: str, env: dict[str, str], timeout_s: float, *,
                reported: bool = False) -> CommandResult:
    """Run ``command`` with ``/bin/sh -c``; never raises (but an interrupt, after the command and everything
    it started are killed: a fence must not go on once drsync gave up). It ends when the shell ends or
    ``timeout_s`` passed (then every process the command started is killed): a process a successful command
    left behind holding its output (``ssh`` with ControlPersist, a daemon it started) does not keep the
    caller waiting, because the output goes to a file, not a pipe; what a failed one left is killed. Logs
    the outcome and output (WARNING or above when it failed; at DEBUG when ``reported``: the caller's own
    error line says it failed, with :meth:`CommandResult.summary`, and one failure makes one line).

    The shell runs under a runner (see ``_RUNNER``) that is its children's subreaper, so that a fence dies
    with the agent running it however it detached its work (``setsid``, a double fork)."""
    started = time.monotonic()
    try:
        out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the with below)
        environment = tempfile.TemporaryFile()  # noqa: SIM115
    except OSError as e:  # no writable temporary directory: the command is not run blind
        return _not_started(what, command, f"{e.strerror or e} (its output's file in {tempfile.gettempdir()})",
                            reported)
    with out, environment:
        try:
            environment.write(b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0"
                                       for k, v in allocators.environ_for_children(env).items()))
            environment.flush()
            environment.seek(0)
            runner = _Runner.start(command, out, environment, timeout_s)
        except OSError as e:  # a full temporary directory, no interpreter to run the runner
            return _not_started(what, command, f"{e.strerror or e}", reported)
        timed_out = False
        try:
            runner.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            runner.kill()
        except BaseException:  # interrupted: nothing of the command runs on
            runner.kill()
            raise
        finally:
            runner.close()
        text = _tail(out)
        how = runner.status()
    if how.startswith("nostart "):
        return _not_started(what, command, how[len("nostart "):], reported)
    code = None if timed_out or how == "" else int(how.split()[1]) * (-1 if how.startswith("signal") else 1)
    lost = "" if how or timed_out else _exit_text(runner.proc.returncode)  # somebody else killed the runner
    result = CommandResult(what, command, code == 0, code, text, round(time.monotonic() - started, 3), timed_out,
                           lost)
    if result.ok:
        log.warning("%s succeeded in %.1fs%s", what, result.duration_s, f"; output: {text.strip()}" if text.strip()
                    else "")
    else:
        log.log(logging.DEBUG if reported else logging.ERROR, "%s%s", result.summary(),
                f"; output: {text.strip()}" if text.strip() else "")
    return result


def _exit_text(code: int | None) -> str:
    return f"killed by {_signal_name(-code)}" if code is not None and code < 0 else f"exit {code}"


def _not_started(what: str, command: str, reason: str, reported: bool) -> CommandResult:
    result = CommandResult(what, command, False, None, reason, 0.0)
    log.log(logging.DEBUG if reported else logging.ERROR, "%s", result.summary())
    return result


# The runner (python -I -S; argv: limit in seconds, status fd, environment fd, command). It makes itself the
# subreaper of what it starts (prctl PR_SET_CHILD_SUBREAPER), so every process the command starts stays its
# descendant, even one that made a session of its own or was double-forked, and starts /bin/sh -c COMMAND
# with exactly the environment the agent wrote (NUL-separated, read from the environment fd: the
# interpreter's own locale coercion never reaches the command) and /dev/null as its input. Its stdout and
# stderr (the output file) are the command's. It writes how the shell ended to the status fd ("exit N",
# "signal N", or "nostart REASON") and exits once the shell has ended; when the shell failed, it first kills
# what the command left running (a failed fence releases the fencing node: nothing of it may run on beside
# the next standby's; a successful one's ssh master connection may stay). It kills every process descending
# from it (stopping them first, so none forks away meanwhile) and exits without a status when its stdin (a
# pipe whose writing end only the agent holds) reaches its end (the agent died, kill -9 included), the agent
# is stopped (SIGSTOP, a debugger: its ZooKeeper session and fencing node end while it cannot act), it is
# sent SIGTERM (the agent's timeout or interrupt), or the limit passed (the agent could not end it).
_RUNNER = """
import ctypes, os, select, signal, sys, time
limit, status_fd, env_fd, command = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
agent, me = os.getppid(), os.getpid()
os.set_inheritable(status_fd, False)
with os.fdopen(env_fd, "rb") as f:
    env = dict(e.split(b"=", 1) for e in f.read().split(b"\\0") if b"=" in e)
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
try:
    shell = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", command], env, setsid=True,
                           file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)])
except OSError as e:
    os.write(status_fd, ("nostart " + (e.strerror or str(e))).encode())
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
        os.write(status_fd, (("signal %d" % -code) if code < 0 else ("exit %d" % code)).encode())
        break
    if term or stopped() or time.monotonic() >= end:
        kill_all()
        break
    ready = select.select([0, wake_r], [], [], 0.5)[0]
    if 0 in ready:
        kill_all()
        break
    if wake_r in ready:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
"""


@dataclass
class _Runner:
    """The runner process of one command, and the agent's ends of its pipes."""

    proc: subprocess.Popen[bytes]
    alive_w: int  # the agent holds it open while it lives; the runner kills everything at its end
    status_r: int

    @classmethod
    def start(cls, command: str, out: IO[bytes], environment: IO[bytes], timeout_s: float) -> _Runner:
        """Start the runner (raises OSError when it cannot be started)."""
        alive_r, alive_w = os.pipe()
        status_r, status_w = os.pipe()
        for fd in (alive_w, status_r):
            os.set_inheritable(fd, False)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _RUNNER, str(timeout_s + 5), str(status_w),
                 str(environment.fileno()), command],
                stdin=alive_r, stdout=out, stderr=subprocess.STDOUT, pass_fds=(status_w, environment.fileno()),
                env={}, start_new_session=True)
        except BaseException:
            os.close(alive_w)
            os.close(status_r)
            raise
        finally:
            os.close(alive_r)
            os.close(status_w)
        return cls(proc, alive_w, status_r)

    def kill(self) -> None:
        """End the command and every process it started (the runner does it; SIGKILL if it cannot)."""
        try:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        os.close(self.alive_w)

    def status(self) -> str:
        """How the shell ended ("exit N", "signal N", "nostart REASON"), or "" when it was killed."""
        try:
            return os.read(self.status_r, 4096).decode(errors="replace")
        finally:
            os.close(self.status_r)


def _tail(out: IO[bytes]) -> str:
    """The last ``OUTPUT_KEEP`` characters of what the command wrote to ``out``."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * OUTPUT_KEEP))
    return out.read().decode(errors="replace")[-OUTPUT_KEEP:]


def fence_env(*, group: str, agent: str, fenced_agent: str, fenced_address: str, epoch: int,
              data: str) -> dict[str, str]:
    """Variables for fence_command: who promotes (and its data root), whom to fence, and the epoch
    being replaced."""
    return {"DRSYNC_GROUP": group, "DRSYNC_AGENT": agent, "DRSYNC_FENCE_AGENT": fenced_agent,
            "DRSYNC_FENCE_ADDRESS": fenced_address, "DRSYNC_EPOCH": str(epoch), "DRSYNC_DATA": data}


def demote_env(*, group: str, agent: str, epoch: int, reason: str, data: str) -> dict[str, str]:
    """Variables for demote_command; ``reason`` is ``lost``, ``suspended``, ``fenced`` or ``rejoin``."""
    return {"DRSYNC_GROUP": group, "DRSYNC_AGENT": agent, "DRSYNC_EPOCH": str(epoch), "DRSYNC_REASON": reason,
            "DRSYNC_DATA": data}


# --- drsync rejoin: an operator's word that an ex-primary's writers are stopped ---------------------

REJOIN_FILE = "rejoin.json"


def approve_rejoin(state_dir: str, doc: dict[str, object]) -> str:
    """Record (durably, in the agent's state directory) that the ex-primary may rejoin as a standby.
    Returns the file's path."""
    path = os.path.join(state_dir, REJOIN_FILE)
    fsutil.atomic_write(path, json.dumps(doc, sort_keys=True).encode(), durable=True)
    return path


def rejoin_approved(state_dir: str) -> dict[str, object] | None:
    """The operator's approval, when one is recorded."""
    try:
        with open(os.path.join(state_dir, REJOIN_FILE), "rb") as f:
            doc = documents.loads(f.read() or b"{}", allow_nan=True)
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else {}


def clear_rejoin_approval(state_dir: str) -> None:
    """Consumed once the ex-primary has rejoined: the next time it needs a new word."""
    try:
        os.unlink(os.path.join(state_dir, REJOIN_FILE))
    except FileNotFoundError:
        pass
