"""gRPC server and client: the only module of drsync that imports grpc.

The servicer translates requests into :class:`Receiver` calls and its
errors into status codes (FAILED_PRECONDITION for fencing and refusals,
INVALID_ARGUMENT for data that does not match its hash); the client does the
reverse, so the agent layer only ever sees drsync errors.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from drsync.errors import (
    ChunksLost,
    DeltaRejected,
    DrsyncError,
    IntegrityError,
    ManifestNotHeld,
    OperationFailed,
    RefusedError,
    UsageError,
)
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.manifest import ManifestTooLarge
from drsync.repository.spool import Spool
from drsync.transport import Caller, CommitOutcome, ReceivedChunk, Receiver, StandbyHello
from drsync.transport.pb import drsync_pb2 as pb
from drsync.transport.pb import drsync_pb2_grpc as pb_grpc

T = TypeVar("T")

# Upload messages are ~1 MiB plus at most one 1 MiB chunk; the limit leaves room, and
# anything larger is refused by gRPC itself (RESOURCE_EXHAUSTED) before we see it.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# --- Limits on what a peer sends (docs/FORMAT.md, "Limits"), checked before anything is allocated ---
# A Commit's manifest pieces together: fmt.MANIFEST_MAX_BYTES (2 GiB, a 10-million-file manifest is
# about 0.9 GiB). The running total is checked before each piece is kept; the pieces go into one buffer,
# the only copy of the manifest the commit holds.
# A Commit's pieces: the primary sends 1 MiB pieces (2,048 for the largest manifest); 65,536 allow
# 32 KiB pieces and bound the messages of one commit however a peer cuts the manifest.
COMMIT_MAX_PARTS = 65_536
# Entries of one message: a chunk id or a chunk costs at least 34 bytes on the wire, so no message
# within MAX_MESSAGE_BYTES holds more; the explicit check refuses before a list is made of them.
MESSAGE_MAX_ENTRIES = MAX_MESSAGE_BYTES // 32
# Upload messages the primary serializes ahead of the one gRPC is sending (each up to about 2 MiB).
UPLOAD_AHEAD = 2
# Names a request carries (sender agent, sender instance), in characters: they end up in the state
# file, logs and ZooKeeper. Agent names are short; instance ids are 32 hex digits.
NAME_MAX_CHARS = 256

# --- Keepalive: how a dead peer is found during a long call (a Commit waits for the apply) ---
# The client pings every keepalive_s() seconds (env DRSYNC_GRPC_KEEPALIVE_S, default 20; tests shorten
# it) and gives up on a connection whose ping is not answered within as long (at least 5 s): the call
# then fails UNAVAILABLE (measured: a frozen standby is found 6 s into a commit at 1 s; the old options,
# whose pings timed out after gRPC's default minute, took 80 s). The server accepts pings at any rate down to half
# that interval, with or without calls and data, and never answers them with GOAWAY
# "too_many_pings" (gRPC's default server policy allows one ping per 5 minutes without data and sends
# GOAWAY after 2 strikes; with the client's default of 2 pings without data, a call without data
# for minutes was cut). The server pings its clients on the same interval.
KEEPALIVE_ENV = "DRSYNC_GRPC_KEEPALIVE_S"
KEEPALIVE_DEFAULT_S = 20.0


def keepalive_s() -> float:
    """The keepalive interval in seconds: ``$DRSYNC_GRPC_KEEPALIVE_S`` (at least 0.1) or 20."""
    raw = os.environ.get(KEEPALIVE_ENV, "")
    try:
        return max(0.1, float(raw)) if raw else KEEPALIVE_DEFAULT_S
    except ValueError:
        raise UsageError(f"{KEEPALIVE_ENV}={raw!r} is not a number of seconds; unset it or give e.g. 20") from None


def channel_options() -> list[tuple[str, int]]:
    """Channel options of both ends (a client's channel; a server adds :func:`server_options`): message
    limits and the keepalive, at :func:`keepalive_s` as it is when called."""
    ka_ms = int(keepalive_s() * 1000)
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", ka_ms),
            ("grpc.keepalive_timeout_ms", max(5_000, ka_ms)),
            # gRPC also times pings out by this (default 1 minute, which would hide keepalive_timeout_ms)
            ("grpc.http2.ping_timeout_ms", max(5_000, ka_ms)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def server_options() -> list[tuple[str, int]]:
    """A server's options: :func:`channel_options` plus the policy for its clients' pings, which accepts
    them at the clients' keepalive (half of it, at least 50 ms) however long a call waits without data."""
    ka_ms = int(keepalive_s() * 1000)
    # Never share a listen port with another process (gRPC sets SO_REUSEPORT by default on Linux, so a
    # second agent on the same port would start and receive half of the shipments).
    return [*channel_options(), ("grpc.so_reuseport", 0),
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: the least time between two pings the server
            # accepts on a connection without data (gRPC's default: 5 minutes); an earlier ping is a strike.
            ("grpc.http2.min_ping_interval_without_data_ms", max(50, ka_ms // 2)),
            # GRPC_ARG_HTTP2_MAX_PING_STRIKES: 0 = strikes never end the connection (default: GOAWAY after 2).
            ("grpc.http2.max_ping_strikes", 0)]
# A Hello whose round trip is this long or longer (seconds) is sampled again with health checks, and the
# shortest counts: the first request of a connection pays its set-up, and a busy host's scheduling delays one
# sample by milliseconds (a primary sends deltas over links of 10 ms and more: drsync.agent.primary).
PROBE_OVER_S = 0.002
# This process, as the sender of requests: a standby restarts its clock-offset estimate when it changes.
INSTANCE = uuid.uuid4().hex


def _abort(context: grpc.ServicerContext, e: Exception) -> None:
    if isinstance(e, PeerNotAllowed):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
    if isinstance(e, RefusedError):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, ManifestTooLarge):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, DeltaRejected):  # its own status: the sender retries with whole chunks, and only then
        context.abort(grpc.StatusCode.DATA_LOSS, str(e))
    if isinstance(e, ChunksLost):  # its own status: the sender negotiates every chunk again and resends
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    if isinstance(e, ManifestNotHeld):  # its own status: the sender sends the manifest's bytes
        context.abort(grpc.StatusCode.ABORTED, str(e))
    if isinstance(e, IntegrityError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, DrsyncError):
        context.abort(grpc.StatusCode.INTERNAL, str(e))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


class PeerNotAllowed(RefusedError):
    """The caller's certificate names none of ``tls.allowed_peers``."""


def peer_names(context: grpc.ServicerContext) -> tuple[str, ...]:
    """The subject CN and SAN names of the caller's TLS certificate (empty without TLS)."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for v in auth.get(key, ()):
            name = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            if name not in names:
                names.append(name)
    return tuple(names)


class ReplicationServicer(pb_grpc.ReplicationServicer):
    """Serves Hello to any caller the TLS layer let in; shipping RPCs only to ``allowed_peers``
    (certificate names; empty = any certificate of the CA) and only through ``Receiver.admit``."""

    def __init__(self, receiver: Receiver | None, *, agent: str, role: str | Callable[[], str], cluster_id: str,
                 release: str, allowed_peers: tuple[str, ...] = (), epoch: Callable[[], int] | None = None) -> None:
        self.receiver = receiver
        self._epoch = epoch
        self._role = role
        self.agent, self.cluster_id, self.release = agent, cluster_id, release
        self.allowed_peers = tuple(allowed_peers)

    def _caller(self, context: grpc.ServicerContext, sender: str, epoch: int, sent_at: float,
                instance: str = "") -> Caller:
        received = time.time()
        _check_names(context, sender, instance)
        names = peer_names(context)
        if self.allowed_peers and not set(names) & set(self.allowed_peers):
            shown = ", ".join(names) or "no certificate name"
            _abort(context, PeerNotAllowed(
                f"agent {self.agent} accepts shipments only from {', '.join(self.allowed_peers)} "
                f"(tls.allowed_peers); the caller's certificate names {shown}"))
        return Caller(sender, int(epoch), float(sent_at), received, names, instance)

    @property
    def role(self) -> str:
        """This agent's role now (with ZooKeeper roles it changes at run time)."""
        return self._role() if callable(self._role) else self._role

    def _receiver(self, context: grpc.ServicerContext) -> Receiver:
        if self.receiver is None or self.role != "standby":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"agent {self.agent} is {self.role}, not a standby; it accepts no shipments")
        assert self.receiver is not None
        return self.receiver

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        received = time.time()
        _check_names(context, request.sender, request.sender_instance)
        st = self.receiver.state if self.receiver is not None else None
        epoch = self._epoch() if self._epoch else st.epoch if st else 0
        lag = None
        if self.receiver is not None and request.cluster_id:
            try:
                self.receiver.check_sender_cluster(request.sender, request.cluster_id, request.release)
            except DrsyncError as e:
                self._fail(context, request.sender, e)
        if self.receiver is not None:
            self.receiver.greet(Caller(request.sender, int(request.epoch), request.sent_at, received,
                                       peer_names(context), request.sender_instance))
            lag = self.receiver.lag_s() if self.role == "standby" else None
        held = self.receiver.held_snapshot() if self.receiver is not None else ""
        return pb.HelloReply(agent=self.agent, role=self.role, cluster_id=self.cluster_id, release=self.release,
                             epoch=epoch, applied_snapshot=st.applied_snapshot if st else "",
                             applied_captured_at=st.applied_captured_at if st else 0.0,
                             applied_at=st.applied_at if st else 0.0, lag_s=lag or 0.0, lag_known=lag is not None,
                             held_snapshot=held, received_at=received, replied_at=time.time(),
                             apply_delay_s=self.receiver.apply_delay_s if self.receiver is not None else 0.0,
                             received_snapshot=st.received_snapshot if st else "",
                             applied_position=list(st.applied_position) if st else [],
                             delta_chunks=self.receiver is not None,
                             manifest_by_reference=self.receiver is not None,
                             manifest_patches=self.receiver is not None)

    def _fail(self, context: grpc.ServicerContext, sender: str, e: Exception) -> None:
        """Abort the call; a refusal, or a shipment this standby could not take (an apply that failed: an
        immutable file, a full disk), is also the standby's to report (logged, shown in its status): its
        operator is the one to act."""
        if isinstance(e, DrsyncError) and self.receiver is not None:
            self.receiver.note_refusal(sender, e)
        _abort(context, e)

    def _same_caller(self, context: grpc.ServicerContext, first: Caller, sender: str, epoch: int) -> None:
        if (sender, int(epoch)) != (first.sender, first.epoch):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"one request stream carries two senders or epochs "
                                                            f"({first.sender}@{first.epoch}, {sender}@{epoch})")

    def Negotiate(self, request_iterator: Iterator[pb.ChunkIds],
                  context: grpc.ServicerContext) -> Iterator[pb.ChunkIds]:
        rx = self._receiver(context)
        caller: Caller | None = None
        try:
            for req in request_iterator:
                if caller is None:
                    caller = self._caller(context, req.sender, req.epoch, req.sent_at, req.sender_instance)
                    rx.admit(caller)
                self._same_caller(context, caller, req.sender, req.epoch)
                _check_ids(context, req.ids)
                yield pb.ChunkIds(epoch=req.epoch, ids=rx.missing(caller, list(req.ids)))
        except DrsyncError as e:
            self._fail(context, caller.sender if caller else "", e)

    def Upload(self, request_iterator: Iterator[pb.ChunkBatch], context: grpc.ServicerContext) -> pb.UploadReply:
        rx = self._receiver(context)
        first = next(request_iterator, None)
        if first is None:
            return pb.UploadReply(replied_at=time.time())
        caller = self._caller(context, first.sender, first.epoch, first.sent_at, first.sender_instance)

        def batches() -> Iterator[list[ReceivedChunk]]:
            for r in itertools.chain([first], request_iterator):
                self._same_caller(context, caller, r.sender, r.epoch)
                if len(r.chunks) > MESSAGE_MAX_ENTRIES:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"an Upload message carries "
                                  f"{len(r.chunks)} chunks; at most {MESSAGE_MAX_ENTRIES} are accepted")
                # Each field read copies a chunk's bytes out of the message: read once.
                batch = [ReceivedChunk(c.id, c.encoding, c.raw_length, c.data, tuple(c.bases), c.base_skip)
                         for c in r.chunks]
                _check_chunks(context, batch)
                yield batch

        try:
            rx.admit(caller)
            received, stored, stored_bytes = rx.receive(caller, batches())
        except DrsyncError as e:
            self._fail(context, caller.sender, e)
        return pb.UploadReply(received=received, stored=stored, stored_bytes=stored_bytes, replied_at=time.time())

    def Commit(self, request_iterator: Iterator[pb.CommitPart], context: grpc.ServicerContext) -> pb.CommitReply:
        rx = self._receiver(context)
        caller: Caller | None = None
        doc, seq, parts, total, named, patched = b"", 0, 0, 0, "", ""
        # The manifest is gathered in a spool as its pieces arrive, hashed as they come: in memory while
        # small, in an unnamed temporary file past 16 MiB, so that the commit never holds a large manifest's
        # bytes beside the table decoded from them (74 MiB at 1,000,000 files, for as long as the apply ran).
        manifest = Spool()
        for part in request_iterator:
            if caller is None:
                caller = self._caller(context, part.sender, part.epoch, part.sent_at, part.sender_instance)
                doc, seq, named, patched = part.snapshot, part.sender_seq, part.manifest_of, part.patch_of
                if named and patched:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a commit names its manifest (manifest_of) or "
                                                                    "sends a patch of one (patch_of), not both")
                if len(doc) > fmt.SNAPSHOT_DOC_MAX_BYTES:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"the snapshot document is {len(doc)} bytes; a snapshot document is at most "
                                  f"{fmt.SNAPSHOT_DOC_MAX_BYTES} bytes (docs/FORMAT.md, Limits); nothing was stored")
                try:
                    rx.admit(caller)  # before any manifest piece is kept: a fenced sender sends none
                except DrsyncError as e:
                    self._fail(context, caller.sender, e)
            elif part.epoch != caller.epoch:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "commit parts carry different epochs")
            piece = part.manifest
            if not piece:
                continue
            if named:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a commit that names its manifest (manifest_of) "
                                                                "carries no manifest pieces")
            # Checked before the piece is kept: a peer never makes this agent hold more than the limit.
            if total + len(piece) > fmt.MANIFEST_MAX_BYTES:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the manifest exceeds {fmt.MANIFEST_MAX_BYTES} bytes, the most a standby accepts "
                              f"(docs/FORMAT.md, Limits); nothing was stored")
            if parts >= COMMIT_MAX_PARTS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the manifest arrives in more than {COMMIT_MAX_PARTS} pieces, the most a standby "
                              f"accepts (send pieces of 1 MiB); nothing was stored")
            total += len(piece)
            parts += 1
            manifest.write(piece)
        if caller is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty commit")
        assert caller is not None
        try:
            if named:  # the manifest of a snapshot held here, read (and checked) from this repository
                manifest.close()
                manifest = rx.held_manifest(named, doc)
            elif patched:  # a patch of one held here: the manifest rebuilt, and checked by its hash
                with manifest:
                    manifest = rx.patched_manifest(patched, doc, manifest)
            info, result = rx.commit(caller, doc, manifest, int(seq))  # admits under its commit lock
        except DrsyncError as e:
            self._fail(context, caller.sender, e)
        finally:
            manifest.close()
        st = rx.state
        return pb.CommitReply(snapshot=info.id, written_files=result.written_files, removed=result.removed,
                              applied_at=st.applied_at, replied_at=time.time(), applied_snapshot=st.applied_snapshot,
                              applied_captured_at=st.applied_captured_at, deferred=st.applied_snapshot != info.id,
                              apply_delay_s=rx.apply_delay_s)


