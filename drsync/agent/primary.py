"""The primary side of a shipment: negotiate, ship what is missing, commit.

Transport-free: a :class:`StandbyLink` is anything that reaches a standby
(gRPC in production, the receiver itself in process). Shipping is resumable by
construction: chunks a standby already holds are never sent again, so an
interrupted shipment's retry sends only what is still missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drsync.errors import ChunksLost, DeltaRejected, DrsyncError, IntegrityError, ManifestNotHeld, RefusedError
from drsync.repository import chunks
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, gather, id_key, id_list, ids_array, locate, pieces_key, sort_unique, to_arrow
from drsync.repository.manifest import Manifest, ManifestFile, column_groups
from drsync.repository.manifest_diff import DeltaBases, chunks_beyond, delta_bases
from drsync.repository.manifest_patch import make_patch
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.repository.spool import Spool
from drsync.transport import CommitOutcome, ReceivedChunk, StandbyHello, StandbyLink
from drsync.units import human_size

# Negotiation batches: 8,192 ids are 256 KiB of ids per message.
NEGOTIATE_BATCH = 8192
# Upload messages carry up to this many stored bytes (or one larger chunk). Measured on loopback with
# bench/messages.py (2026-11-24, 2 cores): 256 KiB 0.67 GB/s, 512 KiB 0.87,
# 1 MiB 1.06, 2 MiB 0.93, 4 MiB 0.95. The transport's limit is set to 8 MiB.
UPLOAD_MESSAGE_BYTES = 1024 * 1024
# ... and at most this many chunks (tiny files make tiny chunks: the ids and framing must stay far below
# the transport's message and per-message chunk limits).
UPLOAD_MESSAGE_CHUNKS = 16_384
# Manifest pieces in a commit stream.
COMMIT_PIECE_BYTES = 1024 * 1024


@dataclass
class ShipResult:
    snapshot: str
    chunks: int
    missing_chunks: int
    shipped_bytes: int
    deduplicated_bytes: int
    duration_s: float
    applied: CommitOutcome
    delta_chunks: int = 0  # of missing_chunks, sent as deltas against chunks the standby holds
    manifest_bytes: int = 0  # of the manifest, or of its patch, in the commit (0: named)
    manifest_sent: str = "bytes"  # "bytes", "patch" (drsync.repository.manifest_patch) or "reference" (named)
    manifest_tried: str = "bytes"  # what the first commit carried (as manifest_sent)
    manifest_refused: str = ""  # why the standby refused a named or patched manifest (then sent as bytes)


@dataclass
class Upload:
    """What a shipment's upload sent: chunks, their stored bytes (as sent) and their raw bytes; of them,
    ``deltas`` chunks went as deltas against a chunk the standby holds."""

    chunks: int = 0
    stored_bytes: int = 0
    raw_bytes: int = 0
    deltas: int = 0


# A delta is sent only when it is at most this share of the chunk's stored bytes: a smaller saving is not
# worth the standby's decoding and re-encoding.
DELTA_WORTH = 0.9
# After this many tries, deltas stop for the rest of an upload when fewer than a quarter of them were worth
# sending (files rewritten with new bytes throughout: each try costs about 6 ms of CPU a 1 MiB chunk).
DELTA_PROBE = 16


# A standby at least this far away (the Hello's round trip, seconds) is behind a link slow enough for deltas:
# loopback and a LAN answer in well under a millisecond (a few on a busy host), a WAN link in tens. Encoding
# costs about 6 ms of CPU a 1 MiB chunk, i.e. it pays on links slower than about 1 Gbit/s.
DELTA_RTT_S = 0.01


def wants_deltas(hello: StandbyHello, rate_bps: float | None, rejected: bool) -> bool:
    """Whether a shipment sends changed chunks as deltas (:class:`Deltas`): the standby takes them, and its
    link is far (a round trip of :data:`DELTA_RTT_S` or more) or limited (a bandwidth limit in force); never
    once ``rejected`` (the standby refused a delta: a base it cannot read, damage there), so that such damage
    never stops replication. Pure."""
    return hello.delta_chunks and not rejected and far_or_limited(hello, rate_bps)


def far_or_limited(hello: StandbyHello, rate_bps: float | None) -> bool:
    """The standby's link is far (a round trip of :data:`DELTA_RTT_S` or more) or limited (a limit in force)."""
    return hello.round_trip_s >= DELTA_RTT_S or bool(rate_bps)


