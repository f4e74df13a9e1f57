"""Early upload (drsync.agent.early): a capture's new chunks go to an idle, near, unlimited standby of this
cluster while the capture runs; the shipment then sends only the rest. Best effort: it never blocks the
capture (past its budget a chunk is dropped for the shipment), and a standby it should not reach (another
cluster, far, limited) gets nothing from it.

The unit tests drive :class:`EarlyUpload` against a real in-memory standby link (chunks checked against their
ids as a standby does); the agent tests run real agent processes over loopback gRPC.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.agent.early import EARLY_MIN_RAW_BYTES, EARLY_NEAR_RTT_S, EarlyUpload, fan_out
from drsync.errors import FencedError, OperationFailed
from drsync.repository import chunks
from drsync.transport import ReceivedChunk, StandbyHello
from tests.conftest import make_tree, run_drsync, tree_state
from tests.test_bandwidth_agents import Agents, agents  # noqa: F401  (the fixture)

MiB = 1024 * 1024
CLUSTER = ("analytics", "6.2.1")


class MemoryStandby:
    """A standby link kept in memory: Hello as configured, and an upload that stores each chunk after
    checking it against its id (as the standby's intake does). ``gate``: each message waits for it."""

    def __init__(self, *, cluster: tuple[str, str] = CLUSTER, round_trip_s: float = 0.0,
                 fail_after: int | None = None) -> None:
        self.cluster, self.round_trip_s, self.fail_after = cluster, round_trip_s, fail_after
        self.stored: dict[bytes, bytes] = {}
        self.messages = 0
        self.uploads = 0
        self.closed = False
        self.gate = threading.Event()
        self.gate.set()

    def hello(self, sender: str, epoch: int) -> StandbyHello:
        return StandbyHello("standby", "standby", self.cluster[0], self.cluster[1], epoch, "", 0.0, 0.0,
                            round_trip_s=self.round_trip_s)

    def upload(self, epoch: int, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
        self.uploads += 1
        received = stored = stored_bytes = 0
        for batch in batches:
            while not self.gate.wait(0.05):  # held; a closed link cancels the stream, as a channel's close does
                if self.closed:
                    raise OperationFailed("the stream was cancelled")
            if self.fail_after is not None and self.messages >= self.fail_after:
                raise OperationFailed("standby went away")
            self.messages += 1
            for c in batch:
                chunks.decode(c.encoding, c.data, c.raw_length, c.id)  # IntegrityError if it lies
                received += 1
                if c.id not in self.stored:
                    self.stored[c.id] = bytes(c.data)
                    stored += 1
                    stored_bytes += len(c.data)
        return received, stored, stored_bytes

    def close(self) -> None:
        self.closed = True


def chunk(seed: int, size: int = 256 * 1024) -> tuple[bytes, int, bytes, int]:
    data = os.urandom(size) if seed < 0 else bytes([seed % 256]) * size
    enc, stored = chunks.encode(data)
    return chunks.chunk_id(data), enc, bytes(stored), size


def early(link: MemoryStandby, **kw: object) -> tuple[EarlyUpload, list[int]]:
    released: list[int] = []
    u = EarlyUpload("standby-1", lambda: link, epoch=3, sender="primary", cluster=CLUSTER,  # type: ignore[arg-type,return-value]
                    guard=kw.pop("guard", lambda final: None), rate=kw.pop("rate", lambda: None),  # type: ignore[arg-type]
                    release=lambda: released.append(1), **kw)  # type: ignore[arg-type]
    return u, released


def test_chunks_offered_arrive_checked_small_ones_are_left_to_the_shipment_and_the_lock_is_released_once() -> None:
    link = MemoryStandby()
    u, released = early(link)
    big = [chunk(-1) for _ in range(6)]
    small = chunk(7, EARLY_MIN_RAW_BYTES - 1)
    for c in big[:3]:
        u.offer(*c)
    u.offer(*small)
    for c in big[3:]:
        u.offer(*c)
    sent = u.finish()
    assert sent is not None and sent.chunks == 6 and sent.stored_bytes == sum(len(c[2]) for c in big)
    assert sent.raw_bytes == 6 * 256 * 1024
    assert set(link.stored) == {c[0] for c in big} and small[0] not in link.stored
    assert link.uploads == 1 and link.closed  # one stream for the whole capture, closed by finish
    assert u.finish() is sent and released == [1]  # idempotent: the shipper's lock released once
    u.offer(*chunk(-1))  # after finish: dropped, nothing sent
    assert u.dropped == 1 and len(link.stored) == 6


def test_a_capture_that_stores_nothing_opens_no_link() -> None:
    made: list[int] = []
    u = EarlyUpload("s", lambda: made.append(1) or MemoryStandby(), epoch=1, sender="p",  # type: ignore[func-returns-value]
                    cluster=CLUSTER, guard=lambda final: None, rate=lambda: None)
    u.offer(*chunk(1, 4096))  # a small file's chunk only
    assert u.finish() is None and made == []


def test_a_view_offered_is_copied_before_its_buffer_is_reused() -> None:
    link = MemoryStandby()
    link.gate.clear()  # the stream holds its messages: the offered chunk waits in the queue
    u, _ = early(link)
    data = bytearray(os.urandom(256 * 1024))
    cid = chunks.chunk_id(bytes(data))
    u.offer(cid, 0, memoryview(data), len(data))
    data[:] = b"\0" * len(data)  # the capture's buffer reused for the next chunk
    link.gate.set()
    assert u.finish() is not None and link.stored[cid] != bytes(data)  # checked against its id: the original


def test_offers_never_block_past_the_budget_a_chunk_is_dropped_for_the_shipment() -> None:
    link = MemoryStandby()
    link.gate.clear()  # a standby slower than the capture: nothing is taken off the queue meanwhile
    u, _ = early(link, budget_bytes=4 * 256 * 1024)
    offered = [chunk(-1) for _ in range(12)]
    for c in offered:
        u.offer(*c)  # returns at once (this test would hang otherwise)
    assert u.dropped > 0
    link.gate.set()
    sent = u.finish()
    assert sent is not None and sent.chunks + u.dropped == 12
    assert set(link.stored) <= {c[0] for c in offered} and len(link.stored) == sent.chunks


@pytest.mark.parametrize("why", ["another cluster", "another release", "far", "limited"])
def test_a_standby_it_should_not_reach_gets_nothing(why: str) -> None:
    link = MemoryStandby(cluster=("billing", "6.2.1") if why == "another cluster" else
                         ("analytics", "7.0") if why == "another release" else CLUSTER,
                         round_trip_s=EARLY_NEAR_RTT_S if why == "far" else 0.0)
    u, released = early(link, rate=(lambda: 1e6) if why == "limited" else (lambda: None))
    for _ in range(4):
        u.offer(*chunk(-1))
    assert u.finish() is None
    assert link.stored == {} and link.uploads == 0 and released == [1] and u.off


def test_a_fenced_primary_sends_nothing_more_and_finish_does_not_hang() -> None:
    link = MemoryStandby()
    fenced = threading.Event()

    def guard(final: bool) -> None:
        if fenced.is_set():
            raise FencedError("epoch 4 is newer than this primary's 3")

    u, released = early(link, guard=guard)
    u.offer(*chunk(-1, 1024 * 1024 + 1))  # over a message: it goes at once
    fenced.set()
    for _ in range(4):
        u.offer(*chunk(-1, 1024 * 1024))
    sent = u.finish()
    assert len(link.stored) <= 1 and (sent is None or sent.chunks <= 1) and released == [1]


def test_a_stream_that_fails_ends_the_early_upload_quietly() -> None:
    link = MemoryStandby(fail_after=1)
    u, released = early(link)
    for _ in range(8):
        u.offer(*chunk(-1, 1024 * 1024))
    u.finish()
    assert link.messages == 1 and released == [1] and "went away" in u.off
    u.offer(*chunk(-1))
    assert len(link.stored) <= 2


def test_a_standby_that_stops_answering_does_not_hold_up_the_cycle_past_the_finish_wait() -> None:
    link = MemoryStandby()
    link.gate.clear()  # it took the Hello, then never takes a message again
    u, released = early(link, finish_wait_s=0.2)
    for _ in range(3):
        u.offer(*chunk(-1))
    assert u.finish() is None  # returns: the stream cancelled after the wait
    assert link.closed and released == [1] and "did not take the stream's end" in u.off and link.stored == {}


def test_fan_out_offers_each_chunk_to_every_upload() -> None:
    a, b = MemoryStandby(), MemoryStandby()
    ua, _ = early(a)
    ub, _ = early(b)
    tee = fan_out([ua, ub])
    assert tee is not None and fan_out([]) is None
    c = chunk(-1)
    tee(*c)
    ua.finish()
    ub.finish()
    assert set(a.stored) == set(b.stored) == {c[0]}


# --- real agents ----------------------------------------------------------------------------------------------

def _once(pair: Agents, cfg: Path) -> dict[str, dict[str, float]]:
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code == 0, r.out + r.err
    return r.json()["results"]


def test_a_first_sync_sends_the_large_chunks_early_and_the_standby_ends_as_production(
        agents: Agents) -> None:  # noqa: F811
    agents.configure("standby", "standby")
    make_tree(agents.data("primary"), files=40, big=3)
    cfg = agents.configure("primary", "primary", f'[replication]\nstandbys = ["{agents.addr["standby"]}"]\n')
    agents.start("standby")
    first = _once(agents, cfg)[agents.addr["standby"]]
    big_bytes = 3 * 3 * MiB
    assert first["early_chunks"] >= 3, first  # the big files' chunks went while the capture ran
    assert first["shipped_bytes"] >= big_bytes, first  # early bytes are counted with the shipment's
    assert first["missing_chunks"] >= first["early_chunks"] + 40, first  # the small files went with it
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary"))
    # nothing new: nothing early; a new big file: its chunks early, the rest named as before
    again = _once(agents, cfg)[agents.addr["standby"]]
    assert again["early_chunks"] == 0 and again["missing_chunks"] == 0, again
    (agents.data("primary") / "tables" / "later.bin").write_bytes(os.urandom(2 * MiB))
    later = _once(agents, cfg)[agents.addr["standby"]]
    assert later["early_chunks"] >= 1 and later["shipped_bytes"] >= 2 * MiB, later
    assert tree_state(agents.data("standby")) == tree_state(agents.data("primary"))
    assert run_drsync("repo", "verify", "--config", agents.cfg["standby"]).code == 0


def test_a_limited_standby_gets_no_early_upload_and_another_clusters_standby_stores_nothing(
        agents: Agents, tmp_path: Path) -> None:  # noqa: F811
    agents.configure("limited", "standby")
    make_tree(agents.data("primary"), files=5, big=2)
    limited = agents.addr["limited"]
    cfg = agents.configure("primary", "primary", f'[replication]\nstandbys = ["{limited}"]\n'
                                                 f'bandwidth_limit = "1GiB/s"\n')
    agents.start("limited")
    res = _once(agents, cfg)[limited]
    assert res["early_chunks"] == 0 and res["shipped_bytes"] >= 6 * MiB, res
    assert tree_state(agents.data("limited")) == tree_state(agents.data("primary"))

    # A standby of another cluster: the shipment is refused before negotiating, and the early upload never
    # sends it a chunk either (its Hello is checked first).
    other = agents.configure("other", "standby")
    other.write_text(other.read_text().replace('id = "analytics"', 'id = "billing"'))
    agents.start("other")
    cfg = agents.configure("primary", "primary", f'[replication]\nstandbys = ["{agents.addr["other"]}"]\n')
    (agents.data("primary") / "tables" / "new.bin").write_bytes(os.urandom(3 * MiB))
    r = run_drsync("agent", "--config", cfg, "--once", "--json")
    assert r.code != 0 and "keeps cluster 'billing'" in r.err, r.err
    def packs(name: str) -> list[Path]:
        return [p for p in (tmp_path / f"{name}-repo").rglob("*") if p.is_file() and "pack" in str(p.parent)]

    assert packs("limited") and packs("other") == [], packs("other")
