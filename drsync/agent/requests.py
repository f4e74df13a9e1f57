"""Operator requests to a running agent: a file dropped into its state directory, a reply beside it.

The command line (another process, with the agent's config) asks the agent to do something that must
happen inside it, e.g. apply a snapshot under the receiver's commit lock, never beside a shipment.
:func:`submit` is the command line's side: when no agent holds the state directory
(:class:`~drsync.agent.locks.StateDirLock`), it takes the lock itself and carries the request out
directly with an agent its caller opens without network (``open_agent``: the command line passes one
that makes an :class:`~drsync.agent.loop.Agent`, so this module never imports the wiring above it);
otherwise it writes a request file and waits (bounded) for the reply. The running agent calls
:func:`serve_pending` from a thread of its own about five times a second.

Files, in ``<state_dir>/requests/`` (each written whole: temp file, fsync, rename):

``<id>.request.json``
    written by the command line: ``{"id", "action", "args": {...}, "created_at", "pid", "user"}``.
    ``<id>`` is ``<time in ns, 20 digits>-<pid>-<8 hex>``: requests are carried out in that order.
``<id>.taken.json``
    the request, renamed by the agent before it acts. A command that gives up waiting removes its
    ``.request.json``: if that works, nothing was done; if the file is gone, the agent has it.
``<id>.reply.json``
    written by the agent: ``{"id", "action", "ok", "exit_code", "message", "result": {...}, "agent",
    "done_at"}``; ``exit_code`` follows DESIGN.md (0 ok, 1 failed, 2 usage, 4 refused for safety).
    The command line reads and removes it; replies nobody collected are removed after an hour.

An action is one function registered with :func:`action`: ``handler(agent, args) -> dict`` carries the
request out with the agent it is given (the running one, or one the command line opened) and returns a
JSON-able result whose ``"message"`` is one line for a human; it raises a DrsyncError when the request is
refused or fails (the error's exit code and message go back). Example::

    @action("rejoin")
    def _rejoin(agent, args):
        ...
        return {"message": "agent west rejoins as standby"}

and on the command line ``reply = submit(cfg, "rejoin", {}, wait_s=30)``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from drsync import documents, fsutil
from drsync.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, DrsyncError, OperationFailed, UsageError

if TYPE_CHECKING:
    from drsync.agent.standby import StandbyReceiver
    from drsync.config import Config

log = logging.getLogger("drsync.agent.requests")


class Agent(Protocol):
    """What a request action needs of the agent that carries it out (:class:`drsync.agent.loop.Agent`)."""

    name: str
    receiver: StandbyReceiver | None

    @property
    def acting(self) -> str: ...

    def close(self) -> None: ...


OpenAgent = Callable[["Config"], Agent]  # an agent of this config opened without network, for direct requests
Handler = Callable[[Agent, dict[str, Any]], dict[str, Any]]
ACTIONS: dict[str, Handler] = {}
REPLY_KEEP_S = 3600.0
POLL_S = 0.1
ALIVE_CHECK_S = 1.0  # how often a waiting command checks that the agent still runs


@dataclass
class Reply:
    id: str
    action: str
    ok: bool
    exit_code: int
    message: str
    result: dict[str, Any] = field(default_factory=dict)
    agent: str = ""
    done_at: float = 0.0
    via: str = "agent"  # "agent": carried out by the running agent; "direct": by the command line

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def action(name: str) -> Callable[[Handler], Handler]:
    """Register ``handler(agent, args) -> dict`` as the request action ``name``."""

    def register(fn: Handler) -> Handler:
        ACTIONS[name] = fn
        return fn

    return register


def requests_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "requests")


def carry_out(agent: Agent, name: str, args: dict[str, Any], request_id: str = "") -> Reply:
    """Run one action; never raises for a DrsyncError (it becomes a reply with its exit code)."""
    handler = ACTIONS.get(name)
    if handler is None:
        return Reply(request_id, name, False, EXIT_USAGE, f"agent {agent.name} knows no request {name!r} "
                     f"(known: {', '.join(sorted(ACTIONS))}); is it running an older drsync?", agent=agent.name,
                     done_at=time.time())
    try:
        result = handler(agent, args)
    except DrsyncError as e:
        return Reply(request_id, name, False, e.exit_code, str(e), agent=agent.name, done_at=time.time())
    except Exception as e:  # a bug must not take the agent's loop down: say so, with the details in its log
        log.exception("agent %s: request %s (%s) failed", agent.name, request_id or "(direct)", name)
        return Reply(request_id, name, False, EXIT_FAILED, f"internal error carrying out {name}: "
                     f"{type(e).__name__}: {e}; see the agent's log", agent=agent.name, done_at=time.time())
    return Reply(request_id, name, True, EXIT_OK, str(result.get("message", "done")), result, agent.name,
                 time.time())


# --- the command line's side ------------------------------------------------------------------


def submit(cfg: Config, name: str, args: dict[str, Any], *, wait_s: float,
           open_agent: OpenAgent | None = None) -> Reply:
    """Have this config's agent carry out ``name``: through the running agent, or here (with the agent
    ``open_agent`` opens) when none runs.

    Returns the reply (``ok`` False with its exit code when refused or failed); raises OperationFailed
    when a running agent did not answer within ``wait_s`` seconds (the message says whether it has
    the request), or when none runs and no ``open_agent`` is given."""
    from drsync.agent.locks import StateDirLock
    from drsync.agent.state import state_dir_of

    if name not in ACTIONS:
        raise UsageError(f"unknown request {name!r}")
    state_dir = state_dir_of(cfg)
    try:
        lock = StateDirLock(state_dir)
    except OperationFailed:
        lock = None  # an agent runs: ask it
    if lock is None:
        request_id = write_request(state_dir, name, args)
        return wait_reply(state_dir, request_id, wait_s=wait_s, what=f"agent {cfg.agent.name}")
    try:
        if open_agent is None:
            raise OperationFailed(f"agent {cfg.agent.name} does not run on this machine (its state directory "
                                  f"{state_dir} is not locked): start it and ask again; nothing was changed")
        agent = open_agent(cfg)
        try:
            reply = carry_out(agent, name, args)
        finally:
            agent.close()
    finally:
        lock.release()
    reply.via = "direct"
    return reply


def write_request(state_dir: str, name: str, args: dict[str, Any]) -> str:
    request_id = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    doc = {"id": request_id, "action": name, "args": args, "created_at": time.time(), "pid": os.getpid(),
           "user": user}
    d = requests_dir(state_dir)
    os.makedirs(d, exist_ok=True)
    fsutil.atomic_write(os.path.join(d, f"{request_id}.request.json"), json.dumps(doc).encode())
    return request_id


def wait_reply(state_dir: str, request_id: str, *, wait_s: float, what: str = "the agent") -> Reply:
    """The reply to ``request_id``, waited for at most ``wait_s`` seconds, and no longer than the agent
    runs (an agent that stops while it carries a request out ends the wait: OperationFailed)."""
    from drsync.agent.locks import StateDirLock

    d = requests_dir(state_dir)
    reply_path = os.path.join(d, f"{request_id}.reply.json")
    deadline = time.monotonic() + wait_s
    next_alive_check = time.monotonic() + ALIVE_CHECK_S
    while True:
        try:
            with open(reply_path, "rb") as f:
                doc = documents.loads(f.read(), allow_nan=True)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                break
            if time.monotonic() >= next_alive_check:
                next_alive_check = time.monotonic() + ALIVE_CHECK_S
                if not StateDirLock.held(state_dir) and not os.path.exists(reply_path):
                    try:
                        os.unlink(os.path.join(d, f"{request_id}.request.json"))
                        raise OperationFailed(f"{what} stopped before it took the request; nothing was done: "
                                              f"start it and try again") from None
                    except FileNotFoundError:
                        raise OperationFailed(
                            f"{what} stopped while carrying out request {request_id}; it may have done part of it "
                            f"(an interrupted apply completes when the agent starts again): start it, then check "
                            f"the state with drsync status") from None
            time.sleep(POLL_S)
            continue
        os.unlink(reply_path)
        known = set(Reply.__dataclass_fields__)
        return Reply(**{k: v for k, v in doc.items() if k in known})
    try:
        os.unlink(os.path.join(d, f"{request_id}.request.json"))
    except FileNotFoundError:
        raise OperationFailed(f"{what} took the request but did not answer within {wait_s:g}s; it may still "
                              f"carry it out: check its log, and the state with the same command without "
                              f"options") from None
    raise OperationFailed(f"{what} did not pick the request up within {wait_s:g}s (is its loop stuck? see its "
                          f"log); the request was withdrawn, nothing was done")


# --- the agent's side -----------------------------------------------------------------------------


def serve_pending(state_dir: str, agent: Agent) -> int:
    """Carry out every request waiting in ``state_dir``, oldest first; returns how many. Called by the
    agent that holds the state directory, from its one requests thread (so requests run one at a time)."""
    d = requests_dir(state_dir)
    try:
        names = sorted(n for n in os.listdir(d) if not n.startswith("."))
    except FileNotFoundError:
        return 0
    done = 0
    now = time.time()
    for n in names:
        path = os.path.join(d, n)
        request_id = n.split(".", 1)[0]
        if n.endswith(".reply.json"):
            _remove_if_older(path, now - REPLY_KEEP_S)
            continue
        if n.endswith(".taken.json"):  # taken by an agent that stopped before it replied
            _reply(d, Reply(request_id, "", False, EXIT_FAILED, f"agent {agent.name} stopped while carrying out "
                            f"this request; check the state before you ask again", agent=agent.name,
                            done_at=now))
            os.unlink(path)
            continue
        if not n.endswith(".request.json"):
            continue
        taken = os.path.join(d, f"{request_id}.taken.json")
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            continue  # withdrawn by a command that gave up
        try:
            with open(taken, "rb") as f:
                doc = documents.loads(f.read(), allow_nan=True)
            name, args = str(doc["action"]), dict(doc.get("args") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            reply = Reply(request_id, "", False, EXIT_USAGE, f"malformed request {n}: {e}", agent=agent.name,
                          done_at=time.time())
        else:
            log.warning("agent %s: request %s from %s (pid %s): %s %s", agent.name, request_id,
                        doc.get("user", "?"), doc.get("pid", "?"), name, json.dumps(args, sort_keys=True))
            reply = carry_out(agent, name, args, request_id)
            log.log(logging.WARNING if reply.ok else logging.ERROR, "agent %s: request %s %s: %s", agent.name,
                    request_id, "done" if reply.ok else "not done", reply.message)
        _reply(d, reply)
        os.unlink(taken)
        done += 1
    return done


def _reply(d: str, reply: Reply) -> None:
    fsutil.atomic_write(os.path.join(d, f"{reply.id}.reply.json"), json.dumps(reply.as_dict()).encode())


def _remove_if_older(path: str, before: float) -> None:
    try:
        if os.stat(path).st_mtime < before:
            os.unlink(path)
    except FileNotFoundError:
        pass


# --- the actions ------------------------------------------------------------------------------------


def _receiver(agent: Agent) -> StandbyReceiver:
    rx = agent.receiver
    if rx is None or agent.acting == "primary":
        raise UsageError(f"agent {agent.name} acts as primary: it applies nothing; run drsync apply with a "
                         f"standby's config")
    return rx


@action("apply-confirm")
def _apply_confirm(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Apply the snapshot the deletion guard holds; ``args["snapshot"]`` must name it."""
    return _receiver(agent).confirm(str(args.get("snapshot", "")))


@action("apply-hold")
def _apply_hold(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """The operator's hold: store shipments, apply none until apply-resume."""
    return _receiver(agent).hold_applies()


@action("apply-resume")
def _apply_resume(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Lift the operator's hold (and apply the newest snapshot stored meanwhile, guard permitting)."""
    return _receiver(agent).resume()


@action("promote-prepare")
def _promote_prepare(agent: Agent, args: dict[str, Any]) -> dict[str, Any]:
    """Before a promotion at a recovery point: apply ``args["snapshot"]`` now and hold applies after it
    (``drsync promote --to-snapshot/--before/--apply-received``), or (``args["keep_delayed"]``, ``promote
    --delayed-state``) hold applies and drop what waits for apply_delay; ``args["why"]`` is logged."""
    why = str(args.get("why") or "before a promotion")
    if args.get("keep_delayed"):
        return _receiver(agent).committer.keep_delayed(why)
    return _receiver(agent).committer.apply_now(str(args.get("snapshot", "")), why)