def wants_patches(hello: StandbyHello, rate_bps: float | None, refused: bool) -> bool:
    """Whether a commit may send a patch of the standby's applied manifest instead of the manifest: it takes
    them, its link is far or limited (as for :func:`wants_deltas`: on a near one, rebuilding the manifest
    costs the standby more than receiving it), and it never refused one (``refused``: it rebuilt another
    manifest, e.g. its Parquet writer differs). Pure."""
    return hello.manifest_patches and not refused and far_or_limited(hello, rate_bps)


class Deltas:
    """Which chunks of an upload go as deltas, and against what: ``plan`` (:class:`DeltaBases`) names, per
    chunk, chunks the standby holds (of the snapshot it applied, and said so in Negotiate), read from this
    repository with ``reader``. :meth:`encode` decides chunk by chunk."""

    def __init__(self, plan: DeltaBases, reader: Any) -> None:
        self.plan, self.reader = plan, reader
        self.at = {cid: i for i, cid in enumerate(id_list(plan.chunks))}
        self.tries = self.worth = 0

    @classmethod
    def none(cls) -> Deltas:
        return cls(DeltaBases.empty(), None)

    def __bool__(self) -> bool:
        return bool(self.at)

    def encode(self, cid: bytes, encoding: int, raw_length: int, stored: bytes) -> ReceivedChunk | None:
        """``cid`` as a delta when that is worth it (at most :data:`DELTA_WORTH` of ``stored``), else None
        (it goes as it is stored)."""
        i = self.at.get(cid)
        if i is None or (self.tries >= DELTA_PROBE and self.worth * 4 < self.tries):
            return None
        self.tries += 1
        bases, skip = self.plan.of(i)
        try:
            against = chunks.delta_dictionary([self.reader.read_chunk(b) for b in bases], skip, raw_length)
        except DrsyncError:
            return None  # damaged or gone here: the chunk goes whole
        delta = chunks.delta_encode(chunks.decode(encoding, stored, raw_length, cid), against)
        if len(delta) > DELTA_WORTH * len(stored):
            return None
        self.worth += 1
        return ReceivedChunk(cid, fmt.ENC_DELTA, raw_length, delta, tuple(bases), skip)


def plan_deltas(repo: Repository, link: StandbyLink, epoch: int, applied: Manifest | ManifestFile,
                new: Manifest | ManifestFile, missing: IdSet) -> Deltas:
    """The :class:`Deltas` of an upload of ``missing``: :func:`manifest_diff.delta_bases` less the chunks
    with a base the standby lacks (asked in one more Negotiate stream) or this repository cannot locate."""
    plan = delta_bases(applied, new, missing)
    if not len(plan):
        return Deltas.none()
    asked = IdSet.of(plan.bases)
    lacks: list[bytes] = []
    for reply in link.missing(epoch, batched(id_list(asked.ids), NEGOTIATE_BATCH)):
        lacks += reply
    if lacks:  # lost there (its commit check will say so): those chunks go whole
        lacking = IdSet.of(lacks).contains_many(plan.bases)
        bad = np.zeros(len(plan), bool)
        bad[np.repeat(np.arange(len(plan)), np.diff(plan.starts))[lacking]] = True
        plan = plan.keep(~bad)
        asked = IdSet.of(plan.bases)
    reader = repo.reader_for(asked) if len(asked) else None
    if reader is None:
        return Deltas.none()
    return Deltas(plan, reader)


