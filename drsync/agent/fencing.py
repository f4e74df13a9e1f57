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

Both run through ``/bin/sh -c`` in their own process group (a timeout kills
the whole group, so a hung ``ssh`` cannot outlive it) with ``DRSYNC_*``
variables describing the situation; their output is logged.
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

    def summary(self) -> str:
        """One line: how it ended and the last line of its output."""
        if self.timed_out:
            how = f"did not finish within {self.duration_s:.0f}s (killed)"
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
    """Run ``command`` with ``/bin/sh -c``; never raises (but an interrupt, after the command's process
    group is killed: a fence must not go on once drsync gave up). It ends when the shell ends or
    ``timeout_s`` passed (then its whole process group is killed): a process it left behind holding its
    output (``ssh`` with ControlPersist, a daemon it started) does not keep the caller waiting, because
    the output goes to a file, not a pipe. Logs the outcome and output (WARNING or above when it failed;
    at DEBUG when ``reported``: the caller's own error line says it failed, with
    :meth:`CommandResult.summary`, and one failure makes one line)."""
    started = time.monotonic()
    try:
        out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the with below)
    except OSError as e:  # no writable temporary directory: the command is not run blind
        return _not_started(what, command, f"{e.strerror or e} (its output's file in {tempfile.gettempdir()})",
                            reported)
    with out:
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=allocators.environ_for_children(env),
                                    start_new_session=True)
        except OSError as e:
            return _not_started(what, command, f"{e.strerror or e}", reported)
        watchdog = _watchdog(proc.pid, timeout_s)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # interrupted: nothing of the command runs on
            _kill_group(proc)
            raise
        finally:
            _stop_watchdog(watchdog)
        text = _tail(out)
    code = None if timed_out else proc.returncode
    result = CommandResult(what, command, code == 0, code, text, round(time.monotonic() - started, 3), timed_out)
    if result.ok:
        log.warning("%s succeeded in %.1fs%s", what, result.duration_s, f"; output: {text.strip()}" if text.strip()
                    else "")
    else:
        log.log(logging.DEBUG if reported else logging.ERROR, "%s%s", result.summary(),
                f"; output: {text.strip()}" if text.strip() else "")
    return result


def _not_started(what: str, command: str, reason: str, reported: bool) -> CommandResult:
    result = CommandResult(what, command, False, None, reason, 0.0)
    log.log(logging.DEBUG if reported else logging.ERROR, "%s", result.summary())
    return result


# The watchdog (python -I -S): waits until its stdin (a pipe whose writing end only the agent holds) reaches
# its end (the agent died, kill -9 included), the agent is stopped (SIGSTOP, a debugger: its ZooKeeper
# session and fencing node end while it cannot act), or argv[2] seconds passed (the agent cannot kill the
# command at its timeout); then stops and kills every process descending from the command (found by
# their parents in /proc, so one that made a session of its own is found too) and the command's process
# group. The agent kills the watchdog's own process group once the command is over.
_WATCHDOG = """
import os, select, signal, sys, time
top, limit, agent = int(sys.argv[1]), float(sys.argv[2]), os.getppid()
def stopped():
    try:
        with open("/proc/%d/stat" % agent, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False
end = time.monotonic() + limit
while time.monotonic() < end and not select.select([0], [], [], 0.5)[0] and not stopped():
    pass
def children():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/" + d + "/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out
seen = set()
for _ in range(5):
    kids, todo, found = children(), [top], []
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            found.append(p)
        todo += [c for c in kids.get(p, ()) if c not in seen]
    for p in found:
        try:
            os.kill(p, signal.SIGSTOP)
        except OSError:
            pass
    if not found:
        break
for p in seen:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
try:
    os.killpg(top, signal.SIGKILL)
except OSError:
    pass
"""


def _watchdog(pgid: int, timeout_s: float) -> tuple[subprocess.Popen[bytes], int] | None:
    """A process that kills the command and everything it started if this process dies first, or has not
    killed it a little after ``timeout_s`` (frozen), so that a fence never outlives the agent (and its
    ZooKeeper fencing node) that ran it; None when it cannot be started (the command still runs, as
    before). A process the command detached entirely (double fork) is beyond it."""
    try:
        rfd, wfd = os.pipe()
    except OSError:
        return None
    try:
        os.set_inheritable(wfd, False)
        dog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pgid), str(timeout_s + 5)],
                               stdin=rfd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        os.close(wfd)
        return None
    finally:
        os.close(rfd)
    return dog, wfd


def _stop_watchdog(watchdog: tuple[subprocess.Popen[bytes], int] | None) -> None:
    if watchdog is None:
        return
    dog, wfd = watchdog
    try:
        try:
            os.killpg(dog.pid, signal.SIGKILL)  # the shell and its timer
        except ProcessLookupError:
            pass
        dog.wait()
    finally:
        os.close(wfd)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
