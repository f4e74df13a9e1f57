"""Acting as another user, and a fixed-role agent pair, for the permission and capture tests.

The interpreter may sit where an unprivileged user cannot reach (under /root), so "as
nobody" means a forked child that drops its ids and calls the CLI in-process, never an exec.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.conftest import init_repo
from tests.zk import free_port

T = TypeVar("T")

NOBODY = 65534


def preload_everything() -> None:
    """Import every drsync module and what they import lazily, before a fork that drops privileges."""
    import drsync

    for mod in pkgutil.walk_packages(drsync.__path__, "drsync."):
        if not mod.name.endswith(("_pb2_grpc", ".__main__")):
            importlib.import_module(mod.name)
    for name in ("fcntl", "filecmp", "json", "pyarrow.compute", "signal", "grpc._utilities", "encodings.idna",
                 "urllib.request", "http.server"):
        importlib.import_module(name)


def run_as_nobody(*args: str | os.PathLike[str]) -> tuple[int, str]:
    """The CLI in a forked child that became uid 65534. Returns the exit code and its stderr."""
    from drsync.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.dup2(w, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.chdir("/")
            code = main([str(a) for a in args])
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def call_as_nobody(fn: Callable[[], T]) -> T:
    """``fn()`` in a forked child running as nobody (no groups); its result (or the repr and traceback of what
    it raised, failing the calling test) comes back pickled. Modules are loaded first: nobody may not read
    the venv's files."""
    import pickle
    import traceback

    preload_everything()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = ("ok", fn())
            except BaseException as e:
                out = ("err", repr(e) + traceback.format_exc())
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(out))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the child running as nobody died before it answered"
    kind, value = pickle.loads(data)
    assert kind == "ok", value
    return value


def give_to_nobody(*paths: Path) -> None:
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", *map(str, paths)], check=True)


def pair_configs(base: Path, prod: Path, standby: Path, *, nested: bool = False, primary_extra: str = "",
                 primary_metrics: str = "") -> tuple[Path, Path]:
    """Configs (initialised repositories) of a fixed-role primary ``base/primary.toml`` shipping to a
    standby ``base/standby.toml``. ``nested``: each keeps its repository and state inside its data
    root (``.drsync``, ``var/drsync-state``); else ``base/<name>-repo`` with the state inside it."""
    port = free_port()

    def config(name: str, data: Path, role: str, extra: str, metrics: str) -> Path:
        where = (f'repository = "{data}/.drsync"\n' if nested else f'repository = "{base / name}-repo"\n')
        state = f'state_dir = "{data}/var/drsync-state"\n' if nested else ""
        p = base / f"{name}.toml"
        p.write_text(f'[cluster]\nid = "c"\nrelease = "1"\ndata = "{data}"\n{where}'
                     f'[agent]\nname = "{name}"\nrole = "{role}"\n{state}'
                     f'listen = "127.0.0.1:{port if role == "standby" else free_port()}"\n'
                     f'metrics = "{metrics or f"127.0.0.1:{free_port()}"}"\n{extra}')
        init_repo(p)
        return p

    scfg = config("standby", standby, "standby", "", "")
    pcfg = config("primary", prod, "primary", f'[replication]\n{primary_extra}standbys = ["127.0.0.1:{port}"]\n',
                  primary_metrics)
    return scfg, pcfg


def serves(cfg: Path) -> bool:
    """Whether the agent of ``cfg`` accepts connections on its listen address. Its pid file comes
    earlier (before it recovers and before its server starts): a ``drsync agent --once`` shipping to
    it then finds nobody. A plain connect, no gRPC: these tests fork afterwards."""
    import socket
    import tomllib

    host, port = tomllib.loads(cfg.read_text())["agent"]["listen"].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def start_agent(cfg: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``drsync agent --config cfg`` as a real process, logging to ``log`` (``env``: its whole environment)."""
    with open(log, "ab") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(cfg)],
                                stdout=out, stderr=out, env=env)