def _check_names(context: grpc.ServicerContext, sender: str, instance: str) -> None:
    """Refuse a request whose sender or instance name is longer than ``NAME_MAX_CHARS`` (256)."""
    for what, value in (("sender name", sender), ("sender instance", instance)):
        if len(value) > NAME_MAX_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request's {what} is {len(value)} characters; "
                                                            f"at most {NAME_MAX_CHARS} are accepted")


def _check_ids(context: grpc.ServicerContext, ids: Sequence[bytes]) -> None:
    """Refuse a Negotiate message with more than ``MESSAGE_MAX_ENTRIES`` ids or an id not 32 bytes long."""
    if len(ids) > MESSAGE_MAX_ENTRIES:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a Negotiate message carries {len(ids)} ids; at most "
                                                          f"{MESSAGE_MAX_ENTRIES} are accepted")
    for i in ids:
        if len(i) != fmt.ID_LEN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a Negotiate message carries an id of {len(i)} bytes; "
                                                            f"chunk ids are {fmt.ID_LEN} bytes (BLAKE3-256)")


def _check_chunks(context: grpc.ServicerContext, batch: Sequence[ReceivedChunk]) -> None:
    """Refuse an Upload message with a chunk whose id, encoding or sizes no drsync writes
    (:func:`drsync.repository.chunks.check_sizes`), before any is kept."""
    for c in batch:
        try:
            if c.encoding == fmt.ENC_DELTA:
                chunks.check_delta_sizes(len(c.data), c.raw_length, c.id, c.bases, c.base_skip)
            else:
                chunks.check_sizes(c.encoding, len(c.data), c.raw_length, c.id, "uploaded chunk")
        except IntegrityError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e}; nothing more of this upload was stored")


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def listen_problem(listen: str) -> str:
    """Why this process cannot listen on ``listen`` (host:port), in one line naming the key to change;
    "" when it can (the port is bound and released at once)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        return (f"cannot listen on {listen}: {getattr(e, 'strerror', None) or e}; set agent.listen to a host:port "
                f"of this machine")
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        return f"cannot listen on {listen}: {why}; set agent.listen to a free host:port"
    return ""


def start_server(servicer: ReplicationServicer, listen: str, *, tls: tuple[str, str, str] | None = None,
                 allow_insecure_remote: bool = False) -> grpc.Server:
    """Serve replication and the standard health service on ``listen`` (host:port)."""
    host = listen.rsplit(":", 1)[0]
    if tls is None and not _is_loopback(host) and not allow_insecure_remote:
        raise UsageError(f"agent.listen {listen} is not a loopback address and [tls] is not configured; "
                         f"configure mutual TLS, or set agent.allow_insecure_remote = true")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options())
    pb_grpc.add_ReplicationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("drsync.v1.Replication", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    problem = listen_problem(listen)  # before gRPC tries: its own error is a RuntimeError without the cause
    if problem:
        raise UsageError(problem)
    try:
        if tls is not None:
            ca, cert, key = tls
            creds = grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(ca),
                                                require_client_auth=True)
            port = server.add_secure_port(listen, creds)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc >= 1.60 raises instead of returning 0 (taken between the check and now)
        port = 0
    if port == 0:
        raise UsageError(f"cannot listen on {listen}: address in use or not available; set agent.listen to a free "
                         f"host:port")
    server.start()
    return server


def _translate(e: grpc.RpcError, target: str) -> DrsyncError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
        return RefusedError(f"standby {target} refused: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return IntegrityError(f"standby {target} rejected the data: {details}")
    if code == grpc.StatusCode.DATA_LOSS:
        return DeltaRejected(f"standby {target} could not use a delta: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return ChunksLost(f"standby {target} lacks chunks: {details}")
    if code == grpc.StatusCode.ABORTED:
        return ManifestNotHeld(f"standby {target} could not take the manifest by reference: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OperationFailed(f"standby {target} refused a request over its limits: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return OperationFailed(f"standby {target} is unreachable ({details}); will retry")
    return OperationFailed(f"standby {target}: {code.name if code else 'error'}: {details}")


def encode_chunk_batch(head: pb.ChunkBatch, chunks: Sequence[ReceivedChunk]) -> bytes:
    """One Upload message, serialized: ``head`` (a ChunkBatch without chunks) and ``chunks``, as one
    ``ChunkBatch`` on the wire.

    Concatenated messages parse as one, their repeated fields appended (protobuf's encoding guide,
    "Last One Wins": concatenating two encoded messages merges them), so the message is the head's bytes followed by
    one single-chunk ChunkBatch per chunk, each serialized on its own. That copies each chunk's bytes
    twice; building the whole message and serializing it copied them three times, and upb serializes a
    message of a few MiB at a third of the speed (about 0.4 GB/s against 1.3 GB/s, measured)."""
    parts = [head.SerializeToString()]
    for c in chunks:
        one = pb.ChunkBatch()
        one.chunks.add(id=c.id, encoding=c.encoding, raw_length=c.raw_length, data=c.data, bases=c.bases,
                       base_skip=c.base_skip)
        parts.append(one.SerializeToString())
    return b"".join(parts)


class _Ahead(Generic[T]):
    """``messages``, produced on a thread of their own at most ``depth`` ahead of the one that takes
    them: the primary reads and serializes the next Upload message while gRPC sends this one (the two
    took turns before: 1 GiB's upload spent 1.4 s serializing and 2.4 s sending, measured). An error
    raised while producing is raised by the next ``next`` once the messages before it are taken.
    :meth:`close` stops the producer."""

    def __init__(self, messages: Iterator[T], depth: int) -> None:
        self._depth = depth
        self._cond = threading.Condition()
        self._items: collections.deque[T] = collections.deque()
        self._done = self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, args=(messages,), name="drsync-upload-ahead",
                                        daemon=True)
        self._thread.start()

    def _produce(self, messages: Iterator[T]) -> None:
        error: BaseException | None = None
        try:
            for m in messages:
                with self._cond:
                    while len(self._items) >= self._depth and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._items.append(m)
                    self._cond.notify_all()
        except BaseException as e:  # handed to the consumer, raised there
            error = e
        finally:
            with self._cond:
                self._done, self._error = True, error
                self._cond.notify_all()

    def __iter__(self) -> _Ahead[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            while not self._items and not self._done and not self._closed:
                self._cond.wait()
            if self._items:
                m = self._items.popleft()
                self._cond.notify_all()
                return m
            if self._error is not None:
                raise self._error
            raise StopIteration

    def close(self, wait: bool = True) -> None:
        """Stop producing; with ``wait``, until the producer has ended (it may be inside the
        iterator's step, e.g. a bandwidth wait: without, it ends after that step)."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        if wait:
            self._thread.join()


def _keeping(failed: list[DrsyncError], messages: Iterator[T]) -> Iterator[T]:
    """Pass messages through, keeping a drsync error raised while producing them (grpc would only
    report "Exception iterating requests"), so the caller sees the real reason."""
    try:
        yield from messages
    except DrsyncError as e:
        failed.append(e)
        raise
    except OSError as e:  # reading what is sent (a pack on a failing disk): named, not "Exception iterating"
        failed.append(OperationFailed(f"reading what to send failed: {e}"))
        raise


class GrpcStandbyLink:
    """A :class:`~drsync.transport.StandbyLink` over gRPC.

    Hello and health checks have short deadlines. Negotiate, Upload and Commit have none by default
    (``timeout_s`` None): an upload of a terabyte over a slow link takes hours, and a commit waits for the
    standby's apply however long it takes; a dead standby or link is found by keepalive (``KEEPALIVE_S``
    plus its timeout), not by a deadline. ``timeout_s`` (seconds) bounds Negotiate and Upload when given.
    """

    def __init__(self, target: str, *, tls: tuple[str, str, str] | None = None, timeout_s: float | None = None,
                 sender: str = "", cluster_id: str = "", release: str = "",
                 clock: Callable[[], float] | None = None) -> None:
        self.target = target
        self.sender = sender  # this agent's name, carried by every request
        # The clock requests are stamped with (Unix seconds): a relay stamps the primary's clock as it
        # estimates it, so that a cascaded standby's lag is on the primary's clock too.
        self._now = clock or time.time
        # A primary's cluster, sent with Hello: a standby of another cluster or release refuses at once.
        self.cluster_id, self.release = cluster_id, release
        self.timeout_s = timeout_s
        if tls is not None:
            ca, cert, key = tls
            creds = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                                 certificate_chain=_read(cert))
            self.channel = grpc.secure_channel(target, creds, options=channel_options())
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = pb_grpc.ReplicationStub(self.channel)
        # Upload's messages go out already serialized (encode_chunk_batch): no serializer here.
        self._upload = self.channel.stream_unary("/drsync.v1.Replication/Upload", request_serializer=None,
                                                 response_deserializer=pb.UploadReply.FromString)

    def close(self) -> None:
        self.channel.close()

    def hello(self, sender: str, epoch: int, timeout_s: float = 10) -> StandbyHello:
        sent = self._now()
        try:
            r = self.stub.Hello(pb.HelloRequest(sender=sender, epoch=epoch, sent_at=sent, sender_instance=INSTANCE,
                                                cluster_id=self.cluster_id, release=self.release),
                                timeout=timeout_s)
        except grpc.RpcError as e:
            raise _translate(e, self.target) from None
        back = self._now()
        offset = rtt = 0.0
        if r.received_at and r.replied_at:  # NTP: offset = ((t1 - t0) + (t2 - t3)) / 2
            offset = ((r.received_at - sent) + (r.replied_at - back)) / 2
            rtt = max(0.0, (back - sent) - (r.replied_at - r.received_at))
        if rtt >= PROBE_OVER_S:
            rtt = min([rtt, *self._pings(2, timeout_s)])
        return StandbyHello(r.agent, r.role, r.cluster_id, r.release, r.epoch, r.applied_snapshot,
                            r.applied_captured_at, r.applied_at, offset, rtt, r.lag_s if r.lag_known else None,
                            r.held_snapshot, r.apply_delay_s, r.received_snapshot, tuple(r.applied_position),
                            r.delta_chunks, r.manifest_by_reference, r.manifest_patches)

    def missing(self, epoch: int, batches: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        failed: list[DrsyncError] = []
        msgs = (pb.ChunkIds(epoch=epoch, ids=b, sender=self.sender, sent_at=self._now(), sender_instance=INSTANCE)
                for b in batches)
        try:
            for reply in self.stub.Negotiate(_keeping(failed, msgs), timeout=self.timeout_s):
                yield list(reply.ids)
        except grpc.RpcError as e:
            raise (failed[0] if failed else _translate(e, self.target)) from None

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        msgs = _Ahead((encode_chunk_batch(pb.ChunkBatch(epoch=epoch, sender=self.sender, sent_at=self._now(),
                                                        sender_instance=INSTANCE), b) for b in batches),
                      UPLOAD_AHEAD)
        failed: list[DrsyncError] = []
        try:
            r = self._upload(_keeping(failed, msgs), timeout=self.timeout_s)
        except BaseException as e:
            # At once: the producer may be waiting (a bandwidth limit's pause, a slow read); it ends
            # at its next step, sending nothing more.
            msgs.close(wait=False)
            if isinstance(e, grpc.RpcError):
                raise (failed[0] if failed else _translate(e, self.target)) from None
            raise
        msgs.close()
        return r.received, r.stored, r.stored_bytes

    def commit(self, epoch: int, sender: str, snapshot_doc: bytes, pieces: Iterator[bytes],
               sender_seq: int = 0, manifest_of: str = "", patch_of: str = "") -> CommitOutcome:
        def parts() -> Iterator[pb.CommitPart]:
            first = True
            total = 0
            for piece in pieces:
                total += len(piece)
                if total > fmt.MANIFEST_MAX_BYTES:
                    raise OperationFailed(f"the manifest of this snapshot exceeds {fmt.MANIFEST_MAX_BYTES} bytes, "
                                          f"the most a standby accepts (docs/FORMAT.md, Limits); it cannot be shipped")
                if first:
                    yield pb.CommitPart(epoch=epoch, sender=sender, snapshot=snapshot_doc, manifest=piece,
                                        sent_at=self._now(), sender_seq=sender_seq, sender_instance=INSTANCE,
                                        patch_of=patch_of)
                    first = False
                else:
                    yield pb.CommitPart(epoch=epoch, manifest=piece)
            if first:  # no piece: the manifest goes by reference (``manifest_of``), the head alone
                yield pb.CommitPart(epoch=epoch, sender=sender, snapshot=snapshot_doc, sent_at=self._now(),
                                    sender_seq=sender_seq, sender_instance=INSTANCE, manifest_of=manifest_of)

        failed: list[DrsyncError] = []
        try:
            r = self.stub.Commit(_keeping(failed, parts()))  # no deadline: keepalive finds a dead peer
        except grpc.RpcError as e:
            raise (failed[0] if failed else _translate(e, self.target)) from None
        return CommitOutcome(r.snapshot, r.written_files, r.removed, r.applied_at, r.applied_snapshot,
                             r.applied_captured_at, r.deferred, r.apply_delay_s)

    def _pings(self, n: int, timeout_s: float) -> list[float]:
        """The shortest round trip (seconds, as a list of one; [] when none answers) of ``n`` health checks sent
        at once on the connection the Hello opened: a far link answers them in one round trip; on a near one,
        a busy host's scheduling that delayed the Hello by milliseconds rarely delays them all."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        started = time.monotonic()
        calls = [stub.Check.future(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s) for _ in range(n)]
        done: list[float] = []
        for call in calls:
            try:
                call.result()
            except grpc.RpcError:
                continue
            done.append(time.monotonic() - started)
        return [min(done)] if done else []

    def health(self, timeout_s: float = 5) -> bool:
        try:
            r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=timeout_s)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING
