"""Early upload: a capture's new chunks sent to a standby while the capture still runs.

A cycle used to run in two steps: the capture read the data root and stored its new chunks in this
repository, and only then did each shipment negotiate and send them. On a first sync or a large change
both steps are long, and the standby's disk sat idle through the first. An early upload overlaps them:
each chunk the capture stores (:attr:`drsync.repository.repo.ChunkWriter.tee`) is also queued for one
upload stream to the standby, and the shipment that follows finds those chunks there already (its
negotiation asks as before) and sends only the rest.

Best effort, by design: it never holds up nor fails a capture. A chunk is dropped rather than queued past
:data:`EARLY_BUDGET_BYTES` (a standby slower than the capture), and a stream that fails ends the early
upload quietly (logged at DEBUG); whatever did not get there, the shipment sends.

Only where it cannot cost more than it saves: a standby of this cluster and release (its Hello checked
before anything is sent), near (:data:`EARLY_NEAR_RTT_S`) and with no bandwidth limit in force (a far or
limited link gets deltas and manifest patches from the shipment instead of whole chunks early), and whose
shipper is idle (the early upload holds that shipper's lock for the capture's time, so it never runs beside
a shipment).

Safety: chunks only. Each is checked against its id by the standby, and is named by no snapshot until a
commit names it; the standby keeps it under the shipment's session (:mod:`drsync.agent.intake`: the
sender, epoch and process are the shipment's own) so that its GC does not take it meanwhile, and a session
whose sender goes silent ends (its chunks are then garbage there). Every message first passes the
primary's guard (a fenced primary sends nothing more).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

from drsync.agent.primary import UPLOAD_MESSAGE_BYTES, UPLOAD_MESSAGE_CHUNKS, Upload
from drsync.errors import DrsyncError
from drsync.transport import ReceivedChunk, StandbyLink

log = logging.getLogger("drsync.agent")

# At most this many stored bytes wait for one standby (a chunk past it is dropped for the shipment to send).
# Measured on the 1 GiB full sync: 64 MiB sent every chunk early and raised the primary's peak from 128 to
# 207 MiB; 16 MiB sends about 85 % of them (2.80 -> 2.64 s in the agent) for a peak of 151 MiB.
EARLY_BUDGET_BYTES = 16 * 1024 * 1024
# Chunks of fewer raw bytes are left to the shipment: a small file's chunk costs its per-chunk Python work
# more than its bytes, and that work, beside the capture's own reading of small files (one thread, holding
# the GIL), slowed the whole cycle. Measured (2 cores, bench pairs, 3 runs each): a full sync of 1 GiB in
# 256 files 2.65 s -> 2.46 s in the agent with early upload; of 20,000 files of 256 B to 4 KiB 4.27 s ->
# 4.66 s with it (so: not for them).
EARLY_MIN_RAW_BYTES = 128 * 1024
# A standby whose Hello round trip (the least of three) is this long or longer (seconds) gets nothing early: over
# a WAN link the shipment sends a chunk rewritten in place as a delta, and an early upload would send it whole.
# Looser than the deltas' 10 ms (drsync.agent.primary.DELTA_RTT_S): a loopback or LAN standby on a busy host
# measured 10 ms and more at times (breaker s65b, under a CI run), and then got nothing early.
EARLY_NEAR_RTT_S = 0.05
# Once the capture is done, the stream has this long (seconds) to end and the standby to make what it stored
# durable; past it the stream is cancelled (a standby that stopped answering never holds up the cycle: the
# shipment then meets it as it would have).
FINISH_WAIT_S = 30.0
# A message goes out once it holds this much, or as soon as the queue is empty and it holds a quarter of it.
_LOW_WATER = UPLOAD_MESSAGE_BYTES // 4

_END = None


class EarlyUpload:
    """One standby's early upload during one capture: :meth:`offer` each new chunk (never blocks), then
    :meth:`finish` (waits for the stream to end; returns what was sent). The stream starts at the first
    chunk offered: a capture that stores nothing costs no connection.

    ``link()`` makes the link (closed by :meth:`finish`); ``epoch`` and ``sender`` are the shipment's;
    ``cluster`` is (cluster id, release) of this repository; ``guard(False)`` raises when this agent may no
    longer act as primary; ``rate()`` is the target's bandwidth limit in force (bytes/s, None or 0: none);
    ``release()`` is called once the early upload is over (the shipper's lock); ``finish_wait_s``: see
    :data:`FINISH_WAIT_S`."""

    def __init__(self, target: str, link: Callable[[], StandbyLink], *, epoch: int, sender: str,
                 cluster: tuple[str, str], guard: Callable[[bool], None], rate: Callable[[], float | None],
                 release: Callable[[], None] = lambda: None, budget_bytes: int = EARLY_BUDGET_BYTES,
                 finish_wait_s: float = FINISH_WAIT_S) -> None:
        self.target = target
        self._make_link = link
        self.epoch, self.sender, self.cluster = epoch, sender, cluster
        self._guard, self._rate, self._release = guard, rate, release
        self.budget_bytes, self.finish_wait_s = budget_bytes, finish_wait_s
        self._queue: queue.SimpleQueue[tuple[bytes, int, bytes, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # stored bytes waiting
        self._off = ""  # why nothing more is taken ("" while it is)
        self._thread: threading.Thread | None = None
        self._link: StandbyLink | None = None
        self.sent = Upload()  # what went into the stream (crossed the link, or was on its way when it failed)
        self.dropped = 0  # chunks not taken (over the budget, or after the upload ended)
        self._finished = False

    @property
    def off(self) -> str:
        """Why this early upload takes nothing more ("" while it does)."""
        return self._off

    def offer(self, chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> None:
        """Queue one chunk (its stored bytes copied when a view) unless it is small (:data:`EARLY_MIN_RAW_BYTES`),
        over the budget, or the upload is off; never blocks."""
        if raw_length < EARLY_MIN_RAW_BYTES:
            return  # the shipment's (not counted as dropped)
        n = len(stored)
        with self._lock:
            if self._off or self._finished or self._queued + n > self.budget_bytes:
                self.dropped += 1
                return
            self._queued += n
        self._queue.put((chunk_id, encoding, stored if isinstance(stored, bytes) else bytes(stored), raw_length))
        with self._lock:  # started once, and before finish can look for it
            if self._thread is None and not self._finished:
                self._thread = threading.Thread(target=self._run, name=f"drsync-early-{self.target}", daemon=True)
                self._thread.start()

    def finish(self) -> Upload | None:
        """End the stream and wait for it (the standby has made what it stored durable when this returns);
        what was sent, or None when nothing was. Releases the shipper's lock, once. Idempotent."""
        with self._lock:
            first, self._finished = not self._finished, True
            thread = self._thread
        if first:
            try:
                if thread is not None:
                    self._queue.put(_END)
                    thread.join(self.finish_wait_s)
                    if thread.is_alive():  # a standby that stopped answering: cancel the stream
                        self._stop(f"standby {self.target} did not take the stream's end within "
                                   f"{self.finish_wait_s:.0f}s")
                        if self._link is not None:
                            self._link.close()
                        thread.join()
                while not self._queue.empty():  # what an upload that went off left queued
                    self._queue.get_nowait()
                self._queue.put(_END)  # for a stream's reader still waiting after its upload failed: it ends
                if self._link is not None:
                    self._link.close()
            finally:
                self._release()
        return self.sent if self.sent.chunks else None

    def _stop(self, why: str) -> None:
        with self._lock:
            self._off = self._off or why

    def _run(self) -> None:
        try:
            self._link = self._make_link()
            hello = self._link.hello(self.sender, self.epoch)
            if hello.cluster_id and (hello.cluster_id, hello.release) != self.cluster:
                self._stop(f"standby {self.target} keeps another cluster or release")
            elif hello.round_trip_s >= EARLY_NEAR_RTT_S or self._rate():
                self._stop(f"standby {self.target} is far (a round trip of {hello.round_trip_s * 1000:.0f} ms) or "
                           f"its bandwidth is limited")
            if self._off:
                log.debug("early upload to %s: not sent (%s)", self.target, self._off)
                return
            self._link.upload(self.epoch, self._messages())
        except DrsyncError as e:
            self._stop(str(e))
            log.debug("early upload to %s ended (%s); the shipment sends the rest", self.target, e)
        except Exception as e:  # never the capture's failure: the shipment sends what did not get there
            self._stop(repr(e))
            log.debug("early upload to %s failed", self.target, exc_info=True)

    def _messages(self) -> Iterator[list[ReceivedChunk]]:
        batch: list[ReceivedChunk] = []
        size = raw = 0
        while True:
            item = self._queue.get()
            if self._off:
                return
            if item is not _END:
                cid, encoding, data, raw_length = item
                with self._lock:
                    self._queued -= len(data)
                batch.append(ReceivedChunk(cid, encoding, raw_length, data))
                size += len(data)
                raw += raw_length
            full = size >= UPLOAD_MESSAGE_BYTES or len(batch) >= UPLOAD_MESSAGE_CHUNKS
            if batch and (item is _END or full or (size >= _LOW_WATER and self._queue.empty())):
                self._guard(False)  # a fenced primary sends nothing more
                yield batch
                self.sent.chunks += len(batch)
                self.sent.stored_bytes += size
                self.sent.raw_bytes += raw
                batch, size, raw = [], 0, 0
            if item is _END:
                return


def fan_out(uploads: list[EarlyUpload]) -> Callable[[bytes, int, bytes | memoryview, int], None] | None:
    """One :attr:`ChunkWriter.tee` offering each chunk to every early upload (None when there is none)."""
    if not uploads:
        return None

    def tee(chunk_id: bytes, encoding: int, stored: bytes | memoryview, raw_length: int) -> None:
        for u in uploads:
            u.offer(chunk_id, encoding, stored, raw_length)

    return tee
