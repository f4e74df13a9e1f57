"""The Coordinator over ZooKeeper: the only module of drsync that imports kazoo.

Holding the ``primary`` node follows kazoo's lock recipes: the node is
ephemeral, so it dies with the session; every claim is a multi-op transaction
guarded by the ``epoch`` node's version, so a promotion in between makes the
claim fail instead of producing a second primary; and callers are told about
SUSPENDED as well as LOST, because a suspended primary cannot know whether its
session (and therefore its claim) still exists.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
    ZookeeperError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import ACL, Id, Permissions, make_digest_acl

from drsync import documents
from drsync.coordination import (
    HISTORY_KEEP,
    MEMBER_FIELDS,
    CoordinationUnavailable,
    DuplicateAgent,
    Epoch,
    EpochConflict,
    GroupView,
    Member,
    PrimaryClaim,
    PrimaryTaken,
    SessionState,
    identity_problem,
)
from drsync.errors import IntegrityError, OperationFailed, RefusedError, UsageError

log = logging.getLogger("drsync.coordination")


class _ReconnectThrottle(logging.Filter):
    """kazoo logs several lines per connection attempt (over a hundred in 25 s against a wrong
    address). Its "Connecting to" and "session closed" lines, and its failed attempts ("Connection
    dropped: socket connection error", "Failed connecting to Zookeeper within the connection retry
    policy"), become debug detail: drsync says what is wrong in its own line, once per step of its own
    backoff (the agent) or in the command's error. Any other repeated warning is logged once per backoff
    step (1 s, 2 s, 4 s ... 60 s), with how many attempts it stands for; a connection that succeeds
    starts over."""

    FIRST_S, MAX_S = 1.0, 60.0
    # Connecting, connected and closing are drsync's to say (its start, role and "works again" lines): a
    # refused agent's stderr is its one error line.
    DETAIL = ("Connecting to", "Zookeeper session closed", "Zookeeper connection established", "Closing connection")
    ATTEMPTS = ("Connection dropped: socket connection error", "Failed connecting to Zookeeper within",
                "Cannot resolve", "Connection time-out")

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.seen: dict[str, list[float]] = {}  # message -> [next allowed at, step, hidden count]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if (record.levelno <= logging.INFO and msg.startswith(self.DETAIL)) or msg.startswith(self.ATTEMPTS):
            if msg.startswith("Zookeeper connection established"):
                with self.lock:
                    self.seen.clear()  # a connection that succeeds starts the repeated warnings' steps over
            if not log.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        if record.levelno < logging.WARNING:
            if "connected" in msg.lower() and "dis" not in msg.lower():
                with self.lock:
                    self.seen.clear()
            return True
        now = time.monotonic()
        with self.lock:
            state = self.seen.get(msg)
            if state is not None and now < state[0]:
                state[2] += 1
                return False
            if state is None:
                self.seen[msg] = [now + self.FIRST_S, self.FIRST_S, 0]
                return True
            step = min(state[1] * 2, self.MAX_S)
            if state[2]:
                record.msg, record.args = f"{msg} (and {int(state[2])} more times; still retrying)", None
            self.seen[msg] = [now + step, step, 0]
        return True


_kazoo_log = logging.getLogger("drsync.coordination.kazoo")
_kazoo_log.addFilter(_ReconnectThrottle())
# kazoo warns on stderr about a missing chroot; drsync says it in its own one-line error instead.
warnings.filterwarnings("ignore", message="No chroot path exists", category=UserWarning, module="kazoo")

T = TypeVar("T")
_STATES = {KazooState.CONNECTED: SessionState.CONNECTED, KazooState.SUSPENDED: SessionState.SUSPENDED,
           KazooState.LOST: SessionState.LOST}


def _zk_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """kazoo's exceptions become drsync errors with a sentence an operator can act on."""

    @functools.wraps(fn)
    def wrapper(self: ZooKeeperCoordinator, *args: Any, **kw: Any) -> T:
        if self._state is not SessionState.CONNECTED:
            # kazoo would queue the request until it reconnects: fail now instead, the caller retries.
            raise CoordinationUnavailable(f"not connected to ZooKeeper at {self.hosts} ({self._state.value}); "
                                          f"the ensemble may have lost quorum; will retry")
        try:
            return fn(self, *args, **kw)
        except NoAuthError:
            raise UsageError(f"ZooKeeper refused access to {self.base} (its ACL names other credentials); check "
                             f"coordination.username and coordination.password") from None
        except (ConnectionLoss, SessionExpiredError, ConnectionClosedError, OperationTimeoutError,
                KazooTimeoutError) as e:
            raise CoordinationUnavailable(f"ZooKeeper at {self.hosts} is unavailable ({type(e).__name__}); the "
                                          f"ensemble may have lost quorum; will retry") from None
        except ZookeeperError as e:
            raise OperationFailed(f"ZooKeeper error on {self.base}: {type(e).__name__}") from None

    return wrapper


def chroot_commands(chroot: str) -> str:
    """zkCli.sh commands that create ``chroot`` with every missing parent (``create`` makes one level)."""
    parts = [p for p in chroot.split("/") if p]
    return "; ".join(f"zkCli.sh create /{'/'.join(parts[:i])}" for i in range(1, len(parts) + 1))


def _load(data: bytes | None) -> dict[str, Any]:
    try:
        doc = documents.loads(data or b"{}", allow_nan=True)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _fencing_holder(data: bytes | None, stat: Any, epoch: int) -> tuple[str, str]:
    """Whether a ``fencing`` node held by another session is a fencing agent to wait for, as (its agent, "");
    or ("", why not): a node no session owns (made by hand: it would never end), one without drsync's record,
    or one left for an earlier epoch. One for a later epoch is waited for (this reader's view is stale)."""
    if not getattr(stat, "ephemeralOwner", 0):
        return "", "not held by any session: made by hand?"
    doc = _load(data)
    agent, held = doc.get("agent"), doc.get("epoch")
    if not isinstance(agent, str) or not agent or type(held) is not int:
        return "", "without drsync's record"
    if held < epoch:
        return "", f"left for epoch {held}"
    return agent, ""


# The fields of the two nodes every role decision reads, and their types (documents.typed).
_EPOCH_FIELDS: dict[str, type] = {"epoch": int, "promoted_by": str, "at": float, "reason": str, "agent_id": str}
_PRIMARY_FIELDS: dict[str, type] = {"agent": str, "address": str, "epoch": int, "since": float}


def _role_doc(data: bytes | None, path: str, fields: dict[str, type], required: str, group: str) -> dict[str, Any]:
    """The epoch or primary node's document, strictly: never a default for a node that exists but holds
    something else (an epoch read as 0 would let a promotion repeat an epoch another primary held).
    IntegrityError, one line naming the node and the repair, when it is not what drsync writes."""
    try:
        doc = documents.typed(documents.loads(data or b""), fields, f"ZooKeeper node {path}")
        if required not in doc:
            raise ValueError(f"ZooKeeper node {path} has no {required}")
        if "epoch" in doc and doc["epoch"] < 0:
            raise ValueError(f"ZooKeeper node {path}: epoch is {doc['epoch']}, below 0")
    except ValueError as e:
        why = str(e) if str(e).startswith("ZooKeeper node") else \
            f"ZooKeeper node {path} does not hold a JSON document ({bytes(data or b'')[:40]!r})"
        raise IntegrityError(f"{why}: no promotion, claim or switchover in group {group} until it is repaired "
                             f"(docs/operations.md, 'A damaged or lost epoch')") from None
    return doc


# The fields of an agent's registration (agents/<name>) and their types; null stands for "not known".
_REGISTRATION_FIELDS: dict[str, type] = {
    "role": str, "address": str, "cluster_id": str, "release": str, "epoch": int, "applied_snapshot": str,
    "applied_captured_at": float, "applied_position": list, "clock_offset_s": float, "lag_s": float,
    "heartbeat": float, "pid": int, "agent_id": str, "apply_hold": dict, "host": str, "refresh_s": float,
    "advertise_answers": bool, "upstream": str, "last_refusal": dict, "takeover": dict}


def _registration(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """An agent's registration with every field of the wrong type dropped (another drsync version, a script):
    readers see it as not known, never as a value of another type; ``damaged`` says which were dropped."""
    dropped = []
    for key, kind in _REGISTRATION_FIELDS.items():
        if doc.get(key) is None:
            continue
        try:
            documents.typed({key: doc[key]}, {key: kind}, path)
        except ValueError as e:
            dropped.append(str(e))
            doc = {k: v for k, v in doc.items() if k != key}
    return {**doc, "damaged": "; ".join(dropped)} if dropped else doc


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


class ZooKeeperCoordinator:
    def __init__(self, hosts: str, group: str, *, session_timeout_s: float = 10.0, username: str = "",
                 password: str = "", connect_timeout_s: float | None = None) -> None:
        self.hosts = hosts
        self.group = group
        self.base = f"/drsync/{group}"
        self.connect_timeout_s = connect_timeout_s if connect_timeout_s is not None else max(5.0, session_timeout_s)
        auth, acl = None, None
        if username:
            auth = [("digest", f"{username}:{password}")]
            acl = [make_digest_acl(username, password, all=True)]
        self._acl = acl
        self.op_timeout_s = max(2.0, session_timeout_s)
        self.zk = KazooClient(hosts=hosts, timeout=session_timeout_s, auth_data=auth, default_acl=acl,
                              connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0),
                              logger=_kazoo_log)
        self._state = SessionState.LOST
        self._listeners: list[Callable[[SessionState], None]] = []
        self._change: list[Callable[[], None]] = []
        self._watching = False
        self._lock = threading.Lock()
        self.zk.add_listener(self._on_state)

    # --- session ------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def session_timeout_s(self) -> float:
        """The timeout the server granted (it may differ from the one asked for)."""
        return float(getattr(self.zk, "_session_timeout", 0) or 0) / 1000.0

    def _on_state(self, state: str) -> None:
        new = _STATES.get(state, SessionState.SUSPENDED)
        self._state = new
        for cb in list(self._listeners):
            try:
                cb(new)
            except Exception:  # a listener must never kill kazoo's event thread
                log.exception("session listener failed")

    def add_listener(self, callback: Callable[[SessionState], None]) -> None:
        self._listeners.append(callback)

    def start(self) -> None:
        began = time.monotonic()
        try:
            self.zk.start(timeout=self.connect_timeout_s)
        except KazooTimeoutError:
            self.zk.stop()
            # The time it really took (stopping kazoo's connection thread adds to the timeout).
            raise CoordinationUnavailable(
                f"cannot reach ZooKeeper at {self.hosts} (no session after {time.monotonic() - began:.1f}s); "
                f"check coordination.zookeeper and that the ensemble has quorum") from None
        self._state = SessionState.CONNECTED if self.zk.connected else self._state
        try:
            self._ensure_layout()
        except Exception:
            self.close()
            raise

    @_zk_errors
    def _ensure_layout(self) -> None:
        if self.zk.chroot and not self._w(self.zk.exists_async("/")):
            raise UsageError(f"the ZooKeeper chroot {self.zk.chroot} does not exist; create it first, each "
                             f"level in turn ({chroot_commands(self.zk.chroot)}; 'Node already exists' is fine) or "
                             f"remove it from coordination.zookeeper")
        if not self._w(self.zk.exists_async("/drsync")):
            # Shared by every group: anyone may read it and add a group below, nobody may change it.
            acl = [ACL(Permissions.READ | Permissions.CREATE, Id("world", "anyone"))] if self._acl else None
            try:
                self._w(self.zk.create_async("/drsync", b"", acl=acl))
            except NodeExistsError:
                pass
        for path in (self.base, f"{self.base}/agents", f"{self.base}/members", f"{self.base}/drills",
                     f"{self.base}/history"):
            self._w(self.zk.ensure_path_async(path))
        # With ACLs this fails now, with a clear message, when the credentials are wrong.
        self._w(self.zk.get_async(self.base))

    def close(self) -> None:
        try:
            self.zk.stop()
            self.zk.close()
        except Exception:
            pass
        self._state = SessionState.LOST

    def _w(self, result: Any) -> Any:
        """Wait for an asynchronous kazoo call, but never longer than the session timeout."""
        return result.get(timeout=self.op_timeout_s)

    def _mine(self, stat: Any) -> bool:
        cid = self.zk.client_id
        return bool(cid) and stat.ephemeralOwner == cid[0]

    # --- watches ------------------------------------------------------------------

    def on_change(self, callback: Callable[[], None]) -> None:
        self._change.append(callback)
        with self._lock:
            if self._watching:
                return
            self._watching = True
        for name in ("epoch", "primary", "switchover", "maintenance"):
            self.zk.DataWatch(f"{self.base}/{name}", self._fire)

    def _fire(self, data: bytes | None, stat: Any, event: Any = None) -> None:
        for cb in list(self._change):
            try:
                cb()
            except Exception:
                log.exception("change callback failed")

    # --- epoch and primary ----------------------------------------------------------

    @_zk_errors
    def read_epoch(self) -> Epoch:
        try:
            data, stat = self._w(self.zk.get_async(f"{self.base}/epoch"))
        except NoNodeError:
            return Epoch()
        path = f"{self.base}/epoch"
        d = _role_doc(data, path, _EPOCH_FIELDS, "epoch", self.group)
        return Epoch(d["epoch"], d.get("promoted_by", ""), float(d.get("at", 0.0)), d.get("reason", ""),
                     stat.version, d.get("agent_id") or "")

    @_zk_errors
    def read_primary(self) -> PrimaryClaim | None:
        try:
            data, stat = self._w(self.zk.get_async(f"{self.base}/primary"))
        except NoNodeError:
            return None
        d = _role_doc(data, f"{self.base}/primary", _PRIMARY_FIELDS, "agent", self.group)
        return PrimaryClaim(d["agent"], d.get("address", ""), d.get("epoch", 0), float(d.get("since", 0.0)),
                            self._mine(stat))

    @_zk_errors
    def view(self) -> GroupView:
        return GroupView(self._state, self.read_epoch(), self.read_primary(), self.read_switchover(),
                         maintenance=self.read_maintenance())

    @_zk_errors
    def promote(self, expected: Epoch, agent: str, reason: str, history: dict[str, Any] | None = None,
                agent_id: str = "") -> Epoch:
        new = Epoch(expected.epoch + 1, agent, time.time(), reason, agent_id=agent_id)
        path = f"{self.base}/epoch"
        tx = self.zk.transaction()
        if expected.version < 0:
            tx.create(path, _dump(new.doc()))
        else:
            tx.set_data(path, _dump(new.doc()), expected.version)
        self._record(tx, history, new)
        try:
            results = self._commit(tx, "promoting")
        except (EpochConflict, PrimaryTaken):
            raise EpochConflict(f"the epoch of group {self.group} changed while promoting (somebody else "
                                f"promoted at the same time); run drsync status and retry if still needed") from None
        self._prune("history", HISTORY_KEEP)
        version = 0 if expected.version < 0 else int(results[0].version)
        return Epoch(new.epoch, new.promoted_by, new.at, new.reason, version, agent_id)

    def _record(self, tx: Any, history: dict[str, Any] | None, epoch: Epoch, to: str = "") -> None:
        """Add the ``history/change-<seq>`` entry of this change of primary to the transaction ``tx``."""
        if history is not None:
            entry = {**history, "epoch": epoch.epoch, "to": to or epoch.promoted_by, "at": time.time()}
            tx.create(f"{self.base}/history/change-", _dump(entry), sequence=True)

    def _prune(self, folder: str, keep: int) -> None:
        """Delete all but the newest ``keep`` sequential children of ``folder`` (best effort)."""
        try:
            children = sorted(self._w(self.zk.get_children_async(f"{self.base}/{folder}")))
            for old in children[:-keep] if keep > 0 else []:
                try:
                    self._w(self.zk.delete_async(f"{self.base}/{folder}/{old}"))
                except NoNodeError:
                    pass
        except ZookeeperError as e:
            log.warning("could not prune %s/%s: %s", self.base, folder, type(e).__name__)

    @_zk_errors
    def claim_primary(self, epoch: Epoch, agent: str, address: str,
                      history: dict[str, Any] | None = None, agent_id: str = "") -> PrimaryClaim:
        path = f"{self.base}/primary"
        if epoch.agent_id and epoch.agent_id != agent_id:
            raise PrimaryTaken(f"epoch {epoch.epoch} names agent {epoch.promoted_by} with agent id {epoch.agent_id}, "
                               f"not this agent (agent id {agent_id or 'none'}); nothing was changed")
        claim = PrimaryClaim(agent, address, epoch.epoch, time.time(), True)
        tx = self.zk.transaction()
        tx.check(f"{self.base}/epoch", epoch.version)
        try:
            data, stat = self._w(self.zk.get_async(path))
        except NoNodeError:
            pass
        else:
            held = _role_doc(data, path, _PRIMARY_FIELDS, "agent", self.group)
            if self._mine(stat) and held.get("agent") == agent and held.get("epoch") == epoch.epoch:
                if self.read_epoch().version != epoch.version:
                    raise EpochConflict(f"taking the primary node: the epoch of group {self.group} changed "
                                        f"meanwhile (a promotion happened); nothing was changed")
                return PrimaryClaim(agent, str(held.get("address", "")), epoch.epoch,
                                    float(held.get("since", 0.0)), True)
            stale = held.get("epoch", 0) < epoch.epoch or held.get("agent") == agent
            if not stale:
                raise PrimaryTaken(f"agent {held.get('agent')} holds the primary node at epoch {held.get('epoch')}")
            # A claim of an older epoch (a fenced primary), or of this agent's previous session.
            tx.delete(path, stat.version)
        tx.create(path, _dump(claim.doc()), ephemeral=True)
        self._record(tx, history, epoch, agent)
        self._commit(tx, "taking the primary node")
        if history is not None:
            self._prune("history", HISTORY_KEEP)
        return claim

    def _commit(self, tx: Any, what: str) -> list[Any]:
        results: list[Any] = self._w(tx.commit_async())
        failures = [r for r in results if isinstance(r, Exception)]
        if not failures:
            return results
        first = next((r for r in failures if type(r).__name__ != "RolledBackError"), failures[0])
        if isinstance(first, BadVersionError):
            raise EpochConflict(f"{what}: the epoch of group {self.group} changed meanwhile (a promotion "
                                f"happened); nothing was changed")
        if isinstance(first, NodeExistsError):
            raise PrimaryTaken(f"{what}: another agent took the primary node first; nothing was changed")
        if isinstance(first, NoNodeError):
            raise EpochConflict(f"{what}: a node changed meanwhile; nothing was changed")
        raise first

    @_zk_errors
    def release_primary(self, agent: str) -> None:
        path = f"{self.base}/primary"
        try:
            data, stat = self._w(self.zk.get_async(path))
        except NoNodeError:
            return
        if self._mine(stat) and _load(data).get("agent") == agent:
            try:
                self._w(self.zk.delete_async(path, version=stat.version))
            except (NoNodeError, BadVersionError):
                pass

    @_zk_errors
    def hand_over(self, expected: Epoch, from_agent: str, to_agent: str,
                  history: dict[str, Any] | None = None, to_agent_id: str = "") -> Epoch:
        new = Epoch(expected.epoch + 1, to_agent, time.time(), f"switchover from {from_agent}", agent_id=to_agent_id)
        try:
            data, stat = self._w(self.zk.get_async(f"{self.base}/primary"))
        except NoNodeError:
            data, stat = None, None
        held = _load(data) if stat is not None else {}
        if stat is None or not self._mine(stat) or held.get("agent") != from_agent or \
                held.get("epoch") != expected.epoch:
            raise EpochConflict(f"handing over: {from_agent} no longer holds the primary node at epoch "
                                f"{expected.epoch} (a promotion or a lost session came first); nothing was changed")
        tx = self.zk.transaction()
        # The version read when the claim was taken: a promotion since then wins, and this fails.
        tx.set_data(f"{self.base}/epoch", _dump(new.doc()), expected.version)
        tx.delete(f"{self.base}/primary", stat.version)
        self._record(tx, history, new)
        self._commit(tx, "handing over")
        self._prune("history", HISTORY_KEEP)
        return Epoch(new.epoch, new.promoted_by, new.at, new.reason, expected.version + 1, to_agent_id)

    @_zk_errors
    def take_fencing(self, agent: str, epoch: int) -> str:
        path = f"{self.base}/fencing"
        doc = _dump({"agent": agent, "epoch": epoch, "since": time.time()})
        for _ in range(3):  # a holder that leaves between our create and read: try again
            try:
                self._w(self.zk.create_async(path, doc, ephemeral=True))
                return ""
            except NodeExistsError:
                pass
            try:
                data, stat = self._w(self.zk.get_async(path))
            except NoNodeError:
                continue
            if self._mine(stat):
                self._w(self.zk.set_async(path, doc, stat.version))
                return ""
            holder, why = _fencing_holder(data, stat, epoch)
            if holder:
                return holder
            log.warning("group %s: removing the fencing node %s (%s) to fence at epoch %d", self.group, path, why,
                        epoch)
            try:
                self._w(self.zk.delete_async(path, version=stat.version))
            except (NoNodeError, BadVersionError):
                pass
        return "(unknown: the fencing node keeps changing)"

    @_zk_errors
    def fencing_holder(self, epoch: int) -> str:
        try:
            data, stat = self._w(self.zk.get_async(f"{self.base}/fencing"))
        except NoNodeError:
            return ""
        return "" if self._mine(stat) else _fencing_holder(data, stat, epoch)[0]

    @_zk_errors
    def release_fencing(self) -> None:
        path = f"{self.base}/fencing"
        try:
            _, stat = self._w(self.zk.get_async(path))
            if self._mine(stat):
                self._w(self.zk.delete_async(path, version=stat.version))
        except (NoNodeError, BadVersionError):
            pass

    @_zk_errors
    def set_maintenance(self, doc: dict[str, Any]) -> None:
        self._put(f"{self.base}/maintenance", doc)

    @_zk_errors
    def clear_maintenance(self, agent: str | None = None) -> None:
        path = f"{self.base}/maintenance"
        try:
            data, stat = self._w(self.zk.get_async(path))
        except NoNodeError:
            return
        if agent is not None and _load(data).get("agent") != agent:
            return
        try:
            self._w(self.zk.delete_async(path, version=stat.version))
        except (NoNodeError, BadVersionError):
            pass  # removed or rewritten meanwhile: the next pass looks again

    @_zk_errors
    def read_maintenance(self) -> dict[str, Any] | None:
        """The maintenance marker, or None when there is none. A marker that exists counts whatever it
        holds (an operator's ``zkCli.sh create`` leaves it empty): never an empty, falsy dict."""
        marker = self._get(f"{self.base}/maintenance")
        if marker is None:
            return None
        return marker or {"reason": "maintenance marker without drsync's record (made by hand?)"}

    # --- records ----------------------------------------------------------------------

    @_zk_errors
    def register(self, name: str, record: dict[str, Any]) -> None:
        path = f"{self.base}/agents/{name}"
        data = _dump(record)
        member = {k: record[k] for k in MEMBER_FIELDS if k in record}
        member.update(name=name, last_seen=time.time(), session_timeout_s=self.session_timeout_s)
        try:
            stat = self._w(self.zk.exists_async(path))
            if stat is not None and self._mine(stat):
                self._w(self.zk.set_async(path, data, version=stat.version))
                self._put(f"{self.base}/members/{name}", member)
                return
            held = (self._get(path) or {}) if stat is not None else None
            problem = identity_problem(name, self.group, str(record.get("agent_id") or ""), held,
                                       self._get(f"{self.base}/members/{name}"))
            if problem:
                raise DuplicateAgent(problem)
            if stat is not None:
                # The record of this agent's previous session (restarted before it expired).
                log.warning("replacing the record of agent %s left by its own earlier session (pid %s)", name,
                            (held or {}).get("pid"))
                self._w(self.zk.delete_async(path, version=stat.version))
            self._w(self.zk.create_async(path, data, ephemeral=True))
            self._put(f"{self.base}/members/{name}", member)
        except (NodeExistsError, NoNodeError, BadVersionError):
            pass  # raced with the expiry of the old record: the next registration settles it

    @_zk_errors
    def replace_identity(self, name: str, agent_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        live = self._get(f"{self.base}/agents/{name}")
        if live is not None:
            raise RefusedError(
                f"agent {name!r} is registered live in group {self.group} (address {live.get('address')}, host "
                f"{live.get('host')}, pid {live.get('pid')}, agent id {live.get('agent_id')}): stop it first (after "
                f"a kill -9 its registration lingers until its session times out); nothing was changed")
        mpath = f"{self.base}/members/{name}"
        try:
            data, mstat = self._w(self.zk.get_async(mpath))
            before: dict[str, Any] = _load(data)
        except NoNodeError:
            before, mstat = {}, None
        now = time.time()
        member = {**before, "name": name, "agent_id": agent_id, "replaced_agent_id": before.get("agent_id"),
                  "identity_replaced_at": now, "identity_replaced_by": entry.get("by")}
        epoch = self.read_epoch()
        tx = self.zk.transaction()
        if mstat is None:
            tx.create(mpath, _dump(member))
        else:
            tx.set_data(mpath, _dump(member), mstat.version)
        if epoch.epoch > 0 and epoch.promoted_by == name:
            named = Epoch(epoch.epoch, epoch.promoted_by, epoch.at, epoch.reason, agent_id=agent_id)
            tx.set_data(f"{self.base}/epoch", _dump(named.doc()), epoch.version)
        self._record(tx, entry, epoch, name)
        self._commit(tx, f"replacing the identity of agent {name}")
        self._prune("history", HISTORY_KEEP)
        return before

    @_zk_errors
    def touch_member(self, name: str) -> bool:
        stat = self._w(self.zk.exists_async(f"{self.base}/agents/{name}"))
        if stat is None or not self._mine(stat):
            return False
        path = f"{self.base}/members/{name}"
        try:
            data, mstat = self._w(self.zk.get_async(path))
            self._w(self.zk.set_async(path, _dump({**_load(data), "last_seen": time.time()}), version=mstat.version))
        except (NoNodeError, BadVersionError):
            pass  # a registration rewrote (or an operator removed) it meanwhile: the next beat looks again
        return True

    @_zk_errors
    def deregister(self, name: str, agent_id: str, reason: str) -> None:
        path = f"{self.base}/agents/{name}"
        try:
            stat = self._w(self.zk.exists_async(path))
            if stat is not None and self._mine(stat):
                self._w(self.zk.delete_async(path, version=stat.version))
            mpath = f"{self.base}/members/{name}"
            data, mstat = self._w(self.zk.get_async(mpath))
            doc = _load(data)
            if doc.get("agent_id") == agent_id:
                doc.update(left_at=time.time(), left_reason=reason)
                self._w(self.zk.set_async(mpath, _dump(doc), version=mstat.version))
        except (NoNodeError, BadVersionError):
            pass  # nothing of this agent's left to mark, or another session rewrote it

    @_zk_errors
    def members(self) -> dict[str, Member]:
        names: set[str] = set()
        for folder in ("members", "agents"):
            try:
                names.update(self._w(self.zk.get_children_async(f"{self.base}/{folder}")))
            except NoNodeError:
                pass
        out: dict[str, Member] = {}
        for name in sorted(names):
            record, rstat = self._get_stat(f"{self.base}/agents/{name}")
            if record is not None:
                record = _registration(record, f"{self.base}/agents/{name}")
            member, mstat = self._get_stat(f"{self.base}/members/{name}")
            stat = mstat or rstat
            out[name] = Member(name, record, member or {}, float(stat.last_modified) if stat is not None else 0.0)
        return out

    def _get_stat(self, path: str) -> tuple[dict[str, Any] | None, Any]:
        try:
            data, stat = self._w(self.zk.get_async(path))
        except NoNodeError:
            return None, None
        return _load(data), stat

    @_zk_errors
    def agents(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        try:
            names = self._w(self.zk.get_children_async(f"{self.base}/agents"))
        except NoNodeError:
            return out
        for name in sorted(names):
            try:
                data, _ = self._w(self.zk.get_async(f"{self.base}/agents/{name}"))
            except NoNodeError:
                continue
            out[name] = _registration(_load(data), f"{self.base}/agents/{name}")
        return out

    def _put(self, path: str, doc: dict[str, Any]) -> None:
        try:
            self._w(self.zk.set_async(path, _dump(doc)))
        except NoNodeError:
            try:
                self._w(self.zk.create_async(path, _dump(doc)))
            except NodeExistsError:
                self._w(self.zk.set_async(path, _dump(doc)))

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            data, _ = self._w(self.zk.get_async(path))
        except NoNodeError:
            return None
        return _load(data)

    @_zk_errors
    def write_state(self, doc: dict[str, Any]) -> None:
        self._put(f"{self.base}/state", doc)

    @_zk_errors
    def read_state(self) -> dict[str, Any] | None:
        return self._get(f"{self.base}/state")

    @_zk_errors
    def request_switchover(self, doc: dict[str, Any]) -> None:
        try:
            self._w(self.zk.create_async(f"{self.base}/switchover", _dump(doc)))
        except NodeExistsError:
            pending = self._get(f"{self.base}/switchover") or {}
            raise OperationFailed(f"a switchover to {pending.get('to')} requested at {pending.get('requested_at')} "
                                  f"is still pending; wait for it, or cancel it with drsync switchover "
                                  f"--cancel") from None

    @_zk_errors
    def update_switchover(self, doc: dict[str, Any] | None) -> None:
        path = f"{self.base}/switchover"
        if doc is None:
            try:
                self._w(self.zk.delete_async(path))
            except NoNodeError:
                pass
            return
        try:
            self._w(self.zk.set_async(path, _dump(doc)))
        except NoNodeError:
            pass  # cancelled meanwhile

    @_zk_errors
    def read_switchover(self) -> dict[str, Any] | None:
        return self._get(f"{self.base}/switchover")

    @_zk_errors
    def add_drill(self, report: dict[str, Any], keep: int) -> str:
        path = self._w(self.zk.create_async(f"{self.base}/drills/drill-", _dump(report), sequence=True))
        self._prune("drills", keep)
        return str(path).rsplit("/", 1)[-1]

    @_zk_errors
    def rehearse_promotion(self, agent: str) -> None:
        path = f"{self.base}/rehearsal"
        doc = _dump({"agent": agent, "at": time.time()})
        try:
            _data, stat = self._w(self.zk.get_async(path))
            self._w(self.zk.set_async(path, doc, version=stat.version))
        except NoNodeError:
            try:
                self._w(self.zk.create_async(path, doc))
            except NodeExistsError:
                pass  # another rehearsal created it first: the write path works all the same
        except BadVersionError:
            pass  # a concurrent rehearsal won the compare-and-set: it was checked all the same

    @_zk_errors
    def drills(self, limit: int) -> list[dict[str, Any]]:
        try:
            children = sorted(self._w(self.zk.get_children_async(f"{self.base}/drills")))
        except NoNodeError:
            return []
        out = []
        for name in children[-limit:] if limit > 0 else []:
            doc = self._get(f"{self.base}/drills/{name}")
            if doc is not None:
                out.append({"seq": name, **doc})
        return out


    @_zk_errors
    def history(self, limit: int) -> list[dict[str, Any]]:
        try:
            children = sorted(self._w(self.zk.get_children_async(f"{self.base}/history")), reverse=True)
        except NoNodeError:
            return []
        out = []
        for name in children[:limit] if limit > 0 else []:
            doc = self._get(f"{self.base}/history/{name}")
            if doc is not None:
                seq = name.rsplit("-", 1)[-1]
                out.append({"seq": int(seq) if seq.isdigit() else name, **doc})
        return out


def from_config(zookeeper: str, group: str, *, session_timeout_s: float, username: str, password: str,
                connect_timeout_s: float | None = None) -> ZooKeeperCoordinator:
    return ZooKeeperCoordinator(zookeeper, group, session_timeout_s=session_timeout_s, username=username,
                                password=password, connect_timeout_s=connect_timeout_s)
