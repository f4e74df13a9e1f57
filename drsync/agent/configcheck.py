"""``drsync config check``: validate a config and the world it points at, reporting every problem at once.

Checks, in order: the file (TOML, every key and type), the cluster (data root,
repository and its cluster id and release), the agent's state directory,
listen and metrics addresses, TLS files, ZooKeeper (reachable, credentials,
the group's nodes) and the peer agents (reachable over gRPC, same cluster id
and release). Later checks that depend on a failed one are skipped, not
reported as failures of their own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from drsync import engine
from drsync.agent.locks import StateDirLock
from drsync.agent.presence import advertise_not_local, advertise_problem
from drsync.agent.state import StateStore, state_dir_of, state_dir_owner_problem
from drsync.config import (
    Config,
    config_from_dict,
    config_problems,
    engine_problem,
    fencing_problem,
    layout_problem,
    path_within,
    read_config_document,
    topology_problem,
)
from drsync.coordination import Coordinator, identity_problem, open_coordinator
from drsync.dataroot import open_data_root
from drsync.errors import ConfigError, DrsyncError, OperationFailed
from drsync.fsutil import local_or_none
from drsync.transport.grpc import GrpcStandbyLink


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    kind: str = "environment"  # config | environment | network
    warn: bool = False  # passes, but likely wrong (shown as WARN)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bindable(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]") or "127.0.0.1", int(port)))
    except (OSError, ValueError) as e:
        return str(e)
    return None


def check_config(path: str | Path, *, timeout_s: float = 5.0) -> list[Check]:
    checks: list[Check] = []
    try:
        doc = read_config_document(path)
    except ConfigError as e:
        return [Check("config file", False, str(e), "config")]
    problems = config_problems(doc)
    if problems:
        return [Check("config", False, p, "config") for p in problems]
    cfg = config_from_dict(doc, base_dir=Path(path).resolve().parent, path=Path(path))
    checks.append(Check("config", True, f"{path}: every key valid (agent {cfg.agent.name}, role {cfg.agent.role})",
                        "config"))
    fencing = fencing_problem(cfg)
    c = cfg.coordination
    checks.append(Check("fencing", fencing is None, fencing or (
        f"failover {c.failover}; " + ("fence_command set" if c.fencing else
                                      "fence_command = \"none\" (promotions do not fence production)"
                                      if c.fence_command.strip() == "none" else "no fence_command") +
        ("; demote_command set" if c.demote_command.strip() else
         "; no demote_command (an ex-primary rejoins only after drsync rejoin)")), "config"))
    topology = topology_problem(cfg)
    r = cfg.replication
    checks.append(Check("topology", topology is None, topology or (
        f"follows {r.upstream} (cascade; the primary ships here directly while {r.upstream} is not a live standby)"
        if r.upstream else f"ships onward to {', '.join(r.standbys)}" if r.standbys and cfg.agent.role == "standby"
        else f"ships to {', '.join(r.standbys)}" if r.standbys else "follows the primary"), "config"))
    layout = layout_problem(cfg)
    if layout:
        checks.append(Check("data root and repository", False, layout, "config"))
    checks += _check_cluster(cfg, timeout_s)
    checks += _check_engine(cfg, timeout_s)
    checks += _check_cadence(cfg, timeout_s)
    try:
        state_dir: str | None = state_dir_of(cfg)
    except DrsyncError as e:
        state_dir = None
        checks.append(Check("state directory", False, str(e), "config"))
    holder = StateDirLock.holder(state_dir) if state_dir is not None else None
    # The running agent is this config's only when it listens where this config says (another config with
    # this state directory, e.g. a copy with other ports, is not running: its ports say nothing of it).
    running = holder is not None and holder[1] in ("", cfg.agent.listen)
    checks += _check_nesting(cfg, state_dir, timeout_s)
    dest = local_or_none(cfg.backups.destination) if cfg.backups.destination else None
    if dest:
        from drsync.backup import repository_around

        repository = repository_around(dest) or (
            cfg.cluster.repository if path_within(dest, cfg.cluster.repository) else "")
        if repository:
            checks.append(Check("backups", False, f"[backups] destination {dest} lies inside the repository "
                                f"{repository}: backup create refuses it (the repository's garbage collection "
                                f"would take a backup there for its own files); name a directory outside it",
                                "config"))
    checks += _check_agent(cfg, running, state_dir, holder)
    checks += _check_advertise(cfg, running and not any(c.name == "state directory" and not c.ok for c in checks),
                               timeout_s)
    checks += _check_peers(cfg, timeout_s)
    return checks


T = TypeVar("T")


def _bounded(what: str, timeout_s: float, fn: Callable[[], T]) -> T:
    """``fn()``, given at most ``2 * timeout_s + 1`` seconds in all: an endpoint that answers a byte at a
    time passes every per-read timeout. OperationFailed past it (the call is left to a daemon thread,
    which ends with the command); ``fn``'s own exception otherwise."""
    limit = 2 * timeout_s + 1
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    worker = threading.Thread(target=call, name=f"config-check-{what}", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise OperationFailed(f"{what}: no whole answer within {limit:.0f}s (--timeout {timeout_s:g}); check that "
                              f"it answers, or give config check a longer --timeout")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _check_cluster(cfg: Config, timeout_s: float) -> list[Check]:
    out = []
    try:
        def capturable() -> str:
            root = open_data_root(cfg.cluster.data, retry_s=timeout_s)
            root.check_capturable()
            return root.url

        out.append(Check("data root", True, f"{_bounded('data root', timeout_s, capturable)} is a directory"))
    except DrsyncError as e:
        out.append(Check("data root", False, str(e)))
    try:
        c = _bounded("repository", timeout_s,
                     lambda: engine.open_repository(cfg.cluster.repository, retry_s=timeout_s).config)
        same = (c.cluster_id, c.release) == (cfg.cluster.id, cfg.cluster.release)
        out.append(Check("repository", same, f"{cfg.cluster.repository}: cluster {c.cluster_id!r} release "
                         f"{c.release!r}" + ("" if same else f", but the config says cluster {cfg.cluster.id!r} "
                                                              f"release {cfg.cluster.release!r}")))
    except DrsyncError as e:
        out.append(Check("repository", False, f"{e} (drsync init --config creates it)"))
    return out


def _check_engine(cfg: Config, timeout_s: float) -> list[Check]:
    """replication.engine = "distcp": an HDFS data root that can be snapshotted, DistCp and its jar here."""
    if cfg.replication.engine != "distcp":
        return [Check("replication engine", True, "agent: drsync reads, ships and writes every byte", "config")]
    problem = engine_problem(cfg)
    if problem:
        return [Check("replication engine", False, problem, "config")]
    settings = engine.distcp_settings(cfg)
    assert settings is not None
    out = [Check("replication engine", not settings.problems(), "; ".join(settings.problems()) or
                 f"distcp: {' '.join(settings.command)} with {settings.jar}")]
    try:
        root = open_data_root(cfg.cluster.data, retry_s=timeout_s)
        status = _bounded("data root", timeout_s, lambda: root.fs.status(root.root))  # type: ignore[attr-defined]
        ok = bool(status and status.get("snapshotEnabled"))
        out.append(Check("snapshottable data root", ok, f"{root.url} can be snapshotted" if ok else
                         f"{root.url} cannot be snapshotted, and the DistCp engine copies from snapshots (primary) "
                         f"and keeps its history in them (standby): run 'hdfs dfsadmin -allowSnapshot "
                         f"{root.root}' as the HDFS superuser"))  # type: ignore[attr-defined]
    except DrsyncError as e:
        out.append(Check("snapshottable data root", False, str(e)))
    return out


def _check_cadence(cfg: Config, timeout_s: float) -> list[Check]:
    """replication.mode: continuous on HDFS polls (a capture every min_interval); on a local root it needs an
    inotify watch per directory, within fs.inotify.max_user_watches (the directories counted for at most
    ``2 * timeout_s + 1`` seconds, as every check that touches the data root)."""
    from drsync.agent.continuous import is_local
    from drsync.agent.status import replication_mode

    r = cfg.replication
    summary = replication_mode(cfg)["summary"]
    if r.mode != "continuous":
        return [Check("replication mode", True, summary, "config")]
    out = []
    protect = cfg.snapshots.protect
    if protect > 0 and protect / r.min_interval > 10_000:
        out.append(Check("snapshot count", True, f"[snapshots] protect keeps every snapshot younger than "
                         f"{protect:g}s, and a busy root is captured every {r.min_interval:g}s: up to "
                         f"{int(protect / r.min_interval):,} snapshots kept; raise replication.min_interval or "
                         f"shorten protect", "config", warn=True))
    if not is_local(cfg.cluster.data):
        return [*out, Check("replication mode", True, f"{summary}: HDFS has no change notification, so each "
                            f"poll is a snapshot-diff capture (a new snapshot, kept as [snapshots] keep says); raise "
                            f"replication.min_interval if the namenode is busy", "config", warn=True)]
    root = local_or_none(cfg.cluster.data) or cfg.cluster.data
    dirs, finished = _count_dirs(root, 2 * timeout_s + 1)
    limit_text = _sysctl("fs/inotify/max_user_watches")
    limit = int(limit_text) if limit_text.isdigit() else None
    short = limit is not None and dirs > limit // 2
    what = f"{dirs} director{'y' if dirs == 1 else 'ies'}" if finished else (
        f"at least {dirs} directories (counted for {2 * timeout_s + 1:.0f}s, the --timeout bound: a root this "
        f"large takes the agent as long to watch, and a mount that does not answer holds it)")
    return [*out, Check("replication mode", True, f"{summary}; the data root has {what} "
                  f"to watch, fs.inotify.max_user_watches = {limit_text}" +
                  (" (shared by every process of the user): raise it, e.g. sysctl -w fs.inotify.max_user_watches="
                   f"{max(1048576, dirs * 4)}, or the agent falls back to a capture every {r.min_interval:g}s"
                   if short else ""), "config", warn=short or not finished)]


def _count_dirs(root: str, limit_s: float) -> tuple[int, bool]:
    """``(directories, finished)``: the directories of ``root``, itself included, counted for at most
    ``limit_s`` seconds, and whether the count finished (a mount that does not answer leaves it to a daemon
    thread, which ends with the command)."""
    counted = [1]
    done, stop = threading.Event(), threading.Event()

    def walk() -> None:
        for _, subdirs, _ in os.walk(root):
            counted[0] += len(subdirs)
            if stop.is_set():
                return
        done.set()

    threading.Thread(target=walk, name="config-check-watches", daemon=True).start()
    finished = done.wait(limit_s)
    stop.set()
    return counted[0], finished


def _sysctl(path: str) -> str:
    try:
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _check_nesting(cfg: Config, state_dir: str | None, timeout_s: float) -> list[Check]:
    """Say what of drsync's own lies inside the data root: snapshots skip it and applies leave it alone,
    but the snapshot may not hold a file where it lives (a standby then refuses to apply)."""
    def inside() -> list[tuple[str, str, str]]:
        root = open_data_root(cfg.cluster.data, retry_s=timeout_s)
        return [(what, p, rel) for what, p in (("repository", cfg.cluster.repository), ("state directory",
                                                                                       state_dir or ""))
                if p and (rel := root.relative_inside(p))]

    try:
        nested = _bounded("data root", timeout_s, inside)
    except DrsyncError as e:
        return [Check("nesting", False, str(e), "config")]
    if not nested:
        return [Check("nesting", True, "the repository and state directory are outside the data root")]
    return [Check("nesting", True, f"{what} {p} is inside the data root at {rel}: snapshots leave it out and "
                  f"applies and restores leave it alone; production must not have a file at {rel} or a parent of it")
            for what, p, rel in nested]


def _check_agent(cfg: Config, running: bool, state_dir: str | None,
                 holder: tuple[str, str] | None = None) -> list[Check]:
    out = []
    owner = StateStore(state_dir).load().agent_name if state_dir is not None and os.path.isdir(state_dir) else ""
    if state_dir is not None and owner and owner != cfg.agent.name:
        out.append(Check("state directory", False, state_dir_owner_problem(state_dir, owner, cfg.agent.name),
                         "config"))
        running = False  # the running agent (if any) is the other one: its ports say nothing of this config
    elif state_dir is not None and holder is not None and not running:
        pid, listen = holder
        out.append(Check("state directory", False, (
            f"{state_dir} is locked by a running agent (pid {pid}, listening on {listen}), not one started from "
            f"this config (agent.listen {cfg.agent.listen}): two agents can never share a state directory; stop "
            f"pid {pid} first, or give this config its own agent.state_dir"), "config"))
    elif state_dir is not None and running:
        out.append(Check("state directory", True, f"{state_dir} is locked by the running agent of this config "
                                                  f"(pid {holder[0] if holder else '?'})"))
    elif state_dir is not None:
        writable = os.access(state_dir if os.path.isdir(state_dir) else os.path.dirname(state_dir) or ".", os.W_OK)
        out.append(Check("state directory", writable, f"{state_dir} is writable" if writable else
                         f"{state_dir} is not writable by this user; fix its ownership or set agent.state_dir"))
    for what, address in (("listen address", cfg.agent.listen), ("metrics address", cfg.agent.metrics)):
        if not address:
            continue
        problem = None if running else _bindable(address)
        out.append(Check(what, problem is None, f"{address}" + (" (in use by the running agent)" if running else
                                                               " is free") if problem is None else
                         f"cannot listen on {address}: {problem}"))
    if cfg.tls.enabled:
        missing = [p for p in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if not os.access(p, os.R_OK)]
        out.append(Check("tls files", not missing, "ca, cert and key are readable" if not missing else
                         f"cannot read {', '.join(missing)}"))
    elif cfg.agent.listen.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "::1", "[::1]") and \
            not cfg.agent.allow_insecure_remote:
        out.append(Check("tls", False, f"agent.listen {cfg.agent.listen} is not loopback and [tls] is not set: the "
                                       f"agent will refuse to start; configure mutual TLS", "config"))
    return out