def batched(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """``items`` in lists of at most ``size``."""
    batch: list[bytes] = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def pacing_delay(sent_bytes: int, rate_bps: float, elapsed_s: float) -> float:
    """How long to wait so that ``sent_bytes`` over the whole transfer stays within ``rate_bps``. Pure."""
    if rate_bps <= 0:
        return 0.0
    return max(0.0, sent_bytes / rate_bps - elapsed_s)


# A paced upload looks at the rate in force at least this often while it waits (seconds).
PACING_SLICE_S = 1.0


class ShippingPaused(DrsyncError):
    """The rate in force turned ``off`` (replication.bandwidth_schedule) during a shipment: the upload ended
    at the next message; the chunks sent stay on the standby and the next shipment sends only the rest."""


class Pacer:
    """Paces an upload to the rate in force at each message: ``bandwidth()`` gives bytes per second,
    0 for unlimited, None for off. The average is kept since the rate last changed, so a change
    mid-shipment neither stalls for bytes sent faster before nor bursts for time spent slower before."""

    def __init__(self, bandwidth: Callable[[], float | None], *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, slice_s: float = PACING_SLICE_S) -> None:
        self._bandwidth, self._clock, self._sleep, self.slice_s = bandwidth, clock, sleep, slice_s
        self.rate: float | None = 0.0
        self.since = clock()
        self.sent = 0  # bytes since the rate last changed

    def rate_now(self) -> float | None:
        """The rate in force (read again); a change restarts the average."""
        rate = self._bandwidth()
        if rate != self.rate:
            self.rate, self.since, self.sent = rate, self._clock(), 0
        return rate

    def may_send(self) -> bool:
        """Whether the next message may go (False while the rate is off)."""
        return self.rate_now() is not None

    def sent_message(self, nbytes: int) -> None:
        """Count a message that went, and wait until the rate in force allows the next one (looking at the
        rate again every ``slice_s``; returns early when it turns off)."""
        self.sent += nbytes
        while True:
            rate = self.rate_now()
            if not rate:  # unlimited, or off: the caller asks may_send() before the next message
                return
            delay = pacing_delay(self.sent, rate, self._clock() - self.since)
            if delay <= 0:
                return
            self._sleep(min(delay, self.slice_s))


def _bandwidth_of(bandwidth: float | Callable[[], float | None]) -> Callable[[], float | None]:
    if callable(bandwidth):
        return bandwidth
    rate = float(bandwidth)
    return lambda: rate


@dataclass(frozen=True)
class ChunkCount:
    """The distinct chunks a manifest names: how many, and their raw sizes added up (bytes)."""

    chunks: int
    raw_bytes: int


def _chunk_pieces(manifest: Manifest | ManifestFile) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The manifest's chunk ids (:data:`ID_DTYPE` arrays) and raw sizes (``uint32``), one piece per row group,
    in row order, repeats kept. Files whose bytes DistCp copies (no chunk ids, one size) name no chunk."""
    ids: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    for t in column_groups(manifest, ["chunks", "chunk_sizes"]):
        t = t.filter(pc.equal(pc.list_value_length(t.column("chunks")),
                              pc.list_value_length(t.column("chunk_sizes"))))
        if not t.num_rows:
            continue
        piece = ids_array(pc.list_flatten(t.column("chunks")))
        if len(piece):
            ids.append(piece)
            sizes.append(np.asarray(pc.list_flatten(t.column("chunk_sizes")).to_numpy(), np.uint32))
    return ids, sizes


def _distinct(manifest: Manifest | ManifestFile, *,
              stable: bool = True) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """:func:`_chunk_pieces` and the (U,) indices into them, taken end to end, of each distinct id once, in id
    order (:func:`sort_unique` over the pieces: 8 bytes of key and 8 of index a chunk beside the pieces' 36,
    never a joined or sorted copy of every id); ``stable=False``: any occurrence of a repeated id, not the
    first."""
    ids, sizes = _chunk_pieces(manifest)
    return ids, sizes, sort_unique(None, pieces_key(ids), take=lambda at: gather(ids, at), stable=stable)


def count_chunks(manifest: Manifest | ManifestFile) -> ChunkCount:
    """How many distinct chunks the manifest names and their raw bytes, read a row group at a time. (Any
    occurrence of a repeated id serves: its raw size is the same.)"""
    _, sizes, order = _distinct(manifest, stable=False)
    return ChunkCount(len(order), int(gather(sizes, order).sum(dtype=np.uint64)) if len(order) else 0)


def chunk_table(manifest: Manifest | ManifestFile) -> pa.Table:
    """Every distinct chunk id the manifest names (``chunk``, 32 bytes) with its raw size (``size``,
    bytes), sorted by id: Arrow columns."""
    ids, sizes, order = _distinct(manifest)
    if not len(order):  # a snapshot of empty files, or one whose files DistCp copies
        return pa.table({"chunk": pa.array([], pa.binary(fmt.ID_LEN)), "size": pa.array([], pa.uint32())})
    return pa.table({"chunk": to_arrow(gather(ids, order)), "size": pa.array(gather(sizes, order), pa.uint32())})


def chunk_sizes(manifest: Manifest | ManifestFile) -> dict[bytes, int]:
    """Every chunk id of a manifest with its raw size (a dict: for small manifests and tests)."""
    t = chunk_table(manifest)
    return dict(zip(t.column("chunk").to_pylist(), t.column("size").to_pylist(), strict=True))


class Counting:
    """:func:`count_chunks` of a manifest on a thread of its own, begun at once: for a shipment that asks
    about no chunk (its manifest named), whose count is a figure only, made while the standby commits.
    :meth:`result` waits for it (and raises what it raised); the manifest's spool stays open until then."""

    def __init__(self, manifest: Manifest | ManifestFile) -> None:
        self._done = threading.Event()
        self._count: ChunkCount | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(manifest,), name="drsync-count", daemon=True).start()

    def _run(self, manifest: Manifest | ManifestFile) -> None:
        try:
            self._count = count_chunks(manifest)
        except BaseException as e:  # raised again by result()
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        """Until the count is done (or failed: :meth:`result` says so)."""
        self._done.wait()

    def result(self) -> ChunkCount:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._count is not None
        return self._count


