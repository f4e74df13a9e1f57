"""Typed configuration (TOML) with strict validation.

Only ``[cluster]`` is required. Any unknown key or wrong type is a
:class:`ConfigError` (exit 2) that names the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsync.bandwidth import Schedule, parse_rate, parse_schedule
from drsync.errors import ConfigError, UsageError
from drsync.fsutil import lies_within, local_location

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


# The longest duration drsync takes (1000 years, in seconds).
MAX_DURATION_S = 1000 * 365.25 * 86400.0


def parse_duration(value: str | int | float, what: str = "duration") -> float:
    """Seconds from ``"90s"``, ``"5m"``, ``"1.5h"``, ``"7d"`` or a bare number of seconds.

    ConfigError (exit 2) for anything else: negative, not finite (``inf``, ``nan``, a TOML ``1e400``, a
    string of hundreds of digits) or over :data:`MAX_DURATION_S`, which no schedule, TTL or window needs
    and which would overflow the clocks and JSON documents it ends up in."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float (TOML's integers are unbounded here)
            seconds = math.inf
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ConfigError(f"{what}: {value!r} is not a duration; write e.g. '30s', '5m', '1h' or '7d'")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f"{what}: expected a duration like '5m', got {type(value).__name__}")
    if seconds < 0:
        raise ConfigError(f"{what}: a duration cannot be negative ({value})")
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        shown = value if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} characters)"
        raise ConfigError(f"{what}: {shown!r} is not a usable duration (at most 1000 years); write e.g. "
                          f"'30s', '5m', '1h' or '7d'")
    return seconds


# --- field converters: each takes (value, dotted key) and returns the typed value.


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {type(v).__name__} {v!r}")
    if "\x00" in v:  # TOML's \u0000: no path, command or name can hold it
        raise ConfigError(f"{key}: holds a NUL character (\\u0000), which no path, command or name can hold")
    return v


def _secret(v: Any, key: str) -> str:
    """A secret (safety rule 6: never in logs): a wrong type is named, never its value."""
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string (in quotes), got a {type(v).__name__}; its value is not shown")
    return v


def _nonempty_str(v: Any, key: str) -> str:
    s = _str(v, key)
    if not s.strip():
        raise ConfigError(f"{key}: must not be empty")
    return s


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.%\w]*\]|[^\s:\[\]]*):([0-9]{1,5})", re.ASCII)  # no host: local


def _address(v: Any, key: str) -> str:
    """A ``host:port`` to listen on or advertise (``[::1]:7420`` for IPv6; "" where the key allows
    none): the port in ASCII digits from 0 to 65535, nothing around it. Refused here, not by the
    listener after the agent started (which read ``"70000 "`` as port 4464)."""
    s = _str(v, key)
    m = _HOST_PORT.fullmatch(s)
    if s and (m is None or int(m.group(2)) > 65535):
        raise ConfigError(f"{key}: {s!r} is not host:port with a TCP port from 0 to 65535 (e.g. 127.0.0.1:7420)")
    return s


def _listen(v: Any, key: str) -> str:
    return _address(_nonempty_str(v, key), key)


# Characters ZooKeeper refuses in a node name (its PathUtils.validatePath), controls included; it checks
# UTF-16 code units, so every character past U+FFFF (a surrogate pair there) is refused too.
_NOT_IN_NODE = re.compile("[\u0000-\u001f\u007f-\u009f\ud800-\uf8ff\ufff0-\uffff\U00010000-\U0010ffff]")


def _node_name(v: Any, key: str) -> str:
    """A group or agent name: one ZooKeeper node (``/drsync/<group>``, ``agents/<name>``). A ``/`` would
    nest it inside another group's or agent's nodes, ``.`` and ``..`` are not node names, and ZooKeeper
    refuses control characters and some ranges outright."""
    s = _nonempty_str(v, key)
    bad = _NOT_IN_NODE.search(s)
    if "/" in s or s in (".", "..") or bad or len(s) > 255:
        why = ("'/' would nest it in another node" if "/" in s else f"{s!r} is not a node name"
               if s in (".", "..") else f"character U+{ord(bad.group()):04X} is not allowed" if bad
               else "it is longer than 255 characters")
        raise ConfigError(f"{key}: {s!r} cannot name a ZooKeeper node ({why}); use letters, digits, '.', '-' "
                          f"and '_'")
    return s


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: expected an integer, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ConfigError(f"{key}: must not be negative ({v})")
    return v


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _duration(v: Any, key: str) -> float:
    return parse_duration(v, key)


def _positive_duration(v: Any, key: str) -> float:
    d = parse_duration(v, key)
    if d <= 0:
        raise ConfigError(f"{key}: must be longer than 0 (got {v!r}); write e.g. '1s' or '500ms'")
    return d


def _rate(v: Any, key: str) -> float:
    """Bytes per second from ``"50MiB/s"``, ``"100MB"`` or a number; 0 means unlimited."""
    return parse_rate(v, key)