def _check_advertise(cfg: Config, running: bool, timeout_s: float) -> list[Check]:
    """The address other agents and drsync status reach this agent on (agent.advertise, else listen):
    with the agent running it must answer as this agent; otherwise its host must at least resolve, and a
    loopback advertise must name the listen port."""
    address = cfg.agent.advertise or cfg.agent.listen
    if not address or (cfg.agent.role == "primary" and not cfg.agent.advertise):
        return []
    what = "agent.advertise" if cfg.agent.advertise else "agent.listen"
    host, _, port = address.rpartition(":")
    if not running:
        try:
            socket.getaddrinfo(host.strip("[]"), int(port) if port.isdigit() else None)
        except (OSError, ValueError) as e:
            return [Check("advertise address", False, f"{what} {address} does not resolve ({e}): other agents could "
                          f"not reach this one; set agent.advertise to this host's reachable host:port", "config")]
        problem = advertise_problem(cfg.agent.advertise, cfg.agent.listen) or advertise_not_local(cfg.agent.advertise)
        if problem:
            return [Check("advertise address", True, f"{problem} (not dialled: the agent is not running)",
                          "config", warn=True)]
        return [Check("advertise address", True, f"{address} resolves (not dialled: the agent is not running)")]
    tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
    link = GrpcStandbyLink(address, tls=tls)
    try:
        h = link.hello(f"config-check:{cfg.agent.name}", 0, timeout_s=timeout_s)
        ok = h.agent == cfg.agent.name
        return [Check("advertise address", ok, f"{address} answers as {h.agent}" if ok else
                      f"{address} ({what}) answers as agent {h.agent}, not {cfg.agent.name}: other agents would reach "
                      f"the wrong agent; set agent.advertise to the address this agent listens on", "network")]
    except DrsyncError:
        return [Check("advertise address", False, f"no agent answers on {address} ({what}) while this agent runs: "
                      f"other agents and drsync status cannot reach it; set agent.advertise to an address of this "
                      f"host that reaches agent.listen {cfg.agent.listen}", "network")]
    finally:
        link.close()


def _check_targets(cfg: Config, known: set[str]) -> list[Check]:
    """[replication.targets."X"] keys that name no standby: a typo leaves that standby without its limit."""
    keys = sorted(cfg.replication.targets)
    if not keys:
        return []
    unknown = [k for k in keys if k not in known]
    where = ("replication.standbys" if cfg.agent.role != "auto" else
             "the group's registered agents (by agent name or address)")
    return [Check("standby targets", True, (
        f"[replication.targets] {', '.join(repr(k) for k in unknown)} name no standby in {where}: their bandwidth "
        f"settings apply to nothing; write a standby's agent name or its address exactly") if unknown else
        f"[replication.targets] {', '.join(repr(k) for k in keys)}: each names a standby in {where}",
        "config" if cfg.agent.role != "auto" else "network", warn=bool(unknown))]


def _check_identity(cfg: Config, coord: Coordinator) -> list[Check]:
    """Whether this config's agent may register under its name: the name belongs to the agent id of its
    ``members/<name>`` record (live or not), and a live registration of this identity elsewhere is another
    process (the running agent is this config's only where this config listens)."""
    name, group = cfg.agent.name, cfg.coordination.group
    member = coord.members().get(name)
    if member is None:
        return [Check("agent name", True, f"{name!r} is new in group {group}: this agent will own it", "network")]
    my_id = StateStore(state_dir_of(cfg)).load().agent_id
    live = member.record
    other_live = live if live is not None and live.get("agent_id") != my_id else None
    problem = identity_problem(name, group, my_id, other_live, member.member)
    if problem:
        return [Check("agent name", False, f"{problem} (this config's agent would be refused)", "config")]
    if live is None:
        left = member.member.get("left_reason")
        return [Check("agent name", True, f"{name!r} belongs to this agent (agent id {my_id}); it is not running "
                      f"({'stopped: ' + str(left) if left else 'last seen without a clean stop'})", "network")]
    mine_at = str(live.get("address") or "")
    here = cfg.agent.advertise or cfg.agent.listen
    if mine_at and mine_at != here:
        return [Check("agent name", False, (
            f"{name!r} is registered by a running agent at {mine_at} (pid {live.get('pid')}, host "
            f"{live.get('host')}), not at this config's address {here}: this config is not the running "
            f"agent's; stop that one before starting this, or give this config its own agent.name and "
            f"state directory"), "network")]
    return [Check("agent name", True, f"{name!r} is registered by this agent at {mine_at} (agent id {my_id})",
                  "network")]