@dataclass
class Ask:
    """The chunk ids a shipment asks the standby about, sorted, each once (U ids): ``order`` (U,) indices
    into ``pieces`` taken end to end, gathered a batch at a time as they are sent (:func:`gather`), so
    that a first sync never holds a sorted copy of every id beside the manifest's (30 MiB at 1,000,000)."""

    pieces: list[np.ndarray]
    order: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray) -> Ask:
        """Ids already sorted and unique, as they are."""
        return cls([ids], np.arange(len(ids), dtype=np.intp))

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, step: int = NEGOTIATE_BATCH) -> Iterator[list[bytes]]:
        """The ids in order, ``step`` at a time, as lists of 32-byte ``bytes``."""
        for i in range(0, len(self.order), step):
            yield to_arrow(gather(self.pieces, self.order[i:i + step])).to_pylist()

    def to_pylist(self) -> list[bytes]:
        """Every id (for small manifests and tests)."""
        return [cid for batch in self.batches() for cid in batch]


def negotiation_plan(new: Manifest | ManifestFile, applied: Manifest | ManifestFile | None) -> tuple[ChunkCount, Ask]:
    """What to ship ``new`` with: its :class:`ChunkCount`, and which of its chunk ids to ask the standby
    about (sorted, each once). Pure.

    A standby holds every chunk of the snapshot it applied, so only chunks that snapshot lacks can be
    missing: the chunks of ``new``'s rows whose chunk list differs from ``applied``'s at the same path
    (:func:`manifest_diff.chunks_beyond`, a merge of the two), less those ``applied`` names anywhere
    (a moved or copied file), found by reading ``applied``'s chunk column a row group at a time. Memory
    follows the changed rows, not the snapshot's size. Without a known applied snapshot, ask about all of
    them. (If the standby lost chunks anyway, a pack gone or an index file lost, its commit check refuses
    with :class:`ChunksLost` and forgets what it lost; the shipper then asks again with ``applied`` None.)
    A shipment whose manifest the standby holds already asks about nothing and does not plan
    (:func:`ship_snapshot`'s ``manifest_of``).
    """
    if applied is None:
        ids, sizes, order = _distinct(new)
        count = ChunkCount(len(order), int(gather(sizes, order).sum(dtype=np.uint64)) if len(order) else 0)
        del sizes
        return count, Ask(ids, order)
    count = count_chunks(new)
    beyond = IdSet.of(chunks_beyond(applied, new))
    if not len(beyond):
        return count, Ask.of(beyond.ids)
    held = np.zeros(len(beyond), bool)
    for t in column_groups(applied, ["chunks"]):
        flat = ids_array(pc.list_flatten(t.column("chunks")))
        if len(flat):
            pos, found = locate(beyond.ids, beyond.key, flat)
            held[pos[found]] = True
    return count, Ask.of(beyond.ids[~held])


def chunks_to_negotiate(new: Manifest | ManifestFile, applied: Manifest | ManifestFile | None) -> list[bytes]:
    """:func:`negotiation_plan`'s ids as a list (for small manifests and tests)."""
    return negotiation_plan(new, applied)[1].to_pylist()


def _id_set(replies: list[pa.Array]) -> IdSet:
    """The ids a standby says it lacks, as a set: taken as they are when they come sorted and each once
    (as asked), sorted otherwise (a standby owes no order)."""
    if not replies:
        return IdSet.empty()
    ids = ids_array(pa.chunked_array(replies, pa.binary(fmt.ID_LEN)))
    replies.clear()
    key = id_key(ids)
    if len(ids) < 2 or (bool((key[1:] >= key[:-1]).all()) and bool((ids[1:] > ids[:-1]).all())):
        return IdSet(ids, key)
    return IdSet.of(ids)


