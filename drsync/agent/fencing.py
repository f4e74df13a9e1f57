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

Both run through ``/bin/sh -c`` under a runner (:mod:`drsync.agent.runner`)
that is the subreaper of everything they start: a timeout, an interrupt, the
agent's death or a fence's lost ZooKeeper session kills every process they
started (a hung ``ssh``, work detached with ``setsid`` or a double fork), so a
fence never outlives its agent nor its hold on the fencing node. They get
``DRSYNC_*`` variables describing the situation; their output is logged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from drsync import allocators, documents, fsutil
from drsync.agent.runner import Ended, Runner
from drsync.coordination import Coordinator, SessionState

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
    ended: str = ""  # how it ended when not by itself nor at its timeout ("was killed: ...", "lost its runner ...")
    timeout_s: float = 0.0

    def summary(self) -> str:
        """One line: how it ended and the last line of its output."""
        if self.timed_out:
            how = f"did not finish within {self.timeout_s or self.duration_s:g}s (killed)"
        elif self.ended:
            how = self.ended
        elif self.exit_code is None:
            how = "could not be started"
        elif self.exit_code < 0:
            how = f"was killed by {_signal_name(-self.exit_code)}"
        else:
            how = f"exited with {self.exit_code}"
        last = next((ln.strip() for ln in reversed(self.output.splitlines()) if ln.strip()), "")
        return f"{self.what} {how}" + (f": {last}" if last else "")


def run_command(what: str, command: str, env: dict[str, str], timeout_s: float, *,
                reported: bool = False, abort: Callable[[], str | None] | None = None) -> CommandResult:
    """Run ``command`` with ``/bin/sh -c`` under a runner (:mod:`drsync.agent.runner`) that kills every
    process it started, detached or not, at ``timeout_s``, when ``abort`` (asked every 0.2 s) gives a
    reason, when it fails, and when this process dies or is stopped; never raises (but an interrupt, after
    all of it is killed: a fence must not go on once drsync gave up). It ends when the shell ends: a
    process a successful command left behind holding its output (``ssh`` with ControlPersist) does not
    keep the caller waiting, because the output goes to a file, not a pipe. Logs the outcome and output
    (WARNING or above when it failed; at DEBUG when ``reported``: the caller's own error line says it
    failed, with :meth:`CommandResult.summary`, and one failure makes one line)."""
    started = time.monotonic()
    try:
        out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the with below)
    except OSError as e:  # no writable temporary directory: the command is not run blind
        return _not_started(what, command, f"{e.strerror or e} (its output's file in {tempfile.gettempdir()})",
                            reported)
    with out:
        try:
            run = Runner(command, allocators.environ_for_children(env), out, timeout_s)
        except OSError as e:  # a full temporary directory, no interpreter to run the runner
            return _not_started(what, command, f"{e.strerror or e}", reported)
        except ValueError as e:  # a NUL byte
            return _not_started(what, command, str(e), reported)
        try:
            ended = run.wait(timeout_s, abort)
        finally:
            run.close()
        ending = _ending(ended, run)
        text = _tail(out)
    status = ended.status
    if status.startswith("nostart "):
        return _not_started(what, command, status[len("nostart "):], reported)
    code = int(status.split()[1]) * (-1 if status.startswith("signal") else 1) if status.startswith(
        ("exit ", "signal ")) and not ended.timed_out and not ended.aborted else None
    result = CommandResult(what, command, code == 0, code, text, round(time.monotonic() - started, 3),
                           ended.timed_out, "" if ended.timed_out else ending, timeout_s)
    if result.ok:
        log.warning("%s succeeded in %.1fs%s", what, result.duration_s, f"; output: {text.strip()}" if text.strip()
                    else "")
    else:
        log.log(logging.DEBUG if reported else logging.ERROR, "%s%s", result.summary(),
                f"; output: {text.strip()}" if text.strip() else "")
    return result


def fencing_lost(coord: Coordinator) -> Callable[[], str | None]:
    """For :func:`run_command`'s ``abort`` while a fence runs under the group's fencing node: a reason once
    ``coord``'s session is no longer connected (suspended or lost: the node may end, and the next standby
    take it and fence, while this fence would go on)."""
    def lost() -> str | None:
        state = coord.state
        if state == SessionState.CONNECTED:
            return None
        return f"drsync's ZooKeeper session is {state.value}, so it may no longer hold the group's fencing node"
    return lost


def _ending(ended: Ended, run: Runner) -> str:
    """How a run that did not end by itself ended, in words ("" when it did)."""
    if ended.aborted:
        return f"was killed: {ended.aborted}"
    if ended.status == "killed stopped":
        return "was killed: drsync was stopped (SIGSTOP, a debugger) while it ran"
    if ended.status.startswith(("exit ", "signal ", "nostart ", "killed deadline")) or ended.timed_out:
        return ""
    code = ended.runner_code
    how = f"killed by {_signal_name(-code)}" if code is not None and code < 0 else f"exit {code}"
    return f"lost its runner ({how}); {run.sweep()} process(es) still carrying its mark were killed"


def _not_started(what: str, command: str, reason: str, reported: bool) -> CommandResult:
    result = CommandResult(what, command, False, None, reason, 0.0)
    log.log(logging.DEBUG if reported else logging.ERROR, "%s", result.summary())
    return result


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
