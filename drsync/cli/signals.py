"""How ``drsync agent`` takes signals (safety rule 7: an agent's stop is not its cluster's outage).

No signal ends a running agent the way a crash does. Those a stop is asked with (SIGTERM, SIGINT; SIGHUP
from a closed terminal or ssh session, SIGQUIT, SIGPWR, SIGXCPU) stop it as SIGTERM does: the maintenance
marker is written and no standby fails over. Those whose default would end it and that nobody sends to
stop it (SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, the real-time signals) are logged and
ignored; a write past RLIMIT_FSIZE fails (EFBIG) instead of killing it. Only SIGKILL, and faults, end it
without the marker.

:func:`early` takes them from the first moment of ``drsync agent`` (before the imports, which take a few
hundred milliseconds): a stop asked then is carried out once the agent runs (:func:`handle`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

STOPPING = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGPWR", "SIGXCPU")
IGNORED = ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGSTKFLT")
_asked: list[int] = []  # stop signals received before the agent ran


def _numbers(names: tuple[str, ...]) -> list[int]:
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def _ignored() -> list[int]:
    return _numbers(IGNORED) + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal past SIGRTMIN
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def early(argv: list[str] | None = None) -> None:
    """For ``drsync agent`` run as the drsync program (``argv``: sys.argv): a stop signal is remembered,
    the others ignored, until :func:`handle` installs the agent's own handlers. Nothing for any other
    command, nor when another program imports drsync."""
    argv = argv if argv is not None else sys.argv
    program = argv[0] if argv else ""
    if argv[1:2] != ["agent"] or not (os.path.basename(program) == "drsync"
                                     or program.endswith(os.path.join("drsync", "__main__.py"))):
        return  # another command, or drsync imported by another program
    for signum in _numbers(STOPPING):
        signal.signal(signum, lambda n, _f: _asked.append(n))
    for signum in _ignored():
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def handle(agent: Any, name: str) -> None:
    """The running agent's handlers: a stop signal sets ``agent.stop`` (logged at WARNING unless SIGTERM or
    SIGINT), an ignored one is logged at WARNING. A stop asked while the agent started is carried out now."""
    log = logging.getLogger("drsync.agent")

    def stop(signum: int, _frame: object) -> None:
        if signum not in (signal.SIGTERM, signal.SIGINT):
            log.warning("agent %s received %s: stopping as for SIGTERM", name, _name(signum))
        agent.stop.set()

    def ignore(signum: int, _frame: object) -> None:
        log.warning("agent %s received %s and ignores it: stop it with SIGTERM (systemctl stop)", name,
                    _name(signum))

    for signum in _numbers(STOPPING):
        signal.signal(signum, stop)
    for signum in _ignored():
        signal.signal(signum, ignore)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if _asked:
        log.warning("agent %s received %s while it started: stopping", name, _name(_asked[0]))
        agent.stop.set()