def _located_asked(repo: Repository, missing: IdSet, standby: str, asked: Callable[[], Ask]) -> Iterator[Any]:
    """``repo.located(missing)``; when a chunk the standby says it lacks is not in the repository, first
    tell whether it was asked about at all (``asked`` plans the negotiation again, on this error path
    only): an id never asked about is the standby's fault (it does not follow the protocol, or another
    version's), not damage of this repository. IntegrityError for damage, RefusedError for the standby."""
    try:
        yield from repo.located(missing)
    except IntegrityError:
        plan = asked()
        ids = gather(plan.pieces, plan.order)
        if len(ids):
            _, found = locate(ids, id_key(ids), missing.ids)
            unasked = missing.ids[~found]
        else:
            unasked = missing.ids
        if len(unasked):
            raise RefusedError(
                f"standby {standby} asked for {len(unasked)} chunk(s) it was never offered (first "
                f"{unasked[0].tobytes().hex()[:16]}): it does not follow drsync's negotiation (another version, or "
                f"not a drsync agent); nothing more is shipped to it; check what answers at that address") from None
        raise


def ship_snapshot(repo: Repository, info: SnapshotInfo, link: StandbyLink, *, epoch: int, sender: str,
                  sender_seq: int | None = None, bandwidth_bps: float | Callable[[], float | None] = 0.0,
                  applied: Manifest | ManifestFile | None = None,
                  guard: Callable[[bool], None] | None = None,
                  reading: Callable[[], AbstractContextManager[object]] | None = None,
                  delta: bool = False, manifest_of: str = "", patch_of: str = "",
                  ask_all: bool = False) -> ShipResult:
    """Negotiate, upload the missing chunks, commit. Raises on any refusal; safe to retry.

    ``applied`` is the manifest the standby says it has applied, when the
    primary still has it: negotiation then covers only what changed since.
    ``guard(final)`` raises when the sender may no longer act as primary; it is
    called before each upload message and (with ``final=True``) before the commit.
    ``sender_seq`` is the snapshot's position in the producing primary's repository (a relay passes the
    one it received; default: ``info.seq``, this repository's).
    ``reading()`` is held while this repository is read (manifest, negotiation, upload), not
    while the standby applies: e.g. the repository's shared lock, so GC waits for the reads only.
    ``bandwidth_bps``: bytes per second (0 unlimited), or a function giving the rate in force now (None
    for off), read before every upload message and the commit: when it is off the upload ends at the
    next message and :class:`ShippingPaused` is raised (what was sent stays on the standby).
    ``delta``: send a changed chunk as a delta against the chunk it replaces (:class:`Deltas`) when the
    standby holds that one; only for a standby whose Hello says it takes them (``delta_chunks``).
    ``manifest_of``: a snapshot the standby holds whose manifest is ``info``'s byte for byte (an unchanged
    capture): the commit names it instead of sending the bytes; when the standby cannot read it there
    (ManifestNotHeld) the commit is sent again with the bytes. Only for a standby whose Hello says it takes
    that (``manifest_by_reference``).
    ``patch_of``: the standby's applied snapshot, whose manifest ``applied`` is: the commit sends a patch of it
    (:mod:`drsync.repository.manifest_patch`) instead of the manifest when that is at most half its size;
    when the standby cannot rebuild the manifest from it, the bytes go at once. Only for a standby whose Hello
    says ``manifest_patches``. Either way ``ShipResult.manifest_refused`` says why the standby refused.
    ``ask_all``: ask the standby about every chunk of the snapshot (it lost chunks: :class:`ChunksLost`), even
    with ``manifest_of``; without it, a shipment with ``manifest_of`` asks about none.
    """
    check = guard or (lambda final: None)
    start = time.monotonic()
    pacer = Pacer(_bandwidth_of(bandwidth_bps))
    with (reading or contextlib.nullcontext)():
        manifest, count, sent = _negotiate_and_upload(repo, info, link, epoch=epoch, pacer=pacer, applied=applied,
                                                      check=check, delta=delta,
                                                      same=bool(manifest_of) and not ask_all)
    with manifest:
        try:
            with _manifest_form(manifest, applied, manifest_of, patch_of) as form:
                seq = info.seq if sender_seq is None else sender_seq
                try:
                    try:
                        return _commit(info, link, form, count, sent, epoch=epoch, sender=sender, pacer=pacer,
                                       check=check, sender_seq=seq, start=start)
                    except ManifestNotHeld as e:
                        if form.whole is form.sent:
                            raise
                        res = _commit(info, link, _ManifestForm(manifest), count, sent, epoch=epoch, sender=sender,
                                      pacer=pacer, check=check, sender_seq=seq, start=start)
                        return dataclasses.replace(res, manifest_bytes=res.manifest_bytes + form.size,
                                                   manifest_refused=str(e), manifest_tried=form.kind)
                except ChunksLost as e:
                    e.sent = sent  # what this try uploaded (and stays there): the retry's figures add it
                    raise
        finally:
            if isinstance(count, Counting):  # done reading before the spool closes, whatever happened
                count.wait()