def _str_list(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{key}: expected a list of strings, got {v!r}")
    return tuple(_str(x, key) for x in v)


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def convert(v: Any, key: str) -> str:
        s = _str(v, key)
        if s not in choices:
            raise ConfigError(f"{key}: {s!r} is not one of {', '.join(choices)}")
        return s

    return convert


@dataclass(frozen=True)
class KeepPolicy:
    """Retention counts, restic's semantics (see :mod:`drsync.retention`)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def is_empty(self) -> bool:
        return not any(dataclasses.astuple(self))


def _keep(v: Any, key: str) -> KeepPolicy:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{key}: expected a table like {{ last = 3, daily = 7 }}, got {v!r}")
    allowed = {f.name for f in dataclasses.fields(KeepPolicy)}
    values = {}
    for k, x in v.items():
        if k not in allowed:
            raise ConfigError(f"{key}.{k}: unknown key; allowed: {', '.join(sorted(allowed))}")
        values[k] = _int(x, f"{key}.{k}")
    return KeepPolicy(**values)


def _backup_keep(v: Any, key: str) -> KeepPolicy:
    policy = _keep(v, key)
    if policy.is_empty():
        raise ConfigError(f"{key}: keeps no backup; give at least one count, e.g. {{ last = 3, daily = 7 }}")
    return policy


def _conv(fn: Callable[[Any, str], Any]) -> dict[str, Any]:
    return {"convert": fn}


@dataclass(frozen=True)
class ClusterConfig:
    id: str = field(metadata=_conv(_nonempty_str))
    release: str = field(metadata=_conv(_nonempty_str))
    data: str = field(metadata=_conv(_nonempty_str))
    repository: str = field(metadata=_conv(_nonempty_str))


@dataclass(frozen=True)
class AgentConfig:
    name: str = field(default_factory=socket.gethostname, metadata=_conv(_node_name))
    listen: str = field(default="127.0.0.1:7420", metadata=_conv(_listen))
    advertise: str = field(default="", metadata=_conv(_address))
    metrics: str = field(default="127.0.0.1:9420", metadata=_conv(_address))
    role: str = field(default="auto", metadata=_conv(_choice("auto", "primary", "standby")))
    state_dir: str = field(default="", metadata=_conv(_str))
    allow_insecure_remote: bool = field(default=False, metadata=_conv(_bool))


@dataclass(frozen=True)
class CoordinationConfig:
    zookeeper: str = field(default="127.0.0.1:2181", metadata=_conv(_nonempty_str))
    group: str = field(default="default", metadata=_conv(_node_name))
    session_timeout: float = field(default=10.0, metadata=_conv(_positive_duration))
    failover: str = field(default="manual", metadata=_conv(_choice("manual", "automatic")))
    max_lag_on_failover: float = field(default=900.0, metadata=_conv(_duration))
    username: str = field(default="", metadata=_conv(_str))
    password: str = field(default="", metadata=_conv(_secret))
    # Automatic failover waits this long after the primary node vanished (it vanishes one
    # session timeout after the primary died), and never repeats within the cooldown.
    failover_grace: float = field(default=1.0, metadata=_conv(_duration))
    failover_cooldown: float = field(default=300.0, metadata=_conv(_duration))
    # Run on the primary before a switchover's final snapshot (e.g. put production read-only).
    switchover_hook: str = field(default="", metadata=_conv(_str))
    switchover_timeout: float = field(default=600.0, metadata=_conv(_positive_duration))
    # A switchover repeats its final capture until one finds no change, at most this many times.
    switchover_quiesce_attempts: int = field(default=5, metadata=_conv(_int))
    # Fencing (safety rule 7). fence_command runs on a standby before it promotes itself (and before
    # `drsync promote` over an earlier primary) and must exit 0; "none" is the operator's explicit
    # choice to promote without fencing. demote_command runs on a primary's agent as soon as it can no
    # longer prove its claim (session lost, suspended past the session timeout, or fenced).
    fence_command: str = field(default="", metadata=_conv(_str))
    fence_timeout: float = field(default=60.0, metadata=_conv(_positive_duration))
    demote_command: str = field(default="", metadata=_conv(_str))
    demote_timeout: float = field(default=60.0, metadata=_conv(_positive_duration))

    @property
    def fencing(self) -> bool:
        """Whether a fence command is configured (not empty and not the explicit "none")."""
        return self.fence_command.strip() not in ("", "none")


@dataclass(frozen=True)
class TargetConfig:
    """``[replication.targets."<agent name or address>"]``: one standby target's own settings; None: the
    global ``[replication]`` key of the same name applies."""

    bandwidth_limit: float | None = field(default=None, metadata=_conv(_rate))
    bandwidth_schedule: Schedule | None = field(default=None, metadata=_conv(parse_schedule))


def _targets(v: Any, key: str) -> dict[str, TargetConfig]:
    if not isinstance(v, Mapping):
        raise ConfigError(f'{key}: expected tables like [{key}."standby-1"] with bandwidth_limit or '
                          f"bandwidth_schedule, got {v!r}")
    out = {}
    for name, table in v.items():
        where = f'{key}."{name}"'
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table with bandwidth_limit or bandwidth_schedule, got {table!r}")
        out[name] = _build_table(where, TargetConfig, table)
    return out


@dataclass(frozen=True)
class ReplicationConfig:
    # "interval": a capture every interval. "continuous": on a local data root a capture as soon as the
    # root changes (inotify), at most every min_interval, a settle delay after the first change letting a
    # burst become one snapshot, and still one every interval (a heartbeat); on HDFS a capture every
    # min_interval (drsync.agent.cadence).
    interval: float = field(default=300.0, metadata=_conv(_duration))
    mode: str = field(default="interval", metadata=_conv(_choice("interval", "continuous")))
    min_interval: float = field(default=1.0, metadata=_conv(_positive_duration))
    settle: float = field(default=0.2, metadata=_conv(_duration))
    standbys: tuple[str, ...] = field(default=(), metadata=_conv(_str_list))
    bandwidth_limit: float = field(default=0.0, metadata=_conv(_rate))  # bytes/s; 0 = unlimited
    # Windows of time of day with their own rate ("08:00-18:00 20MiB/s, 18:00-08:00 off"; drsync.bandwidth);
    # bandwidth_limit applies outside them.
    bandwidth_schedule: Schedule = field(default=Schedule(), metadata=_conv(parse_schedule))
    # Per standby target (keyed by agent name, or by address as in standbys): its own bandwidth_limit and
    # bandwidth_schedule.
    targets: dict[str, TargetConfig] = field(default_factory=dict, metadata=_conv(_targets))
    # A snapshot that would remove more than this share of the standby's files (or empty its root)
    # is stored but not applied until `drsync apply --confirm` (safety rule 8).
    max_delete_fraction: float = field(default=0.5, metadata=_conv(lambda v, k: _fraction(v, k, "files")))
    # A snapshot that rewrites the content of more than this share of the standby's files (same names,
    # other bytes: an encryption sweep) is a mass change; 1 turns the check off. "hold": stored, not
    # applied until `drsync apply --confirm`, like a mass deletion; "alert": applied, and flagged
    # (drsync_mass_change) until an operator acknowledges it.
    max_change_fraction: float = field(default=0.5, metadata=_conv(lambda v, k: _fraction(v, k, "files")))
    on_mass_change: str = field(default="hold", metadata=_conv(_choice("hold", "alert")))
    # A sweep spread over many shipments: each shipment is also judged against the snapshot applied at
    # least this long ago (0: only against the applied one).
    mass_change_window: float = field(default=86400.0, metadata=_conv(_duration))
    # "agent": drsync reads, ships and writes every byte. "distcp" (both data roots on HDFS): the
    # primary checksums files instead of reading them and keeps its HDFS snapshot; the standby copies
    # the bytes with DistCp (drsync.dataroot.distcp), verifies them and commits through its journal.
    engine: str = field(default="agent", metadata=_conv(_choice("agent", "distcp")))
    distcp_command: str = field(default="hadoop distcp", metadata=_conv(_nonempty_str))
    distcp_jar: str = field(default="", metadata=_conv(_str))
    # This cluster's data root as a Hadoop URI for DistCp jobs (e.g. hdfs://prod-ns/data); empty:
    # webhdfs://<active namenode><root>.
    distcp_url: str = field(default="", metadata=_conv(_str))
    # On a standby: shipments are verified and stored at once, applied only once they are this old
    # (capture time, on the primary's clock): a window to hold a damaging change before it reaches
    # the standby's root (drsync apply --hold). 0: apply at once.
    apply_delay: float = field(default=0.0, metadata=_conv(_duration))
    # Under ZooKeeper roles: the agent this standby follows (a cascade: the far region receives from the
    # near standby, crossing the WAN once); "" = the primary. Falls back to the primary while that agent
    # is not a live standby (drsync.agent.topology).
    upstream: str = field(default="", metadata=_conv(_str))

    def target(self, name: str, address: str) -> TargetConfig:
        """The settings of one standby target: by its agent name first, then by its address."""
        for key in (name, address):
            if key and key in self.targets:
                return self.targets[key]
        return TargetConfig()

    def bandwidth_for(self, name: str, address: str) -> Schedule:
        """The schedule in force for one target, its ``default`` the bandwidth_limit outside its windows."""
        t = self.target(name, address)
        schedule = self.bandwidth_schedule if t.bandwidth_schedule is None else t.bandwidth_schedule
        limit = self.bandwidth_limit if t.bandwidth_limit is None else t.bandwidth_limit
        return dataclasses.replace(schedule, default=limit)


@dataclass(frozen=True)
class SnapshotsConfig:
    interval: float = field(default=3600.0, metadata=_conv(_duration))
    keep: KeepPolicy = field(default_factory=lambda: KeepPolicy(last=3, hourly=24, daily=7),
                             metadata=_conv(_keep))
    pre_hook: str = field(default="", metadata=_conv(_str))
    post_hook: str = field(default="", metadata=_conv(_str))
    hook_timeout: float = field(default=300.0, metadata=_conv(_positive_duration))
    reread_attempts: int = field(default=3, metadata=_conv(_int))
    # No snapshot stored in this repository less than this long ago (seconds; 0 = off) is deleted by
    # expiry, retention or `drsync snapshot delete` without --break-glass (drsync.protection).
    protect: float = field(default=0.0, metadata=_conv(_duration))


@dataclass(frozen=True)
class BackupsConfig:
    interval: float = field(default=86400.0, metadata=_conv(_duration))
    mode: str = field(default="full", metadata=_conv(_choice("full", "light", "dataless")))
    light_exclude: tuple[str, ...] = field(default=(), metadata=_conv(_str_list))
    destination: str = field(default="", metadata=_conv(_str))
    keep: KeepPolicy = field(default_factory=lambda: KeepPolicy(last=3, daily=7, weekly=4, monthly=6),
                             metadata=_conv(_backup_keep))


def _fraction(v: Any, key: str, of: str = "chunks to check") -> float:
    if isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1:
        return float(v)
    raise ConfigError(f"{key}: expected a number above 0 and at most 1 (the share of {of}), got {v!r}")


@dataclass(frozen=True)
class DrillsConfig:
    interval: float = field(default=86400.0, metadata=_conv(_duration))  # 0 = only `drsync drill run`
    sample: float = field(default=1.0, metadata=_conv(_fraction))  # share of chunks verified per drill
    full_every: int = field(default=7, metadata=_conv(_int))  # with a sample: every Nth drill checks all
    keep: int = field(default=30, metadata=_conv(_int))  # reports kept (state dir and ZooKeeper)
    scratch: str = field(default="", metadata=_conv(_str))  # trial-restore directory (default: state dir)


@dataclass(frozen=True)
class TLSConfig:
    ca: str = field(default="", metadata=_conv(_str))
    cert: str = field(default="", metadata=_conv(_str))
    key: str = field(default="", metadata=_conv(_str))
    # Certificate names (subject CN or a SAN) allowed to call this agent; empty = any cert of the CA.
    allowed_peers: tuple[str, ...] = field(default=(), metadata=_conv(_str_list))

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig
    agent: AgentConfig = field(default_factory=AgentConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    drills: DrillsConfig = field(default_factory=DrillsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    path: Path | None = None


_SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig,
    "agent": AgentConfig,
    "coordination": CoordinationConfig,
    "replication": ReplicationConfig,
    "snapshots": SnapshotsConfig,
    "backups": BackupsConfig,
    "drills": DrillsConfig,
    "tls": TLSConfig,
}


def _build_section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}]: expected a table, got {type(table).__name__}")
    return _build_table(name, cls, table)


def _build_table(name: str, cls: type, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            raise ConfigError(
                f"{name}.{key}: unknown key; allowed in [{name}]: {', '.join(sorted(fields))}")
        values[key] = fields[key].metadata["convert"](raw, f"{name}.{key}")
    missing = [f.name for f in fields.values()
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"[{name}] is missing required key(s): {', '.join(missing)}")
    return cls(**values)


def config_from_dict(doc: Mapping[str, Any], *, base_dir: Path | None = None,
                     path: Path | None = None) -> Config:
    """Validate a parsed TOML document. Relative paths resolve against ``base_dir``."""
    for section in doc:
        if section not in _SECTIONS:
            raise ConfigError(f"[{section}]: unknown section; allowed: {', '.join(_SECTIONS)}")
    if "cluster" not in doc:
        raise ConfigError("[cluster] is missing; it needs id, release, data and repository")
    sections = {name: _build_section(name, cls, doc[name]) for name, cls in _SECTIONS.items()
                if name in doc}
    cfg = Config(**sections, path=path)
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    tls = cfg.tls
    if tls.enabled and not (tls.ca and tls.cert and tls.key):
        raise ConfigError("[tls] needs all of ca, cert and key, or none of them")
    problem = cadence_problem(cfg.replication)
    if problem:
        raise ConfigError(problem)
    return cfg


def cadence_problem(r: ReplicationConfig) -> str | None:
    """Why the capture cadence of ``[replication]`` cannot work (one line naming the key), or None."""
    if r.min_interval < 0.1:
        return (f"replication.min_interval ({r.min_interval:g}s) is below 100ms: captures would follow each other as "
                f"fast as the agent can loop; write at least '100ms' (e.g. '1s')")
    if r.settle > r.interval:
        return (f"replication.settle ({r.settle:g}s) is longer than replication.interval ({r.interval:g}s): settle is "
                f"the short wait after a change (e.g. '200ms'); make it at most interval")
    if r.mode == "continuous" and r.min_interval > r.interval:
        return (f"replication.min_interval ({r.min_interval:g}s) is longer than replication.interval "
                f"({r.interval:g}s): in continuous mode min_interval is the shortest time between two captures and "
                f"interval the longest; make min_interval at most interval")
    return None


def fencing_problem(cfg: Config) -> str | None:
    """Why this config must not run an agent with automatic failover, or None (safety rule 7)."""
    c = cfg.coordination
    if c.failover == "automatic" and cfg.agent.role == "auto" and not c.fence_command.strip():
        return ("coordination.failover = \"automatic\" needs coordination.fence_command: a command that stops "
                "production's writers and must succeed before this standby promotes itself; write "
                "fence_command = \"none\" to promote without fencing on purpose (see docs/operations.md, "
                "\"Fencing\")")
    if cfg.tls.allowed_peers and not cfg.tls.enabled:
        return "tls.allowed_peers needs [tls] ca, cert and key: peers are known by their certificates"
    return None


def topology_problem(cfg: Config) -> str | None:
    """Why ``replication.upstream`` / ``replication.standbys`` cannot work with this agent's role, or None."""
    r, role = cfg.replication, cfg.agent.role
    if r.upstream and role != "auto":
        return (f"replication.upstream names the agent to follow under ZooKeeper roles (agent.role = \"auto\"), "
                f"and this agent's role is fixed ({role}); with fixed roles list this agent's address in the "
                f"replication.standbys of the agent it follows instead")
    if r.upstream != r.upstream.strip():
        return f"replication.upstream = {r.upstream!r}: an agent name has no leading or trailing spaces"
    if r.upstream and r.upstream == cfg.agent.name:
        return f"replication.upstream = {r.upstream!r} names this agent itself; name the agent it follows"
    dup = sorted({a for a in r.standbys if r.standbys.count(a) > 1})
    if dup:
        return f"replication.standbys lists {', '.join(dup)} more than once; list each standby once"
    own = {a for a in (cfg.agent.listen, cfg.agent.advertise) if a} & set(r.standbys)
    if own:
        return (f"replication.standbys lists {', '.join(sorted(own))}, this agent's own address; list the "
                f"standbys it ships to")
    if r.standbys and role == "auto":
        return ("replication.standbys is for fixed roles (agent.role = \"primary\" or \"standby\"); under "
                "ZooKeeper roles the group's agents are the standbys: remove it, and on a far standby set "
                "replication.upstream to the agent it should follow")
    return None


def layout_problem(cfg: Config) -> str | None:
    """Why the data root and repository cannot both be what the config says (one line), or None: one
    directory cannot be both (the repository may lie inside the data root, in a directory of its own)."""
    data, repo = cfg.cluster.data, cfg.cluster.repository
    if "://" in data or "://" in repo:
        same = data.rstrip("/") == repo.rstrip("/")
    else:
        same = os.path.realpath(data) == os.path.realpath(repo)
    if same:
        return (f"cluster.data and cluster.repository name the same directory ({data}): the repository needs a "
                f"directory of its own (outside the data root, or a subdirectory of it, which captures leave out)")
    scratch = cfg.drills.scratch
    if scratch and "://" not in data and path_within(scratch, data) and not any(
            path_within(scratch, own) for own in (repo, cfg.agent.state_dir) if own and "://" not in own):
        return (f"drills.scratch ({scratch}) lies inside the data root {data}: a drill's trial restore there would "
                f"be captured as production's data (or removed by a standby's apply); name a directory outside it")
    return None


def path_within(path: str, parent: str) -> bool:
    """Whether local ``path`` is ``parent`` or lies inside it (:func:`drsync.fsutil.lies_within`)."""
    return lies_within(path, parent)


def engine_problem(cfg: Config) -> str | None:
    """Why ``replication.engine`` cannot work with this config (one line), or None."""
    r = cfg.replication
    if r.engine != "distcp":
        return None
    if cfg.cluster.data.partition("://")[0] not in ("hdfs", "webhdfs", "swebhdfs"):
        return (f"replication.engine = \"distcp\" needs the data root on HDFS, and cluster.data is "
                f"{cfg.cluster.data}; use engine = \"agent\" for local data roots")
    if r.apply_delay > 0:
        # A delayed apply copies from production's HDFS snapshot of the capture, which the primary keeps only
        # while it ships that snapshot: by the time it is due, a newer capture has replaced it.
        return (f"replication.apply_delay ({r.apply_delay:g}s) cannot be used with replication.engine = \"distcp\": "
                f"a delayed apply copies from production's HDFS snapshot of the capture, which the next capture "
                f"deletes; set apply_delay = \"0s\" or use engine = \"agent\" on this standby")
    return None


def _resolve(value: str, base_dir: Path) -> str:
    if not value or "://" in value or Path(value).is_absolute():
        return value
    return str((base_dir / value).resolve())


def _resolve_local(value: str, base_dir: Path) -> str:
    """A setting that names a local file or directory only (the state directory, TLS files, the DistCp jar):
    a ``file://`` URL is its path (not a relative directory named ``file:``), then as :func:`_resolve`."""
    if value and value[:5].lower() == "file:":
        try:
            value = local_location(value) or value
        except UsageError as e:
            raise ConfigError(str(e)) from None
    return _resolve(value, base_dir)


def _resolve_paths(cfg: Config, base_dir: Path) -> Config:
    cluster = dataclasses.replace(cfg.cluster, data=_resolve(cfg.cluster.data, base_dir),
                                  repository=_resolve(cfg.cluster.repository, base_dir))
    backups = dataclasses.replace(cfg.backups, destination=_resolve(cfg.backups.destination, base_dir))
    tls = dataclasses.replace(cfg.tls, ca=_resolve_local(cfg.tls.ca, base_dir),
                              cert=_resolve_local(cfg.tls.cert, base_dir), key=_resolve_local(cfg.tls.key, base_dir))
    agent = dataclasses.replace(cfg.agent, state_dir=_resolve_local(cfg.agent.state_dir, base_dir))
    replication = dataclasses.replace(cfg.replication,
                                      distcp_jar=_resolve_local(cfg.replication.distcp_jar, base_dir))
    return dataclasses.replace(cfg, cluster=cluster, backups=backups, tls=tls, agent=agent, replication=replication)


def config_problems(doc: Mapping[str, Any]) -> list[str]:
    """Every problem of a parsed config document at once (``drsync config check``); [] when valid."""
    problems: list[str] = []
    for section in doc:
        if section not in _SECTIONS:
            problems.append(f"[{section}]: unknown section; allowed: {', '.join(_SECTIONS)}")
    if "cluster" not in doc:
        problems.append("[cluster] is missing; it needs id, release, data and repository")
    for name, cls in _SECTIONS.items():
        if name not in doc:
            continue
        table = doc[name]
        if not isinstance(table, Mapping):
            problems.append(f"[{name}]: expected a table, got {type(table).__name__}")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, raw in table.items():
            if key not in fields:
                problems.append(f"{name}.{key}: unknown key; allowed in [{name}]: {', '.join(sorted(fields))}")
                continue
            try:
                fields[key].metadata["convert"](raw, f"{name}.{key}")
            except ConfigError as e:
                problems.append(str(e))
        missing = [f.name for f in fields.values() if f.name not in table and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            problems.append(f"[{name}] is missing required key(s): {', '.join(missing)}")
    rep = doc.get("replication")
    if isinstance(rep, Mapping) and not problems:
        try:
            problem = cadence_problem(_build_section("replication", ReplicationConfig, rep))
        except ConfigError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
    tls = doc.get("tls")
    if isinstance(tls, Mapping) and any(tls.get(k) for k in ("ca", "cert", "key")) and not all(
            tls.get(k) for k in ("ca", "cert", "key")):
        problems.append("[tls] needs all of ca, cert and key, or none of them")
    return problems


def read_config_document(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of a config file (ConfigError when unreadable or not TOML)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    doc = read_config_document(p)
    return config_from_dict(doc, base_dir=p.resolve().parent, path=p)