def _check_peers(cfg: Config, timeout_s: float) -> list[Check]:
    out: list[Check] = []
    tls = (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls.enabled else None
    peers: list[tuple[str, str]] = []
    if cfg.agent.role == "auto":
        coord = open_coordinator(cfg, connect_timeout_s=timeout_s)
        started = time.monotonic()
        try:
            coord.start()
            view = coord.view()
            agents = coord.agents()
            took = time.monotonic() - started
            who = view.primary.agent if view.primary else "none yet (drsync promote)"
            out.append(Check("zookeeper", True, f"{cfg.coordination.zookeeper}: group {cfg.coordination.group}, "
                             f"epoch {view.epoch.epoch}, primary {who} ({took * 1000:.0f} ms)", "network"))
            peers = [(n, str(r.get("address"))) for n, r in agents.items() if n != cfg.agent.name and r.get("address")]
            out += _check_targets(cfg, {n for n, _ in peers} | {a for _, a in peers})
            out += _check_identity(cfg, coord)
            if not peers:
                out.append(Check("peers", True, "no other agent of the group is registered right now", "network"))
        except DrsyncError as e:
            out.append(Check("zookeeper", False, str(e), "network"))
        finally:
            coord.close()
    else:
        peers = [(a, a) for a in cfg.replication.standbys]  # a primary's standbys, or a relay's
        out += _check_targets(cfg, set(cfg.replication.standbys))
    for name, address in peers:
        link = GrpcStandbyLink(address, tls=tls)
        try:
            h = link.hello(f"config-check:{cfg.agent.name}", 0, timeout_s=timeout_s)
            same = (h.cluster_id, h.release) == (cfg.cluster.id, cfg.cluster.release)
            out.append(Check(f"peer {name}", same, f"{address}: {h.agent} ({h.role}), cluster {h.cluster_id!r} "
                             f"release {h.release!r}" + ("" if same else " — differs from this cluster: shipments "
                                                                           "between them will be refused"), "network"))
        except DrsyncError as e:
            out.append(Check(f"peer {name}", False, str(e), "network"))
        finally:
            link.close()
    return out
