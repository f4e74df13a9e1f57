"""What keeps a repository's snapshots from the deletion commands: the [snapshots] protect window (and
``--break-glass``), and a standby's apply hold, found in the state directory of the agent that keeps it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from drsync import engine
from drsync.cli.common import Invocation
from drsync.errors import DrsyncError, IntegrityError, RefusedError, UsageError
from drsync.protection import read_window
from drsync.storage import open_storage

BREAK_GLASS_HELP = ("Delete snapshots younger than [snapshots] protect too (operators on this cluster only; each "
                     "one is logged at WARNING and counted in the agent's state directory).")


def state_dir_for(inv: Invocation) -> str:
    """The state directory of the agent that keeps this repository: its config's, else the one the
    repository's protect.json names (when it is on this machine), else the default inside a local
    repository; "" when none can be found."""
    from drsync.agent.state import state_dir_of

    try:
        if inv.config is not None:
            return state_dir_of(inv.config)
        try:
            recorded = read_window(open_storage(inv.repo_url()))
        except (IntegrityError, RefusedError):
            recorded = None  # a damaged document stops deletions by itself (engine.protection_of)
        if recorded is not None and recorded.state_dir and (os.path.isdir(recorded.state_dir) or
                                                            recorded.host == socket.gethostname()):
            return recorded.state_dir
        return os.path.join(engine.local_path(inv.repo_url(), "repository"), "agent")
    except DrsyncError:
        return ""


def protection_args(inv: Invocation, break_glass: bool) -> dict[str, Any]:
    """The deletion commands' protection arguments: this cluster's [snapshots] protect (the window the
    repository records applies whatever is given: engine.protection_of) and, with --break-glass, the state
    directory where each protected deletion is recorded (the agent's, also with --repo alone)."""
    logging.getLogger("drsync.protection.break_glass").setLevel(logging.WARNING)  # on stderr, with who and what
    if inv.config is not None:
        from drsync.agent.state import state_dir_of

        return {"protect_window_s": inv.config.snapshots.protect,
                "break_glass_dir": state_dir_of(inv.config) if break_glass else None}
    if not break_glass:
        return {}
    recorded = read_window(open_storage(inv.repo_url()))
    if recorded is None or recorded.window_s <= 0:
        return {}  # nothing is protected here: nothing to record
    if recorded.state_dir and state_dir_for(inv) != recorded.state_dir:
        raise UsageError(f"--break-glass records each deletion in the state directory of the agent that keeps "
                         f"this repository, {recorded.state_dir} on {recorded.host or 'its machine'}, which is not "
                         f"on this machine: run the command there, or with that agent's --config")
    state_dir = state_dir_for(inv)
    if not state_dir:
        raise UsageError("--break-glass with --repo records each deletion in the state directory of the agent "
                         "that keeps this repository, and the repository names none: rerun with that agent's "
                         "--config")
    return {"break_glass_dir": state_dir}


def hold_of(inv: Invocation) -> Any:
    """The apply hold (deletion guard or operator) of the standby agent that keeps this repository, if any.

    Found in the agent's state directory: the config's, else the one the repository's protect.json names,
    else the default one inside a local ``--repo``."""
    from drsync.agent.hold import HoldFile

    state_dir = state_dir_for(inv)
    if not state_dir:
        return None
    hold = HoldFile(state_dir).load()
    return hold if hold.active or hold.flagged else None


def refuse_while_held(inv: Invocation, what: str) -> None:
    """While a standby holds applies back, its older snapshots are what an operator may need: keep them."""
    hold = hold_of(inv)
    if hold is None:
        return
    why = (f"snapshot {hold.snapshot} is held by the "
           f"{'mass-change' if hold.changed and not hold.removed else 'deletion'} guard" if hold.snapshot else
           "applies are held (drsync apply --hold)" if hold.operator_since else
           f"the mass change of snapshot {hold.flagged} is not acknowledged (drsync apply --confirm "
           f"{hold.flagged})")
    raise RefusedError(f"will not {what} in this repository while {why}: the snapshots it keeps may be the "
                       f"good copy; settle the hold first (drsync apply --confirm or --resume, with the "
                       f"standby's config)")


def own_paths(inv: Invocation, *, repository: bool = False) -> tuple[str, ...]:
    """drsync's own files that a config puts inside the data root: the agent's state directory, and with
    ``repository`` the cluster's repository (a restore from elsewhere, e.g. a backup, leaves it alone)."""
    if inv.config is None:
        return ()
    from drsync.agent.state import state_dir_of

    repo = (inv.config.cluster.repository,) if repository else ()
    try:
        return (state_dir_of(inv.config), *repo)
    except DrsyncError:
        return repo
