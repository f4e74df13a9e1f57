"""The agents running on this host, for commands that must stay out of their data roots (restores).

Each agent, once it holds its state directory (:class:`drsync.agent.locks.StateDirLock`), leaves one small
file naming that directory in a registry: ``/run/drsync/agents`` when it may write there (root, or the user
whose service owns ``/run/drsync``: systemd's ``RuntimeDirectory=drsync``), else ``/tmp/drsync-agents-<uid>``,
a directory of its own user (fixed paths, never ``$TMPDIR``: a restore run with another environment must
find it; a service with ``PrivateTmp`` needs the first). The entry is removed when the agent stops; an agent that dies
leaves it, and the next agent of the same user to start prunes the entries whose agent is gone.

Readers trust nothing they find: a registry directory is read only when it is a real directory (not a
link) owned by root or by the uid in its name (``/run/drsync/agents`` of another owner is that user's); an
entry only when it is a small regular file, opened without following links or waiting; the agent only while
its ``agent.pid`` is flocked; and in a user's registry, only a state directory and data root that user owns
(so a user can point restores away from their own agent's root, and from nothing else). Readers never change
or remove anything.
"""

from __future__ import annotations

import hashlib
import os
import stat

from drsync.agent.locks import StateDirLock
from drsync.fsutil import local_or_none

SYSTEM = "/run/drsync/agents"
USER_PREFIX = "/tmp/drsync-agents-"
_ENTRY_MAX_BYTES = 8192


def announce(state_dir: str) -> str:
    """Name ``state_dir`` in this host's registry; the entry's path, or "" when no registry can be written
    (restores then know this agent's root only through its own config or repository)."""
    real = os.path.realpath(state_dir)
    name = hashlib.sha256(os.fsencode(real)).hexdigest()[:24]
    for d in (SYSTEM, f"{USER_PREFIX}{os.getuid()}"):
        try:
            os.makedirs(d, mode=0o755 if d == SYSTEM else 0o700, exist_ok=True)
            if _owner(d) != os.getuid():
                continue  # somebody else's, or a planted link: never written through
            _prune(d)
            tmp = os.path.join(d, f".{name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(os.fsencode(real) + b"\n")
            os.replace(tmp, os.path.join(d, name))
            return os.path.join(d, name)
        except OSError:
            continue
    return ""


def retract(entry: str) -> None:
    """Remove this agent's own entry (at its stop)."""
    try:
        os.unlink(entry)
    except OSError:
        pass


def running_agents() -> list[tuple[str, str]]:
    """(state directory, data root) of every agent running on this host that announced itself, as
    trusted (module docstring); read only."""
    out: list[tuple[str, str]] = []
    for d, uid in _registries():
        for state_dir in _entries(d):
            root = StateDirLock.data_root(state_dir)
            if not root:
                continue
            if uid is not None and not (_owner(state_dir) == uid and _owns_location(root, uid)):
                continue
            out.append((state_dir, root))
    return out


def _registries() -> list[tuple[str, int | None]]:
    """(directory, the uid whose claims it holds, None for the system one) of every registry to read."""
    found: list[tuple[str, int | None]] = []
    system = system_registry(SYSTEM)
    if system is not None:
        found.append(system)
    top, prefix = os.path.split(USER_PREFIX)
    try:
        names = os.listdir(top)
    except OSError:
        return found
    for n in names:
        uid_text = n.removeprefix(prefix)
        if n.startswith(prefix) and uid_text.isdigit():
            d = os.path.join(top, n)
            if _owner(d) == int(uid_text):
                found.append((d, int(uid_text)))
    return found


def system_registry(path: str) -> tuple[str, int | None] | None:
    """(``path``, the uid whose claims it holds: None when root owns it) for the host's registry, which
    root's agents make, or a service's own ``RuntimeDirectory`` (``/run/drsync`` of the user drsync, as
    deploy/systemd's unit makes it: its private /tmp is seen by nobody else); None when it is no real
    directory."""
    owner = _owner(path)
    if owner is None:
        return None
    return path, None if owner == 0 else owner


def _entries(d: str) -> list[str]:
    """The state directories named by the entries of registry ``d``."""
    try:
        names = [n for n in os.listdir(d) if not n.startswith(".")]
    except OSError:
        return []
    return [sd for sd in (_read_entry(os.path.join(d, n)) for n in names) if sd]


def _read_entry(path: str) -> str | None:
    """The state directory an entry names: a small regular file (opened without following a link or
    waiting) holding one absolute path; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, _ENTRY_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    state_dir = os.fsdecode(text.rstrip(b"\n"))
    ok = len(text) <= _ENTRY_MAX_BYTES and state_dir.startswith("/") and "\n" not in state_dir
    return state_dir if ok else None


def _prune(d: str) -> None:
    """Remove the entries of this user's own registry ``d`` whose agent is gone (at an agent's start)."""
    for n in os.listdir(d):
        path = os.path.join(d, n)
        try:
            if n.startswith(".") or os.lstat(path).st_uid != os.getuid():  # "." : another agent's being written
                continue
            named = _read_entry(path)
            if named is None or not StateDirLock.held(named):
                os.unlink(path)
        except OSError:
            continue


def _owner(path: str) -> int | None:
    """The owner of ``path`` when it is a real directory (not a link), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_uid if stat.S_ISDIR(st.st_mode) else None


def _owns_location(root: str, uid: int) -> bool:
    """Whether a data root a user's agent claims is that user's: a local directory they own."""
    local = local_or_none(root)
    if local is None:
        return False
    try:
        return os.stat(local).st_uid == uid
    except OSError:
        return False
