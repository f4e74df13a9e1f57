"""Is an agent up or down, and when was it last seen: the heartbeat and the rules ``drsync status`` applies.

Every agent of a group with ZooKeeper roles keeps two records (see :mod:`drsync.coordination`):
the ephemeral ``agents/<name>`` registration, which lives exactly as long as its ZooKeeper
session, and the persistent ``members/<name>``, rewritten at each registration and refreshed by
:class:`Heartbeat` every :data:`REFRESH_S` from a thread of its own (a long capture or a fence
command on the agent's loop does not stop it). ZooKeeper's modification time of ``members/<name>``
is when the agent was last seen.

The rules (:func:`judge`), first match wins:

1. No registration: **down** (its session ended: stopped cleanly, when ``members/<name>`` says
   ``left_at``; otherwise killed, crashed or cut off from ZooKeeper, and its session expired).
2. Its address refuses connections: **down** at once. A kill -9 leaves the session, and with it
   the registration (and a primary's ``primary`` node), alive until the session timeout; nothing
   listening on the agent's port is the truth sooner.
3. No heartbeat for :func:`stale_after` (twice the refresh interval plus 5 s, 15 s by default)
   and it does not answer a gRPC health check either: **down** (frozen, hung, or cut off from
   ZooKeeper while its session has not expired yet).
4. Otherwise **up**.

Ages compare ZooKeeper's modification times with the clock of the machine running ``drsync
status`` (never raised above the newest time ZooKeeper recorded); a live agent that answers its
health check is never called down by rule 3, so a skewed clock cannot make it look down.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drsync.coordination import Coordinator, Member
from drsync.errors import DrsyncError

log = logging.getLogger("drsync.agent")

# How often an agent refreshes its members/<name> record (and re-registers: see the supervisor).
REFRESH_S = 5.0
# Probe outcomes.
ANSWERS, REFUSED, SILENT = "answers", "refused", "silent"


def stale_after(refresh_s: float) -> float:
    """How old a heartbeat may be before rule 3 applies."""
    return 2 * refresh_s + 5.0


@dataclass(frozen=True)
class Presence:
    state: str  # "up" | "down"
    why: str  # why it is down ("" when up)
    last_seen: float  # Unix time (ZooKeeper's) of the last refresh; 0.0 when unknown
    note: str = ""  # something wrong with an agent that is up (e.g. its advertised address does not answer)


def judge(m: Member, *, now: float, probe: str | None) -> Presence:
    """Up or down by the rules above. ``probe`` is what its address did (:func:`probe`), None when not probed."""
    doc = {**m.member, **(m.record or {})}
    seen = m.refreshed_at
    if m.record is None:
        if m.member.get("left_at"):
            return Presence("down", f"stopped cleanly ({m.member.get('left_reason') or 'agent stopped'})", seen)
        return Presence("down", "its ZooKeeper session ended without a clean stop (killed, crashed or cut off from "
                                "ZooKeeper)", seen)
    age = now - seen if seen else 0.0
    fresh = age <= stale_after(float(doc.get("refresh_s") or REFRESH_S))
    if probe in (REFUSED, SILENT) and doc.get("advertise_answers") is False and fresh:
        # Alive (heartbeat, session), but its advertised address is wrong: the agent itself found that
        # nothing answers there. Never "process gone" while it heartbeats.
        return Presence("up", "", seen, f"up, but its advertised address {doc.get('address')} does not answer "
                                        f"(the agent runs and heartbeats; fix agent.advertise)")
    if probe == REFUSED:
        timeout = doc.get("session_timeout_s")
        return Presence("down", f"nothing listens on {doc.get('address')}: the agent process is gone (its ZooKeeper "
                                f"session{f' ({float(timeout):.0f}s timeout)' if timeout else ''} has not expired "
                                f"yet)", seen)
    if age > stale_after(float(doc.get("refresh_s") or REFRESH_S)) and probe != ANSWERS:
        return Presence("down", f"no heartbeat for {age:.0f}s and no answer on {doc.get('address')} (frozen, hung "
                                f"or cut off from ZooKeeper)", seen)
    return Presence("up", "", seen)


def split_address(address: str) -> tuple[str, int] | None:
    """("host", port) of ``host:port`` or ``[v6]:port``; None when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def advertise_problem(advertise: str, listen: str) -> str:
    """Why ``agent.advertise`` cannot reach ``agent.listen`` as far as can be told without dialling: a
    loopback address with another port (nothing forwards loopback), or a host that does not resolve
    ("" when neither)."""
    if not advertise:
        return ""
    host, _, port = advertise.rpartition(":")
    lhost, _, lport = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port) if port.isdigit() else None)
    except (OSError, ValueError) as e:
        return (f"agent.advertise {advertise} does not resolve ({e}): other agents could not reach this one; "
                f"set it to this host's reachable host:port")
    loopback = all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
    if loopback and port != lport:
        return (f"agent.advertise {advertise} is a loopback address with port {port}, but the agent listens on "
                f"port {lport} (agent.listen {listen}): nothing would answer there; advertise {lhost}:{lport} or "
                f"this host's reachable name with port {lport}")
    return ""