@dataclass
class _ManifestForm:
    """How a commit carries the manifest ``whole``: its bytes (``sent`` is ``whole``), a patch of the manifest
    of snapshot ``patch_of`` (``sent``), or none when it names snapshot ``manifest_of``."""

    whole: Spool
    sent: Spool | None = None
    manifest_of: str = ""
    patch_of: str = ""

    def __post_init__(self) -> None:
        if self.sent is None and not self.manifest_of:
            self.sent = self.whole

    @property
    def size(self) -> int:
        return self.sent.size if self.sent is not None else 0

    @property
    def kind(self) -> str:
        """What the commit carries: "reference", "patch" or "bytes" (:attr:`ShipResult.manifest_sent`)."""
        return "reference" if self.manifest_of else "patch" if self.patch_of else "bytes"

    def __enter__(self) -> _ManifestForm:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sent is not None and self.sent is not self.whole:
            self.sent.close()


def _manifest_form(manifest: Spool, applied: Manifest | ManifestFile | None, manifest_of: str,
                   patch_of: str) -> _ManifestForm:
    """The manifest named (``manifest_of``), patched against ``applied`` (``patch_of``, when the patch is at
    most half its size), or whole."""
    if manifest_of:
        return _ManifestForm(manifest, None, manifest_of=manifest_of)
    if patch_of and applied is not None:
        try:
            patch, _ = make_patch(applied, ManifestFile(manifest, "manifest"))
        except DrsyncError:  # the applied snapshot's manifest is damaged here: the bytes go
            return _ManifestForm(manifest)
        if patch.size * 2 <= manifest.size:
            return _ManifestForm(manifest, patch, patch_of=patch_of)
        patch.close()
    return _ManifestForm(manifest)


def _commit(info: SnapshotInfo, link: StandbyLink, form: _ManifestForm, count: ChunkCount | Counting, sent: Upload, *,
            epoch: int, sender: str, pacer: Pacer, check: Callable[[bool], None], sender_seq: int,
            start: float) -> ShipResult:
    """The commit of a shipment whose chunks are on the standby: the manifest (or its patch) in pieces of
    :data:`COMMIT_PIECE_BYTES`, read from its spool as they are sent, or none (named: ``form.manifest_of``)."""
    pieces = form.sent.pieces(COMMIT_PIECE_BYTES) if form.sent is not None else iter(())
    if not pacer.may_send():
        raise ShippingPaused(f"shipping snapshot {info.id} paused before its commit "
                             f"({human_size(sent.stored_bytes)} of chunks sent stay on the standby)")
    check(True)
    # A seq is a position in one repository: the standby numbers what it receives itself. The
    # document goes without it, as before snapshots were numbered, so a standby that runs the
    # previous version during a rolling upgrade still reads it.
    outcome = link.commit(epoch, sender, dataclasses.replace(info, seq=0).to_bytes(), pieces, sender_seq=sender_seq,
                          manifest_of=form.manifest_of, patch_of=form.patch_of)
    if isinstance(count, Counting):
        count = count.result()
    return ShipResult(info.id, count.chunks, sent.chunks, sent.stored_bytes, max(0, count.raw_bytes - sent.raw_bytes),
                      round(time.monotonic() - start, 3), outcome, sent.deltas, form.size, form.kind, form.kind)


