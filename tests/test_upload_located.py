"""The primary's upload locates what it sends from the index files, never loading the index (issue 17).

At a first sync of 1,000,000 files the upload held the whole chunk index (61 bytes a chunk) beside
the ids the standby lacks; :meth:`Repository.located` reads the index files by ranges and yields just
the rows of the wanted ids, each once, each batch in pack order. These tests compare it with the
loaded index over many write sessions (ids in several index files, awkward ids), check the upload
against a real standby receiver with the index never loaded, and a standby that answers out of order.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from drsync.agent.primary import _id_set, ship_snapshot
from drsync.agent.standby import StandbyReceiver
from drsync.agent.state import StateStore
from drsync.errors import IntegrityError, RefusedError
from drsync.repository import format as fmt
from drsync.repository.ids import IdSet, id_list
from drsync.repository.repo import Repository
from tests.test_chunk_index import sessions_repo
from tests.test_snapshot_order import LocalLink, contents, new_repo, snap


@pytest.mark.parametrize("loaded", [False, True])
def test_located_gives_each_wanted_chunk_once_where_the_index_says(loaded: bool) -> None:
    storage, repo, data = sessions_repo(3, sessions=6, per=70, size=(1, 3000))
    again = repo.chunk_writer()  # a chunk written again in another session: in two index files
    dup = next(iter(data))
    again.add(dup, data[dup])
    again.flush()
    rnd = random.Random(9)
    wanted = IdSet.of([*rnd.sample(sorted(data), 200), dup])
    fresh = Repository.open(storage)
    if loaded:
        assert len(fresh.index)
    seen: list[bytes] = []
    for rows in fresh.located(wanted, batch=17):
        assert list(zip(rows.pack.tolist(), rows.offset.tolist(), strict=True)) == sorted(
            zip(rows.pack.tolist(), rows.offset.tolist(), strict=True))  # each batch in pack order
        for cid, loc in rows.iter_rows():
            seen.append(cid)
            assert fresh.read_at(cid, loc)[1]
            assert repo.read_chunk(cid) == data[cid]
    assert sorted(seen) == id_list(wanted.ids)
    assert (fresh._index is not None) == loaded  # never loaded to answer


def test_located_names_a_chunk_no_index_holds_after_giving_the_others() -> None:
    storage, _repo, data = sessions_repo(4, sessions=3, per=20, size=100)
    gone = b"\x07" * 32
    fresh = Repository.open(storage)
    got = []
    with pytest.raises(IntegrityError, match=f"chunk {gone.hex()[:16]} is not in the repository"):
        for rows in fresh.located(IdSet.of([*list(data)[:5], gone])):
            got += [cid for cid, _ in rows.iter_rows()]
    assert sorted(got) == sorted(list(data)[:5])
    assert fresh._index is None  # every index file was read: loading them all to look again finds no more


def test_a_standby_may_answer_out_of_order_and_twice() -> None:
    ids = [bytes([i]) * 32 for i in (5, 1, 9, 1, 3)]
    s = _id_set([pa.array(ids[:2], pa.binary(32)), pa.array(ids[2:], pa.binary(32))])
    assert id_list(s.ids) == sorted(set(ids))
    ordered = [bytes([i]) * 31 + b"\0" for i in (1, 2, 3)]  # trailing NUL bytes, already in order
    assert id_list(_id_set([pa.array(ordered, pa.binary(32))]).ids) == ordered
    assert len(_id_set([])) == 0


def test_an_upload_sends_every_chunk_without_loading_the_index(tmp_path: Path) -> None:
    """A first sync and a change, shipped to a real receiver in process: the primary's index is never loaded
    (as after its capture, which lets it go), and the standby's root ends equal to the data."""
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    data.mkdir()
    rnd = random.Random(3)
    for i in range(150):
        (data / f"f{i:03}").write_bytes(rnd.randbytes(rnd.randrange(0, 4000)))
    (data / "big").write_bytes(rnd.randbytes(3 * fmt.CHUNK_MAX))
    standby = new_repo(tmp_path / "standby")
    root = tmp_path / "standby-data"
    root.mkdir()
    rx = StandbyReceiver(standby, str(root), StateStore(str(tmp_path / "state")), agent="sb")
    link = LocalLink(rx)
    for step in range(2):
        info = snap(primary, data)
        primary.reload_index()
        res = ship_snapshot(primary, info, link, epoch=1, sender="east-1")
        assert primary._index is None
        assert res.missing_chunks > 0
        assert contents(root) == contents(data)
        for i in range(0, 150, 7):
            (data / f"f{i:03}").write_bytes(rnd.randbytes(rnd.randrange(1, 4000)) + bytes([step]))
    assert np.all(standby.index.contains_many(primary.index.rows().ids))


class _AskingForMore(LocalLink):
    """A standby that answers its first negotiation batch with one id it was never asked about."""

    def __init__(self, rx: StandbyReceiver, extra: bytes) -> None:
        super().__init__(rx)
        self.extra = extra

    def missing(self, epoch, batches):  # type: ignore[no-untyped-def]
        for i, reply in enumerate(super().missing(epoch, batches)):
            yield [*reply, self.extra] if i == 0 else reply


def test_a_standby_asking_for_chunks_never_offered_is_blamed_not_the_repository(tmp_path: Path) -> None:
    """Chunks a standby asks for that the primary never offered: the shipment fails naming the standby
    (RefusedError), never as damage of the primary's repository; a chunk it was offered and the primary's
    repository lost (its index files gone) is still damage (IntegrityError)."""
    primary = new_repo(tmp_path / "primary")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        (data / f"f{i:02}").write_bytes(random.Random(i).randbytes(900))
    standby = new_repo(tmp_path / "standby")
    (tmp_path / "root").mkdir()
    rx = StandbyReceiver(standby, str(tmp_path / "root"), StateStore(str(tmp_path / "state")), agent="sb")
    info = snap(primary, data)
    with pytest.raises(RefusedError, match=r"standby in-process asked for 1 chunk\(s\) it was never offered \(first "
                                           r"eeeeeeeeeeeeeeee\)"):
        ship_snapshot(primary, info, _AskingForMore(rx, b"\xee" * 32), epoch=1, sender="east-1")
    for f in (tmp_path / "primary" / "index").iterdir():
        f.unlink()
    primary.reload_index()
    with pytest.raises(IntegrityError, match="is not in the repository"):
        ship_snapshot(primary, info, LocalLink(rx), epoch=1, sender="east-1")