def advertise_not_local(advertise: str) -> str:
    """Why ``agent.advertise`` names no address of this host ("" when one of the addresses its host resolves
    to is local, or it does not resolve): each is tried as a UDP bind on port 0, and EADDRNOTAVAIL means
    that no interface of this host has it. Such an address works only through a forward (NAT, a load
    balancer) to this host's agent.listen."""
    if not advertise:
        return ""
    host, _, _ = advertise.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_DGRAM)
    except (OSError, ValueError):
        return ""  # advertise_problem says that it does not resolve
    ips = sorted({i[4][0] for i in infos})
    wildcard = [ip for ip in ips if ipaddress.ip_address(ip.split("%")[0]).is_unspecified]
    if wildcard:
        return (f"agent.advertise {advertise} is the wildcard address {wildcard[0]}, which no host has: another agent "
                f"dialling it reaches its own host; set agent.advertise to this host's own reachable host:port "
                f"(agent.listen may stay a wildcard)")
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((sockaddr[0], 0, *sockaddr[2:]))
            return ""
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                return ""  # cannot tell: say nothing rather than something wrong
    return (f"agent.advertise {advertise} resolves to {', '.join(ips)}, which is no address of this host: other "
            f"agents reach this one there only through a forward (NAT, load balancer) to agent.listen; if there is "
            f"none, set agent.advertise to this host's own reachable host:port")


def probe(address: str, health: Callable[[str], bool], timeout_s: float = 1.5) -> str:
    """REFUSED when nothing listens on ``address``; ANSWERS when the agent there answers ``health``;
    SILENT otherwise (frozen, filtered, a name that does not resolve from here...)."""
    hp = split_address(address)
    if hp is None:
        return SILENT
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except ConnectionRefusedError:
        return REFUSED
    except OSError:
        return SILENT
    return ANSWERS if health(address) else SILENT


def ago(seconds: float | None) -> str:
    """``12s ago``, ``3m ago``, ``5h ago``, ``2d ago``."""
    if seconds is None:
        return "never"
    s = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size * (2 if unit != "m" else 1):
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


class Heartbeat:
    """Refreshes ``members/<name>`` every :data:`REFRESH_S` while the agent's session holds its registration."""

    def __init__(self, coord: Coordinator, name: str, *, every_s: float = REFRESH_S) -> None:
        self.coord = coord
        self.name = name
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="drsync-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.coord.touch_member(self.name)
            except DrsyncError as e:
                log.debug("agent %s: heartbeat not written: %s", self.name, e)
            except Exception:  # a bug must not end the heartbeat silently
                log.exception("agent %s: heartbeat failed", self.name)


def now_on(members: dict[str, Member]) -> float:
    """This machine's clock, never below the newest time ZooKeeper recorded (a clock behind ZooKeeper's)."""
    return max([time.time(), *(m.refreshed_at for m in members.values())])