def _negotiate_and_upload(repo: Repository, info: SnapshotInfo, link: StandbyLink, *, epoch: int,
                          pacer: Pacer, applied: Manifest | ManifestFile | None,
                          check: Callable[[bool], None], delta: bool = False,
                          same: bool = False) -> tuple[Spool, ChunkCount | Counting, Upload]:
    """Returns (the manifest as read and hashed, its :class:`ChunkCount`, what the upload sent). A large
    manifest waits in a temporary file (its spool), not in memory, until the commit."""
    manifest = repo.manifest_spool(info, in_place=True)  # what is sent is hashed again by the standby
    try:
        return (manifest, *_negotiate_and_upload_chunks(repo, info, link, manifest, epoch=epoch, pacer=pacer,
                                                        applied=applied, check=check, delta=delta, same=same))
    except BaseException:
        manifest.close()
        raise


def _negotiate_and_upload_chunks(repo: Repository, info: SnapshotInfo, link: StandbyLink, manifest: Spool, *,
                                 epoch: int, pacer: Pacer, applied: Manifest | ManifestFile | None,
                                 check: Callable[[bool], None], delta: bool = False,
                                 same: bool = False) -> tuple[ChunkCount | Counting, Upload]:
    new = ManifestFile(manifest, f"manifest of snapshot {info.id}")  # read a row group at a time, as needed
    count: ChunkCount | None = None
    if same:  # nothing to ask about; the count (the figures' alone) is made while the standby commits (below)
        ask = Ask.of(IdSet.empty().ids)
    else:
        count, ask = negotiation_plan(new, applied)
    replies: list[pa.Array] = []
    if len(ask):
        for reply in link.missing(epoch, ask.batches(NEGOTIATE_BATCH)):
            replies.append(pa.array(reply, pa.binary(fmt.ID_LEN)))
    del ask
    missing = _id_set(replies)
    del replies
    deltas = Deltas.none()
    if delta and applied is not None and len(missing):
        deltas = plan_deltas(repo, link, epoch, applied, new, missing)
    sent = Upload()
    paused = False

    def chunk_batches() -> Iterator[list[ReceivedChunk]]:
        nonlocal paused
        batch: list[ReceivedChunk] = []
        size = raw = 0
        # Located from the index files as they are read (the capture let the index go, see Shipper.capture):
        # the missing ids and a flag each, never the whole index beside them; read in pack order.
        for rows in _located_asked(repo, missing, link.target,
                                   lambda: negotiation_plan(new, applied)[1]):
            for cid, loc in rows.iter_rows():
                # A message never grows past UPLOAD_MESSAGE_BYTES but by one chunk alone: its buffers stay
                # under the allocator's mapping threshold (drsync.allocators), reused, not faulted in anew.
                if batch and (size + loc.stored_length > UPLOAD_MESSAGE_BYTES or len(batch) >= UPLOAD_MESSAGE_CHUNKS):
                    yield batch
                    sent.chunks, sent.stored_bytes, sent.raw_bytes = (sent.chunks + len(batch),
                                                                      sent.stored_bytes + size, sent.raw_bytes + raw)
                    pacer.sent_message(size)  # bandwidth limit: wait until the rate allows the next message
                    batch, size, raw = [], 0, 0
                if size == 0:
                    check(False)
                    if not pacer.may_send():  # off: end the stream here, the standby keeps what it received
                        paused = True
                        return
                _, stored = repo.read_at(cid, loc)
                chunk = deltas.encode(cid, loc.encoding, loc.raw_length, stored) if deltas else None
                if chunk is None:
                    chunk = ReceivedChunk(cid, loc.encoding, loc.raw_length, stored)
                else:
                    sent.deltas += 1
                batch.append(chunk)
                size += len(chunk.data)
                raw += loc.raw_length
        if batch:
            yield batch
            sent.chunks, sent.stored_bytes, sent.raw_bytes = (sent.chunks + len(batch), sent.stored_bytes + size,
                                                              sent.raw_bytes + raw)

    if len(missing) and pacer.may_send():
        try:
            link.upload(epoch, chunk_batches())
        except DeltaRejected as e:
            e.sent = sent  # what went before the refusal (and stays there): the retry's figures add it
            raise
    elif len(missing):
        paused = True
    if paused:
        raise ShippingPaused(f"shipping snapshot {info.id} paused after {sent.chunks}/{len(missing)} chunks "
                             f"({human_size(sent.stored_bytes)}); the chunks sent stay on the standby and the next "
                             f"shipment sends only the rest")
    # Begun last: nothing here raises after it, and ship_snapshot waits for it before the spool closes.
    return (Counting(new) if count is None else count), sent
